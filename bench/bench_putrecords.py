"""PutRecords bodies: base64 from the ring and whole batches, per base64 backend.

The ``cffi`` backend (OpenSSL's EVP_EncodeBlock) and the pure-Python fallback
(``binascii``) run in the same session; the summary prints their ratio.
"""

from __future__ import annotations

import os

import pytest

from sinks.aws.b64 import CFFI, NUL_SLACK, PYTHON, Base64Writer, available_backends, encoded_length
from sinks.aws.putrecords import PutRecordsBatch

KiB, MiB = 1024, 1024 * 1024
KEYS = ["tenant-%d" % (i % 16) for i in range(500)]

BACKENDS = [
    pytest.param(CFFI, marks=pytest.mark.skipif(CFFI not in available_backends(),
                                                reason="no libcrypto for cffi")),
    PYTHON,
]


@pytest.mark.parametrize("size", [KiB, 64 * KiB, MiB], ids=["1KiB", "64KiB", "1MiB"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_record(benchmark, throughput, backend: str, size: int) -> None:
    """One record's base64, from an exported ring into a batch body."""
    ring = bytearray(os.urandom(size))
    out = bytearray(encoded_length(size) + NUL_SLACK)
    writer = Base64Writer(out, backend=backend)
    src = writer.source(ring)
    try:
        end = benchmark(writer.encode_into, src, 0, size, 0)
    finally:
        src.close()
        writer.close()
    assert end == encoded_length(size)
    throughput(size, backend=backend, case="encode %d B" % size)


@pytest.mark.parametrize("records, size", [(500, KiB), (5, MiB - 64)], ids=["500x1KiB", "5x1MiB"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_body(benchmark, throughput, backend: str, records: int, size: int) -> None:
    """A full batch: reset, ``add_from`` per record (from the ring), seal."""
    ring = bytearray(os.urandom(records * size))
    batch = PutRecordsBatch("logs", backend=backend)
    src = batch.source(ring)

    def build() -> int:
        batch.reset()
        for i in range(records):
            if not batch.add_from(src, i * size, (i + 1) * size, KEYS[i]):
                raise AssertionError("batch full at record %d" % i)
        return len(batch.body())

    try:
        body_bytes = benchmark(build)
    finally:
        src.close()
        batch.close()
    throughput(records * size, backend=backend, body_bytes=body_bytes, records=records,
               case="batch %d x %d B" % (records, size))
