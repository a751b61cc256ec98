"""Unmerged LoRA against PEFT on the same weights (the numerics oracle), and pool accounting.

Random PEFT adapters (``init_lora_weights=False``: A and B both random) of ranks 1 to 64, on
different target modules, with rsLoRA, rank/alpha patterns and the legacy ``adapter_model.bin``
format, are served by one engine, alone and mixed with each other and with base-model requests in
the same steps. Reference logits and greedy tokens come from ``PeftModel`` (one model per
adapter) and, for base requests, from plain ``transformers``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from safetensors.torch import load_file
from support import (
    OracleSampler,
    assert_kv_released,
    drive,
    logits_rtol,
    random_prompt,
    row_error,
    save_random_adapter,
)
from transformers import AutoModelForCausalLM

from pagedlora import Engine, SamplingParams
from pagedlora.lora_adapter import TARGET_MODULES

ALL = list(TARGET_MODULES)  # the seven decoder projections

# name -> save_random_adapter options; "bin" is converted to adapter_model.bin after saving.
ADAPTERS = {
    "r1": dict(r=1, target_modules=["q_proj", "v_proj"], seed=101),
    "r4": dict(r=4, target_modules=ALL, seed=102),
    "r16": dict(r=16, target_modules=["o_proj", "down_proj"], seed=103),
    "r64": dict(r=64, target_modules=["k_proj", "up_proj", "gate_proj"], seed=104),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True,
                   target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], seed=105),
    "pattern": dict(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                    rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 3}, seed=106),
    "bin": dict(r=8, target_modules=["k_proj", "o_proj", "gate_proj"], seed=107),
    # Ranks and alphas that differ per layer, and an adapter on layer 1 only.
    "layerwise": dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"layers.0.self_attn.q_proj": 12},
                      alpha_pattern={"layers.1.mlp.down_proj": 7}, seed=109),
    "layer1": dict(r=6, target_modules=["q_proj", "up_proj"], layers_to_transform=[1],
                   seed=110),
    # Same targets as "r4" at rank 64 (page accounting only).
    "all64": dict(r=64, target_modules=ALL, seed=108),
}
SERVED = ["r1", "r4", "r16", "r64", "rslora", "pattern", "bin", "layerwise", "layer1"]


PROMPTS = [random_prompt(n, seed=200 + n) for n in (4, 9, 17, 30)]


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-vs-peft")
    dirs = {}
    for name, options in ADAPTERS.items():
        dirs[name] = save_random_adapter(tiny_llama_dir, root / name, **dict(options))
    st = dirs["bin"] / "adapter_model.safetensors"
    torch.save(load_file(st), dirs["bin"] / "adapter_model.bin")
    st.unlink()
    return dirs


class Oracle:
    """PEFT references: one ``PeftModel`` per adapter, plain transformers for None."""

    def __init__(self, model_dir, adapter_dirs):
        from peft import PeftModel

        def base():
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

        self.models = {None: base()}
        for name in SERVED:
            self.models[name] = PeftModel.from_pretrained(base(), adapter_dirs[name]).eval()
        self._greedy: dict = {}

    @torch.inference_mode()
    def logits(self, adapter: str | None, token_ids: list[int]) -> torch.Tensor:
        return self.models[adapter](input_ids=torch.tensor([token_ids])).logits[0, -1].float()

    @torch.inference_mode()
    def greedy(self, adapter: str | None, prompt: list[int], n: int = 16) -> list[int]:
        key = (adapter, tuple(prompt), n)
        if key not in self._greedy:
            out = self.models[adapter].generate(
                input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                min_new_tokens=0, eos_token_id=None, pad_token_id=0)
            tokens = out[0, len(prompt):].tolist()
            assert len(tokens) == n
            self._greedy[key] = tokens
        return self._greedy[key]


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir, adapter_dirs):
    return Oracle(tiny_llama_dir, adapter_dirs)


def make_engine(model_dir, adapter_dirs, names=SERVED, pool_gb=0.05, **options) -> Engine:
    options.setdefault("max_loras", len(SERVED))
    engine = Engine(model_dir, sampler=OracleSampler(), pool_gb=pool_gb, max_lora_rank=64,
                    **options)
    for name in names:
        engine.add_adapter(name, adapter_dirs[name])
    return engine


GREEDY16 = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def check_pool(engine: Engine) -> dict:
    """Pool accounting once nothing runs: no KV pages, adapter pages = resident adapters'."""
    stats = engine.stats()
    assert stats["requests_running"] == stats["requests_waiting"] == 0
    assert_kv_released(engine)
    resident = [engine.adapters.resident(k) for k in engine.adapters.resident_keys]
    held = engine.adapters.pages_in_use()
    assert stats["pages_adapter"] == len(held) == len(set(held)), "a page counted twice"
    assert not any(a.overlaps(b) for a, b in itertools.combinations(resident, 2)), (
        "two adapters hold one element")
    engine.adapters.check_invariants()
    assert stats["pages_free"] + stats["pages_adapter"] + stats["pages_kv_cached"] == stats[
        "pages_total"]
    return stats


