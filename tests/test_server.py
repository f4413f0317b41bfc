"""The gateway over real loopback sockets: curl, http.client and literal bytes.

Every test talks to a ``sluice serve`` process started for it (or for this
module, when the default settings do) on a port the gateway picked itself,
and reads back what the file sink stored.  One test runs the gateway in this
process to look at its counters.  Waits here are bounded by generous
timeouts that only a broken gateway reaches; nothing measures speed.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Dict, List

import pytest
import trio

from sinks.envelope import envelope
from sinks.file import read_records
from tests.support import gateway as _support
from tests.support.gateway import (
    CLIENT_TIMEOUT,
    CurlTransfer,
    RawConnection,
    Response,
    chunked_request,
    curl,
    curl_post,
    gateway_in_process,
    get_request,
    http_post,
    post_request,
    running_gateway,
    stored,
    wait_for_records,
)

# The fixture, bound here so tests can ask for it by name.
start_gateway = _support.start_gateway

KiB = 1024
MiB = 1024 * KiB
MAX_BODY = 1 * MiB  # the default --max-body
ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
ERROR_REASONS = {
    400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
    411: "length_required", 413: "payload_too_large", 431: "headers_too_large",
    501: "not_implemented", 503: "overloaded",
}


def _blob(size: int, seed: int) -> bytes:
    return random.Random(seed).getrandbits(8 * size).to_bytes(size, "little") if size else b""


def _accepted_id(response: Response) -> str:
    assert response.status == 202, (response.status, response.body)
    assert response.header("content-type") == "application/json"
    doc = response.json()
    assert list(doc) == ["id"] and ULID.match(doc["id"]), doc
    return doc["id"]


def _assert_error(response: Response, status: int) -> dict:
    """``response`` is the JSON error answer with ``status``, closing the connection."""
    assert response.status == status, (response.status, response.body)
    assert response.header("content-type") == "application/json"
    assert response.header("connection") == "close"
    doc = response.json()
    assert doc["error"] == ERROR_REASONS[status], doc
    assert isinstance(doc["message"], str) and doc["message"], doc
    return doc


def _one_error_then_eof(conn: RawConnection, status: int) -> dict:
    responses, ended = conn.read_to_end()
    assert ended == "eof", "the server reset the connection instead of closing it"
    assert len(responses) == 1, responses
    return _assert_error(responses[0], status)


def _curl_id(transfer: CurlTransfer) -> str:
    assert transfer.status == 202, transfer.body
    doc = json.loads(transfer.body)
    assert ULID.match(doc["id"]), doc
    return doc["id"]


def _http_id(status: int, body: bytes) -> str:
    assert status == 202, body
    doc = json.loads(body)
    assert ULID.match(doc["id"]), doc
    return doc["id"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A gateway with default settings, shared by the tests that do not stop or tune it."""
    with running_gateway(data_dir=str(tmp_path_factory.mktemp("shared-data"))) as gateway:
        yield gateway


# -- accepted bodies -----------------------------------------------------------


NDJSON = b'{"level":"info","msg":"one"}\n{"level":"warn","msg":"two \\u00e9"}\n{"n":3}\n'
BODIES = [
    # (content type, content encoding, body)
    ("application/json", None, b'{"service":"api","msg":"hello","n":[1,2,3]}'),
    ("application/x-ndjson", None, NDJSON),
    ("application/x-ndjson", "gzip", gzip.compress(NDJSON * 50, mtime=0)),
]


