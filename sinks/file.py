"""The file sink: records appended to size-rotated local segment files.

Segment format
--------------
A directory holds segments named ``<sequence>.seg`` (16 decimal digits, in
write order).  Each segment starts with the 11-byte magic line
``SLUICESEG1\\n`` and then holds frames, one per record::

    length  (4 bytes, big-endian unsigned)   bytes of the record
    crc32   (4 bytes, big-endian unsigned)   zlib.crc32 of the record
    record  (length bytes)                   envelope line + body

A frame cut short at the very end of the newest segment is what a crash in the
middle of a write leaves; readers stop there.  A CRC mismatch anywhere is
corruption and reported as such.

Writing
-------
``put`` only queues the record.  A writer task gathers what is queued every
``flush_interval`` (or sooner once ``batch_bytes`` are waiting) and writes it
with ``writev`` straight from the ring slices, in a worker thread so the
event loop never waits on the disk; then it releases the slices.  A failed
write (disk full, I/O error) truncates the partial batch away, marks the sink
not ready and retries the same batch after ``retry_interval``: records are
never dropped, and the ring filling up turns into ``503`` for new requests.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import trio

from sinks import worker
from sinks.base import HealthReport, Record, Release, Sink, SinkStatistics, log_health
from sinks.digests import crc32
from sinks.errors import SinkUnavailable
from sinks.segments import list_sequences, segment_name, writev

__all__ = [
    "FileSinkStatistics",
    "FileSink",
    "SEGMENT_MAGIC",
    "FRAME_HEADER",
    "SegmentError",
    "FILE_MODE",
    "DIR_MODE",
    "NOFOLLOW",
    "read_records",
    "list_segments",
]

SEGMENT_MAGIC = b"SLUICESEG1\n"
FRAME_HEADER = struct.Struct(">II")

#: Records per writev call: Linux's IOV_MAX is 1024 and each record takes two
#: iovecs (frame header, record).
_RECORDS_PER_WRITEV = 512
_SEGMENT_SUFFIX = ".seg"


#: Records hold other people's logs: files are readable by the gateway's
#: user only, and so are the directories Sluice creates, whatever the umask
#: (which can only take bits away).  A directory that exists keeps its mode.
FILE_MODE = 0o600
DIR_MODE = 0o700
#: Flags for opening a file that must not be a symlink planted by someone
#: who can write to the directory (O_EXCL already refuses one when creating).
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class SegmentError(Exception):
    """A segment is not in the format above (bad magic or CRC)."""


def list_segments(directory: str) -> List[str]:
    """Paths of the segments in ``directory``, oldest first."""
    return [os.path.join(directory, segment_name(sequence, _SEGMENT_SUFFIX))
            for sequence in list_sequences(directory, _SEGMENT_SUFFIX)]


def read_records(directory: str, on_error: Optional[Callable[[SegmentError], None]] = None
                 ) -> Iterator[memoryview]:
    """Yield every stored record (envelope line + body), oldest first.

    Reads one record at a time (memory holds one record, not a segment).  A
    frame cut short at the end of a segment (a write the process did not
    finish) ends that segment quietly.  A file that is not a segment, or a
    record that fails its CRC, raises SegmentError; with ``on_error`` it is
    passed there instead and reading goes on (the next record, or the next
    segment).
    """
    for path in list_segments(directory):
        try:
            yield from _segment_records(path, on_error)
        except SegmentError as exc:
            if on_error is None:
                raise
            on_error(exc)


def _segment_records(path: str, on_error: Optional[Callable[[SegmentError], None]]
                     ) -> Iterator[memoryview]:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(len(SEGMENT_MAGIC))
        if len(magic) < len(SEGMENT_MAGIC) and SEGMENT_MAGIC.startswith(magic):
            return  # created, then the process stopped before the magic landed
        if magic != SEGMENT_MAGIC:
            raise SegmentError("%s: not a sluice segment" % path)
        pos = len(SEGMENT_MAGIC)
        while pos + FRAME_HEADER.size <= size:
            header = f.read(FRAME_HEADER.size)
            if len(header) < FRAME_HEADER.size:
                break
            length, crc = FRAME_HEADER.unpack(header)
            start = pos + FRAME_HEADER.size
            if start + length > size:
                break  # a torn tail, or a length no record has: never allocated
            record = bytearray(length)
            view = memoryview(record)
            filled = 0
            while filled < length:
                count = f.readinto(view[filled:])
                if not count:
                    break
                filled += count
            if filled < length:
                break  # the file shrank while being read
            pos = start + length
            if zlib.crc32(view) != crc:
                error = SegmentError("%s: CRC mismatch in the record at byte %d"
                                     % (path, start - FRAME_HEADER.size))
                if on_error is None:
                    raise error
                on_error(error)
                continue
            yield view


@dataclass(frozen=True)
class FileSinkStatistics(SinkStatistics):
    """The file sink's counters: ``held`` records wait for the next write."""

    #: Segment files this sink opened.
    segments: int = 0
    #: Bytes of the held records.
    held_bytes: int = 0


