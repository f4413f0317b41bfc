"""Which task held the event loop: a Trio instrument that times every task step.

A step is the code a task runs between two checkpoints; while it runs, no
other task can.  A step longer than :data:`STALL` is a loop stall, filed with
the task's name, the CPU time its thread spent in it (a step that is long
only because the machine preempted the process is not the code's fault), the
garbage-collector time inside it (from the probe's pause hooks), PyPy's JIT
time inside it (tracing and compiling, from ``pypyjit``'s counters), and
where the step ended (the innermost awaiting coroutine's line): so a stall
can be charged to the code, to the collector, to the JIT or to the machine.
It also adds up the time in each task's steps by where they ended (`busy`),
a profile of the loop by task and await, and on PyPy lists what the JIT
compiled in whose step.  Task names are their functions' qualified names: a
name starting with ``sinks.`` is the sink's.

Timing every step costs two clock reads and a walk of the task's awaits per
step (about 1% of a core at the design load): the probe installs it only
when ``SLUICE_BENCH_STALLS=1`` (``python -m bench.load --stalls``).
"""
from __future__ import annotations

import os
import time
from array import array
from typing import Any, Callable, Dict, List, Optional

import trio

__all__ = ["STALL", "MAX_STALLS", "StallInstrument", "group_of", "jit_counters"]

#: A task step at least this long is a stall (seconds).
STALL = 0.001
#: Stalls kept with their names; later ones are only counted.
MAX_STALLS = 100_000


def group_of(task_name: str) -> str:
    """The part of Sluice a task belongs to: sink, access, connection or other."""
    if task_name.startswith("sinks."):
        return "sink"
    if task_name.startswith("gateway.access."):
        return "access"
    if task_name.startswith(("gateway.server.", "gateway.http.")):
        return "connection"
    return "other"


def _jit_seconds() -> Callable[[], float]:
    """A clock of the seconds PyPy's JIT has spent tracing and compiling
    (always 0 elsewhere); one read costs about a microsecond."""
    try:
        import pypyjit
    except ImportError:
        return lambda: 0.0
    snapshot = pypyjit.get_stats_snapshot

    def seconds() -> float:
        times = snapshot().counter_times
        return times.get("TRACING", 0.0) + times.get("BACKEND", 0.0)

    return seconds


def jit_counters() -> Optional[Dict[str, float]]:
    """PyPy's JIT counters now: loops and bridges compiled and freed, traces
    aborted, seconds tracing and compiling; None off PyPy."""
    try:
        import pypyjit
    except ImportError:
        return None
    snapshot = pypyjit.get_stats_snapshot()
    found: Dict[str, float] = {name: value for name, value in snapshot.counters.items()
                               if name.startswith(("TOTAL_", "ABORT_", "TRACING", "BACKEND"))}
    for name, seconds in snapshot.counter_times.items():
        found[name + "_s"] = seconds
    return found


class StallInstrument(trio.abc.Instrument):
    """Times task steps; keeps those of :data:`STALL` or longer."""

    def __init__(self, gc_seconds: Callable[[], float],
                 jit_seconds: Optional[Callable[[], float]] = None) -> None:
        self._gc_seconds = gc_seconds
        self._jit_seconds = jit_seconds or _jit_seconds()
        self._jit_at_start = 0.0
        self._task = ""
        #: What PyPy's JIT compiled: [time, task whose step it was in ("" between
        #: steps), "loop" or "bridge", where the trace starts, operations].
        self.compiled: List[List[Any]] = []
        self._clock = time.perf_counter
        self._cpu = time.thread_time
        self._started = 0.0
        self._cpu_at_start = 0.0
        self._gc_at_start = 0.0
        self.steps = 0
        # flat: wall time, duration, cpu seconds, gc and jit seconds inside;
        # names in parallel
        self.log = array("d")
        self.names: List[str] = []
        self.places: List[str] = []
        self.dropped = 0
        #: Per "task name @ where the step ended": [seconds in those steps,
        #: steps], since the start.
        self.busy: Dict[str, List[float]] = {}

    def install_compile_hook(self) -> bool:
        """Record what PyPy's JIT compiles, and in whose step (PyPy only)."""
        try:
            import pypyjit
        except ImportError:
            return False
        pypyjit.set_compile_hook(self._on_compiled, operations=True)
        return True

    def _on_compiled(self, info: Any) -> None:
        if len(self.compiled) >= MAX_STALLS:
            return
        where = "?"
        for op in info.operations:
            if op.name == "debug_merge_point":
                code = op.pycode
                where = "%s:%d %s" % ("/".join(code.co_filename.replace(os.sep, "/").split("/")[-2:]),
                                      code.co_firstlineno, code.co_name)
                break
        self.compiled.append([time.time(), self._task, info.type, where, len(info.operations)])

    def before_task_step(self, task: Any) -> None:
        self._task = task.name
        self._gc_at_start = self._gc_seconds()
        self._jit_at_start = self._jit_seconds()
        self._cpu_at_start = self._cpu()
        self._started = self._clock()

    def after_task_step(self, task: Any) -> None:
        duration = self._clock() - self._started
        self._task = ""
        self.steps += 1
        name = task.name
        where = _suspended_at(task)
        busy = self.busy.get(name + " @ " + where)
        if busy is None:
            self.busy[name + " @ " + where] = [duration, 1]
        else:
            busy[0] += duration
            busy[1] += 1
        if duration < STALL:
            return
        if len(self.names) >= MAX_STALLS:
            self.dropped += 1
            return
        self.log.extend((time.time(), duration, self._cpu() - self._cpu_at_start,
                         self._gc_seconds() - self._gc_at_start,
                         self._jit_seconds() - self._jit_at_start))
        self.names.append(name)
        self.places.append(where)

    def document(self) -> Dict[str, Any]:
        log = self.log
        return {"threshold_s": STALL, "steps": self.steps, "dropped": self.dropped, "busy": self.busy,
                "fields": ["time", "duration_s", "cpu_s", "gc_s", "jit_s", "task", "ended_at"],
                "stalls": [list(log[5 * i:5 * i + 5]) + [self.names[i], self.places[i]]
                           for i in range(len(self.names))],
                "compiled_fields": ["time", "task", "kind", "starts_at", "operations"],
                "compiled": self.compiled}


_TRIO = os.path.dirname(trio.__file__)


def _suspended_at(task: Any) -> str:
    """``file:line function`` of the innermost coroutine of ``task`` outside Trio
    (where the step ended), or ``(finished)``."""
    coro: Optional[Any] = getattr(task, "coro", None)
    frame = None
    for _ in range(100):
        if coro is None:
            break
        inner = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if inner is not None and not inner.f_code.co_filename.startswith(_TRIO):
            frame = inner
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    if frame is None:
        return "(finished)"
    code = frame.f_code
    parts = code.co_filename.replace(os.sep, "/").split("/")
    return "%s:%d %s" % ("/".join(parts[-2:]), frame.f_lineno, code.co_name)