def test_bodies_pass_through_untouched(start_gateway, tmp_path):
    gateway = start_gateway()
    started_ms = int(time.time() * 1000)
    sent = []  # (id, content type, content encoding, body), in the order posted
    for n, (ctype, encoding, body) in enumerate(BODIES):
        path = tmp_path / ("body-%d" % n)
        path.write_bytes(body)
        headers = ["Content-Type: " + ctype] + (["Content-Encoding: " + encoding] if encoding else [])
        transfer, _ = curl_post(gateway.url(), str(path), *headers)
        sent.append((_curl_id(transfer), ctype, encoding, body))
    for ctype, encoding, body in BODIES:
        headers = {"Content-Type": ctype}
        if encoding:
            headers["Content-Encoding"] = encoding
        status, _, answer = http_post(gateway.address, body, headers)
        sent.append((_http_id(status, answer), ctype, encoding, body))
    finished_ms = int(time.time() * 1000)
    assert gateway.stop() == 0, gateway.stderr

    records = [bytes(r) for r in read_records(gateway.data_dir)]
    assert len(records) == len(sent)
    for record, (record_id, ctype, encoding, body) in zip(records, sent):
        meta = json.loads(record[:record.index(b"\n")])
        assert meta == {"v": 1, "id": record_id, "tenant": None, "received_at": meta["received_at"],
                        "content_type": ctype, "content_encoding": encoding}
        assert started_ms <= meta["received_at"] <= finished_ms  # unix milliseconds
        expected = envelope(record_id, None, meta["received_at"], ctype.encode(),
                            encoding.encode() if encoding else None) + body
        assert record == expected
    assert gzip.decompress(records[2][records[2].index(b"\n") + 1:]) == NDJSON * 50

    shown = subprocess.run([sys.executable, "-m", "gateway", "read", "--body", gateway.data_dir],
                           capture_output=True, timeout=60, check=True)
    assert shown.stdout == b"".join(record + b"\n" for record in records)
    summary = subprocess.run([sys.executable, "-m", "gateway", "read", gateway.data_dir],
                             capture_output=True, timeout=60, check=True)
    lines = [json.loads(line) for line in summary.stdout.splitlines()]
    assert [(m["id"], m["content_type"], m["content_encoding"], m["body_bytes"]) for m in lines] == [
        (record_id, ctype, encoding, len(body)) for record_id, ctype, encoding, body in sent]


@pytest.mark.parametrize("size", [0, 1, 64 * KiB, MAX_BODY], ids=["0B", "1B", "64KiB", "max"])
def test_body_sizes(shared, tmp_path, size):
    curl_body, python_body = _blob(size, seed=size), _blob(size, seed=size + 1)
    path = tmp_path / "body"
    path.write_bytes(curl_body)
    transfer, _ = curl_post(shared.url(), str(path), "Content-Type: application/octet-stream")
    assert transfer.uploaded == size
    by_curl = _curl_id(transfer)
    status, _, answer = http_post(shared.address, python_body, {"Content-Type": "application/octet-stream"})
    by_python = _http_id(status, answer)
    records = wait_for_records(shared.data_dir, [by_curl, by_python])
    assert records[by_curl][1] == curl_body
    assert records[by_python][1] == python_body
    assert records[by_curl][0]["content_type"] == "application/octet-stream"


def test_literal_request_gets_literal_answer(shared):
    with RawConnection(shared.address) as conn:
        conn.send(b"POST /v1/logs HTTP/1.1\r\nHost: sluice.test\r\nContent-Type: text/plain\r\n"
                  b"Content-Length: 5\r\nConnection: close\r\n\r\nhello")
        _, ended = conn.read_to_end()
        assert ended == "eof"
    wire = conn.wire
    match = re.match(rb'HTTP/1\.1 202 Accepted\r\ncontent-type: application/json\r\n'
                     rb'content-length: 35\r\n[Cc]onnection: close\r\n\r\n\{"id":"([0-9A-Z]{26})"\}\Z', wire)
    assert match, wire
    record_id = match.group(1).decode()
    meta, body = wait_for_records(shared.data_dir, [record_id])[record_id]
    assert body == b"hello" and meta["content_type"] == "text/plain"


@pytest.mark.parametrize("pieces", [[b"abc"], [b"a", b"bc", b"\r\n0\r\n"], [_blob(40 * KiB, 7), b"x" * 1000]],
                         ids=["one-chunk", "crlf-in-data", "large"])
def test_chunked_bodies_are_decoded(shared, pieces):
    with RawConnection(shared.address) as conn:
        conn.send(chunked_request(pieces, headers=[("Content-Type", "text/plain")]))
        record_id = _accepted_id(conn.read_response())
    assert wait_for_records(shared.data_dir, [record_id])[record_id][1] == b"".join(pieces)


