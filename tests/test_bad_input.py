"""Hostile and broken clients against a real gateway: literal bytes on real sockets.

Each case runs a :class:`~gateway.server.Gateway` in this process (file sink,
short time limits) and, on one connection, sends two good records and then the
bad input.  The bad input must get its documented status (or a clean close),
the two records answered before it must be stored exactly, nothing after it may
reach a record, a well-behaved client on another connection keeps getting
``202`` meanwhile, and the gateway counts no internal error.  Clients are
blocking sockets in threads next to the gateway's Trio loop.

The cases, grouped as docs/reliability.md's "Bad input" table lists them:
malformed request lines and headers, request smuggling, oversized heads and
bodies, bodies shorter or longer than declared, slow-drip clients, clients
that never read, connection floods, odd bytes in headers, and bad API keys;
then the same kinds of failure on ``POST /otlp/v1/logs``, answered with a
``google.rpc.Status`` body in the request's encoding (gateway.otlp).

Every case runs with both head engines: ``--http auto`` (the fast path, h11
for heads it leaves) and ``--http h11`` (h11 for every head).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import pytest
import trio

from gateway.access import keystore
from gateway.http.transport import MemoryTransport
from tests.support.bad_input import (  # noqa: F401 - engine is an autouse fixture
    CLOSE,
    ENGINE,
    MAX_BODY,
    WAIT,
    KiB,
    Neighbour,
    Running,
    assert_error,
    engine,
    engine_gateway,
    response_ids,
    running,
)
from tests.support.gateway import (
    RawConnection,
    gateway_in_process,
    post_request,
    stored,
)
from tests.support.kinesis import FakeStreams, FaultServer, aws_env_fixture  # noqa: F401 - fixture
from tests.support.redis import running_redis
from tests.support.units import parse_responses, post

# -- the cases -------------------------------------------------------------------------


Outcome = Union[int, str, Tuple[int, ...]]


class Case(NamedTuple):
    """Bad bytes sent after two good records, and what they must get."""

    name: str
    wire: bytes
    outcome: Outcome  # a status, CLOSE, or the statuses of several answers
    shutdown: bool = False  # half-close after sending (the server sees EOF)
    piece: int = 0  # send in pieces this large, DRIP apart (slow-drip clients)...
    whole: int = 0  # ... after sending this many bytes at once
    stored: Tuple[bytes, ...] = ()  # bodies of the records the bad input's 202s stand for
    otlp: Optional[str] = None  # an OTLP request: the encoding its Status answer comes in


DRIP = 0.05
H = b"Host: t"
LOGS = b"POST /v1/logs HTTP/1.1\r\n"
CHUNKED = LOGS + b"Host: t\r\nTransfer-Encoding: chunked\r\n\r\n"
MARK = b"GARBAGE-AFTER-THE-BODY"
ABC_CHUNKED = b"3\r\nabc\r\n0\r\n\r\n"


def _head(*lines: bytes, line: bytes = LOGS) -> bytes:
    return line + b"".join(item + b"\r\n" for item in lines) + b"\r\n"


def _cl(value: bytes, body: bytes = b"abc", *lines: bytes, line: bytes = LOGS) -> bytes:
    return _head(H, b"Content-Length: " + value, *lines, line=line) + body


CASES = [
    # Malformed request lines.
    Case("garbage-line", b"GARBAGE\r\n\r\n", 400),
    Case("no-version", b"POST /v1/logs\r\nHost: t\r\n\r\n", 400),
    Case("double-space", _head(H, line=b"POST  /v1/logs HTTP/1.1\r\n"), 400),
    Case("tab-separator", _head(H, line=b"POST\t/v1/logs HTTP/1.1\r\n"), 400),
    Case("extra-word", _head(H, line=b"POST /v1/logs HTTP/1.1 x\r\n"), 400),
    Case("lower-case-version", _head(H, line=b"POST /v1/logs http/1.1\r\n"), 400),
    Case("nul-in-method", _head(H, line=b"PO\x00ST /v1/logs HTTP/1.1\r\n"), 400),
    Case("non-ascii-target", _head(H, line=b"POST /v1/l\xc3\xb6gs HTTP/1.1\r\n"), 400),
    Case("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    Case("http-3", _head(H, line=b"GET /healthz HTTP/3.0\r\n"), 505),
    Case("tls-client-hello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(64)), 400,
         shutdown=True),
    Case("unknown-path", _head(H, line=b"GET /v1/../admin HTTP/1.1\r\n"), 404),
    Case("unknown-method", _cl(b"3", line=b"PATCH /v1/logs HTTP/1.1\r\n"), 405),
    # Malformed headers.
    Case("no-colon", _head(H, b"Content-Length 3") + b"abc", 400),
    Case("space-before-colon", _head(H, b"Content-Length : 3") + b"abc", 400),
    Case("empty-name", _cl(b"3", b"abc", b": x"), 400),
    Case("no-host", _head(b"Content-Length: 3") + b"abc", 400),
    Case("two-hosts", _cl(b"3", b"abc", b"Host: u"), 400),
    Case("bare-cr", _cl(b"3", b"abc", b"X-A: a\rb"), 400),
    # Bare LF: h11 would take it as a line end; a proxy in front may not.
    Case("bare-lf-head", b"POST /v1/logs HTTP/1.1\nHost: t\nContent-Length: 3\n\nabc", 400),
    Case("bare-lf-one-line", b"POST /v1/logs HTTP/1.1\r\nHost: t\nContent-Length: 3\r\n\r\nabc", 400),
    Case("bare-lf-hides-a-header", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nX-A: a\nTransfer-Encoding: "
         b"chunked\r\nContent-Length: 3\r\n\r\nabc", 400),
    Case("leading-whitespace-line", _head(b" Host: t", b"Content-Length: 3") + b"abc", 400),
    Case("head-cut-by-eof", _head(H)[:-2], 400, shutdown=True),
    # Request smuggling.
    Case("cl-and-te", _head(H, b"Content-Length: 3", b"Transfer-Encoding: chunked") + ABC_CHUNKED, 400),
    Case("te-and-cl", _head(H, b"Transfer-Encoding: chunked", b"Content-Length: 3") + ABC_CHUNKED, 400),
    Case("cl-conflicting", _cl(b"3", b"abcd", b"Content-Length: 4"), 400),
    Case("cl-list-conflicting", _cl(b"3, 4", b"abcd"), 400),
    Case("cl-plus", _cl(b"+3"), 400),
    Case("cl-minus", _cl(b"-3"), 400),
    Case("cl-inner-space", _cl(b"1 3"), 400),
    Case("cl-hex", _cl(b"0x3"), 400),
    Case("cl-empty", _cl(b""), 400),
    Case("cl-21-digits", _cl(b"9" * 21), 400),
    Case("cl-non-ascii-digit", _cl(b"\xd9\xa3"), 400),
    Case("te-gzip", _head(H, b"Transfer-Encoding: gzip") + b"abc", 501),
    Case("te-gzip-chunked", _head(H, b"Transfer-Encoding: gzip, chunked") + b"0\r\n\r\n", 501),
    Case("te-chunked-twice-listed", _head(H, b"Transfer-Encoding: chunked, chunked") + b"0\r\n\r\n", 501),
    Case("te-two-headers", _head(H, b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")
         + b"0\r\n\r\n", 501),
    Case("te-identity", _head(H, b"Transfer-Encoding: identity") + b"abc", 501),
    Case("te-in-http-1.0", _head(H, b"Transfer-Encoding: chunked", line=b"POST /v1/logs HTTP/1.0\r\n")
         + b"3\r\nabc\r\n0\r\n\r\n", 400),
    Case("fold-te", _head(H, b"Transfer-Encoding:", b" chunked") + b"3\r\nabc\r\n0\r\n\r\n", 400),
    Case("fold-cl", _head(H, b"Content-Length: 3", b"\t4") + b"abc", 400),
    Case("fold-other", _cl(b"3", b"abc", b"X-A: a", b" b"), 400),
    Case("chunk-size-letters", CHUNKED + b"zz\r\nabc\r\n0\r\n\r\n", 400),
    Case("chunk-size-negative", CHUNKED + b"-3\r\nabc\r\n0\r\n\r\n", 400),
    Case("chunk-size-0x", CHUNKED + b"0x3\r\nabc\r\n0\r\n\r\n", 400),
    Case("chunk-size-overflow", CHUNKED + b"f" * 21 + b"\r\nabc\r\n0\r\n\r\n", 400),
    Case("chunk-longer-than-size", CHUNKED + b"3\r\nabcdef\r\n0\r\n\r\n", 400),
    Case("chunk-bare-lf", CHUNKED + b"3\nabc\n0\n\n", 400, shutdown=True),
    Case("no-final-chunk-then-eof", CHUNKED + b"3\r\nabc\r\n", 400, shutdown=True),
    Case("no-final-chunk", CHUNKED + b"3\r\nabc\r\n", 408),
    # Oversized heads and bodies.
    Case("many-headers", _head(H, *[b"X-H: v"] * 3000), 431),
    Case("one-huge-header", _head(H, b"X-Pad: " + b"p" * (20 * KiB)), 431),
    Case("huge-request-line", _head(H, line=b"GET /" + b"a" * (20 * KiB) + b" HTTP/1.1\r\n"), 431),
    Case("endless-head", b"GET /healthz HTTP/1.1\r\n" + b"X-H: v\r\n" * 4000, 431),
    Case("long-chunk-extension", CHUNKED + b"3;" + b"e" * (20 * KiB), 431),
    Case("declared-too-large", _cl(b"%d" % (MAX_BODY + 1), b""), 413),
    Case("declared-20-digits", _cl(b"9" * 20, b""), 413),
    # Refused from the head: no 100 Continue first, so the client sends nothing.
    Case("declared-too-large-expect-100", _cl(b"%d" % (MAX_BODY + 1), b"", b"Expect: 100-continue"), 413),
    Case("chunked-too-large", CHUNKED + b"8000\r\n" + b"a" * 0x8000 + b"\r\n8001\r\n" + b"a" * 0x8001
         + b"\r\n0\r\n\r\n", 413),
    Case("chunk-size-huge", CHUNKED + b"f" * 20 + b"\r\n" + b"a" * (MAX_BODY + 1), 413),
    Case("no-length", _head(H), 411),
    Case("content-type-too-long", _cl(b"3", b"abc", b"Content-Type: " + b"t" * 300), 400),
    Case("body-on-healthz", _head(H, b"Content-Length: 2", line=b"GET /healthz HTTP/1.1\r\n") + b"hi", 400),
    # Bodies shorter and longer than declared.
    Case("shorter-then-eof", _cl(b"100", b"only a part"), 400, shutdown=True),
    Case("shorter-then-silence", _cl(b"100", b"only a part"), 408),
    Case("longer-with-garbage", _cl(b"5", b"exact" + MARK + b"\r\n\r\n"), (202, 400), stored=(b"exact",)),
    Case("longer-with-a-request", _cl(b"5", b"exact" + post_request(b"next " + MARK, close=True)), (202, 202),
         stored=(b"exact", b"next " + MARK)),
    # Slow-drip clients (slowloris): slower than the time limits.
    Case("drip-head", _cl(b"3", b"abc"), 408, piece=1),
    Case("drip-body", _cl(b"40", b"x" * 40), 408, piece=1, whole=len(_cl(b"40", b""))),
    Case("drip-chunked-body", CHUNKED + b"1\r\na\r\n" * 40 + b"0\r\n\r\n", 408, piece=3,
         whole=len(CHUNKED)),
    Case("drip-blank-lines", b"\r\n" * 40, 408, piece=2),
    Case("silent-after-a-byte", b"P", 408),
    # Clean closes: nothing to answer.
    Case("connect-and-say-nothing", b"", CLOSE),
    Case("blank-lines-then-eof", b"\r\n\r\n\n", CLOSE, shutdown=True),
]

OTLP = b"POST /otlp/v1/logs HTTP/1.1\r\n"
PROTO = b"Content-Type: application/x-protobuf"
JSON = b"Content-Type: application/json"
BODY = b"\x0a\x00"  # an ExportLogsServiceRequest with one empty ResourceLogs

CASES += [
    # OTLP/HTTP: every failure has a google.rpc.Status body, JSON when the
    # request's own content type is not an OTLP one.
    Case("otlp-no-content-type", _cl(b"2", BODY, line=OTLP), 415, otlp="json"),
    Case("otlp-text-plain", _cl(b"2", BODY, b"Content-Type: text/plain", line=OTLP), 415, otlp="json"),
    Case("otlp-protobuf-brotli", _cl(b"2", BODY, PROTO, b"Content-Encoding: br", line=OTLP), 415,
         otlp="protobuf"),
    Case("otlp-json-zstd", _cl(b"2", b"{}", JSON, b"Content-Encoding: zstd", line=OTLP), 415, otlp="json"),
    Case("otlp-get", _head(H, line=b"GET /otlp/v1/logs HTTP/1.1\r\n"), 405, otlp="json"),
    Case("otlp-no-length", _head(H, PROTO, line=OTLP), 411, otlp="protobuf"),
    Case("otlp-declared-too-large", _cl(b"%d" % (MAX_BODY + 1), b"", PROTO, line=OTLP), 413, otlp="protobuf"),
    Case("otlp-json-declared-too-large", _cl(b"%d" % (MAX_BODY + 1), b"", JSON, line=OTLP), 413, otlp="json"),
    Case("otlp-content-type-too-long", _cl(b"2", b"{}", JSON + b"; x=" + b"t" * 300, line=OTLP), 400,
         otlp="json"),
    Case("otlp-shorter-then-eof", _cl(b"100", BODY, PROTO, line=OTLP), 400, shutdown=True, otlp="protobuf"),
    Case("otlp-shorter-then-silence", _cl(b"100", BODY, JSON, line=OTLP), 408, otlp="json"),
    # A head that is not valid HTTP is answered as on any path: Sluice's JSON error.
    Case("otlp-cl-and-te", _head(H, PROTO, b"Content-Length: 3", b"Transfer-Encoding: chunked", line=OTLP)
         + ABC_CHUNKED, 400),
]


def _send_case(conn: RawConnection, case: Case) -> None:
    sock = conn.sock
    if case.piece:
        try:
            sock.sendall(case.wire[:case.whole])
            for i in range(case.whole, len(case.wire), case.piece):
                sock.sendall(case.wire[i:i + case.piece])
                # Wait DRIP, but stop trickling once the server answered.
                if select.select([sock], [], [], DRIP)[0]:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
    else:
        try:
            sock.sendall(case.wire)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it was all sent; its answer is still there to read
    if case.shutdown:
        sock.shutdown(socket.SHUT_WR)


def _exercise(address: Tuple[str, int], case: Case,
              neighbour: Neighbour) -> Tuple[Dict[str, bytes], List[str]]:
    """Run ``case`` on one connection: the good records by id, and the ids the bad input got."""
    good = [b"good-1 " + case.name.encode(), b"good-2 " + case.name.encode()]
    with RawConnection(address) as conn:
        conn.send(b"".join(post_request(body) for body in good))
        if case.piece:
            # Answered first, so the drip starts once the gateway waits for it.
            before = [conn.read_response() for _ in good]
            _send_case(conn, case)
            after, ended = conn.read_to_end()
        else:
            # Pipelined with the good records, in one send.
            _send_case(conn, case)
            responses, ended = conn.read_to_end()
            before, after = responses[:2], responses[2:]
    accepted = dict(zip(response_ids(before), good))
    assert ended == "eof", "the server reset the connection"
    neighbour.wait_for_more()
    if case.outcome == CLOSE:
        assert after == []
        return accepted, []
    statuses: Tuple[int, ...] = case.outcome if isinstance(case.outcome, tuple) else (int(case.outcome),)
    assert [r.status for r in after] == list(statuses), [(r.status, r.body) for r in after]
    if statuses[-1] != 202:
        assert_error(after[-1], statuses[-1], case.otlp)
    return accepted, [r.json()["id"] for r in after if r.status == 202]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_bad_input_gets_its_status_and_loses_nothing(tmp_path, case):
    async with running(tmp_path) as gw:
        neighbour = Neighbour(gw.address)
        neighbour.start()
        try:
            accepted, later = await trio.to_thread.run_sync(_exercise, gw.address, case, neighbour)
        finally:
            await trio.to_thread.run_sync(neighbour.finish)
        assert gw.gateway.statistics()["internal_errors"] == 0
    records = stored(gw.data_dir)
    for record_id, body in list(accepted.items()) + list(neighbour.bodies.items()):
        assert records[record_id][1] == body
    # Bytes past a declared length start the next request: never part of the record.
    assert [records[record_id][1] for record_id in later] == list(case.stored)
    # Nothing else was stored: no part of the bad input became a record.
    assert set(records) == set(accepted) | set(neighbour.ids) | set(later)


# -- clients that go away, or never read ---------------------------------------------------


def _vanish_mid_body(address: Tuple[str, int]) -> Dict[str, bytes]:
    good = [b"before vanishing %d" % n for n in range(2)]
    with RawConnection(address) as conn:
        conn.send(b"".join(post_request(body) for body in good))
        accepted = dict(zip(response_ids([conn.read_response() for _ in good]), good))
        conn.send(post_request(b"x" * 1000)[:-600])
        # SO_LINGER on, 0 s: the close sends a reset, not a FIN.
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return accepted


async def test_client_that_resets_mid_body_loses_only_its_unfinished_record(tmp_path):
    async with running(tmp_path) as gw:
        neighbour = Neighbour(gw.address)
        neighbour.start()
        accepted = await trio.to_thread.run_sync(_vanish_mid_body, gw.address)
        with trio.fail_after(WAIT):
            while gw.gateway.connections > 1:
                await trio.sleep(0.01)
        await trio.to_thread.run_sync(neighbour.wait_for_more)
        await trio.to_thread.run_sync(neighbour.finish)
    records = stored(gw.data_dir)
    assert set(records) == set(accepted) | set(neighbour.ids)
    assert all(records[i][1] == body for i, body in accepted.items())


#: Requests per send of the client that never reads; it sends until the
#: gateway stops reading from it (its answers filled both socket buffers).
UNREAD_BATCH = 200
#: The gateway's socket send buffer in that test: without it Linux grows the
#: buffer to megabytes on loopback, and filling it takes tens of thousands of
#: requests.
SMALL_SEND_BUFFER = 8 * KiB


def _send_without_reading(address: Tuple[str, int]) -> socket.socket:
    """Pipeline requests without reading a byte until the gateway stops taking them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(address)
    sock.settimeout(0.2)
    batch = b"".join(post_request(b"unread %d" % n) for n in range(UNREAD_BATCH))
    deadline = time.monotonic() + WAIT
    try:
        while True:
            assert time.monotonic() < deadline, "the gateway kept reading from a client that never reads"
            sock.sendall(batch)
    except socket.timeout:
        pass  # the gateway stopped reading: its answers have nowhere to go
    except (BrokenPipeError, ConnectionResetError):
        pass  # already dropped
    return sock


