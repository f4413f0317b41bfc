"""Structured logs: one JSON object per line on stderr, for state changes and errors.

Every line is an *event*: ``{"ts": ..., "level": ..., "event": ..., <fields>}``
with ``ts`` in UTC (ISO 8601, milliseconds).  The gateway writes one when it
starts, stops, sees Redis or its sink go down or come back, or meets a bug;
never one per request, except for the opt-in sampled access log
(:class:`AccessLog`).  ``--log-format text`` writes the same events as
``ts level event key=value ...`` lines for people reading a terminal.

Events are rare, so :func:`emit` favours simplicity over speed: ``json.dumps``
of a fresh dict, one write, one flush.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from typing import IO, Any, Dict, Optional

__all__ = ["emit", "configure", "FORMATS", "AccessLog", "EventLimiter"]

#: ``--log-format`` choices.
FORMATS = ("json", "text")

_settings: Dict[str, Any] = {"format": "json", "stream": None}


def configure(*, log_format: str = "json", stream: Optional[IO[str]] = None) -> None:
    """Choose the line format (``json`` or ``text``) and the stream (default: stderr at each call)."""
    if log_format not in FORMATS:
        raise ValueError("log format must be one of %s, not %r" % (", ".join(FORMATS), log_format))
    _settings["format"] = log_format
    _settings["stream"] = stream


def _timestamp(now: float) -> str:
    seconds = int(now)
    return "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)),
                         int((now - seconds) * 1000))


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\\\n\t'):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return json.dumps(value, separators=(",", ":"), default=str)


def render(record: Dict[str, Any], log_format: str = "json") -> str:
    """One event as a line (without the newline)."""
    if log_format == "json":
        return json.dumps(record, separators=(",", ":"), default=str)
    head = "%s %s %s" % (record["ts"], record["level"], record["event"])
    rest = " ".join("%s=%s" % (key, _text_value(value)) for key, value in record.items()
                    if key not in ("ts", "level", "event"))
    return head + " " + rest if rest else head


def emit(event: str, level: str = "info", **fields: Any) -> None:
    """Write one event: ``event`` names what happened, ``fields`` say the rest.

    ``level`` is ``info``, ``warning`` or ``error``.  Values must be JSON
    types (others are written as their ``str``).  A stderr that cannot be
    written to (closed, a broken pipe) loses the line rather than stopping the
    gateway.
    """
    record: Dict[str, Any] = {"ts": _timestamp(time.time()), "level": level, "event": event}
    record.update(fields)
    line = render(record, _settings["format"])
    stream = _settings["stream"] or sys.stderr
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


class EventLimiter:
    """Lets an event that can happen on every request be logged at most once per ``interval``.

    :meth:`due` counts one occurrence at ``now`` and returns how many there
    were since the last logged one when it is time to log again (the caller
    logs them as one event with that ``count``), else 0.
    """

    __slots__ = ("interval", "_logged_at", "_count")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._logged_at = -math.inf
        self._count = 0

    def due(self, now: float) -> int:
        self._count += 1
        if now - self._logged_at < self.interval:
            return 0
        count, self._count, self._logged_at = self._count, 0, now
        return count


class AccessLog:
    """The sampled access log: an ``access`` event for about ``rate`` of the requests.

    Requests are picked at random, each with probability ``rate`` (0 < rate
    <= 1), by counting down a geometrically distributed gap: a request that is
    not logged costs one decrement and one comparison.  The server calls
    :meth:`request` only when the log is on, so with ``--access-log-sample 0``
    the whole cost is the test for None.
    """

    __slots__ = ("rate", "_rng", "_left", "_log_keep")

    def __init__(self, rate: float, rng: Optional[random.Random] = None) -> None:
        if not 0.0 < rate <= 1.0:
            raise ValueError("sample rate must be above 0 and at most 1, not %r" % rate)
        self.rate = rate
        self._rng = rng or random.Random()
        # log(1 - rate) is -inf at rate 1: every request is logged.
        self._log_keep = math.log1p(-rate) if rate < 1.0 else -math.inf
        self._left = self._gap()

    def _gap(self) -> int:
        """Requests until the next logged one, counting it (geometric, mean 1 / rate)."""
        if self._log_keep == -math.inf:
            return 1
        uniform = 1.0 - self._rng.random()  # in (0, 1]
        return 1 + int(math.log(uniform) / self._log_keep)

    def request(self, method: Optional[bytes], path: Optional[bytes], status: int,
                body_bytes: Optional[int], started: Optional[float]) -> None:
        """Count one answered request and log it if it is picked.

        ``started`` is the ``time.perf_counter()`` when its head was parsed
        (None when the head never was); ``body_bytes`` its Content-Length.
        """
        self._left -= 1
        if self._left > 0:
            return
        self._left = self._gap()
        emit("access", method=method.decode("latin-1") if method is not None else None,
             path=path.decode("latin-1") if path is not None else None, status=status,
             bytes=body_bytes,
             duration=round(time.perf_counter() - started, 6) if started is not None else None)
