"""The sinks' HTTP edge (sinks/aws/http.py): botocore's chain, SigV4 and URLLib3Session, in threads."""

from __future__ import annotations

import datetime
import socket
import threading

import botocore.session
import pytest
import trio

from sinks.aws.errors import CredentialsError, TransientError
from sinks.aws.http import BotocoreEndpoint, NoRegion, open_botocore_endpoint
from sinks.aws.putrecords import PutRecordsBatch
from tests.support.batches import add
from tests.support.kinesis import (  # noqa: F401 - fixtures
    CredentialsSession,
    aws_env_fixture,
    expiring_credentials,
    fault_server_fixture,
    moto_fixture,
    read_stream,
)


def body(stream="logs", datas=(b"hello",)):
    batch = PutRecordsBatch(stream)
    for data in datas:
        add(batch, data, "key")
    return batch, batch.body()


def test_the_session_kept_for_calls_holds_no_models_and_gives_credentials(aws_env):
    # The session that built the client caches endpoint rules and the service
    # model (megabytes of heap a long-running gateway would keep walking).
    aws_env(region="eu-west-1")
    endpoint = open_botocore_endpoint("kinesis")
    assert endpoint.session.get_component("data_loader")._cache == {}
    assert endpoint.session.get_credentials().access_key
    given = botocore.session.Session()
    assert open_botocore_endpoint("kinesis", session=given).session is given


def test_region_and_endpoint_come_from_botocores_chain(aws_env, monkeypatch):
    aws_env(region="eu-west-1")
    endpoint = open_botocore_endpoint("kinesis")
    assert (endpoint.url, endpoint.region, endpoint.signing_name) == (
        "https://kinesis.eu-west-1.amazonaws.com", "eu-west-1", "kinesis")
    assert open_botocore_endpoint("firehose").signing_name == "firehose"
    monkeypatch.setenv("AWS_ENDPOINT_URL_KINESIS", "http://127.0.0.1:9")
    assert open_botocore_endpoint("kinesis").url == "http://127.0.0.1:9"
    assert open_botocore_endpoint("kinesis", region="ap-south-1", endpoint_url="http://x:1").region == (
        "ap-south-1")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(NoRegion):
        open_botocore_endpoint("kinesis")


