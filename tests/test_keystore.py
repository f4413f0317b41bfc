"""The check script and the admin commands against a real Redis (and TLS)."""

from __future__ import annotations

import calendar
import json
import os
import subprocess
import sys
from typing import Any, Iterator, List

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.access import keystore
from gateway.access.keystore import RedisEdge
from gateway.access.limiter import (
    Decision,
    check_call,
    gcra,
    parse_api_key,
    usage_name,
)
from gateway.cli import admin as admin_cli
from gateway.errors import QuotaExceeded
from tests.support.redis import RedisServer, redis_server, tls_redis_server  # noqa: F401

T0 = 1_700_000_000.0


def utc(*fields: int) -> float:
    return float(calendar.timegm(tuple(fields) + (0,) * (6 - len(fields))))


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Any]:  # noqa: F811
    c = keystore.connect(redis_server.url)
    yield c
    c.close()


@pytest.fixture
def edge(redis_server: RedisServer) -> Iterator[RedisEdge]:  # noqa: F811
    e = RedisEdge(redis_server.url)
    e.probe()
    yield e
    e.close()


def check(edge: RedisEdge, api_key: str, body: int, now: float) -> Decision:
    parsed = parse_api_key(api_key)
    assert parsed is not None
    (reply,), _, _ = edge.run_checks([check_call(parsed, body, now)])
    from gateway.access.limiter import decide
    return decide(reply, parsed.tenant, now)  # type: ignore[arg-type]


def test_keys_are_stored_only_as_hashes(client: Any) -> None:
    created = keystore.create_key(client, "ACME", T0, requests_per_second=5)
    secret = created.api_key.rsplit(".", 1)[1]
    assert created.api_key not in repr(created)
    dump: List[bytes] = []
    for name in client.scan_iter("*"):
        dump.append(name)
        kind = client.type(name)
        if kind == b"hash":
            dump.extend(v for kv in client.hgetall(name).items() for v in kv)
        elif kind == b"set":
            dump.extend(client.smembers(name))
    blob = b" ".join(dump)
    assert secret.encode() not in blob
    parsed = parse_api_key(created.api_key)
    assert parsed is not None and parsed.key_hash.encode() in blob


def test_rate_limit_and_burst(client: Any, edge: RedisEdge) -> None:
    key = keystore.create_key(client, "ACME", T0, requests_per_second=2, burst=3).api_key
    decisions = [check(edge, key, 10, T0) for _ in range(4)]
    assert [d.outcome for d in decisions] == ["ok", "ok", "ok", "rate"]
    assert [d.remaining for d in decisions[:3]] == [2, 1, 0]
    refused = decisions[3]
    assert refused.which == "requests" and refused.limit == 3
    assert refused.retry_after == pytest.approx(0.5, abs=1e-5)
    assert check(edge, key, 10, T0 + 0.25).outcome == "rate"
    assert check(edge, key, 10, T0 + 0.5).outcome == "ok"


def test_bytes_limit(client: Any, edge: RedisEdge) -> None:
    key = keystore.create_key(client, "ACME", T0, bytes_per_second=1000).api_key
    assert keystore.get_tenant(client, "ACME").limits.burst_bytes == 1000  # type: ignore
    assert check(edge, key, 600, T0).admitted
    refused = check(edge, key, 600, T0)
    assert (refused.outcome, refused.which, refused.limit) == ("rate", "bytes", 1000)
    assert refused.retry_after == pytest.approx(0.2, abs=1e-5)
    assert check(edge, key, 400, T0).admitted
    assert check(edge, key, 600, T0 + 0.6).admitted


