"""Lease maths without Redis: taking, refunding, slice sizes, N processes sharing one limit."""

from __future__ import annotations

import math
from typing import List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.access.lease import (
    LEASE_SECONDS,
    MIN_CALL_INTERVAL,
    SLICE_BURST_FRACTION,
    SLICE_SECONDS,
    UNLIMITED_SLICE_SECONDS,
    Grant,
    Lease,
    lease_take,
    refund_tat,
)
from gateway.access.limiter import EPSILON, TenantLimits, gcra

NOW = 1_700_000_000.0
rates = st.floats(min_value=0.5, max_value=5000.0)
bursts = st.integers(min_value=1, max_value=2000)
offsets = st.floats(min_value=-5.0, max_value=5.0)


def available(tat: float, rate: float, burst: int, now: float) -> int:
    """Units a request could take at ``now`` (what a full refund must restore, no more)."""
    return lease_take(tat, rate, burst, 1, 10 ** 9, now).granted if rate > 0 else 0


@given(rates, bursts, offsets, st.integers(min_value=0, max_value=10 ** 6))
def test_a_refund_never_goes_below_the_present_nor_back_further_than_its_units(
        rate, burst, offset, units):
    tat = NOW + offset
    back = refund_tat(tat, rate, units, NOW)
    assert back <= tat
    assert back >= min(tat, NOW)
    assert back >= tat - units / rate - 1e-9


@given(rates, bursts, offsets, st.integers(min_value=1, max_value=10 ** 6))
def test_debt_is_charged_from_the_present_at_the_rate(rate, burst, offset, units):
    tat = NOW + offset
    charged = refund_tat(tat, rate, -units, NOW)
    assert math.isclose(charged, max(tat, NOW) + units / rate)


@given(rates, bursts, offsets, st.integers(min_value=1, max_value=3000),
       st.integers(min_value=1, max_value=3000))
def test_taking_a_slice_and_giving_it_all_back_restores_the_allowance_exactly(
        rate, burst, offset, need, want):
    tat = NOW + offset
    before = available(tat, rate, burst, NOW)
    taken = lease_take(tat, rate, burst, need, max(need, want), NOW)
    if not taken.allowed:
        assert taken.tat == tat and taken.granted == 0 and taken.retry_after > 0
        return
    assert taken.granted >= need
    assert taken.granted <= max(need, want)
    back = refund_tat(taken.tat, rate, taken.granted, NOW)
    assert available(back, rate, burst, NOW) == before


@given(rates, bursts, offsets, st.integers(min_value=1, max_value=3000))
def test_a_slice_of_one_request_is_the_check_scripts_gcra(rate, burst, offset, cost):
    tat = NOW + offset
    taken = lease_take(tat, rate, burst, cost, cost, NOW)
    checked = gcra(tat, rate, burst, cost, NOW)
    assert taken.allowed == checked.allowed
    if taken.allowed:
        assert taken.tat == checked.tat and taken.remaining == checked.remaining
    else:
        assert abs(taken.retry_after - checked.retry_after) < 1e-6


def _grant(lease: Lease, limits: TenantLimits, requests: int, nbytes: int, now: float) -> None:
    lease.granted(Grant("k1", limits, requests, nbytes, requests, nbytes, 0, 0.0, ("k1",), now),
                  ["KEY"])


@given(st.floats(min_value=1.0, max_value=100_000.0), bursts,
       st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=1, max_size=30),
       st.integers(min_value=0, max_value=10 ** 6))
def test_slices_are_at_least_the_request_and_at_most_a_quarter_of_the_burst(
        rate, burst, gaps, need_bytes):
    limits = TenantLimits(rate, burst, rate * 100, burst * 100)
    lease = Lease("T")
    now = NOW
    for gap in gaps:
        want_requests, want_bytes = lease.wants(need_bytes, now)
        assert 1 <= want_requests <= max(1, int(burst * SLICE_BURST_FRACTION))
        assert want_bytes >= need_bytes
        assert want_bytes <= max(need_bytes, int(burst * 100 * SLICE_BURST_FRACTION))
        _grant(lease, limits, want_requests, want_bytes, now)
        # Spend all of it at once: the next slice grows toward the rate.
        while lease.try_spend("KEY", 0, now) is not None:
            pass
        now += max(gap, MIN_CALL_INTERVAL)


def _slices_at(limits: TenantLimits, rate: float, calls: int = 20) -> List[int]:
    """Requests wanted by successive calls while ``rate`` requests/s arrive."""
    lease = Lease("T")
    now = NOW
    wanted = []
    for _ in range(calls):
        want, _ = lease.wants(0, now)
        wanted.append(want)
        _grant(lease, limits, want, 0, now)
        spent = 0
        while lease.try_spend("KEY", 0, now + spent / rate) is not None:
            spent += 1
        now += max(spent / rate, MIN_CALL_INTERVAL)
    return wanted


