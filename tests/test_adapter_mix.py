"""Per-request adapter scales and weighted mixes of adapters (``AdapterMix``), batched with plain
adapters, DoRA adapters and base requests, against PEFT's ``add_weighted_adapter(...,
combination_type="cat")`` on the same weights (its delta is exactly the weighted sum); the
scheduler's accounting of a mix's adapters; the prefix cache keyed by the mix; errors."""

from __future__ import annotations

import math

import pytest
from support import (
    OracleSampler,
    PeftOracle,
    assert_no_leaks,
    check_step,
    drive,
    make_request,
    make_scheduler,
    random_prompt,
    run_step,
    save_random_adapter,
    save_random_dora_adapter,
    write_random_lora,
)

from pagedlora import AdapterMix, AdapterMixError, Engine, SamplingParams
from pagedlora.errors import UnknownAdapterError
from pagedlora.lora_adapter import TARGET_MODULES
from pagedlora.scheduler import Request

ALL = list(TARGET_MODULES)  # the seven decoder projections
PEFT_ADAPTERS = {  # saved through PEFT (different targets, so a mix's modules differ)
    "lora4": dict(r=4, target_modules=ALL, seed=401),
    "lora16": dict(r=16, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], seed=402),
    "lora8": dict(r=8, target_modules=["o_proj", "gate_proj", "down_proj"], seed=403),
    "voc": dict(r=4, target_modules=["embed_tokens", "lm_head", "v_proj"], seed=404),
}
SMALL = {f"s{i}": dict(r=2 + i, target_modules=["q_proj", "v_proj", "down_proj"], seed=410 + i)
         for i in range(5)}  # more adapters, so a decode step takes the BGMV form
MIX_A = AdapterMix({"lora4": 0.7, "lora16": 0.3})
MIX_B = AdapterMix({"lora16": -0.5, "lora8": 1.5, "lora4": 0.25})  # three, one negative
HALF = AdapterMix({"lora4": 0.5})  # a scaled single adapter
MIX_V = AdapterMix({"voc": 0.6, "lora8": -0.75})  # on embed_tokens and lm_head too
MIX_S = AdapterMix({"s0": 0.6, "s3": 1.2, "lora8": 0.4})
PROMPTS = [random_prompt(n, seed=500 + n) for n in (4, 11, 18, 26)]
GREEDY16 = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mix")
    found = {name: save_random_adapter(tiny_llama_dir, root / name, **o)
             for name, o in PEFT_ADAPTERS.items()}
    found.update({name: write_random_lora(root / name, **o) for name, o in SMALL.items()})
    found["dora8"] = save_random_dora_adapter(tiny_llama_dir, root / "dora8", r=8, seed=420,
                                              target_modules=["q_proj", "o_proj", "up_proj"])
    return found


@pytest.fixture(scope="module")
def oracle(tiny_llama_dir, dirs):
    return PeftOracle(tiny_llama_dir, dirs)


def make_engine(model_dir, dirs: dict, **options) -> Engine:
    options = {"pool_gb": 0.05, "max_lora_rank": 16, "max_loras": len(dirs), **options}
    engine = Engine(model_dir, sampler=OracleSampler(), **options)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    return engine


def test_mixes_differ_from_their_parts(oracle):
    """Each mix's logits are far from the base's and from each of its adapters' (so the
    comparisons below can tell a wrong weight from a right one), and PEFT's "cat" mix is the
    weighted sum of the adapters' deltas (its rank is the sum of theirs)."""
    base = oracle.logits(None, PROMPTS[1])
    for mix in (MIX_A, MIX_B, HALF, MIX_S, MIX_V):
        ours = oracle.logits(mix, PROMPTS[1])
        for other in [None, *mix.names]:
            ref = base if other is None else oracle.logits(other, PROMPTS[1])
            assert (ours - ref).abs().max().item() > 100 * 1e-4, (mix, other)
    name = oracle.adapter_name(MIX_A)
    assert oracle.model.peft_config[name].r == 4 + 16


