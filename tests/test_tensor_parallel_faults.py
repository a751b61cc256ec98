"""Tensor-parallel faults on the CPU (gloo, 2 workers): a worker killed or hung mid-generate
ends the running requests with "error" naming its rank, within the timeout; later calls
raise EngineDeadError; no worker process and no shared memory is left, checked by pid, also
when the driver itself is killed outright."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from support import (
    child_pids,
    process_alive,
    random_prompt,
    shm_of,
    wait_gone,
    write_random_lora,
)

from pagedlora import Engine, SamplingParams
from pagedlora.errors import EngineDeadError

LONG = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return write_random_lora(tmp_path_factory.mktemp("tp-fault") / "a", r=4,
                             target_modules=["q_proj", "o_proj", "down_proj"], seed=1)


def _fail_mid_generate(engine: Engine, fault) -> tuple[dict, float]:
    """Streams three requests; after the first output calls ``fault()``; returns the
    outputs by prompt index and the seconds from the fault to the last output."""
    done, faulted = {}, None
    for d in engine.stream([random_prompt(6, 1), random_prompt(9, 2), random_prompt(4, 3)],
                           adapters=["a", None, "a"], sampling_params=LONG):
        if faulted is None:
            fault()
            faulted = time.monotonic()
        if d.finished:
            done[d.index] = d.output
    return done, time.monotonic() - faulted


def _assert_dead_and_clean(engine: Engine, pids: list[int], match: str) -> None:
    with pytest.raises(EngineDeadError, match=match):
        engine.generate("again", sampling_params=LONG, progress=False)
    with pytest.raises(EngineDeadError, match=match):
        engine.step()
    stats = engine.stats()
    assert stats["requests_running"] == stats["requests_waiting"] == 0
    assert stats["pages_kv"] == stats["pages_kv_cached"] and engine.outputs.num_live == 0
    assert wait_gone(pids) == [] and shm_of(pids) == []
    engine.close()  # idempotent after a fault


def test_a_killed_worker_ends_the_requests_with_an_error_naming_its_rank(tiny_llama_dir, lora):
    engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, tensor_parallel_size=2,
                    worker_timeout_s=120)
    engine.add_adapter("a", lora)
    pids = engine.core.runner.pids
    done, seconds = _fail_mid_generate(engine, lambda: os.kill(pids[1], signal.SIGKILL))
    assert sorted(done) == [0, 1, 2]
    for out in done.values():
        assert out.finish_reason == "error", out
        assert "tensor-parallel worker rank 1" in out.error and "killed by signal 9" in out.error
        assert len(out.token_ids) < LONG.max_tokens
    assert seconds < 120  # the dead process was noticed, not waited out
    _assert_dead_and_clean(engine, pids, "rank 1")


def test_a_hung_worker_is_named_after_the_timeout(tiny_llama_dir, lora):
    """Rank 0 stops (SIGSTOP): rank 1's collective times out after worker_timeout_s and says
    so; the driver names rank 0, the silent one, and kills both."""
    engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, tensor_parallel_size=2,
                    worker_timeout_s=2)
    engine.add_adapter("a", lora)
    pids = engine.core.runner.pids
    done, seconds = _fail_mid_generate(engine, lambda: os.kill(pids[0], signal.SIGSTOP))
    for out in done.values():
        assert out.finish_reason == "error"
        assert "rank 0 did not answer the step within 2 s (hung)" in out.error
        assert "rank 1's collective failed waiting for it" in out.error
    assert 2 <= seconds < 60
    _assert_dead_and_clean(engine, pids, "rank 0 did not answer")


DRIVER = """
import json, sys, torch
torch.set_num_threads(1)
from pagedlora import Engine, SamplingParams
engine = Engine(sys.argv[1], pool_gb=0.02, block_size=8, tensor_parallel_size=2)
print(json.dumps(engine.core.runner.pids), flush=True)
while True:
    engine.generate([[5, 6, 7]], sampling_params=SamplingParams(max_tokens=50), progress=False)
"""


def test_a_driver_killed_outright_leaves_no_worker(tiny_llama_dir):
    """SIGKILL (no cleanup at all) on a driver in the middle of generating: its workers see
    their parent go and exit; no shared memory is left."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tiny_llama_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 2 and all(process_alive(p) for p in pids)
        children = child_pids(proc.pid)  # the workers and multiprocessing's resource tracker
        assert set(pids) < set(children)
        time.sleep(0.5)  # generating
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_gone(children) == [] and shm_of([proc.pid, *pids]) == []
