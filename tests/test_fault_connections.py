"""Thousands of idle connections and hostile slow clients do not starve the gateway.

Real ``sluice serve`` processes on this interpreter, real sockets:

- 10,000 idle connections (half kept alive after one answer, half that never
  sent a byte), 200 clients trickling a head and 50 trickling a body, while a
  well-behaved client posts 500 records, each on a new connection: at least
  99% are answered ``202`` within a second, every ``202`` is stored,
  ``/healthz`` answers throughout, and the gateway's memory per idle
  connection is reported;
- one tenant's 100 stalled uploads hold at most its share of the ring, while
  another tenant's posts get ``202``;
- a file-descriptor limit lowered to 256: the gateway says so at start and
  serves by evicting idle connections.

``SLUICE_CONNECTIONS_REPORT=FILE`` appends the measurements (RSS, per idle
connection, latencies) as one JSON line per run: the figures of
docs/operations.md ("Connections").
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import socket
import threading
import time
from typing import Dict, List, Optional, Tuple

import pytest

from gateway.access import keystore
from tests.support import gateway as _support
from tests.support.gateway import RawConnection, get_request, post_request, stored, wait_for_records

start_gateway = _support.start_gateway

IDLE = 10000
SLOW_HEADS = 200
SLOW_BODIES = 50
POSTS = 500
#: The well-behaved client's answers must come within this: a second, so a load
#: balancer's health check or an agent's retry never waits on the idle crowd.
ANSWER_WITHIN = 1.0
#: Descriptors the test process needs besides the idle connections.
TEST_FDS = 1000
#: Seconds between two bytes of a trickling client.
TRICKLE = 0.5
#: Seconds between the well-behaved client's posts: its 500 posts span
#: about 10 s, across the silent connections' first-byte timeout (10 s) and
#: the trickling clients' 408s.
POST_INTERVAL = 0.02
#: Longest wait for every trickling client to have been closed once (the
#: head timeout is 10 s); reached only when something is wrong.
HOSTILE_TIMEOUT = 60.0
#: A client gives up on an answer after this long (only reached when broken).
CLIENT_TIMEOUT = 15.0
CHILD_ENV = {"PYPY_GC_NURSERY": "4MB"}
INTERPRETER = platform.python_implementation()


def _raise_nofile(wanted: int) -> int:
    """Raise this process's soft descriptor limit to the hard one; how many connections fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return max(0, min(wanted, soft - TEST_FDS))


def _report(doc: dict) -> None:
    path = os.environ.get("SLUICE_CONNECTIONS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(doc) + "\n")
    print(json.dumps(doc))


def _metrics(address: Tuple[str, int]) -> Dict[str, float]:
    """The gateway's /metrics samples by name with labels (one connection)."""
    with RawConnection(address, timeout=CLIENT_TIMEOUT) as conn:
        conn.send(get_request("/metrics", close=True))
        (response,), _ = conn.read_to_end()
    samples = {}
    for line in response.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _open_idle(address: Tuple[str, int], count: int, served: bool) -> List[socket.socket]:
    """``count`` connections; with ``served`` each has had one answer and is kept alive."""
    conns = []
    for _ in range(count):
        sock = socket.create_connection(address, timeout=CLIENT_TIMEOUT)
        conns.append(sock)
        if served:
            # One at a time: at a low limit, a connection whose request is
            # not read yet may be the one evicted for the next.
            sock.sendall(get_request("/healthz"))
            data = b""
            while not data.endswith(b'{"status":"ok"}'):
                chunk = sock.recv(4096)
                assert chunk, "an idle-to-be connection was closed before its answer"
                data += chunk
    return conns


class Tricklers(threading.Thread):
    """Hostile clients sending a byte every TRICKLE seconds; each one the gateway
    closes (408, or no answer) is replaced by a new one, so the pressure stays."""

    def __init__(self, address: Tuple[str, int], heads: int, bodies: int) -> None:
        super().__init__(name="tricklers", daemon=True)
        self.address = address
        self.heads = heads
        self.bodies = bodies
        self.closed: Dict[str, int] = {"head": 0, "body": 0}
        self.answers: Dict[str, List[int]] = {"head": [], "body": []}
        self.errors: List[BaseException] = []
        self._stop_event = threading.Event()
        self._socks: List[Tuple[str, socket.socket]] = []

    def _new(self, kind: str) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=CLIENT_TIMEOUT)
        if kind == "head":
            sock.sendall(b"POST /v1/logs HTTP/1.1\r\nHost: slow\r\n")
        else:
            sock.sendall(post_request(b"s" * 100000)[:-99900])
        sock.setblocking(False)
        return sock

    def run(self) -> None:
        try:
            self._socks = [("head", self._new("head")) for _ in range(self.heads)]
            self._socks += [("body", self._new("body")) for _ in range(self.bodies)]
            while not self._stop_event.wait(TRICKLE):
                for n, (kind, sock) in enumerate(self._socks):
                    try:
                        answer = sock.recv(4096)
                        gone = True
                        if answer.startswith(b"HTTP/1.1 "):
                            self.answers[kind].append(int(answer[9:12]))
                    except BlockingIOError:
                        gone = False
                    except OSError:
                        gone = True
                    if not gone:
                        try:
                            sock.send(b"X" if kind == "head" else b"s")
                        except BlockingIOError:
                            pass
                        except OSError:
                            gone = True
                    if gone:
                        self.closed[kind] += 1
                        sock.close()
                        self._socks[n] = (kind, self._new(kind))
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(CLIENT_TIMEOUT)
        for _, sock in self._socks:
            sock.close()
        assert not self.errors, self.errors


