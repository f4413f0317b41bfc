"""``--ack spool`` end to end in this process: the spool before the file sink, moto, a failing endpoint."""

from __future__ import annotations

import errno
import json
import os
import uuid
from typing import Dict, List, Tuple

import pytest
import trio

import sinks.spool.files as spool_files
from gateway.cli import main as cli
from gateway.config.settings import ConfigError, from_args
from sinks.errors import SinkConfigError
from sinks.spool.layout import list_segments, scan_segment, segment_name
from tests.support.gateway import gateway_in_process, stored
from tests.support.kinesis import (  # noqa: F401 - fixtures
    aws_env_fixture,
    fault_server_fixture,
    moto_fixture,
    read_stream,
)
from tests.support.sinks import get, post

KIB = 1024
#: Seconds to wait for something the gateway does within milliseconds to
#: about a second (a Kinesis call, a retry); reached only when it is broken.
WAIT = 20.0


async def wait_until(condition, timeout: float = WAIT) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


async def post_all(port: int, bodies: List[bytes], headers: bytes = b"") -> List[Tuple[int, Dict, bytes]]:
    return [await trio.to_thread.run_sync(post, port, body, headers) for body in bodies]


def accepted_ids(answers) -> List[str]:
    return [json.loads(body)["id"] for status, _, body in answers if status == 202]


def inspect(directory: str, capsys) -> dict:
    capsys.readouterr()
    assert cli.main(["spool", "inspect", "--json", directory]) == 0
    return json.loads(capsys.readouterr().out)


# -- settings --------------------------------------------------------------------


def test_spool_settings_and_their_env_twins():
    config = from_args(["--ack", "spool", "--spool-dir", "/tmp/s"], {})
    assert (config.spool_dir, config.spool_size, config.spool_sync_interval) == ("/tmp/s", 1 << 30, 0.005)
    config = from_args([], {"SLUICE_ACK": "spool", "SLUICE_SPOOL_DIR": "/tmp/s",
                            "SLUICE_SPOOL_SIZE": "64MiB", "SLUICE_SPOOL_SYNC_INTERVAL": "2ms"})
    assert (config.ack, config.spool_size, config.spool_sync_interval) == ("spool", 64 << 20, 0.002)


@pytest.mark.parametrize("flags, env, message", [
    (["--ack", "spool"], {}, "--spool-dir: required with --ack spool"),
    (["--spool-dir", "/tmp/s"], {}, "--spool-dir: needs --ack spool"),
    ([], {"SLUICE_SPOOL_SIZE": "2GiB"}, "SLUICE_SPOOL_SIZE: needs --ack spool"),
    (["--ack", "spool", "--spool-dir", "/tmp/s", "--spool-size", "1MiB"], {}, "--spool-size: must hold"),
    (["--ack", "spool", "--spool-dir", "d", "--data-dir", "d"], {}, "--spool-dir: must not be"),
    (["--ack", "spool", "--spool-dir", "/tmp/s", "--spool-sync-interval", "2s"], {},
     "--spool-sync-interval: must be at most"),
])
def test_spool_settings_are_checked(flags, env, message):
    with pytest.raises(ConfigError, match="^" + message):
        from_args(flags, env)


# -- the file sink behind the spool ----------------------------------------------


