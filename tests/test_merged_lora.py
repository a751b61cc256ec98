"""Merged LoRA for a hot adapter (``merge_policy="auto"``): the switching rule, PEFT's
``merge_and_unload()`` as the oracle of merged steps, base weights untouched by switching, and
requests that span switches against PEFT's unmerged tokens.

Tiny random Llama, random PEFT adapters (``init_lora_weights=False``) whose targets cover part
of a fused weight (q and v of qkv, gate of gate_up), per-layer ranks and alphas, one adapter on
one layer only, and a DoRA adapter (merged as PEFT merges DoRA: ``g * (W + scale * B A)``).
Mixes and scaled requests are never merged; preemption and the prefix cache work across
merged steps.
"""

from __future__ import annotations

import pytest
import torch
from support import (
    assert_no_leaks,
    engine_with,
    random_prompt,
    save_random_adapter,
    save_random_dora_adapter,
)
from transformers import AutoModelForCausalLM

from pagedlora import AdapterMix, Engine, EngineConfig, SamplingParams
from pagedlora.cli import build_parser, server_config
from pagedlora.lora_adapter import TARGET_MODULES
from pagedlora.merge_policy import MERGE_AFTER_STEPS, MergePolicy
from pagedlora.packed_linear import PackedLinear

ALL = list(TARGET_MODULES)  # the seven decoder projections
ADAPTERS = {
    "qv": dict(r=8, target_modules=["q_proj", "v_proj"], seed=301),
    "all": dict(r=4, target_modules=ALL, rank_pattern={"layers.0.self_attn.k_proj": 12},
                alpha_pattern={"layers.1.mlp.down_proj": 3}, seed=302),
    "gate1": dict(r=6, target_modules=["gate_proj", "o_proj"], layers_to_transform=[1],
                  seed=303),
    "dora": dict(r=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                 seed=304, dora=True),
}
MARGIN = 1e-4  # fp32: merged and unmerged logits differ by ~1e-6; a flip needs a smaller margin


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("merged-lora")
    dirs = {}
    for name, options in ADAPTERS.items():
        options = dict(options)
        save = save_random_dora_adapter if options.pop("dora", False) else save_random_adapter
        dirs[name] = save(tiny_llama_dir, root / name, **options)
    return dirs


class Peft:
    """PEFT references per adapter: unmerged (``PeftModel``) and merged
    (``merge_and_unload()``), and the base model for None."""

    def __init__(self, model_dir, adapter_dirs):
        from peft import PeftModel

        def base():
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

        self.unmerged = {None: base()}
        self.merged = {None: self.unmerged[None]}
        self.merged_bf16 = {}
        # merged in float32 from the decoder weights (base and LoRA) rounded to bfloat16, as a
        # bfloat16 engine holds them
        for name, path in adapter_dirs.items():
            self.unmerged[name] = PeftModel.from_pretrained(base(), path).eval()
            self.merged[name] = PeftModel.from_pretrained(base(), path).merge_and_unload().eval()
            rounded = PeftModel.from_pretrained(base(), path)
            with torch.no_grad():
                for k, v in rounded.named_parameters():
                    if ".layers." in k:
                        v.copy_(v.to(torch.bfloat16).float())
            self.merged_bf16[name] = rounded.merge_and_unload().eval()

    def greedy(self, models: dict, name: str | None, prompt: list[int], n: int) -> list[int]:
        return hf_greedy(models[name], prompt, n)

    @torch.inference_mode()
    def margin(self, name: str | None, token_ids: list[int]) -> float:
        """Top-1 minus top-2 logit of the unmerged reference at the last position."""
        top = self.unmerged[name](input_ids=torch.tensor([token_ids])).logits[0, -1].topk(2)
        return (top.values[0] - top.values[1]).item()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of an HF or PEFT model after ``prompt``."""
    out = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def fused_reference(state: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Layer ``n``'s fused weights (``qkv``, ``o``, ``gate_up``, ``down``) from an HF state
    dict (e.g. PEFT's ``merge_and_unload()`` model's)."""
    p = f"model.layers.{n}."
    return {"qkv": torch.cat([state[p + f"self_attn.{m}_proj.weight"] for m in "qkv"]),
            "o": state[p + "self_attn.o_proj.weight"],
            "gate_up": torch.cat([state[p + "mlp.gate_proj.weight"],
                                  state[p + "mlp.up_proj.weight"]]),
            "down": state[p + "mlp.down_proj.weight"]}


