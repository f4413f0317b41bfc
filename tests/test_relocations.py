"""Loaded libraries' relocation tables leave the resident set once serving starts.

The selection of pages is pure (``/proc/self/maps`` text and ELF tables in);
one test gives them back in a child interpreter and checks that it still
loads libraries, hashes, starts threads and raises; one reads a serving
process's own map on PyPy, whose library carries 16 MB of relocations.
"""

from __future__ import annotations

import platform
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from gateway.observe.memory import dynamic_relocations, relocation_ranges, smaps_field
from tests.support.gateway import GatewayProcess

LIB = "/usr/lib/x86_64-linux-gnu/libexample.so"
MAPS = textwrap.dedent("""\
    55d0c0000000-55d0c0001000 r--p 00000000 08:01 100 /usr/bin/example
    7f0000000000-7f0001059000 r--p 00000000 08:01 200 %s
    7f0001059000-7f0002333000 r-xp 0105a000 08:01 200 %s
    7f0003000000-7f0003100000 rw-p 00000000 00:00 0
    7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
""" % (LIB, LIB))


def _table(offset, size):
    return lambda path: (offset, size) if path == LIB else None


def test_the_whole_pages_of_a_large_table_in_a_read_only_mapping_are_chosen():
    ranges = relocation_ranges(MAPS, {0x7f0000000000: 0}, _table(0x11b18, 0x1043ce8), page=4096)
    # Inward to pages: the table's first and last pages also hold other sections.
    assert ranges == [(0x7f0000012000, 0x7f0001055000, LIB)]
    # With 64 KiB pages (some arm64 kernels), fewer of them are whole.
    assert relocation_ranges(MAPS, {0x7f0000000000: 0}, _table(0x11b18, 0x1043ce8),
                             page=0x10000) == [(0x7f0000020000, 0x7f0001050000, LIB)]


@pytest.mark.parametrize("anonymous, table, least, why", [
    ({0x7f0000000000: 4096}, (0x11b18, 0x1043ce8), 1, "a page of the mapping was written"),
    ({}, (0x11b18, 0x1043ce8), 1, "the mapping's pages are not known"),
    ({0x7f0000000000: 0}, (0x11b18, 0x10000), 1 << 20, "too small to be worth it"),
    ({0x7f0000000000: 0}, (0x1000000, 0x100000), 1, "the table runs past the mapping"),
    ({0x7f0000000000: 0}, (0x100, 0x200), 1, "no whole page inside the table"),
])
def test_pages_are_left_alone(anonymous, table, least, why):
    assert relocation_ranges(MAPS, anonymous, _table(*table), least=least, page=4096) == [], why


def test_writable_executable_and_anonymous_mappings_are_never_chosen():
    maps = "\n".join(line.replace(" r--p ", " rw-p ") if "00000000 08:01 200" in line else line
                     for line in MAPS.splitlines())
    assert relocation_ranges(maps, {0x7f0000000000: 0, 0x7f0001059000: 0},
                             lambda path: (0x105a000, 0x200000) if path == LIB else None) == []


def _elf(sections):
    """A 64-bit little-endian ELF file with only section headers: (name, type, offset, size)."""
    names = b"\0" + b"".join(name + b"\0" for name, _, _, _ in sections) + b".shstrtab\0"
    headers = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    at = 1
    for name, kind, offset, size in sections:
        headers.append(struct.pack("<IIQQQQIIQQ", at, kind, 2, offset, offset, size, 0, 0, 8, 24))
        at += len(name) + 1
    names_offset = 64
    headers.append(struct.pack("<IIQQQQIIQQ", at, 3, 0, 0, names_offset, len(names), 0, 0, 1, 0))
    shoff = names_offset + len(names)
    header = bytearray(64)
    header[0:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 40, shoff)
    struct.pack_into("<HHH", header, 58, 64, len(headers), len(headers) - 1)
    return bytes(header) + names + b"".join(headers)


