"""KPL record aggregation: many user records in one Kinesis record, without I/O.

Theory of operation
-------------------
The Kinesis Producer Library's aggregated record (the format KCL, the Lambda
deaggregation libraries and Firehose unpack) is::

    F3 89 9A C2                      magic
    AggregatedRecord (protobuf 2)    partition-key table, explicit-hash-key
                                     table, records
    MD5 of the protobuf bytes        16 bytes

with ``AggregatedRecord { repeated string partition_key_table = 1;
repeated string explicit_hash_key_table = 2; repeated Record records = 3; }``
and ``Record { required uint64 partition_key_index = 1; optional uint64
explicit_hash_key_index = 2; required bytes data = 3; }``.

Every aggregate written here holds records that share one partition key and
one explicit hash key, so each table has at most one entry, every index is
0, and each sub-record hashes to the shard of the outer record (KCL drops an
aggregate whose sub-records hash elsewhere).  Fields are written in field
number order, as the KPL and every protobuf runtime do, so the bytes are the
runtime's own serialisation of the same message.

Two pieces:

* `Plan` decides, from sizes alone, which records share which aggregate in
  one PutRecords call, and maps the call's per-Kinesis-record results back
  to per-user-record results.
* `AggregateWriter` lays one aggregate out in a preallocated scratch buffer:
  each record's bytes are copied once from the caller's buffer (the ring),
  the MD5 is taken over the buffer, and the caller base64-encodes the
  scratch into the request body as it would a plain record.

A plain Kinesis record whose data starts with the magic would be unpacked by
a deaggregator as if it were an aggregate.  `Plan` therefore never sends
such a record as a plain record, even alone: it wraps it in an aggregate of
one, which deaggregators unpack to exactly that record.
"""
from __future__ import annotations

import hashlib
import mmap
from dataclasses import replace
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

from sinks.aws.putrecords import RecordResult, RecordTooLarge

__all__ = [
    "OFF",
    "KPL",
    "MODES",
    "MAGIC",
    "DIGEST_BYTES",
    "KPL_MAX_AGGREGATE_BYTES",
    "MAX_OVERHEAD_BYTES",
    "PUT_PAYLOAD_UNIT_BYTES",
    "varint_bytes",
    "record_field_bytes",
    "aggregate_bytes",
    "payload_units",
    "starts_with_magic",
    "Aggregate",
    "Plan",
    "AggregateWriter",
    "AggregatingBuilder",
]

OFF = "off"
KPL = "kpl"
MODES = (OFF, KPL)

#: The KPL's marker in front of an aggregated record's protobuf bytes
#: (amazon-kinesis-producer ``aws/kinesis/core/aggregator.h``;
#: aws-kinesis-agg ``MAGIC``).
MAGIC = b"\xf3\x89\x9a\xc2"
#: The MD5 of the protobuf bytes that closes an aggregate.
DIGEST_BYTES = 16
#: The KPL's ``AggregationMaxSize`` default (51,200 bytes): large enough that
#: a 1 KiB record shares its aggregate with about fifty others, small enough
#: that a consumer's single GetRecords record stays small.
KPL_MAX_AGGREGATE_BYTES = 51200
#: Kinesis bills PUT payload units: "each 25KB payload chunk of a record"
#: (Kinesis Data Streams pricing), a record's data blob plus its partition
#: key, rounded up per record.  Counted for the metrics only.
PUT_PAYLOAD_UNIT_BYTES = 25 * 1024

# Protobuf tags (field number << 3 | wire type): wire type 2 is
# length-delimited, 0 a varint.
_TAG_PARTITION_KEY_TABLE = 0x0A  # field 1, bytes
_TAG_HASH_KEY_TABLE = 0x12  # field 2, bytes
_TAG_RECORD = 0x1A  # AggregatedRecord field 3, bytes
_PARTITION_KEY_INDEX_0 = b"\x08\x00"  # Record field 1, varint 0
_HASH_KEY_INDEX_0 = b"\x10\x00"  # Record field 2, varint 0
_TAG_DATA = 0x1A  # Record field 3, bytes

#: Longest partition key in UTF-8 bytes: 256 UTF-16 code units, each at
#: most 3 bytes (a surrogate pair is 2 units for 4 bytes).
_MAX_KEY_BYTES = 3 * 256
#: Longest explicit hash key: 39 decimal digits.
_MAX_HASH_KEY_BYTES = 39
#: Most bytes wrapping one record in an aggregate adds beyond the record's
#: own data and key: magic, digest, both tables with the longest keys, and
#: the record's framing for data up to 10 MiB (varints of at most 4 bytes).
MAX_OVERHEAD_BYTES = (len(MAGIC) + DIGEST_BYTES + 1 + 2 + _MAX_KEY_BYTES
                      + 1 + 1 + _MAX_HASH_KEY_BYTES + 1 + 4 + 2 + 2 + 1 + 4)


