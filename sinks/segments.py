"""``writev(2)`` on both interpreters: ``os.writev`` where it exists (CPython),
a cffi call of libc's ``writev`` elsewhere (PyPy 3.9's ``os`` lacks it), so
segment writes go from ring slices to the kernel without a copy."""

from __future__ import annotations

import os
from typing import List

__all__ = ["writev"]


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
