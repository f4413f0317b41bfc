"""A request-head scanner for the shape agents send, checked against h11.

Theory of operation
-------------------
h11 is Sluice's reference for HTTP/1.1, but it validates every head with a
regex per line and builds an event, a header list and several lists per
request: tens of KB of garbage on PyPy.  Agents send one shape of head::

    POST /v1/logs HTTP/1.1\\r\\n
    Host: gateway\\r\\n
    Content-Length: 1024\\r\\n
    Authorization: Bearer ...\\r\\n
    \\r\\n

:func:`scan` reads exactly that shape from the connection's receive buffer
and records where things are in a reused :class:`FastHead`, without making a
Python object per header.  It accepts a head only when all of these hold,
which is a subset of what h11 0.16 accepts, read the way h11 reads it:

* request line ``POST|GET|HEAD SP origin-form SP HTTP/1.1 CRLF``, the target
  a ``/`` then visible ASCII (h11: ``method SP 1*VCHAR SP HTTP/d.d``);
* header lines ``token ":" OWS value OWS CRLF``, the value visible ASCII,
  obs-text (0x80-0xFF) and single spaces or tabs between them (h11 also lets
  control bytes through: those heads go to h11);
* the blank line CRLF ending the head;
* exactly one ``Host`` (h11 refuses none or several in HTTP/1.1);
* at most one ``Content-Length``, of 1 to :data:`MAX_LENGTH_DIGITS` digits;
* ``Connection`` absent, ``close`` or ``keep-alive``;
* no ``Transfer-Encoding``, ``Expect`` or ``Upgrade`` (h11 changes framing or
  state for them), no second ``Content-Type``, ``Content-Encoding``,
  ``Authorization`` or ``X-API-Key`` (the gateway would have to pick one);
* at most :data:`MAX_HEADERS` header lines.

Anything else returns False and the caller hands the same bytes to h11
unchanged, which then accepts or refuses them: the fast path never accepts
what h11 refuses and never reads a field differently
(tests/test_http_fasthead.py checks both on generated and mutated heads).

Values are decoded only when asked for.  The few the gateway always needs
(method, path, Content-Length, Content-Type, Content-Encoding) are decoded by
:func:`scan`; others (:meth:`FastHead.header`) are read from the buffer while
the head is current, that is until the connection receives into its buffer
again (the next head or an error answer's lingering read).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from gateway.errors import LengthRequired

__all__ = ["FastHead", "scan", "MAX_HEADERS", "MAX_LENGTH_DIGITS"]

#: Header lines the fast path keeps offsets for; agents send about 5-10.  A
#: head with more goes to h11 (which allows up to the head size limit).
MAX_HEADERS = 32
#: Longest Content-Length the fast path decodes: 18 digits stay below 2**63.
#: h11 allows 20; longer ones go to h11 (and meet the body size limit there).
MAX_LENGTH_DIGITS = 18

_CR, _LF, _SP, _HTAB, _COLON = 13, 10, 32, 9, 58

# tchar (RFC 9110 section 5.6.2), h11's ``token``.
_TCHAR = bytes(1 if (0x30 <= c <= 0x39 or 0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A
                     or c in b"!#$%&'*+-.^_`|~") else 0 for c in range(256))
# 1: field-vchar (VCHAR or obs-text); 2: SP or HTAB; 0: anything else, which
# sends the head to h11 (h11 allows more controls than this, never fewer).
_VALUE = bytes(1 if (0x21 <= c <= 0x7E or c >= 0x80) else 2 if c in (_SP, _HTAB) else 0
               for c in range(256))

# Names the scanner classifies, lower case.
_HOST = b"host"
_CONTENT_LENGTH = b"content-length"
_CONNECTION = b"connection"
_CONTENT_TYPE = b"content-type"
_CONTENT_ENCODING = b"content-encoding"
_AUTHORIZATION = b"authorization"
_API_KEY = b"x-api-key"
#: Headers h11 acts on (framing, 100-continue, protocol switch): h11 reads them.
_TO_H11 = (b"transfer-encoding", b"expect", b"upgrade")
# "Content-Length" for b"content-length", and so on (b"x-api-key": "X-Api-Key").
_CAPITALIZED = {name: b"-".join(part[:1].upper() + part[1:] for part in name.split(b"-"))
                for name in (_HOST, _CONTENT_LENGTH, _CONNECTION, _CONTENT_TYPE, _CONTENT_ENCODING,
                             _AUTHORIZATION, _API_KEY) + _TO_H11}

#: What a head refers to while its connection holds no receive buffer.
_DETACHED = bytearray()


class FastHead:
    """One request head as offsets into the connection's receive buffer.

    The connection owns one and reuses it for every request the fast path
    reads; it offers what :class:`~gateway.http.connection.RequestHead`
    offers.  Decoded fields are plain attributes; :meth:`header` reads the
    buffer and is valid only while :attr:`current` is true.
    """

    __slots__ = (
        "method", "target", "path", "content_length", "content_type", "content_encoding",
        "keep_alive", "current", "_buf", "_spans", "_count", "_auth", "_api_key",
    )

    #: Always false: chunked bodies go through h11.
    chunked = False
    #: Always false: a head with ``Expect`` goes through h11.
    expect_continue = False
    http_version = b"1.1"

    def __init__(self, buffer: bytearray) -> None:
        self._buf = buffer
        # name start, name end, value start, value end, for each header line.
        self._spans: List[int] = [0] * (4 * MAX_HEADERS)
        self._count = 0
        self._auth = -1  # index of the Authorization line, or -1
        self._api_key = -1  # index of the X-API-Key line, or -1
        self.method = b""
        self.target = b""
        self.path = b""
        self.content_length: Optional[int] = None
        self.content_type: Optional[bytes] = None
        self.content_encoding: Optional[bytes] = None
        self.keep_alive = True
        self.current = False

    def detach(self) -> None:
        """Forget the receive buffer (it went back to the pool) until the next :func:`scan`."""
        self.current = False
        self._buf = _DETACHED

    def header(self, name: bytes) -> Optional[bytes]:
        """The first value of header ``name`` (lower case), or None."""
        if not self.current:
            raise RuntimeError("the request head was overwritten by later input")
        spans = self._spans
        buf = self._buf
        for index in range(self._count):
            at = 4 * index
            if _name_is(buf, spans[at], spans[at + 1], name):
                return bytes(buf[spans[at + 2]:spans[at + 3]])
        return None

    @property
    def headers(self) -> List[Tuple[bytes, bytes]]:
        """All headers as (lower-case name, value) pairs, as h11 gives them (built on demand)."""
        if not self.current:
            raise RuntimeError("the request head was overwritten by later input")
        spans = self._spans
        buf = self._buf
        return [(bytes(buf[spans[at]:spans[at + 1]]).lower(), bytes(buf[spans[at + 2]:spans[at + 3]]))
                for at in range(0, 4 * self._count, 4)]

    @property
    def credential_headers(self) -> List[Tuple[bytes, bytes]]:
        """The ``Authorization`` and ``X-API-Key`` headers, in order (at most one of each)."""
        found = [line for line in (self._auth, self._api_key) if line >= 0]
        if len(found) == 2 and found[0] > found[1]:
            found.reverse()
        return [(_AUTHORIZATION if line == self._auth else _API_KEY, self._value(line)) for line in found]

    def require_body_framing(self) -> None:
        """Raise :class:`~gateway.errors.LengthRequired` unless the body's length is known."""
        if self.content_length is None:
            raise LengthRequired("send Content-Length or Transfer-Encoding: chunked")

    def _value(self, line: int) -> bytes:
        if not self.current:
            raise RuntimeError("the request head was overwritten by later input")
        at = 4 * line
        return bytes(self._buf[self._spans[at + 2]:self._spans[at + 3]])