def test_chunked_upload_by_curl(shared, tmp_path):
    body = _blob(100 * KiB, 11)
    path = tmp_path / "body"
    path.write_bytes(body)
    transfer, log = curl_post(shared.url(), str(path), "Transfer-Encoding: chunked")
    assert "Transfer-Encoding: chunked" in log
    record_id = _curl_id(transfer)
    assert wait_for_records(shared.data_dir, [record_id])[record_id][1] == body


def test_expect_100_continue_then_body(shared, tmp_path):
    body = _blob(64 * KiB, 3)
    path = tmp_path / "body"
    path.write_bytes(body)
    transfer, log = curl_post(shared.url(), str(path), "Expect: 100-continue")
    assert "< HTTP/1.1 100 Continue" in log
    by_curl = _curl_id(transfer)

    with RawConnection(shared.address) as conn:
        conn.send(post_request(body, headers=[("Expect", "100-continue")])[:-len(body)])
        interim = conn.read_response()
        assert (interim.status, interim.body) == (100, b"")
        conn.send(body)
        by_raw = _accepted_id(conn.read_response())
    records = wait_for_records(shared.data_dir, [by_curl, by_raw])
    assert records[by_curl][1] == records[by_raw][1] == body


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
        _one_error_then_eof(conn, status)


def test_method_not_allowed_names_the_allowed_ones(shared):
    for path, allowed in ((b"/v1/logs", "POST"), (b"/healthz", "GET, HEAD"), (b"/readyz", "GET, HEAD")):
        with RawConnection(shared.address) as conn:
            conn.send(b"DELETE %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
            responses, _ = conn.read_to_end()
        _assert_error(responses[0], 405)
        assert responses[0].header("allow") == allowed


def test_too_large_body_refused_before_upload(shared, tmp_path):
    body = _blob(MAX_BODY + 1, 5)
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
        _one_error_then_eof(conn, 413)


def test_too_large_body_sent_anyway_gets_a_clean_413(shared):
    body = _blob(2 * MiB, 6)
    status, headers, answer = http_post(shared.address, body)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(answer)["error"] == "payload_too_large"

    with RawConnection(shared.address) as conn:
        conn.send(chunked_request([body[:600 * KiB], body[600 * KiB:]]))
        _one_error_then_eof(conn, 413)


def test_request_timeouts(start_gateway):
    gateway = start_gateway("--head-timeout", "300ms", "--body-timeout", "300ms", "--idle-timeout", "300ms")
    with RawConnection(gateway.address) as conn:
        conn.send(b"POST /v1/logs HTTP/1.1\r\nHost: t\r\n")
        _one_error_then_eof(conn, 408)
    with RawConnection(gateway.address) as conn:
        conn.send(post_request(b"0123456789" * 10)[:-90])
        _one_error_then_eof(conn, 408)
    with RawConnection(gateway.address) as conn:
        conn.send(chunked_request([b"abc"])[:-5])
        _one_error_then_eof(conn, 408)
    with RawConnection(gateway.address) as conn:
        # Idle after a whole request: closed quietly, no 408.
        conn.send(get_request("/healthz"))
        assert conn.read_response().status == 200
        assert conn.read_to_end() == ([], "eof")
    with RawConnection(gateway.address) as conn:
        assert conn.read_to_end() == ([], "eof")  # connected, never sent a byte
    assert gateway.stop() == 0
    assert stored(gateway.data_dir) == {}


def test_too_many_connections_get_503(start_gateway):
    gateway = start_gateway("--max-connections", "1")
    with RawConnection(gateway.address) as first:
        first.send(get_request("/healthz"))
        assert first.read_response().status == 200  # the one connection allowed, kept alive
        transfers, log = curl(gateway.url("/healthz"))
        assert transfers[0].status == 503
        assert re.search(r"^< [Rr]etry-[Aa]fter: 1\r?$", log, re.MULTILINE), log
        assert json.loads(transfers[0].body)["error"] == "overloaded"
        with RawConnection(gateway.address) as second:
            second.send(post_request(b"refused"))
            doc = _one_error_then_eof(second, 503)
        assert doc["error"] == "overloaded"
        first.send(get_request("/readyz"))  # still served
        assert first.read_response().status == 200
    # Once the first connection is gone there is room again.
    deadline = time.monotonic() + CLIENT_TIMEOUT
    while True:
        with RawConnection(gateway.address) as conn:
            conn.send(post_request(b"admitted", close=True))
            responses, _ = conn.read_to_end()
        if responses and responses[0].status == 202:
            break
        assert responses and responses[0].status == 503 and time.monotonic() < deadline
        time.sleep(0.02)
    record_id = _accepted_id(responses[0])
    assert gateway.stop() == 0
    assert {k: v[1] for k, v in stored(gateway.data_dir).items()} == {record_id: b"admitted"}


# A ring of 64 KiB with bodies of at most 27000 bytes: two uploads in progress
# hold 2 x (envelope + 27000) bytes, leaving less than one more body's worth.
SMALL_RING = ["--ring-size", "64KiB", "--max-body", "27000"]
SLOT_BODY = 27000


def _hold_ring_slot(address, body: bytes) -> RawConnection:
    """A connection whose upload has a ring slot and is not finished (the 100 proves it)."""
    conn = RawConnection(address)
    conn.send(post_request(body, headers=[("Expect", "100-continue")])[:-len(body)])
    assert conn.read_response().status == 100
    conn.send(body[:100])
    return conn


def test_full_ring_gets_503_with_retry_after(start_gateway):
    gateway = start_gateway(*SMALL_RING, "--ring-wait", "0")
    bodies = [_blob(SLOT_BODY, 20 + i) for i in range(3)]
    holders = [_hold_ring_slot(gateway.address, body) for body in bodies[:2]]
    try:
        with RawConnection(gateway.address) as conn:
            conn.send(post_request(bodies[2]))
            responses, ended = conn.read_to_end()
        assert ended == "eof" and len(responses) == 1
        _assert_error(responses[0], 503)
        assert responses[0].header("retry-after") == "1"
        with RawConnection(gateway.address) as conn:
            conn.send(get_request("/readyz", close=True))
            (ready,), _ = conn.read_to_end()
        assert ready.status == 503
        assert ready.json() == {"status": "not_ready", "reason": "buffer full"}

        ids = []
        for conn, body in zip(holders, bodies):
            conn.send(body[100:])
            ids.append(_accepted_id(conn.read_response()))
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
        ids.append(_accepted_id(conn.read_response()))
    assert gateway.stop() == 0
    records = stored(gateway.data_dir)
    assert [records[i][1] for i in ids] == bodies


def test_request_waits_for_ring_space(start_gateway):
    gateway = start_gateway(*SMALL_RING, "--ring-wait", "30s")
    bodies = [_blob(SLOT_BODY, 30 + i) for i in range(3)]
    holders = [_hold_ring_slot(gateway.address, body) for body in bodies[:2]]
    ids = []
    with RawConnection(gateway.address) as waiting:
        # No room: this request waits (no answer yet) until the uploads in
        # progress are done and stored.
        waiting.send(post_request(bodies[2], headers=[("Expect", "100-continue")])[:-SLOT_BODY])
        for conn, body in zip(holders, bodies):
            conn.send(body[100:])
            ids.append(_accepted_id(conn.read_response()))
            conn.close()
        assert waiting.read_response().status == 100
        waiting.send(bodies[2])
        ids.append(_accepted_id(waiting.read_response()))
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
            _one_error_then_eof(conn, status)
        with RawConnection(gateway.address) as conn:
            conn.send(get_request("/healthz", close=True))
            assert conn.read_to_end()[0][0].status == 200, name
    assert gateway.stop() == 0, gateway.stderr


def test_refused_clients_that_reset_do_not_stop_the_gateway(start_gateway):
    gateway = start_gateway("--max-connections", "1")
    with RawConnection(gateway.address) as held:
        held.send(get_request("/healthz"))
        assert held.read_response().status == 200
        for _ in range(20):
            sock = socket.create_connection(gateway.address)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, before or while the gateway sends its 503
        with RawConnection(gateway.address) as refused:
            _one_error_then_eof(refused, 503)
        held.send(get_request("/readyz"))
        assert held.read_response().status == 200
    assert gateway.stop() == 0, gateway.stderr


def test_running_out_of_file_descriptors_does_not_stop_the_gateway(start_gateway):
    limit = 64
    gateway = start_gateway(fd_limit=limit)
    fd_dir = "/proc/%d/fd" % gateway.pid
    if not os.path.isdir(fd_dir):
        pytest.skip("needs /proc to see the gateway's descriptors")
    conns = [RawConnection(gateway.address) for _ in range(100)]  # more than the gateway can hold
    ids = []
    try:
        for n, conn in enumerate(conns):
            conn.send(post_request(b"held %d" % n))  # kept alive: the gateway holds every connection it took
        deadline = time.monotonic() + CLIENT_TIMEOUT
        while gateway.running and len(os.listdir(fd_dir)) < limit:
            assert time.monotonic() < deadline, "the gateway never used up its descriptors"
            time.sleep(0.01)
        # Each connection is served once earlier ones close and free descriptors.
        for conn in conns:
            ids.append(_accepted_id(conn.read_response()))
            conn.close()
    finally:
        for conn in conns:
            conn.close()
    assert gateway.stop() == 0, gateway.stderr
    records = stored(gateway.data_dir)
    assert [records[i][1] for i in ids] == [b"held %d" % n for n in range(100)]


# -- health --------------------------------------------------------------------


def test_ipv6_loopback(start_gateway):
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    gateway = start_gateway(listen="[::1]:0")
    assert gateway.host == "::1" and gateway.url().startswith("http://[::1]:")
    transfers, _ = curl("--data-binary", "over ipv6", gateway.url())
    record_id = _curl_id(transfers[0])
    assert gateway.stop() == 0
    assert stored(gateway.data_dir)[record_id][1] == b"over ipv6"


def test_healthz_and_readyz(shared):
    for path, doc in (("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready"}),
                      ("/healthz?probe=1", {"status": "ok"})):
        transfers, _ = curl(shared.url(path))
        assert transfers[0].status == 200 and json.loads(transfers[0].body) == doc
        conn = http.client.HTTPConnection(*shared.address, timeout=CLIENT_TIMEOUT)
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read()) == doc
        assert response.getheader("content-type") == "application/json"
        conn.close()
    with RawConnection(shared.address) as conn:
        conn.send(get_request("/healthz", method="HEAD") + get_request("/readyz", method="HEAD", close=True))
        for length in (b"15", b"18"):
            response = conn.read_response(head_only=True)
            assert response.status == 200 and response.header("content-length") == length.decode()
        assert conn.read_to_end() == ([], "eof")  # and no body bytes followed


