"""Request-head handling of a realistic agent request, everything but the socket.

Each operation: the request lands in the connection's preallocated receive
buffer (as ``recv_into`` would put it), h11 parses the head, the buffered body
is copied into a slot-sized view (``take_body``), the body is finished, the
``202`` is framed and the connection starts its next cycle.
"""

from __future__ import annotations

import pytest

from gateway.http.connection import HTTPConnection, RequestHead

HEAD = (
    b"POST /v1/logs HTTP/1.1\r\n"
    b"Host: ingest.sluice.example.com\r\n"
    b"User-Agent: sluice-agent-python/1.4.2 (CPython 3.11; linux)\r\n"
    b"Authorization: Bearer sluice1.acme-prod.Jx3u1c9Qm2zRk8d0T5vYwA7bLp4N6eHsF_oKqGi-MtU\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: %d\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Encoding: identity\r\n"
    b"\r\n"
)
ANSWER = b'{"id":"01M8BECG8YTGDXTWT500000001"}'
_JSON = [(b"content-type", b"application/json")]


@pytest.mark.parametrize("body_size", [1024, 0], ids=["head+1KiB-body", "head-only"])
def test_request_cycle(benchmark, throughput, body_size: int) -> None:
    """``body_size`` bytes arrive with the head (0: the body would come by recv_into)."""
    length = body_size or 1024
    request = HEAD % length + b"x" * body_size
    conn = HTTPConnection(bytearray(16384 + 16384), max_head=16384)
    dest = memoryview(bytearray(length))

    def cycle() -> RequestHead:
        view = conn.head_buffer()
        view[:len(request)] = request
        conn.received(len(request))
        head = conn.next_request()
        conn.take_body(dest)
        conn.finish_body()
        conn.respond(202, _JSON, ANSWER)
        conn.next_cycle()
        return head

    head = benchmark(cycle)
    assert head.content_length == length and head.path == b"/v1/logs"
    throughput(len(request))