def _read_what_arrived(sock: socket.socket) -> List[str]:
    """The ids of the answers that reached ``sock`` before the gateway closed it."""
    sock.settimeout(WAIT)
    received = b""
    with contextlib.closing(sock):
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
    ids = []
    # The last answer may be cut short: keep the whole ones (each ends its JSON body with "}").
    for response in parse_responses(received[:received.rfind(b"}") + 1]):
        assert response.status == 202, response
        ids.append(response.json()["id"])
    return ids


async def test_client_that_never_reads_is_dropped_after_the_send_timeout(tmp_path):
    async with running(tmp_path, "--idle-timeout", "30s", send_buffer=SMALL_SEND_BUFFER) as gw:
        neighbour = Neighbour(gw.address)
        neighbour.start()
        sock = await trio.to_thread.run_sync(_send_without_reading, gw.address)
        try:
            # Dropped by the send timeout while it still does not read (the
            # idle timeout is far away).
            with trio.fail_after(WAIT):
                while gw.gateway.connections > 1:
                    await trio.sleep(0.01)
        finally:
            ids = await trio.to_thread.run_sync(_read_what_arrived, sock)
        await trio.to_thread.run_sync(neighbour.wait_for_more)
        await trio.to_thread.run_sync(neighbour.finish)
        accepted = gw.gateway.statistics()["accepted"]
    records = stored(gw.data_dir)
    assert set(ids) <= set(records)
    # Every record the gateway accepted was stored, answered or not.
    assert len(records) == accepted
    assert all(body.startswith(b"unread ") for i, (_, body) in records.items() if i not in neighbour.bodies)


