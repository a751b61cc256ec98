"""CPU LoRA paths (dense, BGMV, segment loop) against PEFT, with >= 8 adapters of
different modules and per-layer ranks, base tokens mixed in, prefill+decode mixes, and
adapters evicted/reloaded or re-added between steps."""

from __future__ import annotations

import pytest
import torch
from support import (
    OracleSampler,
    PeftOracle,
    drive,
    random_prompt,
    save_adapters,
    save_random_adapter,
)

from pagedlora import Engine
from pagedlora.lora_adapter import TARGET_MODULES

ALL = list(TARGET_MODULES)  # the seven decoder projections
SPECS = {
    "a0": dict(r=2, target_modules=["q_proj", "v_proj"], seed=1),
    "a1": dict(r=4, target_modules=ALL, seed=2),
    "a2": dict(r=8, target_modules=["o_proj", "down_proj"], seed=3),
    "a3": dict(r=3, target_modules=["k_proj", "up_proj"], seed=4),
    "a4": dict(r=4, target_modules=["q_proj", "up_proj"],
               rank_pattern={"layers.0.self_attn.q_proj": 12},
               alpha_pattern={"layers.1.mlp.up_proj": 5}, seed=5),
    "a5": dict(r=6, target_modules=["gate_proj"], layers_to_transform=[1], seed=6),
    "a6": dict(r=5, lora_alpha=3, use_rslora=True, target_modules=["v_proj", "o_proj"], seed=7),
    "a7": dict(r=1, target_modules=["down_proj", "q_proj"], seed=8),
    "a8": dict(r=16, target_modules=["k_proj", "gate_proj", "up_proj"], seed=9),
}


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir, tmp_path_factory):
    return save_adapters(tiny_llama_dir, tmp_path_factory.mktemp("review-runner"), SPECS)


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir, dirs):
    return PeftOracle(tiny_llama_dir, dirs).logits


def _engine(model_dir, dirs, **kw):
    kw = {"max_loras": 16, "pool_gb": 0.05, **kw}
    e = Engine(model_dir, sampler=OracleSampler(), max_lora_rank=16, block_size=8, **kw)
    for n, d in dirs.items():
        e.add_adapter(n, d)
    return e


def test_bgmv_prefill_and_decode_mix(tiny_llama_dir, dirs, oracle):
    """Short prompts so every step is <= 64 tokens with >= 8 adapters: the BGMV form with
    several tokens per adapter (prefill), base tokens, and later arrivals prefilled next to
    decodes."""
    engine = _engine(tiny_llama_dir, dirs)
    names = [None, *SPECS]
    first = [(f"{n}-0", random_prompt(2 + i % 3, seed=i), n) for i, n in enumerate(names)]
    arrivals = {0: first,
                2: [("a3-late", random_prompt(4, 50), "a3"),
                    ("base-late", random_prompt(3, 51), None)],
                3: [("a4-late", random_prompt(5, 52), "a4"),
                    ("a1-late", random_prompt(2, 53), "a1")]}
    d = drive(engine, arrivals, oracle, max_tokens=4)
    assert d.num_compared == 4 * (len(first) + 4)


def test_dense_and_loop(tiny_llama_dir, dirs, oracle):
    """Fewer than 8 adapters: dense form for small steps, segment loop for large ones."""
    engine = _engine(tiny_llama_dir, dirs)
    names = [None, "a4", "a5", "a2", "a4"]
    first = [(f"{n}-{i}", random_prompt(20 + 5 * i, seed=i), n) for i, n in enumerate(names)]
    d = drive(engine, {0: first, 2: [("a6", random_prompt(3, 9), "a6")]}, oracle, max_tokens=4)
    assert d.num_compared == 4 * 6


def test_bgmv_is_exercised(tiny_llama_dir, dirs, oracle, monkeypatch):
    """The first test above runs the BGMV form in two rank classes (ranks 4-16 and 1-3), with
    adapters of several tokens (the zero-padded layout) and of one token each."""
    import pagedlora.kernels.lora as kl

    seen = []
    real = kl._bgmv

    def spy(y, x, batch):
        seen.append((any(p.tokens.width > 1 for p in batch.stacked), len(batch.stacked)))
        return real(y, x, batch)
    monkeypatch.setattr(kl, "_bgmv", spy)
    test_bgmv_prefill_and_decode_mix(tiny_llama_dir, dirs, oracle)
    assert {rest for rest, _ in seen} == {True, False}, seen
    assert max(n for _, n in seen) > 1, seen


def test_evict_reload_and_readd_between_steps(tiny_llama_dir, dirs, oracle, tmp_path):
    """A pool that holds about two adapters: every generate call evicts and reloads adapters
    into other pages; a name re-added with new weights serves the new ones. Greedy tokens must
    equal PEFT's each time (stale gathered rows would not)."""
    from support import peft_greedy
    from transformers import AutoModelForCausalLM

    from pagedlora import SamplingParams

    probe = _engine(tiny_llama_dir, dirs)
    need = max(probe.adapters.footprint(probe.adapters.key_of(n)) for n in SPECS)
    page_bytes = probe.stats()["page_bytes"]
    num_pages = need + 12
    engine = _engine(tiny_llama_dir, dirs, pool_gb=(num_pages + 0.5) * page_bytes / 2**30)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    sp = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompt = random_prompt(6, seed=77)
    seq = ["a1", "a8", "a1", "a4", "a8", "a1"]
    for i, name in enumerate(seq):
        if i == 3:  # re-add a1 with other weights
            new = save_random_adapter(tiny_llama_dir, tmp_path / "a1b", r=4,
                                      target_modules=ALL, seed=99)
            engine.add_adapter("a1", new)
            dirs = {**dirs, "a1": new}
        outs = engine.generate([prompt, prompt], adapters=[name, None], sampling_params=sp,
                               progress=False)
        assert outs[0].token_ids == peft_greedy(base, dirs[name], prompt, 5), (i, name)
    assert sum(a["evictions"] for a in engine.stats()["adapters"].values()) >= 2
