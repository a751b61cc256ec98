"""Times registering many PEFT adapters of the default model (SmolLM2-135M) and the memory it takes.

Writes ``--num`` random LoRA adapters on q_proj and v_proj (ranks 4 to 16, SmolLM2's shapes:
hidden 576, 30 layers, 3 KV heads of 64) as safetensors directly, loads ``Engine(None)``, then
times ``add_adapter`` for all of them (or one ``add_adapters_from_dir``) and reports the
resident set size before and after. Files just written are still being flushed while they
are read, which slows the first run; ``--keep`` and a second run measure a settled page cache.

    python benchmarks/register_adapters.py --num 1000 --out /tmp/smol-adapters
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYERS, HIDDEN, KV_OUT = 30, 576, 3 * 64
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, KV_OUT)}  # module -> (in, out)


def write_adapters(out: Path, num: int, seed: int = 0) -> list[Path]:
    """``num`` PEFT directories under ``out``, each rank 4..16 on q_proj and v_proj."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    dirs = []
    for i in range(num):
        r = rng.randint(4, 16)
        path = out / f"a{i:04d}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(LAYERS):
            for module, (in_f, out_f) in SHAPES.items():
                key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.01
                tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.01
        save_file(tensors, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "bias": "none",
            "target_modules": list(SHAPES), "task_type": "CAUSAL_LM"}))
        dirs.append(path)
    return dirs


def rss_mib() -> float:
    """Resident set size of this process now, MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/pagedlora-bench-adapters"))
    parser.add_argument("--keep", action="store_true", help="keep the adapter files")
    parser.add_argument("--from-dir", action="store_true",
                        help="register with one add_adapters_from_dir call instead")
    args = parser.parse_args()

    from pagedlora import Engine

    t0 = time.perf_counter()
    dirs = sorted(args.out.glob("a*"))
    if len(dirs) == args.num:  # kept by an earlier --keep run: a settled page cache
        print(f"reusing {args.num} adapters in {args.out}")
    else:
        dirs = write_adapters(args.out, args.num)
        print(f"wrote {args.num} adapters in {time.perf_counter() - t0:.1f} s")
    size = sum(f.stat().st_size for d in dirs for f in d.iterdir())
    print(f"{size / 2**30:.2f} GiB of safetensors")
    engine = Engine(None, pool_gb=0.25)
    before = rss_mib()
    t0 = time.perf_counter()
    if args.from_dir:
        engine.add_adapters_from_dir(args.out)
    else:
        for path in dirs:
            engine.add_adapter(path.name, path)
    seconds = time.perf_counter() - t0
    after = rss_mib()
    print(f"registered {args.num} adapters in {seconds:.1f} s "
          f"({1000 * seconds / args.num:.1f} ms each); RSS {before:.0f} -> {after:.0f} MiB "
          f"(+{after - before:.0f} MiB); host copies held: {len(engine.adapters.host_keys)}")
    if not args.keep:
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
