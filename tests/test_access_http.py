"""Access control over real sockets: a ``sluice serve --redis`` child and a real Redis.

Every refusal (401, 403, 429) must be decided from the request head: the
client sends ``Expect: 100-continue`` and the answer must come instead of the
``100 Continue``, so the body is never uploaded.  Admitted records carry
their tenant in the stored envelope.  Tenants are distinct per test, so the
tests share one Redis and one gateway.
"""

from __future__ import annotations

import json
import time
from typing import Any, Tuple

import pytest
import trio

from gateway.access import keystore
from gateway.access.limiter import next_month_start
from tests.support.access import assert_no_key, head_only, post, wait_until
from tests.support.gateway import (
    RawConnection,
    chunked_request,
    gateway_in_process,
    get_request,
    running_gateway,
    wait_for_records,
)
from tests.support.redis import RedisServer

KEY_CACHE_TTL = 1.0


@pytest.fixture(scope="module")
def gateway(redis_module: RedisServer, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("access-data"))
    with running_gateway(["--redis", redis_module.url, "--key-cache-ttl", "%gs" % KEY_CACHE_TTL],
                         data_dir=data_dir) as proc:
        yield proc


def new_key(admin: Any, tenant: str, **limits: Any) -> str:
    return keystore.create_key(admin, tenant, time.time(), **limits).api_key


def _error(response, status: int, reason: str) -> dict:
    assert response.status == status, (response.status, response.body)
    assert response.header("content-type") == "application/json"
    assert response.header("connection") == "close"
    doc = json.loads(response.body)
    assert doc["error"] == reason, doc
    return doc


def _refused_from_head(gateway, key, status: int, reason: str, *,
                       header: str = "authorization") -> Tuple[Any, dict]:
    """A head announcing 64 KiB gets ``status`` at once: no 100 Continue, no body sent."""
    response, wire = head_only(gateway.address, key, 64 * 1024, header=header)
    assert b"100 Continue" not in wire
    return response, _error(response, status, reason)


def _stored_id(answer) -> str:
    assert answer.status == 202, (answer.status, answer.response.body)
    assert answer.saw_continue
    return answer.json()["id"]


# -- admitted -----------------------------------------------------------------------


def test_bearer_and_x_api_key_admit_and_the_envelope_names_the_tenant(gateway, admin):
    key = new_key(admin, "ACME")
    ids = [
        _stored_id(post(gateway.address, b'{"n":1}', key)),
        _stored_id(post(gateway.address, b'{"n":2}', key, header="X-API-Key")),
        _stored_id(post(gateway.address, b'{"n":3}', key, header="x-api-key")),
    ]
    with RawConnection(gateway.address) as conn:  # scheme in any case, keep-alive
        for n in (4, 5):
            conn.send(b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nAuthorization: bearer %s\r\n"
                      b"Content-Length: 7\r\n\r\n{\"n\":%d}" % (key.encode(), n))
            response = conn.read_response()
            assert response.status == 202 and response.header("connection") is None
            ids.append(response.json()["id"])
    records = wait_for_records(gateway.data_dir, ids)
    for n, record_id in enumerate(ids, 1):
        meta, body = records[record_id]
        assert meta["tenant"] == "ACME" and body == b'{"n":%d}' % n
    # Leased slices count as used until handed back, within about a second.
    def counted() -> bool:
        usage = keystore.get_usage(admin, "ACME", time.time())
        return (usage.records, usage.bytes) == (5, 35)

    wait_until(counted, what="usage of 5 records, 35 bytes")


def test_health_endpoints_need_no_key(gateway):
    for path, doc in (("/healthz", {"status": "ok"}),
                      ("/readyz", {"status": "ready", "redis": "ok"})):
        with RawConnection(gateway.address) as conn:
            conn.send(get_request(path, close=True))
            response = conn.read_response()
        assert response.status == 200 and response.json() == doc


# -- 401 and 403 --------------------------------------------------------------------


