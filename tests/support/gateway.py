"""A real gateway for integration tests: a ``sluice serve`` child, or one in this process.

:class:`GatewayProcess` runs ``python -m gateway serve --listen 127.0.0.1:0``
on the interpreter running the tests, reads its ``started`` event (a JSON
line on stderr with ``"url": "http://HOST:PORT"``) to learn the port, and stops it with
SIGTERM (then SIGKILL if it does not exit in time).  Use it as a context
manager (:func:`running_gateway`) or through the fixtures below; either way the
process is stopped when the test ends, pass or fail.  SLUICE_* variables of the
environment running the tests are not passed on, so only what a test sets
reaches the gateway; ``SLUICE_WORKERS=1`` is set (one process, no supervisor)
unless the test gives ``--workers`` or its own ``SLUICE_WORKERS``.

:func:`gateway_in_process` runs :meth:`gateway.server.Gateway.serve` in a Trio
nursery instead, for tests that look at :meth:`Gateway.statistics`; clients
then run in threads (``trio.to_thread.run_sync``) or other processes.

Fixtures to import into a test module or a conftest: ``gateway_process`` (a
gateway with default settings and its own data directory) and
``start_gateway`` (a factory taking extra flags; everything it started is
stopped at teardown).

Clients: :class:`RawConnection` writes literal bytes (:func:`post_request`,
:func:`get_request`, :func:`chunked_request`) on a socket and parses the
answers itself (Content-Length framing only, which is all the gateway sends),
so tests see exactly what went over the wire, including how the connection
ended (EOF or reset).  :func:`curl` runs the real curl, :func:`http_post` the
standard library's client.  :func:`stored` and :func:`wait_for_records` read
back what the file sink stored.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import (
    AsyncIterator,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
)

import pytest
import trio

from gateway.config.settings import from_args
from gateway.server import Gateway, open_listener
from sinks.file import read_records

__all__ = [
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "GatewayStartError",
    "GatewayProcess",
    "log_events",
    "running_gateway",
    "gateway_in_process",
    "gateway_process",
    "start_gateway",
    "Response",
    "RawConnection",
    "post_request",
    "get_request",
    "chunked_request",
    "CurlTransfer",
    "curl",
    "curl_post",
    "http_post",
    "stored",
    "wait_for_records",
]

#: Seconds for the listening line to appear.  Startup takes well under a
#: second on CPython and about a second on a cold PyPy; a loaded CI machine
#: gets ample slack.
START_TIMEOUT = 30.0
CURL = shutil.which("curl") or "/usr/bin/curl"
#: Seconds a client waits for an answer before the test fails.  Only reached
#: when something is wrong; nothing here measures speed.
CLIENT_TIMEOUT = 15.0
#: Seconds to wait for accepted records to reach the file sink's segments
#: (it writes every --flush-interval, 50ms by default).
STORE_TIMEOUT = 15.0
#: Seconds a SIGTERM'd gateway may take to exit before it is killed.  Longer
#: than any --shutdown-timeout a test sets.
STOP_TIMEOUT = 30.0

_URL = re.compile(r"^https?://(\[[^\]]*\]|[^:/]+):(\d+)$")


def log_events(text: str, event: Optional[str] = None) -> List[dict]:
    """The JSON events in ``text`` (a gateway's stderr), or only those named ``event``.

    A line that is not a JSON object fails the test: every line the gateway
    writes while serving is an event.
    """
    found = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            raise AssertionError("not a JSON event: %r" % line) from None
        assert isinstance(doc, dict) and {"ts", "level", "event"} <= doc.keys(), line
        if event is None or doc["event"] == event:
            found.append(doc)
    return found


def _started_address(line: str) -> Optional[Tuple[str, int]]:
    """``(host, port)`` if ``line`` is the gateway's ``started`` event."""
    if '"started"' not in line:
        return None
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    match = _URL.match(doc.get("url", "")) if doc.get("event") == "started" else None
    if match is None:
        return None
    return match.group(1).strip("[]"), int(match.group(2))


class GatewayStartError(RuntimeError):
    """The gateway exited, or never said where it listens."""


class GatewayProcess:
    """One ``sluice serve`` child process on a loopback port it picked itself."""

    def __init__(self, args: Sequence[str] = (), *, data_dir: Optional[str] = None,
                 env: Optional[Mapping[str, str]] = None, listen: str = "127.0.0.1:0",
                 python: str = sys.executable, fd_limit: Optional[int] = None) -> None:
        self.args = list(args)
        self.fd_limit = fd_limit
        self.data_dir = data_dir
        self.command = [python, "-m", "gateway", "serve", "--listen", listen]
        if data_dir is not None:
            self.command += ["--data-dir", data_dir]
        self.command += self.args
        self.env: Dict[str, str] = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        # One process unless a test asks for workers (--workers defaults to one per CPU).
        self.env["SLUICE_WORKERS"] = "1"
        # The process's own temporary files (a supervisor's metrics
        # directory) go here and are removed at stop, even after a SIGKILL.
        self._tmpdir = tempfile.mkdtemp(prefix="sluice-test-")
        self.env["TMPDIR"] = self._tmpdir
        self.env.update(env or {})
        self.host = ""
        self.port = 0
        self.returncode: Optional[int] = None
        self._proc: Optional[subprocess.Popen] = None
        self._lines: List[str] = []
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._reader: Optional[threading.Thread] = None

    # -- lifecycle -------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> GatewayProcess:
        """Start the process and wait until it listens; raise GatewayStartError if it does not."""
        self._proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, env=self.env,
                                      preexec_fn=self._limit_fds if self.fd_limit else None)
        self._reader = threading.Thread(target=self._read_stderr, name="gateway-stderr", daemon=True)
        self._reader.start()
        if not self._listening.wait(timeout) or not self.port:
            self.stop()
            raise GatewayStartError("sluice did not start (exit status %s); stderr:\n%s"
                                    % (self.returncode, self.stderr))
        return self

    def _limit_fds(self) -> None:
        """In the child before exec: at most ``fd_limit`` open file descriptors, soft
        and hard (as ``ulimit -n``: the gateway cannot raise it)."""
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.fd_limit, self.fd_limit))

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        with self._proc.stderr:
            for raw in self._proc.stderr:
                line = raw.decode("utf-8", "replace")
                with self._lock:
                    self._lines.append(line)
                address = _started_address(line)
                if address is not None and not self._listening.is_set():
                    self.host, self.port = address
                    self._listening.set()
        self._listening.set()  # EOF: the process exited without listening

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the process if it still runs."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)

    def terminate(self) -> None:
        """Ask for a graceful shutdown (SIGTERM) without waiting."""
        self.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for the process to exit; raises subprocess.TimeoutExpired."""
        assert self._proc is not None
        self.returncode = self._proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> Optional[int]:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit status (negative if killed)."""
        proc = self._proc
        if proc is None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:
            return self.wait()
        finally:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    # -- what tests need -------------------------------------------------

    def rss(self) -> int:
        """The process's resident memory (``VmRSS``), in bytes."""
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/%d/status" % self.pid)

    @property
    def address(self) -> Tuple[str, int]:
        return self.host, self.port

    def url(self, path: str = "/v1/logs") -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "http://%s:%d%s" % (host, self.port, path)

    @property
    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        with self._lock:
            return "".join(self._lines)

    def events(self, event: Optional[str] = None) -> List[dict]:
        """The log events written so far (:func:`log_events`)."""
        return log_events(self.stderr, event)

    @property
    def started(self) -> dict:
        """The ``started`` event: address, sink, access control, effective settings."""
        (doc,) = self.events("started")
        return doc

    def __enter__(self) -> GatewayProcess:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return "<GatewayProcess %s port=%d returncode=%s>" % (" ".join(self.args), self.port, self.returncode)


