"""Smoke test of the end-to-end load harness (bench/load): it runs and reports; no speed is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from bench.load import bodies, report, stalls
from bench.load.stubs import check_put_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_seed_mix_is_the_design_load() -> None:
    seed = bodies.sizes_for("seed")
    assert len(seed) == 100 and seed == bodies.sizes_for("seed")
    assert (seed.count(1024), seed.count(16 * 1024), seed.count(256 * 1024), seed.count(900_000)) == (
        85, 10, 4, 1)


def test_seed_profile_sets_the_design_load_and_flags_given_win() -> None:
    from bench.load import cli

    args = cli._parser().parse_args(["--profile", "seed", "--duration", "60"])
    cli._apply_profile(args, ["--profile", "seed", "--duration", "60"])
    assert (args.sink, args.sizes, args.modes, args.rate, args.duration) == (
        "kinesis", "seed", "open", 500.0, 60)
    assert args.gateway_arg == ["--ack=received"] and args.peers == "nginx,uvicorn"
    assert args.warmup == 60.0  # past --jit-settle's 20,000 requests at 500/s


def test_seed_targets_are_marked_met_or_missed() -> None:
    from bench.load import report

    def case(server, cpu, p99, peak, gc_max):
        return {"server": server, "cpu_percent": cpu, "window": [0.0, 100.0],
                "load": {"latency_s": {"p99": p99, "max": 2 * p99}},
                "rss": {"steady_bytes": peak}, "rss_samples": [(t, peak) for t in range(100)],
                "gc": {"count": 10, "max_s": gc_max}}

    table = report.seed_targets([case("sluice-pypy", 8.0, 0.0021, 100e6, 0.001),
                                 case("nginx", 1.0, 0.0018, 5e6, None)], "PyPy", ["--ack=received"])
    assert "| sluice-pypy CPU ≤ 10% of a core | 8.0% | met |" in table
    assert "missed" not in table
    table = report.seed_targets([case("sluice-pypy", 40.0, 0.02, 300e6, 0.01),
                                 case("nginx", 1.0, 0.0018, 5e6, None)], "PyPy", ["--ack=received"])
    assert table.count("missed") == 5  # CPU, p99, max, GC, RSS; RSS is flat


def test_seed_targets_mark_the_sinks_stalls_when_they_were_timed() -> None:
    def summary(rows):
        return report.stall_summary({"stalls": {"threshold_s": 0.001, "steps": 100, "dropped": 0,
                                                "stalls": rows}}, (0.0, 100.0))

    def case(stalls):
        return {"server": "sluice-pypy", "cpu_percent": 8.0, "window": [0.0, 100.0],
                "load": {"latency_s": {"p99": 0.001, "max": 0.002}},
                "rss": {"steady_bytes": 100e6}, "rss_samples": [(t, 100e6) for t in range(100)],
                "gc": {"count": 10, "max_s": 0.001}, "stalls": stalls}

    sink = "sinks.aws.sink.StreamSink._call"
    # Only the collector and the machine held these steps: not the sink's.
    clean = summary([[5.0, 0.004, 0.004, 0.0035, 0.0, sink, "a"], [6.0, 0.009, 0.0002, 0.0, 0.0, sink, "b"]])
    table = report.seed_targets([case(clean)], "PyPy", ["--ack=received"])
    assert "| no loop stall over 1 ms from the sink (its code, or the JIT compiling it) | 0; " \
           "0 with JIT work | met |" in table
    # The JIT compiling inside the sink's step is the sink's stall.
    jit = summary([[5.0, 0.008, 0.008, 0.0, 0.0075, sink, "a"]])
    table = report.seed_targets([case(jit)], "PyPy", ["--ack=received"])
    assert "| 1 (longest 8.00 ms); 1 with JIT work | missed |" in table


def test_mix_is_fixed_and_bounded() -> None:
    mix = bodies.sizes_for("mix")
    assert len(mix) == 100 and max(mix) == 1_000_000 and mix.count(1024) == 80
    assert mix == bodies.sizes_for("mix")
    assert len(bodies.body(65536)) == 65536


def test_5m_mix_raises_the_gateways_max_body() -> None:
    assert bodies.sizes_for("5m") == [5 * 1024 * 1024]
    assert bodies.largest_body(["1k", "5m"]) == 5 * 1024 * 1024
    assert len(bodies.body(5 * 1024 * 1024)) == 5 * 1024 * 1024


def test_put_records_limits() -> None:
    ok = b'{"StreamName":"s","Records":[' + b",".join([b'{"Data":"eHg=","PartitionKey":"k"}'] * 500) + b"]}"
    assert check_put_records(ok) == (500, None)
    too_many = ok.replace(b"]}", b',{"Data":"eHg=","PartitionKey":"k"}]}')
    assert check_put_records(too_many)[1] is not None


def test_put_records_stub_counts_what_the_sink_sends() -> None:
    from sinks.aws.putrecords import PutRecordsBatch
    from tests.support.batches import add

    batch = PutRecordsBatch("logs")
    for i in range(3):
        add(batch, b"x" * (100 * i), "k%d" % i)
    assert check_put_records(bytes(batch.body())) == (3, None)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="the harness reads /proc")
def test_smoke_run_writes_report(tmp_path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench.load", "--python", sys.executable, "--sink", "null", "--sizes", "1k",
         "--modes", "open,closed", "--generator", "python", "--rate", "200", "--connections", "4",
         "--duration", "1.5", "--warmup", "0.5", "--peers", "discard", "--redis", "off", "--no-plots",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["sink"] == "null"
    names = {(c["server"].split("-")[0], c["mode"]) for c in doc["cases"]}
    assert names == {("sluice", "open"), ("sluice", "closed"), ("discard", "open"), ("discard", "closed")}
    for case in doc["cases"]:
        load = case["load"]
        assert load["completed"] > 0 and load["requests_per_s"] > 0
        assert set(load["latency_s"]) >= {"p50", "p99", "p99.9", "max"}
        assert load["latency_s"]["p50"] <= load["latency_s"]["max"]
        assert case["rss"]["peak_bytes"] > 0 and case["cpu_percent"] >= 0
        if case["server"].startswith("sluice"):
            assert case["gc"] is not None and case["gc"]["count"] >= 0
            assert case["gateway_statistics"]["requests"] >= load["completed"]
            # The memory accounting and the heap census at the window's end.
            assert case["heap"]["memory"] and case["heap"]["census"]["objects"] > 0
            packages = dict(case["heap"]["census"]["top_packages"])
            assert packages["gateway"] > 0 and "redis" not in packages
    tables: list = [[]]
    for line in (out / "results.md").read_text().strip().splitlines():
        if line.startswith("|"):
            tables[-1].append(line)
        elif tables[-1]:
            tables.append([])
    rows = tables[0]
    assert len(rows) == 2 + 4 and all(r.count("|") == rows[0].count("|") for r in rows)
    # Latency by body size: one column for the mix's one size, one row per case.
    sized = next(t for t in tables if t and t[0].startswith("| server | 1 KiB"))
    assert len(sized) == 2 + 4 and all(r.count("|") == 3 for r in sized)
    for case in doc["cases"]:
        by_size = case["load"]["latency_by_size_s"]
        assert list(by_size) == ["1024"] and by_size["1024"]["count"] == case["load"]["completed"]


def test_gc_summary_counts_only_the_window() -> None:
    probe = {"pauses": [[1.0, 0.002, "gen0", 1, 0.002], [5.0, 0.004, "minor", 2, 0.003],
                        [9.0, 1.0, "gen2", 1, 1.0]]}
    summary = report.gc_summary(probe, (2.0, 8.0))
    assert summary is not None and summary["count"] == 2 and summary["max_s"] == 0.003


def test_put_records_stub_takes_five_mib_of_records() -> None:
    from sinks.aws.putrecords import PutRecordsBatch
    from tests.support.batches import add

    batch = PutRecordsBatch("logs")
    for i in range(5):
        add(batch, b"x" * 1_000_000, "k%d" % i)
    assert check_put_records(bytes(batch.body())) == (5, None)


def test_gateway_imports_are_the_dependencies() -> None:
    """The harness checks an interpreter by importing these: pyproject.toml's dependencies."""
    import re

    from bench.load.servers import GATEWAY_IMPORTS

    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        block = re.search(r"^dependencies = \[(.*?)^\]", f.read(), re.S | re.M)
    assert block is not None
    names = {re.split(r"[^A-Za-z0-9_.-]", d, maxsplit=1)[0].lower().replace("-", "_")
             for d in re.findall(r'^\s*"([^"]+)"', block.group(1), re.M)}
    assert names - {"tomli"} == set(GATEWAY_IMPORTS)  # tomli: checked below Python 3.11 only


