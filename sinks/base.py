"""What every sink is: where records go once their body is in the ring.

A :class:`Record` is a committed ring slot plus the metadata a sink needs.  The
server hands each record to :meth:`Sink.put`; from then on the sink owns the
slot and gives it back through the ``release`` callable it was built with, once
it no longer needs the bytes (written, stored, or given up).  ``put`` returns
when the record is held as firmly as the sink promises; a sink that cannot take
records raises :class:`~sinks.errors.SinkUnavailable`.  When ``put`` raises,
the slot is still the caller's to release.

Before a request's body is read, the server asks the sink for the record's
keys (:meth:`Sink.record_keys`, which may refuse the request) and checks the
record against :attr:`Sink.max_record_bytes`, so a record the sink could not
store is refused before it is uploaded.

Behind the spool (``--ack spool``, :mod:`sinks.spool.sink`) a sink tells stored
records from lost ones by its callables: ``release(slot)`` is called only
once the record is stored (the file sink: written; the null sink: at once;
the stream sinks without ``--ack kinesis``: stored by the service), and a
sink that gives records up on its own (the stream sinks) takes a
``given_up`` callable that it calls instead of ``release`` for them.

At the shutdown deadline the server calls :meth:`Sink.stop_waiting`: every
``put`` still waiting for its record to be stored raises
:class:`~sinks.errors.SinkUnavailable`, so its client gets ``503`` rather
than a ``202`` for a record that was not stored, or no answer at all.

A sink that stops taking records for a while (a permanent service error, a
failing disk) says so once, and once more when it takes them again, through
its :data:`HealthReport` (built from the :data:`Log` it is handed by
:func:`health_reporter`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence, Tuple

import trio

from buffers import Slot

__all__ = ["Record", "Sink", "SinkStatistics", "Release", "RecordKeys", "HeaderLookup", "HealthReport",
           "Log", "Observer", "HistogramFactory", "no_log", "body_room", "discard_histogram",
           "health_reporter", "log_health"]

Release = Callable[[Slot], None]
#: ``(partition key, explicit hash key, bytes the key adds to the record)``.
RecordKeys = Tuple[Optional[str], Optional[str], int]
#: A request head's header lookup: lower-case name -> first value or None.
HeaderLookup = Callable[[bytes], Optional[bytes]]
#: ``(sink name, ready, reason)``: the sink stopped taking records (``ready``
#: false, with the cause) or takes them again.  Called on changes only.
HealthReport = Callable[[str, bool, str], None]


#: ``log(event, level=..., **fields)``: one rare event (a state change, an
#: error), the shape of ``gateway.observe.logs.emit``.  Sinks are handed one;
#: they never log per record.
Log = Callable[..., None]


class Observer(Protocol):
    """A histogram as sinks see it: something that records values."""

    def add(self, value: float) -> None: ...


#: Makes an :class:`Observer` with the given bucket bounds.
HistogramFactory = Callable[[Sequence[float]], Observer]


def no_log(event: str, level: str = "info", **fields: Any) -> None:
    """The :data:`Log` of a sink nobody listens to (tests, tools)."""


class _Discard:
    __slots__ = ("bounds",)

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)

    def add(self, value: float) -> None:
        pass


#: The :data:`HistogramFactory` of a sink whose timings nobody reads.
discard_histogram: HistogramFactory = _Discard


def health_reporter(log: Log) -> HealthReport:
    """A :data:`HealthReport` that writes ``sink_not_ready``/``sink_ready`` events to ``log``."""
    def report(sink: str, ready: bool, reason: str) -> None:
        if ready:
            log("sink_ready", sink=sink, reason=reason)
        else:
            log("sink_not_ready", level="error", sink=sink, reason=reason)
    return report


log_health = health_reporter(no_log)


def body_room(max_body: int, record_limit: Optional[int], envelope_bytes: int, key_bytes: int) -> int:
    """The largest body one request may send: ``--max-body``, within the sink's record limit.

    A sink's record limit counts the envelope line and the partition key
    too, so what is left for the body is the limit less both; ``max_body``
    can only lower that.
    """
    if record_limit is None:
        return max_body
    return max(0, min(max_body, record_limit - envelope_bytes - key_bytes))


class Record:
    """One log record: envelope line + body, contiguous in a ring slot."""

    __slots__ = ("id", "tenant", "slot", "partition_key", "explicit_hash_key")

    def __init__(self, record_id: str, slot: Slot, tenant: Optional[bytes] = None,
                 partition_key: Optional[str] = None,
                 explicit_hash_key: Optional[str] = None) -> None:
        self.id = record_id
        self.slot = slot
        self.tenant = tenant
        self.partition_key = partition_key
        self.explicit_hash_key = explicit_hash_key

    @property
    def view(self) -> memoryview:
        """The record's bytes in the ring (envelope line, newline, body)."""
        return self.slot.view


