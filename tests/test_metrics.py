"""GET /metrics (gateway/observe/metrics.py): Prometheus text exposition of the gateway's counters.

Three layers: the counting and the multiprocess file format with plain
values (a property test merges what several writers wrote the way a scrape
does); the per-request counting path under tracemalloc (CPython); and real
gateways scraped over real sockets after real traffic (file and null sinks,
access control with a real Redis, the Kinesis sink against moto and against
the fault-injecting endpoint, two ``sluice serve`` processes sharing one
metrics directory).  Expositions are read back with prometheus-client's own
parser.
"""

from __future__ import annotations

import concurrent.futures
import gc
import os
import platform
import sys
import tempfile
import time
import uuid
from typing import Dict, Iterable, List, Optional, Tuple

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

import gateway
from gateway.access import keystore
from gateway.config.settings import ConfigError, from_args
from gateway.observe.metrics import (
    FAMILIES,
    Family,
    MultiprocessWriter,
    configure,
    mark_process_dead,
    metric_families,
    prepare_directory,
)
from gateway.observe.telemetry import OTHER, ROUTES, STATUSES, Histogram, RequestCounts, Telemetry
from tests.support import gateway as _support
from tests.support.access import post as post_with_key
from tests.support.access import wait_until
from tests.support.gateway import RawConnection, gateway_in_process, get_request, post_request
from tests.support.kinesis import (  # noqa: F401 - fixtures
    Plan,
    aws_env_fixture,
    fault_server_fixture,
    moto_fixture,
)
from tests.support.redis import running_redis
from tests.support.sinks import envelope_len, post
from tests.support.units import get as get_bytes
from tests.support.units import make_gateway, serve
from tests.support.units import post as post_bytes

start_gateway = _support.start_gateway

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPYTHON = platform.python_implementation() == "CPython"
#: A scrape answered by one process sees another's counts at most one
#: publication interval (1 s) old; this is the bound for waiting on them.
SETTLE_TIMEOUT = 15.0
#: For ``sluice serve`` children: the nursery size it would pick on PyPy
#: itself, given up front so that it does not restart to set it.
CHILD_ENV = {"PYPY_GC_NURSERY": "4MB"}


# -- reading an exposition ----------------------------------------------------------


class Scrape:
    """One exposition, parsed by prometheus-client; samples looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, name: str) -> List[Tuple[Dict[str, str], float]]:
        return [(s.labels, s.value) for f in self.families.values() for s in f.samples if s.name == name]

    def value(self, name: str, **labels: str) -> Optional[float]:
        """The sample ``name`` whose labels include ``labels``; None if there is none."""
        found = [v for have, v in self.samples(name) if all(have.get(k) == w for k, w in labels.items())]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None


def scrape(address: Tuple[str, int]) -> Scrape:
    """GET /metrics on a fresh connection; checks status and content type."""
    with RawConnection(address) as conn:
        conn.send(get_request("/metrics", close=True))
        response = conn.read_response()
    assert response.status == 200, response.body[:500]
    assert response.header("content-type") == CONTENT_TYPE
    return Scrape(response.body.decode("utf-8"))


async def scrape_port(port: int) -> Scrape:
    return await trio.to_thread.run_sync(scrape, ("127.0.0.1", port))


def exchange(port: int, request: bytes) -> int:
    """Send one request on a fresh connection; the answer's status."""
    with RawConnection(("127.0.0.1", port)) as conn:
        conn.send(request)
        return conn.read_response().status


def head_metrics(port: int) -> None:
    """HEAD /metrics: the GET's headers and no body."""
    with RawConnection(("127.0.0.1", port)) as conn:
        conn.send(get_request("/metrics", method="HEAD", close=True))
        head = conn.read_response(head_only=True)
        assert head.status == 200 and head.header("content-type") == CONTENT_TYPE
        assert int(head.header("content-length") or 0) > 0 and conn.read_to_end() == ([], "eof")


# -- counting without I/O ---------------------------------------------------------------


@given(st.lists(st.tuples(st.sampled_from(ROUTES + (b"/nope", b"/v1/logs/x", None)),
                          st.sampled_from(STATUSES + (302, 999)))))
