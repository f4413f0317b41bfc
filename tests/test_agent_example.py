"""The agent snippets of docs/operations.md: ``deploy/agent_example.py`` and curl.

:func:`retry_delay` is checked as a pure function; :func:`post_log` and curl
against real gateways: one with access control (a real Redis, a tenant
allowed one request a second) for ``429``, one with a small ring held full by
unfinished uploads for ``503``.  Waits are checked only from below: the agent
waited at least what ``Retry-After`` asked.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import random
import time
from typing import Any, List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deploy.agent_example import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    DEFAULT_MAX_WAIT,
    RETRY_AFTER_JITTER,
    RETRY_STATUSES,
    parse_retry_after,
    post_log,
    retry_delay,
)
from gateway.access import keystore
from tests.support.gateway import (
    RawConnection,
    curl,
    post_request,
    running_gateway,
    wait_for_records,
)
from tests.support.redis import RedisServer, free_port

# A ring of 64 KiB with bodies of at most 27000 bytes: two uploads in
# progress leave less than one more body's worth (as in test_server.py).
SMALL_RING = ["--ring-size", "64KiB", "--max-body", "27000", "--ring-wait", "0"]
SLOT_BODY = 27000
#: The gateway's Retry-After for a full ring with --ring-wait 0 (at least 1 s).
RING_RETRY_AFTER = 1.0
#: Idle keep-alive connections of the small gateway are closed after this.
IDLE_TIMEOUT = 0.2


# -- retry_delay: the decision alone -------------------------------------------------

FINAL_STATUSES = [s for s in range(200, 600) if s not in RETRY_STATUSES]


@given(status=st.sampled_from(FINAL_STATUSES), retry_after=st.one_of(st.none(), st.integers(0, 100).map(str)),
       attempt=st.integers(1, 50), fraction=st.floats(0, 1, exclude_max=True))
def test_final_statuses_are_not_retried(status, retry_after, attempt, fraction):
    assert retry_delay(status, retry_after, attempt, random_fraction=fraction, now=0.0) is None


@given(status=st.sampled_from(sorted(RETRY_STATUSES)), seconds=st.integers(0, int(DEFAULT_MAX_WAIT)),
       attempt=st.integers(1, 50), fraction=st.floats(0, 1, exclude_max=True))
def test_retry_after_is_honoured_with_jitter(status, seconds, attempt, fraction):
    delay = retry_delay(status, str(seconds), attempt, random_fraction=fraction, now=0.0)
    assert delay is not None
    assert seconds <= delay <= seconds + RETRY_AFTER_JITTER


@given(status=st.sampled_from(sorted(RETRY_STATUSES)), extra=st.integers(1, 10**8),
       fraction=st.floats(0, 1, exclude_max=True))
def test_retry_after_beyond_max_wait_gives_up(status, extra, fraction):
    # A used-up monthly quota answers with the seconds until next month.
    assert retry_delay(status, str(int(DEFAULT_MAX_WAIT) + extra), 1, random_fraction=fraction,
                       now=0.0) is None


@given(status=st.sampled_from(sorted(RETRY_STATUSES) + [None]), attempt=st.integers(1, 60),
       fraction=st.floats(0, 1, exclude_max=True))
def test_backoff_without_retry_after_is_jittered_and_capped(status, attempt, fraction):
    # No answer at all (None) never has a Retry-After, whatever was passed.
    retry_after = "5" if status is None else None
    delay = retry_delay(status, retry_after, attempt, random_fraction=fraction, now=0.0)
    assert delay is not None
    assert 0 <= delay <= min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))


def test_retry_after_as_http_date():
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 2, usegmt=True), now) == 2.0
    assert parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now) == 0.0  # past
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after(" 3 ", now) == 3.0


# -- post_log against real gateways --------------------------------------------------


class Sleeps:
    """``sleep`` for post_log: records each delay, runs ``before`` once, then really sleeps."""

    def __init__(self, before=None) -> None:
        self.delays: List[float] = []
        self.before = before

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.before is not None:
            before, self.before = self.before, None
            before()
        time.sleep(seconds)


@pytest.fixture(scope="module")
def limited(redis_module: RedisServer, tmp_path_factory):
    """A gateway with access control on."""
    data_dir = str(tmp_path_factory.mktemp("agent-limited"))
    with running_gateway(["--redis", redis_module.url], data_dir=data_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A gateway whose ring two unfinished uploads fill."""
    data_dir = str(tmp_path_factory.mktemp("agent-small"))
    with running_gateway(SMALL_RING + ["--idle-timeout", "%gs" % IDLE_TIMEOUT], data_dir=data_dir) as proc:
        yield proc


def _stored(outcome) -> str:
    """The record id of a delivered outcome."""
    assert outcome.delivered and outcome.record_id is not None, outcome
    return outcome.record_id


def _key(admin: Any, tenant: str, **limits: Any) -> str:
    return keystore.create_key(admin, tenant, time.time(), **limits).api_key


def test_429_is_retried_after_retry_after(limited, admin):
    key = _key(admin, "agent-rate", requests_per_second=1, burst=1)
    first = post_log(limited.url(), b'{"n":1}', api_key=key)
    assert first.delivered and first.attempts == 1
    sleeps = Sleeps()
    start = time.monotonic()
    second = post_log(limited.url(), b'{"n":2}', api_key=key, sleep=sleeps)
    waited = time.monotonic() - start
    assert second.delivered, second
    assert second.attempts == 2
    assert len(sleeps.delays) == 1 and sleeps.delays[0] >= 1.0  # Retry-After: 1
    assert waited >= 1.0
    records = wait_for_records(limited.data_dir, [_stored(first), _stored(second)])
    meta, body = records[_stored(second)]
    assert body == b'{"n":2}' and meta["tenant"] == "agent-rate"


