"""The file sink under Trio with a real temporary directory, and its segment reader."""

from __future__ import annotations

import errno
import os
import threading
import zlib
from typing import List

import pytest
import trio
import trio.testing

import sinks.file as file_sink
from buffers import IN_FLIGHT, RELEASED, RingBuffer
from sinks.base import Record
from sinks.errors import SinkUnavailable
from sinks.file import FRAME_HEADER, SEGMENT_MAGIC, FileSink, SegmentError, list_segments, read_records


class Harness:
    """A ring, a file sink over ``directory``, and what was released when."""

    def __init__(self, directory: str, **options) -> None:
        self.directory = directory
        self.ring = RingBuffer(1 << 20)
        self.released: List[bytes] = []
        self.stored_at_release: List[List[bytes]] = []
        options.setdefault("flush_interval", 0.005)
        self.sink = FileSink(self._release, directory, **options)
        self.count = 0

    def _release(self, slot) -> None:
        self.released.append(bytes(slot.view))
        self.stored_at_release.append(stored(self.directory))
        self.ring.release(slot)

    def record(self, data: bytes) -> Record:
        slot = self.ring.reserve(max(1, len(data)))
        slot.view[:len(data)] = data
        self.ring.commit(slot, len(data))
        self.ring.hand_off(slot)
        self.count += 1
        return Record("id%d" % self.count, slot)

    async def put_all(self, datas) -> List[Record]:
        records = [self.record(data) for data in datas]
        for record in records:
            assert await self.sink.put(record) is None
        return records


def stored(directory: str) -> List[bytes]:
    return [bytes(record) for record in read_records(directory)]


def payloads(count: int, size: int = 100) -> List[bytes]:
    return [(b"%06d|" % i) + bytes((i + j) % 256 for j in range(size - 7)) + b"\n" for i in range(count)]


async def run_sink(harness: Harness, datas) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.sink.run)
        await harness.put_all(datas)
        await harness.sink.aclose()


async def wait_until(condition) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.002)


# -- writing and reading back ----------------------------------------------------

async def test_records_are_written_and_read_back_byte_for_byte(tmp_path):
    harness = Harness(str(tmp_path))
    datas = payloads(50) + [b"", b"\x00" * 7, b"x", bytes(range(256)) * 20]
    await run_sink(harness, datas)
    assert stored(str(tmp_path)) == datas
    assert harness.ring.used == 0 and harness.ring.live == 0
    stats = harness.sink.statistics()
    assert stats.stored == len(datas) and stats.stored_bytes == sum(map(len, datas))
    assert stats.held == 0 and stats.segments == 1
    (segment,) = list_segments(str(tmp_path))
    assert os.path.basename(segment) == "0000000000000000.seg"
    with open(segment, "rb") as f:
        raw = f.read()
    assert raw.startswith(SEGMENT_MAGIC)
    assert len(raw) == len(SEGMENT_MAGIC) + sum(FRAME_HEADER.size + len(d) for d in datas)


async def test_frames_follow_the_documented_layout(tmp_path):
    harness = Harness(str(tmp_path))
    await run_sink(harness, [b"hello", b"world!"])
    (segment,) = list_segments(str(tmp_path))
    with open(segment, "rb") as f:
        raw = f.read()
    pos = len(SEGMENT_MAGIC)
    for data in (b"hello", b"world!"):
        length, crc = FRAME_HEADER.unpack_from(raw, pos)
        assert (length, crc) == (len(data), zlib.crc32(data))
        assert raw[pos + 8:pos + 8 + length] == data
        pos += 8 + length
    assert pos == len(raw)


async def test_records_are_released_only_after_being_written(tmp_path):
    harness = Harness(str(tmp_path))
    datas = payloads(20)
    await run_sink(harness, datas)
    assert sorted(harness.released) == sorted(datas)
    for data, on_disk in zip(harness.released, harness.stored_at_release):
        assert data in on_disk


async def test_put_only_queues_until_the_flush(tmp_path):
    harness = Harness(str(tmp_path), flush_interval=3600)
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.sink.run)
        records = await harness.put_all(payloads(5))
        await trio.testing.wait_all_tasks_blocked()
        assert [r.slot.state for r in records] == [IN_FLIGHT] * 5
        assert stored(str(tmp_path)) == [] and harness.released == []
        assert harness.sink.statistics().held == 5
        await harness.sink.aclose()  # flushes what is queued
    assert [r.slot.state for r in records] == [RELEASED] * 5
    assert stored(str(tmp_path)) == payloads(5)


