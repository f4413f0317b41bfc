"""AccessControl against real Redis: batching, caches, outages, the cluster."""

from __future__ import annotations

import statistics
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterator, List

import pytest
import trio

from gateway.access import keystore
from gateway.access.control import DOWN, OK, AccessConfig, AccessControl
from gateway.access.keystore import RedisEdge
from gateway.access.limiter import check_call, decide, parse_api_key
from gateway.errors import (
    AccessUnavailable,
    Forbidden,
    QuotaExceeded,
    RateLimited,
    Unauthorized,
)
from sinks.backoff import Retry
from tests.support.redis import (  # noqa: F401
    RedisClusterNodes,
    RedisServer,
    redis_cluster,
    redis_server,
    running_tls_redis,
)


class Clock:
    """The wall clock AccessControl sees; tests move it by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[Any]:  # noqa: F811
    client = keystore.connect(redis_server.url)
    yield client
    client.close()


@asynccontextmanager
async def running(url: str, clock: Callable[[], float] = time.time,
                  **options: Any) -> AsyncIterator[AccessControl]:
    # These tests are about the exact mode's batches and caches; leases are
    # tested in test_access_lease.py.
    options.setdefault("admission", "exact")
    access = AccessControl(AccessConfig(redis_url=url, **options), clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(access.run)
        yield access
        nursery.cancel_scope.cancel()


async def wait_for_state(access: AccessControl, state: str, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while access.redis_state != state:
            await trio.sleep(0.01)


def evalsha_calls(server: RedisServer) -> int:
    stats: Any = server.client().info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.trio
async def test_answers(redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    clock = Clock()
    key = keystore.create_key(admin, "ACME", 0, requests_per_second=1, burst=2,
                              monthly_bytes=1000).api_key.encode()
    async with running(redis_server.url, clock) as access:
        assert access.redis_state == OK and access.ready
        for missing in (None, b""):
            with pytest.raises(Unauthorized):
                await access.check(missing, 1)
        with pytest.raises(Unauthorized):
            await access.check(b"Bearer nonsense", 1)
        with pytest.raises(Unauthorized) as unknown:
            await access.check(keystore.new_api_key("ACME").encode(), 1)
        assert b"sluice1" not in repr(unknown.value).encode()
        admitted = await access.check(key, 100)
        assert (admitted.tenant, admitted.limit, admitted.remaining, admitted.source) == (
            "ACME", 2, 1, "redis")
        await access.check(key, 100)
        with pytest.raises(RateLimited) as limited:
            await access.check(key, 100)
        assert limited.value.retry_after == pytest.approx(1.0, abs=1e-5)
        assert (limited.value.limit, limited.value.remaining) == (2, 0)
        clock.now += 10
        with pytest.raises(QuotaExceeded) as quota:
            await access.check(key, 900)
        assert quota.value.quota == "monthly_bytes"
        assert quota.value.resets_at == 1_701_388_800  # 2023-12-01T00:00:00Z
        keystore.set_enabled(admin, "ACME", False)
        other = keystore.create_key(admin, "ACME", 0).api_key.encode()
        with pytest.raises(Forbidden):
            await access.check(other, 1)
        stats = access.statistics()
        assert stats.checks == 9 and stats.admitted == 2 and stats.refused == 7


@pytest.mark.trio
async def test_concurrent_checks_share_pipelines(redis_server: RedisServer,  # noqa: F811
                                                 admin: Any) -> None:
    keys = [keystore.create_key(admin, "T%d" % (i % 10), 0).api_key.encode()
            for i in range(50)]
    n = 1000
    # The timeout is generous: a cold PyPy needs a while for 1000 tasks.
    async with running(redis_server.url, check_timeout=5.0) as access:
        before = evalsha_calls(redis_server)
        admitted: List[str] = []

        async def one(i: int) -> None:
            admitted.append((await access.check(keys[i % len(keys)], 10)).tenant)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        stats = access.statistics()
    assert len(admitted) == n
    # Checks of one key in one pipeline go as one script call.
    assert stats.redis_checks == evalsha_calls(redis_server) - before <= n
    assert stats.pipelines <= n / 20, stats  # measured: 4-10 pipelines for 1000 checks
    assert keystore.get_usage(admin, "T3", time.time()).records == n // 10


@pytest.mark.trio
async def test_checks_of_one_key_together_get_what_they_would_alone(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    # Burst 10: of 30 concurrent requests exactly 10 pass, as one by one;
    # the group of 30 is refused as a whole and asked again singly.
    clock = Clock()
    key = keystore.create_key(admin, "BURST", 0, requests_per_second=1, burst=10).api_key.encode()
    async with running(redis_server.url, clock, check_timeout=5.0) as access:
        outcomes: List[str] = []

        async def one() -> None:
            try:
                await access.check(key, 100)
                outcomes.append("ok")
            except RateLimited:
                outcomes.append("limited")

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(one)
        stats = access.statistics()
    assert outcomes.count("ok") == 10
    assert outcomes.count("limited") == 20
    assert keystore.get_usage(admin, "BURST", clock.now).records == 10
    assert stats.redis_checks < 30 + 30


@pytest.mark.trio
async def test_low_load_waits_about_one_round_trip(redis_server: RedisServer,  # noqa: F811
                                                   admin: Any) -> None:
    key = keystore.create_key(admin, "ACME", 0).api_key.encode()
    async with running(redis_server.url) as access:
        for _ in range(50):  # warm up threads, connections and the JIT
            await access.check(key, 1)
        waits = []
        for _ in range(100):
            start = trio.current_time()
            await access.check(key, 1)
            waits.append(trio.current_time() - start)
        assert access.statistics().pipelines == 150
    # Measured 0.3-0.6 ms; the bound leaves room for a busy CI machine.
    assert statistics.median(waits) < 0.01, statistics.median(waits)


@pytest.mark.trio
async def test_refusals_are_cached(redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    clock = Clock()
    key = keystore.create_key(admin, "ACME", 0, requests_per_second=1, burst=1).api_key
    unknown = keystore.new_api_key("ACME").encode()
    async with running(redis_server.url, clock, key_cache_ttl=5.0) as access:
        await access.check(key.encode(), 1)
        with pytest.raises(RateLimited):
            await access.check(key.encode(), 1)
        sent = access.statistics().redis_checks
        for i in range(20):
            clock.now += 0.04
            with pytest.raises(RateLimited) as limited:
                await access.check(key.encode(), 1)
            assert limited.value.retry_after == pytest.approx(1 - 0.04 * (i + 1), abs=1e-5)
        for _ in range(5):
            with pytest.raises(Unauthorized):
                await access.check(unknown, 1)
        stats = access.statistics()
        assert stats.redis_checks == sent + 1
        assert (stats.refusal_cache_hits, stats.key_cache_hits) == (20, 4)
        clock.now += 0.25
        await access.check(key.encode(), 1)  # the throttle has passed

        keystore.set_enabled(admin, "ACME", False)
        clock.now += 1
        with pytest.raises(Forbidden):
            await access.check(key.encode(), 1)
        keystore.set_enabled(admin, "ACME", True)
        with pytest.raises(Forbidden):  # cached for key_cache_ttl
            await access.check(key.encode(), 1)
        clock.now += 5
        await access.check(key.encode(), 1)
        keystore.revoke_key(admin, key, 0)
        clock.now += 1
        with pytest.raises(Unauthorized):  # valid keys are checked in Redis each time
            await access.check(key.encode(), 1)


@pytest.mark.trio
async def test_fail_closed_and_recover(redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    key = keystore.create_key(admin, "ACME", 0).api_key.encode()
    redis_server.save()
    async with running(redis_server.url, check_timeout=0.3, backoff_initial=0.02,
                       backoff_max=0.1) as access:
        await access.check(key, 1)
        redis_server.kill()
        for _ in range(3):
            start = trio.current_time()
            with pytest.raises(AccessUnavailable) as unavailable:
                await access.check(key, 1)
            assert trio.current_time() - start < 0.5
        assert unavailable.value.status == 503
        assert (b"retry-after", b"1") in unavailable.value.headers()
        assert access.redis_state == DOWN and not access.ready
        redis_server.start()  # a new process: no scripts loaded
        await wait_for_state(access, OK)
        assert (await access.check(key, 1)).source == "redis"
        stats = access.statistics()
        assert stats.unavailable == 3 and stats.redis_failures >= 1 and stats.script_loads >= 2


@pytest.mark.trio
async def test_fail_open_admits_known_keys_and_hands_back_usage(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    clock = Clock(time.time())
    key = keystore.create_key(admin, "ACME", 0, requests_per_second=10,
                              burst=10).api_key.encode()
    never_seen = keystore.create_key(admin, "ACME", 0).api_key.encode()
    async with running(redis_server.url, clock, on_redis_failure="open", instance_count=2,
                       check_timeout=0.3, backoff_initial=0.02, backoff_max=0.1) as access:
        assert (await access.check(key, 100)).source == "redis"
        redis_server.save()
        redis_server.kill()
        sources = [(await access.check(key, 100)).source for _ in range(5)]
        assert sources == ["local"] * 5  # half the burst of 10
        assert access.redis_state == DOWN and access.ready
        with pytest.raises(RateLimited):
            await access.check(key, 100)
        with pytest.raises(AccessUnavailable):  # never confirmed by Redis
            await access.check(never_seen, 100)
        assert access.statistics().pending_usage_records == 5
        redis_server.start()
        await wait_for_state(access, OK)
        with trio.fail_after(5):
            while access.statistics().pending_usage_records:
                await trio.sleep(0.01)
    usage = keystore.get_usage(admin, "ACME", clock.now)
    assert (usage.records, usage.bytes) == (6, 600)


@pytest.mark.trio
async def test_stalled_redis_costs_at_most_the_check_timeout(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    key = keystore.create_key(admin, "ACME", 0).api_key.encode()
    async with running(redis_server.url, check_timeout=0.2, socket_timeout=0.5,
                       backoff_initial=0.02, backoff_max=0.1) as access:
        await access.check(key, 1)
        redis_server.pause()
        try:
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(_expect_unavailable, access, key)
            assert trio.current_time() - start < 0.6  # 0.2 s each, all at once
            assert access.redis_state == DOWN
        finally:
            redis_server.resume()
        await wait_for_state(access, OK)
        await access.check(key, 1)
        assert access.statistics().timeouts >= 1


@pytest.mark.trio
async def test_open_mode_does_not_count_twice_what_a_slow_redis_counted(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    key = keystore.create_key(admin, "ACME", 0).api_key.encode()
    async with running(redis_server.url, on_redis_failure="open", check_timeout=0.2,
                       socket_timeout=3.0, backoff_initial=0.02, backoff_max=0.1) as access:
        await access.check(key, 10)
        redis_server.pause()
        try:
            assert (await access.check(key, 10)).source == "local"
            assert access.statistics().pending_usage_records == 1
        finally:
            redis_server.resume()
        await wait_for_state(access, OK)
        with trio.fail_after(5):  # the late reply takes the local count back
            while access.statistics().pending_usage_records:
                await trio.sleep(0.01)
    assert keystore.get_usage(admin, "ACME", time.time()).records == 2


async def _expect_unavailable(access: AccessControl, key: bytes) -> None:
    with pytest.raises(AccessUnavailable):
        await access.check(key, 1)


@pytest.mark.trio
async def test_script_flush_while_running(redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    key = keystore.create_key(admin, "ACME", 0).api_key.encode()
    async with running(redis_server.url) as access:
        await access.check(key, 1)
        loads = access.statistics().script_loads
        admin.script_flush()
        await access.check(key, 1)
        assert access.statistics().script_loads == loads + 1
        await access.check(key, 1)
        assert access.statistics().script_loads == loads + 1


def test_config_and_backoff_are_checked_values() -> None:
    with pytest.raises(ValueError):
        AccessConfig(on_redis_failure="maybe")
    with pytest.raises(ValueError):
        AccessConfig(batch_max_checks=0)
    backoff = AccessConfig(backoff_initial=0.05, backoff_max=1.0).reconnect_backoff.start(0.0)
    highest, lowest = [], []
    for n in range(8):
        # Equal jitter: between half the doubling delay and all of it, for ever.
        top, bottom = backoff.decide(1e6 * n, 1.0), backoff.decide(1e6 * n, 0.0)
        assert isinstance(top, Retry) and isinstance(bottom, Retry)
        highest.append(top.delay)
        lowest.append(bottom.delay)
        backoff = top.policy
    assert highest == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert lowest == [d / 2 for d in highest]


@pytest.mark.trio
async def test_over_tls() -> None:
    with running_tls_redis() as server:
        client = keystore.connect(server.tls_url)
        key = keystore.create_key(client, "ACME", 0).api_key.encode()
        client.close()
        async with running(server.tls_url) as access:
            assert (await access.check(key, 1)).tenant == "ACME"
            assert access.statistics().redis_checks == 1


# -- Redis Cluster (three masters) ------------------------------------------------

@pytest.fixture(scope="module")
def cluster_admin(redis_cluster: RedisClusterNodes) -> Iterator[Any]:  # noqa: F811
    client = keystore.connect(redis_cluster.url)
    yield client
    client.close()


def test_script_on_cluster(redis_cluster: RedisClusterNodes, cluster_admin: Any) -> None:  # noqa: F811
    created = [keystore.create_key(cluster_admin, "C%d" % i, 0, requests_per_second=1,
                                   burst=1) for i in range(12)]
    keys = [parse_api_key(c.api_key) for c in created]
    slots = {cluster_admin.keyslot(check_call(k, 1, 0).keys[0]) for k in keys}  # type: ignore
    owners = {cluster_admin.get_node_from_key(check_call(k, 1, 0).keys[0]).port  # type: ignore
              for k in keys}
    assert len(slots) == 12 and len(owners) == 3  # spread over all masters
    edge = RedisEdge(redis_cluster.url)
    try:
        edge.probe()
        calls = [check_call(k, 1, 1e9) for k in keys]  # type: ignore[arg-type]
        replies, pipelines, _ = edge.run_checks(calls + calls)
        assert pipelines == 3  # one per master
        outcomes = [decide(r, "", 1e9).outcome for r in replies]  # type: ignore[arg-type]
        assert outcomes == ["ok"] * 12 + ["rate"] * 12
        for node in redis_cluster.nodes:
            node.client().script_flush()
        replies, pipelines, loads = edge.run_checks(
            [check_call(k, 1, 1e9 + 1) for k in keys])  # type: ignore[arg-type]
        assert (pipelines, loads) == (6, 1)
        assert all(r[0] == b"ok" for r in replies)  # type: ignore[index]
        keystore.revoke_key(cluster_admin, created[0].api_key, 0)
        assert edge.run_checks(calls[:1])[0][0][0] == b"revoked"  # type: ignore[index]
    finally:
        edge.close()


@pytest.mark.trio
async def test_access_control_on_cluster(redis_cluster: RedisClusterNodes,  # noqa: F811
                                         cluster_admin: Any) -> None:
    keys = [keystore.create_key(cluster_admin, "D%d" % i, 0).api_key.encode()
            for i in range(30)]
    async with running(redis_cluster.url, check_timeout=5.0) as access:
        async with trio.open_nursery() as nursery:
            for i in range(600):
                nursery.start_soon(access.check, keys[i % 30], 5)
        stats = access.statistics()
    assert stats.admitted == 600
    assert stats.redis_checks <= 600
    assert stats.pipelines <= 60, stats
    assert keystore.get_usage(cluster_admin, "D7", time.time()).bytes == 100
