"""gateway.otlp without sockets, the gateway on in-memory connections, then on real sockets.

The answers' bytes are checked against the protobuf wire format by a decoder
written here (so the tests run on PyPy, where the protobuf package is not a
test dependency) and, where the protobuf runtime is installed, against
``google.rpc.Status`` itself.  Over real sockets: both encodings answer
``200`` with their empty ``ExportLogsServiceResponse`` on a keep-alive
connection, the body is stored byte for byte with its content type and
encoding in the envelope, and the gateway's counters see the route.
"""

from __future__ import annotations

import json
from typing import List, Tuple

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from gateway import errors, otlp
from sinks.errors import SinkUnavailable
from tests.support.gateway import RawConnection, gateway_in_process, post_request, wait_for_records
from tests.support.units import make_gateway, parse_responses, serve
from tests.support.units import post as unit_post

PATH = "/otlp/v1/logs"


def _varint(data: bytes, at: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def parse_status(data: bytes) -> Tuple[int, str]:
    """``(code, message)`` of a binary google.rpc.Status (fields 1 and 2 only)."""
    code, message, at = 0, "", 0
    while at < len(data):
        tag, at = _varint(data, at)
        value, at = _varint(data, at)
        if tag == 0x08:
            code = value
        elif tag == 0x12:
            message = data[at:at + value].decode("utf-8")
            at += value
        else:
            raise AssertionError("unexpected field tag %d in %r" % (tag, data))
    return code, message


# -- the head ---------------------------------------------------------------------


@pytest.mark.parametrize("value, encoding", [
    (b"application/x-protobuf", otlp.PROTOBUF),
    (b"Application/X-Protobuf", otlp.PROTOBUF),
    (b"application/json", otlp.JSON),
    (b"application/json; charset=utf-8", otlp.JSON),
    (b" application/json ;charset=utf-8", otlp.JSON),
])
def test_otlp_content_types_pick_the_encoding(value, encoding):
    assert otlp.check_head(value, None) == encoding
    assert otlp.check_head(value, b"gzip") == encoding
    assert otlp.check_head(value, b"Deflate") == encoding
    assert otlp.check_head(value, b"identity") == encoding


@pytest.mark.parametrize("content_type, content_encoding", [
    (None, None),
    (b"", None),
    (b"text/plain", None),
    (b"application/protobuf", None),
    (b"application/jsonx", None),
    (b"application/grpc", None),
    (b"application/x-protobuf", b"br"),
    (b"application/json", b"zstd"),
    (b"application/json", b"gzip, gzip"),
])
def test_anything_else_is_415_with_a_message_naming_what_works(content_type, content_encoding):
    with pytest.raises(errors.UnsupportedMediaType) as caught:
        otlp.check_head(content_type, content_encoding)
    assert caught.value.status == 415
    message = str(caught.value)
    assert "application/x-protobuf" in message or "gzip" in message


# -- the answers --------------------------------------------------------------------


def test_success_is_an_empty_export_logs_service_response_in_the_request_encoding():
    protobuf, json_type = b"application/x-protobuf", b"application/json"
    assert otlp.success_headers(protobuf) == [(b"content-type", protobuf)]
    assert otlp.success_headers(json_type + b"; charset=utf-8") == [(b"content-type", json_type)]
    assert otlp.SUCCESS_BODIES == {otlp.PROTOBUF: b"", otlp.JSON: b"{}"}


FAILURES = [
    (errors.BadRequest("connection closed after 3 of 100 body bytes"), 400, 3, []),
    (errors.Unauthorized("unknown API key"), 401, 16, [(b"www-authenticate", b'Bearer realm="sluice"')]),
    (errors.Forbidden("tenant disabled"), 403, 7, []),
    (errors.PayloadTooLarge("body too large"), 413, 3, []),
    (errors.UnsupportedMediaType("no"), 415, 3, []),
    (errors.RateLimited("over the rate", retry_after=1.2, limit=5, reset=2.0), 429, 8,
     [(b"retry-after", b"2"), (b"ratelimit-limit", b"5"), (b"ratelimit-remaining", b"0"),
      (b"ratelimit-reset", b"2")]),
    (errors.Overloaded("ring full", retry_after=0.5), 503, 14, [(b"retry-after", b"1")]),
    (errors.SinkUnavailable("shutting down", retry_after=3.0), 503, 14, [(b"retry-after", b"3")]),
    (errors.AccessUnavailable("redis down"), 503, 14, [(b"retry-after", b"1")]),
]


@pytest.mark.parametrize("exc, status, code, extra", FAILURES, ids=[f[0].reason for f in FAILURES])
def test_failures_keep_status_and_headers_with_a_status_body(exc, status, code, extra):
    got_status, headers, body = otlp.response_for(exc, b"application/x-protobuf")
    assert got_status == status
    assert headers == [(b"content-type", b"application/x-protobuf")] + extra
    assert parse_status(body) == (code, str(exc))
    got_status, headers, body = otlp.response_for(exc, b"application/json")
    assert (got_status, headers) == (status, [(b"content-type", b"application/json")] + extra)
    assert json.loads(body) == {"code": code, "message": str(exc)}
    # Not an OTLP content type (the 415 itself, a missing header): JSON.
    assert otlp.response_for(exc, b"text/plain")[1][0] == (b"content-type", b"application/json")
    assert otlp.response_for(exc, None)[1][0] == (b"content-type", b"application/json")


def test_error_messages_are_cut_to_a_bounded_valid_utf8_string():
    exc = errors.BadRequest("\u00e9" * 1000)
    _, _, body = otlp.response_for(exc, b"application/x-protobuf")
    code, message = parse_status(body)
    assert code == 3 and message == "\u00e9" * (otlp.MAX_MESSAGE_BYTES // 2)
    _, _, body = otlp.response_for(exc, b"application/json")
    assert len(json.loads(body)["message"].encode()) <= otlp.MAX_MESSAGE_BYTES


@given(st.integers(min_value=0, max_value=2**31 - 1), st.text(max_size=600))
def test_status_protobuf_round_trips(code, message):
    data = otlp.status_protobuf(code, message)
    # Cut to the bound on a character boundary, never more.
    expected = message.encode("utf-8")[:otlp.MAX_MESSAGE_BYTES].decode("utf-8", "ignore")
    assert parse_status(data) == (code, expected)


@given(st.integers(min_value=0, max_value=2**31 - 1), st.text(max_size=600))
def test_status_protobuf_parses_as_google_rpc_status(code, message):
    status_pb2 = pytest.importorskip(
        "google.rpc.status_pb2", reason="googleapis-common-protos comes with the CPython-only OTLP clients")
    parsed = status_pb2.Status.FromString(otlp.status_protobuf(code, message))
    assert parsed.code == code
    assert message.encode("utf-8").startswith(parsed.message.encode("utf-8"))


# -- the gateway, on in-memory connections ----------------------------------------------

PROTOBUF = [(b"Content-Type", b"application/x-protobuf")]
RING_FLAGS = ("--ring-size", "72KiB", "--max-body", "30000", "--ring-wait", "1s")


async def test_full_ring_is_503_with_retry_after_and_a_status(autojump_clock):
    gateway, sink = make_gateway(*RING_FLAGS, hold=True)
    filled = await serve(gateway, [unit_post(b"a" * 30000, target=otlp.LOGS_PATH, headers=PROTOBUF)
                                   + unit_post(b"b" * 30000, target=otlp.LOGS_PATH, headers=PROTOBUF)])
    assert [(r.status, r.body) for r in parse_responses(filled.sent)] == [(200, b""), (200, b"")]
    refused = await serve(gateway, [unit_post(b"c" * 20000, target=otlp.LOGS_PATH, headers=PROTOBUF)])
    (answer,) = parse_responses(refused.sent)
    assert (answer.status, answer.header(b"retry-after")) == (503, b"1")
    assert answer.header(b"content-type") == b"application/x-protobuf"
    assert parse_status(answer.body)[0] == 14  # UNAVAILABLE: the exporter retries after Retry-After
    assert len(sink.records) == 2  # held records intact, the refused one not stored
    sink.release_held()
    assert gateway.ring.used == 0


async def test_a_sink_that_cannot_store_is_503_and_the_slot_comes_back():
    gateway, sink = make_gateway()

    def refuse(record):
        raise SinkUnavailable("shutting down", retry_after=2.0)

    sink.on_put = refuse
    transport = await serve(gateway, [unit_post(b"{}", target=otlp.LOGS_PATH,
                                                headers=[(b"Content-Type", b"application/json")])])
    (answer,) = parse_responses(transport.sent)
    assert (answer.status, answer.header(b"retry-after")) == (503, b"2")
    assert json.loads(answer.body) == {"code": 14, "message": "shutting down"}
    assert sink.records == [] and gateway.ring.used == 0


# -- over real sockets ----------------------------------------------------------------


PROTOBUF_BODY = b"\x0a\x00"  # an ExportLogsServiceRequest with one empty ResourceLogs
JSON_BODY = b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[{"body":{"stringValue":"hi"}}]}]}]}'


