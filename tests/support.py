"""Helpers shared by the tests: random models and adapters, and a step-by-step engine driver.

Importable as ``support`` (pyproject sets ``pythonpath = ["tests"]`` for pytest).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

from pagedlora import Engine, SamplingParams
from pagedlora.sampler import Sampler
from pagedlora.scheduler import (
    ADAPTER,
    PageAllocator,
    Request,
    RunnerOutput,
    Scheduler,
    SchedulerConfig,
)

VOCAB = 49152
PAGE_BYTES = 2 * 16 * 2 * 16 * 4  # tiny model: block 16 x 2 KV heads x head_dim 16 x (K, V) x fp32
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.2,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)


# The tiny model's projections: module -> (parent, in_features, out_features).
TINY_MODULES = {"q_proj": ("self_attn", 64, 64), "k_proj": ("self_attn", 64, 32),
                "v_proj": ("self_attn", 64, 32), "o_proj": ("self_attn", 64, 64),
                "gate_proj": ("mlp", 64, 176), "up_proj": ("mlp", 64, 176),
                "down_proj": ("mlp", 176, 64)}
PEFT_PREFIX = "base_model.model.model.layers"


def write_peft_dir(path: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    """A PEFT LoRA directory written by hand: ``adapter_config.json`` (LORA, bias none, and
    ``config``) and ``adapter_model.safetensors`` holding ``tensors``."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "bias": "none", "task_type": "CAUSAL_LM", **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def write_random_lora(path: Path, *, r: int, target_modules: list[str], seed: int,
                      num_layers: int = 2) -> Path:
    """A random rank-``r`` LoRA of the tiny model, written directly as safetensors (a
    thousand take about a second, unlike PEFT's ``save_pretrained``); ``lora_alpha = 2r``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for module in target_modules:
            parent, in_f, out_f = TINY_MODULES[module]
            key = f"{PEFT_PREFIX}.{layer}.{parent}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / in_f**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) / r**0.5
    return write_peft_dir(path, tensors, r=r, lora_alpha=2 * r, target_modules=target_modules)


@torch.inference_mode()
def peft_greedy(base, adapter_dir: Path | None, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of HF ``base`` with the PEFT adapter in ``adapter_dir`` (None: the
    base alone). The adapter is injected and then unloaded again, so one base model serves
    any number of adapters."""
    from peft import PeftModel

    model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir)
    try:
        out = model.generate(input_ids=torch.tensor([prompt]), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                             pad_token_id=0)
    finally:
        if adapter_dir is not None:
            model.unload()
    return out[0, len(prompt):].tolist()


def save_adapters(model_dir: Path, root: Path, specs: dict[str, dict]) -> dict[str, Path]:
    """``name -> save_random_adapter(model_dir, root / name, **spec)`` for every spec."""
    return {n: save_random_adapter(model_dir, root / n, **dict(o)) for n, o in specs.items()}


def prompts(n, seed=0, lo=3, hi=30) -> list[list[int]]:
    """``n`` random token-id prompts of ``lo..hi`` tokens (ids 3..48999)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 49000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def tokens(outs) -> list[list[int]]:
    """The token ids of each RequestOutput."""
    return [o.token_ids for o in outs]


def random_prompt(length: int, seed: int) -> list[int]:
    """Token ids in [3, VOCAB): no bos/eos/pad of the tiny model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


