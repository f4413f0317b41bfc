"""Faults under a steady load: every ``202`` stored, memory bounded, recovery without a restart.

Each test runs a gateway in this process under a steady load from a few
client threads (tests/support/faults.py), injects one fault for a
couple of seconds, clears it, waits for ``202``s again from the same
gateway, and compares ids: every record answered ``202`` must be in the
sink afterwards, byte for byte (the Kinesis fake's stored records, or the
file sink read back with the reader behind ``sluice read``).  Refusals must
be the ones docs/reliability.md documents for that fault, the ring must be empty
once the sink caught up, and the process's RSS must not grow by more than
`RSS_GROWTH` while the fault lasts.

Proven elsewhere and not repeated here: Redis killed and restarted under
load (test_access_outage.py), ``kill -9`` with ``--ack spool``
(test_spool_recovery.py), one scripted fault per call and permanent errors
(test_kinesis_faults.py), the spool filling to its limit with one client
(test_spooled.py).  ``python -m bench.faults`` runs the long version of all
of it against a gateway process.

``SLUICE_FAULT_REPORT=FILE`` appends one JSON line per test (fault, ack
mode, records sent, acknowledged, refused, lost) to FILE: the figures of
docs/reliability.md's "Faults" table.
"""

from __future__ import annotations

import errno
import json
import os
import time
import zlib
from typing import List

import pytest
import trio

import sinks.file as file_sink
import sinks.spool.files as spool_files
from gateway.access import keystore
from tests.support.faults import (
    FaultProxy,
    FaultyStreams,
    Tally,
    Watch,
    steady_load,
    tally,
    wait_until,
    watching,
)
from tests.support.gateway import gateway_in_process, stored
from tests.support.kinesis import (  # noqa: F401 - fixtures
    FaultServer,
    Plan,
    aws_env_fixture,
)
from tests.support.redis import running_redis
from tests.support.sinks import get

THROTTLED = "ProvisionedThroughputExceededException"
#: How long a fault lasts.  Long enough for several calls to the sink (or
#: checks against Redis) to meet it; "unreachable" outlasts the 1 s retry
#: deadline of ``--ack kinesis``, so clients see its 503s.
FAULT_SECONDS = 1.5
UNREACHABLE_SECONDS = 2.5
#: ``202``s to see before the fault and after it cleared.
BEFORE = 10
AFTER = 10
#: Most the process's RSS may grow while a fault lasts.  The ring and the
#: sink's buffers are preallocated, so what grows is the interpreter's own
#: (PyPy's JIT compiling the error paths, answers kept by the clients).
RSS_GROWTH = 96 * 1024 * 1024
#: Longest a request may take with Redis slow, stalled or gone: the check
#: bound (--redis-timeout) plus room for a loaded two-core machine.
REDIS_TIMEOUT = 0.3
SLACK = 2.0

REPORT: List[dict] = []


@pytest.fixture(scope="module", autouse=True)
def report_rows():
    """Write the rows of this module's tests to ``$SLUICE_FAULT_REPORT`` at its end."""
    yield
    path = os.environ.get("SLUICE_FAULT_REPORT")
    if path and REPORT:
        with open(path, "a") as f:
            for row in REPORT:
                f.write(json.dumps(row) + "\n")
    REPORT.clear()


def record(fault: str, ack: str, counts: Tally, watch: Watch, since: float) -> None:
    row = {"fault": fault, "ack": ack}
    row.update(counts.as_dict())
    row.update(ring_peak=watch.ring_peak, rss_growth=watch.rss_growth(since))
    REPORT.append(row)


def check(counts: Tally, allowed_refusals: set) -> None:
    assert not counts.lost, "%d acknowledged records not stored: %s" % (len(counts.lost), counts.lost[:5])
    assert set(counts.refused) <= allowed_refusals, counts.refused
    assert counts.no_answer == 0, counts.as_dict()


class Window:
    """When a fault started and cleared (time.monotonic)."""

    def __init__(self) -> None:
        self.started = 0.0
        self.cleared = 0.0


async def under_fault(load, start, clear, seconds: float) -> Window:
    """Steady load before, during and after one fault: ``202``s before it and after it cleared."""
    window = Window()
    await wait_until(lambda: load.count(202) >= BEFORE, "202s before the fault")
    window.started = time.monotonic()
    start()
    try:
        await trio.sleep(seconds)
    finally:
        clear()
    window.cleared = time.monotonic()
    await wait_until(lambda: load.count(202, since=window.cleared) >= AFTER, "202s after the fault cleared")
    return window


async def readyz(port: int) -> dict:
    status, _, body = await trio.to_thread.run_sync(get, port, "/readyz")
    doc = json.loads(body)
    doc["status_code"] = status
    return doc


