"""The ingest server (Gateway.handle_connection) over an in-memory transport.

Every scenario is fed whole, one byte at a time, and followed by a pipelined
request ("trailing"): a request that succeeds must leave that pipelined one to
be answered next; one that fails must close the connection without answering it.
"""

from __future__ import annotations

import time
from typing import List, Tuple

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import errors
from gateway.http.transport import MemoryTransport
from sinks.envelope import MAX_FIELD_BYTES, envelope
from tests.support.units import (
    ContinueClient,
    byte_by_byte,
    chunked,
    get,
    make_gateway,
    parse_responses,
    post,
    serve,
    split_record,
    whole,
)

TRAILER_BODY = b"pipelined after the scenario"
TRAILER = post(TRAILER_BODY)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
MODES = ["whole", "bytes", "trailing"]
EOF_MODES = ["whole", "bytes"]  # the scenario ends in EOF: nothing may follow


def _pieces(mode: str, data: bytes) -> List[bytes]:
    if mode == "whole":
        return whole(data)
    if mode == "bytes":
        return byte_by_byte(data)
    assert mode == "trailing"
    return whole(data + TRAILER)


async def exchange(gateway, sink, data: bytes, mode: str, *, accepted: bool, head_only=()):
    """Serve ``data`` on one connection; the responses, minus the trailer's."""
    transport = await serve(gateway, _pieces(mode, data))
    assert transport.closed
    responses = parse_responses(transport.sent, head_only=head_only)
    bodies = [split_record(record)[1] for record in sink.records]
    if mode == "trailing":
        if accepted:
            assert responses[-1].status == 202, responses
            assert bodies[-1] == TRAILER_BODY
            assert responses[-1].json() == {"id": sink.ids[-1]}
            responses.pop()
            sink.records.pop()
            sink.ids.pop()
        else:
            assert TRAILER_BODY not in bodies
    return transport, responses


def _ms() -> int:
    return int(time.time() * 1000)


# -- accepted records ----------------------------------------------------------

BINARY = bytes(range(256)) + b"\r\n\r\nPOST / HTTP/1.1\r\n\r\n" + b"\n{not json}\n"


@pytest.mark.parametrize("mode", MODES)
async def test_post_is_accepted_and_the_record_is_envelope_plus_body(mode):
    gateway, sink = make_gateway()
    headers = [(b"Content-Type", b"application/x-ndjson"), (b"Content-Encoding", b"identity")]
    before = _ms()
    _, responses = await exchange(gateway, sink, post(BINARY, headers=headers), mode, accepted=True)
    after = _ms()
    assert [r.status for r in responses] == [202]
    assert responses[0].header(b"content-type") == b"application/json"
    record_id = responses[0].json()["id"]
    assert sink.ids == [record_id]
    (record,) = sink.records
    meta, body = split_record(record)
    assert body == BINARY
    assert meta == {
        "v": 1, "id": record_id, "tenant": None, "received_at": meta["received_at"],
        "content_type": "application/x-ndjson", "content_encoding": "identity",
    }
    assert before <= meta["received_at"] <= after
    line = envelope(record_id, None, meta["received_at"], b"application/x-ndjson", b"identity")
    assert record == line + BINARY
    assert gateway.ring.used == 0  # the sink released it


@pytest.mark.parametrize("mode", MODES)
async def test_record_without_content_headers_has_null_fields(mode):
    gateway, sink = make_gateway()
    _, responses = await exchange(gateway, sink, post(b"x"), mode, accepted=True)
    assert responses[0].status == 202
    meta, body = split_record(sink.records[0])
    assert meta["content_type"] is None and meta["content_encoding"] is None and body == b"x"


@pytest.mark.parametrize("mode", MODES)
async def test_zero_length_body(mode):
    gateway, sink = make_gateway()
    _, responses = await exchange(gateway, sink, post(b""), mode, accepted=True)
    assert [r.status for r in responses] == [202]
    meta, body = split_record(sink.records[0])
    assert body == b"" and meta["id"] == responses[0].json()["id"]
    assert sink.records[0].endswith(b"}\n")