class Unread(MemoryTransport):
    """A client that sends its pieces and never reads: every send blocks."""

    async def send_all(self, data) -> None:
        await trio.sleep_forever()


async def test_send_timeout_ends_an_answer_nobody_reads(autojump_clock):
    gateway, sink = engine_gateway("--send-timeout", "5s")
    transport = Unread([post(b"one") + post(b"two")], eof=False)
    start = trio.current_time()
    await gateway.handle_connection(transport)
    assert trio.current_time() - start == pytest.approx(5.0)
    assert transport.closed
    # The first record was accepted (its answer could not be delivered); the second never read.
    assert [r.partition(b"\n")[2] for r in sink.records] == [b"one"]
    assert gateway.ring.used == 0 and gateway.internal_errors == 0


async def test_send_timeout_ends_an_error_answer_nobody_reads(autojump_clock):
    gateway, sink = engine_gateway("--send-timeout", "5s")
    transport = Unread([b"GARBAGE\r\n\r\n"], eof=False)
    start = trio.current_time()
    await gateway.handle_connection(transport)
    # No lingering read after an answer that never left: closed at the send timeout.
    assert trio.current_time() - start == pytest.approx(5.0)
    assert transport.closed and not transport.write_closed
    assert gateway.errors == 1 and gateway.internal_errors == 0