# -- keep-alive and pipelining -------------------------------------------------


def test_keep_alive_with_raw_socket(shared):
    bodies = [b'{"n":%d}' % n for n in range(5)]
    ids = []
    with RawConnection(shared.address) as conn:
        for body in bodies:
            conn.send(post_request(body, headers=[("Content-Type", "application/json")]))
            response = conn.read_response()
            assert response.header("connection") is None
            ids.append(_accepted_id(response))
            conn.send(get_request("/healthz"))
            assert conn.read_response().status == 200
        conn.send(get_request("/readyz", close=True))
        last = conn.read_response()
        assert last.status == 200 and last.header("connection") == "close"
        assert conn.read_to_end() == ([], "eof")
    records = wait_for_records(shared.data_dir, ids)
    assert [records[i][1] for i in ids] == bodies


def test_keep_alive_with_http_client(shared):
    conn = http.client.HTTPConnection(*shared.address, timeout=CLIENT_TIMEOUT)
    ids = []
    bodies = [_blob(n * 1000, n) for n in range(1, 5)]
    try:
        sock = None
        for body in bodies:
            conn.request("POST", "/v1/logs", body=body)
            response = conn.getresponse()
            ids.append(_http_id(response.status, response.read()))
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            assert response.status == 200 and not response.will_close
            response.read()
            sock = sock or conn.sock
            assert conn.sock is sock  # no reconnect happened
    finally:
        conn.close()
    records = wait_for_records(shared.data_dir, ids)
    assert [records[i][1] for i in ids] == bodies


