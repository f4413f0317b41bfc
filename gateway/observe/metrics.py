"""Prometheus metrics: ``GET /metrics`` in the text exposition format (0.0.4).

Theory of operation
-------------------
Nothing on the per-request path touches prometheus-client.  Requests,
stages, bytes, the ring, the sink, access control and GC pauses are counted
where they happen, in plain ints and the fixed arrays of
:mod:`gateway.observe.telemetry` (a request costs a few dict lookups and array
stores, and allocates nothing that lives on).  This module turns those
counters into samples only when they are read (:func:`gateway_samples`: a
list of ``(family, label values, value)``, where the value of a histogram
is a :class:`~gateway.observe.telemetry.Histogram`).  Every metric is one row of
:data:`FAMILIES`.

Single-process mode (no directory, the default).  A scrape runs
:class:`GatewayCollector`, a prometheus-client collector that reads the
samples then and there, and prometheus-client renders them.

Multiprocess mode (a directory: ``--metrics-dir``, or the
``PROMETHEUS_MULTIPROC_DIR`` a supervisor sets for its workers, see
:func:`configure`).  Several worker processes of one gateway accept on one
port and a scrape lands on any one of them, so each process writes its
samples into its own files in the directory, in prometheus-client's
multiprocess format (``counter_<pid>.db``, ``histogram_<pid>.db``,
``gauge_<mode>_<pid>.db``): every :data:`PUBLISH_INTERVAL` and before it
answers a scrape.  The scrape then merges every process's files with
prometheus-client's ``MultiProcessCollector``: counters and histograms add
up (those of exited processes too, so totals never go back), gauges combine
as their family says (``livesum``, ``livemin``, ``livemax``: over running
processes only).  When a worker exits, :func:`mark_process_dead` (called by
the worker itself on a clean exit, and by the supervisor for any exit)
removes its gauges.

The files are written here (:class:`MultiprocessWriter`, through
prometheus-client's own ``mmap_dict`` layer, so its reader reads exactly
what is written; values with timestamps, the layout of prometheus-client
0.18 and later) rather than through prometheus-client's metric objects:
those pick multiprocess mode from the environment when prometheus_client is
first imported, take a lock per update, and a ``Histogram`` cannot be given
whole bucket counts.  The writer stores absolute values (what this process
counted so far, plus whatever an earlier process with the same pid left),
so each publication carries everything counted before it.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import re
import sys
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.multiprocess import mark_process_dead as _mark_process_dead
from prometheus_client.utils import floatToGoString

from gateway import __version__
from gateway.config.settings import Config, ConfigError
from gateway.observe import logs
from gateway.observe.telemetry import Histogram, rss_bytes
from sinks.base import SinkStatistics
from sinks.spool.sink import SpoolStatistics

__all__ = [
    "CONTENT_TYPE",
    "MULTIPROC_ENV",
    "PUBLISH_INTERVAL",
    "Family",
    "FAMILIES",
    "GatewayCollector",
    "GatewayMetrics",
    "MultiprocessWriter",
    "configure",
    "gateway_samples",
    "mark_process_dead",
    "metric_families",
    "prepare_directory",
]

#: The text exposition format every Prometheus server reads.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
#: prometheus-client's variable for the multiprocess directory: a supervisor
#: sets it for the workers it starts (see :func:`configure`).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Multiprocess mode: seconds between two publications of this process's
#: counters, so a scrape answered by another worker sees them at most this
#: old.  Prometheus scrapes every 15 s to 1 min; one publication costs well
#: under a millisecond.
PUBLISH_INTERVAL = 1.0

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


class Family(NamedTuple):
    """One metric: its name (counters without ``_total``), type, help and labels.

    ``combine`` says how the gauges of several processes merge in
    multiprocess mode: prometheus-client's ``livesum``, ``livemin`` or
    ``livemax`` (over running processes).
    """

    name: str
    kind: str
    help: str
    labels: Tuple[str, ...] = ()
    combine: str = "livesum"

    @property
    def exposed(self) -> str:
        """The name as scraped: counters end in ``_total``."""
        return self.name + "_total" if self.kind == COUNTER else self.name


#: A sample: its family, its label values, and a number (or a Histogram).
Sample = Tuple[Family, Tuple[str, ...], Union[int, float, Histogram]]

HTTP_REQUESTS = Family(
    "sluice_http_requests", COUNTER,
    "HTTP answers sent, by route (other: any other path, or no readable head) and status",
    ("route", "status"))
INGEST_BODY_BYTES = Family(
    "sluice_ingest_body_bytes", COUNTER, "Body bytes of accepted records (envelope line not included)")
REQUEST_DURATION = Family(
    "sluice_request_duration_seconds", HISTOGRAM,
    "Accepted records: request head parsed to the answer sent (202; 200 on OTLP/HTTP)")
REQUEST_STAGE_DURATION = Family(
    "sluice_request_stage_duration_seconds", HISTOGRAM,
    "Accepted records by stage: body (head parsed to body in the ring), sink (to the sink "
    "accepting it), respond (to the answer sent)", ("stage",))
CONNECTIONS = Family("sluice_connections", GAUGE, "Open client connections")
CONNECTION_STATES = Family(
    "sluice_connections_by_state", GAUGE,
    "Open connections by state: new (no byte received yet), idle (between requests), active "
    "(a request in progress)", ("state",))
CONNECTION_LIMIT = Family(
    "sluice_connection_limit", GAUGE,
    "Connections admitted at once (--max-connections, or from the file-descriptor limit)")
CONNECTIONS_EVICTED = Family(
    "sluice_connections_evicted", COUNTER,
    "Waiting connections (new or idle) closed at the connection limit to admit a new one")
CONNECTION_TIMEOUTS = Family(
    "sluice_connection_timeouts", COUNTER,
    "Connections closed for slowness: first_byte (a new connection sent nothing within "
    "--head-timeout), slow_body (408: a body slower than --min-body-rate)", ("kind",))
INTERNAL_ERRORS = Family("sluice_internal_errors", COUNTER, "Connections dropped by an unexpected error")
RING_USED = Family("sluice_ring_used_bytes", GAUGE, "Ring bytes held by records in flight")
RING_CAPACITY = Family("sluice_ring_capacity_bytes", GAUGE, "Ring bytes preallocated (--ring-size)")
RING_WAITS = Family("sluice_ring_waits", COUNTER, "Requests that waited for ring space")
RING_OVERLOADS = Family(
    "sluice_ring_overloads", COUNTER, "Requests refused (503) after waiting --ring-wait for ring space")
RING_TENANT_BYTES = Family(
    "sluice_ring_tenant_bytes", GAUGE,
    "With access control: ring bytes held by tenants' requests, by class: largest (the one "
    "tenant holding the most now), others (every other tenant together)", ("class",))
RING_TENANT_LIMIT = Family(
    "sluice_ring_tenant_limit_bytes", GAUGE, "Ring bytes one tenant may hold (--tenant-ring-share)")
RING_SHARE_REFUSALS = Family(
    "sluice_ring_share_refusals", COUNTER,
    "Requests refused (503) because their tenant held its --tenant-ring-share of the ring")
SINK_STORED = Family(
    "sluice_sink_records_stored", COUNTER,
    "Records stored: written (file), acknowledged by the service (kinesis, firehose), dropped (null)")
SINK_GIVEN_UP = Family(
    "sluice_sink_records_given_up", COUNTER,
    "Records given up: not stored within --retry-deadline, or met a permanent error")
SINK_HELD = Family("sluice_sink_records_held", GAUGE, "Records the sink holds, not stored yet")
SINK_STORED_BYTES = Family(
    "sluice_sink_stored_bytes", COUNTER, "Record bytes stored (file: written; null: dropped)")
SINK_WRITE_ERRORS = Family(
    "sluice_sink_write_errors", COUNTER, "Failed segment writes, retried every second (file)")
SINK_BATCH_RECORDS = Family(
    "sluice_sink_batch_records", HISTOGRAM, "Records per PutRecords or PutRecordBatch call")
SINK_BATCH_BYTES = Family(
    "sluice_sink_batch_bytes", HISTOGRAM,
    "Bytes per PutRecords or PutRecordBatch call: records plus partition keys, as the service counts")
SINK_CALL_DURATION = Family(
    "sluice_sink_call_duration_seconds", HISTOGRAM,
    "PutRecords or PutRecordBatch calls: request signed and sent to answer read")
SINK_CALLS = Family(
    "sluice_sink_calls", COUNTER,
    "PutRecords or PutRecordBatch calls by result: ok (a 200 answer, maybe with failed records) "
    "or failed (an error status, no answer, or an unreadable one)", ("result",))
SINK_RETRIES = Family(
    "sluice_sink_retries", COUNTER,
    "Records sent again, by reason: throttled, service_error, unreadable_answer, no_answer",
    ("reason",))
SINK_THROTTLES = Family(
    "sluice_sink_throttles", COUNTER, "Records the service throttled, by its error code", ("code",))
SINK_RECORDS_PER_KINESIS_RECORD = Family(
    "sluice_sink_records_per_kinesis_record", HISTOGRAM,
    "User records per Kinesis record sent (1 without --aggregation kpl; retries included)")
SINK_KINESIS_RECORDS = Family(
    "sluice_sink_kinesis_records", COUNTER, "Kinesis records sent (each attempt counts)")
SINK_PAYLOAD_UNITS = Family(
    "sluice_sink_put_payload_units", COUNTER,
    "PUT payload units of the Kinesis records sent: 25 KiB chunks of data plus partition key, "
    "rounded up per record (each attempt counts)")
SINK_SENT_BYTES = Family(
    "sluice_sink_sent_bytes", COUNTER,
    "Data plus partition key bytes of the Kinesis records sent (each attempt counts)")
SPOOL_USED = Family(
    "sluice_spool_used_bytes", GAUGE, "Spool bytes on disk, shipped or not (--ack spool)")
SPOOL_LIMIT = Family("sluice_spool_limit_bytes", GAUGE, "Spool size limit (--spool-size)")
SPOOL_PENDING = Family(
    "sluice_spool_pending_records", GAUGE, "Records in the spool not yet stored by the sink behind it")
ACCESS_DECISIONS = Family(
    "sluice_access_decisions", COUNTER, "Access-control decisions by outcome", ("outcome",))
REDIS_PIPELINES = Family(
    "sluice_redis_pipelines", COUNTER,
    "Pipelines sent to Redis: round trips (a batch to three cluster nodes is three)")
REDIS_BATCH_DURATION = Family(
    "sluice_redis_batch_duration_seconds", HISTOGRAM,
    "Batches of access checks: sent to Redis to every answer back (nodes in parallel)")
REDIS_FAILURES = Family(
    "sluice_redis_failures", COUNTER, "Redis connections, pipelines or probes that failed")
REDIS_MALFORMED_REPLIES = Family(
    "sluice_redis_malformed_replies", COUNTER,
    "access check script replies that could not be read (answered 503)")
REDIS_UP = Family(
    "sluice_redis_up", GAUGE, "1 while Redis answers, else 0 (several processes: the lowest)",
    combine="livemin")
GC_PAUSE = Family(
    "sluice_gc_pause_seconds", HISTOGRAM,
    "Stop-the-world GC pauses by kind (CPython gen0, gen1, gen2; PyPy minor, major_step)", ("kind",))
LOOP_LAG = Family(
    "sluice_event_loop_lag_seconds", HISTOGRAM,
    "How late the event loop's 25 ms heartbeat woke up: the loop was busy (a stall) that long")
GC_MAJOR = Family(
    "sluice_gc_major_collection_seconds", HISTOGRAM,
    "Full collections (CPython gen2 pauses; PyPy the sum of a major collection's steps)")
RESIDENT_MEMORY = Family("sluice_resident_memory_bytes", GAUGE, "Resident memory (RSS)")
BUILD_INFO = Family(
    "sluice_build_info", GAUGE, "Always 1: the gateway's version and interpreter",
    ("version", "interpreter", "python_version"), combine="livemax")
PROCESSES = Family(
    "sluice_processes", GAUGE,
    "Gateway processes serving: 1 per process, summed over the running ones (the workers)")

#: Every metric, in exposition order.
FAMILIES: Tuple[Family, ...] = (
    HTTP_REQUESTS, INGEST_BODY_BYTES, REQUEST_DURATION, REQUEST_STAGE_DURATION, CONNECTIONS,
    CONNECTION_STATES, CONNECTION_LIMIT, CONNECTIONS_EVICTED, CONNECTION_TIMEOUTS,
    INTERNAL_ERRORS, RING_USED, RING_CAPACITY, RING_WAITS, RING_OVERLOADS, RING_TENANT_BYTES,
    RING_TENANT_LIMIT, RING_SHARE_REFUSALS, SINK_STORED,
    SINK_GIVEN_UP, SINK_HELD, SINK_STORED_BYTES, SINK_WRITE_ERRORS, SINK_BATCH_RECORDS,
    SINK_BATCH_BYTES, SINK_CALL_DURATION, SINK_CALLS, SINK_RETRIES, SINK_THROTTLES,
    SINK_RECORDS_PER_KINESIS_RECORD, SINK_KINESIS_RECORDS, SINK_PAYLOAD_UNITS, SINK_SENT_BYTES,
    SPOOL_USED, SPOOL_LIMIT, SPOOL_PENDING,
    ACCESS_DECISIONS, REDIS_PIPELINES, REDIS_BATCH_DURATION, REDIS_FAILURES, REDIS_MALFORMED_REPLIES,
    REDIS_UP, GC_PAUSE, GC_MAJOR, LOOP_LAG, RESIDENT_MEMORY, BUILD_INFO, PROCESSES,
)

_STAGES = ("body", "sink", "respond")
_BUILD = (__version__, sys.implementation.name, "%d.%d.%d" % sys.version_info[:3])


# -- reading the counters --------------------------------------------------------


def gateway_samples(gateway: Any) -> List[Sample]:
    """Every sample of ``gateway`` (a :class:`gateway.server.Gateway`) now.

    Runs on the event loop (it reads live counters); allocates freely, once
    per scrape or publication.
    """
    telemetry = gateway.telemetry
    out: List[Sample] = [(HTTP_REQUESTS, (route, status), count)
                         for route, status, count in telemetry.requests.items()]
    out.append((INGEST_BODY_BYTES, (), telemetry.body_bytes))
    out.append((REQUEST_DURATION, (), telemetry.stages.total))
    out.extend((REQUEST_STAGE_DURATION, (stage,), getattr(telemetry.stages, stage)) for stage in _STAGES)
    out.append((CONNECTIONS, (), gateway.connections))
    registry = gateway.registry
    out.extend(((CONNECTION_STATES, ("new",), registry.new), (CONNECTION_STATES, ("idle",), registry.idle),
                (CONNECTION_STATES, ("active",), registry.active),
                (CONNECTION_LIMIT, (), registry.limit), (CONNECTIONS_EVICTED, (), registry.evicted),
                (CONNECTION_TIMEOUTS, ("first_byte",), registry.first_byte_timeouts),
                (CONNECTION_TIMEOUTS, ("slow_body",), registry.slow_body_timeouts)))
    out.append((INTERNAL_ERRORS, (), gateway.internal_errors))
    waiting = gateway.ring
    out.append((RING_USED, (), waiting.used))
    out.append((RING_CAPACITY, (), waiting.capacity))
    out.append((RING_WAITS, (), waiting.waits))
    out.append((RING_OVERLOADS, (), waiting.overloads))
    if gateway.access is not None:
        held = waiting.held_by_owners()
        largest = max(held.values()) if held else 0
        out.append((RING_TENANT_BYTES, ("largest",), largest))
        out.append((RING_TENANT_BYTES, ("others",), sum(held.values()) - largest))
        out.append((RING_TENANT_LIMIT, (), waiting.owner_limit))
        out.append((RING_SHARE_REFUSALS, (), waiting.share_refusals))
    _sink_samples(gateway.sink, out)
    if gateway.access is not None:
        _access_samples(gateway.access, out)
    out.extend((GC_PAUSE, (kind,), hist) for kind, hist in telemetry.gc.histograms())
    out.append((GC_MAJOR, (), telemetry.gc.major))
    out.append((LOOP_LAG, (), telemetry.loop_lag))
    rss = rss_bytes()
    if rss is not None:
        out.append((RESIDENT_MEMORY, (), rss))
    out.append((BUILD_INFO, _BUILD, 1))
    out.append((PROCESSES, (), 1))
    return out


def _sink_samples(sink: Any, out: List[Sample]) -> None:
    stats: SinkStatistics = sink.statistics()
    if isinstance(stats, SpoolStatistics):
        # A spool in front (--ack spool): its own state, then the delivering sink's.
        out.append((SPOOL_USED, (), stats.used_bytes))
        out.append((SPOOL_LIMIT, (), stats.limit_bytes))
        out.append((SPOOL_PENDING, (), stats.pending_records))
        stats = stats.inner
    out.append((SINK_STORED, (), stats.stored))
    out.append((SINK_GIVEN_UP, (), stats.given_up))
    if stats.held is not None:
        out.append((SINK_HELD, (), stats.held))
    if stats.stored_bytes is not None:
        out.append((SINK_STORED_BYTES, (), stats.stored_bytes))
    if stats.write_errors is not None:
        out.append((SINK_WRITE_ERRORS, (), stats.write_errors))
    # A sink calling a service (Kinesis, Firehose) times its calls.
    for family, hist in ((SINK_BATCH_RECORDS, stats.batch_records), (SINK_BATCH_BYTES, stats.batch_bytes),
                         (SINK_CALL_DURATION, stats.call_seconds),
                         (SINK_RECORDS_PER_KINESIS_RECORD, stats.records_per_kinesis_record)):
        if isinstance(hist, Histogram):
            out.append((family, (), hist))
    if stats.calls is not None:
        out.append((SINK_CALLS, ("ok",), stats.calls - stats.failed_calls))
        out.append((SINK_CALLS, ("failed",), stats.failed_calls))
    out.extend((SINK_RETRIES, (reason,), n) for reason, n in stats.retry_reasons.items())
    out.extend((SINK_THROTTLES, (code,), n) for code, n in stats.throttles.items())
    if stats.kinesis_records is not None:
        out.append((SINK_KINESIS_RECORDS, (), stats.kinesis_records))
        out.append((SINK_PAYLOAD_UNITS, (), stats.payload_units))
        out.append((SINK_SENT_BYTES, (), stats.sent_bytes))


def _access_samples(access: Any, out: List[Sample]) -> None:
    out.extend((ACCESS_DECISIONS, (outcome,), n) for outcome, n in access.decisions().items())
    stats = access.statistics()
    out.append((REDIS_PIPELINES, (), stats.pipelines))
    out.append((REDIS_BATCH_DURATION, (), access.batch_seconds))
    out.append((REDIS_FAILURES, (), stats.redis_failures))
    out.append((REDIS_MALFORMED_REPLIES, (), stats.malformed_replies))
    out.append((REDIS_UP, (), 1 if stats.redis_state == "ok" else 0))


# -- single process: a collector read at scrape time ----------------------------------

_LE_CACHE: Dict[Tuple[float, ...], List[str]] = {}


def _le(bounds: Tuple[float, ...]) -> List[str]:
    """The ``le`` label values of a histogram's buckets, ``+Inf`` last."""
    le = _LE_CACHE.get(bounds)
    if le is None:
        le = _LE_CACHE[bounds] = [floatToGoString(b) for b in bounds] + ["+Inf"]
    return le


