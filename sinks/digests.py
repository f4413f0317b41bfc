"""CRC-32 and SHA-256 of a buffer, read in place on both interpreters.

CPython's ``zlib.crc32`` and ``hashlib.sha256`` read a ``memoryview`` where it
lies.  PyPy 3.9's first copy the whole buffer into raw memory (a 10 MiB
record cost 10 MiB more, seen in ``gc.get_stats().total_rawmalloced_memory``
until the next major collection).  On PyPy these functions therefore call
zlib's ``crc32`` and OpenSSL's ``SHA256`` through cffi on a pointer to the
buffer (``ffi.from_buffer``, no copy), and fall back to the standard library
when cffi or either library is missing.
"""
from __future__ import annotations

import hashlib
import platform
import zlib
from typing import Any, Callable, Optional, Tuple

__all__ = ["crc32", "sha256_hex"]

#: zlib's crc32 takes an ``unsigned int`` length: feed it at most this much per call.
_CRC_CHUNK = 1 << 30
_LIBZ = ("libz.so.1", "libz.so", "libz.dylib")
_LIBCRYPTO = ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so", "libcrypto.3.dylib", "libcrypto.dylib")
_CDEF = """
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int len);
    unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md);
"""


def _dlopen(ffi: Any, names: Tuple[str, ...]) -> Any:
    for name in names:
        try:
            return ffi.dlopen(name)
        except OSError:
            continue
    return None


def _in_place() -> Tuple[Optional[Callable[..., int]], Optional[Callable[[Any], str]]]:
    """cffi versions of crc32 and sha256_hex, or None where the stdlib is used."""
    if platform.python_implementation() != "PyPy":
        return None, None
    try:
        import cffi
    except ImportError:
        return None, None
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    libz, libcrypto = _dlopen(ffi, _LIBZ), _dlopen(ffi, _LIBCRYPTO)
    crc_fn = sha_fn = None
    if libz is not None:
        def crc_fn(data: Any, value: int = 0) -> int:
            size = len(data)
            if size == 0:
                return value
            pointer = ffi.from_buffer(data)
            done = 0
            while done < size:
                step = min(size - done, _CRC_CHUNK)
                value = libz.crc32(value, pointer + done, step)
                done += step
            return value & 0xFFFFFFFF
    if libcrypto is not None:
        def sha_fn(data: Any) -> str:
            digest = ffi.new("unsigned char[32]")
            source = ffi.from_buffer(data) if len(data) else ffi.NULL
            libcrypto.SHA256(source, len(data), digest)
            return bytes(ffi.buffer(digest, 32)).hex()
    return crc_fn, sha_fn


_crc_in_place, _sha_in_place = _in_place()


def crc32(data: Any, value: int = 0) -> int:
    """``zlib.crc32(data, value)``, reading ``data`` (bytes or a memoryview) in place."""
    if _crc_in_place is not None:
        return _crc_in_place(data, value)
    return zlib.crc32(data, value)


def sha256_hex(data: Any) -> str:
    """``hashlib.sha256(data).hexdigest()``, reading ``data`` in place."""
    if _sha_in_place is not None:
        return _sha_in_place(data)
    return hashlib.sha256(data).hexdigest()
