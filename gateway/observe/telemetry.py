"""In-process telemetry: GC pauses, memory, ring occupancy, request stages.

Theory of operation
-------------------
Everything here is recorded into structures sized once, when the
:class:`Telemetry` object is made: a :class:`Histogram` is a fixed tuple of
bucket bounds, an ``array('q')`` of bucket counters and an ``array('d')``
holding the running sum and maximum; the recent GC pauses are a fixed ring of
``array`` slots.  Recording an event is a ``bisect`` and a few array stores,
so it allocates nothing the interpreter does not force (the float a clock
returns, the ``info`` dict CPython passes to a GC callback).

GC pauses come from the interpreter's own instrumentation:

CPython, ``gc.callbacks``
    Each collection calls back with ``"start"`` and ``"stop"``; the pause is
    the ``perf_counter`` difference, filed under its generation (``gen0``,
    ``gen1``, ``gen2``).  A ``gen2`` collection is a full (major) collection.
PyPy, ``gc.hooks``
    ``on_gc_minor`` and ``on_gc_collect_step`` report pauses: minor
    collections and the steps of the incremental major collection (each
    step runs at the end of a minor collection and stops the program).  One
    hook call can cover ``count`` events and gives their total and longest
    duration in float seconds; the histogram files the longest at its value
    and the others at their mean.  ``on_gc_collect`` marks the end of a major
    collection, whose time is the sum of its steps.

There is one set of PyPy hooks per process, so the hooks are installed once,
by the first :class:`Telemetry` to :meth:`~Telemetry.install`, and fan out to
every installed recorder; the last :meth:`~Telemetry.uninstall` removes them.
Hooks another component installed before are kept and called after ours
(chained), and put back when ours are removed.

Request stages are measured by the server with ``time.perf_counter``: head
parsed -> body received (in the ring) -> sink accepted -> response sent.  The
server keeps the marks in local variables and passes them in; nothing here
holds per-request state.  Answers are counted by route and status in a fixed
table (:class:`RequestCounts`), and accepted body bytes in a plain int.
``gateway.observe.metrics`` reads all of this when metrics are scraped or published.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from array import array
from bisect import bisect_left
from typing import Any, Dict, List, Optional, Sequence, Tuple

#: Bucket bounds (seconds) of the event loop's lateness: from well under the
#: 1 ms a request may wait, to the second that fails a health check.
LOOP_LAG_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

__all__ = [
    "GC_PAUSE_BOUNDS",
    "LOOP_LAG_BOUNDS",
    "STAGE_BOUNDS",
    "RECENT_PAUSES",
    "ROUTES",
    "INGEST_ROUTES",
    "STATUSES",
    "OTHER",
    "Histogram",
    "GcPauses",
    "Stages",
    "RequestCounts",
    "Telemetry",
    "rss_bytes",
]

#: Upper bounds (seconds) of the GC pause buckets: from the tens of
#: microseconds of a PyPy minor collection to the seconds a full collection
#: of a large heap can take.  Longer pauses land in the overflow bucket.
GC_PAUSE_BOUNDS: Tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)
#: Upper bounds (seconds) of the request stage buckets: 10 us (a small body
#: already buffered with its head) up to the 60 s body timeout.
STAGE_BOUNDS: Tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: GC pauses kept one by one for inspection (the newest overwrite the oldest).
RECENT_PAUSES = 128
#: Request paths counted one by one in :class:`RequestCounts`: the gateway's
#: routes.  Any other path, and a request whose head could not be read, counts
#: under :data:`OTHER`, so a client cannot grow the table (or a metric's label
#: values) by inventing paths.
ROUTES: Tuple[bytes, ...] = (b"/v1/logs", b"/otlp/v1/logs", b"/healthz", b"/readyz", b"/metrics")
#: The routes that store a record: their success answers (``202``, and
#: ``200`` on OTLP/HTTP) count in the request stages.
INGEST_ROUTES = frozenset((b"/v1/logs", b"/otlp/v1/logs"))
#: The statuses the gateway answers with (gateway/errors.py, plus 200 and
#: 202); any other counts under :data:`OTHER`.
STATUSES: Tuple[int, ...] = (200, 202, 400, 401, 403, 404, 405, 408, 411, 413, 415, 429, 431, 500, 501,
                             503, 505)
#: The route or status of a :class:`RequestCounts` cell outside those lists.
OTHER = "other"

_PYPY = sys.implementation.name == "pypy"


class Histogram:
    """Counts of values per fixed bucket, plus their sum and maximum.

    Bucket ``i`` counts values ``v`` with ``bounds[i-1] < v <= bounds[i]``;
    the last bucket (index ``len(bounds)``) counts values above every bound.
    """

    __slots__ = ("bounds", "_counts", "_totals")

    def __init__(self, bounds: Sequence[float]) -> None:
        bounds = tuple(float(b) for b in bounds)
        if not bounds or any(b >= c for b, c in zip(bounds, bounds[1:])):
            raise ValueError("histogram bounds must be increasing and not empty")
        self.bounds = bounds
        self._counts = array("q", bytes(8 * (len(bounds) + 1)))
        self._totals = array("d", (0.0, 0.0))  # sum, max

    def add(self, value: float) -> None:
        """Record one value."""
        # A plain loop over the few bounds: on PyPy, bisect is pure Python
        # and allocated on every call here.
        bounds = self.bounds
        index = 0
        size = len(bounds)
        while index < size and bounds[index] < value:
            index += 1
        self._counts[index] += 1
        totals = self._totals
        totals[0] += value
        if value > totals[1]:
            totals[1] = value

    def add_many(self, count: int, total: float, largest: float) -> None:
        """Record ``count`` values known only by their sum and maximum.

        The largest goes to its own bucket and the others to the bucket of
        their mean, so count, sum and max stay exact.
        """
        if count <= 0:
            return
        if count == 1:
            self.add(total)
            return
        counts = self._counts
        bounds = self.bounds
        counts[bisect_left(bounds, largest)] += 1
        counts[bisect_left(bounds, (total - largest) / (count - 1))] += count - 1
        totals = self._totals
        totals[0] += total
        if largest > totals[1]:
            totals[1] = largest

    @property
    def count(self) -> int:
        return sum(self._counts)

    @property
    def total(self) -> float:
        return self._totals[0]

    @property
    def max(self) -> float:
        return self._totals[1]

    def counts(self) -> List[int]:
        """Per-bucket counts (not cumulative), overflow bucket last."""
        return list(self._counts)

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s counts (same bounds) into this histogram."""
        if other.bounds != self.bounds:
            raise ValueError("histograms with different bounds")
        for i, n in enumerate(other._counts):
            self._counts[i] += n
        self._totals[0] += other._totals[0]
        self._totals[1] = max(self._totals[1], other._totals[1])

    def quantile(self, q: float) -> float:
        """An upper estimate of quantile ``q``: the bound of the bucket it falls in.

        The overflow bucket answers with the maximum; an empty histogram with 0.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError("quantile must be in [0, 1]")
        count = self.count
        if not count:
            return 0.0
        rank = q * count
        seen = 0
        for i, n in enumerate(self._counts):
            seen += n
            if n and seen >= rank:
                if i == len(self.bounds):
                    return self.max
                return min(self.bounds[i], self.max)
        return self.max  # pragma: no cover - the loop always returns

    def snapshot(self) -> Dict[str, Any]:
        """A plain dict: count, sum, max, mean, p50/p90/p99 and the buckets."""
        count = self.count
        return {
            "count": count,
            "sum": self.total,
            "max": self.max,
            "mean": self.total / count if count else 0.0,
            "p50": self.quantile(0.5),
            "p90": self.quantile(0.9),
            "p99": self.quantile(0.99),
            "le": list(self.bounds),
            "counts": self.counts(),
        }


def rss_bytes() -> Optional[int]:
    """Resident set size of this process from ``/proc/self/statm``; None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            fields = statm.read().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> Optional[int]:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# -- GC pauses ---------------------------------------------------------------

