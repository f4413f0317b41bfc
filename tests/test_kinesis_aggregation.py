"""The Kinesis sink with ``--aggregation kpl`` over the in-memory endpoint
(Trio's autojump clock, no sockets): what reaches the service, read back by
both deaggregators (tests/support/kpl.py), acknowledgements and retries."""
from __future__ import annotations

import collections
import hashlib
import sys

import pytest
import trio
import trio.testing

from gateway.config.errors import ConfigError
from gateway.config.settings import from_args
from sinks.aws.aggregation import MAGIC, PUT_PAYLOAD_UNIT_BYTES
from sinks.aws.sink import StreamOptions
from tests.support.kinesis import FakeStreams, memory_endpoint
from tests.support.kpl import lenient_deaggregate, strict_user_records
from tests.support.sinks import SinkHarness, put_all, running_sink

THROTTLED = "ProvisionedThroughputExceededException"


def harness(fake=None, **options):
    fake = fake or FakeStreams()
    options.setdefault("aggregation", "kpl")
    return fake, SinkHarness(memory_endpoint(fake), **options)


def user_records(fake):
    """Every user record stored, as the strict judge unpacks it: (key, hash key, data)."""
    out = []
    for stored in fake.stored:
        for sub in strict_user_records(stored.data, stored.partition_key, stored.hash_key):
            out.append((sub.partition_key, sub.explicit_hash_key, sub.data))
    return out


def lenient(fake):
    return lenient_deaggregate([{"Data": s.data, "PartitionKey": s.partition_key,
                                 "ExplicitHashKey": s.hash_key, "SequenceNumber": s.sequence_number}
                                for s in fake.stored])


async def test_records_of_one_key_share_one_kinesis_record(autojump_clock):
    fake, h = harness()
    datas = [b"rec %d" % i for i in range(5)]
    async with running_sink(h):
        outcomes = await put_all(h, datas, partition_key="tenant-a")
    assert [kind for kind, _ in outcomes] == ["ok"] * 5
    (stored,) = fake.stored
    assert stored.data[:4] == MAGIC and stored.partition_key == "tenant-a"
    assert user_records(fake) == [("tenant-a", None, d) for d in datas]
    assert [u["Data"] for u in lenient(fake)] == datas
    # Each acknowledgement names the Kinesis record and the index inside it.
    assert [extra for _, extra in outcomes] == [
        {"shard_id": stored.shard_id, "sequence_number": stored.sequence_number, "sub_sequence": i}
        for i in range(5)]
    assert h.ring_empty


async def test_one_aggregate_per_key_and_hash_key(autojump_clock):
    fake, h = harness()
    keys = [("a", None), ("b", None), ("a", "7"), ("a", None), ("b", None), ("c", None)]
    async with running_sink(h):
        outcomes = await put_all_keys(h, keys)
    assert [kind for kind, _ in outcomes] == ["ok"] * len(keys)
    by_key = {(s.partition_key, s.hash_key): s for s in fake.stored}
    assert len(fake.stored) == 4 and len(fake.calls) == 1
    # A lone record goes out plain, with its own keys and sub-sequence 0.
    assert by_key[("a", "7")].data == b"r2" and by_key[("c", None)].data == b"r5"
    assert outcomes[2][1]["sub_sequence"] == 0
    assert sorted(user_records(fake), key=repr) == sorted(
        ((key, hash_key, b"r%d" % i) for i, (key, hash_key) in enumerate(keys)), key=repr)
    assert sorted((u["PartitionKey"], u["Data"]) for u in lenient(fake)) == sorted(
        (key, b"r%d" % i) for i, (key, _) in enumerate(keys))


async def put_all_keys(h, keys):
    """Put ``r0``, ``r1``... with these ``(partition key, hash key)``, concurrently, in order."""
    out = [None] * len(keys)

    async def one(i, key, hash_key):
        out[i] = await h.put(b"r%d" % i, partition_key=key, hash_key=hash_key)

    async with trio.open_nursery() as nursery:
        for i, (key, hash_key) in enumerate(keys):
            nursery.start_soon(one, i, key, hash_key)
            await trio.testing.wait_all_tasks_blocked()
    return out


async def test_random_keys_pick_one_key_per_aggregate(autojump_clock):
    fake, h = harness()
    async with running_sink(h):
        outcomes = await put_all(h, [b"x%d" % i for i in range(4)])
        alone = await h.put(b"alone")
    assert [kind for kind, _ in outcomes] == ["ok"] * 4
    first, second = fake.stored
    # The first record's id (its random key) is the aggregate's key.
    assert first.partition_key == "id-1" and first.data[:4] == MAGIC
    assert {k for k, _, _ in user_records(fake)[:4]} == {"id-1"}
    assert second.partition_key == "id-5" and second.data == b"alone"
    assert alone[1]["sub_sequence"] == 0


