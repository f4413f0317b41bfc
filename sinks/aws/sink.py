"""Kinesis Data Streams and Firehose sinks: the Trio driver.

Theory of operation
-------------------
`StreamSink` turns records into PutRecords (Kinesis) or PutRecordBatch
(Firehose) calls.  The decisions are made by the sans-I/O pieces; this
module only waits, calls and wakes clients:

* ``sinks.aws.partition_keys`` decides partition keys from the request head (the server
  asks through `StreamSink.record_keys`, before the body is read);
* ``sinks.aws.delivery`` keeps the send queue, decides when a batch goes and
  what each response means for each record (stored, retried after a backoff
  from ``sinks.backoff``, or given up);
* ``sinks.aws.putrecords`` builds each request body in place and reads the
  answers; ``sinks.aws.http`` signs and sends (in worker threads).

Tasks.  `put` queues the record and, with ``ack`` on, waits for its
outcome.  One send loop (`run`) starts a call whenever the queue holds a
full batch or its oldest record has lingered ``linger`` seconds and one of
``max_in_flight`` preallocated batch builders is free; each call is its own
task, and the builder goes back to the pool when the call's outcome is
applied.  Each builder exported the ring's buffer once, and encodes records
straight from their ring slices (base64 is the only copy before TLS): on the
event loop for small batches, in a worker thread from
`ENCODE_IN_THREAD_BYTES` on, which also takes the body's SHA-256 for SigV4
while it is in the cache, so the event loop does not.  That thread yields
the CPU to the event loop (``sinks.worker``'s background jobs) unless the
sink is falling behind: every builder busy, or another full batch already
queued.  (At saturation with 1 MB bodies, on one core, encoding every batch
at lower priority stored a quarter fewer records; with this rule, 6% fewer
than at the loop's priority.)
With ``--aggregation kpl`` the builder is ``sinks.aws.aggregation``'s
`AggregatingBuilder`: it packs records into KPL aggregates and maps each
call's per-Kinesis-record answers back to the records.

Ownership of ring slices.  The sink reads a record's bytes only while
encoding it into a batch, and keeps the slice until the record is stored or
given up, since a retry encodes it again.  A waiting `put` cancelled while
its record is being encoded waits (shielded, milliseconds) for the encoding
to end before it raises.  With
``ack`` on, the waiting `put` gives the slice back once the record is
stored, and when it raises (given up, or the client went away) the slice is
still the caller's, as `Sink.put` promises.  Without ``ack`` the sink
releases it itself.

Failures.  Throttling, 5xx, unreadable answers, connection errors and
timeouts are retried (only the failed records of a partly failed call) with
full-jitter backoff until each record's deadline.  A call that failed as a
whole also pauses new calls until the earliest retry.  A permanent error
(missing stream, denied access, invalid request, credentials that cannot be
used or refreshed) gives up everything held, makes `ready` report the
cause, answers ``503`` with ``Retry-After`` for ``failure_hold`` seconds,
and is logged once; after the hold the next records try again.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import trio

from sinks import worker
from sinks.aws.aggregation import KPL, KPL_MAX_AGGREGATE_BYTES, OFF, AggregatingBuilder, payload_units
from sinks.aws.delivery import STORED, Delivery, Entry, QueueFull, Settled
from sinks.aws.errors import (
    MESSAGE_MAX_CHARS,
    CredentialsError,
    MalformedResponse,
    ServiceError,
    classify_error,
    error_class,
)
from sinks.aws.follow_limit import RecordLimitFollower
from sinks.aws.http import Endpoint, NoRegion, Reply, open_botocore_endpoint
from sinks.aws.limits import MIB, PUT_RECORDS_MAX_RECORDS, PUT_RECORDS_MAX_REQUEST_BYTES
from sinks.aws.partition_keys import NO_KEYS, KeyPolicy
from sinks.aws.putrecords import BatchLimits, PutRecordsResult, RecordResult
from sinks.aws.record_limit import AUTO, is_size_error
from sinks.aws.services import ServiceProfile, profile_for
from sinks.aws.trio_http import open_trio_endpoint
from sinks.backoff import RetryPolicy
from sinks.base import (
    HeaderLookup,
    HealthReport,
    HistogramFactory,
    Log,
    Record,
    RecordKeys,
    Release,
    Sink,
    SinkStatistics,
    discard_histogram,
    log_health,
    no_log,
)
from sinks.digests import sha256_hex
from sinks.errors import SinkConfigError, SinkUnavailable

__all__ = ["StreamOptions", "StreamSink", "StreamSinkStatistics", "FAILURE_HOLD", "LINGER",
           "LINGER_UNACKNOWLEDGED", "linger_of"]

#: Default wait for more records before a batch that is not full goes out,
#: with ``--ack kinesis``: the client waits for its batch, so the wait stays
#: short enough that it hardly notices.
LINGER = 0.010
#: The same with ``--ack received`` or ``spool``, where no client waits for
#: the batch: long enough that a few hundred records a second make a handful
#: of calls, not a hundred, each costing the loop signing and I/O (the
#: Kinesis Producer Library's RecordMaxBufferedTime is 100 ms, Vector's
#: batch timeout 1 s).
LINGER_UNACKNOWLEDGED = 0.200


def linger_of(config: Any) -> float:
    """``config``'s --linger (a gateway.config.settings.Config), ``auto`` resolved:
    short when clients wait for the call (``--ack kinesis``)."""
    if config.linger is not None:
        return config.linger
    return LINGER if config.ack == "kinesis" else LINGER_UNACKNOWLEDGED
#: How long a permanent error keeps the sink refusing records before the
#: next records try again.  Long enough not to flood the service with calls
#: that cannot succeed, short enough to notice a fix (a created stream, a
#: corrected policy) within a minute.
FAILURE_HOLD = 30.0
#: Kinesis Producer Library's RequestTimeout: 6 s per call.
CALL_TIMEOUT = 6.0
#: Batches of at least this many payload bytes are base64-encoded in a worker
#: thread.  Below it the event loop does it: a thread hop costs tens of
#: microseconds and encoding 256 KiB about 0.1 ms; a 5 MiB batch took 6 ms
#: (CPython) to 14 ms (PyPy) of the loop's time, with up to 40 ms seen.
ENCODE_IN_THREAD_BYTES = 256 * 1024
#: Records taken into a batch per step of the send loop.  Taking a design
#: load's batch of about 100 records in one step held the loop about 0.35 ms,
#: now and then over a millisecond.
TAKE_STEP = 64
#: A record holds at least its envelope line (over 100 bytes) of the ring,
#: so the ring can never hold more records than its size over this; the
#: sink's queue is bounded by the same number.
_MIN_RECORD_BYTES = 100
#: Bucket bounds of the per-call histograms (metrics): records per call up
#: to the service's 500; bytes per call up to the 10 MiB of a large-record
#: stream (5 MiB by default, Firehose 4 MiB); call latency from a quick
#: answer to past the default 6 s --call-timeout.
BATCH_RECORDS_BOUNDS = (1, 2, 5, 10, 25, 50, 100, 250, 500)
BATCH_BYTES_BOUNDS = (1024, 4096, 16384, 65536, 262144, MIB, 2 * MIB, 4 * MIB, 5 * MIB, 10 * MIB)
CALL_SECONDS_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 6.0, 10.0)
#: User records per Kinesis record (metrics): 1 without aggregation; a
#: 51,200-byte aggregate holds about 50 records of 1 KiB, and up to about
#: 2,000 of the smallest (envelope only).
RECORDS_PER_KINESIS_RECORD_BOUNDS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass(frozen=True)
class StreamOptions:
    """What a Kinesis or Firehose sink is configured with (see docs/sinks.md)."""

    service: str
    stream: str
    region: str = ""
    endpoint_url: str = ""
    ack: bool = True
    partition_key: str = "random"
    explicit_hash_key_header: str = ""
    #: ``--max-record-size``; `AUTO`: the stream's limit (Kinesis), the service's (Firehose).
    max_record_bytes: int = AUTO
    batch_records: int = PUT_RECORDS_MAX_RECORDS
    batch_bytes: int = PUT_RECORDS_MAX_REQUEST_BYTES
    linger: float = LINGER
    #: ``trio``: signed by botocore, sent on Trio streams; ``threads``:
    #: botocore's own HTTP session in worker threads.
    http: str = "trio"
    max_in_flight: int = 4
    retry_deadline: float = 30.0
    call_timeout: float = CALL_TIMEOUT
    failure_hold: float = FAILURE_HOLD
    aggregation: str = OFF
    aggregation_max_bytes: int = KPL_MAX_AGGREGATE_BYTES

    @classmethod
    def from_config(cls, config: Any) -> StreamOptions:
        """The options of ``config`` (a gateway.config.settings.Config)."""
        service = config.sink
        return cls(
            service=service,
            stream=getattr(config, profile_for(service).stream_setting),
            region=config.region,
            endpoint_url=config.endpoint_url,
            ack=config.ack == "kinesis",
            partition_key=config.partition_key,
            explicit_hash_key_header=config.explicit_hash_key_header,
            max_record_bytes=config.max_record_size,
            batch_records=config.batch_records,
            batch_bytes=config.batch_bytes,
            linger=linger_of(config),
            http=config.aws_http,
            max_in_flight=config.max_in_flight,
            retry_deadline=config.retry_deadline,
            call_timeout=config.call_timeout,
            aggregation=config.aggregation,
            aggregation_max_bytes=config.aggregation_max_bytes,
        )

    @property
    def profile(self) -> ServiceProfile:
        """The service's profile (ValueError for an unknown service)."""
        return profile_for(self.service)

    def limits(self) -> BatchLimits:
        """Records and bytes per request and bytes per record until a stream's limit is read."""
        return self.profile.limits(self.batch_records, self.batch_bytes, self.max_record_bytes)