async def test_flush_interval_writes_without_close(tmp_path):
    harness = Harness(str(tmp_path), flush_interval=0.001)
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.sink.run)
        await harness.put_all(payloads(3))
        await wait_until(lambda: len(harness.released) == 3)
        assert stored(str(tmp_path)) == payloads(3)
        await harness.sink.aclose()


async def test_batch_bytes_triggers_a_write_before_the_interval(tmp_path):
    harness = Harness(str(tmp_path), flush_interval=3600, batch_bytes=1000)
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.sink.run)
        await harness.put_all(payloads(10, size=100))
        await wait_until(lambda: len(harness.released) == 10)
        assert stored(str(tmp_path)) == payloads(10)
        await harness.sink.aclose()


async def test_segments_rotate_by_size(tmp_path):
    harness = Harness(str(tmp_path), segment_bytes=1024)
    datas = payloads(40)
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.sink.run)
        for i in range(0, 40, 7):  # several flushes, so rotation happens inside and between batches
            await harness.put_all(datas[i:i + 7])
            await wait_until(lambda: harness.ring.live == 0)
        await harness.sink.aclose()
    segments = list_segments(str(tmp_path))
    assert len(segments) >= 4
    assert [os.path.basename(p) for p in segments] == ["%016d.seg" % i for i in range(len(segments))]
    for path in segments:
        assert os.path.getsize(path) <= 1024
    assert stored(str(tmp_path)) == datas
    assert harness.sink.statistics().segments == len(segments)


async def test_record_larger_than_a_segment_gets_a_segment_of_its_own(tmp_path):
    harness = Harness(str(tmp_path), segment_bytes=256)
    big = bytes(range(256)) * 8
    datas = [b"small one", big, b"small two", b"small three", big + b"!"]
    await run_sink(harness, datas)
    assert stored(str(tmp_path)) == datas
    sizes = [os.path.getsize(p) for p in list_segments(str(tmp_path))]
    assert len(SEGMENT_MAGIC) + FRAME_HEADER.size + len(big) in sizes
    assert all(size <= 256 for size in sizes if size < len(big))


async def test_sequence_continues_after_restart(tmp_path):
    first = Harness(str(tmp_path))
    await run_sink(first, [b"before restart"])
    second = Harness(str(tmp_path))
    await run_sink(second, [b"after restart"])
    names = [os.path.basename(p) for p in list_segments(str(tmp_path))]
    assert names == ["0000000000000000.seg", "0000000000000001.seg"]
    assert stored(str(tmp_path)) == [b"before restart", b"after restart"]


async def test_put_after_aclose_is_refused(tmp_path):
    harness = Harness(str(tmp_path))
    await run_sink(harness, [b"one"])
    assert harness.sink.ready() == (False, "shutting down")
    record = harness.record(b"late")
    with pytest.raises(SinkUnavailable):
        await harness.sink.put(record)
    assert record.slot.state == IN_FLIGHT  # still the caller's to release
    assert stored(str(tmp_path)) == [b"one"]


async def test_failed_write_is_retried_without_loss_or_partial_frames(tmp_path, monkeypatch):
    reports = []
    harness = Harness(str(tmp_path), retry_interval=0.005,
                      report=lambda *report: reports.append(report))
    real_writev = file_sink.writev
    disk_full = threading.Event()
    disk_full.set()
    failures = []

    def failing_writev(fd, buffers):
        if disk_full.is_set():
            # Part of the batch lands, then the disk is full.
            os.write(fd, bytes(buffers[0]) + bytes(buffers[1][:3]))
            failures.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, buffers)

    datas = payloads(6)
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.sink.run)
        monkeypatch.setattr(file_sink, "writev", failing_writev)
        await harness.put_all(datas)
        await wait_until(lambda: len(failures) >= 2)
        await wait_until(lambda: not harness.sink.ready()[0])
        assert harness.sink.ready() == (False, "write failed: ENOSPC")
        assert harness.released == [] and harness.ring.live == 6  # nothing given up
        assert stored(str(tmp_path)) == []  # the partial frame was cut away
        disk_full.clear()
        await wait_until(lambda: len(harness.released) == 6)
        assert harness.sink.ready() == (True, "ok")
        await harness.sink.aclose()
    assert harness.sink.statistics().write_errors == len(failures)
    assert stored(str(tmp_path)) == datas
    # One report when writes began to fail, however many failed; one when they worked again.
    assert reports == [
        ("file", False, "write failed in %s: [Errno 28] No space left on device; writing again every "
                        "0.005s" % tmp_path),
        ("file", True, "writing to %s again" % tmp_path),
    ]
    # Every released record was on disk when it was released.
    for data, on_disk in zip(harness.released, harness.stored_at_release):
        assert data in on_disk


