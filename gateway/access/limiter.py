"""Access decisions without I/O: API keys, the check script, GCRA and months.

Theory of operation
-------------------
Every request is checked by one Lua script, :data:`CHECK_SCRIPT`, run with
EVALSHA on the Redis node that holds its tenant.  This module builds the
script's KEYS and ARGV (:func:`check_call`), turns its reply into an immutable
:class:`Decision` (:func:`decide`), and holds the pure math the script mirrors:
GCRA (:func:`gcra`) and the UTC calendar month (:func:`month_start`,
:func:`next_month_start`).  Nothing here imports trio, socket or redis; the
clock is always an argument (unix seconds as a float).

API key format: ``sluice1.<tenant>.<secret>``.  ``<tenant>`` is the public
routing part: it names the Redis hash tag the key record lives under, so one
EVALSHA on one cluster slot finds the key, the tenant and its counters even
for a key the gateway has never seen.  ``<secret>`` is 32 random bytes in
URL-safe base64 (43 characters).  Only the SHA-256 of the whole key is stored;
the lookup is by Redis key name, so nothing secret is compared locally.

GCRA with a cost: a tenant's allowance is ``burst`` units refilled at ``rate``
units per second.  The state is one float, the theoretical arrival time (TAT).
A request costing ``c`` is admitted when ``max(TAT, now) + c/rate <= now +
burst/rate``.  A request costing more than the whole burst is admitted only
into a full allowance and then pays its whole cost, so the long-run rate holds
and, over any window of ``t`` seconds, at most ``rate * t + max(burst,
largest cost)`` units are admitted.  The Lua code and :func:`gcra` do the same
float operations in the same order, so they agree to the bit.

Monthly quotas count records and bytes per tenant per UTC calendar month in a
hash named after the month; the driver computes the month from its clock and
passes the key name, so the script needs no calendar.
"""

from __future__ import annotations

import calendar
import hashlib
import math
import re
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from gateway.errors import Forbidden, QuotaExceeded, RateLimited, RequestError, Unauthorized

__all__ = [
    "API_KEY_PREFIX",
    "TENANT_PATTERN",
    "KEY_PREFIX",
    "USAGE_RETENTION",
    "EPSILON",
    "CHECK_SCRIPT",
    "CHECK_SCRIPT_SHA",
    "ADMITTED",
    "UNKNOWN",
    "REVOKED",
    "DISABLED",
    "QUOTA",
    "RATE",
    "ParsedKey",
    "api_key_from_headers",
    "parse_api_key",
    "valid_tenant",
    "key_record_name",
    "key_index_name",
    "tenant_name",
    "gcra_name",
    "usage_name",
    "TENANTS_SET",
    "TenantLimits",
    "ScriptCall",
    "check_call",
    "Admission",
    "Decision",
    "decide",
    "GcraResult",
    "gcra",
    "month_start",
    "next_month_start",
    "month_id",
    "UsageDelta",
    "CHARGE_SCRIPT",
    "usage_commands",
    "LocalLimiter",
]

API_KEY_PREFIX = "sluice1"
# Tenant names become part of API keys and Redis hash tags: no '.', '{' or '}'.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_PREFIX_BYTES = API_KEY_PREFIX.encode("ascii")
_SECRET_PATTERN = re.compile(rb"[A-Za-z0-9_-]{43}\Z")
# Longest header value worth hashing: prefix + 64-char tenant + secret + dots.
_MAX_KEY_LENGTH = 128

KEY_PREFIX = "sluice"
TENANTS_SET = KEY_PREFIX + ":tenants"
# Usage hashes outlive their month by 400 days: a year of history for billing
# questions, plus slack.
USAGE_RETENTION = 400 * 86400
# Float slack in GCRA comparisons: TATs near 1.7e9 s carry about 2.4e-7 s of
# rounding, so anything finer would refuse requests that are exactly on time.
EPSILON = 1e-6