@dataclass(frozen=True)
class SinkStatistics:
    """A snapshot of a sink's counters (:meth:`Sink.statistics`), as ``/metrics`` reads them.

    A counter a sink does not keep is None, and its metric is left out.  Sinks
    with more to say subclass this with their own fields.
    """

    #: Records stored: written (file), delivered (Kinesis, Firehose), or
    #: taken and dropped at once (null).
    stored: int = 0
    #: Bytes of those records, where the sink counts them.
    stored_bytes: Optional[int] = None
    #: Records taken and not yet stored or given up (None: a sink that never holds any).
    held: Optional[int] = None
    #: Records the sink gave up (their retry deadline passed, a permanent error).
    given_up: int = 0
    #: Failed writes (a sink writing local files).
    write_errors: Optional[int] = None
    #: Calls to a service, and how many of them failed as a whole.
    calls: Optional[int] = None
    failed_calls: int = 0
    #: Records sent again, by reason; throttled records, by the service's code.
    retry_reasons: Mapping[str, int] = field(default_factory=dict)
    throttles: Mapping[str, int] = field(default_factory=dict)
    #: Per call: records, bytes, seconds (a sink calling a service).
    batch_records: Optional[Observer] = field(default=None, compare=False, repr=False)
    batch_bytes: Optional[Observer] = field(default=None, compare=False, repr=False)
    call_seconds: Optional[Observer] = field(default=None, compare=False, repr=False)
    #: A sink sending Kinesis records: how many (several records share one with
    #: KPL aggregation), their PUT payload units (25 KB each) and bytes sent,
    #: and records per Kinesis record.
    kinesis_records: Optional[int] = None
    payload_units: int = 0
    sent_bytes: int = 0
    records_per_kinesis_record: Optional[Observer] = field(default=None, compare=False, repr=False)

    def as_dict(self) -> Dict[str, Any]:
        """The counters as plain values (for JSON), without the histograms."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in _HISTOGRAMS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, SinkStatistics):
                value = value.as_dict()
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out


_HISTOGRAMS = frozenset({"batch_records", "batch_bytes", "call_seconds", "records_per_kinesis_record"})


class Sink:
    """Base class of sinks; subclasses override the I/O."""

    name = "sink"

    #: Largest record (envelope line + body + partition key, in bytes) the
    #: sink can store, or None when only ``--max-body`` applies.
    max_record_bytes: Optional[int] = None

    def __init__(self, release: Release) -> None:
        self._release = release

    def record_keys(self, record_id: str, tenant: Optional[bytes], header: HeaderLookup) -> RecordKeys:
        """Keys of the record a request head announces; raise a RequestError to refuse it."""
        return None, None, 0

    def describe(self) -> str:
        """What the startup message says about the sink."""
        return self.name

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background work (batching, flushing) until :meth:`aclose`."""
        task_status.started()

    async def put(self, record: Record) -> Optional[dict]:
        """Take ownership of ``record``; return extra fields for the 202 body."""
        raise NotImplementedError

    def ready(self) -> Tuple[bool, str]:
        """Whether the sink takes records now, with a short reason."""
        return True, "ok"

    def stop_waiting(self) -> None:
        """The shutdown deadline passed: waiting ``put`` calls raise SinkUnavailable now."""

    async def aclose(self) -> None:
        """Store or give back everything held, then refuse new records."""

    def statistics(self) -> SinkStatistics:
        """A snapshot of the sink's counters."""
        return SinkStatistics()