@pytest.mark.parametrize("mode", MODES)
async def test_body_of_exactly_max_body(mode):
    gateway, sink = make_gateway()
    body = bytes(i % 251 for i in range(gateway.config.max_body))
    _, responses = await exchange(gateway, sink, post(body), mode, accepted=True)
    assert [r.status for r in responses] == [202]
    assert split_record(sink.records[0])[1] == body


CHUNKED_CASES = {
    "plain": dict(pieces=[b"hello ", b"world"]),
    "one_byte_chunks": dict(pieces=[bytes([c]) for c in b"abcdefgh"]),
    "binary": dict(pieces=[BINARY[:100], BINARY[100:]]),
    "extension": dict(pieces=[b"abc", b"de"], extension=b';name="va;lue";flag'),
    "trailers": dict(pieces=[b"abc"], trailers=[(b"X-Checksum", b"123"), (b"X-Other", b"v")]),
    "empty": dict(pieces=[]),
    "max_body": dict(pieces=[b"z" * 1000, b"y" * 24]),
}


@pytest.mark.parametrize("case", sorted(CHUNKED_CASES))
@pytest.mark.parametrize("mode", MODES)
async def test_chunked_body_is_decoded_into_the_record(mode, case):
    gateway, sink = make_gateway()
    kwargs = CHUNKED_CASES[case]
    data = chunked(headers=[(b"Content-Type", b"text/plain")], **kwargs)
    # After trailers the connection closes: a request pipelined behind them
    # is not read (h11 reads trailers leniently, a proxy may not).
    after_trailers = case == "trailers" and mode == "trailing"
    _, responses = await exchange(gateway, sink, data, mode, accepted=not after_trailers)
    assert [r.status for r in responses] == [202]
    if after_trailers:
        assert responses[0].header(b"connection") == b"close"
    meta, body = split_record(sink.records[0])
    assert body == b"".join(kwargs["pieces"])
    assert meta["content_type"] == "text/plain" and meta["id"] == responses[0].json()["id"]
    assert gateway.ring.used == 0


def _pipeline() -> Tuple[bytes, List[bytes]]:
    requests = [
        post(b"first"),
        chunked([b"sec", b"ond"]),
        get(b"/healthz"),
        post(b""),
        get(b"/readyz?verbose=1"),
        chunked([b"fourth"]),
        post(b"fifth", headers=[(b"Expect", b"100-continue")]),
        get(b"/healthz", method=b"HEAD"),
        post(b"sixth"),
    ]
    bodies = [b"first", b"second", b"", b"fourth", b"fifth", b"sixth"]
    return b"\r\n".join(requests), bodies  # a stray CRLF between requests is allowed


@pytest.mark.parametrize("mode", MODES)
async def test_pipelined_keep_alive_requests_are_answered_in_order(mode):
    gateway, sink = make_gateway()
    data, bodies = _pipeline()
    transport, responses = await exchange(gateway, sink, data, mode, accepted=True, head_only=[7])
    statuses = [r.status for r in responses]
    assert statuses == [202, 202, 200, 202, 200, 202, 100, 202, 200, 202]
    finals = [r for r in responses if r.status != 100]
    assert finals[2].json() == {"status": "ok"}
    assert finals[4].json() == {"status": "ready"}
    assert finals[7].body == b"" and finals[7].header(b"content-length") == b"15"
    assert all(r.header(b"connection") is None for r in finals)
    assert [split_record(r)[1] for r in sink.records] == bodies
    ids = [r.json()["id"] for r in finals if r.status == 202]
    assert ids == sink.ids and ids == sorted(ids) and len(set(ids)) == len(ids)
    assert gateway.requests == 9 + (mode == "trailing") and gateway.errors == 0