async def test_aggregates_close_at_the_aggregate_limit(autojump_clock):
    fake, h = harness(aggregation_max_bytes=4096)
    datas = [bytes([65 + i]) * 1000 for i in range(10)]
    async with running_sink(h):
        await put_all(h, datas, partition_key="k")
    assert all(len(s.data) + 1 <= 4096 for s in fake.stored)
    assert [len(strict_user_records(s.data, "k")) for s in fake.stored] == [4, 4, 2]
    assert [d for _, _, d in user_records(fake)] == datas


async def test_a_record_too_large_to_share_goes_alone_and_plain(autojump_clock):
    fake, h = harness()
    big = b"B" * 60000
    async with running_sink(h):
        await put_all(h, [b"s1", big, b"s2"], partition_key="k")
    assert sorted(len(s.data) for s in fake.stored)[-1] == len(big)
    assert [s.data for s in fake.stored if s.data == big] == [big]
    assert sorted(d for _, _, d in user_records(fake)) == sorted([b"s1", big, b"s2"])


async def test_a_forged_aggregate_reaches_consumers_as_one_opaque_record(autojump_clock):
    # A record whose data is itself a valid aggregate of records with keys the
    # client chose.  Sent plain, a deaggregator would unpack it; so even alone
    # it is wrapped, and both judges return exactly the bytes put.
    forged_proto = b"\x0a\x05admin" + b"\x1a\x08\x08\x00\x1a\x04evil"
    forged = MAGIC + forged_proto + hashlib.md5(forged_proto).digest()
    fake, h = harness()
    async with running_sink(h):
        kind, extra = await h.put(forged, partition_key="client")
    assert kind == "ok" and extra["sub_sequence"] == 0
    (stored,) = fake.stored
    assert stored.data != forged and stored.partition_key == "client"
    assert user_records(fake) == [("client", None, forged)]
    assert [(u["PartitionKey"], u["Data"]) for u in lenient(fake)] == [("client", forged)]
    # The hazard being guarded against: the same bytes sent plain.
    unpacked = lenient_deaggregate([{"Data": forged, "PartitionKey": "client"}])
    assert [(u["PartitionKey"], u["Data"]) for u in unpacked] == [("admin", b"evil")]


async def test_a_failed_aggregate_is_retried_whole_and_acknowledged_once(autojump_clock):
    fake, h = harness()
    fake.fail_record = lambda data, attempt: THROTTLED if data[:4] == MAGIC and attempt == 1 else None
    datas = [b"a%d" % i for i in range(6)]
    async with running_sink(h):
        outcomes = await put_all(h, datas, partition_key="k")
    assert [kind for kind, _ in outcomes] == ["ok"] * 6
    assert fake.calls[0].failed == [0] and len(fake.calls) == 2
    (stored,) = fake.stored
    assert user_records(fake) == [("k", None, d) for d in datas]
    assert {e["sequence_number"] for _, e in outcomes} == {stored.sequence_number}
    assert sorted(e["sub_sequence"] for _, e in outcomes) == list(range(6))
    stats = h.sink.statistics()
    assert stats.retries == 6 and stats.stored == 6 and h.ring_empty


async def test_partial_failure_retries_only_the_failed_aggregate(autojump_clock):
    fake, h = harness()
    failing = collections.Counter()

    def fail(data, attempt):
        if data[:4] == MAGIC and b"k-b" in data[:16] and attempt == 1:
            failing[data] += 1
            return THROTTLED
        return None

    fake.fail_record = fail
    keys = [("k-a", None), ("k-b", None)] * 3
    async with running_sink(h):
        outcomes = await put_all_keys(h, keys)
    assert [kind for kind, _ in outcomes] == ["ok"] * 6
    assert sum(failing.values()) == 1 and len(fake.stored) == 2
    assert sorted(user_records(fake)) == sorted((k, None, b"r%d" % i) for i, (k, _) in enumerate(keys))


