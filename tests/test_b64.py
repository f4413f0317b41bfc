from __future__ import annotations

import array
import base64
import ctypes.util
import random
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinks.aws import b64
from sinks.aws.b64 import (
    CFFI,
    NUL_SLACK,
    PYTHON,
    BackendUnavailable,
    Base64Writer,
    available_backends,
    encoded_length,
)

BACKENDS = available_backends()
needs_cffi = pytest.mark.skipif(CFFI not in BACKENDS, reason="libcrypto/cffi not loadable")
FILL = 0xA5  # marks output bytes that must stay untouched


def _blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).getrandbits(8 * n).to_bytes(n, "little") if n else b""


sizes = st.one_of(
    st.integers(0, 64),
    st.integers(0, 4096),
    st.integers(60_000, 300_000),  # a few large inputs
)


def test_python_backend_always_available():
    assert PYTHON in BACKENDS
    assert BACKENDS[-1] == PYTHON


def test_auto_picks_the_fastest():
    w = Base64Writer(bytearray(16))
    assert w.backend == BACKENDS[0]
    w.close()


@pytest.mark.parametrize("n", range(0, 10))
def test_encoded_length(n):
    assert encoded_length(n) == len(base64.b64encode(b"x" * n))


def _encode_with(backend, data, start, stop, pos, capacity):
    out = bytearray([FILL]) * capacity
    with Base64Writer(out, backend=backend) as w, w.source(data) as src:
        end = w.encode_into(src, start, stop, pos)
    return out, end


@needs_cffi
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=sizes, data=st.data())
def test_backends_identical(size, data):
    buf = bytearray(_blob(size, seed=size))
    start = data.draw(st.integers(0, size))
    stop = data.draw(st.integers(start, size))
    pos = data.draw(st.integers(0, 40))
    slack = data.draw(st.integers(NUL_SLACK, 8))
    capacity = pos + encoded_length(stop - start) + slack
    want = base64.b64encode(bytes(buf[start:stop]))
    results = {}
    for backend in (CFFI, PYTHON):
        out, end = _encode_with(backend, buf, start, stop, pos, capacity)
        assert end == pos + len(want)
        assert bytes(out[pos:end]) == want
        assert out[:pos] == bytearray([FILL]) * pos
        # cffi writes its NUL at out[end]; nothing past that is touched.
        assert out[end + NUL_SLACK:] == bytearray([FILL]) * (capacity - end - NUL_SLACK)
        results[backend] = bytes(out[:end])
    assert results[CFFI] == results[PYTHON]


@needs_cffi
def test_cffi_writes_its_nul_into_the_slack():
    out, end = _encode_with(CFFI, b"abc", 0, 3, 0, 5)
    assert bytes(out[:end]) == b"YWJj" and out[end] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_fit_needs_one_spare_byte(backend):
    data = b"hello world"
    need = encoded_length(len(data))
    with Base64Writer(bytearray(need + NUL_SLACK), backend=backend) as w:
        assert w.encode(data, 0) == need
    with Base64Writer(bytearray(need), backend=backend) as w:
        with pytest.raises(ValueError):
            w.encode(data, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start,stop,pos", [(-1, 3, 0), (2, 1, 0), (0, 11, 0), (0, 3, -1), (0, 3, 60)])
def test_out_of_range_raises_before_writing(backend, start, stop, pos):
    out = bytearray([FILL]) * 64
    with Base64Writer(out, backend=backend) as w, w.source(bytearray(10)) as src:
        with pytest.raises(ValueError):
            w.encode_into(src, start, stop, pos)
    assert out == bytearray([FILL]) * 64


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_source_and_writer_refuse(backend):
    w = Base64Writer(bytearray(64), backend=backend)
    src = w.source(bytearray(b"abc"))
    src.close()
    assert src.closed
    with pytest.raises(ValueError):
        w.encode_into(src, 0, 3, 0)
    src = w.source(bytearray(b"abc"))
    w.close()
    with pytest.raises(ValueError):
        w.encode_into(src, 0, 3, 0)
    src.close()


@needs_cffi
def test_cffi_writer_refuses_python_source():
    with Base64Writer(bytearray(64), backend=CFFI) as w:
        foreign = b64.Source(bytearray(b"abc"), PYTHON)
        with pytest.raises(ValueError):
            w.encode_into(foreign, 0, 3, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_off_buffers_of_any_shape(backend):
    ints = array.array("I", [1, 2, 3])
    cases = [b"bytes", bytearray(b"bytearray"), memoryview(b"0123456789")[2:7], ints]
    out = bytearray(64)
    with Base64Writer(out, backend=backend) as w:
        for data in cases:
            end = w.encode(data, 1)
            assert bytes(out[1:end]) == base64.b64encode(bytes(memoryview(data)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_refuses_non_contiguous_and_read_only(backend):
    with pytest.raises(ValueError):
        Base64Writer(b"read-only" * 4, backend=backend)  # type: ignore[arg-type]
    with Base64Writer(bytearray(64), backend=backend) as w:
        with pytest.raises(ValueError):
            w.source(memoryview(bytearray(10))[::2])


def test_unknown_backend():
    with pytest.raises(ValueError):
        Base64Writer(bytearray(8), backend="openssl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_source_reads_live_memory_not_a_copy(backend):
    ring = bytearray(b"aaaa")
    out = bytearray(16)
    with Base64Writer(out, backend=backend) as w, w.source(ring) as src:
        end = w.encode_into(src, 0, 4, 0)
        first = bytes(out[:end])
        ring[:] = b"bbbb"  # same size: the export stays valid
        w.encode_into(src, 0, 4, 0)
        assert first == b"YWFhYQ==" and bytes(out[:end]) == b"YmJiYg=="


def test_fallback_when_libcrypto_is_missing(monkeypatch):
    monkeypatch.setattr(b64, "_libcrypto", None)
    monkeypatch.setattr(b64, "_libcrypto_error", None)
    monkeypatch.setattr(b64, "_LIBCRYPTO_NAMES", ("libsluice-no-such-crypto.so",))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert available_backends() == (PYTHON,)
    with Base64Writer(bytearray(16)) as w:
        assert w.backend == PYTHON
        assert w.encode(b"hi", 0) == 4
    with pytest.raises(BackendUnavailable):
        Base64Writer(bytearray(16), backend=CFFI)


@needs_cffi
@pytest.mark.skipif(sys.implementation.name != "cpython", reason="needs tracemalloc")
def test_cffi_encode_allocates_nothing_per_call():
    import tracemalloc

    payload = bytearray(_blob(1 << 20))
    out = bytearray(encoded_length(len(payload)) + NUL_SLACK)
    with Base64Writer(out, backend=CFFI) as w, w.source(payload) as src:
        w.encode_into(src, 0, len(payload), 0)  # warm up
        tracemalloc.start()
        try:
            for _ in range(20):
                w.encode_into(src, 0, len(payload), 0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 16 * 1024  # 20 MiB of input, no per-call copies
