"""How long the event loop was busy when it should have been free: loop stalls.

A heartbeat task sleeps `HEARTBEAT` seconds at a time and files how late it
woke up in a :class:`~gateway.observe.telemetry.Histogram`.  A late wake-up
means some task held the loop (a long parse, a large encode, a GC pause, a
blocking call by mistake) for about that long.  It is sampled: a stall of
``s`` seconds is seen with a probability of about ``s / HEARTBEAT``, so the
histogram shows the shape of the stalls, not their count.  Exported on
``/metrics`` as ``sluice_event_loop_lag_seconds``.
"""

from __future__ import annotations

import time

import trio

from gateway.observe.telemetry import Histogram

__all__ = ["HEARTBEAT", "watch_loop"]

#: Seconds between heartbeats: 40 wake-ups a second cost about 0.1% of a
#: core, and catch a 1 ms stall about once in 25.
HEARTBEAT = 0.025


async def watch_loop(lag: Histogram, *, interval: float = HEARTBEAT,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """File the loop's lateness into ``lag`` every ``interval`` seconds, until cancelled."""
    clock = time.perf_counter
    task_status.started()
    while True:
        due = clock() + interval
        await trio.sleep(interval)
        late = clock() - due
        lag.add(late if late > 0.0 else 0.0)
