"""Copying between buffers without a temporary copy on PyPy.

On CPython, ``dest[a:b] = src[c:d]`` between memoryviews is one memcpy.  On
PyPy it first copies the source into a new bytes object, so a body part
moved from a connection's receive buffer into its ring slot made garbage of
twice its size (measured: about 67 KB of nursery for a 32 KiB copy).  There,
:func:`copy_into` uses cffi's ``memmove`` (built into PyPy), which copies in
place and handles overlapping ranges; it makes two small pointer objects per
call.  Without cffi it falls back to slice assignment.
"""

from __future__ import annotations

import platform
from typing import Any, Callable

__all__ = ["copy_into", "pypy_ffi"]


def pypy_ffi() -> Any:
    """A new ``cffi.FFI`` on PyPy, where C called on a buffer's own memory
    saves the interpreter's copies; None elsewhere or without cffi."""
    if platform.python_implementation() != "PyPy":
        return None
    try:
        import cffi
    except ImportError:  # pragma: no cover - cffi is part of PyPy
        return None
    return cffi.FFI()


def _slice_copy(dest: memoryview, src: memoryview) -> None:
    dest[:len(src)] = src


def _make_copy() -> Callable[[memoryview, memoryview], None]:
    ffi = pypy_ffi()
    if ffi is None:
        return _slice_copy
    from_buffer = ffi.from_buffer
    memmove = ffi.memmove

    def _memmove_copy(dest: memoryview, src: memoryview) -> None:
        count = len(src)
        if count > len(dest):
            raise ValueError("destination smaller than source")
        if count:
            memmove(from_buffer(dest, require_writable=True), from_buffer(src), count)

    return _memmove_copy


#: ``copy_into(dest, src)``: copy all of ``src`` to the start of ``dest``
#: (memoryviews of bytes; they may overlap).
copy_into = _make_copy()
