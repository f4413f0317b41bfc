"""RESP2, the Redis wire protocol, without I/O: commands out, replies in.

Theory of operation
-------------------
:func:`pack_command` appends one command (an array of bulk strings) to a
``bytearray``; a pipeline is several commands appended to one buffer and
written at once.  :class:`ReplyReader` is fed whatever the socket returned
(:meth:`ReplyReader.feed`) and hands out whole replies in order
(:meth:`ReplyReader.next_reply`), or :data:`NEED_DATA` until one is complete.

Replies map to Python as redis-py maps them without ``decode_responses``:
simple and bulk strings are ``bytes`` (a null bulk string is None), integers
are ``int``, arrays are ``list`` (a null array is None), and an error reply is
a :class:`ReplyError` *returned* in its place, since one failed command in a
pipeline does not fail the others.  Only a reply that breaks the protocol
raises (:class:`ProtocolError`); the connection is then unusable.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple, Union

__all__ = [
    "MAX_BULK_BYTES",
    "MAX_ARRAY_LENGTH",
    "MAX_DEPTH",
    "NEED_DATA",
    "ProtocolError",
    "ReplyError",
    "ReplyReader",
    "pack_command",
]

#: Longest bulk string accepted in a reply.  The check script's replies are
#: under 200 bytes; Redis's own limit (proto-max-bulk-len) is 512 MB.
MAX_BULK_BYTES = 1024 * 1024
#: Most elements in one reply array: a pipeline reads one reply per command,
#: and no command the gateway sends returns more than a handful.
MAX_ARRAY_LENGTH = 4096
#: Deepest nesting of arrays accepted (the script returns a flat array).
MAX_DEPTH = 8


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: :meth:`ReplyReader.next_reply` needs more bytes.
NEED_DATA: Any = _NeedData()


class ProtocolError(Exception):
    """The server sent bytes that are not RESP2 (or exceed our bounds)."""


class ReplyError(Exception):
    """An error reply (``-ERR ...``); ``code`` is its first word (``NOSCRIPT``, ``LOADING``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = message.split(" ", 1)[0]


Arg = Union[bytes, str, int, float]


def pack_command(out: bytearray, args: Sequence[Arg]) -> None:
    """Append the RESP2 form of one command (``args[0]`` is its name) to ``out``."""
    out += b"*%d\r\n" % len(args)
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, bool):
            raise TypeError("booleans are not Redis arguments")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode("ascii")
        else:
            raise TypeError("not a Redis argument: %r" % type(arg).__name__)
        out += b"$%d\r\n" % len(data)
        out += data
        out += b"\r\n"


class _Incomplete(Exception):
    pass


_INCOMPLETE = _Incomplete()


class ReplyReader:
    """Whole replies out of the bytes a Redis connection received, in order."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as replies."""
        return len(self._buf) - self._pos

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Add received bytes."""
        if self._pos and self._pos * 2 >= len(self._buf):
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_reply(self) -> Any:
        """The next whole reply, or :data:`NEED_DATA`; raises :class:`ProtocolError`."""
        if self._pos >= len(self._buf):
            return NEED_DATA
        try:
            value, end = self._parse(self._pos, 0)
        except _Incomplete:
            return NEED_DATA
        self._pos = end
        return value

    def _line(self, pos: int) -> Tuple[bytes, int]:
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            if len(self._buf) - pos > MAX_BULK_BYTES:
                raise ProtocolError("reply line longer than %d bytes" % MAX_BULK_BYTES)
            raise _INCOMPLETE
        return bytes(self._buf[pos:end]), end + 2

    def _parse(self, pos: int, depth: int) -> Tuple[Any, int]:
        buf = self._buf
        if pos >= len(buf):
            raise _INCOMPLETE
        kind = buf[pos]
        line, pos = self._line(pos + 1)
        if kind == 0x2B:  # '+' simple string
            return line, pos
        if kind == 0x2D:  # '-' error
            return ReplyError(line.decode("utf-8", "replace")), pos
        if kind == 0x3A:  # ':' integer
            return _integer(line), pos
        if kind == 0x24:  # '$' bulk string
            size = _integer(line)
            if size == -1:
                return None, pos
            if not 0 <= size <= MAX_BULK_BYTES:
                raise ProtocolError("bulk string of %d bytes" % size)
            end = pos + size
            if end + 2 > len(buf):
                raise _INCOMPLETE
            if buf[end:end + 2] != b"\r\n":
                raise ProtocolError("bulk string not followed by CRLF")
            return bytes(buf[pos:end]), end + 2
        if kind == 0x2A:  # '*' array
            count = _integer(line)
            if count == -1:
                return None, pos
            if not 0 <= count <= MAX_ARRAY_LENGTH:
                raise ProtocolError("array of %d elements" % count)
            if depth >= MAX_DEPTH:
                raise ProtocolError("arrays nested deeper than %d" % MAX_DEPTH)
            items: List[Any] = []
            for _ in range(count):
                item, pos = self._parse(pos, depth + 1)
                items.append(item)
            return items, pos
        raise ProtocolError("unknown reply type %r" % chr(kind))


def _integer(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise ProtocolError("not an integer: %r" % line[:40]) from None
