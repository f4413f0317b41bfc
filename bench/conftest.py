"""Micro benchmarks (pytest-benchmark): ``pytest bench/ --benchmark-only``.

Files named ``bench_*.py`` directly in this directory are collected as test
modules (``tests/`` stays the default test path, so plain ``pytest`` never
runs them).  Defaults set here unless given on the command line or in
``PYTEST_ADDOPTS``:

* warm-up: on for every interpreter, up to ``PYPY_WARMUP_ITERATIONS``
  calls on PyPy (enough for the JIT to compile the loops and their bridges)
  and ``CPYTHON_WARMUP_ITERATIONS`` on CPython (the specializing interpreter
  settles after a few calls).  pytest-benchmark caps each warm-up phase at
  ``--benchmark-max-time``; raise it (``--benchmark-max-time=3``) for steadier
  PyPy figures.
* storage: ``.benchmarks/`` at the repository root, one folder per
  interpreter (pytest-benchmark's machine id names it), and every measured
  run is saved (``--benchmark-autosave``), so ``--benchmark-compare`` (the
  newest saved run of this interpreter) or ``--benchmark-compare=NNNN``
  shows regressions.  ``--benchmark-save=NAME`` replaces the autosave.

Benchmarks that move bytes report ``bytes_per_op`` and ``MB_per_s``
(10^6 bytes per second, from the median: steadier than the
mean on a busy machine) in ``extra_info``; they are printed
after the timing table, with the cffi/python ratio of each base64 case.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

PYPY = sys.implementation.name == "pypy"
PYPY_WARMUP_ITERATIONS = 100_000
CPYTHON_WARMUP_ITERATIONS = 1_000

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
_results: List[Dict[str, Any]] = []


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    # Explicit file arguments are collected by pytest itself already.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and file_path.parent == _HERE and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _given(config: pytest.Config, *flags: str) -> bool:
    args = list(config.invocation_params.args)
    args += shlex.split(os.environ.get("PYTEST_ADDOPTS", ""))
    return any(str(arg).split("=", 1)[0] in flags for arg in args)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Runs before pytest-benchmark reads its options (its hook is trylast).
    option = config.option
    if not hasattr(option, "benchmark_warmup"):
        return  # pytest-benchmark not installed or disabled with -p no:benchmark
    if not _given(config, "--benchmark-warmup"):
        option.benchmark_warmup = True
    if not _given(config, "--benchmark-warmup-iterations"):
        option.benchmark_warmup_iterations = (
            PYPY_WARMUP_ITERATIONS if PYPY else CPYTHON_WARMUP_ITERATIONS)
    if not _given(config, "--benchmark-storage"):
        option.benchmark_storage = "file://" + str(_ROOT / ".benchmarks")
    if not _given(config, "--benchmark-save", "--benchmark-autosave", "--benchmark-disable"):
        from pytest_benchmark.utils import get_tag

        option.benchmark_autosave = get_tag()


@pytest.fixture
def throughput(benchmark) -> Callable[..., None]:
    """Call after ``benchmark(...)``: ``throughput(nbytes, **info)`` records bytes/op and MB/s."""

    def record(nbytes: int, **info: Any) -> None:
        benchmark.extra_info["bytes_per_op"] = nbytes
        benchmark.extra_info.update(info)
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: the body ran once, untimed
            return
        median = stats.stats.median
        mbps = nbytes / median / 1e6 if median else 0.0
        benchmark.extra_info["MB_per_s"] = round(mbps, 1)
        _results.append({"name": benchmark.name, "nbytes": nbytes, "mbps": mbps, **info})

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not _results:
        return
    write = terminalreporter.write_line
    terminalreporter.section("throughput (MB/s = 10^6 bytes/s, from the median)")
    width = max(len(r["name"]) for r in _results)
    for r in _results:
        write("%-*s %12d B/op %10.1f MB/s" % (width, r["name"], r["nbytes"], r["mbps"]))
    by_case: Dict[Any, Dict[str, float]] = {}
    for r in _results:
        if "backend" in r and "case" in r:
            by_case.setdefault(r["case"], {})[r["backend"]] = r["mbps"]
    ratios = [(case, b["cffi"] / b["python"]) for case, b in by_case.items()
              if b.get("cffi") and b.get("python")]
    if ratios:
        write("")
        write("base64 backends, same run: cffi / python")
        for case, ratio in ratios:
            write("  %-24s %6.2fx" % (case, ratio))
    parts = {r["part"]: r for r in _results if r.get("case") == "kinesis call" and "part" in r}
    if "call" in parts and "post" in parts and parts["post"]["cpu_s_per_call"]:
        call, post = parts["call"], parts["post"]
        write("")
        write("a Kinesis call, same run, against posting its bytes (bench_kinesis_call.py)")
        write("  CPU per call: call %.2f ms, post %.2f ms: %.2fx" % (
            call["cpu_s_per_call"] * 1e3, post["cpu_s_per_call"] * 1e3,
            call["cpu_s_per_call"] / post["cpu_s_per_call"]))
        if call["mbps"]:
            write("  wall time: %.2fx" % (post["mbps"] / call["mbps"]))