# -- reading segments --------------------------------------------------------------

async def _two_segments(directory: str) -> List[bytes]:
    harness = Harness(directory, segment_bytes=1024)
    datas = payloads(12)
    await run_sink(harness, datas)
    assert len(list_segments(directory)) == 2
    return datas


async def test_torn_last_frame_is_ignored(tmp_path):
    directory = str(tmp_path)
    datas = await _two_segments(directory)
    last = list_segments(directory)[-1]
    size = os.path.getsize(last)
    os.truncate(last, size - 1)  # the last record lost its final byte
    assert stored(directory) == datas[:-1]
    os.truncate(last, size - len(datas[-1]) - FRAME_HEADER.size + 3)  # only 3 header bytes left
    assert stored(directory) == datas[:-1]


async def test_torn_frame_at_the_end_of_each_cut(tmp_path):
    directory = str(tmp_path)
    datas = await _two_segments(directory)
    last = list_segments(directory)[-1]
    with open(last, "rb") as f:
        raw = f.read()
    in_last = len(stored_from(raw))
    kept_before = datas[:len(datas) - in_last]
    # Cut the last segment at every byte: readers see whole frames up to the cut.
    frame_ends = []
    pos = len(SEGMENT_MAGIC)
    for data in datas[len(kept_before):]:
        pos += FRAME_HEADER.size + len(data)
        frame_ends.append(pos)
    for cut in range(len(raw) + 1):
        with open(last, "wb") as f:
            f.write(raw[:cut])
        whole_frames = sum(1 for end in frame_ends if end <= cut)
        assert stored(directory) == kept_before + datas[len(kept_before):len(kept_before) + whole_frames]


def stored_from(raw: bytes) -> List[bytes]:
    out = []
    pos = len(SEGMENT_MAGIC)
    while pos + FRAME_HEADER.size <= len(raw):
        length, _ = FRAME_HEADER.unpack_from(raw, pos)
        out.append(raw[pos + 8:pos + 8 + length])
        pos += 8 + length
    return out


async def test_crc_mismatch_raises(tmp_path):
    directory = str(tmp_path)
    await _two_segments(directory)
    first = list_segments(directory)[0]
    with open(first, "r+b") as f:
        f.seek(len(SEGMENT_MAGIC) + FRAME_HEADER.size + 150)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(SegmentError):
        stored(directory)


def test_bad_magic_raises(tmp_path):
    with open(os.path.join(str(tmp_path), "0000000000000000.seg"), "wb") as f:
        f.write(b"NOTASEGMENT\n")
    with pytest.raises(SegmentError):
        stored(str(tmp_path))


@pytest.mark.parametrize("content", [b"", SEGMENT_MAGIC[:4], SEGMENT_MAGIC])
async def test_empty_segment_is_tolerated(tmp_path, content):
    directory = str(tmp_path)
    datas = await _two_segments(directory)
    with open(os.path.join(directory, "0000000000000002.seg"), "wb") as f:
        f.write(content)
    assert stored(directory) == datas
    # And a restart carries on after it.
    harness = Harness(directory)
    await run_sink(harness, [b"after"])
    assert os.path.basename(list_segments(directory)[-1]) == "0000000000000003.seg"
    assert stored(directory) == datas + [b"after"]


def test_only_segment_files_are_listed(tmp_path):
    directory = str(tmp_path)
    for name in ("0000000000000002.seg", "0000000000000010.seg", "notes.txt", "abc.seg", "0001.seg.tmp"):
        with open(os.path.join(directory, name), "wb") as f:
            f.write(SEGMENT_MAGIC)
    names = [os.path.basename(p) for p in list_segments(directory)]
    assert names == ["0000000000000002.seg", "0000000000000010.seg"]
    assert stored(directory) == []


async def test_files_and_directories_are_private_whatever_the_umask(tmp_path):
    """Logs are other people's data: 0600 files, 0700 directories, even under umask 000."""
    import stat

    old = os.umask(0)
    try:
        directory = str(tmp_path / "data")
        await run_sink(Harness(directory), payloads(3))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    (segment,) = list_segments(directory)
    assert stat.S_IMODE(os.stat(segment).st_mode) == 0o600