def test_monthly_quotas_reset_with_the_utc_month(client: Any, edge: RedisEdge) -> None:
    key = keystore.create_key(client, "ACME", T0, monthly_records=3,
                              monthly_bytes=250).api_key
    dec = utc(2023, 12, 31, 23, 59)
    assert [check(edge, key, 100, dec).outcome for _ in range(3)] == ["ok", "ok", "quota"]
    refused = check(edge, key, 100, dec)
    assert refused.which == "monthly_bytes" and refused.resets_at == utc(2024, 1, 1)
    assert check(edge, key, 50, dec).admitted  # 250 bytes exactly
    records = check(edge, key, 0, dec)
    assert records.which == "monthly_records" and records.retry_after == pytest.approx(60)
    error = records.error()
    assert isinstance(error, QuotaExceeded)
    assert (error.quota, error.resets_at) == ("monthly_records", utc(2024, 1, 1))
    jan = utc(2024, 1, 1, 0, 0, 1)
    assert check(edge, key, 100, jan).admitted
    usage = keystore.get_usage(client, "ACME", dec)
    assert (usage.month, usage.records, usage.bytes) == ("202312", 3, 250)
    assert keystore.get_usage(client, "ACME", jan).records == 1
    ttl = client.ttl(usage_name("ACME", "202312"))
    assert 400 * 86400 <= ttl <= 401 * 86400


def test_unknown_revoked_and_disabled(client: Any, edge: RedisEdge) -> None:
    key = keystore.create_key(client, "ACME", T0).api_key
    other = keystore.create_key(client, "ACME", T0).api_key
    assert check(edge, key, 1, T0).admitted
    assert check(edge, keystore.new_api_key("ACME"), 1, T0).outcome == "unknown"
    assert check(edge, keystore.new_api_key("Nobody"), 1, T0).outcome == "unknown"
    assert keystore.revoke_key(client, key, T0) is not None
    assert check(edge, key, 1, T0).outcome == "revoked"
    assert keystore.set_enabled(client, "ACME", False)
    assert check(edge, other, 1, T0).outcome == "disabled"
    assert keystore.set_enabled(client, "ACME", True)
    assert check(edge, other, 1, T0).admitted
    assert not keystore.set_enabled(client, "Nobody", True)


def test_noscript_is_reloaded_after_script_flush(client: Any, edge: RedisEdge) -> None:
    key = parse_api_key(keystore.create_key(client, "ACME", T0).api_key)
    assert key is not None
    client.script_flush()
    replies, pipelines, loads = edge.run_checks([check_call(key, 1, T0),
                                                 check_call(key, 1, T0)])
    assert (pipelines, loads) == (2, 1)  # the batch, SCRIPT LOAD, the batch again
    assert [r[0] for r in replies] == [b"ok", b"ok"]  # type: ignore[index]
    assert keystore.get_usage(client, "ACME", T0).records == 2
    assert edge.run_checks([check_call(key, 1, T0)])[1] == 1


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rps=st.floats(0.5, 100), burst=st.integers(1, 10), bps=st.floats(10, 10_000),
       steps=st.lists(st.tuples(st.floats(0, 0.5), st.integers(0, 3000)), max_size=25))
def test_script_agrees_with_python_gcra(client: Any, edge: RedisEdge, rps: float, burst: int,
                                        bps: float, steps: List[tuple]) -> None:
    client.flushdb()
    key = keystore.create_key(client, "ACME", T0, requests_per_second=rps, burst=burst,
                              bytes_per_second=bps, burst_bytes=2000).api_key
    tenant = keystore.get_tenant(client, "ACME")
    assert tenant is not None  # rates as stored, for the Python side to use the same
    rps, bps = tenant.limits.requests_per_second, tenant.limits.bytes_per_second
    now, rtat, btat = T0, 0.0, 0.0
    for gap, cost in steps:
        now += gap
        r = gcra(rtat, rps, burst, 1, now)
        b = gcra(btat, bps, 2000, cost, now)
        d = check(edge, key, cost, now)
        assert d.admitted == (r.allowed and b.allowed)
        if d.admitted:
            rtat, btat = r.tat, b.tat
            assert d.remaining == r.remaining
        else:
            worst = r if not r.allowed and (b.allowed or r.retry_after >= b.retry_after) else b
            assert d.retry_after == pytest.approx(worst.retry_after, rel=1e-9, abs=1e-9)
            assert d.remaining == worst.remaining


# -- admin commands --------------------------------------------------------------

