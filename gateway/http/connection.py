"""Sans-I/O HTTP/1.1 for the ingest server: h11 for heads, our bytes for bodies.

Theory of operation
-------------------
:class:`HTTPConnection` is one client connection without the socket.  The
driver asks it for a writable view (:meth:`HTTPConnection.head_buffer`),
receives into that, reports the count (:meth:`HTTPConnection.received`), and
calls :meth:`HTTPConnection.next_request` until it returns a
:class:`RequestHead`.

A head of the shape agents send is read by the fast path
(:mod:`gateway.http.fasthead`), which keeps offsets into the receive buffer
and makes almost no garbage; any other head goes through h11, which
validates and parses it (``fast=False``, ``--http h11``: every head does).
While a request read by the fast path is served, h11's state machine stays
idle, and this class keeps the little state such a request needs (body
finished, answered, keep-alive).  The body never goes through h11:
h11 would copy it piece by piece, which is slow for 1 MiB bodies and makes
garbage.  Instead the connection keeps its own receive buffer; a head is handed
to h11 only up to its blank line, and for ``Content-Length`` bodies the driver
copies the bytes already buffered into the record's ring slot
(:meth:`HTTPConnection.take_body`) and reads the rest from the socket straight
into the slot.  :meth:`HTTPConnection.finish_body` then tells h11 the body is
over.  Chunked bodies are rare and go through h11's decoder
(:meth:`HTTPConnection.read_chunked`), a bounded copy per chunk.

Responses are written from preformatted parts (:meth:`HTTPConnection.respond`);
for a request h11 read, h11's state machine is told and decides keep-alive.
After a response, :meth:`HTTPConnection.next_cycle` says whether the
connection may carry another request.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import List, Optional, Tuple

import h11

from buffers.copy import copy_into
from gateway.errors import (
    BadRequest,
    HeadersTooLarge,
    LengthRequired,
    NotImplementedFraming,
    PayloadTooLarge,
    RequestError,
    VersionNotSupported,
)
from gateway.http.fasthead import FastHead, scan

__all__ = [
    "DEFAULT_MAX_HEAD",
    "NEED_DATA",
    "CLOSED",
    "RequestHead",
    "HTTPConnection",
]

#: Largest request head accepted.  Precedents: h11 16 KiB, nginx
#: 4 x 8 KiB, node.js 16 KiB; agents send a few hundred bytes.
DEFAULT_MAX_HEAD = 16 * 1024

#: Stand for "no receive buffer": a waiting connection holds none (one
#: shared empty view, not one per connection).
_NO_BUFFER = bytearray()
_NO_VIEW = memoryview(_NO_BUFFER)
_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}
_LEADING_EOL = b"\r\n"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: :meth:`HTTPConnection.next_request` needs more bytes.
NEED_DATA = _Sentinel("NEED_DATA")
#: The client closed the connection between requests.
CLOSED = _Sentinel("CLOSED")

# A reader that reports the body as finished; swapped in for h11's
# Content-Length reader once the driver has read the body itself.  h11 has no
# public way to skip a body; a fresh h11.Connection per request would cost
# tens of KB of allocation per request, so this is checked at import and the
# fresh connection is the fallback.
try:
    from h11._readers import ContentLengthReader as _ContentLengthReader

    _BODY_DONE: object = _ContentLengthReader(0)
    _CAN_SKIP_BODY = hasattr(h11.Connection(h11.SERVER), "_reader")
except ImportError:  # pragma: no cover - depends on h11's internals
    _BODY_DONE = None
    _CAN_SKIP_BODY = False


# Responses written by :meth:`HTTPConnection.respond` itself: h11 is told of
# them through its internal event processing (checked here, with h11.send as
# the fallback), using events made and validated once.
_STATUS_LINES = {status: b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
                 for status in (200, 202, 503)}
_SENT_KEEP_ALIVE = h11.Response(status_code=200, headers=[(b"content-length", b"0")])
_SENT_CLOSE = h11.Response(status_code=200, headers=[(b"content-length", b"0"), (b"connection", b"close")])
_SENT_END = h11.EndOfMessage()
_CAN_TELL_STATE = callable(getattr(h11.Connection, "_process_event", None)) and hasattr(
    getattr(h11.Connection(h11.SERVER), "_cstate", None), "keep_alive")


class RequestHead:
    """What the server needs from one request head."""

    __slots__ = (
        "method", "target", "path", "headers", "content_length", "chunked",
        "expect_continue", "content_type", "content_encoding", "http_version",
    )

    def __init__(self, request: h11.Request) -> None:
        self.method: bytes = request.method
        self.target: bytes = request.target
        question = request.target.find(b"?")
        self.path: bytes = request.target if question < 0 else request.target[:question]
        self.headers = request.headers  # lower-cased names
        self.http_version: bytes = request.http_version
        if not request.http_version.startswith(b"1."):
            # h11 parses any digit.digit; PRI * HTTP/2.0 (an HTTP/2 preface) lands here.
            raise VersionNotSupported("HTTP/%s is not supported" % request.http_version.decode("ascii"))
        self.content_length: Optional[int] = None
        self.chunked = False
        self.expect_continue = False
        self.content_type: Optional[bytes] = None
        self.content_encoding: Optional[bytes] = None
        for name, value in request.headers:
            if name == b"content-length":
                if self.content_length is not None:
                    # h11 folds identical duplicates; differing ones never get here.
                    raise BadRequest("duplicate Content-Length")
                self.content_length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = True
            elif name == b"content-type":
                self.content_type = value
            elif name == b"content-encoding":
                self.content_encoding = value
            elif name == b"expect" and value.lower() == b"100-continue":
                self.expect_continue = True
        if self.chunked and self.content_length is not None:
            # Both framings at once is how requests are smuggled past proxies.
            raise BadRequest("both Content-Length and Transfer-Encoding")
        if self.chunked and request.http_version == b"1.0":
            # RFC 9112 section 6.1: in HTTP/1.0 a Transfer-Encoding means the
            # framing is faulty, whatever a proxy in front made of it.
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")

    @property
    def credential_headers(self) -> List[Tuple[bytes, bytes]]:
        """Headers to look for the API key in (all of them; see FastHead's)."""
        return self.headers

    def header(self, name: bytes) -> Optional[bytes]:
        """The first value of header ``name`` (lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def require_body_framing(self) -> None:
        """Raise :class:`LengthRequired` unless the body's length is known."""
        if self.content_length is None and not self.chunked:
            raise LengthRequired("send Content-Length or Transfer-Encoding: chunked")


class HTTPConnection:
    """The server side of one HTTP/1.1 connection, without I/O."""

    def __init__(self, buffer: Optional[bytearray], *, max_head: int = DEFAULT_MAX_HEAD,
                 fast: bool = True) -> None:
        self.max_head = max_head
        self._buf = _NO_BUFFER
        self._view = _NO_VIEW
        if buffer is not None:
            self.lend(buffer)
        self._start = 0  # first unconsumed byte
        self._end = 0  # end of received bytes
        self._eof = False
        self._h11 = self._new_h11()
        self._chunked_h11_fed = False
        self._had_trailers = False
        self._method = b""
        #: Reused for every head the fast path reads; None with ``fast=False``.
        self._fast_head: Optional[FastHead] = FastHead(_NO_BUFFER) if fast else None
        # The request being served was read by the fast path (h11 stays idle).
        self._fast = False
        self._fast_body_done = False
        self._fast_answered = False
        self._fast_keep_alive = False

    def _new_h11(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)

    # -- the receive buffer, held only while bytes are expected -----------

    @property
    def has_buffer(self) -> bool:
        """Whether a receive buffer is lent (:meth:`lend`)."""
        return self._buf is not _NO_BUFFER

    def lend(self, buffer: bytearray) -> None:
        """Receive into ``buffer`` from now on (it must hold a whole head).

        A waiting connection holds no buffer: the driver lends one when bytes
        arrive and takes it back between requests (:meth:`take_back_buffer`),
        so an idle connection costs its socket and a few hundred bytes.
        """
        if self.has_buffer:
            raise ValueError("a receive buffer is already lent")
        if len(buffer) < self.max_head:
            raise ValueError("the receive buffer must hold a whole head")
        self._buf = buffer
        self._view = memoryview(buffer)

    def take_back_buffer(self, *, discard: bool = False) -> Optional[bytearray]:
        """The lent buffer, if it holds no unconsumed bytes (else None: it stays).

        With ``discard`` (the connection is closing) unconsumed bytes are dropped.
        """
        if not self.has_buffer or (self._end > self._start and not discard):
            return None
        if self._fast_head is not None:
            self._fast_head.detach()
        buffer = self._buf
        self._buf = _NO_BUFFER
        self._view = _NO_VIEW
        self._start = self._end = 0
        return buffer

    # -- receiving -------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return self._end - self._start

    def head_buffer(self) -> memoryview:
        """Writable space to receive more of the head (or what follows) into.

        Raises :class:`HeadersTooLarge` when a whole ``max_head`` is buffered
        without a complete head.
        """
        if self._fast_head is not None:
            self._fast_head.current = False
        if self._start:
            count = self._end - self._start
            copy_into(self._view, self._view[self._start:self._end])
            self._start, self._end = 0, count
        if not self.has_buffer:
            raise ValueError("no receive buffer lent")
        if self._end >= self.max_head:
            raise HeadersTooLarge("request head larger than %d bytes" % self.max_head)
        return self._view[self._end:len(self._buf)]

    def received(self, nbytes: int) -> None:
        """``nbytes`` landed in the last :meth:`head_buffer` view; 0 means EOF."""
        if nbytes == 0:
            self._eof = True
        self._end += nbytes

    def next_request(self):
        """A :class:`RequestHead`, :data:`NEED_DATA` or :data:`CLOSED`.

        Raises a :class:`~gateway.errors.RequestError` for a bad head.
        """
        buf = self._buf
        # Ignore empty lines before a request line (RFC 9112 section 2.2).
        while self._start < self._end and buf[self._start] in _LEADING_EOL:
            self._start += 1
        if self._start == self._end:
            if self._eof:
                return CLOSED
            return NEED_DATA
        head_end = _head_end(buf, self._start, min(self._end, self._start + self.max_head))
        if head_end < 0:
            if self._end - self._start >= self.max_head:
                raise HeadersTooLarge("request head larger than %d bytes" % self.max_head)
            if self._eof:
                raise BadRequest("connection closed in the middle of a request head")
            return NEED_DATA
        fast = self._fast_head
        if fast is not None and scan(buf, self._start, head_end, fast):
            self._start = head_end
            self._method = fast.method
            self._fast = True
            self._fast_body_done = self._fast_answered = self._fast_keep_alive = False
            return fast
        # A line of the head that starts with a space or tab: obsolete line
        # folding.  h11 would join it to the line before; a proxy in front may
        # not, and then the two disagree on the headers (and on the framing,
        # if it is Transfer-Encoding or Content-Length).  RFC 9112 section 5.2
        # allows rejecting it: we do.
        if buf.find(b"\n ", self._start, head_end) >= 0 or buf.find(b"\n\t", self._start, head_end) >= 0:
            raise BadRequest("obsolete line folding in the request head")
        # The fast path above takes only CRLF lines; h11 would also take a
        # bare LF as a line end, which a proxy in front may not.
        if _has_bare_lf(buf, self._start, head_end):
            raise BadRequest("a line of the request head ends in a bare LF: lines end with CRLF")
        try:
            self._h11.receive_data(self._view[self._start:head_end])  # type: ignore[arg-type]
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise _translate(exc) from exc
        self._start = head_end
        if type(event) is not h11.Request:
            raise BadRequest("malformed request head")
        self._method = event.method
        try:
            return RequestHead(event)
        except ValueError as exc:
            raise BadRequest("bad Content-Length") from exc

    # -- bodies ----------------------------------------------------------

    def take_body(self, dest: memoryview) -> int:
        """Copy buffered body bytes into ``dest``; returns how many."""
        count = min(len(dest), self._end - self._start)
        if count:
            copy_into(dest, self._view[self._start:self._start + count])
            self._start += count
        return count

    def finish_body(self) -> None:
        """The driver has read the whole Content-Length body itself."""
        if self._fast:
            self._fast_body_done = True
            return
        conn = self._h11
        if conn.their_state is h11.SEND_BODY:
            if _CAN_SKIP_BODY:
                conn._reader = _BODY_DONE  # type: ignore[assignment]
            else:  # pragma: no cover - fallback for other h11 versions
                self._restart_h11()
                return
        event = conn.next_event()
        if type(event) is not h11.EndOfMessage:
            raise BadRequest("unexpected body framing")

    def read_chunked(self, dest: memoryview, filled: int) -> Tuple[int, bool]:
        """Decode buffered chunked body bytes into ``dest[filled:]``.

        Returns ``(filled, done)``.  When not done, receive more with
        :meth:`head_buffer`/:meth:`received` and call again.  Raises
        :class:`~gateway.errors.PayloadTooLarge` if the body outgrows ``dest``.
        """
        conn = self._h11
        if self._end > self._start:
            conn.receive_data(self._view[self._start:self._end])  # type: ignore[arg-type]
            self._start = self._end
        if self._eof:
            conn.receive_data(b"")
        self._chunked_h11_fed = True
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _translate(exc) from exc
            if event is h11.NEED_DATA:
                if self._eof:
                    raise BadRequest("connection closed in the middle of a chunked body")
                return filled, False
            if type(event) is h11.Data:
                data = event.data
                if filled + len(data) > len(dest):
                    raise PayloadTooLarge("chunked body larger than %d bytes" % len(dest))
                dest[filled:filled + len(data)] = data
                filled += len(data)
            elif type(event) is h11.EndOfMessage:
                if event.headers:
                    # h11 reads trailers with bare-LF line ends too, and we
                    # never see their bytes: a request hidden after them
                    # could be read differently by a proxy.  Nothing follows
                    # on this connection (see next_cycle).
                    self._had_trailers = True
                return filled, True
            else:
                raise BadRequest("unexpected event in a chunked body")

    # -- responding ------------------------------------------------------

    def continue_100(self) -> bytes:
        """The ``100 Continue`` interim response, if the client waits for it."""
        if self._fast or not self._h11.client_is_waiting_for_100_continue:
            return b""
        return self._h11.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))

    def respond(self, status: int, headers: List[Tuple[bytes, bytes]], body: bytes,
                *, close: bool = False) -> bytes:
        """The bytes of a complete response.

        ``headers`` are the server's own constants (lower-case names, valid
        values): once the request is read, they are written as given and only
        h11's state machine is told, since building an ``h11.Response`` would
        validate them again on every request.
        """
        if self._fast:
            if self._fast_answered:
                raise RuntimeError("this request was answered already")
            self._fast_answered = True
            head = self._fast_head
            assert head is not None
            # A body not read to its end leaves the connection out of step.
            self._fast_keep_alive = head.keep_alive and self._fast_body_done and not close
            return self._format(status, headers, body, _close_line(head, close))
        conn = self._h11
        close = close or self._had_trailers
        if not _CAN_TELL_STATE or conn.our_state is not h11.SEND_RESPONSE \
                or conn.their_state is not h11.DONE:
            return self._respond_h11(status, headers, body, close=close)
        keep_alive = conn._cstate.keep_alive and not close
        conn._process_event(h11.SERVER, _SENT_KEEP_ALIVE if keep_alive else _SENT_CLOSE)
        conn._process_event(h11.SERVER, _SENT_END)
        return self._format(status, headers, body, b"" if keep_alive else _CLOSE)

    def _format(self, status: int, headers: List[Tuple[bytes, bytes]], body: bytes,
                close_line: bytes) -> bytes:
        line = _STATUS_LINES.get(status)
        if line is None:
            line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))
        parts = [line]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"content-length: %d\r\n" % len(body))
        if close_line:
            parts.append(close_line)
        parts.append(b"\r\n")
        if body and self._method != b"HEAD":
            parts.append(body)
        return b"".join(parts)

    def _respond_h11(self, status: int, headers: List[Tuple[bytes, bytes]], body: bytes,
                     close: bool) -> bytes:
        conn = self._h11
        headers = headers + [(b"content-length", b"%d" % len(body))]
        if close:
            headers.append((b"connection", b"close"))
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b"")))
        if body and self._method != b"HEAD":
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        return out

    def respond_error(self, status: int, headers: List[Tuple[bytes, bytes]], body: bytes) -> bytes:
        """Bytes of an error answer, in any state; the connection closes after it."""
        if self._fast:
            self._fast_answered = True
            self._fast_keep_alive = False
            assert self._fast_head is not None
            return self._format(status, headers, body, _close_line(self._fast_head, True))
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            # A response was already under way (or h11 gave up): answer on a
            # fresh state machine, as the last thing this connection sends.
            self._h11 = self._new_h11()
        return self._respond_h11(status, headers, body, close=True)

    def discard_buffer(self) -> memoryview:
        """The whole receive buffer, to read and drop bytes into before closing."""
        if self._fast_head is not None:
            self._fast_head.current = False
        self._start = self._end = 0
        return self._view

    def next_cycle(self) -> bool:
        """After a response: whether another request may follow (keep-alive)."""
        if self._fast:
            if not (self._fast_answered and self._fast_keep_alive):
                return False
            self._fast = False
            self._method = b""
            return True
        conn = self._h11
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return False
        if self._had_trailers:
            return False
        # The next answer, even an error before its request is parsed, must
        # not be framed as the answer to this request's method (HEAD).
        self._method = b""
        if self._chunked_h11_fed:
            # h11 holds the bytes that followed the chunked body: move them
            # back to our buffer and start over with a clean state machine.
            self._restart_h11()
            return True
        conn.start_next_cycle()
        return True

    def _restart_h11(self) -> None:
        leftover, _ = self._h11.trailing_data
        if leftover:
            count = self._end - self._start
            if count + len(leftover) > len(self._buf):
                raise HeadersTooLarge("pipelined data larger than the receive buffer")
            self._view[len(leftover):len(leftover) + count] = self._view[self._start:self._end]
            self._view[:len(leftover)] = leftover
            self._start, self._end = 0, count + len(leftover)
        self._h11 = self._new_h11()
        self._chunked_h11_fed = False


