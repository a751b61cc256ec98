"""Scheduler: which requests run in the next step, with how many tokens, and what came of it
(pure Python, no torch, no I/O)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from pagedlora.scheduler.config import SchedulerConfig
from pagedlora.scheduler.kv_blocks import Block, KVBlockManager
from pagedlora.scheduler.outputs import RunnerOutput
from pagedlora.scheduler.page_allocator import KV, PageAllocator
from pagedlora.scheduler.policy import BatchView, make_policy
from pagedlora.scheduler.request import Request, RequestStatus


class AdapterResidency(Protocol):
    """What the scheduler needs from the adapter store: page accounting only, no I/O (a fake
    serves in tests). Per content key: a request of a mix pins and holds each of its
    adapters."""

    def footprint(self, key: str) -> int:
        """Pages ``key`` takes when resident, whether or not it is now (0 when unknown)."""

    def is_resident(self, key: str) -> bool:
        """Whether ``key`` holds pool pages now (loaded, or reserved for this step's load)."""

    def unit_of(self, key: str) -> Hashable:
        """``key``'s id among the allocator's reclaimable units (while resident and unpinned)."""

    def pin(self, key: str) -> bool:
        """Pins ``key``; if it is not resident, reserves its pages (the allocator reclaims
        what it needs) for the store to fill before the step runs. False, with nothing
        changed, when the pages cannot be had."""

    def unpin(self, key: str) -> None:
        """Drops one :meth:`pin`."""

    def hold(self, key: str) -> bool:
        """Notes a queued request for ``key``: its content must outlive a removed or re-added
        name until :meth:`unhold`. False (nothing noted) when ``key`` is no longer
        registered."""

    def unhold(self, key: str) -> None:
        """Drops one :meth:`hold` (the request finished)."""


@dataclass(frozen=True)
class ScheduledRequest:
    """One request in a step.

    Attributes:
        request: the request (read-only for everyone but the scheduler).
        num_new_tokens: its tokens computed in this step, from ``request.num_computed_tokens``.
        block_table: its KV blocks for the step, one page id per layer each.
        first_step: whether this is the request's first step (not a chunk after the first,
            nor a recomputation after preemption).
    """

    request: Request
    num_new_tokens: int
    block_table: tuple[Block, ...] = ()
    first_step: bool = False


@dataclass(frozen=True)
class SchedulerOutput:
    """The hand-off from the scheduler to the adapter store and the model runner for one step
    (read-only once made: :meth:`Scheduler.drop_failed` makes a new one).

    Attributes:
        scheduled: requests in the step, running ones first, each with its new token count.
        preempted: requests whose KV pages were freed this step (they will be recomputed).
        failed: requests finished with "error" since the last step (they can never fit the
            pool, outgrew it, or their adapter was removed or could not be loaded).
        aborted: requests finished with "abort" since the last step (asked for, or past their
            deadline).
        adapter_keys: distinct adapters of the step, every adapter of a mix included (None,
            the base model, excluded); pinned (their pages reserved if they were not
            resident) for as long as their requests run.
        upcoming_adapters: adapters of the next waiting requests in policy order that are not
            resident (what to prefetch), without duplicates, at most ``max_loras``.
        finished_request_ids: every request finished since the last step (the runner drops
            what it keeps of them).
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)
    aborted: list[Request] = field(default_factory=list)
    adapter_keys: frozenset[str] = frozenset()
    upcoming_adapters: tuple[str, ...] = ()
    finished_request_ids: tuple[int, ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        """Tokens computed in the step."""
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass(frozen=True)
class SchedulerStats:
    """The scheduler's counters (see :meth:`Scheduler.stats`).

    Attributes:
        requests_running: requests in the running batch now.
        requests_waiting: requests queued (new or preempted) now.
        admissions_refused: steps whose admission stopped because the next request's KV pages
            (plus the watermark) or its adapter's pages could not be had, since the start (at
            most one per step: admission stops there).
        preemptions: running requests preempted for lack of pages, since the start.
        running_adapters: adapter content key -> running requests that use it, now (the base
            model's requests are not counted).
        waiting_adapters: adapter content key -> waiting requests that use it, now.
    """

    requests_running: int
    requests_waiting: int
    admissions_refused: int
    preemptions: int
    running_adapters: dict[str, int] = field(default_factory=dict)
    waiting_adapters: dict[str, int] = field(default_factory=dict)


class Scheduler:
    """Iteration-level scheduler with page-aware admission, chunked prefill, preemption,
    adapter-aware policies and automatic prefix caching; the one writer of a request's
    progress (tokens, times, status, finish reason).

    Each step has a budget of ``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences.
    Running requests are served first (a long prompt is prefilled in chunks within the budget,
    sharing steps with decodes); then waiting requests are admitted in the policy's order
    (fcfs, cluster or fair; see :mod:`pagedlora.scheduler.policy`), each only when its KV pages
    plus a watermark of free pages and, if its adapter is not resident, the adapter's pages can
    all be had: one question to the allocator, whose answer counts reclaimable pages (cached KV
    blocks nobody holds, unpinned adapters). A request whose adapter would exceed ``max_loras``
    distinct adapters in the step is passed over for this step (others behind it may go; each
    adapter of a mix counts once, as it is pinned once per request); one short of pages stops
    admission (no overtaking by smaller requests). When a running request
    cannot get a page for its next tokens, the allocator reclaims (cached blocks first, then
    unpinned adapters), and if that is not enough the policy's victim (by default the most
    recently admitted request) is preempted: its pages are freed and it is recomputed later
    (Orca, Yu et al. 2022; vLLM, Kwon et al. 2023, section 4.5, "recomputation"), usually from
    its own blocks still in the prefix cache. A request that asks for prompt log-probabilities
    reads the prefix cache only up to the positions whose entries it already holds (none when
    new; vLLM skips the cache for such requests altogether), since a cached block's positions
    are not computed again; its blocks still join the cache for others.

    Scheduling only reserves an adapter's pages; the adapter store fills them before the step
    runs (:meth:`drop_failed` takes out the requests whose adapter could not be loaded), so
    the scheduler does no I/O. After the step, :meth:`update` appends the sampled tokens,
    checks the token-level stops (EOS and stop token ids, ``max_tokens``, ``max_model_len``),
    stamps times with the one injected clock and frees the pages of finished requests.

    A waiting request with a deadline for its first token is aborted when the estimated time
    to its first token (its remaining prefill steps times the recent step time) would pass the
    deadline (S-LoRA, Sheng et al. 2023, section 5.2, early abort).

    The page arithmetic asks the allocator, so the same scheduler runs on the unified pool
    (:class:`PageAllocator`) and on a static split (:class:`StaticSplitAllocator`).

    Not thread-safe: one thread schedules, updates, adds and finishes (the engine core queues
    other threads' requests and aborts for it).

    Args:
        config: the scheduling options.
        pages_per_block: pages one KV block takes (one per layer).
        allocator: the pool's page allocator (shared with the adapter store).
        adapters: the adapter store's residency interface.
        clock: seconds, monotonic (``time.perf_counter``; tests pass a fake).
    """

    def __init__(self, config: SchedulerConfig, *, pages_per_block: int,
                 allocator: PageAllocator, adapters: AdapterResidency,
                 clock: Callable[[], float] = time.perf_counter) -> None:
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
        self.watermark_pages = config.watermark_pages(allocator, pages_per_block)
        self.waiting: list[Request] = []
        # Admission order; the policy picks preemption victims from it.
        self.running: list[Request] = []
        self.step_seconds: float | None = None  # moving average of the time between steps
        self._last_step_at: float | None = None
        self._unfinished: dict[int, Request] = {}  # waiting or running, by id
        # Finished outside a step (at add, or by abort), reported by the next schedule().
        self._failed: list[Request] = []
        self._aborted: list[Request] = []
        self._finished_ids: list[int] = []  # every finish since the last schedule()
        self._finished: list[Request] = []  # every finish since the last take_finished()
        self._num_refused = 0
        self._num_preemptions = 0

    # -- queue -------------------------------------------------------------------------------

    def rejection(self, num_prompt_tokens: int, adapter_keys: Sequence[str]) -> str | None:
        """Why a request of ``num_prompt_tokens`` prompt tokens for the adapters
        ``adapter_keys`` (content keys; empty for the base model) could never run, or None when
        it could: its adapters must be at most ``max_loras``, and its prompt, its first output
        token and its adapters must fit the pool with every page free. Safe to call from any
        thread."""
        if len(adapter_keys) > self.config.max_loras:
            return (f"uses {len(adapter_keys)} adapters, more than max_loras="
                    f"{self.config.max_loras} allows in one step")
        kv_need = self.kv.pages_for(num_prompt_tokens + 1)
        adapter_need = sum(self.adapters.footprint(k) for k in adapter_keys)
        if self.allocator.could_ever_fit(kv_need, adapter_need):
            return None
        words = "adapter" if len(adapter_keys) < 2 else "adapters"
        return (f"the prompt ({num_prompt_tokens} tokens) and its {words} need "
                f"{kv_need + adapter_need} pages, more than {self._pool_words()} can hold")

    def take_hold(self, request: Request) -> None:
        """Counts ``request`` as a holder of its adapters' content now (each adapter of a mix;
        all or none), so that a later ``remove_adapter`` or re-add of a name cannot take the
        weights from under it while it waits to be added. Safe from any thread for a request
        not yet added (it touches only that request and the thread-safe adapter store)."""
        keys = request.adapter_keys
        if not keys or request.holds_adapter is not None:
            return
        for i, key in enumerate(keys):
            if not self.adapters.hold(key):
                for held in keys[:i]:
                    self.adapters.unhold(held)
                request.holds_adapter = False
                return
        request.holds_adapter = True

    def add(self, request: Request) -> None:
        """Queues ``request`` (taking its adapter holds, if :meth:`take_hold` did not). One that
        can never fit the pool, or one of whose adapters was no longer registered when the
        hold was asked for, is finished with "error" at once and reported by the next
        :meth:`schedule` in ``failed``."""
        self._unfinished[request.request_id] = request
        keys = request.adapter_keys
        error = self.rejection(len(request.prompt_token_ids), keys)
        if error is None and keys:
            self.take_hold(request)
            if not request.holds_adapter:
                which = (f"adapter with content key {keys[0]} is" if len(keys) == 1 else
                         f"one of the adapters with content keys {list(keys)} is")
                error = (f"{which} no longer registered (removed or re-added with other "
                         f"weights while the request waited)")
        if error is not None:
            self.finish(request, "error", error=error)
            self._failed.append(request)
            return
        # A lazy set: only "fair" needs it, and building it per arrival is O(queue).
        self.policy.on_arrival(request, lambda: {r.lora_key
                                                 for r in (*self.waiting, *self.running)})
        self.waiting.append(request)

    def abort(self, request_id: int) -> bool:
        """Finishes the unfinished request ``request_id`` with "abort" (reported by the next
        :meth:`schedule`); False when there is none."""
        request = self._unfinished.get(request_id)
        if request is None:
            return False
        self.finish(request, "abort")
        self._aborted.append(request)
        return True

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self.waiting or self.running)

    def finish(self, request: Request, reason: str, error: str | None = None) -> None:
        """Ends ``request`` ("stop", "length", "abort" or "error" with ``error``) and frees its
        pages. Finishing a finished request does nothing."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self._release(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.forget(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.error = error
        request.finished_time = self.clock()
        self._unhold(request)
        self._unfinished.pop(request.request_id, None)
        self._finished_ids.append(request.request_id)
        self._finished.append(request)

    def take_finished(self) -> list[Request]:
        """Every request finished since the last call, in order (whatever finished it:
        update, abort, failure, ``finish``), so that a step that raised midway loses none."""
        finished, self._finished = self._finished, []
        return finished

    # -- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Chooses the requests of the next step and allocates their pages (KV blocks, and
        the pages of adapters that are not resident)."""
        now = self.clock()
        if self._last_step_at is not None and self.running:
            dt = now - self._last_step_at
            self.step_seconds = dt if self.step_seconds is None else (
                0.8 * self.step_seconds + 0.2 * dt)
        self._last_step_at = now
        step = _Step()
        budget = self.config.max_num_batched_tokens
        for request in list(self.running):
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if budget == 0:
                break
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._grow_or_preempt(request, n, step):
                continue
            self._schedule(request, n, step, first=False)
            budget -= n
        self._abort_late(now)
        order = None
        if not step.preempted:
            order = self._admit(step, budget, now)
        out = SchedulerOutput(
            scheduled=step.scheduled, preempted=step.preempted,
            failed=[*self._failed, *step.failed], aborted=self._aborted,
            adapter_keys=frozenset(step.adapter_keys),
            upcoming_adapters=self._upcoming(order, now),
            finished_request_ids=tuple(self._finished_ids))
        self._failed, self._aborted, self._finished_ids = [], [], []
        return out

    def drop_failed(self, out: SchedulerOutput, failed: Mapping[str, str]) -> SchedulerOutput:
        """``out`` without the requests one of whose adapters could not be loaded
        (``failed``: adapter key -> reason); they finish with "error" and the reason, their
        pages freed, and are added to ``failed``. The other requests are untouched."""
        if not failed:
            return out

        def reason(r: Request) -> str | None:
            return next((failed[k] for k in r.adapter_keys if k in failed), None)
        dropped = [s.request for s in out.scheduled if reason(s.request) is not None]
        for r in dropped:
            self.finish(r, "error", error=reason(r))
        kept = [s for s in out.scheduled if s.request not in dropped]
        return replace(out, scheduled=kept, failed=[*out.failed, *dropped],
                       adapter_keys=frozenset(k for s in kept for k in s.request.adapter_keys),
                       finished_request_ids=(*out.finished_request_ids,
                                             *(r.request_id for r in dropped)))

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Records that the step of ``out`` ran: its tokens' K/V are in the pool (the blocks
        they filled join the prefix cache), the sampled tokens are appended, and a request
        that sampled EOS or a stop token id, reached ``max_tokens`` or ``max_model_len``
        finishes ("stop" or "length") and frees its pages. Log-probabilities the runner
        computed are appended alongside (``output_logprobs``, ``prompt_logprobs``).

        Returns:
            the requests that got a token, in step order.
        """
        sampled = dict(zip(result.request_ids, result.token_ids, strict=True))
        logprobs = (dict(zip(result.request_ids, result.logprobs, strict=True))
                    if result.logprobs else {})
        prompt_logprobs = dict(result.prompt_logprobs)
        now = self.clock()
        changed = []
        for s in out.scheduled:
            r = s.request
            r.num_computed_tokens += s.num_new_tokens
            self.kv.cache_full_blocks(r)
            r.prompt_logprobs.extend(prompt_logprobs.get(r.request_id, ()))
            token = sampled.get(r.request_id)
            if token is None:
                continue
            r.output_token_ids.append(token)
            if logprobs.get(r.request_id) is not None:
                r.output_logprobs.append(logprobs[r.request_id])
            if r.first_token_time is None:
                r.first_token_time = now
            if token in r.stop_token_ids:
                self.finish(r, "stop")
            elif len(r.output_token_ids) >= r.max_tokens \
                    or r.num_tokens >= self.config.max_model_len:
                self.finish(r, "length")
            changed.append(r)
        return changed

    def stats(self) -> SchedulerStats:
        """The counters now."""
        return SchedulerStats(len(self.running), len(self.waiting), self._num_refused,
                              self._num_preemptions, _count_adapters(self.running),
                              _count_adapters(self.waiting))

    # -- internals ---------------------------------------------------------------------------

    def _view(self, now: float, step_keys: set) -> BatchView:
        running = {k for r in self.running for k in (r.adapter_keys or (None,))} | step_keys
        return BatchView(now=now, running_keys=frozenset(running),
                         is_resident=self.adapters.is_resident)

    def _schedule(self, request: Request, n: int, step: _Step, first: bool) -> None:
        step.scheduled.append(ScheduledRequest(request, n, tuple(self.kv.blocks_of(request)),
                                               first))
        step.adapter_keys.update(request.adapter_keys)
        prefill = max(0, min(n, len(request.prompt_token_ids) - request.num_computed_tokens))
        self.policy.charge(request, prefill, n - prefill)

    def _upcoming(self, order: list[Request] | None, now: float) -> tuple[str, ...]:
        """Adapters of the first ``max_loras`` waiting requests in policy order that are not
        resident (this step's admission order when admission ran: no second sort)."""
        if order is None:
            order = self.policy.order(self.waiting, self._view(now, set()))
        keys: list[str] = []
        waiting = [r for r in order if r.status is RequestStatus.WAITING]
        for r in waiting[:self.config.max_loras]:
            for key in r.adapter_keys:
                if key not in keys and not self.adapters.is_resident(key):
                    keys.append(key)
        return tuple(keys)

    def _abort_late(self, now: float) -> None:
        for request in [r for r in self.waiting if r.deadline is not None]:
            if request.first_token_time is not None:
                continue  # its first token came in time; a preempted request is not aborted
            steps = -(-(request.num_tokens - request.num_computed_tokens)
                      // self.config.max_num_batched_tokens)
            if now + steps * (self.step_seconds or 0.0) > request.deadline:
                self.finish(request, "abort",
                            error="the first token could not come before the deadline")
                self._aborted.append(request)

    def _admit(self, step: _Step, budget: int, now: float) -> list[Request]:
        """Admits waiting requests in policy order; returns that order."""
        order = self.policy.order(self.waiting, self._view(now, step.adapter_keys))
        for request in order:
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            keys = request.adapter_keys
            new = [k for k in keys if k not in step.adapter_keys]
            if new and len(step.adapter_keys) + len(new) > self.config.max_loras:
                continue  # more adapters would exceed max_loras; later ones may share them
            hits = self.kv.match_prefix(request)
            if request.needs_prompt_logprobs:  # only positions whose logprobs it has
                hits = hits[:len(request.prompt_logprobs) // self.block_size]
            cached = len(hits) * self.block_size
            n = min(request.num_tokens - cached, budget)
            kv_need = self.kv.pages_for(cached + n) - len(hits) * self.pages_per_block
            adapter_need = sum(self.adapters.footprint(k) for k in keys
                               if not self.adapters.is_resident(k))
            keeping = [self.kv.unit_of(b) for b in hits]
            keeping += [self.adapters.unit_of(k) for k in keys]
            reserve = self.watermark_pages if self.running else 0
            if not self.allocator.fits(kv_need + reserve, adapter_need, keeping=keeping):
                self._num_refused += 1
                break
            self.kv.take_prefix(request, hits)
            request.num_computed_tokens = cached
            if not self._pin_all(keys):
                self._release(request, pinned=False)
                self._num_refused += 1
                break
            if not self._allocate(request, cached + n):
                self._release(request)
                self._num_refused += 1
                break
            first = request.first_scheduled_time is None
            if first:
                request.first_scheduled_time = now
                request.num_cached_tokens = cached
                self.kv.count_lookup(len(request.prompt_token_ids), cached)
            self.waiting.remove(request)
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            self._schedule(request, n, step, first)
            budget -= n
        return order

    def _grow_or_preempt(self, request: Request, n: int, step: _Step) -> bool:
        """Gives ``request`` pages for ``n`` more tokens, preempting by policy as needed;
        False when ``request`` itself had to go."""
        target = request.num_computed_tokens + n
        while not self._allocate(request, target):
            if len(self.running) == 1:
                keys = request.adapter_keys
                whose = "its adapter's" if len(keys) == 1 else "its adapters'"
                adapter = "" if not keys else (
                    f" next to {whose} {sum(map(self.adapters.footprint, keys))} pages")
                self.finish(request, "error", error=(
                    f"the {self.kv.pages_for(target)} KV pages of {target} tokens{adapter} do "
                    f"not fit even alone in {self._pool_words()}"))
                step.failed.append(request)
                return False
            # A request already given tokens in this step is not a candidate: its step's
            # work would then write into pages it no longer holds.
            scheduled = {id(s.request) for s in step.scheduled}
            victim = self.policy.victim([r for r in self.running if id(r) not in scheduled])
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _allocate(self, request: Request, num_tokens: int) -> bool:
        """KV pages for ``num_tokens`` tokens of ``request`` (the allocator reclaims cached
        blocks nobody holds, then unpinned adapters where their pages can serve KV)."""
        return self.kv.allocate(request, num_tokens)

    def _pool_words(self) -> str:
        """"the pool of N pages", saying how many KV blocks may use when that is fewer."""
        total, kv = self.allocator.num_pages, self.allocator.capacity(KV)
        return f"the pool of {total} pages" + (f" ({kv} for KV blocks)" if kv < total else "")

    def _preempt(self, request: Request) -> None:
        self._num_preemptions += 1
        self.running.remove(request)
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.append(request)

    def _pin_all(self, keys: Sequence[str]) -> bool:
        """Pins every adapter of ``keys``, or (False) none: those pinned are unpinned again
        when one cannot get its pages."""
        for i, key in enumerate(keys):
            if not self.adapters.pin(key):
                for pinned in keys[:i]:
                    self.adapters.unpin(pinned)
                return False
        return True

    def _unhold(self, request: Request) -> None:
        if request.holds_adapter:
            request.holds_adapter = False
            for key in request.adapter_keys:
                self.adapters.unhold(key)

    def _release(self, request: Request, pinned: bool = True) -> None:
        """Drops the KV blocks of ``request`` (nothing computed remains) and, if ``pinned``,
        unpins its adapters."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        if pinned:
            for key in request.adapter_keys:
                self.adapters.unpin(key)


class _Step:
    """What :meth:`Scheduler.schedule` collects for one step before freezing it."""

    def __init__(self) -> None:
        self.scheduled: list[ScheduledRequest] = []
        self.preempted: list[Request] = []
        self.failed: list[Request] = []
        self.adapter_keys: set[str] = set()


def _count_adapters(requests) -> dict[str, int]:
    """Adapter content key -> how many of ``requests`` use it (each adapter of a mix;
    base-model requests left out)."""
    return dict(Counter(k for r in requests for k in r.adapter_keys))
