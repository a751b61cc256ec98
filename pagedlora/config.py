"""EngineConfig: every engine option in one validated dataclass, passed explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from pagedlora.kernels.backend import KERNEL_BACKENDS
from pagedlora.merge_policy import MERGE_POLICIES
from pagedlora.scheduler import MEMORY_LAYOUTS, POLICIES, SchedulerConfig

DTYPES = ("float32", "bfloat16", "float16")
# The option choices, where the CLI and the LMI options find them.
__all__ = ["DTYPES", "KERNEL_BACKENDS", "MEMORY_LAYOUTS", "MERGE_POLICIES", "POLICIES",
           "EngineConfig"]


@dataclass(frozen=True)
class EngineConfig:
    """Options of one :class:`pagedlora.Engine`.

    Attributes:
        pool_gb: size of the unified device pool in GiB (2**30 bytes); KV blocks and adapter
            weights both take pages from it.
        dtype: "float32", "bfloat16" or "float16"; weights, activations and the pool use it.
            None (the default) picks float32 on the CPU and bfloat16 on CUDA.
        device: torch device string ("cpu", "cuda", "cuda:1").
        kernel_backend: "auto", "torch" or "triton": the KV write, paged attention and LoRA
            kernels. "auto" runs Triton on CUDA and the torch references on the CPU; "triton"
            on the CPU runs the Triton kernels through triton's interpreter (slow, for tests),
            which needs ``TRITON_INTERPRET=1`` in the environment before triton is imported.
        block_size: tokens per KV block; one page holds one block of one layer
            (``2 * block_size * num_kv_heads * head_dim`` elements).
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: most tokens (prefill + decode) in one step; longer prompts are
            prefilled in chunks.
        max_model_len: most tokens (prompt + output) per request; None takes the model's
            ``max_position_embeddings``.
        max_loras: most distinct adapters in one step (the base model does not count); with
            ``memory_layout="static"`` also the number of adapter slots.
        max_lora_rank: largest adapter rank accepted by ``add_adapter``.
        memory_layout: how the pool's pages are shared. "unified" (the default): one free list
            for KV blocks and adapter rows, an adapter taking pages in proportion to its rank
            (S-LoRA, Sheng et al. 2023, section 4.1). "static": vLLM's way of sizing LoRA
            buffers, for comparison: ``max_loras`` slots, each the pages of an adapter of
            ``max_lora_rank`` on all seven projections of every layer, are reserved up front;
            every adapter takes one whole slot whatever its rank, and KV blocks get only the
            rest of the pool.
        seed: engine seed; a request without its own seed samples from a generator seeded with
            ``seed`` and the request's index.
        policy: admission order of waiting requests: "fcfs" (arrival), "cluster" (requests
            whose adapter is in the batch or resident first; S-LoRA section 5.2) or "fair"
            (virtual token counters per adapter; Sheng et al. 2024).
        policy_max_wait_s: "cluster" takes a request waiting longer than this many seconds
            before any other (the starvation bound).
        watermark: fraction of the pool's pages kept free when admitting a request while
            others run, so running requests can grow without preemption (vLLM's watermark).
        enable_prefix_caching: reuse the KV blocks of earlier requests with the same adapter
            and prompt prefix.
        ttft_deadline_s: engine-wide bound on time to first token, seconds; a waiting request
            that can no longer meet it finishes with "abort" (S-LoRA section 5.2, early abort).
            ``SamplingParams.deadline_s`` overrides it per request. None: no bound.
        max_cpu_loras: most adapters whose weights are kept in host memory (vLLM and SageMaker
            LMI's option); the least recently used beyond it are spilled to ``spill_dir``. None
            (the default): no limit. 0 keeps none (every load reads the disk). Adapters in the
            pool need not also be in host memory, and registered adapters take no host memory
            until used (or added with ``preload=True``).
        host_cache_gb: most GiB of adapter weights kept in host memory, applied together with
            ``max_cpu_loras``; None (the default): no limit.
        spill_dir: directory for adapters evicted from host memory (one safetensors file per
            content hash, written atomically, reused while intact, checked on every read).
            None (the default): a private directory under ``$PAGEDLORA_CACHE/spill``, made on
            the first spill and deleted with the engine (private, so that engines never delete
            each other's files; a killed process leaves its directory behind). A directory
            that cannot be written (full, read-only) only costs speed: adapters are re-read
            from their sources.
        tensor_parallel_size: devices the model is split over (Megatron-LM sharding; S-LoRA
            section 6 for the adapters): that many worker processes, rank r on device
            ``cuda:r`` (counted from ``device``'s index) with NCCL, or on the CPU with gloo and
            ``torch.get_num_threads() // tensor_parallel_size`` threads each. Each rank holds
            its shard of the weights and a pool of ``pool_gb`` GiB (per device) whose pages
            hold its KV heads and its rows of each adapter; the driver process keeps the
            scheduler, the page accounting and the adapters' host and disk tiers (host memory
            holds one shared copy of each adapter for all ranks). The model's heads,
            intermediate and hidden sizes must be multiples of it, and its KV heads a multiple
            or a divisor (they are then replicated). 1 (the default): one process, no workers.
        worker_timeout_s: seconds the driver waits for a tensor-parallel worker to start, or
            to answer one step, before it declares the worker hung; the workers' collectives
            time out after as long. A worker that dies or hangs fails the running requests
            with "error" naming its rank, and the engine must be rebuilt.
        max_logprobs: the largest ``SamplingParams.logprobs`` and ``prompt_logprobs`` a request
            may ask (vLLM's option and default, 20; OpenAI's chat ``top_logprobs`` limit).
        merge_policy: "never" (the default): every step adds each sequence's LoRA to the base
            model's output (unmerged: any mix of adapters per step). "auto": a step whose
            requests all use one adapter at weight 1 (no base request, mix or scaled
            adapter; DoRA adapters included) runs on that adapter's weights merged
            into copies of the base weights, at the base model's speed, once the adapter has run
            a few such steps unmerged (dLoRA's dynamic merge, Wu et al. OSDI 2024); the next
            step with another adapter or a base request runs unmerged again. The merged copies
            (the fused weights the adapter targets: up to the size of the model's projection
            weights) live on the device outside the pool; see ``stats()["merge"]``. Refused
            with ``tensor_parallel_size > 1``.
        lora_shrink_in_base_after: on the CPU (oneDNN's packed GEMMs), steps of at most 64
            tokens (decodes, short prefills) that the same set of adapters must run in a row
            before their lora_A rows are packed below the base weights they share an input
            with (q/k/v, o, gate/up, down), so that the LoRA shrinks come out of the base
            GEMMs; packing again costs a reorder of every adapted weight, hence the wait.
            None (the default) waits about as many steps as the packing costs in the steps'
            savings (the ski-rental rule: at most twice the cost of knowing the future):
            SmolLM2's mixed-4 packs in ~0.37 s and saves ~5 ms a decode step in float32
            (64 steps), ~0.05-0.1 s and ~3.7 ms in bfloat16 (16 steps; docs/benchmarks.md,
            issue 19 stop 27). 0: never (a shrink GEMM per fused weight). One process only:
            ignored with ``tensor_parallel_size > 1``.

    Raises:
        ValueError: naming the offending option, from ``__post_init__``.
    """

    pool_gb: float = 1.0
    dtype: str | None = None
    device: str = "cpu"
    kernel_backend: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_loras: int = 8
    max_lora_rank: int = 64
    memory_layout: str = "unified"
    seed: int = 0
    policy: str = "fcfs"
    policy_max_wait_s: float = 5.0
    watermark: float = 0.01
    enable_prefix_caching: bool = True
    ttft_deadline_s: float | None = None
    max_cpu_loras: int | None = None
    host_cache_gb: float | None = None
    spill_dir: str | os.PathLike | None = None
    tensor_parallel_size: int = 1
    worker_timeout_s: float = 300.0
    max_logprobs: int = 20
    merge_policy: str = "never"
    lora_shrink_in_base_after: int | None = None

    def __post_init__(self) -> None:
        if not self.pool_gb > 0:
            raise ValueError(f"pool_gb must be > 0, got {self.pool_gb!r}")
        if self.dtype is None:
            cpu = self.device.split(":")[0] == "cpu"
            object.__setattr__(self, "dtype", "float32" if cpu else "bfloat16")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, "
                             f"got {self.kernel_backend!r}")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 1
        ):
            raise ValueError(f"max_model_len must be a positive int or None, "
                             f"got {self.max_model_len!r}")
        # block_size, max_num_seqs, max_num_batched_tokens, max_loras, policy,
        # policy_max_wait_s, watermark, enable_prefix_caching: the scheduler's own checks
        self.scheduler_config(self.max_model_len or 1)
        if not isinstance(self.max_lora_rank, int) or isinstance(self.max_lora_rank, bool) \
                or self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be a positive int, got {self.max_lora_rank!r}")
        if self.memory_layout not in MEMORY_LAYOUTS:
            raise ValueError(f"memory_layout must be one of {MEMORY_LAYOUTS}, "
                             f"got {self.memory_layout!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.ttft_deadline_s is not None and not self.ttft_deadline_s > 0:
            raise ValueError(f"ttft_deadline_s must be > 0 or None, got {self.ttft_deadline_s!r}")
        if self.max_cpu_loras is not None and (
            not isinstance(self.max_cpu_loras, int) or isinstance(self.max_cpu_loras, bool)
            or self.max_cpu_loras < 0
        ):
            raise ValueError(f"max_cpu_loras must be an int >= 0 or None, "
                             f"got {self.max_cpu_loras!r}")
        if self.host_cache_gb is not None and (
            isinstance(self.host_cache_gb, bool) or not isinstance(self.host_cache_gb, (int, float))
            or not self.host_cache_gb >= 0
        ):
            raise ValueError(f"host_cache_gb must be a number >= 0 or None, "
                             f"got {self.host_cache_gb!r}")
        if not isinstance(self.tensor_parallel_size, int) \
                or isinstance(self.tensor_parallel_size, bool) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, "
                             f"got {self.tensor_parallel_size!r}")
        if isinstance(self.worker_timeout_s, bool) \
                or not isinstance(self.worker_timeout_s, (int, float)) \
                or not self.worker_timeout_s > 0:
            raise ValueError(f"worker_timeout_s must be a number > 0, "
                             f"got {self.worker_timeout_s!r}")
        if isinstance(self.max_logprobs, bool) or not isinstance(self.max_logprobs, int) \
                or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an int >= 0, got {self.max_logprobs!r}")
        if self.lora_shrink_in_base_after is None:
            object.__setattr__(self, "lora_shrink_in_base_after",
                               64 if self.dtype == "float32" else 16)
        if isinstance(self.lora_shrink_in_base_after, bool) \
                or not isinstance(self.lora_shrink_in_base_after, int) \
                or self.lora_shrink_in_base_after < 0:
            raise ValueError(f"lora_shrink_in_base_after must be an int >= 0, "
                             f"got {self.lora_shrink_in_base_after!r}")
        if self.merge_policy not in MERGE_POLICIES:
            raise ValueError(f"merge_policy must be one of {MERGE_POLICIES}, "
                             f"got {self.merge_policy!r}")
        if self.merge_policy != "never" and self.tensor_parallel_size != 1:
            # a row-parallel rank holds its hidden columns of lora_B only: its shard of
            # W + s B A needs all of B (a gather per merge), which is not implemented
            raise ValueError(f"merge_policy={self.merge_policy!r} is not served with "
                             f"tensor_parallel_size={self.tensor_parallel_size}: merged LoRA "
                             f"runs in one process only; use merge_policy='never'")
        if self.spill_dir is not None:
            if not isinstance(self.spill_dir, (str, os.PathLike)) or not str(self.spill_dir):
                raise ValueError(f"spill_dir must be a path or None, got {self.spill_dir!r}")
            object.__setattr__(self, "spill_dir", Path(self.spill_dir))

    def scheduler_config(self, max_model_len: int) -> SchedulerConfig:
        """The scheduler's options (``max_model_len`` resolved against the model's)."""
        return SchedulerConfig(
            block_size=self.block_size, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=max_model_len,
            max_loras=self.max_loras, policy=self.policy,
            policy_max_wait_s=self.policy_max_wait_s, watermark=self.watermark,
            enable_prefix_caching=self.enable_prefix_caching)

    @classmethod
    def from_options(cls, pool_gb: float, **options) -> EngineConfig:
        """Builds a config from keyword options; an unknown option is a ``TypeError`` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown Engine option(s) {unknown}; known: {sorted(known)}")
        return cls(pool_gb=pool_gb, **options)
