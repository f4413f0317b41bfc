"""Time limits of one connection that move as it goes: the driver's side of
:mod:`gateway.http.capacity` and :mod:`gateway.http.registry`.

:class:`Deadline` is a connection's one cancel scope, whose deadline moves
from phase to phase (first byte, idle, head, body, answer) and, while a body
arrives, with each received byte (``--min-body-rate``).  :func:`closer` is
how the registry closes a waiting connection it evicts: cancel its wait and
close its socket at once, so the descriptor is free for the newcomer.

While the gateway serves, the deadlines are kept on a :class:`TimerWheel`
(buckets of :data:`TICK` seconds) that one task, :meth:`Timeouts.run`,
checks, rather than on the cancel scope: Trio's deadline heap takes a new
entry (a tuple and two boxed numbers) each time a deadline moves, and a
connection's moves three times a request; the entries lived until the heap
was pruned, so on PyPy young collections moved thousands a second to the
old generation.  On the wheel, a deadline moved later costs nothing until
its bucket comes due, and one moved earlier is a list append.  A deadline
passes at most one tick late and never early.  A `Deadline` made without a running
`Timeouts` sets its scope's deadline, as before.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Callable, Dict, List, Optional

import trio

from gateway.http.capacity import body_deadline
from gateway.http.connection import RequestHead
from gateway.http.transport import Transport

__all__ = ["Deadline", "TimerWheel", "Timeouts", "TICK", "closer"]

#: Width of a timer wheel bucket, in seconds: how late a deadline may pass.
TICK = 0.1


class TimerWheel:
    """Deadlines in buckets of ``tick`` seconds (sans I/O: the caller tells the time).

    An entry is any object with ``at`` (its deadline, inf for none) and
    ``bucket`` (the bucket it is filed in, None if none) attributes, which
    the wheel owns.  A deadline moved later stays where it is filed and is
    filed again when that bucket comes due; one moved earlier is filed in
    its earlier bucket, leaving a stale reference that is dropped when the
    later one comes due.  So a connection whose deadline moves later at each
    phase of each request (answer, idle, next body) costs the wheel nothing
    until its bucket comes due.
    """

    def __init__(self, tick: float = TICK) -> None:
        self.tick = tick
        self._buckets: Dict[int, List[Any]] = {}
        #: Bucket numbers, earliest first.
        self._order: List[int] = []
        #: References held in the buckets, stale ones included.
        self.references = 0
        #: Entries filed (each counted once).
        self.live = 0

    def file(self, entry: Any, at: float) -> bool:
        """Set ``entry``'s deadline; whether the earliest bucket is now earlier."""
        entry.at = at
        if at == math.inf:
            if entry.bucket is not None:
                entry.bucket = None
                self.live -= 1
            return False
        number = int(at / self.tick) + 1
        if entry.bucket is None:
            self.live += 1
        elif entry.bucket <= number:
            return False  # looked at again when its bucket comes due
        return self._put(entry, number)

    def next_due(self) -> float:
        """When the earliest bucket comes due (inf: none)."""
        return self._order[0] * self.tick if self._order else math.inf

    def expired(self, now: float) -> List[Any]:
        """Take the entries whose deadline passed by ``now`` (their ``bucket`` is cleared)."""
        out: List[Any] = []
        order, buckets = self._order, self._buckets
        while order and order[0] * self.tick <= now:
            number = heapq.heappop(order)
            bucket = buckets.pop(number)
            self.references -= len(bucket)
            for entry in bucket:
                if entry.bucket != number:
                    continue  # filed earlier since, or taken off
                if entry.at <= now:
                    entry.bucket = None
                    self.live -= 1
                    out.append(entry)
                else:
                    self._put(entry, int(entry.at / self.tick) + 1)
        return out

    def _put(self, entry: Any, number: int) -> bool:
        entry.bucket = number
        self.references += 1
        bucket = self._buckets.get(number)
        if bucket is not None:
            bucket.append(entry)
            return False
        self._buckets[number] = [entry]
        earliest = not self._order or number < self._order[0]
        heapq.heappush(self._order, number)
        return earliest


