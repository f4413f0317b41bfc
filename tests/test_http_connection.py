"""HTTPConnection, the sans-I/O side of the ingest server, on plain bytes.

The driver's part (receiving into ``head_buffer``, reading Content-Length
bodies itself) is played by the helpers here; the server-level scenarios are
in test_http.py.  Every test runs with both head engines: the fast path with
h11 behind it (``--http auto``) and h11 alone (``--http h11``).
"""

from __future__ import annotations

import json

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import errors
from gateway.http.connection import CLOSED, NEED_DATA, HTTPConnection, RequestHead
from gateway.http.fasthead import FastHead
from tests.support.units import chunked, get, post

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
HEADS = (RequestHead, FastHead)
#: Whether _conn() makes connections with the fast path; set per test by _engine.
FAST = {"on": True}


@pytest.fixture(autouse=True, params=["auto", "h11"])
def _engine(request):
    FAST["on"] = request.param == "auto"
    yield request.param
    FAST["on"] = True


def _conn(max_head: int = 1024) -> HTTPConnection:
    return HTTPConnection(bytearray(max_head + 4096), max_head=max_head, fast=FAST["on"])


def _feed(conn: HTTPConnection, data: bytes) -> None:
    while data:
        view = conn.head_buffer()
        count = min(len(view), len(data))
        view[:count] = data[:count]
        conn.received(count)
        data = data[count:]


def _serve_length_body(conn: HTTPConnection, head, more: bytes = b"") -> bytes:
    dest = bytearray(head.content_length)
    filled = conn.take_body(memoryview(dest))
    dest[filled:filled + len(more)] = more  # what the driver reads from the socket itself
    conn.finish_body()
    return bytes(dest)


def test_connection_parses_a_head_and_its_fields():
    conn = _conn()
    _feed(conn, post(b"xyz", target=b"/v1/logs?a=b", headers=[
        (b"Content-Type", b"text/plain"), (b"Content-Encoding", b"gzip"), (b"Expect", b"100-Continue")]))
    head = conn.next_request()
    assert isinstance(head, HEADS)
    assert (head.method, head.target, head.path) == (b"POST", b"/v1/logs?a=b", b"/v1/logs")
    assert head.content_length == 3 and not head.chunked and head.expect_continue
    assert (head.content_type, head.content_encoding) == (b"text/plain", b"gzip")
    assert head.header(b"host") == b"test" and head.header(b"x-none") is None
    assert conn.buffered == 3
    assert conn.continue_100() == CONTINUE


def test_take_body_copies_only_buffered_bytes_and_leaves_the_rest():
    conn = _conn()
    _feed(conn, post(b"0123456789")[:-4])  # six body bytes arrived so far
    head = conn.next_request()
    dest = bytearray(10)
    assert conn.take_body(memoryview(dest)[:4]) == 4
    assert conn.buffered == 2
    assert conn.take_body(memoryview(dest)[4:]) == 2
    assert conn.take_body(memoryview(dest)[6:]) == 0
    assert dest[:6] == b"012345" and head.content_length == 10


def test_finish_body_keeps_h11_in_step_across_keep_alive_cycles():
    conn = _conn()
    bodies = [b"one", b"", b"three33", b"4"]
    _feed(conn, b"".join(post(body) for body in bodies))
    for body in bodies:
        head = conn.next_request()
        assert isinstance(head, HEADS)
        assert _serve_length_body(conn, head) == body
        out = conn.respond(202, [], b"{}")
        assert out.startswith(b"HTTP/1.1 202 ") and b"connection: close" not in out
        assert conn.next_cycle()
    assert conn.next_request() is NEED_DATA
    conn.received(0)
    assert conn.next_request() is CLOSED


def test_body_read_by_the_driver_is_not_seen_by_h11():
    conn = _conn()
    _feed(conn, post(b"", length=5))
    head = conn.next_request()
    # The body bytes never pass through the connection's buffer.
    assert _serve_length_body(conn, head, more=b"GET /") == b"GET /"
    conn.respond(202, [], b"")
    assert conn.next_cycle()
    _feed(conn, get(b"/healthz"))
    nxt = conn.next_request()
    assert (nxt.method, nxt.path) == (b"GET", b"/healthz")


