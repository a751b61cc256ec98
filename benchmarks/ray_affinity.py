"""The "many" trace through two Ray Serve replicas, routed by adapter (model multiplexing)
against adapter-blind round robin, in one run: adapter loads per request, output tokens/s,
TTFT p50/p90. The consolidation effect adapter routing exists for (Punica section 5, dLoRA's
request-adapter co-location).

Starts a local Ray (``--cpus`` CPUs) and Ray Serve on a free loopback port; for each routing
in turn deploys ``pagedlora.ray_serve`` with two replicas of SmolLM2-135M-Instruct (the "many"
scenario's engine limits of ``throughput.py``, each replica ``--cpus / 2`` cores and a
``--pool-gb`` pool) serving the scenario's 1,000 adapters (written once under ``--out``), sends
the trace's requests at t=0 as streamed completions (token-id prompts, greedy, ignore_eos),
reads the replicas' reports, and deletes the deployment.

Loads per request: pool loads of adapters (from their source, a spill file or host memory)
summed over both replicas' engines, divided by the requests; "source reads" counts only the
reads of an adapter's files (its first use on a replica, or after host and disk let it go).

    python benchmarks/ray_affinity.py --out /tmp/many-adapters       # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import stream_request  # noqa: E402
from throughput import SCENARIOS  # noqa: E402
from workload import make_trace, percentile, write_adapters  # noqa: E402

ROUTINGS = ("adapter", "round_robin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def send_trace(url: str, trace, output_lens) -> tuple[float, list]:
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_request(client, "/v1/completions", {
            "model": "SmolLM2-135M-Instruct" if r.adapter is None else f"a{r.adapter:04d}",
            "prompt": r.prompt_token_ids, "max_tokens": n, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
            for r, n in zip(trace, output_lens, strict=True)))
        return time.perf_counter() - start, results


def loads(url: str) -> dict[str, int]:
    replicas = httpx.get(f"{url}/replicas", timeout=60).json()["models"]
    total = {"from_source": 0, "from_disk": 0, "from_host": 0}
    for model in replicas.values():
        for report in model["replicas"].values():
            for k in total:
                total[k] += report["loads"][k]
    return total


def run_one(routing: str, args, adapters_dir: Path, trace, url: str) -> dict:
    from ray import serve

    from pagedlora.ray_serve import RayServeConfig, build_application
    from pagedlora.server.config import AdapterSource, ServerConfig

    sc = SCENARIOS["many"]
    engine = dict(max_num_seqs=sc.max_num_seqs, max_loras=sc.max_loras,
                  max_lora_rank=sc.max_lora_rank, max_cpu_loras=sc.max_cpu_loras,
                  enable_prefix_caching=False)
    server = ServerConfig(adapters=(AdapterSource(None, adapters_dir),), pool_gb=args.pool_gb,
                          max_queue=4096, engine_options=engine)
    config = RayServeConfig(server, num_replicas=2, cpus_per_replica=args.cpus / 2,
                            routing=routing, app_name=f"many-{routing}")
    serve.run(build_application(config), name=config.app_name, route_prefix="/")
    try:
        warm = [replace(r, adapter=None) for r in trace[:2]]  # the base model: no adapter
        asyncio.run(send_trace(url, warm, [4] * len(warm)))  # first-call costs, untimed
        before = loads(url)
        wall, results = asyncio.run(send_trace(url, trace, [r.output_len for r in trace]))
        after = loads(url)
    finally:
        serve.delete(config.app_name)
    good = [r for r in results if r.ok]
    n = len(trace)
    return {"routing": routing, "requests": n, "errors": n - len(good),
            "first_error": next((r.error for r in results if not r.ok), None),
            "loads_per_request": sum(after[k] - before[k] for k in after) / n,
            "source_reads_per_request": (after["from_source"] - before["from_source"]) / n,
            "output_tok_s": sum(r.output_tokens for r in good) / wall, "wall_s": wall,
            "ttft_p50_s": percentile([r.ttft for r in good], 0.5),
            "ttft_p90_s": percentile([r.ttft for r in good], 0.9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/pagedlora-many-adapters"),
                        help="where the 1,000 adapters are written (kept for reruns)")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs of the local Ray")
    parser.add_argument("--pool-gb", type=float, default=1.0, help="each replica's pool")
    parser.add_argument("--routings", default=",".join(ROUTINGS))
    parser.add_argument("--requests", type=int, help="only the trace's first N (a smoke test)")
    parser.add_argument("--alpha", type=float, help="adapter popularity's power-law exponent "
                        "instead of the scenario's 1.0 (uniform); smaller is more skewed")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    import ray
    from ray import serve
    from transformers import AutoConfig, AutoTokenizer

    from pagedlora.model_files import resolve_model

    sc = SCENARIOS["many"]
    model_dir = resolve_model(None)
    hf = AutoConfig.from_pretrained(model_dir)
    write_adapters(args.out, hf, sc.spec.num_adapters, ranks=sc.ranks,
                   module_sets=sc.module_sets, cycle=sc.cycle)
    special = set(AutoTokenizer.from_pretrained(model_dir).all_special_ids)
    spec = sc.spec if args.alpha is None else replace(sc.spec, alpha=args.alpha)
    trace = make_trace(spec, hf.vocab_size, special)[:args.requests]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for routing in args.routings.split(","):
            rows.append(run_one(routing, args, args.out, trace, url))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