def test_the_dynamic_relocation_table_is_read_from_the_section_headers(tmp_path):
    path = tmp_path / "lib.so"
    path.write_bytes(_elf([(b".dynsym", 11, 0x200, 0x80), (b".rela.dyn", 4, 0x1000, 0x5000),
                           (b".rela.plt", 4, 0x6000, 0x100)]))
    assert dynamic_relocations(str(path)) == (0x1000, 0x5000)
    path.write_bytes(_elf([(b".rel.dyn", 9, 0x3000, 0x800)]))
    assert dynamic_relocations(str(path)) == (0x3000, 0x800)
    path.write_bytes(_elf([(b".rela.plt", 4, 0x6000, 0x100)]))
    assert dynamic_relocations(str(path)) is None


@pytest.mark.parametrize("content", [b"", b"#!/bin/sh\n", b"\x7fELF\x01\x01" + bytes(58)])
def test_what_is_not_a_64_bit_elf_file_has_no_table(tmp_path, content):
    path = tmp_path / "other"
    path.write_bytes(content)
    assert dynamic_relocations(str(path)) is None
    assert dynamic_relocations(str(tmp_path / "missing")) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_interpreter_gives_its_relocations_back_and_goes_on_working():
    # In a child: the pages given back are this whole process's.
    code = textwrap.dedent("""
        import ctypes, hashlib, os, ssl, threading
        from gateway.observe import memory
        from tests.test_relocations import _resident

        memory._glibc("madvise", "int madvise(void *addr, size_t length, int advice);")  # loads cffi
        with open("/proc/self/maps") as maps, open("/proc/self/smaps") as smaps:
            ranges = memory.relocation_ranges(maps.read(), memory.smaps_field(smaps.read(), "Anonymous"),
                                              least=0)
        before = sum(_resident(os.getpid(), a) for a, _, _ in ranges)
        released = memory.release_relocations(least=0)
        after = sum(_resident(os.getpid(), a) for a, _, _ in ranges)
        ctypes.CDLL("libz.so.1")
        ssl.create_default_context()
        worker = threading.Thread(target=hashlib.sha256, args=(b"x",))
        worker.start()
        worker.join()
        try:
            raise ValueError("still unwinds")
        except ValueError:
            pass
        print(released == sum(b - a for a, b, _ in ranges), released > 0, before - after)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=True)
    same, some, dropped = done.stdout.split()
    assert (same, some) == ("True", "True")
    # What was resident of the tables is no longer.
    assert int(dropped) > 0


@pytest.mark.skipif(platform.python_implementation() != "PyPy" or not sys.platform.startswith("linux"),
                    reason="PyPy's library is the one with relocations worth giving back")
@pytest.mark.parametrize("workers", ["1", "2"])
def test_serving_pypy_processes_hold_none_of_their_librarys_relocations(tmp_path, workers):
    gateway = GatewayProcess(["--sink", "null"], data_dir=str(tmp_path / "data"),
                             env={"SLUICE_WORKERS": workers}).start()
    try:
        pids = [gateway.pid]
        if workers != "1":
            deadline = time.monotonic() + 60
            while not gateway.events("supervisor_started") and time.monotonic() < deadline:
                time.sleep(0.1)
            (started,) = gateway.events("supervisor_started")
            pids += started["pids"]
        assert len(pids) == (1 if workers == "1" else 3)
        for pid in pids:
            with open("/proc/%d/maps" % pid) as maps:
                found = relocation_ranges(maps.read(), _no_writes(pid))
            # Given back at start: what is left resident of the table is what
            # the process touched since, which is nothing.
            assert found, "no library with relocations worth giving back"
            for first, last, _path in found:
                assert _resident(pid, first) < (last - first) // 8
    finally:
        gateway.stop()


def _no_writes(pid):
    with open("/proc/%d/smaps" % pid) as smaps:
        return smaps_field(smaps.read(), "Anonymous")


def _resident(pid, address):
    """Resident bytes of the mapping of ``pid`` that holds ``address``."""
    with open("/proc/%d/smaps" % pid) as smaps:
        resident = smaps_field(smaps.read(), "Rss")
    return resident[max(start for start in resident if start <= address)]