def metric_families(samples: Iterable[Sample]) -> List[Any]:
    """prometheus-client metric families of ``samples``, in :data:`FAMILIES` order."""
    built: Dict[Family, Any] = {}
    for family, labels, value in samples:
        metric = built.get(family)
        if metric is None:
            kind = {COUNTER: CounterMetricFamily, GAUGE: GaugeMetricFamily,
                    HISTOGRAM: HistogramMetricFamily}[family.kind]
            metric = built[family] = kind(family.name, family.help, labels=family.labels)
        if isinstance(value, Histogram):
            running = 0
            buckets = []
            for le, count in zip(_le(value.bounds), value.counts()):
                running += count
                buckets.append((le, running))
            metric.add_metric(labels, buckets=buckets, sum_value=value.total)
        else:
            metric.add_metric(labels, value)
    order = {family: i for i, family in enumerate(FAMILIES)}
    return [built[f] for f in sorted(built, key=lambda f: order.get(f, len(order)))]


class GatewayCollector:
    """A prometheus-client collector of ``read()``'s samples, read at each scrape."""

    def __init__(self, read: Callable[[], List[Sample]]) -> None:
        self._read = read

    def collect(self) -> List[Any]:
        return metric_families(self._read())


# -- several processes: files in prometheus-client's multiprocess format --------------


