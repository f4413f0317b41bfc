"""--ring-trim: the ring's pages unused for a while go back to the kernel.

The ring's own bookkeeping of which pages to give back is in
tests/test_ring.py; here, the setting, the gateway's task that trims, and a
real ``sluice serve`` whose resident memory falls back after a burst held
tens of MB of bodies in its ring.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from buffers import RingBuffer, WaitingRing
from buffers.ring import PAGE
from gateway.cli.serve import RING_TRIM_MOST, trim_ring
from gateway.config.settings import from_args
from tests.support import gateway as _support
from tests.support.gateway import RawConnection, post_request

start_gateway = _support.start_gateway

MiB = 1024 * 1024


def test_ring_trim_is_every_ten_seconds_unless_set():
    assert from_args([], {}).ring_trim == 10.0
    assert from_args(["--ring-trim", "0"], {}).ring_trim == 0
    assert from_args([], {"SLUICE_RING_TRIM": "2s"}).ring_trim == 2.0


async def test_the_gateway_task_gives_back_what_a_burst_left(autojump_clock):
    ring = WaitingRing(RingBuffer(64 * MiB), max_wait=1.0)
    slot = await ring.reserve(10 * MiB)
    slot.view[:PAGE] = b"x" * PAGE
    ring.release(slot)
    gateway = SimpleNamespace(ring=ring)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trim_ring, gateway, 10.0)
        # The burst's interval keeps its pages; each later one gives back
        # RING_TRIM_MOST of them, so 10 MiB are back after 10 + 3 x 10 s.
        await trio.sleep(10 + 10 * -(-10 * MiB // RING_TRIM_MOST) + 1)
        nursery.cancel_scope.cancel()
    assert ring.trim() == 0
    again = await ring.reserve(PAGE)
    assert bytes(again.view) == bytes(PAGE)  # a fresh page: the old one was given back
    ring.release(again)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the gateway's RSS in /proc")
def test_a_gateway_shrinks_back_after_a_burst_of_large_bodies(start_gateway):
    bodies = 24
    gateway = start_gateway("--ring-trim", "1s", "--ring-size", "64MiB")
    request = post_request(b"b" * MiB)
    before = gateway.rss()
    conns = [RawConnection(gateway.address) for _ in range(bodies)]
    try:
        # Every body but its last byte: 24 MiB of the ring written and held at once.
        for conn in conns:
            conn.send(request[:-1])
        deadline = time.monotonic() + 30
        while gateway.rss() < before + (bodies - 4) * MiB:
            assert time.monotonic() < deadline, "the bodies never reached the ring"
            time.sleep(0.1)
        held = gateway.rss()
        for conn in conns:
            conn.send(request[-1:])
        assert [conn.read_response().status for conn in conns] == [202] * bodies
    finally:
        for conn in conns:
            conn.close()
    # At 4 MiB a second after a second's grace, about 8 s; the rest is slack
    # for a busy machine.
    deadline = time.monotonic() + 40
    while gateway.rss() > held - (bodies - 6) * MiB:
        assert time.monotonic() < deadline, (before, held, gateway.rss())
        time.sleep(0.5)
