"""Lease mode against real Redis: the script, revocation delay, settlement, debt, load, outages."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from gateway.access import keystore
from gateway.access.control import DOWN, OK, AccessConfig, AccessControl
from gateway.access.lease import (
    LEASE_SCRIPT,
    LEASE_SECONDS,
    MIN_CALL_INTERVAL,
    Grant,
    Settlement,
    lease_call,
    lease_take,
    parse_lease_reply,
    refund_tat,
)
from gateway.access.limiter import gcra_name, parse_api_key, tenant_name, usage_name
from gateway.errors import AccessUnavailable, Forbidden, QuotaExceeded, RateLimited, Unauthorized
from tests.support.redis import (  # noqa: F401
    RedisClusterNodes,
    RedisServer,
    redis_cluster,
    redis_server,
)

NOW = 1_790_000_000.0


class Clock:
    """The wall clock AccessControl sees; tests move it by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def running(url: str, clock: Callable[[], float] = time.time,
                  **options: Any) -> AsyncIterator[AccessControl]:
    access = AccessControl(AccessConfig(redis_url=url, admission="lease", **options), clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(access.run)
        yield access
        await access.aclose()


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[Any]:  # noqa: F811
    client = keystore.connect(redis_server.url)
    yield client
    client.close()


# -- the script agrees with the Python model -----------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rate=st.sampled_from([0.5, 3.0, 40.0, 1000.0]), burst=st.integers(1, 200),
       offset=st.floats(-3.0, 3.0), want=st.integers(1, 100), back=st.integers(-50, 50))
def test_script_leases_and_refunds_as_the_model(redis_module: RedisServer, admin: Any, rate: float,
                                                burst: int, offset: float, want: int,
                                                back: int) -> None:
    created = keystore.create_key(admin, "MODEL", 0, requests_per_second=rate, burst=burst)
    key = parse_api_key(created.api_key)
    assert key is not None
    tat = NOW + offset
    admin.hset(gcra_name("MODEL"), mapping={"req": repr(tat), "bytes": "0"})
    admin.delete(usage_name("MODEL", "205608"))
    call = lease_call("MODEL", [key.key_hash], Settlement(requests=back), 0, want, 0, NOW)
    reply = admin.execute_command("EVAL", LEASE_SCRIPT, len(call.keys), *call.keys, *call.args)
    settled = refund_tat(tat, rate, back, NOW)
    expected = lease_take(settled, rate, burst, 1, want, NOW)
    result = parse_lease_reply(reply, "MODEL", NOW)
    state = float(admin.hget(gcra_name("MODEL"), "req"))
    if expected.allowed:
        assert isinstance(result, Grant)
        assert (result.requests, result.remaining) == (expected.granted, expected.remaining)
        assert state == expected.tat
        assert result.statuses == (created.key_id,)
    else:
        assert not isinstance(result, Grant) and result.outcome == "rate"  # type: ignore[attr-defined]
        assert abs(result.retry_after - expected.retry_after) < 1e-6  # type: ignore[attr-defined]
        assert state == settled


def test_script_touches_only_its_tenants_slot() -> None:
    key = parse_api_key(keystore.new_api_key("SLOT"))
    assert key is not None
    call = lease_call("SLOT", [key.key_hash, "0" * 64], Settlement(1, 2, 3, 4, "202601"), 5, 6, 7,
                      NOW)
    assert len({key_slot(name.encode()) for name in call.keys}) == 1  # one cluster slot
    assert all("{SLOT}" in name for name in call.keys)
    assert call.keys[:2] == (tenant_name("SLOT"), gcra_name("SLOT"))


# -- AccessControl in lease mode -----------------------------------------------------