def save_random_llama(out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Saves a random LlamaForCausalLM (float32) with the default model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def save_random_adapter(model_dir: Path, out: Path, *, r: int, target_modules: list[str],
                        seed: int, **lora_kwargs) -> Path:
    """Saves a PEFT LoRA adapter with random A and B (``init_lora_weights=False``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=lora_kwargs.pop("lora_alpha", 2 * r),
                        target_modules=target_modules, init_lora_weights=False,
                        task_type="CAUSAL_LM", **lora_kwargs)
    get_peft_model(base, config).save_pretrained(out)
    return out


def save_random_dora_adapter(model_dir: Path, out: Path, *, r: int, target_modules: list[str],
                             seed: int, noise: float = 0.3, **lora_kwargs) -> Path:
    """Saves a PEFT DoRA adapter (``use_dora=True``) with random A and B
    (``init_lora_weights=False``) and its magnitude vectors scaled by ``1 + noise * N(0, 1)``
    (PEFT starts them at the weight norm, where DoRA's output scale is exactly 1)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=lora_kwargs.pop("lora_alpha", 2 * r),
                        target_modules=target_modules, init_lora_weights=False, use_dora=True,
                        task_type="CAUSAL_LM", **lora_kwargs)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + noise * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def randomize_qkv_biases(model, std: float = 0.5) -> None:
    """Draws the q/k/v biases of an HF Qwen2 model (zero-initialized) from N(0, std)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, std)


def save_random_qwen2(out: Path, seed: int = 0) -> Path:
    """Saves a random Qwen2ForCausalLM of the tiny shape (float32), q/k/v biases random."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **TINY)).eval()
    randomize_qkv_biases(model)
    model.save_pretrained(out)
    return out


class PeftOracle:
    """PEFT references from one ``PeftModel`` holding every adapter of ``dirs`` (switched with
    ``set_adapter`` per call: PEFT refuses ``adapter_names`` batches with DoRA); None is the
    base model (the adapters disabled), and a ``pagedlora.AdapterMix`` the adapter that
    ``add_weighted_adapter(names, weights, combination_type="cat")`` makes of it (on first
    use; its delta is exactly the weighted sum)."""

    def __init__(self, model_dir, dirs: dict) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        names = list(dirs)
        self.model = PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.load_adapter(dirs[name], adapter_name=name)
        self.model.eval()
        self._mixes: dict = {}
        self._greedy: dict = {}

    def adapter_name(self, adapter) -> str | None:
        """PEFT's name for ``adapter`` (a mix's made on first use)."""
        from pagedlora import AdapterMix

        if not isinstance(adapter, AdapterMix):
            return adapter
        if adapter not in self._mixes:
            name = f"mix{len(self._mixes)}"
            self.model.add_weighted_adapter(adapter.names, [w for _, w in adapter.weights],
                                            adapter_name=name, combination_type="cat")
            self._mixes[adapter] = name
        return self._mixes[adapter]

    def _run(self, adapter, fn):
        name = self.adapter_name(adapter)
        if name is None:
            with self.model.disable_adapter():
                return fn()
        self.model.set_adapter(name)
        return fn()

    @torch.inference_mode()
    def logits(self, adapter, token_ids: list[int]) -> torch.Tensor:
        """``[vocab]`` float32 logits of the last position of ``token_ids``."""
        return self._run(adapter, lambda: self.model(
            input_ids=torch.tensor([token_ids])).logits[0, -1].float())

    @torch.inference_mode()
    def greedy(self, adapter, prompt: list[int], n: int = 16) -> list[int]:
        """``n`` greedy tokens after ``prompt`` (never stopping at eos)."""
        key = (adapter, tuple(prompt), n)
        if key not in self._greedy:
            out = self._run(adapter, lambda: self.model.generate(
                input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                min_new_tokens=n, eos_token_id=None, pad_token_id=0))
            self._greedy[key] = out[0, len(prompt):].tolist()
        return self._greedy[key]


# -- log-probabilities against PEFT -------------------------------------------------------------

LOGPROBS_ATOL = 1e-4  # nats, fp32


class PeftReference:
    """``PeftModel`` per adapter (plain transformers for None) in one dtype."""

    def __init__(self, model_dir, dirs, dtype=torch.float32):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        def base():
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

        self.models = {None: base(), **{n: PeftModel.from_pretrained(base(), d).eval()
                                        for n, d in dirs.items()}}

    @torch.inference_mode()
    def logprobs(self, name, ids: list[int]) -> torch.Tensor:
        """``[len(ids), vocab]`` float32 log-softmax at every position."""
        logits = self.models[name](input_ids=torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)


def check_entries(entries, rows: torch.Tensor, targets: list[int], k: int, atol: float,
                  where: str) -> float:
    """Each entry against its reference row: the target's log-probability, a rank the
    reference allows (ties within ``atol`` either way), and its k top tokens: each one's
    log-probability is the reference's for that token and the reference's j-th largest.
    Returns the largest error."""
    assert len(entries) == len(targets) == rows.shape[0], where
    worst = 0.0
    for i, (e, row, t) in enumerate(zip(entries, rows, targets, strict=True)):
        at = f"{where}, position {i}: "
        assert e.token_id == t, at
        err = abs(e.logprob - row[t].item())
        assert err <= atol, f"{at}logprob {e.logprob} vs {row[t].item()}"
        lo = int((row > row[t] + atol).sum()) + 1
        hi = int((row >= row[t] - atol).sum())
        assert lo <= e.rank <= hi, f"{at}rank {e.rank}, reference {lo}..{hi}"
        assert len(e.top) == k, at
        ref_top = row.topk(k).values
        for j, (tid, lp) in enumerate(e.top):
            err = max(err, abs(lp - row[tid].item()), abs(lp - ref_top[j].item()))
            assert err <= atol, f"{at}top {j}: token {tid} {lp} vs {row[tid].item()}, " \
                                f"{j}-th largest {ref_top[j].item()}"
        worst = max(worst, err)
    return worst


def check_output(out, ref_rows: torch.Tensor, k: int = 3, atol: float = LOGPROBS_ATOL,
                 prompt_k: int | None = 3) -> float:
    """``out`` (a RequestOutput asking logprobs=k, prompt_logprobs=prompt_k) against the
    reference's log-softmax rows of its whole sequence."""
    p, n = len(out.prompt_token_ids), len(out.token_ids)
    where = f"request {out.request_id} (adapter {out.adapter!r})"
    err = check_entries(out.logprobs, ref_rows[p - 1:p - 1 + n], out.token_ids, k, atol,
                        f"{where} generated")
    if prompt_k is not None:
        assert len(out.prompt_logprobs) == p and out.prompt_logprobs[0] is None, where
        err = max(err, check_entries(out.prompt_logprobs[1:], ref_rows[:p - 1],
                                     out.prompt_token_ids[1:], prompt_k, atol,
                                     f"{where} prompt"))
    return err


def scored(ref: PeftReference, out) -> torch.Tensor:
    """The reference's log-softmax rows of ``out``'s whole sequence (teacher forcing)."""
    return ref.logprobs(out.adapter, out.prompt_token_ids + out.token_ids)


@dataclass
class Drive:
    """What :func:`drive` saw: outputs by tag, and per step ``(tag, adapter, new, computed)``."""

    requests: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    num_compared: int = 0
    max_err: float = 0.0

    def mixed_steps(self) -> list:
        """Steps holding a decode (one new token after a prefill) and a prefill together."""
        return [s for s in self.steps if any(n == 1 and c > 0 for _, _, n, c in s)
                and any(n > 1 for _, _, n, _ in s)]

    def chunked(self, tag) -> list[int]:
        """New-token counts of the steps that computed ``tag``'s prompt."""
        plen = len(self.requests[tag].prompt_token_ids)
        return [n for s in self.steps for t, _, n, c in s if t == tag and c < plen]


# -- how close two correct implementations' logits can be --------------------------------------
#
# Two correct fp32 forward passes (ours, HF's) differ only by rounding, and rounding depends on the
# order of every sum: GEMM blocking, fused or separate q/k/v, the attention kernel, the CPU's
# vector width. A dot product of n terms summed in float32 (unit roundoff u = 2**-24) is off by
# about u * sqrt(n) of its magnitude, with high probability (Higham and Mary 2019, "A new approach
# to probabilistic rounding error analysis"; sqrt(n) rather than the worst case n because the
# errors' signs are random). The longest sum in a layer is down_proj's (d_ff terms); the L layers'
# errors enter the residual stream independently and add in quadrature. So one implementation's
# logits row is off from the exact one by about
#     kappa * u * sqrt(L * d_ff) * max|logit|                    (one "unit" below)
# where kappa is how much the network amplifies a perturbation. Measured on a 2-core AMD EPYC
# (AVX-512, no AMX), worst logits row (tests/test_tolerance.py prints these), tiny random Llama
# (2 layers, d_ff 176, weights drawn with std 0.2: a large kappa) / SmolLM2-135M (30 layers,
# d_ff 1536): HF float32 against HF float64 2.5 / 0.31 units; against HF float32 computed
# another way: every Linear summing its inputs in 3 chunks 5.5 / 0.18, eager instead of SDPA
# attention 0.8 / 0.21, 2 threads instead of 1 0.6 / 0.16, q/k/v and gate/up fused 0.4 / 0.07.
# Ours against float64 1.4 / 0.39 (0.48 with 2 threads), against HF float32 3.0 / 0.71;
# ATEN_CPU_CAPABILITY=avx2 or MKL and oneDNN held to AVX2 moved ours by under 0.05 units.
# The allowance is 16 units per implementation (6x the worst seen against float64, 3x the worst
# difference between two HF formulations), so two correct implementations are within 32 units.
# tests/test_tolerance.py checks that HF's own spread stays within half of that on the machine
# the tests run on, and that references with a small real bug (RMSNorm eps x10, a LoRA scale
# x1.001) exceed the whole of it many times over (about 140x and 90x).
# bfloat16 keeps float32 accumulators (GEMMs, softmax and RMSNorm run in float32) but rounds
# each of the 7 projection outputs per layer to 8 significant bits (u = 2**-8), so one unit is
# u * sqrt(7 * L) * max|logit|. HF bf16 against HF fp32 measured 1.6 units (tiny) and 0.73
# (SmolLM2), ours 1.7 and 0.73; ours against HF bf16 0.8 and 0.4. Two correct bf16
# implementations are allowed 4 units apart.
FP32_UNITS = 32
BF16_UNITS = 4


def logits_rtol(config, dtype: torch.dtype = torch.float32) -> float:
    """How far two correct implementations' logits rows may differ, as a fraction of the row's
    largest |logit|, for a model with ``config`` (an HF config) run in ``dtype``; the argument
    and its measurements are in the comment above."""
    layers = config.num_hidden_layers
    if dtype == torch.float32:
        return FP32_UNITS * 2.0**-24 * math.sqrt(layers * config.intermediate_size)
    if dtype == torch.bfloat16:
        return BF16_UNITS * 2.0**-8 * math.sqrt(7 * layers)
    raise ValueError(f"no tolerance derived for {dtype}")


def model_config(engine: Engine):
    """The engine's HF config (read from its model directory: under tensor parallelism the
    model lives in the workers, ``engine.model`` is None)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(engine.model_dir)


def row_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| over a logits row, as a fraction of the row's largest |ref| (NaN for a
    NaN anywhere, which fails every comparison)."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def logits_within(rtol: float) -> Callable:
    """A :func:`drive` comparison: every logits row within ``rtol`` of the row's scale."""
    def compare(ours, ref, where):
        err = row_error(ours, ref)
        assert err <= rtol, (f"{where}max |ours - reference| = {err:.3g} x max|reference| "
                             f"({ref.abs().max().item():.3g}) > {rtol:.3g}")
        return err
    return compare


def recording_within(rows: dict, rtol: float) -> Callable:
    """:func:`logits_within` that also keeps each row in ``rows``, by request and length (the
    ``where`` text without its step), to compare two engines' rows afterwards."""
    check = logits_within(rtol)

    def compare(ours, ref, where):
        rows[re.sub(r"^step \d+, ", "", where)] = ours.clone()
        return check(ours, ref, where)
    return compare


def rows_apart(a: dict, b: dict) -> float:
    """max |a - b| over the rows two :func:`recording_within` runs kept (the same requests)."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


class OracleSampler(Sampler):
    """A sampler for tests (``Engine(..., sampler=OracleSampler())``): for the requests
    :func:`drive` registers, every logits row is compared with ``oracle(adapter_name,
    token_ids)``, the reference's last-position logits for the same tokens, and the reference's
    greedy token is returned (teacher forcing), so both sides always see identical sequences.
    Other requests (``generate`` on the same engine) are sampled as usual."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.oracle: Callable | None = None
        self.compare: Callable | None = None
        # request id -> (tag, adapter name, its tokens so far, prompt length)
        self.requests: dict[int, tuple] = {}
        self.step = 0
        self.num_compared = 0
        self.max_err = 0.0

    def track(self, request_id: int, tag, adapter: str | None, prompt: list[int]) -> None:
        self.requests[request_id] = (tag, adapter, list(prompt), len(prompt))

    def sample(self, logits, rows) -> list[int]:
        assert logits.shape == (len(rows), VOCAB) and logits.dtype == torch.float32
        tokens = super().sample(logits, rows)
        for i, (row, seq) in enumerate(zip(logits, rows, strict=True)):
            if seq.request_id not in self.requests:
                continue
            tag, name, ids, plen = self.requests[seq.request_id]
            ref = self.oracle(name, ids)
            where = (f"step {self.step}, request {tag!r} (adapter {name!r}, {plen} prompt + "
                     f"{len(ids) - plen} output tokens): ")
            err = self.compare(row, ref, where)
            self.max_err = max(self.max_err, err)
            self.num_compared += 1
            ids.append(int(ref.argmax()))
            tokens[i] = ids[-1]
        return tokens


def drive(engine: Engine, arrivals: dict[int, list], oracle: Callable, *, max_tokens: int,
          compare: Callable | None = None) -> Drive:
    """Runs an engine made with ``sampler=OracleSampler()`` one ``step()`` at a time, comparing
    every sampled logits row with ``oracle``'s for the same tokens (see :class:`OracleSampler`).

    Args:
        arrivals: ``step -> [(tag, token_ids, adapter_name)]``: requests added before that step.
        oracle: ``(adapter_name, token_ids) -> [vocab]`` reference logits of the last position.
        max_tokens: output tokens per request.
        compare: ``(ours, ref, where) -> error``, asserting closeness; default
            :func:`logits_within` the model's float32 :func:`logits_rtol`.
    """
    sampler = engine.core.runner.sampler
    assert isinstance(sampler, OracleSampler), "make the engine with sampler=OracleSampler()"
    sampler.oracle = oracle
    sampler.compare = compare or logits_within(logits_rtol(model_config(engine)))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    result, tags = Drive(), {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for tag, ids, name in arrivals.get(step, []):
            rid = engine.add_request(ids, name, params)
            sampler.track(rid, tag, name, ids)
            tags[rid] = (tag, name)
        sampler.step = step
        steps_before = engine.stats()["num_steps"]
        for d in engine.step():
            if d.finished:
                assert d.output.finish_reason == "length", d.output.error
                result.requests[tags[d.request_id][0]] = d.output
        stats = engine.stats()
        last = stats["last_step"] if stats["num_steps"] > steps_before else None
        assert last is None or last["num_preempted"] == 0, "drive expects no preemption"
        result.steps.append([] if last is None else [
            (*tags[rid], n, computed) for rid, computed, n in last["scheduled"]])
        step += 1
    for out in result.requests.values():
        assert len(out.token_ids) == max_tokens
    assert len(result.requests) == len(tags)
    result.num_compared, result.max_err = sampler.num_compared, sampler.max_err
    sampler.num_compared, sampler.max_err = 0, 0.0
    assert_kv_released(engine)
    return result


def step_until_done(engine: Engine, seen: dict | None = None, limit: int = 10_000) -> dict:
    """Steps ``engine`` until nothing is unfinished; returns ``request id -> RequestOutput``
    of every request ``step()`` reported finished (added to ``seen`` if given)."""
    seen = {} if seen is None else seen
    for _ in range(limit):
        if not engine.has_unfinished():
            break
        for d in engine.step():
            if d.finished:
                seen[d.request_id] = d.output
    for d in engine.step():  # outputs made without a step's work (failures at add time)
        if d.finished:
            seen[d.request_id] = d.output
    assert not engine.has_unfinished(), f"requests still unfinished after {limit} steps"
    return seen


def engine_with(model_dir, pages: int, **options) -> Engine:
    """An engine whose pool has ``pages`` pages (block size 16)."""
    options.setdefault("max_lora_rank", 64)
    engine = Engine(model_dir, pool_gb=(pages + 0.5) * PAGE_BYTES / 2**30, **options)
    assert engine.stats()["pages_total"] == pages
    return engine


def assert_no_leaks(engine):
    """Nothing runs, no KV page is held, and after dropping the prefix cache and evicting every
    adapter all pages are free."""
    assert_kv_released(engine)
    stats = engine.stats()
    assert stats["requests_running"] == stats["requests_waiting"] == 0
    assert engine.outputs.num_live == 0
    engine.core.scheduler.kv.reset()
    engine.adapters.evict_unpinned(engine.pool.num_pages)
    assert engine.pool.allocator.num_free == engine.pool.num_pages


def check_step(engine: Engine, max_cpu_loras: int, max_loras: int) -> None:
    """Between steps: KV invariants, the host budget, one pin per running request of an
    adapter (of each adapter of a mix), resident pages = adapter pages, at most ``max_loras``
    adapters in the last step."""
    sched, store = engine.core.scheduler, engine.adapters
    sched.kv.check_invariants(sched.running)
    assert len(store.host_keys) <= max_cpu_loras
    pins = store.pins
    want: dict = {}
    for r in sched.running:
        for key in r.adapter_keys:
            want[key] = want.get(key, 0) + 1
    assert pins == want
    held = store.pages_in_use()
    assert len(held) == len(set(held)) == engine.pool.allocator.num_used("adapter")
    store.check_invariants()
    last = engine.stats()["last_step"]
    if last is not None:
        assert last["num_adapters"] <= max_loras


def assert_kv_released(engine: Engine) -> None:
    """Every KV page is free or an unheld prefix-cache block, and the block tables agree."""
    engine.core.scheduler.kv.check_invariants(engine.core.scheduler.running)
    stats = engine.stats()
    assert stats["pages_kv"] == stats["pages_kv_cached"], stats


# -- processes (tensor parallelism) ------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (read from ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from ``/proc``)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def spawned_workers(pid: int) -> list[int]:
    """The children of ``pid`` that multiprocessing's ``spawn`` started (tensor-parallel
    workers), in pid order (not its resource tracker)."""
    def cmdline(child: int) -> bytes:
        try:
            return Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            return b""
    return sorted(c for c in child_pids(pid) if b"spawn_main" in cmdline(c))


def wait_gone(pids, timeout_s: float = 20.0) -> list[int]:
    """Waits until none of ``pids`` is alive; returns those still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in pids if process_alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def shm_of(pids) -> list[str]:
    """Shared-memory files in ``/dev/shm`` that name one of ``pids`` (torch names them
    ``torch_<pid>_...``)."""
    return sorted(f.name for f in Path("/dev/shm").iterdir()
                  if any(f"_{p}_" in f.name or f.name.endswith(f"_{p}") for p in pids))


# -- the scheduler alone (pure Python) -------------------------------------------------------------


class FakeAdapters:
    """Adapter residency backed by the real allocator: each adapter takes a fixed page count
    (no weights). Unpinned adapters are offered to the allocator as reclaimable, as the store
    does; ``evicted`` lists the reclaimed ones in order."""

    def __init__(self, allocator: PageAllocator, sizes: dict[str, int]) -> None:
        self.allocator, self.sizes = allocator, sizes
        self.resident: dict[str, list[int]] = {}
        self.pins: dict[str, int] = {}
        self.evicted: list[str] = []
        self.holds: dict[str, int] = {}

    def footprint(self, key):
        return self.sizes[key]

    def is_resident(self, key):
        return key in self.resident

    def unit_of(self, key):
        return (ADAPTER, key)

    def pin(self, key):
        if key in self.resident:
            if not self.pins.get(key):
                assert self.allocator.withdraw(self.unit_of(key))
        elif self.allocator.can_allocate(self.sizes[key], ADAPTER):
            self.resident[key] = self.allocator.allocate(self.sizes[key], ADAPTER)
        else:
            return False
        self.pins[key] = self.pins.get(key, 0) + 1
        return True

    def unpin(self, key):
        self.pins[key] -= 1
        if not self.pins[key]:
            self.allocator.offer(self.unit_of(key), self.resident[key], ADAPTER,
                                 on_reclaim=lambda: self._reclaimed(key))

    def _reclaimed(self, key):
        del self.resident[key]
        self.evicted.append(key)

    def hold(self, key):
        self.holds[key] = self.holds.get(key, 0) + 1
        return True

    def unhold(self, key):
        self.holds[key] -= 1


def make_scheduler(num_pages=40, block_size=4, layers=2, max_num_seqs=8, budget=64, max_loras=2,
                   sizes=None, clock=None, **options):
    """``(scheduler, allocator, FakeAdapters)`` over a unified pool of ``num_pages`` pages;
    watermark 0 and no prefix caching unless ``options`` say otherwise."""
    alloc = PageAllocator(num_pages)
    adapters = FakeAdapters(alloc, sizes or {})
    options = {"watermark": 0.0, "enable_prefix_caching": False, **options}
    config = SchedulerConfig(block_size=block_size, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=budget, max_loras=max_loras, **options)
    sched = Scheduler(config, pages_per_block=layers, allocator=alloc, adapters=adapters,
                      clock=clock or (lambda: 0.0))
    return sched, alloc, adapters


def make_request(rid, n_prompt, adapter=None, max_tokens=100):
    """A request of ``n_prompt`` tokens ``0..n_prompt-1``, arriving at ``rid`` seconds."""
    return Request(request_id=rid, prompt_token_ids=list(range(n_prompt)), max_tokens=max_tokens,
                   adapter_key=adapter, arrival_time=float(rid))


def run_step(sched, out, new_token=7):
    """Plays the model: every request whose known tokens are all computed samples
    ``new_token``; the scheduler records the step."""
    sampled = [s.request.request_id for s in out.scheduled
               if s.request.num_computed_tokens + s.num_new_tokens == s.request.num_tokens]
    sched.update(out, RunnerOutput(tuple(sampled), (new_token,) * len(sampled)))
class ServerProcess:
    """``python -m pagedlora serve ARGS`` on a free loopback port, its log in a file; ``env``
    adds to (or, with None values, removes from) this process's environment."""

    def __init__(self, args: list[str], log: Path, timeout_s: float = 120,
                 env: dict[str, str | None] | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        environ = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: the test needs one
        for key, value in (env or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pagedlora", "serve", "--host", "127.0.0.1", "--port",
                 str(self.port), *args], stdout=out, stderr=subprocess.STDOUT, env=environ)
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"server exited:\n{self.log_text()}"
            assert time.monotonic() < deadline, f"server not up:\n{self.log_text()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0,
                             timeout=60)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", **{"timeout": 60, **kwargs})

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", **{"timeout": 60, **kwargs})

    def delete(self, path: str, **kwargs) -> httpx.Response:
        return httpx.delete(f"{self.url}{path}", **{"timeout": 60, **kwargs})

    def metrics(self) -> str:
        return self.get("/metrics").text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
