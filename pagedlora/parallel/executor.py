"""TensorParallelExecutor: the engine's runner when the model is split over worker processes."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp  # registers torch's reductions: tensors cross as shared memory

from pagedlora.adapter_pages import AdapterFootprint, AdapterPacker, ResidentAdapter
from pagedlora.config import EngineConfig
from pagedlora.errors import EngineDeadError
from pagedlora.lora_adapter import AdapterWeights, LoraAdapter
from pagedlora.merged_weights import MergedStats
from pagedlora.model_runner import LogitRows
from pagedlora.parallel.host_weights import SharedWeights, share
from pagedlora.parallel.messages import (
    LoadAdapter,
    Ready,
    RunStep,
    SequenceUpdate,
    Shutdown,
    StepDone,
    WorkerError,
    WorkerSpec,
)
from pagedlora.parallel.worker import start_timeout_s, worker_main
from pagedlora.sampler import Sampler
from pagedlora.scheduler import RunnerOutput
from pagedlora.shared_pages import TailSpots
from pagedlora.step_input import StepInput

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # how long close() lets a worker leave the group before killing it
# Past worker_timeout_s, how long a step waits for ranks whose collectives timed out waiting
# for a hung peer to say so, so that the silent one is named.
COLLECTIVE_GRACE_S = 3.0


class TensorParallelExecutor:
    """The model runner of a tensor-parallel engine: ``N`` worker processes (``spawn``; one
    per device, on the CPU one per group of ``torch.get_num_threads() // N`` cores), rank r
    holding its :class:`Shard` of the model and a pool of the driver's page geometry, joined
    by ``torch.distributed`` (NCCL on CUDA, gloo on the CPU) for the forward pass's
    collectives. The driver keeps the scheduler, the allocator, the adapter registry and the
    host and disk tiers (vLLM's multiprocessing executor has the same split).

    One step is one message, pickled once and written to every worker's pipe: the step's
    sequences (token ids, positions, the blocks added to their tables since the last step:
    page ids) and each adapter's placement id; adapter rows travel once per load
    (:meth:`load`), as a shared-memory buffer that each worker maps and slices. Every rank
    answers; rank 0's answer holds the sampled tokens (or, with a sampler in the driver, the
    logits).

    Faults: a worker that dies (its process sentinel fires), fails (it reports its
    traceback) or does not answer within ``worker_timeout_s`` plus
    :data:`COLLECTIVE_GRACE_S` (hung; its peers' collectives time out after
    ``worker_timeout_s`` and they say so) makes :meth:`run` and :meth:`load` raise
    :class:`EngineDeadError` naming the rank; every worker is then stopped, and every later
    call raises the same error.
    Ctrl-C while a step runs lets the step finish (within the timeout) before the
    KeyboardInterrupt goes on (SIGINT is held back meanwhile), so the pipes stay in step.
    :meth:`close` (also run when the executor is garbage-collected or the interpreter exits)
    stops the workers and kills those that do not leave within :data:`STOP_TIMEOUT_S`; a
    driver killed outright leaves no worker behind either (they watch their parent, see
    :func:`worker_main`).

    Args:
        procs, conns: the started workers and the driver's end of their pipes, by rank.
        store: the ``TCPStore`` the ranks met at (kept for the executor's life).
        timeout_s: ``worker_timeout_s``.
        sampler: a sampler that runs in the driver (rank 0 then returns the logits), or None
            (rank 0 samples).
        vocab_size: columns of the logits.

    Attributes:
        kernel_backend: the workers' kernels ("torch" or "triton"), as rank 0 reports them.
        merged: :class:`NeverMerged`.
        error: why the workers are gone (the first reason), or None while they run.
    """

    model = None  # the workers hold it

    def __init__(self, procs: list, conns: list[Connection], store, *, timeout_s: float,
                 sampler: Sampler | None, vocab_size: int) -> None:
        self.procs = procs
        self.conns = conns
        self.timeout_s = timeout_s
        self.sampler = sampler
        self.vocab_size = vocab_size
        self.kernel_backend = ""  # the workers', once they are ready
        self.error: str | None = None  # why the workers are gone; set once
        self._store = store
        self._finished: tuple[int, ...] = ()  # finished request ids not sent yet
        self._tables: dict[int, tuple[list[int], ...]] = {}  # request id -> table sent
        self._stop = weakref.finalize(self, _stop_workers, procs, conns)
        self.merged = NeverMerged()  # merge_policy="auto" is refused under TP (EngineConfig)

    @classmethod
    def start(cls, config: EngineConfig, model_dir: Path, *, num_pages: int,
              static_slot_pages: int, max_model_len: int, vocab_size: int,
              sampler: Sampler | None) -> TensorParallelExecutor:
        """Spawns ``config.tensor_parallel_size`` workers and waits until each has built its
        shard (at most :func:`~pagedlora.parallel.worker.start_timeout_s`).

        Raises:
            RuntimeError: a worker failed to start (naming its rank and its error), or did
                not start in time; every worker is stopped then.
            ValueError: a CUDA device count below ``tensor_parallel_size``.
        """
        size = config.tensor_parallel_size
        device = torch.device(config.device)
        if device.type == "cuda" and (device.index or 0) + size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={size} from device {config.device!r} needs "
                             f"{(device.index or 0) + size} CUDA devices; "
                             f"{torch.cuda.device_count()} are visible")
        timeout = datetime.timedelta(seconds=start_timeout_s(config))
        store = dist.TCPStore("127.0.0.1", 0, size + 1, is_master=True, timeout=timeout,
                              wait_for_workers=False)
        spec = WorkerSpec(model_dir=Path(model_dir), config=config, max_model_len=max_model_len,
                          num_pages=num_pages, static_slot_pages=static_slot_pages,
                          size=size, driver_samples=sampler is not None,
                          threads=max(1, torch.get_num_threads() // size),
                          store_port=store.port, driver_pid=os.getpid())
        ctx = mp.get_context("spawn")
        procs, conns = [], []
        try:
            for rank in range(size):
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=worker_main, args=(spec, rank, child), daemon=True,
                                   name=f"pagedlora-tp{rank}")
                proc.start()
                child.close()
                procs.append(proc)
                conns.append(parent)
            executor = cls(procs, conns, store, timeout_s=config.worker_timeout_s,
                           sampler=sampler, vocab_size=vocab_size)
        except BaseException:
            _stop_workers(procs, conns)
            raise
        try:
            ready = executor._answers(range(size), Ready, "start",
                                      timeout_s=start_timeout_s(config))
        except EngineDeadError as e:
            raise RuntimeError(str(e)) from None
        executor.kernel_backend = ready[0].kernel_backend
        return executor

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, by rank."""
        return [p.pid for p in self.procs]

    def load(self, adapter: LoraAdapter, weights: AdapterWeights, pages: list[int],
             placement_id: int, tail: TailSpots | None = None) -> None:
        """Sends every worker the adapter, to fill ``pages`` and the shared spots ``tail``
        with its shard (in order before the step that uses it; a failure surfaces at that
        step).

        Raises:
            EngineDeadError: a worker is gone.
        """
        self._check_alive()
        shared = SharedWeights.of(weights)
        with self._exchange("adapter load"):
            for rank, conn in enumerate(self.conns):
                # pickled per rank: a shared buffer's file descriptor is handed out once
                self._send(rank, conn, LoadAdapter(adapter, pages, placement_id, shared, tail))

    def run(self, step: StepInput) -> RunnerOutput:
        """Runs one step on every rank.

        Returns:
            rank 0's sampled tokens (or the driver's sampler's, from rank 0's logits).
        Raises:
            EngineDeadError: a worker died, failed or did not answer in time.
        """
        self._check_alive()
        if self.sampler is not None:
            self.sampler.forget(step.finished_request_ids)
        finished = (*self._finished, *step.finished_request_ids)
        if not step.sequences:
            self._finished = finished  # for rank 0's sampler, with the next step
            return RunnerOutput()
        self._finished = ()
        for rid in finished:
            self._tables.pop(rid, None)
        updates = []
        for s in step.sequences:
            updates.append(SequenceUpdate.of(s, self._tables.get(s.request_id)))
            self._tables[s.request_id] = s.block_table
        msg = RunStep(tuple(updates), {k: p.placement_id for k, p in step.adapters.items()},
                      finished)
        data = ForkingPickler.dumps(msg)  # once, for every rank
        with self._exchange("step"):
            for rank, conn in enumerate(self.conns):
                self._send(rank, conn, data)
            first = self._answers(range(len(self.conns)), StepDone, "step")[0]
        if self.sampler is None:
            return first.output
        rows = LogitRows.of_ids(first.rows, {s.request_id: s for s in step.sequences})
        return rows.output(self.sampler, torch.from_numpy(first.logits))

    def close(self) -> None:
        """Stops the workers (Shutdown, then kill after :data:`STOP_TIMEOUT_S`) and closes
        the pipes. Idempotent."""
        self._stop()
        self.error = self.error or "the engine was closed"

    # -- internals -------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"{self.error}; the tensor-parallel engine cannot run any "
                                  f"more: make a new Engine")

    def _send(self, rank: int, conn: Connection, msg: object) -> None:
        """Writes ``msg`` (bytes: already pickled) to rank ``rank``; a broken pipe means the
        worker is gone."""
        try:
            if isinstance(msg, (bytes, memoryview)):
                conn.send_bytes(msg)
            else:
                conn.send(msg)
        except OSError:
            self._die(f"tensor-parallel worker rank {rank} (pid {self.procs[rank].pid}) is "
                      f"gone: {self._exit_words(rank)}{self._last_words(conn)}")

    @contextmanager
    def _exchange(self, what: str) -> Iterator[None]:
        """One conversation with the ranks (a step's message and answers, or a load's
        messages), which must not stop halfway: the pipes would then hold half of it. In the
        main thread, with Python's default SIGINT handler, a Ctrl-C meanwhile is held back and
        raised as KeyboardInterrupt when the conversation ends (at most ``worker_timeout_s``
        later; in other threads Ctrl-C does not interrupt the engine). Any other exception in
        the middle makes the workers unusable (they are stopped)."""
        held: list = []
        restore = threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if restore:
            signal.signal(signal.SIGINT, lambda *args: held.append(args))
        try:
            yield
        except EngineDeadError:
            raise
        except BaseException as e:
            self._record(f"{type(e).__name__} in the middle of a {what}: {e}")
            raise
        finally:
            if restore:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        if held:
            raise KeyboardInterrupt

    def _answers(self, ranks: Sequence[int], kind: type, what: str,
                 timeout_s: float | None = None) -> list:
        """Waits for one ``kind`` message from each of ``ranks``; returns them by rank.

        A rank whose collective lost a peer (``WorkerError.peer_lost``) points at another
        one: the wait goes on, so that the rank that died, failed, or stays silent past
        ``timeout_s + COLLECTIVE_GRACE_S`` (its peers' collectives time out after
        ``timeout_s``) is the one named.

        Raises:
            EngineDeadError: a worker died, reported an error, sent something else, or did
                not answer in time (all workers are stopped then).
        """
        pending = set(ranks)
        got: dict[int, object] = {}
        lost: dict[int, str] = {}  # rank -> its collective's error
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s + COLLECTIVE_GRACE_S
        while pending:
            waitables = {self.conns[r]: r for r in pending}
            waitables.update({self.procs[r].sentinel: r for r in pending})
            ready = wait(list(waitables), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self._die(f"tensor-parallel worker rank {_ranks(pending)} did not answer the "
                          f"{what} within {timeout_s:g} s (hung)"
                          + _lost_words(lost))
            for obj in sorted(ready, key=lambda o: not isinstance(o, Connection)):
                rank = waitables[obj]
                if rank not in pending:
                    continue
                conn = self.conns[rank]
                if not (isinstance(obj, Connection) or conn.poll()):  # no last message
                    self._die(f"tensor-parallel worker rank {rank} (pid "
                              f"{self.procs[rank].pid}) {self._exit_words(rank)} during the "
                              f"{what}" + _lost_words(lost))
                msg = self._receive(rank, conn, what, lost)
                pending.discard(rank)
                if isinstance(msg, WorkerError):
                    lost[rank] = msg.message
                elif not isinstance(msg, kind):
                    self._die(f"tensor-parallel worker rank {rank} answered the {what} with "
                              f"{type(msg).__name__}, expected {kind.__name__}")
                else:
                    got[rank] = msg
        if lost:
            self._die(f"tensor-parallel workers lost each other in a collective during the "
                      f"{what}" + _lost_words(lost))
        return [got[r] for r in sorted(got)]

    def _receive(self, rank: int, conn: Connection, what: str, lost: dict[int, str]
                 ) -> object:
        """Rank ``rank``'s next message; a WorkerError is raised as EngineDeadError unless it
        is a lost peer's (returned)."""
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            self._die(f"tensor-parallel worker rank {rank} (pid {self.procs[rank].pid}) "
                      f"{self._exit_words(rank)} during the {what}" + _lost_words(lost))
        if isinstance(msg, WorkerError) and not msg.peer_lost:
            self._die(f"tensor-parallel worker rank {rank} failed during the {what}:\n"
                      f"{msg.message.rstrip()}")
        return msg

    @staticmethod
    def _last_words(conn: Connection) -> str:
        """The traceback a worker sent before it left (it failed on a message that had no
        answer, an adapter load), else ""."""
        try:
            msg = conn.recv() if conn.poll() else None
        except (EOFError, OSError):
            return ""
        return f", after failing:\n{msg.message.rstrip()}" if isinstance(msg, WorkerError) \
            else ""

    def _exit_words(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(0.5)
        code = proc.exitcode
        if code is None:
            return "closed its pipe"
        return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"

    def _die(self, message: str) -> None:
        """:meth:`_record`, then raises EngineDeadError."""
        self._record(message)
        self._check_alive()

    def _record(self, message: str) -> None:
        """Records why the workers are gone (the first reason wins) and kills them at once: a
        hung or half-informed worker cannot be asked to leave."""
        if self.error is None:
            self.error = message
            log.error("%s; stopping every worker", message)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        self._stop()


class NeverMerged:
    """The merged weights of a tensor-parallel engine: none (``merge_policy="auto"`` is
    refused with ``tensor_parallel_size > 1``; see ``EngineConfig``). What the core reads of
    :class:`pagedlora.merged_weights.MergedWeights`."""

    stats = MergedStats(merges=0, seconds=0.0, bytes=0, key=None)

    def can_merge(self, adapter: ResidentAdapter) -> bool:
        """Never."""
        return False

    def release(self) -> None:
        """Nothing to release."""


class ShardedAdapterPages:
    """The adapter store's pages (``AdapterPages``) on a tensor-parallel engine: placements
    are computed in the driver (the same page tables as every rank's, which the driver needs
    for its accounting only), rows are written by the workers, each its shard; host memory
    holds each adapter once, in shared memory (:func:`share`), for all ranks.

    Args:
        packer: the placement arithmetic at a rank's row widths (over the driver's pool,
            which has no tensor).
        executor: the workers.
    """

    def __init__(self, packer: AdapterPacker, executor: TensorParallelExecutor) -> None:
        self.packer = packer
        self.executor = executor

    def footprint(self, adapter: LoraAdapter) -> AdapterFootprint:
        """Pages ``adapter`` takes on each rank (the same on every rank)."""
        return self.packer.footprint(adapter)

    def fill(self, adapter: LoraAdapter, weights: AdapterWeights, pages: list[int],
             placement_id: int, tail: TailSpots | None = None) -> ResidentAdapter:
        """Sends the adapter to every worker to fill ``pages`` and ``tail``; returns the
        placement.

        Raises:
            ValueError: ``pages`` or ``tail`` do not match :meth:`footprint`.
            EngineDeadError: a worker is gone.
        """
        placement = self.packer.place(adapter, pages, placement_id, tail)
        self.executor.load(adapter, weights, pages, placement_id, tail)
        return placement

    def host_form(self, weights: AdapterWeights) -> AdapterWeights:
        """``weights`` in shared memory (one copy per machine that every rank maps)."""
        return share(weights)


def _ranks(ranks) -> str:
    return ", ".join(str(r) for r in sorted(ranks))


def _lost_words(lost: dict[int, str]) -> str:
    """What the ranks whose collectives lost a peer said."""
    if not lost:
        return ""
    return "; " + "; ".join(f"rank {r}'s collective failed waiting for it ({m})"
                            for r, m in sorted(lost.items()))


def _stop_workers(procs: list, conns: list[Connection]) -> None:
    """Asks every worker to leave, kills those still there after :data:`STOP_TIMEOUT_S`,
    closes the pipes. Safe to call again."""
    for conn in conns:
        try:
            conn.send(Shutdown())
        except (OSError, ValueError):  # gone, or the pipe is closed already
            pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    for conn in conns:
        conn.close()