async def test_every_202_is_spooled_then_stored_and_the_spool_empties(tmp_path, monkeypatch, capsys):
    spool_dir, data_dir = str(tmp_path / "spool"), str(tmp_path / "data")
    written: List[memoryview] = []
    real_writev_all = spool_files._writev_all

    def watching_writev_all(fd, iov, total):
        written.extend(iov)
        return real_writev_all(fd, iov, total)

    monkeypatch.setattr(spool_files, "_writev_all", watching_writev_all)
    bodies = [b"record %d " % i + bytes(range(256)) * i for i in range(40)]
    flags = ["--ack", "spool", "--spool-dir", spool_dir, "--spool-size", "4MiB", "--ring-size", "4MiB"]
    async with gateway_in_process(flags, data_dir=data_dir) as (gateway, port):
        async with trio.open_nursery() as nursery:
            results: List = []

            async def client(part: List[bytes]) -> None:
                results.extend(await post_all(port, part))

            for n in range(4):
                nursery.start_soon(client, bodies[n::4])
        ids = accepted_ids(results)
        assert len(ids) == len(bodies)
        sink = gateway.sink
        await wait_until(lambda: sink.statistics().pending_records == 0)
        stats = sink.statistics()
        # Many requests, fewer fsyncs: concurrent clients share group commits.
        assert stats.spooled == len(bodies) and stats.groups <= len(bodies)
        ring = gateway.ring
        assert ring.live == 0
    records = stored(data_dir)
    assert sorted(records) == sorted(ids)
    assert sorted(body for _, body in records.values()) == sorted(bodies)
    # Bodies went to the spool straight from the ring's memory.
    body_views = [view for view in written if len(view) > 300]
    assert body_views and all(view.obj is ring.buffer for view in body_views)
    # A restart deletes the segment whose records are all confirmed.
    async with gateway_in_process(flags, data_dir=data_dir) as (gateway, port):
        await wait_until(lambda: gateway.sink.statistics().segments == 0)
    assert inspect(spool_dir, capsys)["records"] == 0


async def test_a_failed_write_answers_503_and_leaves_no_partial_frame(tmp_path, monkeypatch):
    spool_dir = str(tmp_path / "spool")
    real_writev_all = spool_files._writev_all
    failures = [0]

    def failing_writev_all(fd, iov, total):
        if failures[0] and total > 13:
            failures[0] -= 1
            os.write(fd, b"partial")  # what a write cut short by ENOSPC leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev_all(fd, iov, total)

    monkeypatch.setattr(spool_files, "_writev_all", failing_writev_all)
    flags = ["--ack", "spool", "--spool-dir", spool_dir]
    async with gateway_in_process(flags, data_dir=str(tmp_path / "data")) as (gateway, port):
        assert (await post_all(port, [b"first"]))[0][0] == 202
        failures[0] = 1
        status, headers, body = (await post_all(port, [b"second"]))[0]
        assert status == 503 and headers[b"retry-after"] == b"1"
        assert json.loads(body)["error"] == "sink_unavailable" and b"ENOSPC" in body
        status, _, body = await trio.to_thread.run_sync(get, port, "/readyz")
        assert status == 503 and json.loads(body)["reason"] == "sink: spool: write failed: ENOSPC"
        assert (await post_all(port, [b"third"]))[0][0] == 202
        status, _, _ = await trio.to_thread.run_sync(get, port, "/readyz")
        assert status == 200
        assert gateway.sink.statistics().write_errors == 1
    (sequence,) = list_segments(spool_dir)
    with open(os.path.join(spool_dir, segment_name(sequence)), "rb") as f:
        scan = scan_segment(f.read())
    assert len(scan.frames) == 2 and scan.dropped == 0


# -- Kinesis behind the spool ------------------------------------------------------


def kinesis_flags(fault_server, spool_dir: str, *extra: str) -> List[str]:
    return ["--sink", "kinesis", "--stream", "logs", "--endpoint-url", fault_server.url,
            "--ack", "spool", "--spool-dir", spool_dir, "--linger", "1ms"] + list(extra)


async def test_sink_down_the_spool_fills_to_its_limit_then_drains(tmp_path, fault_server, aws_env):
    aws_env()
    fake = fault_server.fake
    down = [True]
    fake.fail_record = lambda data, attempt: "InternalFailure" if down[0] else None
    spool_dir = str(tmp_path / "spool")
    body = b"z" * (8 * KIB)
    flags = kinesis_flags(fault_server, spool_dir, "--spool-size", "128KiB", "--max-body", "16KiB",
                          "--ring-size", "1MiB", "--retry-deadline", "300ms")
    async with gateway_in_process(flags) as (gateway, port):
        answers = []
        for _ in range(40):
            answers.append((await post_all(port, [body]))[0])
            if answers[-1][0] == 503:
                break
        status, headers, reply = answers[-1]
        assert status == 503 and headers[b"retry-after"] == b"1"
        assert json.loads(reply) == {"error": "overloaded",
                                     "message": json.loads(reply)["message"]}
        assert b"spool full" in reply
        ids = accepted_ids(answers)
        assert len(ids) >= 10 and fake.stored_datas() == []
        ready = await trio.to_thread.run_sync(get, port, "/readyz")
        assert ready[0] == 503 and b"spool full" in ready[2]
        # The sink comes back: everything spooled is delivered, and the spool
        # takes records again, without a restart.
        down[0] = False
        sink = gateway.sink
        await wait_until(lambda: sink.statistics().pending_records == 0)
        await wait_until(lambda: sink.statistics().segments <= 1)
        later = await post_all(port, [b"after"])
        assert later[0][0] == 202
        ids += accepted_ids(later)
        await wait_until(lambda: sink.statistics().pending_records == 0)
    delivered = [json.loads(data.partition(b"\n")[0])["id"] for data in fake.stored_datas()]
    assert set(ids) <= set(delivered)
    assert gateway.ring.live == 0


