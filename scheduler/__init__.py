"""Iteration-level scheduling and page accounting, free of torch (``pagedlora.scheduler``).

Nothing here imports the rest of pagedlora: the engine hands the scheduler a
:class:`SchedulerConfig` and an adapter store that satisfies :class:`AdapterResidency`.
"""

from pagedlora.scheduler.config import SchedulerConfig
from pagedlora.scheduler.kv_blocks import KVBlockManager, KVStats
from pagedlora.scheduler.outputs import RunnerOutput, TokenLogprobs
from pagedlora.scheduler.page_allocator import (
    ADAPTER,
    KV,
    OutOfPagesError,
    PageAllocator,
    PoolStats,
)
from pagedlora.scheduler.policy import POLICIES, ClusterPolicy, FairPolicy, FcfsPolicy
from pagedlora.scheduler.request import AdapterTerms, Request, RequestStatus
from pagedlora.scheduler.scheduler import (
    AdapterResidency,
    ScheduledRequest,
    Scheduler,
    SchedulerOutput,
    SchedulerStats,
)
from pagedlora.scheduler.static_allocator import MEMORY_LAYOUTS, StaticSplitAllocator

__all__ = [
    "ADAPTER", "KV", "MEMORY_LAYOUTS", "POLICIES", "AdapterResidency", "AdapterTerms",
    "ClusterPolicy", "FairPolicy", "FcfsPolicy", "KVBlockManager", "KVStats",
    "OutOfPagesError", "PageAllocator", "PoolStats", "Request", "RequestStatus", "RunnerOutput",
    "ScheduledRequest", "Scheduler", "SchedulerConfig", "SchedulerOutput", "SchedulerStats",
    "StaticSplitAllocator", "TokenLogprobs",
]
