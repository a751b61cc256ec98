"""S-LoRA-style synthetic workloads: a request trace over many adapters, and the adapters.

The trace follows the generator of S-LoRA (Sheng et al. 2023, section 7.1, "synthetic
workloads"): ``n`` adapters whose popularity follows a power law of exponent ``alpha`` (alpha=1
is uniform, smaller is more skewed toward the first adapters), arrivals with Gamma-distributed
inter-arrival times of rate ``rate`` (requests per second) and coefficient of variation ``cv``
(cv=1 is a Poisson process, larger is burstier), and input and output lengths drawn uniformly
from given ranges. Adapters are written directly as PEFT-format directories (random weights,
ranks and target modules drawn from given sets) so that a thousand take seconds, or are taken
from an existing directory.

    python benchmarks/workload.py --num-adapters 100 --alpha 0.5 --rate 2 --cv 1 \\
        --num-requests 20 --model-dir ~/.cache/pagedlora/<model>      # prints the trace
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class WorkloadSpec:
    """The parameters of a trace (S-LoRA section 7.1).

    Attributes:
        num_requests: requests in the trace.
        num_adapters: adapters to choose from; 0 sends every request to the base model.
        alpha: power-law exponent of adapter popularity, in (0, 1]; 1 is uniform.
        rate: mean arrival rate, requests per second; ``inf`` puts every arrival at t=0.
        cv: coefficient of variation of the Gamma inter-arrival times (1: Poisson).
        input_range: inclusive ``(min, max)`` prompt length, tokens.
        output_range: inclusive ``(min, max)`` output length, tokens (generated with
            ignore_eos, so each request produces exactly that many).
        seed: of every random choice.
    Raises:
        ValueError: from :meth:`check`, naming the offending field.
    """

    num_requests: int
    num_adapters: int = 4
    alpha: float = 1.0
    rate: float = float("inf")
    cv: float = 1.0
    input_range: tuple[int, int] = (10, 40)
    output_range: tuple[int, int] = (64, 64)
    seed: int = 0

    def check(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.num_adapters < 0:
            raise ValueError(f"num_adapters must be >= 0, got {self.num_adapters}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if not self.cv > 0:
            raise ValueError(f"cv must be > 0, got {self.cv}")
        for name in ("input_range", "output_range"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got "
                                 f"{(lo, hi)}")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace.

    Attributes:
        arrival_s: arrival time, seconds after the trace starts.
        adapter: index of its adapter in ``[0, num_adapters)``, or None for the base model.
        prompt_token_ids: the prompt, random token ids (no special tokens).
        output_len: tokens to generate.
    """

    arrival_s: float
    adapter: int | None
    prompt_token_ids: list[int]
    output_len: int


def make_trace(spec: WorkloadSpec, vocab_size: int, special_ids: set[int] = frozenset()
               ) -> list[TraceRequest]:
    """The requests of ``spec`` in arrival order.

    Adapter ``floor(n * U**(1/alpha))`` for ``U`` uniform on [0, 1): the power-law draw
    S-LoRA's generator uses (numpy's ``power(alpha)``), uniform at alpha=1. Inter-arrival
    times are Gamma with shape ``1/cv**2`` and mean ``1/rate``.

    Args:
        spec: the workload.
        vocab_size: prompts draw token ids from ``[0, vocab_size)``.
        special_ids: ids never drawn (bos, eos, pad...).
    Raises:
        ValueError: an invalid ``spec`` (named field), or a vocabulary with no usable id.
    """
    spec.check()
    allowed = [t for t in range(vocab_size) if t not in special_ids]
    if not allowed:
        raise ValueError(f"vocab_size={vocab_size} leaves no token id outside special_ids")
    rng = random.Random(spec.seed)
    shape = 1.0 / spec.cv ** 2
    t, trace = 0.0, []
    for _ in range(spec.num_requests):
        if spec.rate != float("inf"):
            t += rng.gammavariate(shape, 1.0 / (spec.rate * shape))
        adapter = None
        if spec.num_adapters:
            adapter = min(int(spec.num_adapters * rng.random() ** (1.0 / spec.alpha)),
                          spec.num_adapters - 1)
        n_in = rng.randint(*spec.input_range)
        trace.append(TraceRequest(
            arrival_s=0.0 if spec.rate == float("inf") else t, adapter=adapter,
            prompt_token_ids=[rng.choice(allowed) for _ in range(n_in)],
            output_len=rng.randint(*spec.output_range)))
    return trace


