"""benchmarks/step_census.py, the count of what a step asks of the device: its classification
of copies and reads (on "meta" tensors, a device that is not the host, since this machine has
no GPU), and a census of a real step on the CPU. The Triton launch count is checked against
the kernels' structure in tests/test_gpu_bench.py (the interpreter needs its own process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from support import random_prompt

from pagedlora import Engine, SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from step_census import StepCensus, _Counter, census  # noqa: E402


def counted(*calls) -> StepCensus:
    counts = StepCensus()
    counter = _Counter(counts)
    for name, args, kwargs, out in calls:
        counter.note(name, args, kwargs, out)
    return counts


def test_copies_and_reads_are_classified_by_device():
    host, dev = torch.zeros(4), torch.zeros(4, device="meta")
    c = counted(("_to_copy", (host,), {"device": dev.device, "non_blocking": True}, dev),
                ("copy_", (dev, host), {}, dev),            # into the device, blocking
                ("lift_fresh", (dev,), {}, dev),             # torch.tensor(data, device=...)
                ("_to_copy", (dev,), {"device": host.device}, host),  # a read back
                ("_local_scalar_dense", (dev,), {}, 0),      # .item()
                ("nonzero", (dev,), {}, dev),                # a mask's count
                ("copy_", (host, host.clone()), {}, host),   # host to host: no transfer
                ("view", (dev,), {}, dev))                   # no kernel
    assert (c.host_to_device, c.blocking_host_to_device, c.device_to_host) == (3, 3, 3)
    assert c.torch_ops == 6  # not the view, nor lift_fresh (its copy is the transfer)


def test_a_copy_from_pinned_memory_without_blocking_is_not_blocking():
    if not torch.cuda.is_available():  # pinning needs a CUDA runtime
        pytest.skip("pinned host memory needs CUDA")
    host, dev = torch.zeros(4).pin_memory(), torch.zeros(4, device="cuda")
    c = counted(("copy_", (dev, host, True), {}, dev))
    assert (c.host_to_device, c.blocking_host_to_device) == (1, 0)


def test_census_of_a_decode_step_on_the_cpu(tiny_llama_dir, make_adapter):
    path = make_adapter(tiny_llama_dir, "q", r=4, target_modules=["q_proj", "v_proj"], seed=5)
    with Engine(tiny_llama_dir, pool_gb=0.02, kernel_backend="torch") as engine:
        engine.add_adapter("q", path)
        for i in range(3):
            engine.add_request(random_prompt(5 + i, seed=i), "q" if i else None,
                               SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        prefill, decode = census(engine), census(engine)
        with pytest.raises(ValueError, match="scheduled no request"):
            while engine.has_unfinished():
                engine.step()
            census(engine)
    assert (prefill.batch_size, prefill.num_tokens) == (3, 5 + 6 + 7)
    assert (decode.batch_size, decode.num_tokens) == (3, 3)
    for c in (prefill, decode):
        assert c.triton_launches == 0 and c.torch_ops > 50
        assert c.host_to_device == c.device_to_host == 0  # one device: the host