@pytest.fixture(scope="module")
def peft(tiny_llama_dir, adapter_dirs):
    return Peft(tiny_llama_dir, adapter_dirs)


def make_engine(model_dir, adapter_dirs, merge_after_steps: int | None = None) -> Engine:
    engine = Engine(model_dir, pool_gb=0.05, max_lora_rank=16, merge_policy="auto")
    if merge_after_steps is not None:
        engine.core.merging = MergePolicy("auto", merge_after_steps)
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)
    return engine


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def run(engine: Engine, arrivals: dict[int, list[tuple[list[int], str | None, int]]]) -> list:
    """Steps ``engine``, adding ``(prompt, adapter, max_tokens)`` requests before the given
    steps; returns the RequestOutputs in arrival order."""
    ids, done, step = [], {}, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for prompt, name, n in arrivals.get(step, []):
            ids.append(engine.add_request(prompt, name, greedy(n)))
        for d in engine.step():
            if d.finished:
                done[d.request_id] = d.output
        step += 1
    return [done[i] for i in ids]


def fail_fold_at(monkeypatch, call: int) -> None:
    """Makes merging raise, as running out of memory would, at its ``call``-th fold of a
    weight (``monkeypatch.undo()`` restores it)."""
    import pagedlora.merged_weights as mw

    fold, calls = mw._fold, []

    def failing(*args):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("out of memory")
        fold(*args)
    monkeypatch.setattr(mw, "_fold", failing)


def steps_of(engine: Engine) -> list[dict]:
    """The engine's step history (every step: these runs are shorter than its window)."""
    stats = engine.stats(history=True)
    assert stats["num_steps"] == len(stats["steps"])
    return stats["steps"]


# -- the switching rule alone (no torch) ----------------------------------------------------------


def test_policy_merges_single_adapter_steps_after_its_credit_and_leaves_at_once():
    p = MergePolicy("auto", merge_after_steps=2)
    decisions = [p.decide(keys) for keys in [
        ["x", "x"], ["x"],            # x's credit: 1, 2 (unmerged)
        ["x", "x"],                   # paid: merged, a merge
        ["x", None],                  # a base request joins: unmerged at once
        ["x"],                        # x's copy is kept: merged again at once, a reuse
        ["x", "y"],                   # another adapter joins: unmerged
        ["y"], ["y"],                 # the credit moves to y: 1, 2
        ["x"],                        # x's copy: a reuse (y keeps its credit)
        ["y"],                        # y's third single step: merged straight from x's
        ["y"], [],                    # y's copy; an empty step decides nothing
    ]]
    assert decisions == [None, None, "x", None, "x", None, None, None, "x", "y", "y", None]
    s = p.stats
    assert (s.merged_steps, s.merges, s.reuses, s.unmerges) == (5, 2, 2, 2)
    assert s.switches == 6 and p.merged_copy == "y"


def test_policy_credit_pauses_on_mixed_steps_and_never_merges_base_or_mixes():
    p = MergePolicy("auto", merge_after_steps=2)
    assert [p.decide(k) for k in [["x"], ["x", None], [None], ["x", "y"], ["x"], ["x"]]] == [
        None, None, None, None, None, "x"]
    p = MergePolicy("auto", merge_after_steps=2)
    assert [p.decide(k) for k in [["y"]] * 3 + [["x"], [None, None], ["x"], [None], ["x"]]] == [
        None, None, "y", None, None, None, None, "x"]
    assert MergePolicy("auto", merge_after_steps=0).decide(["z", "z"]) == "z"
    p = MergePolicy("auto", merge_after_steps=0)
    assert p.decide(["v"], mergeable=lambda key: key != "v") is None
    assert p.stats.merges == 0 and p.decide(["z"], mergeable=lambda key: key != "v") == "z"
    never = MergePolicy()
    assert never.policy == "never"
    assert [never.decide(["x"]) for _ in range(50)] == [None] * 50
    assert MergePolicy("auto").merge_after_steps == MERGE_AFTER_STEPS