def test_answers_are_counted_by_route_and_status_in_a_bounded_table(answers) -> None:
    counts = RequestCounts()
    for path, status in answers:
        counts.add(path, status)
    expected: Dict[Tuple[str, str], int] = {}
    for path, status in answers:
        route = path.decode() if path in ROUTES else OTHER
        code = str(status) if status in STATUSES else OTHER
        expected[(route, code)] = expected.get((route, code), 0) + 1
    assert {(route, code): n for route, code, n in counts.items()} == expected
    assert len(counts.items()) <= (len(ROUTES) + 1) * (len(STATUSES) + 1)


async def test_the_server_counts_every_answer_on_one_connection() -> None:
    gw, _ = make_gateway()
    pipelined = post_bytes(b"abc") + get_bytes(b"/healthz") + get_bytes(b"/readyz", b"HEAD") + \
        get_bytes(b"/metrics") + get_bytes(b"/nowhere")
    await serve(gw, [pipelined])
    assert sorted(gw.telemetry.requests.items()) == [
        ("/healthz", "200", 1), ("/metrics", "200", 1), ("/readyz", "200", 1), ("/v1/logs", "202", 1),
        (OTHER, "404", 1)]
    assert gw.telemetry.body_bytes == 3


def _collect(directory: str) -> Scrape:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return Scrape(generate_latest(registry).decode())


_COUNTER = Family("t_things", "counter", "things", ("kind",))
_SUM = Family("t_level", "gauge", "level")
_LOW = Family("t_low", "gauge", "lowest", combine="livemin")
_HIST = Family("t_seconds", "histogram", "durations")
_BOUNDS = (0.1, 1.0, 10.0)


def _samples(things: int, level: int, durations: Iterable[float]) -> list:
    hist = Histogram(_BOUNDS)
    for d in durations:
        hist.add(d)
    return [(_COUNTER, ("a",), things), (_SUM, (), level), (_LOW, (), level), (_HIST, (), hist)]


_PROCESS = st.tuples(st.integers(0, 10**9), st.integers(0, 10**6),
                     st.lists(st.floats(0.0, 100.0), max_size=20))


@settings(max_examples=30, deadline=None)
@given(st.lists(_PROCESS, min_size=1, max_size=4))
def test_a_scrape_merges_what_every_process_wrote(processes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        for i, (things, level, durations) in enumerate(processes):
            writer = MultiprocessWriter(directory, identifier=str(100 + i))
            writer.write(_samples(things, level, []))
            writer.write(_samples(things, level, durations))  # an update, as each second
            writer.close()
        merged = _collect(directory)
    everything = [d for _, _, ds in processes for d in ds]
    assert merged.value("t_things_total", kind="a") == sum(p[0] for p in processes)
    assert merged.value("t_level") == sum(p[1] for p in processes)
    assert merged.value("t_low") == min(p[1] for p in processes)
    assert merged.value("t_seconds_count") == len(everything)
    assert merged.value("t_seconds_sum") == pytest.approx(sum(everything))
    for bound in _BOUNDS:
        assert merged.value("t_seconds_bucket", le=str(bound)) == sum(1 for d in everything if d <= bound)
    # One process alone reads the same through the single-process collector.
    alone = Scrape(_render(_samples(*processes[0])))
    assert alone.value("t_things_total", kind="a") == processes[0][0]
    assert alone.value("t_seconds_count") == len(processes[0][2])


def _render(samples: list) -> str:
    class Collector:
        def collect(self):
            return metric_families(samples)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_dead_processes_keep_their_counts_but_not_their_gauges(tmp_path) -> None:
    directory = str(tmp_path)
    for identifier, things in (("1", 5), ("2", 7)):
        writer = MultiprocessWriter(directory, identifier=identifier)
        writer.write(_samples(things, 10, [0.5]))
        writer.close()
    mark_process_dead(2, directory)
    merged = _collect(directory)
    assert merged.value("t_things_total", kind="a") == 12
    assert merged.value("t_level") == 10
    assert merged.value("t_seconds_count") == 2
    # A new process that got pid 1 again continues from what the old one counted.
    writer = MultiprocessWriter(directory, identifier="1")
    writer.write(_samples(3, 4, []))
    writer.close()
    merged = _collect(directory)
    assert merged.value("t_things_total", kind="a") == 15
    assert merged.value("t_level") == 4  # gauges are the new process's own


def test_the_metrics_dir_is_emptied_only_when_it_is_sluices(tmp_path) -> None:
    from gateway.observe.metrics import DIRECTORY_MARK

    # Only multiprocess files (an earlier gateway's): adopted, marked, emptied.
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"stale")
    (directory / "gauge_livesum_2.db").write_bytes(b"stale")
    config = configure(from_args(["--metrics-dir", str(directory)], {}), {})
    assert config.metrics_dir == str(directory)
    assert sorted(os.listdir(directory)) == [DIRECTORY_MARK]
    # Marked: emptied of *.db files at every start, whatever else is there.
    (directory / "histogram_3.db").write_bytes(b"stale")
    (directory / "README").write_text("notes")
    prepare_directory(str(directory))
    assert sorted(os.listdir(directory)) == [DIRECTORY_MARK, "README"]
    # New: created and marked.
    prepare_directory(str(tmp_path / "new"))
    assert os.listdir(tmp_path / "new") == [DIRECTORY_MARK]
    # Someone else's directory (a mistyped --metrics-dir): nothing is deleted.
    other = tmp_path / "app"
    other.mkdir()
    (other / "app.db").write_bytes(b"precious")
    (other / "counter_9.db").write_bytes(b"looks like ours")
    with pytest.raises(ConfigError, match="--metrics-dir.*not Sluice's"):
        configure(from_args(["--metrics-dir", str(other)], {}), {})
    assert sorted(os.listdir(other)) == ["app.db", "counter_9.db"]


