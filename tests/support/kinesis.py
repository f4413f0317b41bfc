"""Kinesis-compatible servers for tests: a scriptable fake, and moto with IAM auth.

:class:`FakeStreams` is a Kinesis Data Streams and Firehose stand-in without
I/O: ``handle(target, body)`` validates a PutRecords / PutRecordBatch call as
the services do (500 records, bytes per record with the partition key, bytes
per request, key length), stores what it accepts, and answers.  Faults are
scripted: :meth:`FakeStreams.plan` queues what the next calls get (an error
status, a reset connection, a slow answer), and ``fail_record`` picks
entries to fail inside a 200 answer.  Every call is logged in ``calls``.

It is served two ways: :func:`memory_endpoint` (the sink's in-memory edge,
no sockets) and :class:`FaultServer` (a threaded HTTP/1.1 server on a free
loopback port, for botocore's signing and HTTP stack).

:class:`MotoServer` runs moto's server mode in a child process of a CPython
that can import moto (``SLUICE_MOTO_PYTHON``, else this interpreter, else a
``python3`` on PATH), with IAM authentication on, so a wrong signature is a
403.

Fixtures (import the ``*_fixture`` functions; tests name them without the
suffix): ``moto`` (session scope; each test makes its own streams),
``fault_server`` (a FaultServer), ``aws_env`` (botocore's chain sees only
the given key, secret and region).
"""
from __future__ import annotations

import base64
import collections
import contextlib
import datetime
import http.server
import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

import pytest
import trio

from sinks.aws.http import MemoryEndpoint, Reply

__all__ = [
    "Stored",
    "Call",
    "Plan",
    "FakeStreams",
    "memory_endpoint",
    "FaultServer",
    "fault_server_fixture",
    "moto_python",
    "MotoServer",
    "moto_fixture",
    "aws_env_fixture",
    "read_stream",
]

MIB = 1024 * 1024
SHARD = "shardId-%012d"


@dataclass
class Stored:
    """A record the fake accepted."""

    stream: str
    data: bytes
    partition_key: Optional[str]
    hash_key: Optional[str]
    shard_id: str
    sequence_number: str
    record_id: str


@dataclass
class Call:
    """One call the fake received: the records' data in request order, and what it answered."""

    target: str
    datas: List[bytes]
    status: int = 200
    failed: List[int] = field(default_factory=list)
    fault: str = ""


@dataclass
class Plan:
    """What one upcoming call gets.

    ``kind``: ``"status"`` (answer ``status`` with error ``code``, store
    nothing), ``"reset"`` (close the connection without an answer), ``"slow"``
    (store as usual, answer after ``delay`` seconds), ``"hang"`` (store
    nothing, answer nothing for ``delay`` seconds, then reset).
    """

    kind: str
    status: int = 500
    code: str = "InternalFailure"
    delay: float = 0.0