@pytest.mark.parametrize("options, match", [
    ({"policy": "always"}, r"merge_policy must be one of \('never', 'auto'\), got 'always'"),
    ({"policy": "auto", "merge_after_steps": -1}, "merge_after_steps must be an int >= 0"),
    ({"policy": "auto", "merge_after_steps": 2.0}, "merge_after_steps must be an int >= 0"),
])
def test_policy_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        MergePolicy(**options)


def test_config_and_cli_option():
    assert EngineConfig().merge_policy == "never"
    with pytest.raises(ValueError, match="merge_policy must be one of .* got 'on'"):
        EngineConfig(merge_policy="on")
    c = server_config(build_parser().parse_args(["serve", "--merge-policy", "auto"]))
    assert c.engine_options == {"merge_policy": "auto"}
    assert c.engine_config().merge_policy == "auto"


# -- merged steps against PEFT's merge_and_unload() -----------------------------------------------


def test_merged_steps_give_merge_and_unload_greedy_tokens(tiny_llama_dir, adapter_dirs, peft):
    """Every step merged (no credit to pay), each adapter alone in turn; the copies are made
    again for each adapter (a stale copy would give the previous adapter's tokens)."""
    engine = make_engine(tiny_llama_dir, adapter_dirs, merge_after_steps=0)
    n = 12
    for i, name in enumerate(["qv", "all", "dora", "gate1", "qv"]):
        prompts = [random_prompt(5 + 7 * j + i, seed=40 + 3 * i + j) for j in range(3)]
        before = engine.stats()["num_steps"]
        outs = engine.generate(prompts, [name] * 3, greedy(n), progress=False)
        steps = steps_of(engine)[before:]
        assert steps and all(s["merged"] for s in steps), name
        for j, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
            assert out.token_ids == peft.greedy(peft.merged, name, prompt, n), (name, j)
    merge = engine.stats()["merge"]
    assert (merge["merges"], merge["reuses"], merge["unmerges"]) == (5, 0, 0)
    assert merge["merge_seconds"] > 0
    # "qv" last: one copy of each layer's qkv, float32
    assert merge["merged_bytes"] == 2 * (64 + 32 + 32) * 64 * 4
    engine.core.drop_merged()  # frees the copies: "qv" is merged again
    assert engine.stats()["merge"]["merged_bytes"] == 0
    out = engine.generate([prompts[0]], ["qv"], greedy(n), progress=False)[0]
    assert out.token_ids == peft.greedy(peft.merged, "qv", prompts[0], n)
    assert engine.stats()["merge"]["merges"] == 6
    assert_no_leaks(engine)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_copies_are_peft_merged_weights(tiny_llama_dir, adapter_dirs, peft, dtype):
    """Each fused copy, row for row, is PEFT's merge_and_unload() weight, DoRA's included (in
    bfloat16: PEFT's float32 merge of the bf16-rounded weights the engine serves, rounded once,
    so within half a bf16 ulp; a DoRA row within two ulps: its output scale ``g`` is computed
    at registration from the adapter's own weights and stored in bfloat16, then the product
    rounded again, each rounding 2**-9 relative); fused weights the adapter does not touch are
    not copied. (In float32 the copies are PEFT's bit for bit, DoRA's included.)"""
    engine = Engine(tiny_llama_dir, pool_gb=0.05, max_lora_rank=16, dtype=dtype)
    merged = engine.core.runner.merged
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)
        engine.generate([[5, 6, 7]], [name], greedy(1), progress=False)  # resident now
        key = engine.adapters.key_of(name)
        layers = merged.layers_for(key, engine.adapters.resident(key))
        ref = (peft.merged if dtype == "float32" else peft.merged_bf16)[name].state_dict()
        ulps = 2**-6 if ADAPTERS[name].get("dora") else 2**-8
        for n, w in enumerate(layers):
            for fused, expected in fused_reference(ref, n).items():
                got, base = w[fused], engine.model.layers[n][fused]
                targeted = any(lm[0] == n and engine.model.fused_rows[lm[1]][0] == fused
                               for lm in engine.adapters.resident(key).modules)
                assert (got is not base) == targeted, (name, n, fused)
                tol = 1e-6 if dtype == "float32" else expected.abs() * ulps + 1e-6
                err = (got.float() - expected).abs()
                assert (err <= tol).all(), (name, n, fused, err.max().item())
    assert merged.stats.merges == len(adapter_dirs)


