"""What one engine step asks of the device: kernel launches, host-to-device copies, reads back.

``census(engine)`` runs one ``engine.step()`` and counts, in the model runner's part of it
(building the batch, the forward pass, sampling; adapter loads come before it):

- Triton kernel launches (calls of a ``@triton.jit`` kernel, compiled or interpreted);
- torch ops that compute (aten ops other than views and metadata), each one or more device
  kernels on a GPU;
- host-to-device copies, and which of them block the host (from pageable memory, or
  ``non_blocking=False``; ``torch.tensor(..., device="cuda")`` is one);
- device-to-host reads (``.item()``, ``.tolist()``, a mask's ``nonzero``...), each of which
  waits for the device to catch up.

On the CPU the device is the host: copies count zero there, while the reads are counted by
the ops that would wait for a GPU (``item``, ``nonzero``...), and launches and ops are what a
GPU would launch. The sampled tokens' read-back (``tolist``) is not an aten op and is not
counted: every step has exactly one. Used by ``gpu_bench.py`` (a decode step of the
benchmark's engine, and of the backend check's Triton engine) and ``profile_step.py``.

    python benchmarks/profile_step.py --census
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that only describe memory (no kernel on any device)
_VIEWS = {"view", "_unsafe_view", "reshape", "as_strided", "select", "slice", "transpose", "t",
          "permute", "unsqueeze", "squeeze", "expand", "split", "split_with_sizes", "chunk",
          "unbind", "diagonal", "alias", "detach", "flatten", "unflatten", "narrow", "view_as",
          "empty", "empty_like", "empty_strided", "lift_fresh", "_reshape_alias", "unfold",
          "movedim", "numpy_T"}
_READS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "masked_select"}


@dataclass
class StepCensus:
    """Counts of one step (see the module docstring).

    Attributes:
        triton_launches: Triton kernels launched.
        torch_ops: aten ops that compute (no views).
        host_to_device: copies into device memory from the host; blocking_host_to_device: of
            those, the ones the host waits for.
        device_to_host: reads of device values on the host.
        num_tokens, batch_size: of the step counted.
    """

    triton_launches: int = 0
    torch_ops: int = 0
    host_to_device: int = 0
    blocking_host_to_device: int = 0
    device_to_host: int = 0
    num_tokens: int = 0
    batch_size: int = 0

    def as_dict(self) -> dict:
        """The counts by attribute name (what gpu_bench writes into its JSON)."""
        return asdict(self)


def _device(x) -> str | None:
    return x.device.type if isinstance(x, torch.Tensor) else None


class _Counter(TorchDispatchMode):
    """Classifies the aten ops dispatched while it is active into a :class:`StepCensus`."""

    def __init__(self, counts: StepCensus) -> None:
        super().__init__()
        self.counts = counts
        self.paused = False  # inside a Triton launch (the interpreter's own copies)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused:
            self.note(func.overloadpacket.__name__, args, kwargs, out)
        return out

    def note(self, name: str, args, kwargs, out) -> None:
        """Counts one op ``name`` called with ``args``/``kwargs`` that returned ``out``."""
        c = self.counts
        if name in ("_to_copy", "copy_"):  # copy_(dst, src), _to_copy(src) -> out
            src, dst = (args[1], args[0]) if name == "copy_" else (args[0], out)
            from_host, to_host = _device(src) == "cpu", _device(dst) == "cpu"
        else:
            from_host = to_host = False
        if name in _READS or (to_host and not from_host):
            c.device_to_host += 1
        elif name == "lift_fresh" and _device(out) not in (None, "cpu"):
            c.host_to_device += 1  # torch.tensor(data, device=...): from pageable memory
            c.blocking_host_to_device += 1
        elif from_host and not to_host:
            c.host_to_device += 1
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            if not (non_blocking and src.is_pinned()):
                c.blocking_host_to_device += 1
        if name not in _VIEWS:
            c.torch_ops += 1


class _TritonLaunches:
    """Counts launches of ``@triton.jit`` kernels while active (patches the ``run`` method
    of Triton's ``JITFunction`` and ``InterpretedFunction`` classes, restored on exit), and
    pauses ``counter`` inside them: the interpreter's copies to numpy and back are not the
    step's."""

    def __init__(self, counter: _Counter) -> None:
        self.counter = counter
        self._saved: list[tuple[type, object]] = []

    def __enter__(self) -> _TritonLaunches:
        try:
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction
        except ImportError:  # no triton: nothing launches
            return self
        for cls in (JITFunction, InterpretedFunction):
            original = cls.run
            self._saved.append((cls, original))

            def run(kernel, *a, _original=original, **k):
                if not k.get("warmup"):
                    self.counter.counts.triton_launches += 1
                self.counter.paused = True
                try:
                    return _original(kernel, *a, **k)
                finally:
                    self.counter.paused = False
            cls.run = run
        return self

    def __exit__(self, *exc) -> None:
        for cls, original in self._saved:
            cls.run = original


def census(engine) -> StepCensus:
    """Runs one ``engine.step()`` (in this thread; the engine must have work) and counts what
    its model runner asked of the device.

    Raises:
        ValueError: the step ran nothing (no request was scheduled).
    """
    counts = StepCensus()
    runner = engine.core.runner
    run = runner.run

    def counted(step):
        counter = _Counter(counts)
        with counter, _TritonLaunches(counter):
            return run(step)
    runner.run = counted
    steps = engine.stats()["num_steps"]
    try:
        engine.step()
    finally:
        runner.run = run
    last = engine.stats()["last_step"]
    if engine.stats()["num_steps"] == steps or not last.get("batch_size"):
        raise ValueError("the counted step scheduled no request")
    counts.num_tokens, counts.batch_size = last["num_tokens"], last["batch_size"]
    return counts