class FakeStreams:
    """A scriptable Kinesis/Firehose: PutRecords, PutRecordBatch, DescribeStreamSummary."""

    def __init__(self, *, streams=("logs",), shards: int = 2, max_record_bytes: int = 1 * MIB,
                 max_request_bytes: int = 5 * MIB, max_record_size_kib: Optional[int] = None) -> None:
        self.streams = set(streams)
        self.shards = shards
        self.max_record_bytes = max_record_bytes
        self.max_request_bytes = max_request_bytes
        self.max_record_size_kib = max_record_size_kib
        self.stored: List[Stored] = []
        self.calls: List[Call] = []
        self.plans: Deque[Plan] = collections.deque()
        #: ``fail_record(data, attempt)`` -> an error code to fail that entry with, or None.
        self.fail_record: Optional[Callable[[bytes, int], Optional[str]]] = None
        self.attempts: Dict[bytes, int] = collections.defaultdict(int)
        self.lock = threading.Lock()
        self._sequence = 0

    def plan(self, *plans: Plan) -> None:
        with self.lock:
            self.plans.extend(plans)

    def stored_datas(self) -> List[bytes]:
        with self.lock:
            return [s.data for s in self.stored]

    # -- the service -------------------------------------------------------

    def handle(self, target: str, body: bytes) -> Tuple[str, int, bytes, float]:
        """``(action, status, body, delay)``; action is ``"answer"`` or ``"reset"``."""
        with self.lock:
            # Plans are for the puts; DescribeStreamSummary at start is answered plainly.
            describe = target.endswith(".DescribeStreamSummary")
            plan = self.plans.popleft() if self.plans and not describe else None
            if plan is not None and plan.kind in ("status", "reset", "hang"):
                self.calls.append(Call(target, self._datas(body), fault=plan.kind,
                                       status=plan.status if plan.kind == "status" else 0))
                if plan.kind == "status":
                    return "answer", plan.status, _error(plan.code, "injected"), 0.0
                return "reset", 0, b"", plan.delay
            status, answer = self._dispatch(target, body)
            return "answer", status, answer, plan.delay if plan is not None else 0.0

    def _datas(self, body: bytes) -> List[bytes]:
        try:
            return [base64.b64decode(r["Data"]) for r in json.loads(body)["Records"]]
        except (ValueError, KeyError, TypeError):
            return []

    def _dispatch(self, target: str, body: bytes) -> Tuple[int, bytes]:
        try:
            doc = json.loads(body)
        except ValueError:
            return 400, _error("SerializationException", "body is not JSON")
        if target == "Kinesis_20131202.PutRecords":
            return self._put(target, doc, doc.get("StreamName"), kinesis=True)
        if target == "Firehose_20150804.PutRecordBatch":
            return self._put(target, doc, doc.get("DeliveryStreamName"), kinesis=False)
        if target == "Kinesis_20131202.DescribeStreamSummary":
            name = doc.get("StreamName")
            if name not in self.streams:
                return 400, _error("ResourceNotFoundException", "Stream %s not found" % name)
            summary: Dict[str, Any] = {"StreamName": name, "StreamStatus": "ACTIVE",
                                       "OpenShardCount": self.shards}
            if self.max_record_size_kib is not None:
                summary["MaxRecordSizeInKiB"] = self.max_record_size_kib
            return 200, json.dumps({"StreamDescriptionSummary": summary}).encode()
        return 400, _error("UnknownOperationException", target)

    def _put(self, target: str, doc: dict, stream: Optional[str], kinesis: bool) -> Tuple[int, bytes]:
        records = doc.get("Records")
        if not isinstance(records, list) or not 1 <= len(records) <= 500:
            return 400, _error("ValidationException", "1 to 500 records per request")
        if stream not in self.streams:
            return 400, _error("ResourceNotFoundException", "Stream %s not found" % stream)
        entries = []
        total = 0
        # With MaxRecordSizeInKiB set, a record over it fails alone, as Kinesis answers it.
        stream_limit = self.max_record_size_kib * 1024 if kinesis and self.max_record_size_kib else None
        oversized: Dict[int, int] = {}
        for record in records:
            data = base64.b64decode(record["Data"], validate=True)
            key = record.get("PartitionKey") if kinesis else None
            if kinesis and (not isinstance(key, str) or not 1 <= len(key) <= 256):
                return 400, _error("ValidationException", "bad partition key")
            size = len(data) + (len(key.encode()) if key else 0)
            if stream_limit is not None:
                if size > stream_limit:
                    oversized[len(entries)] = size
            elif size > self.max_record_bytes:
                return 400, _error("ValidationException", "record of %d bytes too large" % size)
            total += size
            entries.append((data, key, record.get("ExplicitHashKey")))
        if total > self.max_request_bytes:
            return 400, _error("ValidationException", "request of %d bytes too large" % total)
        call = Call(target, [e[0] for e in entries])
        results = []
        for index, (data, key, hash_key) in enumerate(entries):
            self.attempts[data] += 1
            code = self.fail_record(data, self.attempts[data]) if self.fail_record else None
            if index in oversized:
                call.failed.append(index)
                results.append({"ErrorCode": "InvalidArgumentException",
                                "ErrorMessage": "Record data size %d exceeds the stream's max record "
                                                "size of %d bytes" % (oversized[index], stream_limit)})
                continue
            if code is not None:
                call.failed.append(index)
                results.append({"ErrorCode": code, "ErrorMessage": "injected"})
                continue
            self._sequence += 1
            shard = SHARD % (self._sequence % self.shards)
            stored = Stored(stream, data, key, hash_key, shard, "%056d" % self._sequence,
                            "rec-%d" % self._sequence)
            self.stored.append(stored)
            if kinesis:
                results.append({"SequenceNumber": stored.sequence_number, "ShardId": shard})
            else:
                results.append({"RecordId": stored.record_id})
        self.calls.append(call)
        if kinesis:
            answer = {"FailedRecordCount": len(call.failed), "Records": results}
        else:
            answer = {"FailedPutCount": len(call.failed), "Encrypted": False, "RequestResponses": results}
        return 200, json.dumps(answer).encode()


