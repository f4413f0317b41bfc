"""Connection deadlines on the timer wheel (gateway/http/pacing.py)."""
from __future__ import annotations

import math

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.http.pacing import TICK, Deadline, Timeouts, TimerWheel


class Entry:
    __slots__ = ("at", "bucket", "name")

    def __init__(self, name: int) -> None:
        self.name = name
        self.at = math.inf
        self.bucket = None


def test_a_deadline_passes_within_one_tick_and_never_early():
    wheel = TimerWheel(0.1)
    entry = Entry(0)
    wheel.file(entry, 1.234)
    assert wheel.expired(1.234) == []
    assert 1.234 < wheel.next_due() <= 1.234 + 0.1
    assert wheel.expired(wheel.next_due()) == [entry]
    assert entry.bucket is None and wheel.live == 0 and wheel.next_due() == math.inf


def test_a_moved_deadline_passes_at_its_new_time_only():
    wheel = TimerWheel(0.1)
    entry = Entry(0)
    wheel.file(entry, 1.0)
    wheel.file(entry, 5.0)
    assert wheel.expired(2.0) == []  # its old bucket came due: a stale reference
    assert wheel.expired(5.1 + 1e-9) == [entry]
    wheel.file(entry, 7.0)
    wheel.file(entry, math.inf)  # no deadline any more
    assert wheel.expired(100.0) == [] and wheel.live == 0


def test_filing_says_when_the_wheel_must_wake_earlier():
    wheel = TimerWheel(0.1)
    assert wheel.file(Entry(0), 60.0)
    assert not wheel.file(Entry(1), 75.0)
    assert wheel.file(Entry(2), 10.0)
    assert not wheel.file(Entry(3), 10.01)  # the same bucket


def test_deadlines_moved_later_cost_nothing_until_their_bucket_comes_due():
    wheel = TimerWheel(0.1)
    entries = [Entry(i) for i in range(10)]
    for entry in entries:
        wheel.file(entry, 10.0)
    for step in range(1000):
        for entry in entries:
            wheel.file(entry, 60.0 + step * 0.01)  # each request moves it on
    assert wheel.references == 10
    assert wheel.expired(10.1 + 1e-9) == []  # looked at, and filed where they are due now
    assert wheel.references == 10
    assert sorted(e.name for e in wheel.expired(70.1)) == list(range(10))


def test_a_deadline_moved_earlier_leaves_only_a_stale_reference():
    wheel = TimerWheel(0.1)
    entry = Entry(0)
    wheel.file(entry, 75.0)
    assert wheel.file(entry, 10.0)  # earlier than every bucket: wake the task
    assert wheel.references == 2 and wheel.live == 1
    assert wheel.expired(10.1 + 1e-9) == [entry]
    assert wheel.expired(80.0) == [] and wheel.references == 0 and wheel.live == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.one_of(st.floats(0.0, 50.0), st.just(math.inf))),
                max_size=60),
       st.lists(st.floats(0.0, 60.0), max_size=8))
def test_every_deadline_passes_once_within_a_tick_of_its_time(moves, checks):
    wheel = TimerWheel(0.1)
    entries = [Entry(i) for i in range(8)]
    now = 0.0
    passed = {}
    for (index, at), check in zip(moves, checks + [None] * len(moves)):
        entry = entries[index]
        if entry.bucket is None and entry.at != math.inf:
            continue  # passed already: a connection is over once its deadline passes
        wheel.file(entry, max(at, now))
        if check is not None and check > now:
            now = check
            for gone in wheel.expired(now):
                assert gone.at <= now and gone.name not in passed
                passed[gone.name] = now
    for entry in entries:
        if entry.bucket is not None:
            assert wheel.next_due() <= entry.at + 0.1 + 1e-9
    rest = wheel.expired(math.inf)
    assert {e.name for e in rest}.isdisjoint(passed)
    assert wheel.live == 0


async def test_timeouts_cancel_a_connection_whose_deadline_passed(autojump_clock):
    timeouts = Timeouts()
    async with trio.open_nursery() as nursery:
        await nursery.start(timeouts.run)
        limit = Deadline(timeouts)
        start = trio.current_time()
        with limit.scope:
            limit.start(Deadline.IDLE, 2.0)
            await trio.sleep(1.5)
            limit.start(Deadline.BODY, 3.0)  # moved later while waiting
            await trio.sleep_forever()
        waited = trio.current_time() - start
        assert limit.scope.cancelled_caught and limit.phase == Deadline.BODY
        assert 4.5 < waited <= 4.5 + TICK + 1e-9
        assert timeouts.passed == 1
        # Closed connections leave nothing on the wheel.
        limit.close()
        assert timeouts.wheel.live == 0
        nursery.cancel_scope.cancel()


async def test_a_shorter_deadline_wakes_the_timeouts_task(autojump_clock):
    timeouts = Timeouts()
    async with trio.open_nursery() as nursery:
        await nursery.start(timeouts.run)
        idle = Deadline(timeouts)
        idle.start(Deadline.IDLE, 75.0)
        await trio.sleep(0.01)  # the task now sleeps until the 75 s bucket
        head = Deadline(timeouts)
        start = trio.current_time()
        with head.scope:
            head.start(Deadline.HEAD, 1.0)
            await trio.sleep_forever()
        assert trio.current_time() - start <= 1.0 + TICK + 1e-9
        assert not idle.scope.cancel_called
        nursery.cancel_scope.cancel()


async def test_without_the_timeouts_task_deadlines_use_the_scope(autojump_clock):
    limit = Deadline(Timeouts())  # not running
    with limit.scope:
        limit.start(Deadline.HEAD, 1.0)
        assert limit.scope.deadline == pytest.approx(trio.current_time() + 1.0)
        await trio.sleep_forever()
    assert limit.scope.cancelled_caught


async def test_a_slow_body_is_told_from_a_late_one(autojump_clock):
    timeouts = Timeouts()
    async with trio.open_nursery() as nursery:
        await nursery.start(timeouts.run)
        limit = Deadline(timeouts)
        limit.start(Deadline.BODY, 60.0)
        limit.pace(1000)
        assert limit.too_slow  # the pace's deadline comes before the body's
        limit.received(10**9)
        assert not limit.too_slow
        limit.close()
        nursery.cancel_scope.cancel()
