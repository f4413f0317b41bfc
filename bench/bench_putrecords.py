"""Base64 throughput and PutRecords body building, per backend.

    python bench/bench_putrecords.py [--warmup SECONDS] [--seconds SECONDS]

Each case runs for ``--warmup`` seconds first (PyPy's JIT needs it), then is
timed for ``--seconds``; the figure is the median of five slices.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sinks.b64 import NUL_SLACK, Base64Writer, available_backends, encoded_length  # noqa: E402
from sinks.putrecords import PutRecordsBatch  # noqa: E402


def timed(fn, warmup, seconds):
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        fn()
    slices = []
    for _ in range(5):
        n, start = 0, time.perf_counter()
        stop = start + seconds / 5
        while True:
            fn()
            n += 1
            now = time.perf_counter()
            if now >= stop:
                break
        slices.append((now - start) / n)
    return statistics.median(slices)


def bench_encode(backend, size, warmup, seconds):
    ring = bytearray(os.urandom(size))
    out = bytearray(encoded_length(size) + NUL_SLACK)
    w = Base64Writer(out, backend=backend)
    src = w.source(ring)
    view = memoryview(ring)
    per_call = timed(lambda: w.encode_into(src, 0, size, 0), warmup, seconds)
    one_off = timed(lambda: w.encode(view, 0), warmup, seconds)
    return size / per_call / 1e6, size / one_off / 1e6, per_call * 1e6


def bench_batch(backend, warmup, seconds, records=500, size=1024):
    ring = bytearray(os.urandom(records * size))
    view = memoryview(ring)
    batch = PutRecordsBatch("logs", backend=backend)
    src = batch.source(ring)
    keys = ["tenant-%d" % (i % 16) for i in range(records)]

    def from_source():
        batch.reset()
        for i in range(records):
            batch.add_from(src, i * size, (i + 1) * size, keys[i])
        return batch.body()

    def from_views():
        batch.reset()
        for i in range(records):
            batch.add(view[i * size:(i + 1) * size], keys[i])
        return batch.body()

    return timed(from_source, warmup, seconds) * 1e6, timed(from_views, warmup, seconds) * 1e6


def bench_botocore(warmup, seconds, records=500, size=1024):
    import botocore.serialize
    import botocore.session

    model = botocore.session.get_session().get_service_model("kinesis")
    op = model.operation_model("PutRecords")
    ser = botocore.serialize.create_serializer("json")
    ring = memoryview(bytearray(os.urandom(records * size)))

    def build():
        recs = [{"Data": ring[i * size:(i + 1) * size].tobytes(), "PartitionKey": "tenant-%d" % (i % 16)}
                for i in range(records)]
        return ser.serialize_to_request({"Records": recs, "StreamName": "logs"}, op)["body"]

    return timed(build, warmup, seconds) * 1e6


def main():
    parser = argparse.ArgumentParser()
    default_warmup = 3.0 if sys.implementation.name == "pypy" else 0.5
    parser.add_argument("--warmup", type=float, default=default_warmup)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    print(f"{sys.implementation.name} {sys.version.split()[0]}")
    for backend in available_backends():
        for size in (1024, 64 * 1024, 1024 * 1024):
            mbps, one_off, us = bench_encode(backend, size, args.warmup, args.seconds)
            print(f"encode {backend:6} {size:>8} B: {mbps:8.0f} MB/s exported once "
                  f"({us:8.2f} us/call), {one_off:8.0f} MB/s exported per call")
    for backend in available_backends():
        src_us, view_us = bench_batch(backend, args.warmup, args.seconds)
        print(f"PutRecords 500 x 1 KiB {backend:6}: {src_us:7.0f} us add_from, {view_us:7.0f} us add(view)")
    print(f"PutRecords 500 x 1 KiB botocore serializer: {bench_botocore(args.warmup, args.seconds):7.0f} us")


if __name__ == "__main__":
    main()