def test_quota_refusal_is_not_waited_for(limited, admin):
    key = _key(admin, "agent-quota", monthly_records=1)
    assert post_log(limited.url(), b"one", api_key=key).delivered
    sleeps = Sleeps()
    outcome = post_log(limited.url(), b"two", api_key=key, sleep=sleeps)
    assert outcome.status == 429 and outcome.attempts == 1 and sleeps.delays == []
    assert json.loads(outcome.body)["error"] == "quota_exceeded"


@pytest.mark.parametrize("key", [None, "sluice1.agent-unknown." + "A" * 43])
def test_401_is_not_retried(limited, key):
    sleeps = Sleeps()
    outcome = post_log(limited.url(), b"refused", api_key=key, sleep=sleeps)
    assert outcome.status == 401 and outcome.attempts == 1 and sleeps.delays == []


def test_curl_snippet_retries_429(limited, admin):
    key = _key(admin, "agent-curl", requests_per_second=1, burst=1)
    assert post_log(limited.url(), b"first", api_key=key).delivered
    start = time.monotonic()
    transfers, log = curl("--retry", "3", "--retry-max-time", "15",
                          "--header", "Authorization: Bearer " + key,
                          "--header", "Content-Type: application/json",
                          "--data-binary", '{"path":"/users","status":200}', limited.url())
    waited = time.monotonic() - start
    (transfer,) = transfers
    assert transfer.status == 202, log
    # curl writes every attempt's body: the 429's, then the 202's.
    refused, sep, accepted = transfer.body.partition(b"}{")
    assert sep and json.loads(refused + b"}")["error"] == "rate_limited", transfer.body
    record_id = json.loads(b"{" + accepted)["id"]
    assert waited >= 1.0  # curl waited for Retry-After: 1
    wait_for_records(limited.data_dir, [record_id])


def _hold_ring_slot(address, body: bytes) -> RawConnection:
    """A connection whose upload holds a ring slot and is not finished (the 100 proves it)."""
    conn = RawConnection(address)
    conn.send(post_request(body, headers=[("Expect", "100-continue")])[:-len(body)])
    assert conn.read_response().status == 100
    conn.send(body[:100])
    return conn


def test_503_from_a_full_ring_is_retried_after_retry_after(small):
    rng = random.Random(5)
    bodies = [rng.getrandbits(8 * SLOT_BODY).to_bytes(SLOT_BODY, "little") for _ in range(3)]
    holders = [_hold_ring_slot(small.address, body) for body in bodies[:2]]
    held_ids = []

    def finish_uploads() -> None:
        # The first 503 came: let the held uploads end so the ring empties.
        for conn, body in zip(holders, bodies):
            conn.send(body[100:])
            response = conn.read_response()
            assert response.status == 202
            held_ids.append(response.json()["id"])

    sleeps = Sleeps(before=finish_uploads)
    try:
        start = time.monotonic()
        outcome = post_log(small.url(), bodies[2], content_type="application/octet-stream", sleep=sleeps)
        waited = time.monotonic() - start
    finally:
        for conn in holders:
            conn.close()
    assert outcome.delivered, outcome
    assert outcome.attempts == 2 and len(held_ids) == 2
    assert sleeps.delays[0] >= RING_RETRY_AFTER and waited >= RING_RETRY_AFTER
    records = wait_for_records(small.data_dir, held_ids + [_stored(outcome)])
    assert records[_stored(outcome)][1] == bodies[2]


def test_413_is_not_retried(small):
    sleeps = Sleeps()
    outcome = post_log(small.url(), b"x" * (SLOT_BODY + 1), sleep=sleeps)
    assert outcome.status == 413 and outcome.attempts == 1 and sleeps.delays == []


def test_closed_keep_alive_connection_is_reopened_at_once(small):
    conn = http.client.HTTPConnection(small.host, small.port, timeout=15)
    try:
        first = post_log(small.url(), b"first", connection=conn)
        assert first.delivered and conn.sock is not None  # kept alive
        time.sleep(IDLE_TIMEOUT * 3)  # the gateway closes the idle connection
        sleeps = Sleeps()
        second = post_log(small.url(), b"second", connection=conn, sleep=sleeps)
    finally:
        conn.close()
    assert second.delivered, second
    assert sleeps.delays == []  # the stale connection cost no backoff
    wait_for_records(small.data_dir, [_stored(first), _stored(second)])


def test_no_gateway_is_retried_with_backoff_then_given_up():
    sleeps: List[float] = []
    outcome = post_log("http://127.0.0.1:%d/v1/logs" % free_port(), b"lost", max_attempts=4,
                       sleep=sleeps.append)
    assert outcome.status is None and not outcome.delivered and outcome.attempts == 4
    assert len(sleeps) == 3
    assert all(0 <= d <= min(BACKOFF_CAP, BACKOFF_BASE * 2 ** i) for i, d in enumerate(sleeps))


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/v1/logs", "127.0.0.1:8080/v1/logs", "http:///v1/logs"])
def test_only_http_urls_are_taken(url):
    with pytest.raises(ValueError):
        post_log(url, b"never sent")
