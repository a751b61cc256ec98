"""Scheduler: which requests run in the next step, and with how many tokens (pure Python)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pagedlora.config import EngineConfig
from pagedlora.errors import AdapterUnavailableError
from pagedlora.scheduler.kv_blocks import KVBlockManager
from pagedlora.scheduler.page_allocator import KV, PageAllocator
from pagedlora.scheduler.policy import BatchView, make_policy
from pagedlora.scheduler.request import Request, RequestStatus


class AdapterResidency(Protocol):
    """What the scheduler needs from the adapter store (a fake serves in tests)."""

    def pages_needed(self, key: str) -> int:
        """Pages that making ``key`` resident would take now (0 when resident)."""

    def adapter_pages(self, key: str) -> int:
        """Pages ``key`` takes when resident (whether or not it is now)."""

    def acquire(self, key: str) -> bool:
        """Pins ``key`` in the pool, loading it if needed; False when its pages cannot be had.
        Raises AdapterUnavailableError when its weights cannot be had (the request fails)."""

    def release(self, key: str) -> None:
        """Drops one pin taken by :meth:`acquire`."""

    def hold(self, key: str) -> bool:
        """Notes a queued request for ``key``: its content must outlive a removed or re-added
        name until :meth:`unhold`. False (nothing noted) when ``key`` is no longer
        registered."""

    def unhold(self, key: str) -> None:
        """Drops one :meth:`hold` (the request finished)."""

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
        aborted: waiting requests finished with "abort" this step (past their deadline).
        adapter_keys: distinct adapters of the step (None, the base model, excluded); they are
            pinned in the pool for as long as their requests run.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)
    aborted: list[Request] = field(default_factory=list)
    adapter_keys: set[str] = field(default_factory=set)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens computed in the step."""
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Iteration-level scheduler with page-aware admission, chunked prefill, preemption,
    adapter-aware policies and automatic prefix caching.

    Each step has a budget of ``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences.
    Running requests are served first (a long prompt is prefilled in chunks within the budget,
    sharing steps with decodes); then waiting requests are admitted in the policy's order
    (fcfs, cluster or fair; see :mod:`pagedlora.scheduler.policy`), each only when its KV pages
    plus a watermark of free pages and, if its adapter is not resident, the adapter's pages can
    all be had. A request whose adapter would exceed ``max_loras`` distinct adapters in the step
    is passed over for this step (others behind it may go); one short of pages stops admission
    (no overtaking by smaller requests). When a running request cannot get a page for its next
    tokens, cached KV blocks nobody holds are evicted first, then unpinned adapters, then the
    policy's victim (by default the most recently admitted request) is preempted: its pages are
    freed and it is recomputed later (Orca, Yu et al. 2022; vLLM, Kwon et al. 2023, section 4.5,
    "recomputation"), usually from its own blocks still in the prefix cache.

    A waiting request with a deadline for its first token is aborted when the estimated time
    to its first token (its remaining prefill steps times the recent step time) would pass the
    deadline (S-LoRA, Sheng et al. 2023, section 5.2, early abort).

    The page arithmetic asks the allocator, so the same scheduler runs on the unified pool
    (:class:`PageAllocator`) and on a static split (:class:`StaticSplitAllocator`: KV blocks and
    adapter slots in separate regions, so evicting one kind frees nothing for the other).

    Args:
        config: the engine options (block_size, max_num_seqs, max_num_batched_tokens,
            max_loras, policy, policy_max_wait_s, watermark, enable_prefix_caching).
        pages_per_block: pages one KV block takes (one per layer).
        allocator: the pool's page allocator (shared with the adapter store).
        adapters: the adapter store's residency interface.
        clock: seconds, monotonic (``time.perf_counter``; tests pass a fake).

    Attributes:
        num_refused_admissions: steps whose admission stopped because the next request's KV
            pages (plus the watermark) or its adapter's pages could not be had (at most one per
            step: admission stops there).
        num_preemptions: running requests preempted for lack of pages.
    """

    def __init__(self, config: EngineConfig, *, pages_per_block: int, allocator: PageAllocator,
                 adapters: AdapterResidency, clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.pages_per_block = pages_per_block
        self.allocator = allocator
        self.adapters = adapters
        self.clock = clock
        self.kv = KVBlockManager(allocator, block_size=config.block_size,
                                 pages_per_block=pages_per_block,
                                 enable_caching=config.enable_prefix_caching)
        self.policy = make_policy(config.policy, max_wait_s=config.policy_max_wait_s)
        blocks = int(config.watermark * allocator.capacity(KV)) // pages_per_block
        self.watermark_pages = blocks * pages_per_block
        self.waiting: list[Request] = []
        # Admission order; the policy picks preemption victims from it.
        self.running: list[Request] = []
        self.step_seconds: float | None = None  # moving average of the time between steps
        self._admission_order: list[Request] | None = None  # the last step's, for prefetch
        self._last_step_at: float | None = None
        self.num_refused_admissions = 0
        self.num_preemptions = 0

    # -- queue -------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queues ``request``; it fails at once (finish_reason "error") if it can never fit."""
        kv_need = self.kv.pages_for(len(request.prompt_token_ids) + 1)
        adapter_need = (0 if request.adapter_key is None
                        else self.adapters.adapter_pages(request.adapter_key))
        if not self.allocator.could_ever_fit(kv_need, adapter_need):
            request.fail(f"the prompt ({len(request.prompt_token_ids)} tokens) and its adapter "
                         f"need {kv_need + adapter_need} pages, more than {self._pool_words()} "
                         f"can hold")
            return
        # A lazy set: only "fair" needs it, and building it per arrival is O(queue).
        self.policy.on_arrival(request, lambda: {r.adapter_key
                                                 for r in (*self.waiting, *self.running)})
        if request.adapter_key is not None:
            request.holds_adapter = self.adapters.hold(request.adapter_key)
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str) -> None:
        """Ends ``request`` (on a stop token, max_tokens, or an abort) and frees its pages.
        Finishing a finished request does nothing."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self._release(request)
        elif request in self.waiting:
            self.waiting.remove(request)
            self.kv.free(request)  # nothing, unless an admission was interrupted midway
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finished_time = self.clock()
        self._unhold(request)

    # -- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Chooses the requests of the next step and allocates their pages."""
        now = self.clock()
        if self._last_step_at is not None and self.running:
            dt = now - self._last_step_at
            self.step_seconds = dt if self.step_seconds is None else (
                0.8 * self.step_seconds + 0.2 * dt)
        self._last_step_at = now
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if budget == 0:
                break
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._grow_or_preempt(request, n, out):
                continue
            self._schedule(request, n, out)
            budget -= n
        self._abort_late(now, out)
        self._admission_order = None
        if not out.preempted:
            self._admit(out, budget, now)
        return out

    def update(self, out: SchedulerOutput) -> None:
        """Records that the step of ``out`` ran: its tokens' K/V are now in the pool, and the
        blocks they filled join the prefix cache."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(s.request)

    def next_adapters(self, n: int) -> list[str]:
        """Adapters of the first ``n`` waiting requests in policy order that are not resident
        (what a prefetcher should bring closer), without duplicates."""
        keys: list[str] = []
        order = self._admission_order  # this step's, when admission ran: no second sort
        if order is None:
            order = self.policy.order(self.waiting, self._view(self.clock(), set()))
        waiting = [r for r in order if r.status is RequestStatus.WAITING]
        for r in waiting[:n]:
            key = r.adapter_key
            if key is not None and key not in keys and self.adapters.pages_needed(key):
                keys.append(key)
        return keys

    # -- internals ---------------------------------------------------------------------------

    def _view(self, now: float, step_keys: set) -> BatchView:
        running = {r.adapter_key for r in self.running} | step_keys
        return BatchView(now=now, running_keys=frozenset(running),
                         is_resident=lambda k: not self.adapters.pages_needed(k))

    def _schedule(self, request: Request, n: int, out: SchedulerOutput) -> None:
        out.scheduled.append(ScheduledRequest(request, n))
        if request.adapter_key is not None:
            out.adapter_keys.add(request.adapter_key)
        prefill = max(0, min(n, len(request.prompt_token_ids) - request.num_computed_tokens))
        self.policy.charge(request, prefill, n - prefill)

    def _abort_late(self, now: float, out: SchedulerOutput) -> None:
        for request in [r for r in self.waiting if r.deadline is not None]:
            if request.first_token_time is not None:
                continue  # its first token came in time; a preempted request is not aborted
            steps = -(-(request.num_tokens - request.num_computed_tokens)
                      // self.config.max_num_batched_tokens)
            if now + steps * (self.step_seconds or 0.0) > request.deadline:
                self.finish(request, "abort")
                request.error = "the first token could not come before the deadline"
                out.aborted.append(request)

    def _admit(self, out: SchedulerOutput, budget: int, now: float) -> None:
        order = self.policy.order(self.waiting, self._view(now, out.adapter_keys))
        self._admission_order = order
        for request in order:
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                return
            key = request.adapter_key
            if key is not None and key not in out.adapter_keys \
                    and len(out.adapter_keys) >= self.config.max_loras:
                continue  # another adapter would exceed max_loras; later ones may share one
            hits = self.kv.match_prefix(request)
            cached = len(hits) * self.block_size
            n = min(request.num_tokens - cached, budget)
            kv_need = self.kv.pages_for(cached + n) - len(hits) * self.pages_per_block
            adapter_need = self.adapters.pages_needed(key) if key is not None else 0
            reserve = self.watermark_pages if self.running else 0
            if not self.allocator.fits(
                    kv_need + reserve, adapter_need,
                    kv_spare=self.kv.evictable_pages - self.kv.evictable_pages_among(hits),
                    adapter_spare=self.adapters.evictable_pages()):
                self.num_refused_admissions += 1
                return
            self.kv.take_prefix(request, hits)
            if key is not None:
                if self.allocator.kinds_share_pages:  # an adapter may take cached blocks' pages
                    self.kv.make_free(adapter_need)
                try:
                    acquired = self.adapters.acquire(key)
                except AdapterUnavailableError as e:  # this request fails, the others go on
                    self._release(request, pinned=False)
                    self._fail(request, str(e))
                    self.waiting.remove(request)
                    out.failed.append(request)
                    continue
                except BaseException:  # e.g. Ctrl-C during the read: give the prefix back
                    self._release(request, pinned=False)
                    raise
                if not acquired:
                    self._release(request, pinned=False)
                    self.num_refused_admissions += 1
                    return
            if not self._allocate(request, cached + n):
                self._release(request)
                self.num_refused_admissions += 1
                return
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
                request.num_cached_tokens = cached
                self.kv.queried_tokens += len(request.prompt_token_ids)
                self.kv.hit_tokens += cached
            self.waiting.remove(request)
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            self._schedule(request, n, out)
            budget -= n

    def _grow_or_preempt(self, request: Request, n: int, out: SchedulerOutput) -> bool:
        """Gives ``request`` pages for ``n`` more tokens, preempting by policy as needed;
        False when ``request`` itself had to go."""
        target = request.num_computed_tokens + n
        while not self._allocate(request, target):
            if len(self.running) == 1:
                key = request.adapter_key
                adapter = "" if key is None else (
                    f" next to its adapter's {self.adapters.adapter_pages(key)} pages")
                self._fail(request, f"the {self.kv.pages_for(target)} KV pages of {target} "
                           f"tokens{adapter} do not fit even alone in {self._pool_words()}")
                self.running.remove(request)
                self._release(request)
                out.failed.append(request)
                return False
            # A request already given tokens in this step is not a candidate: its step's
            # work would then write into pages it no longer holds.
            scheduled = {id(s.request) for s in out.scheduled}
            victim = self.policy.victim([r for r in self.running if id(r) not in scheduled])
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _allocate(self, request: Request, num_tokens: int) -> bool:
        """KV pages for ``num_tokens`` tokens of ``request``: cached blocks nobody holds are
        evicted first, then unpinned adapters (where their pages can serve KV)."""
        short = (self.kv.pages_for(num_tokens) - len(request.blocks) * self.pages_per_block
                 - self.allocator.num_free_for(KV) - self.kv.evictable_pages)
        if short > 0 and self.allocator.kinds_share_pages:
            self.adapters.evict_unpinned(short)
        return self.kv.allocate(request, num_tokens)

    def _pool_words(self) -> str:
        """"the pool of N pages", saying how many KV blocks may use when that is fewer."""
        total, kv = self.allocator.num_pages, self.allocator.capacity(KV)
        return f"the pool of {total} pages" + (f" ({kv} for KV blocks)" if kv < total else "")

    def _preempt(self, request: Request) -> None:
        self.num_preemptions += 1
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.append(request)

    def _fail(self, request: Request, message: str) -> None:
        """Finishes a queued request with "error" and drops its adapter hold (the caller frees
        its pages and takes it out of its queue)."""
        request.fail(message)
        self._unhold(request)

    def _unhold(self, request: Request) -> None:
        if request.holds_adapter:
            request.holds_adapter = False
            self.adapters.unhold(request.adapter_key)

    def _release(self, request: Request, pinned: bool = True) -> None:
        """Drops the KV blocks of ``request`` (nothing computed remains) and, if ``pinned``,
        unpins its adapter."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        if pinned and request.adapter_key is not None:
            self.adapters.release(request.adapter_key)