def _read_all_chunked(conn: HTTPConnection, size: int, rest: bytes = b"", step: int = 1):
    """Decode a chunked body, feeding ``rest`` ``step`` bytes at a time as
    needed (then EOF); returns the body and what was not fed."""
    dest = bytearray(size)
    filled, done = conn.read_chunked(memoryview(dest), 0)
    while not done:
        piece, rest = rest[:step], rest[step:]
        if piece:
            _feed(conn, piece)
        else:
            conn.received(0)
        filled, done = conn.read_chunked(memoryview(dest), filled)
    return bytes(dest[:filled]), rest


@pytest.mark.parametrize("step", [0, 1, 3, 7])
def test_read_chunked_then_next_cycle_restores_pipelined_bytes(step):
    conn = _conn()
    data = chunked([b"hello ", b"chunked"], extension=b";x=1")
    stream = data + post(b"after") + get(b"/healthz")
    # step 0: everything arrives at once; otherwise the head, then ``step`` bytes at a time.
    split = len(stream) if step == 0 else data.index(b"\r\n\r\n") + 4
    _feed(conn, stream[:split])
    head = conn.next_request()
    assert head.chunked and head.content_length is None
    body, rest = _read_all_chunked(conn, 100, stream[split:], step)
    assert body == b"hello chunked"
    conn.respond(202, [], b"{}")
    assert conn.next_cycle()
    _feed(conn, rest)
    second = conn.next_request()
    assert (second.method, second.content_length) == (b"POST", 5)
    assert _serve_length_body(conn, second) == b"after"
    conn.respond(202, [], b"{}")
    assert conn.next_cycle()
    third = conn.next_request()
    assert (third.method, third.path) == (b"GET", b"/healthz")


def test_two_chunked_requests_in_a_row():
    conn = _conn()
    _feed(conn, chunked([b"a"]) + chunked([b"bb", b"c"]) + post(b"d"))
    for expected in (b"a", b"bbc"):
        conn.next_request()
        assert _read_all_chunked(conn, 10)[0] == expected
        conn.respond(202, [], b"")
        assert conn.next_cycle()
    head = conn.next_request()
    assert _serve_length_body(conn, head) == b"d"


def test_read_chunked_refuses_a_body_larger_than_the_destination():
    conn = _conn()
    _feed(conn, chunked([b"12345", b"678"]))
    conn.next_request()
    with pytest.raises(errors.PayloadTooLarge):
        _read_all_chunked(conn, 7)


def test_read_chunked_eof_in_the_middle_is_a_bad_request():
    conn = _conn()
    _feed(conn, chunked([b"12345"])[:-8])
    conn.next_request()
    dest = memoryview(bytearray(10))
    filled, done = conn.read_chunked(dest, 0)
    assert not done
    conn.received(0)
    with pytest.raises(errors.BadRequest):
        conn.read_chunked(dest, filled)


def test_leading_empty_lines_are_skipped():
    conn = _conn()
    _feed(conn, b"\r\n\r\n\n" + get(b"/healthz"))
    head = conn.next_request()
    assert head.path == b"/healthz"


def test_head_larger_than_max_head():
    conn = _conn(max_head=1024)
    _feed(conn, b"GET / HTTP/1.1\r\nX: " + b"a" * 1010)
    with pytest.raises(errors.HeadersTooLarge):
        conn.next_request()


def test_receive_buffer_must_hold_a_head():
    with pytest.raises(ValueError):
        HTTPConnection(bytearray(100), max_head=1024)


def test_eof_in_the_middle_of_a_head():
    conn = _conn()
    _feed(conn, b"GET /healthz HTTP/1.1\r\n")
    assert conn.next_request() is NEED_DATA
    conn.received(0)
    with pytest.raises(errors.BadRequest):
        conn.next_request()


def test_respond_to_head_sends_no_body():
    conn = _conn()
    _feed(conn, get(b"/healthz", method=b"HEAD"))
    conn.next_request()
    conn.finish_body()
    out = conn.respond(200, [], b'{"status":"ok"}')
    assert out.endswith(b"content-length: 15\r\n\r\n")
    assert conn.next_cycle()