def test_a_merge_that_raises_leaves_no_copy_claiming_its_key(tiny_llama_dir, adapter_dirs,
                                                             peft, monkeypatch):
    """A merge that fails midway (e.g. out of memory) has overwritten reused buffers; the next
    request for the adapter merged before must merge again, not get the half-made copies."""

    engine = make_engine(tiny_llama_dir, adapter_dirs, merge_after_steps=0)
    prompt = random_prompt(11, seed=3)
    want = peft.greedy(peft.merged, "qv", prompt, 8)
    assert engine.generate([prompt], ["qv"], greedy(8), progress=False)[0].token_ids == want
    merged, store = engine.core.runner.merged, engine.adapters
    engine.generate([[5, 6], [7]], ["all", None], greedy(1), progress=False)  # resident
    fail_fold_at(monkeypatch, 3)
    key = store.key_of("all")
    with pytest.raises(RuntimeError, match="out of memory"):  # qv's buffers half overwritten
        merged.layers_for(key, store.resident(key))
    monkeypatch.undo()
    # the policy holds that qv is merged: the runner must merge it again
    assert engine.generate([prompt], ["qv"], greedy(8), progress=False)[0].token_ids == want
    assert merged.stats.key == store.key_of("qv")


def test_merged_tokens_differ_from_the_base_models(tiny_llama_dir, adapter_dirs, peft):
    """The adapters change the greedy tokens, so the comparison above can fail."""
    prompt = random_prompt(9, seed=7)
    base = peft.greedy(peft.merged, None, prompt, 12)
    for name in ADAPTERS:
        assert peft.greedy(peft.merged, name, prompt, 12) != base, name


@pytest.mark.parametrize("targets", [["embed_tokens", "q_proj"], ["lm_head", "v_proj"]])
def test_adapters_on_the_vocabulary_are_never_merged(tiny_llama_dir, adapter_dirs, tmp_path,
                                                     targets):
    """LoRA on embed_tokens or lm_head is served unmerged (no credit, no merge), its tokens
    PEFT's (which differ from the base model's, so a vocabulary LoRA dropped would show); the
    policy still merges the next decoder-only adapter."""
    from peft import PeftModel

    vocab = save_random_adapter(tiny_llama_dir, tmp_path / "vocab", r=4, seed=404,
                                target_modules=targets)
    engine = make_engine(tiny_llama_dir, {"qv": adapter_dirs["qv"]}, merge_after_steps=0)
    engine.add_adapter("vocab", vocab)
    prompt = random_prompt(9, seed=8)
    out = engine.generate([prompt], ["vocab"], greedy(10), progress=False)[0]
    assert not any(s["merged"] for s in steps_of(engine))
    assert engine.stats()["merge"]["merges"] == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    base_tokens = hf_greedy(base, prompt, 10)  # before PEFT wraps base's layers in place
    want = hf_greedy(PeftModel.from_pretrained(base, vocab).eval(), prompt, 10)
    assert out.token_ids == want and want != base_tokens
    engine.generate([prompt], ["qv"], greedy(2), progress=False)
    assert engine.stats()["merge"]["merges"] == 1 and steps_of(engine)[-1]["merged"]