def varint_bytes(value: int) -> int:
    """Bytes of ``value`` as a protobuf varint."""
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _record_body_bytes(data_bytes: int, hash_key: bool) -> int:
    return (len(_PARTITION_KEY_INDEX_0) + (len(_HASH_KEY_INDEX_0) if hash_key else 0)
            + 1 + varint_bytes(data_bytes) + data_bytes)


def record_field_bytes(data_bytes: int, hash_key: bool) -> int:
    """Bytes one user record of ``data_bytes`` adds to an AggregatedRecord."""
    body = _record_body_bytes(data_bytes, hash_key)
    return 1 + varint_bytes(body) + body


def _tables_bytes(key_bytes: int, hash_key_bytes: Optional[int]) -> int:
    size = 1 + varint_bytes(key_bytes) + key_bytes
    if hash_key_bytes is not None:
        size += 1 + varint_bytes(hash_key_bytes) + hash_key_bytes
    return size


def aggregate_bytes(key_bytes: int, hash_key_bytes: Optional[int], data_sizes: Sequence[int]) -> int:
    """Bytes of the aggregate of records of ``data_sizes`` (magic and digest included)."""
    size = len(MAGIC) + _tables_bytes(key_bytes, hash_key_bytes) + DIGEST_BYTES
    hash_key = hash_key_bytes is not None
    for data in data_sizes:
        size += record_field_bytes(data, hash_key)
    return size


