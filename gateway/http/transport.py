"""The server's byte transport: a real socket, or memory for tests.

A transport is the four calls the connection handler makes; nothing else in
the server touches a socket.  :class:`SocketTransport` wraps a Trio socket so
bodies land in ring slices through ``recv_into``; :class:`TLSTransport` runs
TLS over one (``--tls-cert``), at the cost of one bounded copy of what it
decrypts; :class:`MemoryTransport` plays back scripted input (whole, byte by
byte, any split) and records what the server sent, for tests without sockets.
:func:`open_listener` opens the listening socket they come from.
"""

from __future__ import annotations

import socket as _stdlib_socket
import ssl
from typing import Any, Coroutine, Iterable, List, Optional

import trio

__all__ = ["Transport", "SocketTransport", "TLSTransport", "TLSHandshakeFailed", "MemoryTransport",
           "TLS_RECEIVE_BYTES", "open_listener", "LISTEN_BACKLOG"]

#: Most plaintext one TLS record carries (RFC 8446 section 5.1): a receive
#: yields at most one record's worth, so asking for more only makes the
#: decrypted copy's buffer larger.
TLS_RECEIVE_BYTES = 16 * 1024


class Transport:
    """What a connection handler needs from its peer."""

    #: The client's address (IP) when known: per-address bounds key on it.
    peer = ""

    async def recv_into(self, view: memoryview) -> int:
        """Receive into ``view``; 0 means the peer finished sending."""
        raise NotImplementedError

    async def wait_readable(self) -> None:
        """Wait until :meth:`recv_into` has something to return (bytes or EOF).

        Lets a connection wait for its next request without a receive buffer.
        """
        raise NotImplementedError

    def recv_nowait(self, view: memoryview) -> Optional[int]:
        """Receive into ``view`` without waiting or yielding: the count (0: EOF), or None
        if nothing is there now (or this transport cannot tell without waiting).

        Called right after :meth:`wait_readable`, with a buffer just borrowed: a
        connection that turns out closed gives the buffer back before any other
        task runs, so thousands of idle connections closing at once (a load
        balancer restarting) never hold thousands of buffers.
        """
        return None

    async def send_all(self, data) -> None:
        """Send all of ``data``."""
        raise NotImplementedError

    async def shutdown_write(self) -> None:
        """Tell the peer nothing more will be sent."""

    def close(self) -> None:
        """Drop the connection."""


