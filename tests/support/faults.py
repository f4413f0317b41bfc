"""Faults under load: a proxy that delays or refuses, a Kinesis fake with standing faults, steady clients.

:class:`FaultProxy` is a threaded TCP proxy on a free loopback port in front
of a real server (Redis, the Kinesis fake).  ``delay`` holds back what the
server sends for that many seconds, as a delay line (each chunk leaves
``delay`` after it arrived, so a slow server stays slow rather than stuck);
:meth:`FaultProxy.down` resets every connection and stops listening
(connection refused: the server is unreachable), :meth:`FaultProxy.up`
listens again on the same port.

:class:`FaultyStreams` is :class:`tests.support.kinesis.FakeStreams` with a
standing fault: while ``standing`` holds a :class:`Plan`, every put gets it.

:class:`SteadyLoad` posts from a few client threads, each request on a new
connection, until stopped, and keeps every answer (:class:`Answer`); run it
next to an in-process gateway with :func:`steady_load`.  :class:`Watch`
samples the gateway's ring and the process's RSS meanwhile, and
:func:`tally` compares what was acknowledged with what the sink stored.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
import time
from typing import AsyncIterator, Callable, Dict, List, Mapping, Optional, Tuple

import trio

from gateway.observe.telemetry import rss_bytes
from tests.support.kinesis import FakeStreams, Plan
from tests.support.sinks import http_exchange

__all__ = [
    "FaultProxy",
    "FaultyStreams",
    "Answer",
    "SteadyLoad",
    "steady_load",
    "Watch",
    "watching",
    "Tally",
    "tally",
    "wait_until",
]

#: Bytes read per chunk by the proxy.
CHUNK = 65536
#: How often the proxy's threads look at their stop flags (seconds).
POLL = 0.02
#: Seconds between two requests of one client thread: a steady trickle that
#: a two-core machine running the gateway beside the clients keeps up with.
PACE = 0.004
#: Seconds a test waits for something that takes milliseconds to a few
#: seconds (a retry after backoff); reached only when something is broken.
WAIT = 30.0
#: Seconds between two samples of the gateway's memory.
SAMPLE_INTERVAL = 0.05


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST rather than a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One proxied connection: a thread per direction."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.closed = threading.Event()
        self._finished = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        for src, dst, delayed in ((self.client, self.server, False), (self.server, self.client, True)):
            threading.Thread(target=self._pump, args=(src, dst, delayed), daemon=True,
                             name="fault-proxy-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket, delayed: bool) -> None:
        line: List[Tuple[float, bytes]] = []  # (due, chunk), oldest first
        eof = False
        try:
            while not self.closed.is_set():
                now = time.monotonic()
                while line and line[0][0] <= now:
                    dst.sendall(line.pop(0)[1])
                if eof and not line:
                    dst.shutdown(socket.SHUT_WR)
                    self._finish()
                    return
                timeout = POLL if not line else min(POLL, max(0.0, line[0][0] - now))
                if eof:
                    time.sleep(timeout)
                    continue
                readable, _, _ = select.select([src], [], [], timeout)
                if not readable:
                    continue
                chunk = src.recv(CHUNK)
                if not chunk:
                    eof = True
                    continue
                delay = self.proxy.delay if delayed else 0.0
                line.append((time.monotonic() + delay, chunk))
        except (OSError, ValueError):
            self.close()  # reset by either side, or by down()

    def _finish(self) -> None:
        """One direction ended with a FIN; once both have, close without a reset."""
        with self._lock:
            self._finished += 1
            if self._finished < 2 or self.closed.is_set():
                return
            self.closed.set()
        self.client.close()
        self.server.close()
        self.proxy._forget(self)

    def close(self) -> None:
        """Reset both sides (idempotent)."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        _reset(self.client)
        _reset(self.server)
        self.proxy._forget(self)


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of ``target``; see the module docstring."""

    def __init__(self, target: Tuple[str, int]) -> None:
        self.target = target
        #: Seconds added to everything the target sends back.
        self.delay = 0.0
        self.port = 0
        self._links: List[_Link] = []
        self._lock = threading.Lock()
        self._listener: Optional[socket.socket] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.up()

    @property
    def address(self) -> Tuple[str, int]:
        return "127.0.0.1", self.port

    def url(self, scheme: str = "http", path: str = "") -> str:
        return "%s://127.0.0.1:%d%s" % (scheme, self.port, path)

    def up(self) -> None:
        """Listen (again, on the same port once it had one)."""
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, args=(listener, self._stop), daemon=True,
                                        name="fault-proxy-accept")
        self._thread.start()

    def down(self) -> None:
        """Reset every connection and stop listening: new connections are refused."""
        listener, self._listener = self._listener, None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if listener is not None:
            listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    def stop(self) -> None:
        self.down()

    def _accept(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            readable, _, _ = select.select([listener], [], [], POLL)
            if not readable:
                continue
            try:
                client, _ = listener.accept()
            except OSError:
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            server.settimeout(None)
            client.settimeout(None)
            link = _Link(self, client, server)
            with self._lock:
                self._links.append(link)
            link.start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            if link in self._links:
                self._links.remove(link)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class FaultyStreams(FakeStreams):
    """A :class:`FakeStreams` whose puts all get ``standing`` while it is set."""

    standing: Optional[Plan] = None

    def handle(self, target: str, body: bytes) -> Tuple[str, int, bytes, float]:
        plan = self.standing
        if plan is not None and not target.endswith(".DescribeStreamSummary"):
            with self.lock:
                self.plans.appendleft(plan)
        return super().handle(target, body)


# -- clients -------------------------------------------------------------------


class Answer:
    """One request of a :class:`SteadyLoad` and how it ended."""

    __slots__ = ("body", "sent_at", "answered_at", "status", "error", "record_id")

    def __init__(self, body: bytes, sent_at: float) -> None:
        self.body = body
        self.sent_at = sent_at
        self.answered_at = 0.0
        #: 0 when no answer came (connection refused, reset, closed early).
        self.status = 0
        #: The ``error`` of an error answer, or why there was none.
        self.error = ""
        self.record_id = ""

    @property
    def seconds(self) -> float:
        return self.answered_at - self.sent_at


_HEAD = b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"


class SteadyLoad:
    """Client threads posting ``body_size``-byte bodies, one request per connection, until stopped."""

    def __init__(self, port: int, *, clients: int = 3, body_size: int = 1000,
                 headers: bytes = b"", tag: bytes = b"load") -> None:
        self.port = port
        self.clients = clients
        self.body_size = body_size
        self.headers = headers
        self.tag = tag
        self.answers: List[Answer] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def client(self, number: int) -> None:
        """One client's loop (blocking): post until :meth:`stop`."""
        sequence = 0
        while not self.stopping.is_set():
            sequence += 1
            head = b"%s %d:%d " % (self.tag, number, sequence)
            body = head + b"." * max(0, self.body_size - len(head))
            answer = Answer(body, time.monotonic())
            request = _HEAD % (len(body), self.headers)
            try:
                status, _, reply = http_exchange(self.port, request, body)
            except (OSError, IndexError, ValueError) as exc:
                answer.error = type(exc).__name__  # no whole answer: not acknowledged
            else:
                answer.status = status
                doc = json.loads(reply) if reply else {}
                answer.record_id = doc.get("id", "") if status == 202 else ""
                answer.error = doc.get("error", "")
            answer.answered_at = time.monotonic()
            with self._lock:
                self.answers.append(answer)
            time.sleep(PACE)

    def stop(self) -> None:
        self.stopping.set()

    def count(self, status: int = 202, since: float = 0.0) -> int:
        """Answers with ``status`` to requests sent at or after ``since`` (time.monotonic)."""
        with self._lock:
            return sum(1 for a in self.answers if a.status == status and a.sent_at >= since)

    def between(self, start: float, end: float) -> List[Answer]:
        """Answers to requests sent within ``[start, end)``."""
        with self._lock:
            return [a for a in self.answers if start <= a.sent_at < end]

    def snapshot(self) -> List[Answer]:
        with self._lock:
            return list(self.answers)


