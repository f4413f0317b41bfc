"""``sluice serve --workers N``: the supervisor's policy (no I/O), then real gateways.

The integration tests run ``python -m gateway serve --workers 2`` on the test
interpreter (:class:`tests.support.gateway.GatewayProcess`) and watch its
events: the parent's (``supervisor_*``, ``worker_exited``, ``reload*``) and
each worker's own (``started`` with its ``worker`` index, ``stopped``).
Which worker served a request shows where a user would look: each worker's
file sink writes to its own ``DATA_DIR/worker-<i>``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Dict, List, Set

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cli.supervisor import (
    FIXED_SETTINGS,
    Generation,
    RestartPolicy,
    changed_settings,
    reload_texts,
    worker_settings,
)
from gateway.cli.worker import WorkerSpec, worker_dir, worker_dirs
from gateway.config import settings as _config
from gateway.config.settings import ConfigError, from_args
from tests.support.gateway import (
    GatewayProcess,
    RawConnection,
    http_post,
    post_request,
    stored,
)

#: Seconds to wait for an event: a PyPy worker starts in about a second.
EVENT_TIMEOUT = 30.0
#: Connections opened so that at least one lands on worker 0: the kernel
#: hashes each to one of two workers, so all 16 miss it once in 65,536 runs.
KEEP_ALIVE_CONNECTIONS = 16


# -- policy and helpers (no processes) ----------------------------------------------------


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=30))
def test_restart_delay_is_bounded_and_grows_while_crashing(runs: List[float]) -> None:
    policy = RestartPolicy(first_delay=0.5, max_delay=30.0, stable_after=10.0)
    failures, previous = 0, 0.0
    for ran_for in runs:
        failures, delay = policy.next(failures, ran_for)
        assert policy.first_delay <= delay <= policy.max_delay
        if ran_for >= policy.stable_after:
            assert (failures, delay) == (1, policy.first_delay)  # a stable run starts over
        else:
            assert delay >= previous  # crashing in a row never shortens the wait
        previous = delay


def test_restart_delay_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(first_delay=0.5, max_delay=4.0, stable_after=10.0)
    failures, delays = 0, []
    for _ in range(6):
        failures, delay = policy.next(failures, 0.0)
        delays.append(delay)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def _generation(number: int, *flags: str) -> Generation:
    config, origins = _config.load_with_origins(vars(_parsed(flags)), {})
    return Generation(number, config, origins)


def _parsed(flags):
    import argparse

    parser = argparse.ArgumentParser()
    _config.add_arguments(parser)
    return parser.parse_args(list(flags))


def test_worker_settings_give_each_worker_its_directories_and_the_port(tmp_path) -> None:
    generation = _generation(0, "--workers", "3", "--data-dir", str(tmp_path / "data"), "--ack", "spool",
                             "--spool-dir", str(tmp_path / "spool"), "--metrics-dir", str(tmp_path / "m"),
                             "--max-body", "2KiB")
    settings = worker_settings(generation, 2, 4242)
    assert settings["listen"] == "127.0.0.1:4242"
    assert settings["data_dir"] == os.path.join(str(tmp_path / "data"), "worker-2")
    assert settings["spool_dir"] == os.path.join(str(tmp_path / "spool"), "worker-2")
    assert settings["max_body"] == "2KiB" and settings["workers"] == "3"
    assert "metrics_dir" not in settings  # workers get PROMETHEUS_MULTIPROC_DIR instead
    config = from_args(["--%s=%s" % (k.replace("_", "-"), v) for k, v in settings.items()], {})
    assert config.listen == ("127.0.0.1", 4242) and config.max_body == 2048


def test_worker_settings_bracket_ipv6_and_split_the_instance_count() -> None:
    generation = _generation(0, "--listen", "[::1]:0", "--workers", "4", "--redis", "redis://127.0.0.1:1/0",
                             "--instance-count", "3")
    settings = worker_settings(generation, 0, 9000)
    assert settings["listen"] == "[::1]:9000"
    # Fail-open admits 1/--instance-count per process: 3 gateways x 4 workers.
    assert settings["instance_count"] == "12"
    assert "spool_dir" not in settings


def test_reload_keeps_the_settings_that_cannot_change(tmp_path) -> None:
    running = _generation(0, "--listen", "127.0.0.1:8080", "--max-body", "1KiB")
    config, origins = _config.load_with_origins(
        vars(_parsed(["--listen", "0.0.0.0:9999", "--max-body", "2KiB",
                      "--metrics-dir", str(tmp_path)])), {})
    texts, kept = reload_texts(running, config, origins)
    assert kept == {"listen": "127.0.0.1:8080", "metrics_dir": ""}
    assert texts["listen"] == "127.0.0.1:8080" and "metrics_dir" not in texts
    merged, _ = _config.load_with_origins(texts, {})
    assert changed_settings(running.config, merged) == ["max_body"]
    assert set(kept) <= set(FIXED_SETTINGS)


@given(st.integers(0, 1000), st.integers(0, 10 ** 6), st.integers(0, 1023),
       st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=50), max_size=8), st.booleans())
def test_worker_spec_round_trips(index: int, generation: int, fd: int, settings: Dict[str, str],
                                 private: bool) -> None:
    spec = WorkerSpec(index, generation, settings, fd, private)
    line = spec.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert WorkerSpec.decode(line) == spec


_SPEC_END = b',"private_metrics":false}'


@pytest.mark.parametrize("line", [b"", b"[]", b'{"index":0}', b"not json",
                                  b'{"index":0,"generation":0,"settings":{},"status_fd":3}',
                                  b'{"index":-1,"generation":0,"settings":{},"status_fd":3' + _SPEC_END,
                                  b'{"index":0,"generation":0,"settings":{"a":1},"status_fd":3' + _SPEC_END,
                                  b'{"index":true,"generation":0,"settings":{},"status_fd":3' + _SPEC_END,
                                  b'{"index":0,"generation":0,"settings":{},"status_fd":3,"private_metrics":1}'])
def test_worker_spec_refuses_other_lines(line: bytes) -> None:
    with pytest.raises(ValueError):
        WorkerSpec.decode(line)
    good = b'{"index":0,"generation":0,"settings":{},"status_fd":3' + _SPEC_END
    assert WorkerSpec.decode(good) == WorkerSpec(0, 0, {}, 3, False)


def test_worker_dirs_in_index_order(tmp_path) -> None:
    for index in (10, 2, 0):
        os.makedirs(worker_dir(str(tmp_path), index))
    (tmp_path / "worker-x").mkdir()
    (tmp_path / "worker-3").write_text("a file, not a worker's directory")
    assert worker_dirs(str(tmp_path)) == [worker_dir(str(tmp_path), i) for i in (0, 2, 10)]
    assert worker_dirs(str(tmp_path / "missing")) == []


def test_workers_setting() -> None:
    assert from_args([], {}).workers == (os.cpu_count() or 1)  # auto
    assert from_args(["--workers", "3"], {}).workers == 3
    assert from_args([], {"SLUICE_WORKERS": "auto"}).workers == (os.cpu_count() or 1)
    for bad in ("0", "many", str(_config.MAX_WORKERS + 1)):
        with pytest.raises(ConfigError, match="^--workers: "):
            from_args(["--workers", bad], {})


# -- real gateways -------------------------------------------------------------------------


def _wait_for(gateway: GatewayProcess, event: str, count: int = 1, **match) -> List[dict]:
    """The events named ``event`` (with ``match``'s fields), once there are ``count``."""
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        found = [e for e in gateway.events(event) if all(e.get(k) == v for k, v in match.items())]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline or not gateway.running:
            raise AssertionError("no %d %s event(s) %s; stderr:\n%s" % (count, event, match, gateway.stderr))
        time.sleep(0.05)


def _supervised(args: List[str], data_dir: str, **kwargs) -> GatewayProcess:
    """A ``--workers 2`` gateway, once both workers listen."""
    gateway = GatewayProcess(["--workers", "2"] + args, data_dir=data_dir, **kwargs).start()
    _wait_for(gateway, "supervisor_started")
    return gateway


def _pids(gateway: GatewayProcess, generation: int = 0) -> Dict[int, int]:
    """Worker index -> pid of the latest ``started`` of each worker of ``generation``."""
    return {e["worker"]: e["pid"] for e in gateway.events("started") if e["generation"] == generation}


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _all_stored(data_dir: str, workers: int = 2) -> Dict[int, Set[str]]:
    return {i: set(stored(worker_dir(data_dir, i))) for i in range(workers)}


def _wait_stored(data_dir: str, ids: Set[str]) -> Dict[int, Set[str]]:
    deadline = time.monotonic() + EVENT_TIMEOUT
    while True:
        found = _all_stored(data_dir)
        if ids <= set().union(*found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _accepted(gateway: GatewayProcess, body: bytes) -> str:
    status, _, answer = http_post(gateway.address, body)
    assert status == 202, answer
    return json.loads(answer)["id"]


_LOGS_202 = re.compile(r'^sluice_http_requests_total\{route="/v1/logs",status="202"\} (\S+)$', re.M)


def _metrics_202(gateway: GatewayProcess) -> float:
    with urllib.request.urlopen(gateway.url("/metrics"), timeout=10) as answer:
        match = _LOGS_202.search(answer.read().decode())
    return float(match.group(1)) if match else 0.0


def test_requests_spread_over_workers_and_sigterm_stores_them_all(tmp_path) -> None:
    data_dir = str(tmp_path / "data")
    gateway = _supervised([], data_dir)
    try:
        pids = _pids(gateway)
        assert sorted(pids) == [0, 1] and gateway.pid not in pids.values()
        metrics_dir = gateway.events("supervisor_started")[0]["metrics_dir"]
        # One connection per request: the kernel picks a worker for each.
        ids = {_accepted(gateway, b'{"n":%d}' % n) for n in range(40)}
        # /metrics counts every worker, whichever answers (others publish every second).
        deadline = time.monotonic() + 10
        while _metrics_202(gateway) != 40.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _metrics_202(gateway) == 40.0
        gateway.terminate()
        assert gateway.wait() == 0
    finally:
        gateway.stop()
    stopped = {e["worker"]: e for e in gateway.events("stopped")}
    assert sorted(stopped) == [0, 1]
    assert all(e["accepted"] > 0 for e in stopped.values())  # both served
    assert sum(e["accepted"] for e in stopped.values()) == 40
    found = _all_stored(data_dir)
    assert all(found[i] for i in (0, 1)) and found[0] | found[1] == ids and not found[0] & found[1]
    assert not any(_alive(pid) for pid in pids.values())
    assert not os.path.exists(metrics_dir)  # the private metrics directory is removed
    shown = subprocess.run([sys.executable, "-m", "gateway", "read", data_dir], capture_output=True,
                           timeout=60, check=True).stdout.decode().splitlines()
    assert {json.loads(line)["id"] for line in shown} == ids


def test_a_killed_worker_is_restarted_with_its_spool(tmp_path) -> None:
    data_dir, spool_dir = str(tmp_path / "data"), str(tmp_path / "spool")
    with _supervised(["--ack", "spool", "--spool-dir", spool_dir], data_dir) as gateway:
        before = _pids(gateway)
        ids = {_accepted(gateway, b"before %d" % n) for n in range(10)}
        os.kill(before[0], signal.SIGKILL)
        (exited,) = _wait_for(gateway, "worker_exited", worker=0)
        assert exited["level"] == "error" and exited["exit_status"] == "SIGKILL"
        assert exited["pid"] == before[0] and exited["restart_in"] == 0.5
        ids |= {_accepted(gateway, b"during %d" % n) for n in range(10)}  # worker 1 serves
        _wait_for(gateway, "started", 2, worker=0)
        after = _pids(gateway)
        assert after[0] != before[0] and after[1] == before[1]
        ids |= {_accepted(gateway, b"after %d" % n) for n in range(10)}
        # Records worker 0 spooled before it was killed are shipped by its successor.
        found = _wait_stored(data_dir, ids)
        assert found[0] | found[1] >= ids
        assert worker_dirs(spool_dir) == [worker_dir(spool_dir, 0), worker_dir(spool_dir, 1)]
    assert gateway.returncode == 0


def _write(path, text: str) -> None:
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, str(path))


def test_sighup_reloads_without_dropping_a_slow_upload(tmp_path) -> None:
    settings = tmp_path / "sluice.toml"
    _write(settings, 'max_body = "1KiB"\nshutdown_timeout = "10s"\n')
    data_dir = str(tmp_path / "data")
    with _supervised(["--config", str(settings)], data_dir) as gateway:
        assert http_post(gateway.address, b"x" * 2048)[0] == 413
        # Keep-alive connections, one request answered on each.  The slow upload
        # goes on one served by worker 0, the first the reload drains.
        conns, first = [], {}
        for n in range(KEEP_ALIVE_CONNECTIONS):
            conns.append(RawConnection(gateway.address))
            conns[-1].send(post_request(b"first %d" % n))
            first[conns[-1].read_response().json()["id"]] = conns[-1]
        on_worker_0 = _wait_stored(data_dir, set(first))[0]
        assert on_worker_0, "the kernel gave worker 0 none of %d connections" % len(first)
        conn = first[sorted(on_worker_0)[0]]
        body = bytes(range(256)) * 4
        request = post_request(body)
        conn.send(request[:len(request) - len(body) + 100])
        _write(settings, 'max_body = "2KiB"\nshutdown_timeout = "10s"\n')
        gateway.send_signal(signal.SIGHUP)
        (reloading,) = _wait_for(gateway, "reloading")
        assert reloading["changed"] == ["max_body"] and reloading["kept"] == {}
        for start in range(100, len(body), 100):
            time.sleep(0.1)
            conn.send(body[start:start + 100])
        answer = conn.read_response()
        # Answered by a draining worker: it closes the connection after the answer.
        assert answer.status == 202 and answer.header("connection") == "close", answer
        slow_id = answer.json()["id"]
        for each in conns:
            each.close()
        _wait_for(gateway, "reloaded", generation=1)
        assert sorted(_pids(gateway, 1)) == [0, 1]
        assert not set(_pids(gateway, 1).values()) & set(_pids(gateway, 0).values())
        new_id = _accepted(gateway, b"y" * 2048)  # the new --max-body
        _wait_stored(data_dir, {slow_id, new_id})
        records = {}
        for i in (0, 1):
            records.update(stored(worker_dir(data_dir, i)))
        assert records[slow_id][1] == body
    assert gateway.returncode == 0


def test_refused_reloads_keep_the_running_workers(tmp_path) -> None:
    settings = tmp_path / "sluice.toml"
    _write(settings, 'max_body = "1KiB"\nworkers = 2\n')
    gateway = GatewayProcess(["--config", str(settings)], data_dir=str(tmp_path / "data"),
                             env={"AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                                  "AWS_EC2_METADATA_DISABLED": "true"})
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "SLUICE_WORKERS"):
        gateway.env.pop(name, None)
    with gateway.start():
        _wait_for(gateway, "supervisor_started")
        pids = _pids(gateway)
        # Refused by the supervisor: not a size.
        _write(settings, 'max_body = "lots"\nworkers = 2\n')
        gateway.send_signal(signal.SIGHUP)
        (failed,) = _wait_for(gateway, "reload_failed")
        assert failed["level"] == "error" and "max_body" in failed["error"]
        assert not gateway.events("reloading")
        # Refused by the first new worker as it starts: the kinesis sink finds no AWS region.
        _write(settings, 'max_body = "2KiB"\nworkers = 2\nsink = "kinesis"\nstream = "logs"\n'
                         'ack = "received"\n')
        gateway.send_signal(signal.SIGHUP)
        _wait_for(gateway, "reload_failed", 2)
        _wait_for(gateway, "started", 2, worker=0)  # worker 0 back on generation 0
        assert _pids(gateway)[1] == pids[1] and not gateway.events("reloaded")
        assert http_post(gateway.address, b"z" * 1024)[0] == 202
        assert http_post(gateway.address, b"z" * 1025)[0] == 413
        # A good one then applies, down to one worker.
        _write(settings, 'max_body = "2KiB"\nworkers = 1\n')
        gateway.send_signal(signal.SIGHUP)
        (reloaded,) = _wait_for(gateway, "reloaded")
        assert reloaded["generation"] == 2 and len(reloaded["pids"]) == 1  # 1 was refused
        assert http_post(gateway.address, b"z" * 2048)[0] == 202
    assert gateway.returncode == 0


def test_workers_drain_when_the_supervisor_is_killed(tmp_path) -> None:
    with _supervised(["--sink", "null"], str(tmp_path / "data")) as gateway:
        pids = _pids(gateway)
        metrics_dir = gateway.events("supervisor_started")[0]["metrics_dir"]
        gateway.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + EVENT_TIMEOUT
        while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in pids.values())
    assert gateway.returncode == -signal.SIGKILL
    assert len(gateway.events("supervisor_lost")) == 2
    assert not os.path.exists(metrics_dir)  # the last worker out removed it


def test_sighup_without_workers_is_a_warning(tmp_path) -> None:
    with GatewayProcess(["--sink", "null"], data_dir=str(tmp_path / "data")).start() as gateway:
        gateway.send_signal(signal.SIGHUP)
        (warning,) = _wait_for(gateway, "reload_unsupported")
        assert warning["level"] == "warning"
        assert http_post(gateway.address, b"still here")[0] == 202
    assert gateway.returncode == 0