@contextlib.contextmanager
def running_gateway(args: Sequence[str] = (), **kwargs) -> Iterator[GatewayProcess]:
    """A started :class:`GatewayProcess`, stopped on exit (keywords as its constructor)."""
    proc = GatewayProcess(args, **kwargs)
    try:
        yield proc.start()
    finally:
        proc.stop()


@contextlib.asynccontextmanager
async def gateway_in_process(args: Sequence[str] = (), *, data_dir: Optional[str] = None,
                             send_buffer: Optional[int] = None) -> AsyncIterator[Tuple[Gateway, int]]:
    """``(gateway, port)`` of a :class:`Gateway` serving on a loopback port in this Trio run.

    On a normal exit the gateway drains (requests in progress finish); if the
    body raised, requests in progress are cut.  ``send_buffer`` fixes the
    accepted sockets' SO_SNDBUF (no autotuning), so a client that does not
    read blocks the gateway's sends after a few kilobytes.
    """
    flags = ["--listen", "127.0.0.1:0"] + (["--data-dir", data_dir] if data_dir else []) + list(args)
    config = from_args(flags, {})
    gateway = Gateway(config)
    listener = await open_listener(*config.listen)
    if send_buffer is not None:
        # Accepted sockets inherit the listener's buffer sizes.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(gateway.serve, [listener]))[1]
        try:
            yield gateway, port
        except BaseException:
            gateway.stop_now()
            raise
        gateway.drain()