@dataclass(frozen=True)
class StreamSinkStatistics(SinkStatistics):
    """The Kinesis and Firehose sink's counters; ``held`` records are in one of
    the states below (see ``sinks.aws.delivery``)."""

    queued: int = 0
    queued_bytes: int = 0
    sending: int = 0
    backoff: int = 0
    #: Records sent again (they add up to the ``retry_reasons``).
    retries: int = 0
    #: Records whose client went away before the outcome.
    abandoned: int = 0
    #: Records given up that no client waited for (``--ack received``).
    dropped: int = 0
    in_flight: int = 0
    free_builders: int = 0
    #: The permanent error the sink refuses records for, if any.
    failure: Optional[str] = None


class _Builder:
    """One preallocated request body, with the ring exported once for it.

    `admit` decides on the event loop which records fit, from their sizes
    (the batch's own limits); `encode_all` then writes them, maybe in a
    worker thread.
    """

    __slots__ = ("batch", "source", "add", "count", "bytes", "sizes", "_limits")

    def __init__(self, batch: Any, source: Any,
                 add: Callable[[Any, Any, int, int, Optional[str], Optional[str]], bool]) -> None:
        self.batch = batch
        self.source = source
        self.add = add
        self.count = 0
        self.bytes = 0
        #: Each record's data plus key, for the metrics.
        self.sizes: List[int] = []
        self._limits: BatchLimits = batch.limits

    def admit(self, entry: Entry) -> bool:
        if not self._limits.admits(self.count, self.bytes, entry.size):
            return False
        self.count += 1
        self.bytes += entry.size
        self.sizes.append(entry.size)
        return True

    @property
    def outgoing(self) -> int:
        """Service records in the call (one per entry)."""
        return self.count

    def per_entry(self, result: PutRecordsResult) -> PutRecordsResult:
        return result

    def shapes(self) -> List[Tuple[int, int]]:
        """``(user records, bytes)`` of each service record of the call (metrics)."""
        return [(1, size) for size in self.sizes]

    def set_limits(self, max_bytes: int, record_limit: int) -> None:
        """Admit by the stream's current limits (the batch was sized for the largest)."""
        capacity: BatchLimits = self.batch.limits
        request = min(max_bytes, capacity.bytes)
        self._limits = capacity._replace(bytes=request,
                                         record_bytes=min(record_limit, capacity.record_bytes))

    def encode_all(self, entries: List[Entry]) -> None:
        add, batch, source = self.add, self.batch, self.source
        for entry in entries:
            slot = entry.record.slot
            if not add(batch, source, slot.offset, slot.offset + slot.size, entry.partition_key,
                       entry.hash_key):
                raise RuntimeError("the batch refused a record it had admitted")

    def reset(self) -> None:
        self.batch.reset()
        self.count = 0
        self.bytes = 0
        self.sizes = []

    def close(self) -> None:
        self.source.close()
        self.batch.close()


