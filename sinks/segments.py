"""Segment files, shared by the file sink and the spool: their names, and how they are written.

Both keep records in numbered segment files in one directory: the name is the
segment's sequence number in 16 decimal digits (so names sort in write order)
and a suffix saying what the file holds (``.seg`` for the file sink,
``.spool`` and ``.acked`` for the spool).  `segment_name`, `segment_sequence`
and `list_sequences` are the one place that naming lives.

``writev(2)`` on both interpreters: ``os.writev`` where it exists (CPython),
a cffi call of libc's ``writev`` elsewhere (PyPy 3.9's ``os`` lacks it), so
segment writes go from ring slices to the kernel without a copy.
"""

from __future__ import annotations

import os
from typing import List, Optional

__all__ = ["writev", "segment_name", "segment_sequence", "list_sequences"]

#: Digits of a segment's sequence number in its name: 10**16 segments of even
#: 64 KiB is far more than any disk, and fixed width makes names sort in order.
SEQUENCE_DIGITS = 16


def segment_name(sequence: int, suffix: str) -> str:
    """The file name of segment ``sequence`` with ``suffix`` (e.g. ``".seg"``)."""
    return "%0*d%s" % (SEQUENCE_DIGITS, sequence, suffix)


def segment_sequence(name: str, suffix: str) -> Optional[int]:
    """The sequence number in a file ``name`` with ``suffix``, or None for another file."""
    if not name.endswith(suffix):
        return None
    stem = name[:-len(suffix)]
    return int(stem) if stem.isdigit() else None


def list_sequences(directory: str, suffix: str) -> List[int]:
    """Sequence numbers of the files with ``suffix`` in ``directory``, oldest first."""
    found = []
    for name in os.listdir(directory):
        sequence = segment_sequence(name, suffix)
        if sequence is not None:
            found.append(sequence)
    return sorted(found)


def _cffi_writev():
    import cffi

    ffi = cffi.FFI()
    ffi.cdef("""
        struct iovec { void *iov_base; size_t iov_len; };
        ssize_t writev(int fd, const struct iovec *iov, int iovcnt);
    """)
    libc = ffi.dlopen(None)

    def writev(fd: int, buffers: List[memoryview]) -> int:
        count = len(buffers)
        iov = ffi.new("struct iovec[]", count)
        keep = []
        for i, view in enumerate(buffers):
            pointer = ffi.from_buffer(view)
            keep.append(pointer)
            iov[i].iov_base = pointer
            iov[i].iov_len = len(view)
        result = libc.writev(fd, iov, count)
        if result < 0:
            err = ffi.errno
            raise OSError(err, os.strerror(err))
        return result

    return writev


writev = getattr(os, "writev", None) or _cffi_writev()