_CLOSE = b"connection: close\r\n"
# h11 rewrites the header this way when the client asked to close.
_CLOSE_H11 = b"Connection: close\r\n"


def _close_line(head: FastHead, close: bool) -> bytes:
    """The Connection line h11 would write answering ``head``."""
    if not head.keep_alive:
        return _CLOSE_H11
    return _CLOSE if close else b""


def _has_bare_lf(buf: bytearray, start: int, end: int) -> bool:
    """Whether a line of the head in ``buf[start:end]`` ends in LF without CR.

    h11 accepts such lines (RFC 9112 section 2.2 allows it); a proxy in
    front may not split lines there, and then the two see different headers
    (request smuggling).  Rejecting them keeps one reading of every head.
    Two counts in C, no allocation.
    """
    return buf.count(b"\n", start, end) != buf.count(b"\r\n", start, end)


def _head_end(buf: bytearray, start: int, end: int) -> int:
    """Index just past the blank line ending a head in ``buf[start:end]``, or -1.

    ``bytearray.find`` rather than a regex: on PyPy a regex search allocates
    a match object and more on every request.
    """
    crlf = buf.find(b"\n\r\n", start, end)
    lf = buf.find(b"\n\n", start, end if crlf < 0 else crlf + 2)
    if lf >= 0:
        return lf + 2
    return crlf + 3 if crlf >= 0 else -1


def _translate(exc: h11.RemoteProtocolError) -> RequestError:
    hint = getattr(exc, "error_status_hint", 400)
    if hint == 431:
        return HeadersTooLarge(str(exc))
    if hint == 501:
        return NotImplementedFraming(str(exc))
    return BadRequest(str(exc) or "malformed request")
