"""Fail-open mode (``--on-redis-failure open``) without Redis: what an outage may admit.

A scripted edge answers each check as the check script would for the key it
names, until the test takes it down.  The clock is a value the test moves,
so stale entries and refusals run out without sleeping.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Dict, List, Sequence, Tuple

import pytest
import trio

from gateway.access import keystore
from gateway.access.control import AccessConfig, AccessControl
from gateway.access.limiter import ScriptCall, UsageDelta, parse_api_key
from gateway.errors import AccessUnavailable, QuotaExceeded, RateLimited, Unauthorized
from tests.support.access import EdgeDouble

T0 = 1_700_000_000.0  # mid November 2023


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class ScriptedEdge(EdgeDouble):
    """Redis as the check script answers: a reply per key hash, 'unknown' for the rest."""

    def __init__(self) -> None:
        self.answers: Dict[str, List[object]] = {}
        self.down = False

    def answer(self, key: bytes, reply: List[object]) -> None:
        parsed = parse_api_key(key)
        assert parsed is not None
        self.answers[parsed.key_hash] = reply

    def replies(self, calls: Sequence[ScriptCall], usage: Sequence[Tuple[UsageDelta, int]]) -> List[object]:
        return [list(self.answers.get(call.keys[0].rsplit(":", 1)[1], [b"unknown"])) for call in calls]


@asynccontextmanager
async def open_mode(edge: ScriptedEdge, clock: Clock, **options) -> AsyncIterator[AccessControl]:
    # The scripted edge answers as the check script does: exact admission.
    options.setdefault("admission", "exact")
    config = AccessConfig(redis_url="redis://127.0.0.1:1/0", on_redis_failure="open",
                          backoff_initial=3600.0, **options)
    access = AccessControl(config, edge=edge, clock=clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(access.run)
        yield access
        nursery.cancel_scope.cancel()


async def go_down(access: AccessControl, edge: ScriptedEdge, key: bytes) -> None:
    """Take Redis away; the next check finds out (and is answered by fail-open)."""
    edge.down = True
    try:
        await access.check(key, 1)
    except (RateLimited, QuotaExceeded, AccessUnavailable):
        pass
    assert access.redis_state == "down"


def test_the_default_stale_key_ttl_is_minutes_not_an_hour():
    assert AccessConfig().stale_key_ttl == 300.0


async def test_a_tenant_over_its_quota_stays_refused_through_the_outage():
    edge, clock = ScriptedEdge(), Clock()
    key = keystore.new_api_key("FULL").encode()
    edge.answer(key, [b"quota", b"k1", b"0 0 0 0 10 0", b"monthly_records", 10, 10, 0])
    async with open_mode(edge, clock) as access:
        with pytest.raises(QuotaExceeded):
            await access.check(key, 1)
        clock.now += 60  # past the key cache ttl: before, the local limiter admitted it
        await go_down(access, edge, key)
        for _ in range(3):
            with pytest.raises(QuotaExceeded):
                await access.check(key, 1)
        assert access.decisions()["admitted_local"] == 0


async def test_a_tenant_over_its_rate_stays_refused_until_the_refusal_runs_out():
    edge, clock = ScriptedEdge(), Clock()
    key = keystore.new_api_key("SLOW").encode()
    edge.answer(key, [b"rate", b"k1", b"0 0 1000 1000 0 0", b"bytes", b"90", 0, b"91"])
    async with open_mode(edge, clock) as access:
        with pytest.raises(RateLimited):
            await access.check(key, 0)
        clock.now += 30
        await go_down(access, edge, key)
        with pytest.raises(RateLimited) as refused:
            await access.check(key, 0)
        assert 55 <= refused.value.retry_after <= 61
        clock.now += 61
        assert (await access.check(key, 0)).source == "local"


async def test_a_quota_only_tenant_gets_its_share_of_what_was_left():
    edge, clock = ScriptedEdge(), Clock()
    key = keystore.new_api_key("QUOTA").encode()
    # No rates; 100 records a month, 90 used after this admission.
    edge.answer(key, [b"ok", b"k1", b"0 0 0 0 100 0", 0, b"0", 90, 900])
    async with open_mode(edge, clock, instance_count=2) as access:
        await access.check(key, 10)
        edge.down = True
        sources = []
        for _ in range(8):
            try:
                sources.append((await access.check(key, 10)).source)
            except QuotaExceeded as exc:
                assert exc.quota == "monthly_records"
                sources.append("quota")
        # 10 records were left, half of them this gateway's: 5, then refused.
        assert sources == ["local"] * 5 + ["quota"] * 3


async def test_forged_keys_cannot_push_a_confirmed_key_out_of_the_cache():
    edge, clock = ScriptedEdge(), Clock()
    real = keystore.new_api_key("REAL").encode()
    edge.answer(real, [b"ok", b"k1", b"10 10 0 0 0 0", 9, b"0.1", 1, 1])
    async with open_mode(edge, clock, key_cache_size=8) as access:
        assert (await access.check(real, 1)).source == "redis"
        for _ in range(50):  # well-formed, unknown to Redis
            forged = keystore.new_api_key("REAL").encode()
            with pytest.raises(Unauthorized):
                await access.check(forged, 1)
        edge.down = True
        assert (await access.check(real, 1)).source == "local"
        forged = keystore.new_api_key("REAL").encode()
        with pytest.raises(AccessUnavailable):
            await access.check(forged, 1)
