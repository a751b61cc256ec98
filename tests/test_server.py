"""The HTTP server (``pagedlora serve``) in a subprocess on the loopback: the official openai
client and plain HTTP against two tiny random base models with random adapters; greedy
answers must equal ``Engine.generate`` offline with the same options."""

from __future__ import annotations

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from support import ServerProcess, save_random_llama, write_peft_dir, write_random_lora

from pagedlora import Engine, SamplingParams

# the server's engine options; the offline engines get the same (pool split in two)
POOL_GB, MAX_MODEL_LEN, MAX_NUM_SEQS, MAX_QUEUE = 0.04, 128, 8, 40
ENGINE_OPTIONS = dict(max_model_len=MAX_MODEL_LEN, block_size=8, max_num_seqs=MAX_NUM_SEQS)
ADAPTERS = {"a1": dict(r=2, target_modules=["q_proj", "v_proj"], seed=1),
            "a2": dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"], seed=2),
            "a3": dict(r=4, target_modules=["o_proj", "down_proj"], seed=3),
            "a4": dict(r=16, target_modules=["gate_proj", "up_proj"], seed=4)}
OTHER_ADAPTER = dict(r=4, target_modules=["q_proj", "k_proj", "v_proj"], seed=5)
GREEDY = SamplingParams(max_tokens=8, temperature=0)


def metric(text: str, name: str, **labels) -> float:
    """The value of the sample ``name{labels...}`` (labels in any order), 0 if absent."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m[1].split(",") for k, v in labels.items()):
            return float(m[2])
    return 0.0


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_llama_dir, default_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    other = save_random_llama(root / "other", default_model_dir, seed=1)
    (other / "chat_template.jinja").unlink()  # a base model without a chat template
    found = {name: write_random_lora(root / name, **spec) for name, spec in ADAPTERS.items()}
    return {"tiny": tiny_llama_dir, "other": other, **found,
            "b1": write_random_lora(root / "b1", **OTHER_ADAPTER),
            "extra": write_random_lora(root / "extra", r=3, target_modules=["v_proj"], seed=6)}


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    args = ["--model", f"tiny={files['tiny']}", "--model", f"other={files['other']}",
            *[a for name in ADAPTERS for a in ("--adapter", f"tiny:{name}={files[name]}")],
            "--adapter", f"other:b1={files['b1']}", "--pool-gb", str(POOL_GB),
            "--max-model-len", str(MAX_MODEL_LEN), "--block-size", "8",
            "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", str(MAX_QUEUE),
            "--max-body-mb", "0.05"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("log") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def offline(files) -> dict[str, Engine]:
    """Engines with the server's options, for the expected answers."""
    tiny = Engine(files["tiny"], pool_gb=POOL_GB / 2, **ENGINE_OPTIONS)
    for name in [*ADAPTERS, "extra"]:
        tiny.add_adapter(name, files[name])
    other = Engine(files["other"], pool_gb=POOL_GB / 2, **ENGINE_OPTIONS)
    other.add_adapter("b1", files["b1"])
    return {"tiny": tiny, "other": other}


def expected(engine: Engine, prompts: list, adapters: list, sp=GREEDY) -> list[str]:
    return [o.text for o in engine.generate(prompts, adapters=adapters, sampling_params=sp,
                                            progress=False)]


def test_models_lists_base_models_and_adapters_with_their_parent(server, files):
    data = {m.id: m for m in server.openai().models.list().data}
    assert set(data) == {"tiny", "other", *ADAPTERS, "b1"}
    assert data["tiny"].parent is None and data["b1"].parent == "other"
    assert {data[a].parent for a in ADAPTERS} == {"tiny"}
    assert data["a1"].root == str(files["a1"])