def test_a_dora_adapter_added_while_merged_reads_the_unmerged_base(tiny_llama_dir,
                                                                   adapter_dirs, peft):
    """DoRA's output scale is computed at registration from ``LlamaModel.base_weight``, which
    must stay the loaded weight while another adapter's merged copies are live; the DoRA
    adapter then merges to PEFT's merged DoRA weights and gives their greedy tokens."""
    engine = make_engine(tiny_llama_dir, {"all": adapter_dirs["all"]}, merge_after_steps=0)
    model = engine.model
    loaded = {m: model.base_weight(0, m).clone() for m in ALL}
    prompt = random_prompt(13, seed=21)
    engine.generate([prompt], ["all"], greedy(4), progress=False)
    assert steps_of(engine)[-1]["merged"] and engine.stats()["merge"]["merged_bytes"] > 0
    for m in ALL:
        assert torch.equal(model.base_weight(0, m), loaded[m]), m
    engine.add_adapter("dora", adapter_dirs["dora"])
    out = engine.generate([prompt], ["dora"], greedy(12), progress=False)[0]
    assert steps_of(engine)[-1]["merged"]
    assert out.token_ids == peft.greedy(peft.merged, "dora", prompt, 12)
    key = engine.adapters.key_of("dora")
    ref = peft.merged["dora"].state_dict()
    for n, w in enumerate(engine.core.runner.merged.layers_for(key, engine.adapters.resident(key))):
        for fused, expected in fused_reference(ref, n).items():
            err = (w[fused] - expected).abs().max().item()
            assert err <= 1e-6, (n, fused, err)


def test_mixes_and_scaled_adapters_are_never_merged(tiny_llama_dir, adapter_dirs, tmp_path):
    """Only requests of one adapter at weight 1 run merged: a batch all of one scaled adapter
    (``AdapterMix({"qv": 0.5})``, PEFT's tokens with lora_alpha halved) or all of one mix runs
    unmerged; ``AdapterMix({"qv": 1.0})`` is "qv" itself and merges."""
    import json
    import shutil

    from peft import PeftModel

    half = shutil.copytree(adapter_dirs["qv"], tmp_path / "qv-half")
    config = json.loads((half / "adapter_config.json").read_text())
    config["lora_alpha"] /= 2
    (half / "adapter_config.json").write_text(json.dumps(config))
    engine = make_engine(tiny_llama_dir, adapter_dirs, merge_after_steps=0)
    ps = [random_prompt(6 + 5 * j, seed=130 + j) for j in range(3)]

    def run_all(adapter) -> tuple[list[bool], list]:
        """Every prompt on ``adapter``: whether each step ran merged, the outputs."""
        before = engine.stats()["num_steps"]
        outs = engine.generate(ps, [adapter] * len(ps), greedy(8), progress=False)
        return [s["merged"] for s in steps_of(engine)[before:]], outs

    modes, outs = run_all(AdapterMix({"qv": 0.5}))
    assert not any(modes)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(base, half).eval()
    assert [o.token_ids for o in outs] == [hf_greedy(ref, p, 8) for p in ps]
    assert not any(run_all(AdapterMix({"qv": 0.6, "all": 0.4}))[0])
    assert engine.stats()["merge"]["merges"] == 0
    modes, _ = run_all(AdapterMix({"qv": 1.0}))
    assert all(modes) and engine.stats()["merge"]["merges"] == 1
    assert_no_leaks(engine)


def test_preemption_in_merged_steps_keeps_merge_and_unload_tokens(tiny_llama_dir, adapter_dirs,
                                                                  peft):
    """A pool too small for every request: requests preempted and recomputed, all on one
    adapter, every step merged; the greedy tokens stay PEFT's merge_and_unload() ones."""
    engine = engine_with(tiny_llama_dir, 48, max_lora_rank=16, merge_policy="auto")
    engine.core.merging = MergePolicy("auto", merge_after_steps=0)
    engine.add_adapter("all", adapter_dirs["all"])
    ps = [random_prompt(20 + 3 * j, seed=140 + j) for j in range(8)]
    outs = engine.generate(ps, ["all"] * len(ps), greedy(24), progress=False)
    assert sum(o.num_preemptions for o in outs) > 0
    assert all(s["merged"] for s in steps_of(engine))
    for p, o in zip(ps, outs, strict=True):
        assert o.token_ids == peft.greedy(peft.merged, "all", p, 24)
    assert_no_leaks(engine)


# -- switching leaves the base weights as loaded --------------------------------------------------


