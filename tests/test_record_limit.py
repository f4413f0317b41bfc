"""A Kinesis stream's own record limit (sinks/aws/record_limit.py, sinks/aws/describe.py).

The arithmetic without sockets (record, envelope, key and request caps), then
the sink following the stream's MaxRecordSizeInKiB over the in-memory
endpoint with Trio's autojump clock.  The real-server tests are in
tests/test_large_records.py.
"""

from __future__ import annotations

import json

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from sinks.aws.delivery import Delivery
from sinks.aws.limits import KIB, MIB
from sinks.aws.record_limit import (
    AUTO,
    REFRESH_INTERVAL,
    RecordLimitTooHigh,
    check_configured,
    is_size_error,
    service_request_bytes,
    stream_limits,
    stream_record_bytes,
)
from sinks.backoff import RetryPolicy
from sinks.base import body_room
from sinks.errors import SinkConfigError
from tests.support.kinesis import FakeStreams, memory_endpoint
from tests.support.sinks import SinkHarness, running_sink


def _summary(**fields) -> bytes:
    doc = {"StreamName": "logs", "StreamStatus": "ACTIVE"}
    doc.update(fields)
    return json.dumps({"StreamDescriptionSummary": doc}).encode()


# -- reading DescribeStreamSummary ------------------------------------------

@pytest.mark.parametrize("body, expected", [
    (_summary(), MIB),  # no field: an endpoint from before large records
    (_summary(MaxRecordSizeInKiB=1024), MIB),
    (_summary(MaxRecordSizeInKiB=2048), 2 * MIB),
    (_summary(MaxRecordSizeInKiB=10240), 10 * MIB),
    (_summary(MaxRecordSizeInKiB=512), None),  # outside 1024..10240: not believed
    (_summary(MaxRecordSizeInKiB=10241), None),
    (_summary(MaxRecordSizeInKiB="2048"), None),
    (_summary(MaxRecordSizeInKiB=True), None),
    (b'{"StreamDescriptionSummary": []}', None),
    (b"{}", None),
    (b"not json", None),
])
def test_stream_record_bytes_from_the_summary(body, expected):
    assert stream_record_bytes(body) == expected


# -- the limits the sink enforces -------------------------------------------

def test_request_limit_the_service_documents_for_the_stream():
    assert service_request_bytes(MIB) == 5 * MIB
    assert service_request_bytes(MIB + KIB) == 10 * MIB
    assert service_request_bytes(10 * MIB) == 10 * MIB


def test_auto_follows_the_stream_and_a_lower_setting_wins():
    assert stream_limits(2 * MIB, AUTO, 5 * MIB).record_bytes == 2 * MIB
    assert stream_limits(10 * MIB, AUTO, 5 * MIB).record_bytes == 10 * MIB
    assert stream_limits(10 * MIB, 3 * MIB, 5 * MIB).record_bytes == 3 * MIB
    # Lowered while running below the setting: the stream's wins.
    assert stream_limits(MIB, 3 * MIB, 5 * MIB).record_bytes == MIB


def test_requests_hold_one_largest_record_and_stay_within_the_service():
    # --batch-bytes below a record: a request still holds one record.
    assert stream_limits(2 * MIB, AUTO, 64 * KIB).request_bytes == 2 * MIB
    # A 10 MiB record fills a 10 MiB request on a large-record stream ...
    assert stream_limits(10 * MIB, AUTO, 5 * MIB).request_bytes == 10 * MIB
    # ... while a 1 MiB stream keeps the 5 MiB every endpoint takes.
    assert stream_limits(MIB, AUTO, 10 * MIB).request_bytes == 5 * MIB


def test_a_setting_above_the_stream_is_refused():
    check_configured(AUTO, MIB)
    check_configured(2 * MIB, 2 * MIB)
    with pytest.raises(RecordLimitTooHigh) as info:
        check_configured(4 * MIB, 2 * MIB)
    assert "MaxRecordSizeInKiB 2048" in str(info.value) and "update-max-record-size" in str(info.value)


@given(stream_kib=st.integers(1024, 10240), configured=st.one_of(st.just(AUTO), st.integers(KIB, 10 * MIB)),
       batch=st.integers(KIB, 10 * MIB))
def test_limits_stay_within_the_stream_and_the_service(stream_kib, configured, batch):
    stream = stream_kib * KIB
    limits = stream_limits(stream, configured, batch)
    assert limits.record_bytes <= stream
    assert configured == AUTO or limits.record_bytes <= configured
    assert limits.record_bytes <= limits.request_bytes <= service_request_bytes(stream)