@pytest.fixture
def start_gateway(tmp_path) -> Iterator:
    """``start_gateway(*flags, data_dir=None, env=None, fd_limit=None, listen=...)`` -> a started gateway.

    Each gateway gets its own data directory under ``tmp_path`` unless one is
    given; all of them are stopped when the test ends.
    """
    started: List[GatewayProcess] = []

    def start(*args: str, data_dir: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
              fd_limit: Optional[int] = None, listen: str = "127.0.0.1:0") -> GatewayProcess:
        if data_dir is None:
            data_dir = str(tmp_path / ("data-%d" % len(started)))
        proc = GatewayProcess(args, data_dir=data_dir, env=env, fd_limit=fd_limit, listen=listen)
        started.append(proc)
        return proc.start()

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture
def gateway_process(start_gateway) -> GatewayProcess:
    """A gateway with default settings (file sink in its own directory)."""
    return start_gateway()


# -- clients ---------------------------------------------------------------


class Response(NamedTuple):
    """One HTTP response as it came over the wire."""

    status: int
    reason: bytes
    headers: List[Tuple[bytes, bytes]]  # names lower-cased, in wire order
    body: bytes

    def header(self, name: str) -> Optional[str]:
        """The value of header ``name`` (any case), or None."""
        key = name.lower().encode("ascii")
        for header, value in self.headers:
            if header == key:
                return value.decode("latin-1")
        return None

    def json(self):
        return json.loads(self.body)


_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) ([^\r\n]*)\r\n")


def _parse_one(data: bytes, *, head_only: bool = False) -> Optional[Tuple[Response, int]]:
    """``(response, bytes used)`` if ``data`` starts with a whole response, else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    match = _STATUS_LINE.match(data)
    if match is None:
        raise AssertionError("not an HTTP/1.1 response: %r" % data[:200])
    headers = []
    for line in data[match.end():end].split(b"\r\n") if end > match.end() else []:
        name, sep, value = line.partition(b":")
        if not sep:
            raise AssertionError("bad header line %r" % line)
        headers.append((name.strip().lower(), value.strip()))
    status = int(match.group(1))
    length = 0
    if not head_only and status >= 200 and status not in (204, 304):
        lengths = [v for n, v in headers if n == b"content-length"]
        if len(lengths) != 1:
            raise AssertionError("expected one Content-Length in %r" % data[:end])
        length = int(lengths[0])
    start = end + 4
    if len(data) < start + length:
        return None
    return Response(status, match.group(2), headers, data[start:start + length]), start + length


class RawConnection:
    """A loopback TCP connection that sends literal bytes and parses what comes back."""

    def __init__(self, address: Tuple[str, int], *, timeout: float = CLIENT_TIMEOUT) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.received = b""  # not yet parsed
        self.wire = b""  # everything received, as it came

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_in_pieces(self, data: bytes, size: int = 1) -> None:
        """Send ``data`` in ``size``-byte writes (each its own segment: TCP_NODELAY)."""
        for i in range(0, len(data), size):
            self.sock.sendall(data[i:i + size])

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        self.received += chunk
        self.wire += chunk
        return chunk

    def read_response(self, *, head_only: bool = False) -> Response:
        """The next response (interim ``100 Continue`` included); AssertionError on EOF."""
        while True:
            parsed = _parse_one(self.received, head_only=head_only)
            if parsed is not None:
                response, used = parsed
                self.received = self.received[used:]
                return response
            if not self._recv():
                raise AssertionError("connection closed before a whole response: %r" % self.received)

    def read_to_end(self) -> Tuple[List[Response], str]:
        """Every response until the server closes, and how it closed.

        The second item is ``"eof"`` for an orderly close, ``"reset"`` for a
        TCP reset (answers may be lost then); bytes after the last whole
        response fail the test.
        """
        ended = "eof"
        try:
            while self._recv():
                pass
        except ConnectionResetError:
            ended = "reset"
        responses = []
        while self.received:
            parsed = _parse_one(self.received)
            if parsed is None:
                raise AssertionError("partial response before %s: %r" % (ended, self.received))
            responses.append(parsed[0])
            self.received = self.received[parsed[1]:]
        return responses, ended

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# -- requests as literal bytes ----------------------------------------------------


def post_request(body: bytes, *, headers: Sequence[Tuple[str, str]] = (), path: str = "/v1/logs",
                 close: bool = False) -> bytes:
    """The literal bytes of a Content-Length POST."""
    lines = ["POST %s HTTP/1.1" % path, "Host: sluice.test", "Content-Length: %d" % len(body)]
    lines += ["%s: %s" % pair for pair in headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def get_request(path: str, *, method: str = "GET", close: bool = False) -> bytes:
    """The literal bytes of a GET (or ``method``) without a body."""
    close_line = "Connection: close\r\n" if close else ""
    return ("%s %s HTTP/1.1\r\nHost: sluice.test\r\n%s\r\n" % (method, path, close_line)).encode()


def chunked_request(pieces: Sequence[bytes], *, headers: Sequence[Tuple[str, str]] = ()) -> bytes:
    """The literal bytes of a chunked POST, one chunk per piece."""
    head = "POST /v1/logs HTTP/1.1\r\nHost: sluice.test\r\nTransfer-Encoding: chunked\r\n"
    head += "".join("%s: %s\r\n" % pair for pair in headers)
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    return head.encode() + b"\r\n" + body


# -- curl and http.client ----------------------------------------------------------

_WRITE_OUT = "\n@@ %{http_code} %{size_upload} %{num_connects}\n"
_WRITTEN = re.compile(rb"(.*?)\n@@ (\d{3}) (\d+) (\d+)\n", re.DOTALL)


class CurlTransfer:
    """One URL's outcome in a curl run."""

    def __init__(self, body: bytes, status: int, uploaded: int, connects: int) -> None:
        self.body = body
        self.status = status
        self.uploaded = uploaded
        self.connects = connects


