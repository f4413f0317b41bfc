"""Records up to 10 MiB, following the stream's MaxRecordSizeInKiB, against kinesis-local.

kinesis-local (tests/support/kinesis_local.py) keeps each stream's
MaxRecordSizeInKiB and refuses larger records, as Kinesis does; moto does
not know the field.  It takes seconds per megabyte, so these tests are few:
a 2048 KiB stream (1.5 MiB through, 3 MiB refused with 413 before the body
is sent, the limit raised to 4096 KiB while running and 3 MiB through then,
both read back byte-exact), a 10240 KiB stream (the largest body through:
kinesis-local's GetRecords fails on a 10 MiB record, so it is not read
back), and the settings refused at start.
"""

from __future__ import annotations

import json
import socket
import uuid

import pytest
import trio

import sinks.aws.follow_limit
from tests.support.gateway import gateway_in_process
from tests.support.kinesis import aws_env_fixture  # noqa: F401 - fixture
from tests.support.kinesis_local import kinesis_local_fixture  # noqa: F401 - fixture
from tests.support.sinks import envelope_len, get, http_exchange

MIB = 1024 * 1024
KEY = 26  # random partition keys are record ids
#: A 10 MiB PutRecords takes kinesis-local about half a minute here.
SLOW_CALL = "300s"


def _post(port: int, body: bytes):
    head = b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(head)
        try:
            sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused from the head: the answer is there to read
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head_bytes, _, answer = data.partition(b"\r\n\r\n")
    return int(head_bytes.split()[1]), answer


def _pattern(size: int) -> bytes:
    return bytes(range(251)) * (size // 251) + bytes(range(size % 251))


def _read_back(client, name: str):
    shard = client.list_shards(StreamName=name)["Shards"][0]["ShardId"]
    iterator = client.get_shard_iterator(StreamName=name, ShardId=shard,
                                         ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    return client.get_records(ShardIterator=iterator, Limit=100)["Records"]


def _flags(kinesis_local, name: str, *more: str):
    return ["--sink", "kinesis", "--stream", name, "--endpoint-url", kinesis_local.url,
            "--call-timeout", SLOW_CALL, "--retry-deadline", "600s", "--shutdown-timeout", "600s",
            "--max-in-flight", "1"] + list(more)


@pytest.fixture
def stream(kinesis_local, aws_env):
    aws_env(kinesis_local.key, kinesis_local.secret, kinesis_local.region)

    def create(max_record_kib: int) -> str:
        name = "s-" + uuid.uuid4().hex[:12]
        kinesis_local.create_stream(name, max_record_kib)
        return name

    return create


async def _readyz(port: int) -> dict:
    status, _, body = await trio.to_thread.run_sync(get, port, "/readyz")
    assert status == 200, body
    return json.loads(body)


async def test_a_2048_kib_stream_takes_1_5_mib_refuses_3_mib_and_follows_a_raise(
        kinesis_local, stream, monkeypatch):
    # Read the limit every half second rather than every minute.
    monkeypatch.setattr(sinks.aws.follow_limit, "REFRESH_INTERVAL", 0.5)
    name = stream(2048)
    client = kinesis_local.client()
    body = _pattern(1536 * 1024)
    async with gateway_in_process(_flags(kinesis_local, name)) as (gateway, port):
        assert (await _readyz(port))["max_record_bytes"] == 2 * MIB
        status, answer = await trio.to_thread.run_sync(_post, port, body)
        assert status == 202, answer
        # Too large for the stream: refused from the head, before 100 Continue.
        head = (b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n"
                b"Expect: 100-continue\r\n\r\n" % (3 * MIB))
        status, _, refusal = await trio.to_thread.run_sync(http_exchange, port, head)
        assert status == 413 and b"exceeds the 2097152-byte limit" in refusal
        arn = client.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamARN"]
        client.update_max_record_size(StreamARN=arn, MaxRecordSizeInKiB=4096)
        for _ in range(600):
            if (await _readyz(port))["max_record_bytes"] == 4 * MIB:
                break
            await trio.sleep(0.1)
        assert (await _readyz(port))["max_record_bytes"] == 4 * MIB
        large = _pattern(3 * MIB)
        status, answer = await trio.to_thread.run_sync(_post, port, large)
        assert status == 202, answer
        assert gateway.accepted == 2
    records = await trio.to_thread.run_sync(_read_back, client, name)
    datas = [record["Data"].partition(b"\n")[2] for record in records]
    assert datas == [body, large]


async def test_a_10240_kib_stream_takes_the_largest_body(kinesis_local, stream):
    name = stream(10240)
    largest = 10 * MIB - envelope_len() - KEY
    body = _pattern(largest)
    flags = _flags(kinesis_local, name)
    async with gateway_in_process(flags) as (gateway, port):
        assert (await _readyz(port))["max_record_bytes"] == 10 * MIB
        started = _started(gateway, flags, port)
        assert started["max_record_bytes"] == 10 * MIB and "stream's limit 10240 KiB" in started["sink"]
        head = (b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n"
                b"Expect: 100-continue\r\n\r\n" % (largest + 1))
        status, _, refusal = await trio.to_thread.run_sync(http_exchange, port, head)
        assert status == 413 and b"exceeds the 10485760-byte limit" in refusal
        status, answer = await trio.to_thread.run_sync(_post, port, body)
        assert status == 202, answer
    # Stored: kinesis-local answered the PutRecords with a sequence number.
    # (Its GetRecords fails with 500 on a 10 MiB record, so the byte-exact
    # read-back is the 2048 KiB stream's test.)
    doc = json.loads(answer)
    assert doc["shard_id"].startswith("shardId-") and doc["sequence_number"].isdigit()


@pytest.mark.parametrize("flags, message", [
    (["--max-record-size", "4MiB"], "--max-record-size: 4194304 bytes is more than the stream takes"),
    (["--ring-size", "3MiB"], "--ring-size: must hold at least two of the largest records"),
])
async def test_settings_the_stream_cannot_take_stop_the_start(kinesis_local, stream, flags, message):
    name = stream(2048)
    with pytest.raises(BaseException) as info:
        async with gateway_in_process(_flags(kinesis_local, name, *flags)):
            pass
    assert message in str(_config_error(info.value))


def _started(gateway, flags, port):
    """The fields of the gateway's ``started`` event."""
    import argparse

    from gateway.cli.serve import started_fields
    from gateway.config.settings import add_arguments, load_with_origins

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    _, origins = load_with_origins(vars(parser.parse_args(flags)), {})
    return started_fields(gateway.config, origins, gateway, "127.0.0.1", port)


def _config_error(exc):
    from gateway.cli.serve import config_error

    found = config_error(exc)
    assert found is not None, exc
    return found
