"""The sinks' event-loop HTTP edge (sinks/aws/trio_http.py): botocore's SigV4, h11 on Trio streams."""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
import socket
import threading

import pytest
import trio
from botocore.credentials import Credentials

from sinks.aws.errors import CredentialsError, TransientError
from sinks.aws.http import BotocoreEndpoint
from sinks.aws.trio_http import HASH_SLICE, TrioEndpoint, _sha256_hex, open_trio_endpoint
from tests.support.kinesis import (  # noqa: F401 - fixtures
    CredentialsSession,
    Plan,
    aws_env_fixture,
    expiring_credentials,
    fault_server_fixture,
    moto_fixture,
    read_stream,
)

TARGET = "Kinesis_20131202.PutRecords"


def body(stream="logs", datas=(b"hello",)) -> memoryview:
    """A PutRecords body, as a memoryview like the sink's batch buffers."""
    doc = {"StreamName": stream, "Records": [
        {"Data": base64.b64encode(data).decode(), "PartitionKey": "key"} for data in datas]}
    return memoryview(bytearray(json.dumps(doc).encode()))


def _endpoint(url, credentials=None, **options) -> TrioEndpoint:
    credentials = credentials or Credentials("AKIDEXAMPLE", "s3cret")
    return TrioEndpoint(CredentialsSession(credentials), url, "us-east-1", "kinesis", **options)


async def test_requests_are_signed_and_the_body_arrives_whole(fault_server, aws_env, monkeypatch):
    aws_env(key="AKIDEXAMPLE", secret="s3cret", region="us-east-1")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "the-token")
    endpoint = await trio.to_thread.run_sync(
        lambda: open_trio_endpoint("kinesis", endpoint_url=fault_server.url))
    assert isinstance(endpoint, TrioEndpoint)
    # Over two SEND_SLICEs once base64-encoded: the body goes out in slices.
    reply = await endpoint.call(TARGET, body(datas=[b"x" * 400000, b""]))
    await endpoint.aclose()
    assert reply.status == 200
    (headers,) = fault_server.requests
    auth = headers["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/us-east-1/kinesis/aws4_request" in auth and "x-amz-target" in auth
    assert headers["X-Amz-Target"] == TARGET
    assert headers["Content-Type"] == "application/x-amz-json-1.1"
    assert headers["X-Amz-Security-Token"] == "the-token"
    assert fault_server.fake.stored_datas() == [b"x" * 400000, b""]


async def test_signature_is_accepted_by_moto_and_a_wrong_secret_is_not(moto, aws_env):
    aws_env(moto.key, moto.secret, moto.region)
    client = moto.client("kinesis")
    client.create_stream(StreamName="edge", ShardCount=1)
    endpoint = await trio.to_thread.run_sync(lambda: open_trio_endpoint("kinesis", endpoint_url=moto.url))
    reply = await endpoint.call(TARGET, body("edge", [b"signed in the event loop"]))
    assert reply.status == 200, reply.body
    assert [r["Data"] for r in read_stream(client, "edge")] == [b"signed in the event loop"]
    aws_env(moto.key, "wrong", moto.region)
    wrong = await trio.to_thread.run_sync(lambda: open_trio_endpoint("kinesis", endpoint_url=moto.url))
    refused = await wrong.call(TARGET, body("edge"))
    assert refused.status == 403 and b"SignatureDoesNotMatch" in refused.body
    await endpoint.aclose()
    await wrong.aclose()


async def test_a_digest_given_with_the_body_is_the_one_signed(moto, aws_env):
    aws_env(moto.key, moto.secret, moto.region)
    client = moto.client("kinesis")
    client.create_stream(StreamName="given", ShardCount=1)
    endpoint = await trio.to_thread.run_sync(lambda: open_trio_endpoint("kinesis", endpoint_url=moto.url))
    payload = body("given", [b"hashed by the caller"])
    reply = await endpoint.call(TARGET, payload, hashlib.sha256(payload).hexdigest())
    assert reply.status == 200, reply.body
    await endpoint.aclose()
    assert [r["Data"] for r in read_stream(client, "given")] == [b"hashed by the caller"]


async def test_a_given_digest_is_sent_as_is_and_the_body_is_not_hashed(fault_server, monkeypatch):
    import sinks.aws.trio_http as trio_http

    async def no_hashing(body):
        raise AssertionError("the body was hashed again")

    monkeypatch.setattr(trio_http, "_sha256_hex", no_hashing)
    endpoint = _endpoint(fault_server.url)
    payload = body(datas=[b"x"])
    given = hashlib.sha256(payload).hexdigest()
    reply = await endpoint.call(TARGET, payload, given)
    await endpoint.aclose()
    assert reply.status == 200
    (headers,) = fault_server.requests
    assert headers["X-Amz-Content-SHA256"] == given


async def test_a_proxy_in_the_environment_means_the_threaded_endpoint(fault_server, aws_env, monkeypatch):
    aws_env()
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    endpoint = await trio.to_thread.run_sync(
        lambda: open_trio_endpoint("kinesis", endpoint_url=fault_server.url))
    assert isinstance(endpoint, BotocoreEndpoint)
    await endpoint.aclose()


async def test_calls_reuse_one_connection_and_need_no_thread_once_credentials_are_frozen(
        fault_server, monkeypatch):
    endpoint = _endpoint(fault_server.url)
    assert (await endpoint.call(TARGET, body())).status == 200

    async def no_threads(*args, **kwargs):
        raise AssertionError("a worker thread was used")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_threads)
    for _ in range(3):
        assert (await endpoint.call(TARGET, body())).status == 200
    assert endpoint.connections_opened == 1
    assert len(fault_server.requests) == 4
    await endpoint.aclose()


