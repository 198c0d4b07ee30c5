"""Pure-Python scheduling: request state, the paged block pool with prefix caching, and the
continuous-batching policy. Imports neither torch nor engine."""

from scheduler.block_manager import BlockManager, PrefixCacheStats
from scheduler.host_kv_cache import HostKVCache, KVTransfer
from scheduler.kv_cache_groups import KVCacheGroups, KVCachePlan
from scheduler.request import AdmissionError, Request, RequestStatus
from scheduler.scheduler import SCHEDULING_POLICIES, ScheduledBatch, Scheduler, SchedulerConfig, check_admissible

__all__ = [
    "SCHEDULING_POLICIES", "AdmissionError", "BlockManager", "HostKVCache", "KVCacheGroups", "KVCachePlan",
    "KVTransfer", "PrefixCacheStats", "Request", "RequestStatus", "ScheduledBatch", "Scheduler", "SchedulerConfig",
    "check_admissible",
]
