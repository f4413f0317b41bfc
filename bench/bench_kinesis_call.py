"""One PutRecords call as the Kinesis sink makes it at the design load, against a baseline.

A batch of 100 records of 22 KB (the seed load's mean body; about 2.9 MB of
request body, what a 200 ms linger gathers at 500 requests/s), sent 20 times
per round on one keep-alive connection to the load harness's Kinesis
stand-in (``bench.load.servers.start_kinesis``, a child process on loopback):

* ``call``: ``TrioEndpoint.call`` with the payload hash given, as the sink
  calls it (the worker thread that encoded the batch hashed it): botocore's
  SigV4, h11's request head, the body sent from the batch buffer, the answer
  read.  On PyPy with the JIT paused in the call's steps, as the gateway
  runs it at this load (``--sink-jit auto``).
* ``post``: the baseline, in the same run: the same body posted with
  ``http.client`` and the answer read, with no signing and no event loop:
  what loopback TCP and the stand-in cost alone.
* ``hash`` and ``encode``: the worker thread's share of a call, the body's
  SHA-256 and the records' base64 into the batch.

Each round's CPU time in this thread (``time.thread_time``: the event
loop's, and the kernel's work for its sockets) is kept too, since the wall
time of both also holds the stand-in's; the summary prints the CPU of
``call`` over that of ``post``: what the sink's own per-call work adds to
moving the bytes.
"""

from __future__ import annotations

import http.client
import os
import shutil
import statistics
import sys
import time
from typing import Any, Iterator, List, Tuple

import pytest
import trio

from sinks import jit
from sinks.aws.delivery import Entry
from sinks.aws.sink import StreamOptions, StreamSink
from sinks.digests import sha256_hex

RECORDS = 100
RECORD_BYTES = 22_000
CALLS = 20
_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
                "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def stand_in() -> Iterator[int]:
    """The harness's Kinesis stand-in on a free loopback port; its port.

    It needs only the standard library; CPython's ``python3`` runs it where
    there is one (as in the load harness), so both interpreters' figures are
    against the same stand-in.
    """
    from bench.load.servers import start_kinesis

    child = start_kinesis(shutil.which("python3") or sys.executable)
    try:
        yield child.port
    finally:
        child.stop()


@pytest.fixture(scope="module")
def batch(stand_in: int) -> Iterator[Tuple[Any, Any, List[Entry]]]:
    """(endpoint, builder, entries): a sealed batch of the seed's mean records."""
    from buffers import RingBuffer
    from sinks.aws.trio_http import open_trio_endpoint
    from sinks.base import Record

    with pytest.MonkeyPatch.context() as env:
        for name, value in _CREDENTIALS.items():
            env.setenv(name, value)
        url = "http://127.0.0.1:%d" % stand_in
        endpoint = open_trio_endpoint("kinesis", endpoint_url=url)
        ring = RingBuffer(RECORDS * RECORD_BYTES * 2)
        sink = StreamSink(ring.release, ring.buffer,
                          StreamOptions("kinesis", "bench", endpoint_url=url), endpoint=endpoint)
        builder = sink._new_builder()
        entries = []
        data = os.urandom(RECORD_BYTES)
        for n in range(RECORDS):
            slot = ring.reserve(RECORD_BYTES)
            slot.view[:] = data
            ring.commit(slot, RECORD_BYTES)
            record = Record("%026d" % n, slot)
            entry = Entry(record, record.id, None, RECORD_BYTES + len(record.id), n,
                          sink._delivery.policy, 0.0, None, 0.0)
            assert builder.admit(entry)
            entries.append(entry)
        builder.encode_all(entries)
        yield endpoint, builder, entries
        builder.close()


def _cpu_timed(cpu: List[float], fn: Any, *args: Any) -> None:
    start = time.thread_time()
    fn(*args)
    cpu.append(time.thread_time() - start)


def test_call(benchmark, throughput, batch) -> None:
    endpoint, builder, _ = batch
    body = builder.batch.body()
    digest = sha256_hex(body)
    statuses: List[int] = []
    cpu: List[float] = []

    async def calls() -> None:
        jit.install()
        for _ in range(CALLS):
            reply = await endpoint.call(builder.batch.target, body, digest)
            statuses.append(reply.status)
        await endpoint.aclose()

    benchmark(_cpu_timed, cpu, trio.run, calls)
    assert statuses and set(statuses) == {200}
    throughput(CALLS * len(body), case="kinesis call", part="call",
               cpu_s_per_call=statistics.median(cpu) / CALLS)


def test_post(benchmark, throughput, batch, stand_in: int) -> None:
    _, builder, _ = batch
    body = builder.batch.body()
    headers = {"X-Amz-Target": builder.batch.target, "Content-Type": builder.batch.content_type}
    statuses: List[int] = []
    cpu: List[float] = []

    def posts() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", stand_in)
        try:
            for _ in range(CALLS):
                connection.request("POST", "/", body=body, headers=headers)
                answer = connection.getresponse()
                answer.read()
                statuses.append(answer.status)
        finally:
            connection.close()

    benchmark(_cpu_timed, cpu, posts)
    assert statuses and set(statuses) == {200}
    throughput(CALLS * len(body), case="kinesis call", part="post",
               cpu_s_per_call=statistics.median(cpu) / CALLS)


def test_hash(benchmark, throughput, batch) -> None:
    _, builder, _ = batch
    body = builder.batch.body()
    benchmark(sha256_hex, body)
    throughput(len(body))


def test_encode(benchmark, throughput, batch) -> None:
    _, builder, entries = batch

    def encode() -> int:
        builder.reset()
        builder.encode_all(entries)
        return len(builder.batch.body())

    size = benchmark(encode)
    throughput(RECORDS * RECORD_BYTES, encoded=size)