async def test_100_continue_nobody_reads_frees_the_ring_slot(autojump_clock):
    gateway, sink = engine_gateway("--send-timeout", "5s", "--body-timeout", "2s")
    transport = Unread([post(b"held", headers=[(b"Expect", b"100-continue")])], eof=False)
    start = trio.current_time()
    await gateway.handle_connection(transport)
    # The 100 Continue counts against the body's time (2 s), then the 408 against the send's (5 s).
    assert trio.current_time() - start == pytest.approx(7.0)
    assert sink.records == [] and gateway.ring.used == 0 and gateway.ring.live == 0
    assert gateway.internal_errors == 0


# -- connection floods -------------------------------------------------------------------------

MAX_CONNECTIONS = 4
FLOOD = 100


def _flood(gw: Running, neighbour: Neighbour) -> None:
    gateway = gw.gateway
    held = [RawConnection(gw.address) for _ in range(MAX_CONNECTIONS - 1)]  # the neighbour has one
    try:
        for conn in held:
            conn.send(post_request(b"held"))
            response_ids([conn.read_response()])
        # The neighbour answered after them: the held connections have waited
        # longest, whatever the neighbour's pace against the gateway's speed.
        neighbour.wait_for_more()
        flood = [RawConnection(gw.address) for _ in range(FLOOD)]
        outcomes: List[Union[int, str]] = []
        try:
            for conn in flood:
                responses, ended = conn.read_to_end()
                assert gateway.connections <= MAX_CONNECTIONS
                if responses:
                    (response,) = responses
                    assert_error(response, 503)
                    assert response.header("retry-after") == "1"
                    outcomes.append(503)
                else:
                    assert ended == "eof"
                    outcomes.append(CLOSE)
        finally:
            for conn in flood:
                conn.close()
        # Silent newcomers displace each other (the longest-waiting new
        # connection goes first), and the last one meets the first-byte
        # timeout; no keep-alive connection was needed for them but the first.
        assert set(outcomes) <= {503, CLOSE}
        assert gateway.registry.evicted >= FLOOD - 1
        assert gateway.registry.first_byte_timeouts >= 1
        # The connections already open kept working, but for at most one
        # (here or the neighbour's) closed to admit the first newcomer: its
        # client reconnects.
        reconnected = 0
        for n, conn in enumerate(held):
            conn.send(post_request(b"held again"))
            try:
                response_ids([conn.read_response()])
            except (AssertionError, OSError):
                reconnected += 1
                conn.close()
                held[n] = conn = RawConnection(gw.address)
                conn.send(post_request(b"held again"))
                response_ids([conn.read_response()])
        neighbour.wait_for_more()
        assert reconnected + neighbour.reconnected <= 1
        # A new connection is served at once.
        with RawConnection(gw.address) as conn:
            conn.send(post_request(b"after the flood", close=True))
            responses, _ = conn.read_to_end()
        assert [r.status for r in responses] == [202]
    finally:
        for conn in held:
            conn.close()