def _exchange(address, requests: List[bytes]):
    with RawConnection(address) as conn:
        answers = []
        for request in requests:
            conn.send(request)
            answers.append(conn.read_response())
        return answers


async def test_both_encodings_answer_200_on_one_connection_and_store_the_body(tmp_path):
    data_dir = str(tmp_path / "data")
    requests = [
        post_request(PROTOBUF_BODY, path=PATH, headers=[("Content-Type", "application/x-protobuf")]),
        post_request(JSON_BODY, path=PATH, headers=[("Content-Type", "application/json"),
                                                    ("Content-Encoding", "identity")]),
        post_request(b"\x1f\x8b-not-really-gzip", path=PATH,
                     headers=[("Content-Type", "application/x-protobuf"), ("Content-Encoding", "gzip")]),
        post_request(b"", path=PATH, headers=[("Content-Type", "application/json")]),
        post_request(b"plain", headers=[("Content-Type", "text/plain")]),  # /v1/logs is unchanged
    ]
    async with gateway_in_process([], data_dir=data_dir) as (gateway, port):
        answers = await trio.to_thread.run_sync(_exchange, ("127.0.0.1", port), requests)
        stats = gateway.statistics()
    assert [(a.status, a.header("content-type"), a.body) for a in answers[:4]] == [
        (200, "application/x-protobuf", b""),
        (200, "application/json", b"{}"),
        (200, "application/x-protobuf", b""),
        (200, "application/json", b"{}"),
    ]
    assert all(a.header("connection") is None for a in answers)  # kept alive
    assert answers[4].status == 202
    assert stats["accepted"] == 5 and stats["errors"] == 0
    records = wait_for_records(data_dir, [answers[4].json()["id"]])
    found = sorted((meta["id"], meta["content_type"], meta["content_encoding"], body)
                   for meta, body in records.values())
    assert [row[1:] for row in found] == [
        ("application/x-protobuf", None, PROTOBUF_BODY),
        ("application/json", "identity", JSON_BODY),
        ("application/x-protobuf", "gzip", b"\x1f\x8b-not-really-gzip"),
        ("application/json", None, b""),
        ("text/plain", None, b"plain"),
    ]


async def test_otlp_answers_are_counted_on_their_own_route(tmp_path):
    requests = [
        post_request(PROTOBUF_BODY, path=PATH, headers=[("Content-Type", "application/x-protobuf")]),
        post_request(PROTOBUF_BODY, path=PATH, headers=[("Content-Type", "text/plain")]),
    ]
    async with gateway_in_process([], data_dir=str(tmp_path / "data")) as (gateway, port):
        answers = await trio.to_thread.run_sync(_exchange, ("127.0.0.1", port), requests)
        counts = gateway.telemetry.requests
        assert [a.status for a in answers] == [200, 415]
        assert counts.get(PATH, "200") == 1 and counts.get(PATH, "415") == 1
        assert gateway.statistics()["stages"]["total"]["count"] == 1
