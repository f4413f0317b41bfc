"""Bodies never become Python objects: traced memory does not grow with body size.

CPython with tracemalloc; PyPy (no tracemalloc) by its raw-memory counter.
The gateway runs in this process on a real loopback socket with the file
sink; the client is another process so its allocations are not traced.  200
bodies of 1 KiB and then 200 bodies of 512 KiB go through.  Had any body been
copied into a Python object, the traced peak
of the large run would exceed the small run's by about 512 KiB.  Bounds:

* peak of the 512 KiB run <= peak of the 1 KiB run + 128 KiB (the per-request
  objects are the same; 128 KiB absorbs when the garbage collector happens to
  run and how many expired cancel scopes trio's deadline heap still holds:
  four per request, pruned in bulk, and more of them pile up while the longer
  requests run; differences of 70-100 KiB were seen);
* the peak of either run stays under 384 KiB, three quarters of one large body;
* what is still allocated after a run is under 256 KiB: nothing accumulates per
  body (200 leaked bodies would be 100 MiB).  Not zero, because trio drops
  expired entries from its deadline heap lazily, in bulk.
"""

from __future__ import annotations

import gc
import platform
import sys
import textwrap

import pytest
import trio

from gateway.config.settings import from_args
from gateway.server import Gateway, open_listener

cpython_only = pytest.mark.skipif(platform.python_implementation() != "CPython",
                                  reason="tracemalloc is CPython-only")
pypy_only = pytest.mark.skipif(platform.python_implementation() != "PyPy",
                               reason="raw-memory counters are PyPy's")

SMALL_BODY = 1024
LARGE_BODY = 512 * 1024
REQUESTS = 200
SAME_WITHIN = 128 * 1024
PEAK_BOUND = 384 * 1024
RETAINED_BOUND = 256 * 1024

_CLIENT = textwrap.dedent("""
    import http.client, os, sys
    port, count, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    body = os.urandom(size)
    conn = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(count):
        conn.request("POST", "/v1/logs", body=body, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        response.read()
        assert response.status == 202, response.status
    conn.close()
""")


async def _run_client(port: int, count: int, size: int) -> None:
    result = await trio.run_process(
        [sys.executable, "-c", _CLIENT, str(port), str(count), str(size)], capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()


async def _traced_run(port: int, size: int):
    import tracemalloc

    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        await _run_client(port, REQUESTS, size)
        _, peak = tracemalloc.get_traced_memory()
        # Cyclic garbage (trio's cancel scopes and tracebacks) is not
        # retained memory; collect it before reading what is.
        gc.collect()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - baseline, current - baseline


@cpython_only
async def test_traced_memory_does_not_grow_with_body_size(tmp_path):
    config = from_args(["--data-dir", str(tmp_path), "--ring-size", "8MiB"], {})
    gateway = Gateway(config)
    listener = await open_listener("127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(gateway.serve, [listener])
        # Warm up: the first requests start thread-pool workers and open the
        # first segment; none of that is per request.
        await _run_client(port, 5, LARGE_BODY)
        small_peak, small_retained = await _traced_run(port, SMALL_BODY)
        large_peak, large_retained = await _traced_run(port, LARGE_BODY)
        gateway.drain()
    assert gateway.accepted == 2 * REQUESTS + 5
    report = dict(small_peak=small_peak, large_peak=large_peak,
                  small_retained=small_retained, large_retained=large_retained)
    assert large_peak <= small_peak + SAME_WITHIN, report
    assert max(small_peak, large_peak) < PEAK_BOUND, report
    assert max(small_retained, large_retained) < RETAINED_BOUND, report


#: A body of the largest record a Kinesis stream takes (MaxRecordSizeInKiB 10240).
HUGE_BODY = 10 * 1024 * 1024 - 8 * 1024
HUGE_REQUESTS = 10


@cpython_only
async def test_traced_memory_does_not_grow_with_10_mib_bodies(tmp_path):
    """The same bounds with bodies of 10 MiB: one copy would exceed them 25 times over."""
    # The ring holds four bodies; a disk slower than loopback must not turn into 503s.
    config = from_args(["--data-dir", str(tmp_path), "--max-body", "10MiB", "--ring-wait", "60s"], {})
    gateway = Gateway(config)
    listener = await open_listener("127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(gateway.serve, [listener])
        await _run_client(port, 2, HUGE_BODY)
        small_peak, _ = await _traced_run(port, SMALL_BODY)
        await _run_client(port, 2, HUGE_BODY)
        import tracemalloc

        tracemalloc.start()
        try:
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            await _run_client(port, HUGE_REQUESTS, HUGE_BODY)
            _, peak = tracemalloc.get_traced_memory()
            gc.collect()
            current, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        gateway.drain()
    report = dict(small_peak=small_peak, huge_peak=peak - baseline, huge_retained=current - baseline)
    assert peak - baseline <= small_peak + SAME_WITHIN, report
    assert peak - baseline < PEAK_BOUND and current - baseline < RETAINED_BOUND, report


#: PyPy: raw memory (outside the GC's nursery and arenas, where a copy of a
#: large buffer lands) may grow by less than this over the 10 MiB run; one
#: copy of one body would be 10 MiB, and nothing frees it before a major
#: collection.  About 0.2 MiB was seen.
RAW_GROWTH_BOUND = 4 * 1024 * 1024


def _raw_bytes() -> int:
    # The public attribute is formatted text ("10.8MB"); _s holds the numbers.
    return gc.get_stats()._s.total_rawmalloced_memory  # type: ignore[attr-defined]


@pypy_only
async def test_pypy_raw_memory_does_not_grow_with_10_mib_bodies(tmp_path):
    """PyPy has no tracemalloc: its raw-memory counter shows a body copied
    (by a CRC, a hash or a write of a view) rather than read in place."""
    config = from_args(["--data-dir", str(tmp_path), "--max-body", "10MiB", "--ring-wait", "60s"], {})
    gateway = Gateway(config)
    listener = await open_listener("127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(gateway.serve, [listener])
        await _run_client(port, 3, HUGE_BODY)
        gc.collect()
        before = _raw_bytes()
        await _run_client(port, HUGE_REQUESTS, HUGE_BODY)
        grown = _raw_bytes() - before
        gateway.drain()
    assert grown < RAW_GROWTH_BOUND, grown


def test_a_serving_process_freezes_its_start_up_heap_on_cpython():
    # In a child: freezing is for the whole process, and this one runs the tests.
    import subprocess

    code = textwrap.dedent("""
        import gc, sys
        from gateway.observe.memory import freeze_startup_heap
        frozen = freeze_startup_heap()
        count = gc.get_freeze_count() if hasattr(gc, "get_freeze_count") else 0
        print(frozen, count > 1000)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=True)
    expected = "True True" if platform.python_implementation() == "CPython" else "False False"
    assert done.stdout.split() == expected.split()
