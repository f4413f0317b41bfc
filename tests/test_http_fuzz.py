"""Arbitrary and near-valid bytes against the request-handling layer.

Hypothesis feeds two kinds of input, split at arbitrary points: any bytes at
all, and requests built from a grammar of near-valid parts (request lines,
framing headers with odd values, chunked bodies with bad sizes, pipelined
requests) with a few bytes mutated.  The sans-I/O
:class:`~gateway.http.connection.HTTPConnection` is driven the way the server drives it;
it may only return a request head, ``NEED_DATA`` or ``CLOSED``, or raise a
:class:`~gateway.errors.RequestError` whose status docs/http-api.md documents.  The
same input then goes through the real connection handler over a
:class:`~gateway.http.transport.MemoryTransport`: no internal error, only
documented statuses, one stored record per ``202``, and the ring empty again.
Both head engines serve every input (the fast path with h11 behind it, and
h11 alone) and must agree on every outcome.

``SLUICE_FUZZ_EXAMPLES`` raises the number of examples per test (default 150)
for a longer run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Sequence, Tuple

import trio
import trio.testing
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway import errors
from gateway.http.connection import CLOSED, NEED_DATA, HTTPConnection, RequestHead
from gateway.http.fasthead import FastHead
from gateway.http.transport import MemoryTransport
from gateway.server import READAHEAD
from tests.support.units import chunked, make_gateway, parse_responses, post, split_record

MAX_HEAD = 1024  # as tests.support.units.SMALL_FLAGS
MAX_BODY = 1024
#: Requests one connection may carry in a fuzz case; more means a loop.
MAX_REQUESTS = 64
EXAMPLES = int(os.environ.get("SLUICE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _documented_statuses() -> frozenset:
    """Every status in docs/http-api.md's "Status codes" table."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "http-api.md").read_text(encoding="utf-8")
    section = text.split("### Status codes", 1)[1].split("\n#", 1)[0]
    return frozenset(int(code) for code in re.findall(r"^\| (\d{3}) \|", section, re.MULTILINE))


DOCUMENTED = _documented_statuses()
SUCCESS = frozenset((100, 200, 202))


# -- the grammar of near-valid requests ------------------------------------------------

#: How many times the usual (valid) choice is listed against each odd one, so
#: that most requests are valid and the odd parts come one or two at a time.
USUAL = 12


def _usually(usual, *odd):
    """``usual`` most of the time, else one of ``odd`` (hypothesis shrinks to ``usual``)."""
    return st.sampled_from([usual] * (USUAL * max(1, len(odd))) + list(odd))


_METHODS = (b"POST", b"GET", b"HEAD", b"PUT", b"post", b"PRI", b"P\x00ST", b"")
_TARGETS = (b"/healthz", b"/readyz", b"/v1/logs?x=1", b"*", b"/nope", b"/v1/logs\xff", b"")
_VERSIONS = (b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1", b"HTTP/0.9")
_TRANSFER_ENCODINGS = (b"CHUNKED", b"gzip", b"chunked, chunked", b"gzip, chunked", b"identity", b"",
                       b"chunked\x01")
_LENGTH_FORMS = (b"+%d", b" %d ", b"0x%x", b"-%d", b"%d, %d", b"%d,%d", b"0000%d", b"%d %d")
_CONTENT_LENGTH_NAMES = (b"content-length", b"Content-Length ", b"Content-Length\t")
_EXTRA_HEADERS = [
    (b"Content-Type", b"application/json"), (b"Content-Type", b"text/\xff\xfe\x01"),
    (b"Content-Encoding", b"gzip"), (b"Expect", b"100-continue"), (b"Expect", b"nope"),
    (b"Connection", b"close"), (b"Connection", b"keep-alive"), (b"X-Agent", b"a\x7fb"),
    (b"X-Fold", b"a\r\n b"), (b"X-Fold", b"a\n\tb"), (b"X-\xff", b"1"), (b"", b"empty name"),
    (b"X-Nul", b"a\x00b"), (b"X-Long", b"v" * 600),
]


@st.composite
def _length_value(draw, actual: int) -> bytes:
    value = max(0, actual + draw(_usually(0, -1, 1, 5, -5, 10 ** 6)))
    form = draw(_usually(b"%d", *_LENGTH_FORMS))
    if draw(st.integers(0, 40)) == 0:
        return draw(st.sampled_from([b"", b"9" * 25, b"1" * 20, b"ten", b"\xff"]))
    return form % ((value, value) if form.count(b"%") == 2 else (value,))


@st.composite
def _chunked_body(draw, body: bytes) -> bytes:
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)]) if b > a]
    out = []
    for piece in pieces:
        size = b"%x" % len(piece)
        size = draw(_usually(size, size.upper(), b"0" * 18 + size, size + b" ", size + b";ext=1",
                             b"-" + size, b"0x" + size, b"f" * 21, b"%x" % (len(piece) + 1)))
        out.append(size + b"\r\n" + piece + draw(_usually(b"\r\n", b"\n", b"", b"xx")))
    out.append(draw(_usually(b"0\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n", b"0\r\n", b"", b"0;e\r\n\r\n",
                             b"00\r\n\r\n", b"0\r\n" + b"X-T: t\r\n" * 80 + b"\r\n")))
    return b"".join(out)


