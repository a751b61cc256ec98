"""Bounded load against a running ``pagedlora serve`` on this machine: TTFT, TPOT, throughput.

Sends ``--requests`` streamed chat (or text) completions, at most ``--concurrency`` at a time,
spread round-robin over ``--models`` (base model and adapter names), and stops launching and
cancels what is left once ``--time-limit`` seconds have passed. Only loopback URLs are
accepted. Each request is greedy with ``ignore_eos`` (vLLM's extension), so every one makes
``--max-tokens`` tokens and runs are comparable.

Per request, measured by the client: TTFT = first streamed text after sending; TPOT = (last
text - first text) / (output tokens - 1), output tokens from the stream's ``usage``.
Reported: p50 and p99 of both (ms), output tokens/s and requests/s over the wall time, and
errors (HTTP errors, broken streams, requests cut by the time limit).

    pagedlora serve --port 8000 &          # the embedded SmolLM2-135M-Instruct
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 64 \\
        --concurrency 16 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
TOPICS = ["the sea", "a lighthouse", "bread", "a violin", "winter", "a fox", "trains", "tea",
          "a library", "mountains", "bees", "a clock", "rain", "chess", "a garden", "the moon"]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0  # seconds
    tpot: float = 0.0  # seconds
    output_tokens: int = 0
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of non-empty ``values``."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


async def one_request(client: httpx.AsyncClient, i: int, model: str, args) -> Result:
    text = f"Write two sentences about {TOPICS[i % len(TOPICS)]} (request {i})."
    body = {"model": model, "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": text}]
    else:
        path, body["prompt"] = "/v1/completions", text
    return await stream_request(client, path, body)


async def stream_request(client: httpx.AsyncClient, path: str, body: dict) -> Result:
    """Sends one streamed request (``body`` with ``stream_options.include_usage``) and
    measures its TTFT and TPOT as the module docstring says."""
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(False, error=chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    if c.get("text") or c.get("delta", {}).get("content"):
                        last = time.perf_counter()
                        first = first or last
    except httpx.HTTPError as e:
        return Result(False, error=f"{type(e).__name__}: {e}")
    if first is None or tokens == 0:
        return Result(False, error="no text or no usage in the stream")
    tpot = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return Result(True, ttft=first - sent, tpot=tpot, output_tokens=tokens)


async def run(args) -> dict:
    limit = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.time_limit) as client:
        async def guarded(i: int) -> Result:
            async with limit:
                return await one_request(client, i, args.models[i % len(args.models)], args)

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(guarded(i)) for i in range(args.requests)]
        done, pending = await asyncio.wait(tasks, timeout=args.time_limit)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - start
        await asyncio.gather(*pending, return_exceptions=True)  # close their streams
    results = [t.result() for t in done]
    good = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    report = {"requests": args.requests, "completed": len(good),
              "errors": len(errors) + len(pending), "cut_by_time_limit": len(pending),
              "wall_s": round(wall, 2),
              "output_tokens_per_s": round(sum(r.output_tokens for r in good) / wall, 1),
              "requests_per_s": round(len(good) / wall, 2)}
    if good:
        for name in ("ttft", "tpot"):
            values = [getattr(r, name) * 1000 for r in good]
            report[f"{name}_ms_p50"] = round(percentile(values, 50), 1)
            report[f"{name}_ms_p99"] = round(percentile(values, 99), 1)
    if errors:
        report["first_error"] = errors[0]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="loopback only")
    parser.add_argument("--models", default=None,
                        help="comma-separated base model and adapter names (default: the "
                        "server's first model)")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=300.0, metavar="S",
                        help="stop launching and cancel what is left after S seconds")
    args = parser.parse_args(argv)
    if urlparse(args.url).hostname not in LOOPBACK:
        parser.error(f"--url {args.url!r}: only loopback hosts {sorted(LOOPBACK)} are allowed")
    if not (args.requests > 0 and args.concurrency > 0 and args.max_tokens > 0):
        parser.error("--requests, --concurrency and --max-tokens must be positive")
    if args.models is None:
        served = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"]
        args.models = [served[0]["id"]]
    else:
        args.models = args.models.split(",")
    report = asyncio.run(run(args))
    json.dump({"models": args.models, "endpoint": args.endpoint, "concurrency": args.concurrency,
               "max_tokens": args.max_tokens, **report}, sys.stdout, indent=1)
    print()
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
