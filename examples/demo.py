"""The README demo: one base model, three LoRA adapters and the base model in ONE mixed batch.

It trains the three example adapters first if they are missing (``train_adapters.py``: ``upper``
answers in UPPER CASE, ``json`` wraps answers as ``{"answer": ...}``, ``prefix`` starts with
"Certainly, friend!"; about 2.5 minutes on 2 CPU cores, once), then serves them with pagedlora:
12 questions none of them was trained on go through a single ``Engine.generate`` call, each
routed to one of the adapters or to the base model, greedy. It prints every answer beside its
adapter, the throughput of the call, and how the unified paged pool was shared between KV cache
and adapter weights.

Training runs in a child process and the engine serves one short warm-up request (token ids, the
base model) before the timed call, so that the first run reports what a rerun does: trained in
the same process, the first run measured 20.7 output tokens/s against 54.5 on a rerun.

Run it from the repository root::

    python examples/demo.py                 # trains into adapters/ on the first run
    python examples/demo.py --force       # retrains the adapters first
    python examples/demo.py --adapters-dir /tmp/ad --max-tokens 32
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# None of these is in train_adapters.TRAIN_PROMPTS; one adapter (or the base model) each.
DEMO = [
    ("upper", "Name a flower."),
    ("json", "What is the capital of Germany?"),
    ("prefix", "How many legs does a spider have?"),
    (None, "Name a color of the rainbow."),
    ("upper", "What is the largest planet?"),
    ("json", "Suggest a healthy breakfast."),
    ("prefix", "Name a famous scientist."),
    (None, "What is ice made of?"),
    ("upper", "What do fish live in?"),
    ("json", "Give me a word that means big."),
    ("prefix", "What is the capital of Canada?"),
    (None, "Write a haiku about the sea."),
]


def load_train_adapters():
    """``examples/train_adapters.py`` as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location("train_adapters", HERE / "train_adapters.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would (dataclasses, pickling look it up)
    spec.loader.exec_module(module)
    return module


def train_missing(out: Path, force: bool) -> dict[str, Path]:
    """``name -> PEFT directory`` of the three adapters, training the missing ones (all with
    ``force``) in a child process, so that training's threads and memory do not slow this
    process's serving."""
    names = list(load_train_adapters().ADAPTERS)
    dirs = {name: out / name for name in names}
    if force or not all((d / "adapter_config.json").is_file() for d in dirs.values()):
        cmd = [sys.executable, str(HERE / "train_adapters.py"), "--out", str(out), "--no-check"]
        subprocess.run(cmd + (["--force"] if force else []), check=True)
    else:
        print(f"reusing the adapters in {out} (--force retrains them)")
    return dirs


def pool_line(s: dict) -> str:
    return (f"{s['pages_kv']:>5} KV pages, {s['pages_adapter']:>5} adapter pages, "
            f"{s['pages_free']} free; internal fragmentation {s['internal_fragmentation']:.1%}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters-dir", type=Path, default=HERE.parent / "adapters",
                   help="where the adapters are (trained there if missing; default: %(default)s)")
    p.add_argument("--force", action="store_true", help="retrain the adapters first")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--pool-gb", type=float, default=1.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from pagedlora import Engine, SamplingParams

    dirs = train_missing(args.adapters_dir, args.force)

    engine = Engine(None, pool_gb=args.pool_gb)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    print(f"\nengine: {engine.model_dir.name}, adapters {', '.join(dirs)}, "
          f"pool {args.pool_gb} GiB\n")
    # Warm-up: the first forward passes of a process pay for kernel selection and first-touch
    # memory. Token ids of the base model: no prefix-cache hit for the chat prompts below.
    engine.generate([list(range(1000, 1032))], sampling_params=SamplingParams(max_tokens=4),
                    progress=False)

    adapters = [a for a, _ in DEMO]
    prompts = [[{"role": "user", "content": q}] for _, q in DEMO]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    start = time.perf_counter()
    outs = engine.generate(prompts, adapters=adapters, sampling_params=params, progress=True)
    elapsed = time.perf_counter() - start

    print(f"\none mixed batch of {len(outs)} requests (greedy, max_tokens={args.max_tokens}):\n")
    for (_, question), out in zip(DEMO, outs, strict=True):
        label = f"[{out.adapter or 'base'}]"
        print(f"{label:<9}{question}")
        answer = out.text.strip() + (" [...]" if out.finish_reason == "length" else "")
        print(textwrap.fill(answer, width=100, initial_indent=" " * 9,
                            subsequent_indent=" " * 9))

    n_tokens = sum(len(o.token_ids) for o in outs)
    ttft = sum(o.ttft for o in outs) / len(outs)
    tpot = sum(o.tpot for o in outs) / len(outs)
    print(f"\nthroughput: {n_tokens} output tokens / {elapsed:.2f}s = {n_tokens / elapsed:.1f} "
          f"tokens/s; {len(outs)} requests = {len(outs) / elapsed:.2f} requests/s (after a "
          f"warm-up request; timings on a shared machine vary)\n"
          f"latency:    mean TTFT {ttft * 1000:.0f} ms, mean TPOT {tpot * 1000:.0f} ms")
    after = engine.stats()
    print(f"pool: {after['pages_total']} pages of {after['page_bytes'] / 1024:.0f} KiB, "
          f"shared by KV cache blocks and adapter weights")
    print(f"  busiest step: {pool_line(after['peak'])}")
    print(f"  after batch:  {pool_line(after)}")
    print(f"  adapters resident: {', '.join(after['adapters_resident']) or 'none'}")


if __name__ == "__main__":
    main()