class FileSink(Sink):
    """Appends records to segment files under ``directory``."""

    name = "file"

    def __init__(self, release: Release, directory: str, *, segment_bytes: int = 128 * 2**20,
                 flush_interval: float = 0.05, batch_bytes: int = 4 * 2**20,
                 retry_interval: float = 1.0, report: HealthReport = log_health) -> None:
        super().__init__(release)
        self._report = report
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.flush_interval = flush_interval
        self.batch_bytes = batch_bytes
        self.retry_interval = retry_interval
        self._pending: List[Record] = []
        self._spare: List[Record] = []
        self._pending_bytes = 0
        self._headers = bytearray(FRAME_HEADER.size * _RECORDS_PER_WRITEV)
        self._header_views = [
            memoryview(self._headers)[i:i + FRAME_HEADER.size]
            for i in range(0, len(self._headers), FRAME_HEADER.size)
        ]
        self._fd = -1
        self._sequence = 0
        self._segment_size = 0
        self._kick = trio.Event()
        self._closing = False
        self._done = trio.Event()
        self._error: Optional[str] = None
        self.records = 0
        self.bytes = 0
        self.segments = 0
        self.write_errors = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            os.makedirs(self.directory, DIR_MODE, exist_ok=True)
            existing = list_sequences(self.directory, _SEGMENT_SUFFIX)
            if existing:
                self._sequence = existing[-1] + 1
            self._open_segment()
            task_status.started()
            while not (self._closing and not self._pending):
                with trio.move_on_after(self.flush_interval):
                    await self._kick.wait()
                if self._kick.is_set():
                    self._kick = trio.Event()
                if self._pending:
                    await self._flush()
        finally:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.fsync(fd)
                os.close(fd)
            self._done.set()

    async def put(self, record: Record) -> Optional[dict]:
        if self._closing:
            raise SinkUnavailable("the file sink is shutting down")
        self._pending.append(record)
        self._pending_bytes += record.slot.size
        if self._pending_bytes >= self.batch_bytes:
            self._kick.set()
        return None

    def ready(self) -> Tuple[bool, str]:
        if self._closing:
            return False, "shutting down"
        if self._error is not None:
            return False, self._error
        return True, "ok"

    async def aclose(self) -> None:
        self._closing = True
        self._kick.set()
        await self._done.wait()

    def statistics(self) -> FileSinkStatistics:
        return FileSinkStatistics(stored=self.records, stored_bytes=self.bytes, held=len(self._pending),
                                  write_errors=self.write_errors, segments=self.segments,
                                  held_bytes=self._pending_bytes)

    # -- writing ---------------------------------------------------------

    async def _flush(self) -> None:
        batch, self._pending = self._pending, self._spare
        self._pending_bytes = 0
        while True:
            try:
                await worker.run_sync(self._write_batch, batch)
            except OSError as exc:
                self.write_errors += 1
                if self._error is None:
                    self._report(self.name, False, "write failed in %s: %s; writing again every %gs" % (
                        self.directory, exc, self.retry_interval))
                self._error = "write failed: %s" % (errno.errorcode.get(exc.errno or 0, exc),)
                await trio.sleep(self.retry_interval)
                continue
            break
        if self._error is not None:
            self._error = None
            self._report(self.name, True, "writing to %s again" % self.directory)
        release = self._release
        for record in batch:
            release(record.slot)
        batch.clear()
        self._spare = batch

    def _write_batch(self, batch: List[Record]) -> None:
        """Runs in a worker thread: frame and append ``batch``, rotating as needed."""
        start = 0
        while start < len(batch):
            stop = start
            size = 0
            while stop < len(batch) and stop - start < _RECORDS_PER_WRITEV:
                frame = FRAME_HEADER.size + batch[stop].slot.size
                if stop > start and self._segment_size + size + frame > self.segment_bytes:
                    break
                size += frame
                stop += 1
            if self._segment_size > len(SEGMENT_MAGIC) and self._segment_size + size > self.segment_bytes:
                self._rotate()
                continue
            self._write_frames(batch, start, stop, size)
            start = stop

    def _write_frames(self, batch: List[Record], start: int, stop: int, size: int) -> None:
        iov = []
        for i in range(start, stop):
            view = batch[i].slot.view
            header = self._header_views[i - start]
            FRAME_HEADER.pack_into(header, 0, len(view), crc32(view))
            iov.append(header)
            iov.append(view)
        good = self._segment_size
        try:
            _writev_all(self._fd, iov, size)
        except OSError:
            # Leave no partial frame behind for readers to trip on.
            os.ftruncate(self._fd, good)
            os.lseek(self._fd, good, os.SEEK_SET)
            raise
        self._segment_size += size
        self.records += stop - start
        self.bytes += size - FRAME_HEADER.size * (stop - start)

    def _open_segment(self) -> None:
        path = os.path.join(self.directory, segment_name(self._sequence, _SEGMENT_SUFFIX))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | NOFOLLOW, FILE_MODE)
        try:
            _writev_all(fd, [memoryview(SEGMENT_MAGIC)], len(SEGMENT_MAGIC))
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        self._fd = fd
        self._segment_size = len(SEGMENT_MAGIC)
        self.segments += 1

    def _rotate(self) -> None:
        old = self._fd
        self._sequence += 1
        self._open_segment()
        os.fsync(old)
        os.close(old)


def _writev_all(fd: int, iov: List[memoryview], total: int) -> None:
    """``writev`` until all ``total`` bytes are written."""
    written = writev(fd, iov)
    while written < total:
        # Short write: drop what went out and retry the rest.
        skip = written
        rest = []
        for view in iov:
            if skip >= len(view):
                skip -= len(view)
                continue
            rest.append(view[skip:])
            skip = 0
        total -= written
        iov = rest
        written = writev(fd, iov)