def test_keep_alive_with_curl(shared, tmp_path):
    path = tmp_path / "body"
    path.write_bytes(b"same body, one connection\n")
    transfers, log = curl("--data-binary", "@" + str(path), shared.url(), shared.url(), shared.url())
    assert [t.connects for t in transfers] == [1, 0, 0]
    assert log.count("Re-using existing connection") == 2
    ids = [_curl_id(t) for t in transfers]
    assert len(set(ids)) == 3
    transfers, _ = curl(shared.url("/healthz"), shared.url("/readyz"), shared.url("/healthz"))
    assert [(t.status, t.connects) for t in transfers] == [(200, 1), (200, 0), (200, 0)]
    wait_for_records(shared.data_dir, ids)


PIPELINE = [
    (post_request(b"first", headers=[("Content-Type", "text/plain")]), 202, b"first"),
    (get_request("/healthz"), 200, None),
    (chunked_request([b"sec", b"ond"]), 202, b"second"),
    (get_request("/readyz"), 200, None),
    (post_request(b""), 202, b""),
    (post_request(b"fourth\n" * 100, headers=[("Expect", "100-continue")]), 100, None),
    (b"", 202, b"fourth\n" * 100),
    (get_request("/healthz", close=True), 200, None),
]


@pytest.mark.parametrize("piece", [0, 1, 7, 100], ids=["one-send", "bytewise", "7-bytes", "100-bytes"])
def test_pipelined_requests_answered_in_order(shared, piece):
    wire = b"".join(request for request, _, _ in PIPELINE)
    with RawConnection(shared.address) as conn:
        if piece:
            conn.send_in_pieces(wire, piece)
        else:
            conn.send(wire)
        responses, ended = conn.read_to_end()
    assert ended == "eof"
    assert [r.status for r in responses] == [status for _, status, _ in PIPELINE]
    assert responses[-1].header("connection") == "close"
    assert all(r.header("connection") is None for r in responses[:-1])
    expected = [(r, body) for r, (_, _, body) in zip(responses, PIPELINE) if body is not None]
    ids = [_accepted_id(r) for r, _ in expected]
    records = wait_for_records(shared.data_dir, ids)
    assert [records[i][1] for i in ids] == [body for _, body in expected]


