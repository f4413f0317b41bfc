"""buffers.copy.copy_into: the same bytes as slice assignment, overlapping or not."""

from __future__ import annotations

import mmap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buffers.copy import copy_into


@given(data=st.binary(min_size=1, max_size=300), dest_at=st.integers(0, 299), src_at=st.integers(0, 299),
       count=st.integers(0, 300))
def test_copy_into_matches_slice_assignment_even_when_overlapping(data, dest_at, src_at, count):
    buf = bytearray(data)
    dest_at, src_at = dest_at % len(buf), src_at % len(buf)
    count = min(count, len(buf) - dest_at, len(buf) - src_at)
    expected = bytearray(buf)
    expected[dest_at:dest_at + count] = bytes(buf[src_at:src_at + count])
    view = memoryview(buf)
    copy_into(view[dest_at:], view[src_at:src_at + count])
    assert buf == expected


def test_copy_into_an_mmap_view():
    ring = mmap.mmap(-1, 4096)
    copy_into(memoryview(ring)[10:], memoryview(bytearray(b"abc")))
    assert ring[10:13] == b"abc"
    ring.close()


def test_copy_into_a_smaller_destination_fails():
    with pytest.raises(ValueError):
        copy_into(memoryview(bytearray(2)), memoryview(bytearray(3)))


def test_pypy_ffi_is_given_on_pypy_only_and_fresh_each_time():
    import platform

    from buffers.copy import pypy_ffi

    first, second = pypy_ffi(), pypy_ffi()
    if platform.python_implementation() != "PyPy":
        assert first is None and second is None
        return
    assert first is not second
    first.cdef("int abs(int);")
    assert first.dlopen(None).abs(-3) == 3
