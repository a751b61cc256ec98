"""LoRA shrink/expand over adapter rows read from pool pages (torch reference, the CPU path)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PagedRows:
    """Where the ``r`` rows of one ``[r, width]`` adapter matrix live in the pool.

    Attributes:
        pages: ``[r]`` int64 page id of each row.
        slots: ``[r]`` int64 row slot inside its page.
    """

    pages: torch.Tensor
    slots: torch.Tensor


@dataclass(frozen=True)
class LoraSegment:
    """Tokens ``[start, end)`` of a batch that use one adapter's LoRA on one module.

    Attributes:
        start, end: token range in the flattened batch.
        a: rows of lora_A, ``[r, in_features]`` in the pool.
        b: rows of lora_B transposed, ``[r, out_features]`` in the pool.
        scale: lora_alpha / r (or / sqrt(r) with rsLoRA).
    """

    start: int
    end: int
    a: PagedRows
    b: PagedRows
    scale: float


def gather_rows(rows_view: torch.Tensor, rows: PagedRows) -> torch.Tensor:
    """Reads rows through a page table.

    Args:
        rows_view: ``[num_pages, rows_per_page, width]`` view of the pool.
        rows: the page table of ``r`` rows.
    Returns:
        ``[r, width]`` tensor, same dtype as the pool.
    """
    return rows_view[rows.pages, rows.slots]


def lora_sgmv(y: torch.Tensor, x: torch.Tensor, segments: list[LoraSegment],
              a_view: torch.Tensor, b_view: torch.Tensor) -> None:
    """Segmented LoRA, in place: ``y[s:e] += scale * (x[s:e] @ A^T) @ B^T`` for each segment.

    Shrink (``x @ A^T``, to rank r) then expand (``@ B^T``, to out_features), as SGMV does
    (Punica, Chen et al. 2023, section 4; S-LoRA section 5.1). Tokens outside every segment
    (base-model requests) are left unchanged.

    Args:
        y: ``[T, out_features]`` output of the base projection, updated in place.
        x: ``[T, in_features]`` input of the projection, same dtype as ``y``.
        segments: disjoint token ranges, each with its adapter's rows; ranks may differ.
        a_view: ``[num_pages, rows_per_page, in_features]`` pool view for lora_A rows.
        b_view: ``[num_pages, rows_per_page, out_features]`` pool view for lora_B^T rows.
    Raises:
        ValueError: ``x`` and ``y`` disagree on the number of tokens.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens, y has {y.shape[0]}")
    for seg in segments:
        a = gather_rows(a_view, seg.a)  # [r, in]
        b = gather_rows(b_view, seg.b)  # [r, out]
        y[seg.start:seg.end] += (x[seg.start:seg.end] @ a.t()).mul_(seg.scale) @ b
