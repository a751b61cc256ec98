"""The GPU benchmark's driver, end to end through its CPU dry run (tiny Llama, torch kernels):
its check of the Triton kernels against the torch ones (through the interpreter) ran and
agreed, every (setting, n, mode) row is there with sane numbers, and the adapters made by hard
links are distinct adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py"


def test_dry_run_rows(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_bench.json").read_text())
    plan = result["plan"]
    check = result["backend_check"]
    assert check["tokens_equal"] == "8/8", check
    assert check["backends"] == ["triton", "torch"], check
    assert check["max_logprob_diff"] <= check["atol"], check
    # What a step launched (step_census.py), counted on the check's Triton engine: the tiny
    # Llama has 2 layers, S2's four adapters target q, k, v and o, no request mixes adapters:
    # per layer one KV write, one attention per group, one shrink and one expand per module.
    counted = check["triton_census"]
    assert counted["decode"]["triton_launches"] == 2 * (1 + 1 + 2 * 4), counted
    # the 1-token prompt is a decode-shaped group beside the prefills: two attention groups
    assert counted["prefill"]["triton_launches"] == 2 * (1 + 2 + 2 * 4), counted
    batch = result["step_census"]
    assert batch["decode"]["num_tokens"] == batch["decode"]["batch_size"] == plan["max_num_seqs"]
    for c in (*counted.values(), batch["prefill"], batch["decode"]):
        assert c["torch_ops"] > 0, c
        # the CPU is host and device: nothing is copied or read back
        assert c["host_to_device"] == c["device_to_host"] == 0, c
    assert "One step's work" in (out / "gpu_bench.md").read_text()
    rows = {(r["setting"], r["n"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(s, n, m) for s in ("S1", "S2") for n in (5, 100, 1000)
                         for m in ("offline", "online")}
    for key, r in rows.items():
        assert "skipped" not in r, key
        assert r["requests"] == plan["num_requests"]
        assert r["finished"] == r["requests"] and not r["capped"], key
        assert r["output_tokens"] > 0 and r["output_tok_s"] > 0 and r["req_s"] > 0, key
        assert 0.0 <= r["slo_attainment"] <= 1.0, key
        assert 0 < r["ttft_p50"] <= r["ttft_p90"] and 0 < r["tpot_p50"] <= r["tpot_p90"], key
        assert 1 <= r["adapters_used"] <= min(r["n"], r["requests"]), key
        # each run starts with no adapter in the pool: every adapter it uses is loaded once
        assert r["adapter_loads"] == r["adapters_used"], key
        assert 0 < r["peak_pool_used"] <= 1 and r["mean_batch"] >= 1, key
    # the n=1000 folders: 1000 adapters from few weight files, each its own lora_alpha
    s2 = tmp_path / "work" / "adapters-dry-run-S2"
    assert len(list(s2.glob("a*"))) == 1000
    assert len(list((s2 / "weights").iterdir())) == 4 * plan["distinct_weights"]
    alphas = {json.loads((d / "adapter_config.json").read_text())["lora_alpha"]
              for d in s2.glob("a*")}
    assert len(alphas) == 1000
    assert "| S2 | 1000 | online |" in (out / "gpu_bench.md").read_text()


def test_dry_run_over_two_ranks(tmp_path):
    """--tensor-parallel-size 2: the same flow with the model split over two CPU workers."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--out", str(out),
                           "--work-dir", str(tmp_path / "work"), "--num-adapters", "5",
                           "--tensor-parallel-size", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "gpu_bench.json").read_text())
    assert result["environment"]["tensor_parallel_size"] == 2
    rows = result["rows"]
    assert len(rows) == 4 and all(r["finished"] == r["requests"] for r in rows), rows
    assert "tensor parallel 2" in (out / "gpu_bench.md").read_text()