def test_missing_malformed_unknown_and_revoked_keys_get_401_before_the_body(gateway, admin):
    revoked = new_key(admin, "REVOKED")
    keystore.revoke_key(admin, revoked, time.time())
    new_key(admin, "KNOWN")
    cases = [
        None,  # no key at all
        "",  # X-API-Key without a value
        "not-a-key",
        "sluice1.KNOWN.short",
        keystore.new_api_key("KNOWN"),  # well formed, never created
        keystore.new_api_key("NOBODY"),  # no such tenant
        revoked,
    ]
    for key in cases:
        response, doc = _refused_from_head(gateway, key, 401, "unauthorized",
                                           header="x-api-key" if key == "" else "authorization")
        assert response.header("www-authenticate") == 'Bearer realm="sluice"'
        assert_no_key(response.body.decode())


def test_revocation_takes_effect_within_the_key_cache_ttl(gateway, admin):
    key = new_key(admin, "REVOKE-LATER")
    _stored_id(post(gateway.address, b"before", key))
    revoked_at = time.monotonic()
    keystore.revoke_key(admin, key, time.time())
    wait_until(lambda: post(gateway.address, b"after", key).status == 401,
               timeout=KEY_CACHE_TTL + 2.0, what="401 after revocation")
    assert time.monotonic() - revoked_at <= KEY_CACHE_TTL + 2.0
    _refused_from_head(gateway, key, 401, "unauthorized")


def test_disabled_tenant_gets_403_until_enabled_again(gateway, admin):
    key = new_key(admin, "PAUSED")
    _stored_id(post(gateway.address, b"x", key))
    keystore.set_enabled(admin, "PAUSED", False)
    _, doc = _refused_from_head(gateway, key, 403, "forbidden")
    assert "PAUSED" in doc["message"]
    keystore.set_enabled(admin, "PAUSED", True)
    wait_until(lambda: post(gateway.address, b"y", key).status == 202,
               timeout=KEY_CACHE_TTL + 2.0, what="202 after enabling")


# -- 429 -----------------------------------------------------------------------------


def _rate_headers(response) -> Tuple[int, int, int, int]:
    values = [response.header(name) for name in
              ("retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")]
    assert all(v is not None and v.isdigit() for v in values), response.headers
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def test_request_rate_limit_gets_429_with_retry_after_and_ratelimit_headers(gateway, admin):
    key = new_key(admin, "BURSTY", requests_per_second=0.5, burst=3)
    for n in range(3):
        _stored_id(post(gateway.address, b"%d" % n, key))
    response, doc = _refused_from_head(gateway, key, 429, "rate_limited")
    retry_after, limit, remaining, reset = _rate_headers(response)
    assert 1 <= retry_after <= 2  # one request every 2 s, rounded up
    assert (limit, remaining) == (3, 0) and reset >= 1
    assert "quota" not in doc
    # Answered from the tenant's cached refusal too: the same headers.
    response, _ = _refused_from_head(gateway, key, 429, "rate_limited")
    assert 1 <= _rate_headers(response)[0] <= 2


def test_byte_rate_limit_charges_the_declared_content_length(gateway, admin):
    key = new_key(admin, "BYTES", bytes_per_second=100, burst_bytes=1000)
    _stored_id(post(gateway.address, b"a" * 900, key))
    # 900 of 1000 bytes used: a head announcing more than 100 bytes is refused
    # without its body, and the wait covers the missing bytes at 100 B/s.
    response, wire = head_only(gateway.address, key, 600)
    assert b"100 Continue" not in wire
    _error(response, 429, "rate_limited")
    retry_after, limit, _, _ = _rate_headers(response)
    assert limit == 1000 and 4 <= retry_after <= 6
    _stored_id(post(gateway.address, b"b" * 50, key))  # a small one still fits


def test_monthly_record_quota_gets_429_naming_the_quota_and_its_reset(gateway, admin):
    key = new_key(admin, "MONTHLY", monthly_records=2)
    for _ in range(2):
        _stored_id(post(gateway.address, b"r", key))
    response, doc = _refused_from_head(gateway, key, 429, "quota_exceeded")
    now = time.time()
    assert doc["quota"] == "monthly_records"
    assert doc["resets_at"] == next_month_start(now)
    retry_after = int(response.header("retry-after") or "0")
    assert 1 <= retry_after and abs(retry_after - (doc["resets_at"] - now)) < 60


def test_monthly_byte_quota(gateway, admin):
    key = new_key(admin, "MONTHLY-BYTES", monthly_bytes=100)
    _stored_id(post(gateway.address, b"m" * 60, key))
    response, wire = head_only(gateway.address, key, 41)
    assert b"100 Continue" not in wire
    assert _error(response, 429, "quota_exceeded")["quota"] == "monthly_bytes"
    _stored_id(post(gateway.address, b"m" * 40, key))  # exactly the quota
    assert keystore.get_usage(admin, "MONTHLY-BYTES", time.time()).bytes == 100


