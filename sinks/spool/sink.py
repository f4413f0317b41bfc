"""``--ack spool``: the write-ahead spool in front of a sink (the Trio driver).

Theory of operation
-------------------
`SpooledSink` wraps the real sink (the *inner* sink: file, null, Kinesis or
Firehose).  The decisions live in the sans-I/O ``sinks.spool.layout``; this module
moves bytes between the ring, the spool files and the inner sink.

Writing (group commit).  `put` promises the record its frame's bytes of
spool space (or raises `Overloaded`: ``503`` with ``Retry-After``), joins the
open group and waits.  One writer task takes the group at most every
``sync_interval`` seconds, writes all its frames with ``writev`` straight
from the ring slices and fsyncs the segment, in a worker thread; only then
are the group's clients woken, and each `put` gives its slice back to the
ring and returns: the ``202`` follows a durable copy.  A failed write or
sync (disk full, I/O error) truncates the group away and every `put` in it
raises `SinkUnavailable` (``503`` with ``Retry-After``).

Shipping.  A shipper task takes spooled records oldest first (records to
send again first), reads each from its segment into a slot of the
gateway's ring (``readinto``: no copy of the body as a Python object; at
most `SHIP_RING_SHARE` of the ring, and never ahead of clients waiting for
ring space) and puts it to the inner sink, which returns at once.

How the shipper learns what was stored: the inner sink is built with this
sink's callables as its ``release`` and ``given_up``.  A sink calls
``release(slot)`` only once the record is stored (the file sink once it
wrote it, the null sink at once, the stream sinks once the service stored
it, as they run without ``--ack kinesis`` here) and ``given_up(slot)`` for a
record it gave up.  A stored record is confirmed: its frame's offset goes to
the segment's ``.acked`` file (written every `ACK_INTERVAL`, not fsynced),
and a sealed segment whose records are all confirmed is deleted.  A record
given up, or refused by `put` (the sink is down), is sent again after a
pause.

Shutdown.  `aclose` refuses new records, lets the writer finish its group,
stops shipping, closes the inner sink (which stores what it holds, within
the server's shutdown deadline) and writes the confirmations.  Whatever was
not confirmed stays in the spool and is shipped after the next start; a
record whose confirmation was not written (``kill -9``) is sent again.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import trio

from buffers import Overloaded, RingFull, Slot, WaitingRing
from sinks import worker
from sinks.base import (
    HeaderLookup,
    HealthReport,
    Log,
    Record,
    RecordKeys,
    Release,
    Sink,
    SinkStatistics,
    health_reporter,
    no_log,
)
from sinks.errors import SinkConfigError, SinkUnavailable
from sinks.spool.files import SpoolFiles, SpoolInUse
from sinks.spool.layout import (
    FRAME,
    SPOOL_MAGIC,
    Position,
    SpoolError,
    SpoolState,
    encode_keys,
    record_id_of,
    segment_name,
)

__all__ = ["SpooledSink", "SpoolStatistics", "SHIP_RING_SHARE", "ACK_INTERVAL"]

#: Share of the ring the shipper may fill with records read back: the rest
#: stays for requests, so a slow sink never makes the spool refuse clients
#: for lack of ring space while disk space is left.
SHIP_RING_SHARE = 0.5
#: Records read back per worker-thread hop: one Kinesis request's worth.
SHIP_BATCH_RECORDS = 500
#: Records out with the inner sink at once; bounds the slot map and the
#: inner sink's queue (the stream sinks hold at most ring/100 records).
MAX_SHIPPING = 8192
#: How often confirmations are appended to the ``.acked`` files and finished
#: segments deleted.  A ``kill -9`` sends again what was confirmed in the
#: last interval; shorter means more small writes.
ACK_INTERVAL = 0.05
#: After the inner sink refused or gave up a record: pause shipping at least
#: this long, and at most `MAX_PAUSE` whatever ``Retry-After`` it gave, so
#: delivery resumes within seconds of the sink coming back.
MIN_PAUSE = 0.05
MAX_PAUSE = 5.0
GIVEN_UP_PAUSE = 1.0
#: No ring space for a read-back record: look again after this long.
RING_RETRY = 0.01
#: Retry-After when the spool is full: space comes back as the sink stores
#: records, which takes about a call to the sink.
SPOOL_FULL_RETRY_AFTER = 1.0
WRITE_RETRY_AFTER = 1.0
#: A closing sink whose shutdown deadline passed still writes the
#: confirmations it holds (a local append), for at most this long.
FINAL_ACK_TIMEOUT = 2.0
#: Characters of a record id (the partition key when none is stored).
_ID_CHARS = 26

MakeInner = Callable[[Release, Release], Sink]
def _reason(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))


@dataclass(frozen=True)
class SpoolStatistics(SinkStatistics):
    """The spool's counters: ``stored`` records were fsynced to the spool,
    ``held`` ones are in it and not yet stored by the ``inner`` sink."""

    inner: SinkStatistics = SinkStatistics()
    limit_bytes: int = 0
    used_bytes: int = 0
    reserved_bytes: int = 0
    segments: int = 0
    pending_records: int = 0
    pending_bytes: int = 0
    shipping: int = 0
    confirmed: int = 0
    retries: int = 0
    #: Group commits (one fsync each) and the records they spooled.
    groups: int = 0
    spooled: int = 0
    #: Requests refused because the spool was full.
    refused_full: int = 0
    shipped: int = 0
    in_flight: int = 0
    #: Spooled records larger than the inner sink takes now, dropped.
    unstorable: int = 0
    deleted_segments: int = 0
    #: Bytes of torn tails dropped when segments were recovered.
    dropped_bytes: int = 0
    error: Optional[str] = None


class _Group:
    """The records that share one write and one fsync."""

    __slots__ = ("records", "keys", "key_lengths", "bytes", "taken", "done", "error")

    def __init__(self) -> None:
        self.records: List[Record] = []
        self.keys: List[bytes] = []
        self.key_lengths: List[Tuple[int, int]] = []
        self.bytes = 0
        self.taken = False
        self.done = trio.Event()
        self.error: Optional[str] = None

    def remove(self, record: Record) -> int:
        index = self.records.index(record)
        del self.records[index]
        keys = self.keys.pop(index)
        del self.key_lengths[index]
        frame = FRAME.size + len(keys) + record.slot.size
        self.bytes -= frame
        return frame


class SpooledSink(Sink):
    """Records spooled to ``directory`` (fsynced before ``put`` returns), then shipped to an inner sink.

    ``make_inner(release, given_up)`` builds the inner sink; ``ring`` is the
    gateway's ring, which read-back records are put in; ``max_record`` is
    the largest record a request can make (for ``ready``).
    """

    name = "spool"

    def __init__(self, release: Release, ring: WaitingRing, directory: str, make_inner: MakeInner, *,
                 limit: int, sync_interval: float, max_record: int = 0,
                 log: Log = no_log, report: Optional[HealthReport] = None) -> None:
        super().__init__(release)
        self.directory = directory
        self.sync_interval = sync_interval
        self.state = SpoolState(limit)
        self.inner = make_inner(self._stored, self._given_up)
        self._ring = ring
        self._ship_budget = max(1, int(ring.capacity * SHIP_RING_SHARE))
        self._max_frame = FRAME.size + max_record
        self._log = log
        self._report = report or health_reporter(log)
        self._group: Optional[_Group] = None
        self._writer_kick = trio.Event()
        self._ship_kick = trio.Event()
        self._closing = False
        self._close_started = trio.Event()
        self._writer_done = trio.Event()
        self._done = trio.Event()
        self._last_sync = float("-inf")
        self._pause_until = float("-inf")
        self._files = SpoolFiles(directory)
        self._shipping: Dict[Slot, Position] = {}
        self._ship_bytes = 0
        self._housekeeping_lock = trio.Lock()
        self._error: Optional[str] = None
        self._logged_unstorable = False
        self.groups = 0
        self.spooled = 0
        self.refused_full = 0
        self.write_errors = 0
        self.shipped = 0
        self.unstorable = 0
        self.deleted_segments = 0
        self.dropped_bytes = 0

    @classmethod
    def from_config(cls, config, ring: WaitingRing, make_inner: MakeInner, *,
                    log: Log = no_log) -> SpooledSink:
        """The spool ``config`` (a ``gateway.config.settings.Config``) asks for, in front of
        ``make_inner``'s sink."""
        return cls(ring.release, ring, config.spool_dir, make_inner, limit=config.spool_size,
                   sync_interval=config.spool_sync_interval, max_record=config.max_record, log=log)

    # -- the Sink interface --------------------------------------------------

    @property  # type: ignore[override]
    def max_record_bytes(self) -> Optional[int]:  # type: ignore[override]
        return self.inner.max_record_bytes

    def record_keys(self, record_id: str, tenant: Optional[bytes], header: HeaderLookup) -> RecordKeys:
        return self.inner.record_keys(record_id, tenant, header)

    def describe(self) -> str:
        inner = self.inner.describe()
        directory = getattr(self.inner, "directory", None)
        if inner == "file" and directory:
            inner = "file (%s)" % os.path.abspath(directory)
        return "%s, spooled in %s (limit %d bytes, fsync every %gs)" % (
            inner, os.path.abspath(self.directory), self.state.limit, self.sync_interval)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            found = await self._open_directory()
            for sequence, size, scan, acked in found:
                self.state.recover(sequence, size, scan, acked)
                if scan.dropped:
                    self.dropped_bytes += scan.dropped
                    self._log("spool_tail_dropped", "warning", segment=segment_name(sequence),
                              bytes=scan.dropped, at=scan.end,
                              detail="a write cut short by a crash; never acknowledged")
            async with trio.open_nursery() as nursery:
                await nursery.start(self.inner.run)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._shipper)
                nursery.start_soon(self._housekeeper)
                task_status.started()
                await self._close_started.wait()
                await self._writer_done.wait()
                self._ship_kick.set()
                await self.inner.aclose()
                await self._housekeeping()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(FINAL_ACK_TIMEOUT):
                    await self._housekeeping()
                await trio.to_thread.run_sync(self._files.close)
            self._done.set()

    async def put(self, record: Record) -> Optional[dict]:
        if self._closing:
            raise SinkUnavailable("the spool is shutting down", retry_after=1.0)
        keys, pk_len, hk_len = encode_keys(record.partition_key, record.explicit_hash_key, record.id)
        frame = FRAME.size + len(keys) + record.slot.size
        state = self.state
        if not state.reserve(frame):
            self.refused_full += 1
            raise Overloaded("spool full: %d of %d bytes in use" % (state.used + state.reserved, state.limit),
                             retry_after=SPOOL_FULL_RETRY_AFTER)
        group = self._group
        if group is None:
            group = self._group = _Group()
        if not group.records:
            self._writer_kick.set()
        group.records.append(record)
        group.keys.append(keys)
        group.key_lengths.append((pk_len, hk_len))
        group.bytes += frame
        try:
            await group.done.wait()
        except BaseException:
            if not group.taken and group.error is None:
                state.unreserve(group.remove(record))
            elif not group.done.is_set():
                # The writer thread may be reading the record's bytes: the
                # caller reuses them once this raises, so not before that ends.
                with trio.CancelScope(shield=True):
                    await group.done.wait()
            raise
        if group.error is not None:
            raise SinkUnavailable("spool: %s" % group.error, retry_after=WRITE_RETRY_AFTER)
        self._release(record.slot)
        return None

    def ready(self) -> Tuple[bool, str]:
        if self._closing:
            return False, "shutting down"
        if self._error is not None:
            return False, "spool: " + self._error
        state = self.state
        if state.used + state.reserved + self._max_frame > state.limit:
            return False, "spool full"
        return True, "ok"

    def stop_waiting(self) -> None:
        # Records still waiting for a group commit are refused; a group
        # being written completes (milliseconds) and is acknowledged.
        group = self._group
        if group is not None and not group.taken:
            self._group = None
            self.state.unreserve(group.bytes)
            group.error = "shutting down: not written within the shutdown timeout"
            group.done.set()
        self.inner.stop_waiting()

    async def aclose(self) -> None:
        self._closing = True
        self._close_started.set()
        self._writer_kick.set()
        self._ship_kick.set()
        await self._done.wait()

    def statistics(self) -> SpoolStatistics:
        state = self.state.statistics()
        return SpoolStatistics(
            stored=self.spooled, held=state["pending_records"], write_errors=self.write_errors,
            inner=self.inner.statistics(), groups=self.groups, spooled=self.spooled,
            refused_full=self.refused_full, shipped=self.shipped, in_flight=len(self._shipping),
            unstorable=self.unstorable, deleted_segments=self.deleted_segments,
            dropped_bytes=self.dropped_bytes, error=self._error, **state)

    async def _open_directory(self):
        try:
            return await trio.to_thread.run_sync(self._files.open_directory)
        except (SpoolInUse, SpoolError) as exc:
            raise SinkConfigError("--spool-dir", str(exc)) from None
        except OSError as exc:
            # Unwritable, or a symlink where the lock file goes (O_NOFOLLOW).
            raise SinkConfigError("--spool-dir", "%s: %s" % (
                exc.filename or self._files.directory, exc.strerror or exc)) from None

    # -- writing -------------------------------------------------------------

    async def _writer(self) -> None:
        try:
            while True:
                group = self._group
                if group is None or not group.records:
                    if self._closing:
                        return
                    await self._writer_kick.wait()
                    self._writer_kick = trio.Event()
                    continue
                # Let more records join, so many requests share one fsync.
                await trio.sleep_until(self._last_sync + self.sync_interval)
                if self._group is not group:
                    continue  # refused by stop_waiting meanwhile
                self._group = None
                group.taken = True
                try:
                    await self._commit(group)
                finally:
                    group.done.set()
        finally:
            self._writer_done.set()

    async def _commit(self, group: _Group) -> None:
        state = self.state
        self._last_sync = trio.current_time()
        if not group.records:
            return
        try:
            if state.rotation_due():
                await trio.to_thread.run_sync(self._files.create_segment, state.next_sequence)
                state.open_segment(len(SPOOL_MAGIC))
            assert state.current is not None
            await worker.run_sync(self._files.write_group, group.records, group.keys,
                                     group.key_lengths, state.current.size)
        except OSError as exc:
            state.unreserve(group.bytes)
            self.write_errors += 1
            if self._error is None:
                self._report(self.name, False, "write failed in %s: %s; answering 503" % (
                    self.directory, exc))
            group.error = self._error = "write failed: %s" % _reason(exc)
            return
        if self._error is not None:
            self._error = None
            self._report(self.name, True, "writing to %s again" % self.directory)
        state.appended((len(keys) + record.slot.size, pk_len, hk_len)
                       for record, keys, (pk_len, hk_len)
                       in zip(group.records, group.keys, group.key_lengths))
        self.groups += 1
        self.spooled += len(group.records)
        if state.current is None:
            # Sealed: every byte of it was synced with its last group.
            await trio.to_thread.run_sync(self._files.close_segment)
        self._ship_kick.set()

    # -- shipping ------------------------------------------------------------

    async def _shipper(self) -> None:
        state = self.state
        while not self._closing:
            now = trio.current_time()
            if now < self._pause_until:
                with trio.move_on_at(self._pause_until):
                    await self._close_started.wait()
                continue
            budget = self._ship_budget - self._ship_bytes
            room = MAX_SHIPPING - len(self._shipping)
            if budget <= 0 or room <= 0 or not state.ready_to_ship():
                await self._ship_kick.wait()
                self._ship_kick = trio.Event()
                continue
            positions = state.take(min(room, SHIP_BATCH_RECORDS), budget)
            jobs = self._reserve_slots(positions)
            if not jobs:
                await trio.sleep(RING_RETRY)
                continue
            await self._ship(jobs)

    def _reserve_slots(self, positions: List[Position]) -> List[Tuple[Position, Slot]]:
        """Ring slots for ``positions``; those that get none go back to be shipped later."""
        jobs: List[Tuple[Position, Slot]] = []
        limit = self.inner.max_record_bytes
        kinesis = self.inner.name == "kinesis"
        capacity = self._ring.capacity
        for n, position in enumerate(positions):
            segment, index = position
            _, pk_len, _, size = segment.record_span(index)
            key = (pk_len or _ID_CHARS) if kinesis else 0  # Kinesis counts the partition key
            if limit is not None and size + key > limit:
                self._unstorable(position, size, limit, "the sink's record limit")
                continue
            if size > capacity:
                # Spooled before --ring-size or --max-body was lowered (or a
                # crafted file): no slot can ever hold it.
                self._unstorable(position, size, capacity, "the ring (--ring-size)")
                continue
            try:
                slot = self._ring.reserve_nowait(size)
            except RingFull:
                for rest in positions[n:]:
                    self.state.retry(rest)
                break
            self._ship_bytes += size
            jobs.append((position, slot))
        return jobs

    def _unstorable(self, position: Position, size: int, limit: int, what: str) -> None:
        # Spooled under larger limits than now (--max-record-size, --ring-size),
        # or not a record this gateway wrote: it can never be stored, and
        # keeping it would block the spool (and, raised, stop the gateway at
        # every start).  The first one is logged with where it lies.
        self.unstorable += 1
        if not self._logged_unstorable:
            self._logged_unstorable = True
            segment, index = position
            self._log("spool_unstorable", "error", bytes=size, limit=limit,
                      segment=segment.sequence, offset=segment.record_span(index)[0],
                      detail="a spooled record does not fit %s or is malformed; dropped "
                             "(counted as unstorable, later ones are only counted)" % what)
        if self.state.confirm(position):
            self._ship_kick.set()

    async def _ship(self, jobs: List[Tuple[Position, Slot]]) -> None:
        ring = self._ring
        try:
            keys = await worker.run_sync(self._files.read_back, jobs)
        except OSError as exc:
            for position, slot in jobs:
                self._ship_bytes -= slot.size
                self._ring.release(slot)
                self.state.retry(position)
            self._log("spool_read_failed", "error", error=str(exc), detail="trying again")
            self._pause(MAX_PAUSE)
            return
        inner = self.inner
        for n, (position, slot) in enumerate(jobs):
            if self._closing or trio.current_time() < self._pause_until:
                self._return(jobs[n:])
                return
            record_keys = keys[n]
            segment, index = position
            _, pk_len, hk_len, size = segment.record_span(index)
            try:
                # A frame with a good CRC but not written by a gateway (a
                # crafted or foreign file): handled per record.
                pk = record_keys[:pk_len].decode("utf-8") if pk_len else None
                hk = record_keys[pk_len:].decode("ascii") if hk_len else None
                record_id = record_id_of(slot.view[:size])
            except (ValueError, KeyError, TypeError):
                self._ship_bytes -= slot.size
                ring.release(slot)
                self._unstorable(position, size, size, "the envelope format")
                continue
            ring.commit(slot, size)
            ring.hand_off(slot)
            record = Record(record_id, slot, None, partition_key=pk, explicit_hash_key=hk)
            self._shipping[slot] = position
            try:
                await inner.put(record)
            except SinkUnavailable as exc:
                self._not_stored(slot)
                self._pause(exc.retry_after)
                self._return(jobs[n + 1:])
                return
            self.shipped += 1

    def _return(self, jobs: List[Tuple[Position, Slot]]) -> None:
        """Read back but not put: give the slots back, ship the records later."""
        for position, slot in jobs:
            self._ship_bytes -= slot.size
            self._ring.release(slot)
            self.state.retry(position)

    def _pause(self, delay: float) -> None:
        until = trio.current_time() + min(MAX_PAUSE, max(MIN_PAUSE, delay))
        if until > self._pause_until:
            self._pause_until = until

    def _stored(self, slot: Slot) -> None:
        """The inner sink's ``release``: the record is stored."""
        position = self._shipping.pop(slot)
        self._ship_bytes -= slot.size
        self._ring.release(slot)
        self.state.confirm(position)
        self._ship_kick.set()

    def _given_up(self, slot: Slot) -> None:
        """The inner sink's ``given_up``: the record was not stored; send it again later."""
        self._not_stored(slot)
        self._pause(GIVEN_UP_PAUSE)
        self._ship_kick.set()

    def _not_stored(self, slot: Slot) -> None:
        position = self._shipping.pop(slot)
        self._ship_bytes -= slot.size
        self._ring.release(slot)
        self.state.retry(position)

    # -- confirmations and deletion -------------------------------------------

    async def _housekeeper(self) -> None:
        while True:
            await trio.sleep(ACK_INTERVAL)
            await self._housekeeping()

    async def _housekeeping(self) -> None:
        async with self._housekeeping_lock:
            await self._write_confirmations()

    async def _write_confirmations(self) -> None:
        state = self.state
        acks = state.take_acks()
        finished = [segment for segment in state.finished() if segment is not state.current]
        if not acks and not finished:
            return
        gone = [segment.sequence for segment in finished]
        writes = [(segment, offsets) for segment, offsets in acks if segment.sequence not in gone]
        try:
            await worker.run_sync(self._files.confirm_and_delete, writes, gone)
        except OSError as exc:
            for segment, offsets in writes:
                segment.acks[:0] = offsets  # written next time
            self._log("spool_confirm_failed", "error", error=str(exc), detail="trying again")
            return
        for segment in finished:
            if segment.sequence in state.segments:
                state.deleted(segment)
                self.deleted_segments += 1
        if finished:
            self._ship_kick.set()
