from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.backoff import (
    EQUAL_JITTER,
    FULL_JITTER,
    GIVE_UP_ATTEMPTS,
    GIVE_UP_DEADLINE,
    NO_JITTER,
    RETRY_AFTER_MAX_EXTRA,
    GiveUp,
    Retry,
    RetryPolicy,
)


def test_full_jitter_bounds_double_until_the_cap():
    policy = RetryPolicy(base=0.1, cap=1.0, deadline=1e9).start(0.0)
    ceilings = []
    for _ in range(7):
        ceilings.append(policy.ceiling())
        top = policy.decide(0.0, 1.0)
        assert isinstance(top, Retry) and top.delay == ceilings[-1]
        assert policy.decide(0.0, 0.0).delay == 0.0
        policy = top.policy
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_throttled_uses_its_own_base():
    policy = RetryPolicy(base=0.05, throttled_base=1.0, cap=20.0).start(0.0)
    assert policy.decide(0.0, 0.5, throttled=True).delay == 0.5
    assert policy.decide(0.0, 0.5).delay == 0.025


def test_decide_returns_new_values_and_leaves_the_policy_alone():
    policy = RetryPolicy().start(10.0)
    decision = policy.decide(11.0, 0.5)
    assert isinstance(decision, Retry)
    assert policy.attempts == 0 and decision.policy.attempts == 1
    assert decision.at == 11.0 + decision.delay
    assert decision.policy.started == 10.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.attempts = 3  # type: ignore[misc]


def test_start_resets_state():
    used = RetryPolicy().start(0.0).decide(0.0, 0.5).policy
    fresh = used.start(100.0)
    assert fresh.attempts == 0 and fresh.started == 100.0 and fresh.deadline_at == 130.0


def test_deadline_gives_up_when_the_retry_would_start_late():
    policy = RetryPolicy(base=1.0, cap=1.0, deadline=10.0).start(0.0)
    assert isinstance(policy.decide(9.0, 1.0), Retry)  # starts at exactly 10.0
    late = policy.decide(9.5, 1.0)
    assert late == GiveUp(GIVE_UP_DEADLINE, 1, 9.5)
    assert isinstance(policy.decide(9.5, 0.1), Retry)


def test_max_attempts_counts_the_first_attempt():
    policy = RetryPolicy(max_attempts=3).start(0.0)
    first = policy.decide(0.0, 0.0)
    second = first.policy.decide(0.0, 0.0)
    third = second.policy.decide(0.0, 0.0)
    assert isinstance(first, Retry) and isinstance(second, Retry)
    assert third == GiveUp(GIVE_UP_ATTEMPTS, 3, 0.0)


def test_random_source_is_an_argument():
    policy = RetryPolicy(base=1.0, cap=100.0, deadline=1e6).start(0.0)
    seeded = random.Random(7)
    expected = random.Random(7)
    for _ in range(5):
        decision = policy.decide(0.0, seeded)
        assert decision.delay == expected.random() * policy.ceiling()
        policy = decision.policy


@pytest.mark.parametrize("value", [-0.01, 1.01, float("nan")])
def test_random_value_must_be_a_unit_fraction(value):
    with pytest.raises(ValueError):
        RetryPolicy().start(0.0).decide(0.0, value)


def test_retry_after_hint_raises_the_delay_within_a_bound():
    policy = RetryPolicy(base=1.0, cap=1.0, deadline=60.0).start(0.0)
    assert policy.decide(0.0, 0.5, retry_after=2.0).delay == 2.0
    assert policy.decide(0.0, 0.5, retry_after=30.0).delay == 0.5 + RETRY_AFTER_MAX_EXTRA
    assert policy.decide(0.0, 0.5, retry_after=0.1).delay == 0.5


def test_decide_before_start_is_a_bug():
    with pytest.raises(ValueError):
        RetryPolicy().decide(0.0, 0.5)


def test_many_attempts_do_not_overflow():
    policy = dataclasses.replace(RetryPolicy(deadline=1e9).start(0.0), attempts=100_000)
    assert policy.ceiling() == policy.cap
    assert policy.decide(0.0, 1.0).delay == policy.cap


@pytest.mark.parametrize("kwargs", [
    {"base": 0}, {"throttled_base": -1}, {"cap": 0}, {"deadline": 0}, {"max_attempts": 0},
    {"attempts": -1},
])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(0.001, 2.0), cap=st.floats(0.001, 30.0), deadline=st.floats(0.1, 120.0),
    max_attempts=st.one_of(st.none(), st.integers(1, 12)),
    steps=st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 5.0), st.booleans()),
                   max_size=40),
)
def test_schedules_respect_every_bound(base, cap, deadline, max_attempts, steps):
    start = 1000.0
    policy = RetryPolicy(base=base, throttled_base=base * 4, cap=cap, deadline=deadline,
                         max_attempts=max_attempts).start(start)
    now = start
    for u, work, throttled in steps:
        now += work  # the attempt itself took this long
        decision = policy.decide(now, u, throttled=throttled)
        if isinstance(decision, GiveUp):
            assert decision.attempts == policy.attempts + 1
            assert (decision.reason == GIVE_UP_ATTEMPTS) == (
                max_attempts is not None and decision.attempts >= max_attempts)
            break
        assert 0.0 <= decision.delay <= min(cap, policy.ceiling(throttled=throttled))
        assert decision.at <= policy.deadline_at
        assert decision.policy.attempts == policy.attempts + 1
        assert (decision.policy.base, decision.policy.cap, decision.policy.started) == (
            base, cap, start)
        if max_attempts is not None:
            assert decision.policy.attempts < max_attempts
        policy = decision.policy
        now = decision.at


def test_without_deadline_or_attempt_limit_it_retries_for_ever():
    policy = RetryPolicy(base=1.0, cap=4.0, deadline=None).start(0.0)
    assert policy.deadline_at is None
    for _ in range(100):
        decision = policy.decide(1e9, 1.0)
        assert isinstance(decision, Retry)
        policy = decision.policy
    assert decision.delay == 4.0


@pytest.mark.parametrize("jitter, u, share", [
    (FULL_JITTER, 0.0, 0.0), (FULL_JITTER, 0.25, 0.25), (EQUAL_JITTER, 0.0, 0.5),
    (EQUAL_JITTER, 1.0, 1.0), (NO_JITTER, 0.0, 1.0), (NO_JITTER, 0.7, 1.0),
])
def test_jitter_is_the_random_share_of_the_delay(jitter, u, share):
    policy = RetryPolicy(base=2.0, cap=8.0, jitter=jitter).start(0.0)
    assert policy.decide(0.0, u).delay == 2.0 * share
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.5)


def test_ceiling_after_a_count_kept_by_the_caller():
    policy = RetryPolicy(base=0.5, cap=30.0, deadline=None, jitter=NO_JITTER)
    assert [policy.ceiling(failed=n) for n in (1, 2, 3, 7, 8, 100)] == [0.5, 1.0, 2.0, 30.0, 30.0, 30.0]
