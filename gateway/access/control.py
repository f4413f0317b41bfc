"""Access control for every request: API key, rate limits, monthly quotas.

Theory of operation
-------------------
:meth:`AccessControl.check` answers from its caches when it can.  With
``admission="lease"`` (the default) it then admits from the tenant's slice
leased from Redis (:class:`gateway.access.leasing.Leases`, which sends its
lease calls through :meth:`AccessControl._pipeline`, and whose slices the
flush loop hands back when they expire).  With ``admission="exact"`` it
queues the request's script call (see :mod:`gateway.access.limiter`) on a bounded
channel.  :meth:`AccessControl.run` takes whatever has queued (up to
``batch_max_checks``) as one batch and sends it as one pipeline per Redis
node: for one server from the event loop
(:class:`gateway.access.redis_trio.AsyncRedisEdge`), for a cluster from a worker
thread (:class:`gateway.access.keystore.RedisEdge`: sync redis-py, since
``redis.asyncio`` does not run under trio).  Checks of one key in a batch
are one script call (:meth:`AccessControl._execute`).  While a batch is
in flight the next one fills up, so under load one round trip carries many
checks, and at low load a check waits only for its own round trip.  At most
``max_concurrent_batches`` pipelines are in flight.

Caches, both bounded, both filled from what Redis said last:

* key hash -> tenant, key id, limits, validity and the month's usage Redis
  last reported; keys Redis confirmed apart from unknown, revoked and
  disabled ones, so forged keys cannot push real ones out.  Those refused are
  refused without Redis for ``key_cache_ttl`` seconds (so re-enabling a
  tenant shows within it).  A valid key still goes to Redis on every request,
  so a revocation shows on the next one that does.
* tenant -> its last rate or quota refusal, until the retry time (quotas at
  most ``key_cache_ttl``; while Redis is down, until the month's end): a
  throttled tenant is refused without Redis.

Redis states: ``starting`` (no answer yet), ``ok``, ``down``.  A pipeline that
fails on the connection, or a check that times out while a pipeline has been
out for over half of ``check_timeout``, makes the state ``down``; a recovery
task then probes (connect, PING, SCRIPT LOAD) with exponential backoff and
sets ``ok`` again.  While not ``ok``, checks do not touch Redis: with
``on_redis_failure="closed"`` they raise AccessUnavailable; with ``"open"``,
keys that Redis confirmed within ``stale_key_ttl`` are admitted by a
:class:`~gateway.access.limiter.LocalLimiter` at the tenant's rates, and the quota
Redis last reported as left, divided by ``instance_count``, and the usage
so admitted is added to Redis as soon as it answers again.  A batch lost with
its connection may have been counted by Redis already: such usage is counted
twice rather than not at all.

Usage known only after the check (:meth:`AccessControl.charge_after_store`:
the size of a chunked body, also charged to the byte rate;
:meth:`AccessControl.add_usage`: a request admitted and then not stored,
taken back)
goes with the next pipeline, or within ``usage_flush_interval`` when no
check comes; :meth:`AccessControl.aclose` hands over what is left.
State changes of Redis (down, answering again) go to ``report`` as one line
each; nothing is reported per request, and no key or password ever is.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

import trio

from gateway.access import keystore
from gateway.access.edge import (
    AccessConfig,
    AccessStatistics,
    Edge,
    KeyEntry,
    limited_reply,
)
from gateway.access.keystore import EdgeUnavailable, RedisEdge
from gateway.access.lease import LEASE_SECONDS
from gateway.access.leasing import Leases
from gateway.access.limiter import (
    ADMITTED,
    DISABLED,
    QUOTA,
    RATE,
    REVOKED,
    UNKNOWN,
    Admission,
    Decision,
    LocalLimiter,
    ParsedKey,
    ScriptCall,
    TenantLimits,
    UsageDelta,
    check_call,
    decide,
    month_id,
    parse_api_key,
)
from gateway.access.redis_trio import AsyncRedisEdge
from gateway.errors import AccessUnavailable, Unauthorized
from gateway.observe.logs import EventLimiter
from gateway.observe.telemetry import Histogram
from sinks.backoff import Retry
from sinks.base import Log, no_log

__all__ = [
    "STARTING",
    "OK",
    "DOWN",
    "AccessConfig",
    "AccessStatistics",
    "Edge",
    "AccessControl",
    "DECISIONS",
    "REDIS_BATCH_BOUNDS",
]

STARTING = "starting"
OK = "ok"
DOWN = "down"

#: What :meth:`AccessControl.check` decided, counted in
#: :meth:`AccessControl.decisions`: admitted by Redis, admitted by the local
#: limiter (fail-open), or refused and why, or unavailable (503).
DECISIONS = ("admitted", "admitted_local", "missing_key", "malformed_key", "unknown_key",
             "revoked_key", "tenant_disabled", "rate_limited", "quota_exceeded", "unavailable")
_DECISION_OF = {ADMITTED: "admitted", UNKNOWN: "unknown_key", REVOKED: "revoked_key",
                DISABLED: "tenant_disabled", RATE: "rate_limited", QUOTA: "quota_exceeded"}
#: Bucket bounds (seconds) of the Redis batch round-trip histogram: a
#: pipelined check takes about a millisecond; the default --redis-timeout is
#: 250 ms and the longest 30 s.
REDIS_BATCH_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Seconds between ``redis_malformed_reply`` events: an unreadable script reply
#: (another script under the same name, a proxy) usually comes for every check.
MALFORMED_REPLY_LOG_INTERVAL = 60.0
#: Characters of a malformed reply shown in that event: enough to recognise it.
MALFORMED_REPLY_LOG_CHARS = 200


#: The settings of an AccessControl given none (tests, tools).
_DEFAULT_CONFIG = AccessConfig()


class _Pending:
    """One queued check; ``event`` is set once ``decision`` or ``failed`` is."""

    __slots__ = ("key", "body_bytes", "now", "event", "decision", "failed", "abandoned",
                 "local_usage")

    def __init__(self, key: ParsedKey, body_bytes: int, now: float) -> None:
        self.key = key
        self.body_bytes = body_bytes
        self.now = now
        self.event = trio.Event()
        self.decision: Optional[Decision] = None
        self.failed = False
        self.abandoned = False
        self.local_usage: Optional[UsageDelta] = None


def _by_key(live: Sequence[_Pending]) -> List[List[_Pending]]:
    """``live`` grouped by API key, in order of first appearance."""
    groups: Dict[str, List[_Pending]] = {}
    for p in live:
        group = groups.get(p.key.key_hash)
        if group is None:
            groups[p.key.key_hash] = [p]
        else:
            group.append(p)
    return list(groups.values())


def _group_call(group: Sequence[_Pending]) -> ScriptCall:
    """One script call for every check in ``group`` (all of one key)."""
    if len(group) == 1:
        p = group[0]
        return check_call(p.key, p.body_bytes, p.now)
    return check_call(group[0].key, sum(p.body_bytes for p in group), max(p.now for p in group),
                      records=len(group), strict=True)




class AccessControl:
    """Decides whether each request may go on; see the module docstring.

    ``clock`` is the wall clock given to the script and the caches (unix
    seconds); waits and timeouts use trio's clock.
    """

    def __init__(self, config: AccessConfig = _DEFAULT_CONFIG, *, edge: Optional[Edge] = None,
                 clock: Callable[[], float] = time.time,
                 report: Optional[Callable[[str], None]] = None,
                 log: Log = no_log) -> None:
        self.config = config
        self._report = report
        self._log = log
        self._malformed = EventLimiter(MALFORMED_REPLY_LOG_INTERVAL)
        self._run_scope: Optional[trio.CancelScope] = None
        self._closed = False
        self._last_failure = ""
        url, cluster = keystore.split_redis_url(config.redis_url, config.redis_cluster)
        # One server: pipelines from the event loop.  A cluster: redis-py's
        # slot map and connections, from worker threads.
        if edge is not None:
            self._edge: Any = edge
        elif cluster:
            self._edge = RedisEdge(url, cluster=True, socket_timeout=config.socket_timeout)
        else:
            self._edge = AsyncRedisEdge(url, socket_timeout=config.socket_timeout)
        self._edge_is_async = bool(getattr(self._edge, "is_async", False))
        self._clock = clock
        self._send, self._receive = trio.open_memory_channel(config.max_queued_checks)
        self._batch_slots = trio.Semaphore(config.max_concurrent_batches)
        self._threads = trio.CapacityLimiter(config.max_concurrent_batches + 1)
        self._state = STARTING
        self._need_recovery = trio.Event()
        self._inflight: Dict[object, float] = {}  # pipeline token -> trio time sent
        #: Keys Redis confirmed (admitted, or refused for a rate or quota),
        #: apart from keys it did not (unknown, revoked, disabled): forged
        #: keys, however many, only push each other out, never a real
        #: agent's key that fail-open mode needs.
        self._keys: Dict[str, KeyEntry] = {}
        self._bad_keys: Dict[str, KeyEntry] = {}
        #: presented key -> its parse, for keys that parse (bounded like _keys).
        self._parsed: Dict[bytes, ParsedKey] = {}
        self._refusals: Dict[str, Tuple[Decision, int, float]] = {}
        self._local = LocalLimiter(config.instance_count, config.key_cache_size)
        self._leases = Leases(self) if config.admission == "lease" else None
        self._counts = dict.fromkeys(
            ("checks", "admitted", "admitted_local", "refused", "unavailable",
             "key_cache_hits", "refusal_cache_hits", "redis_checks", "batches",
             "pipelines", "script_loads", "timeouts", "redis_failures", "malformed_replies"), 0)
        self._decisions = dict.fromkeys(DECISIONS, 0)
        #: Seconds from a batch of checks sent to Redis to all its answers back.
        self.batch_seconds = Histogram(REDIS_BATCH_BOUNDS)

    # -- readiness and statistics -------------------------------------------

    @property
    def redis_state(self) -> str:
        return self._state

    @property
    def ready(self) -> bool:
        """Whether requests can be served (fail-open serves without Redis)."""
        return self._state == OK or self.config.on_redis_failure == "open"

    def decisions(self) -> Dict[str, int]:
        """Decisions since start, by outcome (:data:`DECISIONS`)."""
        return dict(self._decisions)

    def statistics(self) -> AccessStatistics:
        records, nbytes = self._local.pending_usage()
        return AccessStatistics(redis_state=self._state, queued=self._receive.statistics()
                                .current_buffer_used, pending_usage_records=records,
                                pending_usage_bytes=nbytes, **self._counts)

    # -- the check ----------------------------------------------------------

    async def check(self, api_key: Optional[bytes], body_bytes: int) -> Admission:
        """Admit a request of ``body_bytes`` or raise the error to answer with."""
        counts = self._counts
        counts["checks"] += 1
        now = self._clock()
        if not api_key:
            counts["refused"] += 1
            self._decisions["missing_key"] += 1
            raise Unauthorized("missing API key")
        key = self._parsed.get(api_key)
        if key is None:
            # Hashing a key costs microseconds on PyPy; the presented bytes
            # map to the same parse every time.
            key = parse_api_key(api_key)
            if key is not None:
                self._bounded_put(self._parsed, bytes(api_key), key)
        if key is None:
            counts["refused"] += 1
            self._decisions["malformed_key"] += 1
            raise Unauthorized("malformed API key")
        entry = self._keys.get(key.key_hash)
        if entry is None:
            entry = self._bad_keys.get(key.key_hash)
        if entry is not None and now - entry.checked_at < self.config.key_cache_ttl:
            if entry.decision.outcome not in (ADMITTED, RATE, QUOTA):
                counts["key_cache_hits"] += 1
                counts["refused"] += 1
                self._decisions[_DECISION_OF[entry.decision.outcome]] += 1
                raise entry.decision.error(now)
            refusal = self._refusals.get(key.tenant)
            if refusal is not None and now < refusal[2] and body_bytes >= refusal[1]:
                counts["refusal_cache_hits"] += 1
                counts["refused"] += 1
                self._decisions[_DECISION_OF[refusal[0].outcome]] += 1
                raise refusal[0].error(now)
        if self._state != OK:
            return self._unavailable(key, entry, body_bytes, now)
        if self._leases is not None:
            return await self._leases.check(key, body_bytes, now)
        pending = _Pending(key, body_bytes, now)
        with trio.move_on_after(self.config.check_timeout):
            await self._send.send(pending)
            await pending.event.wait()
        if pending.decision is None:
            if not pending.failed:
                pending.abandoned = True
                counts["timeouts"] += 1
                if self._redis_stalled():
                    self._mark_down("no answer within %gs" % self.config.check_timeout)
            return self._unavailable(key, entry, body_bytes, now, pending)
        return self._apply(key, pending.decision, body_bytes)

    def _apply(self, key: ParsedKey, decision: Decision, body_bytes: int) -> Admission:
        self._remember(key.key_hash, decision)
        self._decisions[_DECISION_OF[decision.outcome]] += 1
        if decision.admitted:
            self._counts["admitted"] += 1
            if self._refusals:
                # No longer refused (a quota raised, a rate paid): forget it.
                self._refusals.pop(key.tenant, None)
            return decision.admission()
        self._counts["refused"] += 1
        if decision.outcome in (RATE, QUOTA):
            # A refusal for bytes holds only for bodies at least as large.
            cost = 0 if decision.which in ("requests", "monthly_records") else body_bytes
            until = decision.until
            if decision.outcome == QUOTA:
                # A quota raised by an admin must show within the key cache ttl.
                until = min(until, decision.now + self.config.key_cache_ttl)
            self._bounded_put(self._refusals, key.tenant, (decision, cost, until))
        raise decision.error()

    def _refuse(self, decision: Decision, now: float) -> NoReturn:
        self._counts["refused"] += 1
        self._decisions[_DECISION_OF[decision.outcome]] += 1
        raise decision.error(now)

    def _remember(self, key_hash: str, decision: Decision) -> None:
        if decision.outcome in (ADMITTED, RATE, QUOTA):
            if decision.admitted:
                used: Optional[Tuple[int, int, str]] = (
                    decision.used_records, decision.used_bytes, month_id(decision.now))
            else:
                prior = self._keys.get(key_hash)
                used = prior.used if prior is not None else None
            self._bounded_put(self._keys, key_hash, KeyEntry(decision, decision.now, used))
            if self._bad_keys:
                self._bad_keys.pop(key_hash, None)
        else:
            self._bounded_put(self._bad_keys, key_hash, KeyEntry(decision, decision.now))
            self._keys.pop(key_hash, None)

    def _redis_stalled(self) -> bool:
        """Whether a pipeline has been out for over half a check's budget.

        A check can also time out because this process is overloaded, which
        is no reason to call Redis down; a pipeline that took most of the
        budget by itself is.
        """
        started = self._inflight.values()
        return bool(started) and (
            min(started) <= trio.current_time() - self.config.check_timeout / 2)

    def _bounded_put(self, cache: Dict[Any, Any], key: Any, value: Any) -> None:
        if key not in cache and len(cache) >= self.config.key_cache_size:
            del cache[next(iter(cache))]
        cache[key] = value

    def _unavailable(self, key: ParsedKey, entry: Optional[KeyEntry], body_bytes: int,
                     now: float, pending: Optional[_Pending] = None) -> Admission:
        """Answer without Redis: 503, or the local limiter when failing open."""
        config = self.config
        known = entry.decision if entry is not None else None
        if (config.on_redis_failure == "open" and entry is not None and known is not None
                and known.outcome in (ADMITTED, RATE, QUOTA) and known.limits is not None
                and now - entry.checked_at < config.stale_key_ttl):
            refusal = self._refusals.get(key.tenant)
            if refusal is None and self._leases is not None:
                lease = self._leases.lease(key.tenant)  # lease mode keeps its own
                refusal = lease.refusal if lease is not None else None
            if refusal is not None and now < refusal[0].until and body_bytes >= refusal[1]:
                # Over a rate or quota when Redis last answered: still over it
                # until that refusal runs out (a quota: the month's end).
                self._counts["refused"] += 1
                self._decisions[_DECISION_OF[refusal[0].outcome]] += 1
                raise refusal[0].error(now)
            used = entry.used
            if used is not None and used[2] != month_id(now):
                used = (0, 0, "")  # counted in an earlier month
            decision = self._local.check(key.tenant, known.key_id, known.limits, body_bytes, now,
                                         None if used is None else (used[0], used[1]))
            if decision.admitted:
                self._counts["admitted_local"] += 1
                self._decisions["admitted_local"] += 1
                if pending is not None:
                    pending.local_usage = UsageDelta.for_request(key.tenant, body_bytes, now)
                return decision.admission("local")
            self._counts["refused"] += 1
            self._decisions[_DECISION_OF[decision.outcome]] += 1
            raise decision.error(now)
        self._counts["unavailable"] += 1
        self._decisions["unavailable"] += 1
        raise AccessUnavailable("access control unavailable",
                                retry_after=config.unavailable_retry_after)

    def add_usage(self, tenant: str, records: int, body_bytes: int) -> None:
        """Add usage to ``tenant``'s month (negative: take back) with the next pipeline.

        For a request that was admitted (and counted) but then not stored.
        """
        if self._leases is not None and (records < 0 or body_bytes < 0) \
                and self._leases.give_back(tenant, -records, -body_bytes):
            return
        now = self._clock()
        delta = UsageDelta.for_request(tenant, body_bytes, now)
        self._local.add_usage(UsageDelta(delta.tenant, delta.month, records, delta.bytes,
                                         delta.expire_at))

    def charge_after_store(self, tenant: str, body_bytes: int,
                           limits: Optional[TenantLimits] = None) -> None:
        """Charge a body whose size was known only once stored (chunked) to ``tenant``.

        With leases it is spent from the tenant's slice, which may go into
        debt, charged to the byte rate and the month when the slice settles;
        otherwise to both in Redis with the next pipeline and here (fail-open,
        with ``limits``).  Either way the tenant gets 429 until it is paid.
        """
        if self._leases is not None and self._leases.charge_after_store(tenant, body_bytes):
            return
        now = self._clock()
        delta = UsageDelta.for_request(tenant, body_bytes, now)
        self._local.add_usage(UsageDelta(delta.tenant, delta.month, 0, delta.bytes,
                                         delta.expire_at, rate_bytes=delta.bytes))
        if limits is not None:
            self._local.charge(tenant, limits, body_bytes, now)

    # -- the background loop ------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run batches and reconnects until :meth:`aclose` or cancelled; ready after one probe."""
        try:
            with trio.CancelScope() as scope:
                self._run_scope = scope
                async with trio.open_nursery() as nursery:
                    await self._probe()
                    if self._state != OK:
                        self._mark_down(self._last_failure)
                    nursery.start_soon(self._recovery_loop)
                    nursery.start_soon(self._flush_loop)
                    task_status.started()
                    if self._closed:
                        scope.cancel()
                    await self._batch_loop(nursery)
        finally:
            self._edge.close()

    async def aclose(self) -> None:
        """Hand the usage still counted here to Redis (bounded), then stop :meth:`run`.

        Call once no more checks come (the gateway's connections are done).
        """
        if self._state == OK:
            with trio.move_on_after(self.config.socket_timeout):
                if self._leases is not None:
                    await self._leases.settle_expired(self._clock(), everything=True)
                if self._local.pending_usage() != (0, 0):
                    await self._execute([])
        self._closed = True
        if self._run_scope is not None:
            self._run_scope.cancel()

    async def _flush_loop(self) -> None:
        interval = self.config.usage_flush_interval
        if self._leases is not None:
            # Slices go back within a quarter of a lease after it ends.
            interval = min(interval, LEASE_SECONDS / 4)
        while True:
            await trio.sleep(interval)
            if self._leases is not None:
                await self._leases.settle_expired(self._clock())
            if self._state == OK and self._local.pending_usage() != (0, 0):
                await self._execute([])

    async def _batch_loop(self, nursery: trio.Nursery) -> None:
        config = self.config
        while True:
            await self._batch_slots.acquire()
            try:
                batch = [await self._receive.receive()]
                if config.batch_linger > 0:
                    with trio.move_on_after(config.batch_linger):
                        while len(batch) < config.batch_max_checks:
                            batch.append(await self._receive.receive())
                while len(batch) < config.batch_max_checks:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
            except BaseException:
                self._batch_slots.release()
                raise
            nursery.start_soon(self._run_batch, batch)

    async def _run_batch(self, batch: List[_Pending]) -> None:
        try:
            await self._execute([p for p in batch if not p.abandoned])
        finally:
            self._batch_slots.release()

    async def _execute(self, live: List[_Pending]) -> None:
        """One pipeline: the checks of ``live`` plus any usage counted locally.

        Checks of one key are sent as one script call for all of them (their
        records and bytes summed, see :func:`~gateway.access.limiter.check_call`'s
        ``strict``).  Admitted, every one is admitted, as it would have been
        one after the other; refused for a rate or quota, they are asked
        again one by one, so a group never gets less than the requests alone
        would have.
        """
        if self._state != OK:
            self._fail(live)
            return
        usage = self._local.take_usage()
        if not live and not usage:
            return
        now = self._clock()
        # TTLs, not EXPIREAT: Redis's own clock need not agree with ours.
        usage_ttls = [(dataclasses.replace(d, charged_at=now) if d.rate_bytes else d,
                       max(1, int(d.expire_at - now))) for d in usage]
        groups = _by_key(live)
        results = await self._pipeline([_group_call(g) for g in groups], usage_ttls, live, usage)
        if results is None:
            return
        again: List[_Pending] = []
        for group, reply in zip(groups, results):
            if len(group) > 1 and limited_reply(reply):
                again.extend(group)
            else:
                self._settle(group, reply)
        if again:
            results = await self._pipeline([check_call(p.key, p.body_bytes, p.now) for p in again],
                                            [], again, [])
            if results is not None:
                for p, reply in zip(again, results):
                    self._settle((p,), reply)

    async def _pipeline(self, calls: List[ScriptCall], usage_ttls: List[Tuple[UsageDelta, int]],
                        live: List[_Pending], usage: Sequence[UsageDelta]) -> Optional[List[object]]:
        """Replies to ``calls`` from one round trip, or None when Redis failed (then ``live`` failed)."""
        token = object()
        sent = self._inflight[token] = trio.current_time()
        try:
            if self._edge_is_async:
                results, pipelines, loads = await self._edge.run_checks(calls, usage_ttls)
            else:
                results, pipelines, loads = await trio.to_thread.run_sync(
                    self._edge.run_checks, calls, usage_ttls,
                    abandon_on_cancel=True, limiter=self._threads)
        except EdgeUnavailable as exc:
            for delta in usage:
                self._local.add_usage(delta)
            self._counts["redis_failures"] += 1
            self._mark_down(str(exc))
            self._fail(live)
            return None
        finally:
            del self._inflight[token]
        self.batch_seconds.add(trio.current_time() - sent)
        counts = self._counts
        counts["batches"] += 1
        counts["pipelines"] += pipelines
        counts["script_loads"] += loads
        counts["redis_checks"] += len(calls)
        return results

    def _settle(self, group: Sequence[_Pending], reply: object) -> None:
        """Give every check of ``group`` (one key) the decision of ``reply``."""
        decision: Optional[Decision] = None
        if not isinstance(reply, Exception):
            first = group[0]
            try:
                decision = decide(reply, first.key.tenant, max(p.now for p in group))  # type: ignore[arg-type]
            except (ValueError, TypeError, IndexError) as exc:
                self._malformed_reply(reply, exc)
        for p in group:
            self._settle_one(p, decision)

    def _malformed_reply(self, reply: object, error: Exception) -> None:
        """Count a script reply ``decide`` could not read; log it at most once a minute."""
        self._counts["malformed_replies"] += 1
        count = self._malformed.due(trio.current_time())
        if count:
            self._log("redis_malformed_reply", level="error", error=str(error),
                      reply=repr(reply)[:MALFORMED_REPLY_LOG_CHARS], count=count)

    def _settle_one(self, p: _Pending, decision: Optional[Decision]) -> None:
        p.decision = decision
        p.failed = decision is None
        if p.abandoned and p.local_usage is not None and p.decision is not None \
                and p.decision.admitted:
            # Redis counted it after all: take back the local count.
            self._local.add_usage(p.local_usage.negated())
        p.event.set()

    @staticmethod
    def _fail(batch: Sequence[_Pending]) -> None:
        for p in batch:
            p.failed = True
            p.event.set()

    def _mark_down(self, cause: str) -> None:
        if self._state == DOWN:
            return
        self._state = DOWN
        self._need_recovery.set()
        if self._report is not None:
            if self.config.on_redis_failure == "open":
                then = ("admitting keys it confirmed within %gs at 1/%d of their rates"
                        % (self.config.stale_key_ttl, self.config.instance_count))
            else:
                then = "ingest requests get 503 until it answers"
            self._report("Redis unreachable (%s); %s" % (cause or "no answer", then))

    async def _probe(self) -> None:
        try:
            if self._edge_is_async:
                await self._edge.probe()
            else:
                await trio.to_thread.run_sync(self._edge.probe, abandon_on_cancel=True,
                                              limiter=self._threads)
        except EdgeUnavailable as exc:
            self._counts["redis_failures"] += 1
            self._last_failure = str(exc)
            return
        self._counts["script_loads"] += 1
        self._state = OK

    async def _recovery_loop(self) -> None:
        config = self.config
        while True:
            await self._need_recovery.wait()
            backoff = config.reconnect_backoff.start(trio.current_time())
            while True:
                retry = backoff.decide(trio.current_time(), random.random())
                assert isinstance(retry, Retry), "a policy without deadline or attempt limit"
                await trio.sleep(retry.delay)
                await self._probe()
                if self._state == OK:
                    break
                backoff = retry.policy
            self._need_recovery = trio.Event()
            if self._report is not None:
                self._report("Redis answers again")
            # Hand over what fail-open mode counted without waiting for traffic.
            await self._execute([])
