"""Helpers for access-control tests against real gateways and a real Redis.

:func:`post` sends one ingest request with an API key on a fresh loopback
connection and returns the answer as it came over the wire (plus whether a
``100 Continue`` preceded it).  :func:`sluice` runs the ``sluice`` command
(``python -m gateway``) to completion; :func:`wait_until` polls a condition
with a bound, for the few things that settle asynchronously (usage handed to
Redis, a gateway noticing that Redis is back).  :class:`EdgeDouble` stands in
for Redis in tests of the access layer without a server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

from gateway.access.keystore import EdgeUnavailable
from gateway.access.limiter import ScriptCall, UsageDelta
from tests.support.gateway import RawConnection, Response, post_request

__all__ = ["KEY_PATTERN", "Answer", "post", "head_only", "sluice", "wait_until", "assert_no_key",
           "EdgeDouble"]

#: What an API key looks like (gateway.access.limiter: ``sluice1.<tenant>.<secret>``).
KEY_PATTERN = re.compile(r"sluice1\.[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{43}")
#: A CLI run that has not finished by then is stuck.
CLI_TIMEOUT = 60.0


class Answer:
    """A response and what went over the wire before it."""

    def __init__(self, response: Response, saw_continue: bool, seconds: float) -> None:
        self.response = response
        self.saw_continue = saw_continue
        self.seconds = seconds

    @property
    def status(self) -> int:
        return self.response.status

    def header(self, name: str) -> Optional[str]:
        return self.response.header(name)

    def json(self):
        return self.response.json()


def _key_headers(key: Optional[str], header: str) -> list:
    if key is None:
        return []
    if header == "authorization":
        return [("Authorization", "Bearer " + key)]
    return [(header, key)]


def post(address: Tuple[str, int], body: bytes, key: Optional[str], *,
         header: str = "authorization", extra: Sequence[Tuple[str, str]] = ()) -> Answer:
    """POST ``body`` with ``Expect: 100-continue``, sending the body only after the 100.

    A refusal decided from the head arrives instead of the ``100 Continue``,
    and the body is then never sent.
    """
    headers = _key_headers(key, header) + [("Expect", "100-continue")] + list(extra)
    request = post_request(body, headers=headers)
    head_end = len(request) - len(body)
    start = time.monotonic()
    with RawConnection(address) as conn:
        conn.send(request[:head_end])
        first = conn.read_response()
        saw_continue = first.status == 100
        if saw_continue:
            conn.send(request[head_end:])
            first = conn.read_response()
        return Answer(first, saw_continue, time.monotonic() - start)


def head_only(address: Tuple[str, int], key: Optional[str], length: int, *,
              header: str = "authorization") -> Tuple[Response, bytes]:
    """Send only a head announcing ``length`` body bytes; the answer and every byte received."""
    headers = _key_headers(key, header) + [("Expect", "100-continue")]
    request = post_request(b"", headers=headers).replace(
        b"Content-Length: 0", b"Content-Length: %d" % length)
    with RawConnection(address) as conn:
        conn.send(request)
        response = conn.read_response()
        return response, conn.wire


def sluice(*args: str, env: Optional[Mapping[str, str]] = None,
           stdin: bytes = b"") -> subprocess.CompletedProcess:
    """Run ``python -m gateway ARGS`` without the caller's SLUICE_* variables."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          input=stdin, timeout=CLI_TIMEOUT, env=environ, check=False)


def wait_until(condition: Callable[[], object], timeout: float = 15.0,
               interval: float = 0.02, what: str = "condition") -> object:
    """Poll ``condition`` until it is truthy (returned) or ``timeout`` passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s not reached within %gs" % (what, timeout))
        time.sleep(interval)


def assert_no_key(text: str, *secrets: str) -> None:
    """``text`` (a log, an error message) holds no API key and none of ``secrets``."""
    found = KEY_PATTERN.search(text)
    assert found is None, "an API key appears in: %r" % text[max(0, found.start() - 80):found.end()]
    for secret in secrets:
        assert secret not in text, "a secret appears in the text"


class EdgeDouble:
    """Redis as the access layer sees it, without a server: unreachable while
    ``down``, else each check answered by :meth:`replies` (a subclass's)."""

    down = False

    def probe(self) -> None:
        if self.down:
            raise EdgeUnavailable("ConnectionError")

    def run_checks(self, calls: Sequence[ScriptCall], usage: Sequence[Tuple[UsageDelta, int]] = ()
                   ) -> Tuple[List[object], int, int]:
        if self.down:
            raise EdgeUnavailable("ConnectionError")
        return self.replies(calls, usage), 1, 0

    def replies(self, calls: Sequence[ScriptCall], usage: Sequence[Tuple[UsageDelta, int]]) -> List[object]:
        raise NotImplementedError

    def close(self) -> None:
        pass