def cli(capsys: Any, *argv: str) -> tuple:
    status = admin_cli.main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_admin_create_list_revoke(redis_server: RedisServer, capsys: Any,  # noqa: F811
                                  edge: RedisEdge) -> None:
    url = ["--redis", redis_server.url]
    status, out, _ = cli(capsys, "keys", "create", "--tenant", "ACME", "--requests-per-second",
                         "50", "--monthly-records", "1000", *url)
    assert status == 0
    key = out.strip().splitlines()[-1]
    assert parse_api_key(key) is not None and check(edge, key, 1, T0).admitted
    _, out2, _ = cli(capsys, "keys", "create", "--tenant", "ACME", *url)
    key2 = out2.strip().splitlines()[-1]
    _, listing, _ = cli(capsys, "keys", "list", *url)
    _, as_json, _ = cli(capsys, "keys", "list", "--tenant", "ACME", "--json", *url)
    rows = [json.loads(line) for line in as_json.splitlines()]
    assert len(rows) == 2 and {r["status"] for r in rows} == {"active"}
    assert rows[0]["requests_per_second"] == 50 and rows[0]["burst"] == 50
    for text in (listing, as_json):
        for secret in (key, key2):
            assert secret.rsplit(".", 1)[1] not in text
    assert all(r["key_id"] in listing for r in rows)

    assert cli(capsys, "keys", "revoke", key, *url)[0] == 0
    assert check(edge, key, 1, T0).outcome == "revoked"
    status, _, err = cli(capsys, "keys", "revoke", keystore.new_api_key("ACME"), *url)
    assert status == 1 and "no such key" in err
    key_id = [r["key_id"] for r in rows if r["key_id"] not in out][0]
    assert cli(capsys, "keys", "revoke", "--tenant", "ACME", "--key-id", key_id, *url)[0] == 0
    assert check(edge, key2, 1, T0).outcome == "revoked"
    _, as_json, _ = cli(capsys, "keys", "list", "--json", *url)
    assert {json.loads(line)["status"] for line in as_json.splitlines()} == {"revoked"}


def test_admin_tenants_and_usage(redis_server: RedisServer, capsys: Any,  # noqa: F811
                                 edge: RedisEdge, monkeypatch: Any) -> None:
    monkeypatch.setenv(admin_cli.REDIS_URL_ENV, redis_server.url)
    status, out, _ = cli(capsys, "keys", "create", "--tenant", "ACME")
    key = out.strip().splitlines()[-1]
    assert status == 0
    assert cli(capsys, "tenants", "set-limits", "--tenant", "ACME", "--monthly-bytes",
               "100", "--bytes-per-second", "1e6")[0] == 0
    _, shown, _ = cli(capsys, "tenants", "show", "--tenant", "ACME", "--json")
    assert json.loads(shown) == dict(
        tenant="ACME", enabled=True, requests_per_second=0.0, burst=0,
        bytes_per_second=1e6, burst_bytes=1000000, monthly_records=0, monthly_bytes=100)
    now = __import__("time").time()
    assert check(edge, key, 60, now).admitted
    assert check(edge, key, 60, now).outcome == "quota"
    _, usage, _ = cli(capsys, "keys", "show-usage", "--tenant", "ACME", "--json")
    assert json.loads(usage)["bytes"] == 60 and json.loads(usage)["monthly_bytes"] == 100
    assert cli(capsys, "tenants", "disable", "--tenant", "ACME")[0] == 0
    assert check(edge, key, 1, now).outcome == "disabled"
    assert cli(capsys, "tenants", "enable", "--tenant", "ACME")[0] == 0
    assert cli(capsys, "tenants", "disable", "--tenant", "Nobody")[0] == 1
    assert cli(capsys, "tenants", "list")[1].split() == ["ACME"]
    with pytest.raises(SystemExit):
        admin_cli.main(["keys", "create", "--tenant", "bad{tag}"])
    with pytest.raises(SystemExit):
        admin_cli.main(["tenants", "set-limits", "--tenant", "ACME", "--burst", "-1"])


def test_admin_unreachable_redis_hides_password(capsys: Any) -> None:
    from tests.support.redis import free_port
    url = "redis://admin:hunter2@127.0.0.1:%d/0" % free_port()
    status, _, err = cli(capsys, "tenants", "list", "--redis", url)
    assert status == 1 and "cannot reach Redis" in err and "hunter2" not in err