# -- the adapters are not no-ops (so the comparisons below can fail) -------------------------------


def test_every_adapter_changes_the_logits(oracle):
    """Each adapter moves the logits by far more than the tolerance: a 0.1% error in its scale
    (about 0.1% of this delta) is then at least 3 tolerances, so the logits comparisons below
    would see it (tests/test_tolerance.py measures that directly)."""
    base = oracle.logits(None, PROMPTS[1])
    rtol = logits_rtol(oracle.models[None].config)
    for name in SERVED:
        delta = row_error(oracle.logits(name, PROMPTS[1]), base)
        assert 1e-3 * delta > 3 * rtol, \
            f"adapter {name!r} barely changes the logits ({delta:.3g} of their scale)"


def test_adapter_configs_are_what_the_test_means(adapter_dirs):
    """rank_pattern really gives q_proj rank 8, use_rslora and alpha_pattern are saved, and the
    "bin" adapter has only adapter_model.bin."""
    import json

    cfg = json.loads((adapter_dirs["pattern"] / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"q_proj": 8} and cfg["alpha_pattern"] == {"v_proj": 3}
    w = load_file(adapter_dirs["pattern"] / "adapter_model.safetensors")
    q_a = [t for k, t in w.items() if "q_proj.lora_A" in k]
    v_a = [t for k, t in w.items() if "v_proj.lora_A" in k]
    assert q_a and all(t.shape[0] == 8 for t in q_a)
    assert v_a and all(t.shape[0] == 4 for t in v_a)
    assert json.loads((adapter_dirs["rslora"] / "adapter_config.json").read_text())["use_rslora"]
    w = load_file(adapter_dirs["layerwise"] / "adapter_model.safetensors")
    assert {k.split(".layers.")[1][:1]: t.shape[0] for k, t in w.items()
            if "q_proj.lora_A" in k} == {"0": 12, "1": 4}
    w = load_file(adapter_dirs["layer1"] / "adapter_model.safetensors")
    assert w and all(".layers.1." in k for k in w)
    assert (adapter_dirs["bin"] / "adapter_model.bin").is_file()
    assert not (adapter_dirs["bin"] / "adapter_model.safetensors").exists()


# -- each adapter alone --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVED)
def test_adapter_alone(name, tiny_llama_dir, adapter_dirs, oracle):
    engine = make_engine(tiny_llama_dir, adapter_dirs, names=[name])
    # Logits of prefill and decode steps, two prompts in the same steps.
    d = drive(engine, {0: [("a", PROMPTS[0], name), ("b", PROMPTS[2], name)]}, oracle.logits,
              max_tokens=3)
    assert d.num_compared == 6
    # Greedy tokens of generate.
    prompts = [PROMPTS[1], PROMPTS[3]]
    outs = engine.generate(prompts, adapters=name, sampling_params=GREEDY16, progress=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.adapter == name and out.finish_reason == "length"
        assert out.token_ids == oracle.greedy(name, prompt), f"adapter {name!r}"
    check_pool(engine)


# -- all adapters and the base model together ----------------------------------------------------


MIXED = [None, "r1", "r4", "r16", None, "r64", "rslora", "pattern", "bin", "layerwise", "layer1",
         "r4", "r64", None]


def test_mixed_generate_matches_peft(tiny_llama_dir, adapter_dirs, oracle):
    engine = make_engine(tiny_llama_dir, adapter_dirs)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(MIXED))]
    outs = engine.generate(prompts, adapters=MIXED, sampling_params=GREEDY16, progress=False)
    for i, (name, prompt, out) in enumerate(zip(MIXED, prompts, outs, strict=True)):
        assert out.adapter == name
        assert out.token_ids == oracle.greedy(name, prompt), f"request {i}, adapter {name!r}"
    stats = check_pool(engine)
    assert stats["adapters_resident"] == sorted(SERVED)
    assert stats["pages_adapter"] > 0


