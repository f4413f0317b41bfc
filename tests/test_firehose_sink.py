"""The Firehose sink (sinks/aws/sink.py with service "firehose"): PutRecordBatch.

In memory with the autojump clock, over HTTP with the fault-injecting
endpoint, and through moto (delivery stream to an S3 bucket) with IAM auth on.
"""

from __future__ import annotations

import json
import uuid

import pytest
import trio

from gateway.config.settings import ConfigError, from_args
from sinks.aws.sink import StreamOptions
from tests.support.gateway import gateway_in_process
from tests.support.kinesis import (  # noqa: F401 - fixtures
    FakeStreams,
    Plan,
    aws_env_fixture,
    fault_server_fixture,
    memory_endpoint,
    moto_fixture,
)
from tests.support.sinks import SinkHarness, envelope_len, post, put_all, running_sink

KIB = 1024
MIB = 1024 * KIB


def harness(fake=None, **options):
    fake = fake or FakeStreams()
    return fake, SinkHarness(memory_endpoint(fake), service="firehose", **options)


async def test_ack_carries_the_record_id(autojump_clock):
    fake, h = harness()
    async with running_sink(h):
        outcomes = await put_all(h, [b"one", b"two"])
    assert [extra for _, extra in outcomes] == [{"record_id": s.record_id} for s in fake.stored]
    assert fake.stored_datas() == [b"one", b"two"]
    assert fake.calls[0].target == "Firehose_20150804.PutRecordBatch"
    assert all(s.partition_key is None for s in fake.stored) and h.ring_empty


async def test_failed_entries_are_resent_alone(autojump_clock):
    fake, h = harness()
    unavailable = "ServiceUnavailableException"
    fake.fail_record = lambda data, attempt: unavailable if data == b"b" and attempt == 1 else None
    fake.plan(Plan("status", 500, "InternalFailure"))
    async with running_sink(h):
        outcomes = await put_all(h, [b"a", b"b", b"c"])
    assert [kind for kind, _ in outcomes] == ["ok"] * 3
    assert [c.datas for c in fake.calls] == [[b"a", b"b", b"c"]] * 2 + [[b"b"]]
    assert sorted(fake.stored_datas()) == [b"a", b"b", b"c"] and h.ring_empty


async def test_no_partition_keys_and_service_limits(autojump_clock):
    _, h = harness(max_record_bytes=MIB, batch_bytes=5 * MIB)
    assert h.sink.record_keys("rid", None, {b"x": b"y"}.get) == (None, None, 0)
    assert h.sink.max_record_bytes == 1000 * KIB  # Firehose: 1,000 KiB per record
    assert StreamOptions("firehose", "logs", batch_bytes=5 * MIB).limits() == (500, 4 * MIB, 1000 * KIB)


def test_delivery_stream_is_required():
    with pytest.raises(ConfigError, match="^--delivery-stream: required"):
        from_args(["--sink", "firehose"], {})
    config = from_args(["--sink", "firehose", "--delivery-stream", "logs"], {})
    assert StreamOptions.from_config(config).stream == "logs"


async def test_through_the_gateway_over_http(fault_server, aws_env):
    aws_env()
    fake = fault_server.fake
    fake.fail_record = lambda data, attempt: "ServiceUnavailableException" if attempt == 1 else None
    flags = ["--sink", "firehose", "--delivery-stream", "logs", "--endpoint-url", fault_server.url]
    async with gateway_in_process(flags) as (gateway, port):
        largest = 1000 * KIB - envelope_len()
        ok = await trio.to_thread.run_sync(post, port, b"z" * largest)
        too_large = await trio.to_thread.run_sync(post, port, b"z" * (largest + 1))
    assert ok[0] == 202 and json.loads(ok[2])["record_id"].startswith("rec-")
    assert too_large[0] == 413
    assert [len(c.datas) for c in fake.calls] == [1, 1]  # failed once, then stored
    assert fake.stored[0].data.endswith(b"z" * largest)
    assert "firehose" in fault_server.requests[0]["Authorization"]  # signing name
    assert gateway.ring.used == 0


async def test_records_land_in_moto_s3_through_the_delivery_stream(moto, aws_env):
    aws_env(moto.key, moto.secret, moto.region)
    s3 = moto.client("s3")
    firehose = moto.client("firehose")
    bucket = "b-" + uuid.uuid4().hex[:12]
    name = "d-" + uuid.uuid4().hex[:12]
    s3.create_bucket(Bucket=bucket)
    firehose.create_delivery_stream(
        DeliveryStreamName=name, DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={
            "RoleARN": "arn:aws:iam::123456789012:role/firehose", "BucketARN": "arn:aws:s3:::" + bucket})
    flags = ["--sink", "firehose", "--delivery-stream", name, "--endpoint-url", moto.url]
    bodies = [b"", b"first", bytes(range(256)) * 40]
    async with gateway_in_process(flags) as (gateway, port):
        answers = [await trio.to_thread.run_sync(post, port, body) for body in bodies]
    assert [a[0] for a in answers] == [202] * 3
    data = b"".join(
        s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []))
    for body, (_, _, answer) in zip(bodies, answers):
        record_id = json.loads(answer)["id"].encode()
        start = data.index(b'"id":"' + record_id + b'"')
        line_end = data.index(b"\n", start)
        assert data[line_end + 1:line_end + 1 + len(body)] == body
