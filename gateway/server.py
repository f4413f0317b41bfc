"""The Trio server: accept connections, read requests, hand records to the sink.

Theory of operation
-------------------
:class:`Gateway` owns the ring, the sink and the listening sockets.  Each
connection is one task running :meth:`Gateway.handle_connection` over a
:class:`~gateway.http.transport.Transport`; the HTTP bookkeeping is the sans-I/O
:class:`~gateway.http.connection.HTTPConnection`, and this module only moves bytes and
applies time limits.

An ingest request goes: head parsed and checked (route, length, framing) ->
access control when ``--redis`` is on (API key, tenant status, rate limits and
monthly quotas, all decided from the head: :mod:`gateway.access.control`) -> the
sink's record keys and record size limit ->
envelope written into a freshly reserved ring slot -> ``100 Continue`` if the
client waits for it -> body received straight into the slot -> slot committed
and handed to the sink -> ``202``.  ``POST /otlp/v1/logs`` goes the same
way and answers as OTLP/HTTP does (:mod:`gateway.otlp`).  Any
:class:`~gateway.errors.RequestError` on the way is answered with its status,
and the connection is closed after a short lingering read so the client sees
the answer rather than a reset.

Shutdown (:meth:`Gateway.drain`): stop accepting, close idle keep-alive
connections, let requests in progress finish (up to ``shutdown_timeout``), then
let the sink store or give back what it holds.  At the deadline, requests still
waiting for the sink get ``503`` (:meth:`Sink.stop_waiting`, then
`ANSWER_GRACE` to send it), and the sink gets no more time than the deadline
(at least `SINK_CLOSE_FLOOR` after the last request) to close.
"""

from __future__ import annotations

import codecs
import dataclasses
import errno
import json
import math
import socket as _stdlib_socket
import time
import traceback
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import trio

from buffers import BufferPool, RingBuffer, WaitingRing
from gateway import errors, otlp
from gateway.access.limiter import Admission, api_key_from_headers
from gateway.assembly import make_access, make_sink
from gateway.config.errors import ConfigError
from gateway.config.settings import Config
from gateway.http.capacity import connection_capacity
from gateway.http.connection import CLOSED, NEED_DATA, HTTPConnection, RequestHead
from gateway.http.pacing import Deadline, closer
from gateway.http.registry import ConnectionRegistry, Tracked
from gateway.http.transport import SocketTransport, TLSHandshakeFailed, TLSTransport, Transport, open_listener
from gateway.observe import logs
from gateway.observe.loop import watch_loop
from gateway.observe.memory import limit_malloc_arenas
from gateway.observe.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.observe.telemetry import Telemetry
from gateway.uploads import ChunkedUploads
from sinks.base import Record, Sink, body_room
from sinks.envelope import MAX_FIELD_BYTES, RecordIds, envelope

if TYPE_CHECKING:
    from gateway.access.control import AccessControl

__all__ = ["Gateway", "make_sink", "open_listener"]

#: Bytes of receive buffer per connection beyond the largest head, so a small
#: request (head and body) usually arrives in one ``recv``.
READAHEAD = 16 * 1024
#: After an error answer, how long and how much of the client's remaining
#: upload to read and discard before closing, so the client reads the answer
#: instead of a TCP reset (nginx's lingering_close does the same).
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024
#: Connections over the limit still get a 503; at most this many such answers
#: are in progress at once, beyond that the accept loop waits.
MAX_REFUSING = 64
#: Idle receive buffers kept for reuse.  Connections borrow one only while
#: they receive a request, so this covers the requests in progress at once,
#: not the connections open.
POOLED_BUFFERS = 64
#: Unexpected errors in a connection are logged with their traceback this
#: many times; after that only counted, so a repeating bug cannot flood logs.
MAX_REPORTED_ERRORS = 10
#: ``accept`` failures that mean "out of file descriptors or memory for now":
#: wait this long for connections to close, then accept again, rather than
#: stop serving (trio.serve_listeners: the same errors, 0.1 s).
ACCEPT_CAPACITY_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))
ACCEPT_BACKOFF = 0.1
#: At the shutdown deadline, requests still waiting for the sink to store
#: their record are answered 503 (Sink.stop_waiting); they get this long to
#: send that answer before their connections are cut.
ANSWER_GRACE = 1.0
#: However short --shutdown-timeout is, the sink gets at least this long
#: after the last request to store what it holds: a file sink's last write
#: takes milliseconds, one Kinesis call well under a second.
SINK_CLOSE_FLOOR = 1.0

