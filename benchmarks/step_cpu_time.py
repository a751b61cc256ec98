"""CPU time of pagedlora's decode and prefill steps, engines side by side in one process.

For a shared machine, where wall times of two-thread runs swing by several times with the
other jobs: each variant's engine (``--variants``) serves throughput.py's scenario (32 requests
by default); their decode steps are timed interleaved, one step of each in turn, in process CPU
time (``time.process_time``) on one intra-op thread, and the minimum and median are reported;
then each prefills the same prompts again on the base model, twice. CPU time still moves with
cache and memory-bandwidth contention, so compare variants of one invocation only.

Variants: "packed" (the engine as it is) and "unpacked" (the same, its projections through
``F.linear`` instead of weights prepacked for oneDNN, also merged copies, see
:class:`pagedlora.packed_linear.PackedLinear`).

    python benchmarks/step_cpu_time.py --dtype bfloat16 --variants unpacked,packed
    python benchmarks/step_cpu_time.py --dtype float32 --base-only --variants packed
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
VARIANTS = ("packed", "unpacked")


def main() -> None:
    import throughput

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="mixed-4", choices=sorted(throughput.SCENARIOS))
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--variants", default="unpacked,packed",
                        help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--base-only", action="store_true", help="no adapters")
    parser.add_argument("--steps", type=int, default=12, help="decode steps per variant")
    parser.add_argument("--adapters-dir", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "pagedlora-bench-adapters")
    args = parser.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}; choose from {VARIANTS}")

    import torch

    from pagedlora import Engine, SamplingParams

    torch.set_num_threads(1)
    ns = argparse.Namespace(num_requests=args.num_requests, adapters_dir=args.adapters_dir,
                            model=None, dtype=args.dtype, threads=1, rate=2.0, cv=1.0)
    _, job = throughput.prepare(ns, args.scenario)
    engines = []
    for variant in variants:
        engine = Engine(job.model_dir, pool_gb=job.pool_gb, dtype=job.dtype,
                        max_num_seqs=job.max_num_seqs, max_loras=job.max_loras,
                        max_lora_rank=job.max_lora_rank, max_cpu_loras=job.max_cpu_loras,
                        enable_prefix_caching=False)
        if variant == "unpacked":
            engine.model.linear._packed.clear()
            engine.model.linear.enabled = False  # nor packs a merged copy later
        names = [None] * len(job.prompts)
        if not args.base_only:
            for i, path in enumerate(job.adapter_paths):
                engine.add_adapter(f"a{i}", path)
            names = [None if a is None else f"a{a}" for a in job.adapters]
        params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
        for prompt, name in zip(job.prompts, names, strict=True):
            engine.add_request(prompt, name, params)
        for _ in range(3):  # the prefill and two decodes
            engine.step()
        engines.append(engine)
    decode = [[] for _ in engines]
    for _ in range(args.steps):
        for i, engine in enumerate(engines):
            t0 = time.process_time()
            engine.step()
            decode[i].append(time.process_time() - t0)
    prefill = [[] for _ in engines]
    short = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        for i, engine in enumerate(engines):
            while engine.has_unfinished():
                engine.step()
            for prompt in job.prompts:
                engine.add_request(prompt, None, short)
            t0 = time.process_time()
            engine.step()
            prefill[i].append(time.process_time() - t0)
    print(f"{args.scenario}, {args.dtype}, {'base only' if args.base_only else 'adapters'}, "
          f"{len(job.prompts)} requests, 1 thread, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| variant | decode step CPU ms, min / median | prefill step CPU ms, min |")
    print("|---|---|---|")
    for variant, d, p in zip(variants, decode, prefill, strict=True):
        print(f"| {variant} | {min(d) * 1e3:.1f} / {statistics.median(d) * 1e3:.1f} | "
              f"{min(p) * 1e3:.0f} |")
    for engine in engines:
        engine.close()


if __name__ == "__main__":
    main()
