"""KPL aggregation (sinks/aws/aggregation.py): golden bytes, sizes, and round
trips through two independent deaggregators (tests/support/kpl.py)."""
from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.aws.aggregation import (
    MAGIC,
    MAX_OVERHEAD_BYTES,
    AggregateWriter,
    Plan,
    aggregate_bytes,
    payload_units,
    record_field_bytes,
    starts_with_magic,
    varint_bytes,
)
from sinks.aws.errors import ThrottledError
from sinks.aws.putrecords import RecordResult, RecordTooLarge
from tests.support.kpl import lenient_deaggregate, strict_parse


def write(key, hash_key, datas, capacity=1 << 20):
    """One aggregate of ``datas`` from one source buffer, as the sink does."""
    ring = bytearray(b"".join(datas))
    view = memoryview(ring)
    writer = AggregateWriter(capacity)
    try:
        writer.begin(key, hash_key)
        pos = 0
        for data in datas:
            writer.append(view, pos, pos + len(data))
            pos += len(data)
        return bytes(writer.view(writer.finish()))
    finally:
        writer.close()


def test_golden_bytes_two_records():
    proto = bytes.fromhex(
        "0a016b"            # partition_key_table: "k"
        "1a05" "0800" "1a0161"    # records[0]: pk index 0, data "a"
        "1a06" "0800" "1a026263"  # records[1]: pk index 0, data "bc"
    )
    expected = MAGIC + proto + hashlib.md5(proto).digest()
    assert write("k", None, [b"a", b"bc"]) == expected
    assert expected.hex() == (
        "f3899ac2" "0a016b" "1a0508001a0161" "1a0608001a026263" + hashlib.md5(proto).hexdigest())
    assert aggregate_bytes(1, None, [1, 2]) == len(expected)


def test_golden_bytes_with_explicit_hash_key_and_long_varints():
    data = b"x" * 200  # a two-byte length varint (c8 01)
    proto = (bytes.fromhex("0a02706b" "120131")  # tables: "pk", "1"
             + bytes.fromhex("1acf01" "0800" "1000" "1ac801") + data)
    assert write("pk", "1", [data]) == MAGIC + proto + hashlib.md5(proto).digest()
    assert aggregate_bytes(2, 1, [200]) == len(MAGIC) + len(proto) + 16


def test_non_ascii_key_counts_utf8_bytes():
    blob = write("clé", None, [b"z"])
    assert blob[4:10] == b"\x0a\x04cl\xc3\xa9"
    assert aggregate_bytes(4, None, [1]) == len(blob)
    assert strict_parse(blob)[0].partition_key == "clé"


def test_varints():
    assert [varint_bytes(n) for n in (0, 127, 128, 16383, 16384, 10 * 1024 * 1024)] == [1, 1, 2, 2, 3, 4]
    assert record_field_bytes(0, False) == 6  # 1a 04 08 00 1a 00
    assert record_field_bytes(0, True) == 8


def test_payload_units():
    assert [payload_units(n) for n in (1, 25 * 1024, 25 * 1024 + 1, 51200, 0)] == [1, 1, 2, 2, 1]


def test_magic_detection():
    assert starts_with_magic(memoryview(MAGIC + b"rest"))
    assert not starts_with_magic(memoryview(MAGIC[:3]))
    assert not starts_with_magic(memoryview(b'{"v":1}'))


def test_buffer_bound_is_checked():
    writer = AggregateWriter(64)
    try:
        writer.begin("k", None)
        with pytest.raises(ValueError):
            writer.append(memoryview(bytes(60)), 0, 60)
    finally:
        writer.close()


def test_both_judges_agree_on_a_round_trip():
    datas = [b"one", b"", b"three" * 1000, bytes(range(256))]
    blob = write("tenant-a", "12345", datas)
    assert [s.data for s in strict_parse(blob)] == datas
    assert {(s.partition_key, s.explicit_hash_key) for s in strict_parse(blob)} == {("tenant-a", "12345")}
    users = lenient_deaggregate([{"Data": blob, "PartitionKey": "tenant-a", "SequenceNumber": "7"}])
    assert [u["Data"] for u in users] == datas
    assert [u["SubSequenceNumber"] for u in users] == [0, 1, 2, 3]
    assert {u["PartitionKey"] for u in users} == {"tenant-a"}


def test_strict_judge_refuses_a_bad_digest_the_lenient_one_passes():
    blob = bytearray(write("k", None, [b"a", b"b"]))
    blob[-1] ^= 1
    with pytest.raises(AssertionError):
        strict_parse(bytes(blob))
    # aws-kinesis-agg hands the record back whole: a bad aggregate reads as one record.
    assert len(lenient_deaggregate([{"Data": bytes(blob), "PartitionKey": "k"}])) == 1


@settings(max_examples=150, deadline=None)
@given(key=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
       hash_key=st.one_of(st.none(), st.integers(0, 2**128 - 1).map(str)),
       datas=st.lists(st.one_of(st.binary(max_size=300), st.integers(0, 70000).map(lambda n: b"q" * n)),
                      min_size=1, max_size=12))
def test_round_trip_property(key, hash_key, datas):
    blob = write(key, hash_key, datas)
    key_bytes = len(key.encode("utf-8"))
    assert len(blob) == aggregate_bytes(key_bytes, None if hash_key is None else len(hash_key),
                                        [len(d) for d in datas])
    assert len(blob) - sum(len(d) for d in datas) <= len(datas) * 13 + MAX_OVERHEAD_BYTES
    subs = strict_parse(blob)
    assert [s.data for s in subs] == datas
    assert all(s.partition_key == key and s.explicit_hash_key == hash_key for s in subs)
    users = lenient_deaggregate([{"Data": blob, "PartitionKey": key}])
    assert [u["Data"] for u in users] == datas


