"""EngineConfig: every engine option in one validated dataclass, passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, fields

KERNEL_BACKENDS = ("auto", "torch", "triton")  # kernels/backend.py implements them

_DTYPES = ("float32", "bfloat16", "float16")


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
        max_loras: most distinct adapters in one step (the base model does not count).
        max_lora_rank: largest adapter rank accepted by ``add_adapter``.
        seed: engine seed; a request without its own seed samples from a generator seeded with
            ``seed`` and the request's index.

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
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.pool_gb > 0:
            raise ValueError(f"pool_gb must be > 0, got {self.pool_gb!r}")
        if self.dtype is None:
            cpu = self.device.split(":")[0] == "cpu"
            object.__setattr__(self, "dtype", "float32" if cpu else "bfloat16")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, "
                             f"got {self.kernel_backend!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_loras",
                     "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int) or self.max_model_len < 1
        ):
            raise ValueError(f"max_model_len must be a positive int or None, "
                             f"got {self.max_model_len!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @classmethod
    def from_options(cls, pool_gb: float, **options) -> EngineConfig:
        """Builds a config from keyword options; an unknown option is a ``TypeError`` naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown Engine option(s) {unknown}; known: {sorted(known)}")
        return cls(pool_gb=pool_gb, **options)
