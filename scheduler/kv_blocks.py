"""KVBlockManager: requests' KV blocks, their reference counts and the prefix cache (no torch)."""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

import xxhash

from pagedlora.scheduler.page_allocator import KV, PageAllocator
from pagedlora.scheduler.request import Request

Block = list[int]  # one page id per layer


@dataclass(frozen=True)
class KVStats:
    """The KV cache's accounting (see :meth:`KVBlockManager.stats`).

    Attributes:
        cached_pages: pages of cached blocks no request holds (reclaimable).
        filled_slots: token slots of KV pages (one token of one layer each) that hold computed
            K/V; the other slots of used KV pages (the tails of partial blocks) are internal
            fragmentation.
        hit_tokens: prompt tokens served from the prefix cache, since the start.
        queried_tokens: prompt tokens looked up in it, since the start.
    """

    cached_pages: int
    filled_slots: int
    hit_tokens: int
    queried_tokens: int


class KVBlockManager:
    """Owns every KV block: which request holds it, how many hold it, and which full blocks
    can be reused by later requests (automatic prefix caching).

    Block tables live here, keyed by request id (vLLM v1's ``req_to_blocks``), so a request's
    blocks have one writer; the scheduler hands them to the model runner in its output.

    A full block is keyed by an XXH3-128 over its parent block's key and its token ids; the
    first block's parent is the request's ``lora_key``: its adapter's content hash, its mix's
    content hashes and weights, or "base". The key thus names the whole prefix *and* the
    weights that computed its K/V, so requests for different adapters, mixes or scales, or
    for a name re-added with different weights, never share KV (vLLM's automatic
    prefix caching, with the adapter in the key as S-LoRA's per-adapter KV requires).

    A block is shared by reference count. When the last request drops a cached block it stays
    allocated and is *offered* to the allocator as reclaimable: reused on a later hit (taken
    back), or freed by an allocation that finds the free list short, least recently offered
    first. Hits are whole blocks and stop one token short of the request's known tokens, so a
    step never writes into a shared block (no copy-on-write).

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
        self._tables: dict[int, list[Block]] = {}  # request id -> its blocks, in order
        self._keys: dict[int, list[int]] = {}  # request id -> prefix keys of its full blocks
        self._num_cached: dict[int, int] = {}  # request id -> leading blocks in the cache
        self._refs: Counter[int] = Counter()  # first page of a block -> requests holding it
        self._key_of: dict[int, int] = {}  # first page -> prefix key, for cached blocks
        self._cached: dict[int, Block] = {}  # prefix key -> block
        self._hit_tokens = 0
        self._queried_tokens = 0

    # -- accounting ----------------------------------------------------------------------------

    @property
    def evictable_pages(self) -> int:
        """Pages of cached blocks no request holds (reclaimable)."""
        return self.allocator.num_reclaimable(KV)

    @property
    def hit_tokens(self) -> int:
        """Prompt tokens served from the prefix cache, since the start."""
        return self._hit_tokens

    @property
    def queried_tokens(self) -> int:
        """Prompt tokens looked up in the prefix cache, since the start."""
        return self._queried_tokens

    def pages_for(self, num_tokens: int) -> int:
        """Pages that ``num_tokens`` tokens of one sequence take."""
        return -(-num_tokens // self.block_size) * self.pages_per_block

    def blocks_of(self, request: Request) -> list[Block]:
        """The request's blocks in order (read-only; empty when it holds none)."""
        return self._tables.get(request.request_id, [])

    def num_pages_held(self, request: Request) -> int:
        """Pages of the request's blocks."""
        return len(self.blocks_of(request)) * self.pages_per_block

    def stats(self, holders: list[Request]) -> KVStats:
        """The accounting now; ``holders`` are the requests holding blocks (the running
        ones), whose computed tokens tell how full their blocks are."""
        bs, ppb = self.block_size, self.pages_per_block
        filled = dict.fromkeys(range(self.evictable_pages // ppb), bs)  # cached: full
        for r in holders:
            for i, block in enumerate(self.blocks_of(r)):
                tokens = min(bs, max(0, r.num_computed_tokens - i * bs))
                filled[("b", block[0])] = max(filled.get(("b", block[0]), 0), tokens)
        return KVStats(cached_pages=self.evictable_pages,
                       filled_slots=sum(filled.values()) * ppb,
                       hit_tokens=self._hit_tokens, queried_tokens=self._queried_tokens)

    # -- prefix cache --------------------------------------------------------------------------

    def block_keys(self, request: Request) -> list[int]:
        """Prefix keys of the request's full blocks of known tokens (computed once, extended
        as tokens arrive)."""
        keys = self._keys.setdefault(request.request_id, [])
        bs = self.block_size
        tokens = request.all_token_ids
        parent = keys[-1] if keys else request.lora_key or "base"
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

    @staticmethod
    def unit_of(block: Block) -> Hashable:
        """The block's id among the allocator's reclaimable units."""
        return (KV, block[0])

    def take_prefix(self, request: Request, hits: list[Block]) -> None:
        """Gives a request with no blocks the cached ``hits`` (they count as computed: the
        scheduler sets its computed tokens to ``len(hits) * block_size``)."""
        assert not self.blocks_of(request), f"request {request.request_id} holds blocks"
        for block in hits:
            if not self._refs[block[0]]:
                self.allocator.withdraw(self.unit_of(block))
            self._refs[block[0]] += 1
        self._tables[request.request_id] = list(hits)
        self._num_cached[request.request_id] = len(hits)

    def count_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """Counts one request's first prefix lookup (for :meth:`stats`)."""
        self._queried_tokens += queried_tokens
        self._hit_tokens += hit_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Registers the request's blocks whose tokens are all computed, so later requests with
        the same adapter and prefix can reuse them."""
        if not self.enable_caching:
            return
        rid = request.request_id
        num_full = request.num_computed_tokens // self.block_size
        keys = self.block_keys(request)
        blocks = self.blocks_of(request)
        for i in range(self._num_cached.get(rid, 0), num_full):
            block = blocks[i]
            if keys[i] not in self._cached and block[0] not in self._key_of:
                self._cached[keys[i]] = block
                self._key_of[block[0]] = keys[i]
        self._num_cached[rid] = max(self._num_cached.get(rid, 0), num_full)

    def reset(self) -> int:
        """Frees every cached block no request holds; returns the pages freed."""
        return self.allocator.reclaim(self.allocator.num_pages, KV)

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, request: Request, num_tokens: int) -> bool:
        """Extends the request's blocks to hold ``num_tokens`` tokens; the allocator reclaims
        what it needs (cached blocks nobody holds, then unpinned adapters where their pages can
        serve KV). False, with nothing taken, when even that is not enough."""
        need = self.pages_for(num_tokens) - self.num_pages_held(request)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need, KV):
            return False
        pages = self.allocator.allocate(need, KV)
        ppb = self.pages_per_block
        table = self._tables.setdefault(request.request_id, [])
        for i in range(0, need, ppb):
            block = pages[i:i + ppb]
            self._refs[block[0]] = 1
            table.append(block)
        return True

    def free(self, request: Request) -> None:
        """Drops the request's hold on its blocks (last block first, so a sequence's tail is
        reclaimed before its head); unheld cached blocks are offered as reclaimable, others
        freed. The request's cached prefix keys are kept (its tokens do not change)."""
        for block in reversed(self._tables.pop(request.request_id, [])):
            first = block[0]
            self._refs[first] -= 1
            if self._refs[first]:
                continue
            del self._refs[first]
            if first in self._key_of:
                self.allocator.offer(self.unit_of(block), block, KV,
                                     on_reclaim=lambda first=first: self._forget(first))
            else:
                self.allocator.free(block)
        self._num_cached.pop(request.request_id, None)

    def forget(self, request: Request) -> None:
        """Drops what is kept of a finished request (its prefix keys); frees its blocks too."""
        self.free(request)
        self._keys.pop(request.request_id, None)

    def _forget(self, first: int) -> None:
        """The allocator reclaimed the cached block starting at page ``first``."""
        del self._cached[self._key_of.pop(first)]

    # -- checks --------------------------------------------------------------------------------

    def check_invariants(self, holders: list[Request]) -> None:
        """Asserts the reference counts match the block tables of ``holders`` (every request
        that holds blocks), that no held block is reclaimable, that every KV page in use is held
        or reclaimable, and the allocator's own invariants.

        Raises:
            AssertionError: naming the first mismatch.
        """
        self.allocator.check_invariants()
        assert set(self._tables) <= {r.request_id for r in holders}, (
            f"blocks held by requests {sorted(set(self._tables))} that are not holders")
        counted: Counter[int] = Counter(b[0] for r in holders for b in self.blocks_of(r))
        assert counted == self._refs, f"refcounts {dict(self._refs)} != tables {dict(counted)}"
        assert not any(self.allocator.is_offered((KV, f)) for f in counted), \
            "a held block is reclaimable"
        held_pages = {p for r in holders for b in self.blocks_of(r) for p in b}
        cached_unheld = [b for f, b in ((f, self._cached[k]) for f, k in self._key_of.items())
                         if f not in counted]
        for block in cached_unheld:
            assert self.allocator.is_offered(self.unit_of(block)), "unheld cached block kept"
            held_pages.update(block)
        assert len(held_pages) == self.allocator.num_used(KV), (
            f"{self.allocator.num_used(KV)} KV pages used, {len(held_pages)} held or cached")
        assert self.evictable_pages == len(cached_unheld) * self.pages_per_block
        for key, block in self._cached.items():
            assert self._key_of[block[0]] == key, f"cache entry {key} disagrees with its block"
