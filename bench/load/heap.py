"""Where a gateway's memory goes, and what its garbage collector must walk.

:func:`memory` reads the interpreter's own accounting: on PyPy,
``gc.get_stats()`` (GC arenas, raw-malloced objects, nursery, JIT machine
code); on CPython, the allocator's block count.  :func:`census` walks the heap
once and counts the objects that make PyPy's major collection pause: the step
that ends marking is not incremental, and it visits every old object with a
finalizer and every old weak reference in one go.  It is taken at the end of a
measured window, never during it: walking the heap takes a moment.
"""
from __future__ import annotations

import collections
import gc
import platform
import re
import sys
import weakref
from typing import Any, Dict, List, Set, Tuple

__all__ = ["memory", "census", "snapshot", "young", "TOP_TYPES"]

_PYPY = platform.python_implementation() == "PyPy"
#: Types listed by name in a census, most numerous first.
TOP_TYPES = 15
_PYPY_FIELDS = ("total_gc_memory", "total_arena_memory", "total_rawmalloced_memory", "nursery_size",
                "jit_backend_used", "jit_backend_allocated", "total_allocated_memory", "peak_memory",
                "total_memory_pressure", "total_gc_time")
# Built-in types whose instances PyPy finalizes at interpreter level (they
# hold a descriptor, a mapping or C memory), though they define no __del__.
_NATIVE_FINALIZED = ("socket", "SSLSocket", "_SSLSocket", "BufferedReader", "BufferedWriter", "FileIO",
                     "TextIOWrapper", "mmap", "generator", "coroutine", "async_generator", "Popen",
                     "_CDataBase", "CDataOwnGC", "CDataGCP", "lock", "RLock", "SSLContext", "_SSLContext",
                     "select.epoll", "epoll", "PyCapsule")
_WEAK_TYPES = (weakref.ref, weakref.ProxyType, weakref.CallableProxyType)
_DIGITS = re.compile(r"(0x[0-9a-f]+|[0-9]+)")


def memory() -> Dict[str, Any]:
    """The interpreter's memory accounting now (bytes), by part, and the
    process's resident memory by kind of mapping (:func:`resident`)."""
    if _PYPY:
        stats = gc.get_stats()
        found: Dict[str, Any] = {name: getattr(stats, name, None) for name in _PYPY_FIELDS}
    else:
        found = {"allocated_blocks": sys.getallocatedblocks()}
    found["resident"] = resident()
    return found


def resident(path: str = "/proc/self/smaps") -> Dict[str, int]:
    """Resident bytes by kind of mapping: shared anonymous memory (the ring),
    private anonymous memory (the GC's arenas and malloc), the heap, code and
    data of files (the interpreter, libraries), and the rest.  Empty off Linux."""
    kinds: Dict[str, int] = collections.Counter()
    kind = "other"
    try:
        with open(path) as smaps:
            for line in smaps:
                fields = line.split()
                if not fields:
                    continue
                if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line
                    name = fields[5] if len(fields) > 5 else ""
                    shared = fields[1].endswith("s")
                    if name == "[heap]":
                        kind = "heap"
                    elif name.startswith("/dev/zero") or (not name and shared):
                        kind = "shared_anonymous"
                    elif not name or name.startswith("[anon"):
                        kind = "private_anonymous"
                    elif name.startswith("/"):
                        kind = "files"
                    else:
                        kind = "other"
                elif fields[0] == "Rss:":
                    kinds[kind] += int(fields[1]) * 1024
    except OSError:
        return {}
    return dict(kinds)


def _top(counter: collections.Counter) -> List[Tuple[str, int]]:
    return counter.most_common(TOP_TYPES)


def census() -> Dict[str, Any]:
    """Counts of heap objects that PyPy's end-of-marking step walks: objects with
    finalizers (a ``__del__``, or a native resource) and weakly referenced objects."""
    objects = gc.get_objects()
    by_type: collections.Counter = collections.Counter()
    finalized: collections.Counter = collections.Counter()
    weakly: collections.Counter = collections.Counter()
    cdata: collections.Counter = collections.Counter()
    weakrefs = 0
    for obj in objects:
        kind = type(obj)
        name = "%s.%s" % (getattr(kind, "__module__", "?"), kind.__qualname__)
        by_type[name] += 1
        # By type, not isinstance: a proxy whose referent died raises on
        # any look at its class.
        if issubclass(kind, _WEAK_TYPES):
            weakrefs += 1
            continue
        if getattr(kind, "__del__", None) is not None or kind.__name__ in _NATIVE_FINALIZED:
            finalized[name] += 1
            if kind.__name__ == "_CDataBase":
                # cffi's repr names the C type and what the object holds.
                cdata[_DIGITS.sub("N", repr(obj))] += 1
        try:
            if weakref.getweakrefcount(obj):
                weakly[name] += 1
        except TypeError:
            pass
    return {"objects": len(objects), "weakrefs": weakrefs,
            "finalized": sum(finalized.values()), "weakly_referenced": sum(weakly.values()),
            "top_types": _top(by_type), "top_finalized": _top(finalized),
            "top_weakly_referenced": _top(weakly), "top_cdata": _top(cdata),
            "top_packages": _top(_modules_by_package())}


def _modules_by_package() -> collections.Counter:
    """Imported modules by top-level package: what their code and names keep alive."""
    packages: collections.Counter = collections.Counter()
    for name in list(sys.modules):
        packages[name.partition(".")[0]] += 1
    return packages


def snapshot() -> Set[int]:
    """The ids of the objects alive now, for :func:`young`."""
    return {id(obj) for obj in gc.get_objects()}


def young(before: Set[int]) -> Dict[str, Any]:
    """The objects alive now that were not in ``before`` (a :func:`snapshot`
    taken a moment ago), by type and, for coroutines, generators and frames,
    by code: what a young collection now would move to the old generation.

    Taken under load, it shows what each request leaves alive past the
    collector's nursery (waits, records waiting for their batch, timers).
    Both walks hold the event loop for a moment.
    """
    objects = gc.get_objects()
    by_type: collections.Counter = collections.Counter()
    by_code: collections.Counter = collections.Counter()
    new = 0
    for obj in objects:
        if id(obj) in before:
            continue
        kind = type(obj)
        if kind is int:
            continue  # the snapshot's own ids
        new += 1
        by_type["%s.%s" % (getattr(kind, "__module__", "?"), kind.__qualname__)] += 1
        if kind.__name__ in ("coroutine", "generator", "frame"):
            code = next((getattr(obj, a) for a in ("cr_code", "gi_code", "f_code") if hasattr(obj, a)), None)
            if code is not None:
                by_code["%s %s:%s" % (kind.__name__, "/".join(code.co_filename.split("/")[-2:]),
                                      code.co_name)] += 1
    return {"objects": len(objects), "new": new, "top_types": by_type.most_common(2 * TOP_TYPES),
            "top_code": by_code.most_common(2 * TOP_TYPES)}
