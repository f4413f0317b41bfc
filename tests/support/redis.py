"""Real Redis servers for tests: one server, a 3-master cluster, TLS.

Each server is a ``redis-server`` child on a free loopback port (chosen here:
``--port 0`` would switch TCP off, not pick a port), with no persistence and
its own temp dir; it is stopped when the context or fixture ends.  Outage
tests use :meth:`RedisServer.kill` / :meth:`RedisServer.start` (same port,
same dir: call :meth:`RedisServer.save` first to keep the data, as a server
with persistence would) and :meth:`RedisServer.pause` / ``resume`` (a stalled
server that accepts connections and never answers).

Fixtures to import into a test module or a conftest: ``redis_server``
(function scope), ``redis_cluster`` and ``tls_redis_server`` (module scope).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Iterator, List, Optional, Sequence

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "free_port",
    "RedisServer",
    "RedisClusterNodes",
    "running_redis",
    "running_cluster",
    "running_tls_redis",
    "redis_server",
    "redis_cluster",
    "tls_redis_server",
]

REDIS_SERVER = shutil.which("redis-server") or "redis-server"
REDIS_CLI = shutil.which("redis-cli") or "redis-cli"
# Startup is tens of milliseconds; a loaded CI machine gets ample slack.
START_TIMEOUT = 10.0
# Cluster bus ports are the client port + 10000 (Redis's fixed offset).
CLUSTER_BUS_OFFSET = 10000


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(with_bus: bool = False) -> int:
    """A loopback TCP port nobody listens on (and its cluster bus port)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not with_bus:
            return port
        if port + CLUSTER_BUS_OFFSET < 65536 and _port_free(port + CLUSTER_BUS_OFFSET):
            return port
    raise RuntimeError("no free port found")


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1."""

    def __init__(self, workdir: str, *, cluster: bool = False, tls_dir: Optional[str] = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.cluster = cluster
        self.port = free_port(with_bus=cluster)
        self.tls_dir = tls_dir
        self.tls_port = free_port() if tls_dir else 0
        self.extra_args = list(extra_args)
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return "redis://127.0.0.1:%d/0" % self.port

    @property
    def tls_url(self) -> str:
        assert self.tls_dir
        return "rediss://127.0.0.1:%d/0?ssl_ca_certs=%s" % (
            self.tls_port, os.path.join(self.tls_dir, "cert.pem"))

    def command(self) -> List[str]:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.workdir,
                "--daemonize", "no", "--logfile", "redis.log"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]
        if self.tls_dir:
            pem = lambda name: os.path.join(self.tls_dir, name)  # noqa: E731
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", pem("cert.pem"),
                     "--tls-key-file", pem("key.pem"), "--tls-ca-cert-file", pem("cert.pem"),
                     "--tls-auth-clients", "no"]
        return args + self.extra_args

    def client(self, **kwargs: Any) -> redis.Redis:
        """A plain client; no retries, so a refused connection fails at once."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5,
                           retry=Retry(NoBackoff(), 0), **kwargs)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command(), cwd=self.workdir,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        client = self.client()
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError("redis-server exited: %s" % self.log_tail())
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start: %s" % self.log_tail())
                time.sleep(0.01)
        finally:
            client.close()

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.workdir, "redis.log")) as f:
                return "".join(f.readlines()[-5:])
        except OSError:
            return ""

    def save(self) -> None:
        """Write a snapshot that the next :meth:`start` loads."""
        with contextlib.closing(self.client()) as c:
            c.save()

    def kill(self) -> None:
        """Stop the server at once, like a crash (SIGKILL)."""
        if self.process is not None:
            self.resume()
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """Freeze the server: connections stay open, nothing is answered."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.kill()


class RedisClusterNodes:
    """Three masters, no replicas, slots split evenly by ``redis-cli``."""

    def __init__(self, nodes: List[RedisServer]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        return "redis+cluster://127.0.0.1:%d/0" % self.nodes[0].port

    def create(self) -> None:
        addresses = ["127.0.0.1:%d" % n.port for n in self.nodes]
        subprocess.run([REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas",
                        "0", "--cluster-yes"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=60)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(self._state_ok(n) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @staticmethod
    def _state_ok(node: RedisServer) -> bool:
        with contextlib.closing(node.client()) as c:
            info = c.execute_command("CLUSTER", "INFO")
        if isinstance(info, bytes):
            info = info.decode()
        if isinstance(info, dict):
            return info.get("cluster_state") == "ok"
        return "cluster_state:ok" in info

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def _tempdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="sluice-redis-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_redis(**kwargs: Any) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, killed and cleaned up afterwards."""
    with _tempdir() as path:
        server = RedisServer(path, **kwargs)
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def running_cluster(masters: int = 3) -> Iterator[RedisClusterNodes]:
    with _tempdir() as path:
        nodes = []
        for i in range(masters):
            node_dir = os.path.join(path, "node%d" % i)
            os.mkdir(node_dir)
            nodes.append(RedisServer(node_dir, cluster=True))
        cluster = RedisClusterNodes(nodes)
        try:
            for node in nodes:
                node.start()
            cluster.create()
            yield cluster
        finally:
            cluster.stop()


def make_certificate(directory: str) -> None:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem) via openssl."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
                    "-keyout", os.path.join(directory, "key.pem"),
                    "-out", os.path.join(directory, "cert.pem")],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def running_tls_redis() -> Iterator[RedisServer]:
    """A server listening with TLS on ``tls_port`` (and plain TCP on ``port``)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    with _tempdir() as tls_dir:
        make_certificate(tls_dir)
        with running_redis(tls_dir=tls_dir) as server:
            yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterNodes]:
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def tls_redis_server() -> Iterator[RedisServer]:
    with running_tls_redis() as server:
        yield server
