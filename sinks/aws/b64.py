"""Base64 from long-lived buffers straight into a preallocated output.

Theory of operation
-------------------
The Kinesis and Firehose JSON bodies carry each record as base64 text.  That
encoding is one of the copies Sluice cannot avoid, so it is done once, from
the ring's memory directly into the request body, without a ``bytes`` object
per record.

A `Base64Writer` owns one output buffer (a batch body).  Each long-lived
input buffer (the ring's ``bytearray``) is exported once as a `Source`;
`Base64Writer.encode_into` then encodes ``source[start:stop]`` at a position
of the output and returns the position just past the text.

Two backends give byte-identical output:

``"cffi"``
    OpenSSL's ``EVP_EncodeBlock`` through cffi's ABI mode (no compiler).  The
    buffers are exported with ``ffi.from_buffer`` once and each call passes
    pointer + offset: exporting per call costs more than it saves on CPython
    for 1 KiB records.  ``EVP_EncodeBlock`` NUL-terminates its output, so one
    byte past the text is overwritten; `encode_into` therefore requires
    `NUL_SLACK` spare byte in the output, and the body layout always writes a
    closing quote there next.
``"python"``
    ``binascii.b2a_base64`` on a memoryview slice, then a same-length slice
    assignment: one temporary ``bytes`` per call.  Chosen automatically where
    cffi or libcrypto is missing; selectable for tests and benchmarks.

Both backends enforce the same bounds, because the C one writes through a raw
pointer: an out-of-range call raises ``ValueError`` instead of corrupting
memory.  An exported buffer must not be resized while a `Source` or writer
holds it (CPython refuses the resize; PyPy does not, and the pointer would
dangle), so export only preallocated, fixed-size buffers.
"""
from __future__ import annotations

import binascii
import ctypes.util
from typing import Any, Optional, Tuple

__all__ = [
    "AUTO",
    "CFFI",
    "PYTHON",
    "MAX_INPUT_BYTES",
    "NUL_SLACK",
    "BackendUnavailable",
    "Base64Writer",
    "Source",
    "available_backends",
    "encoded_length",
]

AUTO = "auto"
CFFI = "cffi"
PYTHON = "python"

# EVP_EncodeBlock takes the input length and returns the output length as a
# C int; this is the largest input whose base64 text still fits an int.
MAX_INPUT_BYTES = (2**31 - 1) // 4 * 3

# EVP_EncodeBlock writes a NUL after the text.
NUL_SLACK = 1

_CDEF = "int EVP_EncodeBlock(unsigned char *t, const unsigned char *f, int n);"

# Sonames tried after ctypes.util.find_library: OpenSSL 3 and 1.1 on Linux,
# the unversioned development link, and macOS.
_LIBCRYPTO_NAMES = (
    "libcrypto.so.3",
    "libcrypto.so.1.1",
    "libcrypto.so",
    "libcrypto.3.dylib",
    "libcrypto.dylib",
)


class BackendUnavailable(RuntimeError):
    """The requested base64 backend cannot run in this process."""


def encoded_length(n: int) -> int:
    """Length of the padded base64 text for *n* input bytes."""
    return (n + 2) // 3 * 4


# (ffi, lib) once loaded, or the reason loading failed; loaded on first use
# because ctypes.util.find_library may spawn a subprocess.
_libcrypto: Optional[Tuple[Any, Any]] = None
_libcrypto_error: Optional[BaseException] = None


def _load_libcrypto() -> Tuple[Any, Any]:
    global _libcrypto, _libcrypto_error
    if _libcrypto is not None:
        return _libcrypto
    if _libcrypto_error is not None:
        raise BackendUnavailable(str(_libcrypto_error)) from _libcrypto_error
    try:
        _libcrypto = _open_libcrypto()
    except BackendUnavailable as exc:
        _libcrypto_error = exc
        raise
    return _libcrypto


def _open_libcrypto() -> Tuple[Any, Any]:
    try:
        import cffi
    except ImportError as exc:
        raise BackendUnavailable("cffi is not installed") from exc
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    names = []
    found = ctypes.util.find_library("crypto")
    if found:
        names.append(found)
    names.extend(n for n in _LIBCRYPTO_NAMES if n not in names)
    tried = []
    for name in names:
        try:
            lib = ffi.dlopen(name)
            encode = lib.EVP_EncodeBlock
        except (OSError, AttributeError) as exc:
            tried.append(f"{name}: {exc}")
            continue
        if _self_test(ffi, encode):
            return ffi, lib
        tried.append(f"{name}: EVP_EncodeBlock gave wrong output")
    raise BackendUnavailable("no usable libcrypto (" + "; ".join(tried) + ")")


