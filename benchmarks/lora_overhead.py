"""What LoRA costs against the base model, measured side by side in one process.

Two engines of a throughput.py scenario (same pool, limits and requests; one serves each
request's adapter, the other the base model), each first warmed up on two requests as
throughput.py's runs are. Then each engine's prefill steps are timed (the steps with prompt
tokens; on the LoRA side they include the adapters' loads and layouts; base first, one total
per side, so this ratio is the noisier one), then ``--steps`` decode steps each, the engines
alternating which goes first. Ratios of medians taken this way survive the load of a shared
machine, which moves separate runs of throughput.py by more than the differences measured
here (docs/benchmarks.md). Prints per side the prefill seconds and the
median decode step, and base / LoRA for both; ``--json`` writes them.

    python benchmarks/lora_overhead.py --scenario mixed-4 --dtype float32
    python benchmarks/lora_overhead.py --scenario many --num-requests 64
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--num-requests", type=int, default=None,
                        help="default: the scenario's, at most its max_num_seqs (one decode batch)")
    parser.add_argument("--steps", type=int, default=40, help="decode steps per engine")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()

    import torch

    from pagedlora import SamplingParams

    torch.set_num_threads(args.threads)
    sc = throughput.SCENARIOS[args.scenario]
    ns = argparse.Namespace(num_requests=args.num_requests or min(sc.spec.num_requests,
                                                                  sc.max_num_seqs),
                            adapters_dir=args.adapters_dir, model=None, dtype=args.dtype,
                            threads=args.threads, rate=2.0, cv=1.0)
    _, job = throughput.prepare(ns, args.scenario)
    engines = {"lora": throughput.build_engine(job), "base": throughput.build_engine(job)}
    for i, path in enumerate(job.adapter_paths):
        engines["lora"].add_adapter(f"a{i}", path)
    names = {"lora": throughput.request_adapters(job), "base": [None] * len(job.prompts)}
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
    prefill = {}
    for side in ("base", "lora"):  # first-call costs outside the timing, as throughput.py's
        engines[side].generate(job.prompts[:2], names[side][:2], params, progress=False)
    for side in ("base", "lora"):
        engine = engines[side]
        for prompt, name in zip(job.prompts, names[side], strict=True):
            engine.add_request(prompt, name, params)
        prefill[side] = 0.0
        while True:  # the steps with prompt tokens; the first decodes-only one is not counted
            t0 = time.perf_counter()
            engine.step()
            last = engine.stats()["last_step"]
            if last["num_tokens"] == last["batch_size"]:
                break
            prefill[side] += time.perf_counter() - t0
        if engine.stats()["requests_waiting"]:
            raise RuntimeError(f"{side}: requests still waiting after the prefill")
    steps: dict[str, list[float]] = {"lora": [], "base": []}
    for i in range(args.steps):
        for side in ("lora", "base") if i % 2 == 0 else ("base", "lora"):
            t0 = time.perf_counter()
            engines[side].step()
            steps[side].append(time.perf_counter() - t0)
    decode = {side: statistics.median(v) for side, v in steps.items()}
    batch = engines["lora"].stats()["last_step"]["batch_size"]
    if engines["base"].stats()["last_step"]["batch_size"] != batch:
        raise RuntimeError("the LoRA and base engines decoded different batches")
    result = dict(scenario=args.scenario, dtype=args.dtype, threads=args.threads, batch=batch,
                  load_average=os.getloadavg()[0], prefill_s=prefill, decode_step_s=decode,
                  prefill_base_over_lora=prefill["base"] / prefill["lora"],
                  decode_base_over_lora=decode["base"] / decode["lora"])
    print(f"{args.scenario}, {args.dtype}, {args.threads} threads, batch {batch}, load average "
          f"{result['load_average']:.2f}: prefill LoRA {prefill['lora']:.2f} s, base "
          f"{prefill['base']:.2f} s (base / LoRA {result['prefill_base_over_lora']:.3f}); decode "
          f"step LoRA {decode['lora'] * 1e3:.1f} ms, base {decode['base'] * 1e3:.1f} ms (base / "
          f"LoRA {result['decode_base_over_lora']:.3f}, medians of {args.steps})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