class HealthChecks(threading.Thread):
    """``GET /healthz`` on a new connection every 0.2 s, as a load balancer does."""

    def __init__(self, address: Tuple[str, int]) -> None:
        super().__init__(name="health", daemon=True)
        self.address = address
        self.answers: List[Tuple[int, float]] = []
        self.failures: List[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.2):
            started = time.monotonic()
            try:
                with RawConnection(self.address, timeout=5.0) as conn:
                    conn.send(get_request("/healthz", close=True))
                    responses, _ = conn.read_to_end()
                self.answers.append((responses[0].status if responses else 0, time.monotonic() - started))
            except (OSError, AssertionError) as exc:
                self.failures.append(repr(exc))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(CLIENT_TIMEOUT)


def _post_each_on_a_new_connection(address: Tuple[str, int], count: int, headers=(),
                                   interval: float = 0.0) -> List[Tuple[int, float, Optional[str], bytes]]:
    """``count`` posts, one connection each: (status, seconds, record id, body)."""
    outcomes = []
    for n in range(count):
        if interval:
            time.sleep(interval)
        body = b"well-behaved %d" % n
        started = time.monotonic()
        try:
            with RawConnection(address, timeout=CLIENT_TIMEOUT) as conn:
                conn.send(post_request(body, headers=headers, close=True))
                response = conn.read_response()
            record_id = response.json().get("id") if response.status == 202 else None
            outcomes.append((response.status, time.monotonic() - started, record_id, body))
        except (OSError, AssertionError):
            outcomes.append((0, time.monotonic() - started, None, body))
    return outcomes


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the gateway's RSS in /proc")
def test_idle_and_slow_clients_do_not_starve_a_well_behaved_one(start_gateway):
    idle = _raise_nofile(IDLE + SLOW_HEADS + SLOW_BODIES) - SLOW_HEADS - SLOW_BODIES
    assert idle >= 1000, "this machine's descriptor limit is too low for the test"
    gateway = start_gateway(env=CHILD_ENV)
    address = gateway.address
    started = gateway.events("started")[0]
    # Warm up (the JIT, the pool), then measure memory before and with the idle connections.
    _post_each_on_a_new_connection(address, 50)
    rss_before = gateway.rss()
    kept_alive = _open_idle(address, idle // 2, served=True)
    silent = _open_idle(address, idle - idle // 2, served=False)
    rss_idle = gateway.rss()
    tricklers = Tricklers(address, SLOW_HEADS, SLOW_BODIES)
    health = HealthChecks(address)
    try:
        tricklers.start()
        health.start()
        time.sleep(TRICKLE * 2)  # the hostile clients are in place
        outcomes = _post_each_on_a_new_connection(address, POSTS, interval=POST_INTERVAL)
        deadline = time.monotonic() + HOSTILE_TIMEOUT
        while tricklers.closed["head"] < SLOW_HEADS or tricklers.closed["body"] < SLOW_BODIES:
            assert time.monotonic() < deadline and tricklers.is_alive(), tricklers.closed
            time.sleep(TRICKLE)
        metrics = _metrics(address)
        rss_load = gateway.rss()
    finally:
        health.stop()
        tricklers.stop()
        for sock in kept_alive + silent:
            sock.close()
    fast = [o for o in outcomes if o[0] == 202 and o[1] <= ANSWER_WITHIN]
    latencies = sorted(o[1] for o in outcomes)
    doc = {
        "interpreter": INTERPRETER, "idle_connections": idle, "slow_heads": SLOW_HEADS,
        "slow_bodies": SLOW_BODIES, "posts": POSTS, "accepted_within_1s": len(fast),
        "statuses": sorted({o[0] for o in outcomes}),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "max_ms": round(latencies[-1] * 1000, 1), "rss_before_mb": round(rss_before / 2 ** 20, 1),
        "rss_idle_mb": round(rss_idle / 2 ** 20, 1), "rss_under_load_mb": round(rss_load / 2 ** 20, 1),
        "bytes_per_idle_connection": (rss_idle - rss_before) // idle,
        "health_checks": len(health.answers), "slow_closed": tricklers.closed,
        "slow_answers": {k: sorted(set(v)) for k, v in tricklers.answers.items()},
        "connection_limit": metrics.get("sluice_connection_limit"),
        "first_byte_timeouts": metrics.get('sluice_connection_timeouts_total{kind="first_byte"}'),
        "slow_body_timeouts": metrics.get('sluice_connection_timeouts_total{kind="slow_body"}'),
        "ring_used": metrics.get("sluice_ring_used_bytes"),
        "ring_waits": metrics.get("sluice_ring_waits_total"),
        "ring_overloads": metrics.get("sluice_ring_overloads_total"),
    }
    _report(doc)
    assert len(fast) >= POSTS * 0.99, doc
    assert metrics["sluice_connection_limit"] >= idle + SLOW_HEADS + SLOW_BODIES, started
    # /healthz answered every time, throughout.
    assert not health.failures and health.answers, health.failures
    assert all(status == 200 for status, _ in health.answers), health.answers
    # Trickled heads and bodies were answered 408 (--head-timeout, --min-body-rate);
    # the silent connections were closed at the first-byte timeout.
    assert set(tricklers.answers["head"]) == {408} and set(tricklers.answers["body"]) == {408}, doc
    assert metrics['sluice_connection_timeouts_total{kind="slow_body"}'] >= SLOW_BODIES
    assert metrics['sluice_connection_timeouts_total{kind="first_byte"}'] >= idle - idle // 2
    assert gateway.stop() == 0, gateway.stderr
    ids = [o[2] for o in outcomes if o[0] == 202]
    records = wait_for_records(gateway.data_dir, ids)
    assert {records[o[2]][1] for o in outcomes if o[0] == 202} == {o[3] for o in outcomes if o[0] == 202}


def test_a_low_descriptor_limit_is_said_at_start_and_idle_connections_make_room(start_gateway):
    gateway = start_gateway(fd_limit=256, env=CHILD_ENV)
    (warning,) = gateway.events("connection_capacity")
    assert warning["level"] == "warning" and warning["fd_limit"] == 256
    assert warning["max_connections"] == 128 and "ulimit -n" in warning["detail"]
    address = gateway.address
    # More idle connections than the gateway may hold: kept alive after an answer, or silent.
    kept_alive = _open_idle(address, 200, served=True)
    silent = _open_idle(address, 100, served=False)
    try:
        outcomes = _post_each_on_a_new_connection(address, 50)
        with RawConnection(address) as conn:
            conn.send(get_request("/healthz", close=True))
            assert conn.read_to_end()[0][0].status == 200
        metrics = _metrics(address)
    finally:
        for sock in kept_alive + silent:
            sock.close()
    assert [o[0] for o in outcomes] == [202] * 50
    assert metrics["sluice_connections_evicted_total"] >= 300 - 128
    assert metrics["sluice_connections"] <= 128
    assert gateway.stop() == 0, gateway.stderr
    records = stored(gateway.data_dir)
    assert [records[o[2]][1] for o in outcomes] == [o[3] for o in outcomes]


# -- one tenant's share of the ring -------------------------------------------------------------

#: 100 uploads of 200 KiB each would hold 20 MiB: five times the ring.
SLOW_UPLOADS = 100
UPLOAD = 200 * 1024
RING = "4MiB"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_one_tenants_slow_uploads_leave_the_ring_to_others(start_gateway, redis_module, admin):
    greedy = keystore.create_key(admin, "GREEDY", time.time()).api_key
    polite = keystore.create_key(admin, "POLITE", time.time()).api_key
    # No minimum body rate here: the share alone must protect the others.
    gateway = start_gateway("--redis", redis_module.url, "--ring-size", RING, "--max-body", "256KiB",
                            "--min-body-rate", "0", env=CHILD_ENV)
    address = gateway.address
    uploads = []
    refused = []
    try:
        for n in range(SLOW_UPLOADS):
            conn = RawConnection(address)
            body = b"%08d" % n + b"g" * (UPLOAD - 8)
            conn.send(post_request(body, headers=[("Authorization", "Bearer " + greedy),
                                                  ("Expect", "100-continue")])[:-(UPLOAD - 1024)])
            response = conn.read_response()  # 100 Continue once its slot is reserved, else 503
            if response.status == 100:
                uploads.append((conn, body))
            else:
                assert response.status == 503 and response.header("retry-after") == "1", response
                assert "tenant" in response.json()["message"]
                refused.append(response)
                conn.close()
        metrics = _metrics(address)
        outcomes = _post_each_on_a_new_connection(address, 50,
                                                  headers=[("Authorization", "Bearer " + polite)])
        # The stalled uploads finish after all: every one is stored.
        finished = []
        for conn, body in uploads:
            conn.send(body[1024:])
            response = conn.read_response()
            assert response.status == 202, response
            finished.append((response.json()["id"], body))
    finally:
        for conn, _ in uploads:
            conn.close()
    limit = metrics["sluice_ring_tenant_limit_bytes"]
    assert limit == 2 * 2 ** 20
    assert 0 < metrics['sluice_ring_tenant_bytes{class="largest"}'] <= limit
    assert len(uploads) * UPLOAD <= limit and len(refused) == SLOW_UPLOADS - len(uploads)
    assert metrics["sluice_ring_share_refusals_total"] == len(refused)
    assert [o[0] for o in outcomes] == [202] * 50
    assert gateway.stop() == 0, gateway.stderr
    records = stored(gateway.data_dir)
    assert [records[i][1] for i, _ in finished] == [body for _, body in finished]
    assert [records[o[2]][1] for o in outcomes] == [o[3] for o in outcomes]
