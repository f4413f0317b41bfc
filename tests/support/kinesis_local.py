"""kinesis-local (kinesis-mock on Node.js): a Kinesis that knows MaxRecordSizeInKiB.

moto does not know a stream's own record limit (it checks 1 MiB per record,
5 MiB per request); kinesis-local 0.6.2 keeps ``MaxRecordSizeInKiB`` from
``CreateStream`` and ``UpdateMaxRecordSize``, reports it in
``DescribeStreamSummary`` and refuses larger records per record with
``InvalidArgumentException``.  It is slow (seconds per megabyte), so few
tests use it.

Found as ``.npm-tools/node_modules/kinesis-local`` in the checkout (``./dev
test`` installs it there) or as ``kinesis-local`` on PATH; run with ``node``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import Any, Iterator, Optional

import pytest

__all__ = ["KinesisLocal", "kinesis_local_fixture", "kinesis_local_main"]

#: The version the tests were written against (see the ``dev`` script).
KINESIS_LOCAL_VERSION = "0.6.2"
#: How long the server may take to listen: about 1.5 s here, much more on a
#: loaded machine (it is one large JavaScript file to compile).
START_TIMEOUT = 120.0

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def kinesis_local_main() -> Optional[str]:
    """The path of kinesis-local's ``main.js``, or None when it is not installed."""
    local = os.path.join(_ROOT, ".npm-tools", "node_modules", "kinesis-local", "main.js")
    if os.path.exists(local):
        return local
    found = shutil.which("kinesis-local")
    if found is not None:
        return os.path.realpath(found)
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class KinesisLocal:
    """A kinesis-local process on a free loopback port (plain HTTP)."""

    region = "us-east-1"
    key = "testing"
    secret = "testing"

    def __init__(self, main: str, node: str) -> None:
        self.port = _free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        env = dict(os.environ,
                   KINESIS_MOCK_PLAIN_PORT=str(self.port),
                   KINESIS_MOCK_TLS_PORT=str(_free_port()),
                   # The self-signed certificate it serves TLS with, beside main.js.
                   KINESIS_MOCK_CERT_PATH=os.path.join(os.path.dirname(main), "server.json"),
                   CREATE_STREAM_DURATION="0ms",
                   AWS_REGION=self.region,
                   LOG_LEVEL="WARN",
                   SHOULD_PERSIST_DATA="false")
        self.process = subprocess.Popen([node, main], env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("kinesis-local exited with %s" % self.process.returncode)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("kinesis-local did not listen within %gs" % START_TIMEOUT) from None
                time.sleep(0.1)

    def client(self) -> Any:
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "kinesis", region_name=self.region, endpoint_url=self.url, aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
            # A 10 MiB PutRecords or GetRecords takes it tens of seconds.
            config=botocore.config.Config(read_timeout=300, retries={"max_attempts": 1}))

    def create_stream(self, name: str, max_record_kib: int) -> None:
        client = self.client()
        client.create_stream(StreamName=name, ShardCount=1, MaxRecordSizeInKiB=max_record_kib)
        deadline = time.monotonic() + START_TIMEOUT
        while client.describe_stream_summary(StreamName=name)[
                "StreamDescriptionSummary"]["StreamStatus"] != "ACTIVE":
            if time.monotonic() > deadline:
                raise RuntimeError("stream %s not active" % name)
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(name="kinesis_local", scope="module")
def kinesis_local_fixture() -> Iterator[KinesisLocal]:
    """One server for a test file's few tests."""
    main = kinesis_local_main()
    node = shutil.which("node")
    if main is None or node is None:
        message = ("kinesis-local %s is not installed (./dev test installs it with npm into "
                   ".npm-tools/) or node is missing" % KINESIS_LOCAL_VERSION)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = KinesisLocal(main, node)
    try:
        yield server
    finally:
        server.stop()