#: The file that marks a metrics directory as Sluice's: only in such a
#: directory are ``*.db`` files deleted at start.
DIRECTORY_MARK = ".sluice-metrics"
#: prometheus-client's multiprocess file names (``counter_<pid>.db``,
#: ``gauge_livesum_<pid>.db``): a directory holding nothing else is one an
#: earlier Sluice (or a prometheus-client program) used, and is adopted.
_METRIC_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_[^_/]+\.db\Z")


def prepare_directory(directory: str) -> None:
    """Create ``directory`` or empty it of metric files (``*.db``), for a new gateway instance.

    Files are deleted only in a directory Sluice created or marked
    (:data:`DIRECTORY_MARK`); an empty one, or one holding only multiprocess
    metric files, is marked now.  Any other directory raises OSError
    (``EEXIST``): a mistyped ``--metrics-dir`` must not delete someone's
    ``*.db`` files.  Only the instance's first process does this
    (``sluice serve`` with ``--metrics-dir``, or a supervisor before it
    starts its workers): a worker that emptied it would wipe the others'
    counts.
    """
    os.makedirs(directory, 0o700, exist_ok=True)
    names = os.listdir(directory)
    if DIRECTORY_MARK not in names:
        if not all(_METRIC_FILE.match(name) for name in names):
            raise OSError(errno.EEXIST, "holds files that are not Sluice's metrics: give an empty "
                                        "or new directory")
        fd = os.open(os.path.join(directory, DIRECTORY_MARK),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        os.close(fd)
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)


