"""Log-probabilities against HF transformers + PEFT, teacher-forced on the same token sequence.

Each request's whole sequence (prompt and what the engine generated) is scored by the
reference in one forward pass; every generated token's and every prompt token's entry (its
log-probability, its rank, the k most likely tokens) must match within 1e-4 in fp32: for the
base model and adapters on all projections, on lm_head alone, on embed_tokens alone and on
both, in one mixed batch, with a prompt longer than ``max_num_batched_tokens`` (chunked),
after a prefix-cache hit, after a preemption, and in bf16 (as close to fp32 as PEFT's own
bf16 is).
"""

from __future__ import annotations

import pytest
import torch
from support import (
    LOGPROBS_ATOL,
    PeftReference,
    assert_kv_released,
    check_output,
    random_prompt,
    save_random_adapter,
    scored,
)

from pagedlora import Engine, SamplingParams
from pagedlora.lora_adapter import TARGET_MODULES

ATOL = LOGPROBS_ATOL
ALL = list(TARGET_MODULES)  # the seven decoder projections
ADAPTERS = {
    "all": dict(r=4, target_modules=ALL, seed=301),
    "head": dict(r=8, target_modules=["lm_head"], seed=302),
    "embed": dict(r=6, target_modules=["embed_tokens"], seed=303),
    "both": dict(r=4, target_modules=["embed_tokens", "lm_head", "q_proj", "down_proj"],
                 seed=304),
}
NAMES = [None, *ADAPTERS]
K = 3  # top tokens asked for, generated and prompt positions


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    return {n: save_random_adapter(tiny_llama_dir, root / n, **dict(o))
            for n, o in ADAPTERS.items()}


@pytest.fixture(scope="module")
def ref(tiny_llama_dir, dirs):
    return PeftReference(tiny_llama_dir, dirs)


def engine_for(model_dir, dirs, **options) -> Engine:
    options = {"pool_gb": 0.05, "max_loras": 8, "max_lora_rank": 16, "block_size": 8,
               **options}
    engine = Engine(model_dir, **options)
    for name, d in dirs.items():
        engine.add_adapter(name, d)
    return engine


ASK = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=K,
                     prompt_logprobs=K)


# -- the reference is not blind ------------------------------------------------------------------


def test_each_adapter_changes_the_logprobs(ref):
    ids = random_prompt(14, seed=1)
    base = ref.logprobs(None, ids)
    for name in ADAPTERS:
        delta = (ref.logprobs(name, ids) - base).abs().max().item()
        assert delta > 100 * ATOL, f"adapter {name!r} barely changes the logprobs ({delta})"


# -- one mixed batch -----------------------------------------------------------------------------


def test_mixed_batch_of_base_and_vocab_adapters_matches_peft(tiny_llama_dir, dirs, ref):
    """Base, all projections, lm_head alone, embed_tokens alone and both in the same steps;
    one request samples (temperature 0.8, top-k 5): its entries are still the raw
    distribution's."""
    engine = engine_for(tiny_llama_dir, dirs)
    prompts = [random_prompt(5 + 4 * i, seed=10 + i) for i in range(len(NAMES))]
    sampled = SamplingParams(max_tokens=5, temperature=0.8, top_k=5, seed=3, ignore_eos=True,
                             logprobs=K, prompt_logprobs=K)
    params = [ASK] * len(NAMES) + [sampled]
    outs = engine.generate(prompts + [prompts[0]], adapters=NAMES + ["both"],
                           sampling_params=params, progress=False)
    worst = max(check_output(o, scored(ref, o)) for o in outs)
    assert worst <= ATOL
    steps = engine.stats(history=True)["steps"]
    assert max(s["num_adapters"] for s in steps) == len(ADAPTERS)  # all in one step
    assert any(lp.rank > 1 for lp in outs[-1].logprobs)  # it really sampled
    assert_kv_released(engine)


def test_an_lm_head_adapter_changes_its_own_logprobs_and_no_others(tiny_llama_dir, dirs, ref):
    """The same prompt for the base model and the lm_head adapter, in one step: the base's
    entries are the base model's, the adapter's PEFT's, and the two differ."""
    engine = engine_for(tiny_llama_dir, {"head": dirs["head"]})
    prompt = random_prompt(11, seed=20)
    base, head = engine.generate([prompt, prompt], adapters=[None, "head"],
                                 sampling_params=ASK, progress=False)
    assert engine.stats()["last_step"]["batch_size"] == 2
    check_output(base, scored(ref, base))
    check_output(head, scored(ref, head))
    assert max(abs(a.logprob - b.logprob) for a, b in
               zip(base.prompt_logprobs[1:], head.prompt_logprobs[1:], strict=True)) > 100 * ATOL


# -- chunked prefill, the prefix cache, preemption -----------------------------------------------


def test_a_prompt_longer_than_the_token_budget_is_chunked(tiny_llama_dir, dirs, ref):
    engine = engine_for(tiny_llama_dir, dirs, max_num_batched_tokens=16)
    prompts = [random_prompt(45, seed=30), random_prompt(7, seed=31)]
    outs = engine.generate(prompts, adapters=["both", "head"], sampling_params=ASK,
                           progress=False)
    for o in outs:
        check_output(o, scored(ref, o))
    rid = outs[0].request_id
    chunks = [n for s in engine.stats(history=True)["steps"]
              for r, computed, n in s["scheduled"] if r == rid and computed < 45]
    assert len(chunks) >= 3 and sum(chunks) == 45, chunks


