"""The write-ahead spool without I/O: segment layout, recovery scan, bookkeeping.

Theory of operation
-------------------
With ``--ack spool`` every record is appended to a local segment file and
fsynced before its client gets ``202``; a shipper then sends the spooled
records to the real sink, and a segment is deleted once every record in it
is stored.  This module decides everything about that and does no I/O: the
Trio driver (``sinks.spool.sink``) reads and writes the files and passes bytes
in.

Files.  A spool directory holds segments ``<sequence>.spool`` (16 decimal
digits, in write order) and, beside each, ``<sequence>.acked``: the frames
of that segment the sink confirmed stored.  A segment is the 13-byte magic
``SLUICESPOOL1\\n`` followed by frames::

    length   4  big-endian: bytes after this 12-byte header (keys + record)
    crc32    4  big-endian: zlib.crc32 of keys + record
    pk_len   2  big-endian: bytes of the partition key (0: none)
    hk_len   2  big-endian: bytes of the explicit hash key (0: none)
    keys     pk_len + hk_len bytes, UTF-8
    record   envelope line, newline, body (as in the file sink)

This is the file sink's framing (length, CRC, record) with the record's
Kinesis keys in front, since ``--partition-key header:NAME`` keys exist only
in the request head.  An ``.acked`` file is a list of 8-byte entries: a
frame's offset in its segment and the CRC-32 of those 4 bytes, so a torn or
zero-filled entry is recognised and ignored.

Recovery.  After a crash a segment may end in a frame cut short (a write
the process did not finish) or, after a machine crash, in garbage.
:func:`scan_segment` keeps the frames up to the first one that is
incomplete or fails its CRC and reports the bytes after it as dropped;
nothing there was acknowledged, because a ``202`` is sent only after the
fsync.  Entries of ``.acked`` files naming no frame are ignored.

Record states (per frame, ``_TRANSITIONS`` holds every move)::

    PENDING --ship--> SHIPPING --confirm--> CONFIRMED
       ^                  |
       +------retry-------+

Segment life: the newest segment is *open* (groups of frames are appended
to it) until it passes ``segment_bytes``, then *sealed*; a sealed segment
whose frames are all confirmed is deleted.  Segments found at start are
sealed.  Space is counted as the bytes of every segment not deleted plus
the frames promised to requests waiting for the next group commit; a
reservation over the limit is refused (the server answers ``503``).
"""
from __future__ import annotations

import struct
import zlib
from array import array
from collections import deque
from typing import Deque, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from sinks import segments as _segments
from sinks.digests import crc32

__all__ = [
    "SPOOL_MAGIC",
    "FRAME",
    "ACK_ENTRY",
    "SEGMENT_SUFFIX",
    "ACKED_SUFFIX",
    "PENDING",
    "SHIPPING",
    "CONFIRMED",
    "MIN_RECORD_BYTES",
    "SpoolError",
    "RecordStateError",
    "ScannedFrame",
    "Scan",
    "Segment",
    "SpoolState",
    "segment_name",
    "acked_name",
    "list_segments",
    "frame_bytes",
    "encode_keys",
    "pack_header",
    "scan_segment",
    "ack_entries",
    "parse_acks",
    "record_id_of",
    "segment_bytes_for",
    "SegmentSummary",
    "summarize_segment",
]

SPOOL_MAGIC = b"SLUICESPOOL1\n"
FRAME = struct.Struct(">IIHH")
ACK_ENTRY = struct.Struct(">II")
SEGMENT_SUFFIX = ".spool"
ACKED_SUFFIX = ".acked"

#: The shortest record a gateway writes: an envelope line holds at least
#: ``{"v":1,"id":"<26 chars>"``.  A frame claiming less is not ours (a
#: zero-filled tail after a machine crash reads as a frame of length 0).
MIN_RECORD_BYTES = 39
#: Bytes of the envelope before the record id, and the id's length.
_ID_PREFIX = b'{"v":1,"id":"'
_ID_CHARS = 26
#: Largest key lengths a frame can hold (2-byte fields); the service's
#: limits (256 characters, 39 digits) are far below.
_MAX_KEY_BYTES = 0xFFFF