@pytest.mark.parametrize("plan", ["dense", "bgmv"])
def test_mixes_scales_adapters_dora_and_base_in_one_batch_match_peft(tiny_llama_dir, dirs,
                                                                     oracle, plan):
    """Mixes of two and three adapters (one weight negative), a scaled single adapter, plain
    adapters, a DoRA adapter and base requests in the same steps, later arrivals prefilled
    beside decodes: every logits row within 1e-4 of PEFT's. "dense": few adapters (the dense
    form for decode steps, the segment loop for a long prefill step); "bgmv": nine adapters in
    the decode steps (the BGMV form, with a mix's token once per adapter at its weight)."""
    if plan == "dense":
        served = {n: dirs[n] for n in [*PEFT_ADAPTERS, "dora8"]}
        first = [("base", PROMPTS[3], None), ("mixA", PROMPTS[3], MIX_A),
                 ("mixB", PROMPTS[2], MIX_B), ("half", PROMPTS[3], HALF),
                 ("lora16", PROMPTS[1], "lora16"), ("dora8", PROMPTS[2], "dora8"),
                 ("mixV", PROMPTS[1], MIX_V)]
        late = {2: [("mixA-late", PROMPTS[0], MIX_A), ("lora4", PROMPTS[1], "lora4")]}
    else:
        served = dict(dirs)
        first = [("base", PROMPTS[0], None), ("mixS", PROMPTS[1], MIX_S),
                 ("mixA", PROMPTS[0], MIX_A), ("half", PROMPTS[1], HALF),
                 ("dora8", PROMPTS[0], "dora8"),
                 *[(n, PROMPTS[i % 2], n) for i, n in enumerate(["s1", "s2", "s4", "lora8"])]]
        late = {2: [("mixB-late", PROMPTS[0], MIX_B), ("s0", PROMPTS[1], "s0")]}
    engine = make_engine(tiny_llama_dir, served, block_size=8)
    d = drive(engine, {0: first, **late}, oracle.logits, max_tokens=4)
    assert d.num_compared == 4 * (len(first) + sum(map(len, late.values())))
    assert {a for _, a, _, _ in d.steps[0]} == {a for *_, a in first}  # one step, all kinds
    assert d.mixed_steps(), d.steps
    if plan == "dense":
        assert sum(n for *_, n, _ in d.steps[0]) > 64  # the segment loop's prefill
    else:  # a decode step over every adapter of the engine
        assert max(len({k for _, a, *_ in s for k in adapter_names(a)}) for s in d.steps) >= 8


def adapter_names(adapter) -> list[str]:
    return [] if adapter is None else adapter.names if isinstance(adapter, AdapterMix) \
        else [adapter]


def test_greedy_tokens_of_mixes_equal_peft(tiny_llama_dir, dirs, oracle):
    """16 greedy tokens of each request of one generate call equal PEFT's; a scale of 0 gives
    the base model's tokens, a mix of one adapter at weight 1 that adapter's."""
    served = {n: dirs[n] for n in [*PEFT_ADAPTERS, "dora8"]}
    engine = make_engine(tiny_llama_dir, served)
    adapters = [MIX_A, None, MIX_B, "lora8", HALF, "dora8", AdapterMix({"lora16": 0.0}),
                AdapterMix({"lora16": 1}), AdapterMix({"dora8": 1.0})]
    prompts = [PROMPTS[i % 4] for i in range(len(adapters))]
    outs = engine.generate(prompts, adapters=adapters, sampling_params=GREEDY16, progress=False)
    want = {0: None, 1: "lora16", 2: "dora8"}  # what the last three are the same as
    for i, (adapter, prompt, out) in enumerate(zip(adapters, prompts, outs, strict=True)):
        assert out.adapter == adapter and out.finish_reason == "length"
        reference = want[i - 6] if i >= 6 else adapter
        assert out.token_ids == oracle.greedy(reference, prompt), f"request {i}, {adapter!r}"
    assert outs[6].token_ids != oracle.greedy("lora16", prompts[6])
    assert_no_leaks(engine)


def test_prefix_cache_never_shares_kv_across_mixes_or_scales(tiny_llama_dir, dirs):
    """The same 40-token prompt under two mixes, two scales of one adapter, and the adapter
    itself: none reuses another's KV blocks; the same mix again (its weights given in another
    order) reuses its own, and so does a mix of one adapter at weight 1 that adapter's."""
    served = {n: dirs[n] for n in PEFT_ADAPTERS}
    engine = Engine(tiny_llama_dir, pool_gb=0.05, max_lora_rank=16, block_size=8)
    for name, path in served.items():
        engine.add_adapter(name, path)
    prompt = random_prompt(40, seed=600)
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    hit = 32  # whole blocks, one token short of the prompt's 40

    def cached(adapter) -> int:
        return engine.generate([prompt], adapters=adapter, sampling_params=sp,
                               progress=False)[0].num_cached_tokens

    for adapter in (MIX_A, AdapterMix({"lora4": 0.3, "lora16": 0.7}), HALF,
                    AdapterMix({"lora4": 0.25}), "lora4", None):
        assert cached(adapter) == 0, adapter
    assert cached(AdapterMix({"lora16": 0.3, "lora4": 0.7})) == hit  # MIX_A again
    assert cached(AdapterMix({"lora4": 1.0})) == hit  # "lora4"'s blocks
    assert cached(HALF) == hit
    assert_no_leaks(engine)


