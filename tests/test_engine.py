"""Engine behaviour on the tiny random Llama: prompts, sampling, stopping, batching, accounting."""

from __future__ import annotations

import pytest
from support import assert_kv_released, prompts, step_until_done, tokens
from transformers import AutoTokenizer

from pagedlora import Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return Engine(tiny_llama_dir, pool_gb=0.02, max_model_len=128, block_size=8)


def test_text_and_chat_prompts_use_the_tokenizer(engine, tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=False)
    outs = engine.generate(["Name a color.", messages], sampling_params=GREEDY, progress=False)
    assert outs[0].prompt_token_ids == tok("Name a color.").input_ids
    assert outs[1].prompt_token_ids == list(chat_ids)
    by_ids = engine.generate([outs[0].prompt_token_ids, list(chat_ids)], sampling_params=GREEDY,
                             progress=False)
    assert tokens(by_ids) == tokens(outs)
    assert outs[0].text == tok.decode(outs[0].token_ids, skip_special_tokens=True)


def test_results_in_prompt_order_and_batch_independent(engine):
    ps = prompts(9, seed=1)
    together = engine.generate(ps, sampling_params=GREEDY, progress=False)
    alone = [engine.generate([p], sampling_params=GREEDY, progress=False)[0] for p in ps[:3]]
    assert tokens(together[:3]) == tokens(alone)
    assert [o.prompt_token_ids for o in together] == ps
    assert len({o.request_id for o in together}) == 9


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(engine):
    p = prompts(1, seed=2)[0]
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=123,
                        ignore_eos=True)
    a = engine.generate([p], sampling_params=sp, progress=False)[0].token_ids
    b = engine.generate(prompts(5, seed=3) + [p], sampling_params=[GREEDY] * 5 + [sp],
                        progress=False)[-1].token_ids
    assert a == b
    c = engine.generate([p], sampling_params=SamplingParams(
        max_tokens=10, temperature=1.0, seed=124, ignore_eos=True), progress=False)[0]
    assert c.token_ids != a  # another seed, another draw (a 10-token collision is negligible)


def test_top_k_one_is_greedy(engine):
    ps = prompts(3, seed=4)
    sp = SamplingParams(max_tokens=8, temperature=0.7, top_k=1, ignore_eos=True)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert tokens(engine.generate(ps, sampling_params=sp, progress=False)) == \
        tokens(engine.generate(ps, sampling_params=greedy, progress=False))


