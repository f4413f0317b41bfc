"""Leased allowances without I/O: slices of a tenant's limits held by one process.

Theory of operation
-------------------
In lease mode a gateway does not ask Redis about every request.  One call of
:data:`LEASE_SCRIPT` takes a *slice* of a tenant's request rate, byte rate
and monthly quotas and charges all of it to the shared state at once (GCRA
theoretical arrival times move forward by the slice, the month's usage grows
by it), exactly as if that many requests had been admitted then.  The
process spends the slice from memory (:meth:`Lease.try_spend`): no await, no
round trip.  When the slice runs out, expires (:data:`LEASE_SECONDS`) or the
process stops, the next call first *settles* the old slice: what was not
spent is handed back (:func:`refund_tat`, usage taken back), bytes charged
beyond it (a chunked body's real size, known only once stored) are charged
as debt.

Why the limits still hold: every unit a process admits was charged to Redis
before it was admitted, so over any window the requests admitted by all
processes together are at most what GCRA allows (``rate x t + burst``) plus
the slices leased before the window and spent inside it, at most one slice
per process (:data:`SLICE_BURST_FRACTION` of the burst).  A refund moves a
theoretical arrival time back by at most the unspent units and never below
the present, so it never creates allowance that was not charged.

Slice size (:meth:`Lease.wants`): :data:`SLICE_SECONDS` of the tenant's
recent local rate (measured from a slice's grant to when it ran out), plus
the request at hand and those waiting for the call, at most
:data:`SLICE_BURST_FRACTION` of the burst; :data:`UNLIMITED_SLICE_SECONDS`
of it for a dimension (requests, bytes) the tenant has neither a rate limit
nor a monthly quota on.  Calls per tenant per process are
spaced at least :data:`MIN_CALL_INTERVAL` apart, so at most 20 per second at
any request rate.

Key validity rides on the same calls: each lease call re-reads the tenant
and every key the process used under the lease, and a key not confirmed for
:data:`LEASE_SECONDS` is not admitted from the lease: a revoked key or a
disabled tenant is refused by every gateway within that time.

Nothing here imports trio, socket or redis; the clock is an argument.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from gateway.access.limiter import (
    ADMITTED,
    DISABLED,
    EPSILON,
    QUOTA,
    RATE,
    REVOKED,
    UNKNOWN,
    USAGE_RETENTION,
    Admission,
    Decision,
    ScriptCall,
    TenantLimits,
    decide,
    gcra_name,
    key_record_name,
    month_id,
    next_month_start,
    tenant_name,
    usage_name,
)

__all__ = [
    "LEASE_SECONDS",
    "SLICE_SECONDS",
    "UNLIMITED_SLICE_SECONDS",
    "SLICE_BURST_FRACTION",
    "MIN_CALL_INTERVAL",
    "MIN_RATE_WINDOW",
    "MAX_KEYS_PER_CALL",
    "SETTLED",
    "LEASE_SCRIPT",
    "LEASE_SCRIPT_SHA",
    "Settlement",
    "LeaseResult",
    "lease_take",
    "refund_tat",
    "Grant",
    "lease_call",
    "parse_lease_reply",
    "Lease",
]

#: A slice lives this long; also how long a key stays confirmed.  The
#: revocation delay operators see: a revoked key or a disabled tenant is
#: refused everywhere within it.
LEASE_SECONDS = 1.0
#: A slice is this much of the tenant's recent rate in this process: long
#: enough that a busy tenant costs Redis about ten calls a second, short
#: enough that what one process holds unspent stays small.
SLICE_SECONDS = 0.1
#: A slice of a dimension the tenant has no limit on (no rate and no monthly
#: quota for requests, or for bytes) is this much of its recent rate: no other
#: process needs a share of it, so the calls only confirm keys and settle
#: usage, about once a lease instead of ten times.
UNLIMITED_SLICE_SECONDS = LEASE_SECONDS
#: A slice is at most this share of the burst, so the slack of N processes
#: is at most N/4 of a burst and one process cannot hold what others need.
SLICE_BURST_FRACTION = 0.25
#: Least time between two lease calls for one tenant in one process: bounds
#: the Redis calls of a tenant to 20 per second per process at any load.
MIN_CALL_INTERVAL = 0.05
#: Shortest time a slice's spending is measured over: a slice gone within
#: it says the rate is at least slice/10 ms, so a burst of traffic on a fresh
#: tenant needs a few calls to get slices of its size, not one per doubling.
MIN_RATE_WINDOW = 0.01
#: Keys confirmed by one call (all on the tenant's slot); a tenant using more
#: keys at once in one process has the others confirmed by the next calls.
MAX_KEYS_PER_CALL = 16
#: Reply of a call that only settled (nothing leased).
SETTLED = "settled"

# The lease script.  KEYS: 1 tenant, 2 GCRA state, 3 this month's usage,
# 4 the usage of the month being settled (may be KEYS[3]), 5.. key records
# to confirm (the first is the key asking; none for a settlement alone).
# ARGV: 1 now, 2 usage TTL, 3-6 unspent requests, bytes, quota records,
# quota bytes of the old slice (negative: spent beyond it, charged now),
# 7 bytes the asking request needs, 8-9 requests and bytes wanted (0: settle only).
# Reply: settled -> {'settled'}; refusals as the check script's
# {outcome, key_id, limits, a, b, c, d}; ok -> {'ok', key_id, limits,
# requests, bytes, quota records, quota bytes, remaining, reset, statuses}
# where statuses has one entry per key record: key_id, or 'unknown'/'revoked'.
LEASE_SCRIPT = r"""
local now = tonumber(ARGV[1])
local eps = 1e-6
local t = redis.call('HMGET', KEYS[1], 'enabled', 'rps', 'burst', 'bps',
  'burst_bytes', 'monthly_records', 'monthly_bytes')