def _name_is(buf: bytearray, start: int, end: int, name: bytes) -> bool:
    """Whether ``buf[start:end]`` is ``name`` (lower case) in any case, without a copy.

    ASCII case only, as h11's ``bytes.lower()``.  The spellings clients use
    (lower case, capitalized words) are compared by ``startswith`` in C; a
    byte loop reads the others.
    """
    if end - start != len(name):
        return False
    if buf.startswith(name, start):
        return True
    capitalized = _CAPITALIZED.get(name)
    if capitalized is not None and buf.startswith(capitalized, start):
        return True
    for offset in range(end - start):
        c = buf[start + offset]
        if 0x41 <= c <= 0x5A:
            c += 32
        if c != name[offset]:
            return False
    return True


def scan(buf: bytearray, start: int, end: int, head: FastHead) -> bool:
    """Read the head in ``buf[start:end]`` into ``head``; False to let h11 read it.

    ``end`` is just past the blank line that ends the head.  ``head`` is
    filled (and :attr:`FastHead.current` set) only when the result is True.
    """
    head.current = False
    # The connection's receive buffer is lent per request: the head keeps
    # offsets into the one it was read from.
    head._buf = buf
    if end - start < 4 or buf[end - 4] != _CR or buf[end - 3] != _LF or buf[end - 2] != _CR \
            or buf[end - 1] != _LF:
        return False
    # Every loop below stops at a CR at the latest, and buf[end - 4] is one.
    if buf.startswith(b"POST /", start):
        method = b"POST"
        pos = start + 5
    elif buf.startswith(b"GET /", start):
        method = b"GET"
        pos = start + 4
    elif buf.startswith(b"HEAD /", start):
        method = b"HEAD"
        pos = start + 5
    else:
        return False
    target_start = pos
    question = -1
    c = buf[pos]
    while 0x21 <= c <= 0x7E:
        if c == 0x3F and question < 0:
            question = pos
        pos += 1
        c = buf[pos]
    target_end = pos
    if c != _SP or not buf.startswith(b" HTTP/1.1\r\n", pos):
        return False
    pos += 11

    spans = head._spans
    tchar = _TCHAR
    vclass = _VALUE
    count = 0
    host = length_line = connection_line = type_line = encoding_line = auth_line = key_line = -1
    while buf[pos] != _CR:
        if count == MAX_HEADERS:
            return False
        name_start = pos
        while tchar[buf[pos]]:
            pos += 1
        if pos == name_start or buf[pos] != _COLON:
            return False
        name_end = pos
        pos += 1
        while buf[pos] == _SP or buf[pos] == _HTAB:
            pos += 1
        value_start = value_end = pos
        while True:
            kind = vclass[buf[pos]]
            if kind == 1:
                pos += 1
                value_end = pos
            elif kind == 2:
                pos += 1
            else:
                break
        if buf[pos] != _CR or buf[pos + 1] != _LF:
            return False
        pos += 2
        at = 4 * count
        spans[at] = name_start
        spans[at + 1] = name_end
        spans[at + 2] = value_start
        spans[at + 3] = value_end
        # Classify the name by length first: most lines are none of these.
        size = name_end - name_start
        if size == 4 and _name_is(buf, name_start, name_end, _HOST):
            if host >= 0:
                return False
            host = count
        elif size == 14 and _name_is(buf, name_start, name_end, _CONTENT_LENGTH):
            if length_line >= 0:
                return False
            length_line = count
        elif size == 10 and _name_is(buf, name_start, name_end, _CONNECTION):
            if connection_line >= 0:
                return False
            connection_line = count
        elif size == 12 and _name_is(buf, name_start, name_end, _CONTENT_TYPE):
            if type_line >= 0:
                return False
            type_line = count
        elif size == 16 and _name_is(buf, name_start, name_end, _CONTENT_ENCODING):
            if encoding_line >= 0:
                return False
            encoding_line = count
        elif size == 13 and _name_is(buf, name_start, name_end, _AUTHORIZATION):
            if auth_line >= 0:
                return False
            auth_line = count
        elif size == 9 and _name_is(buf, name_start, name_end, _API_KEY):
            if key_line >= 0:
                return False
            key_line = count
        elif size in (6, 7, 17):
            for name in _TO_H11:
                if _name_is(buf, name_start, name_end, name):
                    return False
        count += 1
    if pos + 2 != end or host < 0:
        return False

    content_length: Optional[int] = None
    if length_line >= 0:
        at = 4 * length_line
        first, last = spans[at + 2], spans[at + 3]
        if not 0 < last - first <= MAX_LENGTH_DIGITS:
            return False
        content_length = 0
        for index in range(first, last):
            digit = buf[index] - 0x30
            if not 0 <= digit <= 9:
                return False
            content_length = content_length * 10 + digit
    keep_alive = True
    if connection_line >= 0:
        at = 4 * connection_line
        if _name_is(buf, spans[at + 2], spans[at + 3], b"close"):
            keep_alive = False
        elif not _name_is(buf, spans[at + 2], spans[at + 3], b"keep-alive"):
            return False

    head.method = method
    if question < 0:
        head.path = head.target = bytes(buf[target_start:target_end])
    else:
        head.target = bytes(buf[target_start:target_end])
        head.path = head.target[:question - target_start]
    head.content_length = content_length
    head.keep_alive = keep_alive
    head.content_type = _span_value(buf, spans, type_line)
    head.content_encoding = _span_value(buf, spans, encoding_line)
    head._count = count
    head._auth = auth_line
    head._api_key = key_line
    head.current = True
    return True


def _span_value(buf: bytearray, spans: List[int], line: int) -> Optional[bytes]:
    if line < 0:
        return None
    at = 4 * line
    return bytes(buf[spans[at + 2]:spans[at + 3]])
