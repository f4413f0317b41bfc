"""gateway.observe.telemetry: histogram math, GC pause recording, the statistics sections."""

from __future__ import annotations

import gc
import json
import sys

import pytest
import trio

from gateway.observe import telemetry
from gateway.observe.telemetry import GC_PAUSE_BOUNDS, GcPauses, Histogram, Telemetry, rss_bytes
from tests.support.units import make_gateway, parse_responses, post, serve

PYPY = sys.implementation.name == "pypy"


# -- Histogram: pure math ------------------------------------------------------

def test_values_land_in_the_bucket_of_their_upper_bound() -> None:
    h = Histogram([1.0, 2.0, 5.0])
    for value in (0.0, 0.5, 1.0, 1.5, 2.0, 4.9, 5.0, 5.1, 100.0):
        h.add(value)
    assert h.counts() == [3, 2, 2, 2]  # (.., 1], (1, 2], (2, 5], overflow
    assert h.count == 9
    assert h.total == pytest.approx(sum((0.0, 0.5, 1.0, 1.5, 2.0, 4.9, 5.0, 5.1, 100.0)))
    assert h.max == 100.0


def test_empty_histogram() -> None:
    h = Histogram([1.0])
    assert h.count == 0 and h.total == 0.0 and h.max == 0.0
    assert h.quantile(0.99) == 0.0
    snap = h.snapshot()
    assert snap["count"] == 0 and snap["mean"] == 0.0 and snap["counts"] == [0, 0]


def test_bounds_must_increase() -> None:
    for bounds in ([], [1.0, 1.0], [2.0, 1.0]):
        with pytest.raises(ValueError):
            Histogram(bounds)


def test_add_many_keeps_count_sum_and_max_exact() -> None:
    h = Histogram([1.0, 2.0, 5.0])
    h.add_many(4, 10.0, 7.0)  # the longest 7.0; the other three average 1.0
    assert h.count == 4
    assert h.total == 10.0
    assert h.max == 7.0
    assert h.counts() == [3, 0, 0, 1]


def test_add_many_of_one_is_add_and_of_none_is_nothing() -> None:
    a, b = Histogram([1.0, 2.0]), Histogram([1.0, 2.0])
    a.add_many(1, 1.5, 1.5)
    b.add(1.5)
    a.add_many(0, 0.0, 0.0)
    assert a.counts() == b.counts() and a.total == b.total and a.max == b.max


def test_quantiles_answer_the_bucket_bound_or_the_max() -> None:
    h = Histogram([1.0, 2.0, 5.0])
    for _ in range(90):
        h.add(0.5)
    for _ in range(9):
        h.add(1.5)
    h.add(9.0)
    assert h.quantile(0.0) == 1.0
    assert h.quantile(0.5) == 1.0
    assert h.quantile(0.9) == 1.0
    assert h.quantile(0.95) == 2.0
    assert h.quantile(1.0) == 9.0  # overflow bucket: the maximum
    with pytest.raises(ValueError):
        h.quantile(1.5)


def test_quantile_never_exceeds_the_max() -> None:
    h = Histogram([1.0, 10.0])
    h.add(3.0)
    assert h.quantile(0.5) == 3.0


def test_merge_adds_counts() -> None:
    a, b = Histogram([1.0, 2.0]), Histogram([1.0, 2.0])
    a.add(0.5)
    b.add(1.5)
    b.add(3.0)
    a.merge(b)
    assert a.counts() == [1, 1, 1] and a.max == 3.0 and a.total == 5.0
    with pytest.raises(ValueError):
        a.merge(Histogram([1.0]))


def test_snapshot_is_plain_json() -> None:
    h = Histogram(GC_PAUSE_BOUNDS)
    h.add(0.003)
    snap = json.loads(json.dumps(h.snapshot()))
    assert snap["count"] == 1 and snap["le"] == list(GC_PAUSE_BOUNDS)
    assert len(snap["counts"]) == len(GC_PAUSE_BOUNDS) + 1


# -- GC pauses -----------------------------------------------------------------

def _force_collection() -> None:
    # Garbage in reference cycles, so CPython's collector has work to do.
    for _ in range(1000):
        a: list = []
        a.append(a)
    gc.collect()


def test_a_forced_collection_is_recorded() -> None:
    pauses = GcPauses()
    assert pauses.install()
    try:
        _force_collection()
    finally:
        pauses.uninstall()
    stats = pauses.statistics()
    assert stats["installed"] is False
    assert stats["pauses"]["count"] >= 1
    assert stats["major"]["count"] >= 1  # gc.collect() is a full collection
    assert stats["pauses"]["max"] >= 0.0
    recent = stats["recent"]
    assert recent and all(entry["kind"] in pauses.kinds for entry in recent)
    if PYPY:
        assert stats["source"] == "gc.hooks"
        assert stats["by_kind"]["major_step"]["count"] >= 1
    else:
        assert stats["source"] == "gc.callbacks"
        assert stats["by_kind"]["gen2"]["count"] >= 1