class ParsedKey:
    """The public parts of a presented API key: tenant and SHA-256 (hex)."""

    __slots__ = ("tenant", "key_hash")

    def __init__(self, tenant: str, key_hash: str) -> None:
        self.tenant = tenant
        self.key_hash = key_hash

    def __repr__(self) -> str:
        return "ParsedKey(tenant=%r, key_hash=%r)" % (self.tenant, self.key_hash[:12] + "...")


def api_key_from_headers(headers: Iterable[Tuple[bytes, bytes]]) -> Optional[bytes]:
    """The key an agent sent, from ``Authorization: Bearer`` or ``X-API-Key``.

    ``headers`` are (name, value) pairs with lower-case names, as h11 gives
    them.  Authorization wins when both are present; None when neither is.
    """
    fallback = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                return credentials.strip()
        elif name == b"x-api-key" and fallback is None and value.strip():
            fallback = value.strip()
    return fallback


def valid_tenant(tenant: str) -> bool:
    """True when ``tenant`` can name a tenant (and sit in keys and hash tags)."""
    return bool(TENANT_PATTERN.match(tenant))


def parse_api_key(api_key: Union[bytes, str]) -> Optional[ParsedKey]:
    """Split a presented key into tenant and hash; None if it is malformed."""
    if isinstance(api_key, str):
        try:
            api_key = api_key.encode("ascii")
        except UnicodeEncodeError:
            return None
    if len(api_key) > _MAX_KEY_LENGTH:
        return None
    api_key = bytes(api_key)
    parts = api_key.split(b".")
    if len(parts) != 3 or parts[0] != _PREFIX_BYTES:
        return None
    tenant = parts[1].decode("ascii", "replace")
    if not valid_tenant(tenant) or not _SECRET_PATTERN.match(parts[2]):
        return None
    return ParsedKey(tenant, hashlib.sha256(api_key).hexdigest())


def _tag(tenant: str) -> str:
    return "%s:{%s}" % (KEY_PREFIX, tenant)


def key_record_name(tenant: str, key_hash: str) -> str:
    return "%s:key:%s" % (_tag(tenant), key_hash)


def key_index_name(tenant: str) -> str:
    return _tag(tenant) + ":keys"


def tenant_name(tenant: str) -> str:
    return _tag(tenant) + ":tenant"


def gcra_name(tenant: str) -> str:
    return _tag(tenant) + ":gcra"