class Timeouts:
    """The connections' deadlines while the gateway serves: a `TimerWheel` and its task."""

    def __init__(self, tick: float = TICK) -> None:
        self.wheel = TimerWheel(tick)
        #: Whether :meth:`run` checks the wheel (else deadlines use their scopes).
        self.running = False
        self._kick = trio.Event()
        #: Connections cancelled because their deadline passed.
        self.passed = 0

    def file(self, deadline: Deadline, at: float) -> None:
        if self.wheel.file(deadline, at):
            self._kick.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Cancel each connection whose deadline passed, until cancelled."""
        wheel = self.wheel
        self.running = True
        task_status.started()
        try:
            while True:
                due = wheel.next_due()
                if due > trio.current_time():
                    with trio.move_on_at(due):
                        await self._kick.wait()
                    if self._kick.is_set():
                        self._kick = trio.Event()
                for deadline in wheel.expired(trio.current_time()):
                    self.passed += 1
                    deadline.scope.cancel()  # type: ignore[attr-defined]
        finally:
            self.running = False


def closer(scope: trio.CancelScope, transport: Transport) -> Callable[[], None]:
    """What closes a waiting connection: at once, so its descriptor is free for the next."""
    def close() -> None:
        scope.cancel()
        transport.close()
    return close


class Deadline:
    """One connection's time limit: a cancel scope whose deadline moves.

    A fresh cancel scope per wait (first byte, idle, head, body, answer)
    costs several objects per request; the connection keeps one, entered
    once, and moves its deadline as a request goes from phase to phase.  When
    it expires (or the connection is evicted while waiting) the connection is
    over, and :attr:`phase` says what was being waited for.

    While a body arrives, ``--min-body-rate`` moves the deadline too
    (:meth:`pace`, :meth:`received`): it is the earlier of the body's
    ``--body-timeout`` and the time the bytes so far pay for.
    """

    __slots__ = ("scope", "phase", "head", "parsed", "rate", "body_started", "body_end",
                 "at", "bucket", "_timeouts")

    FIRST_BYTE, IDLE, HEAD, BODY, SINK, SEND, ERROR = (
        "first_byte", "idle", "head", "body", "sink", "send", "error")

    def __init__(self, timeouts: Optional[Timeouts] = None) -> None:
        self.scope = trio.CancelScope()
        #: The deadline (inf: none); where `Timeouts` filed it.
        self.at = math.inf
        self.bucket: Optional[int] = None
        self._timeouts = timeouts if timeouts is not None and timeouts.running else None
        self.phase = self.FIRST_BYTE
        #: The request being served (None before its head is read), for the access log.
        self.head: Optional[RequestHead] = None
        self.parsed = 0.0
        #: The body's minimum rate while it is paced (0: not paced).
        self.rate = 0
        self.body_started = 0.0
        #: The body's own deadline (--body-timeout) while it is paced.
        self.body_end = math.inf

    def start(self, phase: str, seconds: float) -> None:
        """Wait at most ``seconds`` from now for ``phase`` (inf: no limit)."""
        self.phase = phase
        self.rate = 0
        self._set(trio.current_time() + seconds)

    def pace(self, rate: int) -> None:
        """From now on the body must also keep ``rate`` bytes/s after a grace (0: no minimum)."""
        self.rate = rate
        if rate:
            self.body_started = trio.current_time()
            self.body_end = self.at
            self._set(min(self.body_end, body_deadline(self.body_started, 0, rate)))

    def received(self, count: int) -> None:
        """``count`` body bytes have arrived so far: the pace's deadline moves on."""
        if self.rate:
            self._set(min(self.body_end, body_deadline(self.body_started, count, self.rate)))

    def close(self) -> None:
        """The connection is over: take its deadline off the wheel."""
        self._set(math.inf)

    @property
    def too_slow(self) -> bool:
        """Whether the body's pace, not its ``--body-timeout``, sets the deadline."""
        return bool(self.rate) and self.at < self.body_end

    def _set(self, at: float) -> None:
        timeouts = self._timeouts
        if timeouts is None:
            self.at = at
            self.scope.deadline = at
        elif at != self.at:
            timeouts.file(self, at)