def _error(code: str, message: str) -> bytes:
    return json.dumps({"__type": code, "message": message}).encode()


def memory_endpoint(fake: FakeStreams) -> MemoryEndpoint:
    """The sink's in-memory edge over ``fake``; "reset" and "hang" plans raise after their delay."""
    from sinks.aws.errors import TransientError

    async def handle(target: str, body: Any) -> Reply:
        action, status, answer, delay = fake.handle(target, bytes(body))
        if delay:
            await trio.sleep(delay)
        if action == "reset":
            raise TransientError("ConnectionClosedError", "connection reset (injected)")
        return Reply(status, answer)

    return MemoryEndpoint(handle)


# -- over HTTP -----------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FaultHTTPServer

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self.server.requests.append(dict(self.headers.items()))
        if not (self.headers.get("Authorization") or "").startswith("AWS4-HMAC-SHA256 "):
            self._answer(403, _error("MissingAuthenticationTokenException", "not signed"))
            return
        action, status, answer, delay = self.server.fake.handle(self.headers.get("X-Amz-Target", ""), body)
        if delay and self.server.stopping.wait(delay):
            action = "reset"
        if action == "reset":
            # An RST instead of an answer: SO_LINGER 0, then close.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        self._answer(status, answer)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _FaultHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeStreams) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake
        self.stopping = threading.Event()
        self.requests: List[Dict[str, str]] = []

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # resets and clients that gave up


class FaultServer:
    """:class:`FakeStreams` behind a threaded HTTP/1.1 server on a free loopback port."""

    def __init__(self, fake: Optional[FakeStreams] = None) -> None:
        self.fake = fake or FakeStreams()
        self._server = _FaultHTTPServer(self.fake)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-server",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self._server.server_address[1]

    @property
    def requests(self) -> List[Dict[str, str]]:
        """The headers of every request received."""
        return self._server.requests

    def stop(self) -> None:
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@pytest.fixture(name="fault_server")
def fault_server_fixture() -> Iterator[FaultServer]:
    server = FaultServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="aws_env")
def aws_env_fixture(monkeypatch) -> Callable[..., None]:
    """``aws_env(key, secret, region="us-east-1")``: botocore's chain sees only these."""

    def set_env(key: str = "testing", secret: str = "testing", region: str = "us-east-1") -> None:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        monkeypatch.setenv("AWS_DEFAULT_REGION", region)
        monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    return set_env


# -- moto ----------------------------------------------------------------------