def usage_name(tenant: str, month: str) -> str:
    return "%s:usage:%s" % (_tag(tenant), month)


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's limits; 0 means unlimited for every field."""

    requests_per_second: float = 0.0
    burst: int = 0
    bytes_per_second: float = 0.0
    burst_bytes: int = 0
    monthly_records: int = 0
    monthly_bytes: int = 0

    def divided(self, n: int) -> TenantLimits:
        """The share of one of ``n`` gateway instances (rates and bursts)."""
        if n <= 1:
            return self
        return TenantLimits(
            self.requests_per_second / n, max(1, self.burst // n),
            self.bytes_per_second / n, max(1, self.burst_bytes // n),
            self.monthly_records, self.monthly_bytes)


# The check script.  KEYS: 1 key record, 2 tenant, 3 GCRA state, 4 this month's
# usage.  ARGV: 1 now (unix s), 2 body bytes, 3 records, 4 usage TTL (s),
# 5 (optional) '1' for several requests at once: no allowance beyond the burst.
# TTLs rather than EXPIREAT: the clock passed in is the only clock here.
# Reply: {outcome, key_id, limits, a, b, c, d}; limits is the tenant's six
# limit fields joined by spaces, a-d depend on the outcome (see decide()).
# Floats go back as strings: Redis truncates Lua numbers to integers.  Six
# redis.call()s on the common path: each costs about 1.5 us of server time.
CHECK_SCRIPT = r"""
local rec = redis.call('HMGET', KEYS[1], 'key_id', 'revoked')
if not rec[1] then return {'unknown'} end
local key_id = rec[1]
if rec[2] then return {'revoked', key_id} end
local t = redis.call('HMGET', KEYS[2], 'enabled', 'rps', 'burst', 'bps',
  'burst_bytes', 'monthly_records', 'monthly_bytes')
if not t[1] then return {'unknown'} end
if t[1] ~= '1' then return {'disabled', key_id} end
for i = 2, 7 do t[i] = t[i] or '0' end
local limits = table.concat(t, ' ', 2, 7)
local now = tonumber(ARGV[1])
local nbytes = tonumber(ARGV[2])
local nrec = tonumber(ARGV[3])
local strict = ARGV[5] == '1'
local rps, burst = tonumber(t[2]), tonumber(t[3])
local bps, bburst = tonumber(t[4]), tonumber(t[5])
local mrec, mbytes = tonumber(t[6]), tonumber(t[7])
local function reply(outcome, a, b, c, d)
  return {outcome, key_id, limits, a, b, c, d}
end
local used = redis.call('HMGET', KEYS[4], 'records', 'bytes')
local urec, ubytes = tonumber(used[1]) or 0, tonumber(used[2]) or 0
if mrec > 0 and urec + nrec > mrec then
  return reply('quota', 'monthly_records', urec, mrec, 0)
end
if mbytes > 0 and ubytes + nbytes > mbytes then
  return reply('quota', 'monthly_bytes', ubytes, mbytes, 0)
end
local eps = 1e-6
-- Mirrors limiter.gcra(): returns ok, tat, retry_after, remaining, reset.
local function gcra(tat, rate, cap, cost)
  if rate <= 0 then return true, tat, 0, 0, 0 end
  if cap < 1 then cap = 1 end
  local e = 1 / rate
  local tau = cap * e
  local base = now
  if tat > now then base = tat end
  local new_tat = base + cost * e
  local ok, retry
  if cost * e > tau and not strict then
    ok = base <= now
    retry = base - now
  else
    ok = new_tat - now <= tau + eps
    retry = new_tat - tau - now
  end
  if ok then
    local rem = math.floor((now + tau - new_tat) / e + eps)
    if rem < 0 then rem = 0 end
    return true, new_tat, 0, rem, new_tat - now
  end
  local rem = math.floor((now + tau - base) / e + eps)
  if rem < 0 then rem = 0 end
  return false, tat, retry, rem, base - now
end
local rtat, btat = 0, 0
if rps > 0 or bps > 0 then
  local st = redis.call('HMGET', KEYS[3], 'req', 'bytes')
  rtat, btat = tonumber(st[1]) or 0, tonumber(st[2]) or 0
end
local rok, rnew, rretry, rrem, rreset = gcra(rtat, rps, burst, nrec)
local bok, bnew, bretry, brem, breset = gcra(btat, bps, bburst, nbytes)
if not rok and (bok or rretry >= bretry) then
  return reply('rate', 'requests', tostring(rretry), rrem, tostring(rreset))
end
if not bok then
  return reply('rate', 'bytes', tostring(bretry), brem, tostring(breset))
end
if rps > 0 or bps > 0 then
  redis.call('HSET', KEYS[3], 'req', rnew, 'bytes', bnew)
end
redis.call('HSET', KEYS[4], 'records', urec + nrec, 'bytes', ubytes + nbytes)
if not used[1] then redis.call('EXPIRE', KEYS[4], tonumber(ARGV[4])) end
return reply('ok', rrem, tostring(rreset), urec + nrec, ubytes + nbytes)
"""

CHECK_SCRIPT_SHA = hashlib.sha1(CHECK_SCRIPT.encode("utf-8")).hexdigest()

# Charges bytes known only after the check (a chunked body) against the
# tenant's byte rate, with no check: the GCRA state may go past the burst,
# and every later check (even of 0 bytes) is then refused until that debt is
# paid, its Retry-After the time that takes.  KEYS: 1 tenant, 2 GCRA state.
# ARGV: 1 now (unix s), 2 bytes.  Sent with EVAL, not EVALSHA: it runs once
# per chunked upload, Redis caches the compiled script, and the edges then
# need no NOSCRIPT handling for it.  Written with %.17g so the float survives.
CHARGE_SCRIPT = r"""
local bps = tonumber(redis.call('HGET', KEYS[1], 'bps') or '0') or 0
if bps <= 0 then return 0 end
local now = tonumber(ARGV[1])
local tat = tonumber(redis.call('HGET', KEYS[2], 'bytes') or '0') or 0
if tat < now then tat = now end
redis.call('HSET', KEYS[2], 'bytes', string.format('%.17g', tat + tonumber(ARGV[2]) / bps))
return 1
"""


@dataclass(frozen=True)
class ScriptCall:
    """One EVALSHA: its KEYS and ARGV, of :data:`CHECK_SCRIPT` unless ``sha`` names another."""

    keys: Tuple[str, ...]
    args: Tuple[str, ...]
    sha: str = CHECK_SCRIPT_SHA


def check_call(key: ParsedKey, body_bytes: int, now: float, records: int = 1,
               strict: bool = False) -> ScriptCall:
    """KEYS and ARGV to check ``records`` requests of ``body_bytes`` in all at ``now``.

    ``strict`` is for several requests checked at once: a single request
    larger than the burst is admitted when the bucket is full, several
    together never are.
    """
    tenant = key.tenant
    start, end, month = _month(now)
    keys = (key_record_name(tenant, key.key_hash), tenant_name(tenant),
            gcra_name(tenant), usage_name(tenant, month))
    ttl = end + USAGE_RETENTION - int(now)
    args: Tuple[str, ...] = (repr(float(now)), str(int(body_bytes)), str(int(records)), str(ttl))
    return ScriptCall(keys, args + ("1",) if strict else args)


def check_command(call: ScriptCall) -> Tuple[object, ...]:
    """The Redis command (EVALSHA) that runs ``call``."""
    return ("EVALSHA", call.sha, len(call.keys)) + call.keys + call.args


def usage_commands(delta: UsageDelta, ttl: int) -> List[Tuple[object, ...]]:
    """The Redis commands that add ``delta`` to its month, whose hash expires in ``ttl`` s.

    Bytes in ``delta.rate_bytes`` are also charged against the byte rate
    (:data:`CHARGE_SCRIPT`) at ``delta.charged_at``.
    """
    name = usage_name(delta.tenant, delta.month)
    commands: List[Tuple[object, ...]] = [
        ("HINCRBY", name, "records", delta.records), ("HINCRBY", name, "bytes", delta.bytes),
        ("EXPIRE", name, ttl)]
    if delta.rate_bytes > 0:
        commands.append(("EVAL", CHARGE_SCRIPT, 2, tenant_name(delta.tenant),
                         gcra_name(delta.tenant), repr(float(delta.charged_at)),
                         str(int(delta.rate_bytes))))
    return commands


@dataclass(frozen=True)
class Admission:
    """An admitted request.

    ``limit``/``remaining``/``reset`` describe the request-rate allowance for
    ``RateLimit-*`` headers (``limit == 0``: the tenant has no request rate
    limit).  ``source`` is ``"redis"`` or ``"local"`` (fail-open).
    ``limits`` are the tenant's limits as Redis last gave them.
    """

    tenant: str
    key_id: str
    limit: int = 0
    remaining: int = 0
    reset: float = 0.0
    source: str = "redis"
    limits: Optional[TenantLimits] = None


# Outcomes of a check, as the script names them.
ADMITTED = "ok"
UNKNOWN = "unknown"
REVOKED = "revoked"
DISABLED = "disabled"
QUOTA = "quota"
RATE = "rate"
_OUTCOMES = (ADMITTED, UNKNOWN, REVOKED, DISABLED, QUOTA, RATE)


@dataclass(frozen=True)
class Decision:
    """What one check decided, as a value; :meth:`error` builds the exception.

    ``which`` names the refusing limit (``"requests"``/``"bytes"`` for RATE,
    ``"monthly_records"``/``"monthly_bytes"`` for QUOTA).  ``until`` is the
    clock time the refusal holds until (what caches may rely on).
    ``used_records``/``used_bytes``: the month's usage after an admission,
    as Redis counted it (what fail-open mode starts from).
    """

    outcome: str
    tenant: str
    key_id: str = ""
    limits: Optional[TenantLimits] = None
    which: str = ""
    limit: int = 0
    remaining: int = 0
    reset: float = 0.0
    retry_after: float = 0.0
    resets_at: int = 0
    now: float = 0.0
    used_records: int = 0
    used_bytes: int = 0

    @property
    def admitted(self) -> bool:
        return self.outcome == ADMITTED

    @property
    def until(self) -> float:
        return self.now + self.retry_after

    def admission(self, source: str = "redis") -> Admission:
        return Admission(self.tenant, self.key_id, self.limit, self.remaining,
                         self.reset, source, self.limits)

    def error(self, now: Optional[float] = None) -> RequestError:
        """A fresh exception for this refusal, its delay counted from ``now``."""
        if now is None:
            now = self.now
        if self.outcome in (UNKNOWN, REVOKED):
            return Unauthorized("unknown or revoked API key")
        if self.outcome == DISABLED:
            return Forbidden("tenant %s is disabled" % self.tenant)
        retry_after = max(self.until - now, EPSILON)
        if self.outcome == QUOTA:
            return QuotaExceeded("%s quota used up" % self.which, quota=self.which,
                                 resets_at=self.resets_at, retry_after=retry_after)
        if self.outcome == RATE:
            return RateLimited("%s rate exceeded" % self.which, retry_after=retry_after,
                               limit=self.limit, remaining=self.remaining,
                               reset=max(self.reset - (now - self.now), 0.0))
        raise ValueError("decision %r is not a refusal" % self.outcome)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _number(value: object) -> float:
    text = _text(value)
    return float(text) if text else 0.0


# Parsed limit strings, so a busy tenant's limits are parsed once; cleared
# when full (tenants x distinct settings stays far below this).
_LIMITS_MEMO: Dict[object, TenantLimits] = {}
_LIMITS_MEMO_SIZE = 4096


def _limits(raw: object) -> TenantLimits:
    limits = _LIMITS_MEMO.get(raw)
    if limits is None:
        f = [float(v) for v in _text(raw).split()]
        if len(f) != 6:
            raise ValueError("malformed limits in the check script's reply")
        limits = TenantLimits(f[0], int(f[1]), f[2], int(f[3]), int(f[4]), int(f[5]))
        if len(_LIMITS_MEMO) >= _LIMITS_MEMO_SIZE:
            _LIMITS_MEMO.clear()
        _LIMITS_MEMO[raw] = limits
    return limits


def decide(reply: Sequence[object], tenant: str, now: float) -> Decision:
    """The :class:`Decision` for a script ``reply`` to a check made at ``now``."""
    if not reply:
        raise ValueError("empty reply from the check script")
    outcome = _text(reply[0])
    if outcome not in _OUTCOMES:
        raise ValueError("unexpected reply from the check script: %r" % outcome)
    key_id = _text(reply[1]) if len(reply) > 1 else ""
    if len(reply) < 7:
        return Decision(outcome, tenant, key_id, now=now)
    limits = _limits(reply[2])
    a, b, c, d = reply[3:7]
    if outcome == ADMITTED:
        limit = max(limits.burst, 1) if limits.requests_per_second > 0 else 0
        return Decision(outcome, tenant, key_id, limits, limit=limit,
                        remaining=int(a) if limit else 0,  # type: ignore[call-overload]
                        reset=_number(b), now=now, used_records=int(_number(c)),
                        used_bytes=int(_number(d)))
    which = _text(a)
    if outcome == QUOTA:
        resets_at = next_month_start(now)
        return Decision(outcome, tenant, key_id, limits, which, limit=int(_number(c)),
                        retry_after=resets_at - now, resets_at=resets_at, now=now)
    limit = limits.burst if which == "requests" else limits.burst_bytes
    return Decision(outcome, tenant, key_id, limits, which, limit=max(limit, 1),
                    remaining=int(_number(c)), reset=_number(d),
                    retry_after=_number(b), now=now)


@dataclass(frozen=True)
class GcraResult:
    """One GCRA step: ``tat`` is the new state (unchanged when refused)."""

    allowed: bool
    tat: float
    retry_after: float
    remaining: int
    reset: float


def gcra(tat: float, rate: float, burst: float, cost: float, now: float) -> GcraResult:
    """Charge ``cost`` units at ``now`` against ``burst`` refilled at ``rate``/s."""
    if rate <= 0:
        return GcraResult(True, tat, 0.0, 0, 0.0)
    if burst < 1:
        burst = 1
    e = 1 / rate
    tau = burst * e
    base = tat if tat > now else now
    new_tat = base + cost * e
    if cost * e > tau:
        ok = base <= now
        retry = base - now
    else:
        ok = new_tat - now <= tau + EPSILON
        retry = new_tat - tau - now
    if ok:
        remaining = max(int(math.floor((now + tau - new_tat) / e + EPSILON)), 0)
        return GcraResult(True, new_tat, 0.0, remaining, new_tat - now)
    remaining = max(int(math.floor((now + tau - base) / e + EPSILON)), 0)
    return GcraResult(False, tat, retry, remaining, base - now)


# The last month looked up: every check needs it and it changes monthly.
_last_month: Tuple[int, int, str] = (0, 0, "")


def _month(now: float) -> Tuple[int, int, str]:
    """Start, next month's start and ``YYYYMM`` of the UTC month of ``now``."""
    global _last_month
    last = _last_month
    if last[0] <= now < last[1]:
        return last
    t = time.gmtime(math.floor(now))
    year, month = t.tm_year, t.tm_mon
    start = calendar.timegm((year, month, 1, 0, 0, 0))
    if month == 12:
        end = calendar.timegm((year + 1, 1, 1, 0, 0, 0))
    else:
        end = calendar.timegm((year, month + 1, 1, 0, 0, 0))
    _last_month = (start, end, "%04d%02d" % (year, month))
    return _last_month


def month_start(now: float) -> int:
    """Unix time when the UTC calendar month holding ``now`` began."""
    return _month(now)[0]


def next_month_start(now: float) -> int:
    """Unix time when the UTC calendar month after ``now``'s begins."""
    return _month(now)[1]


def month_id(now: float) -> str:
    """``YYYYMM`` of the UTC month holding ``now`` (names the usage hash)."""
    return _month(now)[2]


@dataclass(frozen=True)
class UsageDelta:
    """Usage counted outside Redis, to add to a tenant's month when it returns.

    ``rate_bytes`` of it are also charged against the tenant's byte rate:
    bytes no check saw (a chunked body's size), as of ``charged_at`` (the
    clock when it is sent).
    """

    tenant: str
    month: str
    records: int
    bytes: int
    expire_at: int
    rate_bytes: int = 0
    charged_at: float = 0.0

    @classmethod
    def for_request(cls, tenant: str, body_bytes: int, now: float) -> UsageDelta:
        """One record of ``body_bytes`` admitted at ``now``."""
        start, end, month = _month(now)
        return cls(tenant, month, 1, int(body_bytes), end + USAGE_RETENTION)

    def negated(self) -> UsageDelta:
        # Only the month's counts are taken back: bytes charged to the rate
        # were received, whatever became of them.
        return UsageDelta(self.tenant, self.month, -self.records, -self.bytes, self.expire_at)


class LocalLimiter:
    """GCRA per tenant in process memory, for fail-open mode.

    Each of ``instance_count`` gateways admits its share of the tenant's rates
    and bursts.  Monthly quotas are enforced from the usage Redis last
    reported (``used``): each gateway admits its share of what was left, less
    what it counted since.  The usage admitted is accumulated for
    :meth:`take_usage`.
    """

    def __init__(self, instance_count: int = 1, max_tenants: int = 100_000) -> None:
        self.instance_count = max(1, int(instance_count))
        # Bounded like every cache: past it, the oldest tenant's state is dropped,
        # which only makes that tenant's next request see a full allowance.
        self.max_tenants = max_tenants
        self._tats: Dict[str, Tuple[float, float]] = {}
        self._usage: Dict[Tuple[str, str], List[int]] = {}

    def check(self, tenant: str, key_id: str, limits: TenantLimits, body_bytes: int,
              now: float, used: Optional[Tuple[int, int]] = None) -> Decision:
        """Admit one request of ``body_bytes`` at ``now``, or refuse it (a RATE or QUOTA decision).

        ``used`` is the month's (records, bytes) as Redis last counted them;
        None skips the quotas (not known).
        """
        share = limits.divided(self.instance_count)
        if used is not None and (limits.monthly_records > 0 or limits.monthly_bytes > 0):
            quota = self._over_quota(tenant, key_id, limits, body_bytes, now, used)
            if quota is not None:
                return quota
        rtat, btat = self._tats.get(tenant, (0.0, 0.0))
        r = gcra(rtat, share.requests_per_second, share.burst, 1, now)
        b = gcra(btat, share.bytes_per_second, share.burst_bytes, body_bytes, now)
        if not r.allowed and (b.allowed or r.retry_after >= b.retry_after):
            return Decision(RATE, tenant, key_id, limits, "requests", max(share.burst, 1),
                            r.remaining, r.reset, r.retry_after, now=now)
        if not b.allowed:
            return Decision(RATE, tenant, key_id, limits, "bytes", max(share.burst_bytes, 1),
                            b.remaining, b.reset, b.retry_after, now=now)
        if tenant not in self._tats and len(self._tats) >= self.max_tenants:
            del self._tats[next(iter(self._tats))]
        self._tats[tenant] = (r.tat, b.tat)
        self.add_usage(UsageDelta.for_request(tenant, body_bytes, now))
        limit = max(share.burst, 1) if share.requests_per_second > 0 else 0
        return Decision(ADMITTED, tenant, key_id, limits, limit=limit,
                        remaining=r.remaining if limit else 0, reset=r.reset, now=now)

    def _over_quota(self, tenant: str, key_id: str, limits: TenantLimits, body_bytes: int,
                    now: float, used: Tuple[int, int]) -> Optional[Decision]:
        start, end, month = _month(now)
        counted = self._usage.get((tenant, month))
        local_records, local_bytes = (counted[0], counted[1]) if counted else (0, 0)
        n = self.instance_count
        for which, quota, was, local, cost in (
                ("monthly_records", limits.monthly_records, used[0], local_records, 1),
                ("monthly_bytes", limits.monthly_bytes, used[1], local_bytes, body_bytes)):
            if quota > 0 and local + cost > (quota - was) / n:
                return Decision(QUOTA, tenant, key_id, limits, which, limit=quota,
                                retry_after=end - now, resets_at=end, now=now)
        return None

    def charge(self, tenant: str, limits: TenantLimits, nbytes: int, now: float) -> None:
        """Charge ``nbytes`` no check saw against ``tenant``'s local byte rate, as debt."""
        share = limits.divided(self.instance_count)
        if share.bytes_per_second <= 0 or nbytes <= 0:
            return
        rtat, btat = self._tats.get(tenant, (0.0, 0.0))
        if tenant not in self._tats and len(self._tats) >= self.max_tenants:
            del self._tats[next(iter(self._tats))]
        self._tats[tenant] = (rtat, max(btat, now) + nbytes / share.bytes_per_second)

    def add_usage(self, delta: UsageDelta) -> None:
        """Count usage (also to give back deltas whose flush failed)."""
        slot = self._usage.get((delta.tenant, delta.month))
        if slot is None:
            self._usage[(delta.tenant, delta.month)] = [delta.records, delta.bytes,
                                                        delta.expire_at, delta.rate_bytes]
        else:
            slot[0] += delta.records
            slot[1] += delta.bytes
            slot[3] += delta.rate_bytes

    def pending_usage(self) -> Tuple[int, int]:
        """Records and bytes counted but not yet handed to Redis."""
        return (sum(v[0] for v in self._usage.values()),
                sum(v[1] for v in self._usage.values()))

    def take_usage(self) -> List[UsageDelta]:
        """Hand over (and forget) everything counted so far."""
        usage, self._usage = self._usage, {}
        return [UsageDelta(t, m, v[0], v[1], v[2], v[3]) for (t, m), v in usage.items()]
