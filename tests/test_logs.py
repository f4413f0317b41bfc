"""Structured logs: the line formats, the sampled access log, and the events a gateway writes."""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
from typing import List, Optional

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from gateway.config.settings import from_args
from gateway.observe import logs
from gateway.server import Gateway, open_listener
from sinks.base import Sink, health_reporter
from tests.support import gateway as _support
from tests.support.gateway import START_TIMEOUT, http_post, log_events
from tests.support.redis import free_port

start_gateway = _support.start_gateway

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def captured():
    """Events written in this process go to a StringIO for the test's duration."""
    stream = io.StringIO()
    logs.configure(stream=stream)
    try:
        yield stream
    finally:
        logs.configure()


# -- line formats ---------------------------------------------------------------


def test_json_line(captured):
    logs.emit("sink_ready", sink="file", reason="writing again", count=2, ok=True, nothing=None)
    line = captured.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    doc = json.loads(line)
    assert list(doc) == ["ts", "level", "event", "sink", "reason", "count", "ok", "nothing"]
    assert TS.match(doc["ts"]) and (doc["level"], doc["event"]) == ("info", "sink_ready")
    assert (doc["count"], doc["ok"], doc["nothing"]) == (2, True, None)


def test_multi_line_fields_stay_on_one_line(captured):
    logs.emit("internal_error", level="error", traceback='Traceback:\n  File "x"\nValueError: "q"\n')
    (line,) = captured.getvalue().splitlines()
    assert json.loads(line)["traceback"].endswith('ValueError: "q"\n')


def test_text_format():
    stream = io.StringIO()
    logs.configure(log_format="text", stream=stream)
    try:
        logs.emit("stopping", signal="SIGTERM", connections=3, reason="a b", detail={"k": 1})
        logs.emit("stopped")
    finally:
        logs.configure()
    first, second = stream.getvalue().splitlines()
    ts, level, event, rest = first.split(" ", 3)
    assert TS.match(ts) and (level, event) == ("info", "stopping")
    assert rest == 'signal=SIGTERM connections=3 reason="a b" detail={"k":1}'
    assert second.split(" ")[1:] == ["info", "stopped"]


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        logs.configure(log_format="xml")


def test_an_unwritable_stream_loses_the_line_not_the_gateway():
    stream = io.StringIO()
    stream.close()
    logs.configure(stream=stream)
    try:
        logs.emit("stopped")
    finally:
        logs.configure()


def test_sink_health_events(captured):
    report = health_reporter(logs.emit)
    report("kinesis", False, "cannot deliver to logs: AccessDeniedException")
    report("kinesis", True, "delivering to logs again")
    down, up = log_events(captured.getvalue())
    assert (down["event"], down["level"], down["sink"]) == ("sink_not_ready", "error", "kinesis")
    assert down["reason"] == "cannot deliver to logs: AccessDeniedException"
    assert (up["event"], up["level"], up["reason"]) == ("sink_ready", "info", "delivering to logs again")


# -- the sampled access log ------------------------------------------------------------


def test_rate_1_logs_every_request(captured):
    access = logs.AccessLog(1.0)
    for n in range(5):
        access.request(b"POST", b"/v1/logs", 202, n, 0.0)
    access.request(None, None, 431, None, None)
    events = log_events(captured.getvalue(), "access")
    assert [(e["method"], e["path"], e["status"], e["bytes"]) for e in events] == [
        ("POST", "/v1/logs", 202, n) for n in range(5)] + [(None, None, 431, None)]
    assert all(e["duration"] >= 0 for e in events[:5]) and events[5]["duration"] is None


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, float("nan")])
def test_rates_out_of_range(rate):
    with pytest.raises(ValueError):
        logs.AccessLog(rate)


@given(rate=st.floats(min_value=1e-6, max_value=1.0), seed=st.integers(0, 2**32))
def test_gaps_are_whole_requests(rate, seed):
    access = logs.AccessLog(rate, random.Random(seed))
    for _ in range(50):
        gap = access._gap()
        assert gap >= 1 and isinstance(gap, int)


@pytest.mark.parametrize("rate", [0.5, 0.1, 0.01])
def test_about_rate_of_the_requests_are_logged(captured, rate):
    access = logs.AccessLog(rate, random.Random(7))
    requests = 20000
    for _ in range(requests):
        access.request(b"GET", b"/healthz", 200, None, 0.0)
    logged = len(captured.getvalue().splitlines())
    # Binomial: mean requests x rate; five standard deviations either side.
    mean = requests * rate
    assert abs(logged - mean) < 5 * (mean * (1 - rate)) ** 0.5 + 1


# -- what a gateway writes --------------------------------------------------------------