@st.composite
def _request(draw, methods: Sequence[bytes] = _METHODS) -> bytes:
    eol = draw(_usually(b"\r\n", b"\n"))
    sep = draw(_usually(b" ", b"  ", b"\t"))
    framing = draw(st.sampled_from(["length", "chunked", "length", "chunked", "both", "none"]))
    method = draw(_usually(b"POST" if framing != "none" else b"GET", *methods))
    line = sep.join([method, draw(_usually(b"/v1/logs", *_TARGETS)), draw(_usually(b"HTTP/1.1", *_VERSIONS))])
    body = draw(st.binary(max_size=300))
    headers: List[Tuple[bytes, bytes]] = []
    if draw(st.integers(0, 30)):
        headers.append((b"Host", draw(_usually(b"t", b"", b"a b"))))
    if framing in ("length", "both"):
        for _ in range(draw(_usually(1, 2))):
            name = draw(_usually(b"Content-Length", *_CONTENT_LENGTH_NAMES))
            headers.append((name, draw(_length_value(len(body)))))
    if framing in ("chunked", "both"):
        for _ in range(draw(_usually(1, 2))):
            headers.append((b"Transfer-Encoding", draw(_usually(b"chunked", *_TRANSFER_ENCODINGS))))
    headers += draw(st.lists(st.sampled_from(_EXTRA_HEADERS), max_size=2))
    headers = draw(st.permutations(headers))
    head = line + eol + b"".join(name + b": " + value + eol for name, value in headers) + eol
    if framing in ("chunked", "both"):
        return head + draw(_chunked_body(body))
    return head + body


@st.composite
def _mutated(draw, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 1, 2, 3]))):
        at = draw(st.integers(0, len(out)))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 44, 48, 58, 59, 127, 255]))
        operation = draw(st.sampled_from(["insert", "replace", "delete"]))
        if operation == "insert" or at == len(out):
            out[at:at] = bytes([byte])
        elif operation == "replace":
            out[at] = byte
        else:
            del out[at]
    return bytes(out)


def _stream(methods: Sequence[bytes] = _METHODS):
    requests = st.lists(_request(methods), min_size=1, max_size=3).map(b"".join)
    return requests.flatmap(_mutated)


def _split(data: bytes, cuts: Sequence[int]) -> List[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)]) if b > a]


_CUTS = st.lists(st.integers(0, 4000), max_size=12)


# -- the sans-I/O connection, driven as server.py drives it ------------------------------


class _Peer:
    """The client's bytes as ``recv_into`` hands them out: pieces, then EOF (0)."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self.pieces = list(pieces)

    @property
    def at_eof(self) -> bool:
        return not self.pieces

    def recv_into(self, view: memoryview) -> int:
        if not self.pieces:
            return 0
        piece = self.pieces[0]
        count = min(len(piece), len(view))
        view[:count] = piece[:count]
        if count == len(piece):
            self.pieces.pop(0)
        else:
            self.pieces[0] = piece[count:]
        return count


def _next_head(conn: HTTPConnection, peer: _Peer):
    head = conn.next_request()
    while head is NEED_DATA:
        # At EOF every recv returns 0 at once: NEED_DATA then would spin.
        was_eof = peer.at_eof
        conn.received(peer.recv_into(conn.head_buffer()))
        head = conn.next_request()
        assert not (was_eof and head is NEED_DATA), "NEED_DATA after EOF"
    assert head is CLOSED or type(head) in (RequestHead, FastHead), head
    return head


def _serve_one(conn: HTTPConnection, peer: _Peer, head) -> Tuple[int, bytes]:
    """What server.py's routing does with ``head``, minus the sink: (status, stored body)."""
    if head.method != b"POST" or head.path != b"/v1/logs":
        if head.content_length or head.chunked:
            raise errors.BadRequest("takes no body")
        conn.finish_body()
        return 200, b""
    head.require_body_framing()
    if head.content_length is not None and head.content_length > MAX_BODY:
        raise errors.PayloadTooLarge("too large")
    conn.continue_100()
    dest = memoryview(bytearray(MAX_BODY))
    if head.content_length is not None:
        dest = dest[:head.content_length]
        filled = conn.take_body(dest)
        while filled < len(dest):
            count = peer.recv_into(dest[filled:])
            if not count:
                raise errors.BadRequest("closed mid-body")
            filled += count
        conn.finish_body()
    else:
        filled, done = conn.read_chunked(dest, 0)
        while not done:
            conn.received(peer.recv_into(conn.head_buffer()))
            filled, done = conn.read_chunked(dest, filled)
    return 202, bytes(dest[:filled])


