"""pagedlora on Ray Serve: a local Ray (2 CPUs, started once for the module), the tiny random
Llama, two engine replicas behind the ingress on the loopback. Greedy answers must equal
``Engine.generate`` offline; routing is observed through the replicas' own stats (their
reports at /replicas), never through timing."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from support import write_random_lora

from pagedlora import Engine, SamplingParams

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from pagedlora.ray_serve import RayServeConfig, build_application  # noqa: E402
from pagedlora.server.config import AdapterSource, ServerConfig  # noqa: E402

POOL_GB, MAX_MODEL_LEN = 0.02, 512
ENGINE_OPTIONS = dict(block_size=8, max_model_len=MAX_MODEL_LEN, max_num_seqs=8)
ADAPTERS = {"a1": dict(r=2, target_modules=["q_proj", "v_proj"], seed=1),
            "a2": dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"], seed=2),
            "a3": dict(r=4, target_modules=["o_proj", "down_proj"], seed=3),
            "a4": dict(r=16, target_modules=["gate_proj", "up_proj"], seed=4)}
GREEDY = SamplingParams(max_tokens=8, temperature=0)
APP = "pagedlora"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ray")
    return {"tiny": tiny_llama_dir, **{name: write_random_lora(root / name, **spec)
                                       for name, spec in ADAPTERS.items()},
            "late": write_random_lora(root / "late", r=3, target_modules=["v_proj"], seed=6)}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray with 2 CPUs and Ray Serve's HTTP proxy on a free loopback port."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def server_config(files, **overrides) -> ServerConfig:
    adapters = tuple(AdapterSource("tiny", files[n], n) for n in ADAPTERS)
    return ServerConfig(models={"tiny": files["tiny"]}, adapters=adapters, pool_gb=POOL_GB,
                        max_queue=64, engine_options=ENGINE_OPTIONS,
                        shutdown_timeout_s=30, **overrides)


@pytest.fixture(scope="module")
def url(cluster, files):
    """Two replicas of "tiny" routed by adapter, half a CPU each."""
    config = RayServeConfig(server_config(files), num_replicas=2, cpus_per_replica=0.5)
    serve.run(build_application(config), name=APP, route_prefix="/")
    yield cluster
    serve.delete(APP)


@pytest.fixture(scope="module")
def offline(files) -> Engine:
    engine = Engine(files["tiny"], pool_gb=POOL_GB, **ENGINE_OPTIONS)
    for name in [*ADAPTERS, "late"]:
        engine.add_adapter(name, files[name])
    return engine


def expected(engine: Engine, prompts: list, adapters: list, sp=GREEDY) -> list[str]:
    return [o.text for o in engine.generate(prompts, adapters=adapters, sampling_params=sp,
                                            progress=False)]


def complete(url: str, model: str, prompt, **kwargs) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kwargs}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def reports(url: str) -> dict[str, dict]:
    """Replica id -> its latest report."""
    return httpx.get(f"{url}/replicas", timeout=30).json()["models"]["tiny"]["replicas"]


def served(url: str) -> dict[str, dict[str, int]]:
    """Replica id -> adapter -> requests its engine has served (its own counters)."""
    return {rid: {a: u["requests"] for a, u in r["adapters"].items()}
            for rid, r in reports(url).items()}


def test_answers_equal_engine_generate_for_mixed_adapters(url, offline, files):
    models = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
    assert {m["id"]: m["parent"] for m in models} == {"tiny": None, **dict.fromkeys(ADAPTERS,
                                                                                     "tiny")}
    cases = [(f"Prompt {i} for {m}", m) for i, m in enumerate(["tiny", *ADAPTERS] * 3)]
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: client.post(f"{url}/v1/completions", json={
            "model": c[1], "prompt": c[0], "max_tokens": 8, "temperature": 0}).json(), cases))
    want = expected(offline, [p for p, _ in cases], [None if m == "tiny" else m
                                                     for _, m in cases])
    assert [a["choices"][0]["text"] for a in answers] == want
    # one /invocations request whose inputs use different adapters: split across replicas
    # by adapter, merged back in input order
    inputs, adapters = ["One", "Two", "Three", "Four"], ["a1", "a2", "", "a1"]
    r = httpx.post(f"{url}/invocations", timeout=120, json={
        "inputs": inputs, "adapters": adapters,
        "parameters": {"max_new_tokens": 8, "do_sample": False}})
    assert r.status_code == 200, r.text
    assert [x["generated_text"] for x in r.json()] == expected(
        offline, inputs, [a or None for a in adapters])
    # an adapter loaded at run time is served by whichever replica gets it
    r = httpx.post(f"{url}/v1/load_lora_adapter", timeout=120,
                   json={"lora_name": "late", "lora_path": str(files["late"])})
    assert r.status_code == 200, r.text
    assert complete(url, "late", "Late one").json()["choices"][0]["text"] == expected(
        offline, ["Late one"], ["late"])[0]
    bad = httpx.post(f"{url}/v1/load_lora_adapter", timeout=120,
                     json={"lora_name": "bad", "lora_path": str(files["tiny"])})
    assert bad.status_code == 400 and "bad" in bad.json()["error"]["message"]
    assert complete(url, "nope", "x").status_code == 404
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late"},
                      timeout=60).status_code == 200
    assert complete(url, "late", "x").status_code == 404
    # the ingress counts what the replicas finished, as pagedlora serve's /metrics does
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "pagedlora_requests_total":
                adapter = sample.labels["adapter"]
                counts[adapter] = counts.get(adapter, 0) + sample.value
    assert counts["a1"] == 3 + 2 and counts["late"] == 1  # finished, stop or length


def test_requests_for_an_adapter_land_on_the_replica_that_holds_it(url, files):
    fresh = {"f1": 11, "f2": 12}  # adapters no replica has served yet
    for name, seed in fresh.items():
        path = write_random_lora(files["late"].parent / name, r=4, seed=seed,
                                 target_modules=["q_proj", "k_proj"])
        assert httpx.post(f"{url}/v1/load_lora_adapter", timeout=120, json={
            "lora_name": name, "lora_path": str(path)}).status_code == 200
    for name in [*ADAPTERS, *fresh]:  # warm-up: each loaded where Ray's router sends it
        assert complete(url, name, f"Warm {name}").status_code == 200
    time.sleep(2)  # settle: the replicas' adapter sets reach the router (pushed every 0.1 s)
    before, loads_before = served(url), source_loads(url)
    for i in range(3):
        for name in [*ADAPTERS, *fresh]:
            assert complete(url, name, f"Again {i} {name}").status_code == 200
    after = served(url)
    for name in [*ADAPTERS, *fresh]:
        holders = {rid for rid, used in before.items() if used.get(name, 0)}
        grew = {rid: after[rid].get(name, 0) - before.get(rid, {}).get(name, 0)
                for rid in after}
        # every request went to a replica that held the adapter already
        assert sum(grew.values()) == 3 and {rid for rid, n in grew.items() if n} <= holders, \
            (name, before, after)
    for name in fresh:  # served once, by one replica: that one got all the others
        assert sum(1 for used in before.values() if used.get(name)) == 1, before
    assert source_loads(url) == loads_before  # no replica read an adapter's source again
    assert len(after) == 2 and all(after.values())  # both replicas serve adapters


def test_an_adapter_loaded_again_with_other_weights_is_served_with_them_everywhere(
        url, files, tmp_path):
    """Each call carries the content key the ingress validated: a replica holding the old
    weights under the name registers the new ones before answering."""
    path = tmp_path / "swap"
    old = write_random_lora(path, r=4, seed=31, target_modules=["q_proj", "v_proj"])
    body = {"lora_name": "swap", "lora_path": str(old)}
    assert httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120).status_code == 200
    prompts = [f"Swap {i}" for i in range(6)]
    for p in prompts:  # some replica(s) now hold the old weights
        assert complete(url, "swap", p).status_code == 200
    write_random_lora(path, r=4, seed=32, target_modules=["q_proj", "v_proj"])  # rewritten
    again = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120)
    assert again.status_code == 400 and "load_inplace" in again.text  # as pagedlora serve
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={**body, "load_inplace": True},
                      timeout=120).status_code == 200
    new = Engine(files["tiny"], pool_gb=POOL_GB, **ENGINE_OPTIONS)
    new.add_adapter("swap", path)
    answers = [complete(url, "swap", p).json()["choices"][0]["text"] for p in prompts]
    assert answers == expected(new, prompts, ["swap"] * len(prompts))


def source_loads(url: str) -> dict[str, int]:
    """Replica id -> its pool loads of adapters read from their sources."""
    return {rid: r["loads"]["from_source"] for rid, r in reports(url).items()}


def stream_lines(client: httpx.Client, url: str, body: dict):
    """The data lines of a streamed completion, as a generator (kept open by the caller)."""
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                yield line[6:]


def adapters_on_each_replica(url: str, files) -> tuple[str, str, str]:
    """Two adapters, each held by one replica only, and not the same one (so Ray routes
    each to its holder): ``(adapter of replica V, adapter of the other, V)``. Loads fresh
    adapters until there are (Ray sends a new one to the replica holding fewest). Only
    adapters whose files are in the module's folder (the caller loads them offline from
    there; another test's adapter, e.g. "swap", lives elsewhere)."""
    folder = files["late"].parent
    for i in range(4):
        loaded = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
                  if (folder / m["id"]).is_dir()}
        holders: dict[str, set] = {}
        for rid, used in served(url).items():
            for name in set(used) & loaded:
                holders.setdefault(name, set()).add(rid)
        mine = {}
        for name, rids in sorted(holders.items()):
            if len(rids) == 1:
                mine.setdefault(next(iter(rids)), name)
        if len(mine) == 2:
            (v, a), (_, b) = sorted(mine.items())
            return a, b, v
        path = write_random_lora(folder / f"k{i}", r=2, seed=20 + i,
                                 target_modules=["v_proj"])
        assert httpx.post(f"{url}/v1/load_lora_adapter", timeout=120, json={
            "lora_name": f"k{i}", "lora_path": str(path)}).status_code == 200
        assert complete(url, f"k{i}", "Warm").status_code == 200
        time.sleep(2)  # settle, as above
    raise AssertionError(f"no two replicas hold adapters of their own: {served(url)}")