def test_missing_interpreter_says_how_to_get_one(monkeypatch) -> None:
    from bench.load import servers

    monkeypatch.setitem(servers.INTERPRETERS, "pypy", ("no-such-venv/bin/python", "no-such-pypy3"))
    with pytest.raises(servers.InterpreterError, match=r"\./dev bench load"):
        servers.find_python("pypy")
    assert servers.require_gateway_python(sys.executable) == sys.executable


def test_stalls_are_charged_to_their_tasks_less_gc_jit_and_preemption() -> None:
    threshold = 0.001
    stalls = [
        # time, wall, thread CPU, GC inside, JIT inside, task, where the step ended
        [5.0, 0.004, 0.0035, 0.0, 0.0, "sinks.aws.sink.StreamSink._call", "aws/sink.py:1 _call"],
        [5.1, 0.006, 0.006, 0.0055, 0.0, "sinks.aws.sink.StreamSink._call", "aws/sink.py:2 _call"],  # GC's
        [5.15, 0.008, 0.008, 0.0, 0.0075, "sinks.aws.sink.StreamSink._call", "aws/sink.py:3 _call"],  # JIT's
        [5.2, 0.009, 0.0002, 0.0, 0.0, "gateway.server.Gateway._run_connection", "x:1 y"],  # preempted
        [5.3, 0.002, 0.002, 0.0, 0.0, "gateway.access.control.AccessControl._flush_loop", "z:1 w"],
        [9.5, 0.050, 0.050, 0.0, 0.0, "sinks.aws.sink.StreamSink._call", "outside the window"],
    ]
    compiled = [
        # time, task whose step it was in, kind, where the trace starts, operations
        [5.0, "sinks.aws.sink.StreamSink._call", "bridge", "aws/sink.py:500 _call", 40],
        [5.5, "sinks.aws.sink.StreamSink._call", "loop", "aws/sink.py:500 _call", 400],
        [6.0, "", "loop", "trio/_run.py:2000 unrolled_run", 900],
        [9.0, "sinks.aws.sink.StreamSink._call", "bridge", "outside the window", 40],
    ]
    probe = {"stalls": {"threshold_s": threshold, "steps": 1000, "dropped": 0, "stalls": stalls,
                        "compiled": compiled}}
    summary = report.stall_summary(probe, (2.0, 8.0))
    assert summary is not None
    assert summary["compiled"]["sink"] == {"loops": 1, "bridges": 1, "starts": [("aws/sink.py:500 _call", 2)]}
    assert summary["compiled"]["between steps"]["loops"] == 1
    sink, connection, access = (summary["groups"][g] for g in ("sink", "connection", "access"))
    assert (sink["stalls"], sink["without_gc"], sink["with_jit"]) == (3, 1, 1)
    assert sink["max_without_gc_s"] == pytest.approx(0.0035)
    assert sink["max_jit_s"] == pytest.approx(0.0075)
    assert sink["tasks"] == [("aws/sink.py:1 _call", 1)]
    assert (connection["stalls"], connection["without_gc"]) == (1, 0)
    assert access["without_gc"] == 1
    text = report.details([{"name": "sluice-pypy-seed-open", "stalls": summary, "heap": None}])
    assert "| sink | 3 | 8.00 | 1 | 7.50 | 1 | 3.50 | aws/sink.py:1 _call ×1 |" in text


