"""Values around :class:`gateway.access.control.AccessControl`: its Redis edge, backoff, statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Protocol, Sequence, Tuple

from gateway.access.limiter import ScriptCall, UsageDelta

__all__ = ["Backoff", "AccessStatistics", "Edge"]


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: ``delay`` now, :meth:`next` for the one after."""

    initial: float
    maximum: float
    attempt: int = 0

    @property
    def delay(self) -> float:
        return min(self.maximum, self.initial * (2 ** min(self.attempt, 30)))

    def next(self) -> Backoff:
        return Backoff(self.initial, self.maximum, self.attempt + 1)


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