# -- Plan ------------------------------------------------------------------


def plan(**limits):
    values = dict(max_records=500, max_bytes=5 << 20, record_limit=1 << 20, aggregate_limit=51200)
    values.update(limits)
    return Plan(**values)


def test_plan_groups_by_key_and_keeps_singletons_plain():
    p = plan()
    for i, key in enumerate(["a", "b", "a", "c", "a"]):
        assert p.add(i, key, key, 1, None, 100)
    assert [(a.key, a.members, a.wrapped) for a in p.aggregates] == [
        ("a", [0, 2, 4], True), ("b", [1], False), ("c", [3], False)]
    assert p.bytes == aggregate_bytes(1, None, [100] * 3) + 1 + 2 * 101
    assert p.user_records == 5 and len(p) == 3


def test_plan_closes_an_aggregate_at_its_limit():
    limit = aggregate_bytes(1, None, [1000] * 3) + 1
    p = plan(aggregate_limit=limit)
    for i in range(7):
        assert p.add(i, "g", "k", 1, None, 1000)
    assert [a.members for a in p.aggregates] == [[0, 1, 2], [3, 4, 5], [6]]
    assert all(a.size() <= limit for a in p.aggregates)


def test_plan_sends_a_record_too_large_to_share_alone():
    p = plan(aggregate_limit=2000)
    assert p.add(0, "g", "k", 1, None, 5000)
    assert p.add(1, "g", "k", 1, None, 10)
    assert p.add(2, "g", "k", 1, None, 10)
    assert [a.members for a in p.aggregates] == [[0], [1, 2]]
    assert not p.aggregates[0].wrapped


def test_plan_stops_at_the_request_limits():
    p = plan(max_records=2)
    assert p.add(0, "a", "a", 1, None, 10)
    assert p.add(1, "b", "b", 1, None, 10)
    assert p.add(2, "a", "a", 1, None, 10)  # joins a: no new Kinesis record
    assert not p.add(3, "c", "c", 1, None, 10)
    p = plan(max_bytes=300)
    assert p.add(0, "a", "a", 1, None, 100)
    assert p.add(1, "a", "a", 1, None, 100)
    assert not p.add(2, "a", "a", 1, None, 100)
    assert p.bytes <= 300


def test_plan_refuses_records_no_call_can_carry():
    with pytest.raises(RecordTooLarge):
        plan(record_limit=1000).add(0, "g", "k", 1, None, 1000)
    # A forged record alone is wrapped: the wrapping must fit the record limit too.
    limit = 1000
    with pytest.raises(RecordTooLarge):
        plan(record_limit=limit).add(0, "g", "k", 1, None, limit - 5, forged=True)


def test_plan_wraps_a_forged_record_even_alone():
    p = plan()
    assert p.add(0, "g", "k", 1, None, 10, forged=True)
    assert p.aggregates[0].wrapped
    assert p.bytes == aggregate_bytes(1, None, [10]) + 1


def test_results_map_back_in_add_order_and_fail_whole():
    p = plan()
    for i, key in enumerate(["a", "b", "a"]):
        p.add(i, key, key, 1, None, 10)
    throttled = ThrottledError("ProvisionedThroughputExceededException", "slow down")
    out = p.results([RecordResult(shard_id="s0", sequence_number="9"), RecordResult(error=throttled)])
    assert [(r.sequence_number, r.sub_sequence) for r in out[::2]] == [("9", 0), ("9", 1)]
    assert out[1].error is throttled and out[1].sub_sequence is None
    with pytest.raises(ValueError):
        p.results([RecordResult(shard_id="s0", sequence_number="9")])
    p.reset()
    assert len(p) == 0 and p.bytes == 0 and p.user_records == 0


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 60000)), min_size=1, max_size=60),
       aggregate_limit=st.integers(100, 60000), max_records=st.integers(1, 20))
def test_plan_property_limits_hold_and_every_record_has_one_place(sizes, aggregate_limit, max_records):
    p = plan(max_records=max_records, max_bytes=400000, aggregate_limit=aggregate_limit)
    taken = 0
    for i, (key, size) in enumerate(sizes):
        if not p.add(i, key, "key%d" % key, 4, None, size):
            break
        taken += 1
    assert len(p) <= max_records and p.bytes <= 400000
    assert sum(a.size() for a in p.aggregates) == p.bytes
    members = [m for a in p.aggregates for m in a.members]
    assert sorted(members) == list(range(taken))
    for a in p.aggregates:
        assert len({sizes[m][0] for m in a.members}) == 1
        if len(a.members) > 1:
            assert a.size() <= aggregate_limit
        if a.wrapped:
            assert a.size() == 4 + aggregate_bytes(4, None, [sizes[m][1] for m in a.members])
    rng = random.Random(taken)
    outcomes = [RecordResult(shard_id="s", sequence_number=str(rng.random())) for _ in p.aggregates]
    results = p.results(outcomes)
    for a, outcome in zip(p.aggregates, outcomes):
        for sub, m in enumerate(a.members):
            assert results[m].sequence_number == outcome.sequence_number
            assert results[m].sub_sequence == sub
