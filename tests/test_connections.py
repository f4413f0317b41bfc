"""Connection capacity without sockets: the registry's eviction order, the limit from file
descriptors, the minimum body rate, receive buffers lent only while a request arrives, and
one tenant's share of the ring.

The same behaviour over real sockets, with thousands of connections and hostile clients:
tests/test_fault_connections.py.
"""

from __future__ import annotations

from typing import List

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from buffers import Overloaded, RingBuffer, WaitingRing
from gateway.http.capacity import (
    FD_RESERVE,
    LOW_CONNECTION_LIMIT,
    MIN_BODY_RATE_GRACE,
    body_deadline,
    connection_limit,
    fd_reserve,
    plan,
)
from gateway.http.registry import (
    ACTIVE,
    CLOSED,
    IDLE,
    NEW,
    ConnectionRegistry,
    ConnectionStateError,
    Tracked,
)
from gateway.http.transport import MemoryTransport
from gateway.server import LINGER_SECONDS
from tests.support.units import make_gateway, parse_responses, post, serve, split_record

# -- the registry ---------------------------------------------------------------------------


def _waiting(registry: ConnectionRegistry, conn: Tracked, closed: List[Tracked]) -> None:
    assert registry.wait(conn, lambda: closed.append(conn))


def _served(registry: ConnectionRegistry, conn: Tracked, closed: List[Tracked]) -> None:
    """``conn`` gets a request, answers it, and waits for the next."""
    registry.start(conn)
    registry.answered(conn)
    _waiting(registry, conn, closed)


def test_at_the_limit_new_silent_connections_go_first_then_the_longest_idle():
    registry = ConnectionRegistry(3)
    closed: List[Tracked] = []
    a, b, c = (registry.admit() for _ in range(3))
    for conn in (a, b, c):
        _waiting(registry, conn, closed)  # type: ignore[arg-type]
    for conn in (b, a):
        _served(registry, conn, closed)  # type: ignore[arg-type]
    assert (registry.open, registry.new, registry.idle, registry.active) == (3, 1, 2, 0)
    d = registry.admit()  # c never sent a byte: it goes first
    assert closed == [c] and d is not None and registry.open == 3
    registry.closed(c)  # type: ignore[arg-type]
    _served(registry, d, closed)
    e = registry.admit()  # no new one waits: b has been idle longest
    assert closed == [c, b] and e is not None
    assert registry.evicted == 2 and registry.open == 3


def test_a_connection_in_a_request_is_never_evicted_and_then_newcomers_are_refused():
    registry = ConnectionRegistry(2)
    closed: List[Tracked] = []
    conns = [registry.admit(), registry.admit()]
    for conn in conns:
        _waiting(registry, conn, closed)  # type: ignore[arg-type]
        registry.start(conn)  # type: ignore[arg-type]
    assert registry.active == 2
    assert registry.admit() is None and closed == [] and registry.evicted == 0
    registry.answered(conns[0])  # type: ignore[arg-type]
    # Answered but not yet waiting again (no checkpoint between): not evictable either.
    assert registry.admit() is None
    _waiting(registry, conns[0], closed)  # type: ignore[arg-type]
    assert registry.admit() is not None and closed == [conns[0]]


def test_evicted_before_its_task_ran_it_is_closed_when_it_would_wait():
    registry = ConnectionRegistry(1)
    first = registry.admit()
    assert first is not None
    second = registry.admit()  # first had not even registered how to close it
    assert second is not None and first.evicted and registry.open == 1
    closed: List[Tracked] = []
    assert registry.wait(first, lambda: closed.append(first)) is False
    assert closed == [first]
    registry.closed(first)
    registry.closed(first)  # idempotent
    assert registry.open == 1 and first.state == CLOSED


def test_shutdown_closes_every_waiting_connection():
    registry = ConnectionRegistry(10)
    closed: List[Tracked] = []
    new, idle, busy = registry.admit(), registry.admit(), registry.admit()
    for conn in (new, idle, busy):
        _waiting(registry, conn, closed)  # type: ignore[arg-type]
    _served(registry, idle, closed)  # type: ignore[arg-type]
    registry.start(busy)  # type: ignore[arg-type]
    assert registry.cancel_waiting() == 2 and sorted(map(id, closed)) == sorted(map(id, (new, idle)))
    assert registry.evicted == 0


def test_transitions_outside_the_table_raise():
    registry = ConnectionRegistry(1)
    conn = registry.admit()
    assert conn is not None and conn.state == NEW
    with pytest.raises(ConnectionStateError):
        registry.answered(conn)  # nothing was asked yet
    registry.start(conn)
    assert conn.state == ACTIVE
    registry.answered(conn)
    assert conn.state == IDLE and conn.served == 1
    with pytest.raises(ValueError):
        ConnectionRegistry(0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.lists(st.tuples(st.sampled_from(["admit", "start", "answer", "close"]),
                                             st.integers(0, 20)), max_size=80))
def test_the_counts_add_up_and_only_waiting_connections_are_evicted(limit, steps):
    registry = ConnectionRegistry(limit)
    live: List[Tracked] = []
    evicted: List[Tracked] = []
    for action, pick in steps:
        if action == "admit":
            before = [(c, c.state) for c in live]
            conn = registry.admit()
            gone = [c for c, _ in before if c.evicted and c not in evicted]
            for c in gone:
                # Only a waiting one, and the driver closes it.
                assert dict(before)[c] in (NEW, IDLE)
                evicted.append(c)
                live.remove(c)
                registry.closed(c)
            if conn is not None:
                live.append(conn)
                assert registry.wait(conn, lambda: None)
            else:
                assert all(c.state == ACTIVE or (c.state == IDLE and c.cancel is None) for c in live)
        elif live:
            conn = live[pick % len(live)]
            if action == "start":
                registry.start(conn)
            elif action == "answer" and conn.state == ACTIVE:
                registry.answered(conn)
                registry.wait(conn, lambda: None)
            elif action == "close":
                registry.closed(conn)
                live.remove(conn)
        assert registry.open == len(live) <= limit
        assert registry.new + registry.idle + registry.active == registry.open
        assert registry.active == sum(1 for c in live if c.state == ACTIVE)
    assert registry.evicted == len(evicted)


