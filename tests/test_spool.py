"""The spool's sans-I/O core: frames, torn tails, confirmations and bookkeeping, with plain bytes."""

from __future__ import annotations

import zlib
from typing import Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sinks.spool.layout import (
    ACK_ENTRY,
    CONFIRMED,
    FRAME,
    SHIPPING,
    SPOOL_MAGIC,
    RecordStateError,
    SpoolError,
    SpoolState,
    ack_entries,
    encode_keys,
    frame_bytes,
    pack_header,
    parse_acks,
    record_id_of,
    scan_segment,
    segment_bytes_for,
    summarize_segment,
)


def record(n: int, body: bytes = b"body", received_at: int = 1795680518430) -> bytes:
    """A record as the gateway lays it out: envelope line, newline, body."""
    rid = "01M8BECG8YTGDXTWT5%08d" % n
    return (b'{"v":1,"id":"%s","tenant":null,"received_at":%d,"content_type":null,'
            b'"content_encoding":null}\n' % (rid.encode(), received_at)) + body


def frame(data: bytes, pk: Optional[str] = None, hk: Optional[str] = None) -> bytes:
    keys, pk_len, hk_len = encode_keys(pk, hk, record_id_of(data))
    header = bytearray(FRAME.size)
    pack_header(header, 0, keys, pk_len, hk_len, data)
    return bytes(header) + keys + data


def segment(*frames: bytes) -> bytes:
    return SPOOL_MAGIC + b"".join(frames)


def read_frame(data: bytes, found) -> Tuple[bytes, bytes, bytes]:
    """``(partition key, hash key, record)`` of a scanned frame."""
    start = found.offset + FRAME.size
    pk = data[start:start + found.pk_len]
    hk = data[start + found.pk_len:start + found.pk_len + found.hk_len]
    rec = data[start + found.pk_len + found.hk_len:start + found.length]
    return pk, hk, rec


# -- frames ----------------------------------------------------------------------


def test_frames_read_back_with_their_keys():
    datas = [record(1), record(2, b"\x00" * 100), record(3, b"")]
    data = segment(frame(datas[0]), frame(datas[1], pk="tenant-a", hk="12345"), frame(datas[2], hk="7"))
    scan = scan_segment(data)
    assert scan.dropped == 0 and scan.end == len(data)
    assert [read_frame(data, f) for f in scan.frames] == [
        (b"", b"", datas[0]), (b"tenant-a", b"12345", datas[1]), (b"", b"7", datas[2])]
    assert scan.frames[0].offset == len(SPOOL_MAGIC)


def test_a_partition_key_equal_to_the_record_id_is_not_stored():
    data = record(9)
    assert encode_keys(record_id_of(data), None, record_id_of(data)) == (b"", 0, 0)
    assert encode_keys(None, None, "x") == (b"", 0, 0)
    assert encode_keys("k\u00e9y", "42", "x") == ("k\u00e9y".encode() + b"42", 4, 2)


def test_record_id_is_read_from_the_envelope():
    assert record_id_of(record(5)) == "01M8BECG8YTGDXTWT500000005"
    # An envelope laid out differently falls back to parsing the line.
    other = b'{"id":"01M8BECG8YTGDXTWT500000006","v":1}\nbody'
    assert record_id_of(other) == "01M8BECG8YTGDXTWT500000006"


def test_crc_covers_keys_and_record():
    data = record(1)
    raw = bytearray(frame(data, pk="p"))
    assert FRAME.unpack_from(raw, 0)[1] == zlib.crc32(b"p" + data)
    raw[FRAME.size] ^= 1  # flip a bit of the key
    assert scan_segment(segment(bytes(raw))).frames == []


def test_every_truncation_keeps_exactly_the_whole_frames():
    frames = [frame(record(i, b"x" * (i * 7)), pk="k%d" % i if i % 2 else None) for i in range(6)]
    data = segment(*frames)
    ends = []
    pos = len(SPOOL_MAGIC)
    for f in frames:
        pos += len(f)
        ends.append(pos)
    for cut in range(len(SPOOL_MAGIC), len(data) + 1):
        scan = scan_segment(data[:cut])
        whole = [end for end in ends if end <= cut]
        assert len(scan.frames) == len(whole)
        assert scan.end == (whole[-1] if whole else len(SPOOL_MAGIC))
        assert scan.dropped == cut - scan.end


