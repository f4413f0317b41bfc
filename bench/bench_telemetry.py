"""What the gateway's telemetry costs per request and per GC event."""

from __future__ import annotations

from gateway.observe.telemetry import GC_PAUSE_BOUNDS, Histogram, Telemetry


def test_histogram_add(benchmark) -> None:
    h = Histogram(GC_PAUSE_BOUNDS)
    benchmark(h.add, 0.0007)
    assert h.count >= 1


def test_request_stages(benchmark) -> None:
    """The two calls the server makes per accepted record."""
    t = Telemetry()

    def record() -> None:
        t.ingested(1.0, 1.0001, 1.00015, 4096)
        t.answered(202, 1.0, 1.00015, 1.0002)

    benchmark(record)
    assert t.stages.total.count >= 1
