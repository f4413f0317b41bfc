"""The server's byte transport: a real socket, or memory for tests.

A transport is the four calls the connection handler makes; nothing else in
the server touches a socket.  :class:`SocketTransport` wraps a Trio socket so
bodies land in ring slices through ``recv_into``; :class:`MemoryTransport`
plays back scripted input (whole, byte by byte, any split) and records what the
server sent, for tests without sockets.
"""

from __future__ import annotations

import socket as _stdlib_socket
from typing import Iterable, List

import trio

__all__ = ["Transport", "SocketTransport", "MemoryTransport"]


class Transport:
    """What a connection handler needs from its peer."""

    async def recv_into(self, view: memoryview) -> int:
        """Receive into ``view``; 0 means the peer finished sending."""
        raise NotImplementedError

    async def send_all(self, data) -> None:
        """Send all of ``data``."""
        raise NotImplementedError

    async def shutdown_write(self) -> None:
        """Tell the peer nothing more will be sent."""

    def close(self) -> None:
        """Drop the connection."""


class SocketTransport(Transport):
    """A connected Trio socket."""

    __slots__ = ("sock",)

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def recv_into(self, view: memoryview) -> int:
        return await self.sock.recv_into(view)

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
        piece = self._pieces[0]
        count = min(len(piece), len(view))
        view[:count] = piece[:count]
        if count == len(piece):
            self._pieces.pop(0)
        else:
            self._pieces[0] = piece[count:]
        return count

    async def send_all(self, data) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed or self.write_closed:
            raise trio.BrokenResourceError("send on a closed transport")
        self.sent += data

    async def shutdown_write(self) -> None:
        self.write_closed = True

    def close(self) -> None:
        self.closed = True