def payload_units(record_bytes: int) -> int:
    """PUT payload units of one Kinesis record of ``record_bytes`` (data plus key)."""
    return max(1, -(-record_bytes // PUT_PAYLOAD_UNIT_BYTES))


def starts_with_magic(view: memoryview) -> bool:
    """Whether ``view`` (a record's data) would read as an aggregate."""
    return len(view) >= len(MAGIC) and view[: len(MAGIC)] == MAGIC


class Aggregate:
    """One Kinesis record of a `Plan`: its keys and the user records in it.

    ``members`` are the caller's objects, in order (their index is the
    sub-sequence number consumers see).  ``wrapped`` says the record goes
    out as an aggregate; a lone record that does not start with the magic
    goes out plain, as it would without aggregation.
    """

    __slots__ = ("index", "key", "key_bytes", "hash_key", "hash_key_bytes", "members",
                 "data_sizes", "proto", "forged")

    def __init__(self, index: int, key: str, key_bytes: int, hash_key: Optional[str]) -> None:
        #: Position in the call (and in its results).
        self.index = index
        self.key = key
        self.key_bytes = key_bytes
        self.hash_key = hash_key
        self.hash_key_bytes = None if hash_key is None else len(hash_key)
        self.members: List[Any] = []
        self.data_sizes: List[int] = []
        #: Bytes of the AggregatedRecord message so far.
        self.proto = _tables_bytes(key_bytes, self.hash_key_bytes)
        #: A member's data starts with the magic: never sent plain.
        self.forged = False

    @property
    def wrapped(self) -> bool:
        return self.forged or len(self.members) > 1

    def size(self) -> int:
        """What the Kinesis record counts against the limits: data plus partition key."""
        if not self.wrapped:
            return self.data_sizes[0] + self.key_bytes
        return self.key_bytes + len(MAGIC) + self.proto + DIGEST_BYTES

    def _size_with(self, data_bytes: int) -> int:
        field = record_field_bytes(data_bytes, self.hash_key is not None)
        return self.key_bytes + len(MAGIC) + self.proto + field + DIGEST_BYTES

    def _add(self, member: Any, data_bytes: int, forged: bool) -> None:
        self.members.append(member)
        self.data_sizes.append(data_bytes)
        self.proto += record_field_bytes(data_bytes, self.hash_key is not None)
        if forged:
            self.forged = True


class Plan:
    """Which user records share which Kinesis record, for one PutRecords call.

    ``max_records`` and ``max_bytes`` are the request's limits (Kinesis
    records, and data plus keys); ``record_limit`` the stream's record limit;
    ``aggregate_limit`` where an aggregate closes (``--aggregation-max-bytes``,
    at most ``record_limit``).  All counted as the service counts: data plus
    partition key.
    """

    def __init__(self, *, max_records: int, max_bytes: int, record_limit: int,
                 aggregate_limit: int) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.record_limit = min(record_limit, max_bytes)
        self.aggregate_limit = min(aggregate_limit, self.record_limit)
        self.aggregates: List[Aggregate] = []
        #: Data plus keys of the Kinesis records planned so far.
        self.bytes = 0
        self._open: Dict[Hashable, Aggregate] = {}
        # Per member, in `add` order: (aggregate index, index inside it).
        self._places: List[Tuple[int, int]] = []

    def __len__(self) -> int:
        """Kinesis records planned."""
        return len(self.aggregates)

    @property
    def user_records(self) -> int:
        return len(self._places)

    def reset(self) -> None:
        self.aggregates = []
        self.bytes = 0
        self._open.clear()
        self._places = []

    def add(self, member: Any, group: Hashable, key: str, key_bytes: int,
            hash_key: Optional[str], data_bytes: int, forged: bool = False) -> bool:
        """Plan one user record; False when the call is full (start another).

        Records of one ``group`` may share an aggregate, whose keys are those
        of its first record: the caller makes ``group`` the partition key and
        explicit hash key, or for random keys just the explicit hash key.
        ``forged``: the data starts with the magic.  Raises `RecordTooLarge`
        for a record no call can carry.
        """
        plain = data_bytes + key_bytes
        if plain > self.record_limit:
            raise RecordTooLarge(plain, self.record_limit)
        current = self._open.get(group)
        if current is not None:
            grown = current._size_with(data_bytes)
            if grown <= self.aggregate_limit:
                delta = grown - current.size()
                if self.bytes + delta > self.max_bytes:
                    return False
                self.bytes += delta
                self._places.append((current.index, len(current.members)))
                current._add(member, data_bytes, forged)
                return True
            del self._open[group]  # full: later records of the group start another
        fresh = Aggregate(len(self.aggregates), key, key_bytes, hash_key)
        alone = fresh._size_with(data_bytes)
        if forged and alone > self.record_limit:
            raise RecordTooLarge(alone, self.record_limit)
        size = alone if forged else plain
        if len(self.aggregates) >= self.max_records or self.bytes + size > self.max_bytes:
            return False
        fresh._add(member, data_bytes, forged)
        self._places.append((len(self.aggregates), 0))
        self.aggregates.append(fresh)
        self.bytes += size
        if alone <= self.aggregate_limit:
            self._open[group] = fresh
        # else: too large to share an aggregate; it goes alone.
        return True

    def results(self, outcomes: Sequence[RecordResult]) -> List[RecordResult]:
        """Per-member results (in `add` order) from the call's per-record ones.

        Every member of an aggregate shares its outcome: a failed aggregate
        fails (and is retried) whole.  A stored member's ``sub_sequence`` is
        its index inside its Kinesis record (0 for a plain record).
        """
        if len(outcomes) != len(self.aggregates):
            raise ValueError("%d results for %d Kinesis records" % (len(outcomes), len(self.aggregates)))
        out: List[RecordResult] = []
        for index, sub in self._places:
            outcome = outcomes[index]
            out.append(outcome if outcome.error is not None else replace(outcome, sub_sequence=sub))
        return out


def _put_varint(view: memoryview, pos: int, value: int) -> int:
    while value >= 0x80:
        view[pos] = (value & 0x7F) | 0x80
        value >>= 7
        pos += 1
    view[pos] = value
    return pos + 1


class AggregateWriter:
    """Lays out one aggregate at a time in a preallocated scratch buffer.

    ``capacity`` bounds an aggregate's bytes (the stream's record limit).
    `begin`, `append` for each record, then `finish`; the aggregate is
    ``buffer[:finish()]`` until the next `begin`.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # An anonymous mmap: pages become resident only as aggregates reach them.
        self.buffer: Any = mmap.mmap(-1, capacity)
        self._view = memoryview(self.buffer)
        self._pos = 0
        self._hash_key = False

    def begin(self, key: str, hash_key: Optional[str]) -> None:
        """Start an aggregate whose records all have these keys."""
        view = self._view
        view[0:4] = MAGIC
        raw = key.encode("utf-8")
        view[4] = _TAG_PARTITION_KEY_TABLE
        pos = _put_varint(view, 5, len(raw))
        view[pos : pos + len(raw)] = raw
        pos += len(raw)
        self._hash_key = hash_key is not None
        if hash_key is not None:
            digits = hash_key.encode("ascii")
            view[pos] = _TAG_HASH_KEY_TABLE
            pos = _put_varint(view, pos + 1, len(digits))
            view[pos : pos + len(digits)] = digits
            pos += len(digits)
        self._pos = pos

    def append(self, source: memoryview, start: int, stop: int) -> None:
        """Add ``source[start:stop]`` as the next record (its one copy)."""
        size = stop - start
        pos = self._pos
        if pos + record_field_bytes(size, self._hash_key) + DIGEST_BYTES > self.capacity:
            raise ValueError("aggregate exceeds its %d-byte buffer" % self.capacity)
        view = self._view
        view[pos] = _TAG_RECORD
        pos = _put_varint(view, pos + 1, _record_body_bytes(size, self._hash_key))
        view[pos : pos + 2] = _PARTITION_KEY_INDEX_0
        pos += 2
        if self._hash_key:
            view[pos : pos + 2] = _HASH_KEY_INDEX_0
            pos += 2
        view[pos] = _TAG_DATA
        pos = _put_varint(view, pos + 1, size)
        view[pos : pos + size] = source[start:stop]
        self._pos = pos + size

    def finish(self) -> int:
        """Append the digest; returns the aggregate's length."""
        pos = self._pos
        view = self._view
        view[pos : pos + DIGEST_BYTES] = hashlib.md5(view[len(MAGIC) : pos]).digest()
        return pos + DIGEST_BYTES

    def view(self, length: int) -> memoryview:
        return self._view[:length]

    def close(self) -> None:
        self._view.release()
        self.buffer.close()


class AggregatingBuilder:
    """A PutRecords body whose records are aggregates: the sink's builder with
    ``--aggregation kpl``.

    Same interface as the plain builder of ``sinks.aws.sink``: `admit` plans
    an entry on the event loop from its sizes (an entry of the delivery
    queue: ``record.slot``, ``record.id``, ``partition_key``, ``hash_key``,
    ``size``); `encode_all` then lays out every Kinesis record, maybe in a
    worker thread, reading each entry's ring slice once.  `outgoing` is the
    number of Kinesis records in the call, and `per_entry` turns the call's
    results into one per entry.  ``ring`` is the buffer every slot lies in.
    """

    def __init__(self, batch: Any, ring: Any, *, aggregate_limit: int) -> None:
        self.batch = batch
        self.source = batch.source(ring)
        self._ring = memoryview(ring)
        self.plan = Plan(max_records=batch.max_records, max_bytes=batch.max_bytes,
                         record_limit=batch.max_record_bytes, aggregate_limit=aggregate_limit)
        self._aggregate_limit = aggregate_limit
        self.writer = AggregateWriter(self.plan.record_limit)
        self._scratch = batch.source(self.writer.buffer)
        self.count = 0

    def set_limits(self, max_bytes: int, record_limit: int) -> None:
        """Plan by the stream's current limits (the batch was sized for the largest)."""
        plan = self.plan
        plan.max_bytes = min(max_bytes, self.batch.max_bytes)
        plan.record_limit = min(record_limit, plan.max_bytes, self.batch.max_record_bytes)
        plan.aggregate_limit = min(self._aggregate_limit, plan.record_limit)

    @property
    def bytes(self) -> int:
        """Data plus keys of the Kinesis records planned."""
        return self.plan.bytes

    @property
    def outgoing(self) -> int:
        return len(self.plan)

    def admit(self, entry: Any) -> bool:
        slot = entry.record.slot
        size = slot.size
        key = entry.partition_key
        # A key equal to the record's id is the random key (the id, or the
        # fallback of tenant and header keys): any random key will do, so
        # such records share aggregates with each other.
        group = (None if key == entry.record.id else key, entry.hash_key)
        forged = starts_with_magic(self._ring[slot.offset : slot.offset + min(size, len(MAGIC))])
        if not self.plan.add(entry, group, key, entry.size - size, entry.hash_key, size, forged):
            return False
        self.count += 1
        return True

    def encode_all(self, entries: List[Any]) -> None:
        batch, ring, writer = self.batch, self._ring, self.writer
        for aggregate in self.plan.aggregates:
            if not aggregate.wrapped:
                slot = aggregate.members[0].record.slot
                ok = batch.add_from(self.source, slot.offset, slot.offset + slot.size,
                                    aggregate.key, aggregate.hash_key)
            else:
                writer.begin(aggregate.key, aggregate.hash_key)
                for entry in aggregate.members:
                    slot = entry.record.slot
                    writer.append(ring, slot.offset, slot.offset + slot.size)
                ok = batch.add_from(self._scratch, 0, writer.finish(), aggregate.key,
                                    aggregate.hash_key)
            if not ok:
                raise RuntimeError("the batch refused a record it had admitted")

    def per_entry(self, result: Any) -> Any:
        """The call's `PutRecordsResult` with one result per entry, in admission order."""
        records = tuple(self.plan.results(result.records))
        return replace(result, records=records, failed=sum(1 for r in records if r.error is not None))

    def shapes(self) -> List[Tuple[int, int]]:
        """``(user records, bytes)`` of each Kinesis record of the call (metrics)."""
        return [(len(a.members), a.size()) for a in self.plan.aggregates]

    def reset(self) -> None:
        self.batch.reset()
        self.plan.reset()
        self.count = 0

    def close(self) -> None:
        self._scratch.close()
        self.source.close()
        self.batch.close()
        self._ring.release()
        self.writer.close()