def test_a_supervisors_directory_is_joined_as_it_is(tmp_path) -> None:
    (tmp_path / "counter_1.db").write_bytes(b"a worker's")
    config = configure(from_args([], {}), {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert config.metrics_dir == str(tmp_path)
    assert os.listdir(tmp_path) == ["counter_1.db"]
    assert configure(from_args([], {}), {}).metrics_dir == ""
    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR"):
        configure(from_args([], {}), {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing")})


def test_a_failed_publication_is_reported_once_and_does_not_stop_the_gateway(tmp_path, capsys) -> None:
    import shutil

    gw, _ = make_gateway("--metrics-dir", str(tmp_path / "metrics"))
    shutil.rmtree(tmp_path / "metrics")
    (tmp_path / "metrics").write_text("a file where the directory was")
    gw.metrics.publish()
    gw.metrics.publish()
    gw.metrics.close()
    events = [line for line in capsys.readouterr().err.splitlines() if "metrics_write_failed" in line]
    assert len(events) == 1 and "metrics" in events[0]


def test_every_metric_is_documented() -> None:
    with open(os.path.join(ROOT, "docs", "operations.md"), encoding="utf-8") as readme:
        text = readme.read()
    section = text[text.index("## Metrics"):]
    for family in FAMILIES:
        assert "`%s`" % family.exposed in section, family.exposed


@pytest.mark.skipif(not CPYTHON, reason="tracemalloc is CPython-only")
def test_counting_a_request_allocates_nothing_that_stays() -> None:
    import tracemalloc

    telemetry = Telemetry()
    path, unknown = b"/v1/logs", b"/nowhere"

    def requests(count: int) -> None:
        for _ in range(count):
            # What the server calls per accepted record, and per error answer.
            telemetry.ingested(1.0, 1.0001, 1.00015, 4096, 1000)
            telemetry.answered(202, 1.0, 1.00015, 1.0002, path)
            telemetry.answered_error(unknown, 404)

    requests(1000)  # every counter past the small-int cache
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        requests(20000)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # What a request allocates (a float, a new int for a counter) is freed by
    # the next one: nothing grows with the request count.
    assert after - before <= 256, after - before
    assert peak - before <= 1024, peak - before


# -- a real gateway, scraped over a real socket ------------------------------------------


async def test_a_file_sink_gateway_reports_what_it_was_sent(tmp_path) -> None:
    sizes = [0, 1, 100, 1000, 5000]
    async with gateway_in_process(["--sink", "file"], data_dir=str(tmp_path / "data")) as (gw, port):
        answers = [await trio.to_thread.run_sync(post, port, b"x" * n) for n in sizes]
        assert [a[0] for a in answers] == [202] * len(sizes)
        for request, status in ((get_request("/healthz"), 200), (get_request("/healthz"), 200),
                                (get_request("/readyz"), 200), (get_request("/nowhere"), 404),
                                (get_request("/healthz", method="DELETE"), 405)):
            assert await trio.to_thread.run_sync(exchange, port, request) == status
        await trio.to_thread.run_sync(head_metrics, port)
        # The sink counts a write in its worker thread and releases the ring
        # slices back in the event loop: wait for both before scraping.
        await trio.to_thread.run_sync(
            wait_until, lambda: gw.sink.records == len(sizes) and gw.ring.used == 0)
        metrics = await scrape_port(port)
        stored_bytes = gw.sink.bytes
    requests = {(labels["route"], labels["status"]): value
                for labels, value in metrics.samples("sluice_http_requests_total")}
    assert requests == {("/v1/logs", "202"): 5, ("/healthz", "200"): 2, ("/readyz", "200"): 1,
                        (OTHER, "404"): 1, ("/healthz", "405"): 1, ("/metrics", "200"): 1}
    assert metrics.value("sluice_ingest_body_bytes_total") == sum(sizes)
    assert metrics.value("sluice_request_duration_seconds_count") == 5
    assert metrics.value("sluice_request_duration_seconds_sum") > 0
    for stage in ("body", "sink", "respond"):
        assert metrics.value("sluice_request_stage_duration_seconds_count", stage=stage) == 5
    assert metrics.value("sluice_ring_capacity_bytes") == 32 * 1024 * 1024
    assert metrics.value("sluice_ring_used_bytes") == 0
    assert metrics.value("sluice_sink_records_stored_total") == 5
    assert metrics.value("sluice_sink_records_given_up_total") == 0
    assert metrics.value("sluice_sink_stored_bytes_total") == stored_bytes > sum(sizes)
    assert metrics.value("sluice_sink_write_errors_total") == 0
    assert metrics.value("sluice_connections") == 1  # the scrape's own
    info = metrics.samples("sluice_build_info")
    assert info == [({"version": gateway.__version__, "interpreter": sys.implementation.name,
                      "python_version": platform.python_version()}, 1.0)]
    assert metrics.value("sluice_processes") == 1
    kinds = {labels["kind"] for labels, _ in metrics.samples("sluice_gc_pause_seconds_count")}
    assert kinds == ({"minor", "major_step"} if not CPYTHON else {"gen0", "gen1", "gen2"})
    assert metrics.value("sluice_gc_major_collection_seconds_count") is not None
    assert metrics.value("sluice_resident_memory_bytes") > 1024 * 1024
    assert metrics.samples("sluice_sink_batch_records_count") == []  # a Kinesis-only metric
    assert metrics.samples("sluice_access_decisions_total") == []  # access control is off


def test_a_sluice_serve_process_with_the_null_sink(start_gateway) -> None:
    proc = start_gateway("--sink", "null", env=CHILD_ENV)
    bodies = [b"%d" % i * (i + 1) for i in range(20)]
    with RawConnection(proc.address) as conn:
        conn.send(b"".join(post_request(body) for body in bodies))  # pipelined, one connection
        assert [conn.read_response().status for _ in bodies] == [202] * len(bodies)
    metrics = scrape(proc.address)
    assert metrics.value("sluice_http_requests_total", route="/v1/logs", status="202") == len(bodies)
    assert metrics.value("sluice_ingest_body_bytes_total") == sum(len(b) for b in bodies)
    assert metrics.value("sluice_sink_records_stored_total") == len(bodies)
    assert metrics.value("sluice_sink_stored_bytes_total") > sum(len(b) for b in bodies)
    assert metrics.value("sluice_sink_records_held") is None  # the null sink holds nothing


async def test_access_control_decisions_and_redis_round_trips(tmp_path) -> None:
    with running_redis() as server:
        admin = keystore.connect(server.url)
        try:
            good = keystore.create_key(admin, "ACME", time.time()).api_key
            slow = keystore.create_key(admin, "SLOW", time.time(), requests_per_second=0.01,
                                       burst=1).api_key
        finally:
            admin.close()
        unknown = keystore.new_api_key("ACME")
        flags = ["--sink", "null", "--redis", server.url]
        async with gateway_in_process(flags, data_dir=str(tmp_path)) as (gw, port):
            address = ("127.0.0.1", port)
            statuses = []
            for key in (good, good, good, None, "sluice1.ACME.short", unknown, slow, slow):
                answer = await trio.to_thread.run_sync(post_with_key, address, b"record", key)
                statuses.append(answer.status)
            metrics = await scrape_port(port)
    assert statuses == [202, 202, 202, 401, 401, 401, 202, 429]
    decisions = {labels["outcome"]: value
                 for labels, value in metrics.samples("sluice_access_decisions_total")}
    assert decisions == {"admitted": 4, "admitted_local": 0, "missing_key": 1, "malformed_key": 1,
                         "unknown_key": 1, "revoked_key": 0, "tenant_disabled": 0, "rate_limited": 1,
                         "quota_exceeded": 0, "unavailable": 0}
    assert metrics.value("sluice_http_requests_total", route="/v1/logs", status="401") == 3
    assert metrics.value("sluice_http_requests_total", route="/v1/logs", status="429") == 1
    batches = metrics.value("sluice_redis_batch_duration_seconds_count")
    assert batches is not None and batches >= 1
    assert metrics.value("sluice_redis_pipelines_total") >= batches
    assert metrics.value("sluice_redis_batch_duration_seconds_sum") > 0
    assert metrics.value("sluice_redis_up") == 1
    assert metrics.value("sluice_redis_failures_total") == 0


@pytest.fixture
def stream(moto, aws_env):
    aws_env(moto.key, moto.secret, moto.region)
    client = moto.client("kinesis")
    name = "m-" + uuid.uuid4().hex[:12]
    client.create_stream(StreamName=name, ShardCount=1)
    return client, name


async def test_put_records_calls_against_moto(moto, stream) -> None:
    _, name = stream
    bodies = [b"", b"a", b"b" * 100, b"c" * 1000, b"d" * 10000, b"e" * 50000]
    flags = ["--sink", "kinesis", "--stream", name, "--endpoint-url", moto.url]
    async with gateway_in_process(flags) as (gw, port):
        answers = [await trio.to_thread.run_sync(post, port, body) for body in bodies]
        metrics = await scrape_port(port)
    assert [a[0] for a in answers] == [202] * len(bodies)
    calls = metrics.value("sluice_sink_calls_total", result="ok")
    assert calls is not None and 1 <= calls <= len(bodies)
    assert metrics.value("sluice_sink_calls_total", result="failed") == 0
    assert metrics.value("sluice_sink_batch_records_count") == calls
    assert metrics.value("sluice_sink_batch_records_sum") == len(bodies)
    # Each record: envelope line, newline and body, plus its 26-character partition key.
    record_bytes = sum(envelope_len() + len(body) + 26 for body in bodies)
    assert metrics.value("sluice_sink_batch_bytes_sum") == record_bytes
    # Without aggregation: one Kinesis record per record, one payload unit
    # per started 25 KiB (the 50,000-byte body takes two).
    assert metrics.value("sluice_sink_kinesis_records_total") == len(bodies)
    assert metrics.value("sluice_sink_records_per_kinesis_record_sum") == len(bodies)
    assert metrics.value("sluice_sink_put_payload_units_total") == len(bodies) + 1
    assert metrics.value("sluice_sink_sent_bytes_total") == record_bytes
    assert metrics.value("sluice_sink_call_duration_seconds_count") == calls
    assert metrics.value("sluice_sink_call_duration_seconds_sum") > 0
    assert metrics.value("sluice_sink_records_stored_total") == len(bodies)
    assert metrics.value("sluice_sink_records_given_up_total") == 0
    assert metrics.value("sluice_sink_records_held") == 0
    assert {labels["reason"]: v for labels, v in metrics.samples("sluice_sink_retries_total")} == {
        "throttled": 0, "service_error": 0, "unreadable_answer": 0, "no_answer": 0}
    assert metrics.samples("sluice_sink_throttles_total") == []


async def test_spool_gauges_with_ack_spool(tmp_path) -> None:
    flags = ["--ack", "spool", "--spool-dir", str(tmp_path / "spool"), "--spool-size", "4MiB"]
    async with gateway_in_process(flags, data_dir=str(tmp_path / "data")) as (gw, port):
        answers = [await trio.to_thread.run_sync(post, port, b"spooled %d" % i) for i in range(3)]
        metrics = await scrape_port(port)
    assert [a[0] for a in answers] == [202] * 3
    assert metrics.value("sluice_spool_limit_bytes") == 4 * 1024 * 1024
    assert metrics.value("sluice_spool_used_bytes") > 0
    assert 0 <= metrics.value("sluice_spool_pending_records") <= 3
    # The delivering sink's own series are there too.
    assert metrics.value("sluice_sink_records_stored_total") is not None


async def test_retries_by_reason_and_throttles_by_code(fault_server, aws_env) -> None:
    aws_env()
    fake = fault_server.fake
    throttled = "ProvisionedThroughputExceededException"
    fake.fail_record = lambda data, attempt: throttled if attempt == 1 else None
    # Call 1 reaches the service and its record is throttled; call 2 gets a
    # 500, call 3 a reset connection; call 4 stores the record.
    fake.plan(Plan("slow"), Plan("status", 500, "InternalFailure"), Plan("reset"))
    flags = ["--sink", "kinesis", "--stream", "logs", "--endpoint-url", fault_server.url,
             "--call-timeout", "2s", "--linger", "5ms"]
    async with gateway_in_process(flags) as (gw, port):
        status, _, _ = await trio.to_thread.run_sync(post, port, b"retried three times")
        metrics = await scrape_port(port)
    assert status == 202
    retries = {labels["reason"]: v for labels, v in metrics.samples("sluice_sink_retries_total")}
    assert retries == {"throttled": 1, "service_error": 1, "no_answer": 1, "unreadable_answer": 0}
    assert metrics.samples("sluice_sink_throttles_total") == [({"code": throttled}, 1.0)]
    assert metrics.value("sluice_sink_calls_total", result="ok") == 2
    assert metrics.value("sluice_sink_calls_total", result="failed") == 2
    assert metrics.value("sluice_sink_records_stored_total") == 1


# -- several processes, one metrics directory -----------------------------------------------


def _logs_accepted(address: Tuple[str, int]) -> float:
    return scrape(address).value("sluice_http_requests_total", route="/v1/logs", status="202") or 0


def test_two_processes_sharing_a_metrics_dir_report_their_sum(start_gateway, tmp_path) -> None:
    directory = tmp_path / "metrics"
    prepare_directory(str(directory))  # what a supervisor does before starting its workers
    env = dict(CHILD_ENV, PROMETHEUS_MULTIPROC_DIR=str(directory))
    small = ("--sink", "null", "--max-body", "64KiB")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both start at once
        first, second = pool.map(lambda ring: start_gateway(*small, "--ring-size", ring, env=env),
                                 ("1MiB", "2MiB"))
    for proc, count in ((first, 3), (second, 5)):
        with RawConnection(proc.address) as conn:
            conn.send(b"".join(post_request(b"record %d" % i) for i in range(count)))
            assert [conn.read_response().status for _ in range(count)] == [202] * count
    for proc in (first, second):
        wait_until(lambda proc=proc: _logs_accepted(proc.address) == 8, SETTLE_TIMEOUT,
                   interval=0.2, what="both processes' counts")
    metrics = scrape(first.address)
    assert metrics.value("sluice_ingest_body_bytes_total") == sum(
        len(b"record %d" % i) for n in (3, 5) for i in range(n))
    assert metrics.value("sluice_ring_capacity_bytes") == 3 * 1024 * 1024  # summed over the living
    assert metrics.value("sluice_build_info", interpreter=sys.implementation.name) == 1
    assert metrics.value("sluice_processes") == 2
    assert metrics.value("sluice_request_duration_seconds_count") == 8
    second.stop()  # a clean exit removes its gauges; its counters stay
    metrics = scrape(first.address)
    assert metrics.value("sluice_ring_capacity_bytes") == 1024 * 1024
    assert metrics.value("sluice_processes") == 1
    assert metrics.value("sluice_http_requests_total", route="/v1/logs", status="202") == 8
    assert sorted(n.split("_")[0] for n in os.listdir(directory) if n.endswith("_%d.db" % second.pid)) \
        == ["counter", "histogram"]


def test_metrics_dir_is_emptied_when_the_gateway_starts(start_gateway, tmp_path) -> None:
    directory = tmp_path / "metrics"
    stale = MultiprocessWriter(str(directory), identifier="1")
    stale.write([(FAMILIES[0], ("/v1/logs", "202"), 1000)])
    stale.close()
    proc = start_gateway("--sink", "null", "--metrics-dir", str(directory), env=CHILD_ENV)
    status = exchange(proc.port, post_request(b"one", close=True))
    assert status == 202
    metrics = scrape(proc.address)
    assert metrics.value("sluice_http_requests_total", route="/v1/logs", status="202") == 1
    assert "counter_1.db" not in os.listdir(directory)
