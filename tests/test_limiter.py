"""gateway.access.limiter without I/O: key format, GCRA, month math, decisions."""

from __future__ import annotations

import calendar
import hashlib
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from gateway.access.limiter import (
    EPSILON,
    LocalLimiter,
    TenantLimits,
    UsageDelta,
    api_key_from_headers,
    check_call,
    decide,
    gcra,
    gcra_name,
    month_id,
    month_start,
    next_month_start,
    parse_api_key,
    tenant_name,
    usage_commands,
)
from gateway.errors import (
    Forbidden,
    QuotaExceeded,
    RateLimited,
    Unauthorized,
    retry_after_seconds,
)

SECRET = "s3cr3t-_" + "A" * 35
KEY = ("sluice1.ACME." + SECRET).encode()
T0 = 1_700_000_000.0  # mid November 2023


def utc(*fields: int) -> int:
    return calendar.timegm(tuple(fields) + (0,) * (6 - len(fields)))


# -- API keys ----------------------------------------------------------------

def test_parse_api_key_gives_tenant_and_hash() -> None:
    parsed = parse_api_key(KEY)
    assert parsed is not None
    assert parsed.tenant == "ACME"
    assert parsed.key_hash == hashlib.sha256(KEY).hexdigest()
    assert parse_api_key(KEY.decode()).key_hash == parsed.key_hash  # type: ignore[union-attr]
    assert SECRET not in repr(parsed) and parsed.key_hash not in repr(parsed)


@pytest.mark.parametrize("headers, expected", [
    ([(b"authorization", b"Bearer " + KEY)], KEY),
    ([(b"authorization", b"bearer  " + KEY + b" ")], KEY),
    ([(b"x-api-key", KEY)], KEY),
    ([(b"x-api-key", b"other"), (b"authorization", b"Bearer " + KEY)], KEY),
    ([(b"authorization", b"Basic dXNlcjpwdw==")], None),
    ([(b"authorization", b"Bearer ")], None),
    ([(b"host", b"example")], None),
    ([], None),
])
def test_api_key_from_headers(headers: list, expected: object) -> None:
    assert api_key_from_headers(headers) == expected


@pytest.mark.parametrize("bad", [
    b"", b"sluice1", b"sluice1.ACME", b"sluice2.ACME." + SECRET.encode(),
    b"sluice1.AC{ME}." + SECRET.encode(), b"sluice1.AC.ME." + SECRET.encode(),
    b"sluice1..'" + SECRET.encode(), b"sluice1.ACME." + SECRET.encode()[:-1],
    b"sluice1.ACME." + SECRET.encode() + b"x", b"sluice1.ACME." + b"\xff" * 43,
    b"sluice1." + b"A" * 65 + b"." + SECRET.encode(), b"x" * 10_000,
])
def test_malformed_keys_are_rejected(bad: bytes) -> None:
    assert parse_api_key(bad) is None


def test_check_call_keys_share_one_cluster_slot() -> None:
    parsed = parse_api_key(KEY)
    assert parsed is not None
    call = check_call(parsed, 512, T0)
    assert len({key_slot(k.encode()) for k in call.keys}) == 1
    assert all("{ACME}" in k for k in call.keys)
    assert call.keys[3].endswith(":usage:202311")
    assert call.args[:3] == (repr(T0), "512", "1")
    assert int(call.args[3]) > next_month_start(T0) - T0
    assert SECRET not in repr(call)


# -- GCRA ----------------------------------------------------------------------

def run_gcra(rate: float, burst: float, arrivals: list) -> list:
    """(time, cost, allowed) for each arrival, state threaded through."""
    tat, out = 0.0, []
    for now, cost in arrivals:
        r = gcra(tat, rate, burst, cost, now)
        tat = r.tat
        out.append((now, cost, r))
    return out


def test_burst_then_steady_rate() -> None:
    results = run_gcra(10, 5, [(T0, 1)] * 6)
    assert [r.allowed for _, _, r in results] == [True] * 5 + [False]
    assert [r.remaining for _, _, r in results[:5]] == [4, 3, 2, 1, 0]
    refused = results[5][2]
    assert refused.retry_after == pytest.approx(0.1, abs=1e-5)
    again = gcra(results[4][2].tat, 10, 5, 1, T0 + refused.retry_after)
    assert again.allowed


