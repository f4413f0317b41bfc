"""The sinks' send queue and outcome bookkeeping (sinks/aws/delivery.py), with plain values and no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks.aws.delivery import (
    ABANDONED,
    BACKOFF,
    GIVEN_UP,
    QUEUED,
    SENDING,
    STORED,
    DeadlinePassed,
    Delivery,
    EntryStateError,
    QueueFull,
)
from sinks.aws.errors import PermanentError, ThrottledError, TransientError
from sinks.aws.putrecords import PutRecordsResult, RecordResult, RecordTooLarge
from sinks.backoff import RetryPolicy

OK = RecordResult(shard_id="shardId-0", sequence_number="1")


def delivery(deadline=10.0, **kw):
    options = dict(linger=0.01, max_records=3, max_bytes=1000, max_entries=100)
    options.update(kw)
    return Delivery(RetryPolicy(base=0.1, throttled_base=1.0, cap=5.0, deadline=deadline), **options)


def result(*outcomes):
    return PutRecordsResult(tuple(outcomes), sum(1 for o in outcomes if o.error is not None))


def failed(code="ProvisionedThroughputExceededException"):
    return RecordResult(error=ThrottledError(code))


def take_all(d):
    return d.take(lambda entry: True)


def test_linger_then_send():
    d = delivery()
    entry, wake = d.add("r1", "k", None, 10, now=100.0)
    assert wake and entry.state == QUEUED
    assert d.send_at() == pytest.approx(100.01)
    _, wake = d.add("r2", "k", None, 10, now=100.005)
    assert not wake  # the linger timer already runs
    assert d.send_at() == pytest.approx(100.01)  # the oldest record decides
    assert d.send_at(closing=True) == float("-inf")


def test_a_full_batch_goes_at_once_by_records_or_bytes():
    d = delivery()
    for i in range(2):
        assert d.add(i, "k", None, 10, now=0.0)[1] is (i == 0)
    assert d.add(2, "k", None, 10, now=0.0)[1] is True
    assert d.send_at() == float("-inf")
    d2 = delivery()
    d2.add(0, "k", None, 600, now=0.0)
    assert d2.add(1, "k", None, 400, now=0.0)[1] is True
    assert d2.send_at() == float("-inf")


def test_take_stops_when_the_batch_is_full_and_keeps_order():
    d = delivery()
    entries = [d.add(i, "k", None, 10, now=0.0)[0] for i in range(5)]
    sent, rejected = d.take(lambda entry: entry.record < 2)
    assert [e.record for e in sent] == [0, 1] and not rejected
    assert all(e.state == SENDING for e in sent) and entries[2].state == QUEUED
    assert [e.record for e in take_all(d)[0]] == [2, 3, 4]
    assert d.send_at() is None


@given(sizes=st.lists(st.integers(1, 400), max_size=40), room=st.integers(0, 3000),
       step=st.integers(1, 8), too_large=st.sets(st.integers(0, 39)))
def test_a_batch_taken_in_parts_is_the_batch_taken_at_once(sizes, room, step, too_large):
    def fill(limit):
        d = delivery(max_records=1000, max_bytes=10**6)
        for i, size in enumerate(sizes):
            d.add(i, "k", None, size, now=0.0)
        used = [0]

        def add(entry):
            if entry.record in too_large:
                raise RecordTooLarge(entry.size, room)
            if used[0] + entry.size > room:
                return False
            used[0] += entry.size
            return True

        sent, rejected = [], []
        while True:
            part, gone = d.take(add, limit)
            assert limit is None or len(part) <= limit
            sent += part
            rejected += gone
            if limit is None or len(part) < limit:
                return [e.record for e in sent], [e.record for e in rejected], d.held

    assert fill(step) == fill(None)


def test_a_record_no_batch_can_carry_is_given_up():
    d = delivery()
    d.add("big", "k", None, 10, now=0.0)
    d.add("ok", "k", None, 10, now=0.0)

    def add(entry):
        if entry.record == "big":
            raise RecordTooLarge(2000, 1000)
        return True

    sent, rejected = d.take(add)
    assert [e.record for e in sent] == ["ok"] and [e.record for e in rejected] == ["big"]
    assert rejected[0].state == GIVEN_UP and isinstance(rejected[0].error, RecordTooLarge)
    assert d.held == 1


def test_partial_failure_retries_only_the_failed_entries_in_their_order():
    d = delivery(max_records=10)
    for i in range(5):
        d.add(i, "k", None, 10, now=0.0)
    sent, _ = take_all(d)
    settled = d.settle(sent, result(OK, failed(), OK, failed(), OK), now=1.0, rand=0.5)
    assert [e.record for e in settled.stored] == [0, 2, 4]
    assert [e.record for e in settled.retried] == [1, 3]
    assert all(e.state == BACKOFF for e in settled.retried)
    # Throttled: the delay is rand * throttled_base (1 s) on the first retry.
    assert settled.resume_at == pytest.approx(1.5)
    d.add(5, "k", None, 10, now=1.2)  # arrives while they wait
    d.wake(1.4)
    assert d.send_at() == pytest.approx(1.21)  # nothing due yet: the new record lingers
    d.wake(1.5)
    assert [e.record for e in take_all(d)[0]] == [1, 3, 5]  # retries first, in order
    assert d.stored == 3 and d.retries == 2 and d.held == 3


def test_transient_call_failure_backs_off_with_the_plain_base():
    d = delivery()
    d.add("a", "k", None, 10, now=0.0)
    sent, _ = take_all(d)
    settled = d.fail(sent, TransientError("InternalFailure", status=500), now=1.0, rand=1.0)
    assert settled.retried == sent and settled.resume_at == pytest.approx(1.1)
    assert d.send_at() == pytest.approx(1.1)  # the backoff decides when to look again


def test_deadline_gives_up_instead_of_retrying_past_it():
    d = delivery(deadline=1.0)
    d.add("a", "k", None, 10, now=0.0)
    sent, _ = take_all(d)
    settled = d.fail(sent, ThrottledError("ThrottlingException", status=400), now=0.5, rand=1.0)
    assert [e.record for e in settled.given_up] == ["a"]
    entry = settled.given_up[0]
    assert entry.state == GIVEN_UP and isinstance(entry.error, DeadlinePassed)
    assert "ThrottlingException" in str(entry.error) and d.held == 0


def test_each_entry_keeps_its_own_deadline_and_backoff_across_retries():
    d = delivery(deadline=1.0)
    d.add("early", "k", None, 10, now=0.0)
    d.add("late", "k", None, 10, now=0.5)
    sent, _ = take_all(d)
    first = d.fail(sent, TransientError("InternalFailure", status=500), now=0.6, rand=1.0)
    assert [e.record for e in first.retried] == ["early", "late"]
    assert first.resume_at == pytest.approx(0.7)  # the first backoff: base 0.1
    d.wake(0.7)
    again, _ = take_all(d)
    assert [e.record for e in again] == ["early", "late"]
    # The second backoff doubles to 0.2: "early" would be retried at 1.1,
    # past its deadline (queued at 0.0); "late" was queued at 0.5.
    second = d.fail(again, TransientError("InternalFailure", status=500), now=0.9, rand=1.0)
    assert [e.record for e in second.given_up] == ["early"]
    assert [e.record for e in second.retried] == ["late"]
    assert second.resume_at == pytest.approx(1.1)
    assert d.expire(1.4) == [] and [e.record for e in d.expire(1.5)] == ["late"]


def test_expire_gives_up_queued_and_waiting_entries_past_their_deadline():
    d = delivery(deadline=1.0)
    d.add("waits", "k", None, 10, now=0.0)
    sent, _ = take_all(d)
    d.fail(sent, TransientError("InternalFailure", status=500), now=0.1, rand=0.0)
    d.add("queued", "k", None, 10, now=0.2)
    d.pause(5.0)
    assert d.expire(0.9) == [] and d.next_expiry() == pytest.approx(1.0)
    expired = d.expire(1.0)
    assert [e.record for e in expired] == ["waits"]
    assert [e.record for e in d.expire(1.2)] == ["queued"]
    assert d.held == 0 and d.send_at() is None and d.next_expiry() == float("inf")


def test_an_entry_in_a_call_waits_for_that_calls_outcome_even_past_its_deadline():
    d = delivery(deadline=1.0)
    d.add("a", "k", None, 10, now=0.0)
    sent, _ = take_all(d)
    assert d.expire(5.0) == []
    settled = d.settle(sent, result(OK), now=5.0, rand=0.0)
    assert settled.stored == sent and sent[0].state == STORED


def test_permanent_errors_give_up_and_are_reported():
    d = delivery()
    for i in range(3):
        d.add(i, "k", None, 10, now=0.0)
    sent, _ = take_all(d)
    d.add("later", "k", None, 10, now=0.0)
    error = PermanentError("ResourceNotFoundException", "no stream", 400)
    settled = d.fail(sent, error, now=0.0, rand=0.0)
    assert settled.permanent is error and len(settled.given_up) == 3
    rest = d.give_up_all(error)
    assert [e.record for e in rest] == ["later"] and rest[0].error is error
    assert d.held == 0 and d.send_at() is None


def test_abandoned_entries_are_skipped_wherever_they_are():
    d = delivery(max_records=10)
    queued, _ = d.add("queued", "k", None, 10, now=0.0)
    d.abandon(queued)
    assert queued.state == ABANDONED and d.send_at() is None
    d.add("a", "k", None, 10, now=0.0)
    d.add("b", "k", None, 10, now=0.0)
    sent, _ = take_all(d)
    d.abandon(sent[0])
    settled = d.settle(sent, result(failed(), OK), now=0.0, rand=0.0)
    assert settled.retried == [] and [e.record for e in settled.stored] == ["b"]
    assert d.held == 0 and d.abandoned == 2 and d.sending == 0


def test_queue_is_bounded():
    d = delivery(max_entries=2)
    d.add(1, "k", None, 1, now=0.0)
    d.add(2, "k", None, 1, now=0.0)
    with pytest.raises(QueueFull):
        d.add(3, "k", None, 1, now=0.0)


def test_transitions_outside_the_table_raise():
    d = delivery()
    entry, _ = d.add(1, "k", None, 1, now=0.0)
    sent, _ = take_all(d)
    d.settle(sent, result(OK), now=0.0, rand=0.0)
    with pytest.raises(EntryStateError):
        d.abandon(entry)


def test_mismatched_result_count_is_refused():
    d = delivery()
    d.add(1, "k", None, 1, now=0.0)
    sent, _ = take_all(d)
    with pytest.raises(ValueError):
        d.settle(sent, result(OK, OK), now=0.0, rand=0.0)


def test_retries_are_counted_by_reason_and_throttles_by_code():
    from sinks.aws.errors import MalformedResponse

    d = delivery(max_records=10)
    for i in range(4):
        d.add(i, "k", None, 1, now=0.0)
    sent, _ = take_all(d)
    internal = RecordResult(error=TransientError("InternalFailure"))
    d.settle(sent, result(failed(), failed("KMSThrottlingException"), internal, OK), now=0.0, rand=0.0)
    d.wake(10.0)
    sent, _ = take_all(d)
    d.fail(sent[:1], TransientError("ConnectionClosedError"), now=10.0, rand=0.0)
    d.fail(sent[1:2], TransientError("InternalFailure", status=500), now=10.0, rand=0.0)
    d.fail(sent[2:], MalformedResponse("MalformedResponse"), now=10.0, rand=0.0)
    stats = d.statistics()
    assert stats["retry_reasons"] == {"throttled": 2, "service_error": 2, "unreadable_answer": 1,
                                      "no_answer": 1}
    assert sum(stats["retry_reasons"].values()) == stats["retries"] == 6
    assert stats["throttles"] == {"ProvisionedThroughputExceededException": 1, "KMSThrottlingException": 1}


def test_throttle_codes_are_bounded():
    from sinks.aws.delivery import MAX_THROTTLE_CODES

    d = delivery(max_records=100, max_entries=1000)
    codes = ["Code%d" % i for i in range(MAX_THROTTLE_CODES * 2)]
    for code in codes:
        d.add(code, "k", None, 1, now=0.0)
    sent, _ = take_all(d)
    d.settle(sent, result(*(failed(code) for code in codes)), now=0.0, rand=0.0)
    throttles = d.statistics()["throttles"]
    assert len(throttles) == MAX_THROTTLE_CODES and sum(throttles.values()) == len(codes)
    assert throttles["other"] == len(codes) - (MAX_THROTTLE_CODES - 1)