async def test_connection_flood_evicts_waiting_connections_and_open_ones_keep_working(tmp_path):
    flags = ("--max-connections", str(MAX_CONNECTIONS), "--idle-timeout", "30s")
    async with running(tmp_path, *flags) as gw:
        neighbour = Neighbour(gw.address, reconnect=True)
        neighbour.start()
        await trio.to_thread.run_sync(_flood, gw, neighbour)
        await trio.to_thread.run_sync(neighbour.finish)
        assert gw.gateway.statistics()["internal_errors"] == 0
    records = stored(gw.data_dir)
    assert sorted(body for _, body in records.values() if not body.startswith(b"neighbour")) == sorted(
        [b"held"] * 3 + [b"held again"] * 3 + [b"after the flood"])


# -- odd bytes in header values ------------------------------------------------------------------

#: Header values that are not UTF-8 or hold control characters other than NUL,
#: CR and LF: RFC 9110 section 5.5 lets a recipient keep them, and the envelope
#: keeps them as latin-1 code points, JSON-escaped.
ODD_VALUES = [
    ("invalid-utf8", b"text/\xff\xfe\xc3("),
    ("utf8", b"text/caf\xc3\xa9"),
    ("control-characters", b"a\x01b\x1bc\x1f"),
    ("delete", b"x\x7fy"),
    ("tab-inside", b"a\tb"),
]


