"""``--aggregation kpl`` end to end: the gateway, real HTTP clients and botocore's
stack, against moto (a 2-shard stream, read back with GetRecords on every
shard) and against the fault-injecting endpoint (tests/support/kinesis.py).

What must hold: after deaggregation (both judges, tests/support/kpl.py)
every acknowledged user record is there exactly once, byte for byte, on the
shard its partition key hashes to, and its 202 names that Kinesis record and
its index inside it; a failed aggregate is sent again whole, and no record
is acknowledged twice or lost, also across a kill -9 with ``--ack spool``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from typing import Dict, List

import pytest
import trio

from sinks.aws.aggregation import MAGIC
from tests.support.gateway import GatewayProcess, RawConnection, gateway_in_process, post_request
from tests.support.kinesis import (  # noqa: F401 - fixtures
    Plan,
    aws_env_fixture,
    fault_server_fixture,
    moto_fixture,
    read_stream,
)
from tests.support.kpl import lenient_deaggregate, strict_user_records
from tests.support.sinks import post
from tests.test_spool_recovery import unconfirmed_ids

THROTTLED = "ProvisionedThroughputExceededException"
KEYS = [b"alpha", b"beta", b"gamma", b"delta", b""]  # b"": no header, a random key


def bodies_and_headers(count: int):
    """Mixed sizes and keys; one body that is itself a valid aggregate."""
    proto = b"\x0a\x05admin" + b"\x1a\x08\x08\x00\x1a\x04evil"
    forged = MAGIC + proto + hashlib.md5(proto).digest()
    out = []
    for i in range(count):
        size = (100, 1000, 3000, 20000, 60000)[i % 5] if i % 7 else 10
        body = forged if i == 3 else (b"%04d:" % i) + bytes((i * 13 + j) % 256 for j in range(size))
        key = KEYS[i % len(KEYS)]
        out.append((body, b"X-Key: %s\r\n" % key if key else b""))
    return out


async def post_all(port, items, clients: int = 12) -> List[tuple]:
    answers: List[tuple] = [None] * len(items)  # type: ignore[list-item]
    limiter = trio.CapacityLimiter(clients)

    async def one(index: int) -> None:
        body, headers = items[index]
        answers[index] = await trio.to_thread.run_sync(post, port, body, headers, limiter=limiter)

    async with trio.open_nursery() as nursery:
        for index in range(len(items)):
            nursery.start_soon(one, index)
    return answers


def unpack(records) -> List[dict]:
    """Each user record of ``records`` (boto3 shape plus ShardId): its keys,
    outer sequence number, sub-sequence and data; both judges must agree."""
    out = []
    for record in records:
        data = bytes(record["Data"])
        for sub_sequence, sub in enumerate(strict_user_records(data, record["PartitionKey"])):
            out.append({"ShardId": record.get("ShardId"), "SequenceNumber": record["SequenceNumber"],
                        "SubSequence": sub_sequence, "PartitionKey": sub.partition_key,
                        "Data": sub.data, "aggregated": data[:4] == MAGIC})
    lenient = lenient_deaggregate(records)
    assert [(u["PartitionKey"], u["Data"]) for u in lenient] == [
        (u["PartitionKey"], u["Data"]) for u in out]
    return out


def by_id(users) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for user in users:
        meta = json.loads(user["Data"].partition(b"\n")[0])
        out.setdefault(meta["id"], []).append(user)
    return out


def shard_of(shards, key: str) -> str:
    point = int.from_bytes(hashlib.md5(key.encode("utf-8")).digest(), "big")
    for shard in shards:
        span = shard["HashKeyRange"]
        if int(span["StartingHashKey"]) <= point <= int(span["EndingHashKey"]):
            return shard["ShardId"]
    raise AssertionError("no shard holds %s" % key)


@pytest.fixture
def stream(moto, aws_env):
    aws_env(moto.key, moto.secret, moto.region)
    client = moto.client("kinesis")
    name = "agg-" + uuid.uuid4().hex[:12]
    client.create_stream(StreamName=name, ShardCount=2)
    return client, name


@pytest.mark.parametrize("ack", ["kinesis", "spool"])
async def test_every_record_comes_back_once_on_its_keys_shard(moto, stream, ack, tmp_path):
    client, name = stream
    items = bodies_and_headers(60)
    flags = ["--sink", "kinesis", "--stream", name, "--endpoint-url", moto.url,
             "--aggregation", "kpl", "--partition-key", "header:X-Key", "--linger", "200ms",
             "--ack", ack]
    if ack == "spool":
        flags += ["--spool-dir", str(tmp_path / "spool")]
    async with gateway_in_process(flags) as (gateway, port):
        answers = await post_all(port, items)
        inner = getattr(gateway.sink, "inner", gateway.sink)
        with trio.fail_after(60):
            while inner.statistics().stored < len(items):
                await trio.sleep(0.05)
    assert [a[0] for a in answers] == [202] * len(items)
    shards = client.list_shards(StreamName=name)["Shards"]
    assert len(shards) == 2
    records = read_stream(client, name)
    users = by_id(unpack(records))
    assert len(records) < len(items)  # records shared Kinesis records
    assert any(r["Data"][:4] == MAGIC for r in records)
    for (body, headers), (_, _, answer) in zip(items, answers):
        doc = json.loads(answer)
        (user,) = users.pop(doc["id"])  # exactly once
        assert user["Data"].partition(b"\n")[2] == body
        if headers:
            assert user["PartitionKey"] == headers[len(b"X-Key: "):-2].decode()
        assert user["ShardId"] == shard_of(shards, user["PartitionKey"])
        if ack == "kinesis":
            assert (doc["shard_id"], doc["sequence_number"], doc["sub_sequence"]) == (
                user["ShardId"], user["SequenceNumber"], user["SubSequence"])
        else:
            assert set(doc) == {"id"}
    assert users == {}
    # The body that is itself an aggregate came back as one opaque record.
    assert sum(1 for u in unpack(records) if u["Data"].endswith(items[3][0])) == 1
    assert gateway.ring.used == 0


def fault_flags(fault_server, *extra):
    return ["--sink", "kinesis", "--stream", "logs", "--endpoint-url", fault_server.url,
            "--call-timeout", "0.5s", "--retry-deadline", "10s", "--linger", "50ms",
            "--aggregation", "kpl", "--partition-key", "header:X-Key"] + list(extra)


def stored_users(fake):
    return unpack([{"Data": s.data, "PartitionKey": s.partition_key, "ShardId": s.shard_id,
                    "SequenceNumber": s.sequence_number} for s in fake.stored])


async def test_failed_and_throttled_aggregates_are_sent_again_whole(fault_server, aws_env):
    aws_env()
    fake = fault_server.fake
    # Calls throttled as a whole, then every aggregate failed once inside a 200.
    fake.plan(Plan("status", 400, THROTTLED), Plan("status", 500, "InternalFailure"))
    fake.fail_record = lambda data, attempt: THROTTLED if data[:4] == MAGIC and attempt == 1 else None
    items = bodies_and_headers(40)
    async with gateway_in_process(fault_flags(fault_server)) as (gateway, port):
        answers = await post_all(port, items)
        stats = gateway.sink.statistics()
    assert [a[0] for a in answers] == [202] * len(items)
    users = by_id(stored_users(fake))
    for (body, _), (_, _, answer) in zip(items, answers):
        doc = json.loads(answer)
        (user,) = users.pop(doc["id"])
        assert user["Data"].partition(b"\n")[2] == body
        assert (doc["shard_id"], doc["sequence_number"], doc["sub_sequence"]) == (
            user["ShardId"], user["SequenceNumber"], user["SubSequence"])
    assert users == {}
    # Every failed Kinesis record was an aggregate, and no sub-record of it was stored.
    failed = [call.datas[i] for call in fake.calls for i in call.failed]
    assert failed and all(d[:4] == MAGIC for d in failed)
    assert {c.fault for c in fake.calls} >= {"status"}
    assert stats.retries >= len(failed) and stats.given_up == 0
    assert gateway.ring.used == 0 and gateway.ring.live == 0


async def test_a_deadline_passing_refuses_every_record_of_the_aggregate(fault_server, aws_env):
    aws_env()
    fake = fault_server.fake
    # Throttled for good, aggregated or not (should the records not meet in one call).
    fake.fail_record = lambda data, attempt: THROTTLED if b"same key" in data else None
    items = [(b"same key %d" % i, b"X-Key: k\r\n") for i in range(5)] + [(b"plain", b"X-Key: other\r\n")]
    flags = fault_flags(fault_server, "--retry-deadline", "1s")
    async with gateway_in_process(flags) as (gateway, port):
        answers = await post_all(port, items)
    assert [a[0] for a in answers] == [503] * 5 + [202]
    assert [s.data.partition(b"\n")[2] for s in fake.stored] == [b"plain"]
    assert gateway.ring.used == 0


#: The 202s to collect before the kill, and a bound on the load.
ACCEPTED_BEFORE_KILL = 300
LOAD_SECONDS = 20.0


def _load(address, accepted, lock, stop, seed):
    """Post records with three partition keys on a keep-alive connection until
    ``stop`` or the gateway dies; record each 202's id and body."""
    rng = random.Random(seed)
    deadline = time.monotonic() + LOAD_SECONDS
    conn = None
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            if conn is None:
                conn = RawConnection(address, timeout=5)
            body = b"%d:" % seed + bytes(rng.getrandbits(8) for _ in range(rng.randrange(50, 3000)))
            conn.send(post_request(body, headers=[("X-Key", "k%d" % rng.randrange(3))]))
            response = conn.read_response()
            if response.status == 202:
                with lock:
                    accepted[response.json()["id"]] = body
            else:
                conn.close()
                conn = None
    except (OSError, AssertionError):
        pass  # killed: an answer not received is not an acknowledgement
    finally:
        if conn is not None:
            conn.close()