def test_nothing_is_recorded_after_uninstall() -> None:
    pauses = GcPauses()
    pauses.install()
    pauses.uninstall()
    pauses.uninstall()  # idempotent
    _force_collection()
    assert pauses.pauses().count == 0
    assert pauses.recent() == []


def _our_hooks_installed() -> bool:
    if PYPY:
        hooks = gc.hooks  # type: ignore[attr-defined]
        return any(getattr(hooks, name) is hook for name, hook in telemetry._PYPY_HOOKS)
    return any(getattr(cb, "__self__", None).__class__ is GcPauses for cb in gc.callbacks)


def test_hooks_are_shared_and_removed_by_the_last_uninstall() -> None:
    first, second = GcPauses(), GcPauses()
    first.install()
    second.install()
    try:
        _force_collection()
        assert first.major.count >= 1 and second.major.count >= 1
        first.uninstall()
        assert _our_hooks_installed()
        before = first.major.count
        _force_collection()
        assert first.major.count == before
        assert second.major.count >= 2
    finally:
        first.uninstall()
        second.uninstall()
    assert not _our_hooks_installed()


def test_recent_pauses_keep_only_the_newest() -> None:
    pauses = GcPauses(recent=4)
    for n in range(10):
        pauses._record(0, float(n), 0.0)
    assert [entry["seconds"] for entry in pauses.recent()] == [6.0, 7.0, 8.0, 9.0]
    assert pauses.pauses().count == 10


@pytest.mark.skipif(not PYPY, reason="PyPy's gc.hooks")
def test_earlier_pypy_hooks_are_chained_and_put_back() -> None:
    hooks = gc.hooks  # type: ignore[attr-defined]
    saved = [getattr(hooks, name) for name, _ in telemetry._PYPY_HOOKS]
    seen = []

    def theirs(stats) -> None:
        seen.append(stats.count)

    hooks.on_gc_collect = theirs
    try:
        pauses = GcPauses()
        assert pauses.install()
        _force_collection()
        pauses.uninstall()
        assert pauses.major.count >= 1
        assert seen  # still called while ours were installed
        assert hooks.on_gc_collect is theirs
    finally:
        for (name, _), hook in zip(telemetry._PYPY_HOOKS, saved):
            setattr(hooks, name, hook)


def test_rss_is_read_from_proc() -> None:
    rss = rss_bytes()
    if sys.platform.startswith("linux"):
        assert rss is not None and rss > 1024 * 1024
    else:
        assert rss is None


# -- through the gateway ---------------------------------------------------------

async def test_statistics_have_every_section_after_requests() -> None:
    gateway, sink = make_gateway()
    requests = [post(b'{"n":%d}' % n) for n in range(3)]
    transport = await serve(gateway, [b"".join(requests)])
    assert [r.status for r in parse_responses(transport.sent)] == [202, 202, 202]
    stats = gateway.statistics()
    json.dumps(stats)  # plain data
    assert stats["accepted"] == 3
    for stage in ("body", "sink", "respond", "total"):
        assert stats["stages"][stage]["count"] == 3, stage
        assert stats["stages"][stage]["sum"] >= 0.0
    assert stats["stages"]["total"]["sum"] >= stats["stages"]["body"]["sum"]
    ring = stats["ring"]
    assert 0.0 <= ring["occupancy"] <= 1.0
    assert ring["peak_used"] >= len(sink.records[0])
    assert stats["rss"]["bytes"] is None or stats["rss"]["bytes"] > 0
    assert set(stats["gc"]) >= {"source", "installed", "pauses", "by_kind", "major", "recent"}
    assert stats["gc"]["installed"] is False  # handle_connection alone installs nothing


async def test_errors_and_health_checks_stay_out_of_the_stages() -> None:
    gateway, _ = make_gateway()
    await serve(gateway, [b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"])
    await serve(gateway, [post(b"x" * 2048)])  # 413
    stages = gateway.statistics()["stages"]
    assert all(stages[name]["count"] == 0 for name in ("body", "sink", "respond", "total"))


async def test_serve_installs_the_hooks_and_stopping_removes_them() -> None:
    gateway, _ = make_gateway("--listen", "127.0.0.1:0")
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        assert gateway.telemetry.gc.installed
        assert _our_hooks_installed()
        _force_collection()
        assert gateway.statistics()["gc"]["pauses"]["count"] >= 1
        gateway.drain()
    assert not gateway.telemetry.gc.installed
    assert not _our_hooks_installed()


def test_stage_marks_become_stage_latencies() -> None:
    t = Telemetry()
    t.ingested(10.0, 10.5, 10.75, ring_used=4096)
    t.answered(202, 10.0, 10.75, 11.0)
    t.answered(200, 20.0, 20.0, 21.0)  # not a record: no stage
    stages = t.stages.statistics()
    assert stages["body"]["sum"] == 0.5
    assert stages["sink"]["sum"] == 0.25
    assert stages["respond"]["sum"] == 0.25
    assert stages["total"]["sum"] == 1.0 and stages["total"]["count"] == 1
    stats = t.add_statistics({"ring": {"capacity": 8192, "used": 1024}})
    assert stats["ring"]["occupancy"] == 0.125
    assert stats["ring"]["peak_used"] == 4096