def test_a_prefix_cache_hit_does_not_skip_prompt_positions(tiny_llama_dir, dirs, ref):
    """A request without prompt logprobs fills the cache; the same prompt asking them gets
    every position (computed, not served from the cache), while one not asking is served."""
    engine = engine_for(tiny_llama_dir, dirs)
    prompt = random_prompt(33, seed=40)  # 4 full blocks of 8
    plain = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=K)
    first, = engine.generate([prompt], adapters=["both"], sampling_params=plain,
                             progress=False)
    asking, cached = engine.generate([prompt, prompt], adapters=["both", "both"],
                                     sampling_params=[ASK, plain], progress=False)
    assert first.num_cached_tokens == 0 and cached.num_cached_tokens == 32
    assert asking.num_cached_tokens == 0
    check_output(asking, scored(ref, asking))
    check_output(cached, scored(ref, cached), prompt_k=None)
    assert cached.prompt_logprobs is None
    assert_kv_released(engine)


def test_after_a_preemption_the_entries_are_still_peft_s(tiny_llama_dir, dirs, ref):
    """A pool of the adapter's pages and 24 KV blocks for 6 requests of ~60 tokens: some are
    preempted and recomputed; each output token and prompt token still has exactly one
    entry, PEFT's."""
    probe = engine_for(tiny_llama_dir, {"both": dirs["both"]})
    need = probe.adapters.footprint(probe.adapters.key_of("both"))
    page_bytes = probe.stats()["page_bytes"]
    engine = engine_for(tiny_llama_dir, {"both": dirs["both"]},
                        pool_gb=(need + 48.5) * page_bytes / 2**30)
    prompts = [random_prompt(30 + 3 * i, seed=50 + i) for i in range(6)]
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2,
                        prompt_logprobs=1)
    outs = engine.generate(prompts, adapters=["both", None] * 3, sampling_params=sp,
                           progress=False)
    assert sum(o.num_preemptions for o in outs) > 0
    for o in outs:
        check_output(o, scored(ref, o), k=2, prompt_k=1)
    assert_kv_released(engine)


# -- bf16 ----------------------------------------------------------------------------------------


def test_bf16_is_as_close_to_fp32_as_peft_bf16(tiny_llama_dir, dirs, ref):
    ref16 = PeftReference(tiny_llama_dir, {"both": dirs["both"]}, dtype=torch.bfloat16)
    engine = engine_for(tiny_llama_dir, {"both": dirs["both"]}, dtype="bfloat16")
    prompts = [random_prompt(13, seed=60), random_prompt(21, seed=61)]
    outs = engine.generate(prompts, adapters=["both", None], sampling_params=ASK,
                           progress=False)
    for o in outs:
        ids = o.prompt_token_ids + o.token_ids
        rows32, rows16 = ref.logprobs(o.adapter, ids), ref16.logprobs(o.adapter, ids)
        p = len(o.prompt_token_ids)
        targets = torch.tensor(ids[1:])
        peft_err = (rows16[:-1] - rows32[:-1]).gather(1, targets[:, None]).abs().max().item()
        ours = torch.tensor([e.logprob for e in o.prompt_logprobs[1:] + o.logprobs])
        ours_err = (ours - rows32[:-1].gather(1, targets[:, None])[:, 0]).abs().max().item()
        assert ours_err <= 2 * peft_err + 0.02, (o.adapter, ours_err, peft_err)
        assert len(o.logprobs) == 5 and len(o.prompt_logprobs) == p


# -- who pays ------------------------------------------------------------------------------------


def test_logits_are_computed_only_where_asked(tiny_llama_dir, dirs, monkeypatch):
    """Without logprobs a step computes one logits row per sampling request; a request
    asking prompt logprobs adds its prompt positions, and none of them reaches the others'
    outputs."""
    engine = engine_for(tiny_llama_dir, {"head": dirs["head"]})
    rows = []
    real = engine.model.forward

    def spy(batch, pool):
        rows.append(batch.sample_index.numel())
        return real(batch, pool)
    monkeypatch.setattr(engine.model, "forward", spy)
    plain = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    a, b = engine.generate([random_prompt(9, 70), random_prompt(12, 71)], adapters=[None, "head"],
                           sampling_params=plain, progress=False)
    assert rows == [2, 2] and a.logprobs is None and a.prompt_logprobs is None
    rows.clear()
    a, b = engine.generate([random_prompt(9, 70), random_prompt(12, 71)], adapters=[None, "head"],
                           sampling_params=[plain, ASK], progress=False)
    assert rows[0] == 2 + 11 and a.logprobs is None and len(b.logprobs) == 5


def test_logprobs_above_max_logprobs_fail_that_request_alone(tiny_llama_dir):
    engine = Engine(tiny_llama_dir, pool_gb=0.02, max_logprobs=4)
    ok, bad, bad_prompt = engine.generate(
        [[5, 6, 7]] * 3, sampling_params=[
            SamplingParams(max_tokens=2, logprobs=4), SamplingParams(max_tokens=2, logprobs=5),
            SamplingParams(max_tokens=2, prompt_logprobs=9)], progress=False)
    assert ok.finish_reason == "length" and len(ok.logprobs[0].top) == 4
    assert bad.finish_reason == "error" and "logprobs=5 exceeds max_logprobs=4" in bad.error
    assert bad_prompt.finish_reason == "error" and "prompt_logprobs=9" in bad_prompt.error
    with pytest.raises(ValueError, match="logprobs must be an int >= 0"):
        SamplingParams(logprobs=-1)