@contextlib.asynccontextmanager
async def steady_load(port: int, **options) -> AsyncIterator[SteadyLoad]:
    """A running :class:`SteadyLoad` (keywords as its constructor); stopped and joined on exit.

    The client threads are Trio worker threads, so leaving the block waits
    for their last requests without blocking the gateway in this run.
    """
    load = SteadyLoad(port, **options)
    async with trio.open_nursery() as nursery:
        for number in range(load.clients):
            nursery.start_soon(trio.to_thread.run_sync, load.client, number)
        try:
            yield load
        finally:
            load.stop()


async def wait_until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout``."""
    deadline = trio.current_time() + timeout
    while not condition():
        if trio.current_time() > deadline:
            raise AssertionError("%s: not reached within %gs" % (what, timeout))
        await trio.sleep(0.02)


# -- memory --------------------------------------------------------------------


class Watch:
    """Samples of a gateway's ring and of this process's RSS."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self.ring_peak = 0
        self.rss: List[Tuple[float, int]] = []

    def sample(self) -> None:
        ring = self.gateway.ring
        self.ring_peak = max(self.ring_peak, ring.used)
        rss = rss_bytes()
        if rss is not None:
            self.rss.append((time.monotonic(), rss))

    def rss_growth(self, since: float) -> int:
        """Most RSS above the first sample taken at or after ``since``."""
        later = [rss for at, rss in self.rss if at >= since]
        return max(later) - later[0] if later else 0


@contextlib.asynccontextmanager
async def watching(gateway) -> AsyncIterator[Watch]:
    """A :class:`Watch` sampling every `SAMPLE_INTERVAL` for the body of the block."""
    watch = Watch(gateway)

    async def sampler() -> None:
        while True:
            watch.sample()
            await trio.sleep(SAMPLE_INTERVAL)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        try:
            yield watch
        finally:
            watch.sample()
            nursery.cancel_scope.cancel()


# -- what was acknowledged against what was stored -------------------------------


class Tally:
    """Counts of one run: requests sent, acknowledged, refused (by ``status error``), lost."""

    def __init__(self) -> None:
        self.sent = 0
        self.acknowledged = 0
        self.refused: Dict[str, int] = {}
        self.no_answer = 0
        self.lost: List[str] = []

    def as_dict(self) -> dict:
        return {"sent": self.sent, "acknowledged": self.acknowledged, "refused": dict(self.refused),
                "no_answer": self.no_answer, "lost": len(self.lost)}


def tally(answers: List[Answer], stored: Mapping[str, bytes]) -> Tally:
    """Compare ``answers`` with ``stored`` (record id -> body): every 202 must be there, byte for byte."""
    result = Tally()
    for answer in answers:
        result.sent += 1
        if answer.status == 202:
            result.acknowledged += 1
            if stored.get(answer.record_id) != answer.body:
                result.lost.append(answer.record_id)
        elif answer.status:
            key = "%d %s" % (answer.status, answer.error)
            result.refused[key] = result.refused.get(key, 0) + 1
        else:
            result.no_answer += 1
    return result