def test_a_replica_killed_mid_stream_fails_its_stream_and_the_service_keeps_answering(
        url, offline, files):
    doomed_adapter, other, victim = adapters_on_each_replica(url, files)
    pid = reports(url)[victim]["pid"]
    retries = httpx.get(f"{url}/replicas", timeout=30).json()["models"]["tiny"]["retries"]
    long = {"max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.Client(timeout=120) as client, ExitStack() as streams:
        # 8 prompts fill the victim's batch (max_num_seqs=8); "Queued" waits behind them
        doomed = stream_lines(client, url, {"model": doomed_adapter, **long,
                                            "prompt": [f"Doomed {i}" for i in range(8)]})
        safe = stream_lines(client, url, {"model": other, "prompt": "Safe", **long})
        assert json.loads(next(doomed))["choices"][0]["text"] is not None
        first_safe = next(safe)
        queued = streams.enter_context(client.stream("POST", f"{url}/v1/completions", json={
            "model": doomed_adapter, "prompt": "Queued", "max_tokens": 8, "stream": True,
            "temperature": 0}))  # entered: the victim's engine has queued it
        assert queued.status_code == 200
        os.kill(pid, signal.SIGKILL)
        rest = list(doomed)
        safe_rest = [first_safe, *safe]
        queued_rest = [line[6:] for line in queued.iter_lines() if line.startswith("data: ")]
    # the killed replica's stream ends with an error naming it, then [DONE]
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2]).get("error")
    assert error is not None, (len(rest), rest[-3:])
    assert victim in error["message"] and "died" in error["message"], error
    for name in (doomed_adapter, other):  # a fresh adapter of this module, maybe
        if name not in offline.adapters.names:
            offline.add_adapter(name, files["late"].parent / name)
    # the request that had no token yet was sent again, once, and its client sees a whole,
    # right answer
    assert queued_rest[-1] == "[DONE]" and "error" not in queued_rest[-2], queued_rest[-3:]
    assert "".join(json.loads(x)["choices"][0]["text"] for x in queued_rest[:-1]) == \
        expected(offline, ["Queued"], [doomed_adapter])[0]
    assert httpx.get(f"{url}/replicas", timeout=30).json()["models"]["tiny"]["retries"] \
        == retries + 1
    # the other replica's stream is complete, and right
    chunks = [json.loads(x) for x in safe_rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == expected(offline, ["Safe"], [other], SamplingParams(
        max_tokens=MAX_MODEL_LEN - 16, ignore_eos=True, temperature=0))[0]
    # and the service keeps answering, the victim's adapter included
    for name in (doomed_adapter, other, "tiny"):
        r = complete(url, name, f"After {name}")
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected(
            offline, [f"After {name}"], [None if name == "tiny" else name])[0]


def replica_states(deployment: str, app: str) -> dict[str, int]:
    status = serve.status().applications[app].deployments[deployment]
    return {str(k): v for k, v in status.replica_states.items()}


def test_autoscaling_adds_a_replica_under_load_and_removes_it_when_idle(cluster, files):
    serve.delete(APP)  # the module's 2-replica app: this test runs last, with the CPUs
    app = "scaled"
    config = RayServeConfig(server_config(files), min_replicas=1, max_replicas=2,
                            target_ongoing_requests=1, upscale_delay_s=0,
                            downscale_delay_s=2, metrics_interval_s=0.2,
                            look_back_period_s=1, cpus_per_replica=0.5, app_name=app)
    serve.run(build_application(config), name=app, route_prefix="/")
    deployment = "EngineReplica-tiny"
    results: list[int] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(timeout=120) as client:
            i = 0
            while not stop.is_set() and i < 400:  # bounded
                r = client.post(f"{cluster}/v1/completions", json={
                    "model": ["a1", "a2", "tiny"][worker % 3], "prompt": f"Load {worker} {i}",
                    "max_tokens": 64, "ignore_eos": True})
                results.append(r.status_code)
                i += 1

    def wait_for(running: int, what: str) -> None:
        deadline = time.monotonic() + 120
        while replica_states(deployment, app) != {"RUNNING": running}:
            assert time.monotonic() < deadline, (what, replica_states(deployment, app))
            time.sleep(0.2)

    # serve.run returns once min_replicas run; the ingress's start-up calls to the replica
    # can count as load (upscale_delay_s=0) and start a second one: begin from one, settled
    wait_for(1, "the app never settled at its minimum of one replica")
    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in workers:
        t.start()
    try:
        wait_for(2, "sustained load never brought up the second replica")
        for _ in range(10):  # both serve for a while
            time.sleep(0.2)
        stop.set()
        for t in workers:
            t.join(120)
        # idle but for one request at a time: one replica is enough; the other drains first
        stop.clear()
        trickle = threading.Thread(target=load, args=(0,))
        trickle.start()
        wait_for(1, "idleness never took the second replica down")
        stop.set()
        trickle.join(120)
    finally:
        stop.set()
        serve.delete(app)
    assert results and set(results) == {200}, sorted(set(results))
