"""Adapter mixes and scales over HTTP: the OpenAI routes' ``adapters`` extension field (the
openai client's ``extra_body``) and ``/invocations``' ``adapters`` objects, answered as
``Engine.generate`` answers the same ``AdapterMix`` offline; their errors name the offending
adapter or weight."""

from __future__ import annotations

import json

import pytest
from support import ServerProcess, save_random_dora_adapter, save_random_llama, write_random_lora

from pagedlora import AdapterMix, Engine, SamplingParams

POOL_GB, MAX_MODEL_LEN = 0.03, 128
ADAPTERS = {"a1": dict(r=2, target_modules=["q_proj", "v_proj"], seed=11),
            "a2": dict(r=8, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                       seed=12)}
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_llama_dir, default_model_dir) -> dict:
    root = tmp_path_factory.mktemp("serve-mix")
    found = {name: write_random_lora(root / name, **o) for name, o in ADAPTERS.items()}
    found["d1"] = save_random_dora_adapter(tiny_llama_dir, root / "d1", r=4, seed=13,
                                           target_modules=["q_proj", "up_proj"])
    found["other"] = save_random_llama(root / "other", default_model_dir, seed=1)
    found["b1"] = write_random_lora(root / "b1", r=2, target_modules=["v_proj"], seed=14)
    return {"tiny": tiny_llama_dir, **found}


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    args = ["--model", f"tiny={files['tiny']}", "--model", f"other={files['other']}",
            *[a for n in (*ADAPTERS, "d1") for a in ("--adapter", f"tiny:{n}={files[n]}")],
            "--adapter", f"other:b1={files['b1']}", "--pool-gb", str(POOL_GB),
            "--max-model-len", str(MAX_MODEL_LEN), "--block-size", "8"]
    proc = ServerProcess(args, tmp_path_factory.mktemp("log") / "server.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def offline(files) -> Engine:
    engine = Engine(files["tiny"], pool_gb=POOL_GB / 2, max_model_len=MAX_MODEL_LEN,
                    block_size=8)
    for name in (*ADAPTERS, "d1"):
        engine.add_adapter(name, files[name])
    return engine


def expected(engine: Engine, prompts: list, adapters: list) -> list[str]:
    return [o.text for o in engine.generate(prompts, adapters=adapters, sampling_params=GREEDY,
                                            progress=False)]


def test_openai_routes_take_a_mix_in_extra_body(server, offline):
    client = server.openai()
    prompt = "A mix of two adapters reads this"
    mix = {"a1": 0.7, "a2": 0.3}
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"adapters": mix})
    want = expected(offline, [prompt] * 3, [AdapterMix(mix), "a1", None])
    assert r.choices[0].text == want[0] and r.model == "tiny"
    assert want[0] not in want[1:]  # the mix answers unlike its parts
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=8,
                                         temperature=0, stream=True,
                                         extra_body={"adapters": mix})
    assert "".join(c.choices[0].text for c in streamed) == want[0]
    messages = [{"role": "user", "content": "Name a color."}]
    half = {"a2": 0.5}
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                          temperature=0, extra_body={"adapters": half})
    assert chat.choices[0].message.content == expected(offline, [messages],
                                                       [AdapterMix(half)])[0]
    # metrics label a mix by its names (a series per weight would grow without bound)
    text = server.metrics()
    assert 'adapter="a1+a2"' in text and "AdapterMix" not in text


def test_invocations_take_mixes_for_all_or_per_input(server, offline):
    inputs = ["First input", "Second input", "Third input"]
    mix = {"a2": 1.25, "a1": -0.5}
    r = server.post("/invocations", json={"inputs": inputs, "adapters": mix,
                                          "parameters": {"max_new_tokens": 8}})
    assert r.status_code == 200, r.text
    assert [x["generated_text"] for x in r.json()] == expected(offline, inputs,
                                                               [AdapterMix(mix)] * 3)
    per_input = [{"a1": 0.5}, "a2", None]
    r = server.post("/invocations", json={"inputs": inputs, "adapters": per_input,
                                          "model": "tiny", "parameters": {"max_new_tokens": 8}})
    assert r.status_code == 200, r.text
    assert [x["generated_text"] for x in r.json()] == expected(
        offline, inputs, [AdapterMix({"a1": 0.5}), "a2", None])


@pytest.mark.parametrize("route, body, status, message", [
    ("/v1/completions", {"model": "a1", "adapters": {"a2": 1.0}}, 400,
     "with 'adapters', 'model' names the base model; 'a1' is an adapter of 'tiny'"),
    ("/v1/completions", {"model": "tiny", "adapters": {"a1": 0.5, "zz": 0.5}}, 404,
     "adapters: adapter 'zz' is not loaded"),
    ("/v1/completions", {"model": "tiny", "adapters": {"b1": 0.5}}, 400,
     "adapter 'b1' belongs to base model 'other', not 'tiny'"),
    ("/v1/completions", {"model": "tiny", "adapters": {"tiny": 0.5}}, 400,
     "'tiny' is a base model, not an adapter"),
    ("/v1/completions", {"model": "tiny", "adapters": {}}, 400, "the mix names no adapter"),
    ("/v1/completions", {"model": "tiny", "adapters": {f"a{i}": 1 for i in range(9)}}, 404,
     "adapters: adapter 'a0' is not loaded"),
    ("/v1/completions", {"model": "tiny", "adapters": {"a1": "1"}}, 400,
     "adapters.a1: Input should be a valid number"),
    ("/v1/completions", {"model": "tiny", "adapters": {"d1": 0.5}}, 400,
     "adapter 'd1' is a DoRA adapter, which can only be used alone at weight 1"),
    ("/invocations", {"adapters": {"a1": 0.5, "b1": 0.5}, "model": "tiny"}, 400,
     "adapters {'b1': 'other'} (adapter: its base model) do not belong to base model 'tiny'"),
    ("/invocations", {"adapters": [{}, None], "model": "tiny"}, 400,
     "the mix names no adapter"),
])
def test_bad_mixes_are_refused_naming_what_is_wrong(server, route, body, status, message):
    payload = ({"prompt": "hi", "max_tokens": 2, **body} if route.startswith("/v1")
               else {"inputs": ["hi", "there"], **body})
    r = server.post(route, json=payload)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"], r.text


def test_a_weight_that_is_not_finite_is_refused(server, offline):
    raw = '{"model": "tiny", "prompt": "hi", "max_tokens": 2, "adapters": {"a1": NaN}}'
    r = server.post("/v1/completions", content=raw,
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert "the weight of adapter 'a1' is nan, not a finite number" in r.json()["error"][
        "message"]
    ok = server.post("/v1/completions", content=json.dumps(
        {"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0,
         "adapters": {"a1": 0.0}}), headers={"Content-Type": "application/json"})
    assert ok.status_code == 200  # weight 0: the base model's answer
    assert ok.json()["choices"][0]["text"] == offline.generate(
        ["hi"], sampling_params=SamplingParams(max_tokens=2, temperature=0),
        progress=False)[0].text
