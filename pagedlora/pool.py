"""UnifiedPool: one device tensor of equal pages holding KV blocks and adapter rows alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pagedlora.kernels.lora import PagedRows, gather_rows
from pagedlora.scheduler import PageAllocator, StaticSplitAllocator

if TYPE_CHECKING:
    from pagedlora.config import EngineConfig


def rows_per_page(page_numel: int, width: int) -> int:
    """Rank rows of ``width`` elements that a page of ``page_numel`` elements holds.

    Raises:
        ValueError: ``width`` exceeds a page (raise block_size).
    """
    if width > page_numel:
        raise ValueError(f"an adapter row of {width} elements does not fit a page of "
                         f"{page_numel}; use a larger block_size")
    return page_numel // width


class UnifiedPool:
    """The engine's device memory for KV cache and adapter weights (S-LoRA, section 4.1).

    The tensor is ``[num_pages, page_numel]``. A KV page is one block of one layer, viewed as
    ``[2, block_size, num_kv_heads, head_dim]`` (K then V). An adapter page holds
    ``page_numel // width`` rank rows of one width (a row of lora_A is ``in_features`` wide, a
    row of lora_B^T ``out_features``), found through ``(page, slot)`` tables. A row whose width
    leaves part of each page unused is stored as equal narrow pieces, each whole in one page
    with a page and slot of its own (:func:`~pagedlora.row_packing.row_pieces`): the torch
    kernels read rows out and join them (:meth:`read_rows`), the Triton kernels address each
    piece in place (:meth:`stored_rows`). A row wider than a page (``vocab_size`` elements,
    for LoRA on embed_tokens or lm_head) is split into page-wide pieces and always read out.

    Under tensor parallelism (S-LoRA, section 6) the driver's pool is the accounting alone
    (``device=None``: the allocator and the page geometry, no tensor) and every worker holds a
    tensor of the same geometry for its shard: a page id means the same page on every rank
    (its KV heads' block, its shard of an adapter's rows).

    Args:
        num_pages: pages in the pool.
        block_size, num_kv_heads, head_dim: the KV block shape (this rank's KV heads); they
            fix ``page_numel``.
        dtype, device: of the pool tensor; ``device`` None for no tensor (the driver of a
            tensor-parallel engine).
        allocator: hands out the page ids; None: a :class:`PageAllocator` (unified paging)
            over ``num_pages`` pages. The engine passes a ``StaticSplitAllocator`` for
            ``memory_layout="static"``.
    Raises:
        ValueError: ``allocator`` has another number of pages.
    """

    def __init__(self, num_pages: int, *, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | None,
                 allocator: PageAllocator | None = None) -> None:
        self.block_size = block_size
        self.page_numel = self.page_numel_for(block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        self.allocator = allocator or PageAllocator(num_pages)
        if self.allocator.num_pages != num_pages:
            raise ValueError(f"the allocator has {self.allocator.num_pages} pages, the pool "
                             f"{num_pages}")
        self.tensor: torch.Tensor | None = None
        self._kv: torch.Tensor | None = None
        if device is not None:
            self.tensor = torch.empty(num_pages, self.page_numel, dtype=dtype, device=device)
            self._kv = self.tensor.view(num_pages, 2, block_size, num_kv_heads, head_dim)
        self._rows: dict[int, torch.Tensor] = {}

    @classmethod
    def for_model(cls, *, pool_gb: float, num_layers: int, num_kv_heads: int, head_dim: int,
                  block_size: int, dtype: torch.dtype, device: torch.device | None,
                  memory_layout: str = "unified", static_slot_pages: int = 0,
                  max_loras: int = 1, max_lora_rank: int = 0) -> UnifiedPool:
        """A zeroed pool of ``pool_gb`` GiB for a model's KV geometry, with the allocator of
        ``memory_layout``: one free list ("unified"), or ``max_loras`` adapter slots of
        ``static_slot_pages`` pages each (the pages of ``max_lora_rank`` on every projection)
        and the rest for KV blocks ("static", vLLM's LoRA buffers). Padding slots are read
        (and masked), so the zeros keep them finite. ``pool_gb`` is per device: under tensor
        parallelism each rank's tensor takes ``pool_gb`` (``device`` None: none here).

        Raises:
            ValueError: the pool holds no KV block (one page per layer), or the static slots
                leave no room for one.
        """
        geometry = dict(block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim)
        num_pages = cls.pages_for_bytes(pool_gb * 2**30, dtype=dtype, **geometry)
        if num_pages < num_layers:
            raise ValueError(f"pool_gb={pool_gb} holds {num_pages} pages; one KV block takes "
                             f"{num_layers} (one per layer)")
        allocator = PageAllocator(num_pages)
        if memory_layout == "static":
            reserved = max_loras * static_slot_pages
            if num_pages - reserved < num_layers:
                raise ValueError(
                    f"memory_layout='static' reserves max_loras={max_loras} adapter slots of "
                    f"{static_slot_pages} pages (max_lora_rank={max_lora_rank} on every "
                    f"projection), {reserved} pages; pool_gb={pool_gb} holds {num_pages}, too "
                    f"few to add one KV block ({num_layers} pages): raise pool_gb or lower "
                    f"max_loras or max_lora_rank")
            allocator = StaticSplitAllocator(num_pages, slot_pages=static_slot_pages,
                                             num_slots=max_loras)
        pool = cls(num_pages, dtype=dtype, device=device, allocator=allocator, **geometry)
        if pool.tensor is not None:
            pool.tensor.zero_()
        return pool

    @classmethod
    def for_config(cls, config: EngineConfig, *, num_layers: int, num_kv_heads: int,
                   head_dim: int, static_slot_pages: int, device: torch.device | None
                   ) -> UnifiedPool:
        """:meth:`for_model` with an engine's options (``pool_gb``, ``block_size``, ``dtype``,
        ``memory_layout``, ``max_loras``, ``max_lora_rank``): the driver's pool and every
        tensor-parallel worker's get the same pages this way."""
        return cls.for_model(
            pool_gb=config.pool_gb, num_layers=num_layers, num_kv_heads=num_kv_heads,
            head_dim=head_dim, block_size=config.block_size, dtype=getattr(torch, config.dtype),
            device=device, memory_layout=config.memory_layout, max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank, static_slot_pages=static_slot_pages)

    @staticmethod
    def page_numel_for(block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """Elements of one page: one KV block of one layer, K and V."""
        return 2 * block_size * num_kv_heads * head_dim

    @staticmethod
    def pages_for_bytes(num_bytes: float, *, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """How many pages fit in ``num_bytes`` bytes."""
        page_numel = UnifiedPool.page_numel_for(block_size, num_kv_heads, head_dim)
        return int(num_bytes // (page_numel * dtype.itemsize))

    @property
    def num_pages(self) -> int:
        """Pages in the pool."""
        return self.allocator.num_pages

    @property
    def page_bytes(self) -> int:
        """Bytes of one page (of each rank's pool, under tensor parallelism)."""
        return self.page_numel * self.dtype.itemsize

    @property
    def kv_pages(self) -> torch.Tensor:
        """``[num_pages, 2, block_size, num_kv_heads, head_dim]`` view of every page as a KV
        block (contiguous; K then V).

        Raises:
            RuntimeError: a pool without a tensor (see the class docstring).
        """
        self._check_tensor()
        return self._kv

    def rows_per_page(self, width: int) -> int:
        """Rank rows of ``width`` elements one page holds (see :func:`rows_per_page`)."""
        return rows_per_page(self.page_numel, width)

    def read_rows(self, width: int, rows: PagedRows) -> torch.Tensor:
        """Copies ``r`` rows of ``width`` elements out of the pool, whether stored whole
        (``rows.pages`` is ``[r]``) or split into pieces (``[r, pieces]``, see
        :func:`~pagedlora.row_packing.row_pieces`: page-wide pieces of a row wider than a
        page, else ``pieces`` equal ones).

        Returns:
            ``[r, width]`` contiguous, the pool's dtype.
        """
        out = gather_rows(self.stored_rows(width, rows), rows)
        return out if out.shape[1] == width else out[:, :width].contiguous()

    def stored_rows(self, width: int, rows: PagedRows) -> torch.Tensor:
        """The view (:meth:`rows`) that ``rows``, of ``width`` elements each, are stored in:
        rows of ``width`` if whole, of a page if split for being wider than a page, of
        ``width / pieces`` if in narrow pieces. What the Triton kernels index in place.

        Raises:
            RuntimeError: a pool without a tensor (see the class docstring).
        """
        if rows.pages.dim() == 1:
            return self.rows(width)
        return self.rows(self.page_numel if width > self.page_numel
                         else width // rows.pages.shape[1])

    def rows(self, width: int) -> torch.Tensor:
        """``[num_pages, rows_per_page(width), width]`` view of the pool as rows of ``width``.

        Raises:
            RuntimeError: a pool without a tensor (see the class docstring).
        """
        view = self._rows.get(width)
        if view is None:
            self._check_tensor()
            rpp = self.rows_per_page(width)
            view = self.tensor[:, : rpp * width].view(self.num_pages, rpp, width)
            self._rows[width] = view
        return view

    def _check_tensor(self) -> None:
        if self.tensor is None:
            raise RuntimeError("this pool is the page accounting of a tensor-parallel engine's "
                               "driver; the pages are in the workers' pools")
