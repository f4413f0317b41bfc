"""Values around :class:`gateway.access.control.AccessControl`: its Redis edge and statistics
(its reconnect backoff is a :class:`sinks.backoff.RetryPolicy`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Protocol, Sequence, Tuple

from gateway.access.limiter import ScriptCall, UsageDelta

__all__ = ["AccessStatistics", "Edge"]


@dataclass(frozen=True)
class AccessStatistics:
    """Counters since start, plus the queue and Redis state right now.

    ``pipelines`` counts node round trips (a batch to three cluster masters
    is three, sent in parallel); ``redis_checks`` the scripts they carried.
    """

    redis_state: str
    checks: int
    admitted: int
    admitted_local: int
    refused: int
    unavailable: int
    key_cache_hits: int
    refusal_cache_hits: int
    redis_checks: int
    batches: int
    pipelines: int
    script_loads: int
    timeouts: int
    redis_failures: int
    #: Script replies that were not what the check script returns (answered 503).
    malformed_replies: int
    queued: int
    pending_usage_records: int
    pending_usage_bytes: int


class Edge(Protocol):
    """What AccessControl needs of Redis; sync, called from worker threads.

    :class:`gateway.access.keystore.RedisEdge` is the real one.  Failures to reach
    Redis raise :class:`gateway.access.keystore.EdgeUnavailable`.
    """

    def probe(self) -> None:
        """Connect if needed, check the server answers, load the scripts."""

    def run_checks(self, calls: Sequence[ScriptCall], usage: Sequence[Tuple[UsageDelta, int]]
                   ) -> Tuple[List[object], int, int]:
        """Replies (or exceptions) per call, pipelines sent, scripts loaded."""

    def close(self) -> None:
        """Drop connections; :meth:`probe` may connect again."""
