"""Micro-benchmarks of the Triton kernels on Llama-2-7B shapes (hidden 4096, 32 heads of 128,
fp16), written as JSON and a markdown table.

- LoRA shrink+expand (SGMV) for 1..256 tokens over 1..64 adapters of ranks 8..64, rows read
  from pool pages, whole and as narrow pieces (8 of 512: the per-piece addressing of rows
  whose width leaves page slack, such as Llama-2-7B's 11,008), against the base GEMM of the
  same 4096x4096 projection and against the torch reference
  (:func:`pagedlora.kernels.lora.lora_shrink_expand`).
- Paged decode attention against torch SDPA on a contiguous cache, and against the torch
  reference over the same pages.

Every case first checks the kernel against the torch reference (max |difference| recorded).
Times are medians of ``triton.testing.do_bench`` (CUDA events), in microseconds.

Usage (repo root): ``python benchmarks/gpu_micro.py --out DIR`` on a GPU;
``TRITON_INTERPRET=1 python benchmarks/gpu_micro.py --dry-run --out DIR`` on a CPU runs tiny
shapes once through the interpreter, to catch errors.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

from pagedlora.kernels import lora as ref_lora
from pagedlora.kernels import paged_attention as ref_attn
from pagedlora.kernels import triton_attention, triton_lora
from pagedlora.kernels.lora import LoraBatch, LoraSegment, PagedRows

FULL = dict(hidden=4096, heads=32, head_dim=128, block_size=16, dtype=torch.float16,
            tokens=[1, 4, 16, 64, 256], adapters=[1, 4, 16, 64], ranks=[8, 16, 32, 64, "mixed"],
            batch=[1, 8, 32, 64], context=[512, 4096], pieces=8)
DRY = dict(hidden=96, heads=4, head_dim=16, block_size=4, dtype=torch.float32,
           tokens=[1, 7], adapters=[1, 4], ranks=[8, "mixed"], batch=[1, 3], context=[9],
           pieces=3)


def timer(device: torch.device):
    """``fn -> microseconds``: do_bench's median on CUDA, one plain call elsewhere."""
    if device.type == "cuda":
        return lambda fn: 1e3 * triton.testing.do_bench(fn, warmup=10, rep=40,
                                                        return_mode="median")

    def once(fn) -> float:
        start = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - start)
    return once


