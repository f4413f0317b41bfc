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