async def test_records_left_at_shutdown_stay_spooled_and_go_out_after_a_restart(
        tmp_path, fault_server, aws_env, capsys):
    aws_env()
    fake = fault_server.fake
    down = [True]
    fake.fail_record = lambda data, attempt: "InternalFailure" if down[0] else None
    spool_dir = str(tmp_path / "spool")
    flags = kinesis_flags(fault_server, spool_dir, "--shutdown-timeout", "200ms")
    async with gateway_in_process(flags) as (gateway, port):
        ids = accepted_ids(await post_all(port, [b"kept %d" % i for i in range(5)]))
        assert len(ids) == 5
    shown = inspect(spool_dir, capsys)
    assert shown["pending_records"] == 5 and shown["oldest_pending_ms"] is not None
    down[0] = False
    async with gateway_in_process(flags) as (gateway, port):
        await wait_until(lambda: gateway.sink.statistics().pending_records == 0)
    delivered = [json.loads(data.partition(b"\n")[0])["id"] for data in fake.stored_datas()]
    assert sorted(delivered) == sorted(ids)
    assert inspect(spool_dir, capsys)["pending_records"] == 0


@pytest.fixture
def stream(moto, aws_env):
    aws_env(moto.key, moto.secret, moto.region)
    client = moto.client("kinesis")
    name = "s-" + uuid.uuid4().hex[:12]
    client.create_stream(StreamName=name, ShardCount=2)
    return client, name


async def test_moto_gets_every_spooled_record_with_its_partition_key(tmp_path, moto, stream):
    client, name = stream
    flags = ["--sink", "kinesis", "--stream", name, "--endpoint-url", moto.url, "--ack", "spool",
             "--spool-dir", str(tmp_path / "spool"), "--partition-key", "header:X-Key",
             "--explicit-hash-key-header", "X-Hash"]
    async with gateway_in_process(flags) as (gateway, port):
        keyed = await post_all(port, [b"keyed %d" % i for i in range(6)], b"X-Key: k\xc3\xa9y-7\r\n")
        hashed = await post_all(port, [b"hashed"], b"X-Hash: 5\r\n")
        plain = await post_all(port, [b"plain %d" % i for i in range(6)])
        answers = keyed + hashed + plain
        assert [status for status, _, _ in answers] == [202] * 13
        # The 202 says only the id: the record is spooled, not yet in Kinesis.
        assert all(set(json.loads(body)) == {"id"} for _, _, body in answers)
        await wait_until(lambda: gateway.sink.statistics().pending_records == 0)
    by_id = {}
    for record in read_stream(client, name):
        meta, _, data = record["Data"].partition(b"\n")
        by_id[json.loads(meta)["id"]] = (record["PartitionKey"], data)
    keyed_ids, plain_ids = accepted_ids(keyed + hashed), accepted_ids(plain)
    assert set(by_id) == set(keyed_ids) | set(plain_ids)
    assert all(by_id[i][0] == "k\u00c3\u00a9y-7" for i in accepted_ids(keyed))
    assert all(by_id[i][0] == i for i in plain_ids)  # random: the record id


# -- the driver alone: group commit, cancellation, the directory lock --------------