def test_startup_and_shutdown_events(start_gateway):
    gateway = start_gateway("--sink", "null")
    started = gateway.started
    assert started["level"] == "info" and started["url"] == "http://127.0.0.1:%d" % gateway.port
    assert started["sink"] == "null" and started["tls"] is False
    assert started["access"] == "access control off (no --redis)"
    assert started["interpreter"].startswith(("CPython 3.", "PyPy 7."))
    assert started["pid"] == gateway.pid
    assert started["config"]["listen"] == "127.0.0.1:0" and started["config"]["sink"] == "null"
    assert http_post(gateway.address, b"one")[0] == 202
    assert gateway.stop() == 0
    # (A test run as root also gets the running_as_root warning after "started".)
    names = [e["event"] for e in gateway.events() if e["event"] != "running_as_root"]
    assert names == ["started", "stopping", "stopped"]  # nothing per request
    stopped = gateway.events("stopped")[0]
    assert (stopped["requests"], stopped["accepted"], stopped["internal_errors"]) == (1, 1, 0)


def test_sampled_access_log(start_gateway):
    gateway = start_gateway("--sink", "null", "--access-log-sample", "1", "--max-body", "10")
    assert http_post(gateway.address, b"0123456789")[0] == 202
    assert http_post(gateway.address, b"01234567890")[0] == 413
    assert gateway.stop() == 0  # every event written
    accepted, refused = gateway.events("access")
    assert {k: accepted[k] for k in ("method", "path", "status", "bytes")} == {
        "method": "POST", "path": "/v1/logs", "status": 202, "bytes": 10}
    assert refused["status"] == 413 and refused["bytes"] == 11
    assert 0 <= accepted["duration"] < 60


def test_startup_event_masks_the_redis_password(start_gateway):
    # Nothing listens there: the gateway starts anyway and says Redis is down.
    url = "redis://:pa55word@127.0.0.1:%d/0" % free_port()
    gateway = start_gateway("--redis", url, "--sink", "null")
    masked = "redis://***@127.0.0.1:%d/0" % int(url.rsplit(":", 1)[1].split("/")[0])
    assert gateway.started["config"]["redis"] == masked and masked in gateway.started["access"]
    assert gateway.stop() == 0
    assert "pa55word" not in gateway.stderr
    (down,) = gateway.events("redis_down")
    assert down["level"] == "error" and down["detail"].startswith("Redis unreachable")


def test_text_format_gateway(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--listen", "127.0.0.1:0",
                             "--sink", "null", "--log-format", "text", "--workers", "1"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    lines: List[str] = []
    listening = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            lines.append(raw.decode())
            if " started " in lines[-1]:
                listening.set()
        listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert listening.wait(START_TIMEOUT), lines
        match = re.search(r" url=http://127\.0\.0\.1:(\d+) ", lines[0])
        assert match, lines
        assert http_post(("127.0.0.1", int(match.group(1))), b"t")[0] == 202
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(START_TIMEOUT) == 0
        reader.join(START_TIMEOUT)
    lines = [line for line in lines if line.split(" ")[2] != "running_as_root"]  # a test run as root
    assert [line.split(" ")[2] for line in lines] == ["started", "stopping", "stopped"], lines
    assert " sink=null " in lines[0] and lines[1].split(" ")[3] == "signal=SIGTERM"


class BrokenSink(Sink):
    """A sink with a bug: every put raises something that is not a RequestError."""

    name = "broken"

    async def put(self, record):
        raise ZeroDivisionError("a bug in the sink")


async def test_internal_error_event_carries_the_traceback(captured):
    config = from_args(["--listen", "127.0.0.1:0", "--sink", "null"], {})
    gateway: Optional[Gateway] = None
    gateway = Gateway(config, BrokenSink(lambda slot: gateway.ring.release(slot)))
    listener = await open_listener(*config.listen)
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(gateway.serve, [listener]))[1]
        with pytest.raises(http.client.RemoteDisconnected):  # dropped without an answer
            await trio.to_thread.run_sync(http_post, ("127.0.0.1", port), b"boom")
        gateway.drain()
    (event,) = log_events(captured.getvalue(), "internal_error")
    assert event["level"] == "error" and event["error"] == "ZeroDivisionError('a bug in the sink')"
    assert "Traceback (most recent call last)" in event["traceback"]
    assert "raise ZeroDivisionError" in event["traceback"]
    assert gateway.internal_errors == 1 and gateway.ring.live == 0


def test_event_limiter_lets_one_event_an_interval_through_with_the_count() -> None:
    limiter = logs.EventLimiter(60.0)
    assert [limiter.due(t) for t in (0.0, 1.0, 59.9, 60.0, 61.0, 200.0)] == [1, 0, 0, 3, 0, 2]
