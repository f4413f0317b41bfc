"""The check edge for one Redis server, on Trio sockets: no worker threads.

Theory of operation
-------------------
:class:`AsyncRedisEdge` does for a single Redis server what
:class:`gateway.access.keystore.RedisEdge` does from worker threads: one pipeline
of check scripts (plus usage to add) per call, one round trip.  It speaks
RESP2 through the sans-I/O :mod:`gateway.access.resp` on Trio streams, so a batch
costs no thread hand-off; on PyPy the hand-off (and the interpreter lock it
contends for with the event loop) cost more than the checks themselves.

Connections are opened on demand, each used by one pipeline at a time and
kept for the next (:data:`MAX_IDLE_CONNECTIONS`).  A connection that failed,
timed out or was cancelled mid-pipeline is closed, never reused: replies may
be left unread on it.  Failures to reach Redis raise
:class:`~gateway.access.keystore.EdgeUnavailable`, as the thread edge's do.

URLs are read by redis-py's own parser (``redis://``, ``rediss://`` with its
``ssl_*`` query options, ``unix://``, user, password and database), so both
edges accept the same URLs.  Redis Cluster stays on the thread edge.
"""

from __future__ import annotations

import ssl
from typing import Any, Dict, List, Optional, Sequence, Tuple

import trio

from gateway.access.keystore import EdgeUnavailable, edge_failure
from gateway.access.lease import LEASE_SCRIPT
from gateway.access.limiter import CHECK_SCRIPT, ScriptCall, UsageDelta, check_command, usage_commands
from gateway.access.resp import NEED_DATA, ProtocolError, ReplyError, ReplyReader, pack_command
from gateway.config.secrets import URL_PARSE_ERROR
from gateway.config.urls import redis_url_options

__all__ = ["AsyncRedisEdge", "MAX_IDLE_CONNECTIONS", "RECEIVE_BYTES"]