async def test_credentials_near_expiry_are_refreshed_in_a_worker_thread(fault_server):
    threads = []
    later = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)).isoformat()

    def refresh():
        threads.append(threading.current_thread())
        return {"access_key": "fresh", "secret_key": "fresh", "token": "t2", "expiry_time": later}

    endpoint = _endpoint(fault_server.url, expiring_credentials(refresh))
    assert (await endpoint.call(TARGET, body())).status == 200
    assert threads and all(t is not threading.current_thread() for t in threads)
    assert "Credential=fresh/" in fault_server.requests[0]["Authorization"]
    await endpoint.aclose()


async def test_credentials_that_cannot_refresh_are_a_credentials_error(fault_server):
    from botocore.exceptions import CredentialRetrievalError

    def refresh():
        raise CredentialRetrievalError(provider="test", error_msg="token file gone")

    endpoint = _endpoint(fault_server.url, expiring_credentials(refresh))
    with pytest.raises(CredentialsError, match="token file gone"):
        await endpoint.call(TARGET, body())
    nobody = TrioEndpoint(CredentialsSession(None), fault_server.url, "us-east-1", "kinesis")
    with pytest.raises(CredentialsError, match="no AWS credentials"):
        await nobody.call(TARGET, body())
    assert fault_server.requests == []


async def test_refused_reset_and_slow_answers_are_transient_and_the_connection_is_not_reused(
        fault_server):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = "http://127.0.0.1:%d" % probe.getsockname()[1]
    with pytest.raises(TransientError):
        await _endpoint(closed).call(TARGET, body())
    fault_server.fake.plan(Plan("hang", delay=5.0), Plan("reset"))
    slow = _endpoint(fault_server.url, timeout=0.3)
    with pytest.raises(TransientError, match="Timeout"):
        await slow.call(TARGET, body())
    with pytest.raises(TransientError):
        await slow.call(TARGET, body())
    assert (await slow.call(TARGET, body())).status == 200
    assert slow.connections_opened == 3
    await slow.aclose()


async def test_a_cancelled_call_closes_its_connection(fault_server):
    fault_server.fake.plan(Plan("hang", delay=5.0))
    endpoint = _endpoint(fault_server.url)
    with trio.move_on_after(0.2):
        await endpoint.call(TARGET, body())
    assert (await endpoint.call(TARGET, body())).status == 200
    assert endpoint.connections_opened == 2
    await endpoint.aclose()


