"""Times registering many PEFT adapters of the default model (SmolLM2-135M) and the memory it takes.

Writes ``--num`` random LoRA adapters on q_proj and v_proj (ranks 4 to 16, SmolLM2's shapes:
hidden 576, 30 layers, 3 KV heads of 64) as safetensors directly (``workload.write_adapters``),
loads ``Engine(None)``, then
times ``add_adapter`` for all of them (or one ``add_adapters_from_dir``) and reports the
resident set size before and after. Files just written are still being flushed while they
are read, which slows the first run; ``--keep`` and a second run measure a settled page cache.

    python benchmarks/register_adapters.py --num 1000 --out /tmp/smol-adapters

Without ``--keep`` it deletes the adapter folders it wrote, and nothing else.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import write_adapters  # noqa: E402

QV = (("q_proj", "v_proj"),)


def rss_mib() -> float:
    """Resident set size of this process now, MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/pagedlora-register-adapters"),
                        help="folder for the adapters a0000, a0001, ... (others are left alone)")
    parser.add_argument("--keep", action="store_true", help="keep the adapter files written")
    parser.add_argument("--from-dir", action="store_true",
                        help="register with one add_adapters_from_dir call instead")
    args = parser.parse_args()

    from transformers import AutoConfig

    from pagedlora import Engine
    from pagedlora.model_files import resolve_model

    t0 = time.perf_counter()
    before_run = {p.name for p in args.out.glob("a*")} if args.out.is_dir() else set()
    # reused when an earlier --keep run left them (a settled page cache)
    dirs = write_adapters(args.out, AutoConfig.from_pretrained(resolve_model(None)), args.num,
                          ranks=tuple(range(4, 17)), module_sets=QV)
    print(f"{args.num} adapters ready in {time.perf_counter() - t0:.1f} s")
    size = sum(f.stat().st_size for d in dirs for f in d.iterdir())
    print(f"{size / 2**30:.2f} GiB of safetensors")
    engine = Engine(None, pool_gb=0.25)
    before = rss_mib()
    t0 = time.perf_counter()
    if args.from_dir:
        if len(list(args.out.iterdir())) != len(dirs):
            raise SystemExit(f"--from-dir needs {args.out} to hold only the adapters written")
        engine.add_adapters_from_dir(args.out)
    else:
        for path in dirs:
            engine.add_adapter(path.name, path)
    seconds = time.perf_counter() - t0
    after = rss_mib()
    print(f"registered {args.num} adapters in {seconds:.1f} s "
          f"({1000 * seconds / args.num:.1f} ms each); RSS {before:.0f} -> {after:.0f} MiB "
          f"(+{after - before:.0f} MiB); host copies held: {len(engine.adapters.host_keys)}")
    if not args.keep:  # only what this run wrote
        for path in dirs:
            if path.name not in before_run:
                shutil.rmtree(path)


if __name__ == "__main__":
    main()
