"""Profile of pagedlora's decode steps on a throughput.py scenario: top ops and their share.

Builds the scenario's engine as ``throughput.py``'s pagedlora worker does (same adapters,
``max_num_seqs``, pool), admits its requests (``--num-requests``, default 32), runs the prefill
and a few decode steps to warm up, then records ``--steps`` decode steps with torch.profiler
and prints the ops by self CPU time (their share of the profiled wall time), the number of
ops per step, and each step's wall time with and without the profiler. Timings on a shared
machine are noise; the shares and op counts are the point.

    python benchmarks/profile_step.py --scenario mixed-4 --dtype bfloat16
    python benchmarks/profile_step.py --scenario mixed-4 --base-only --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    import throughput

    parser = throughput.scenario_parser(__doc__)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="decode steps profiled")
    parser.add_argument("--context", type=int, default=0,
                        help="decode steps run before the profile, so that contexts are this many "
                             "tokens longer than the prompts (throughput.py's runs reach 64)")
    parser.add_argument("--base-only", action="store_true", help="no adapters")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", type=Path, help="write a Chrome trace here")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from pagedlora import SamplingParams

    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(num_requests=args.num_requests, adapters_dir=args.adapters_dir,
                            model=None, dtype=args.dtype, threads=args.threads, rate=2.0,
                            cv=1.0)
    _, job = throughput.prepare(ns, args.scenario)
    engine = throughput.build_engine(job)
    names = [None] * len(job.prompts)
    if not args.base_only:
        for i, path in enumerate(job.adapter_paths):
            engine.add_adapter(f"a{i}", path)
        names = [None if a is None else f"a{a}" for a in job.adapters]
    n_out = args.steps + args.context + 13
    for p, a in zip(job.prompts, names, strict=True):
        engine.add_request(p, a, SamplingParams(max_tokens=n_out, temperature=0.0,
                                                ignore_eos=True))
    t0 = time.perf_counter()
    while True:  # the prefill(s), until a step is decodes only
        engine.step()
        last = engine.stats()["last_step"]
        if last["num_tokens"] == last["batch_size"]:
            break
    prefill_s = time.perf_counter() - t0
    for _ in range(args.context):
        engine.step()
    eager = []
    for _ in range(5):
        t0 = time.perf_counter()
        engine.step()
        eager.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        profiled_s = time.perf_counter() - t0
    batch = engine.stats()["last_step"]["batch_size"]
    events = prof.key_averages()
    total_us = profiled_s * 1e6
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"{args.scenario}, {args.dtype}, {'base only' if args.base_only else 'adapters'}, "
          f"{args.threads} threads, batch {batch}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"prefill {prefill_s * 1000:.0f} ms; decode step {statistics.median(eager) * 1000:.1f}"
          f" ms (median of 5, unprofiled), {profiled_s / args.steps * 1000:.1f} ms profiled; "
          f"{ops / args.steps:.0f} aten ops per step")
    print("\n| op | self CPU ms / step | share of the step | calls / step |")
    print("|---|---|---|---|")
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
    for e in rows:
        print(f"| `{e.key}` | {e.self_cpu_time_total / 1000 / args.steps:.2f} | "
              f"{e.self_cpu_time_total / total_us:.1%} | {e.count / args.steps:.0f} |")
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    from step_census import census

    counts = census(engine)
    print(f"\none more decode step counted (step_census.py): {counts.torch_ops} torch ops "
          f"(kernels on a GPU), {counts.triton_launches} Triton launches, "
          f"{counts.host_to_device} host-to-device copies ({counts.blocking_host_to_device} "
          f"blocking), {counts.device_to_host} reads back; {counts.batch_size} sequences")
    engine.close()


if __name__ == "__main__":
    main()
