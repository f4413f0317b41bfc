"""``sluice keys``/``sluice tenants`` and ``sluice serve --redis`` as an operator runs them.

The commands run as child processes (``python -m gateway ...``) on the
interpreter running the tests, against a real Redis; the keys they create are
used against a real gateway.  Bad access settings stop ``serve`` at start with
one line naming the flag.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Any, List

import pytest

from gateway.access import keystore
from tests.support.access import KEY_PATTERN, assert_no_key, post, sluice, wait_until
from tests.support.gateway import RawConnection, get_request, log_events, running_gateway
from tests.support.redis import (
    free_port,
    running_cluster,
    running_redis,
    running_tls_redis,
)


def _ok(result) -> str:
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def test_keys_create_prints_a_key_that_a_gateway_accepts(redis_module, tmp_path):
    url = redis_module.url
    out = _ok(sluice("keys", "create", "--redis", url, "--tenant", "CLI", "--requests-per-second",
                     "100", "--burst", "50", "--monthly-records", "1000"))
    key = out.splitlines()[-1]
    assert KEY_PATTERN.fullmatch(key), out
    assert out.count(key) == 1  # shown once

    with running_gateway(["--redis", url, "--key-cache-ttl", "1s"],
                         data_dir=str(tmp_path / "data")) as gateway:
        answer = post(gateway.address, b'{"hello":"cli"}', key)
        assert answer.status == 202, answer.response.body

        listing = _ok(sluice("keys", "list", "--redis", url))
        as_json = _ok(sluice("keys", "list", "--redis", url, "--tenant", "CLI", "--json"))
        assert "CLI" in listing and "active" in listing
        (entry,) = [json.loads(line) for line in as_json.splitlines()]
        assert entry["key_id"] in listing and entry["requests_per_second"] == 100
        for text in (listing, as_json):
            assert_no_key(text, key.split(".")[-1])

        usage = _ok(sluice("keys", "show-usage", "--redis", url, "--tenant", "CLI"))
        assert "records: 1 of 1000" in usage and "bytes: 15 of unlimited" in usage

        _ok(sluice("tenants", "set-limits", "--redis", url, "--tenant", "CLI",
                   "--monthly-records", "1"))
        refused = post(gateway.address, b"over", key)
        assert refused.status == 429 and refused.json()["quota"] == "monthly_records"
        assert not refused.saw_continue

        revoked = _ok(sluice("keys", "revoke", "-", "--redis", url, stdin=key.encode() + b"\n"))
        assert entry["key_id"] in revoked
        # The tenant's quota refusal is remembered up to --key-cache-ttl; then
        # Redis is asked again and says revoked.
        wait_until(lambda: post(gateway.address, b"x", key).status == 401, timeout=5,
                   what="401 after revoke")
        listing = _ok(sluice("keys", "list", "--redis", url, "--tenant", "CLI"))
        assert "revoked" in listing
        stderr = gateway.stderr
    assert_no_key(stderr)


def test_one_environment_variable_serves_the_commands_and_the_gateway(redis_module, tmp_path):
    env = {"SLUICE_REDIS_URL": redis_module.url}
    key = _ok(sluice("keys", "create", "--tenant", "ENV", env=env)).splitlines()[-1]
    assert "ENV" in _ok(sluice("tenants", "list", env=env))
    with running_gateway([], data_dir=str(tmp_path / "data"), env=env) as gateway:
        assert gateway.started["access"] == "access control on (Redis %s, on failure closed)" % (
            redis_module.url)
        assert gateway.started["config"]["redis"] == redis_module.url
        assert post(gateway.address, b"e", key).status == 202
        assert post(gateway.address, b"e", None).status == 401


def test_startup_line_hides_the_password(tmp_path):
    with running_redis() as server:
        admin = server.client()
        admin.config_set("requirepass", "s3cret-pw")
        admin.close()
        url = "redis://:s3cret-pw@127.0.0.1:%d/0" % server.port
        key = _ok(sluice("keys", "create", "--redis", url, "--tenant", "PW")).splitlines()[-1]
        wrong = sluice("keys", "list", "--redis", url.replace("s3cret-pw", "wrong-pw"))
        assert wrong.returncode == 1 and b"wrong-pw" not in wrong.stderr
        with running_gateway(["--redis", url], data_dir=str(tmp_path / "data")) as gateway:
            assert post(gateway.address, b"p", key).status == 202
            stderr = gateway.stderr
    started = log_events(stderr, "started")[0]
    assert "Redis redis://***@127.0.0.1:%d/0" % server.port in started["access"]
    assert started["config"]["redis"] == "redis://***@127.0.0.1:%d/0" % server.port
    assert_no_key(stderr, "s3cret-pw")


def test_redis_unreachable_at_start_serves_nothing_until_it_answers(tmp_path):
    port = free_port()
    with running_gateway(["--redis", "redis://127.0.0.1:%d/0" % port],
                         data_dir=str(tmp_path / "data")) as gateway:
        with RawConnection(gateway.address) as conn:
            conn.send(get_request("/readyz", close=True))
            response = conn.read_response()
        doc = response.json()
        assert response.status == 503 and doc["redis"] == "down", doc
        assert doc["reason"].startswith("access control: Redis unreachable")
        answer = post(gateway.address, b"x", keystore.new_api_key("LATE"))
        assert answer.status == 503 and answer.json()["error"] == "access_unavailable"
        assert int(answer.header("retry-after") or "0") >= 1
        with RawConnection(gateway.address) as conn:
            conn.send(get_request("/healthz", close=True))
            assert conn.read_response().status == 200
        # The event was written before /readyz said "down"; the reader thread may lag.
        wait_until(lambda: gateway.events("redis_down"), timeout=10, what="the redis_down event")
        (down,) = gateway.events("redis_down")
        assert down["detail"].startswith("Redis unreachable (ConnectionError)"), down


def _one_line(result) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == 2 and result.stdout == b"", stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sluice: error: "), stderr
    return lines[0][len("sluice: error: "):]


BAD_SETTINGS = [
    (["--on-redis-failure", "open"], {}, "--on-redis-failure: needs --redis"),
    (["--redis-cluster"], {}, "--redis-cluster: needs --redis"),
    ([], {"SLUICE_INSTANCE_COUNT": "3"}, "SLUICE_INSTANCE_COUNT: needs --redis"),
    (["--redis", "http://127.0.0.1:6379"], {}, "--redis: must start with"),
    (["--redis", "redis://:pw@127.0.0.1:port/0"], {}, "--redis: not a Redis URL"),
    ([], {"SLUICE_REDIS_URL": "rediss://127.0.0.1/0?ssl_ca_certs=/no/such/ca.pem"},
     "SLUICE_REDIS_URL: ssl_ca_certs: no such file"),
    (["--redis", "redis://127.0.0.1/0", "--on-redis-failure", "maybe"], {},
     "--on-redis-failure: must be one of closed, open"),
    (["--redis", "redis://127.0.0.1/0", "--redis-timeout", "0"], {}, "--redis-timeout: must be at least"),
    (["--redis", "redis://127.0.0.1/0", "--instance-count", "0"], {}, "--instance-count: must be at least"),
    (["--redis", "unix:///tmp/redis.sock", "--redis-cluster"], {}, "--redis-cluster: Redis Cluster needs"),
]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> List[Any]:
    """Every start of BAD_SETTINGS, run side by side (each is an interpreter start)."""
    base = tmp_path_factory.mktemp("access-refusals")

    def run(n: int) -> Any:
        args, env, _ = BAD_SETTINGS[n]
        return sluice("serve", "--listen", "127.0.0.1:0", "--data-dir", str(base / str(n)),
                      *args, env=env)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(run, range(len(BAD_SETTINGS))))


@pytest.mark.parametrize("n", range(len(BAD_SETTINGS)), ids=[b[2].split(":")[0] + "-%d" % i
                                                             for i, b in enumerate(BAD_SETTINGS)])
def test_bad_access_settings_refused_at_start(refusals, n: int):
    line = _one_line(refusals[n])
    assert line.startswith(BAD_SETTINGS[n][2]), line
    assert "pw@" not in line


def test_admin_commands_in_help():
    text = _ok(sluice("--help"))
    assert "keys" in text and "tenants" in text
    text = _ok(sluice("keys", "create", "--help"))
    for flag in ("--tenant", "--redis", "--redis-cluster", "--requests-per-second", "--burst",
                 "--bytes-per-second", "--monthly-bytes", "--monthly-records"):
        assert flag in text, flag


def test_admin_cluster_flag_from_the_environment(tmp_path):
    # A single server is not a cluster: the variable must reach the client,
    # which then fails cleanly rather than quietly using plain Redis.
    with running_redis() as server:
        result = sluice("keys", "list", "--redis", server.url, env={"SLUICE_REDIS_CLUSTER": "1"})
    assert result.returncode == 1, result.stderr
    assert b"Traceback" not in result.stderr and b"cannot reach Redis" in result.stderr


def test_gateway_on_a_redis_cluster_and_over_tls(tmp_path):
    with running_cluster() as cluster:
        node = "redis://127.0.0.1:%d/0" % cluster.nodes[1].port
        keys = [_ok(sluice("keys", "create", "--redis", node, "--redis-cluster", "--tenant",
                           "C%d" % n)).splitlines()[-1] for n in range(6)]
        with running_gateway(["--redis", node, "--redis-cluster", "--sink", "null"],
                             data_dir=str(tmp_path / "cluster")) as gateway:
            assert gateway.started["access"].startswith("access control on (Redis Cluster %s" % node)
            assert [post(gateway.address, b"c", key).status for key in keys] == [202] * 6
        usage = _ok(sluice("keys", "show-usage", "--redis", cluster.url, "--tenant", "C3"))
        assert "records: 1 of unlimited" in usage
    with running_tls_redis() as server:
        key = _ok(sluice("keys", "create", "--redis", server.tls_url, "--tenant", "TLS")).splitlines()[-1]
        with running_gateway([], env={"SLUICE_REDIS_URL": server.tls_url},
                             data_dir=str(tmp_path / "tls")) as gateway:
            assert gateway.started["access"].startswith("access control on (Redis rediss://")
            assert post(gateway.address, b"t", key).status == 202
        # The same server under a name its certificate does not carry: refused at
        # start, and the log says why.
        other = server.tls_url.replace("rediss://127.0.0.1:", "rediss://localhost:", 1)
        with running_gateway([], env={"SLUICE_REDIS_URL": other},
                             data_dir=str(tmp_path / "tls-other")) as gateway:
            (down,) = gateway.events("redis_down")
            assert "TLS certificate not accepted" in down["detail"], down
            assert "mismatch" in down["detail"], down
            assert post(gateway.address, b"t", key).status == 503