def curl(*args: str) -> Tuple[List[CurlTransfer], str]:
    """Run curl (verbose); each transfer's body and counters, and curl's verbose log."""
    result = subprocess.run([CURL, "--silent", "--show-error", "--verbose", "--max-time", "20",
                             "--write-out", _WRITE_OUT, *args],
                            capture_output=True, timeout=60, check=False)
    log = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 0, log
    transfers = [CurlTransfer(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
                 for m in _WRITTEN.finditer(result.stdout)]
    return transfers, log


def curl_post(url: str, body_file: str, *headers: str) -> Tuple[CurlTransfer, str]:
    args = ["--data-binary", "@" + body_file]
    for header in headers:
        args += ["--header", header]
    transfers, log = curl(*args, url)
    assert len(transfers) == 1, log
    return transfers[0], log


def http_post(address: Tuple[str, int], body: bytes, headers: Optional[Dict[str, str]] = None,
              path: str = "/v1/logs") -> Tuple[int, Dict[str, str], bytes]:
    """POST ``body`` with http.client on a new connection: status, headers (lower-cased), body."""
    conn = http.client.HTTPConnection(*address, timeout=CLIENT_TIMEOUT)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# -- reading back --------------------------------------------------------------------


def stored(data_dir: str) -> Dict[str, Tuple[dict, bytes]]:
    """Every record in ``data_dir`` by id: ``(envelope metadata, body)``."""
    from sinks.envelope import split_record

    records = {}
    if not os.path.isdir(data_dir):
        return records
    for record in read_records(data_dir):
        meta, body = split_record(record)
        records[meta["id"]] = (meta, bytes(body))
    return records


def wait_for_records(data_dir: str, ids: Iterable[str], *,
                     timeout: float = STORE_TIMEOUT) -> Dict[str, Tuple[dict, bytes]]:
    """:func:`stored`, once every one of ``ids`` is there (the sink writes in batches)."""
    wanted = set(ids)
    deadline = time.monotonic() + timeout
    while True:
        records = stored(data_dir)
        missing = wanted - records.keys()
        if not missing:
            return records
        if time.monotonic() > deadline:
            raise AssertionError("records never stored: %s" % sorted(missing))
        time.sleep(0.02)