# Trio names each worker thread with ``name.encode("ascii", "replace")``, and
# PyPy imports that codec on first use.  If the first use falls while file
# descriptors are exhausted (EMFILE), the import fails, the worker thread dies
# and the file sink's write never returns: load the codec now.
codecs.lookup("ascii")

_JSON = [(b"content-type", b"application/json")]
_ROUTES = {
    b"/v1/logs": {b"POST": "ingest"},
    otlp.LOGS_PATH: {b"POST": "ingest_otlp"},
    b"/healthz": {b"GET": "healthz", b"HEAD": "healthz"},
    b"/readyz": {b"GET": "readyz", b"HEAD": "readyz"},
    b"/metrics": {b"GET": "metrics", b"HEAD": "metrics"},
}
_ALLOW = {path: b", ".join(sorted(methods)) for path, methods in _ROUTES.items()}
#: Response headers of the routes that do not answer JSON.
_HEADERS = {b"/metrics": [(b"content-type", CONTENT_TYPE)]}


def _answer_headers(head: RequestHead) -> List[Tuple[bytes, bytes]]:
    """Headers of a successful answer to ``head``: OTLP answers in the request's encoding."""
    if head.path == otlp.LOGS_PATH:
        return otlp.success_headers(head.content_type)
    return _HEADERS.get(head.path, _JSON)