def test_respond_error_after_an_interim_response_closes():
    conn = _conn()
    _feed(conn, post(b"", length=5, headers=[(b"Expect", b"100-continue")]))
    conn.next_request()
    assert conn.continue_100() == CONTINUE
    assert conn.continue_100() == b""  # only once
    out = conn.respond_error(408, [], b"{}")
    assert out.startswith(b"HTTP/1.1 408 ") and b"connection: close" in out
    assert not conn.next_cycle()


def test_request_head_framing_checks():
    both = h11.Request(method=b"POST", target=b"/", headers=[
        (b"Host", b"x"), (b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")])
    with pytest.raises(errors.BadRequest):
        RequestHead(both)
    head = RequestHead(h11.Request(method=b"POST", target=b"/", headers=[
        (b"Host", b"x"), (b"Transfer-Encoding", b"chunked")]))
    assert head.chunked
    head.require_body_framing()
    bare = RequestHead(h11.Request(method=b"POST", target=b"/", headers=[(b"Host", b"x")]))
    with pytest.raises(errors.LengthRequired):
        bare.require_body_framing()


def test_errors_map_to_their_answers():
    status, headers, body = errors.response_for(errors.Overloaded("full", retry_after=2.5))
    assert status == 503 and (b"retry-after", b"3") in headers
    assert json.loads(body) == {"error": "overloaded", "message": "full"}
    status, headers, _ = errors.response_for(errors.MethodNotAllowed(b"GET, HEAD"))
    assert status == 405 and (b"allow", b"GET, HEAD") in headers


_RESPONSE_CASES = [
    (b"POST /v1/logs HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc", 202, False),
    (b"POST /v1/logs HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc", 202, True),
    (b"POST /v1/logs HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc", 202, False),
    (b"POST /v1/logs HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc", 202, False),
    (b"POST /v1/logs HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc", 202, False),
    (b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n", 503, False),
    (b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 200, False),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 299, False),
]


@pytest.mark.parametrize("request_bytes,status,close", _RESPONSE_CASES)
def test_response_written_without_h11_matches_h11(request_bytes: bytes, status: int, close: bool) -> None:
    # respond() writes the head itself and at most tells h11's state machine
    # (not at all for a head the fast path read); the bytes and what follows
    # (keep-alive or not) must be h11's own.
    outcomes = []
    for through_h11 in (False, True):
        conn = HTTPConnection(bytearray(1024 + 4096), max_head=1024, fast=FAST["on"] and not through_h11)
        _feed(conn, request_bytes)
        head = conn.next_request()
        assert isinstance(head, HEADS)
        if head.content_length:
            _serve_length_body(conn, head)
        else:
            conn.finish_body()
        headers = [(b"content-type", b"application/json")]
        if through_h11:
            out = conn._respond_h11(status, headers, b'{"ok":1}', close)
        else:
            out = conn.respond(status, headers, b'{"ok":1}', close=close)
        outcomes.append((out, conn.next_cycle()))
    assert outcomes[0] == outcomes[1]


@given(st.binary(max_size=64).map(lambda b: b.replace(b"x", b"\n").replace(b"y", b"\r")),
       st.integers(0, 8), st.integers(0, 70))
def test_head_end_is_the_first_blank_line(data: bytes, start: int, end: int) -> None:
    import re

    from gateway.http.connection import _head_end

    end = min(end, len(data))
    match = re.compile(rb"\n\r?\n").search(data, start, end)
    assert _head_end(bytearray(data), start, end) == (match.end() if match else -1)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_trailers_end_the_connection_after_the_answer(eol):
    """h11 reads trailers with bare-LF line ends and their bytes never reach
    our checks: nothing after them is read as a request (a proxy may have
    read it as part of the trailers)."""
    conn = _conn()
    data = chunked([b"abc"]).replace(b"0\r\n\r\n", b"0\r\nX-T: v" + eol + eol)
    _feed(conn, data + get(b"/healthz"))
    assert conn.next_request().chunked
    body, _ = _read_all_chunked(conn, 100, b"", 0)
    assert body == b"abc"
    assert b"connection: close" in conn.respond(202, [], b"{}").lower()
    assert not conn.next_cycle()