def test_each_slow_request_is_charged_to_what_held_the_loop_meanwhile() -> None:
    stalls = [
        # time (end), wall, thread CPU, GC inside, JIT inside, task, where the step ended
        [10.010, 0.008, 0.008, 0.0, 0.007, "sinks.aws.sink.StreamSink._call", "a:1 b"],  # JIT
        [20.010, 0.009, 0.001, 0.0, 0.0, "gateway.server.Gateway.handle_connection", "c:1 d"],  # preempted
        [30.010, 0.006, 0.006, 0.001, 0.0, "sinks.aws.sink.StreamSink._call", "e:1 f"],  # its code
        [40.010, 0.006, 0.006, 0.005, 0.0, "gateway.server.Gateway.handle_connection", "g:1 h"],
    ]
    pauses = [
        [40.009, 0.005, 5.0, 1.0, 0.005],  # inside the last step: counted once
        [50.006, 0.005, 0.0, 1.0, 0.005],  # between steps
        [60.006, 0.0005, 0.0, 1.0, 0.0005],  # too short to count
    ]
    slow = [[10.0, 0.012, 1024], [20.0, 0.011, 1024], [30.0, 0.011, 1024], [40.0, 0.011, 1024],
            [50.0, 0.011, 1024], [60.0, 0.011, 1024], [70.0, 0.030, 900000]]
    case = {"load": {"slow_requests": slow}, "stall_log": stalls, "gc_pauses": pauses}
    summary = report.slow_summary(case)
    assert summary is not None
    assert summary["count"] == 7 and summary["longest_s"] == pytest.approx(0.030)
    assert dict(summary["causes"]) == {"jit": 1, "preempted": 1, "code:sink": 1, "gc": 2, "none": 2}
    assert report.slow_summary({"load": {}}) is None  # a generator that lists none
    text = report.details([{"name": "sluice-pypy-seed-open", "stalls": {"groups": {}, "steps": 0,
                                                                        "threshold_s": 0.001},
                            "heap": None, "slow": summary}])
    assert "7 requests (longest 30.00 ms)" in text


