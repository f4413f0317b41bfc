"""CRC-32 and SHA-256 of a buffer, read in place on both interpreters.

CPython's ``zlib.crc32`` and ``hashlib.sha256`` read a ``memoryview`` where it
lies.  PyPy 3.9's first copy the whole buffer into raw memory (a 10 MiB
record cost 10 MiB more, seen in ``gc.get_stats().total_rawmalloced_memory``
until the next major collection).  On PyPy these functions therefore call
zlib's ``crc32`` and OpenSSL's ``SHA256`` through cffi on a pointer to the
buffer (``ffi.from_buffer``, no copy), and fall back to the standard library
when cffi or either library is missing.

`Sha256` hashes a buffer given in pieces.  On PyPy each ``hashlib`` hash
object also holds an OpenSSL context freed by a finalizer: garbage that the
collector's end-of-marking step must walk and queue (a few thousand of them
between two major collections at the design load).  `Sha256` reuses its
contexts instead.
"""
from __future__ import annotations

import hashlib
import zlib
from typing import Any, Callable, List, Optional, Tuple

from buffers.copy import pypy_ffi

__all__ = ["crc32", "sha256_hex", "Sha256"]

#: zlib's crc32 takes an ``unsigned int`` length: feed it at most this much per call.
_CRC_CHUNK = 1 << 30
_LIBZ = ("libz.so.1", "libz.so", "libz.dylib")
_LIBCRYPTO = ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so", "libcrypto.3.dylib", "libcrypto.dylib")
_CDEF = """
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int len);
    unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md);
    typedef struct evp_md_ctx_st EVP_MD_CTX;
    typedef struct evp_md_st EVP_MD;
    const EVP_MD *EVP_sha256(void);
    EVP_MD_CTX *EVP_MD_CTX_new(void);
    void EVP_MD_CTX_free(EVP_MD_CTX *ctx);
    int EVP_DigestInit_ex(EVP_MD_CTX *ctx, const EVP_MD *type, void *impl);
    int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *d, size_t cnt);
    int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *s);
"""


def _dlopen(ffi: Any, names: Tuple[str, ...]) -> Any:
    for name in names:
        try:
            return ffi.dlopen(name)
        except OSError:
            continue
    return None


def _in_place() -> Tuple[Optional[Callable[..., int]], Optional[Callable[[Any], str]], Any]:
    """cffi versions of crc32 and sha256_hex and a maker of reusable SHA-256
    contexts, or None where the stdlib is used."""
    ffi = pypy_ffi()
    if ffi is None:
        return None, None, None
    ffi.cdef(_CDEF)
    libz, libcrypto = _dlopen(ffi, _LIBZ), _dlopen(ffi, _LIBCRYPTO)
    crc_fn = sha_fn = contexts = None
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
        try:
            contexts = _OpenSSLContexts(ffi, libcrypto)
        except AttributeError:  # an OpenSSL before 1.1 names its contexts differently
            contexts = None
    return crc_fn, sha_fn, contexts


class _OpenSSLContexts:
    """SHA-256 contexts of OpenSSL's EVP interface, kept for reuse."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        self.ffi, self.lib = ffi, lib
        self.sha256 = lib.EVP_sha256()
        self.new, self.free = lib.EVP_MD_CTX_new, lib.EVP_MD_CTX_free
        self.init, self.update = lib.EVP_DigestInit_ex, lib.EVP_DigestUpdate
        self.final = lib.EVP_DigestFinal_ex
        #: Contexts not in use.  Only a hasher dropped unfinished (a cancelled
        #: call) leaves its context to the collector.
        self.idle: List[Any] = []

    def take(self) -> Any:
        if self.idle:
            ctx = self.idle.pop()
        else:
            ctx = self.new()
            if ctx == self.ffi.NULL:
                raise MemoryError("OpenSSL could not make a digest context")
            ctx = self.ffi.gc(ctx, self.free)
        if not self.init(ctx, self.sha256, self.ffi.NULL):
            raise ValueError("OpenSSL could not start a SHA-256 digest")
        return ctx


_crc_in_place, _sha_in_place, _contexts = _in_place()


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


class Sha256:
    """``hashlib.sha256()`` fed piece by piece, reading each piece in place.

    On PyPy the OpenSSL context is taken from a pool and given back by
    `hexdigest`, which ends the hash: a `Sha256` is used once.
    """

    __slots__ = ("_ctx", "_hash")

    def __init__(self) -> None:
        self._ctx: Any = None
        self._hash: Any = None
        if _contexts is not None:
            self._ctx = _contexts.take()
        else:
            self._hash = hashlib.sha256()

    def update(self, data: Any) -> None:
        """Add ``data`` (bytes or a memoryview) to the hash."""
        if self._hash is not None:
            self._hash.update(data)
            return
        if self._ctx is None:
            raise ValueError("this hash has ended")
        size = len(data)
        if size and not _contexts.update(self._ctx, _contexts.ffi.from_buffer(data), size):
            raise ValueError("OpenSSL could not update a SHA-256 digest")

    def hexdigest(self) -> str:
        """The hash of everything added, as hex; ends the hash."""
        if self._hash is not None:
            return self._hash.hexdigest()
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            raise ValueError("this hash has ended")
        ffi = _contexts.ffi
        out = ffi.new("unsigned char[32]")
        ok = _contexts.final(ctx, out, ffi.NULL)
        _contexts.idle.append(ctx)
        if not ok:
            raise ValueError("OpenSSL could not finish a SHA-256 digest")
        return ffi.buffer(out, 32)[:].hex()
