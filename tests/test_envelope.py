"""Record ids and the envelope line, on plain bytes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.envelope import MAX_ENVELOPE_BYTES, MAX_FIELD_BYTES, RecordIds, envelope, split_record

CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
NOW = 1_732_600_000_000


def _decode(text: str) -> int:
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    value = 0
    for char in text:
        value = value * 32 + alphabet.index(char)
    return value


# -- record ids ----------------------------------------------------------------

def test_ids_are_26_chars_of_crockford_base32():
    ids = RecordIds()
    for now in (0, 1, NOW, 2**48 - 1):
        record_id = ids.next(now)
        assert len(record_id) == 26
        assert set(record_id) <= CROCKFORD


def test_id_starts_with_the_milliseconds():
    record_id = RecordIds(seed=0).next(NOW)
    assert _decode(record_id[:10]) == NOW


def test_ids_are_unique_and_sorted_within_one_millisecond():
    ids = RecordIds()
    made = [ids.next(NOW) for _ in range(5000)]
    assert len(set(made)) == len(made)
    assert made == sorted(made)


@settings(max_examples=100, deadline=None)
@given(times=st.lists(st.integers(0, 2**48 - 1), min_size=2, max_size=30))
def test_ids_sort_by_time(times):
    ids = RecordIds()
    times.sort()
    made = [ids.next(now) for now in times]
    assert made == sorted(made)
    assert len(set(made)) == len(made)


def test_ids_stay_monotonic_when_the_clock_steps_back():
    ids = RecordIds(seed=3)
    made = [ids.next(now) for now in (NOW, NOW + 5, NOW - 60_000, NOW - 60_000, NOW + 1, NOW + 10)]
    assert made == sorted(made) and len(set(made)) == len(made)


def test_ids_of_two_processes_differ():
    a, b = RecordIds(seed=1), RecordIds(seed=2)
    assert a.next(NOW) != b.next(NOW)
    # Same time part, different process part.
    assert a.next(NOW)[:10] == b.next(NOW)[:10]


def test_counter_keeps_ids_unique_across_milliseconds():
    ids = RecordIds(seed=7)
    made = {ids.next(NOW + i % 3) for i in range(300)}
    assert len(made) == 300


# -- the envelope line -----------------------------------------------------------

def test_envelope_layout():
    line = envelope("01JDZZZZZZZZZZZZZZZZZZZZZZ", None, NOW, b"application/json", None)
    assert line == (
        b'{"v":1,"id":"01JDZZZZZZZZZZZZZZZZZZZZZZ","tenant":null,"received_at":1732600000000,'
        b'"content_type":"application/json","content_encoding":null}\n'
    )
    assert json.loads(line) == {
        "v": 1, "id": "01JDZZZZZZZZZZZZZZZZZZZZZZ", "tenant": None, "received_at": NOW,
        "content_type": "application/json", "content_encoding": None,
    }


@pytest.mark.parametrize("value", [
    b'text/plain; charset="utf-8"',
    b"a\\b",
    b'\\"',
    b"\x00\x01\x1f\x7f",
    b"\t tab",
    b"caf\xe9 \xff\x80",
    b"line\nbreak\r",
    b"</script>",
    b"",
])
def test_odd_header_bytes_are_escaped(value):
    line = envelope("0" * 26, value, NOW, value, value)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert all(byte < 0x80 for byte in line)  # plain ASCII on the wire
    doc = json.loads(line)
    text = value.decode("latin-1")
    assert doc["tenant"] == doc["content_type"] == doc["content_encoding"] == text


@settings(max_examples=200, deadline=None)
@given(
    content_type=st.one_of(st.none(), st.binary(max_size=MAX_FIELD_BYTES)),
    content_encoding=st.one_of(st.none(), st.binary(max_size=MAX_FIELD_BYTES)),
    tenant=st.one_of(st.none(), st.binary(max_size=MAX_FIELD_BYTES)),
    received_at=st.integers(0, 2**48 - 1),
)
def test_envelope_round_trips_any_header_bytes(content_type, content_encoding, tenant, received_at):
    record_id = RecordIds().next(received_at)
    line = envelope(record_id, tenant, received_at, content_type, content_encoding)
    assert line.index(b"\n") == len(line) - 1
    assert len(line) <= MAX_ENVELOPE_BYTES
    doc = json.loads(line)

    def expected(value):
        return None if value is None else value.decode("latin-1")

    assert doc == {
        "v": 1, "id": record_id, "tenant": expected(tenant), "received_at": received_at,
        "content_type": expected(content_type), "content_encoding": expected(content_encoding),
    }


def test_worst_case_envelope_fits_the_bound():
    worst = b"\x01" * MAX_FIELD_BYTES
    line = envelope("Z" * 26, worst, 2**48 - 1, worst, worst)
    assert len(line) <= MAX_ENVELOPE_BYTES


# -- split_record -------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=2000), content_type=st.one_of(st.none(), st.binary(max_size=64)))
def test_split_record_gives_back_envelope_and_body(body, content_type):
    line = envelope("0" * 26, None, NOW, content_type, None)
    record = bytearray(line + body)
    meta, view = split_record(memoryview(record))
    assert meta["content_type"] == (None if content_type is None else content_type.decode("latin-1"))
    assert bytes(view) == body
    assert isinstance(view, memoryview) and view.obj is record  # the body is not copied


def test_split_record_body_may_contain_newlines():
    line = envelope("0" * 26, None, NOW, None, None)
    meta, view = split_record(line + b"\n\n{}\n")
    assert meta["id"] == "0" * 26 and bytes(view) == b"\n\n{}\n"


def test_split_record_without_an_envelope_line():
    with pytest.raises(ValueError):
        split_record(b'{"v":1}')
    with pytest.raises(ValueError):
        split_record(b"x" * (MAX_ENVELOPE_BYTES + 10) + b"\n")
