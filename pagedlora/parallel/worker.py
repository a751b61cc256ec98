"""A tensor-parallel worker process: its shard of the model and of every adapter, its pool,
and the loop that serves the driver's messages."""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from pagedlora.adapter_pages import AdapterPacker, ResidentAdapter
from pagedlora.config import EngineConfig
from pagedlora.lora_adapter import ModuleWeights
from pagedlora.model import LlamaModel
from pagedlora.model_files import load_weights
from pagedlora.model_runner import ModelRunner
from pagedlora.parallel.comm import CollectiveError, TPComm
from pagedlora.parallel.messages import (
    LoadAdapter,
    Ready,
    RunStep,
    Shutdown,
    StepDone,
    WorkerError,
    WorkerSpec,
)
from pagedlora.parallel.shard import Shard
from pagedlora.pool import UnifiedPool
from pagedlora.sampler import RequestSampling, Sampler
from pagedlora.step_input import SequenceInput, StepInput

ORPHAN_CHECK_S = 0.5  # how often a worker checks that its driver is still its parent
START_TIMEOUT_S = 600.0  # the least a worker gets to start (imports, reading its shard)


def start_timeout_s(config: EngineConfig) -> float:
    """Seconds a worker may take to start: ``worker_timeout_s``, at least
    :data:`START_TIMEOUT_S` (a step's bound is no bound for reading a model)."""
    return max(config.worker_timeout_s, START_TIMEOUT_S)


