"""Send one log record to a Sluice gateway, retrying when the gateway says to.

Standard library only (``http.client``), Python 3.9 or later; copy it into an
application as it is.

    from agent_example import post_log

    outcome = post_log("https://logs.example.com/v1/logs", b'{"path":"/users","status":200}',
                       api_key=os.environ["LOG_API_KEY"])
    if not outcome.delivered:
        keep_for_later(outcome)   # e.g. a local file sent on the next run

What is retried (:func:`retry_delay` decides, without I/O):

* ``429`` (rate limited) and ``503`` (gateway overloaded, Redis or sink
  unavailable, shutting down): after ``Retry-After`` seconds plus a random
  part of a second, so agents refused together do not come back together.
  A ``Retry-After`` over ``max_wait`` (a monthly quota used up answers with
  the time until next month) is not waited for: the call returns at once.
* ``408`` and, from a load balancer in front, ``502`` and ``504``; and no
  answer at all (refused, reset, timed out): exponential backoff with full
  jitter.  A request whose answer was lost may have been stored, so a record
  can arrive twice (delivery is at least once; the gateway's ``id`` differs).
* Any other status is final: ``202`` is stored, another ``4xx`` means the
  request itself is wrong (``400``, ``401``, ``403``, ``413``...) and sending
  it again would get the same answer.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import time
import urllib.parse
from typing import Callable, NamedTuple, Optional

__all__ = ["Outcome", "post_log", "retry_delay", "parse_retry_after", "RETRY_STATUSES"]

#: Statuses worth sending the same request again for.  The gateway answers
#: 408, 429 and 503 itself; 502 and 504 come from a load balancer whose
#: target went away (a deploy, a crash).
RETRY_STATUSES = frozenset((408, 429, 502, 503, 504))
#: Attempts per record, the first included: with the backoff below about a
#: minute of trying before the record is handed back to the caller.
DEFAULT_MAX_ATTEMPTS = 8
#: Longest ``Retry-After`` waited for.  The gateway's own are seconds (rate
#: limits, overload); a quota answer names the next month, not worth a wait.
DEFAULT_MAX_WAIT = 60.0
#: Socket timeout (connect, each read).  Above the gateway's default
#: --retry-deadline (30 s): with --ack kinesis the 202 comes only once Kinesis
#: stored the record, and a client that gives up earlier sends it twice.
DEFAULT_TIMEOUT = 40.0
#: Backoff without a Retry-After: full jitter over BASE * 2**attempt, capped.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
#: ``Retry-After`` counts whole seconds; waiting up to one second more
#: spreads agents that were refused in the same second.
RETRY_AFTER_JITTER = 1.0


class Outcome(NamedTuple):
    """The last answer: ``status`` (None if none came), its body, attempts made."""

    status: Optional[int]
    body: bytes
    attempts: int

    @property
    def delivered(self) -> bool:
        """Whether the gateway holds the record (``202``)."""
        return self.status == 202

    @property
    def record_id(self) -> Optional[str]:
        """The record's id from a ``202`` answer."""
        if not self.delivered:
            return None
        return json.loads(self.body)["id"]


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds from a ``Retry-After`` value (delay-seconds or an HTTP-date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def retry_delay(status: Optional[int], retry_after: Optional[str], attempt: int, *,
                random_fraction: float, now: float,
                max_wait: float = DEFAULT_MAX_WAIT) -> Optional[float]:
    """Seconds to wait before sending again, or None not to send again.

    ``status`` is None when no answer came; ``attempt`` counts from 1 (the
    attempt that just failed); ``random_fraction`` is in [0, 1).
    """
    if status is not None and status not in RETRY_STATUSES:
        return None
    asked = parse_retry_after(retry_after, now) if status is not None else None
    if asked is not None:
        if asked > max_wait:
            return None
        return asked + random_fraction * RETRY_AFTER_JITTER
    return random_fraction * min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))


def _connect(scheme: str, host: str, port: Optional[int], timeout: float) -> http.client.HTTPConnection:
    if scheme == "https":
        return http.client.HTTPSConnection(host, port, timeout=timeout)
    return http.client.HTTPConnection(host, port, timeout=timeout)


def post_log(url: str, body: bytes, *, api_key: Optional[str] = None,
             content_type: str = "application/json", content_encoding: Optional[str] = None,
             max_attempts: int = DEFAULT_MAX_ATTEMPTS, max_wait: float = DEFAULT_MAX_WAIT,
             timeout: float = DEFAULT_TIMEOUT,
             connection: Optional[http.client.HTTPConnection] = None,
             sleep: Callable[[float], None] = time.sleep,
             random_fraction: Callable[[], float] = random.random) -> Outcome:
    """POST ``body`` to ``url`` (``.../v1/logs``) until it is stored or not worth retrying.

    ``connection`` is an ``http.client`` connection to keep between calls
    (keep-alive); without one, a connection is opened for this call and
    closed after it.  ``sleep`` and ``random_fraction`` are there for tests.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http:// or https:// URL: %r" % url)
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    headers = {"Content-Type": content_type}
    if content_encoding:
        headers["Content-Encoding"] = content_encoding
    if api_key:
        headers["Authorization"] = "Bearer " + api_key
    conn = connection if connection is not None else _connect(parts.scheme, parts.hostname, parts.port,
                                                              timeout)
    status: Optional[int] = None
    answer = b""
    try:
        for attempt in range(1, max_attempts + 1):
            reused = conn.sock is not None
            retry_after: Optional[str] = None
            try:
                conn.request("POST", target, body=body, headers=headers)
                response = conn.getresponse()
                status, answer = response.status, response.read()
                retry_after = response.getheader("Retry-After")
            except (OSError, http.client.HTTPException):
                conn.close()
                status, answer = None, b""
                if reused and attempt < max_attempts:
                    continue  # a keep-alive connection the server had closed: at once
            if attempt == max_attempts:
                break
            delay = retry_delay(status, retry_after, attempt, random_fraction=random_fraction(),
                                now=time.time(), max_wait=max_wait)
            if delay is None:
                break
            sleep(delay)
    finally:
        if connection is None:
            conn.close()
    return Outcome(status, answer, attempt)