#: Connections kept open between pipelines; the access control runs at most
#: a few pipelines at once (``max_concurrent_batches`` plus a usage flush).
MAX_IDLE_CONNECTIONS = 4
#: Largest single read from Redis; a batch of 256 check replies is ~40 KB.
RECEIVE_BYTES = 64 * 1024
#: Error replies that mean "this server cannot answer now", not "this check
#: failed": the edge is unavailable (redis-py: BusyLoadingError and friends).
_UNAVAILABLE_CODES = frozenset(("LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "READONLY"))
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class _Connection:
    __slots__ = ("stream", "reader", "socket")

    def __init__(self, stream: trio.abc.Stream, socket: Any) -> None:
        self.stream = stream
        self.reader = ReplyReader()
        self.socket = socket

    async def round_trip(self, out: bytearray, count: int) -> List[Any]:
        await self.stream.send_all(out)
        replies: List[Any] = []
        reader = self.reader
        while len(replies) < count:
            reply = reader.next_reply()
            if reply is NEED_DATA:
                data = await self.stream.receive_some(RECEIVE_BYTES)
                if not data:
                    raise EOFError("Redis closed the connection")
                reader.feed(data)
                continue
            replies.append(reply)
        return replies

    def close(self) -> None:
        # Synchronous on purpose: also used when a pipeline is cancelled.
        self.socket.close()


class AsyncRedisEdge:
    """Pipelines of check scripts to one Redis server, from the event loop."""

    is_async = True

    def __init__(self, url: str, *, socket_timeout: float = 1.0) -> None:
        try:
            self._options: Dict[str, Any] = redis_url_options(url)
        except ValueError:
            raise ValueError(URL_PARSE_ERROR) from None
        self._timeout = socket_timeout
        self._idle: List[_Connection] = []
        self._busy: List[_Connection] = []
        self._ssl: Optional[ssl.SSLContext] = None

    # -- the Edge interface ------------------------------------------------

    async def probe(self) -> None:
        """Connect if needed, PING and load the scripts; raise EdgeUnavailable."""
        out = bytearray()
        pack_command(out, ("PING",))
        pack_command(out, ("SCRIPT", "LOAD", CHECK_SCRIPT))
        pack_command(out, ("SCRIPT", "LOAD", LEASE_SCRIPT))
        for reply in await self._pipeline(out, 3):
            if isinstance(reply, ReplyError):
                # Redis answered but refused (an ACL without EVALSHA): the
                # reply says why and holds no secret.
                raise EdgeUnavailable("ResponseError: %s" % reply.message)

    async def run_checks(self, calls: Sequence[ScriptCall], usage: Sequence[Tuple[UsageDelta, int]] = ()
                         ) -> Tuple[List[object], int, int]:
        """Replies to ``calls``; ``usage`` pairs a delta with its hash's TTL.

        The usage goes first, so bytes charged to a rate count in the checks
        of the same pipeline.
        """
        out = bytearray()
        skip = 0
        for delta, ttl in usage:
            for command in usage_commands(delta, ttl):
                pack_command(out, command)  # type: ignore[arg-type]
                skip += 1
        for call in calls:
            pack_command(out, check_command(call))  # type: ignore[arg-type]
        every = await self._pipeline(out, skip + len(calls))
        for reply in every[:skip]:
            if isinstance(reply, ReplyError) and reply.code in _UNAVAILABLE_CODES:
                raise EdgeUnavailable("ResponseError: %s" % reply.code)
        replies = every[skip:]
        pipelines, loads = 1, 0
        missing = [i for i in range(len(calls))
                   if isinstance(replies[i], ReplyError) and replies[i].code == "NOSCRIPT"]
        if missing:
            # Redis restarted or flushed its scripts: load it and ask again.
            again = bytearray()
            pack_command(again, ("SCRIPT", "LOAD", CHECK_SCRIPT))
            pack_command(again, ("SCRIPT", "LOAD", LEASE_SCRIPT))
            for i in missing:
                pack_command(again, check_command(calls[i]))  # type: ignore[arg-type]
            more = await self._pipeline(again, 2 + len(missing))
            for i, reply in zip(missing, more[2:]):
                replies[i] = reply
            pipelines, loads = 2, 1
        for reply in replies:
            if isinstance(reply, ReplyError) and reply.code in _UNAVAILABLE_CODES:
                raise EdgeUnavailable("ResponseError: %s" % reply.code)
        return replies[:len(calls)], pipelines, loads

    def close(self) -> None:
        """Drop every connection; the next call connects again."""
        for conn in self._idle + self._busy:
            conn.close()
        self._idle.clear()
        self._busy.clear()

    # -- connections -------------------------------------------------------

    async def _pipeline(self, out: bytearray, count: int) -> List[Any]:
        conn: Optional[_Connection] = None
        try:
            with trio.fail_after(self._timeout):
                conn = self._idle.pop() if self._idle else await self._connect()
                self._busy.append(conn)
                replies = await conn.round_trip(out, count)
        except BaseException as exc:
            if conn is not None:
                self._forget(conn)
            if isinstance(exc, (OSError, EOFError, ProtocolError, trio.TooSlowError,
                                trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError)):
                raise EdgeUnavailable(_reason(exc)) from exc
            raise
        self._busy.remove(conn)
        if len(self._idle) < MAX_IDLE_CONNECTIONS:
            self._idle.append(conn)
        else:
            conn.close()
        return replies

    def _forget(self, conn: _Connection) -> None:
        conn.close()
        if conn in self._busy:
            self._busy.remove(conn)

    async def _connect(self) -> _Connection:
        options = self._options
        path = options.get("path")
        if path:
            stream: trio.abc.Stream = await trio.open_unix_socket(path)
            socket = stream.socket  # type: ignore[attr-defined]
        else:
            host = options.get("host", "localhost")
            tcp = await trio.open_tcp_stream(host, int(options.get("port", 6379)))
            socket = tcp.socket
            stream = tcp
            if options.get("tls"):
                tls = trio.SSLStream(tcp, self._ssl_context(), server_hostname=host)
                try:
                    await tls.do_handshake()
                except BaseException:
                    socket.close()
                    raise
                stream = tls
        conn = _Connection(stream, socket)
        try:
            hello = bytearray()
            count = 0
            if options.get("password"):
                user = options.get("username")
                pack_command(hello, ("AUTH", user, options["password"]) if user
                             else ("AUTH", options["password"]))
                count += 1
            if options.get("db"):
                pack_command(hello, ("SELECT", int(options["db"])))
                count += 1
            if count:
                for reply in await conn.round_trip(hello, count):
                    if isinstance(reply, ReplyError):
                        # WRONGPASS, NOAUTH, ERR DB index: never echoes the password.
                        raise EdgeUnavailable("ResponseError: %s" % reply.message)
        except BaseException:
            conn.close()
            raise
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            options = self._options
            context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"),
                                                 capath=options.get("ssl_ca_path"))
            reqs = options.get("ssl_cert_reqs", "required")
            verify = _CERT_REQS.get(reqs, reqs) if isinstance(reqs, str) else reqs
            # The host name is checked unless the URL says otherwise, as
            # redis-py 6+ does: a certificate any public CA issued for another
            # name must not get the AUTH password.
            context.check_hostname = bool(options.get("ssl_check_hostname", True)) \
                and verify != ssl.CERT_NONE
            context.verify_mode = verify  # type: ignore[assignment]
            if options.get("ssl_certfile"):
                context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"),
                                        options.get("ssl_password"))
            self._ssl = context
        return self._ssl


def _reason(exc: BaseException) -> str:
    """What failed, without anything that could hold a secret."""
    if isinstance(exc, trio.TooSlowError):
        return "TimeoutError"
    if isinstance(exc, ProtocolError):
        return "ProtocolError"
    reason = edge_failure(exc)  # a refused TLS certificate, maybe inside trio's error
    if reason.startswith("TLS"):
        return reason
    # Refused, reset, closed, other TLS failures: redis-py calls them all this.
    return "ConnectionError"