def test_mixed_step_logits_match_peft(tiny_llama_dir, adapter_dirs, oracle):
    """Every adapter and the base model in the first step; later arrivals are prefilled in the
    same steps as the others' decodes; every logits row within support.logits_rtol of
    PEFT's."""
    engine = make_engine(tiny_llama_dir, adapter_dirs, block_size=8)
    first = [(f"{name}-0", PROMPTS[i % 4], name) for i, name in enumerate([None, *SERVED])]
    arrivals = {0: first,
                2: [("r64-late", PROMPTS[3], "r64"), ("base-late", PROMPTS[2], None)],
                3: [("pattern-late", PROMPTS[1], "pattern"), ("r1-late", PROMPTS[0], "r1")]}
    d = drive(engine, arrivals, oracle.logits, max_tokens=4)
    assert d.num_compared == 4 * (len(first) + 4)
    assert {a for _, a, _, _ in d.steps[0]} == {None, *SERVED}
    mixed = [s for s in d.steps
             if any(n == 1 and c > 0 for *_, n, c in s) and any(n > 1 for *_, n, c in s)]
    assert len(mixed) >= 2, d.steps
    check_pool(engine)


def test_continuous_batching_same_tokens_as_alone(tiny_llama_dir, adapter_dirs, oracle):
    """Requests arriving at different steps (engine.step() in between, small token budget so
    prompts are chunked) produce PEFT's tokens, i.e. the tokens each gets alone."""
    engine = make_engine(tiny_llama_dir, adapter_dirs, block_size=8, max_num_batched_tokens=20)
    plan = {0: [("r4", 3), (None, 1)],
            1: [("r64", 2)],
            3: [("rslora", 3), ("r1", 0)],
            4: [(None, 3), ("bin", 2)],
            7: [("pattern", 1), ("r16", 3), ("r4", 0)]}
    requests, done = [], {}
    step = 0
    while step <= max(plan) or engine.has_unfinished():
        for name, p in plan.get(step, []):
            requests.append((name, p, engine.add_request(PROMPTS[p], name, GREEDY16)))
        done.update((d.request_id, d.output) for d in engine.step() if d.finished)
        step += 1
        assert step < 200
    for name, p, r in requests:
        assert done[r].finish_reason == "length"
        assert done[r].token_ids == oracle.greedy(name, PROMPTS[p]), f"{name!r}, prompt {p}"
    check_pool(engine)