class Gateway:
    """One gateway process: ring, sink, connections."""

    def __init__(self, config: Config, sink: Optional[Sink] = None, *,
                 access: Optional[AccessControl] = None) -> None:
        self.config = config
        # One tenant holds at most --tenant-ring-share of the ring (its
        # requests reserve with the tenant as owner; without access control
        # there are no owners).
        self.ring = WaitingRing(RingBuffer(config.ring_size), max_wait=config.ring_wait,
                                max_share=config.tenant_ring_share)
        self.sink = sink if sink is not None else make_sink(config, self.ring)
        #: None while access control is off (no ``--redis``): no API keys.
        self.access = access if access is not None else make_access(config)
        # Lent to a connection only while it receives a request (see
        # HTTPConnection.lend): idle connections hold none.
        self.pool = BufferPool(config.max_head + READAHEAD, keep=POOLED_BUFFERS)
        self.ids = RecordIds()
        #: File-descriptor limits and the connection limit they allow (raised at start).
        self.capacity = connection_capacity(config)
        self.registry = ConnectionRegistry(self.capacity.limit)
        self.draining = False
        self._refusing = 0
        self.chunked_uploads = ChunkedUploads()
        self._accept_scope: Optional[trio.CancelScope] = None
        self._conn_scope: Optional[trio.CancelScope] = None
        #: When draining: the end of --shutdown-timeout.
        self._deadline = float("inf")
        self.requests = 0
        self.accepted = 0
        self.errors = 0
        self.internal_errors = 0
        self.telemetry = Telemetry()
        #: ``GET /metrics``; multiprocess with ``--metrics-dir`` (gateway.observe.metrics).
        self.metrics = GatewayMetrics(self, config.metrics_dir)
        #: The TLS context when ``--tls-cert`` is given; None serves plain HTTP.
        self.tls = None
        if config.tls:
            from gateway.http.tls import server_context

            self.tls = server_context(config.tls_cert, config.tls_key)
        #: None unless ``--access-log-sample`` is above 0: then one test per request.
        self.access_log = logs.AccessLog(config.access_log_sample) if config.access_log_sample else None

    @property
    def connections(self) -> int:
        """Open client connections."""
        return self.registry.open

    async def reload_tls(self) -> None:
        """Read ``--tls-cert`` and ``--tls-key`` again for new connections (open ones keep theirs).

        Raises :class:`~gateway.http.tls.CertificateError`, keeping the old pair, if they cannot serve.
        """
        from gateway.http.tls import server_context

        self.tls = await trio.to_thread.run_sync(server_context, self.config.tls_cert, self.config.tls_key)

    # -- serving ---------------------------------------------------------

    async def serve(self, listeners: Optional[List[trio.socket.SocketType]] = None, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`drain`; ``task_status.started`` gets the bound address."""
        if listeners is None:
            listeners = [await open_listener(*self.config.listen)]
        # Before any worker thread exists: their malloc arenas are capped.
        limit_malloc_arenas()
        self.telemetry.install()
        if self.capacity.warning:
            logs.emit("connection_capacity", level="warning", detail=self.capacity.warning,
                      **self.capacity.fields())
        try:
            async with trio.open_nursery() as sink_nursery:
                await sink_nursery.start(self.sink.run)
                self._check_ring()
                if self.access is not None:
                    # Returns after one probe of Redis, answered or not.
                    await sink_nursery.start(self.access.run)
                await sink_nursery.start(self.metrics.run)
                await sink_nursery.start(watch_loop, self.telemetry.loop_lag)
                async with trio.open_nursery() as connections:
                    self._conn_scope = connections.cancel_scope
                    with trio.CancelScope() as accept_scope:
                        self._accept_scope = accept_scope
                        if self.draining:
                            accept_scope.cancel()
                        async with trio.open_nursery() as acceptors:
                            for listener in listeners:
                                acceptors.start_soon(self._accept_loop, listener, connections)
                            task_status.started(listeners[0].getsockname())
                    for listener in listeners:
                        listener.close()
                    sink_nursery.start_soon(self._stop_waiting_at_deadline)
                if self.access is not None:
                    await self.access.aclose()
                # The sink stores what it holds until the deadline: past it,
                # records held only in memory (--ack received) are lost, and
                # spooled ones (--ack spool) wait in the spool for the next start.
                with trio.move_on_at(max(self._deadline, trio.current_time() + SINK_CLOSE_FLOOR)) as cut:
                    await self.sink.aclose()
                if cut.cancelled_caught:
                    logs.emit("sink_cut", level="warning", sink=self.sink.name,
                              detail="the sink still held records at the shutdown deadline",
                              statistics=self.sink.statistics().as_dict())
                sink_nursery.cancel_scope.cancel()
        finally:
            self.telemetry.uninstall()
            self.metrics.close()
            for listener in listeners:
                listener.close()

    def drain(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        if not self.draining:
            self.draining = True
            self._deadline = trio.current_time() + self.config.shutdown_timeout
            self.registry.cancel_waiting()
            if self._conn_scope is not None:
                self._conn_scope.deadline = self._deadline + ANSWER_GRACE
        if self._accept_scope is not None:
            self._accept_scope.cancel()

    async def _stop_waiting_at_deadline(self) -> None:
        await trio.sleep_until(self._deadline)
        self.sink.stop_waiting()

    def stop_now(self) -> None:
        """Cut requests in progress (a second signal during drain)."""
        self.drain()
        if self._conn_scope is not None:
            self._conn_scope.cancel()

    async def _accept_loop(self, listener, connections: trio.Nursery) -> None:
        registry = self.registry
        while True:
            try:
                sock, address = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRORS:
                    raise
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            try:
                sock.setsockopt(_stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_NODELAY, 1)
            except OSError:
                pass
            transport = SocketTransport(sock) if self.tls is None else TLSTransport(sock, self.tls)
            transport.peer = address[0] if isinstance(address, tuple) else str(address)
            # At the limit, the longest-waiting connection makes room.
            tracked = registry.admit()
            if tracked is not None:
                connections.start_soon(self.handle_connection, transport, tracked)
            elif self._refusing < MAX_REFUSING:
                self._refusing += 1
                connections.start_soon(self._refuse, transport)
            else:
                transport.close()

    async def _refuse(self, transport: Transport) -> None:
        try:
            error = errors.Overloaded("too many connections", retry_after=1.0)
            conn = HTTPConnection(bytearray(self.config.max_head), max_head=self.config.max_head, fast=False)
            with trio.move_on_after(LINGER_SECONDS):
                if isinstance(transport, TLSTransport):
                    await transport.handshake()
                self.telemetry.answered_error(None, error.status)
                await self._answer_error(conn, transport, error)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, TLSHandshakeFailed):
            pass  # the client went away before reading the refusal
        finally:
            transport.close()
            self._refusing -= 1

    # -- one connection --------------------------------------------------

    async def handle_connection(self, transport: Transport, tracked: Optional[Tracked] = None) -> None:
        """Serve requests on ``transport`` until it closes or must close.

        ``tracked`` is its entry in :attr:`registry` (admitted by the accept
        loop); without one it is admitted here.
        """
        if tracked is None:
            tracked = self.registry.admit()
            if tracked is None:
                transport.close()
                return
        conn = HTTPConnection(None, max_head=self.config.max_head, fast=self.config.http == "auto")
        try:
            if isinstance(transport, TLSTransport) and not await self._handshake(conn, transport):
                return
            limit = Deadline()
            close = closer(limit.scope, transport)
            with limit.scope:
                while True:
                    ready = self._before_wait(conn, limit, tracked, close)
                    if ready is None:
                        # Waiting here rather than in a helper: what an idle
                        # connection waits in lives until its next request
                        # (on PyPy, past a minor collection), so it should be
                        # as few objects as possible.
                        await transport.wait_readable()
                        ready = self._after_wait(conn, transport, limit, tracked)
                    if not ready or not await self._one_request(conn, transport, limit, tracked):
                        break
            if limit.scope.cancelled_caught:
                await self._out_of_time(conn, transport, limit, tracked)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away; nothing it sent is half-accepted
        except Exception as exc:
            # A bug met by one connection must not stop the others: report it
            # and drop this connection (its unfinished record was released).
            self.internal_errors += 1
            if self.internal_errors <= MAX_REPORTED_ERRORS:
                logs.emit("internal_error", level="error", error=repr(exc),
                          traceback=traceback.format_exc(), count=self.internal_errors,
                          last_reported=self.internal_errors == MAX_REPORTED_ERRORS)
        finally:
            transport.close()
            self.registry.closed(tracked)
            buffer = conn.take_back_buffer(discard=True)
            if buffer is not None:
                self.pool.give_back(buffer)

    async def _handshake(self, conn: HTTPConnection, transport: TLSTransport) -> bool:
        """TLS handshake within ``--head-timeout``; whether the connection can carry requests.

        A plain HTTP request on the TLS port is answered ``400`` in plain
        HTTP; any other failure closes the connection without a word.
        """
        with trio.move_on_after(self.config.head_timeout):
            try:
                await transport.handshake()
                return True
            except TLSHandshakeFailed as exc:
                if exc.plain_http:
                    self._lend_buffer(conn)
                    self.errors += 1
                    self.telemetry.answered_error(None, errors.BadRequest.status)
                    await self._answer_error(conn, transport.plain, errors.BadRequest(
                        "plain HTTP request sent to the TLS port: use https://"))
        return False

    def _lend_buffer(self, conn: HTTPConnection) -> None:
        if not conn.has_buffer:
            conn.lend(self.pool.borrow())

    async def _one_request(self, conn: HTTPConnection, transport: Transport, limit: Deadline,
                           tracked: Tracked) -> bool:
        """Serve one request within ``limit``; whether the connection stays open for another."""
        limit.head = None  # for the access log, if the head is refused
        try:
            head = await self._read_head(conn, transport, limit)
            if head is None:
                return False
            self.requests += 1
            limit.head = head
            limit.parsed = parsed = time.perf_counter()
            # From the head on, the whole body has --body-timeout (access
            # check and ring wait included; both have shorter limits of their own).
            limit.start(Deadline.BODY, self.config.body_timeout)
            status, body = await self._route(head, conn, transport, parsed, limit)
            routed = time.perf_counter()
        except errors.ANSWERED as exc:
            await self._refused(conn, transport, exc, limit)
            return False
        close = self.draining
        limit.start(Deadline.SEND, self.config.send_timeout)
        await transport.send_all(conn.respond(status, _answer_headers(head), body, close=close))
        self.telemetry.answered(status, parsed, routed, time.perf_counter(), head.path)
        if self.access_log is not None:
            self.access_log.request(head.method, head.path, status, head.content_length, parsed)
        limit.head = None  # not kept (and promoted) while the connection idles
        if close or not conn.next_cycle():
            return False
        self.registry.answered(tracked)
        # Between requests the buffer goes back to the pool, unless the
        # client already sent (pipelined) bytes of its next request.
        buffer = conn.take_back_buffer()
        if buffer is not None:
            self.pool.give_back(buffer)
        return True

    def _before_wait(self, conn: HTTPConnection, limit: Deadline, tracked: Tracked,
                     close: Callable[[], None]) -> Optional[bool]:
        """Get ready to wait, holding no buffer, for a request's first byte: None
        if the caller must wait (then call :meth:`_after_wait`), else whether a
        request is here already.

        A new connection waits at most ``--head-timeout`` (a client that
        connects and says nothing is closed: first-byte timeout), one that
        answered a request at most ``--idle-timeout``.  While waiting it may
        be evicted to admit a new connection (:class:`ConnectionRegistry`),
        or closed by a graceful shutdown: both cancel ``limit``.
        """
        if conn.buffered:
            self.registry.start(tracked)  # pipelined: the next request is here already
            return True
        if self.draining:
            return False
        if tracked.served:
            limit.start(Deadline.IDLE, self.config.idle_timeout)
        else:
            limit.start(Deadline.FIRST_BYTE, self.config.head_timeout)
        if not self.registry.wait(tracked, close):
            return False  # evicted before it could wait: closed already
        return None

    def _after_wait(self, conn: HTTPConnection, transport: Transport, limit: Deadline,
                    tracked: Tracked) -> bool:
        """The wait of :meth:`_before_wait` ended: whether a request came."""
        if limit.scope.cancel_called:
            # A drain (or an eviction) closed this connection as its next
            # request arrived: the request was not read, so it ends without
            # a word (as if it had come a moment later), never with a 408.
            return False
        # Bytes arrived: from here (no checkpoint in between) this
        # connection cannot be evicted.
        self.registry.start(tracked)
        self._lend_buffer(conn)
        count = transport.recv_nowait(conn.head_buffer())
        if count is not None:
            conn.received(count)
            if not count:
                # Closed between requests: the buffer goes back before
                # any other task runs (see Transport.recv_nowait).
                self.pool.give_back(conn.take_back_buffer())  # type: ignore[arg-type]
                return False
        return True

    async def _refused(self, conn: HTTPConnection, transport: Transport, exc: errors.Answered,
                       limit: Deadline) -> None:
        """Answer ``exc`` to the request in ``limit`` (or to a head not read); the connection closes."""
        head = limit.head
        # The error answer has time limits of its own.
        limit.start(Deadline.ERROR, math.inf)
        self.errors += 1
        self.telemetry.answered_error(None if head is None else head.path, exc.status)
        await self._answer_error(conn, transport, exc, head)
        if self.access_log is not None:
            if head is None:
                self.access_log.request(None, None, exc.status, None, None)
            else:
                self.access_log.request(head.method, head.path, exc.status, head.content_length, limit.parsed)

    async def _out_of_time(self, conn: HTTPConnection, transport: Transport, limit: Deadline,
                           tracked: Tracked) -> None:
        """The connection's deadline passed (or it was evicted) in ``limit.phase``: 408, or
        close without a word."""
        phase = limit.phase
        if phase == Deadline.HEAD:
            error = errors.RequestTimeout("request head not received in %gs" % self.config.head_timeout)
        elif phase == Deadline.BODY and limit.too_slow:
            self.registry.slow_body_timeouts += 1
            error = errors.RequestTimeout("body arrived slower than %d bytes/s" % self.config.min_body_rate)
        elif phase == Deadline.BODY:
            error = errors.RequestTimeout("body not received in %gs" % self.config.body_timeout)
        else:
            # Silent since it connected (unless evicted or closed for a
            # drain), idle between requests, or a client that stopped reading
            # its answers: drop it.
            if phase == Deadline.FIRST_BYTE and not tracked.evicted and not self.draining:
                self.registry.first_byte_timeouts += 1
            return
        await self._refused(conn, transport, error, limit)

    async def _read_head(self, conn: HTTPConnection, transport: Transport,
                         limit: Deadline) -> Optional[RequestHead]:
        head = conn.next_request()
        if head is NEED_DATA:
            limit.start(Deadline.HEAD, self.config.head_timeout)
            while head is NEED_DATA:
                conn.received(await transport.recv_into(conn.head_buffer()))
                head = conn.next_request()
        if head is CLOSED:
            return None
        return head

    async def _route(self, head: RequestHead, conn: HTTPConnection,
                     transport: Transport, parsed: float, limit: Deadline) -> Tuple[int, bytes]:
        methods = _ROUTES.get(head.path)
        if methods is None:
            raise errors.NotFound("no route %s" % head.path.decode("latin-1"))
        action = methods.get(head.method)
        if action is None:
            raise errors.MethodNotAllowed(_ALLOW[head.path], "use %s" % _ALLOW[head.path].decode())
        if action == "ingest":
            return await self._ingest(head, conn, transport, parsed, limit)
        if action == "ingest_otlp":
            return await self._ingest_otlp(head, conn, transport, parsed, limit)
        if head.content_length or head.chunked:
            raise errors.BadRequest("%s takes no body" % head.path.decode())
        # Close the (empty) request body in h11 too, or the connection could
        # not carry another request after this answer.
        conn.finish_body()
        if action == "metrics":
            return await self.metrics.answer()
        if action == "healthz":
            return 200, b'{"status":"ok"}'
        ready, reason = self.readiness()
        doc: Dict[str, object] = {"status": "ready"} if ready else {"status": "not_ready", "reason": reason}
        if self.sink.max_record_bytes is not None:
            # The record limit in force (a Kinesis stream's may change while running).
            doc["max_record_bytes"] = self.sink.max_record_bytes
        if self.access is not None:
            doc["redis"] = self.access.redis_state
        return (200 if ready else 503), json.dumps(doc, separators=(",", ":")).encode()

    @property
    def max_record(self) -> int:
        """Largest ring slot a request may take now: ``--max-body``'s record,
        within the sink's record limit (a Kinesis stream's own, which may change)."""
        limit = self.sink.max_record_bytes
        return self.config.max_record if limit is None else min(self.config.max_record, limit)

    def _check_ring(self) -> None:
        """Once the sink knows its record limit: the ring holds two of the largest records."""
        if self.ring.capacity < 2 * self.max_record:
            raise ConfigError(
                "--ring-size: must hold at least two of the largest records (2 x %d bytes, the %s "
                "sink's record limit), got %d" % (self.max_record, self.sink.name, self.ring.capacity))

    def readiness(self) -> Tuple[bool, str]:
        """Whether this process takes records now, and why not."""
        if self.draining:
            return False, "shutting down"
        access = self.access
        if access is not None and not access.ready:
            return False, "access control: Redis %s (--on-redis-failure closed)" % (
                "unreachable" if access.redis_state == "down" else "not reached yet")
        ready, reason = self.sink.ready()
        if not ready:
            return False, "sink: " + reason
        if not self.ring.can_reserve(self.max_record):
            return False, "buffer full"
        return True, "ok"

    async def _ingest(self, head: RequestHead, conn: HTTPConnection,
                      transport: Transport, parsed: float, limit: Deadline) -> Tuple[int, bytes]:
        config = self.config
        head.require_body_framing()
        length = head.content_length
        if length is not None and length > config.max_body:
            raise errors.PayloadTooLarge(
                "body of %d bytes exceeds the %d-byte limit" % (length, config.max_body))
        for value in (head.content_type, head.content_encoding):
            if value is not None and len(value) > MAX_FIELD_BYTES:
                raise errors.BadRequest("header value longer than %d bytes" % MAX_FIELD_BYTES)
        access = self.access
        if access is None:
            with self.chunked_uploads.hold(length, transport.peer, None):
                return await self._store(head, conn, transport, None, parsed, limit)
        # Decided from the head alone, before a ring slot is reserved and
        # before 100 Continue: a refused client uploads nothing.  The cost is
        # the declared Content-Length; a chunked body costs 0 bytes here (a tenant
        # in debt is refused) and its size is charged to the byte rate and the
        # month once it is stored.
        admission = await access.check(api_key_from_headers(head.credential_headers), length or 0)
        try:
            with self.chunked_uploads.hold(length, transport.peer, admission.tenant):
                return await self._store(head, conn, transport, admission, parsed, limit)
        except BaseException:
            # Not stored: take back the record and bytes the check counted.
            access.add_usage(admission.tenant, -1, -(length or 0))
            raise

    async def _ingest_otlp(self, head: RequestHead, conn: HTTPConnection,
                           transport: Transport, parsed: float, limit: Deadline) -> Tuple[int, bytes]:
        """``POST /otlp/v1/logs``: a ``/v1/logs`` ingest answered as OTLP/HTTP (gateway.otlp)."""
        # From the head, before access control counts the request.
        encoding = otlp.check_head(head.content_type, head.content_encoding)
        await self._ingest(head, conn, transport, parsed, limit)
        return 200, otlp.SUCCESS_BODIES[encoding]

    async def _store(self, head: RequestHead, conn: HTTPConnection, transport: Transport,
                     admission: Optional[Admission], parsed: float,
                     deadline: Deadline) -> Tuple[int, bytes]:
        """Reserve a ring slot, receive the body into it, hand the record to the sink."""
        config = self.config
        length = head.content_length
        tenant = admission.tenant.encode("ascii") if admission is not None else None
        now_ms = int(time.time() * 1000)
        record_id = self.ids.next(now_ms)
        partition_key, hash_key, key_bytes = self.sink.record_keys(record_id, tenant, head.header)
        meta = envelope(record_id, tenant, now_ms, head.content_type, head.content_encoding)
        offset = len(meta)
        limit = self.sink.max_record_bytes
        room = body_room(config.max_body, limit, offset, key_bytes)
        if limit is not None:
            if length is not None and length > room:
                raise errors.PayloadTooLarge(
                    "record of %d bytes (envelope %d + body %d + partition key %d) exceeds the "
                    "%d-byte limit" % (offset + length + key_bytes, offset, length, key_bytes, limit))
        ring = self.ring
        slot = await ring.reserve(offset + (length if length is not None else room), tenant)
        try:
            slot.view[:offset] = meta
            # Inside the body's time limit (running since the head): a client
            # that waits for 100 Continue but does not read cannot hold the slot.
            interim = conn.continue_100()
            if interim:
                await transport.send_all(interim)
            if length is not None:
                filled = await self._read_body(conn, transport, slot.view[offset:], deadline)
            else:
                filled = await self._read_chunked(conn, transport, slot.view[offset:], deadline)
            # The sink's wait has no limit here: the sink keeps its own.
            deadline.start(Deadline.SINK, math.inf)
            ring.commit(slot, offset + filled)
            received, used = time.perf_counter(), ring.used
            ring.hand_off(slot)
            extra = await self.sink.put(Record(record_id, slot, tenant, partition_key=partition_key,
                                               explicit_hash_key=hash_key))
            self.telemetry.ingested(parsed, received, time.perf_counter(), used, filled)
        except BaseException:
            self.ring.release(slot)
            raise
        self.accepted += 1
        if admission is not None and length is None and self.access is not None:
            self.access.charge_after_store(admission.tenant, filled, admission.limits)
        if extra:
            doc = {"id": record_id}
            doc.update(extra)
            return 202, json.dumps(doc, separators=(",", ":")).encode()
        return 202, b'{"id":"' + record_id.encode() + b'"}'

    async def _read_body(self, conn: HTTPConnection, transport: Transport, dest: memoryview,
                         pace: Deadline) -> int:
        filled = conn.take_body(dest)
        size = len(dest)
        if filled < size:  # --min-body-rate holds only for a body still to come
            pace.pace(self.config.min_body_rate)
        while filled < size:
            pace.received(filled)
            count = await transport.recv_into(dest[filled:])
            if not count:
                raise errors.BadRequest("connection closed after %d of %d body bytes" % (filled, size))
            filled += count
        conn.finish_body()
        return filled

    async def _read_chunked(self, conn: HTTPConnection, transport: Transport, dest: memoryview,
                            pace: Deadline) -> int:
        filled, done = conn.read_chunked(dest, 0)
        received = 0
        if not done:  # as in _read_body
            pace.pace(self.config.min_body_rate)
        while not done:
            pace.received(received)
            count = await transport.recv_into(conn.head_buffer())
            conn.received(count)
            received += count
            filled, done = conn.read_chunked(dest, filled)
        return filled

    async def _answer_error(self, conn: HTTPConnection, transport: Transport,
                           exc: errors.Answered, head: Optional[RequestHead] = None) -> None:
        if head is not None and head.path == otlp.LOGS_PATH:
            status, headers, body = otlp.response_for(exc, head.content_type)
        else:
            status, headers, body = errors.response_for(exc)
        with trio.move_on_after(self.config.send_timeout) as sending:
            await transport.send_all(conn.respond_error(status, headers, body))
        if sending.cancelled_caught:
            return  # the client does not read: nothing to linger for
        await transport.shutdown_write()
        scratch = conn.discard_buffer()
        discarded = 0
        with trio.move_on_after(LINGER_SECONDS):
            while discarded < LINGER_BYTES:
                count = await transport.recv_into(scratch)
                if not count:
                    break
                discarded += count

    def statistics(self) -> dict:
        """A snapshot of the gateway's counters and telemetry (see docs/operations.md, "Telemetry")."""
        return self.telemetry.add_statistics({
            "connections": self.connections,
            "connection_registry": self.registry.statistics(),
            "requests": self.requests,
            "accepted": self.accepted,
            "errors": self.errors,
            "internal_errors": self.internal_errors,
            "ring": self.ring.statistics(),
            "sink": self.sink.statistics().as_dict(),
            "receive_buffers": self.pool.statistics(),
            "access": dataclasses.asdict(self.access.statistics()) if self.access is not None else None,
        })
