"""The event-loop Redis edge against a real redis-server: pipelines, script
reloads, passwords and databases, TLS, a server that goes away and comes back."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from gateway.access import keystore
from gateway.access.keystore import EdgeUnavailable
from gateway.access.limiter import check_call, parse_api_key
from gateway.access.redis_trio import AsyncRedisEdge
from gateway.access.resp import ReplyError
from tests.support.redis import (  # noqa: F401
    RedisServer,
    redis_server,
    running_redis,
    tls_redis_server,
)


def _call(api_key: str, body: int = 10) -> Any:
    key = parse_api_key(api_key)
    assert key is not None
    return check_call(key, body, 1_800_000_000.0)


async def test_a_pipeline_answers_every_check_in_order(redis_server: RedisServer) -> None:  # noqa: F811
    admin = keystore.connect(redis_server.url)
    good = keystore.create_key(admin, "ACME", 0).api_key
    unknown = keystore.new_api_key("ACME")
    edge = AsyncRedisEdge(redis_server.url, socket_timeout=2.0)
    try:
        await edge.probe()
        replies, pipelines, loads = await edge.run_checks([_call(good), _call(unknown), _call(good, 5)])
        assert [r[0] for r in replies] == [b"ok", b"unknown", b"ok"]  # type: ignore[index]
        assert (pipelines, loads) == (1, 0)
        # Flushed scripts (a restarted server) are loaded again, once.
        admin.script_flush()
        replies, pipelines, loads = await edge.run_checks([_call(good)])
        assert replies[0][0] == b"ok" and (pipelines, loads) == (2, 1)  # type: ignore[index]
        usage = keystore.get_usage(admin, "ACME", 1_800_000_000.0)
        assert (usage.records, usage.bytes) == (3, 25)
    finally:
        edge.close()
        admin.close()


async def test_password_and_database_from_the_url(redis_server: RedisServer) -> None:  # noqa: F811
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "gw", "on", ">s3cret", "~*", "+@all")
    try:
        url = "redis://gw:s3cret@127.0.0.1:%d/3" % redis_server.port
        edge = AsyncRedisEdge(url)
        await edge.probe()
        db3 = keystore.connect("redis://127.0.0.1:%d/3" % redis_server.port)
        key = keystore.create_key(db3, "ACME", 0).api_key
        replies, _, _ = await edge.run_checks([_call(key)])
        assert replies[0][0] == b"ok"  # type: ignore[index]
        edge.close()
        db3.close()
        wrong = AsyncRedisEdge("redis://gw:nope@127.0.0.1:%d/0" % redis_server.port)
        with pytest.raises(EdgeUnavailable) as refused:
            await wrong.probe()
        assert "nope" not in str(refused.value) and "WRONGPASS" in str(refused.value)
    finally:
        admin.close()


async def test_tls(tls_redis_server: RedisServer) -> None:  # noqa: F811
    edge = AsyncRedisEdge(tls_redis_server.tls_url)
    try:
        await edge.probe()
    finally:
        edge.close()
    untrusted = AsyncRedisEdge(tls_redis_server.tls_url.split("?")[0])
    with pytest.raises(EdgeUnavailable):
        await untrusted.probe()


async def test_unix_socket(tmp_path: Any) -> None:
    path = str(tmp_path / "redis.sock")
    with running_redis(extra_args=["--unixsocket", path]):
        edge = AsyncRedisEdge("unix://" + path)
        try:
            await edge.probe()
        finally:
            edge.close()


async def test_server_gone_then_back(redis_server: RedisServer) -> None:  # noqa: F811
    edge = AsyncRedisEdge(redis_server.url, socket_timeout=0.5)
    try:
        await edge.probe()
        redis_server.kill()
        with pytest.raises(EdgeUnavailable, match="ConnectionError"):
            await edge.probe()
        redis_server.start()
        await edge.probe()
        redis_server.pause()
        with pytest.raises(EdgeUnavailable, match="TimeoutError"):
            await edge.probe()
        redis_server.resume()
        await edge.probe()
    finally:
        edge.close()


async def test_cancelled_pipeline_leaves_no_connection_behind(redis_server: RedisServer) -> None:  # noqa: F811
    edge = AsyncRedisEdge(redis_server.url)
    try:
        await edge.probe()
        redis_server.pause()
        with trio.move_on_after(0.1):
            await edge.probe()
        redis_server.resume()
        # The half-read connection was dropped, so replies cannot get mixed up.
        await edge.probe()
        assert len(edge._idle) == 1 and not edge._busy
    finally:
        edge.close()


def test_error_replies_carry_their_code() -> None:
    assert ReplyError("NOSCRIPT No matching script").code == "NOSCRIPT"