_MOTO_SCRIPT = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
server.stop()
"""

#: IAM calls made before authentication starts: CreateUser, PutUserPolicy, CreateAccessKey.
_SETUP_ACTIONS = 3


def moto_python() -> Optional[str]:
    """An interpreter that can run moto's server, or None."""
    given = os.environ.get("SLUICE_MOTO_PYTHON")
    if given:
        return given
    if importlib.util.find_spec("moto") is not None:
        return sys.executable
    for name in ("python3", "python3.11", "python3.12", "python3.10", "python3.9"):
        path = shutil.which(name)
        if path and subprocess.run([path, "-c", "import moto.server"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL).returncode == 0:
            return path
    return None


class MotoServer:
    """moto's server mode in a child process, with IAM auth on and one allowed user."""

    def __init__(self, python: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SLUICE_"))}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_SETUP_ACTIONS)
        env["MOTO_ALLOW_NONEXISTENT_REGION"] = "true"
        # moto logs every request to stderr: keep it in a file, shown if it fails to start.
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([python, "-c", _MOTO_SCRIPT], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, env=env)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            self._log.seek(0)
            raise RuntimeError("moto did not start with %s:\n%s" % (
                python, self._log.read()[-4000:].decode("utf-8", "replace")))
        self.url = "http://127.0.0.1:%d" % int(line)
        self.region = "us-east-1"
        self.key, self.secret = self._make_user()

    def _make_user(self) -> Tuple[str, str]:
        iam = self.client("iam", "setup", "setup")
        iam.create_user(UserName="sluice")
        iam.put_user_policy(UserName="sluice", PolicyName="all", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }))
        created = iam.create_access_key(UserName="sluice")["AccessKey"]
        return created["AccessKeyId"], created["SecretAccessKey"]

    def client(self, service: str, key: Optional[str] = None, secret: Optional[str] = None) -> Any:
        """A botocore client of this server, signing with the allowed user's key by default."""
        import botocore.config
        import botocore.session

        session = botocore.session.Session()
        return session.create_client(
            service, region_name=self.region, endpoint_url=self.url,
            aws_access_key_id=key or self.key, aws_secret_access_key=secret or self.secret,
            config=botocore.config.Config(retries={"max_attempts": 1}))

    def stop(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        self._log.close()


@pytest.fixture(name="moto", scope="session")
def moto_fixture() -> Iterator[MotoServer]:
    python = moto_python()
    if python is None:
        message = ("moto is not importable here; set SLUICE_MOTO_PYTHON to a CPython "
                   "that has moto[server] installed")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = MotoServer(python)
    try:
        yield server
    finally:
        server.stop()


def read_stream(client: Any, stream: str) -> List[Dict[str, Any]]:
    """Every record of ``stream`` (all shards, oldest first per shard) via GetShardIterator/GetRecords."""
    out: List[Dict[str, Any]] = []
    shards = client.list_shards(StreamName=stream)["Shards"]
    for shard in shards:
        iterator = client.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                             ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while iterator:
            page = client.get_records(ShardIterator=iterator, Limit=10000)
            for record in page["Records"]:
                record["ShardId"] = shard["ShardId"]
                out.append(record)
            if not page["Records"]:
                break
            iterator = page.get("NextShardIterator")
    return out


class CredentialsSession:
    """Just what the sinks' endpoints ask of a botocore session: credentials
    (``asked`` counts how often)."""

    def __init__(self, credentials: Any) -> None:
        self.credentials = credentials
        self.asked = 0

    def get_credentials(self) -> Any:
        self.asked += 1
        return self.credentials


def expiring_credentials(refresh: Callable[[], Dict[str, str]]) -> Any:
    """botocore refreshable credentials a minute from expiry, renewed by ``refresh``."""
    from botocore.credentials import RefreshableCredentials

    soon = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=1)).isoformat()
    return RefreshableCredentials.create_from_metadata(
        {"access_key": "old", "secret_key": "old", "token": "t", "expiry_time": soon},
        refresh_using=refresh, method="test")
