"""The server's use of access control, without sockets or Redis.

A :class:`FakeEdge` stands in for Redis behind a real
:class:`~gateway.access.control.AccessControl`: it answers each check the way the
check script would (a reply per key) and keeps the usage handed to it.
Connections are memory transports, so each test sees exactly what the server
sent, and whether a ``100 Continue`` went out before a refusal.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import trio

from gateway.access import keystore
from gateway.access.control import AccessConfig, AccessControl
from gateway.access.limiter import ScriptCall, UsageDelta, parse_api_key
from gateway.config.settings import from_args
from gateway.http.transport import MemoryTransport
from gateway.server import Gateway
from sinks.aws.partition_keys import KeyPolicy
from sinks.base import HeaderLookup, Record, RecordKeys
from tests.support.access import EdgeDouble
from tests.support.units import (
    SMALL_FLAGS,
    ContinueClient,
    RecordingSink,
    chunked,
    parse_responses,
    post,
    serve,
    split_record,
)

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
KEY = keystore.new_api_key("ACME")
NO_LIMITS = b"0 0 0 0 0 0"
#: Script replies by outcome (see gateway.access.limiter.CHECK_SCRIPT).
REPLIES = {
    "ok": [b"ok", b"k1", NO_LIMITS, 0, b"0", 1, 10],
    "unknown": [b"unknown"],
    "revoked": [b"revoked", b"k1"],
    "disabled": [b"disabled", b"k1"],
    "rate": [b"rate", b"k1", b"2 5 0 0 0 0", b"requests", b"0.4", 0, b"2.5"],
    "quota": [b"quota", b"k1", b"0 0 0 0 10 0", b"monthly_records", 10, 10, 0],
    # Not what the script returns: limits with five fields.
    "malformed": [b"ok", b"k1", b"0 0 0 0 0", 0, b"0", 1, 10],
}


class FakeEdge(EdgeDouble):
    """Redis as the access layer sees it: one canned reply for every check."""

    def __init__(self, outcome: str = "ok", *, down: bool = False) -> None:
        self.outcome = outcome
        self.down = down
        self.calls: List[ScriptCall] = []
        self.usage: List[UsageDelta] = []

    def replies(self, calls: Sequence[ScriptCall], usage: Sequence[Tuple[UsageDelta, int]]) -> List[object]:
        self.calls.extend(calls)
        self.usage.extend(delta for delta, _ in usage)
        return [list(REPLIES[self.outcome]) for _ in calls]

    def usage_total(self) -> Tuple[int, int]:
        return sum(d.records for d in self.usage), sum(d.bytes for d in self.usage)


class TenantKeySink(RecordingSink):
    """A recording sink that keys records as the Kinesis sink does with ``--partition-key tenant``."""

    def __init__(self, release) -> None:
        super().__init__(release)
        self.policy = KeyPolicy("tenant")
        self.tenants: List[Optional[bytes]] = []
        self.keys: List[Optional[str]] = []
        self.on_put = self._seen

    def record_keys(self, record_id: str, tenant: Optional[bytes], header: HeaderLookup) -> RecordKeys:
        return self.policy.keys(record_id, tenant, header)

    def _seen(self, record: Record) -> None:
        self.tenants.append(record.tenant)
        self.keys.append(record.partition_key)


@asynccontextmanager
async def gateway_with(edge: FakeEdge, *, log: Callable[..., None] = lambda *a, **k: None,
                       **options) -> AsyncIterator[Tuple[Gateway, TenantKeySink]]:
    config = from_args(list(SMALL_FLAGS), {})
    holder: Dict[str, Gateway] = {}
    sink = TenantKeySink(lambda slot: holder["gateway"].ring.release(slot))
    # FakeEdge answers the exact mode's check script; leases against a real
    # Redis are tested in test_access_lease.py.
    options.setdefault("admission", "exact")
    access = AccessControl(AccessConfig(redis_url="redis://127.0.0.1:1/0", **options), edge=edge,
                           log=log)
    gateway = holder["gateway"] = Gateway(config, sink, access=access)
    async with trio.open_nursery() as nursery:
        await nursery.start(access.run)
        yield gateway, sink
        await access.aclose()


def with_key(body: bytes, *, expect: bool = False, key: str = KEY) -> bytes:
    headers = [(b"Authorization", b"Bearer " + key.encode())]
    if expect:
        headers.append((b"Expect", b"100-continue"))
    return post(body, headers=headers)


async def test_admitted_record_names_its_tenant_in_envelope_record_and_partition_key():
    edge = FakeEdge()
    async with gateway_with(edge) as (gateway, sink):
        request = with_key(b"hello", expect=True)
        transport = ContinueClient(request[:-5], [b"hello"])
        await gateway.handle_connection(transport)
    assert [r.status for r in parse_responses(transport.sent)] == [100, 202]
    meta, body = split_record(sink.records[0])
    assert (meta["tenant"], body) == ("ACME", b"hello")
    assert sink.tenants == [b"ACME"] and sink.keys == ["ACME"]
    parsed = parse_api_key(KEY)
    assert parsed is not None and edge.calls[0].args[1] == "5"  # charged the Content-Length
    assert edge.calls[0].keys[0].endswith(parsed.key_hash)


async def test_a_malformed_script_reply_is_answered_503_counted_and_logged_once():
    events: List[Tuple[str, str, dict]] = []

    def log(event: str, level: str = "info", **fields) -> None:
        events.append((event, level, fields))

    async with gateway_with(FakeEdge("malformed"), log=log) as (gateway, sink):
        for _ in range(3):
            transport = await serve(gateway, [with_key(b"hello")])
            assert [r.status for r in parse_responses(transport.sent)] == [503]
        assert gateway.access is not None
        stats = gateway.access.statistics()
    assert stats.malformed_replies == 3 and stats.redis_state == "ok"
    assert sink.records == []
    # One event for the first; the next ones within the minute are only counted.
    assert [(event, level) for event, level, _ in events] == [("redis_malformed_reply", "error")]
    fields = events[0][2]
    assert fields["count"] == 1 and "malformed limits" in fields["error"] and "k1" in fields["reply"]


@pytest.mark.parametrize("outcome, status", [
    ("unknown", 401), ("revoked", 401), ("disabled", 403), ("rate", 429), ("quota", 429),
])
async def test_refusals_are_answered_before_100_continue(outcome, status):
    async with gateway_with(FakeEdge(outcome)) as (gateway, sink):
        # The head alone: an admitted request would get 100 Continue and wait.
        transport = await serve(gateway, [with_key(b"never sent", expect=True)[:-10]])
        assert gateway.ring.statistics()["used"] == 0
    responses = parse_responses(transport.sent)
    assert [r.status for r in responses] == [status]
    assert CONTINUE not in bytes(transport.sent)
    assert sink.records == []
    if outcome == "rate":
        headers = dict(responses[0].headers)
        assert (headers[b"retry-after"], headers[b"ratelimit-limit"],
                headers[b"ratelimit-remaining"], headers[b"ratelimit-reset"]) == (b"1", b"5", b"0", b"3")
    assert KEY.encode() not in bytes(transport.sent)


async def test_missing_key_never_reaches_redis():
    edge = FakeEdge()
    async with gateway_with(edge) as (gateway, _):
        transport = await serve(gateway, [post(b"x")])
    assert [r.status for r in parse_responses(transport.sent)] == [401]
    assert edge.calls == []


async def test_usage_of_a_request_not_stored_is_given_back():
    edge = FakeEdge()
    async with gateway_with(edge) as (gateway, sink):
        transport = await serve(gateway, [with_key(b"0123456789")[:-4]])  # body cut short
    assert [r.status for r in parse_responses(transport.sent)] == [400]
    assert sink.records == []
    # The check charged 1 record and 10 bytes in Redis; the flush at close takes them back.
    assert edge.usage_total() == (-1, -10)


async def test_chunked_body_is_charged_its_size_after_it_is_stored():
    edge = FakeEdge()
    headers = [(b"Authorization", b"Bearer " + KEY.encode())]
    async with gateway_with(edge) as (gateway, sink):
        transport = await serve(gateway, [chunked([b"abc", b"defgh"], headers=headers)])
    assert [r.status for r in parse_responses(transport.sent)] == [202]
    assert edge.calls[0].args[1] == "0"  # unknown at the check
    assert edge.usage_total() == (0, 8)


async def test_chunked_usage_reaches_redis_without_further_requests():
    edge = FakeEdge()
    headers = [(b"Authorization", b"Bearer " + KEY.encode())]
    async with gateway_with(edge, usage_flush_interval=0.01) as (gateway, _):
        await serve(gateway, [chunked([b"abcd"], headers=headers)])
        with trio.fail_after(5):
            while edge.usage_total() != (0, 4):
                await trio.sleep(0.01)


async def test_redis_down_in_closed_mode_answers_503_and_is_not_ready():
    edge = FakeEdge(down=True)
    async with gateway_with(edge, backoff_initial=10.0) as (gateway, _):
        transport = await serve(gateway, [with_key(b"x")])
        assert gateway.readiness() == (
            False, "access control: Redis unreachable (--on-redis-failure closed)")
        readyz = await serve(gateway, [b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n"])
    (response,) = parse_responses(transport.sent)
    assert response.status == 503 and response.json()["error"] == "access_unavailable"
    assert response.header(b"retry-after") == b"1"
    (ready,) = parse_responses(readyz.sent)
    assert ready.status == 503 and ready.json()["redis"] == "down"


async def _silent_chunked(gateway: Gateway, peer: str, key: str = KEY) -> Tuple[int, bytes]:
    """A chunked upload that sends its head and then nothing: (status, reason)."""
    head = chunked([], headers=[(b"Authorization", b"Bearer " + key.encode())])
    head = head[:head.index(b"\r\n\r\n") + 4]
    transport = MemoryTransport([head], eof=False)
    transport.peer = peer
    await gateway.handle_connection(transport)
    (response,) = parse_responses(transport.sent)
    return response.status, response.json()["error"].encode()


@pytest.mark.parametrize("same", ["tenant", "address"])
async def test_concurrent_chunked_uploads_are_bounded_per_tenant_and_per_address(same):
    """Silent chunked uploads cannot hold the ring, nor overshoot a quota without bound."""
    from gateway.uploads import MAX_CHUNKED_PER_ADDRESS, MAX_CHUNKED_PER_TENANT

    bound = MAX_CHUNKED_PER_TENANT if same == "tenant" else MAX_CHUNKED_PER_ADDRESS
    edge = FakeEdge()
    # Checks run in a worker thread: a generous bound, for a cold PyPy.
    async with gateway_with(edge, check_timeout=10.0, socket_timeout=20.0) as (gateway, _):
        async with trio.open_nursery() as nursery:
            for n in range(bound):
                peer = "192.0.2.%d" % n if same == "tenant" else "192.0.2.1"
                key = KEY if same == "tenant" else keystore.new_api_key("T%d" % n)
                nursery.start_soon(_silent_chunked, gateway, peer, key)
            counted = ("tenant", "ACME") if same == "tenant" else ("address", "192.0.2.1")
            with trio.fail_after(30):
                while gateway.chunked_uploads._counts.get(counted) != bound:
                    await trio.sleep(0.01)
            key = KEY if same == "tenant" else keystore.new_api_key("OTHER")
            status, reason = await _silent_chunked(gateway, "192.0.2.200" if same == "tenant"
                                                   else "192.0.2.1", key)
            assert (status, reason) == (429, b"too_many_uploads")
            # Content-Length uploads are not counted: their slot is the size they declare.
            transport = await serve(gateway, [with_key(b"fine")])
            assert [r.status for r in parse_responses(transport.sent)] == [202]
            nursery.cancel_scope.cancel()
        assert gateway.chunked_uploads._counts == {}


async def test_chunked_body_is_charged_to_the_byte_rate_and_a_tenant_in_debt_is_refused():
    edge = FakeEdge()
    headers = [(b"Authorization", b"Bearer " + KEY.encode())]
    async with gateway_with(edge) as (gateway, _):
        await serve(gateway, [chunked([b"abc", b"defgh"], headers=headers)])
        await serve(gateway, [with_key(b"next")])  # carries the charge to Redis
    charged = [d for d in edge.usage if d.rate_bytes]
    assert [(d.rate_bytes, d.bytes, d.records) for d in charged] == [(8, 8, 0)]
    assert charged[0].charged_at > 0