def test_32_concurrent_requests_across_4_adapters_and_the_base_match_offline(server, offline):
    names = [None, *ADAPTERS]
    jobs = [(f"Request {i} asks about the number {i * 7} and", names[i % 5]) for i in range(32)]
    client = server.openai()

    def ask(i: int) -> tuple[str, int]:
        prompt, adapter = jobs[i]
        kw = dict(model=adapter or "tiny", prompt=prompt, max_tokens=8, temperature=0)
        if i % 4 == 3:  # every fourth streams
            chunks = list(client.completions.create(
                stream=True, stream_options={"include_usage": True}, **kw))
            return ("".join(c.choices[0].text for c in chunks if c.choices),
                    chunks[-1].usage.completion_tokens)
        r = client.completions.create(**kw)
        assert r.model == kw["model"]
        return r.choices[0].text, r.usage.completion_tokens

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    outs = offline["tiny"].generate([p for p, _ in jobs], adapters=[a for _, a in jobs],
                                    sampling_params=GREEDY, progress=False)
    assert [text for text, _ in got] == [o.text for o in outs]
    assert [n for _, n in got] == [len(o.token_ids) for o in outs]
    assert len({o.text for o in outs}) > 20  # the adapters really change the answers


def test_chat_with_the_chat_template_plain_and_streamed(server, offline):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a color."}]
    want = expected(offline["tiny"], [messages], ["a2"])[0]
    client = server.openai()
    r = client.chat.completions.create(model="a2", messages=messages, max_tokens=8,
                                       temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="a2", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_two_base_models_each_answer_with_their_own_weights(server, offline):
    client = server.openai()
    prompt = "The two models read this prompt"
    got = {m: client.completions.create(model=m, prompt=prompt, max_tokens=8,
                                        temperature=0).choices[0].text
           for m in ("tiny", "a1", "other", "b1")}
    assert got["other"] == expected(offline["other"], [prompt], [None])[0]
    assert got["b1"] == expected(offline["other"], [prompt], ["b1"])[0]
    assert got["tiny"] == expected(offline["tiny"], [prompt], [None])[0]
    assert got["a1"] == expected(offline["tiny"], [prompt], ["a1"])[0]
    assert len(set(got.values())) == 4


def test_invocations_sagemaker_style(server, offline):
    inputs = ["First input", "Second input", "Third input"]
    r = server.post("/invocations", json={"inputs": inputs, "adapters": ["a3", None, "a4"],
                                          "model": "tiny", "parameters": {"max_new_tokens": 8}})
    assert r.status_code == 200, r.text
    assert [x["generated_text"] for x in r.json()] == \
        expected(offline["tiny"], inputs, ["a3", None, "a4"])
    one = server.post("/invocations", json={"inputs": "Just one", "adapters": "b1",
                                            "parameters": {"max_new_tokens": 8,
                                                           "do_sample": False}})
    assert one.json() == {"generated_text": expected(offline["other"], ["Just one"], ["b1"])[0]}
    eight = {"max_new_tokens": 8}
    by_header = server.post("/invocations", json={"inputs": "Just one", "parameters": eight},
                            headers={"X-Amzn-SageMaker-Inference-Component": "other"})
    by_field = server.post("/invocations", json={"inputs": "Just one", "model": "other",
                                                 "parameters": eight})
    want = expected(offline["other"], ["Just one"], [None])[0]
    assert by_header.json() == by_field.json() == {"generated_text": want}
    sampled = server.post("/invocations", json={"inputs": "Just one", "model": "tiny",
                                                "parameters": {"do_sample": True, "seed": 7,
                                                               "max_new_tokens": 8}})
    assert sampled.json() == {"generated_text": expected(
        offline["tiny"], ["Just one"], [None], SamplingParams(max_tokens=8, seed=7))[0]}
    assert httpx.get(f"{server.url}/ping").json() == {"status": "healthy"}


BAD_REQUESTS = [  # (path, body or raw bytes, status, words the message must hold)
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, ["'nope'", "does not exist"]),
    ("/v1/chat/completions", {"model": "gone", "messages": [{"role": "user", "content": "x"}]},
     404, ["'gone'"]),
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, ["malformed JSON"]),
    ("/v1/completions", b'["tiny"]', 400, ["JSON object"]),
    ("/v1/completions", {"model": "tiny"}, 400, ["prompt", "Field required"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400,
     ["max_tokens", ">= 1"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": -1}, 400,
     ["temperature"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 2}, 400, ["top_p"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400,
     ["temperature", "valid number"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 3}, 400, ["n=3", "not supported"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "frobnicate": 1}, 400,
     ["frobnicate", "unsupported field"]),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 200}, 400,
     ["prompt has 201 tokens", "no room", "max_model_len 128"]),
    # prompt + max_tokens above max_model_len: a 400 naming both numbers, not a silent cut
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 120}, 400,
     ["prompt has 120 tokens and max_tokens is 16", "136 tokens", "max_model_len 128",
      "at most 8"]),
    ("/v1/completions", {"model": "a1", "prompt": [[5], [5] * 100], "max_tokens": 40}, 400,
     ["prompt[1] has 100 tokens and max_tokens is 40", "max_model_len 128", "'a1'"]),
    ("/v1/chat/completions", {"model": "tiny", "max_completion_tokens": 500,
                              "messages": [{"role": "user", "content": "x"}]}, 400,
     ["messages has", "max_completion_tokens is 500", "max_model_len 128"]),
    ("/invocations", {"inputs": ["a", "b"], "model": "tiny",
                      "parameters": {"max_new_tokens": 128}}, 400,
     ["inputs[0] has 1 token and parameters.max_new_tokens is 128", "at most 127"]),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
     400, ["messages.0.role", "'system', 'user', 'assistant' or 'tool'"]),
    ("/invocations", {"inputs": "a", "model": "tiny", "parameters": {"max_tokens": 8}}, 400,
     ["parameters.max_tokens: unsupported field; did you mean 'max_new_tokens'?"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_new_tokens": 8}, 400,
     ["max_new_tokens: unsupported field; did you mean 'max_tokens'?"]),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temprature": 0}, 400,
     ["did you mean 'temperature'?"]),
    ("/invocations", {"inputs": "a", "model": "tiny", "adapters": "tiny"}, 404,
     ["adapters: adapter 'tiny' is not loaded", "'tiny' is a base model"]),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, ["empty"]),
    ("/v1/completions", {"model": "tiny", "prompt": [5, 10**9]}, 400, ["vocabulary"]),
    ("/v1/completions", {"model": "tiny", "prompt": ["ok"] * (MAX_QUEUE + 1)}, 400,
     ["--max-queue"]),
    ("/v1/chat/completions", {"model": "b1", "messages": [{"role": "user", "content": "x"}]},
     400, ["'b1'", "'other'", "no chat template"]),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, ["messages"]),
    ("/invocations", {"inputs": ["a", "b"], "adapters": ["a1"]}, 400, ["1 entries for 2"]),
    ("/invocations", {"inputs": "a", "adapters": "b1", "model": "tiny"}, 400,
     ["'b1'", "do not belong", "'tiny'"]),
    ("/invocations", {"inputs": "a"}, 400, ["several base models", "X-Amzn"]),
    ("/invocations", {"inputs": "a", "adapters": "zzz"}, 404, ["adapters: adapter 'zzz'"]),
    ("/invocations", {"inputs": "a", "model": "nobase"}, 404, ["'nobase'"]),
    ("/invocations", {"inputs": "a", "model": "tiny", "parameters": {"max_new_tokens": -1}},
     400, ["max_tokens"]),
    ("/invocations", {"inputs": "x" * 60_000, "model": "tiny"}, 413, ["exceeds", "bytes"]),
    ("/v1/unload_lora_adapter", {"lora_name": "never"}, 404, ["'never'"]),
    ("/v1/load_lora_adapter", {"lora_name": "tiny", "lora_path": "/x", "model": "tiny"}, 400,
     ["'tiny'", "base model"]),
    ("/v1/load_lora_adapter", {"lora_name": "b1", "lora_path": "/x", "model": "tiny"}, 400,
     ["'b1'", "already served", "'other'"]),
    ("/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "/x"}, 400,
     ["several base models"]),
    ("/v1/load_lora_adapter", {"lora_name": "new", "lora_path": "/x", "model": "nobase"}, 404,
     ["'nobase'"]),
    ("/v1/nothing-here", {}, 404, ["/v1/nothing-here"]),
]