def _post_odd(address: Tuple[str, int], value: bytes) -> Tuple[str, bytes]:
    body = b"odd " + value
    head = b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Type: %s\r\nContent-Encoding: %s\r\n" \
           b"X-Agent: %s\r\nContent-Length: %d\r\n\r\n" % (value, value, value, len(body))
    with RawConnection(address) as conn:
        conn.send(head + body)
        (record_id,) = response_ids([conn.read_response()])
    return record_id, body


@pytest.mark.parametrize("value", [v for _, v in ODD_VALUES], ids=[n for n, _ in ODD_VALUES])
async def test_odd_header_bytes_are_kept_in_the_envelope(tmp_path, value):
    async with running(tmp_path) as gw:
        record_id, body = await trio.to_thread.run_sync(_post_odd, gw.address, value)
    meta, stored_body = stored(gw.data_dir)[record_id]
    assert stored_body == body
    assert meta["content_type"] == meta["content_encoding"] == value.decode("latin-1")


# -- API keys ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> object:
    with running_redis() as server:
        yield server.url


def _bad_keys(valid: str, revoked: str) -> List[Tuple[str, bytes]]:
    tenant, secret = valid.split(".")[1:]
    return [
        ("no-key", b""),
        ("empty-bearer", b"Authorization: Bearer \r\n"),
        ("basic-scheme", b"Authorization: Basic dXNlcjpwYXNz\r\n"),
        ("bearer-without-space", b"Authorization: Bearer" + valid.encode() + b"\r\n"),
        ("malformed", b"Authorization: Bearer sluice1.x\r\n"),
        ("wrong-prefix", b"Authorization: Bearer sluice2.%s.%s\r\n" % (tenant.encode(), secret.encode())),
        ("unknown", b"Authorization: Bearer " + keystore.new_api_key(tenant).encode() + b"\r\n"),
        ("tampered", b"Authorization: Bearer " + valid[:-1].encode() + (b"A" if valid[-1] != "A" else b"B")
         + b"\r\n"),
        ("revoked", b"Authorization: Bearer " + revoked.encode() + b"\r\n"),
        ("non-ascii", b"Authorization: Bearer sluice1.T\xc3\xa9nant." + secret.encode() + b"\r\n"),
        ("invalid-utf8", b"X-API-Key: sluice1.\xff\xfe." + secret.encode() + b"\r\n"),
        ("control-character", b"X-API-Key: " + valid.encode()[:-1] + b"\x01\r\n"),
        ("huge", b"Authorization: Bearer sluice1." + b"A" * 8000 + b"\r\n"),
        ("empty-x-api-key", b"X-API-Key: \r\n"),
    ]


