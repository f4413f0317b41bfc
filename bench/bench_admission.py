"""Admission against a real redis-server: --admission exact against lease.

Each round runs ``CLIENTS`` concurrent tasks checking one key of one
tenant, ``CHECKS`` checks in all, through :class:`AccessControl` (trio,
the single-server event-loop edge).  Besides the round's time,
``extra_info`` holds this process's CPU per check (``cpu_us_per_check``:
the gateway's side only, Redis runs in its own process) and Redis script
calls per check.  The machine being shared, compare the two modes of the
same run, not figures of different runs.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterator

import pytest
import trio

from gateway.access import keystore
from gateway.access.control import AccessConfig, AccessControl
from tests.support.redis import running_redis

CLIENTS = 32
CHECKS = 4096
ROUNDS = 10
WARMUP_ROUNDS = 5


@pytest.fixture(scope="module")
def redis_key() -> Iterator[Dict[str, Any]]:
    with running_redis() as server:
        admin = keystore.connect(server.url)
        key = keystore.create_key(admin, "BENCH", 0).api_key.encode()
        admin.close()
        yield {"url": server.url, "key": key}


async def _round(url: str, key: bytes, admission: str, totals: Dict[str, float]) -> None:
    # A generous timeout: a busy shared machine must not turn checks into 503s.
    access = AccessControl(AccessConfig(redis_url=url, admission=admission, check_timeout=5.0))
    async with trio.open_nursery() as nursery:
        await nursery.start(access.run)
        cpu = time.process_time()

        async def client(n: int) -> None:
            for _ in range(n):
                await access.check(key, 1024)

        async with trio.open_nursery() as clients:
            for _ in range(CLIENTS):
                clients.start_soon(client, CHECKS // CLIENTS)
        totals["cpu"] += time.process_time() - cpu
        totals["calls"] += access.statistics().redis_checks
        totals["checks"] += CHECKS
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("admission", ["exact", "lease"])
def test_admission_round(benchmark, redis_key: Dict[str, Any], admission: str) -> None:
    totals = {"cpu": 0.0, "calls": 0.0, "checks": 0.0}

    def one_round() -> None:
        trio.run(_round, redis_key["url"], redis_key["key"], admission, totals)

    for _ in range(WARMUP_ROUNDS):
        one_round()
    totals.update(cpu=0.0, calls=0.0, checks=0.0)
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    benchmark.extra_info["cpu_us_per_check"] = round(1e6 * totals["cpu"] / totals["checks"], 2)
    benchmark.extra_info["redis_calls_per_check"] = round(totals["calls"] / totals["checks"], 4)
    print("\n%s: %.1f us CPU per check, %.4f Redis calls per check" % (
        admission, 1e6 * totals["cpu"] / totals["checks"], totals["calls"] / totals["checks"]))
