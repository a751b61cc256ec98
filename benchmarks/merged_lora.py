"""Merged against unmerged LoRA against the base model, round-robin in one process.

One engine serves a scenario's requests (``throughput.py``'s traces: "hot-1", all 32 requests
of mixed-4 on one rank-32 adapter of all seven projections; "mixed-4", its four adapters) in
three modes, one ``generate`` call each, in a rotating order for ``--rounds`` rounds, so that
every ratio compares runs minutes apart at most (``throughput.py`` starts a process per system):

    unmerged  ``merge_policy="never"``: the LoRA added on every step.
    merged    ``merge_policy="auto"``, its merged copies and credit dropped before the run, so
              the run pays for its own merge (the adapter runs ``MERGE_AFTER_STEPS`` steps
              unmerged first).
    base      the same prompts on the base model alone.

Prints per mode the median output tokens/s and decode-step time over the rounds, the median of
the per-round ratios, the merged runs' merged steps, switches and seconds spent merging, and
whether the merged runs' greedy tokens equal the unmerged ones.

    python benchmarks/merged_lora.py --scenario hot-1,mixed-4 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from throughput import SCENARIOS, prepare, request_adapters  # noqa: E402

MODES = ("unmerged", "merged", "base")


def run_mode(engine, job, mode: str) -> dict:
    """One ``generate`` of the job's requests in ``mode``; tokens/s, the median decode-step
    time, the merge counters of the run and the greedy tokens."""
    from pagedlora import SamplingParams
    from pagedlora.merge_policy import MergePolicy

    engine.core.drop_merged()
    engine.core.merging = MergePolicy("auto" if mode == "merged" else "never")
    names = [None] * len(job.prompts) if mode == "base" else request_adapters(job)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in job.output_lens]
    before, steps_before = engine.stats()["merge"], engine.stats()["num_steps"]
    start = time.perf_counter()
    outs = engine.generate(job.prompts, names, params, progress=False)
    seconds = time.perf_counter() - start
    stats = engine.stats(history=True)
    steps = stats["steps"][-(stats["num_steps"] - steps_before):]
    decode = [s["seconds"] for s in steps if s["num_tokens"] == s["batch_size"]]
    merge = {k: stats["merge"][k] - before[k] for k in
             ("merged_steps", "merges", "reuses", "unmerges", "switches", "merge_seconds")}
    return {"tok_s": sum(len(o.token_ids) for o in outs) / seconds, "seconds": seconds,
            "decode_ms": 1000 * statistics.median(decode), "steps": len(steps), **merge,
            "merged_bytes": stats["merge"]["merged_bytes"],
            "tokens": [o.token_ids for o in outs]}


def run_scenario(args, name: str) -> None:
    from pagedlora import Engine, SamplingParams

    spec, job = prepare(args, name)
    engine = Engine(job.model_dir, pool_gb=job.pool_gb, dtype=job.dtype,
                    max_num_seqs=job.max_num_seqs, max_loras=job.max_loras,
                    max_lora_rank=job.max_lora_rank, enable_prefix_caching=False)
    for i, path in enumerate(job.adapter_paths):
        engine.add_adapter(f"a{i}", path)
    warm = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    engine.generate(job.prompts[:2], request_adapters(job)[:2], warm, progress=False)
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES[r % 3:] + MODES[: r % 3]:  # rotate, so no mode always runs first
            print(f"{name}: round {r + 1}/{args.rounds}, {mode} ...", file=sys.stderr, flush=True)
            runs[mode].append(run_mode(engine, job, mode))
    print(f"\nscenario {name}, {spec.num_requests} requests x {job.output_lens[0]} tokens, "
          f"{args.dtype}, {args.threads} threads, {args.rounds} rounds, "
          f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.2f}")
    print("\n| mode | output tok/s (median) | decode step ms (median) | runs tok/s |")
    print("|---|---|---|---|")
    for mode in MODES:
        rs = runs[mode]
        each = ", ".join(f"{x['tok_s']:.1f}" for x in rs)
        print(f"| {mode} | {statistics.median(x['tok_s'] for x in rs):.1f} | "
              f"{statistics.median(x['decode_ms'] for x in rs):.1f} | {each} |")
    for a, b in (("merged", "unmerged"), ("merged", "base"), ("unmerged", "base")):
        ratios = [x["tok_s"] / y["tok_s"] for x, y in zip(runs[a], runs[b], strict=True)]
        print(f"{a} / {b}: {statistics.median(ratios):.1%} (rounds: "
              f"{', '.join(f'{q:.1%}' for q in ratios)})")
    for i, m in enumerate(runs["merged"]):
        print(f"merged run {i + 1}: {m['merged_steps']} of {m['steps']} steps merged, "
              f"{m['switches']} switches ({m['merges']} merges, {m['reuses']} reuses, "
              f"{m['unmerges']} unmerges), {m['merge_seconds']:.3f} s merging (unmerging is "
              f"free), merged copies {m['merged_bytes'] / 2**20:.0f} MiB")
    same = [x["tokens"] == y["tokens"] for x, y in zip(runs["merged"], runs["unmerged"],
                                                       strict=True)]
    print(f"merged runs with the unmerged runs' greedy tokens: {sum(same)} of {len(same)}")
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="hot-1,mixed-4",
                        help=f"comma-separated, from {sorted(SCENARIOS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-requests", type=int, help="override the scenario's")
    parser.add_argument("--model", default=None, help="HF dir or .gguf (default: SmolLM2)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--adapters-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "pagedlora-bench-adapters")
    args = parser.parse_args()
    # prepare() also builds an online trace; these fields only shape it
    args.rate, args.cv = 2.0, 1.0
    import torch

    torch.set_num_threads(args.threads)
    for name in args.scenario.split(","):
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; choose from {sorted(SCENARIOS)}")
        run_scenario(args, name)


if __name__ == "__main__":
    main()