def test_a_magic_cut_short_is_an_empty_segment_and_a_foreign_file_is_refused():
    for cut in range(len(SPOOL_MAGIC)):
        assert scan_segment(SPOOL_MAGIC[:cut]) == (([], cut, 0))
    with pytest.raises(SpoolError):
        scan_segment(b"SLUICESEG1\n" + b"\0" * 40)
    with pytest.raises(SpoolError):
        scan_segment(b"hello")


@pytest.mark.parametrize("tail", [b"\0" * 64, b"\0" * 5, b"\xff" * 30, FRAME.pack(10, 0, 0, 0) + b"x" * 10])
def test_garbage_after_the_last_frame_is_dropped(tail):
    data = segment(frame(record(1)), frame(record(2)))
    scan = scan_segment(data + tail)
    assert len(scan.frames) == 2 and scan.end == len(data) and scan.dropped == len(tail)


def test_a_damaged_frame_ends_the_segment_there():
    first, second, third = frame(record(1)), frame(record(2)), frame(record(3))
    data = bytearray(segment(first, second, third))
    data[len(SPOOL_MAGIC) + len(first) + FRAME.size + 3] ^= 0x40
    scan = scan_segment(bytes(data))
    assert len(scan.frames) == 1
    assert scan.dropped == len(second) + len(third)


@given(st.lists(st.tuples(st.binary(max_size=300), st.one_of(st.none(), st.text(min_size=1, max_size=20)),
                          st.one_of(st.none(), st.from_regex(r"[1-9][0-9]{0,38}", fullmatch=True))),
                max_size=12),
       st.binary(max_size=40))
def test_frames_survive_any_content_and_any_tail(items, tail):
    datas = [record(i, body) for i, (body, _, _) in enumerate(items)]
    frames = [frame(data, pk, hk) for data, (_, pk, hk) in zip(datas, items)]
    data = segment(*frames)
    scan = scan_segment(data + tail)
    # A tail may by chance hold a whole valid frame only if it was built as one.
    assert len(scan.frames) >= len(frames)
    for found, data_, (_, pk, hk) in zip(scan.frames, datas, items):
        got_pk, got_hk, got = read_frame(data, found)
        assert got == data_
        assert got_pk == (pk.encode() if pk else b"")
        assert got_hk == (hk.encode() if hk else b"")


# -- confirmations ---------------------------------------------------------------


