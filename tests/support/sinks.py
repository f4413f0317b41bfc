"""Driving a sink or a gateway in tests: a sink over a ring, and a plain HTTP client.

:class:`SinkHarness` is a ring plus a `StreamSink` over it (any endpoint), with
records made from bytes and put the way the server puts them
(:func:`running_sink`, :func:`put_all`).  :func:`post`, :func:`get` and
:func:`http_exchange` are a blocking HTTP/1.1 client on a fresh connection,
for threads (``trio.to_thread.run_sync``) next to an in-process gateway.
"""
from __future__ import annotations

import contextlib
import socket
from typing import Any, Dict, List, Optional, Tuple

import trio
import trio.testing

__all__ = [
    "http_exchange",
    "post",
    "get",
    "envelope_len",
    "SinkHarness",
    "running_sink",
    "put_all",
]

MIB = 1024 * 1024


# -- a plain HTTP client -------------------------------------------------------


def http_exchange(port: int, request: bytes, body: bytes = b"") -> Tuple[int, Dict[bytes, bytes], bytes]:
    """Send ``request`` (head bytes) and ``body``; return (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        if body:
            sock.sendall(body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        length = int(headers.get(b"content-length", b"0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest[:length]


def post(port: int, body: bytes, headers: bytes = b"") -> Tuple[int, Dict[bytes, bytes], bytes]:
    """POST ``body`` to /v1/logs on a new connection (blocking)."""
    head = b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n" % (
        len(body), headers)
    return http_exchange(port, head, body)


def get(port: int, path: str) -> Tuple[int, Dict[bytes, bytes], bytes]:
    return http_exchange(port, b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path.encode())


def envelope_len() -> int:
    """Bytes of the envelope line of a record without Content-Type or Content-Encoding."""
    from sinks.envelope import envelope

    return len(envelope("0" * 26, None, 1795680518430, None, None))


# -- a sink over a ring, without a server -------------------------------------


class SinkHarness:
    """A ring, a `StreamSink` over it and what its log said; records made from bytes."""

    def __init__(self, endpoint: Any, *, service: str = "kinesis", ring_bytes: int = 4 * MIB,
                 **options: Any) -> None:
        from buffers import RingBuffer
        from sinks.aws.sink import StreamOptions, StreamSink

        self.ring = RingBuffer(ring_bytes)
        self.endpoint = endpoint
        self.logged: List[str] = []
        options.setdefault("stream", "logs")
        self.sink = StreamSink(self.ring.release, self.ring.buffer,
                               StreamOptions(service=service, **options),
                               endpoint=endpoint,
                               report=lambda sink, ready, reason: self.logged.append(reason))
        self.count = 0

    def record(self, data: bytes, partition_key: Optional[str] = None,
               hash_key: Optional[str] = None) -> Any:
        from sinks.base import Record

        slot = self.ring.reserve(max(1, len(data)))
        slot.view[:len(data)] = data
        self.ring.commit(slot, len(data))
        self.ring.hand_off(slot)
        self.count += 1
        return Record("id-%d" % self.count, slot, partition_key=partition_key,
                      explicit_hash_key=hash_key)

    async def put(self, data: bytes, **keys: Any) -> Tuple[str, Any]:
        """Put a record as the server does: ``("ok", extra)`` or ``("refused", error)``.

        On a refusal the slot is released here, as the server does.
        """
        from sinks.errors import SinkUnavailable

        record = self.record(data, **keys)
        try:
            return "ok", await self.sink.put(record)
        except SinkUnavailable as exc:
            self.ring.release(record.slot)
            return "refused", exc
        except BaseException:
            self.ring.release(record.slot)
            raise

    @property
    def ring_empty(self) -> bool:
        return self.ring.used == 0 and self.ring.live == 0


@contextlib.asynccontextmanager
async def running_sink(harness: SinkHarness) -> Any:
    """Run the harness's sink for the body of the ``async with``, then close it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(harness.sink.run)
        try:
            yield harness.sink
        finally:
            with trio.CancelScope(shield=True):
                await harness.sink.aclose()


async def put_all(harness: SinkHarness, datas: List[bytes], **keys: Any) -> List[Tuple[str, Any]]:
    """Put every record concurrently (as concurrent clients would); outcomes in ``datas`` order."""
    out: List[Tuple[str, Any]] = [("", None)] * len(datas)

    async def one(index: int, data: bytes) -> None:
        out[index] = await harness.put(data, **keys)

    async with trio.open_nursery() as nursery:
        for index, data in enumerate(datas):
            nursery.start_soon(one, index, data)
            # Let it queue its record before the next one starts: arrival order.
            await trio.testing.wait_all_tasks_blocked()
    return out