_CPYTHON_KINDS = ("gen0", "gen1", "gen2")
_PYPY_KINDS = ("minor", "major_step")
_MINOR, _MAJOR_STEP = 0, 1


class GcPauses:
    """GC pauses of this process, by kind, in fixed histograms and a recent ring."""

    def __init__(self, recent: int = RECENT_PAUSES) -> None:
        if recent < 1:
            raise ValueError("keep at least one recent pause")
        self.kinds = _PYPY_KINDS if _PYPY else _CPYTHON_KINDS
        self.source = "gc.hooks" if _PYPY else "gc.callbacks"
        self.installed = False
        self._by_kind = tuple(Histogram(GC_PAUSE_BOUNDS) for _ in self.kinds)
        #: Full collections: CPython gen2 pauses, PyPy sums of major steps.
        self.major = Histogram(GC_PAUSE_BOUNDS)
        self._recent_seconds = array("d", bytes(8 * recent))
        self._recent_at = array("d", bytes(8 * recent))
        self._recent_kind = array("b", bytes(recent))
        self._recent_next = 0
        self._started = 0.0  # CPython: perf_counter at the current "start"
        self._major_steps = 0.0  # PyPy: step time of the major collection under way
        self._callback = self._on_cpython  # bound once, removed by identity

    def install(self) -> bool:
        """Start recording; False when this interpreter has no GC hooks."""
        if self.installed:
            return True
        if _PYPY:
            self.installed = _pypy_subscribe(self)
        elif hasattr(gc, "callbacks"):
            gc.callbacks.append(self._callback)
            self.installed = True
        return self.installed

    def uninstall(self) -> None:
        """Stop recording (idempotent)."""
        if not self.installed:
            return
        self.installed = False
        if _PYPY:
            _pypy_unsubscribe(self)
        else:
            try:
                gc.callbacks.remove(self._callback)
            except ValueError:
                pass

    # -- recording (called by the interpreter) --------------------------------

    def _record(self, kind: int, seconds: float, now: float) -> None:
        self._by_kind[kind].add(seconds)
        self._note(kind, seconds, now)

    def _note(self, kind: int, seconds: float, now: float) -> None:
        i = self._recent_next % len(self._recent_seconds)
        self._recent_seconds[i] = seconds
        self._recent_at[i] = now
        self._recent_kind[i] = kind
        self._recent_next += 1

    def _on_cpython(self, phase: str, info: Dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        started = self._started
        if not started:
            return  # installed during this collection
        self._started = 0.0
        seconds = now - started
        generation = info["generation"]
        self._record(generation, seconds, now)
        if generation == 2:
            self.major.add(seconds)

    def _on_minor(self, stats: Any) -> None:
        self._by_kind[_MINOR].add_many(stats.count, stats.duration, stats.duration_max)
        self._note(_MINOR, stats.duration_max, time.perf_counter())

    def _on_collect_step(self, stats: Any) -> None:
        self._by_kind[_MAJOR_STEP].add_many(stats.count, stats.duration, stats.duration_max)
        self._major_steps += stats.duration
        self._note(_MAJOR_STEP, stats.duration_max, time.perf_counter())

    def _on_collect(self, stats: Any) -> None:
        total, self._major_steps = self._major_steps, 0.0
        count = stats.count
        # Several majors in one call: their step times are not told apart.
        self.major.add_many(count, total, total / count if count > 1 else total)

    # -- reading ---------------------------------------------------------------

    def histograms(self) -> Tuple[Tuple[str, Histogram], ...]:
        """``(kind, histogram)`` of each kind of pause, in :attr:`kinds` order."""
        return tuple(zip(self.kinds, self._by_kind))

    def pauses(self) -> Histogram:
        """Every stop-the-world pause, whatever its kind, in one histogram."""
        merged = Histogram(GC_PAUSE_BOUNDS)
        for hist in self._by_kind:
            merged.merge(hist)
        return merged

    def recent(self) -> List[Dict[str, Any]]:
        """The newest pauses, oldest first: kind, seconds and how long ago."""
        size = len(self._recent_seconds)
        end = self._recent_next
        now = time.perf_counter()
        out = []
        for n in range(max(0, end - size), end):
            i = n % size
            out.append({
                "kind": self.kinds[self._recent_kind[i]],
                "seconds": self._recent_seconds[i],
                "ago": max(0.0, now - self._recent_at[i]),
            })
        return out

    def statistics(self) -> Dict[str, Any]:
        return {
            "source": self.source,
            "installed": self.installed,
            "pauses": self.pauses().snapshot(),
            "by_kind": {kind: {"count": h.count, "sum": h.total, "max": h.max}
                        for kind, h in zip(self.kinds, self._by_kind)},
            "major": self.major.snapshot(),
            "recent": self.recent(),
        }


# PyPy has one hook per event for the whole process: fan out to subscribers,
# then call the hook that was there before ours (slot i of _pypy_previous).
_pypy_subscribers: Tuple[GcPauses, ...] = ()
_pypy_previous: List[Any] = [None, None, None]


def _pypy_minor(stats: Any) -> None:
    for pauses in _pypy_subscribers:
        pauses._on_minor(stats)
    previous = _pypy_previous[0]
    if previous is not None:
        previous(stats)


def _pypy_collect_step(stats: Any) -> None:
    for pauses in _pypy_subscribers:
        pauses._on_collect_step(stats)
    previous = _pypy_previous[1]
    if previous is not None:
        previous(stats)


def _pypy_collect(stats: Any) -> None:
    for pauses in _pypy_subscribers:
        pauses._on_collect(stats)
    previous = _pypy_previous[2]
    if previous is not None:
        previous(stats)


_PYPY_HOOKS = (("on_gc_minor", _pypy_minor), ("on_gc_collect_step", _pypy_collect_step),
               ("on_gc_collect", _pypy_collect))


def _pypy_subscribe(pauses: GcPauses) -> bool:
    global _pypy_subscribers
    hooks = getattr(gc, "hooks", None)
    if hooks is None:
        return False
    if not _pypy_subscribers:
        for i, (name, hook) in enumerate(_PYPY_HOOKS):
            current = getattr(hooks, name)
            _pypy_previous[i] = None if current is hook else current
            setattr(hooks, name, hook)
    _pypy_subscribers = _pypy_subscribers + (pauses,)
    return True


def _pypy_unsubscribe(pauses: GcPauses) -> None:
    global _pypy_subscribers
    _pypy_subscribers = tuple(p for p in _pypy_subscribers if p is not pauses)
    if not _pypy_subscribers:
        hooks = gc.hooks  # type: ignore[attr-defined]
        for i, (name, hook) in enumerate(_PYPY_HOOKS):
            if getattr(hooks, name) is hook:  # not replaced since
                setattr(hooks, name, _pypy_previous[i])
            _pypy_previous[i] = None


# -- request stages ------------------------------------------------------------

class Stages:
    """Latency of each stage of an accepted request, in fixed histograms.

    ``body``: head parsed -> body received into the ring; ``sink``: body
    received -> sink accepted the record; ``respond``: sink accepted ->
    response sent; ``total``: head parsed -> response sent.
    """

    NAMES = ("body", "sink", "respond", "total")

    def __init__(self) -> None:
        self.body = Histogram(STAGE_BOUNDS)
        self.sink = Histogram(STAGE_BOUNDS)
        self.respond = Histogram(STAGE_BOUNDS)
        self.total = Histogram(STAGE_BOUNDS)

    def statistics(self) -> Dict[str, Any]:
        return {name: getattr(self, name).snapshot() for name in self.NAMES}


class RequestCounts:
    """Answers sent, by route and status: one fixed table of counters.

    Counting is two dict lookups and an array store; the table is sized
    once, (routes + 1) x (statuses + 1) cells.
    """

    __slots__ = ("_rows", "_columns", "_other_row", "_other_column", "_width", "_counts")

    def __init__(self) -> None:
        self._rows: Dict[Optional[bytes], int] = {path: i for i, path in enumerate(ROUTES)}
        self._columns = {status: i for i, status in enumerate(STATUSES)}
        self._other_row = len(ROUTES)
        self._other_column = len(STATUSES)
        self._width = len(STATUSES) + 1
        self._counts = array("q", bytes(8 * (len(ROUTES) + 1) * self._width))

    def add(self, path: Optional[bytes], status: int) -> None:
        """Count one answer on ``path`` (None: the head could not be read)."""
        row = self._rows.get(path, self._other_row)
        column = self._columns.get(status, self._other_column)
        self._counts[row * self._width + column] += 1

    def get(self, route: str, status: str) -> int:
        """The count of one cell, by the labels :meth:`items` uses."""
        for name, code, count in self.items():
            if (name, code) == (route, status):
                return count
        return 0

    def items(self) -> List[Tuple[str, str, int]]:
        """``(route, status, count)`` of every cell counted at least once."""
        routes = [path.decode("ascii") for path in ROUTES] + [OTHER]
        statuses = [str(status) for status in STATUSES] + [OTHER]
        width = self._width
        return [(routes[i // width], statuses[i % width], n) for i, n in enumerate(self._counts) if n]


class Telemetry:
    """The gateway's GC, memory, ring, stage and request telemetry."""

    def __init__(self, *, recent_pauses: int = RECENT_PAUSES) -> None:
        self.gc = GcPauses(recent_pauses)
        self.stages = Stages()
        self.ring_peak = 0
        #: Answers by route and status (:meth:`answered`, :meth:`answered_error`).
        self.requests = RequestCounts()
        #: Body bytes of accepted records.
        self.body_bytes = 0
        #: How late the event loop's heartbeat woke up (gateway.observe.loop).
        self.loop_lag = Histogram(LOOP_LAG_BOUNDS)

    def install(self) -> bool:
        """Start GC pause recording; False when the hooks are unavailable."""
        return self.gc.install()

    def uninstall(self) -> None:
        """Remove the GC hooks (idempotent)."""
        self.gc.uninstall()

    # -- the hot path: a few array stores per request ------------------------

    def ingested(self, parsed: float, received: float, accepted: float, ring_used: int,
                 body_bytes: int = 0) -> None:
        """A record of ``body_bytes`` went head parsed -> body received -> sink accepted."""
        self.stages.body.add(received - parsed)
        self.stages.sink.add(accepted - received)
        self.body_bytes += body_bytes
        if ring_used > self.ring_peak:
            self.ring_peak = ring_used

    def answered(self, status: int, parsed: float, routed: float, sent: float,
                 path: Optional[bytes] = None) -> None:
        """A response to a request on ``path`` went out; only accepted records (202,
        or 200 on an :data:`INGEST_ROUTES` path) count in the stages."""
        self.requests.add(path, status)
        if status == 202 or (status == 200 and path in INGEST_ROUTES):
            self.stages.respond.add(sent - routed)
            self.stages.total.add(sent - parsed)

    def answered_error(self, path: Optional[bytes], status: int) -> None:
        """An error answer went out to a request on ``path`` (None: no head was read)."""
        self.requests.add(path, status)

    # -- snapshots -------------------------------------------------------------

    def add_statistics(self, stats: Dict[str, Any]) -> Dict[str, Any]:
        """Add the ``gc``, ``rss`` and ``stages`` sections to a gateway's ``stats``.

        ``stats["ring"]`` (the ring's own statistics) gains ``occupancy``
        (used / capacity) and ``peak_used``.
        """
        ring = stats.get("ring")
        if isinstance(ring, dict) and ring.get("capacity"):
            ring["occupancy"] = ring["used"] / ring["capacity"]
            ring["peak_used"] = max(self.ring_peak, ring["used"])
        stats["gc"] = self.gc.statistics()
        stats["rss"] = {"bytes": rss_bytes(), "peak_bytes": _peak_rss_bytes()}
        stats["stages"] = self.stages.statistics()
        return stats