@pytest.mark.parametrize("path,body,status,words", BAD_REQUESTS,
                         ids=[f"{i}-{p}" for i, (p, *_) in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_a_clear_error(server, path, body, status, words):
    kw = {"content": body, "headers": {"content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body}
    r = server.post(path, **kw)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for w in words:
        assert w in message, message


def test_errors_are_logged_in_one_line_without_the_prompt(server):
    def why(body) -> list[str]:
        before = len(server.log_text().splitlines())
        assert server.post("/v1/completions", json=body).status_code == 400
        time.sleep(0.2)  # the log line is written before the response; the file may lag
        return [x for x in server.log_text().splitlines()[before:] if " -> 400: " in x]

    (line,) = why({"model": "tiny", "prompt": "zebra " * 150})
    assert re.search(r"WARNING .*POST /v1/completions -> 400: prompt has \d+ tokens, which "
                     r"leaves no room for output in max_model_len 128 of model 'tiny'", line)
    (line,) = why({"model": "tiny", "prompt": "giraffe", "top_p": 9})
    assert "POST /v1/completions -> 400: invalid sampling parameters: top_p" in line
    assert "zebra" not in server.log_text() and "giraffe" not in server.log_text()


def test_load_lora_adapter_twice_needs_load_inplace(server, offline, files):
    """vLLM's semantics: a name already loaded is a 400 unless load_inplace replaces it."""
    def load(path, **extra):
        return server.post("/v1/load_lora_adapter", json={
            "lora_name": "twice", "lora_path": str(path), "model": "tiny", **extra})

    def answer():
        return server.openai().completions.create(model="twice", prompt="Which weights",
                                                  max_tokens=8, temperature=0).choices[0].text

    assert load(files["a3"]).status_code == 200
    again = load(files["a4"])
    assert again.status_code == 400 and "already loaded" in again.text \
        and "load_inplace" in again.text, again.text
    assert answer() == expected(offline["tiny"], ["Which weights"], ["a3"])[0]  # unchanged
    assert load(files["a4"], load_inplace=True).status_code == 200
    assert answer() == expected(offline["tiny"], ["Which weights"], ["a4"])[0]
    assert server.post("/v1/unload_lora_adapter", json={"lora_name": "twice"}).status_code == 200


def test_load_lora_adapter_refuses_missing_and_invalid_adapters(server, files, tmp_path):
    missing = server.post("/v1/load_lora_adapter", json={
        "lora_name": "m", "lora_path": str(tmp_path / "missing"), "model": "tiny"})
    assert missing.status_code == 400 and "is not a directory" in missing.text, missing.text
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    bad = write_peft_dir(tmp_path / "bad", {f"{key}.lora_A.weight": torch.ones(4, 65),  # not 64
                                            f"{key}.lora_B.weight": torch.ones(64, 4)},
                         r=4, target_modules=["q_proj"])
    invalid = server.post("/v1/load_lora_adapter", json={
        "lora_name": "bad", "lora_path": str(bad), "model": "tiny"})
    assert invalid.status_code == 400 and "65" in invalid.text, invalid.text
    assert "Success" not in missing.text + invalid.text
    ids = {m.id for m in server.openai().models.list().data}
    assert "m" not in ids and "bad" not in ids


def test_load_serve_and_unload_an_adapter(server, offline, files):
    client = server.openai()
    r = server.post("/v1/load_lora_adapter", json={"lora_name": "extra",
                                                   "lora_path": str(files["extra"]),
                                                   "model": "tiny"})
    assert r.status_code == 200 and r.text.startswith("Success"), r.text
    parents = {m.id: m.parent for m in client.models.list().data}
    assert parents["extra"] == "tiny"
    got = client.completions.create(model="extra", prompt="Loaded at runtime", max_tokens=8,
                                    temperature=0).choices[0].text
    assert got == expected(offline["tiny"], ["Loaded at runtime"], ["extra"])[0]
    assert server.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
    with pytest.raises(openai.NotFoundError, match="'extra'"):
        client.completions.create(model="extra", prompt="x", max_tokens=2)


def test_after_bad_input_everyone_else_is_still_served(server, offline):
    test_bad_input_gets_a_clear_error(server, *BAD_REQUESTS[0])
    prompt = "Still here after all that"
    assert server.openai().completions.create(model="a4", prompt=prompt, max_tokens=8,
                                              temperature=0).choices[0].text \
        == expected(offline["tiny"], [prompt], ["a4"])[0]


def test_full_queue_gets_503_with_retry_after(server):
    # 40 prompts, 8 run at a time: 32 wait for their first token while the first 8 decode
    flood = {"model": "tiny", "prompt": [f"Flood {i}" for i in range(MAX_QUEUE)],
             "max_tokens": 16, "ignore_eos": True}
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "r", server.post("/v1/completions", json=flood)))
    thread.start()
    deadline = time.monotonic() + 30
    while metric(server.metrics(), "pagedlora_queue_length", model="tiny") < 32:
        assert time.monotonic() < deadline and thread.is_alive(), "the flood never queued"
        time.sleep(0.02)
    # at least 24 still wait until the second 8 start (16 steps on): 17 more cannot fit
    r = server.post("/v1/completions", json={"model": "a1", "prompt": ["x"] * 17})
    thread.join(60)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert "retry later" in r.json()["error"]["message"]
    assert result["r"].status_code == 200
    assert len(result["r"].json()["choices"]) == MAX_QUEUE


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_a_client_that_disconnects_has_its_requests_aborted(server, stream):
    def aborted(text):
        return metric(text, "pagedlora_requests_total", model="tiny", adapter="a3",
                      finish_reason="abort")

    before = aborted(server.metrics())
    # 40 prompts of 120 tokens, 8 at a time: hundreds of steps, far beyond the client's wait
    body = {"model": "a3", "prompt": [f"Talk {i}" for i in range(MAX_QUEUE)],
            "max_tokens": 120, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            assert next(r.iter_lines()).startswith("data: ")
    else:
        with pytest.raises(httpx.ReadTimeout):
            server.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    deadline = time.monotonic() + 30
    while True:
        text = server.metrics()
        idle = all(metric(text, name, model="tiny") == 0 for name in
                   ("pagedlora_requests_running", "pagedlora_queue_length"))
        if aborted(text) > before and idle:
            break
        assert time.monotonic() < deadline, "the requests were never aborted"
        time.sleep(0.05)
    assert metric(text, "pagedlora_pool_pages", model="tiny", kind="kv") == 0  # pages freed


def test_metrics_per_model_and_adapter(server, offline):
    server.openai().completions.create(model="b1", prompt="Count me", max_tokens=4)
    text = server.metrics()
    assert metric(text, "pagedlora_requests_total", model="other", adapter="b1",
                  finish_reason="length") >= 1
    assert metric(text, "pagedlora_generation_tokens_total", model="other", adapter="b1") >= 4
    assert metric(text, "pagedlora_time_to_first_token_seconds_count", model="tiny",
                  adapter="a2") >= 1
    assert metric(text, "pagedlora_time_per_output_token_seconds_count", model="tiny",
                  adapter="") >= 1
    assert metric(text, "pagedlora_http_errors_total", endpoint="/v1/completions",
                  status="404") >= 1
    for model in ("tiny", "other"):
        kinds = [metric(text, "pagedlora_pool_pages", model=model, kind=k)
                 for k in ("kv", "kv_cached", "adapter", "free")]
        assert sum(kinds) == offline[model].stats()["pages_total"]
        assert metric(text, "pagedlora_queue_length", model=model) == 0
    assert sum(metric(text, "pagedlora_adapters", model="tiny", tier=t)
               for t in ("pool", "host", "disk", "source")) == len(ADAPTERS)


def vllm_series(text: str, model: str) -> dict:
    """The vLLM-named series of base model ``model`` in a /metrics text, read with
    prometheus_client's own parser: name -> samples (each a (labels, value) pair)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vllm:") and sample.labels.get("model_name") == model:
                found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_vllm_metrics_name_the_running_and_waiting_adapters(server):
    # 40 prompts for a1, 8 run at a time; then one for a3 behind them: while 33 wait, a1's
    # run and a1's and a3's wait (nothing else is submitted to "tiny")
    flood = {"model": "a1", "prompt": [f"Busy {i}" for i in range(MAX_QUEUE - 1)],
             "max_tokens": 120, "ignore_eos": True, "stream": True}
    behind = {"model": "a3", "prompt": "Behind", "max_tokens": 4, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server.url}/v1/completions", json=flood) as r1:
            lines = r1.iter_lines()  # kept: closing the iterator would close the stream
            assert next(lines).startswith("data: ")
            with client.stream("POST", f"{server.url}/v1/completions", json=behind) as r2:
                deadline = time.monotonic() + 30
                while True:
                    before = time.time()
                    text = server.metrics()
                    series = vllm_series(text, "tiny")
                    (_, waiting), = series["vllm:num_requests_waiting"]
                    if waiting == MAX_QUEUE - MAX_NUM_SEQS:
                        break
                    assert time.monotonic() < deadline, f"never {MAX_QUEUE - 8} waiting: {series}"
                (labels, stamp), = series["vllm:lora_requests_info"]
                assert labels["running_lora_adapters"] == "a1"
                assert labels["waiting_lora_adapters"] == "a1,a3"
                assert labels["max_lora"] == "8"  # the default max_loras
                assert before - 1 <= stamp <= time.time() + 1  # a reading time, in seconds
                assert series["vllm:num_requests_running"] == [({"model_name": "tiny"},
                                                                 MAX_NUM_SEQS)]
                usage = series["vllm:kv_cache_usage_perc"][0][1]
                assert series["vllm:gpu_cache_usage_perc"][0][1] == usage
                held = metric(text, "pagedlora_pool_pages", model="tiny", kind="kv")
                total = sum(metric(text, "pagedlora_pool_pages", model="tiny", kind=k)
                            for k in ("kv", "kv_cached", "adapter", "free"))
                adapter = metric(text, "pagedlora_pool_pages", model="tiny", kind="adapter")
                # in pages: 8 running requests' KV blocks, plus at most the adapters'
                assert 0 < held <= round(usage * total) <= held + adapter
                assert r2.status_code == 200
    deadline = time.monotonic() + 30  # the streams closed: their requests are aborted
    while True:
        series = vllm_series(server.metrics(), "tiny")
        if series["vllm:num_requests_running"][0][1] == 0 and \
                series["vllm:num_requests_waiting"][0][1] == 0:
            break
        assert time.monotonic() < deadline, "the requests were never aborted"
        time.sleep(0.05)
    (labels, _), = series["vllm:lora_requests_info"]  # one series: the latest label set
    assert labels["running_lora_adapters"] == labels["waiting_lora_adapters"] == ""
    assert series["vllm:kv_cache_usage_perc"][0][1] == 0


def test_sigterm_aborts_what_outlasts_the_grace_period_and_exits_cleanly(files, tmp_path):
    proc = ServerProcess(["--model", f"tiny={files['tiny']}", "--pool-gb", "0.02",
                          "--block-size", "8", "--shutdown-timeout", "0.1"],
                         tmp_path / "server.log")
    try:
        body = {"model": "tiny", "prompt": "Go on", "max_tokens": 500, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        # 500 steps take far longer than 0.1 s: the request is aborted, and its stream still
        # ends properly
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "abort"' in rest[-2], rest[-3:]
        # uvicorn exits by re-raising the signal once it has shut down
        assert proc.proc.wait(30) in (0, -signal.SIGTERM), proc.log_text()
        log = proc.log_text()
        assert "engine loop 'tiny' stopped" in log and "Traceback" not in log, log
    finally:
        proc.stop()
