"""Redis killed and restarted under load, with ``--on-redis-failure closed`` and ``open``.

Clients keep posting while Redis is SIGKILLed and, a moment later, started
again on the same port.  Closed: requests during the outage get ``503`` with
``Retry-After`` at once (never later than the check bound plus a generous
allowance for a loaded machine), ``/readyz`` says why, every ``202`` record
is stored, and the same gateway process admits again once Redis is back.
Open: known keys keep being admitted, and the usage counted meanwhile reaches
Redis after it returns.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, List, Tuple

from gateway.access import keystore
from tests.support.access import assert_no_key, post, wait_until
from tests.support.gateway import (
    RawConnection,
    get_request,
    log_events,
    running_gateway,
    wait_for_records,
)
from tests.support.redis import RedisServer, running_redis

REDIS_TIMEOUT = 0.3
#: Time allowed beyond --redis-timeout for one whole request (connect, send,
#: answer) on a busy two-core machine running PyPy and Redis beside it.
SLACK = 2.0
CLIENTS = 4
#: Redis with every write on disk before it is acknowledged, so SIGKILL
#: loses nothing Redis acknowledged (as a production Redis with AOF would).
DURABLE = ["--appendonly", "yes", "--appendfsync", "always"]


class Load:
    """Client threads posting with one key until stopped; every answer is kept."""

    def __init__(self, address: Tuple[str, int], key: str) -> None:
        self.address = address
        self.key = key
        self.answers: List[Tuple[float, int, float, Dict[str, Any]]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(CLIENTS)]

    def _client(self, n: int) -> None:
        sequence = 0
        while not self._stop.is_set():
            sequence += 1
            body = b'{"client":%d,"n":%d}' % (n, sequence)
            answer = post(self.address, body, self.key)
            detail = {"body": body, "doc": answer.json(),
                      "retry_after": answer.header("retry-after")}
            with self._lock:
                self.answers.append((time.monotonic(), answer.status, answer.seconds, detail))
            time.sleep(0.005)

    def statuses_since(self, since: float) -> List[int]:
        with self._lock:
            return [status for at, status, _, _ in self.answers if at >= since]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def _readyz(address: Tuple[str, int]) -> Tuple[int, Dict[str, Any]]:
    with RawConnection(address) as conn:
        conn.send(get_request("/readyz", close=True))
        response = conn.read_response()
    return response.status, response.json()


def _outage(redis_server: RedisServer, load: Load, address: Tuple[str, int],
            seconds: float = 1.5) -> Tuple[List[Tuple[int, Dict[str, Any]]], float, float]:
    """Kill Redis for ``seconds`` (reading /readyz meanwhile) and start it again.

    Returns the /readyz answers, and when Redis was killed and started.
    """
    wait_until(lambda: load.statuses_since(0).count(202) >= 20, what="load before the outage")
    redis_server.kill()
    killed = time.monotonic()
    readyz = []
    while time.monotonic() < killed + seconds:
        readyz.append(_readyz(address))
        time.sleep(0.1)
    restarting = time.monotonic()
    redis_server.start()
    return readyz, killed, restarting


def test_closed_mode_refuses_during_the_outage_and_recovers(tmp_path):
    with running_redis() as redis_server:
        admin = keystore.connect(redis_server.url)
        key = keystore.create_key(admin, "CLOSED", time.time()).api_key
        admin.close()
        redis_server.save()  # the key survives the restart
        with running_gateway(["--redis", redis_server.url, "--on-redis-failure", "closed",
                              "--redis-timeout", "%gs" % REDIS_TIMEOUT],
                             data_dir=str(tmp_path / "data")) as gateway:
            pid = gateway.pid
            with Load(gateway.address, key) as load:
                readyz, killed, restarting = _outage(redis_server, load, gateway.address)
                restarted = time.monotonic()
                wait_until(lambda: load.statuses_since(restarted).count(202) >= 20,
                           what="202s after Redis came back")
            assert gateway.pid == pid and gateway.running
            assert _readyz(gateway.address) == (200, {"status": "ready", "redis": "ok"})
            gateway.stop()
            stderr = gateway.stderr

    statuses = [status for _, status, _, _ in load.answers]
    assert set(statuses) <= {202, 503}, sorted(set(statuses))
    during = [status for at, status, _, _ in load.answers if killed + 0.5 < at < restarting]
    assert during and set(during) == {503}, during
    for _, status, seconds, detail in load.answers:
        assert seconds < REDIS_TIMEOUT + SLACK, (status, seconds)
        if status == 503:
            assert detail["doc"]["error"] == "access_unavailable", detail["doc"]
            assert int(detail["retry_after"]) >= 1
    down = [doc for status, doc in readyz if status == 503]
    assert down, readyz
    assert down[-1]["redis"] == "down"
    assert "Redis unreachable" in down[-1]["reason"] and "closed" in down[-1]["reason"]

    accepted = {d["doc"]["id"]: d["body"] for _, status, _, d in load.answers if status == 202}
    records = wait_for_records(str(tmp_path / "data"), accepted)
    for record_id, body in accepted.items():
        assert records[record_id][1] == body and records[record_id][0]["tenant"] == "CLOSED"
    down, up = log_events(stderr, "redis_down"), log_events(stderr, "redis_up")
    assert len(down) == len(up) == 1, stderr
    assert down[0]["level"] == "error" and down[0]["detail"].startswith("Redis unreachable")
    assert up[0]["detail"] == "Redis answers again"
    assert_no_key(stderr)


def _most_admitted_within(answers, seconds: float) -> int:
    """The most 202s answered within any ``seconds`` of the load."""
    times = sorted(at for at, status, _, _ in answers if status == 202)
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] > seconds:
            first += 1
        most = max(most, last - first + 1)
    return most


def test_open_mode_admits_during_the_outage_and_counts_the_usage_afterwards(tmp_path):
    with running_redis(extra_args=DURABLE) as redis_server:
        admin = keystore.connect(redis_server.url)
        key = keystore.create_key(admin, "OPEN", time.time()).api_key
        with running_gateway(["--redis", redis_server.url, "--on-redis-failure", "open",
                              "--redis-timeout", "%gs" % REDIS_TIMEOUT],
                             data_dir=str(tmp_path / "data")) as gateway:
            with Load(gateway.address, key) as load:
                readyz, killed, restarting = _outage(redis_server, load, gateway.address)
                restarted = time.monotonic()
                wait_until(lambda: _readyz(gateway.address)[1].get("redis") == "ok",
                           what="Redis state ok")
                wait_until(lambda: load.statuses_since(restarted).count(202) >= 20,
                           what="202s after Redis came back")
            statuses = [status for _, status, _, _ in load.answers]
            admitted = statuses.count(202)

            def records_in_redis() -> int:
                return keystore.get_usage(admin, "OPEN", time.time()).records

            # Everything admitted reaches Redis: what Redis counted itself and
            # what the gateway counted while it was down.  A check cut off by
            # the kill may have been counted by both (at most one per client
            # in flight), never by neither; so may a lease call (its slice,
            # about 0.1 s of the rate, plus the clients waiting).  Slices
            # count as used until they go back, within about a second.
            slice_bound = _most_admitted_within(load.answers, 0.2) + CLIENTS
            wait_until(lambda: admitted <= records_in_redis() <= admitted + CLIENTS + slice_bound,
                       what="usage handed to Redis")
            gateway.stop()
            stderr = gateway.stderr
        admin.close()

    assert set(statuses) == {202}, sorted(set(statuses))
    assert len([at for at, _, _, _ in load.answers if killed < at < restarting]) >= 10
    assert all(status == 200 and doc["status"] == "ready" for status, doc in readyz), readyz
    assert any(doc["redis"] == "down" for _, doc in readyz), readyz
    for _, _, seconds, _ in load.answers:
        assert seconds < REDIS_TIMEOUT + SLACK
    (down,) = log_events(stderr, "redis_down")
    assert down["detail"].startswith("Redis unreachable") and "admitting keys" in down["detail"]
    assert_no_key(stderr)
