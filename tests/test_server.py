"""The gateway over real loopback sockets: accepted bodies, health, keep-alive and pipelining.

Every test talks to a ``sluice serve`` process started for it (or for this
module, when the default settings do) on a port the gateway picked itself,
and reads back what the file sink stored.  Errors are in
test_server_errors.py, shutdown in test_server_shutdown.py.  Waits here are
bounded by generous timeouts that only a broken gateway reaches; nothing
measures speed.
"""

from __future__ import annotations

import gzip
import http.client
import json
import re
import socket
import subprocess
import sys
import time

import pytest

from sinks.envelope import envelope
from sinks.file import read_records
from tests.support import gateway as _support
from tests.support.answers import (
    MAX_BODY,
    KiB,
    accepted_id,
    assert_error,
    blob,
    curl_id,
    http_id,
)
from tests.support.answers import shared as _shared
from tests.support.gateway import (
    CLIENT_TIMEOUT,
    RawConnection,
    chunked_request,
    curl,
    curl_post,
    get_request,
    http_post,
    post_request,
    stored,
    wait_for_records,
)

# The fixtures, bound here so tests can ask for them by name.
start_gateway = _support.start_gateway
shared = _shared


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
        sent.append((curl_id(transfer), ctype, encoding, body))
    for ctype, encoding, body in BODIES:
        headers = {"Content-Type": ctype}
        if encoding:
            headers["Content-Encoding"] = encoding
        status, _, answer = http_post(gateway.address, body, headers)
        sent.append((http_id(status, answer), ctype, encoding, body))
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
    curl_body, python_body = blob(size, seed=size), blob(size, seed=size + 1)
    path = tmp_path / "body"
    path.write_bytes(curl_body)
    transfer, _ = curl_post(shared.url(), str(path), "Content-Type: application/octet-stream")
    assert transfer.uploaded == size
    by_curl = curl_id(transfer)
    status, _, answer = http_post(shared.address, python_body, {"Content-Type": "application/octet-stream"})
    by_python = http_id(status, answer)
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


@pytest.mark.parametrize("pieces", [[b"abc"], [b"a", b"bc", b"\r\n0\r\n"], [blob(40 * KiB, 7), b"x" * 1000]],
                         ids=["one-chunk", "crlf-in-data", "large"])
def test_chunked_bodies_are_decoded(shared, pieces):
    with RawConnection(shared.address) as conn:
        conn.send(chunked_request(pieces, headers=[("Content-Type", "text/plain")]))
        record_id = accepted_id(conn.read_response())
    assert wait_for_records(shared.data_dir, [record_id])[record_id][1] == b"".join(pieces)


def test_chunked_upload_by_curl(shared, tmp_path):
    body = blob(100 * KiB, 11)
    path = tmp_path / "body"
    path.write_bytes(body)
    transfer, log = curl_post(shared.url(), str(path), "Transfer-Encoding: chunked")
    assert "Transfer-Encoding: chunked" in log
    record_id = curl_id(transfer)
    assert wait_for_records(shared.data_dir, [record_id])[record_id][1] == body


def test_expect_100_continue_then_body(shared, tmp_path):
    body = blob(64 * KiB, 3)
    path = tmp_path / "body"
    path.write_bytes(body)
    transfer, log = curl_post(shared.url(), str(path), "Expect: 100-continue")
    assert "< HTTP/1.1 100 Continue" in log
    by_curl = curl_id(transfer)

    with RawConnection(shared.address) as conn:
        conn.send(post_request(body, headers=[("Expect", "100-continue")])[:-len(body)])
        interim = conn.read_response()
        assert (interim.status, interim.body) == (100, b"")
        conn.send(body)
        by_raw = accepted_id(conn.read_response())
    records = wait_for_records(shared.data_dir, [by_curl, by_raw])
    assert records[by_curl][1] == records[by_raw][1] == body

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
    record_id = curl_id(transfers[0])
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
            ids.append(accepted_id(response))
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
    bodies = [blob(n * 1000, n) for n in range(1, 5)]
    try:
        sock = None
        for body in bodies:
            conn.request("POST", "/v1/logs", body=body)
            response = conn.getresponse()
            ids.append(http_id(response.status, response.read()))
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
    ids = [curl_id(t) for t in transfers]
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
    ids = [accepted_id(r) for r, _ in expected]
    records = wait_for_records(shared.data_dir, ids)
    assert [records[i][1] for i in ids] == [body for _, body in expected]


AFTER_ERROR = [
    ("404", b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n", 404),
    ("405", b"PUT /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx", 405),
    ("411", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\n\r\n", 411),
    ("413", post_request(blob(MAX_BODY + 10, 9)), 413),
    ("400", b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", 400),
]


@pytest.mark.parametrize("bad, status", [r[1:] for r in AFTER_ERROR], ids=[r[0] for r in AFTER_ERROR])
def test_error_closes_connection_and_keeps_earlier_records(shared, bad, status):
    marker = blob(16, status).hex().encode()
    before = [b"before-1 " + marker, b"before-2 " + marker]
    after = b"after " + marker
    with RawConnection(shared.address) as conn:
        conn.send(b"".join(post_request(body) for body in before) + bad + post_request(after))
        responses, ended = conn.read_to_end()
    assert ended == "eof"
    assert [r.status for r in responses] == [202, 202, status]
    assert_error(responses[2], status)
    ids = [accepted_id(r) for r in responses[:2]]
    records = wait_for_records(shared.data_dir, ids)
    assert [records[i][1] for i in ids] == before
    assert after not in [body for _, body in records.values()]
