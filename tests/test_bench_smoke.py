"""The micro benchmarks in bench/ still import and run (each body once, untimed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmarks_run_once() -> None:
    pytest.importorskip("pytest_benchmark")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTEST_ADDOPTS=""),
    )
    output = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, output
    assert " passed" in output, output


def test_end_of_marking_compares_imports_with_the_bare_interpreter_on_pypy_only() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.end_of_marking", "--cycles", "1", "h11"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300,
    )
    output = result.stdout.decode("utf-8", "replace")
    if sys.implementation.name != "pypy":
        assert result.returncode == 2 and "PyPy only" in output, output
        return
    assert result.returncode == 0, output
    lines = output.splitlines()
    assert lines[0].startswith("bare interpreter: end of marking mean ") and "code objects" in lines[0]
    assert lines[1].startswith("h11: end of marking mean ")
    assert lines[2].startswith("ratio of the means: ")