def _self_test(ffi: Any, encode: Any) -> bool:
    # Guards against a library exporting the name with another meaning.
    sample = b"\x00\xffSluice?>"
    out = bytearray(encoded_length(len(sample)) + NUL_SLACK)
    n = encode(ffi.from_buffer("unsigned char[]", out), sample, len(sample))
    expected = binascii.b2a_base64(sample, newline=False)
    return n == len(expected) and bytes(out[:n]) == expected


def available_backends() -> Tuple[str, ...]:
    """Names of the backends that work here, fastest first."""
    try:
        _load_libcrypto()
    except BackendUnavailable:
        return (PYTHON,)
    return (CFFI, PYTHON)


def _resolve(backend: str) -> str:
    if backend == AUTO:
        return available_backends()[0]
    if backend == CFFI:
        _load_libcrypto()
        return CFFI
    if backend == PYTHON:
        return PYTHON
    raise ValueError(f"unknown base64 backend {backend!r}")


class Source:
    """A long-lived input buffer, exported once for a backend.

    Create it with `Base64Writer.source`; it can feed any writer of the same
    backend.  Call `close` (or use ``with``) when the buffer is retired.
    """

    __slots__ = ("backend", "nbytes", "_view", "_ptr", "_ffi")

    def __init__(self, buf: Any, backend: str, *, writable: bool = False) -> None:
        view = memoryview(buf)
        if not view.c_contiguous:
            raise ValueError("base64 buffers must be C-contiguous")
        if writable and view.readonly:
            raise ValueError("output buffer is read-only")
        self.backend = backend
        self.nbytes = view.nbytes
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._view: Optional[memoryview] = view
        self._ptr: Any = None
        self._ffi: Any = None
        if backend == CFFI:
            ffi, _ = _load_libcrypto()
            self._ffi = ffi
            self._ptr = ffi.from_buffer("unsigned char[]", buf, require_writable=writable)

    @property
    def closed(self) -> bool:
        return self._view is None

    def close(self) -> None:
        """Release the export; the buffer may be resized afterwards."""
        if self._ptr is not None:
            self._ffi.release(self._ptr)
            self._ptr = None
        if self._view is not None:
            self._view.release()
            self._view = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Base64Writer:
    """Encodes base64 into one preallocated output buffer.

    ``backend`` is ``"auto"`` (cffi when libcrypto loads, else python),
    ``"cffi"`` (raises `BackendUnavailable` if it cannot) or ``"python"``.
    """

    def __init__(self, out: Any, *, backend: str = AUTO) -> None:
        self.backend = _resolve(backend)
        self._out = Source(out, self.backend, writable=True)
        self.capacity = self._out.nbytes
        self._encode: Any = None
        if self.backend == CFFI:
            self._encode = _load_libcrypto()[1].EVP_EncodeBlock

    def source(self, buf: Any) -> Source:
        """Export *buf* once for repeated `encode_into` calls."""
        return Source(buf, self.backend)

    def encode_into(self, src: Source, start: int, stop: int, pos: int) -> int:
        """Encode ``src[start:stop]`` at *pos*; return the end of the text.

        The output must have room for the text plus `NUL_SLACK` byte, which
        the cffi backend overwrites.
        """
        n = stop - start
        end = pos + (n + 2) // 3 * 4
        if (
            start < 0
            or n < 0
            or stop > src.nbytes
            or pos < 0
            or end + NUL_SLACK > self.capacity
            or n > MAX_INPUT_BYTES
        ):
            raise ValueError(
                f"encode of [{start}:{stop}] of {src.nbytes} bytes at {pos} "
                f"does not fit an output of {self.capacity} bytes"
            )
        out = self._out
        if self._encode is not None:
            if src._ptr is None or out._ptr is None:
                raise ValueError("source or writer is closed or of another backend")
            self._encode(out._ptr + pos, src._ptr + start, n)
        else:
            if src._view is None or out._view is None:
                raise ValueError("source or writer is closed")
            out._view[pos:end] = binascii.b2a_base64(src._view[start:stop], newline=False)
        return end

    def encode(self, data: Any, pos: int) -> int:
        """Encode a one-off buffer at *pos*, exporting it for this call only.

        For buffers that live long, export a `Source` once instead.
        """
        src = Source(data, self.backend)
        try:
            return self.encode_into(src, 0, src.nbytes, pos)
        finally:
            src.close()

    def close(self) -> None:
        """Release the output buffer's export."""
        self._out.close()
        self._encode = None

    def __enter__(self) -> Base64Writer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