def _encode_and_hash(builder: Any, entries: List[Entry]) -> str:
    """Encode ``entries`` into ``builder``'s batch; the body's SHA-256 (hex) for SigV4."""
    builder.encode_all(entries)
    return sha256_hex(builder.batch.body())


class StreamSink(RecordLimitFollower, Sink):
    """Delivers records to a Kinesis data stream or a Firehose delivery stream.

    ``buffer`` is the ring's buffer (every record's slot lies in it);
    ``endpoint`` defaults to botocore's, resolved in `run`.  Without ``ack``,
    a record given up is handed to ``given_up`` (default: ``release``), so
    the spool can send it again.
    """

    def __init__(self, release: Release, buffer: Any, options: StreamOptions, *,
                 endpoint: Optional[Endpoint] = None, report: HealthReport = log_health,
                 rng: Optional[random.Random] = None, given_up: Optional[Release] = None,
                 histogram: HistogramFactory = discard_histogram, log: Log = no_log) -> None:
        super().__init__(release)
        self._log = log
        self._given_up = given_up or release
        #: Entries whose client waits in `put` (``ack``), for `stop_waiting`.
        self._waiting: Set[Entry] = set()
        self.profile = profile = options.profile
        if options.aggregation not in (OFF, KPL) or (options.aggregation == KPL
                                                     and not profile.kinesis_records):
            raise ValueError("aggregation %r is not for %s" % (options.aggregation, options.service))
        self.name = profile.name
        self.options = options
        self._buffer = buffer
        self._endpoint = endpoint
        self._report = report
        self._rng = rng or random.Random()
        self._keys = (KeyPolicy(options.partition_key, options.explicit_hash_key_header)
                      if profile.keyed else None)
        records, request_bytes, record_bytes = options.limits()
        self._request_records = records
        self._request_bytes = request_bytes
        #: Largest record (envelope + body + partition key) accepted; the
        #: server answers 413 above it before reading the body.
        self.max_record_bytes: Optional[int] = record_bytes
        #: Kinesis: the stream's MaxRecordSizeInKiB in bytes, once read.
        self.stream_max_record_bytes: Optional[int] = None
        #: Set to read the stream's limit again now (a record refused for its size).
        self._limit_stale = trio.Event()
        self._delivery = Delivery(
            RetryPolicy(deadline=options.retry_deadline), linger=options.linger,
            max_records=records, max_bytes=request_bytes,
            max_entries=max(1, len(buffer) // _MIN_RECORD_BYTES))
        self._builders: List[Any] = []  # _Builder or AggregatingBuilder
        self._free: List[Any] = []
        self._kick = trio.Event()
        self._closing = False
        self._done = trio.Event()
        self._in_flight = 0
        self._failure: Optional[ServiceError] = None
        self._failure_until = float("-inf")
        self._logged: Optional[str] = None
        self.calls = 0
        self.failed_calls = 0
        self.dropped = 0
        #: Per call: records, bytes (data plus partition keys) and seconds
        #: from sending to the answer read (signing included).
        self.batch_records = histogram(BATCH_RECORDS_BOUNDS)
        self.batch_bytes = histogram(BATCH_BYTES_BOUNDS)
        self.call_seconds = histogram(CALL_SECONDS_BOUNDS)
        #: Per Kinesis record sent (each attempt): the user records in it.
        self.records_per_kinesis_record = histogram(RECORDS_PER_KINESIS_RECORD_BOUNDS)
        self.kinesis_records = 0
        self.payload_units = 0
        self.sent_bytes = 0

    # -- the Sink interface --------------------------------------------------

    def record_keys(self, record_id: str, tenant: Optional[bytes], header: HeaderLookup) -> RecordKeys:
        if self._keys is None:
            return NO_KEYS
        return self._keys.keys(record_id, tenant, header)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            if self._endpoint is None:
                self._endpoint = await self._open_endpoint()
            for _ in range(self.options.max_in_flight):
                self._builders.append(self._new_builder())
            if self.profile.follows_record_limit:
                await self._start_record_limit()
            self._free = list(self._builders)
            task_status.started()
            async with trio.open_nursery() as calls:
                if self.profile.follows_record_limit:
                    calls.start_soon(self._follow_record_limit)
                await self._send_loop(calls)
                calls.cancel_scope.cancel()
        finally:
            for builder in self._builders:
                builder.close()
            if self._endpoint is not None:
                with trio.CancelScope(shield=True):
                    await self._endpoint.aclose()
            self._done.set()

    async def put(self, record: Record) -> Optional[dict]:
        if self._closing:
            raise SinkUnavailable("the %s sink is shutting down" % self.name, retry_after=1.0)
        now = trio.current_time()
        if self._failure is not None and now < self._failure_until:
            raise SinkUnavailable("%s: %s" % (self.name, self._failure),
                                  retry_after=self._failure_until - now)
        key = record.partition_key or record.id
        size = record.slot.size + self.profile.key_bytes(key)
        waiter = trio.Event() if self.options.ack else None
        try:
            entry, wake = self._delivery.add(record, key, record.explicit_hash_key, size, now, waiter)
        except QueueFull as exc:
            raise SinkUnavailable(str(exc), retry_after=1.0) from exc
        if wake:
            self._kick.set()
        if waiter is None:
            return None
        self._waiting.add(entry)
        try:
            await waiter.wait()
            if entry.live:
                raise SinkUnavailable("shutting down: the record was not stored within the shutdown "
                                      "timeout", retry_after=1.0)
        except BaseException:
            encoding = entry.call
            if encoding is not None:
                # A worker may be reading the record's bytes: the caller
                # reuses them once this method raises, so not before that ends.
                with trio.CancelScope(shield=True):
                    await encoding.wait()
            if entry.live:
                self._delivery.abandon(entry)
                self._kick.set()
            raise
        finally:
            self._waiting.discard(entry)
        if entry.state == STORED:
            self._release(record.slot)
            return self._ack_fields(entry.result)
        raise SinkUnavailable("record not stored: %s" % (entry.error,),
                              retry_after=max(1.0, self._failure_until - trio.current_time()))

    def stop_waiting(self) -> None:
        for entry in list(self._waiting):
            entry.waiter.set()

    def ready(self) -> Tuple[bool, str]:
        if self._closing:
            return False, "shutting down"
        if self._failure is not None and trio.current_time() < self._failure_until:
            return False, "%s: %s" % (self.name, self._failure)
        return True, "ok"

    async def aclose(self) -> None:
        self._closing = True
        self._kick.set()
        await self._done.wait()

    def describe(self) -> str:
        """One line for the startup message."""
        endpoint = self._endpoint
        where = "" if endpoint is None else ", region %s, endpoint %s" % (endpoint.region, endpoint.url)
        stream = self.stream_max_record_bytes
        limit = "" if stream is None else ", stream's limit %d KiB" % (stream // 1024)
        return "%s (%s %s%s, ack %s, max record %d bytes%s)" % (
            self.name, self.profile.stream_kind, self.options.stream, where,
            "stored" if self.options.ack else "received", self.max_record_bytes or 0, limit)

    def statistics(self) -> StreamSinkStatistics:
        d = self._delivery.statistics()
        return StreamSinkStatistics(
            stored=d["stored"], held=d["held"], given_up=d["given_up"], calls=self.calls,
            failed_calls=self.failed_calls, retry_reasons=d["retry_reasons"], throttles=d["throttles"],
            batch_records=self.batch_records, batch_bytes=self.batch_bytes,
            call_seconds=self.call_seconds, queued=d["queued"], queued_bytes=d["queued_bytes"],
            sending=d["sending"], backoff=d["backoff"], retries=d["retries"],
            abandoned=d["abandoned"], dropped=self.dropped, in_flight=self._in_flight,
            free_builders=len(self._free),
            failure=None if self._failure is None else str(self._failure),
            **self._kinesis_record_counts())

    def _kinesis_record_counts(self) -> Dict[str, Any]:
        if not self.profile.kinesis_records:
            return {}
        return dict(kinesis_records=self.kinesis_records, payload_units=self.payload_units,
                    sent_bytes=self.sent_bytes, records_per_kinesis_record=self.records_per_kinesis_record)

    # -- setting up ----------------------------------------------------------

    async def _open_endpoint(self) -> Endpoint:
        options = self.options
        opener = functools.partial(
            open_trio_endpoint if options.http == "trio" else open_botocore_endpoint,
            options.service, region=options.region,
            endpoint_url=options.endpoint_url, connections=options.max_in_flight,
            timeout=options.call_timeout)
        try:
            return await trio.to_thread.run_sync(opener)
        except NoRegion:
            raise SinkConfigError("--region", "no AWS region configured; give --region or set "
                                  "AWS_DEFAULT_REGION (or a profile's region)") from None

    def _new_builder(self) -> Any:
        # Sized for what the stream may allow (mmap: unused pages cost
        # nothing); admission follows the stream's limit, see set_limits.
        batch = self.profile.new_batch(self.options.stream, self.profile.capacity(self.options.limits()))
        if self.options.aggregation == KPL:
            return AggregatingBuilder(batch, self._buffer,
                                      aggregate_limit=self.options.aggregation_max_bytes)
        return _Builder(batch, batch.source(self._buffer), self.profile.add)

    # -- sending -------------------------------------------------------------

    async def _send_loop(self, calls: trio.Nursery) -> None:
        delivery = self._delivery
        while True:
            now = trio.current_time()
            delivery.wake(now)
            self._give_back(delivery.expire(now))
            if self._closing and delivery.held == 0 and self._in_flight == 0:
                return
            at = delivery.send_at(self._closing)
            if at is not None and at <= now and self._free:
                builder = self._free.pop()
                # Until this is set the records' ring bytes may be read.
                encoded = trio.Event()
                sent = await self._take(builder, encoded)
                if sent:
                    self._in_flight += 1
                    calls.start_soon(self._call, builder, sent, encoded)
                    # With a backlog, the next batch is filled after other tasks ran.
                    await trio.lowlevel.checkpoint()
                else:
                    builder.reset()
                    self._free.append(builder)
                continue
            wake = at if at is not None and self._free else float("inf")
            with trio.move_on_at(min(wake, delivery.next_expiry())):
                await self._kick.wait()
            self._kick = trio.Event()

    async def _take(self, builder: Any, encoded: trio.Event) -> List[Entry]:
        """Fill ``builder`` from the queue, `TAKE_STEP` records a step; the entries taken."""
        sent: List[Entry] = []
        while True:
            part, rejected = self._delivery.take(builder.admit, TAKE_STEP)
            self._give_back(rejected)
            for entry in part:
                entry.call = encoded
            sent.extend(part)
            if len(part) < TAKE_STEP:
                return sent
            # Up to 500 records' admission: requests go in between parts,
            # and nothing may stop a batch half taken.
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _call(self, builder: Any, entries: List[Entry], encoded: trio.Event) -> None:
        assert self._endpoint is not None
        batch = builder.batch
        try:
            digest: Optional[str] = None
            try:
                if builder.bytes >= ENCODE_IN_THREAD_BYTES:
                    # Behind the requests, unless the sink is falling behind:
                    # every builder busy, or another full batch already queued.
                    behind = not self._free or self._delivery.batch_waiting
                    digest = await worker.run_sync(_encode_and_hash, builder, entries,
                                                   background=not behind)
                else:
                    builder.encode_all(entries)
            finally:
                for entry in entries:
                    entry.call = None
                encoded.set()
            self.calls += 1
            self.batch_records.add(len(entries))
            self.batch_bytes.add(builder.bytes)
            if self.profile.kinesis_records:
                self._count_sent(builder)
            result: Optional[PutRecordsResult] = None
            error: Optional[ServiceError] = None
            sent = trio.current_time()
            try:
                reply = await self._endpoint.call(batch.target, batch.body(), digest)
            except ServiceError as exc:
                error = exc
            else:
                # Reading a 500-record answer and settling its records are
                # each about a millisecond of PyPy's time: the loop runs
                # other tasks in between.  Shielded: this call's records are
                # settled even when the sink is being cancelled.
                await trio.lowlevel.cancel_shielded_checkpoint()
                result, error = self._read(reply, builder.outgoing)
                if result is not None:
                    result = builder.per_entry(result)
                await trio.lowlevel.cancel_shielded_checkpoint()
            now = trio.current_time()
            self.call_seconds.add(now - sent)
            rand = self._rng.random()
            if result is not None:
                settled = self._delivery.settle(entries, result, now, rand)
            else:
                assert error is not None
                self.failed_calls += 1
                settled = self._delivery.fail(entries, error, now, rand)
                if settled.resume_at is not None:
                    self._delivery.pause(settled.resume_at)
            self._apply(settled)
        finally:
            builder.reset()
            self._free.append(builder)
            self._in_flight -= 1
            self._kick.set()

    def _count_sent(self, builder: Any) -> None:
        per_record = self.records_per_kinesis_record
        units = 0
        for users, size in builder.shapes():
            per_record.add(users)
            units += payload_units(size)
        self.kinesis_records += builder.outgoing
        self.payload_units += units
        self.sent_bytes += builder.bytes

    def _read(self, reply: Reply, count: int) -> Tuple[Optional[PutRecordsResult], Optional[ServiceError]]:
        if reply.status != 200:
            return None, _classify(reply)
        try:
            return self.profile.parse(reply.body, expected=count), None
        except MalformedResponse as exc:
            return None, exc

    def _apply(self, settled: Settled) -> None:
        release = self._release
        for entry in settled.stored:
            if entry.waiter is not None:
                entry.waiter.set()
            else:
                release(entry.record.slot)
        self._give_back(settled.given_up)
        permanent = settled.permanent
        if (permanent is not None and self.profile.follows_record_limit
                and is_size_error(permanent.code, permanent.message)):
            # Given up alone (the stream's limit was lowered): re-read it, keep going.
            self._limit_stale.set()
        elif permanent is not None:
            self._trip(permanent)
        elif settled.stored and self._failure is not None:
            self._failure = None
            self._failure_until = float("-inf")
            if self._logged is not None:
                self._logged = None
                self._report(self.name, True, "delivering to %s again" % self.options.stream)

    def _give_back(self, entries: List[Entry]) -> None:
        """Wake the clients of given-up entries, or release entries nobody waits for."""
        for entry in entries:
            if entry.waiter is not None:
                entry.waiter.set()
            else:
                self.dropped += 1
                self._given_up(entry.record.slot)

    def _trip(self, error: ServiceError) -> None:
        """A permanent error: refuse records for a while and say why, once."""
        self._failure = error
        self._failure_until = trio.current_time() + self.options.failure_hold
        self._give_back(self._delivery.give_up_all(error))
        if self._logged != error.code:
            self._logged = error.code
            self._report(self.name, False, "cannot deliver to %s%s: %s%s; answering 503 and trying "
                         "again every %gs" % (
                             self.options.stream,
                             "" if self._endpoint is None else " at " + self._endpoint.url,
                             error, _hint(error, self.profile), self.options.failure_hold))

    def _ack_fields(self, result: Optional[RecordResult]) -> Dict[str, Any]:
        assert result is not None
        return self.profile.ack_fields(result)


_XML_CODE = re.compile(rb"<Code>([^<]{1,200})</Code>")
_XML_MESSAGE = re.compile(rb"<Message>([^<]{0,%d})" % MESSAGE_MAX_CHARS)


def _classify(reply: Reply) -> ServiceError:
    """The error of a non-200 answer; front ends that answer in XML (the
    signature checks of some endpoints) are read for their Code too."""
    body = reply.body
    if reply.error_type is None and body[:1] == b"<":
        code = _XML_CODE.search(body)
        if code is not None:
            message = _XML_MESSAGE.search(body)
            name = code.group(1).decode("utf-8", "replace")
            text = message.group(1).decode("utf-8", "replace") if message else ""
            return error_class(name, reply.status)(name, text, reply.status)
    return classify_error(reply.status, body, reply.error_type)


def _hint(error: ServiceError, profile: ServiceProfile) -> str:
    if isinstance(error, CredentialsError):
        return " (check the AWS credentials: access key, secret, session token, clock)"
    if error.code == "ResourceNotFoundException":
        return " (does the stream exist in this region and account?)"
    if error.code in ("AccessDeniedException", "NotAuthorized", "KMSAccessDeniedException"):
        return " (the IAM policy must allow %s on the stream)" % profile.put_action
    return ""