def test_kill_9_with_spool_and_aggregation_loses_no_acknowledged_record(tmp_path, fault_server):
    fake = fault_server.fake
    # Slow answers: some aggregates are stored but not yet confirmed at the kill.
    fake.plan(*[Plan("slow", delay=0.2)] * 10000)
    spool_dir = str(tmp_path / "spool")
    flags = fault_flags(fault_server, "--ack", "spool", "--spool-dir", spool_dir,
                        "--spool-size", "64MiB", "--ring-size", "8MiB")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_EC2_METADATA_DISABLED": "true"}
    first = GatewayProcess(flags, env=env, python=sys.executable).start()
    accepted: Dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    threads = [threading.Thread(target=_load, args=(first.address, accepted, lock, stop, n))
               for n in range(4)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + LOAD_SECONDS
        while len(accepted) < ACCEPTED_BEFORE_KILL and time.monotonic() < deadline:
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        first.stop()
    assert len(accepted) >= ACCEPTED_BEFORE_KILL, first.stderr
    pending_at_kill = unconfirmed_ids(spool_dir)
    fake.plans.clear()

    second = GatewayProcess(flags, env=env, python=sys.executable).start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with fake.lock:
                users = by_id(stored_users(fake))
            if set(accepted) <= set(users) and not unconfirmed_ids(spool_dir):
                break
            time.sleep(0.1)
    finally:
        assert second.stop() == 0, second.stderr
    lost = set(accepted) - set(users)
    assert not lost, "%d acknowledged records lost" % len(lost)
    for record_id, body in accepted.items():
        assert {u["Data"].partition(b"\n")[2] for u in users[record_id]} == {body}
    duplicated = {i for i, copies in users.items() if len(copies) > 1}
    # Sent again only what the spool had not recorded as stored.
    assert duplicated <= pending_at_kill
    assert pending_at_kill and unconfirmed_ids(spool_dir) == set()