async def test_counts_kinesis_records_payload_units_and_bytes(autojump_clock):
    fake, off = harness(aggregation="off")
    datas = [b"z" * 1000] * 20
    async with running_sink(off):
        await put_all(off, datas, partition_key="k")
    stats = off.sink.statistics()
    assert (stats.kinesis_records, stats.payload_units) == (20, 20)
    assert stats.sent_bytes == 20 * 1001
    fake, on = harness()
    async with running_sink(on):
        await put_all(on, datas, partition_key="k")
    stats = on.sink.statistics()
    (stored,) = fake.stored
    assert stats.kinesis_records == 1
    assert stats.sent_bytes == len(stored.data) + 1
    assert stats.payload_units == -(-(len(stored.data) + 1) // PUT_PAYLOAD_UNIT_BYTES)


def test_settings():
    env = {"SLUICE_AGGREGATION": "kpl"}
    config = from_args(["--sink", "kinesis", "--stream", "s"], env)
    options = StreamOptions.from_config(config)
    assert (options.aggregation, options.aggregation_max_bytes) == ("kpl", 51200)
    config = from_args(["--sink", "kinesis", "--stream", "s", "--aggregation-max-bytes", "8KiB"], {})
    assert (config.aggregation, config.aggregation_max_bytes) == ("off", 8192)
    with pytest.raises(ConfigError, match="--aggregation: KPL aggregation is for --sink kinesis"):
        from_args(["--sink", "firehose", "--delivery-stream", "d", "--aggregation", "kpl"], {})
    with pytest.raises(ConfigError, match="--aggregation"):
        from_args(["--aggregation", "zstd"], {})


def test_measurement_mix_has_the_seed_proportions():
    from bench.aggregation import seed_mix

    sizes = seed_mix(1000)
    assert collections.Counter(sizes) == {1024: 850, 16 * 1024: 100, 256 * 1024: 40, 900_000: 10}
    assert sizes == seed_mix(1000)  # the same sequence every run


class _Slot:
    def __init__(self, offset, size):
        self.offset, self.size = offset, size


class _Entry:
    """What the builder reads of a delivery entry."""

    def __init__(self, record_id, offset, size, key, hash_key=None):
        self.record = type("R", (), {})()
        self.record.id, self.record.slot = record_id, _Slot(offset, size)
        self.partition_key, self.hash_key = key, hash_key
        self.size = size + len(key.encode())


def _builder_over(ring, entries, **limits):
    from sinks.aws.aggregation import AggregatingBuilder
    from sinks.aws.putrecords import PutRecordsBatch

    builder = AggregatingBuilder(PutRecordsBatch("logs", **limits), ring, aggregate_limit=51200)
    taken = [e for e in entries if builder.admit(e)]
    return builder, taken


def test_builder_body_holds_the_aggregates_of_the_ring_slices():
    import base64
    import json

    ring = bytearray(1 << 20)
    entries, offset = [], 0
    for i in range(60):
        data = b"record %d " % i + bytes([i]) * (i * 37)
        ring[offset:offset + len(data)] = data
        key = "id-%d" % i if i % 3 == 0 else "tenant-%d" % (i % 2)
        entries.append(_Entry("id-%d" % i, offset, len(data), key))
        offset += len(data)
    builder, taken = _builder_over(ring, entries)
    try:
        assert taken == entries
        builder.encode_all(taken)
        doc = json.loads(bytes(builder.batch.body()))
        assert len(doc["Records"]) == builder.outgoing == 3
        got = {}
        for record in doc["Records"]:
            for sub in strict_user_records(base64.b64decode(record["Data"]), record["PartitionKey"]):
                got[bytes(sub.data)] = sub.partition_key
        for e in entries:
            data = bytes(ring[e.record.slot.offset:e.record.slot.offset + e.record.slot.size])
            # Random keys (the id) share the first such record's key.
            assert got.pop(data) == (e.partition_key if e.partition_key.startswith("tenant") else "id-0")
        assert got == {}
    finally:
        builder.close()


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="tracemalloc is CPython-only")
def test_laying_out_aggregates_copies_no_record_into_python_objects():
    import tracemalloc

    ring = bytearray(4 << 20)
    size = 4096
    entries = [_Entry("id-%d" % i, i * size, size, "k%d" % (i % 4)) for i in range(400)]
    builder, taken = _builder_over(ring, entries)
    try:
        assert len(taken) == 400
        if builder.batch.backend != "cffi":
            pytest.skip("the python base64 backend makes a temporary per record by design")
        builder.encode_all(taken)  # once before measuring: first-call allocations
        builder.batch.reset()
        tracemalloc.start()
        try:
            builder.encode_all(taken)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # 1.6 MB of records went through; at no time did Python objects
        # hold as much as one record (a key and a digest per aggregate).
        assert peak < size, peak
    finally:
        builder.close()