def test_stop_token_ids_and_eos(engine):
    p = prompts(1, seed=5)[0]
    free = engine.generate([p], sampling_params=GREEDY, progress=False)[0].token_ids
    stop_at = free[4]
    first = free.index(stop_at)
    out = engine.generate([p], sampling_params=SamplingParams(
        max_tokens=12, temperature=0, stop_token_ids=[stop_at]), progress=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == free[:first + 1]
    eos_ids = engine.processor.eos_token_ids
    engine.processor.eos_token_ids = eos_ids | {stop_at}  # the model's EOS ends a request
    try:                                                   # unless ignore_eos
        eos = engine.generate([p], sampling_params=SamplingParams(max_tokens=12, temperature=0),
                              progress=False)[0]
        ignored = engine.generate([p], sampling_params=GREEDY, progress=False)[0]
    finally:
        engine.processor.eos_token_ids = eos_ids
    assert eos.finish_reason == "stop" and eos.token_ids == free[:first + 1]
    assert ignored.token_ids == free and ignored.finish_reason == "length"


def test_stop_strings_cut_the_text(engine):
    p = prompts(1, seed=6)[0]
    free = engine.generate([p], sampling_params=GREEDY, progress=False)[0]
    stop = free.text[len(free.text) // 2:][:3]
    assert stop.strip(), "the random model produced no text to stop on"
    out = engine.generate([p], sampling_params=SamplingParams(
        max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]), progress=False)[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:free.text.index(stop)]
    assert free.token_ids[:len(out.token_ids)] == out.token_ids


def test_max_model_len_ends_with_length(engine):
    p = prompts(1, seed=7, lo=120, hi=120)[0]
    out = engine.generate([p], sampling_params=GREEDY, progress=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 128 - 120


def test_timings_are_consistent(engine):
    outs = engine.generate(prompts(4, seed=8), sampling_params=GREEDY, progress=False)
    for o in outs:
        assert 0 <= o.queue_time <= o.ttft and o.tpot > 0 and o.num_preemptions == 0


def test_continuous_batching_across_steps_matches_alone(engine):
    ps = prompts(6, seed=9)
    alone = tokens(engine.generate(ps, sampling_params=GREEDY, progress=False))
    reqs, done = [], {}
    for i, p in enumerate(ps):  # a new request joins every other step
        reqs.append(engine.add_request(p, None, GREEDY))
        for _ in range(1 + i % 2):
            done.update((d.request_id, d.output) for d in engine.step() if d.finished)
    step_until_done(engine, done)
    assert [done[r].token_ids for r in reqs] == alone
    s = engine.stats()
    assert s["pages_kv"] == s["pages_kv_cached"] and engine.outputs.num_live == 0


def test_stats_account_every_page(engine):
    engine.generate(prompts(3, seed=11), sampling_params=GREEDY, progress=False)
    s = engine.stats()
    assert s["pages_kv"] == s["pages_kv_cached"]
    assert s["requests_running"] == s["requests_waiting"] == 0
    assert s["pages_free"] + s["pages_adapter"] + s["pages_kv_cached"] == s["pages_total"]
    assert s["page_bytes"] == 2 * 8 * 2 * 16 * 4  # 2 x block 8 x 2 kv heads x head_dim 16 x fp32


def test_peak_stats_of_the_last_generate(engine):
    engine.generate(prompts(4, seed=12, lo=20, hi=30), sampling_params=GREEDY, progress=False)
    peak = engine.stats()["peak"]
    # 4 requests of 20..30 prompt + 12 output tokens, blocks of 8, 2 layers: 4..6 blocks each
    held = peak["pages_kv"] - peak["pages_kv_cached"]
    assert 2 * 4 * 4 <= held <= 2 * 4 * 6 and peak["requests_running"] == 4
    assert_kv_released(engine)


def test_add_request_then_step_matches_generate(engine, make_adapter, tiny_llama_dir):
    engine.add_adapter("req-a", make_adapter(tiny_llama_dir, "req-a", r=4,
                                             target_modules=["q_proj", "v_proj"], seed=5))
    ps = prompts(4, seed=9)
    names = ["req-a", None, "req-a", None]
    want = engine.generate(ps, names, GREEDY, progress=False)
    ids = [engine.add_request(p, n, GREEDY) for p, n in zip(ps, names, strict=True)]
    bad = engine.add_request([], None, GREEDY)  # an empty prompt fails alone, at the next step
    got, finished = {i: [] for i in ids}, {}
    for _ in range(100):
        for d in engine.step():
            if d.request_id in got:
                got[d.request_id] += d.new_token_ids
            if d.finished:
                finished[d.request_id] = d.output
        if len(finished) == 5:
            break
    assert [got[i] for i in ids] == tokens(want)
    assert [finished[i].token_ids for i in ids] == tokens(want)
    assert finished[bad].finish_reason == "error" and "empty" in finished[bad].error
    with pytest.raises(ValueError, match="nope"):
        engine.add_request(ps[0], "nope")
    assert_kv_released(engine)
    engine.remove_adapter("req-a")


def test_add_request_on_output_gets_every_output_and_failures_at_once(engine):
    ps = prompts(3, seed=13)
    want = tokens(engine.generate(ps, sampling_params=GREEDY, progress=False))
    got: dict[int, list] = {}

    def add(p):
        return engine.add_request(p, None, GREEDY,
                                  on_output=lambda d: got.setdefault(d.request_id, []).append(d))

    ids = [add(ps[0]), add([]), add(ps[1]), add(ps[2])]
    # add_request returns the id before any output: the empty prompt's failure comes with
    # the next step, first, once
    assert got == {}
    assert engine.abort(ids[2])
    stepped = engine.step()
    assert [(d.finished, d.output.finish_reason) for d in got[ids[1]]] == [(True, "error")]
    assert stepped[0].request_id == ids[1]
    while engine.has_unfinished():
        stepped += engine.step()
    assert [d.request_id for d in stepped].count(ids[1]) == 1  # handed out once, not again
    assert [sum((d.new_token_ids for d in got[ids[i]]), []) for i in (0, 3)] == \
        [want[0], want[2]]
    assert [got[ids[i]][-1].output.token_ids for i in (0, 3)] == [want[0], want[2]]
    assert got[ids[2]][-1].output.finish_reason == "abort"
    assert_kv_released(engine)


def test_stats_name_the_adapters_of_running_and_waiting_requests(tiny_llama_dir, make_adapter):
    # one sequence at a time: the first request runs, the others wait
    engine = Engine(tiny_llama_dir, pool_gb=0.02, max_model_len=128, block_size=8,
                    max_num_seqs=1)
    path = make_adapter(tiny_llama_dir, "x", r=4, target_modules=["q_proj"], seed=41)
    engine.add_adapter("x", path)
    engine.add_adapter("x-too", path)  # the same weights under a second name
    engine.add_adapter("y", make_adapter(tiny_llama_dir, "y", r=2, target_modules=["v_proj"],
                                         seed=42))
    for adapter in ("x", "y", None):
        engine.add_request([5, 6, 7], adapter, GREEDY)
    s = engine.stats()  # before any step: queued requests count as waiting
    assert s["requests_waiting"] == 3 and s["requests_running"] == 0
    assert s["running_adapters"] == {} and s["kv_cache_usage"] == 0
    assert s["waiting_adapters"] == {"x": 1, "x-too": 1, "y": 1}  # the base model's: none
    engine.step()
    s = engine.stats()
    assert s["running_adapters"] == {"x": 1, "x-too": 1} and s["waiting_adapters"] == {"y": 1}
    # the running request's KV block and its pinned adapter, of all the pages
    usage_pages = round(s["kv_cache_usage"] * s["pages_total"])
    assert usage_pages == s["pages_kv"] - s["pages_kv_cached"] + engine.adapters.footprint(
        engine.adapters.key_of("x"))
    step_until_done(engine)
    s = engine.stats()
    assert s["running_adapters"] == s["waiting_adapters"] == {} and s["kv_cache_usage"] == 0


def test_tokenize_is_what_generate_runs(engine):
    """Engine.tokenize gives the prompt_token_ids generate reports, for text, chat and ids,
    and queues nothing."""
    prompts = ["Hello there", [{"role": "user", "content": "Hi"}], [5, 6, 7]]
    ids = [engine.tokenize(p) for p in prompts]
    assert not engine.has_unfinished()
    outs = engine.generate(prompts, sampling_params=SamplingParams(max_tokens=1),
                           progress=False)
    assert [o.prompt_token_ids for o in outs] == ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.tokenize([1, 10**9])