async def test_the_payload_hash_is_sha256_of_the_body_taken_in_slices():
    data = memoryview(bytes(range(256)) * (3 * HASH_SLICE // 256 + 7))
    assert await _sha256_hex(data) == hashlib.sha256(data).hexdigest()
    assert await _sha256_hex(memoryview(b"")) == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("kept_keys", [False, True])
@pytest.mark.parametrize("token", [None, "the-token"])
async def test_signing_in_steps_gives_botocores_own_headers(monkeypatch, token, kept_keys):
    import botocore.auth
    from botocore.awsrequest import AWSRequest

    from sinks.aws.trio_http import SigningKeys, sign_in_steps

    instant = datetime.datetime(2026, 12, 3, 10, 20, 30)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: instant)
    credentials = Credentials("AKIDEXAMPLE", "s3cret", token).get_frozen_credentials()
    keys = SigningKeys() if kept_keys else None

    def request() -> AWSRequest:
        return AWSRequest(method="POST", url="https://kinesis.us-east-1.amazonaws.com/", headers={
            "X-Amz-Target": TARGET, "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Content-SHA256": hashlib.sha256(b"{}").hexdigest()})

    for _ in range(2):  # the second time with the key kept from the first
        theirs, ours = request(), request()
        botocore.auth.SigV4Auth(credentials, "kinesis", "us-east-1").add_auth(theirs)
        await sign_in_steps(botocore.auth.SigV4Auth(credentials, "kinesis", "us-east-1"), ours, keys)
        assert dict(ours.headers.items()) == dict(theirs.headers.items())
        assert "Signature=" in ours.headers["Authorization"]


async def test_the_signing_key_is_derived_again_for_a_new_day_secret_or_region(monkeypatch):
    import botocore.auth
    from botocore.awsrequest import AWSRequest

    from sinks.aws.trio_http import SigningKeys, sign_in_steps

    derived = []

    class CountingAuth(botocore.auth.SigV4Auth):
        def _sign(self, key, msg, hex=False):
            if not hex:
                derived.append(msg)
            return super()._sign(key, msg, hex)

    keys = SigningKeys()
    instant = [datetime.datetime(2026, 12, 3, 23, 59, 59)]
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: instant[0])

    async def sign(secret: str, region: str) -> None:
        credentials = Credentials("AKIDEXAMPLE", secret).get_frozen_credentials()
        url = "https://kinesis.%s.amazonaws.com/" % region
        headers = {"X-Amz-Content-SHA256": hashlib.sha256(b"{}").hexdigest()}
        ours = AWSRequest(method="POST", url=url, headers=dict(headers))
        theirs = AWSRequest(method="POST", url=url, headers=dict(headers))
        await sign_in_steps(CountingAuth(credentials, "kinesis", region), ours, keys)
        botocore.auth.SigV4Auth(credentials, "kinesis", region).add_auth(theirs)
        assert ours.headers["Authorization"] == theirs.headers["Authorization"]

    await sign("s3cret", "us-east-1")
    await sign("s3cret", "us-east-1")
    assert len(derived) == 4  # derived once for both calls
    instant[0] += datetime.timedelta(seconds=1)  # the next day
    await sign("s3cret", "us-east-1")
    await sign("rotated", "us-east-1")
    await sign("rotated", "eu-west-1")
    assert len(derived) == 16


async def test_a_call_runs_with_the_jit_paused_when_the_gateway_asked(fault_server):
    from sinks import jit

    calls = []
    pause = jit.install(lambda **values: calls.append(values))
    assert pause is not None
    try:
        endpoint = _endpoint(fault_server.url)
        reply = await endpoint.call(TARGET, body())
        await endpoint.aclose()
    finally:
        trio.lowlevel.remove_instrument(pause)
    assert reply.status == 200
    # Paused on entry and for each later step of the call; resumed after each.
    assert pause.paused_steps >= 3
    assert calls[0] == {name: -1 for name in jit.PYPY_DEFAULTS} and calls[-1] == jit.PYPY_DEFAULTS


async def test_a_body_larger_than_the_sockets_buffers_arrives_whole_at_a_slow_reader():
    import platform

    import h11

    from sinks.aws import trio_http

    # PyPy sends from the buffer itself; elsewhere the stream's send_all does.
    assert (trio_http._send_in_place is not None) == (platform.python_implementation() == "PyPy")
    payload = memoryview(bytearray(bytes(range(251)) * (8 * 1024 * 1024 // 251)))
    received = bytearray()

    async def server(stream: trio.SocketStream) -> None:
        await trio.sleep(0.3)  # the sender fills the kernel's buffers and waits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(64 * 1024))
            elif isinstance(event, h11.Data):
                received.extend(event.data)
            elif isinstance(event, h11.EndOfMessage):
                head = conn.send(h11.Response(status_code=200, headers=[("content-length", "2")]))
                await stream.send_all(head + conn.send(h11.Data(data=b"{}")) + conn.send(h11.EndOfMessage()))
                return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, server, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        endpoint = _endpoint("http://127.0.0.1:%d" % port)
        reply = await endpoint.call(TARGET, payload)
        await endpoint.aclose()
        nursery.cancel_scope.cancel()
    assert reply.status == 200 and reply.body == b"{}"
    assert received == payload
