"""The gateway over real loopback sockets: graceful shutdown on SIGTERM, and a second signal."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Dict, List

from tests.support import gateway as _support
from tests.support.answers import (
    KiB,
    accepted_id,
    blob,
    hold_ring_slot,
)
from tests.support.gateway import (
    CLIENT_TIMEOUT,
    RawConnection,
    get_request,
    stored,
)

# The fixture, bound here so tests can ask for it by name.
start_gateway = _support.start_gateway


# -- graceful shutdown -----------------------------------------------------------


def _wait_until_refused(address, timeout: float = CLIENT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(address, timeout=CLIENT_TIMEOUT).close()
        except ConnectionRefusedError:
            return
        except ConnectionResetError:
            pass  # connected just as the listener closed: its backlog is reset
        assert time.monotonic() < deadline, "the gateway kept accepting connections"
        time.sleep(0.02)


def test_sigterm_under_load_keeps_every_accepted_record(start_gateway):
    gateway = start_gateway()
    accepted: Dict[str, bytes] = {}
    statuses = set()
    lock = threading.Lock()
    stop = threading.Event()
    enough = threading.Event()
    failures: List[BaseException] = []

    def client(number: int) -> None:
        conn = None
        try:
            for seq in range(1_000_000):
                if stop.is_set():
                    return
                body = b'{"client":%d,"seq":%d,"pad":"%s"}' % (number, seq, b"x" * (seq % 3000))
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(*gateway.address, timeout=CLIENT_TIMEOUT)
                    conn.request("POST", "/v1/logs", body=body, headers={"Content-Type": "application/json"})
                    response = conn.getresponse()
                    answer = response.read()
                except ConnectionRefusedError:
                    return  # the gateway stopped listening
                except (OSError, http.client.HTTPException):
                    conn.close()  # cut while draining: this record was never acknowledged
                    conn = None
                    continue
                with lock:
                    statuses.add(response.status)
                    if response.status == 202:
                        accepted[json.loads(answer)["id"]] = body
                        if len(accepted) >= 200:
                            enough.set()
                if response.will_close:
                    conn.close()
                    conn = None
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        assert enough.wait(60), "the load never got going"
        gateway.terminate()
        assert gateway.wait() == 0, gateway.stderr
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not failures, failures
    assert statuses <= {202, 503}, statuses
    events = gateway.events()
    assert [e["event"] for e in events if e["event"].startswith("stop")] == ["stopping", "stopped"]
    assert events[-1]["event"] == "stopped" and events[-1]["accepted"] >= len(accepted)
    assert [e["signal"] for e in gateway.events("stopping")] == ["SIGTERM"]
    records = stored(gateway.data_dir)
    missing = set(accepted) - set(records)
    assert not missing, "%d acknowledged records lost" % len(missing)
    assert all(records[i][1] == body for i, body in accepted.items())


def test_sigterm_lets_slow_uploads_finish(start_gateway):
    gateway = start_gateway("--shutdown-timeout", "30s")
    idle = RawConnection(gateway.address)
    idle.send(get_request("/healthz"))
    assert idle.read_response().status == 200
    bodies = [blob(64 * KiB, 40 + i) for i in range(3)]
    uploads = [hold_ring_slot(gateway.address, body) for body in bodies]
    try:
        gateway.terminate()
        # Idle keep-alive connections are closed and no new ones accepted...
        assert idle.read_to_end() == ([], "eof")
        _wait_until_refused(gateway.address)
        # ...while the uploads in progress go on, slowly, to the end.
        for start in range(100, 64 * KiB, 8 * KiB):
            for conn, body in zip(uploads, bodies):
                conn.send(body[start:start + 8 * KiB])
            time.sleep(0.02)
        ids = []
        for conn in uploads:
            response = conn.read_response()
            assert response.header("connection") == "close"
            ids.append(accepted_id(response))
            assert conn.read_to_end() == ([], "eof")
    finally:
        for conn in uploads + [idle]:
            conn.close()
    assert gateway.wait() == 0, gateway.stderr
    records = stored(gateway.data_dir)
    assert [records[i][1] for i in ids] == bodies


def test_uploads_past_the_shutdown_timeout_are_cut(start_gateway):
    gateway = start_gateway("--shutdown-timeout", "300ms")
    with hold_ring_slot(gateway.address, blob(64 * KiB, 50)) as stalled:
        gateway.terminate()
        assert gateway.wait() == 0, gateway.stderr
        responses, _ = stalled.read_to_end()
    assert responses == []
    assert stored(gateway.data_dir) == {}


def test_second_signal_cuts_the_drain_short(start_gateway):
    gateway = start_gateway("--shutdown-timeout", "10m")
    with hold_ring_slot(gateway.address, blob(64 * KiB, 51)) as stalled:
        gateway.terminate()
        _wait_until_refused(gateway.address)
        gateway.terminate()
        assert gateway.wait(timeout=60) == 0, gateway.stderr
        responses, _ = stalled.read_to_end()
    assert responses == []