def test_cost_larger_than_burst_waits_for_a_full_allowance() -> None:
    first = gcra(0.0, 100, 50, 200, T0)   # 2 s worth, only 0.5 s of burst
    assert first.allowed and first.remaining == 0
    blocked = gcra(first.tat, 100, 50, 200, T0 + 1)
    assert not blocked.allowed and blocked.retry_after == pytest.approx(1.0, abs=1e-5)
    assert gcra(first.tat, 100, 50, 200, T0 + 2).allowed


def test_zero_rate_means_unlimited() -> None:
    assert all(r.allowed for _, _, r in run_gcra(0, 0, [(T0, 10**9)] * 100))


arrivals = st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.integers(0, 40)),
                    min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.5, 1000), burst=st.integers(1, 50), steps=arrivals)
def test_never_more_than_rate_times_window_plus_burst(rate: float, burst: int,
                                                      steps: list) -> None:
    now, timeline = T0, []
    for gap, cost in steps:
        now += gap
        timeline.append((now, cost))
    admitted = [(t, c) for t, c, r in run_gcra(rate, burst, timeline) if r.allowed]
    largest = max([c for _, c in admitted] + [burst])
    for i, (start, _) in enumerate(admitted):
        total = 0
        for end, cost in admitted[i:]:
            total += cost
            assert total <= rate * (end - start) + largest + rate * 2 * EPSILON + 1e-9


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.5, 1000), burst=st.integers(1, 50), steps=arrivals)
def test_refusals_name_a_positive_delay_that_works(rate: float, burst: int,
                                                   steps: list) -> None:
    now, tat = T0, 0.0
    for gap, cost in steps:
        now += gap
        r = gcra(tat, rate, burst, cost, now)
        if not r.allowed:
            assert r.retry_after > 0
            assert retry_after_seconds(r.retry_after) >= 1
            later = gcra(tat, rate, burst, cost, now + r.retry_after + 2 * EPSILON)
            assert later.allowed
        tat = r.tat


# -- months --------------------------------------------------------------------

def test_month_boundaries() -> None:
    assert next_month_start(utc(2023, 12, 31, 23, 59, 59)) == utc(2024, 1, 1)
    assert month_id(utc(2023, 12, 31, 23, 59, 59)) == "202312"
    assert month_id(utc(2024, 1, 1)) == "202401"
    assert month_start(utc(2024, 1, 1)) == utc(2024, 1, 1)
    assert next_month_start(utc(2024, 2, 10)) == utc(2024, 3, 1)
    assert next_month_start(utc(2024, 2, 29, 12)) - month_start(utc(2024, 2, 1)) == 29 * 86400
    assert month_start(utc(2024, 1, 1) - 0.5) == utc(2023, 12, 1)


@settings(max_examples=500)
@given(st.floats(0, 4_102_444_800 - 1, allow_nan=False))
def test_month_window_properties(now: float) -> None:
    start, end = month_start(now), next_month_start(now)
    assert start <= now < end
    assert (end - start) // 86400 in (28, 29, 30, 31)
    for edge in (start, end):
        t = time.gmtime(edge)
        assert (t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec) == (1, 0, 0, 0)
    assert month_start(end) == end and month_id(end) != month_id(now)
    y, m = time.gmtime(now).tm_year, time.gmtime(now).tm_mon
    assert month_id(now) == "%04d%02d" % (y, m)
    assert month_id(end) == ("%04d01" % (y + 1) if m == 12 else "%04d%02d" % (y, m + 1))


# -- decisions from script replies ---------------------------------------------

LIMITS = [b"10.0 20 1000.0 4000 100 100000"]


def test_admitted_decision() -> None:
    d = decide([b"ok", b"k1", *LIMITS, 19, b"0.1", 5, 500], "ACME", T0)
    assert d.admitted
    assert d.limits == TenantLimits(10.0, 20, 1000.0, 4000, 100, 100000)
    a = d.admission()
    assert (a.tenant, a.key_id, a.limit, a.remaining, a.reset, a.source) == (
        "ACME", "k1", 20, 19, 0.1, "redis")