BAD_KEY_NAMES = [name for name, _ in _bad_keys("sluice1.T." + "s" * 43, "")]


def _refused_key(address: Tuple[str, int], valid: str, key_line: bytes) -> Dict[str, bytes]:
    good = [b"keyed %d" % n for n in range(2)]
    auth = [("Authorization", "Bearer " + valid)]
    # With Expect the head goes to h11 in either engine; without it, the fast path reads it.
    expect = b"Expect: 100-continue\r\n" if ENGINE["http"] == "h11" else b""
    bad = b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: 65536\r\n" + expect + key_line + b"\r\n"
    with RawConnection(address) as conn:
        conn.send(b"".join(post_request(body, headers=auth) for body in good) + bad)
        responses, ended = conn.read_to_end()
    # Refused from the head: no 100 Continue, the body was never asked for.
    assert [r.status for r in responses] == [202, 202, 401], [(r.status, r.body) for r in responses]
    assert ended == "eof"
    assert_error(responses[2], 401)
    assert responses[2].header("www-authenticate") == 'Bearer realm="sluice"'
    return dict(zip(response_ids(responses[:2]), good))


@pytest.mark.parametrize("name", BAD_KEY_NAMES)
async def test_bad_api_keys_get_401_from_the_head(tmp_path, redis_url, name):
    admin = keystore.connect(redis_url)
    try:
        valid = keystore.create_key(admin, "Tenant_%s" % name.replace("-", "_"), time.time()).api_key
        revoked = keystore.create_key(admin, "Tenant_%s" % name.replace("-", "_"), time.time()).api_key
        keystore.revoke_key(admin, revoked, time.time())
    finally:
        admin.close()
    key_line = dict(_bad_keys(valid, revoked))[name]
    async with running(tmp_path, "--redis", redis_url) as gw:
        neighbour = Neighbour(gw.address, headers=[("X-API-Key", valid)])
        neighbour.start()
        try:
            accepted = await trio.to_thread.run_sync(_refused_key, gw.address, valid, key_line)
            await trio.to_thread.run_sync(neighbour.wait_for_more)
        finally:
            await trio.to_thread.run_sync(neighbour.finish)
    records = stored(gw.data_dir)
    assert set(records) == set(accepted) | set(neighbour.ids)
    for record_id, body in accepted.items():
        meta, stored_body = records[record_id]
        assert stored_body == body and meta["tenant"] == "Tenant_%s" % name.replace("-", "_")