def test_ack_entries_round_trip_and_a_torn_entry_is_ignored():
    data = ack_entries([13, 500, 70000])
    assert len(data) == 3 * ACK_ENTRY.size
    assert parse_acks(data) == {13, 500, 70000}
    for cut in range(len(data)):
        assert parse_acks(data[:cut]) == set([13, 500, 70000][:cut // ACK_ENTRY.size])


def test_zeroed_or_damaged_ack_entries_name_nothing():
    assert parse_acks(b"\0" * 64) == set()
    damaged = bytearray(ack_entries([13, 99]))
    damaged[1] ^= 1
    assert parse_acks(bytes(damaged)) == {99}


@given(st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=50), st.binary(max_size=7))
def test_ack_entries_any_offsets(offsets, tail):
    assert parse_acks(ack_entries(offsets) + tail) == set(offsets)


def test_summary_counts_pending_records_and_the_oldest():
    datas = [record(1, received_at=1000), record(2, received_at=2000), record(3, received_at=3000)]
    data = segment(*(frame(d) for d in datas)) + b"\0" * 5
    offsets = [f.offset for f in scan_segment(data).frames]
    summary = summarize_segment(data, {offsets[0]})
    assert summary == (3, 2, len(datas[1]) + len(datas[2]), 2000, 5)
    assert summarize_segment(data, set(offsets)).pending == 0


# -- bookkeeping -----------------------------------------------------------------


def frames_of(*sizes: int) -> List[Tuple[int, int, int]]:
    return [(size, 0, 0) for size in sizes]


def test_segment_size_follows_the_limit():
    assert segment_bytes_for(1 << 30) == 64 << 20
    assert segment_bytes_for(1 << 20) == 64 << 10
    assert segment_bytes_for(64 << 20) == 4 << 20


def test_reservations_stop_at_the_limit_and_come_back():
    state = SpoolState(1000)
    assert state.reserve(600)
    assert not state.reserve(401)
    assert state.reserve(400)
    state.unreserve(400)
    state.unreserve(600)
    assert state.reserved == 0
    with pytest.raises(ValueError):
        state.unreserve(1)


def test_appended_frames_are_shipped_in_order_confirmed_and_deleted():
    state = SpoolState(10000, segment_bytes=300)
    state.open_segment(len(SPOOL_MAGIC))
    sizes = [100, 100, 100]
    assert state.reserve(sum(frame_bytes(s, 0) for s in sizes))
    assert state.appended(frames_of(*sizes)) == (0, 3)
    # Past segment_bytes: sealed, the next group opens a new segment.
    assert state.current is None and state.rotation_due()
    assert state.used == len(SPOOL_MAGIC) + 3 * (FRAME.size + 100)
    assert state.pending_records == 3 and state.pending_bytes == 300
    taken = state.take(10, 10**6)
    assert [index for _, index in taken] == [0, 1, 2]
    assert all(seg.states[i] == SHIPPING for seg, i in taken)
    assert not state.ready_to_ship()
    assert state.confirm(taken[1]) is False
    state.retry(taken[0])
    assert state.confirm(taken[2]) is False
    # The retried record goes first.
    again = state.take(10, 10**6)
    assert [index for _, index in again] == [0]
    assert state.confirm(again[0]) is True
    (segment_,) = state.finished()
    acks = state.take_acks()
    assert [(s.sequence, offsets) for s, offsets in acks] == [
        (0, [len(SPOOL_MAGIC) + FRAME.size + 100, len(SPOOL_MAGIC) + 2 * (FRAME.size + 100),
             len(SPOOL_MAGIC)])]
    state.deleted(segment_)
    assert state.used == 0 and state.pending_records == 0 and state.segments == {}


def test_take_respects_records_and_bytes_but_always_takes_one():
    state = SpoolState(10**6)
    state.open_segment(len(SPOOL_MAGIC))
    state.reserve(sum(frame_bytes(s, 0) for s in (500, 500, 500)))
    state.appended(frames_of(500, 500, 500))
    assert len(state.take(1, 10**6)) == 1
    assert len(state.take(10, 100)) == 1  # over the byte budget, but one is always taken
    assert len(state.take(10, 10**6)) == 1


def test_moves_outside_the_table_are_refused():
    state = SpoolState(10**6)
    state.open_segment(len(SPOOL_MAGIC))
    state.reserve(frame_bytes(100, 0))
    state.appended(frames_of(100))
    (position,) = state.take(1, 10**6)
    state.confirm(position)
    with pytest.raises(RecordStateError):
        state.confirm(position)
    with pytest.raises(RecordStateError):
        state.retry(position)


def test_an_open_segment_is_never_deletable():
    state = SpoolState(10**6)
    state.open_segment(len(SPOOL_MAGIC))
    state.reserve(frame_bytes(100, 0))
    state.appended(frames_of(100))
    (position,) = state.take(1, 10**6)
    assert state.confirm(position) is False
    assert state.finished() == []
    state.seal()
    assert len(state.finished()) == 1


def test_recovery_ships_only_unconfirmed_records():
    datas = [record(i) for i in range(5)]
    data = segment(*(frame(d) for d in datas)) + b"\x01\x02"
    scan = scan_segment(data)
    offsets = [f.offset for f in scan.frames]
    state = SpoolState(10**6)
    recovered = state.recover(4, len(data), scan, {offsets[0], offsets[3], 12345})
    assert recovered.sealed and recovered.dropped == 2
    assert state.next_sequence == 5 and state.used == len(data)
    assert state.pending_records == 3
    assert [i for _, i in state.take(10, 10**6)] == [1, 2, 4]
    with pytest.raises(ValueError):
        state.recover(3, 0, scan_segment(b""), set())


def test_a_fully_confirmed_segment_found_at_start_is_deletable_at_once():
    data = segment(frame(record(1)))
    scan = scan_segment(data)
    state = SpoolState(10**6)
    state.recover(0, len(data), scan, {scan.frames[0].offset})
    state.recover(1, 5, scan_segment(SPOOL_MAGIC[:5]), set())
    assert [s.sequence for s in state.finished()] == [0, 1]
    assert not state.ready_to_ship()


# -- a model: writes, shipping, confirmations and crashes ------------------------


class Disk:
    """Segment and ``.acked`` bytes, as the driver would leave them."""

    def __init__(self) -> None:
        self.segments: Dict[int, bytearray] = {}
        self.acked: Dict[int, bytearray] = {}


operations = st.lists(st.one_of(
    st.tuples(st.just("write"), st.lists(st.integers(0, 200), min_size=1, max_size=4)),
    st.tuples(st.just("take"), st.integers(1, 8)),
    st.tuples(st.just("confirm"), st.integers(0, 1000)),
    st.tuples(st.just("confirm"), st.integers(0, 1000)),
    st.tuples(st.just("retry"), st.integers(0, 1000)),
    st.tuples(st.just("housekeep"), st.just(0)),
    st.tuples(st.just("crash"), st.integers(0, 60)),
), max_size=80)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_model_nothing_acknowledged_is_lost_and_nothing_confirmed_is_sent_again(ops):
    limit = 12000
    disk = Disk()
    state = SpoolState(limit, segment_bytes=1200)
    acknowledged: Set[bytes] = set()  # records whose client got a 202
    confirmed_written: Set[bytes] = set()  # confirmations that reached the .acked files
    confirmed: Set[bytes] = set()
    shipping: List = []
    counter = [0]

    def record_at(position) -> bytes:
        seg, index = position
        start, pk_len, hk_len, size = seg.record_span(index)
        raw = disk.segments[seg.sequence]
        return bytes(raw[start + pk_len + hk_len:start + pk_len + hk_len + size])

    def housekeep() -> None:
        for seg, offsets in state.take_acks():
            if seg.sequence in disk.segments:
                disk.acked.setdefault(seg.sequence, bytearray()).extend(ack_entries(offsets))
                for offset in offsets:
                    confirmed_written.add(_record_at_offset(disk.segments[seg.sequence], offset))
        for seg in state.finished():
            if seg is state.current:
                continue
            del disk.segments[seg.sequence]
            disk.acked.pop(seg.sequence, None)
            state.deleted(seg)

    for op, arg in ops:
        if op == "write":
            datas = []
            for body_size in arg:
                counter[0] += 1
                datas.append(record(counter[0], b"b" * body_size))
            total = sum(frame_bytes(len(d), 0) for d in datas)
            if not state.reserve(total):
                continue  # 503: nothing acknowledged
            if state.rotation_due():
                seq = state.next_sequence
                disk.segments[seq] = bytearray(SPOOL_MAGIC)
                state.open_segment(len(SPOOL_MAGIC))
            assert state.current is not None
            raw = disk.segments[state.current.sequence]
            assert len(raw) == state.current.size
            for d in datas:
                raw.extend(frame(d))
            state.appended((len(d), 0, 0) for d in datas)
            acknowledged.update(datas)
        elif op == "take":
            shipping.extend(state.take(arg, 10**6))
        elif op in ("confirm", "retry") and shipping:
            position = shipping.pop(arg % len(shipping))
            if op == "confirm":
                confirmed.add(record_at(position))
                state.confirm(position)
            else:
                state.retry(position)
        elif op == "housekeep":
            housekeep()
        elif op == "crash":
            # A write cut short leaves part of a frame; then everything in
            # memory is gone and the spool is rebuilt from the files.
            if state.current is not None and arg:
                disk.segments[state.current.sequence].extend(frame(record(10**6))[:arg])
            shipping = []
            confirmed = set(confirmed_written)
            state = SpoolState(limit, segment_bytes=1200)
            for seq in sorted(disk.segments):
                data = bytes(disk.segments[seq])
                state.recover(seq, len(data), scan_segment(data), parse_acks(bytes(disk.acked.get(seq, b""))))
        assert state.used == sum(len(raw) for raw in disk.segments.values())
        assert state.used <= limit

    # Every acknowledged record is either confirmed or still on disk, pending.
    on_disk_pending = set()
    for seq, raw in disk.segments.items():
        data = bytes(raw)
        scan = scan_segment(data)
        acked = parse_acks(bytes(disk.acked.get(seq, b"")))
        for found in scan.frames:
            rec = read_frame(data, found)[2]
            if found.offset not in acked:
                on_disk_pending.add(rec)
    assert acknowledged <= confirmed | on_disk_pending
    # Records whose confirmation was written are never shipped again.
    while state.ready_to_ship():
        for position in state.take(100, 10**6):
            assert record_at(position) not in confirmed_written
            state.confirm(position)
    for position in shipping:
        state.confirm(position)
    assert all(s == CONFIRMED for seg in state.segments.values() for s in seg.states)
    # Once all is stored, only the open segment (at most a group past
    # segment_bytes) keeps its space.
    housekeep()
    assert state.used <= 1200 + 4 * frame_bytes(len(record(0, b"b" * 200)), 0)


def _record_at_offset(raw: bytearray, offset: int) -> bytes:
    length, _, pk_len, hk_len = FRAME.unpack_from(raw, offset)
    start = offset + FRAME.size + pk_len + hk_len
    return bytes(raw[start:offset + FRAME.size + length])