async def test_requests_are_signed_and_the_body_arrives_whole(fault_server, aws_env, monkeypatch):
    aws_env(key="AKIDEXAMPLE", secret="s3cret", region="us-east-1")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "the-token")
    endpoint = await trio.to_thread.run_sync(
        lambda: open_botocore_endpoint("kinesis", endpoint_url=fault_server.url))
    batch, view = body(datas=[b"x" * 100000, b""])
    assert type(view) is memoryview
    reply = await endpoint.call(batch.target, view)
    await endpoint.aclose()
    assert reply.status == 200
    (headers,) = fault_server.requests
    auth = headers["Authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/us-east-1/kinesis/aws4_request" in auth and "x-amz-target" in auth
    assert headers["X-Amz-Target"] == "Kinesis_20131202.PutRecords"
    assert headers["Content-Type"] == "application/x-amz-json-1.1"
    assert headers["X-Amz-Security-Token"] == "the-token"
    assert fault_server.fake.stored_datas() == [b"x" * 100000, b""]


async def test_signature_from_a_memoryview_body_is_accepted_by_moto_and_a_wrong_secret_is_not(moto, aws_env):
    aws_env(moto.key, moto.secret, moto.region)
    client = moto.client("kinesis")
    client.create_stream(StreamName="edge", ShardCount=1)
    endpoint = await trio.to_thread.run_sync(
        lambda: open_botocore_endpoint("kinesis", endpoint_url=moto.url))
    batch, view = body("edge", [b"signed over a memoryview"])
    reply = await endpoint.call(batch.target, view)
    assert reply.status == 200, reply.body
    assert [r["Data"] for r in read_stream(client, "edge")] == [b"signed over a memoryview"]
    aws_env(moto.key, "wrong", moto.region)
    wrong = await trio.to_thread.run_sync(
        lambda: open_botocore_endpoint("kinesis", endpoint_url=moto.url))
    refused = await wrong.call(batch.target, view)
    assert refused.status == 403 and b"SignatureDoesNotMatch" in refused.body
    await endpoint.aclose()
    await wrong.aclose()


async def test_calls_run_in_worker_threads(fault_server, aws_env, monkeypatch):
    aws_env()
    endpoint = await trio.to_thread.run_sync(
        lambda: open_botocore_endpoint("kinesis", endpoint_url=fault_server.url))
    threads = []
    real = BotocoreEndpoint.call_blocking

    def recording(self, target, data, digest=None):
        threads.append(threading.current_thread())
        return real(self, target, data, digest)

    monkeypatch.setattr(BotocoreEndpoint, "call_blocking", recording)
    batch, view = body()
    assert (await endpoint.call(batch.target, view)).status == 200
    assert threads and threads[0] is not threading.current_thread()
    await endpoint.aclose()


async def test_a_given_digest_is_the_payload_hash_signed(fault_server, aws_env):
    import hashlib

    aws_env()
    endpoint = await trio.to_thread.run_sync(
        lambda: open_botocore_endpoint("kinesis", endpoint_url=fault_server.url))
    batch, view = body()
    given = hashlib.sha256(view).hexdigest()
    assert (await endpoint.call(batch.target, view, given)).status == 200
    assert fault_server.requests[0]["X-Amz-Content-SHA256"] == given
    await endpoint.aclose()


async def test_credentials_near_expiry_are_refreshed_in_a_worker_thread(fault_server):
    from botocore.httpsession import URLLib3Session

    threads = []
    later = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)).isoformat()

    def refresh():
        threads.append(threading.current_thread())
        return {"access_key": "fresh", "secret_key": "fresh", "token": "t2", "expiry_time": later}

    endpoint = BotocoreEndpoint(CredentialsSession(expiring_credentials(refresh)), URLLib3Session(),
                                fault_server.url, "us-east-1", "kinesis")
    batch, view = body()
    assert (await endpoint.call(batch.target, view)).status == 200
    assert threads and all(t is not threading.current_thread() for t in threads)
    assert "Credential=fresh/" in fault_server.requests[0]["Authorization"]
    await endpoint.aclose()


async def test_credentials_that_cannot_refresh_are_a_credentials_error(fault_server):
    from botocore.exceptions import CredentialRetrievalError
    from botocore.httpsession import URLLib3Session

    def refresh():
        raise CredentialRetrievalError(provider="test", error_msg="token file gone")

    endpoint = BotocoreEndpoint(CredentialsSession(expiring_credentials(refresh)), URLLib3Session(),
                                fault_server.url, "us-east-1", "kinesis")
    batch, view = body()
    with pytest.raises(CredentialsError, match="token file gone"):
        await endpoint.call(batch.target, view)
    nobody = BotocoreEndpoint(CredentialsSession(None), URLLib3Session(), fault_server.url, "us-east-1",
                              "kinesis")
    with pytest.raises(CredentialsError, match="no AWS credentials"):
        await nobody.call(batch.target, view)
    assert fault_server.requests == []


async def test_connection_refused_and_timeouts_are_transient(fault_server, aws_env):
    aws_env()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = "http://127.0.0.1:%d" % probe.getsockname()[1]
    batch, view = body()
    refused = await trio.to_thread.run_sync(
        lambda: open_botocore_endpoint("kinesis", endpoint_url=closed, timeout=1.0))
    with pytest.raises(TransientError):
        await refused.call(batch.target, view)
    from tests.support.kinesis import Plan

    fault_server.fake.plan(Plan("hang", delay=5.0), Plan("reset"))
    slow = await trio.to_thread.run_sync(
        lambda: open_botocore_endpoint("kinesis", endpoint_url=fault_server.url, timeout=0.3))
    with pytest.raises(TransientError, match="(?i)timeout|timed out"):
        await slow.call(batch.target, view)
    with pytest.raises(TransientError):
        await slow.call(batch.target, view)
    await slow.aclose()