# -- Kinesis ----------------------------------------------------------------------


def _fail_a_third(code: str):
    # The same third of the records every time, whatever the attempt, so
    # they are sent again until the fault clears.
    return lambda data, attempt: code if zlib.crc32(data) % 3 == 0 else None


#: Standing faults: what every PutRecords call gets while the fault lasts.
PLANS = {
    "throttled": Plan("status", 400, THROTTLED),
    "5xx": Plan("status", 500, "InternalFailure"),
    "reset": Plan("reset"),
    # No answer until well past --call-timeout (0.5 s): the gateway gives up the call.
    "hang": Plan("hang", delay=2.0),
}
RECORD_FAULTS = {"partial": "InternalFailure", "throttled_records": THROTTLED}
KINESIS_FAULTS = ["partial", "throttled_records", "throttled", "5xx", "reset", "hang", "unreachable"]


@pytest.fixture
def kinesis(aws_env):
    """``(fake, proxy)``: a Kinesis fake over HTTP and a proxy in front of it."""
    aws_env()
    server = FaultServer(FaultyStreams())
    proxy = FaultProxy(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    try:
        yield server.fake, proxy
    finally:
        proxy.stop()
        server.stop()


@pytest.mark.parametrize("ack", ["kinesis", "spool"])
@pytest.mark.parametrize("fault", KINESIS_FAULTS)
async def test_kinesis_fault_under_load(fault, ack, kinesis, tmp_path):
    fake, proxy = kinesis
    unreachable = fault == "unreachable"
    seconds = UNREACHABLE_SECONDS if unreachable else FAULT_SECONDS
    # With --ack kinesis a record waits at most the retry deadline: past it,
    # 503.  Short where the clients should see it within the outage.
    deadline = "1s" if unreachable else "10s"
    flags = ["--sink", "kinesis", "--stream", "logs", "--endpoint-url", proxy.url(), "--ack", ack,
             "--call-timeout", "0.5s", "--linger", "5ms", "--retry-deadline", deadline,
             "--ring-size", "4MiB", "--max-body", "8KiB"]
    if ack == "spool":
        # Unreachable: small enough that the outage fills it.
        flags += ["--spool-dir", str(tmp_path / "spool"), "--spool-size", "192KiB" if unreachable else "8MiB"]

    def start() -> None:
        if unreachable:
            proxy.down()
        elif fault in RECORD_FAULTS:
            fake.fail_record = _fail_a_third(RECORD_FAULTS[fault])
        else:
            fake.standing = PLANS[fault]

    def clear() -> None:
        fake.fail_record = None
        fake.standing = None
        proxy.up()

    async with gateway_in_process(flags) as (gateway, port):
        # With --ack kinesis each client waits for the store: more of them.
        clients = 8 if ack == "kinesis" else 3
        async with watching(gateway) as watch, steady_load(port, clients=clients) as load:
            window = await under_fault(load, start, clear, seconds)
        if ack == "spool":
            await wait_until(lambda: gateway.sink.statistics().pending_records == 0, "spool drained")
        await wait_until(lambda: gateway.ring.live == 0, "ring empty")
        ready = await readyz(port)
        ring = gateway.ring
        assert ring.used == 0 and ring.live == 0

    answers = load.snapshot()
    stored_by_id = {}
    for data in fake.stored_datas():
        meta, _, body = data.partition(b"\n")
        stored_by_id[json.loads(meta)["id"]] = body
    counts = tally(answers, stored_by_id)
    allowed = {"503 sink_unavailable"} if ack == "kinesis" else {"503 overloaded"}
    check(counts, allowed if unreachable else set())
    assert ready["status_code"] == 200, ready
    assert watch.rss_growth(window.started) < RSS_GROWTH
    during = load.between(window.started, window.cleared)
    if unreachable and ack == "kinesis":
        # Sent while down with the retry deadline passing before it came back: 503.
        doomed = load.between(window.started + 0.1, window.cleared - 1.2)
        assert doomed and {a.status for a in doomed} == {503}, [(a.status, a.error) for a in doomed]
    elif unreachable:
        # The spool takes records until it is full, then refuses.
        statuses = [a.status for a in during]
        assert statuses.count(202) >= BEFORE and statuses.count(503) >= 1, statuses
    elif ack == "spool":
        assert sum(1 for a in during if a.status == 202) >= BEFORE
    if not unreachable:
        assert {c.fault for c in fake.calls if c.fault} or any(c.failed for c in fake.calls)
    record("kinesis " + fault, ack, counts, watch, window.started)


# -- Redis --------------------------------------------------------------------------

REDIS_FAULTS = ["slow", "stalled", "unreachable"]


@pytest.mark.parametrize("mode", ["closed", "open"])
@pytest.mark.parametrize("fault", REDIS_FAULTS)
async def test_redis_fault_under_load(fault, mode, tmp_path):
    data_dir = str(tmp_path / "data")
    with running_redis() as redis_server, FaultProxy(("127.0.0.1", redis_server.port)) as proxy:
        admin = keystore.connect(redis_server.url)
        try:
            key = keystore.create_key(admin, "FAULTS", time.time()).api_key
        finally:
            admin.close()

        def start() -> None:
            if fault == "slow":
                proxy.delay = 1.0  # answers come, but after the check bound
            elif fault == "stalled":
                redis_server.pause()
            else:
                proxy.down()

        def clear() -> None:
            proxy.delay = 0.0
            redis_server.resume()
            proxy.up()

        flags = ["--redis", proxy.url("redis", "/0"), "--on-redis-failure", mode,
                 "--redis-timeout", "%gs" % REDIS_TIMEOUT]
        headers = b"Authorization: Bearer %s\r\n" % key.encode()
        async with gateway_in_process(flags, data_dir=data_dir) as (gateway, port):
            async with watching(gateway) as watch, steady_load(port, headers=headers) as load:
                window = await under_fault(load, start, clear, FAULT_SECONDS)
            await wait_until(lambda: gateway.access.redis_state == "ok", "Redis state ok")
            ready = await readyz(port)
        assert gateway.ring.live == 0

    answers = load.snapshot()
    records = stored(data_dir)
    counts = tally(answers, {rid: body for rid, (_, body) in records.items()})
    check(counts, {"503 access_unavailable"} if mode == "closed" else set())
    assert all(records[a.record_id][0]["tenant"] == "FAULTS" for a in answers if a.status == 202)
    assert all(a.seconds < REDIS_TIMEOUT + SLACK for a in answers), max(a.seconds for a in answers)
    assert ready["status_code"] == 200 and ready["redis"] == "ok", ready
    assert watch.rss_growth(window.started) < RSS_GROWTH
    during = load.between(window.started + 0.5, window.cleared)
    if mode == "closed":
        assert during and 503 in {a.status for a in during}
    else:
        assert sum(1 for a in during if a.status == 202) >= BEFORE
    record("redis %s (%s)" % (fault, mode), "file sink", counts, watch, window.started)


# -- the disk -------------------------------------------------------------------------


def _enospc(real, full: List[bool], partial: bool):
    """``real`` (a writev wrapper) failing with ENOSPC, after a partial write, while ``full[0]``."""

    def write(fd, *args):
        if full[0]:
            if partial:
                os.write(fd, b"partial")  # what a write cut short by a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, *args)

    return write


@pytest.mark.parametrize("ack", ["spool", "received"])
async def test_disk_full_under_load(ack, tmp_path, monkeypatch):
    data_dir = str(tmp_path / "data")
    full = [False]
    if ack == "spool":
        # The spool's disk is full; the file sink behind it is fine.
        monkeypatch.setattr(spool_files, "_writev_all",
                            _enospc(spool_files._writev_all, full, partial=True))
        flags = ["--ack", "spool", "--spool-dir", str(tmp_path / "spool")]
        allowed = {"503 sink_unavailable"}
    else:
        # The file sink's disk is full: records wait in the ring, retried
        # every second; once the ring is full, 503.
        monkeypatch.setattr(file_sink, "writev", _enospc(file_sink.writev, full, partial=False))
        flags = ["--ring-size", "512KiB", "--max-body", "8KiB", "--ring-wait", "100ms"]
        allowed = {"503 overloaded"}

    def start() -> None:
        full[0] = True

    def clear() -> None:
        full[0] = False

    async with gateway_in_process(flags, data_dir=data_dir) as (gateway, port):
        async with watching(gateway) as watch, steady_load(port) as load:
            window = await under_fault(load, start, clear, FAULT_SECONDS)
            stats = gateway.sink.statistics()
        if ack == "spool":
            await wait_until(lambda: gateway.sink.statistics().pending_records == 0, "spool drained")
        await wait_until(lambda: gateway.ring.live == 0, "ring empty")
        ready = await readyz(port)

    answers = load.snapshot()
    counts = tally(answers, {rid: body for rid, (_, body) in stored(data_dir).items()})
    check(counts, allowed)
    assert ready["status_code"] == 200, ready
    assert stats.write_errors >= 1
    assert watch.rss_growth(window.started) < RSS_GROWTH
    during = load.between(window.started + 0.2, window.cleared - 0.2)
    if ack == "spool":
        # No 202 without a durable copy: while the disk is full, 503.
        assert during and {a.status for a in during} == {503}, {a.status for a in during}
    else:
        assert {a.status for a in during} >= {202}
    record("disk full (ENOSPC)", "spool" if ack == "spool" else "file sink", counts, watch, window.started)
