"""What metrics cost: counting per request, and a scrape (single-process and multiprocess)."""

from __future__ import annotations

from gateway.config.settings import from_args
from gateway.observe.metrics import MultiprocessWriter
from gateway.observe.telemetry import Telemetry
from gateway.server import Gateway

SMALL = ["--sink", "null", "--ring-size", "1MiB", "--max-body", "64KiB"]
#: Workers whose files a multiprocess scrape merges.
WORKERS = 4


def _busy_gateway(*flags: str) -> Gateway:
    """A gateway (not serving) whose counters look like some traffic went through."""
    gateway = Gateway(from_args(SMALL + list(flags), {}))
    telemetry = gateway.telemetry
    for i in range(1000):
        telemetry.ingested(1.0, 1.0 + i * 1e-6, 1.0 + i * 2e-6, 4096, 1000)
        telemetry.answered(202, 1.0, 1.0 + i * 2e-6, 1.0 + i * 3e-6, b"/v1/logs")
    for path, status in ((b"/healthz", 200), (b"/readyz", 200), (b"/nowhere", 404), (b"/v1/logs", 413)):
        telemetry.answered_error(path, status)
    return gateway


def test_count_one_accepted_request(benchmark) -> None:
    """The calls the server makes for an accepted record (stages, bytes, route and status)."""
    t = Telemetry()
    path = b"/v1/logs"

    def count() -> None:
        t.ingested(1.0, 1.0001, 1.00015, 4096, 1000)
        t.answered(202, 1.0, 1.00015, 1.0002, path)

    benchmark(count)
    assert t.stages.total.count >= 1


def test_count_one_error_answer(benchmark) -> None:
    t = Telemetry()
    benchmark(t.answered_error, b"/nowhere", 404)
    assert t.requests.items()


def test_scrape_single_process(benchmark, throughput) -> None:
    """A whole scrape: read every counter, build the families, render the text."""
    gateway = _busy_gateway()
    body = benchmark(gateway.metrics.exposition)
    throughput(len(body))
    assert b"sluice_http_requests_total" in body


def test_publish_multiprocess(benchmark, tmp_path) -> None:
    """What a worker does every second: write its counters to its files."""
    gateway = _busy_gateway("--metrics-dir", str(tmp_path))
    telemetry = gateway.telemetry

    def publish() -> None:
        telemetry.answered(202, 1.0, 1.0001, 1.0002, b"/v1/logs")  # something changed
        gateway.metrics.publish()

    try:
        benchmark(publish)
    finally:
        gateway.metrics.close()


def test_scrape_multiprocess(benchmark, throughput, tmp_path) -> None:
    """A scrape merging the files of ``WORKERS`` processes."""
    gateway = _busy_gateway("--metrics-dir", str(tmp_path))
    samples = gateway.metrics.samples()
    for worker in range(1, WORKERS):
        writer = MultiprocessWriter(str(tmp_path), identifier="9999%d" % worker)
        writer.write(samples)
        writer.close()
    try:
        body = benchmark(gateway.metrics.exposition)
        throughput(len(body), workers=WORKERS)
    finally:
        gateway.metrics.close()
    assert b"sluice_http_requests_total" in body