@pytest.mark.parametrize("reply, error", [
    ([b"unknown"], Unauthorized),
    ([b"revoked", b"k1"], Unauthorized),
    ([b"disabled", b"k1"], Forbidden),
])
def test_key_refusals(reply: list, error: type) -> None:
    d = decide(reply, "ACME", T0)
    assert not d.admitted
    assert type(d.error()) is error
    assert d.error() is not d.error()  # fresh exceptions, no shared tracebacks


def test_rate_refusal_fills_the_headers() -> None:
    d = decide([b"rate", b"k1", *LIMITS, b"bytes", b"0.25", 3, b"1.5"], "ACME", T0)
    e = d.error(T0 + 0.1)
    assert isinstance(e, RateLimited)
    assert e.retry_after == pytest.approx(0.15)
    assert (e.limit, e.remaining) == (4000, 3)
    assert e.reset == pytest.approx(1.4)
    assert (b"retry-after", b"1") in e.headers()


def test_quota_refusal_names_quota_and_next_month() -> None:
    now = utc(2023, 12, 31, 23, 0)
    d = decide([b"quota", b"k1", *LIMITS, b"monthly_records", 100, 100, 0], "ACME", now)
    e = d.error()
    assert isinstance(e, QuotaExceeded)
    assert e.quota == "monthly_records"
    assert e.resets_at == utc(2024, 1, 1)
    assert e.retry_after == pytest.approx(3600)


def test_unexpected_reply_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        decide([b"surprise"], "ACME", T0)
    with pytest.raises(ValueError):
        decide([], "ACME", T0)


# -- the fail-open limiter -----------------------------------------------------

def test_local_limiter_admits_the_instance_share_and_counts_usage() -> None:
    local = LocalLimiter(instance_count=2)
    limits = TenantLimits(requests_per_second=10, burst=10)
    results = [local.check("ACME", "k1", limits, 100, T0) for _ in range(6)]
    assert [d.admitted for d in results] == [True] * 5 + [False]
    assert isinstance(results[-1].error(T0), RateLimited)
    assert results[0].admission("local").source == "local"
    assert local.pending_usage() == (5, 500)
    (delta,) = local.take_usage()
    assert (delta.tenant, delta.month, delta.records, delta.bytes) == ("ACME", "202311", 5, 500)
    assert local.pending_usage() == (0, 0) and local.take_usage() == []
    local.add_usage(UsageDelta.for_request("ACME", 10, T0))
    local.add_usage(UsageDelta.for_request("ACME", 10, T0).negated())
    assert local.pending_usage() == (0, 0)


def test_local_limiter_enforces_bytes_too() -> None:
    local = LocalLimiter(instance_count=1)
    limits = TenantLimits(bytes_per_second=1000, burst_bytes=1000)
    assert local.check("ACME", "k1", limits, 800, T0).admitted
    refused = local.check("ACME", "k1", limits, 800, T0)
    assert not refused.admitted and refused.which == "bytes"


def test_local_charge_puts_a_tenant_in_debt_until_the_bytes_are_paid():
    limits = TenantLimits(bytes_per_second=1000, burst_bytes=1000)
    local = LocalLimiter()
    local.charge("ACME", limits, 100_000, T0)
    refused = local.check("ACME", "k1", limits, 0, T0 + 1)
    assert not refused.admitted and refused.which == "bytes"
    assert refused.retry_after == pytest.approx(98.0)
    assert local.check("ACME", "k1", limits, 0, T0 + 99.5).admitted


def test_usage_with_rate_bytes_charges_the_byte_rate_after_the_month():
    delta = UsageDelta("ACME", "202311", 0, 8, int(T0), rate_bytes=8, charged_at=T0)
    commands = usage_commands(delta, 60)
    assert [c[0] for c in commands] == ["HINCRBY", "HINCRBY", "EXPIRE", "EVAL"]
    assert commands[-1][3:] == (tenant_name("ACME"), gcra_name("ACME"), repr(T0), "8")
    assert [c[0] for c in usage_commands(delta.negated(), 60)] == ["HINCRBY", "HINCRBY", "EXPIRE"]
