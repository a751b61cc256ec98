"""Log-probabilities over HTTP (``pagedlora serve`` in a subprocess on the loopback): the
official openai client's completions and chat ``logprobs`` objects, streamed and not, vLLM's
``prompt_logprobs``, ``echo`` with token-id prompts, LMI's ``details``, and the limits; then
lm-evaluation-harness's ``local-completions`` model against the server, and its own ``hf``
model with ``peft=`` on the same weights as the reference."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
from support import ServerProcess, save_random_adapter, save_random_llama

from pagedlora import Engine, SamplingParams

POOL_GB, MAX_LOGPROBS = 0.04, 6
OPTIONS = dict(max_model_len=256, block_size=8, max_logprobs=MAX_LOGPROBS)
TOL = 1e-4  # the server's batches are not the offline engine's; both are PEFT's to 1e-4
ADAPTERS = {"both": dict(r=4, target_modules=["embed_tokens", "lm_head", "q_proj", "v_proj"],
                         seed=501),
            "all": dict(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"], seed=502)}


# lm-eval's hf model calls tie_weights() after loading a PEFT adapter, which fails for a LoRA
# on the lm_head of a tied base; its reference for such an adapter runs on an untied base.
UNTIED_ADAPTER = dict(r=3, target_modules=["embed_tokens", "lm_head", "q_proj", "down_proj"],
                      seed=503)


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir, default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    found = {n: save_random_adapter(tiny_llama_dir, root / n, **dict(o))
             for n, o in ADAPTERS.items()}
    found["untied"] = save_random_llama(root / "untied", default_model_dir, seed=5,
                                        tie_word_embeddings=False)
    found["uvocab"] = save_random_adapter(found["untied"], root / "uvocab", **UNTIED_ADAPTER)
    return found


@pytest.fixture(scope="module")
def server(tiny_llama_dir, dirs, tmp_path_factory):
    args = ["--model", f"tiny={tiny_llama_dir}", "--model", f"untied={dirs['untied']}",
            *[a for n in ADAPTERS for a in ("--adapter", f"tiny:{n}={dirs[n]}")],
            "--adapter", f"untied:uvocab={dirs['uvocab']}",
            "--pool-gb", str(POOL_GB), "--max-model-len", "256", "--block-size", "8",
            "--max-logprobs", str(MAX_LOGPROBS)]
    proc = ServerProcess(args, tmp_path_factory.mktemp("log") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def offline(tiny_llama_dir, dirs) -> Engine:
    engine = Engine(tiny_llama_dir, pool_gb=POOL_GB, **OPTIONS)
    for n in ADAPTERS:
        engine.add_adapter(n, dirs[n])
    return engine


def close(got, want, what: str) -> None:
    """Lists of floats (None allowed where both are None) within TOL."""
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g is None) == (w is None), f"{what} [{i}]"
        assert g is None or abs(g - w) <= TOL, f"{what} [{i}]: {g} vs {w}"


def run(offline: Engine, prompt, adapter, **params):
    return offline.generate([prompt], adapters=[adapter], progress=False,
                            sampling_params=SamplingParams(**params))[0]


# -- OpenAI completions --------------------------------------------------------------------------


def test_completions_logprobs_parse_and_match_the_engine(server, offline):
    client, tok = server.openai(), offline.tokenizer
    prompt = "The harbour at dawn was quiet and"
    r = client.completions.create(model="both", prompt=prompt, max_tokens=6, temperature=0,
                                  logprobs=3)
    want = run(offline, prompt, "both", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == want.text
    assert lp.tokens == [tok.decode([t]) for t in want.token_ids]
    close(lp.token_logprobs, [e.logprob for e in want.logprobs], "token_logprobs")
    for top, e in zip(lp.top_logprobs, want.logprobs, strict=True):
        assert set(top) == {tok.decode([t]) for t, _ in e.top} | {tok.decode([e.token_id])}
        close([top[tok.decode([t])] for t, _ in e.top], [x for _, x in e.top], "top")
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_echo_with_token_id_prompts_scores_every_prompt_token(server, offline):
    """lm-evaluation-harness's loglikelihood request: token ids, max_tokens 1, logprobs 1,
    echo; two prompts in one request."""
    prompts = [[510, 1911, 314, 253, 4287, 369], [2003, 17, 905, 3321]]
    r = server.post("/v1/completions", json={
        "model": "both", "prompt": prompts, "max_tokens": 1, "temperature": 0, "logprobs": 1,
        "echo": True, "seed": 1234})
    assert r.status_code == 200, r.text
    for choice, prompt in zip(r.json()["choices"], prompts, strict=True):
        want = run(offline, prompt, "both", max_tokens=1, temperature=0, logprobs=1,
                   prompt_logprobs=1)
        lp = choice["logprobs"]
        assert choice["text"] == offline.tokenizer.decode(prompt) + want.text
        assert len(lp["token_logprobs"]) == len(prompt) + 1 and lp["top_logprobs"][0] is None
        close(lp["token_logprobs"], [None, *[e.logprob for e in want.prompt_logprobs[1:]],
                                     want.logprobs[0].logprob], "echoed token_logprobs")
        assert all(len(top) in (1, 2) for top in lp["top_logprobs"][1:])


def test_vllm_prompt_logprobs_extension(server, offline):
    prompt = "Seven small boats"
    r = server.post("/v1/completions", json={"model": "all", "prompt": prompt, "max_tokens": 2,
                                             "temperature": 0, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["prompt_logprobs"]
    want = run(offline, prompt, "all", max_tokens=2, temperature=0, prompt_logprobs=2)
    assert got[0] is None and len(got) == len(want.prompt_token_ids)
    for g, e in zip(got[1:], want.prompt_logprobs[1:], strict=True):
        assert g[str(e.token_id)]["rank"] == e.rank
        close([g[str(e.token_id)]["logprob"]], [e.logprob], "prompt token")
        close([g[str(t)]["logprob"] for t, _ in e.top], [x for _, x in e.top], "prompt top")


def test_streamed_completions_carry_each_chunk_s_logprobs(server):
    client = server.openai()
    kw = dict(model="both", prompt="A list of rivers:", max_tokens=7, temperature=0,
              logprobs=2, echo=True)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    streamed = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    close(streamed, whole.logprobs.token_logprobs, "streamed token_logprobs")
    offsets = [x for c in chunks if c.logprobs for x in c.logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset


# -- OpenAI chat ---------------------------------------------------------------------------------


def test_chat_logprobs_parse_and_match_the_engine(server, offline):
    client, tok = server.openai(), offline.tokenizer
    messages = [{"role": "user", "content": "Name three colours."}]
    r = client.chat.completions.create(model="both", messages=messages, max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=2)
    want = run(offline, messages, "both", max_tokens=6, temperature=0, logprobs=2)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([t]) for t in want.token_ids]
    close([c.logprob for c in content], [e.logprob for e in want.logprobs], "chat logprobs")
    for c, e in zip(content, want.logprobs, strict=True):
        assert [t.token for t in c.top_logprobs] == [tok.decode([t]) for t, _ in e.top]
        close([t.logprob for t in c.top_logprobs], [x for _, x in e.top], "chat top")
        assert c.bytes == list(c.token.encode())
    chunks = list(client.chat.completions.create(model="both", messages=messages,
                                                 max_tokens=6, temperature=0, logprobs=True,
                                                 top_logprobs=2, stream=True))
    streamed = [x.logprob for c in chunks if c.choices and c.choices[0].logprobs
                for x in c.choices[0].logprobs.content]
    close(streamed, [c.logprob for c in content], "streamed chat logprobs")
    plain = client.chat.completions.create(model="both", messages=messages, max_tokens=2,
                                           temperature=0)
    assert plain.choices[0].logprobs is None


# -- SageMaker LMI -------------------------------------------------------------------------------


def test_invocations_details_carry_log_probs(server, offline):
    prompt = "Tell me about ships"
    r = server.post("/invocations", json={
        "inputs": prompt, "adapters": "both",
        "parameters": {"max_new_tokens": 5, "details": True, "top_n_tokens": 2,
                       "decoder_input_details": True}})
    assert r.status_code == 200, r.text
    details = r.json()["details"]
    want = run(offline, prompt, "both", max_tokens=5, temperature=0, logprobs=2,
               prompt_logprobs=0)
    assert [t["id"] for t in details["tokens"]] == want.token_ids
    close([t["log_prob"] for t in details["tokens"]], [e.logprob for e in want.logprobs],
          "LMI log_prob")
    assert [[t["id"] for t in top] for top in details["top_tokens"]] == \
        [[t for t, _ in e.top] for e in want.logprobs]
    assert [t["id"] for t in details["prefill"]] == want.prompt_token_ids
    close([t["log_prob"] for t in details["prefill"]],
          [None, *[e.logprob for e in want.prompt_logprobs[1:]]], "LMI prefill")
    plain = server.post("/invocations", json={"inputs": prompt, "model": "tiny", "parameters": {
        "max_new_tokens": 2, "details": True}}).json()["details"]
    assert all(isinstance(t["log_prob"], float) for t in plain["tokens"])
    assert "top_tokens" not in plain and "prefill" not in plain


# -- limits --------------------------------------------------------------------------------------

LIMITS = [  # (path, body, the field named)
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": MAX_LOGPROBS + 1},
     "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "prompt_logprobs": 99},
     "prompt_logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": -1}, "logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1},
     "top_logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, "top_logprobs"),
    ("/invocations", {"inputs": "x", "model": "tiny",
                      "parameters": {"details": True, "top_n_tokens": 50}},
     "parameters.top_n_tokens"),
]


@pytest.mark.parametrize("path,body,field", LIMITS, ids=[f for *_, f in LIMITS])
def test_above_the_limits_is_a_400_naming_the_field(server, path, body, field):
    r = server.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field.split(".")[-1] in error["message"], error
    if "exceeds" in error["message"]:
        assert f"{MAX_LOGPROBS} (--max-logprobs)" in error["message"]


# -- lm-evaluation-harness as a client -----------------------------------------------------------

TASKS = Path(__file__).parent / "lm_eval_tasks"
WORDS = ("river stone cloud lantern harbor meadow copper violet winter garden signal "
         "thunder marble orchard candle falcon silver anchor willow ember").split()


def write_task_data(folder: Path) -> None:
    """The JSON files the repo's task YAMLs read: 24 four-way choices, 8 prompts to continue."""
    rng = random.Random(7)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "pagedlora_choice.jsonl", "w") as f:
        for _ in range(24):
            f.write(json.dumps({"question": " ".join(rng.sample(WORDS, 5)) + " is",
                                "choices": [" " + w for w in rng.sample(WORDS, 4)],
                                "answer": rng.randrange(4)}) + "\n")
    with open(folder / "pagedlora_generate.jsonl", "w") as f:
        for _ in range(8):
            f.write(json.dumps({"question": " ".join(rng.sample(WORDS, 6)),
                                "answer": " " + rng.choice(WORDS)}) + "\n")