class SocketTransport(Transport):
    """A connected Trio socket.

    ``recv_into`` calls the non-blocking socket under Trio's directly and
    waits with ``trio.lowlevel.wait_readable`` only when nothing is there:
    Trio's own ``recv_into`` also yields to the scheduler after every
    successful receive, which costs several objects per call, and a 1 MiB
    body takes dozens of receives.  So receiving is a checkpoint only when it
    waits; each request still passes one in sending its answer, which goes
    through Trio's ``send``.
    """

    __slots__ = ("sock", "_raw")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        # The standard socket inside Trio's (non-blocking), when Trio's
        # internals offer it; else every receive goes through Trio's method.
        raw = getattr(sock, "_sock", None)
        self._raw = raw if isinstance(raw, _stdlib_socket.socket) and not raw.getblocking() else None

    async def recv_into(self, view: memoryview) -> int:
        raw = self._raw
        if raw is None:  # pragma: no cover - depends on Trio's internals
            return await self.sock.recv_into(view)
        try:
            return raw.recv_into(view)
        except BlockingIOError:
            pass
        while True:
            await trio.lowlevel.wait_readable(raw)
            try:
                return raw.recv_into(view)
            except BlockingIOError:
                pass

    def recv_nowait(self, view: memoryview) -> Optional[int]:
        raw = self._raw
        if raw is None:
            return None
        try:
            return raw.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return None

    def wait_readable(self) -> Coroutine[Any, Any, None]:
        # Trio's own coroutine, not one of ours around it: an idle
        # connection's wait is one object fewer.
        fd = self.sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the connection was closed")
        return trio.lowlevel.wait_readable(fd)

    async def send_all(self, data) -> None:
        sock = self.sock
        view = memoryview(data)
        sent = await sock.send(view)
        while sent < len(view):
            sent += await sock.send(view[sent:])

    async def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(_stdlib_socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


class TLSHandshakeFailed(Exception):
    """The client did not complete a TLS handshake.

    ``plain_http`` is true when it sent a plain HTTP request instead, which
    the server answers in plain HTTP (as nginx does) on :attr:`TLSTransport.plain`.
    """

    def __init__(self, message: str, *, plain_http: bool = False) -> None:
        super().__init__(message)
        self.plain_http = plain_http


class TLSTransport(Transport):
    """A connected Trio socket carrying TLS (``trio.SSLStream``, server side).

    :meth:`handshake` must run first.  ``recv_into`` copies what TLS decrypted
    into ``view`` (up to :data:`TLS_RECEIVE_BYTES` at a time): the one extra
    copy of a body on its way into the ring.  TLS cannot close one direction
    only, so :meth:`shutdown_write` does nothing and :meth:`close` drops the
    connection without a close_notify; clients find where answers end from
    HTTP framing (``https_compatible``: a peer's missing close_notify is an
    ordinary end of stream too).
    """

    __slots__ = ("sock", "stream", "plain", "_pending")

    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.stream = trio.SSLStream(trio.SocketStream(sock), context, server_side=True,
                                     https_compatible=True)
        #: The same socket without TLS, for the answer to a plain HTTP request.
        self.plain = SocketTransport(sock)
        #: What :meth:`wait_readable` received and :meth:`recv_into` has not handed out.
        self._pending: Optional[bytes] = None

    async def handshake(self) -> None:
        """Complete the TLS handshake; raise :class:`TLSHandshakeFailed` if the peer does not."""
        try:
            await self.stream.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            reason = getattr(cause, "reason", None) if isinstance(cause, ssl.SSLError) else None
            raise TLSHandshakeFailed("TLS handshake failed: %s" % (cause or exc),
                                     plain_http=reason == "HTTP_REQUEST") from exc

    async def recv_into(self, view: memoryview) -> int:
        data = self._pending
        if data is None:
            data = await self.stream.receive_some(min(len(view), TLS_RECEIVE_BYTES))
        count = min(len(data), len(view))
        view[:count] = data[:count] if count < len(data) else data
        self._pending = data[count:] if count < len(data) else None
        return count

    def recv_nowait(self, view: memoryview) -> Optional[int]:
        data = self._pending
        if data is None:
            return None
        count = min(len(data), len(view))
        view[:count] = data[:count] if count < len(data) else data
        self._pending = data[count:] if count < len(data) else None
        return count

    async def wait_readable(self) -> None:
        # Decrypted bytes may already wait inside the TLS stream, where the
        # socket's readiness cannot tell: receive them (one TLS record at
        # most) and keep them for recv_into.
        if self._pending is None:
            self._pending = await self.stream.receive_some(TLS_RECEIVE_BYTES)

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    def close(self) -> None:
        self.sock.close()


class MemoryTransport(Transport):
    """Scripted input pieces in, sent bytes collected in ``sent``.

    After the last piece, ``recv_into`` returns 0 (the peer's EOF), or waits
    forever if ``eof`` is false (a client that stops sending).
    """

    def __init__(self, pieces: Iterable[bytes], *, eof: bool = True) -> None:
        self._pieces: List[bytes] = [bytes(p) for p in pieces if p]
        self._eof = eof
        self.sent = bytearray()
        self.write_closed = False
        self.closed = False

    async def recv_into(self, view: memoryview) -> int:
        await trio.lowlevel.checkpoint()
        if not self._pieces:
            if not self._eof:
                await trio.sleep_forever()
            return 0
        return self._take(view)

    def recv_nowait(self, view: memoryview) -> Optional[int]:
        if not self._pieces:
            return 0 if self._eof else None
        return self._take(view)

    def _take(self, view: memoryview) -> int:
        piece = self._pieces[0]
        count = min(len(piece), len(view))
        view[:count] = piece[:count]
        if count == len(piece):
            self._pieces.pop(0)
        else:
            self._pieces[0] = piece[count:]
        return count

    async def wait_readable(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self._pieces and not self._eof:
            await trio.sleep_forever()

    async def send_all(self, data) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed or self.write_closed:
            raise trio.BrokenResourceError("send on a closed transport")
        self.sent += data

    async def shutdown_write(self) -> None:
        self.write_closed = True

    def close(self) -> None:
        self.closed = True


#: Connections the kernel queues before the accept loop takes them (a burst
#: of agents reconnecting after a restart); Linux caps it at somaxconn.
LISTEN_BACKLOG = 1024


async def open_listener(host: str, port: int, *, reuse_port: bool = False) -> trio.socket.SocketType:
    """A listening Trio socket bound to ``host:port``.

    ``reuse_port`` sets ``SO_REUSEPORT``: the workers of a supervised gateway
    each listen on the same port and the kernel spreads connections among them.
    """
    family = _stdlib_socket.AF_INET6 if ":" in host else _stdlib_socket.AF_INET
    sock = trio.socket.socket(family, _stdlib_socket.SOCK_STREAM)
    try:
        sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock
