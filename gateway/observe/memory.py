"""Process-wide memory settings the gateway makes when it starts serving.

The ``sluice serve`` process (or worker) calls them; a gateway embedded in
another program (the tests) leaves the process's settings alone.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Optional

import trio

__all__ = ["MALLOC_ARENAS", "limit_malloc_arenas", "freeze_startup_heap", "malloc_trimmer",
           "TRIM_CHECK", "trim_after_collections"]

#: glibc gives each thread that allocates its own malloc arena (64 MiB of
#: address space, tens of MB resident once used) up to 8 per core.  The
#: gateway's threads (file writes, AWS calls, Redis Cluster) allocate
#: little; their arenas alone measured about 110 MB of RSS on PyPy under
#: load.  Two arenas is what MALLOC_ARENA_MAX=2 would give.
MALLOC_ARENAS = 2
# mallopt's parameter number for the arena limit (M_ARENA_MAX in malloc.h).
_M_ARENA_MAX = -8


def _glibc(name: str, declaration: str) -> Optional[Callable[..., Any]]:
    """The C library's function ``name`` (declared by ``declaration``) through
    cffi, or None off Linux or where it is missing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        from cffi import FFI

        ffi = FFI()
        ffi.cdef(declaration)
        return getattr(ffi.dlopen(None), name)
    except (ImportError, OSError, AttributeError):
        return None


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for threads started from now on; whether it took.

    An operator's ``MALLOC_ARENA_MAX`` environment variable wins (glibc read
    it at start); on other C libraries this does nothing.
    """
    import os

    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    mallopt = _glibc("mallopt", "int mallopt(int param, int value);")
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, arenas))


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


#: Seconds between looks at the count of major collections.
TRIM_CHECK = 1.0


def malloc_trimmer() -> Optional[Callable[[], Any]]:
    """glibc's ``malloc_trim(0)`` through cffi, or None where there is none."""
    trim = _glibc("malloc_trim", "int malloc_trim(size_t pad);")
    return None if trim is None else lambda: trim(0)


async def trim_after_collections(collections: Callable[[], int], trim: Callable[[], Any], *,
                                 every: float = TRIM_CHECK,
                                 task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Call ``trim`` in a thread after each major collection, until cancelled.

    ``collections()`` counts the major collections so far.  A major
    collection frees whole runs of memory that malloc keeps for reuse; PyPy's
    heap, made of many small arenas with live ones among them, then holds
    tens of MB of free pages that stay resident.  ``malloc_trim`` hands them
    back to the kernel, walking the whole heap: about 4 ms at the design load,
    so it runs in a thread of its own (cffi lets go of the interpreter lock),
    which the loop never waits for.  One trim at a time.
    """
    running = threading.Event()
    task_status.started()
    seen = collections()
    while True:
        await trio.sleep(every)
        count = collections()
        if count != seen and not running.is_set():
            seen = count
            running.set()
            # Its outcome is dropped: glibc's malloc_trim does not fail.
            trio.lowlevel.start_thread_soon(trim, lambda outcome: running.clear())