def test_a_mix_pins_each_adapter_and_counts_it_once(tiny_llama_dir, dirs):
    """While a mix runs, each of its adapters is pinned once per request that uses it, the
    step counts its distinct adapters (a plain request for one of them adds none), and
    everything is unpinned and freed afterwards."""
    served = {n: dirs[n] for n in PEFT_ADAPTERS}
    engine = Engine(tiny_llama_dir, pool_gb=0.05, max_lora_rank=16, max_loras=3)
    for name, path in served.items():
        engine.add_adapter(name, path)
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for prompt, adapter in [(PROMPTS[0], MIX_B), (PROMPTS[1], "lora4"), (PROMPTS[2], MIX_A)]:
        engine.add_request(prompt, adapter, sp)
    engine.step()
    key = engine.adapters.key_of
    assert engine.adapters.pins == {key("lora4"): 3, key("lora16"): 2, key("lora8"): 1}
    assert engine.stats()["last_step"]["num_adapters"] == 3
    check_step(engine, max_cpu_loras=10**6, max_loras=3)
    while engine.has_unfinished():
        engine.step()
    assert engine.adapters.pins == {}
    stats = engine.stats()["adapters"]
    assert stats["lora16"]["requests"] == 2 and stats["lora8"]["requests"] == 1
    assert_no_leaks(engine)


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights, error, match", [
    ({}, AdapterMixError, "names no adapter"),
    ({"a": math.nan}, AdapterMixError, "weight of adapter 'a' is nan, not a finite number"),
    ({"a": 1.0, "b": -math.inf}, AdapterMixError, "'b' is -inf, not a finite"),
    ({f"a{i}": 1.0 for i in range(9)}, AdapterMixError, "9 adapters in one mix; at most 8"),
    ({"": 1.0}, AdapterMixError, "an adapter name is empty"),
    ({"a": "0.5"}, TypeError, "weight of adapter 'a' is '0.5', not a real number"),
    ({"a": True}, TypeError, "weight of adapter 'a' is True"),
    ({3: 1.0}, TypeError, "adapter name 3 is not a string"),
])
def test_invalid_mixes_name_the_offending_adapter_or_weight(weights, error, match):
    with pytest.raises(error, match=match):
        AdapterMix(weights)


def test_a_mix_is_a_value():
    assert AdapterMix({"a": 1, "b": 0.5}) == AdapterMix({"a": 1.0, "b": 0.5})
    assert repr(AdapterMix({"a": 1, "b": 0.5})) == "AdapterMix({'a': 1.0, 'b': 0.5})"
    assert len({AdapterMix({"a": 0.5}), AdapterMix({"a": 0.5}), AdapterMix({"a": 0.25})}) == 2
    with pytest.raises(TypeError, match="takes a mapping"):
        AdapterMix([("a", 1.0)])


def test_engine_refuses_unknown_dora_and_oversized_mixes(tiny_llama_dir, dirs):
    """An unknown adapter in a mix, or a DoRA adapter scaled or mixed, raise before any work,
    naming the mix and the adapter; a mix of more adapters than max_loras fails alone; the
    other requests run and nothing leaks."""
    served = {n: dirs[n] for n in [*PEFT_ADAPTERS, "dora8"]}
    engine = Engine(tiny_llama_dir, pool_gb=0.05, max_lora_rank=16, max_loras=2)
    for name, path in served.items():
        engine.add_adapter(name, path)
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    with pytest.raises(UnknownAdapterError,
                       match=r"AdapterMix\(\{'lora4': 0.5, 'nope': 0.5\}\): unknown adapter "
                             r"'nope'"):
        engine.generate(["a", "b"], adapters=[None, AdapterMix({"lora4": 0.5, "nope": 0.5})],
                        sampling_params=sp, progress=False)
    for mix in (AdapterMix({"dora8": 0.5}), AdapterMix({"dora8": 1.0, "lora4": 0.5})):
        with pytest.raises(AdapterMixError, match="'dora8' is a DoRA adapter, which can only "
                                                  "be used alone at weight 1"):
            engine.add_request("a", mix, sp)
    outs = engine.generate(["a", "b"], adapters=[MIX_B, "lora4"], sampling_params=sp,
                           progress=False)
    assert outs[0].finish_reason == "error"
    assert "uses 3 adapters, more than max_loras=2 allows in one step" in outs[0].error
    assert outs[1].finish_reason == "length"
    assert_no_leaks(engine)