class Driver:
    """A ring, a SpooledSink in front of a null sink, and records made from bytes."""

    def __init__(self, directory: str, **options) -> None:
        from buffers import RingBuffer, WaitingRing
        from sinks.null import NullSink
        from sinks.spool.sink import SpooledSink

        self.ring = WaitingRing(RingBuffer(1 << 20), max_wait=1.0)
        self.events: List[str] = []
        options.setdefault("limit", 16 << 20)
        options.setdefault("sync_interval", 0.005)
        self.sink = SpooledSink(self.ring.release, self.ring, directory,
                                lambda release, given_up: NullSink(release), **options)
        self.count = 0

    def record(self, data: bytes):
        from sinks.base import Record

        self.count += 1
        rid = "01M8BECG8YTGDXTWT5%08d" % self.count
        data = b'{"v":1,"id":"%s"}\n' % rid.encode() + data
        slot = self.ring.reserve_nowait(len(data))
        slot.view[:] = data
        self.ring.commit(slot, len(data))
        self.ring.hand_off(slot)
        return Record(rid, slot)


async def test_concurrent_puts_share_one_fsync_and_none_returns_before_it(tmp_path, monkeypatch):
    driver = Driver(str(tmp_path), sync_interval=0.05)
    real_fdatasync = spool_files.os.fdatasync

    def fdatasync(fd):
        driver.events.append("sync")
        real_fdatasync(fd)

    monkeypatch.setattr(spool_files.os, "fdatasync", fdatasync)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.sink.run)

        async def put(n: int) -> None:
            await driver.sink.put(driver.record(b"r%d" % n))
            driver.events.append("ack")

        async with trio.open_nursery() as clients:
            for n in range(20):
                clients.start_soon(put, n)
        await driver.sink.aclose()
    assert driver.events[0] == "sync" and driver.events.count("ack") == 20
    assert driver.events.count("sync") <= 2
    assert driver.ring.live == 0


async def test_a_put_cancelled_before_its_group_is_written_leaves_nothing_behind(tmp_path):
    driver = Driver(str(tmp_path), sync_interval=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.sink.run)
        await driver.sink.put(driver.record(b"first"))  # the next group waits out the interval
        gone = driver.record(b"gone")
        kept = driver.record(b"kept")
        with trio.move_on_after(0.05):
            await driver.sink.put(gone)
        # The caller still owns the slot of a put that raised.
        assert gone.slot.state == "in_flight"
        driver.ring.release(gone.slot)
        assert driver.sink.state.reserved == 0
        await driver.sink.put(kept)
        await wait_until(lambda: driver.sink.statistics().pending_records == 0)
        assert driver.sink.statistics().spooled == 2
        await driver.sink.aclose()
    assert driver.ring.live == 0


async def test_a_spool_directory_serves_one_gateway_at_a_time(tmp_path):
    first, second = Driver(str(tmp_path)), Driver(str(tmp_path))
    async with trio.open_nursery() as nursery:
        await nursery.start(first.sink.run)
        with pytest.raises(SinkConfigError, match="--spool-dir: .* is in use by another gateway"):
            await second.sink.run()
        await first.sink.aclose()
    async with trio.open_nursery() as nursery:
        await nursery.start(second.sink.run)  # free again
        await second.sink.aclose()