@pytest.mark.parametrize("split", [1, 999, 4096, 17 * 1024])
async def test_long_pipeline_larger_than_the_receive_buffer(split):
    gateway, sink = make_gateway()
    bodies = [bytes([65 + i % 26]) * (1000 - i) for i in range(40)]
    data = b"".join(
        post(body) if i % 3 else chunked([body[:500], body[500:]]) for i, body in enumerate(bodies))
    assert len(data) > 2 * (gateway.config.max_head + 16 * 1024)
    pieces = [data[i:i + split] for i in range(0, len(data), split)]
    transport = await serve(gateway, pieces)
    assert [r.status for r in parse_responses(transport.sent)] == [202] * 40
    assert [split_record(r)[1] for r in sink.records] == bodies


@pytest.mark.parametrize("mode", MODES)
async def test_client_asking_to_close_gets_one_answer(mode):
    gateway, sink = make_gateway()
    data = post(b"last", headers=[(b"Connection", b"close")])
    transport = await serve(gateway, _pieces(mode, data))
    (response,) = parse_responses(transport.sent)
    assert response.status == 202 and response.header(b"connection") == b"close"
    assert [split_record(r)[1] for r in sink.records] == [b"last"]
    assert transport.closed


async def test_http_1_0_request_is_answered_and_closed():
    gateway, sink = make_gateway()
    transport = await serve(gateway, [b"POST /v1/logs HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc" + TRAILER])
    (response,) = parse_responses(transport.sent)
    assert response.status == 202 and response.header(b"connection").lower() == b"close"
    assert [split_record(r)[1] for r in sink.records] == [b"abc"]


@pytest.mark.parametrize("mode", MODES)
async def test_sink_unavailable_is_503_and_the_slot_comes_back(mode):
    gateway, sink = make_gateway()

    def refuse(record):
        if split_record(bytes(record.view))[1] == b"refused":
            raise errors.SinkUnavailable("sink down", retry_after=4)

    sink.on_put = refuse
    transport, responses = await exchange(gateway, sink, post(b"kept") + post(b"refused"), mode,
                                          accepted=False)
    assert [r.status for r in responses] == [202, 503]
    assert responses[1].header(b"retry-after") == b"4"
    assert responses[1].json()["error"] == "sink_unavailable"
    assert [split_record(r)[1] for r in sink.records] == [b"kept"]
    assert gateway.ring.used == 0 and gateway.ring.live == 0 and transport.closed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_expect_100_continue_is_answered_before_202(mode, framing):
    gateway, sink = make_gateway()
    expect = [(b"Expect", b"100-continue")]
    data = post(b"body", headers=expect) if framing == "length" else chunked([b"bo", b"dy"], headers=expect)
    transport, responses = await exchange(gateway, sink, data, mode, accepted=True)
    assert bytes(transport.sent).startswith(CONTINUE)
    assert [r.status for r in responses] == [100, 202]
    assert split_record(sink.records[0])[1] == b"body"