def worker_main(spec: WorkerSpec, rank: int, conn: Connection) -> None:
    """A worker's entry point (a ``spawn`` process): joins the process group, builds rank
    ``rank``'s shard and pool, answers :class:`Ready` (or :class:`WorkerError`), then serves
    messages until :class:`Shutdown` or until the driver goes away.

    The worker ignores SIGINT (Ctrl-C reaches the whole process group; the driver decides
    what it means and stops the workers) and exits on its own when its driver dies: its pipe
    reaches end-of-file, and a watchdog thread sees its parent change (even while it waits
    in a collective).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(spec.driver_pid,), daemon=True,
                     name="pagedlora-tp-orphan-watch").start()
    torch.set_num_threads(spec.threads)
    try:
        worker = Worker.start(spec, rank)
    except BaseException:  # noqa: BLE001 - the driver reports it, naming the rank
        _send(conn, WorkerError(rank, traceback.format_exc()))
        return
    conn.send(Ready(rank, os.getpid(), worker.runner.kernel_backend))
    try:
        worker.serve(conn)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        # Nothing is left to save: skip the interpreter's teardown of torch's modules, which
        # takes seconds (the pool, the mappings and the sockets go with the process).
        os._exit(0)


class Worker:
    """One rank: a :class:`ModelRunner` over its shard of the model and its pool, and the
    placements of the adapters loaded into that pool, by placement id.

    A placement is forgotten when a later load writes any of its pages (the driver's
    allocator gave them away, so the driver will never name it again): the placements kept
    hold disjoint pages, which bounds them by the pool.

    Args:
        rank: this rank.
        shard: its part of the model.
        runner: the model runner of its shard (a sampler on rank 0 unless the driver samples).
        packer: writes adapter rows into its pool, at its shard's widths.
    """

    def __init__(self, rank: int, shard: Shard, runner: ModelRunner, packer: AdapterPacker
                 ) -> None:
        self.rank = rank
        self.shard = shard
        self.runner = runner
        self.packer = packer
        self.placements: dict[int, ResidentAdapter] = {}
        # request id -> (its block table, its sampling), as the driver's updates build them
        self.requests: dict[int, tuple[list[list[int]], RequestSampling]] = {}

    @classmethod
    def start(cls, spec: WorkerSpec, rank: int) -> Worker:
        """Joins the group (NCCL on CUDA, gloo on the CPU; collectives time out after
        ``spec.config.worker_timeout_s``) and builds the shard (all within
        :func:`start_timeout_s`).

        Raises:
            whatever the group, the model files or the model raise (reported to the driver).
        """
        from transformers import AutoConfig

        config = spec.config
        device = torch.device(config.device)
        if device.type == "cuda":  # rank r on the r-th device from the one configured
            device = torch.device("cuda", (device.index or 0) + rank)
            torch.cuda.set_device(device)
        # Meeting the other ranks may take as long as their imports; their collectives
        # then wait at most worker_timeout_s (a group of their own with that timeout).
        joining = datetime.timedelta(seconds=start_timeout_s(config))
        store = dist.TCPStore("127.0.0.1", spec.store_port, is_master=False, timeout=joining)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=spec.size, timeout=joining)
        group = dist.new_group(list(range(spec.size)),
                               timeout=datetime.timedelta(seconds=config.worker_timeout_s))
        hf_config = AutoConfig.from_pretrained(spec.model_dir)
        shard = Shard.of(hf_config, rank, spec.size)
        dtype = getattr(torch, config.dtype)
        model = LlamaModel(hf_config, load_weights(spec.model_dir, shard), dtype=dtype,
                           device=device, max_model_len=spec.max_model_len,
                           kernel_backend=config.kernel_backend, shard=shard,
                           comm=TPComm(rank, spec.size, group))
        pool = UnifiedPool.for_config(config, num_layers=shard.num_layers,
                                      num_kv_heads=shard.num_kv_heads, head_dim=shard.head_dim,
                                      static_slot_pages=spec.static_slot_pages, device=device)
        if pool.num_pages != spec.num_pages:
            raise RuntimeError(f"rank {rank}'s pool has {pool.num_pages} pages, the driver's "
                               f"{spec.num_pages}")
        sampler = Sampler(device) if rank == 0 and not spec.driver_samples else None
        return cls(rank, shard, ModelRunner(model, pool, sampler),
                   AdapterPacker(pool, module_shapes=shard.lora_widths,
                                 scale_widths=shard.dora_widths))

    def serve(self, conn: Connection) -> None:
        """Handles messages until :class:`Shutdown` or end-of-file; a failure is sent as
        :class:`WorkerError` and ends the loop (the driver then stops every rank)."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the driver is gone
                return
            if isinstance(msg, Shutdown):
                return
            try:
                reply = self.handle(msg)
            except CollectiveError as e:  # another rank died or hung
                _send(conn, WorkerError(self.rank, str(e), peer_lost=True))
                return
            except BaseException:  # noqa: BLE001 - the driver reports it, naming the rank
                _send(conn, WorkerError(self.rank, traceback.format_exc()))
                return
            if reply is not None:
                conn.send(reply)

    def handle(self, msg: LoadAdapter | RunStep) -> StepDone | None:
        """Loads an adapter's shard (no answer) or runs a step (answers :class:`StepDone`).

        Raises:
            TypeError: an unknown message.
        """
        if isinstance(msg, LoadAdapter):
            self._load(msg)
            return None
        if isinstance(msg, RunStep):
            return self._step(msg)
        raise TypeError(f"rank {self.rank}: unknown message {type(msg).__name__}")

    def _load(self, msg: LoadAdapter) -> None:
        shard = self.shard
        mine = {(layer, module): ModuleWeights(
                    *shard.shard_lora(module, w.a, w.b_t),
                    None if w.dora is None else shard.shard_dora(module, w.dora))
                for (layer, module), w in msg.weights.weights().items()}
        placement = self.packer.fill(msg.adapter, mine, msg.pages, msg.placement_id, msg.tail)
        self.placements = {pid: p for pid, p in self.placements.items()
                           if not p.overlaps(placement)}  # stale: its pages were reused
        self.placements[msg.placement_id] = placement

    def _step(self, msg: RunStep) -> StepDone:
        for rid in msg.finished_request_ids:
            self.requests.pop(rid, None)
        sequences = []
        for u in msg.sequences:
            if u.first_block == 0:
                table, sampling = list(u.new_blocks), u.sampling
            else:
                table, sampling = self.requests[u.request_id]
                table.extend(u.new_blocks)
            self.requests[u.request_id] = (table, sampling)
            sequences.append(SequenceInput(u.request_id, u.token_ids, u.start, tuple(table),
                                           u.adapter_key, u.sample, sampling, u.prompt_targets,
                                           u.prompt_logprobs_from, u.adapter_mix))
        step = StepInput(tuple(sequences),
                         {key: self.placements[pid] for key, pid in msg.placements.items()},
                         msg.finished_request_ids)
        if self.runner.sampler is not None:  # rank 0, sampling here
            return StepDone(self.rank, output=self.runner.run(step))
        logits, rows = self.runner.forward(step)
        if logits is None:
            return StepDone(self.rank)
        return StepDone(self.rank, rows=rows.ids(), logits=logits.cpu().numpy())


def _send(conn: Connection, msg: object) -> None:
    """Sends ``msg`` unless the driver is gone."""
    try:
        conn.send(msg)
    except (BrokenPipeError, OSError):
        pass


def _exit_with_parent(driver_pid: int) -> None:
    """Ends the process as soon as its parent is no longer the driver (it died: the worker was
    reparented), so that no worker outlives its engine, even one blocked in a collective."""
    while True:
        if os.getppid() != driver_pid:
            os._exit(1)
        time.sleep(ORPHAN_CHECK_S)