def lora_batch(tokens: int, ranks: list[int], hidden: int, rows_view: torch.Tensor,
               g: torch.Generator) -> LoraBatch:
    """Adapters of ``ranks`` (A rows then B^T rows at random pool rows), tokens split evenly."""
    num_pages, rows_per_page, _ = rows_view.shape
    total = sum(ranks)
    places = torch.randperm(num_pages * rows_per_page, generator=g)[: 2 * total]
    places = places.to(rows_view.device)
    rows_view[places // rows_per_page, places % rows_per_page] = (
        torch.randn(2 * total, hidden, generator=g) / hidden ** 0.25).to(rows_view)
    a = PagedRows(places[:total] // rows_per_page, places[:total] % rows_per_page)
    b = PagedRows(places[total:] // rows_per_page, places[total:] % rows_per_page)
    cuts = [i * tokens // len(ranks) for i in range(len(ranks) + 1)]
    cols = torch.tensor([0, *ranks]).cumsum(0).tolist()
    segments = tuple(LoraSegment(cuts[i], cuts[i + 1], cols[i], cols[i + 1], 2.0)
                     for i in range(len(ranks)) if cuts[i] < cuts[i + 1])
    token_scale = torch.zeros(tokens, total, dtype=rows_view.dtype, device=rows_view.device)
    for s in segments:
        token_scale[s.start:s.end, s.col_start:s.col_end] = s.scale
    return LoraBatch(a, b, segments, token_scale)


def as_pieces(rows_view: torch.Tensor, batch: LoraBatch, pieces: int
              ) -> tuple[torch.Tensor, LoraBatch]:
    """The same rows seen as ``pieces`` narrow pieces each (a row at slot s of a page is
    pieces s * pieces ... s * pieces + pieces - 1 of the view of ``width / pieces``), as
    ``row_pieces(narrow=True)`` stores rows whose width leaves page slack: the Triton
    kernels' per-piece addressing over the same bytes."""
    num_pages, per_page, width = rows_view.shape
    view = rows_view.reshape(num_pages, per_page * pieces, width // pieces)
    step = torch.arange(pieces, device=rows_view.device)

    def split(rows: PagedRows) -> PagedRows:
        return PagedRows(rows.pages[:, None].expand(-1, pieces).contiguous(),
                         rows.slots[:, None] * pieces + step)
    return view, LoraBatch(split(batch.a), split(batch.b), batch.segments, None)


def bench_lora(cfg: dict, device: torch.device, time_us) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    h, dtype = cfg["hidden"], cfg["dtype"]
    # a pool of Llama-2-7B KV pages (2 * 16 * 32 * 128 elements) seen as rows of 4096
    rows_per_page = 2 * cfg["block_size"] * cfg["heads"] * cfg["head_dim"] // h
    most_rows = 2 * max(cfg["adapters"]) * 64
    rows_view = torch.zeros(most_rows // rows_per_page + 8, rows_per_page, h, dtype=dtype,
                            device=device)
    weight = (torch.randn(h, h, generator=g) / h ** 0.5).to(dtype).to(device)
    results = []
    for tokens in cfg["tokens"]:
        x = torch.randn(tokens, h, generator=g).to(dtype).to(device)
        base_us = time_us(partial(F.linear, x, weight))
        for n in (n for n in cfg["adapters"] if n <= tokens):
            for rank in cfg["ranks"]:
                ranks = [(8, 16, 32, 64)[i % 4] for i in range(n)] if rank == "mixed" \
                    else [rank] * n
                batch = lora_batch(tokens, ranks, h, rows_view, g)
                y0 = F.linear(x, weight)
                want, got = y0.clone(), y0.clone()
                pieces_view, pieced = as_pieces(rows_view, batch, cfg["pieces"])
                got_pieces = y0.clone()
                ref_lora.lora_shrink_expand(want, x, batch, rows_view, rows_view)
                triton_lora.lora_shrink_expand(got, x, batch, rows_view, rows_view)
                triton_lora.lora_shrink_expand(got_pieces, x, pieced, pieces_view, pieces_view)
                # before timing: the timed calls add into got and want again, unequally often
                err = max((g.float() - want.float()).abs().max().item()
                          for g in (got, got_pieces))
                results.append(dict(
                    tokens=tokens, adapters=n, rank=rank, base_gemm_us=base_us,
                    triton_us=time_us(partial(triton_lora.lora_shrink_expand, got, x, batch,
                                              rows_view, rows_view)),
                    triton_pieces_us=time_us(partial(triton_lora.lora_shrink_expand,
                                                     got_pieces, x, pieced, pieces_view,
                                                     pieces_view)),
                    torch_us=time_us(partial(ref_lora.lora_shrink_expand, want, x, batch,
                                             rows_view, rows_view)),
                    max_abs_err=err))
    return results


def bench_decode(cfg: dict, device: torch.device, time_us) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    heads, d, bs, dtype = cfg["heads"], cfg["head_dim"], cfg["block_size"], cfg["dtype"]
    results = []
    for ctx in cfg["context"]:
        for batch in cfg["batch"]:
            blocks = -(-ctx // bs)
            num_pages = batch * blocks + 1
            kv_pages = torch.randn(num_pages, 2, bs, heads, d, generator=g).to(dtype).to(device)
            tables = torch.randperm(num_pages, generator=g)[: batch * blocks].view(batch, blocks)
            tables = tables.to(device)
            q = torch.randn(batch, heads, d, generator=g).to(dtype).to(device)
            ones = torch.ones(batch, dtype=torch.long, device=device)
            meta = ref_attn.attention_metadata(ones.cumsum(0) - 1, ones, ones * ctx, blocks * bs)
            # the same keys as a contiguous [B, H, S, D] cache for SDPA
            pages = kv_pages[tables].transpose(1, 2).reshape(batch, 2, blocks * bs, heads, d)
            k, v = (pages[:, i, :ctx].transpose(1, 2).contiguous() for i in (0, 1))
            args = (q, kv_pages, tables, meta, d ** -0.5)
            got = triton_attention.paged_attention(*args)
            want = ref_attn.paged_attention(*args)
            results.append(dict(
                batch=batch, context=ctx,
                triton_us=time_us(partial(triton_attention.paged_attention, *args)),
                sdpa_contiguous_us=time_us(partial(F.scaled_dot_product_attention,
                                                   q[:, :, None], k, v, scale=d ** -0.5)),
                torch_paged_us=time_us(partial(ref_attn.paged_attention, *args)),
                max_abs_err=(got.float() - want.float()).abs().max().item()))
    return results


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k])
                                       for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and .md")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU (needs TRITON_INTERPRET=1), timed once")
    args = parser.parse_args()
    cfg = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else "cuda")
    time_us = timer(device)
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  dtype=str(cfg["dtype"]), decode_attention=[], lora=[])
    args.out.mkdir(parents=True, exist_ok=True)
    # written after each part, so a run stopped by a timeout keeps what it measured
    for part, bench in (("decode_attention", bench_decode), ("lora", bench_lora)):
        result[part] = bench(cfg, device, time_us)
        (args.out / "gpu_micro.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu_micro.md").write_text(
        f"# Kernel micro-benchmarks on {result['device']} ({result['dtype']}), microseconds\n\n"
        f"## Paged decode attention, {cfg['heads']} heads x {cfg['head_dim']}\n\n"
        f"{table(result['decode_attention'])}\n\n"
        f"## LoRA shrink+expand, {cfg['hidden']}x{cfg['hidden']} projection\n\n"
        f"{table(result['lora'])}\n")
    print((args.out / "gpu_micro.md").read_text())


if __name__ == "__main__":
    main()