def _stream_limit_exchange(address: Tuple[str, int], room: int) -> List[List[int]]:
    """Statuses of: one byte over, exactly the room (body then sent), a chunked body growing past it."""
    out = []
    for length in (room + 1, room):
        with RawConnection(address) as conn:
            conn.send(_cl(b"%d" % length, b"", b"Expect: 100-continue", b"Connection: close"))
            first = conn.read_response()
            if first.status == 100:
                conn.send(b"b" * length)
            out.append([first.status] + [r.status for r in conn.read_to_end()[0]])
    with RawConnection(address) as conn:
        half = b"%x\r\n" % (room // 2 + 1) + b"c" * (room // 2 + 1) + b"\r\n"
        conn.send(CHUNKED + half)
        try:
            conn.send(half + b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        out.append([r.status for r in conn.read_to_end()[0]])
    return out


async def test_the_streams_record_limit_413s_from_the_head_and_chunked_past_it(aws_env):
    """Against a stream whose MaxRecordSizeInKiB is 1024: envelope and key come off the body's room."""
    aws_env()
    server = FaultServer(FakeStreams(max_record_size_kib=1024))
    try:
        flags = ["--sink", "kinesis", "--stream", "logs", "--endpoint-url", server.url, "--linger", "1ms"]
        async with gateway_in_process(flags) as (gateway, port):
            limit = gateway.sink.max_record_bytes
            room = limit - len(_envelope_of(gateway)) - 26  # a record id as partition key
            statuses = await trio.to_thread.run_sync(_stream_limit_exchange, ("127.0.0.1", port), room)
            assert gateway.statistics()["internal_errors"] == 0 and gateway.ring.used == 0
        assert limit == 1024 * KiB
        assert statuses == [[413], [100, 202], [413]]
        assert [len(d.partition(b"\n")[2]) for d in server.fake.stored_datas()] == [room]
    finally:
        server.stop()


def _envelope_of(gateway: Any) -> bytes:
    from sinks.envelope import envelope

    return envelope(gateway.ids.next(0), None, 1795680518430, None, None)
