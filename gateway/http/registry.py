"""Which connections are open, which of them wait, and which one to close for a newcomer.

Theory of operation
-------------------
Agents keep HTTP/1.1 connections open between posts, and a hostile client
can open as many as it likes, so the connection limit must never turn away
a request while most connections merely wait.  :class:`ConnectionRegistry`
knows every open connection and its state:

``new``
    accepted, no byte received yet;
``active``
    a request is being read, handled or answered;
``idle``
    between requests on a connection that has answered at least one.

``new`` and ``idle`` connections *wait*: nothing of theirs is in progress.
They are kept in the order they started waiting.  When a connection arrives
while the limit is reached, :meth:`ConnectionRegistry.admit` closes a waiting
one to make room, so new requests and health checks are served (nginx does
the same with its "reusable" connections, see ``ngx_drain_connections``):

1. the ``new`` connection that has waited longest for its first byte: a
   client that connects and says nothing is the cheapest to lose, and a
   flood of such connections then only displaces itself;
2. if none, the ``idle`` keep-alive connection idle longest: its agent
   reconnects for its next post.

A connection in the middle of a request is never chosen: only waiting ones
are, and what they would send next has not been read, so nothing is
half-accepted and a client that retries sends no duplicate.

Closing is the driver's business: each waiting connection registers a
``cancel`` callable (the server's cancel scope), which the registry calls.
This module does no I/O and imports neither trio nor socket; the transitions
are one table, :data:`TRANSITIONS`.

How many connections a process may hold is :mod:`gateway.http.capacity`'s
question.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Optional, Tuple

__all__ = [
    "NEW",
    "ACTIVE",
    "IDLE",
    "CLOSED",
    "TRANSITIONS",
    "ConnectionStateError",
    "Tracked",
    "ConnectionRegistry",
]

NEW = "new"
ACTIVE = "active"
IDLE = "idle"
CLOSED = "closed"

#: (state, event) -> next state.  Everything that moves a connection is here.
TRANSITIONS: Dict[Tuple[str, str], str] = {
    (NEW, "start"): ACTIVE,  # its first byte arrived
    (NEW, "close"): CLOSED,  # first-byte timeout, eviction, drain, or the client left
    (ACTIVE, "answer"): IDLE,  # answered, keep-alive: waits for the next request
    (ACTIVE, "close"): CLOSED,
    (IDLE, "start"): ACTIVE,
    (IDLE, "close"): CLOSED,
}

class ConnectionStateError(RuntimeError):
    """A connection was moved in a way :data:`TRANSITIONS` does not allow."""


class Tracked:
    """The registry's few words about one connection (a few hundred bytes in all)."""

    __slots__ = ("state", "served", "evicted", "cancel")

    def __init__(self) -> None:
        self.state = NEW
        #: Requests answered on this connection.
        self.served = 0
        #: Closed by :meth:`ConnectionRegistry.admit` to make room.
        self.evicted = False
        #: While waiting: what closes the connection (the driver's cancel).
        self.cancel: Optional[Callable[[], None]] = None

    def __repr__(self) -> str:
        return "<Tracked %s served=%d>" % (self.state, self.served)


class ConnectionRegistry:
    """Every open connection of one process, its state, and the eviction order."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the connection limit must be at least 1")
        self.limit = limit
        #: Waiting connections, longest-waiting first: new ones, then idle ones.
        self._new: OrderedDict[Tracked, None] = OrderedDict()
        self._idle: OrderedDict[Tracked, None] = OrderedDict()
        self.open = 0
        self.idle = 0
        self.new = 0
        #: Connections closed to admit new ones.
        self.evicted = 0
        #: New connections closed for sending nothing within the first-byte timeout.
        self.first_byte_timeouts = 0
        #: Bodies answered 408 for arriving slower than --min-body-rate.
        self.slow_body_timeouts = 0

    @property
    def active(self) -> int:
        """Connections with a request in progress."""
        return self.open - self.idle - self.new

    @property
    def waiting(self) -> int:
        """Connections that could be evicted now (new and idle)."""
        return len(self._new) + len(self._idle)

    def _move(self, conn: Tracked, event: str) -> str:
        state = conn.state
        after = TRANSITIONS.get((state, event))
        if after is None:
            raise ConnectionStateError("connection %s cannot %s" % (state, event))
        if state == NEW:
            self.new -= 1
        elif state == IDLE:
            self.idle -= 1
        if after == NEW:  # pragma: no cover - no transition leads back to new
            self.new += 1
        elif after == IDLE:
            self.idle += 1
        conn.state = after
        return after

    # -- the driver's calls ---------------------------------------------------

    def admit(self) -> Optional[Tracked]:
        """A new connection's entry, or None when the limit is reached and none waits.

        At the limit, a waiting connection is evicted (its ``cancel``
        called, which closes its socket at once) and no longer counts as
        open: the newcomer takes its place.
        """
        if self.open >= self.limit and not self._evict_one():
            return None
        conn = Tracked()
        self.open += 1
        self.new += 1
        self._new[conn] = None
        return conn

    def wait(self, conn: Tracked, cancel: Callable[[], None]) -> bool:
        """``conn`` waits (for its first byte, or for its next request); ``cancel`` closes it.

        False if it was evicted before it could register: it is closed now
        and must not wait.
        """
        conn.cancel = cancel
        if conn.evicted:
            cancel()
            return False
        if conn.state == IDLE:
            self._idle[conn] = None
        return True

    def start(self, conn: Tracked) -> None:
        """Bytes of a request arrived: ``conn`` cannot be evicted until it is answered."""
        if conn.state == ACTIVE:
            return
        self._forget(conn)
        self._move(conn, "start")
        conn.cancel = None

    def answered(self, conn: Tracked) -> None:
        """``conn`` answered a request and stays open for another."""
        self._move(conn, "answer")
        conn.served += 1
        conn.cancel = None
        # Joins the eviction order when it starts waiting (:meth:`wait`).

    def closed(self, conn: Tracked) -> None:
        """``conn`` is closed (idempotent)."""
        if conn.state == CLOSED:
            return
        self._forget(conn)
        self._move(conn, "close")
        conn.cancel = None
        if not conn.evicted:  # an evicted one stopped counting then
            self.open -= 1

    def cancel_waiting(self) -> int:
        """Close every waiting connection (graceful shutdown); how many."""
        count = 0
        for conn in list(self._new) + list(self._idle):
            if conn.cancel is not None:
                conn.cancel()
                count += 1
        return count

    def _forget(self, conn: Tracked) -> None:
        if conn.state == NEW:
            self._new.pop(conn, None)
        elif conn.state == IDLE:
            self._idle.pop(conn, None)

    def _evict_one(self) -> bool:
        for waiting in (self._new, self._idle):
            if waiting:
                conn, _ = waiting.popitem(last=False)
                break
        else:
            return False
        conn.evicted = True
        self.evicted += 1
        self.open -= 1
        if conn.cancel is not None:
            conn.cancel()
        return True

    def statistics(self) -> dict:
        """Counts now: open, new, idle, active, and the closes this module decided or counts."""
        return {"limit": self.limit, "open": self.open, "new": self.new, "idle": self.idle,
                "active": self.active, "evicted": self.evicted,
                "first_byte_timeouts": self.first_byte_timeouts,
                "slow_body_timeouts": self.slow_body_timeouts}