for i = 2, 7 do t[i] = t[i] or '0' end
local rps, burst = tonumber(t[2]), tonumber(t[3])
local bps, bburst = tonumber(t[4]), tonumber(t[5])
local mrec, mbytes = tonumber(t[6]), tonumber(t[7])
local st = redis.call('HMGET', KEYS[2], 'req', 'bytes')
local rtat, btat = tonumber(st[1]) or 0, tonumber(st[2]) or 0
-- Settle the old slice: mirrors lease.refund_tat().
local function refund(tat, rate, units)
  if rate <= 0 or units == 0 then return tat end
  if units < 0 then
    if tat < now then tat = now end
    return tat - units / rate
  end
  if tat <= now then return tat end
  local back = tat - units / rate
  if back < now then back = now end
  return back
end
local ret_req, ret_bytes = tonumber(ARGV[3]), tonumber(ARGV[4])
local ret_qrec, ret_qbytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local nrtat, nbtat = refund(rtat, rps, ret_req), refund(btat, bps, ret_bytes)
local dirty = nrtat ~= rtat or nbtat ~= btat
rtat, btat = nrtat, nbtat
if ret_qrec ~= 0 or ret_qbytes ~= 0 then
  local old = redis.call('HMGET', KEYS[4], 'records', 'bytes')
  if old[1] then
    local r = math.max((tonumber(old[1]) or 0) - ret_qrec, 0)
    local b = math.max((tonumber(old[2]) or 0) - ret_qbytes, 0)
    redis.call('HSET', KEYS[4], 'records', r, 'bytes', b)
  end
end
local function save()
  if dirty then redis.call('HSET', KEYS[2], 'req', rtat, 'bytes', btat) end
