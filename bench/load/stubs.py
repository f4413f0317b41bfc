"""Small loopback servers the harness runs as children: ``python -m bench.load.stubs KIND --port P``.

* ``kinesis``: a Kinesis-compatible endpoint that checks the PutRecords limits
  (500 records, 5 MiB per request, 1 MiB per record data + partition key),
  discards the data and answers success for every record.  Records are found
  by scanning the body for ``"Data":"`` rather than parsing the JSON, so the
  endpoint stays cheap at gigabytes per second of base64.  It answers
  ``DescribeStreamSummary`` with an active one-shard stream.
* ``discard``: any request's body is read and dropped, answer ``202``; the
  stand-in peer for the harness's own tests (needs nothing but the standard
  library).

Both print their port on stdout once listening, then serve until SIGTERM.
"""
from __future__ import annotations

import argparse
import http.server
import json
import signal
import sys
import threading
from typing import Optional, Tuple

__all__ = ["main", "check_put_records"]

MIB = 1024 * 1024
MAX_RECORDS = 500
MAX_REQUEST = 5 * MIB
MAX_RECORD = 1 * MIB
_ENTRY = (b'{"SequenceNumber":"49590338271490256608559692538361571095921575989136588898",'
          b'"ShardId":"shardId-000000000000"}')


def check_put_records(body: bytes) -> Tuple[int, Optional[str]]:
    """``(records, error)`` for a PutRecords body: the limits only, no JSON parse."""
    if len(body) > MAX_REQUEST * 4 // 3 + 64 * 1024:  # base64 and JSON framing around 5 MiB
        return 0, "request over 5 MiB"
    count, pos, total = 0, 0, 0
    while count <= MAX_RECORDS:
        # botocore (and Sluice) write '"Data": "'; other encoders drop the space.
        key = body.find(b'"Data":', pos)
        if key < 0:
            break
        start = body.find(b'"', key + 7)
        end = body.find(b'"', start + 1) if start >= 0 else -1
        if end < 0:
            return count, "unterminated Data"
        size = (end - start - 1) * 3 // 4
        if size > MAX_RECORD:
            return count, "record over 1 MiB"
        total += size
        if total > MAX_REQUEST:
            return count, "request over 5 MiB of records"
        count += 1
        pos = end + 1
    if count > MAX_RECORDS or count == 0:
        return count, "records: %d (1 to 500 allowed)" % count
    return count, None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kind = "discard"
    # The answer's head and body go out in two writes: with Nagle's algorithm
    # the body waited for the client's delayed ACK, 40 ms on every call.
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(length)
        if self.kind == "discard":
            self._answer(202, b"")
            return
        target = self.headers.get("X-Amz-Target", "")
        if target.endswith(".DescribeStreamSummary"):
            name = json.loads(data).get("StreamName")
            self._answer(200, json.dumps({"StreamDescriptionSummary": {
                "StreamName": name, "StreamStatus": "ACTIVE", "OpenShardCount": 1}}).encode())
            return
        if not target.endswith(".PutRecords"):
            self._answer(400, b'{"__type":"UnknownOperationException"}')
            return
        count, error = check_put_records(data)
        if error:
            self._answer(400, json.dumps({"__type": "ValidationException", "message": error}).encode())
            return
        self.server.records += count  # type: ignore[attr-defined]
        self._answer(200, b'{"FailedRecordCount":0,"Records":[' + b",".join([_ENTRY] * count) + b"]}")

    do_PUT = do_POST  # noqa: N815

    def _answer(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load.stubs")
    parser.add_argument("kind", choices=("kinesis", "discard"))
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    handler = type("Handler", (_Handler,), {"kind": args.kind})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    server.daemon_threads = True
    server.records = 0  # type: ignore[attr-defined]
    stopping = threading.Event()

    def stop(*_: object) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()
        print(json.dumps({"records": server.records}), file=sys.stderr)  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
