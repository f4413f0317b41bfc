"""Time limits of one connection that move as it goes: the driver's side of
:mod:`gateway.http.capacity` and :mod:`gateway.http.registry`.

:class:`Deadline` is a connection's one cancel scope, whose deadline moves
from phase to phase (first byte, idle, head, body, answer) and, while a body
arrives, with each received byte (``--min-body-rate``).  :func:`closer` is
how the registry closes a waiting connection it evicts: cancel its wait and
close its socket at once, so the descriptor is free for the newcomer.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import trio

from gateway.http.capacity import body_deadline
from gateway.http.connection import RequestHead
from gateway.http.transport import Transport

__all__ = ["Deadline", "closer"]


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

    __slots__ = ("scope", "phase", "head", "parsed", "rate", "body_started", "body_end")

    FIRST_BYTE, IDLE, HEAD, BODY, SINK, SEND, ERROR = (
        "first_byte", "idle", "head", "body", "sink", "send", "error")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
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
        self.scope.deadline = trio.current_time() + seconds

    def pace(self, rate: int) -> None:
        """From now on the body must also keep ``rate`` bytes/s after a grace (0: no minimum)."""
        self.rate = rate
        if rate:
            self.body_started = trio.current_time()
            self.body_end = self.scope.deadline
            self.scope.deadline = min(self.body_end, body_deadline(self.body_started, 0, rate))

    def received(self, count: int) -> None:
        """``count`` body bytes have arrived so far: the pace's deadline moves on."""
        if self.rate:
            self.scope.deadline = min(self.body_end, body_deadline(self.body_started, count, self.rate))

    @property
    def too_slow(self) -> bool:
        """Whether the body's pace, not its ``--body-timeout``, sets the deadline."""
        return bool(self.rate) and self.scope.deadline < self.body_end