def test_many_switches_leave_the_base_weights_bit_identical(tiny_llama_dir, adapter_dirs):
    """Bursts of one adapter after another, each interrupted by a base request and by a
    request of another adapter; a prompt's prefix blocks, computed in an unmerged step, are
    served from the prefix cache to a merged one."""
    engine = make_engine(tiny_llama_dir, adapter_dirs, merge_after_steps=1)
    model = engine.model
    loaded = [{k: v.clone() for k, v in w.items() if v is not None} for w in model.layers]
    shared = [random_prompt(20, seed=90)]  # a prefix-cached prompt (block size 16)
    arrivals: dict[int, list] = {}
    names = ["qv", "all", "gate1", "all", "qv", "gate1", "qv", "all"]
    for i, name in enumerate(names):
        at = 12 * i
        other = names[(i + 1) % len(names)]
        arrivals[at] = [(shared[0], name, 10), (random_prompt(6 + i, seed=i), name, 10)]
        arrivals[at + 2] = [(shared[0], name, 2)]  # a merged step: its prefix is cached
        arrivals[at + 4] = [(random_prompt(5, seed=50 + i), None, 2)]
        arrivals[at + 8] = [(random_prompt(4, seed=70 + i), other, 1)]
    outs = run(engine, arrivals)
    assert all(o.finish_reason == "length" for o in outs)
    merge = engine.stats()["merge"]
    assert merge["switches"] >= 30 and merge["merges"] >= len(names) and merge["reuses"] >= 8
    assert engine.stats()["prefix_cache"]["hit_tokens"] > 0
    for n, w in enumerate(model.layers):
        for k, v in loaded[n].items():
            assert torch.equal(w[k], v), f"layer {n} {k} changed"
    assert_no_leaks(engine)


# -- requests that span switches against PEFT's unmerged tokens -----------------------------------


def test_requests_spanning_switches_equal_peft_unmerged_tokens(tiny_llama_dir, adapter_dirs,
                                                                peft, capsys):
    """A hot adapter's requests run merged (after the default credit), unmerged while a base
    request or another adapter's request runs with them, merged again after. Their greedy
    tokens equal PEFT's unmerged ones, except where PEFT's own argmax margin is below the
    fp32 difference of the two computations (counted and printed)."""
    engine = make_engine(tiny_llama_dir, adapter_dirs)
    n, num_hot = 40, 4
    arrivals = {0: [(random_prompt(4 + 5 * j, seed=110 + j), "all", n) for j in range(num_hot)],
                MERGE_AFTER_STEPS + 4: [(random_prompt(8, seed=120), None, 3)],
                MERGE_AFTER_STEPS + 12: [(random_prompt(6, seed=121), "qv", 5)],
                MERGE_AFTER_STEPS + 24: [(random_prompt(3, seed=122), None, 1)]}
    requests = [r for at in sorted(arrivals) for r in arrivals[at]]
    outs = run(engine, arrivals)
    adapter_of = {o.request_id: o.adapter for o in outs}
    steps = steps_of(engine)
    for s in steps:  # merged exactly when the step holds one adapter and no base request
        names = {adapter_of[rid] for rid, *_ in s["scheduled"]}
        if s["merged"]:
            assert len(names) == 1 and None not in names, s
        elif len(names) != 1 or None in names:
            assert not s["merged"]
    hot = {o.request_id for o in outs[:num_hot]}
    modes = [s["merged"] for s in steps if hot & {rid for rid, *_ in s["scheduled"]}]
    switches = sum(a != b for a, b in zip(modes, modes[1:], strict=False))
    # unmerged for the credit, then in, out, in, out, in, out, in
    assert modes[:MERGE_AFTER_STEPS + 1] == [False] * MERGE_AFTER_STEPS + [True]
    assert switches == 7, modes
    assert engine.stats()["merge"]["reuses"] == 3
    differ, tokens = 0, sum(k for *_, k in requests)
    for o, (prompt, name, k) in zip(outs, requests, strict=True):
        ref = peft.greedy(peft.unmerged, name, prompt, k)
        if o.token_ids != ref:
            differ += 1
            first = next(i for i, (a, b) in enumerate(zip(o.token_ids, ref, strict=True)) if a != b)
            margin = peft.margin(name, prompt + ref[:first])
            assert margin < MARGIN, (f"request {o.request_id} ({name!r}) differs from PEFT at "
                                     f"token {first} where the margin is {margin:.3g}")
    with capsys.disabled():
        print(f"\nmerged/unmerged switches spanned: {switches}; requests differing from PEFT's "
              f"unmerged tokens: {differ} of {len(outs)} ({tokens} tokens)")
    assert_no_leaks(engine)