@pytest.mark.trio
async def test_requests_spend_the_slice_and_usage_is_exact_once_settled(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    clock = Clock()
    key = keystore.create_key(admin, "ACME", 0, requests_per_second=1000,
                              burst=1000).api_key.encode()
    async with running(redis_server.url, clock) as access:
        for _ in range(200):
            assert (await access.check(key, 10)).source == "lease"
            clock.now += 0.001  # 1000 requests/s
        calls = access.statistics().redis_checks
        # Slices grow while they run out early, to about 0.1 s of 1000/s.
        assert calls <= 12
        lease = access._leases.lease("ACME")  # type: ignore[union-attr]
        assert lease is not None and lease.requests > 0  # some of the slice still unspent
        clock.now += LEASE_SECONDS
        await access._leases.settle_expired(clock.now)  # type: ignore[union-attr]
        assert lease.requests == 0
        usage = keystore.get_usage(admin, "ACME", clock.now)
        assert (usage.records, usage.bytes) == (200, 2000)  # the unspent part went back
    print("200 requests at 1000/s took %d lease calls" % calls)


@pytest.mark.trio
async def test_unspent_slices_go_back_by_themselves_and_at_close(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    key = keystore.create_key(admin, "BACK", 0).api_key.encode()
    other = keystore.create_key(admin, "OTHER", 0).api_key.encode()

    def used(tenant: str) -> int:
        return keystore.get_usage(admin, tenant, time.time()).records

    async with running(redis_server.url) as access:
        async with trio.open_nursery() as nursery:  # demand grows the slices
            for _ in range(20):
                nursery.start_soon(access.check, key, 1)
                nursery.start_soon(access.check, other, 1)
        assert used("BACK") > 20  # the unspent rest of a slice counts until it goes back
        with trio.fail_after(5):  # the flush loop hands expired slices back
            while used("BACK") != 20:
                await trio.sleep(0.05)
        await access.check(other, 1)
        assert used("OTHER") > 21
    assert used("OTHER") == 21  # handed back at close


@pytest.mark.trio
async def test_a_revoked_key_and_a_disabled_tenant_are_refused_within_a_lease(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    clock = Clock()
    created = keystore.create_key(admin, "ACME", 0)
    key = created.api_key.encode()
    other = keystore.create_key(admin, "ACME", 0).api_key.encode()
    async with running(redis_server.url, clock) as access:
        await access.check(key, 1)
        await access.check(other, 1)
        confirmed = clock.now
        keystore.revoke_key(admin, created.api_key, clock.now)
        clock.now = confirmed + LEASE_SECONDS - 0.01
        await access.check(key, 1)  # still within the second the lease trusts it
        clock.now = confirmed + LEASE_SECONDS
        with pytest.raises(Unauthorized):
            await access.check(key, 1)
        with pytest.raises(Unauthorized):  # and from the key cache afterwards
            await access.check(key, 1)
        assert (await access.check(other, 1)).source == "lease"
        keystore.set_enabled(admin, "ACME", False)
        clock.now += LEASE_SECONDS
        with pytest.raises(Forbidden):
            await access.check(other, 1)


@pytest.mark.trio
async def test_rate_refusals_carry_retry_after_and_ratelimit_values(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    clock = Clock()
    key = keystore.create_key(admin, "SLOW", 0, requests_per_second=2, burst=4).api_key.encode()
    async with running(redis_server.url, clock) as access:
        for _ in range(4):
            await access.check(key, 1)
            clock.now += MIN_CALL_INTERVAL
        with pytest.raises(RateLimited) as refused:
            await access.check(key, 1)
        # The burst of 4 at 2/s, taken from 0.2 s ago: the next one is 0.5 - 0.2 s away.
        assert abs(refused.value.retry_after - 0.3) < 1e-3
        assert (refused.value.limit, refused.value.remaining) == (4, 0)
        assert abs(refused.value.reset - 1.8) < 1e-3
        calls = access.statistics().redis_checks
        with pytest.raises(RateLimited):  # from the refusal kept on the lease
            await access.check(key, 1)
        assert access.statistics().redis_checks == calls


@pytest.mark.trio
async def test_a_chunked_body_charged_after_store_puts_the_tenant_in_debt(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    clock = Clock()
    key = keystore.create_key(admin, "CHUNKY", 0, bytes_per_second=100,
                              burst_bytes=100).api_key.encode()
    async with running(redis_server.url, clock) as access:
        await access.check(key, 0)  # chunked: no size known at the check
        access.charge_after_store("CHUNKY", 1000)
        clock.now += MIN_CALL_INTERVAL
        with pytest.raises(RateLimited) as refused:
            await access.check(key, 0)
        # 1000 bytes at 100/s charged when settled, less the 1 s burst: 9 s.
        assert abs(refused.value.retry_after - 9.0) < 1e-3
        assert keystore.get_usage(admin, "CHUNKY", clock.now).bytes == 1000


@pytest.mark.trio
async def test_a_request_not_stored_gives_its_quota_back_to_the_slice(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    clock = Clock()
    key = keystore.create_key(admin, "Q", 0, monthly_records=1).api_key.encode()
    async with running(redis_server.url, clock) as access:
        await access.check(key, 5)
        access.add_usage("Q", -1, -5)  # the upload broke off
        await access.check(key, 5)
        clock.now += MIN_CALL_INTERVAL
        with pytest.raises(QuotaExceeded):
            await access.check(key, 5)
    assert keystore.get_usage(admin, "Q", clock.now).records == 1


@pytest.mark.trio
async def test_redis_calls_per_tenant_stay_bounded_at_any_request_rate(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    keys = [keystore.create_key(admin, "BUSY", 0).api_key.encode() for _ in range(3)]
    async with running(redis_server.url) as access:
        start = trio.current_time()
        checks = 0

        async def client(key: bytes) -> None:
            nonlocal checks
            while trio.current_time() - start < 2.0:
                await access.check(key, 100)
                checks += 1
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for n in range(30):
                nursery.start_soon(client, keys[n % 3])
        elapsed = trio.current_time() - start
        calls = access.statistics().redis_checks
    # A bound on counts, not speed: whatever the machine managed, the calls
    # were spaced at least MIN_CALL_INTERVAL apart (plus the first).
    print("%d checks in %.2fs (%.0f/s): %d Redis calls, %.1f/s" % (
        checks, elapsed, checks / elapsed, calls, calls / elapsed))
    assert calls <= elapsed / MIN_CALL_INTERVAL + 2
    assert checks > 10 * calls


@pytest.mark.trio
async def test_closed_mode_spends_no_slice_while_redis_is_down(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    key = keystore.create_key(admin, "ACME", 0).api_key.encode()
    redis_server.save()
    async with running(redis_server.url, check_timeout=0.3, backoff_initial=0.02,
                       backoff_max=0.1) as access:
        for _ in range(20):
            await access.check(key, 1)
        redis_server.kill()
        with pytest.raises(AccessUnavailable):
            for _ in range(1000):  # the slice is not spent once Redis is known down
                await access.check(key, 1)
        with pytest.raises(AccessUnavailable):
            await access.check(key, 1)
        assert access.redis_state == DOWN
        redis_server.start()
        with trio.fail_after(10):
            while access.redis_state != OK:
                await trio.sleep(0.01)
        assert (await access.check(key, 1)).source == "lease"


@pytest.mark.trio
async def test_open_mode_falls_back_to_the_local_limiter(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    key = keystore.create_key(admin, "ACME", 0, requests_per_second=10, burst=10).api_key.encode()
    redis_server.save()
    async with running(redis_server.url, on_redis_failure="open", check_timeout=0.3,
                       backoff_initial=10.0) as access:
        assert (await access.check(key, 1)).source == "lease"
        redis_server.kill()
        sources = set()
        for _ in range(5):
            try:
                sources.add((await access.check(key, 1)).source)
            except AccessUnavailable:  # the call that found Redis gone
                sources.add("unavailable")
        assert access.redis_state == DOWN and "local" in sources


@pytest.mark.trio
async def test_open_mode_keeps_a_quota_refusal_through_the_outage(
        redis_server: RedisServer, admin: Any) -> None:  # noqa: F811
    """A tenant over its quota when Redis went away is not admitted from memory."""
    clock = Clock()
    key = keystore.create_key(admin, "FULL", clock.now, monthly_records=2).api_key.encode()
    redis_server.save()
    async with running(redis_server.url, clock, on_redis_failure="open", check_timeout=0.3,
                       backoff_initial=10.0) as access:
        with pytest.raises(QuotaExceeded):
            for _ in range(3):
                await access.check(key, 1)
                clock.now += MIN_CALL_INTERVAL
        redis_server.kill()
        # Past the refusal's cached time, so the lease asks Redis and finds it gone.
        clock.now += 10 * access.config.key_cache_ttl
        for _ in range(3):
            with pytest.raises((QuotaExceeded, AccessUnavailable)):
                await access.check(key, 1)
        with pytest.raises(QuotaExceeded):
            await access.check(key, 1)
        assert access.redis_state == DOWN


@pytest.mark.trio
async def test_leases_on_cluster(redis_cluster: RedisClusterNodes) -> None:  # noqa: F811
    admin = keystore.connect(redis_cluster.url)
    try:
        keys = [keystore.create_key(admin, "L%d" % i, 0, requests_per_second=5,
                                    burst=5).api_key.encode() for i in range(9)]
        async with running(redis_cluster.url, check_timeout=5.0) as access:
            for key in keys:
                for _ in range(5):
                    await access.check(key, 1)
                    await trio.sleep(MIN_CALL_INTERVAL)
            with pytest.raises(RateLimited):
                for _ in range(10):
                    await access.check(keys[0], 1)
            assert access.statistics().admitted >= 45
    finally:
        admin.close()
