"""The spool's files: the blocking calls of ``sinks.spool.sink``, each run in a worker thread.

:class:`SpoolFiles` owns the directory lock, the open segment's descriptor and
the descriptors segments are read back from.  Every method blocks; the Trio
driver calls them in worker threads (``sinks.worker.run_sync``), one writing
call at a time (the writer task) beside at most one reading call (the shipper) and one
confirming call (housekeeping), which touch different files.  What to write
and where is decided by ``sinks.spool.layout``; these methods only carry it out.
"""
from __future__ import annotations

import errno
import fcntl
import os
from typing import Dict, List, Sequence, Set, Tuple

from sinks.file import DIR_MODE, FILE_MODE, NOFOLLOW, _writev_all
from sinks.segments import list_sequences
from sinks.spool.layout import (
    ACKED_SUFFIX,
    FRAME,
    SPOOL_MAGIC,
    Scan,
    Segment,
    SpoolError,
    ack_entries,
    acked_name,
    list_segments,
    pack_header,
    parse_acks,
    scan_segment,
    segment_name,
)

__all__ = ["SpoolFiles", "SpoolInUse", "LOCK_NAME", "Found"]

#: Held with flock while a gateway uses the directory.
LOCK_NAME = "spool.lock"
#: Records per writev: IOV_MAX is 1024 and a frame takes up to 3 iovecs.
_RECORDS_PER_WRITEV = 256

#: A segment found at start: ``(sequence, file bytes, scan, confirmed offsets)``.
Found = Tuple[int, int, Scan, Set[int]]


class SpoolInUse(Exception):
    """Another process holds the spool directory's lock."""


class SpoolFiles:
    """The files of one spool directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.fd = -1  # the open segment, appended to
        self._lock_fd = -1
        self._readers: Dict[int, object] = {}  # sequence -> unbuffered file for reading back
        # Frame headers of one writev, reused (one writing call at a time).
        headers = bytearray(FRAME.size * _RECORDS_PER_WRITEV)
        self._header_views = [memoryview(headers)[i:i + FRAME.size]
                              for i in range(0, len(headers), FRAME.size)]

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def open_directory(self) -> List[Found]:
        """Create and lock the directory, then scan every segment (recovery).

        Raises SpoolInUse, or SpoolError naming a file that is not a segment.
        """
        os.makedirs(self.directory, DIR_MODE, exist_ok=True)
        fd = os.open(self._path(LOCK_NAME), os.O_RDWR | os.O_CREAT | NOFOLLOW, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolInUse("%s is in use by another gateway" % self.directory) from None
        self._lock_fd = fd
        found: List[Found] = []
        sequences = list_segments(self.directory)
        for sequence in sequences:
            path = self._path(segment_name(sequence))
            with open(path, "rb") as f:
                data = f.read()
            try:
                scan = scan_segment(data)
            except SpoolError as exc:
                raise SpoolError("%s: %s" % (path, exc)) from None
            acked: Set[int] = set()
            try:
                with open(self._path(acked_name(sequence)), "rb") as f:
                    acked = parse_acks(f.read())
            except FileNotFoundError:
                pass
            found.append((sequence, len(data), scan, acked))
            del data
        known = set(sequences)
        for sequence in list_sequences(self.directory, ACKED_SUFFIX):
            if sequence not in known:
                os.unlink(self._path(acked_name(sequence)))  # its segment was deleted
        return found

    def create_segment(self, sequence: int) -> None:
        """Start segment ``sequence`` (closing the open one): magic written, file and entry synced."""
        self.close_segment()
        path = self._path(segment_name(sequence))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | NOFOLLOW, FILE_MODE)
        try:
            _writev_all(fd, [memoryview(SPOOL_MAGIC)], len(SPOOL_MAGIC))
            os.fsync(fd)
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        self.fd = fd

    def close_segment(self) -> None:
        """Stop appending to the open segment (it was synced with its last group)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def write_group(self, records: Sequence, keys_list: Sequence[bytes],
                    lengths: Sequence[Tuple[int, int]], start: int) -> None:
        """Frame the records from their ring slices, append them at ``start``, fdatasync.

        On a failure the segment is cut back to ``start``: no partial frame stays.
        """
        fd = self.fd
        header_views = self._header_views
        try:
            for first in range(0, len(records), _RECORDS_PER_WRITEV):
                iov = []
                total = 0
                for i in range(first, min(first + _RECORDS_PER_WRITEV, len(records))):
                    view = records[i].slot.view
                    keys = keys_list[i]
                    pk_len, hk_len = lengths[i]
                    header = header_views[i - first]
                    pack_header(header, 0, keys, pk_len, hk_len, view)
                    iov.append(header)
                    if keys:
                        iov.append(memoryview(keys))
                    iov.append(view)
                    total += FRAME.size + len(keys) + len(view)
                _writev_all(fd, iov, total)
            os.fdatasync(fd)
        except OSError:
            os.ftruncate(fd, start)
            raise

    def read_back(self, jobs: Sequence[Tuple[Tuple[Segment, int], object]]) -> List[bytes]:
        """Each job's record into its slot (``readinto``, no copy); returns each record's keys."""
        keys: List[bytes] = []
        readers = self._readers
        for (segment, index), slot in jobs:
            reader = readers.get(segment.sequence)
            if reader is None:
                reader = readers[segment.sequence] = open(
                    self._path(segment_name(segment.sequence)), "rb", buffering=0)
            start, pk_len, hk_len, size = segment.record_span(index)
            reader.seek(start)  # type: ignore[attr-defined]
            keys.append(reader.read(pk_len + hk_len) if pk_len + hk_len else b"")  # type: ignore[attr-defined]
            view = slot.view[:size]  # type: ignore[attr-defined]
            filled = 0
            while filled < size:
                count = reader.readinto(view[filled:])  # type: ignore[attr-defined]
                if not count:
                    raise OSError(errno.EIO, "%s: ends inside a record" % segment_name(segment.sequence))
                filled += count
        return keys

    def confirm_and_delete(self, writes: Sequence[Tuple[Segment, List[int]]],
                           finished: Sequence[int]) -> None:
        """Append confirmations to ``.acked`` files (not synced); delete finished segments.

        A segment goes before its ``.acked``: a crash between the two leaves
        an ``.acked`` without a segment, removed at the next start.
        """
        for segment, offsets in writes:
            fd = os.open(self._path(acked_name(segment.sequence)),
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | NOFOLLOW, FILE_MODE)
            try:
                data = memoryview(ack_entries(offsets))
                _writev_all(fd, [data], len(data))
            finally:
                os.close(fd)
        for sequence in finished:
            reader = self._readers.pop(sequence, None)
            if reader is not None:
                reader.close()  # type: ignore[attr-defined]
            for name in (segment_name(sequence), acked_name(sequence)):
                try:
                    os.unlink(self._path(name))
                except FileNotFoundError:
                    pass

    def close(self) -> None:
        """Close every descriptor and release the lock."""
        self.close_segment()
        for reader in self._readers.values():
            reader.close()  # type: ignore[attr-defined]
        self._readers.clear()
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)  # releases the flock
