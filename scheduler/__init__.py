"""Iteration-level scheduling and page accounting, free of torch (``pagedlora.scheduler``)."""

from pagedlora.scheduler.kv_blocks import KVBlockManager
from pagedlora.scheduler.page_allocator import ADAPTER, KV, OutOfPagesError, PageAllocator
from pagedlora.scheduler.policy import POLICIES, ClusterPolicy, FairPolicy, FcfsPolicy
from pagedlora.scheduler.request import Request, RequestStatus
from pagedlora.scheduler.scheduler import (
    AdapterResidency,
    ScheduledRequest,
    Scheduler,
    SchedulerOutput,
)
from pagedlora.scheduler.static_allocator import StaticSplitAllocator

__all__ = [
    "ADAPTER", "KV", "POLICIES", "AdapterResidency", "ClusterPolicy", "FairPolicy",
    "FcfsPolicy", "KVBlockManager", "OutOfPagesError", "PageAllocator", "Request",
    "RequestStatus", "ScheduledRequest", "Scheduler", "SchedulerOutput", "StaticSplitAllocator",
]