end
local want_req, want_bytes = tonumber(ARGV[8]), tonumber(ARGV[9])
if want_req <= 0 then save() return {'settled'} end
local statuses = {}
local first = nil
for i = 5, #KEYS do
  local rec = redis.call('HMGET', KEYS[i], 'key_id', 'revoked')
  local s = 'unknown'
  if rec[1] then
    if rec[2] then s = 'revoked' else s = rec[1] end
  end
  if i == 5 then first = rec[1] end
  statuses[#statuses + 1] = s
end
if statuses[1] == 'unknown' then save() return {'unknown'} end
if statuses[1] == 'revoked' then save() return {'revoked', first} end
local key_id = first
if not t[1] then save() return {'unknown'} end
if t[1] ~= '1' then save() return {'disabled', key_id} end
local limits = table.concat(t, ' ', 2, 7)
local need_bytes = tonumber(ARGV[7])
local used = redis.call('HMGET', KEYS[3], 'records', 'bytes')
local urec, ubytes = tonumber(used[1]) or 0, tonumber(used[2]) or 0
local qrec, qbytes = want_req, want_bytes
if mrec > 0 then
  if urec + 1 > mrec then
    save() return {'quota', key_id, limits, 'monthly_records', urec, mrec, 0}
  end
  qrec = math.min(qrec, mrec - urec)
end
if mbytes > 0 then
  if ubytes + need_bytes > mbytes then
    save() return {'quota', key_id, limits, 'monthly_bytes', ubytes, mbytes, 0}
  end
  qbytes = math.min(qbytes, mbytes - ubytes)
end
-- Mirrors lease.lease_take(): ok, tat, grant, retry, remaining, reset.
local function take(tat, rate, cap, need, want)
  if rate <= 0 then return true, tat, want, 0, 0, 0 end
  if cap < 1 then cap = 1 end
  local e = 1 / rate
  local tau = cap * e
  local base = now
  if tat > now then base = tat end
  local ok, retry
  local grant = need
  if need * e > tau then
    ok = base <= now
    retry = base - now
  else
    local first = base + need * e
    ok = first - now <= tau + eps
    retry = first - tau - now
    if ok then
      local fit = math.floor((now + tau + eps - base) / e)
      if fit > need and want > need then grant = math.min(want, fit) end
    end
  end
  if ok then
    local new_tat = base + grant * e
    local rem = math.floor((now + tau - new_tat) / e + eps)
    if rem < 0 then rem = 0 end
    return true, new_tat, grant, 0, rem, new_tat - now
  end
  local rem = math.floor((now + tau - base) / e + eps)
  if rem < 0 then rem = 0 end
  return false, tat, 0, retry, rem, base - now
end
local rok, rnew, rgrant, rretry, rrem, rreset = take(rtat, rps, burst, 1, want_req)
local bok, bnew, bgrant, bretry, brem, breset = take(btat, bps, bburst, need_bytes, want_bytes)
if not rok and (bok or rretry >= bretry) then
  save() return {'rate', key_id, limits, 'requests', tostring(rretry), rrem, tostring(rreset)}
end
if not bok then
  save() return {'rate', key_id, limits, 'bytes', tostring(bretry), brem, tostring(breset)}
end
rtat, btat, dirty = rnew, bnew, dirty or rps > 0 or bps > 0
save()
qrec, qbytes = math.min(qrec, rgrant), math.min(qbytes, bgrant)
redis.call('HSET', KEYS[3], 'records', urec + qrec, 'bytes', ubytes + qbytes)
if not used[1] then redis.call('EXPIRE', KEYS[3], tonumber(ARGV[2])) end
return {'ok', key_id, limits, rgrant, bgrant, qrec, qbytes, rrem, tostring(rreset), statuses}
"""

LEASE_SCRIPT_SHA = hashlib.sha1(LEASE_SCRIPT.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Settlement:
    """What goes back with a slice: unspent units (negative: spent beyond it)."""

    requests: int = 0
    bytes: int = 0
    quota_records: int = 0
    quota_bytes: int = 0
    month: str = ""

    @property
    def empty(self) -> bool:
        return not (self.requests or self.bytes or self.quota_records or self.quota_bytes)


@dataclass(frozen=True)
class LeaseResult:
    """One lease taken from a GCRA state: ``tat`` is the new state."""

    allowed: bool
    tat: float
    granted: int
    retry_after: float
    remaining: int
    reset: float


def lease_take(tat: float, rate: float, burst: float, need: int, want: int,
               now: float) -> LeaseResult:
    """Lease up to ``want`` units (at least ``need``) at ``now`` from ``burst`` refilled at ``rate``/s.

    As :func:`gateway.access.limiter.gcra` for ``need`` units, except that
    up to ``want`` are taken when the allowance has them.  A ``need`` larger
    than the burst is leased only into a full allowance, as GCRA admits it.
    """
    if rate <= 0:
        return LeaseResult(True, tat, want, 0.0, 0, 0.0)
    if burst < 1:
        burst = 1
    e = 1 / rate
    tau = burst * e
    base = tat if tat > now else now
    grant = need
    if need * e > tau:
        ok = base <= now
        retry = base - now
    else:
        # The check script's GCRA decides for ``need`` (same operations, same
        # order); only then are more units taken, as many as fit.
        first = base + need * e
        ok = first - now <= tau + EPSILON
        retry = first - tau - now
        if ok:
            fit = int(math.floor((now + tau + EPSILON - base) / e))
            if fit > need and want > need:
                grant = min(want, fit)
    if ok:
        new_tat = base + grant * e
        remaining = max(int(math.floor((now + tau - new_tat) / e + EPSILON)), 0)
        return LeaseResult(True, new_tat, grant, 0.0, remaining, new_tat - now)
    remaining = max(int(math.floor((now + tau - base) / e + EPSILON)), 0)
    return LeaseResult(False, tat, 0, retry, remaining, base - now)


def refund_tat(tat: float, rate: float, units: int, now: float) -> float:
    """The GCRA state after handing back ``units`` unspent (negative: charging them).

    A refund moves the state back by at most ``units`` and never below
    ``now``: it can only undo a charge, never make an allowance beyond the
    burst.  A charge (debt) is made unconditionally.
    """
    if rate <= 0 or units == 0:
        return tat
    if units < 0:
        if tat < now:
            tat = now
        return tat - units / rate
    if tat <= now:
        return tat
    back = tat - units / rate
    return back if back > now else now


@dataclass(frozen=True)
class Grant:
    """A slice leased by :data:`LEASE_SCRIPT` at ``now``."""

    key_id: str
    limits: TenantLimits
    requests: int
    bytes: int
    quota_records: int
    quota_bytes: int
    remaining: int
    reset: float
    statuses: Tuple[str, ...]
    now: float


def lease_call(tenant: str, key_hashes: Sequence[str], settlement: Settlement,
               need_bytes: int, want_requests: int, want_bytes: int, now: float) -> ScriptCall:
    """KEYS and ARGV to settle a slice and lease the next one for ``tenant``.

    ``key_hashes`` are the keys to confirm, the asking key first; with
    ``want_requests`` 0 the call only settles.
    """
    month = month_id(now)
    settle_month = settlement.month or month
    keys: Tuple[str, ...] = (tenant_name(tenant), gcra_name(tenant), usage_name(tenant, month),
            usage_name(tenant, settle_month))
    keys += tuple(key_record_name(tenant, h) for h in key_hashes)
    ttl = next_month_start(now) + USAGE_RETENTION - int(now)
    args = (repr(float(now)), str(ttl), str(settlement.requests), str(settlement.bytes),
            str(settlement.quota_records), str(settlement.quota_bytes), str(int(need_bytes)),
            str(int(want_requests)), str(int(want_bytes)))
    return ScriptCall(keys, args, LEASE_SCRIPT_SHA)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def parse_lease_reply(reply: Sequence[object], tenant: str, now: float) -> object:
    """A :class:`Grant`, a refusal :class:`~gateway.access.limiter.Decision`, or :data:`SETTLED`."""
    if not reply:
        raise ValueError("empty reply from the lease script")
    outcome = _text(reply[0])
    if outcome == SETTLED:
        return SETTLED
    if outcome != ADMITTED:
        return decide(reply, tenant, now)
    if len(reply) < 10 or not isinstance(reply[9], (list, tuple)):
        raise ValueError("malformed reply from the lease script")
    base = decide(list(reply[:3]) + [0, b"0", 0, 0], tenant, now)
    assert base.limits is not None
    return Grant(_text(reply[1]), base.limits, int(reply[3]), int(reply[4]),  # type: ignore[call-overload]
                 int(reply[5]), int(reply[6]), int(reply[7]),  # type: ignore[call-overload]
                 float(_text(reply[8]) or 0), tuple(_text(s) for s in reply[9]), now)


def _estimate(old: float, measured: float) -> float:
    return measured if measured >= old else (old + measured) / 2


def status_outcome(status: str) -> str:
    """The outcome for a key whose lease-call status is ``status``."""
    if status == UNKNOWN:
        return UNKNOWN
    if status == REVOKED:
        return REVOKED
    return ADMITTED


class Lease:
    """One tenant's slice in this process, and what it knows to size the next.

    ``keys`` maps each key hash used under the lease to (time it was last
    confirmed, the :class:`~gateway.access.limiter.Admission` to hand out).
    Units granted and not spent are ``requests``/``bytes`` (rate) and
    ``quota_records``/``quota_bytes`` (month); bytes may go negative: spent
    beyond the slice, charged at the next settlement.
    """

    __slots__ = ("tenant", "requests", "bytes", "quota_records", "quota_bytes", "month",
                 "granted_at", "expires", "last_call", "spent_requests", "spent_bytes",
                 "request_rate", "byte_rate", "limits", "keys", "refusal", "renewal",
                 "waiting_requests", "waiting_bytes", "ran_out")

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.requests = 0
        self.bytes = 0
        self.quota_records = 0
        self.quota_bytes = 0
        self.month = ""
        self.granted_at = 0.0
        self.expires = 0.0
        self.last_call = -math.inf
        self.spent_requests = 0
        self.spent_bytes = 0
        self.request_rate = 0.0
        self.byte_rate = 0.0
        self.limits: Optional[TenantLimits] = None
        self.keys: Dict[str, Tuple[float, Admission]] = {}
        #: (refusal, least body size it holds for, until): the last call's refusal.
        self.refusal: Optional[Tuple[Decision, int, float]] = None
        #: Opaque to this module: the driver's handle on a call in flight.
        self.renewal: object = None
        #: Requests (and their bytes) waiting for that call: demand it should cover.
        self.waiting_requests = 0
        self.waiting_bytes = 0
        #: When a request first found the slice unable to admit it (0: not yet).
        self.ran_out = 0.0

    def try_spend(self, key_hash: str, nbytes: int, now: float) -> Optional[Admission]:
        """Admit one request of ``nbytes`` from the slice, or None (a call is needed)."""
        entry = self.keys.get(key_hash)
        if entry is None or now - entry[0] >= LEASE_SECONDS or now >= self.expires:
            return None
        if self.requests < 1 or self.quota_records < 1 or self.bytes < nbytes \
                or self.quota_bytes < nbytes:
            return None
        self.requests -= 1
        self.quota_records -= 1
        self.bytes -= nbytes
        self.quota_bytes -= nbytes
        self.spent_requests += 1
        self.spent_bytes += nbytes
        return entry[1]

    def charge(self, nbytes: int) -> None:
        """Spend ``nbytes`` known only after admission; may leave the slice in debt."""
        self.bytes -= nbytes
        self.quota_bytes -= nbytes
        self.spent_bytes += nbytes

    def give_back(self, records: int, nbytes: int) -> None:
        """Return quota of a request admitted but not stored (its rate share stays spent)."""
        self.quota_records += records
        self.quota_bytes += nbytes

    def settlement(self) -> Settlement:
        """Take out what the slice holds, to hand back (the slice is then empty)."""
        s = Settlement(self.requests, self.bytes, self.quota_records, self.quota_bytes,
                       self.month)
        self.requests = self.bytes = self.quota_records = self.quota_bytes = 0
        self.expires = 0.0
        return s

    def restore_debt(self, settlement: Settlement) -> None:
        """After a call that may not have run: keep the debt, forget the refunds.

        Charging twice is the safe side; refunding twice would make allowance.
        """
        self.bytes += min(settlement.bytes, 0)
        self.quota_bytes += min(settlement.quota_bytes, 0)
        self.quota_records += min(settlement.quota_records, 0)

    def wants(self, need_bytes: int, now: float) -> Tuple[int, int]:
        """Requests and bytes to ask for: about :data:`SLICE_SECONDS` of the recent rate."""
        if self.granted_at > 0:
            # The rate while the slice lasted: from its grant to when it ran out.
            elapsed = max((self.ran_out or now) - self.granted_at, MIN_RATE_WINDOW)
            if now - self.granted_at < 2 * LEASE_SECONDS:
                # Up at once, down by halves: a slice that ran out early
                # makes the next one larger; an idle tenant's slices shrink.
                self.request_rate = _estimate(self.request_rate, self.spent_requests / elapsed)
                self.byte_rate = _estimate(self.byte_rate, self.spent_bytes / elapsed)
            else:
                self.request_rate = self.byte_rate = 0.0
        # The asking request and those waiting for the call, on top of what
        # the recent rate would spend: a burst of traffic on a fresh slice
        # is served by the next call, not by slices doubling call by call.
        limits = self.limits
        request_seconds = byte_seconds = SLICE_SECONDS
        if limits is not None:
            if limits.requests_per_second <= 0 and limits.monthly_records <= 0:
                request_seconds = UNLIMITED_SLICE_SECONDS
            if limits.bytes_per_second <= 0 and limits.monthly_bytes <= 0:
                byte_seconds = UNLIMITED_SLICE_SECONDS
        want_requests = 1 + self.waiting_requests + int(math.ceil(self.request_rate * request_seconds))
        want_bytes = need_bytes + self.waiting_bytes + int(math.ceil(self.byte_rate * byte_seconds))
        if limits is not None:
            if limits.requests_per_second > 0:
                want_requests = min(want_requests,
                                    max(1, int(limits.burst * SLICE_BURST_FRACTION)))
            if limits.bytes_per_second > 0:
                want_bytes = max(need_bytes, min(
                    want_bytes, int(limits.burst_bytes * SLICE_BURST_FRACTION)))
        return want_requests, want_bytes

    def granted(self, grant: Grant, key_hashes: Sequence[str]) -> List[Tuple[str, str]]:
        """Take ``grant`` (made for ``key_hashes``); the keys it found invalid, with their outcome."""
        now = grant.now
        self.requests += grant.requests
        self.bytes += grant.bytes
        self.quota_records += grant.quota_records
        self.quota_bytes += grant.quota_bytes
        self.month = month_id(now)
        self.granted_at = now
        self.expires = now + LEASE_SECONDS
        self.spent_requests = self.spent_bytes = 0
        self.ran_out = 0.0
        self.limits = grant.limits
        self.refusal = None
        limit = max(grant.limits.burst, 1) if grant.limits.requests_per_second > 0 else 0
        bad: List[Tuple[str, str]] = []
        # Keys not used lately are forgotten: a tenant rotating through many
        # keys keeps only those of the last couple of seconds here.
        stale = [h for h, (confirmed, _) in self.keys.items() if now - confirmed >= 2 * LEASE_SECONDS]
        for key_hash in stale:
            del self.keys[key_hash]
        for key_hash, status in zip(key_hashes, grant.statuses):
            outcome = status_outcome(status)
            if outcome == ADMITTED:
                self.keys[key_hash] = (now, Admission(self.tenant, status, limit,
                                                      grant.remaining, grant.reset, "lease"))
            else:
                self.keys.pop(key_hash, None)
                bad.append((key_hash, outcome))
        return bad

    def refused(self, decision: Decision, nbytes: int, min_until: float) -> None:
        """Remember a refusal: rate and quota refusals hold until their retry time."""
        if decision.outcome in (UNKNOWN, REVOKED, DISABLED):
            if decision.outcome == DISABLED:
                self.keys.clear()
            return
        if decision.outcome in (RATE, QUOTA):
            cost = 0 if decision.which in ("requests", "monthly_records") else nbytes
            self.refusal = (decision, cost, max(decision.until, min_until))

    def keys_to_confirm(self, asking: str, now: float) -> List[str]:
        """The asking key, then keys used under the lease, at most :data:`MAX_KEYS_PER_CALL`."""
        hashes = [asking]
        for key_hash, (confirmed, _) in self.keys.items():
            if len(hashes) >= MAX_KEYS_PER_CALL:
                break
            if key_hash != asking and now - confirmed < 2 * LEASE_SECONDS:
                hashes.append(key_hash)
        return hashes
