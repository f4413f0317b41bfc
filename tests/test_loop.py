"""gateway.observe.loop: the heartbeat that files how long the event loop was held."""

from __future__ import annotations

import time

import trio

from gateway.observe.loop import watch_loop
from gateway.observe.telemetry import LOOP_LAG_BOUNDS, Histogram


async def test_a_task_that_holds_the_loop_shows_as_lag():
    lag = Histogram(LOOP_LAG_BOUNDS)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: watch_loop(lag, interval=0.005, task_status=task_status))
        await trio.sleep(0.02)
        time.sleep(0.06)  # a blocking call by mistake: the heartbeat cannot run
        await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert lag.count >= 2
    # The heartbeat due during the block woke up at least 40 ms late.
    assert lag.max >= 0.04


async def test_an_idle_loop_is_never_filed_as_early():
    lag = Histogram(LOOP_LAG_BOUNDS)
    with trio.move_on_after(0.05):
        await watch_loop(lag, interval=0.005)
    assert lag.count >= 1 and lag.total >= 0.0
