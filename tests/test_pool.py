"""Reusable receive buffers."""

from __future__ import annotations

import pytest

from buffers import BufferPool


def test_buffers_are_reused():
    pool = BufferPool(64, keep=2)
    first = pool.borrow()
    assert isinstance(first, bytearray) and len(first) == 64
    pool.give_back(first)
    assert pool.borrow() is first
    assert pool.statistics() == {"size": 64, "idle": 0, "allocated": 1}


def test_borrowing_beyond_what_is_idle_allocates():
    pool = BufferPool(16, keep=4)
    buffers = [pool.borrow() for _ in range(3)]
    assert len({id(b) for b in buffers}) == 3
    assert pool.allocated == 3


def test_at_most_keep_buffers_are_kept():
    pool = BufferPool(16, keep=2)
    buffers = [pool.borrow() for _ in range(5)]
    for buffer in buffers:
        pool.give_back(buffer)
    assert pool.statistics()["idle"] == 2
    again = [pool.borrow() for _ in range(3)]
    assert sum(1 for b in again if any(b is old for old in buffers)) == 2
    assert pool.allocated == 6


def test_foreign_buffer_is_refused():
    pool = BufferPool(16, keep=2)
    with pytest.raises(ValueError):
        pool.give_back(bytearray(15))
    assert pool.statistics()["idle"] == 0


async def test_gateway_gives_the_receive_buffer_back_after_each_connection():
    from gateway.http.transport import MemoryTransport
    from tests.support.units import get, make_gateway

    gateway, _ = make_gateway()
    for _ in range(5):
        await gateway.handle_connection(MemoryTransport([get(b"/healthz")]))
        await gateway.handle_connection(MemoryTransport([b"garbage\r\n\r\n"]))
    stats = gateway.statistics()["receive_buffers"]
    assert stats["allocated"] == 1 and stats["idle"] == 1
