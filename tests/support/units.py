"""Helpers for the unit layer: a recording sink, request bytes, feeding, parsing.

Nothing here opens a socket.  A gateway is served one connection at a time
through :class:`gateway.http.transport.MemoryTransport`; every scenario's bytes can
be fed whole (:func:`whole`) or one byte at a time (:func:`byte_by_byte`).
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import trio

from gateway.config.settings import from_args
from gateway.http.transport import MemoryTransport
from gateway.server import Gateway
from sinks.base import Record, Sink

__all__ = [
    "RecordingSink",
    "ContinueClient",
    "make_gateway",
    "serve",
    "post",
    "get",
    "chunked",
    "whole",
    "byte_by_byte",
    "Response",
    "parse_responses",
    "split_record",
    "SMALL_FLAGS",
]

#: A small gateway: 64 KiB ring (the minimum), 1 KiB bodies and heads.
SMALL_FLAGS = ("--ring-size", "64KiB", "--max-body", "1KiB", "--max-head", "1KiB")


class RecordingSink(Sink):
    """Keeps a copy of every record it is given.

    ``records`` holds ``bytes(record.view)`` in arrival order, ``views`` the
    views themselves (valid until released).  With ``hold`` set the slots are
    kept (the ring fills up) until :meth:`release_held`; otherwise each slot is
    released at once.  ``not_ready`` makes :meth:`ready` report that reason.
    """

    name = "recording"

    def __init__(self, release, *, hold: bool = False) -> None:
        super().__init__(release)
        self.hold = hold
        self.records: List[bytes] = []
        self.ids: List[str] = []
        self.held: List[Record] = []
        self.not_ready: Optional[str] = None
        self.on_put: Optional[Callable[[Record], None]] = None

    async def put(self, record: Record) -> Optional[dict]:
        if self.on_put is not None:
            self.on_put(record)
        self.records.append(bytes(record.view))
        self.ids.append(record.id)
        if self.hold:
            self.held.append(record)
        else:
            self._release(record.slot)
        return None

    def release_held(self) -> None:
        held, self.held = self.held, []
        for record in held:
            self._release(record.slot)

    def ready(self) -> Tuple[bool, str]:
        if self.not_ready is not None:
            return False, self.not_ready
        return True, "ok"


def make_gateway(*flags: str, hold: bool = False) -> Tuple[Gateway, RecordingSink]:
    """A gateway configured by ``flags`` (after :data:`SMALL_FLAGS`) with a recording sink."""
    config = from_args(list(SMALL_FLAGS) + list(flags), {})
    gateway: Optional[Gateway] = None

    def release(slot) -> None:
        assert gateway is not None
        gateway.ring.release(slot)

    sink = RecordingSink(release, hold=hold)
    gateway = Gateway(config, sink)
    return gateway, sink


async def serve(gateway: Gateway, pieces: Iterable[bytes], *, eof: bool = True) -> MemoryTransport:
    """Serve one connection that sends ``pieces``; returns the finished transport."""
    transport = MemoryTransport(pieces, eof=eof)
    await gateway.handle_connection(transport)
    return transport


class ContinueClient(MemoryTransport):
    """A client that sends ``head`` and holds ``body`` back until the server
    has sent ``100 Continue``; then it sends the body and finishes sending.
    """

    CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

    def __init__(self, head: bytes, body: Sequence[bytes]) -> None:
        super().__init__([head])
        self._body = [piece for piece in body if piece]
        self._continued = trio.Event()

    async def recv_into(self, view: memoryview) -> int:
        if not self._pieces and self._body:
            await self._continued.wait()
            self._pieces, self._body = self._body, []
        return await super().recv_into(view)

    async def send_all(self, data) -> None:
        await super().send_all(data)
        if self.sent.startswith(self.CONTINUE):
            self._continued.set()

    async def shutdown_write(self) -> None:
        self.write_closed = True

    def close(self) -> None:
        self.closed = True


# -- request bytes -----------------------------------------------------------

def post(body: bytes = b"", *, target: bytes = b"/v1/logs", length: Optional[int] = None,
         headers: Sequence[Tuple[bytes, bytes]] = (), framing: str = "length") -> bytes:
    """A POST with ``body``; ``framing`` is "length" (Content-Length), or "none"."""
    lines = [b"POST " + target + b" HTTP/1.1", b"Host: test"]
    if framing == "length":
        lines.append(b"Content-Length: %d" % (len(body) if length is None else length))
    for name, value in headers:
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(pieces: Sequence[bytes], *, target: bytes = b"/v1/logs",
            headers: Sequence[Tuple[bytes, bytes]] = (), extension: bytes = b"",
            trailers: Sequence[Tuple[bytes, bytes]] = ()) -> bytes:
    """A POST whose body is ``pieces``, one chunk each, then the last chunk."""
    head = [b"POST " + target + b" HTTP/1.1", b"Host: test", b"Transfer-Encoding: chunked"]
    head.extend(name + b": " + value for name, value in headers)
    out = [b"\r\n".join(head) + b"\r\n\r\n"]
    for piece in pieces:
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), extension, piece))
    out.append(b"0\r\n")
    out.extend(name + b": " + value + b"\r\n" for name, value in trailers)
    out.append(b"\r\n")
    return b"".join(out)


def get(target: bytes, method: bytes = b"GET", headers: Sequence[Tuple[bytes, bytes]] = ()) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: test"]
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


# -- feeding -----------------------------------------------------------------

def whole(data: bytes) -> List[bytes]:
    return [data]


def byte_by_byte(data: bytes) -> List[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


# -- responses ---------------------------------------------------------------

class Response:
    """One parsed response."""

    def __init__(self, status: int, reason: bytes, headers: List[Tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> Optional[bytes]:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return "<Response %d %r %r>" % (self.status, self.headers, self.body)


def parse_responses(data: bytes, *, head_only: Sequence[int] = ()) -> List[Response]:
    """Split the bytes a server sent into responses.

    Interim (1xx) responses have no body; so do the responses whose index
    (counting final responses only) is in ``head_only`` (answers to HEAD).
    Trailing bytes that are not a complete response fail the parse.
    """
    data = bytes(data)
    out: List[Response] = []
    finals = 0
    pos = 0
    while pos < len(data):
        end = data.index(b"\r\n\r\n", pos)
        lines = data[pos:end].split(b"\r\n")
        version, status, reason = lines[0].split(b" ", 2)
        assert version == b"HTTP/1.1", lines[0]
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        pos = end + 4
        code = int(status)
        body = b""
        if code >= 200:
            length = int(dict(headers).get(b"content-length", b"0"))
            if finals not in head_only:
                body = data[pos:pos + length]
                assert len(body) == length, "response body cut short"
                pos += length
            finals += 1
        out.append(Response(code, reason, headers, body))
    return out


def split_record(record: bytes) -> Tuple[dict, bytes]:
    """The envelope (parsed) and body of a stored record."""
    line, newline, body = record.partition(b"\n")
    assert newline, "record without an envelope line"
    return json.loads(line), body