def drive(pieces: Sequence[bytes], fast: bool = True) -> List[object]:
    """Serve one connection's ``pieces``; the outcome of each request in order.

    Each outcome is ``(status, body)`` for an answered request, the status of
    the error that ended the connection, or ``"closed"``.  ``fast`` false:
    h11 reads every head (``--http h11``).
    """
    peer = _Peer(pieces)
    conn = HTTPConnection(bytearray(MAX_HEAD + READAHEAD), max_head=MAX_HEAD, fast=fast)
    outcomes: List[object] = []
    try:
        for _ in range(MAX_REQUESTS):
            head = _next_head(conn, peer)
            if head is CLOSED:
                outcomes.append("closed")
                return outcomes
            status, body = _serve_one(conn, peer, head)
            answer = conn.respond(status, [], b"{}")
            assert answer.startswith(b"HTTP/1.1 %d " % status)
            outcomes.append((status, body))
            if not conn.next_cycle():
                return outcomes
        raise AssertionError("more requests than the input can hold")
    except errors.RequestError as exc:
        assert exc.status in DOCUMENTED, (exc.status, exc)
        status, headers, body = errors.response_for(exc)
        answer = conn.respond_error(status, headers, body)
        assert answer.startswith(b"HTTP/1.1 %d " % status)
        assert b"\r\nconnection: close\r\n" in answer.lower()
        assert len(conn.discard_buffer()) == MAX_HEAD + READAHEAD
        outcomes.append(exc.status)
        return outcomes


@FUZZ
@given(data=st.binary(max_size=3000), cuts=_CUTS)
def test_arbitrary_bytes_get_a_head_or_a_documented_error(data, cuts):
    whole = drive([data])
    assert drive(_split(data, cuts)) == whole
    assert drive([data], fast=False) == whole


@FUZZ
@given(data=_stream(), cuts=_CUTS)
def test_near_valid_requests_get_a_head_or_a_documented_error(data, cuts):
    whole = drive([data])
    assert drive(_split(data, cuts)) == whole
    assert drive([data], fast=False) == whole
    assert drive([data[i:i + 1] for i in range(len(data))]) == whole


@FUZZ
@given(prefix=st.binary(max_size=200), body=st.binary(max_size=300),
       framing=st.sampled_from(["length", "chunked"]), cuts=_CUTS)
def test_garbage_before_a_request_never_reaches_its_record(prefix, body, framing, cuts):
    only_blank_lines = not prefix.strip(b"\r\n")
    # A prefix holding a whole head of its own is a request of its own.
    assume(only_blank_lines or not re.search(rb"\n\r?\n", prefix))
    request = post(body) if framing == "length" else chunked([p for p in (body[:100], body[100:]) if p])
    outcomes = drive(_split(prefix + request, cuts))
    stored = [outcome[1] for outcome in outcomes if isinstance(outcome, tuple) and outcome[0] == 202]
    # Blank lines before a request are skipped; other bytes spoil it (or become its
    # request line and headers); they never become part of a stored body.
    assert stored == [body] if only_blank_lines else stored in ([], [body])


# -- the connection handler over a memory transport ------------------------------------------


def _serve(pieces: Sequence[bytes], eof: bool):
    gateway, sink = make_gateway("--head-timeout", "1s", "--body-timeout", "1s", "--idle-timeout", "1s",
                                 "--send-timeout", "1s")

    async def main():
        transport = MemoryTransport(pieces, eof=eof)
        with trio.fail_after(30):
            await gateway.handle_connection(transport)
        return transport

    transport = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return gateway, sink, transport


@FUZZ
@given(data=_stream(methods=tuple(m for m in _METHODS if m != b"HEAD")), cuts=_CUTS, eof=st.booleans())
def test_connection_handler_answers_documented_statuses_and_loses_nothing(data, cuts, eof):
    gateway, sink, transport = _serve(_split(data, cuts), eof)
    assert gateway.internal_errors == 0
    assert transport.closed
    responses = parse_responses(transport.sent)
    for response in responses:
        assert response.status in SUCCESS or response.status in DOCUMENTED, response
    finals = [r for r in responses if r.status != 100]
    assert all(r.status in SUCCESS for r in finals[:-1]), finals  # an error ends the connection
    ids = [r.json()["id"] for r in finals if r.status == 202]
    assert ids == sink.ids
    assert all(len(split_record(record)[1]) <= MAX_BODY for record in sink.records)
    assert gateway.ring.used == 0 and gateway.ring.live == 0