# -- the scheduler alone (pure Python) -------------------------------------------------------------


def mix_request(rid: int, n_prompt: int, mix: dict, max_tokens: int = 100) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(range(n_prompt)),
                   max_tokens=max_tokens, adapter_key=None,
                   adapter_mix=tuple(sorted(mix.items())), arrival_time=float(rid))


def test_scheduler_counts_a_mix_s_adapters_once_and_pins_each():
    """max_loras=3: a mix of x and y, then a plain x (no new adapter), then a mix of y and z
    (one new: fits), then a plain w (a fourth: passed over) and a base request (admitted)."""
    sched, alloc, fake = make_scheduler(num_pages=60, max_loras=3,
                                        sizes={"x": 2, "y": 3, "z": 1, "w": 1})
    for r in [mix_request(0, 4, {"x": 0.5, "y": 0.5}), make_request(1, 4, "x"),
              mix_request(2, 4, {"y": 1.5, "z": -1.0}), make_request(3, 4, "w"),
              make_request(4, 4)]:
        sched.add(r)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == [0, 1, 2, 4]
    assert out.adapter_keys == {"x", "y", "z"}
    assert fake.pins == {"x": 2, "y": 2, "z": 1}
    assert fake.holds == {"x": 2, "y": 2, "z": 1, "w": 1}
    assert alloc.num_used("adapter") == 6
    run_step(sched, out)
    for rid in (0, 1, 2, 4):
        sched.finish(sched._unfinished[rid], "abort")
    assert {k: n for k, n in fake.pins.items() if n} == {}
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == [3]


def test_scheduler_pins_all_of_a_mix_or_none():
    """A mix whose adapters do not all fit next to a running request waits, pinning none of
    them (x alone would fit); once that request finishes, it runs with both pinned. One that
    could never fit the pool fails at once, naming its adapters' pages."""
    sched, alloc, fake = make_scheduler(num_pages=34, max_loras=4,
                                        sizes={"x": 2, "y": 20, "z": 10, "w": 30})
    sched.add(make_request(0, 4, "z"))
    assert [s.request.request_id for s in sched.schedule().scheduled] == [0]
    sched.add(mix_request(1, 4, {"x": 0.5, "y": 0.5}))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == [0]
    assert {k: n for k, n in fake.pins.items() if n} == {"z": 1}
    assert "x" not in fake.resident and "y" not in fake.resident
    run_step(sched, out)
    sched.finish(sched._unfinished[0], "abort")
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == [1]
    assert {k: n for k, n in fake.pins.items() if n} == {"x": 1, "y": 1}
    sched.add(mix_request(2, 4, {"x": 0.5, "y": 0.5, "w": 1.0}))
    out = sched.schedule()
    assert [r.request_id for r in out.failed] == [2]
    assert "its adapters need 56 pages, more than the pool of 34 pages" in out.failed[0].error
    assert fake.holds.get("w", 0) == 0


def test_lora_key_names_the_mix_s_content_and_weights():
    a = mix_request(0, 4, {"x": 0.5, "y": 0.5})
    b = mix_request(1, 4, {"x": 0.5, "y": 0.25})
    assert a.adapter_keys == ("x", "y") and a.lora_key != b.lora_key
    assert make_request(2, 4, "x").lora_key == "x" and make_request(3, 4).lora_key is None
    with pytest.raises(ValueError, match="not distinct and sorted"):
        Request(request_id=5, prompt_token_ids=[1], max_tokens=1, adapter_key=None,
                adapter_mix=(("y", 1.0), ("x", 1.0)), arrival_time=0.0)
    with pytest.raises(ValueError, match="adapter_key and adapter_mix both given"):
        Request(request_id=6, prompt_token_ids=[1], max_tokens=1, adapter_key="x",
                adapter_mix=(("x", 0.5),), arrival_time=0.0)