AFTER_ERROR = [
    ("404", b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n", 404),
    ("405", b"PUT /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx", 405),
    ("411", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\n\r\n", 411),
    ("413", post_request(_blob(MAX_BODY + 10, 9)), 413),
    ("400", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", 400),
]


@pytest.mark.parametrize("bad, status", [r[1:] for r in AFTER_ERROR], ids=[r[0] for r in AFTER_ERROR])
def test_error_closes_connection_and_keeps_earlier_records(shared, bad, status):
    marker = _blob(16, status).hex().encode()
    before = [b"before-1 " + marker, b"before-2 " + marker]
    after = b"after " + marker
    with RawConnection(shared.address) as conn:
        conn.send(b"".join(post_request(body) for body in before) + bad + post_request(after))
        responses, ended = conn.read_to_end()
    assert ended == "eof"
    assert [r.status for r in responses] == [202, 202, status]
    _assert_error(responses[2], status)
    ids = [_accepted_id(r) for r in responses[:2]]
    records = wait_for_records(shared.data_dir, ids)
    assert [records[i][1] for i in ids] == before
    assert after not in [body for _, body in records.values()]


# -- graceful shutdown -----------------------------------------------------------


def _wait_until_refused(address, timeout: float = CLIENT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=CLIENT_TIMEOUT).close()
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            pass  # connected just as the listener closed: its backlog is reset
        assert time.monotonic() < deadline, "the gateway kept accepting connections"
        time.sleep(0.02)


def test_sigterm_under_load_keeps_every_accepted_record(start_gateway):
    gateway = start_gateway()
    accepted: Dict[str, bytes] = {}
    statuses = set()
    lock = threading.Lock()
    stop = threading.Event()
    enough = threading.Event()
    failures: List[BaseException] = []

    def client(number: int) -> None:
        conn = None
        try:
            for seq in range(1_000_000):
                if stop.is_set():
                    return
                body = b'{"client":%d,"seq":%d,"pad":"%s"}' % (number, seq, b"x" * (seq % 3000))
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(*gateway.address, timeout=CLIENT_TIMEOUT)
                    conn.request("POST", "/v1/logs", body=body, headers={"Content-Type": "application/json"})
                    response = conn.getresponse()
                    answer = response.read()
                except ConnectionRefusedError:
                    return  # the gateway stopped listening
                except (OSError, http.client.HTTPException):
                    conn.close()  # cut while draining: this record was never acknowledged
                    conn = None
                    continue
                with lock:
                    statuses.add(response.status)
                    if response.status == 202:
                        accepted[json.loads(answer)["id"]] = body
                        if len(accepted) >= 200:
                            enough.set()
                if response.will_close:
                    conn.close()
                    conn = None
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        assert enough.wait(60), "the load never got going"
        gateway.terminate()
        assert gateway.wait() == 0, gateway.stderr
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not failures, failures
    assert statuses <= {202, 503}, statuses
    events = gateway.events()
    assert [e["event"] for e in events if e["event"].startswith("stop")] == ["stopping", "stopped"]
    assert events[-1]["event"] == "stopped" and events[-1]["accepted"] >= len(accepted)
    assert [e["signal"] for e in gateway.events("stopping")] == ["SIGTERM"]
    records = stored(gateway.data_dir)
    missing = set(accepted) - set(records)
    assert not missing, "%d acknowledged records lost" % len(missing)
    assert all(records[i][1] == body for i, body in accepted.items())


def test_sigterm_lets_slow_uploads_finish(start_gateway):
    gateway = start_gateway("--shutdown-timeout", "30s")
    idle = RawConnection(gateway.address)
    idle.send(get_request("/healthz"))
    assert idle.read_response().status == 200
    bodies = [_blob(64 * KiB, 40 + i) for i in range(3)]
    uploads = [_hold_ring_slot(gateway.address, body) for body in bodies]
    try:
        gateway.terminate()
        # Idle keep-alive connections are closed and no new ones accepted...
        assert idle.read_to_end() == ([], "eof")
        _wait_until_refused(gateway.address)
        # ...while the uploads in progress go on, slowly, to the end.
        for start in range(100, 64 * KiB, 8 * KiB):
            for conn, body in zip(uploads, bodies):
                conn.send(body[start:start + 8 * KiB])
            time.sleep(0.02)
        ids = []
        for conn in uploads:
            response = conn.read_response()
            assert response.header("connection") == "close"
            ids.append(_accepted_id(response))
            assert conn.read_to_end() == ([], "eof")
    finally:
        for conn in uploads + [idle]:
            conn.close()
    assert gateway.wait() == 0, gateway.stderr
    records = stored(gateway.data_dir)
    assert [records[i][1] for i in ids] == bodies


def test_uploads_past_the_shutdown_timeout_are_cut(start_gateway):
    gateway = start_gateway("--shutdown-timeout", "300ms")
    with _hold_ring_slot(gateway.address, _blob(64 * KiB, 50)) as stalled:
        gateway.terminate()
        assert gateway.wait() == 0, gateway.stderr
        responses, _ = stalled.read_to_end()
    assert responses == []
    assert stored(gateway.data_dir) == {}


def test_second_signal_cuts_the_drain_short(start_gateway):
    gateway = start_gateway("--shutdown-timeout", "10m")
    with _hold_ring_slot(gateway.address, _blob(64 * KiB, 51)) as stalled:
        gateway.terminate()
        _wait_until_refused(gateway.address)
        gateway.terminate()
        assert gateway.wait(timeout=60) == 0, gateway.stderr
        responses, _ = stalled.read_to_end()
    assert responses == []


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
        assert stats["sink"]["records"] == 1