def mark_process_dead(pid: Union[int, str], directory: str) -> None:
    """Remove the gauges of process ``pid`` (exited) from ``directory``; its counters stay."""
    _mark_process_dead(pid, directory)


def configure(config: Config, environ: Mapping[str, str]) -> Config:
    """``config`` with the metrics directory this process writes to (``""``: none).

    With ``--metrics-dir`` this process is the whole gateway instance: the
    directory is created or emptied now.  Otherwise a ``PROMETHEUS_MULTIPROC_DIR``
    (set by a supervisor for the workers it starts, after emptying it) is
    joined as it is.  Raises ``ConfigError`` naming the setting.
    """
    if config.metrics_dir:
        try:
            prepare_directory(config.metrics_dir)
        except OSError as exc:
            raise ConfigError("--metrics-dir: %s: %s" % (config.metrics_dir, exc.strerror or exc)) from None
        return config
    joined = environ.get(MULTIPROC_ENV, "")
    if joined and not os.path.isdir(joined):
        raise ConfigError("%s: not a directory: %s" % (MULTIPROC_ENV, joined))
    return dataclasses.replace(config, metrics_dir=joined) if joined else config


class MultiprocessWriter:
    """This process's samples, kept up to date in its files of ``directory``.

    ``identifier`` names the files (the pid by default; it must not contain
    ``_``).  Not thread-safe: call :meth:`write` from one thread.
    """

    def __init__(self, directory: str, identifier: Optional[str] = None) -> None:
        self.directory = directory
        self.identifier = identifier if identifier is not None else str(os.getpid())
        if "_" in self.identifier:
            raise ValueError("a process identifier cannot contain '_'")
        os.makedirs(directory, exist_ok=True)
        self._files: Dict[str, MmapedDict] = {}
        #: Counter and histogram values an earlier process with this pid left.
        self._base: Dict[str, float] = {}
        self._keys: Dict[Tuple[str, Tuple[str, ...]], str] = {}
        self._written: Dict[str, float] = {}

    def write(self, samples: Iterable[Sample]) -> None:
        """Store every sample's current value (unchanged ones are skipped)."""
        for family, labels, value in samples:
            name = family.name
            if isinstance(value, Histogram):
                names = family.labels + ("le",)
                for le, count in zip(_le(value.bounds), value.counts()):
                    self._set(HISTOGRAM, family, name + "_bucket", names, labels + (le,), count)
                self._set(HISTOGRAM, family, name + "_sum", family.labels, labels, value.total)
            elif family.kind == COUNTER:
                self._set(COUNTER, family, name + "_total", family.labels, labels, value)
            else:
                self._set("gauge_" + family.combine, family, name, family.labels, labels, value)

    def _set(self, prefix: str, family: Family, sample: str, names: Tuple[str, ...],
             labels: Tuple[str, ...], value: float) -> None:
        key = self._keys.get((sample, labels))
        if key is None:
            key = self._keys[(sample, labels)] = mmap_key(
                family.name, sample, list(names), list(labels), family.help)
        mmaped = self._files.get(prefix)
        if mmaped is None:
            mmaped = self._open(prefix)
        if prefix in (COUNTER, HISTOGRAM):
            value += self._base.get(key, 0.0)
        if self._written.get(key) != value:
            mmaped.write_value(key, float(value), 0.0)
            self._written[key] = value

    def _open(self, prefix: str) -> MmapedDict:
        path = os.path.join(self.directory, "%s_%s.db" % (prefix, self.identifier))
        mmaped = self._files[prefix] = MmapedDict(path)
        if prefix in (COUNTER, HISTOGRAM):
            # Left by an exited process that had this pid: keep its counts.
            for key, value, _ in mmaped.read_all_values():
                self._base[key] = value
        return mmaped

    def close(self) -> None:
        """Close the files (idempotent); they stay for the others to read."""
        files, self._files = self._files, {}
        for mmaped in files.values():
            mmaped.close()


