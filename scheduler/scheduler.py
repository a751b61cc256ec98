"""Scheduler: which requests run in the next step, and with how many tokens (pure Python)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from pagedlora.errors import AdapterUnavailableError
from pagedlora.scheduler.page_allocator import KV, PageAllocator
from pagedlora.scheduler.request import Request, RequestStatus


class AdapterResidency(Protocol):
    """What the scheduler needs from the adapter store (a fake serves in tests)."""

    def pages_needed(self, key: str) -> int:
        """Pages that making ``key`` resident would take now (0 when resident)."""

    def acquire(self, key: str) -> bool:
        """Pins ``key`` in the pool, loading it if needed; False when its pages cannot be had.
        Raises AdapterUnavailableError when its weights cannot be had (the request fails)."""

    def release(self, key: str) -> None:
        """Drops one pin taken by :meth:`acquire`."""

    def evict_unpinned(self, num_pages: int) -> int:
        """Evicts unpinned resident adapters (LRU first) until ``num_pages`` pages are freed or
        none is left; returns the pages freed."""

    def evictable_pages(self) -> int:
        """Pages held by resident adapters that nobody pins."""


@dataclass(frozen=True)
class ScheduledRequest:
    """One request in a step and the number of its tokens computed in that step."""

    request: Request
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    """The hand-off from the scheduler to the model runner for one step.

    Attributes:
        scheduled: requests in the step, running ones first, each with its new token count.
        preempted: requests whose KV pages were freed this step (they will be recomputed).
        failed: requests finished with an error this step (they can never fit the pool, or
            their adapter cannot be loaded).
        adapter_keys: distinct adapters of the step (None, the base model, excluded).
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)
    adapter_keys: set[str] = field(default_factory=set)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens computed in the step."""
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """First-come-first-served iteration-level scheduler with page-aware admission.

    Each step has a budget of ``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences.
    Running requests are served first (a long prompt is prefilled in chunks within the budget);
    then waiting requests are admitted in arrival order, each only when its adapter's pages (if it
    is not resident) and its KV pages can both be had. When a running request cannot get a page
    for its next tokens, unpinned adapters are evicted first, then the most recently admitted
    request is preempted: its pages are freed and it is recomputed later (Orca, Yu et al. 2022;
    vLLM, Kwon et al. 2023, section 4.5 "recomputation").

    Args:
        block_size: tokens per KV block.
        pages_per_block: pages one KV block takes (one per layer).
        max_num_seqs, max_num_batched_tokens, max_loras: per-step caps (see EngineConfig).
        allocator: the pool's page allocator (shared with the adapter store).
        adapters: the adapter store's residency interface.
    """

    def __init__(self, *, block_size: int, pages_per_block: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_loras: int, allocator: PageAllocator,
                 adapters: AdapterResidency) -> None:
        self.block_size = block_size
        self.pages_per_block = pages_per_block
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.allocator = allocator
        self.adapters = adapters
        self.waiting: deque[Request] = deque()
        # Admission order; the newest is preempted first.
        self.running: list[Request] = []

    # -- queue -------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queues ``request``; it fails at once (finish_reason "error") if it can never fit."""
        need = self._kv_pages_for(len(request.prompt_token_ids) + 1)
        if request.adapter_key is not None:
            need += self.adapters.pages_needed(request.adapter_key)
        if need > self.allocator.num_pages:
            request.fail(f"request {request.request_id} needs {need} pages for its "
                                f"prompt and adapter, the pool has {self.allocator.num_pages}")
            return
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        """Ends ``request`` (from the engine, e.g. on a stop token) and frees its pages."""
        if request in self.running:
            self.running.remove(request)
            self._release(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finished_time = time.perf_counter()

    # -- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Chooses the requests of the next step and allocates their pages."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if budget == 0:
                break
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._grow_or_preempt(request, n, out):
                continue
            out.scheduled.append(ScheduledRequest(request, n))
            budget -= n
            if request.adapter_key is not None:
                out.adapter_keys.add(request.adapter_key)
        if not out.preempted:
            self._admit(out, budget)
        return out

    def update(self, out: SchedulerOutput) -> None:
        """Records that the step of ``out`` ran: its tokens' K/V are now in the pool."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens

    # -- internals ---------------------------------------------------------------------------

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            key = request.adapter_key
            new_adapter = key is not None and key not in out.adapter_keys
            if new_adapter and len(out.adapter_keys) >= self.max_loras:
                break
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            kv_need = self._kv_pages_for(request.num_computed_tokens + n) - (
                len(request.blocks) * self.pages_per_block)
            adapter_need = self.adapters.pages_needed(key) if key is not None else 0
            available = self.allocator.num_free + self.adapters.evictable_pages()
            if kv_need + adapter_need > available:
                break
            try:
                if key is not None and not self.adapters.acquire(key):
                    break
            except AdapterUnavailableError as e:  # this request fails, the others go on
                request.fail(f"request {request.request_id}: {e}")
                out.failed.append(self.waiting.popleft())
                continue
            if not self._allocate_blocks(request, request.num_computed_tokens + n):
                if key is not None:
                    self.adapters.release(key)
                break
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.perf_counter()
            out.scheduled.append(ScheduledRequest(request, n))
            if key is not None:
                out.adapter_keys.add(key)
            budget -= n

    def _grow_or_preempt(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        """Gives ``request`` pages for ``n`` more tokens, preempting the newest requests as
        needed; False when ``request`` itself had to go."""
        target = request.num_computed_tokens + n
        while not self._allocate_blocks(request, target):
            victim = self.running[-1]
            if victim is request and len(self.running) == 1:
                request.fail(f"request {request.request_id} cannot get KV pages for "
                                    f"{target} tokens even alone in the pool")
                self.running.remove(request)
                self._release(request)
                out.failed.append(request)
                return False
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _allocate_blocks(self, request: Request, num_tokens: int) -> bool:
        """Extends ``request.blocks`` to hold ``num_tokens`` tokens, evicting unpinned adapters
        if the free list is short; False (and nothing taken) when that is not enough."""
        num_blocks = -(-num_tokens // self.block_size) - len(request.blocks)
        if num_blocks <= 0:
            return True
        need = num_blocks * self.pages_per_block
        short = need - self.allocator.num_free
        if short > 0:
            self.adapters.evict_unpinned(short)
        if not self.allocator.can_allocate(need):
            return False
        pages = self.allocator.allocate(need, KV)
        ppb = self.pages_per_block
        request.blocks.extend(pages[i:i + ppb] for i in range(0, need, ppb))
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        """Frees the KV pages of ``request`` and unpins its adapter."""
        self.allocator.free([p for block in request.blocks for p in block])
        request.blocks = []
        if request.adapter_key is not None:
            self.adapters.release(request.adapter_key)

    def _kv_pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size) * self.pages_per_block