def percentile(values: list[float | None], q: float) -> float | None:
    """Nearest-rank ``q``-quantile (``q`` in [0, 1]) of the values that are not None (e.g. the
    TTFTs of a trace's requests, None for one that never produced a token); None when there
    are none."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """``module -> (in_features, out_features)`` of a Llama-family transformers config."""
    h, i = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, (config.num_key_value_heads or
                                             config.num_attention_heads) * d
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def write_adapter(path: Path, config, *, rank: int, target_modules: tuple[str, ...],
                  generator: torch.Generator, alpha: float | None = None,
                  dtype: torch.dtype = torch.float32,
                  dora_base: Callable[[int, str], torch.Tensor] | None = None) -> Path:
    """Writes one random LoRA adapter of ``config``'s model as a PEFT directory
    (``adapter_config.json`` + ``adapter_model.safetensors``), without importing PEFT.

    Weights are random and nonzero in both factors (like PEFT's ``init_lora_weights=False``):
    ``lora_A [r, in]`` and ``lora_B [out, r]`` normal with std ``1/sqrt(in)`` and
    ``1/sqrt(r)`` times 0.1, so the adapter changes the output without swamping the base.
    With ``dora_base`` it is a DoRA adapter (``use_dora``): each module's
    ``lora_magnitude_vector`` is the norm of each row of ``W + scale * B A`` (where PEFT starts
    it) times ``1 + 0.1 * N(0, 1)``.

    Args:
        path: directory to create (parents too).
        config: the base model's transformers config (Llama family).
        rank: LoRA rank r. target_modules: projections to adapt (names in ALL_MODULES).
        alpha: lora_alpha (default 2r). dtype: of the stored tensors.
        dora_base: ``(layer, module) -> [out, in]`` base weight, for a DoRA adapter.
    Raises:
        ValueError: an unknown module name or a rank < 1.
    """
    shapes = module_shapes(config)
    unknown = set(target_modules) - set(shapes)
    if unknown or rank < 1:
        raise ValueError(f"bad adapter request: unknown modules {sorted(unknown)} or rank "
                         f"{rank} < 1")
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module in target_modules:
            in_f, out_f = shapes[module]
            key = f"base_model.model.model.layers.{layer}.{_PARENT[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_f, generator=generator)
                                               * (0.1 / in_f ** 0.5)).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, rank, generator=generator)
                                               * (0.1 / rank ** 0.5)).to(dtype)
            if dora_base is not None:
                a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
                w = dora_base(layer, module).float() + (alpha or 2 * rank) / rank * (
                    b.float() @ a.float())
                noise = 1 + 0.1 * torch.randn(out_f, generator=generator)
                tensors[f"{key}.lora_magnitude_vector"] = (w.norm(dim=1) * noise).to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha or 2 * rank, "bias": "none",
        "target_modules": list(target_modules), "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0, "use_dora": dora_base is not None}))
    return path


def write_adapters(out: Path, config, num: int, *, ranks: tuple[int, ...],
                   module_sets: tuple[tuple[str, ...], ...], seed: int = 0,
                   cycle: bool = False, dora: tuple[int, ...] = (),
                   dora_base: Callable[[int, str], torch.Tensor] | None = None) -> list[Path]:
    """Writes ``num`` random adapters ``out/a0000``, ``out/a0001``... (see
    :func:`write_adapter`); an existing directory whose config matches is kept as is.

    Args:
        ranks, module_sets: adapter i takes ``ranks[i % len]`` and ``module_sets[i % len]``
            when ``cycle``, else one of each drawn at random (seeded).
        dora: indices of the adapters written as DoRA adapters (``dora_base`` needed).
    Returns:
        the directories, index i for adapter i.
    """
    rng = random.Random(seed)
    paths = []
    for i in range(num):
        rank = ranks[i % len(ranks)] if cycle else rng.choice(ranks)
        modules = module_sets[i % len(module_sets)] if cycle else rng.choice(module_sets)
        path = out / f"a{i:04d}"
        cfg = path / "adapter_config.json"
        kept = json.loads(cfg.read_text()) if cfg.is_file() else {}
        is_dora = i in dora
        if not ((path / "adapter_model.safetensors").is_file() and kept.get("r") == rank
                and kept.get("target_modules") == list(modules)
                and kept.get("use_dora", False) == is_dora):
            write_adapter(path, config, rank=rank, target_modules=modules,
                          generator=torch.Generator().manual_seed(seed * 100_003 + i),
                          dora_base=dora_base if is_dora else None)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=20)
    parser.add_argument("--num-adapters", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=float("inf"))
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--input-range", type=int, nargs=2, default=(10, 40))
    parser.add_argument("--output-range", type=int, nargs=2, default=(64, 64))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=49152)
    args = parser.parse_args()
    spec = WorkloadSpec(args.num_requests, args.num_adapters, args.alpha, args.rate, args.cv,
                        tuple(args.input_range), tuple(args.output_range), args.seed)
    for r in make_trace(spec, args.vocab_size):
        d = asdict(r)
        d["prompt_len"] = len(d.pop("prompt_token_ids"))
        print(json.dumps(d))


if __name__ == "__main__":
    main()
