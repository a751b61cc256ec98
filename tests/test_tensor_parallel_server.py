"""``pagedlora serve --tensor-parallel-size 2`` on the loopback: the official openai client gets
the tokens of a one-process engine, stats and metrics work, a worker that dies turns /health
to 503, and SIGTERM shuts the server down with its workers (checked by pid)."""

from __future__ import annotations

import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from support import ServerProcess, child_pids, spawned_workers, wait_gone, write_random_lora

from pagedlora import Engine, SamplingParams

ADAPTERS = {"col": dict(r=4, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"], seed=1),
            "row": dict(r=8, target_modules=["o_proj", "down_proj", "gate_proj"], seed=2)}
OPTIONS = ["--pool-gb", "0.02", "--block-size", "8", "--max-model-len", "128"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-serve")
    return {n: write_random_lora(root / n, **o) for n, o in ADAPTERS.items()}


def test_serve_with_two_ranks_answers_as_one_process(tiny_llama_dir, files, tmp_path):
    args = ["--model", f"tiny={tiny_llama_dir}", *OPTIONS, "--tensor-parallel-size", "2",
            *[a for n, p in files.items() for a in ("--adapter", f"{n}={p}")]]
    server = ServerProcess(args, tmp_path / "server.log")
    try:
        children = child_pids(server.proc.pid)  # with multiprocessing's resource tracker
        workers = spawned_workers(server.proc.pid)
        assert len(workers) == 2, workers  # the two ranks, spawned in rank order
        jobs = [(f"Question {i} about {i * 3}", [None, "col", "row"][i % 3]) for i in range(9)]
        client = server.openai()

        def ask(job):
            prompt, adapter = job
            r = client.completions.create(model=adapter or "tiny", prompt=prompt, max_tokens=8,
                                          temperature=0)
            return r.choices[0].text

        with ThreadPoolExecutor(9) as pool:
            got = list(pool.map(ask, jobs))
        with Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, max_model_len=128) as single:
            for name, path in files.items():
                single.add_adapter(name, path)
            outs = single.generate([p for p, _ in jobs], adapters=[a for _, a in jobs],
                                   sampling_params=SamplingParams(max_tokens=8, temperature=0),
                                   progress=False)
        assert got == [o.text for o in outs] and len(set(got)) > 3
        assert re.search(r'pagedlora_pool_pages\{kind="adapter",model="tiny"\} [1-9]',
                         server.metrics()), server.metrics()
        assert "Traceback" not in server.log_text()
        # a worker dies: its request fails naming it, then the model is down
        os.kill(workers[1], signal.SIGKILL)
        with pytest.raises(openai.InternalServerError, match="rank 1"):
            ask(jobs[1])
        health = server.get("/health")
        assert health.status_code == 503 and "rank 1" in health.text, health.text
        with pytest.raises(openai.APIStatusError, match="rank 1") as e:
            ask(jobs[2])
        assert e.value.status_code == 503
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) in (0, -signal.SIGTERM), server.log_text()
        assert wait_gone(children) == []
    finally:
        server.stop()