def test_inspect_prints_a_table_and_refuses_what_is_not_a_spool(tmp_path, capsys):
    from sinks.spool.layout import SPOOL_MAGIC

    (tmp_path / segment_name(3)).write_bytes(SPOOL_MAGIC + b"\0" * 9)
    assert cli.main(["spool", "inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SEGMENT", "RECORDS", "PENDING", "PENDING_BYTES", "DROPPED", "OLDEST_PENDING"]
    assert out[1].split() == [segment_name(3), "0", "0", "0", "9", "-"]
    assert out[2].startswith("total: 1 segment, 0 of 0 records pending (0 bytes)")
    (tmp_path / segment_name(4)).write_bytes(b"not a spool segment")
    assert cli.main(["spool", "inspect", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "not a sluice spool segment" in captured.err
    # The other segments are still shown: a bad file is reported, not fatal.
    assert segment_name(3) in captured.out and "not a sluice spool segment" in captured.out
    assert cli.main(["spool", "inspect", str(tmp_path / "missing")]) == 1


def _frame(record: bytes) -> bytes:
    import zlib

    from sinks.spool.layout import FRAME

    return FRAME.pack(len(record), zlib.crc32(record), 0, 0) + record


def test_inspect_survives_crafted_records_and_maps_rather_than_reads(tmp_path, capsys):
    from sinks.spool.layout import SPOOL_MAGIC

    crafted = [b"[1, 2, 3]" + b" " * 40 + b"\n", b'{"received_at": "soon"}' + b" " * 30 + b"\n",
               b"\xff" * 60]
    segment = SPOOL_MAGIC + b"".join(_frame(record) for record in crafted)
    (tmp_path / segment_name(1)).write_bytes(segment)
    (tmp_path / segment_name(2)).write_bytes(b"")  # created, nothing landed
    doc = inspect(str(tmp_path), capsys)
    assert doc["records"] == 3 and doc["pending_records"] == 3
    assert doc["oldest_pending_ms"] is None


async def test_records_the_ring_cannot_hold_or_not_ours_are_dropped_counted_and_the_gateway_serves(
        tmp_path, capsys):
    """Spooled under a larger --ring-size, or crafted: each is handled on its own.

    Before, the first raised ValueError out of the shipper, and the gateway
    stopped at every start.
    """
    from sinks.envelope import RecordIds, envelope
    from sinks.spool.layout import SPOOL_MAGIC

    spool_dir, data_dir = str(tmp_path / "spool"), str(tmp_path / "data")
    os.makedirs(spool_dir)
    ids = RecordIds()
    huge_id, small_id = ids.next(1_700_000_000_000), ids.next(1_700_000_000_001)
    huge = envelope(huge_id, None, 1_700_000_000_000, None, None) + b"h" * (300 * KIB)
    small = envelope(small_id, None, 1_700_000_000_001, None, None) + b"still stored"
    crafted = b'{"v":1,"id":"\xff\xfe' + b"x" * 60  # a good CRC, not an envelope
    with open(os.path.join(spool_dir, segment_name(1)), "wb") as f:
        f.write(SPOOL_MAGIC + _frame(huge) + _frame(crafted) + _frame(small))
    flags = ["--ack", "spool", "--spool-dir", spool_dir, "--ring-size", "256KiB",
             "--max-body", "64KiB"]
    async with gateway_in_process(flags, data_dir=data_dir) as (gateway, port):
        sink = gateway.sink
        await wait_until(lambda: sink.statistics().pending_records == 0)
        assert sink.statistics().unstorable == 2
        (answer,) = await post_all(port, [b"served"])
        assert answer[0] == 202
        await wait_until(lambda: sink.statistics().pending_records == 0)  # shipped
    records = stored(data_dir)
    assert sorted(records) == sorted([small_id, json.loads(answer[2])["id"]])
    err = capsys.readouterr().err
    assert '"spool_unstorable"' in err and "the ring (--ring-size)" in err


def test_spool_files_are_private_and_planted_symlinks_are_not_followed(tmp_path):
    import stat

    from sinks.spool.files import LOCK_NAME, SpoolFiles
    from sinks.spool.layout import Segment, acked_name

    old = os.umask(0)
    try:
        files = SpoolFiles(str(tmp_path / "spool"))
        files.open_directory()
        files.create_segment(1)
        files.confirm_and_delete([(Segment(1, 0), [13])], [])
    finally:
        os.umask(old)
        files.close()
    spool = tmp_path / "spool"
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700
    for name in (LOCK_NAME, segment_name(1), acked_name(1)):
        assert stat.S_IMODE(os.stat(spool / name).st_mode) == 0o600, name
    # Someone who can write the directory plants a symlink where the next
    # .acked or the lock goes: it is refused, not followed.
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    files = SpoolFiles(str(spool))
    files.open_directory()
    files.create_segment(2)
    os.symlink(str(target), str(spool / acked_name(2)))
    try:
        with pytest.raises(OSError):
            files.confirm_and_delete([(Segment(2, 0), [13])], [])
    finally:
        files.close()
    assert target.read_bytes() == b""
    os.unlink(str(spool / LOCK_NAME))
    os.symlink(str(target), str(spool / LOCK_NAME))
    with pytest.raises(OSError):
        SpoolFiles(str(spool)).open_directory()
