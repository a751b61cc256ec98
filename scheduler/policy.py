"""Admission and preemption policies: fcfs, cluster (S-LoRA) and fair (VTC) (no torch)."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pagedlora.scheduler.request import Request

POLICIES = ("fcfs", "cluster", "fair")  # the names make_policy knows


@dataclass(frozen=True)
class BatchView:
    """What a policy may look at when ordering the waiting queue.

    Attributes:
        now: seconds, on the scheduler's clock.
        running_keys: adapter keys of the running batch, every adapter of a mix included
            (None, the base model, included when a base request runs).
        is_resident: whether an adapter's pages are in the pool now.
    """

    now: float
    running_keys: frozenset
    is_resident: Callable[[str], bool]


def _arrival(request: Request) -> tuple[float, int]:
    return request.arrival_time, request.request_id


class FcfsPolicy:
    """First come, first served: arrival order; the most recently admitted request is
    preempted first (vLLM's default)."""

    name = "fcfs"

    def order(self, waiting: Iterable[Request], view: BatchView) -> list[Request]:
        """The waiting requests in the order they should be admitted."""
        return sorted(waiting, key=_arrival)

    def victim(self, running: list[Request]) -> Request:
        """The running request to preempt (``running`` is in admission order)."""
        return running[-1]

    def charge(self, request: Request, num_prefill: int, num_decode: int) -> None:
        """Records service given to ``request`` in a step (FCFS keeps no account)."""

    def on_arrival(self, request: Request, active_keys: Callable[[], set]) -> None:
        """Notes a newly queued request; ``active_keys()`` gives the ``lora_key`` of the
        requests waiting or running before it (computed only by a policy that asks: FCFS
        needs nothing)."""


class ClusterPolicy(FcfsPolicy):
    """Adapter clustering (S-LoRA, Sheng et al. 2023, section 5.2): prefer waiting requests
    whose adapter is already in the running batch, then those whose adapter is resident in the
    pool, so a step touches few adapters and loads few (a mix: all of its adapters);
    arrival order within each class. A
    request waiting longer than ``max_wait_s`` is taken before all of them, oldest first, so no
    adapter starves.

    Args:
        max_wait_s: the starvation bound, seconds since arrival.
    """

    name = "cluster"

    def __init__(self, max_wait_s: float) -> None:
        self.max_wait_s = max_wait_s

    def order(self, waiting: Iterable[Request], view: BatchView) -> list[Request]:
        def rank(r: Request):
            if view.now - r.arrival_time > self.max_wait_s:
                cls = 0
            elif all(k in view.running_keys for k in r.adapter_keys or (None,)):
                cls = 1
            elif all(view.is_resident(k) for k in r.adapter_keys):
                cls = 2
            else:
                cls = 3
            return cls, _arrival(r)
        return sorted(waiting, key=rank)


class FairPolicy(FcfsPolicy):
    """Virtual token counters (VTC; Sheng et al. 2024, "Fairness in Serving Large Language
    Models", section 4): each adapter (the base model is one client too, and so is each mix
    or scale of adapters: ``Request.lora_key``) has a counter of the service it received,
    ``input_weight * prefill tokens + output_weight * decode tokens``. Admission repeatedly
    takes the oldest request of the backlogged client with the smallest counter, so a flood
    of requests for one adapter cannot starve the others. A client that becomes backlogged
    again is lifted to the smallest counter of the active clients (to the highest counter
    when none is active), so idling earns no credit. The running request of the most-served
    client is preempted first.

    Args:
        input_weight, output_weight: cost of a prefill and of a decode token (the paper uses
            1 and 2).
    """

    name = "fair"

    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0) -> None:
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str | None, float] = {}

    def order(self, waiting: Iterable[Request], view: BatchView) -> list[Request]:
        queues: dict[str | None, list[Request]] = {}
        for r in sorted(waiting, key=_arrival):
            queues.setdefault(r.lora_key, []).append(r)
        # (counter, oldest arrival, client index, position in its queue); a heap, since a
        # step may look at thousands of requests over thousands of adapters
        clients = list(queues)
        heap = [(self.counters.get(k, 0.0), _arrival(queues[k][0]), i, 0)
                for i, k in enumerate(clients)]
        heapq.heapify(heap)
        ordered: list[Request] = []
        while heap:
            counter, _, i, pos = heapq.heappop(heap)
            queue = queues[clients[i]]
            r = queue[pos]
            ordered.append(r)
            if pos + 1 < len(queue):
                # Charge its prompt as if admitted, so the next pick interleaves clients.
                counter += self.input_weight * (r.num_tokens - r.num_computed_tokens)
                heapq.heappush(heap, (counter, _arrival(queue[pos + 1]), i, pos + 1))
        return ordered

    def victim(self, running: list[Request]) -> Request:
        most = max(self.counters.get(r.lora_key, 0.0) for r in running)
        return next(r for r in reversed(running) if self.counters.get(r.lora_key, 0.0) == most)

    def charge(self, request: Request, num_prefill: int, num_decode: int) -> None:
        key = request.lora_key
        self.counters[key] = self.counters.get(key, 0.0) + (
            self.input_weight * num_prefill + self.output_weight * num_decode)

    def on_arrival(self, request: Request, active_keys: Callable[[], set]) -> None:
        key = request.lora_key
        keys = active_keys()
        if key in keys:
            return
        active = [self.counters.get(k, 0.0) for k in keys]
        # Nobody active: lift to the highest counter, the service level the system was at
        # (the paper lifts to the counter of the last client to leave), so a newcomer cannot
        # bank the gap against a client that was served while alone.
        floor = min(active) if active else max(self.counters.values(), default=0.0)
        self.counters[key] = max(self.counters.get(key, 0.0), floor)


def make_policy(name: str, *, max_wait_s: float) -> FcfsPolicy:
    """The policy called ``name`` ("fcfs", "cluster" or "fair").

    Raises:
        ValueError: an unknown name.
    """
    if name == "fcfs":
        return FcfsPolicy()
    if name == "cluster":
        return ClusterPolicy(max_wait_s)
    if name == "fair":
        return FairPolicy()
    raise ValueError(f"unknown policy {name!r}; expected one of {POLICIES}")
