"""A Kinesis-compatible endpoint that remembers which records it stored, and can go away.

It answers PutRecords (every record stored) and DescribeStreamSummary, in
threads of this process.  Each stored record's envelope id and the
sequence number the load client wrote at the start of its body are
counted, so the run can tell lost records from duplicated ones.

:meth:`RecordingEndpoint.down` makes it unreachable: the listening socket
is closed (new connections are refused) and a request arriving on a
connection opened before gets a TCP reset instead of an answer.
:meth:`RecordingEndpoint.up` listens again on the same port.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import http.server
import json
import socket
import struct
import threading
from typing import Counter, Dict, Optional, Tuple

__all__ = ["RecordingEndpoint", "sequence_of"]

#: Records per PutRecords call, as the service allows.
MAX_RECORDS = 500
_ENTRY = '{"SequenceNumber":"%056d","ShardId":"shardId-000000000000"}'


def sequence_of(body: bytes, prefix: bytes) -> Optional[int]:
    """The sequence number a body from the load client starts with (``PREFIX N ...``), else None."""
    if not body.startswith(prefix):
        return None
    end = body.find(b" ", len(prefix))
    digits = body[len(prefix):end if end >= 0 else len(body)]
    return int(digits) if digits.isdigit() else None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        owner = self.server.owner
        if owner.is_down:
            # Unreachable: a reset, as a network or a dead host would give.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        target = self.headers.get("X-Amz-Target", "")
        try:
            doc = json.loads(data)
        except ValueError:
            self._answer(400, {"__type": "SerializationException", "message": "not JSON"})
            return
        if target.endswith(".DescribeStreamSummary"):
            self._answer(200, {"StreamDescriptionSummary": {
                "StreamName": doc.get("StreamName"), "StreamStatus": "ACTIVE", "OpenShardCount": 1}})
            return
        if not target.endswith(".PutRecords"):
            self._answer(400, {"__type": "UnknownOperationException", "message": target})
            return
        records = doc.get("Records") or []
        if not 1 <= len(records) <= MAX_RECORDS:
            self._answer(400, {"__type": "ValidationException", "message": "1 to 500 records"})
            return
        first = owner.store([base64.b64decode(r["Data"]) for r in records])
        entries = ",".join(_ENTRY % (first + n) for n in range(len(records)))
        self._send(200, ('{"FailedRecordCount":0,"Records":[%s]}' % entries).encode())

    def _answer(self, status: int, doc: dict) -> None:
        self._send(status, json.dumps(doc).encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, owner: RecordingEndpoint) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.owner = owner

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # resets


class RecordingEndpoint:
    """The endpoint; see the module docstring.  ``prefix`` starts every body of the load client."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        #: Copies stored per sequence number, and the envelope id of each.
        self.copies: Counter[int] = collections.Counter()
        self.ids: Dict[int, str] = {}
        self.foreign = 0  # records without a sequence number (none expected)
        self.calls = 0
        self.is_down = False
        self.port = 0
        self._stored = 0
        self._lock = threading.Lock()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self.up()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.port

    def store(self, datas) -> int:
        """Count ``datas`` as stored; the first sequence number given to them."""
        with self._lock:
            self.calls += 1
            first = self._stored + 1
            self._stored += len(datas)
            for data in datas:
                meta, _, body = data.partition(b"\n")
                sequence = sequence_of(body, self.prefix)
                if sequence is None:
                    self.foreign += 1
                    continue
                self.copies[sequence] += 1
                self.ids.setdefault(sequence, json.loads(meta)["id"])
        return first

    def snapshot(self) -> Tuple[Counter[int], Dict[int, str]]:
        with self._lock:
            return collections.Counter(self.copies), dict(self.ids)

    def up(self) -> None:
        if self._server is not None:
            return
        self._server = _Server(self.port, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="recording-endpoint", daemon=True)
        self.is_down = False
        self._thread.start()

    def down(self) -> None:
        self.is_down = True
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def stop(self) -> None:
        self.down()