@pytest.mark.parametrize("split", ["whole", "bytes"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_client_waiting_for_100_continue_gets_it_and_then_202(framing, split, autojump_clock):
    gateway, sink = make_gateway()
    expect = [(b"Expect", b"100-continue")]
    if framing == "length":
        data = post(b"held back", headers=expect)
    else:
        data = chunked([b"held ", b"back"], headers=expect)
    end = data.index(b"\r\n\r\n") + 4
    body = data[end:] if split == "whole" else byte_by_byte(data[end:])
    transport = ContinueClient(data[:end], [body] if split == "whole" else body)
    await gateway.handle_connection(transport)
    responses = parse_responses(transport.sent)
    assert [r.status for r in responses] == [100, 202]
    assert [split_record(r)[1] for r in sink.records] == [b"held back"]


REJECTED_WITH_EXPECT = {
    413: post(b"", length=1025, headers=[(b"Expect", b"100-continue")]),
    404: post(b"abc", target=b"/v1/other", headers=[(b"Expect", b"100-continue")]),
    405: post(b"abc", target=b"/healthz", headers=[(b"Expect", b"100-continue")]),
    411: post(b"", framing="none", headers=[(b"Expect", b"100-continue")]),
}


@pytest.mark.parametrize("status", sorted(REJECTED_WITH_EXPECT))
@pytest.mark.parametrize("mode", MODES)
async def test_no_100_continue_for_a_rejected_request(mode, status):
    gateway, sink = make_gateway()
    transport, responses = await exchange(gateway, sink, REJECTED_WITH_EXPECT[status], mode, accepted=False)
    assert [r.status for r in responses] == [status]
    assert CONTINUE not in bytes(transport.sent)
    assert responses[0].header(b"connection") == b"close"
    assert sink.records == []


@pytest.mark.parametrize("expect", [False, True])
async def test_413_is_answered_before_any_body_byte_arrives(expect):
    gateway, sink = make_gateway()
    headers = [(b"Expect", b"100-continue")] if expect else []
    head = post(b"", length=gateway.config.max_body + 1, headers=headers)
    # The client sends the head and then nothing: the answer must not wait for the body.
    transport = MemoryTransport([head], eof=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_connection, transport)
        await trio.testing.wait_all_tasks_blocked()
        responses = parse_responses(transport.sent)
        assert [r.status for r in responses] == [413]
        assert responses[0].json()["error"] == "payload_too_large"
        assert transport.write_closed
        nursery.cancel_scope.cancel()
    assert transport.closed and sink.records == []
    assert gateway.ring.used == 0 and gateway.ring.live == 0


# -- refused requests ------------------------------------------------------------

def _long_head(size: int) -> bytes:
    base = post(b"", headers=[(b"X-Pad", b"")])
    pad = size - len(base)
    return post(b"", headers=[(b"X-Pad", b"p" * pad)])


# name -> (request bytes, status, may be followed by a pipelined request)
REFUSED = {
    "unknown_path": (post(b"abc", target=b"/v2/logs"), 404, True),
    "unknown_path_get": (get(b"/"), 404, True),
    "get_ingest": (get(b"/v1/logs"), 405, True),
    "head_ingest": (get(b"/v1/logs", method=b"HEAD"), 405, True),
    "post_healthz": (post(b"", target=b"/healthz"), 405, True),
    "delete_readyz": (get(b"/readyz", method=b"DELETE"), 405, True),
    "no_length": (post(b"", framing="none"), 411, True),
    "too_large": (post(b"x" * 1025), 413, True),
    "chunked_too_large": (chunked([b"x" * 1000, b"y" * 25]), 413, True),
    "chunked_too_large_one_chunk": (chunked([b"x" * 2000]), 413, True),
    "huge_head": (_long_head(1025), 431, True),
    "huge_head_no_end": (b"POST /v1/logs HTTP/1.1\r\nX-Pad: " + b"p" * 3000, 431, False),
    "bad_request_line": (b"POST /v1/logs\r\nHost: test\r\n\r\n", 400, True),
    "garbage_request_line": (b"\x00\x01\x02 garbage\r\n\r\n", 400, True),
    "bad_version": (b"POST /v1/logs HTTP/one\r\nHost: test\r\nContent-Length: 0\r\n\r\n", 400, True),
    "bad_header_name": (post(b"", headers=[(b"Bad Header", b"1")]), 400, True),
    "header_without_colon": (b"POST /v1/logs HTTP/1.1\r\nHost: test\r\nnocolon\r\n\r\n", 400, True),
    "no_host": (b"POST /v1/logs HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400, True),
    "length_and_chunked": (
        b"POST /v1/logs HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400, True),
    "conflicting_lengths": (
        b"POST /v1/logs HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400, True),
    "non_numeric_length": (b"POST /v1/logs HTTP/1.1\r\nHost: test\r\nContent-Length: 1x\r\n\r\na", 400, True),
    "negative_length": (post(b"", length=-1), 400, True),
    "bad_chunk_size": (
        b"POST /v1/logs HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400, True),
    "chunk_without_crlf": (
        b"POST /v1/logs HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n",
        400, True),
    "long_content_type": (post(b"a", headers=[(b"Content-Type", b"t" * (MAX_FIELD_BYTES + 1))]), 400, True),
    "healthz_with_body": (b"GET /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: 2\r\n\r\nhi", 400, True),
    "body_short_then_eof": (post(b"abc", length=10), 400, False),
    "chunked_short_then_eof": (
        b"POST /v1/logs HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", 400, False),
    "chunked_no_last_chunk_then_eof": (
        b"POST /v1/logs HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n", 400, False),
    "head_cut_short_then_eof": (b"POST /v1/logs HTTP/1.1\r\nHost: te", 400, False),
    "gzip_framing": (
        b"POST /v1/logs HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip\r\n\r\nabc", 501, True),
    "gzip_chunked_framing": (
        b"POST /v1/logs HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501, True),
}


@pytest.mark.parametrize("mode, name", [
    (mode, name) for name in sorted(REFUSED) for mode in MODES if REFUSED[name][2] or mode != "trailing"])
async def test_refused_request_closes_the_connection_and_keeps_earlier_records(mode, name):
    data, status, _ = REFUSED[name]
    gateway, sink = make_gateway()
    earlier = post(b"accepted first") + chunked([b"accepted ", b"second"])
    transport, responses = await exchange(gateway, sink, earlier + data, mode, accepted=False,
                                          head_only=[2] if b"HEAD " in data[:5] else ())
    assert [r.status for r in responses] == [202, 202, status]
    error = responses[-1]
    assert error.header(b"connection") == b"close"
    assert transport.write_closed and transport.closed
    if not data.startswith(b"HEAD "):
        doc = error.json()
        assert set(doc) == {"error", "message"} and doc["message"]
    assert [split_record(r)[1] for r in sink.records] == [b"accepted first", b"accepted second"]
    assert [r.json()["id"] for r in responses[:2]] == sink.ids
    assert gateway.ring.used == 0 and gateway.ring.live == 0
    assert gateway.errors == 1


@pytest.mark.parametrize("target, allow", [
    (b"/v1/logs", b"POST"), (b"/healthz", b"GET, HEAD"), (b"/readyz", b"GET, HEAD")])
async def test_405_names_the_allowed_methods(target, allow):
    gateway, _ = make_gateway()
    transport = await serve(gateway, [get(target, method=b"PUT")])
    (response,) = parse_responses(transport.sent)
    assert response.status == 405 and response.header(b"allow") == allow
    assert response.json()["error"] == "method_not_allowed"


@pytest.mark.parametrize("mode", MODES)
async def test_head_of_exactly_max_head_is_accepted(mode):
    gateway, sink = make_gateway()
    data = _long_head(gateway.config.max_head)
    assert data.index(b"\r\n\r\n") + 4 == gateway.config.max_head
    _, responses = await exchange(gateway, sink, data, mode, accepted=True)
    assert [r.status for r in responses] == [202]


@pytest.mark.parametrize("mode", EOF_MODES)
async def test_head_timeout_gets_408(mode, autojump_clock):
    gateway, sink = make_gateway("--head-timeout", "5s")
    data = post(b"ok") + b"POST /v1/logs HTTP/1.1\r\nHost: te"
    transport = await serve(gateway, _pieces(mode, data), eof=False)
    responses = parse_responses(transport.sent)
    assert [r.status for r in responses] == [202, 408]
    assert responses[1].json()["error"] == "request_timeout"
    assert transport.closed and [split_record(r)[1] for r in sink.records] == [b"ok"]


@pytest.mark.parametrize("mode", EOF_MODES)
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_body_timeout_gets_408(mode, framing, autojump_clock):
    gateway, sink = make_gateway("--body-timeout", "7s", "--min-body-rate", "0")
    if framing == "length":
        slow = post(b"abc", length=10)
    else:
        slow = b"POST /v1/logs HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"
    start = trio.current_time()
    transport = await serve(gateway, _pieces(mode, post(b"ok") + slow), eof=False)
    assert trio.current_time() - start >= 7
    responses = parse_responses(transport.sent)
    assert [r.status for r in responses] == [202, 408]
    assert transport.closed and [split_record(r)[1] for r in sink.records] == [b"ok"]
    assert gateway.ring.used == 0 and gateway.ring.live == 0


async def test_idle_keep_alive_connection_is_closed_quietly(autojump_clock):
    gateway, sink = make_gateway("--idle-timeout", "20s")
    start = trio.current_time()
    transport = await serve(gateway, [post(b"ok")], eof=False)
    assert trio.current_time() - start >= 20
    assert [r.status for r in parse_responses(transport.sent)] == [202]
    assert transport.closed and not transport.write_closed and gateway.errors == 0


async def test_connection_closed_between_requests_is_not_an_error():
    gateway, sink = make_gateway()
    transport = await serve(gateway, [post(b"ok"), b"\r\n"])
    assert [r.status for r in parse_responses(transport.sent)] == [202]
    assert gateway.errors == 0 and transport.closed


# -- a full ring -------------------------------------------------------------------

RING_FLAGS = ("--ring-size", "72KiB", "--max-body", "30000", "--ring-wait", "1s")


async def _fill_ring(gateway, sink) -> None:
    transport = await serve(gateway, [post(b"a" * 30000) + post(b"b" * 30000)])
    assert [r.status for r in parse_responses(transport.sent)] == [202, 202]
    assert len(sink.held) == 2
    assert not gateway.ring.can_reserve(20000)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_full_ring_answers_503_with_retry_after(mode, framing, autojump_clock):
    gateway, sink = make_gateway(*RING_FLAGS, hold=True)
    await _fill_ring(gateway, sink)
    expect = [(b"Expect", b"100-continue")]
    data = post(b"c" * 20000, headers=expect) if framing == "length" else chunked([b"c" * 10], headers=expect)
    start = trio.current_time()
    transport, responses = await exchange(gateway, sink, data, mode, accepted=False)
    assert trio.current_time() - start >= 1  # it waited ring_wait for space first
    assert [r.status for r in responses] == [503]
    assert responses[0].header(b"retry-after") == b"1"
    assert responses[0].json()["error"] == "overloaded"
    assert CONTINUE not in bytes(transport.sent)
    assert len(sink.records) == 2
    assert [bytes(r.view[-1:]) for r in sink.held] == [b"a", b"b"]  # held records intact
    assert gateway.ring.statistics()["overloads"] == 1 and gateway.ring.live == 2
    sink.release_held()
    assert gateway.ring.used == 0


async def test_request_waiting_for_ring_space_is_served_when_the_sink_releases(autojump_clock):
    gateway, sink = make_gateway(*RING_FLAGS, hold=True)
    await _fill_ring(gateway, sink)
    transport = MemoryTransport([post(b"c" * 20000)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_connection, transport)
        await trio.sleep(0.5)
        assert transport.sent == b"" and gateway.ring.statistics()["waiting"] == 1
        sink.release_held()
    assert [r.status for r in parse_responses(transport.sent)] == [202]
    assert split_record(sink.records[-1])[1] == b"c" * 20000


async def test_readyz_reports_a_ring_that_cannot_fit_a_largest_record(autojump_clock):
    gateway, sink = make_gateway(*RING_FLAGS, hold=True)
    await _fill_ring(gateway, sink)
    transport = await serve(gateway, [get(b"/readyz"), get(b"/healthz")])
    ready, health = parse_responses(transport.sent)
    assert ready.status == 503 and ready.json() == {"status": "not_ready", "reason": "buffer full"}
    assert health.status == 200  # alive, just not ready
    sink.release_held()
    transport = await serve(gateway, [get(b"/readyz")])
    assert parse_responses(transport.sent)[0].status == 200


# -- probes ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
async def test_healthz_and_readyz(mode):
    gateway, sink = make_gateway()
    data = b"".join([get(b"/healthz"), get(b"/readyz"),
                     get(b"/healthz", method=b"HEAD"), get(b"/readyz", method=b"HEAD")])
    _, responses = await exchange(gateway, sink, data, mode, accepted=True, head_only=[2, 3])
    assert [r.status for r in responses] == [200, 200, 200, 200]
    assert responses[0].json() == {"status": "ok"} and responses[1].json() == {"status": "ready"}
    assert responses[2].body == b"" and responses[2].header(b"content-length") == str(
        len(responses[0].body)).encode()
    assert responses[3].body == b""


async def test_head_healthz_has_no_body_on_the_wire():
    gateway, _ = make_gateway()
    transport = await serve(gateway, [get(b"/healthz", method=b"HEAD")])
    assert bytes(transport.sent).endswith(b"\r\n\r\n")
    assert b"status" not in bytes(transport.sent)


async def test_readyz_when_the_sink_is_not_ready():
    gateway, sink = make_gateway()
    sink.not_ready = "disk full"
    transport = await serve(gateway, [get(b"/readyz"), get(b"/healthz")])
    ready, health = parse_responses(transport.sent)
    assert ready.status == 503
    assert ready.json() == {"status": "not_ready", "reason": "sink: disk full"}
    assert health.status == 200


async def test_drain_answers_the_request_in_progress_with_close():
    gateway, sink = make_gateway()
    sink.on_put = lambda record: gateway.drain()
    transport = await serve(gateway, [post(b"one") + post(b"two")])
    (response,) = parse_responses(transport.sent)
    assert response.status == 202 and response.header(b"connection") == b"close"
    assert [split_record(r)[1] for r in sink.records] == [b"one"]
    assert gateway.readiness() == (False, "shutting down")


async def test_drain_closes_an_idle_keep_alive_connection():
    gateway, sink = make_gateway()
    transport = MemoryTransport([post(b"one")], eof=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gateway.handle_connection, transport)
        await trio.testing.wait_all_tasks_blocked()
        assert not transport.closed
        gateway.drain()
    assert transport.closed
    assert [r.status for r in parse_responses(transport.sent)] == [202]


# -- zero copy ---------------------------------------------------------------------

@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_sink_gets_the_rings_own_memory(framing):
    gateway, sink = make_gateway()
    ring = gateway.ring
    seen = []

    def check(record):
        view = record.view
        assert view.obj is ring.buffer
        assert ring.buffer[record.slot.offset:record.slot.offset + len(view)] == bytes(view)
        seen.append(record.slot.offset)

    sink.on_put = check
    body = b"0123456789" * 50
    data = post(body) if framing == "length" else chunked([body[:200], body[200:]])
    await serve(gateway, [data + data])
    assert len(seen) == 2
    assert [split_record(r)[1] for r in sink.records] == [body, body]


# -- any split of the stream ---------------------------------------------------------

def _requests():
    body = st.binary(max_size=1024)
    length = st.builds(lambda b: ("length", b, post(b)), body)
    chunks = st.lists(st.binary(min_size=1, max_size=300), max_size=4).filter(
        lambda pieces: sum(map(len, pieces)) <= 1024)
    chunk = st.builds(lambda pieces: ("chunked", b"".join(pieces), chunked(pieces)), chunks)
    return st.lists(st.one_of(length, chunk), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=_requests(), cuts=st.lists(st.integers(0, 6000), max_size=12))
def test_any_split_of_a_pipelined_stream_gives_the_same_records(requests, cuts):
    data = b"".join(raw for _, _, raw in requests)
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]

    async def main():
        gateway, sink = make_gateway()
        transport = await serve(gateway, pieces)
        return gateway, sink, transport

    gateway, sink, transport = trio.run(main)
    responses = parse_responses(transport.sent)
    assert [r.status for r in responses] == [202] * len(requests)
    assert [split_record(r)[1] for r in sink.records] == [body for _, body, _ in requests]
    assert [r.json()["id"] for r in responses] == sink.ids
    assert gateway.ring.used == 0