# -- capacity from file descriptors ---------------------------------------------------------


def test_the_limit_follows_the_descriptors_less_a_reserve():
    assert connection_limit(1 << 20) == (1 << 20) - FD_RESERVE
    assert connection_limit(256) == 256 - FD_RESERVE == 128
    assert connection_limit(64) == 16  # a quarter, however low
    assert fd_reserve("kinesis", 4) > fd_reserve("file", 4) == FD_RESERVE


def test_a_low_limit_or_a_limit_beyond_the_descriptors_is_said():
    raised = plan(1024, 524288, 524288, 0, FD_RESERVE)
    assert raised.limit == 524288 - FD_RESERVE and raised.warning == ""
    low = plan(256, 256, 256, 0, FD_RESERVE)
    assert low.limit == 128 and "ulimit -n" in low.warning and "256" in low.warning
    assert plan(8192, 8192, 8192, 0, FD_RESERVE).limit > LOW_CONNECTION_LIMIT
    asked = plan(1024, 1024, 1024, 5000, FD_RESERVE)
    assert asked.limit == 1024 - FD_RESERVE and "--max-connections 5000" in asked.warning
    assert plan(1024, 1024, 1024, 100, FD_RESERVE).limit == 100


def test_each_body_byte_buys_time_after_the_grace():
    assert body_deadline(10.0, 0, 4096) == 10.0 + MIN_BODY_RATE_GRACE
    assert body_deadline(10.0, 8192, 4096) == 10.0 + MIN_BODY_RATE_GRACE + 2.0
    assert body_deadline(10.0, 10 ** 9, 0) == float("inf")


# -- the server over memory transports --------------------------------------------------------


async def test_a_trickling_body_gets_408_and_its_slot_back(autojump_clock):
    gateway, sink = make_gateway("--min-body-rate", "100", "--body-timeout", "60s")
    # 10 bytes of a 1000-byte body, then nothing: 10 bytes buy 0.1 s after the grace.
    transport = MemoryTransport([post(b"ok"), post(b"x" * 10, length=1000)], eof=False)
    start = trio.current_time()
    await gateway.handle_connection(transport)
    # The 408 after 3.1 s, then the lingering read before closing.
    assert trio.current_time() - start == pytest.approx(MIN_BODY_RATE_GRACE + 0.1 + LINGER_SECONDS, abs=0.01)
    responses = parse_responses(transport.sent)
    assert [r.status for r in responses] == [202, 408]
    assert [split_record(r)[1] for r in sink.records] == [b"ok"]
    assert gateway.ring.used == 0 and gateway.registry.slow_body_timeouts == 1


async def test_a_body_at_the_minimum_rate_is_accepted(autojump_clock):
    gateway, sink = make_gateway("--min-body-rate", "100", "--body-timeout", "60s")

    class Steady(MemoryTransport):
        """200 bytes a second after the head: twice the minimum."""

        async def recv_into(self, view: memoryview) -> int:
            if self._pieces and self._pieces[0][:4] != b"POST":
                await trio.sleep(1.0)
            return await super().recv_into(view)

    head = post(b"", length=1000)
    transport = Steady([head] + [b"y" * 200] * 5)
    await gateway.handle_connection(transport)
    assert [r.status for r in parse_responses(transport.sent)] == [202]
    assert split_record(sink.records[0])[1] == b"y" * 1000


async def test_a_silent_new_connection_is_closed_at_the_head_timeout(autojump_clock):
    gateway, _ = make_gateway("--head-timeout", "5s", "--idle-timeout", "60s")
    start = trio.current_time()
    transport = await serve(gateway, [], eof=False)
    assert trio.current_time() - start == pytest.approx(5.0)
    assert transport.sent == b"" and transport.closed
    assert gateway.registry.first_byte_timeouts == 1 and gateway.connections == 0


async def test_a_connection_holds_no_buffer_between_requests(autojump_clock):
    gateway, _ = make_gateway("--idle-timeout", "60s")
    transport = MemoryTransport([post(b"one")], eof=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_connection, transport)
        await trio.sleep(1.0)
        # Answered and idle: its buffer is back in the pool.
        assert parse_responses(transport.sent)[0].status == 202
        stats = gateway.pool.statistics()
        assert stats["allocated"] == 1 and stats["idle"] == 1
        assert gateway.registry.idle == 1
        nursery.cancel_scope.cancel()


async def test_one_tenant_holds_at_most_its_share_of_the_ring():
    ring = WaitingRing(RingBuffer(1000), max_wait=0.0, max_share=0.5)
    a1 = await ring.reserve(300, b"a")
    await ring.reserve(200, b"a")
    with pytest.raises(Overloaded) as refused:
        await ring.reserve(1, b"a")
    assert refused.value.status == 503 and refused.value.retry_after == 1.0
    b = await ring.reserve(400, b"b")  # another tenant is served
    assert ring.held_by_owners() == {b"a": 500, b"b": 400} and ring.share_refusals == 1
    ring.release(a1)
    await ring.reserve(300, b"a")
    ring.release(b)
    assert ring.held_by_owners() == {b"a": 500}
    with pytest.raises(ValueError):
        WaitingRing(RingBuffer(1000), max_wait=0.0, max_share=0)