def test_module_entry_point_reads_key_from_stdin(redis_server: RedisServer) -> None:  # noqa: F811
    env = dict(os.environ, SLUICE_REDIS_URL=redis_server.url)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = lambda *a, **kw: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "gateway.cli.admin", *a], cwd=root, env=env,
        capture_output=True, text=True, timeout=60, **kw)
    created = run("keys", "create", "--tenant", "ACME")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    revoked = run("keys", "revoke", "-", input=key + "\n")
    assert revoked.returncode == 0 and key not in revoked.stdout + revoked.stderr


def test_tls(tls_redis_server: RedisServer, capsys: Any) -> None:  # noqa: F811
    url = tls_redis_server.tls_url
    status, out, _ = cli(capsys, "keys", "create", "--tenant", "ACME", "--burst", "1",
                         "--requests-per-second", "1", "--redis", url)
    assert status == 0
    edge = RedisEdge(url)
    try:
        edge.probe()
        key = out.strip().splitlines()[-1]
        assert check(edge, key, 1, T0).admitted
        assert check(edge, key, 1, T0).outcome == "rate"
    finally:
        edge.close()
    plain = keystore.connect("redis://127.0.0.1:%d/0" % tls_redis_server.tls_port,
                             socket_timeout=2)
    with pytest.raises(redis.exceptions.ConnectionError):  # the TLS port wants TLS
        plain.ping()


def _other_name(url: str) -> str:
    """The TLS URL under a name its certificate (made for 127.0.0.1 only) does not carry."""
    return url.replace("rediss://127.0.0.1:", "rediss://localhost:", 1)


def test_tls_refuses_a_certificate_for_another_name(tls_redis_server: RedisServer,  # noqa: F811
                                                    capsys: Any) -> None:
    """The chain is trusted (ssl_ca_certs), the name is not: no connection, a clear reason."""
    import trio

    from gateway.access.keystore import EdgeUnavailable
    from gateway.access.redis_trio import AsyncRedisEdge

    url = _other_name(tls_redis_server.tls_url)
    with pytest.raises(redis.exceptions.ConnectionError) as caught:  # the admin client
        keystore.connect(url, socket_timeout=5).ping()
    assert keystore.edge_failure(caught.value).startswith("TLS certificate not accepted")
    status, _, err = cli(capsys, "tenants", "list", "--redis", url)
    assert status == 1 and "TLS certificate not accepted" in err and "mismatch" in err, err
    edge = RedisEdge(url)  # the thread edge (also the Cluster's)
    try:
        with pytest.raises(EdgeUnavailable, match="TLS certificate not accepted.*mismatch"):
            edge.probe()
    finally:
        edge.close()

    async def probe_async() -> None:
        async_edge = AsyncRedisEdge(url, socket_timeout=5)
        try:
            await async_edge.probe()
        finally:
            async_edge.close()

    with pytest.raises(EdgeUnavailable, match="TLS certificate not accepted.*mismatch"):
        trio.run(probe_async)
    # Checking can be switched off only in so many words.
    edge = RedisEdge(url + "&ssl_check_hostname=false")
    try:
        edge.probe()
    finally:
        edge.close()


@pytest.mark.parametrize("url", ["redis://:hunter2/x@127.0.0.1:6379/0",
                                 "redis://u:hunter2#x@127.0.0.1:6379/0",
                                 "redis://:hunter2@127.0.0.1:hunter2/0"])
def test_an_unparsable_url_never_echoes_its_password(url: str, capsys: Any) -> None:
    from gateway.access.redis_trio import AsyncRedisEdge
    from gateway.config.settings import parse_redis_url

    for attempt in (lambda: parse_redis_url(url), lambda: AsyncRedisEdge(url),
                    lambda: keystore.connect(url)):
        try:
            attempt()
        except ValueError as exc:
            assert "hunter2" not in str(exc) and "not a Redis URL" in str(exc)
    status, _, err = cli(capsys, "tenants", "list", "--redis", url)
    assert status in (1, 2) and "hunter2" not in err
    assert "visible to other local users" in err  # a password on the command line