@pytest.mark.parametrize("max_body, limit, envelope, key, room", [
    (MIB, None, 120, 0, MIB),  # no record limit: --max-body alone
    (10 * MIB, 2 * MIB, 120, 36, 2 * MIB - 120 - 36),  # envelope and key come off the record limit
    (64 * KIB, 2 * MIB, 120, 36, 64 * KIB),  # --max-body only lowers it
    (MIB, 100, 120, 36, 0),  # never negative
])
def test_body_room_takes_envelope_and_key_off_the_record_limit(max_body, limit, envelope, key, room):
    assert body_room(max_body, limit, envelope, key) == room


@pytest.mark.parametrize("code, message, size", [
    ("InvalidArgumentException",
     "Record data size 3145728 exceeds the stream's max record size of 2097152 bytes", True),
    ("ValidationException", "Member must have length less than or equal to 1048576", True),
    ("InvalidArgumentException", "bad explicit hash key", False),
    ("ProvisionedThroughputExceededException", "Rate exceeded: size", False),
])
def test_size_errors_are_recognised(code, message, size):
    assert is_size_error(code, message) is size


# -- batches: a large record after a full batch ------------------------------

def test_a_large_record_behind_a_full_batch_goes_within_the_linger():
    linger = 0.010
    delivery = Delivery(RetryPolicy(deadline=30.0), linger=linger, max_records=500,
                        max_bytes=5 * MIB, max_entries=100)
    for _ in range(5):
        delivery.add(object(), "k", None, MIB - 64, 0.0)
    large, _ = delivery.add(object(), "k", None, 3 * MIB, 0.001)
    assert delivery.send_at() == float("-inf")  # a full batch waits: now

    room = {"bytes": 0}

    def admit(entry) -> bool:
        if room["bytes"] + entry.size > 5 * MIB:
            return False
        room["bytes"] += entry.size
        return True

    sent, _ = delivery.take(admit)
    assert large not in sent and len(sent) == 5
    # The large record heads the queue: it goes at its own linger, not later.
    assert delivery.send_at() <= 0.001 + linger
    room["bytes"] = 0
    assert delivery.take(admit)[0] == [large]


# -- the sink following the stream ------------------------------------------

def _harness(fake, **options):
    options.setdefault("retry_deadline", 30.0)
    options.setdefault("max_record_bytes", AUTO)
    h = SinkHarness(memory_endpoint(fake), ring_bytes=8 * MIB, **options)
    events = []
    h.sink._log = lambda event, **fields: events.append((event, fields))
    return h, events


async def test_a_setting_above_the_stream_stops_the_start(autojump_clock):
    h, _ = _harness(FakeStreams(max_record_size_kib=2048), max_record_bytes=4 * MIB)
    with pytest.raises(BaseException) as info:
        async with running_sink(h):
            pass
    assert "--max-record-size" in str(_leaf(info.value, SinkConfigError))


def _leaf(exc, kind):
    if isinstance(exc, kind):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _leaf(inner, kind)
        if found is not None:
            return found
    return None


async def test_the_running_sink_reads_the_limit_again_every_interval(autojump_clock):
    fake = FakeStreams(max_record_size_kib=2048)
    h, events = _harness(fake)
    async with running_sink(h):
        assert h.sink.max_record_bytes == 2 * MIB and h.sink._request_bytes == 5 * MIB
        fake.max_record_size_kib = 6144  # UpdateMaxRecordSize
        await trio.sleep(REFRESH_INTERVAL + 1)
        assert h.sink.stream_max_record_bytes == 6 * MIB
        # The ring (8 MiB) holds two records of at most 4 MiB.
        assert h.sink.max_record_bytes == 4 * MIB and h.sink._request_bytes == 6 * MIB
        assert h.sink._delivery.max_bytes == 6 * MIB
        assert await h.put(b"x" * (3 * MIB)) == ("ok", {"shard_id": "shardId-000000000001",
                                                        "sequence_number": "%056d" % 1})
    assert events[0][0] == "record_limit_changed"
    assert events[0][1]["stream_max_record_bytes"] == 6 * MIB


async def test_a_size_error_reads_the_limit_again_at_once(autojump_clock):
    fake = FakeStreams(max_record_size_kib=2048)
    h, events = _harness(fake, linger=0.0)
    async with running_sink(h):
        fake.max_record_size_kib = 1024  # lowered behind the sink's back
        outcome, error = await h.put(b"x" * (MIB + KIB))
        assert outcome == "refused" and "InvalidArgumentException" in str(error)
        # The refusal stops only that record: the sink keeps taking others.
        assert h.sink.ready() == (True, "ok")
        await trio.sleep(1)  # far less than REFRESH_INTERVAL
        assert h.sink.max_record_bytes == MIB
        assert (await h.put(b"y" * 1000))[0] == "ok"
    assert [e for e, _ in events] == ["record_limit_changed"]
    assert h.logged == []  # no sink_not_ready
