"""Shared parts of the bad-input tests (tests/test_bad_input.py): a gateway with
short time limits, a well-behaved client on another connection, and checks of
error answers (JSON, or OTLP's google.rpc.Status)."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, AsyncIterator, Dict, List, NamedTuple, Optional, Sequence, Tuple

import pytest

from gateway import errors
from tests.support.gateway import RawConnection, Response, gateway_in_process, post_request
from tests.support.units import make_gateway

__all__ = ["KiB", "MAX_BODY", "FLAGS", "ENGINE", "WAIT", "CLOSE", "REASONS", "Neighbour", "engine",
           "engine_gateway", "Running", "running", "assert_error", "response_ids"]

KiB = 1024
MAX_BODY = 64 * KiB
#: Short time limits, so slow-drip cases end within a second.
HEAD_TIMEOUT = 0.4
BODY_TIMEOUT = 0.4
IDLE_TIMEOUT = 0.6
SEND_TIMEOUT = 0.5
FLAGS = ["--max-body", "64KiB", "--ring-size", "1MiB", "--head-timeout", "%gs" % HEAD_TIMEOUT,
         "--body-timeout", "%gs" % BODY_TIMEOUT, "--idle-timeout", "%gs" % IDLE_TIMEOUT,
         "--send-timeout", "%gs" % SEND_TIMEOUT]
#: The head engine of the case being run (``--http``); set by :func:`engine`.
ENGINE = {"http": "auto"}
#: Seconds a test waits for something that a working gateway does at once.
WAIT = 10.0
#: The connection was closed without an answer (after the good records' answers).
CLOSE = "close"
REASONS = {cls.status: cls.reason for cls in (
    errors.BadRequest, errors.Unauthorized, errors.RequestTimeout, errors.LengthRequired,
    errors.PayloadTooLarge, errors.HeadersTooLarge, errors.NotImplementedFraming,
    errors.VersionNotSupported, errors.Overloaded, errors.NotFound, errors.MethodNotAllowed,
    errors.UnsupportedMediaType)}


# -- the well-behaved neighbour ----------------------------------------------------------


class Neighbour(threading.Thread):
    """A client on its own keep-alive connection, posting a record every few ms."""

    def __init__(self, address: Tuple[str, int], headers: Sequence[Tuple[str, str]] = (), *,
                 reconnect: bool = False) -> None:
        super().__init__(name="neighbour", daemon=True)
        self.address = address
        #: Open a new connection when the gateway closed the kept-alive one
        #: between two requests (evicted to admit another); how many times.
        self.reconnect = reconnect
        self.reconnected = 0
        self.headers = list(headers)
        self.ids: List[str] = []
        self.bodies: Dict[str, bytes] = {}
        self.failures: List[object] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            conn = RawConnection(self.address)
            try:
                n = 0
                while not self._stop_event.wait(0.005):
                    body = b"neighbour %d" % n
                    n += 1
                    conn.send(post_request(body, headers=self.headers))
                    try:
                        response = conn.read_response()
                    except (AssertionError, ConnectionResetError):
                        if not self.reconnect or conn.received:
                            raise
                        # Closed before this request was read: nothing was
                        # accepted, so sending it again makes no duplicate.
                        self.reconnected += 1
                        conn.close()
                        conn = RawConnection(self.address)
                        conn.send(post_request(body, headers=self.headers))
                        response = conn.read_response()
                    if response.status != 202:
                        self.failures.append(response)
                        return
                    record_id = response.json()["id"]
                    self.ids.append(record_id)
                    self.bodies[record_id] = body
            finally:
                conn.close()
        except Exception as exc:  # reported by finish()
            self.failures.append(exc)

    def wait_for_more(self, count: int = 2) -> None:
        """Wait until ``count`` more records were accepted (the gateway still serves others)."""
        target = len(self.ids) + count
        deadline = time.monotonic() + WAIT
        while len(self.ids) < target and not self.failures:
            assert time.monotonic() < deadline, "the well-behaved client stalled"
            time.sleep(0.005)
        assert not self.failures, self.failures

    def finish(self) -> None:
        self._stop_event.set()
        self.join(WAIT)
        assert not self.failures, self.failures
        assert self.ids, "the well-behaved client was never answered"


@pytest.fixture(autouse=True, params=["auto", "h11"])
def engine(request):
    """Run each test with ``--http auto`` and with ``--http h11``."""
    ENGINE["http"] = request.param
    yield request.param
    ENGINE["http"] = "auto"


def engine_gateway(*flags: str):
    """A gateway in memory (tests.support.units) with the head engine of the test being run."""
    return make_gateway(*flags, "--http", ENGINE["http"])


class Running(NamedTuple):
    gateway: Any
    address: Tuple[str, int]
    data_dir: str


@contextlib.asynccontextmanager
async def running(tmp_path, *flags: str, send_buffer: Optional[int] = None) -> AsyncIterator[Running]:
    """A gateway in this process (file sink); after it drained, no internal error."""
    data_dir = str(tmp_path / "data")
    async with gateway_in_process(FLAGS + list(flags) + ["--http", ENGINE["http"]], data_dir=data_dir,
                                  send_buffer=send_buffer) as (gateway, port):
        yield Running(gateway, ("127.0.0.1", port), data_dir)
    stats = gateway.statistics()
    assert stats["internal_errors"] == 0
    # Drained: every slot, of stored and of refused records alike, came back.
    assert stats["ring"]["live_slots"] == 0 and stats["ring"]["used"] == 0, stats["ring"]


def assert_error(response: Response, status: int, otlp_encoding: Optional[str] = None) -> None:
    assert response.status == status, (response.status, response.body)
    assert response.header("connection") == "close"
    if otlp_encoding is not None:
        _assert_otlp_status(response, otlp_encoding)
        return
    assert response.header("content-type") == "application/json"
    assert response.json()["error"] == REASONS[status], response.body


def _protobuf_status(body: bytes) -> Tuple[int, str]:
    """``(code, message)`` of a binary google.rpc.Status: field 1 varint, field 2 string."""
    code, message, at = 0, "", 0
    while at < len(body):
        tag = body[at]
        at += 1
        value = shift = 0
        while True:  # a varint: the code, or the message's length
            byte = body[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        if tag == 0x08:
            code = value
        else:
            assert tag == 0x12, body
            message = body[at:at + value].decode("utf-8")
            at += value
    return code, message


def _assert_otlp_status(response: Response, encoding: str) -> None:
    """An OTLP/HTTP failure: a google.rpc.Status with a code and a message, in ``encoding``."""
    if encoding == "protobuf":
        assert response.header("content-type") == "application/x-protobuf"
        code, message = _protobuf_status(response.body)
    else:
        assert response.header("content-type") == "application/json"
        doc = response.json()
        code, message = doc["code"], doc["message"]
    assert code > 0 and message, response.body


def response_ids(responses: Sequence[Response]) -> List[str]:
    """The record ids of ``202`` answers (asserting each is one)."""
    ids = []
    for response in responses:
        assert response.status == 202, (response.status, response.body)
        ids.append(response.json()["id"])
    return ids
