"""Process-wide memory settings the gateway makes when it starts serving.

The ``sluice serve`` process (or worker) calls them; a gateway embedded in
another program (the tests) leaves the process's settings alone.
"""

from __future__ import annotations

import mmap
import re
import struct
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import trio

__all__ = ["MALLOC_ARENAS", "limit_malloc_arenas", "freeze_startup_heap", "malloc_trimmer",
           "TRIM_CHECK", "trim_after_collections", "RELOCATIONS_WORTH_RELEASING",
           "relocation_ranges", "release_relocations", "smaps_field"]

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


#: Smallest relocation table worth giving back: PyPy's library has 16 MB of
#: them; the C libraries and CPython's own executable, a few hundred KB.
RELOCATIONS_WORTH_RELEASING = 1 << 20
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) \S+ \d+\s+(/.*)$")
_ELF64_LE = b"\x7fELF\x02\x01"
_SHT_RELA, _SHT_REL = 4, 9
_MADV_DONTNEED = 4


def dynamic_relocations(path: str) -> Optional[Tuple[int, int]]:
    """File offset and size of the dynamic relocation table (``.rela.dyn``
    or ``.rel.dyn``) of the 64-bit little-endian ELF file at ``path``, or None."""
    try:
        with open(path, "rb") as elf:
            header = elf.read(64)
            if len(header) < 64 or not header.startswith(_ELF64_LE):
                return None
            shoff, = struct.unpack_from("<Q", header, 40)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", header, 58)
            if not shoff or shentsize < 64 or not shnum or shstrndx >= shnum:
                return None
            elf.seek(shoff)
            table = elf.read(shentsize * shnum)
            if len(table) < shentsize * shnum:
                return None
            sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
            names_offset, names_size = sections[shstrndx][4], sections[shstrndx][5]
            elf.seek(names_offset)
            names = elf.read(names_size)
    except OSError:
        return None
    for name, kind, _flags, _addr, offset, size in sections:
        label = names[name:names.find(b"\0", name)]
        if (kind, label) in ((_SHT_RELA, b".rela.dyn"), (_SHT_REL, b".rel.dyn")):
            return offset, size
    return None


def relocation_ranges(maps: str, smaps_anonymous: Dict[int, int],
                      relocations: Callable[[str], Optional[Tuple[int, int]]] = dynamic_relocations,
                      least: int = RELOCATIONS_WORTH_RELEASING,
                      page: int = mmap.PAGESIZE) -> List[Tuple[int, int, str]]:
    """(start, end, path) of each whole page of a loaded library's dynamic
    relocation table that may be given back, from ``/proc/self/maps`` text.

    Only read-only private mappings that hold the table whole and no page the
    process wrote to (``smaps_anonymous``: a mapping's start address → its
    ``Anonymous`` bytes, 0 for none) qualify: their pages are the file's own,
    so a page touched again is read back from the file, unchanged.
    """
    ranges: List[Tuple[int, int, str]] = []
    seen = set()
    for line in maps.splitlines():
        match = _MAPS_LINE.match(line)
        if match is None:
            continue
        start, end, perms, offset = (int(match.group(1), 16), int(match.group(2), 16),
                                     match.group(3), int(match.group(4), 16))
        path = match.group(5)
        if perms != "r--p" or path in seen or smaps_anonymous.get(start, 1) != 0:
            continue
        table = relocations(path)
        if table is None or table[1] < least:
            continue
        begin, stop = table[0] - offset, table[0] + table[1] - offset
        if begin < 0 or stop > end - start:
            continue
        seen.add(path)
        # Inward to whole pages: the first and last may hold other sections.
        first = start + -(-begin // page) * page
        last = start + stop // page * page
        if last > first:
            ranges.append((first, last, path))
    return ranges


def smaps_field(smaps: str, field: str) -> Dict[int, int]:
    """Each mapping's start address → its ``field`` (``"Rss"``, ``"Anonymous"``...)
    in bytes, from ``/proc/PID/smaps`` text."""
    found: Dict[int, int] = {}
    start = None
    label = field + ":"
    for line in smaps.splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            start = int(head.split("-", 1)[0], 16)
        elif line.startswith(label) and start is not None:
            found[start] = int(line.split()[1]) * 1024
    return found


def release_relocations(least: int = RELOCATIONS_WORTH_RELEASING) -> int:
    """Give back the resident pages of loaded libraries' dynamic relocation
    tables; the bytes of address range given back (0 where nothing was).

    The dynamic loader reads a library's relocations once, when it loads it,
    and never again; their pages stay resident all the same.  PyPy's library
    carries 16 MB of them: a tenth of a PyPy gateway's resident memory at the
    design load.  ``madvise(MADV_DONTNEED)`` drops them from this process; if
    anything reads one again, the kernel maps it back from the file.  Linux
    only; elsewhere, or when reading ``/proc`` fails, this does nothing.
    """
    madvise = _glibc("madvise", "int madvise(void *addr, size_t length, int advice);")
    if madvise is None:
        return 0
    try:
        with open("/proc/self/maps") as maps, open("/proc/self/smaps") as smaps:
            ranges = relocation_ranges(maps.read(), smaps_field(smaps.read(), "Anonymous"), least=least)
    except OSError:
        return 0
    from cffi import FFI

    ffi = FFI()
    released = 0
    for first, last, _path in ranges:
        if madvise(ffi.cast("void *", first), last - first, _MADV_DONTNEED) == 0:
            released += last - first
    return released
