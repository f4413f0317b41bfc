"""How long PyPy's end-of-marking step takes with the gateway's modules imported.

    pypy3 -m bench.end_of_marking [--cycles N] [MODULE ...]

PyPy's collector marks the old generation in increments, but the step that
ends marking is done in one go, and part of its work grows with what the
process has imported, not with what it serves.  This starts two fresh
interpreters with the ``PYPY_GC_*`` settings ``sluice serve`` uses (or the
ones in the environment): one imports nothing (the baseline), the other the
modules given (by default those of a serving process with the Kinesis sink).
Each then allocates short-lived garbage until ``--cycles`` major collections
have ended marking, and reports that step's mean and longest duration (from
``gc.hooks``), with the code objects and weak references in its heap.  The
first two collections are left out (import garbage).  PyPy only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import Any, Dict, List, Optional

__all__ = ["SERVING_MODULES", "measure", "main"]

#: What a serving process with the Kinesis sink imports (its heavy parts).
SERVING_MODULES = ("gateway.cli.main", "gateway.server", "sinks.aws.sink", "sinks.aws.trio_http",
                   "botocore.session", "botocore.auth", "botocore.credentials")
# PyPy incminimark's states (rpython/memory/gc/incminimark.py).
_MARKING, _SWEEPING = 1, 2


def measure(modules: List[str], cycles: int) -> Dict[str, Any]:
    """Import ``modules`` here, then time ``cycles`` end-of-marking steps (PyPy only)."""
    import gc
    import importlib

    for name in modules:
        importlib.import_module(name)
    gc.collect()
    counts: Dict[str, int] = {}
    for obj in gc.get_objects():
        kind = type(obj).__name__
        if kind in ("code", "weakref"):
            counts[kind] = counts.get(kind, 0) + 1
    ends: List[float] = []

    def on_step(stats: Any) -> None:
        if stats.oldstate == _MARKING and stats.newstate == _SWEEPING:
            ends.append(stats.duration)

    gc.hooks.on_gc_collect_step = on_step  # type: ignore[attr-defined]
    try:
        garbage: Optional[List[str]] = None
        while len(ends) < cycles + 2:
            garbage = [str(i) for i in range(30)]
    finally:
        gc.hooks.on_gc_collect_step = None  # type: ignore[attr-defined]
    del garbage
    kept = ends[2:]
    return {"modules": modules, "code_objects": counts.get("code", 0),
            "weakrefs": counts.get("weakref", 0), "steps": len(kept),
            "mean_s": sum(kept) / len(kept), "max_s": max(kept)}


def _child(modules: List[str], cycles: int) -> Dict[str, Any]:
    from gateway.cli.main import pypy_gc_environment

    env = dict(os.environ)
    env.update(pypy_gc_environment(env))
    command = [sys.executable, "-m", "bench.end_of_marking", "--child", "--cycles", str(cycles), *modules]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return json.loads(done.stdout)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.end_of_marking",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help="modules to import (default: a serving process's)")
    parser.add_argument("--cycles", type=int, default=8, help="end-of-marking steps to time (default 8)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if platform.python_implementation() != "PyPy":
        print("bench.end_of_marking: PyPy only (CPython's collector has no such step)", file=sys.stderr)
        return 2
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    if args.child:
        print(json.dumps(measure(args.modules, args.cycles)))
        return 0
    modules = args.modules or list(SERVING_MODULES)
    base = _child([], args.cycles)
    loaded = _child(modules, args.cycles)
    for name, row in (("bare interpreter", base), (" ".join(modules), loaded)):
        print("%s: end of marking mean %.2f ms, longest %.2f ms (%d steps); "
              "%d code objects, %d weak references"
              % (name, row["mean_s"] * 1e3, row["max_s"] * 1e3, row["steps"],
                 row["code_objects"], row["weakrefs"]))
    print("ratio of the means: %.1f" % (loaded["mean_s"] / base["mean_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
