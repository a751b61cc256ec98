"""Everything at once on the tiny Llama: adapter tiers, prefix caching, preemption, policies,
arrivals across steps and aborts. Invariants are checked at every step; the tokens must equal
those of a roomy engine that does none of this."""

from __future__ import annotations

import random

import pytest
from support import assert_no_leaks, check_step, engine_with, random_prompt, write_random_lora

from pagedlora import Engine, SamplingParams
from pagedlora.lora_adapter import TARGET_MODULES

SP = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("policy", ["fcfs", "cluster", "fair"])
def test_churn_matches_a_roomy_engine(tiny_llama_dir, tmp_path, policy):
    rng = random.Random(7)
    adapters = {}
    for i in range(12):
        targets = sorted(rng.sample(TARGET_MODULES, rng.randint(1, 7)), key=TARGET_MODULES.index)
        adapters[f"a{i}"] = write_random_lora(tmp_path / f"a{i}", r=rng.choice([1, 3, 8, 16]),
                                              target_modules=targets, seed=i)
    families = [random_prompt(24, seed=100 + f) for f in range(3)]  # shared prefixes
    plan = []  # (arrival step, adapter, prompt)
    for i in range(40):
        prompt = rng.choice(families)[:rng.randint(4, 24)] + random_prompt(rng.randint(1, 20),
                                                                           seed=200 + i)
        plan.append((rng.randrange(12), rng.choice([None, *adapters]), prompt))
    aborts = set(rng.sample(range(40), 5))

    max_cpu_loras, max_loras = 3, 2
    engine = engine_with(tiny_llama_dir, 40, max_cpu_loras=max_cpu_loras, max_loras=max_loras,
                         max_num_seqs=10, max_num_batched_tokens=64, policy=policy,
                         spill_dir=tmp_path / "spill")
    roomy = Engine(tiny_llama_dir, pool_gb=0.05, enable_prefix_caching=False)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
        roomy.add_adapter(name, path)

    requests, outputs, num_tokens, step = {}, {}, {}, 0
    while step < 12 or engine.has_unfinished():
        for i, (at, name, prompt) in enumerate(plan):
            if at == step:
                requests[i] = engine.add_request(prompt, name, SP)
        for i in aborts:
            r = requests.get(i)
            if r is not None and num_tokens.get(r) == 5:
                engine.abort(r)
        for d in engine.step():
            num_tokens[d.request_id] = num_tokens.get(d.request_id, 0) + len(d.new_token_ids)
            if d.finished:
                outputs[d.request_id] = d.output
        check_step(engine, max_cpu_loras, max_loras)
        step += 1
        assert step < 2000, "no progress"

    want = roomy.generate([p for _, _, p in plan], adapters=[n for _, n, _ in plan],
                          sampling_params=SP, progress=False)
    stats = engine.stats()
    assert sum(o.num_preemptions for o in outputs.values()) > 0  # the pool was tight
    assert stats["prefix_cache"]["hit_tokens"] > 0
    assert sum(s["loads_from_disk"] for s in stats["adapters"].values()) > 0  # spill files used
    for i, r in requests.items():
        out = outputs[r]
        if i in aborts:
            assert out.finish_reason == "abort"
            assert out.token_ids == want[i].token_ids[:len(out.token_ids)]
        else:
            assert out.finish_reason == "length", out.error
            assert out.token_ids == want[i].token_ids, f"request {i} ({plan[i][1]})"
    assert_no_leaks(engine)