# -- what is charged -----------------------------------------------------------------


def test_chunked_body_counts_its_size_once_stored(gateway, admin):
    key = new_key(admin, "CHUNKED")
    pieces = [b"x" * 1000, b"y" * 234]
    with RawConnection(gateway.address) as conn:
        conn.send(chunked_request(pieces, headers=[("Authorization", "Bearer " + key)]))
        response = conn.read_response()
    assert response.status == 202, response.body
    meta, body = wait_for_records(gateway.data_dir, [response.json()["id"]])[response.json()["id"]]
    assert meta["tenant"] == "CHUNKED" and body == b"".join(pieces)

    def usage() -> Tuple[int, int]:
        found = keystore.get_usage(admin, "CHUNKED", time.time())
        return found.records, found.bytes

    wait_until(lambda: usage() == (1, 1234), timeout=10, what="chunked usage in Redis")


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_byte_rate_holds_for_chunked_bodies_as_for_content_length(gateway, admin, framing):
    """Twenty 100 kB posts against 1,000 B/s: the first is stored, the rest get 429.

    A chunked body is admitted as 0 bytes (its size is unknown), then charged
    once stored: the tenant is in debt until the bytes are paid for.
    """
    tenant = "DEBT-" + framing
    key = new_key(admin, tenant, bytes_per_second=1000, burst_bytes=1000)
    body = b"d" * 100_000
    statuses = []
    answers = []
    for _ in range(20):
        with RawConnection(gateway.address) as conn:
            if framing == "chunked":
                conn.send(chunked_request([body[:50_000], body[50_000:]],
                                          headers=[("Authorization", "Bearer " + key)]))
            else:
                conn.send(post_request_head(key, len(body)) + body)
            response = conn.read_response()
        statuses.append(response.status)
        answers.append(response)
    assert statuses == [202] + [429] * 19, statuses
    refused = answers[-1]
    assert json.loads(refused.body)["error"] == "rate_limited"
    # The debt: 100 kB at 1,000 B/s less the 1,000-byte burst, about 99 s.
    assert 90 <= int(refused.header("retry-after") or "0") <= 100
    assert keystore.get_usage(admin, tenant, time.time()).bytes == len(body)


def test_request_not_stored_is_not_counted(gateway, admin):
    key = new_key(admin, "ABORTED")
    _stored_id(post(gateway.address, b"kept", key))
    with RawConnection(gateway.address) as conn:  # admitted, then the client gives up
        conn.send(post_request_head(key, 1000) + b"only part of it")
    # The check counted 1 record and 1000 bytes; the failed upload gives them back.

    def usage() -> Tuple[int, int]:
        found = keystore.get_usage(admin, "ABORTED", time.time())
        return found.records, found.bytes

    wait_until(lambda: usage() == (1, 4), timeout=10, what="usage taken back")


def post_request_head(key: str, length: int) -> bytes:
    return (b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\n" % (key.encode(), length))


# -- in process: counters ------------------------------------------------------------


async def test_statistics_count_checks_and_hold_no_key(redis_module, admin, tmp_path):
    key = new_key(admin, "STATS")
    args = ["--redis", redis_module.url, "--sink", "null"]
    async with gateway_in_process(args, data_dir=str(tmp_path)) as (gw, port):
        address = ("127.0.0.1", port)
        for _ in range(3):
            assert (await trio.to_thread.run_sync(post, address, b"s", key)).status == 202
        answer = await trio.to_thread.run_sync(post, address, b"s", keystore.new_api_key("STATS"))
        assert answer.status == 401
        stats = gw.statistics()["access"]
    assert stats["redis_state"] == "ok"
    assert (stats["checks"], stats["admitted"], stats["refused"]) == (4, 3, 1)
    assert_no_key(repr(stats), key)


# -- last: nothing above printed a key ------------------------------------------------


def test_no_key_in_the_gateway_output(gateway):
    text = gateway.stderr
    assert gateway.started["access"].startswith("access control on (Redis redis://127.0.0.1:")
    assert_no_key(text)