#: Segments per spool: a sealed segment is deleted whole once every record
#: in it is stored, so at most about 1/16 of the spool is held by records
#: already stored.  Bounded by a size that keeps one segment's recovery scan
#: short and by one that keeps file counts reasonable.
SEGMENTS_PER_SPOOL = 16
MAX_SEGMENT_BYTES = 64 * 1024 * 1024
MIN_SEGMENT_BYTES = 64 * 1024

PENDING = 0
SHIPPING = 1
CONFIRMED = 2
_STATE_NAMES = {PENDING: "pending", SHIPPING: "shipping", CONFIRMED: "confirmed"}

_TRANSITIONS: Dict[Tuple[int, str], int] = {
    (PENDING, "ship"): SHIPPING,
    (SHIPPING, "confirm"): CONFIRMED,
    (SHIPPING, "retry"): PENDING,
}


class SpoolError(Exception):
    """A spool directory holds something that is not a spool segment."""


class RecordStateError(RuntimeError):
    """A record was moved in a way the state table does not allow."""


def segment_bytes_for(limit: int) -> int:
    """The size past which a segment is sealed, for a spool of ``limit`` bytes."""
    return max(MIN_SEGMENT_BYTES, min(MAX_SEGMENT_BYTES, limit // SEGMENTS_PER_SPOOL))


def segment_name(sequence: int) -> str:
    """The file name of spool segment ``sequence``."""
    return _segments.segment_name(sequence, SEGMENT_SUFFIX)


def acked_name(sequence: int) -> str:
    """The file name of the confirmations of spool segment ``sequence``."""
    return _segments.segment_name(sequence, ACKED_SUFFIX)


def list_segments(directory: str) -> List[int]:
    """Sequence numbers of the segments in ``directory``, oldest first."""
    return _segments.list_sequences(directory, SEGMENT_SUFFIX)


def frame_bytes(record_bytes: int, key_bytes: int) -> int:
    """Bytes a record of ``record_bytes`` with ``key_bytes`` of keys takes on disk."""
    return FRAME.size + key_bytes + record_bytes


def encode_keys(partition_key: Optional[str], hash_key: Optional[str],
                record_id: str) -> Tuple[bytes, int, int]:
    """``(keys, pk_len, hk_len)`` to store; a partition key equal to the record id is not stored."""
    pk = b"" if partition_key is None or partition_key == record_id else partition_key.encode("utf-8")
    hk = b"" if hash_key is None else hash_key.encode("ascii")
    if len(pk) > _MAX_KEY_BYTES or len(hk) > _MAX_KEY_BYTES:
        raise ValueError("key too long for a spool frame")
    if not hk:
        return pk, len(pk), 0
    return pk + hk, len(pk), len(hk)


def pack_header(buffer, offset: int, keys: bytes, pk_len: int, hk_len: int, record) -> None:
    """Write the 12-byte frame header of ``keys`` + ``record`` into ``buffer`` at ``offset``."""
    crc = crc32(record, zlib.crc32(keys)) if keys else crc32(record)
    FRAME.pack_into(buffer, offset, len(keys) + len(record), crc, pk_len, hk_len)


def record_id_of(record) -> str:
    """The record id from a record's envelope line (fixed position in envelope v1)."""
    view = memoryview(record)
    if bytes(view[:len(_ID_PREFIX)]) == _ID_PREFIX:
        return bytes(view[len(_ID_PREFIX):len(_ID_PREFIX) + _ID_CHARS]).decode("ascii")
    from sinks.envelope import split_record

    return str(split_record(view)[0]["id"])


# -- recovery scan -------------------------------------------------------------


class ScannedFrame(NamedTuple):
    """A whole frame found by :func:`scan_segment`."""

    offset: int
    length: int  # keys + record
    pk_len: int
    hk_len: int


class Scan(NamedTuple):
    """What :func:`scan_segment` found: frames, where they end, what follows them."""

    frames: List[ScannedFrame]
    end: int  # end of the last whole frame (the magic's end if none)
    dropped: int  # bytes after ``end``: a torn tail (or damage) that was not kept


def scan_segment(data) -> Scan:
    """Read a segment's bytes: every whole, intact frame, stopping at the first that is not.

    A file shorter than the magic that starts like it is an empty segment
    whose magic never landed; any other wrong start raises SpoolError.
    """
    view = memoryview(data)
    magic = len(SPOOL_MAGIC)
    if len(view) < magic and SPOOL_MAGIC.startswith(bytes(view)):
        return Scan([], len(view), 0)
    if bytes(view[:magic]) != SPOOL_MAGIC:
        raise SpoolError("not a sluice spool segment")
    frames: List[ScannedFrame] = []
    pos = magic
    size = len(view)
    while pos + FRAME.size <= size:
        length, crc, pk_len, hk_len = FRAME.unpack_from(view, pos)
        start = pos + FRAME.size
        if length < pk_len + hk_len + MIN_RECORD_BYTES or start + length > size:
            break
        if zlib.crc32(view[start:start + length]) != crc:
            break
        frames.append(ScannedFrame(pos, length, pk_len, hk_len))
        pos = start + length
    return Scan(frames, pos, size - pos)


def ack_entries(offsets: Iterable[int]) -> bytes:
    """The ``.acked`` entries confirming the frames at ``offsets``."""
    out = bytearray()
    for offset in offsets:
        raw = offset.to_bytes(4, "big")
        out += raw
        out += zlib.crc32(raw).to_bytes(4, "big")
    return bytes(out)


def parse_acks(data) -> Set[int]:
    """Frame offsets named by well-formed ``.acked`` entries; a torn last entry is ignored."""
    view = memoryview(data)
    found = set()
    for pos in range(0, len(view) - ACK_ENTRY.size + 1, ACK_ENTRY.size):
        offset, crc = ACK_ENTRY.unpack_from(view, pos)
        if zlib.crc32(offset.to_bytes(4, "big")) == crc:
            found.add(offset)
    return found


class SegmentSummary(NamedTuple):
    """What ``sluice spool inspect`` shows of one segment."""

    records: int
    pending: int  # records not confirmed stored
    pending_bytes: int  # their record bytes
    oldest_pending_ms: Optional[int]  # received_at of the first pending record
    dropped: int  # torn-tail bytes


def summarize_segment(data, acked: Set[int]) -> SegmentSummary:
    """Count a segment's records, and those not yet confirmed, from its bytes and ``.acked`` offsets."""
    scan = scan_segment(data)
    view = memoryview(data)
    pending = pending_bytes = 0
    oldest: Optional[int] = None
    for frame in scan.frames:
        if frame.offset in acked:
            continue
        pending += 1
        record_bytes = frame.length - frame.pk_len - frame.hk_len
        pending_bytes += record_bytes
        if oldest is None:
            start = frame.offset + FRAME.size + frame.pk_len + frame.hk_len
            oldest = _received_at(view[start:start + record_bytes])
    return SegmentSummary(len(scan.frames), pending, pending_bytes, oldest, scan.dropped)


def _received_at(record) -> Optional[int]:
    from sinks.envelope import split_record

    try:
        value = split_record(record)[0].get("received_at")
    except ValueError:
        return None
    return value if isinstance(value, int) else None


# -- bookkeeping ---------------------------------------------------------------


class Segment:
    """One segment's index: where each frame lies and what became of it."""

    __slots__ = ("sequence", "offsets", "lengths", "keys", "states", "size", "sealed",
                 "unconfirmed", "cursor", "acks", "dropped")

    def __init__(self, sequence: int, size: int) -> None:
        self.sequence = sequence
        self.offsets = array("Q")  # frame start
        self.lengths = array("I")  # keys + record
        self.keys = array("I")  # pk_len << 16 | hk_len
        self.states = bytearray()
        self.size = size  # bytes of the file
        self.sealed = False
        self.unconfirmed = 0
        self.cursor = 0  # first frame never shipped
        self.acks: List[int] = []  # confirmed offsets not yet in the .acked file
        self.dropped = 0  # torn-tail bytes found at recovery

    def __len__(self) -> int:
        return len(self.states)

    def _add(self, offset: int, length: int, pk_len: int, hk_len: int, state: int) -> None:
        self.offsets.append(offset)
        self.lengths.append(length)
        self.keys.append(pk_len << 16 | hk_len)
        self.states.append(state)
        if state != CONFIRMED:
            self.unconfirmed += 1

    def record_span(self, index: int) -> Tuple[int, int, int, int]:
        """``(keys offset, pk_len, hk_len, record bytes)`` of frame ``index``."""
        keys = self.keys[index]
        pk_len, hk_len = keys >> 16, keys & 0xFFFF
        return (self.offsets[index] + FRAME.size, pk_len, hk_len,
                self.lengths[index] - pk_len - hk_len)

    def __repr__(self) -> str:
        return "<Segment %d frames=%d unconfirmed=%d size=%d%s>" % (
            self.sequence, len(self), self.unconfirmed, self.size, " sealed" if self.sealed else "")


#: A record's place: its segment and its frame's index there.
Position = Tuple[Segment, int]


class SpoolState:
    """The spool's segments, its space, and every record's state.

    ``limit`` bounds the bytes of the segment files; frames are appended
    by groups (:meth:`reserve`, then :meth:`appended` once they are on
    disk); the shipper takes records with :meth:`take` and reports each
    with :meth:`confirm` or :meth:`retry`.
    """

    def __init__(self, limit: int, segment_bytes: Optional[int] = None) -> None:
        if limit < 1:
            raise ValueError("the spool limit must be positive")
        self.limit = limit
        self.segment_bytes = segment_bytes or segment_bytes_for(limit)
        self.segments: Dict[int, Segment] = {}  # by sequence, oldest first
        self.current: Optional[Segment] = None  # open for appending
        self.next_sequence = 0
        self.used = 0  # bytes of the segment files
        self.reserved = 0  # bytes promised to frames not yet appended
        self._retry: Deque[Position] = deque()
        self._ship_order: Deque[Segment] = deque()  # segments with frames never shipped
        #: Records not yet confirmed, and their bytes (keys + record).
        self.pending_records = 0
        self.pending_bytes = 0
        self.shipping = 0
        self.confirmed = 0
        self.retries = 0

    # -- recovery --------------------------------------------------------

    def recover(self, sequence: int, file_size: int, scan: Scan, acked: Set[int]) -> Segment:
        """Add a segment found at start (sealed); frames named in ``acked`` are confirmed."""
        if sequence in self.segments or sequence < self.next_sequence:
            raise ValueError("segment %d recovered out of order" % sequence)
        segment = Segment(sequence, file_size)
        segment.sealed = True
        segment.dropped = scan.dropped
        for frame in scan.frames:
            state = CONFIRMED if frame.offset in acked else PENDING
            segment._add(frame.offset, frame.length, frame.pk_len, frame.hk_len, state)
            if state == PENDING:
                self.pending_records += 1
                self.pending_bytes += frame.length
        self.segments[sequence] = segment
        self.next_sequence = sequence + 1
        self.used += file_size
        if segment.unconfirmed:
            self._ship_order.append(segment)
        return segment

    # -- writing ---------------------------------------------------------

    def reserve(self, frame: int) -> bool:
        """Promise ``frame`` bytes to a record joining the next group; False when full."""
        if self.used + self.reserved + frame > self.limit:
            return False
        self.reserved += frame
        return True

    def unreserve(self, frame: int) -> None:
        """Give back a promise (the record left the group, or the group's write failed)."""
        if frame > self.reserved:
            raise ValueError("unreserving %d of %d reserved bytes" % (frame, self.reserved))
        self.reserved -= frame

    def rotation_due(self) -> bool:
        """Whether the next group needs a new segment (none open)."""
        return self.current is None

    def open_segment(self, magic_bytes: int) -> int:
        """A new segment of ``magic_bytes`` was created: it is the open one now."""
        if self.current is not None:
            self.current.sealed = True
        sequence = self.next_sequence
        segment = Segment(sequence, magic_bytes)
        self.segments[sequence] = segment
        self.current = segment
        self.next_sequence = sequence + 1
        self.used += magic_bytes
        return sequence

    def appended(self, frames: Iterable[Tuple[int, int, int]]) -> Tuple[int, int]:
        """Frames ``(length, pk_len, hk_len)`` landed (and were synced) at the open segment's end.

        Their reservation becomes used space; returns ``(first index, count)``.
        The segment is sealed once past ``segment_bytes``.
        """
        segment = self.current
        if segment is None:
            raise ValueError("no open segment")
        first = len(segment)
        pos = segment.size
        total = 0
        for length, pk_len, hk_len in frames:
            segment._add(pos, length, pk_len, hk_len, PENDING)
            size = FRAME.size + length
            pos += size
            total += size
            self.pending_records += 1
            self.pending_bytes += length
        count = len(segment) - first
        self.unreserve(total)
        self.used += total
        segment.size = pos
        if count and (not self._ship_order or self._ship_order[-1] is not segment):
            self._ship_order.append(segment)
        if segment.size >= self.segment_bytes:
            self.seal()
        return first, count

    def seal(self) -> None:
        """Append no more to the open segment."""
        if self.current is not None:
            self.current.sealed = True
            self.current = None

    # -- shipping --------------------------------------------------------

    def ready_to_ship(self) -> bool:
        """Whether :meth:`take` would return something."""
        if self._retry:
            return True
        self._skip_shipped()
        return bool(self._ship_order)

    def take(self, max_records: int, max_bytes: int) -> List[Position]:
        """Records to ship next (retries first, then in write order), marked SHIPPING.

        Takes at most ``max_records``, and at most ``max_bytes`` of record
        bytes except that one record is always taken when any is waiting.
        """
        out: List[Position] = []
        budget = max_bytes
        while len(out) < max_records:
            position = self._next_position()
            if position is None:
                break
            segment, index = position
            size = segment.record_span(index)[3]
            if out and size > budget:
                break
            self._advance(position)
            self._move(segment, index, "ship")
            self.shipping += 1
            budget -= size
            out.append(position)
        return out

    def confirm(self, position: Position) -> bool:
        """The sink stored the record; True when its segment can now be deleted."""
        segment, index = position
        self._move(segment, index, "confirm")
        self.shipping -= 1
        self.confirmed += 1
        segment.unconfirmed -= 1
        segment.acks.append(segment.offsets[index])
        self.pending_records -= 1
        self.pending_bytes -= segment.lengths[index]
        return self.deletable(segment)

    def retry(self, position: Position) -> None:
        """The sink did not store the record: ship it again (before newer records)."""
        segment, index = position
        self._move(segment, index, "retry")
        self.shipping -= 1
        self.retries += 1
        self._retry.append(position)

    def deletable(self, segment: Segment) -> bool:
        """Whether ``segment`` may be deleted: sealed, and every record confirmed."""
        return segment.sealed and segment.unconfirmed == 0 and segment.sequence in self.segments

    def finished(self) -> List[Segment]:
        """Every segment that may be deleted now."""
        return [segment for segment in self.segments.values() if self.deletable(segment)]

    def take_acks(self) -> List[Tuple[Segment, List[int]]]:
        """Confirmed offsets not yet written, by segment (and forget them)."""
        out = []
        for segment in self.segments.values():
            if segment.acks:
                out.append((segment, segment.acks))
                segment.acks = []
        return out

    def deleted(self, segment: Segment) -> None:
        """``segment``'s files are gone."""
        if not self.deletable(segment):
            raise ValueError("segment %d still holds unconfirmed records" % segment.sequence)
        del self.segments[segment.sequence]
        self.used -= segment.size

    def statistics(self) -> dict:
        return {
            "limit_bytes": self.limit,
            "used_bytes": self.used,
            "reserved_bytes": self.reserved,
            "segments": len(self.segments),
            "pending_records": self.pending_records,
            "pending_bytes": self.pending_bytes,
            "shipping": self.shipping,
            "confirmed": self.confirmed,
            "retries": self.retries,
        }

    # -- internals -------------------------------------------------------

    def _skip_shipped(self) -> None:
        order = self._ship_order
        while order:
            segment = order[0]
            states = segment.states
            # Recovered frames confirmed before the crash are never shipped again.
            while segment.cursor < len(states) and states[segment.cursor] == CONFIRMED:
                segment.cursor += 1
            if segment.cursor < len(states):
                return
            order.popleft()

    def _next_position(self) -> Optional[Position]:
        if self._retry:
            return self._retry[0]
        self._skip_shipped()
        if not self._ship_order:
            return None
        segment = self._ship_order[0]
        return segment, segment.cursor

    def _advance(self, position: Position) -> None:
        if self._retry and self._retry[0] is position:
            self._retry.popleft()
            return
        segment, index = position
        segment.cursor = index + 1

    @staticmethod
    def _move(segment: Segment, index: int, action: str) -> None:
        state = segment.states[index]
        new = _TRANSITIONS.get((state, action))
        if new is None:
            raise RecordStateError("cannot %s a %s record" % (action, _STATE_NAMES[state]))
        segment.states[index] = new
