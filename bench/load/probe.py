"""Run ``sluice serve`` with a GC probe: ``python -m bench.load.probe serve FLAGS...``.

The probe records every garbage-collector pause of the gateway process with
its wall-clock time, and on exit writes one JSON document to the path in
``SLUICE_BENCH_PROBE``: the pauses, ``Gateway.statistics()``, and the marks
taken on SIGUSR1 (the harness sends one when its measured window starts,
one when it ends, and a third once the client has finished, for the
census).  Two SIGUSR2 a moment apart take a census of the objects born
between them and still alive (:func:`bench.load.heap.young`).  With
``SLUICE_BENCH_TRACEMALLOC=1`` on CPython, ``tracemalloc`` runs too and each
mark carries the traced memory.  The last mark also carries, taken at the
third signal so that no measured request waits for them, the interpreter's
memory accounting and a heap census (:mod:`bench.load.heap`) of the steady
state.  With ``SLUICE_BENCH_STALLS=1`` a Trio instrument times every
task step and the document lists the loop stalls (:mod:`bench.load.stalls`).  With
``SLUICE_BENCH_VMPROF=PATH``, vmprof samples the measured window (from the
first signal to the second) into ``PATH``.

Pause sources: CPython's ``gc.callbacks`` (a start/stop pair per
collection); PyPy's ``gc.hooks``, where one ``on_gc_minor`` or
``on_gc_collect_step`` call may cover ``count`` events and reports their total
and longest duration (a major collection is the sum of its steps).

The gateway itself is not changed: the probe wraps ``gateway.cli.main.Gateway`` to
keep a reference to the instance, then calls ``gateway.cli.main.main``.  On PyPy it
sets the ``PYPY_GC_*`` variables ``sluice serve`` would (unless already set).
"""
from __future__ import annotations

import gc
import json
import os
import platform
import signal
import sys
import time
from array import array
from typing import Any, Dict, List, Optional

from . import heap

__all__ = ["main", "PROBE_ENV", "TRACEMALLOC_ENV", "STALLS_ENV", "VMPROF_ENV", "MAX_PAUSES"]

PROBE_ENV = "SLUICE_BENCH_PROBE"
TRACEMALLOC_ENV = "SLUICE_BENCH_TRACEMALLOC"
STALLS_ENV = "SLUICE_BENCH_STALLS"
VMPROF_ENV = "SLUICE_BENCH_VMPROF"
#: Pauses kept (four doubles each); later ones are only counted.  Two million
#: is minutes of minor collections at the highest rates seen here.
MAX_PAUSES = 2_000_000

_PYPY = platform.python_implementation() == "PyPy"
# kind codes in the pause log
_MINOR, _STEP, _GEN0, _GEN1, _GEN2, _STEP_END_MARK = 0, 1, 2, 3, 4, 5
_KIND_NAMES = {_MINOR: "minor", _STEP: "major_step", _GEN0: "gen0", _GEN1: "gen1", _GEN2: "gen2",
               _STEP_END_MARK: "major_step_end_of_marking"}
# PyPy incminimark's major-collection states (rpython/memory/gc/incminimark.py):
# the step from MARKING to SWEEPING finishes marking in one go (objects with
# finalizers, weak references), so it is logged as its own kind.
_MARKING, _SWEEPING = 1, 2


class _Probe:
    def __init__(self) -> None:
        # flat log: time, duration (total), kind, count, max duration
        self.log = array("d")
        self.dropped = 0
        self.gateway: Any = None
        self.marks: List[Dict[str, Any]] = []
        self._started = 0.0
        #: Seconds in the collector so far (for the stall instrument).
        self.gc_seconds = 0.0
        self.stalls: Any = None
        self._before: Any = None
        self._before_at = 0.0
        #: What a young collection would have kept, from two SIGUSR2 (heap.young).
        self.young: Any = None
        self._profile_file: Any = None

    def gc_total(self) -> float:
        return self.gc_seconds

    def add(self, t: float, duration: float, kind: int, count: int, longest: float) -> None:
        self.gc_seconds += duration
        if len(self.log) < 5 * MAX_PAUSES:
            self.log.extend((t, duration, float(kind), float(count), longest))
        else:
            self.dropped += count

    # CPython
    def callback(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            duration = time.perf_counter() - self._started
            self.add(time.time(), duration, _GEN0 + info.get("generation", 0), 1, duration)

    # PyPy
    def on_gc_minor(self, stats: Any) -> None:
        self.add(time.time(), stats.duration, _MINOR, stats.count, stats.duration_max)

    def on_gc_collect_step(self, stats: Any) -> None:
        kind = _STEP_END_MARK if (getattr(stats, "oldstate", None) == _MARKING
                                  and getattr(stats, "newstate", None) == _SWEEPING) else _STEP
        self.add(time.time(), stats.duration, kind, stats.count, stats.duration_max)

    def _profile(self, marks: int) -> None:
        """With ``SLUICE_BENCH_VMPROF`` set, vmprof samples from the first mark to the second."""
        path = os.environ.get(VMPROF_ENV)
        if not path:
            return
        import vmprof

        if marks == 0:
            self._profile_file = open(path, "w+b")
            # The kernel's timer may sample less often than asked (every 4 ms here).
            vmprof.enable(self._profile_file.fileno(), period=0.001, real_time=False)
        elif self._profile_file is not None:
            vmprof.disable()
            self._profile_file.close()
            self._profile_file = None

    def young_census(self, *_: Any) -> None:
        if self._before is None:
            self._before = heap.snapshot()
            self._before_at = time.time()
        else:
            self.young, self._before = heap.young(self._before), None
            self.young["span_s"] = time.time() - self._before_at

    def mark(self, *_: Any) -> None:
        if len(self.marks) >= 2:
            # The third signal comes once the client has finished: walking the
            # heap holds the loop for up to a second, and reading the memory
            # accounting (smaps) for up to 20 ms on PyPy; inside the window
            # they delayed requests.
            self.marks[-1]["memory"] = heap.memory()
            self.marks[-1]["census"] = heap.census()
            return
        self._profile(len(self.marks))
        mark: Dict[str, Any] = {"time": time.time(), "pauses": len(self.log) // 5}
        if self.gateway is not None:
            mark["requests"] = self.gateway.requests
        if not _PYPY:
            mark["gc_stats"] = gc.get_stats()
            import tracemalloc

            if tracemalloc.is_tracing():
                mark["traced_current"], mark["traced_peak"] = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
        from .stalls import jit_counters

        mark["jit"] = jit_counters()
        if self.stalls is not None:
            mark["busy"] = {name: list(busy) for name, busy in self.stalls.busy.items()}
        self.marks.append(mark)

    def document(self) -> Dict[str, Any]:
        log = self.log
        pauses = [[log[i], log[i + 1], _KIND_NAMES[int(log[i + 2])], int(log[i + 3]), log[i + 4]]
                  for i in range(0, len(log), 5)]
        doc: Dict[str, Any] = {
            "implementation": platform.python_implementation(),
            "python": platform.python_version(),
            "pypy_gc_nursery": os.environ.get("PYPY_GC_NURSERY"),
            "pypy_gc_increment_step": os.environ.get("PYPY_GC_INCREMENT_STEP"),
            "pypy_gc_major_collect": os.environ.get("PYPY_GC_MAJOR_COLLECT"),
            "pause_fields": ["time", "duration_s", "kind", "count", "max_duration_s"],
            "pauses": pauses,
            "pauses_dropped": self.dropped,
            "marks": self.marks,
            "statistics": None,
            "stalls": None if self.stalls is None else self.stalls.document(),
            "young": self.young,
        }
        if self.gateway is not None:
            try:
                doc["statistics"] = self.gateway.statistics()
            except Exception as exc:  # a snapshot that cannot be taken is reported, not fatal
                doc["statistics_error"] = repr(exc)
        return doc


def _install(probe: _Probe) -> None:
    if _PYPY:
        hooks = gc.hooks  # type: ignore[attr-defined]
        hooks.on_gc_minor = probe.on_gc_minor
        hooks.on_gc_collect_step = probe.on_gc_collect_step
    else:
        gc.callbacks.append(probe.callback)
        if os.environ.get(TRACEMALLOC_ENV) == "1":
            import tracemalloc

            tracemalloc.start(1)
    signal.signal(signal.SIGUSR1, probe.mark)
    signal.signal(signal.SIGUSR2, probe.young_census)


def _uninstall(probe: _Probe) -> None:
    if _PYPY:
        gc.hooks.on_gc_minor = None  # type: ignore[attr-defined]
        gc.hooks.on_gc_collect_step = None  # type: ignore[attr-defined]
    elif probe.callback in gc.callbacks:
        gc.callbacks.remove(probe.callback)


def main(argv: Optional[List[str]] = None) -> int:
    if _PYPY and "PYPY_GC_NURSERY" not in os.environ:
        # Mirrors gateway.cli.main._tune_pypy_gc without the re-exec; the value
        # must be in the environment before the interpreter starts.
        from gateway.cli import main as _cli

        os.environ.update(_cli.pypy_gc_environment(os.environ))
        os.execv(sys.executable, [sys.executable, "-m", "bench.load.probe"] + sys.argv[1:])
    from gateway.cli import main as cli

    probe = _Probe()
    base = cli.Gateway

    class _ProbedGateway(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            probe.gateway = self

        async def serve(self, *args: Any, **kwargs: Any) -> None:
            if os.environ.get(STALLS_ENV) == "1":
                import trio

                from .stalls import StallInstrument

                probe.stalls = StallInstrument(probe.gc_total)
                probe.stalls.install_compile_hook()
                trio.lowlevel.add_instrument(probe.stalls)
            await super().serve(*args, **kwargs)

    cli.Gateway = _ProbedGateway  # type: ignore[misc]
    _install(probe)
    try:
        return cli.main(argv if argv is not None else sys.argv[1:])
    finally:
        _uninstall(probe)
        path = os.environ.get(PROBE_ENV)
        if path:
            with open(path + ".tmp", "w") as out:
                json.dump(probe.document(), out)
            os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