def test_stall_documents_without_jit_time_still_read() -> None:
    stalls = [[5.0, 0.004, 0.0035, 0.0, "sinks.aws.sink.StreamSink._call", "aws/sink.py:1 _call"]]
    probe = {"stalls": {"threshold_s": 0.001, "steps": 10, "dropped": 0, "stalls": stalls}}
    sink = report.stall_summary(probe, (0.0, 10.0))["groups"]["sink"]
    assert (sink["stalls"], sink["without_gc"], sink["with_jit"]) == (1, 1, 0)


def test_the_stall_instrument_records_jit_time_inside_a_step() -> None:
    clock = iter([0.0, 0.003]).__next__
    instrument = stalls.StallInstrument(lambda: 0.0, jit_seconds=clock)
    task = types.SimpleNamespace(name="sinks.aws.sink.StreamSink._call", coro=None)
    instrument._clock = iter([1.0, 1.005]).__next__
    instrument.before_task_step(task)
    instrument._on_compiled(types.SimpleNamespace(type="bridge", operations=[]))
    instrument.after_task_step(task)
    instrument._on_compiled(types.SimpleNamespace(type="loop", operations=[]))
    assert [row[1:4] for row in instrument.compiled] == [
        ["sinks.aws.sink.StreamSink._call", "bridge", "?"], ["", "loop", "?"]]
    (row,) = instrument.document()["stalls"]
    assert row[1] == pytest.approx(0.005) and row[4] == pytest.approx(0.003)
    assert row[5:] == ["sinks.aws.sink.StreamSink._call", "(finished)"]


def test_loop_time_is_added_up_per_task_over_the_window() -> None:
    task = "gateway.server.Gateway.handle_connection"
    probe = {"marks": [
        {"busy": {task + " @ http/transport.py:119 send_all": [1.0, 10]}},
        {"busy": {task + " @ http/transport.py:119 send_all": [3.0, 30],
                  task + " @ http/transport.py:114 wait_readable": [0.5, 5],
                  "sinks.aws.sink.StreamSink._call @ (finished)": [0.25, 2]}},
    ]}
    rows = report._busy(probe, (0.0, 10.0))
    assert rows[0] == (task + " @ http/transport.py:119 send_all", 2.0, 20)
    assert report.busy_by_task(rows) == [(task, 2.5, 25), ("sinks.aws.sink.StreamSink._call", 0.25, 2)]


@pytest.mark.skipif(sys.implementation.name != "pypy", reason="PyPy finalizes cffi objects")
def test_census_names_the_cffi_objects_alive() -> None:
    import cffi

    from bench.load import heap

    ffi = cffi.FFI()
    held = [ffi.from_buffer(memoryview(bytearray(100 + n))) for n in range(50)]
    census = heap.census()
    kinds = dict(census["top_cdata"])
    assert kinds.get("<cdata 'char[]' buffer len N from 'memoryview' object>", 0) >= len(held)


def test_census_counts_a_proxy_whose_referent_died() -> None:
    import gc
    import weakref

    from bench.load import heap

    class Referent:
        pass

    thing = Referent()
    proxy = weakref.proxy(thing)
    del thing
    gc.collect()
    with pytest.raises(ReferenceError):
        proxy.__class__  # noqa: B018 - what the census must not do
    census = heap.census()
    assert census["weakrefs"] >= 1


class _Waiting:
    def __await__(self):
        yield


async def _parked_wait() -> None:
    await _Waiting()


class _Survivor:
    pass


def test_young_census_lists_what_was_born_since_the_snapshot_and_lives() -> None:
    from bench.load import heap

    before = heap.snapshot()
    kept = [_Survivor() for _ in range(300)]
    parked = [_parked_wait() for _ in range(40)]
    for coroutine in parked:
        coroutine.send(None)  # suspended in its await, like a waiting task
    young = heap.young(before)
    types = dict(young["top_types"])
    assert types[__name__ + "._Survivor"] == len(kept)
    assert dict(young["top_code"])["coroutine tests/test_load_harness.py:_parked_wait"] == len(parked)
    assert young["new"] >= len(kept) + len(parked)
    for coroutine in parked:
        coroutine.close()
    text = report.details([{"name": "case", "stalls": None, "heap": None, "young": dict(young, span_s=0.5)}])
    assert "objects born in 0.5 s and still alive" in text and "_Survivor 300" in text