def test_slices_grow_with_the_local_rate_to_about_a_tenth_of_a_second():
    # A limit far above the rate: only the local rate sizes slices.
    wanted = _slices_at(TenantLimits(10 ** 6, 10 ** 7, 0, 0), 5000.0)
    assert wanted[0] == 1
    assert 400 <= wanted[-1] <= 600  # about 0.1 s of 5000/s


@pytest.mark.parametrize("limits", [TenantLimits(0, 0, 0, 0), TenantLimits(0, 0, 10 ** 9, 10 ** 10)])
def test_a_dimension_without_limits_takes_slices_of_a_whole_lease(limits):
    # Nothing to share: the calls only confirm keys, once per lease.
    wanted = _slices_at(limits, 5000.0)
    assert wanted[0] == 1
    assert 4000 <= wanted[-1] <= 6000  # about 1 s of 5000/s


@pytest.mark.parametrize("limits", [TenantLimits(0, 0, 0, 0, monthly_records=10 ** 9),
                                    TenantLimits(0, 0, 0, 0, monthly_bytes=10 ** 12)])
def test_a_monthly_quota_keeps_slices_short(limits):
    lease = Lease("T")
    _grant(lease, limits, 1, 1, NOW)
    lease.spent_requests, lease.spent_bytes = 1000, 10 ** 6
    want_requests, want_bytes = lease.wants(0, NOW + 0.1)  # 10,000/s and 10 MB/s
    if limits.monthly_records:
        assert want_requests <= 1 + 10_000 * SLICE_SECONDS * 2
        assert want_bytes >= 10 ** 7 * UNLIMITED_SLICE_SECONDS / 2
    else:
        assert want_requests >= 10_000 * UNLIMITED_SLICE_SECONDS / 2
        assert want_bytes <= 10 ** 7 * SLICE_SECONDS * 2


def test_a_key_not_confirmed_within_a_lease_and_an_expired_slice_admit_nothing():
    limits = TenantLimits(0, 0, 0, 0)
    lease = Lease("T")
    _grant(lease, limits, 10, 100, NOW)
    assert lease.try_spend("KEY", 1, NOW) is not None
    assert lease.try_spend("OTHER", 1, NOW) is None
    assert lease.try_spend("KEY", 1, NOW + LEASE_SECONDS) is None
    assert lease.try_spend("KEY", 100, NOW) is None  # more bytes than the slice holds


def test_bytes_charged_after_store_put_the_slice_in_debt_and_settle_as_a_charge():
    lease = Lease("T")
    _grant(lease, TenantLimits(10, 10, 100, 100), 2, 20, NOW)
    assert lease.try_spend("KEY", 0, NOW) is not None
    lease.charge(50)
    assert lease.try_spend("KEY", 0, NOW) is None  # in debt: the next request renews
    settled = lease.settlement()
    assert (settled.requests, settled.bytes, settled.quota_bytes) == (1, -30, -30)
    assert lease.settlement().empty
    lease.restore_debt(settled)  # the call that carried it failed: keep the debt only
    assert (lease.requests, lease.bytes, lease.quota_records, lease.quota_bytes) == (0, -30, 0, -30)


# -- N processes sharing one GCRA state ------------------------------------------------

events = st.lists(st.tuples(st.floats(min_value=0.0, max_value=0.05),  # gap to the next request
                            st.integers(min_value=0, max_value=3),      # which process
                            st.integers(min_value=1, max_value=40),     # slice it asks for
                            st.booleans()),                             # its slice expires first
                  min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=1.0, max_value=500.0), st.integers(min_value=1, max_value=50), events)
def test_processes_spending_leases_admit_at_most_gcra_plus_their_outstanding_slices(
        rate, burst, arrivals):
    cap = max(1, int(burst * SLICE_BURST_FRACTION))
    tat = 0.0
    held = [0] * 4  # units each process holds
    admitted: List[float] = []
    refused: List[Tuple[float, int]] = []
    now = NOW
    for gap, process, want, expire in arrivals:
        now += gap
        if expire and held[process]:
            tat = refund_tat(tat, rate, held[process], now)  # the slice goes back
            held[process] = 0
        if held[process] == 0:
            taken = lease_take(tat, rate, burst, 1, min(want, cap), now)
            if not taken.allowed:
                refused.append((now, process))
                continue
            tat = taken.tat
            held[process] = taken.granted
        held[process] -= 1
        admitted.append(now)
    # Every window [a, b]: GCRA's rate x (b - a) + burst, plus at most one
    # slice per process leased before the window and spent inside it.
    slack = 4 * cap
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            count = j - i + 1
            assert count <= rate * (admitted[j] - start) + burst + slack + EPSILON * rate
    # And from the start, when nothing was leased yet: no slack at all.
    if admitted:
        assert len(admitted) <= rate * (admitted[-1] - NOW) + burst + 1e-6 * rate + 1e-9
