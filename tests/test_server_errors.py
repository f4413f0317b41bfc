"""The gateway over real loopback sockets: error answers, and clients that cannot stop it.

Each error is answered with its documented status and reason, closes the
connection and loses nothing accepted before it.  One test runs the gateway
in this process to look at its counters.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time

import pytest
import trio

from tests.support import gateway as _support
from tests.support.answers import (
    MAX_BODY,
    KiB,
    MiB,
    accepted_id,
    assert_error,
    blob,
    hold_ring_slot,
    one_error_then_eof,
)
from tests.support.answers import shared as _shared
from tests.support.gateway import (
    CLIENT_TIMEOUT,
    RawConnection,
    chunked_request,
    curl,
    curl_post,
    gateway_in_process,
    get_request,
    http_post,
    post_request,
    stored,
)

# The fixtures, bound here so tests can ask for them by name.
start_gateway = _support.start_gateway
shared = _shared


# -- errors --------------------------------------------------------------------

ERROR_REQUESTS = [
    ("bad-request-line", b"GARBAGE\r\n\r\n", 400),
    ("bad-content-length", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: ten\r\n\r\nxx", 400),
    ("both-framings", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    ("no-host", b"POST /v1/logs HTTP/1.1\r\nContent-Length: 1\r\n\r\nx", 400),
    ("bad-chunk-size", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("healthz-with-body", b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi", 400),
    ("no-route", b"GET /v2/logs HTTP/1.1\r\nHost: t\r\n\r\n", 404),
    ("get-logs", b"GET /v1/logs HTTP/1.1\r\nHost: t\r\n\r\n", 405),
    ("post-healthz", b"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n", 405),
    ("no-length", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\n\r\n", 411),
    ("too-large", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
    ("head-too-large", b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * (20 * KiB) + b"\r\n\r\n", 431),
    ("endless-head", b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"X-Pad: 0123456789\r\n" * 2000, 431),
    ("gzip-framing", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
]


@pytest.mark.parametrize("request_bytes, status", [r[1:] for r in ERROR_REQUESTS],
                         ids=[r[0] for r in ERROR_REQUESTS])
def test_error_status_over_a_socket(shared, request_bytes, status):
    with RawConnection(shared.address) as conn:
        conn.send(request_bytes)
        one_error_then_eof(conn, status)


def test_method_not_allowed_names_the_allowed_ones(shared):
    for path, allowed in ((b"/v1/logs", "POST"), (b"/healthz", "GET, HEAD"), (b"/readyz", "GET, HEAD")):
        with RawConnection(shared.address) as conn:
            conn.send(b"DELETE %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
            responses, _ = conn.read_to_end()
        assert_error(responses[0], 405)
        assert responses[0].header("allow") == allowed


def test_too_large_body_refused_before_upload(shared, tmp_path):
    body = blob(MAX_BODY + 1, 5)
    path = tmp_path / "body"
    path.write_bytes(body)
    transfer, log = curl_post(shared.url(), str(path), "Expect: 100-continue")
    assert transfer.status == 413
    assert json.loads(transfer.body)["error"] == "payload_too_large"
    assert "HTTP/1.1 100" not in log
    assert transfer.uploaded == 0

    with RawConnection(shared.address) as conn:
        conn.send(post_request(body, headers=[("Expect", "100-continue")])[:-len(body)])
        # The first thing back is the refusal, not an invitation to send.
        one_error_then_eof(conn, 413)


def test_too_large_body_sent_anyway_gets_a_clean_413(shared):
    body = blob(2 * MiB, 6)
    status, headers, answer = http_post(shared.address, body)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(answer)["error"] == "payload_too_large"

    with RawConnection(shared.address) as conn:
        conn.send(chunked_request([body[:600 * KiB], body[600 * KiB:]]))
        one_error_then_eof(conn, 413)


def test_request_timeouts(start_gateway):
    gateway = start_gateway("--head-timeout", "300ms", "--body-timeout", "300ms", "--idle-timeout", "300ms")
    with RawConnection(gateway.address) as conn:
        conn.send(b"POST /v1/logs HTTP/1.1\r\nHost: t\r\n")
        one_error_then_eof(conn, 408)
    with RawConnection(gateway.address) as conn:
        conn.send(post_request(b"0123456789" * 10)[:-90])
        one_error_then_eof(conn, 408)
    with RawConnection(gateway.address) as conn:
        conn.send(chunked_request([b"abc"])[:-5])
        one_error_then_eof(conn, 408)
    with RawConnection(gateway.address) as conn:
        # Idle after a whole request: closed quietly, no 408.
        conn.send(get_request("/healthz"))
        assert conn.read_response().status == 200
        assert conn.read_to_end() == ([], "eof")
    with RawConnection(gateway.address) as conn:
        assert conn.read_to_end() == ([], "eof")  # connected, never sent a byte
    assert gateway.stop() == 0
    assert stored(gateway.data_dir) == {}


def test_a_full_gateway_evicts_an_idle_connection_and_refuses_only_when_none_waits(start_gateway):
    gateway = start_gateway("--max-connections", "1", "--min-body-rate", "0")
    with RawConnection(gateway.address) as first:
        first.send(get_request("/healthz"))
        assert first.read_response().status == 200  # the one connection allowed, kept alive
        # Idle between requests: closed to admit the health check.
        transfers, _ = curl(gateway.url("/healthz"))
        assert transfers[0].status == 200
        assert first.read_to_end() == ([], "eof")
    with RawConnection(gateway.address) as busy:
        # A request in progress (its head read: 100 Continue) is never evicted.
        busy.send(post_request(b"0123456789", headers=[("Expect", "100-continue")])[:-10])
        assert busy.read_response().status == 100
        transfers, log = curl(gateway.url("/healthz"))
        assert transfers[0].status == 503
        assert re.search(r"^< [Rr]etry-[Aa]fter: 1\r?$", log, re.MULTILINE), log
        assert json.loads(transfers[0].body)["error"] == "overloaded"
        busy.send(b"0123456789")
        record_id = accepted_id(busy.read_response())
    # Room again once the gateway saw that connection answered (or closed).
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while True:
        with RawConnection(gateway.address) as conn:
            conn.send(post_request(b"admitted", close=True))
            responses, _ = conn.read_to_end()
        if responses and responses[0].status == 202:
            break
        assert responses and responses[0].status == 503 and time.monotonic() < deadline
        time.sleep(0.02)
    assert gateway.stop() == 0
    assert stored(gateway.data_dir)[record_id][1] == b"0123456789"


# A ring of 64 KiB with bodies of at most 27000 bytes: two uploads in progress
# hold 2 x (envelope + 27000) bytes, leaving less than one more body's worth.
SMALL_RING = ["--ring-size", "64KiB", "--max-body", "27000"]
SLOT_BODY = 27000


def test_full_ring_gets_503_with_retry_after(start_gateway):
    gateway = start_gateway(*SMALL_RING, "--ring-wait", "0")
    bodies = [blob(SLOT_BODY, 20 + i) for i in range(3)]
    holders = [hold_ring_slot(gateway.address, body) for body in bodies[:2]]
    try:
        with RawConnection(gateway.address) as conn:
            conn.send(post_request(bodies[2]))
            responses, ended = conn.read_to_end()
        assert ended == "eof" and len(responses) == 1
        assert_error(responses[0], 503)
        assert responses[0].header("retry-after") == "1"
        with RawConnection(gateway.address) as conn:
            conn.send(get_request("/readyz", close=True))
            (ready,), _ = conn.read_to_end()
        assert ready.status == 503
        assert ready.json() == {"status": "not_ready", "reason": "buffer full"}

        ids = []
        for conn, body in zip(holders, bodies):
            conn.send(body[100:])
            ids.append(accepted_id(conn.read_response()))
    finally:
        for conn in holders:
            conn.close()
    # The sink gives the space back once the records are written.
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while True:
        with RawConnection(gateway.address) as conn:
            conn.send(get_request("/readyz", close=True))
            (ready,), _ = conn.read_to_end()
        if ready.status == 200:
            break
        assert time.monotonic() < deadline, ready.body
        time.sleep(0.02)
    with RawConnection(gateway.address) as conn:
        conn.send(post_request(bodies[2]))
        ids.append(accepted_id(conn.read_response()))
    assert gateway.stop() == 0
    records = stored(gateway.data_dir)
    assert [records[i][1] for i in ids] == bodies


def test_request_waits_for_ring_space(start_gateway):
    gateway = start_gateway(*SMALL_RING, "--ring-wait", "30s")
    bodies = [blob(SLOT_BODY, 30 + i) for i in range(3)]
    holders = [hold_ring_slot(gateway.address, body) for body in bodies[:2]]
    ids = []
    with RawConnection(gateway.address) as waiting:
        # No room: this request waits (no answer yet) until the uploads in
        # progress are done and stored.
        waiting.send(post_request(bodies[2], headers=[("Expect", "100-continue")])[:-SLOT_BODY])
        for conn, body in zip(holders, bodies):
            conn.send(body[100:])
            ids.append(accepted_id(conn.read_response()))
            conn.close()
        assert waiting.read_response().status == 100
        waiting.send(bodies[2])
        ids.append(accepted_id(waiting.read_response()))
    assert gateway.stop() == 0
    records = stored(gateway.data_dir)
    assert [records[i][1] for i in ids] == bodies


# -- no client can stop the gateway ----------------------------------------------

AFTER_HEAD = [
    ("bad-request-line", b"GARBAGE\r\n\r\n", 400),
    ("no-route", get_request("/nope"), 404),
    ("too-large", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
    ("head-too-large", b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * (20 * KiB) + b"\r\n\r\n", 431),
]


def test_error_after_a_head_request_on_the_same_connection(start_gateway):
    gateway = start_gateway()
    for name, bad, status in AFTER_HEAD:
        with RawConnection(gateway.address) as conn:
            conn.send(get_request("/healthz", method="HEAD") + bad)
            first = conn.read_response(head_only=True)
            assert (first.status, first.header("content-length")) == (200, "15")
            # The error answer carries its body: it answers a GET or POST, not the HEAD.
            one_error_then_eof(conn, status)
        with RawConnection(gateway.address) as conn:
            conn.send(get_request("/healthz", close=True))
            assert conn.read_to_end()[0][0].status == 200, name
    assert gateway.stop() == 0, gateway.stderr


def test_refused_clients_that_reset_do_not_stop_the_gateway(start_gateway):
    gateway = start_gateway("--max-connections", "1", "--min-body-rate", "0")
    with RawConnection(gateway.address) as held:
        held.send(get_request("/healthz"))
        assert held.read_response().status == 200
        # In the middle of a request: cannot be evicted, so newcomers are refused.
        held.send(post_request(b"01234", headers=[("Expect", "100-continue")])[:-5])
        assert held.read_response().status == 100
        for _ in range(20):
            sock = socket.create_connection(gateway.address)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, before or while the gateway sends its 503
        with RawConnection(gateway.address) as refused:
            one_error_then_eof(refused, 503)
        held.send(b"01234")
        accepted_id(held.read_response())
        held.send(get_request("/readyz"))
        assert held.read_response().status == 200
    assert gateway.stop() == 0, gateway.stderr


def test_a_low_file_descriptor_limit_is_said_and_idle_connections_make_room(start_gateway):
    limit = 64
    gateway = start_gateway(fd_limit=limit)
    (warning,) = gateway.events("connection_capacity")
    assert warning["level"] == "warning" and warning["fd_limit"] == limit
    assert warning["max_connections"] < limit
    conns = []
    ids = []
    try:
        # More connections than descriptors, each kept alive after its answer:
        # each new one is admitted by closing the one idle longest.
        for n in range(100):
            conn = RawConnection(gateway.address)
            conns.append(conn)
            conn.send(post_request(b"held %d" % n))
            ids.append(accepted_id(conn.read_response()))
    finally:
        for conn in conns:
            conn.close()
    assert gateway.stop() == 0, gateway.stderr
    records = stored(gateway.data_dir)
    assert [records[i][1] for i in ids] == [b"held %d" % n for n in range(100)]

# -- counters (gateway in this process) ------------------------------------------


async def _exchange(port: int, data: bytes, *, then_close: bool = False) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        if then_close:
            return b""
        received = b""
        with trio.fail_after(CLIENT_TIMEOUT):
            while True:
                chunk = await stream.receive_some()
                if not chunk:
                    return received
                received += chunk


async def test_failed_requests_give_their_ring_space_back(tmp_path):
    flags = ["--body-timeout", "300ms", "--max-body", "64KiB", "--ring-size", "1MiB"]
    async with gateway_in_process(flags, data_dir=str(tmp_path)) as (gateway, port):
        answers = [
            await _exchange(port, post_request(b"x" * 10)[:-5]),  # body never finished: 408
            await _exchange(port, post_request(b"y" * (65 * KiB))),  # 413 before the body
            await _exchange(port, chunked_request([b"z" * (40 * KiB)] * 2)),  # chunked past the limit: 413
            await _exchange(port, chunked_request([b"abc"])[:-7] + b"zz\r\n"),  # bad chunk: 400
        ]
        await _exchange(port, post_request(b"w" * 5000)[:-2000], then_close=True)  # client went away
        ok = await _exchange(port, post_request(b"kept", close=True))
        assert [a[9:12] for a in answers] == [b"408", b"413", b"413", b"400"]
        assert ok.startswith(b"HTTP/1.1 202 ")
        with trio.fail_after(CLIENT_TIMEOUT):
            while gateway.connections or gateway.ring.live:
                await trio.sleep(0.01)
        stats = gateway.statistics()
        assert stats["ring"]["live_slots"] == 0 and stats["ring"]["used"] == 0, stats
        assert stats["connections"] == 0
        assert (stats["requests"], stats["accepted"], stats["errors"]) == (6, 1, 5), stats
        assert stats["sink"]["stored"] == 1
