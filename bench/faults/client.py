"""A steady-rate load client that keeps the outcome of every request.

Request *n* (from 1) is due at ``start + (n - 1) / rate``; worker threads
take the next due request, wait for its time and send it on their own
keep-alive connection (``http.client``), a new one after an error answer
(the gateway closes the connection) or a failure.  Requests are never
retried: each sequence number is sent once, so the sink's copies of it can
be counted.  The body starts with ``PREFIX N `` (N the sequence number).
Every request due before :meth:`SteadyClient.stop` is sent, late if every
thread was busy.

Outcomes: the status and, for errors, the ``error`` field of the JSON
answer; ``0`` with the exception's name when no answer came (connection
refused while the gateway was down, reset, timeout).
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Dict, List, Optional, Tuple

__all__ = ["Outcome", "SteadyClient"]

#: Seconds a request may wait for its answer.  Far above any answer the
#: gateway gives (--ring-wait, --spool-sync-interval); reached only when a
#: connection hangs.
ANSWER_TIMEOUT = 30.0


class Outcome:
    """What one request got."""

    __slots__ = ("sequence", "due", "sent", "answered", "status", "error", "record_id")

    def __init__(self, sequence: int, due: float) -> None:
        self.sequence = sequence
        self.due = due
        self.sent = 0.0
        self.answered = 0.0
        self.status = 0
        self.error = ""
        self.record_id = ""

    @property
    def kind(self) -> str:
        """``202``, ``503 overloaded`` and the like, or ``no answer (ConnectionRefusedError)``."""
        if self.status == 202:
            return "202"
        if self.status:
            return ("%d %s" % (self.status, self.error)).strip()
        return "no answer (%s)" % self.error


class SteadyClient:
    """``rate`` requests per second to ``address`` until ``stop``; see the module docstring."""

    def __init__(self, address: Tuple[str, int], *, rate: float, body_size: int, prefix: bytes,
                 headers: Optional[Dict[str, str]] = None, threads: int = 16) -> None:
        self.address = address
        self.rate = rate
        self.body_size = body_size
        self.prefix = prefix
        self.headers = dict(headers or {})
        self.headers["Content-Type"] = "application/octet-stream"
        self.outcomes: List[Outcome] = []
        self.start = 0.0
        self._next = 0
        self._stop_at = float("inf")
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._worker, name="fault-load-%d" % n, daemon=True)
                         for n in range(threads)]

    def run(self) -> None:
        """Start sending (returns at once)."""
        self.start = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Send nothing due from now on; wait for the requests in progress."""
        self._stop_at = time.monotonic()
        for thread in self._threads:
            thread.join(ANSWER_TIMEOUT + 10)

    def body(self, sequence: int) -> bytes:
        head = b"%s%d " % (self.prefix, sequence)
        return head + b"x" * max(0, self.body_size - len(head))

    def _take(self) -> Optional[Outcome]:
        with self._lock:
            due = self.start + self._next / self.rate
            if due >= self._stop_at:
                return None
            self._next += 1
            outcome = Outcome(self._next, due)
            self.outcomes.append(outcome)
            return outcome

    def _worker(self) -> None:
        conn: Optional[http.client.HTTPConnection] = None
        while True:
            outcome = self._take()
            if outcome is None:
                break
            delay = outcome.due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if outcome.due >= self._stop_at:
                with self._lock:  # due after the end: not part of the run
                    self.outcomes.remove(outcome)
                break
            if conn is None:
                conn = http.client.HTTPConnection(*self.address, timeout=ANSWER_TIMEOUT)
            outcome.sent = time.monotonic()
            try:
                conn.request("POST", "/v1/logs", body=self.body(outcome.sequence), headers=self.headers)
                response = conn.getresponse()
                reply = response.read()
            except (OSError, http.client.HTTPException, socket.timeout) as exc:
                outcome.error = type(exc).__name__
                conn.close()
                conn = None
            else:
                outcome.status = response.status
                try:
                    doc = json.loads(reply) if reply else {}
                except ValueError:
                    doc = {}
                if response.status == 202:
                    outcome.record_id = doc.get("id", "")
                else:
                    outcome.error = doc.get("error", "")
                if response.will_close:
                    conn.close()
                    conn = None
            outcome.answered = time.monotonic()
        if conn is not None:
            conn.close()

    def snapshot(self) -> List[Outcome]:
        with self._lock:
            return list(self.outcomes)
