"""Values around :class:`gateway.access.control.AccessControl`: its settings (with its
reconnect backoff, a :class:`sinks.backoff.RetryPolicy`), Redis edge, statistics,
key-cache entries and how a script reply reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Protocol, Sequence, Tuple

from gateway.access import keystore
from gateway.access.limiter import QUOTA, RATE, Decision, ScriptCall, UsageDelta
from sinks.backoff import EQUAL_JITTER, RetryPolicy

if TYPE_CHECKING:
    from gateway.config.settings import Config

__all__ = ["AccessConfig", "AccessStatistics", "Edge", "KeyEntry", "limited_reply"]


@dataclass(frozen=True)
class AccessConfig:
    """Settings of :class:`~gateway.access.control.AccessControl`; each bound with its reason."""

    redis_url: str = keystore.DEFAULT_REDIS_URL
    # Also implied by a redis+cluster:// or rediss+cluster:// URL.
    redis_cluster: bool = False
    # Revocations, disabled tenants and raised quotas take effect within this.
    key_cache_ttl: float = 5.0
    # Fail-open admits only keys Redis confirmed this recently: a short outage
    # (a failover, a restart) keeps known agents flowing, a forged key is
    # never admitted, and a key revoked just before the outage stops working
    # within this.  Longer outages are an operator's call: fail closed.
    stale_key_ttl: float = 300.0
    # About 300 bytes an entry: some 20 MB when full, far above the live keys
    # one gateway sees; the oldest entries go first.
    key_cache_size: int = 65536
    # A check script takes 10-20 us of Redis time, so a batch of 256 is a few
    # ms: its last check does not wait long on its first.
    batch_max_checks: int = 256
    # Checks waiting for a batch; past it, check() waits (up to check_timeout)
    # for room.  16 full batches is tens of ms of Redis work.
    max_queued_checks: int = 4096
    # Two pipelines in flight hide the thread hand-off of one behind the other;
    # more would only split batches.
    max_concurrent_batches: int = 2
    # Extra time a batch waits to fill; 0 batches only what queued meanwhile,
    # which keeps low-load latency at one round trip.
    batch_linger: float = 0.0
    # Longest a check waits on Redis: well above a pipelined round trip (about
    # a millisecond), short enough that a stalled Redis costs a request a
    # quarter second, not its client's timeout.
    check_timeout: float = 0.25
    # A stuck worker thread is freed after this; must exceed check_timeout.
    socket_timeout: float = 1.0
    on_redis_failure: str = "closed"
    # "lease": spend slices leased from Redis (gateway/access/lease.py);
    # "exact": one script call per request (batched).
    admission: str = "lease"
    # Gateways sharing the Redis: each admits 1/n of a tenant's rate when open.
    instance_count: int = 1
    # Reconnect backoff: fast first retry (a failover takes about a second),
    # capped so a long outage is probed every couple of seconds.
    backoff_initial: float = 0.05
    backoff_max: float = 2.0
    # Retry-After for AccessUnavailable.
    unavailable_retry_after: float = 1.0
    # Usage counted after a check (chunked body sizes, refunds) waits at most
    # this long for a pipeline to carry it.
    usage_flush_interval: float = 1.0

    @property
    def reconnect_backoff(self) -> RetryPolicy:
        """Delays between probes of an unreachable Redis: doubling from ``backoff_initial``
        to ``backoff_max``, for ever; half of each is random, so a fleet of
        gateways does not reconnect in step."""
        return RetryPolicy(base=self.backoff_initial, cap=self.backoff_max, deadline=None,
                           jitter=EQUAL_JITTER)

    @classmethod
    def from_config(cls, config: Config) -> AccessConfig:
        """The access settings of ``sluice serve`` (``--redis`` and its group)."""
        return cls(
            redis_url=config.redis, redis_cluster=config.redis_cluster,
            key_cache_ttl=config.key_cache_ttl, stale_key_ttl=config.stale_key_ttl,
            check_timeout=config.redis_timeout,
            # Well past the check's bound, so a slow reply is still read and
            # its connection reused rather than dropped.
            socket_timeout=max(1.0, 4 * config.redis_timeout),
            on_redis_failure=config.on_redis_failure, instance_count=config.instance_count,
            admission=config.admission)

    def __post_init__(self) -> None:
        if self.on_redis_failure not in ("closed", "open"):
            raise ValueError("on_redis_failure must be 'closed' or 'open'")
        if self.admission not in ("lease", "exact"):
            raise ValueError("admission must be 'lease' or 'exact'")
        for name in ("batch_max_checks", "max_queued_checks", "max_concurrent_batches",
                     "instance_count", "key_cache_size"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be at least 1" % name)
        if self.socket_timeout <= 0 or self.check_timeout <= 0:
            raise ValueError("timeouts must be positive")


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


class KeyEntry:
    """What Redis last said of a key; ``used`` is the month's usage it last reported."""

    __slots__ = ("decision", "checked_at", "used")

    def __init__(self, decision: Decision, checked_at: float,
                 used: Optional[Tuple[int, int, str]] = None) -> None:
        self.decision = decision
        self.checked_at = checked_at
        self.used = used


def limited_reply(reply: object) -> bool:
    """Whether a script reply is a refusal for a rate or a quota."""
    if isinstance(reply, Exception) or not isinstance(reply, (list, tuple)) or not reply:
        return False
    outcome = reply[0]
    if isinstance(outcome, bytes):
        outcome = outcome.decode("ascii", "replace")
    return outcome in (RATE, QUOTA)
