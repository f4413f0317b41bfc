"""Fixtures several test modules share (others are imported from tests/support)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from tests.support.redis import RedisServer, running_redis


@pytest.fixture(scope="module")
def redis_module() -> Iterator[RedisServer]:
    """One redis-server for a whole test module."""
    with running_redis() as server:
        yield server


@pytest.fixture(scope="module")
def admin(redis_module: RedisServer) -> Iterator[Any]:
    """A sync admin client of ``redis_module`` (a module may define its own ``admin``)."""
    from gateway.access import keystore

    client = keystore.connect(redis_module.url)
    yield client
    client.close()
