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

from sinks.digests import Sha256, crc32, sha256_hex

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


@given(st.lists(st.binary(max_size=2048), max_size=8))
def test_a_hash_fed_in_pieces_is_the_hash_of_the_whole(pieces):
    digest = Sha256()
    for piece in pieces:
        digest.update(memoryview(bytearray(piece)))
    assert digest.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_an_ended_hash_takes_no_more_and_the_next_one_starts_afresh():
    first = Sha256()
    first.update(b"abc")
    assert first.hexdigest() == hashlib.sha256(b"abc").hexdigest()
    if platform.python_implementation() == "PyPy":
        with pytest.raises(ValueError):
            first.update(b"more")
    second = Sha256()  # on PyPy, the first one's context again
    second.update(b"xyz")
    assert second.hexdigest() == hashlib.sha256(b"xyz").hexdigest()


@pytest.mark.skipif(platform.python_implementation() != "PyPy", reason="OpenSSL contexts are reused on PyPy")
def test_hashes_reuse_their_contexts_on_pypy():
    from sinks import digests

    for _ in range(3):
        Sha256().hexdigest()
    idle = list(digests._contexts.idle)
    for _ in range(100):
        digest = Sha256()
        digest.update(b"x" * 100)
        digest.hexdigest()
    assert digests._contexts.idle == idle
