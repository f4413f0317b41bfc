"""sinks/digests.py: the standard library's answers, without copying the buffer on PyPy."""

from __future__ import annotations

import gc
import hashlib
import mmap
import platform
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks.digests import crc32, sha256_hex

MIB = 1024 * 1024


@given(st.binary(max_size=4096), st.integers(0, 2**32 - 1))
def test_same_answers_as_the_standard_library(data, start):
    view = memoryview(bytearray(data))[1:] if data else memoryview(b"")
    assert crc32(view) == zlib.crc32(view)
    assert crc32(view, start) == zlib.crc32(view, start)
    assert sha256_hex(view) == hashlib.sha256(view).hexdigest()


def _raw_bytes() -> int:
    # The public attribute is formatted text ("10.8MB"); _s holds the numbers.
    return gc.get_stats()._s.total_rawmalloced_memory  # type: ignore[attr-defined]


@pytest.mark.skipif(platform.python_implementation() != "PyPy", reason="raw-memory counters are PyPy's")
def test_a_10_mib_slice_of_an_mmap_is_not_copied_on_pypy():
    buffer = mmap.mmap(-1, 11 * MIB)
    view = memoryview(buffer)[1024:1024 + 10 * MIB]
    gc.collect()
    before = _raw_bytes()
    for _ in range(3):
        crc32(view)
        sha256_hex(view)
    grown = _raw_bytes() - before
    # A copy of the view would be 10 MiB per call.
    assert grown < MIB, grown