@pytest.fixture(scope="module")
def lm_eval_tasks():
    """lm-eval's task index of the repo's YAMLs alone (indexing its own thousands of tasks
    takes ~20 s)."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS), include_defaults=False)


def evaluate(tasks, model: str, model_args: dict) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["pagedlora_choice", "pagedlora_generate"],
        task_manager=tasks, log_samples=True, batch_size=4, random_seed=0,
        numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def per_sample(result: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(result["samples"][task],
                                                key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("base, adapter", [("tiny", None), ("untied", "uvocab")])
def test_lm_eval_local_completions_agrees_with_its_hf_peft_model(
        server, tiny_llama_dir, dirs, lm_eval_tasks, base, adapter, tmp_path, monkeypatch):
    """The task YAMLs in tests/lm_eval_tasks over JSON files written here, through the server
    (``model=<adapter name>``) and through lm-eval's ``hf`` model with ``peft=<adapter dir>``:
    equal accuracies and greedy continuations, per-choice loglikelihoods within 1e-3. The
    adapter targets embed_tokens, lm_head and two projections."""
    import lm_eval.evaluator

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # pip list: 2 s
    for f in TASKS.glob("*.yaml"):
        shutil.copy(f, tmp_path)
    monkeypatch.chdir(tmp_path)  # the YAMLs name their data and cache relative to here
    write_task_data(tmp_path / "data")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    model_dir = tiny_llama_dir if base == "tiny" else dirs[base]
    ours = evaluate(lm_eval_tasks, "local-completions", {
        "model": adapter or base, "base_url": f"{server.url}/v1/completions",
        "tokenizer_backend": "huggingface", "tokenizer": str(model_dir), "max_retries": 1,
        "timeout": 120})
    ref = evaluate(lm_eval_tasks, "hf", {
        "pretrained": str(model_dir), "dtype": "float32", "device": "cpu",
        **({} if adapter is None else {"peft": str(dirs[adapter])})})
    for task, metric in (("pagedlora_choice", "acc,none"),
                         ("pagedlora_generate", "exact_match,none")):
        assert ours["results"][task][metric] == ref["results"][task][metric], task
    got, want = per_sample(ours, "pagedlora_choice"), per_sample(ref, "pagedlora_choice")
    assert len(got) == 24 and all(len(choices) == 4 for choices in got)
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        for (ll, greedy), (ll_ref, greedy_ref) in zip(g, w, strict=True):
            assert math.isfinite(ll) and greedy == greedy_ref
            worst = max(worst, abs(ll - ll_ref))
    assert worst <= 1e-3, worst
    generated = per_sample(ours, "pagedlora_generate")
    assert generated == per_sample(ref, "pagedlora_generate")
    assert any(g[0].strip() for g in generated)  # not all empty
