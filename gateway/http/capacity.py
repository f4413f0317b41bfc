"""How many connections one process can hold, and how slow a body may be.

Every connection costs a file descriptor, so the connection limit follows
the process's ``RLIMIT_NOFILE``.  :func:`connection_capacity` raises the soft
limit to the hard one at start (nginx's ``worker_rlimit_nofile`` does the
same), keeps a reserve for what else the process opens, and says when the
result is low.  The arithmetic (:func:`plan`) is separate from the system
calls, so it is tested with plain numbers.

:func:`body_deadline` is the minimum body rate (``--min-body-rate``): after a
short grace, a body must keep arriving at that rate on average, or the
request is answered ``408`` and its ring slot released.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

__all__ = [
    "FD_RESERVE",
    "AWS_FDS_PER_CALL",
    "MIN_SHARE_OF_FDS",
    "LOW_CONNECTION_LIMIT",
    "FD_CEILING",
    "MIN_BODY_RATE_GRACE",
    "Capacity",
    "connection_limit",
    "fd_reserve",
    "plan",
    "raise_fd_limit",
    "connection_capacity",
    "parse_connections",
    "body_deadline",
]

#: File descriptors kept out of the connection limit: standard streams, the
#: listening socket, epoll and Trio's wake-up pair, the file sink's segment
#: and directory, the spool's segments, Redis connections, the metrics
#: directory's files, /proc reads for RSS, and sockets being refused with
#: 503 (at most 64 at once, gateway.server.MAX_REFUSING).  Measured with the
#: file sink and access control on: about 20 besides the refusals.
FD_RESERVE = 128
#: Kinesis and Firehose sinks: descriptors per request in flight
#: (--max-in-flight), for botocore's connection and a reconnect overlapping it.
AWS_FDS_PER_CALL = 2
#: However low the file-descriptor limit, at least this fraction of it is
#: for connections (with ``ulimit -n 256``: 128 connections, not none).
MIN_SHARE_OF_FDS = 0.25
#: Below this many connections the start-up says so (``connection_capacity``
#: warning event): a fleet of a few thousand agents keeping connections
#: alive would see theirs closed to make room.  Debian's default hard limit
#: (524,288 for services under systemd 240 and later) gives far more.
LOW_CONNECTION_LIMIT = 4096
#: The soft limit is raised at most this far when the hard limit is
#: unlimited (Linux's default fs.nr_open: a higher soft limit is refused).
FD_CEILING = 1 << 20
#: Seconds a body has before --min-body-rate applies: a client's TCP window
#: opens, a 100 Continue goes out and comes back (nginx and Envoy count their
#: body timeouts between reads, which a byte every few seconds satisfies).
MIN_BODY_RATE_GRACE = 3.0


def connection_limit(fd_limit: int, reserve: int = FD_RESERVE) -> int:
    """Connections a process may hold when it may open ``fd_limit`` descriptors."""
    return max(1, fd_limit - reserve, int(fd_limit * MIN_SHARE_OF_FDS))


def fd_reserve(sink: str, max_in_flight: int) -> int:
    """Descriptors kept for everything but connections, for this sink."""
    if sink in ("kinesis", "firehose"):
        return FD_RESERVE + AWS_FDS_PER_CALL * max_in_flight
    return FD_RESERVE


@dataclasses.dataclass(frozen=True)
class Capacity:
    """The connection limit and the file-descriptor limits it came from."""

    #: Connections admitted at once; at the limit, waiting ones are evicted.
    limit: int
    #: The soft RLIMIT_NOFILE before and after raising it, and the hard one.
    fd_soft_before: int
    fd_soft: int
    fd_hard: int
    #: Descriptors kept for the rest (:func:`fd_reserve`).
    reserve: int
    #: ``--max-connections`` (0: auto, from the descriptors).
    requested: int
    #: Non-empty when the limit is low or lower than asked: said at start.
    warning: str = ""

    def fields(self) -> Dict[str, Any]:
        """For the start-up events."""
        return {"max_connections": self.limit, "fd_limit": self.fd_soft, "fd_hard_limit": self.fd_hard,
                "fd_limit_before": self.fd_soft_before, "fd_reserve": self.reserve}


def plan(fd_soft_before: int, fd_soft: int, fd_hard: int, requested: int, reserve: int) -> Capacity:
    """The :class:`Capacity` for these limits (no system calls)."""
    allowed = connection_limit(fd_soft, reserve)
    warning = ""
    if requested:
        limit = min(requested, allowed)
        if requested > allowed:
            warning = ("--max-connections %d needs %d file descriptors but the limit (ulimit -n) is "
                       "%d: at most %d connections; raise the hard limit (LimitNOFILE=, ulimit -Hn)"
                       % (requested, requested + reserve, fd_soft, limit))
    else:
        limit = allowed
        if allowed < LOW_CONNECTION_LIMIT:
            warning = ("file-descriptor limit (ulimit -n) is %d (hard limit %d): at most %d "
                       "connections; when they are all open, the longest idle ones are closed to "
                       "admit new ones; raise the hard limit (LimitNOFILE=, ulimit -Hn) for a fleet "
                       "of agents keeping connections alive" % (fd_soft, fd_hard, limit))
    return Capacity(limit, fd_soft_before, fd_soft, fd_hard, reserve, requested, warning)


def raise_fd_limit() -> Tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one: ``(soft before, soft now, hard)``."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_CEILING if hard == resource.RLIM_INFINITY else hard
    now = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            now = target
        except (ValueError, OSError):
            pass  # e.g. above fs.nr_open: keep what we have
    if now == resource.RLIM_INFINITY:
        now = FD_CEILING
    return soft, now, (FD_CEILING if hard == resource.RLIM_INFINITY else hard)


def connection_capacity(config: Any, limits: Optional[Tuple[int, int, int]] = None) -> Capacity:
    """The :class:`Capacity` of ``config`` (a :class:`~gateway.config.settings.Config`).

    Raises this process's soft file-descriptor limit to the hard one, unless
    ``limits`` (``(soft before, soft now, hard)``) are given.
    """
    before, soft, hard = limits if limits is not None else raise_fd_limit()
    return plan(before, soft, hard, config.max_connections, fd_reserve(config.sink, config.max_in_flight))


def parse_connections(text: str) -> int:
    """``--max-connections``: a whole number, or ``auto`` (0) for one from the descriptor limit."""
    if text.strip().lower() == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise ValueError("not a whole number: %r" % text) from None
    if value < 1:
        raise ValueError("must be at least 1, got %r" % text)
    return value


def body_deadline(started: float, received: int, rate: int, grace: float = MIN_BODY_RATE_GRACE) -> float:
    """When a body that started at ``started`` and has ``received`` bytes falls below ``rate``.

    Each byte buys ``1 / rate`` seconds beyond the grace: a client may pause,
    but not trickle.  ``rate`` 0 means no minimum (infinite deadline).
    """
    if rate <= 0:
        return float("inf")
    return started + grace + received / rate