def test_page_pressure_same_tokens_as_alone(tiny_llama_dir, adapter_dirs, oracle):
    """A pool holding the adapters and only a few KV blocks: requests are preempted (and
    recomputed) and unpinned adapters evicted and reloaded; tokens are still PEFT's."""
    names = ["r4", "r16", "r64"]
    probe = make_engine(tiny_llama_dir, adapter_dirs, names=names, block_size=8)
    adapter_pages = sum(probe.adapters.footprint(probe.adapters.key_of(n)) for n in names)
    page_bytes = probe.stats()["page_bytes"]
    num_pages = adapter_pages + 2 * 8  # eight 8-token KV blocks (2 layers) besides adapters
    engine = make_engine(tiny_llama_dir, adapter_dirs, names=names, block_size=8,
                         pool_gb=(num_pages + 0.5) * page_bytes / 2**30)
    assert engine.stats()["pages_total"] == num_pages
    # Short prompts are all admitted at once, then their decodes outgrow the pool.
    plan = [("r4", 0), ("r16", 1), ("r64", 0), (None, 1), ("r4", 1), ("r64", 1), (None, 0),
            ("r16", 0)]
    outs = engine.generate([PROMPTS[p] for _, p in plan], adapters=[n for n, _ in plan],
                           sampling_params=GREEDY16, progress=False)
    for (name, p), out in zip(plan, outs, strict=True):
        assert out.finish_reason == "length", out.error
        assert out.token_ids == oracle.greedy(name, PROMPTS[p]), f"{name!r}, prompt {p}"
    assert sum(o.num_preemptions for o in outs) > 0, "the pool was never short"
    check_pool(engine)


# -- pages -----------------------------------------------------------------------------------------


def _weight_elements(adapter_dir) -> int:
    return sum(t.numel() for t in load_file(adapter_dir / "adapter_model.safetensors").values())


def _packed_pages(adapter_dir, page_numel: int) -> int:
    """Pages the documented layout takes: per layer, rank rows grouped by width (lora_A rows are
    in_features wide, lora_B^T rows out_features), no row straddling two pages."""
    rows: dict[tuple[str, int], int] = {}
    for key, t in load_file(adapter_dir / "adapter_model.safetensors").items():
        layer = key.split(".layers.")[1].split(".")[0]
        r, width = (t.shape[0], t.shape[1]) if "lora_A" in key else (t.shape[1], t.shape[0])
        rows[(layer, width)] = rows.get((layer, width), 0) + r
    return sum(-(-n // (page_numel // w)) for (_, w), n in rows.items())


def test_adapter_pages_proportional_to_rank(tiny_llama_dir, adapter_dirs):
    """Same targets, rank 4 vs 64: pages in proportion to rank (no padding to max_lora_rank),
    between the bytes of the weights and the row-packed layout the store documents."""
    engine = make_engine(tiny_llama_dir, adapter_dirs, names=["r4", "all64"])
    engine.generate([PROMPTS[0], PROMPTS[1]], adapters=["r4", "all64"],
                    sampling_params=SamplingParams(max_tokens=2, temperature=0), progress=False)
    stats = check_pool(engine)
    assert stats["adapters_resident"] == ["all64", "r4"]
    page_numel = engine.pool.page_numel
    assert page_numel == 2 * 16 * 2 * 16  # block 16, 2 KV heads of 16
    pages = {}
    for name in ("r4", "all64"):
        resident = engine.adapters.resident(engine.adapters.key_of(name))
        elements = _weight_elements(adapter_dirs[name])
        assert resident.used_elements == elements
        # its own pages and the shared ones its last rows are in (their tail may straddle
        # two shared pages' gaps)
        pages[name] = len(resident.pages) + len(resident.shared_pages)
        packed = _packed_pages(adapter_dirs[name], page_numel)
        assert math.ceil(elements / page_numel) <= pages[name] <= packed + 1, \
            (name, pages[name], elements, packed)
    assert pages["all64"] > pages["r4"]
    # 16x the rank: close to 16x the pages, far from equal (padding to max rank).
    assert 8 * pages["r4"] <= pages["all64"] <= 16 * pages["r4"], pages
    assert stats["pages_adapter"] == len(engine.adapters.pages_in_use()) <= (
        pages["r4"] + pages["all64"])
    # Pool fragmentation reported consistently with that (no KV in use now).
    used = sum(_weight_elements(adapter_dirs[n]) for n in ("r4", "all64"))
    expected = 1 - used / (stats["pages_adapter"] * page_numel)
    assert stats["internal_fragmentation"] == pytest.approx(expected)