def test_bf16_merged_copies_are_packed_again_after_every_merge(tiny_llama_dir, adapter_dirs):
    """bfloat16 on a CPU with oneDNN's bfloat16 kernels: merged copies run through prepacked
    weights like the base's. A copy reused for the next adapter gets new values, so it must be
    packed again: bursts of alternating adapters give every request the log-probabilities of
    the same engine with packing off, bit for bit (packing is F.linear's kernel on the same
    numbers), and releasing the copies drops their packed ones."""
    if not PackedLinear(torch.bfloat16, torch.device("cpu")).enabled:
        pytest.skip("no oneDNN bfloat16 kernels on this CPU: nothing is packed")
    arrivals = {8 * i: [(random_prompt(5 + i, seed=130 + i), name)]
                for i, name in enumerate(["all", "qv", "all", "gate1", "qv"])}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2)
    results = []
    for packed in (True, False):
        e = Engine(tiny_llama_dir, pool_gb=0.05, max_lora_rank=16, merge_policy="auto",
                   dtype="bfloat16")
        e.core.merging = MergePolicy("auto", 1)
        e.model.linear.enabled = packed  # off: later packs are no-ops...
        for weight in [w for layer in e.model.layers for w in layer.values()] + [e.model.lm_head]:
            if not packed and weight is not None:
                e.model.linear.forget(weight)  # ...and the base's are dropped
        for name in ("all", "qv", "gate1"):
            e.add_adapter(name, adapter_dirs[name])
        ids, done, step, merged = [], {}, 0, e.core.runner.merged
        holders: dict[int, set] = {}  # a qkv copy buffer -> the adapters merged into it
        while step <= max(arrivals) or e.has_unfinished():
            for prompt, name in arrivals.get(step, []):
                ids.append(e.add_request(prompt, name, params))
            for d in e.step():
                if d.finished:
                    done[d.request_id] = d.output
            if e.stats()["last_step"]["merged"]:
                assert all((c in e.model.linear) == packed for c in merged._copies.values())
                qkv = merged._copies.get((0, "qkv"))
                if qkv is not None:
                    holders.setdefault(id(qkv), set()).add(merged.stats.key)
            step += 1
        assert e.stats()["merge"]["merges"] >= 4
        assert max(map(len, holders.values())) >= 2  # a buffer reused for another adapter
        results.append([[(x.token_id, x.logprob, x.top) for x in done[i].logprobs] for i in ids])
        copies = list(merged._copies.values())
        merged.release()
        assert not any(c in e.model.linear for c in copies)
        e.close()
    assert results[0] == results[1]


def test_a_merge_that_raises_leaves_no_packed_copy_alive(tiny_llama_dir, adapter_dirs,
                                                         monkeypatch):
    """bfloat16: a merge that raises midway (out of memory) drops the old copies it had not
    reused yet and the one it was writing; their packed copies must go with them (found in
    review: PackedLinear kept them alive for the engine's life). After the next merge and a
    release, none of the first adapter's copies is still packed."""
    if not PackedLinear(torch.bfloat16, torch.device("cpu")).enabled:
        pytest.skip("no oneDNN bfloat16 kernels on this CPU: nothing is packed")

    engine = Engine(tiny_llama_dir, pool_gb=0.05, max_lora_rank=16, dtype="bfloat16")
    with engine:
        for name in ("qv", "all"):
            path = adapter_dirs[name]
            engine.add_adapter(name, path)
            engine.generate([[5, 6, 7]], [name], greedy(1), progress=False)  # resident
        merged, store = engine.core.runner.merged, engine.adapters
        qv = store.key_of("qv")
        merged.layers_for(qv, store.resident(qv))
        first = list(merged._copies.values())
        assert first and all(c in engine.model.linear for c in first)
        fail_fold_at(monkeypatch, 2)
        key = store.key_of("all")
        with pytest.raises(RuntimeError, match="out of memory"):
            merged.layers_for(key, store.resident(key))
        monkeypatch.undo()
        merged.layers_for(qv, store.resident(qv))  # merges again, into new buffers
        merged.release()
        alive = [i for i, c in enumerate(first) if c in engine.model.linear]
        assert not alive, f"copies {alive} of {len(first)} still packed (never freed)"