# -- the gateway's view ----------------------------------------------------------------


class GatewayMetrics:
    """The metrics of one gateway process, single-process or multiprocess.

    ``directory`` empty: one registry read at scrape time.  Otherwise this
    process publishes to ``directory`` (:meth:`run`) and a scrape merges
    what every process there published.  Each worker makes its own gateway
    (after any fork): the files are named by the pid of the process that
    made this object, and hold its gateway's counts.
    """

    def __init__(self, gateway: Any, directory: str = "") -> None:
        self._gateway = gateway
        self.directory = directory
        self._registry = CollectorRegistry(auto_describe=False)
        self._writer: Optional[MultiprocessWriter] = None
        if directory:
            self._writer = MultiprocessWriter(directory)
            MultiProcessCollector(self._registry, path=directory)
        else:
            self._registry.register(GatewayCollector(self.samples))  # type: ignore[arg-type]
        self._scope: Optional[trio.CancelScope] = None
        self._closed = False
        self._failing = False

    def samples(self) -> List[Sample]:
        """This process's samples now."""
        return gateway_samples(self._gateway)

    def publish(self) -> None:
        """Multiprocess mode: write this process's samples to its files now.

        A failed write (the directory's file system full, say) must not stop
        the gateway: it is reported once, and the next publication tries again.
        """
        if self._writer is None or self._closed:
            return
        try:
            self._writer.write(self.samples())
        except OSError as exc:
            if not self._failing:
                self._failing = True
                logs.emit("metrics_write_failed", level="error", directory=self.directory, error=str(exc))
            return
        if self._failing:
            self._failing = False
            logs.emit("metrics_written", directory=self.directory)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Multiprocess mode: publish every :data:`PUBLISH_INTERVAL` until :meth:`close`."""
        with trio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            if self._writer is None or self._closed:
                return
            while True:
                await trio.sleep(PUBLISH_INTERVAL)
                self.publish()

    def exposition(self) -> bytes:
        """The exposition now, without waiting (multiprocess: reads every process's files)."""
        self.publish()
        return generate_latest(self._registry)

    async def render(self) -> bytes:
        """The exposition of every metric (every process's, in multiprocess mode)."""
        if self._writer is None:
            return generate_latest(self._registry)
        self.publish()
        # Reading the other processes' files is file I/O: off the event loop.
        return await trio.to_thread.run_sync(generate_latest, self._registry)

    async def answer(self) -> Tuple[int, bytes]:
        """``GET /metrics``: status and body (the route sends :data:`CONTENT_TYPE`)."""
        return 200, await self.render()

    def close(self) -> None:
        """Stop :meth:`run`; in multiprocess mode publish a last time, close the
        files and remove this process's gauges (idempotent)."""
        if self._scope is not None:
            self._scope.cancel()
        if self._closed:
            return
        self.publish()
        self._closed = True
        writer = self._writer
        if writer is not None:
            writer.close()
            mark_process_dead(writer.identifier, writer.directory)
