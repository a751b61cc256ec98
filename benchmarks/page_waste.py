"""Idle internal fragmentation of adapter pages, by the layout's arithmetic (no tensor, no model).

For sets of adapters of one kind (same target modules and rank) and random mixes, on the
shapes of SmolLM2-135M, Llama-2-7B, Llama-3-8B and the toy model of
``examples/fragmentation_stress.py``: the pages the adapters take and the share of those pages'
elements that hold no weight, with each adapter's last page its own (``own``: rows packed across
layers and modules, :func:`~pagedlora.row_packing.pack_rows`) and with the rows of partly used
last pages in pages the adapters share (``shared``: :class:`~pagedlora.shared_pages.SharedPages`,
the unified layout of stop 24 under the Triton kernels), and with rows whose width leaves slack
in a page also split into narrow pieces (``pieces``: :func:`~pagedlora.row_packing.row_pieces`,
the unified layout under either kernel backend). The engine-level measure, with real weights in a
pool, is ``examples/fragmentation_stress.py --idle``.

    python benchmarks/page_waste.py [--adapters 24] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random

from pagedlora.adapter_pages import _groups
from pagedlora.lora_adapter import TARGET_MODULES
from pagedlora.row_packing import RowGroup, pack_rows, stored_groups
from pagedlora.scheduler import PageAllocator
from pagedlora.shared_pages import SharedPages


def shapes(hidden: int, kv: int, inter: int) -> dict[str, tuple[int, int]]:
    """``module -> (in_features, out_features)`` of a Llama decoder layer."""
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (hidden, hidden), "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


# (name, layers, module shapes, page elements = 2 x block 16 x KV heads x head_dim)
MODELS = [
    ("smollm2-135m", 30, shapes(576, 192, 1536), 2 * 16 * 3 * 64),
    ("llama-2-7b", 32, shapes(4096, 4096, 11008), 2 * 16 * 32 * 128),
    ("llama-3-8b", 32, shapes(4096, 1024, 14336), 2 * 16 * 8 * 128),
    ("stress-toy", 2, shapes(64, 32, 176), 2 * 16 * 2 * 16),
]
KINDS = [(("q_proj", "v_proj"), 1), (("q_proj", "v_proj"), 4), (("q_proj",), 1),
         (("k_proj", "v_proj"), 2), (("q_proj", "k_proj", "v_proj", "o_proj"), 4),
         (("gate_proj", "up_proj", "down_proj"), 4), (tuple(TARGET_MODULES), 1),
         (tuple(TARGET_MODULES), 16), (("q_proj", "v_proj"), 128)]


def waste(adapters: list[list[RowGroup]], page_numel: int) -> dict:
    """Pages and unused share of ``adapters`` (each its row groups) resident together, with
    last pages their own, with them shared, and shared with narrow pieces."""
    used = sum(g.width * g.count for groups in adapters for g in groups)
    out = {}
    for label, share, narrow in (("own", False, False), ("shared", True, False),
                                 ("pieces", True, True)):
        shared = SharedPages(PageAllocator(10**7), page_numel)
        pages = 0
        for i, groups in enumerate(adapters):
            plan = pack_rows(stored_groups(groups, page_numel, narrow=narrow), page_numel)
            pages += plan.num_pages
            if share and plan.tail:
                pages -= 1
                shared.place(i, plan.tail)
        pages += len(shared.pages)
        out[f"pages_{label}"] = pages
        out[f"unused_{label}"] = round(1 - used / (pages * page_numel), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=24, help="adapters per set")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    rows = []
    for name, layers, module_shapes, page_numel in MODELS:
        sets = {f"{'+'.join(m.split('_')[0] for m in mods)} r{rank}":
                [_groups({(la, m): rank for la in range(layers) for m in mods}, module_shapes)]
                * args.adapters for mods, rank in KINDS}
        rng = random.Random(0)
        sets["random 1-128"] = [
            _groups({(la, m): rng.randint(1, 128) for la in range(layers) for m in mods},
                    module_shapes)
            for mods in (rng.sample(TARGET_MODULES, rng.randint(1, 7))
                         for _ in range(args.adapters))]
        for label, adapters in sets.items():
            rows.append({"model": name, "set": label, **waste(adapters, page_numel)})
    labels = ("own", "shared", "pieces")
    print(f"{'model':13} {'adapters':22}" + "".join(f" {'pages ' + k:>13} {'unused':>7}"
                                                   for k in labels))
    for r in rows:
        print(f"{r['model']:13} {r['set']:22}" + "".join(
            f" {r['pages_' + k]:>13} {r['unused_' + k]:>7.1%}" for k in labels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
