"""KVBlockManager: requests' KV blocks, their reference counts and the prefix cache (no torch)."""

from __future__ import annotations

from array import array
from collections import Counter, OrderedDict

import xxhash

from pagedlora.scheduler.page_allocator import KV, PageAllocator
from pagedlora.scheduler.request import Request

Block = list[int]  # one page id per layer


class KVBlockManager:
    """Owns every KV block: which request holds it, how many hold it, and which full blocks
    can be reused by later requests (automatic prefix caching).

    A full block is keyed by an XXH3-128 over its parent block's key and its token ids; the
    first block's parent is the request's adapter content hash (or "base"). The key thus names
    the whole prefix *and* the weights that computed its K/V, so requests for different
    adapters, or for a name re-added with different weights, never share KV (vLLM's automatic
    prefix caching, with the adapter in the key as S-LoRA's per-adapter KV requires).

    A block is shared by reference count. When the last request drops a cached block it stays
    allocated as "evictable": reused on a later hit, or freed least recently used first when a
    new allocation finds the free list short. Hits are whole blocks and stop one token short of
    the request's known tokens, so a step never writes into a shared block (no copy-on-write).

    Args:
        allocator: the pool's allocator (KV pages are taken from it with kind "kv").
        block_size: tokens per block.
        pages_per_block: pages per block (one per layer).
        enable_caching: keep and reuse full blocks; False frees blocks as soon as unused.
    """

    def __init__(self, allocator: PageAllocator, *, block_size: int, pages_per_block: int,
                 enable_caching: bool = True) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.pages_per_block = pages_per_block
        self.enable_caching = enable_caching
        self._refs: Counter[int] = Counter()  # first page of a block -> requests holding it
        self._key_of: dict[int, int] = {}  # first page -> prefix key, for cached blocks
        self._cached: dict[int, Block] = {}  # prefix key -> block
        # Cached blocks nobody holds, least recently freed first: evicted in this order.
        self._evictable: OrderedDict[int, Block] = OrderedDict()
        self.hit_tokens = 0  # prompt tokens served from the cache (all requests)
        self.queried_tokens = 0  # prompt tokens looked up

    # -- accounting ----------------------------------------------------------------------------

    @property
    def evictable_pages(self) -> int:
        """Pages of cached blocks no request holds (free for the taking)."""
        return len(self._evictable) * self.pages_per_block

    def evictable_pages_among(self, blocks: list[Block]) -> int:
        """Pages of ``blocks`` that are evictable now (taking them makes them unavailable)."""
        return sum(len(b) for b in blocks if b[0] in self._evictable)

    def pages_for(self, num_tokens: int) -> int:
        """Pages that ``num_tokens`` tokens of one sequence take."""
        return -(-num_tokens // self.block_size) * self.pages_per_block

    # -- prefix cache --------------------------------------------------------------------------

    def block_keys(self, request: Request) -> list[int]:
        """Prefix keys of the request's full blocks of known tokens (computed once, extended
        as tokens arrive; kept in ``request.block_keys``)."""
        keys, bs = request.block_keys, self.block_size
        tokens = request.all_token_ids
        parent = keys[-1] if keys else request.adapter_key or "base"
        for i in range(len(keys), len(tokens) // bs):
            h = xxhash.xxh3_128(str(parent).encode())
            h.update(array("q", tokens[i * bs:(i + 1) * bs]).tobytes())
            parent = h.intdigest()
            keys.append(parent)
        return keys

    def match_prefix(self, request: Request) -> list[Block]:
        """Cached blocks that hold a prefix of the request's known tokens, longest first-to-last
        run, leaving at least one token to compute. Takes nothing."""
        if not self.enable_caching:
            return []
        limit = (request.num_tokens - 1) // self.block_size
        hits = []
        for key in self.block_keys(request)[:limit]:
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def take_prefix(self, request: Request, hits: list[Block]) -> None:
        """Gives a request with no blocks the cached ``hits``; they count as computed."""
        assert not request.blocks and request.num_computed_tokens == 0
        for block in hits:
            self._evictable.pop(block[0], None)
            self._refs[block[0]] += 1
        request.blocks = list(hits)
        request.num_cached_blocks = len(hits)
        request.num_computed_tokens = len(hits) * self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Registers the request's blocks whose tokens are all computed, so later requests with
        the same adapter and prefix can reuse them."""
        if not self.enable_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        keys = self.block_keys(request)
        for i in range(request.num_cached_blocks, num_full):
            block = request.blocks[i]
            if keys[i] not in self._cached and block[0] not in self._key_of:
                self._cached[keys[i]] = block
                self._key_of[block[0]] = keys[i]
        request.num_cached_blocks = max(request.num_cached_blocks, num_full)

    def reset(self) -> int:
        """Frees every cached block no request holds; returns the pages freed."""
        return self._evict(len(self._evictable) * self.pages_per_block)

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Extends ``request.blocks`` to hold ``num_tokens`` tokens, evicting cached blocks
        nobody holds if the free list is short; False (nothing taken) when that is not enough.
        The caller frees other pages (unpinned adapters) first if it wants them used."""
        need = self.pages_for(num_tokens) - len(request.blocks) * self.pages_per_block
        if need <= 0:
            return True
        self.make_free(need)
        if not self.allocator.can_allocate(need, KV):
            return False
        pages = self.allocator.allocate(need, KV)
        ppb = self.pages_per_block
        for i in range(0, need, ppb):
            block = pages[i:i + ppb]
            self._refs[block[0]] = 1
            request.blocks.append(block)
        return True

    def make_free(self, num_pages: int) -> None:
        """Evicts cached blocks nobody holds until ``num_pages`` pages are free (or none is
        left to evict)."""
        short = num_pages - self.allocator.num_free_for(KV)
        if short > 0:
            self._evict(short)

    def free(self, request: Request) -> None:
        """Drops the request's hold on its blocks (last block first, so a sequence's tail is
        evicted before its head); unheld cached blocks become evictable, others are freed."""
        for block in reversed(request.blocks):
            first = block[0]
            self._refs[first] -= 1
            if self._refs[first]:
                continue
            del self._refs[first]
            if first in self._key_of:
                self._evictable[first] = block
            else:
                self.allocator.free(block)
        request.blocks = []
        request.num_cached_blocks = 0

    def _evict(self, num_pages: int) -> int:
        freed = 0
        while freed < num_pages and self._evictable:
            first, block = self._evictable.popitem(last=False)
            del self._cached[self._key_of.pop(first)]
            self.allocator.free(block)
            freed += len(block)
        return freed

    # -- checks --------------------------------------------------------------------------------

    def check_invariants(self, holders: list[Request]) -> None:
        """Asserts the reference counts match the block tables of ``holders`` (every request
        that holds blocks), that no held block is evictable, that every KV page in use is held
        or evictable, and the allocator's own invariants.

        Raises:
            AssertionError: naming the first mismatch.
        """
        self.allocator.check_invariants()
        counted: Counter[int] = Counter(b[0] for r in holders for b in r.blocks)
        assert counted == self._refs, f"refcounts {dict(self._refs)} != tables {dict(counted)}"
        assert not set(counted) & set(self._evictable), "a held block is evictable"
        held_pages = {p for r in holders for b in r.blocks for p in b}
        for block in self._evictable.values():
            held_pages.update(block)
        assert len(held_pages) == self.allocator.num_used(KV), (
            f"{self.allocator.num_used(KV)} KV pages used, {len(held_pages)} held or cached")
        for key, block in self._cached.items():
            assert self._key_of[block[0]] == key, f"cache entry {key} disagrees with its block"
