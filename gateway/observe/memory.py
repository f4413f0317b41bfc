"""Process-wide memory settings the gateway makes when it starts serving.

The ``sluice serve`` process (or worker) calls them; a gateway embedded in
another program (the tests) leaves the process's settings alone.
"""

from __future__ import annotations

import sys

__all__ = ["MALLOC_ARENAS", "limit_malloc_arenas", "freeze_startup_heap"]

#: glibc gives each thread that allocates its own malloc arena (64 MiB of
#: address space, tens of MB resident once used) up to 8 per core.  The
#: gateway's threads (file writes, AWS calls, Redis Cluster) allocate
#: little; their arenas alone measured about 110 MB of RSS on PyPy under
#: load.  Two arenas is what MALLOC_ARENA_MAX=2 would give.
MALLOC_ARENAS = 2
# mallopt's parameter number for the arena limit (M_ARENA_MAX in malloc.h).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for threads started from now on; whether it took.

    An operator's ``MALLOC_ARENA_MAX`` environment variable wins (glibc read
    it at start); on other C libraries this does nothing.
    """
    import os

    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        from cffi import FFI

        ffi = FFI()
        ffi.cdef("int mallopt(int param, int value);")
        libc = ffi.dlopen(None)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (ImportError, OSError, AttributeError):
        return False


def freeze_startup_heap() -> bool:
    """CPython: collect once, then move every object alive now out of the
    collector's reach (``gc.freeze``); whether it did.

    The modules, botocore's models and the gateway's own structures live as
    long as the process, yet every full collection walked them: at the
    design load (500 requests/s) that was a 50 ms pause every half minute or
    so.  Frozen, a full collection walks only what was made since.  PyPy's
    collector is incremental and has no ``gc.freeze``: nothing to do.
    """
    import gc

    freeze = getattr(gc, "freeze", None)
    if freeze is None or sys.implementation.name != "cpython":
        return False
    gc.collect()
    freeze()
    return True
