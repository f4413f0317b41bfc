"""The Kinesis sink (sinks/aws/sink.py).

Two layers: the sink over a ring with the in-memory endpoint and Trio's
autojump clock (no sockets, no sleeping), then the whole gateway against moto
in server mode with IAM authentication on, records read back with botocore.
"""

from __future__ import annotations

import json
import uuid

import pytest
import trio

from gateway.config.settings import from_args
from sinks.aws.errors import TransientError
from sinks.aws.http import MemoryEndpoint, Reply
from sinks.aws.sink import TAKE_STEP, StreamOptions, StreamSink
from tests.support.gateway import gateway_in_process, log_events
from tests.support.kinesis import (  # noqa: F401 - fixtures
    FakeStreams,
    Plan,
    aws_env_fixture,
    memory_endpoint,
    moto_fixture,
    read_stream,
)
from tests.support.sinks import SinkHarness, envelope_len, get, http_exchange, post, put_all, running_sink

MIB = 1024 * 1024
THROTTLED = "ProvisionedThroughputExceededException"


def harness(fake=None, **options):
    fake = fake or FakeStreams()
    options.setdefault("retry_deadline", 30.0)
    return fake, SinkHarness(memory_endpoint(fake), **options)


# -- the sink with the in-memory endpoint ------------------------------------------


async def test_ack_answers_after_storage_with_shard_and_sequence(autojump_clock):
    fake, h = harness()
    async with running_sink(h):
        outcomes = await put_all(h, [b"one", b"two", b""], partition_key="tenant-a")
    assert [kind for kind, _ in outcomes] == ["ok"] * 3
    by_data = {s.data: s for s in fake.stored}
    for data, (_, extra) in zip([b"one", b"two", b""], outcomes):
        assert extra == {"shard_id": by_data[data].shard_id,
                         "sequence_number": by_data[data].sequence_number}
        assert by_data[data].partition_key == "tenant-a"
    assert len(fake.calls) == 1  # one linger window, one call
    assert h.ring_empty


async def test_batches_respect_records_per_request(autojump_clock):
    fake, h = harness(batch_records=3)
    async with running_sink(h):
        await put_all(h, [b"r%d" % i for i in range(7)])
    assert [len(c.datas) for c in fake.calls] == [3, 3, 1]
    assert fake.stored_datas() == [b"r%d" % i for i in range(7)]


async def test_a_batch_taken_in_several_steps_is_still_one_call_in_order(autojump_clock):
    fake, h = harness(ack=False, linger=1.0)
    datas = [b"r%d" % i for i in range(4 * TAKE_STEP + 3)]
    async with running_sink(h):
        await put_all(h, datas)
    assert [len(c.datas) for c in fake.calls] == [len(datas)]
    assert fake.stored_datas() == datas and h.ring_empty


async def test_batches_respect_bytes_per_request(autojump_clock):
    fake, h = harness(batch_bytes=4096, max_record_bytes=4096)
    datas = [bytes([i]) * 1500 for i in range(5)]
    async with running_sink(h):
        await put_all(h, datas)
    # 1500 bytes + a 4-character key each: two fit under 4096.
    assert [len(c.datas) for c in fake.calls] == [2, 2, 1]


async def test_linger_holds_a_small_batch_then_sends_it(autojump_clock):
    fake, h = harness(linger=0.5)
    async with running_sink(h):
        start = trio.current_time()
        await h.put(b"alone")
        assert trio.current_time() - start == pytest.approx(0.5, abs=0.01)


async def test_partial_failure_resends_only_the_failed_entries_in_order(autojump_clock):
    fake, h = harness()
    flaky = {b"r1", b"r3", b"r4"}
    fake.fail_record = lambda data, attempt: THROTTLED if data in flaky and attempt == 1 else None
    datas = [b"r%d" % i for i in range(6)]
    async with running_sink(h):
        outcomes = await put_all(h, datas)
    assert [kind for kind, _ in outcomes] == ["ok"] * 6
    assert [c.datas for c in fake.calls] == [datas, [b"r1", b"r3", b"r4"]]
    assert fake.calls[0].failed == [1, 3, 4]
    assert sorted(fake.stored_datas()) == sorted(datas)
    assert h.sink.statistics().retries == 3 and h.ring_empty


@pytest.mark.parametrize("plan", [
    Plan("status", 400, THROTTLED),
    Plan("status", 500, "InternalFailure"),
    Plan("status", 503, "ServiceUnavailable"),
    Plan("reset"),
    Plan("hang", delay=10.0),
])
async def test_failed_calls_are_retried_until_stored(autojump_clock, plan):
    fake, h = harness()
    fake.plan(plan, plan)
    async with running_sink(h):
        outcomes = await put_all(h, [b"a", b"b"])
    assert [kind for kind, _ in outcomes] == ["ok", "ok"]
    assert fake.stored_datas() == [b"a", b"b"] and len(fake.calls) == 3
    assert h.sink.statistics().failed_calls == 2 and h.ring_empty


async def test_a_record_past_its_deadline_is_refused_never_acknowledged(autojump_clock):
    fake, h = harness(retry_deadline=3.0)
    fake.plan(*[Plan("status", 500, "InternalFailure")] * 100)
    async with running_sink(h):
        start = trio.current_time()
        kind, error = await h.put(b"doomed")
        waited = trio.current_time() - start
    assert kind == "refused" and "DeadlinePassed" in str(error) and "InternalFailure" in str(error)
    assert error.status == 503 and error.retry_after >= 1
    assert waited <= 3.0 and fake.stored == [] and len(fake.calls) > 2
    assert h.ring_empty and h.logged == []  # transient trouble is not logged


async def test_permanent_error_stops_the_sink_once_then_it_tries_again(autojump_clock):
    fake = FakeStreams()
    _, h = harness(fake, failure_hold=5.0)
    async with running_sink(h):
        fake.streams.clear()  # deleted after the sink started
        outcomes = await put_all(h, [b"a", b"b"])
        assert [kind for kind, _ in outcomes] == ["refused", "refused"]
        assert "ResourceNotFoundException" in str(outcomes[0][1])
        ready, reason = h.sink.ready()
        assert not ready and reason.startswith("kinesis: ResourceNotFoundException")
        kind, error = await h.put(b"refused at once")
        assert kind == "refused" and 4 <= error.retry_after <= 5
        calls = h.endpoint.calls
        await trio.sleep(4.9)
        assert h.endpoint.calls == calls  # nothing is sent during the hold
        await trio.sleep(0.1)
        assert h.sink.ready() == (True, "ok")
        assert (await h.put(b"still missing"))[0] == "refused"  # same cause: not logged again
        fake.streams.add("logs")
        await trio.sleep(5.0)
        assert (await h.put(b"fixed"))[0] == "ok"
    assert len(h.logged) == 2
    assert "cannot deliver to logs" in h.logged[0] and "ResourceNotFoundException" in h.logged[0]
    assert "does the stream exist" in h.logged[0] and "again" in h.logged[1]
    assert fake.stored_datas() == [b"fixed"] and h.ring_empty


async def test_credentials_refused_is_permanent(autojump_clock):
    fake, h = harness()
    fake.plan(Plan("status", 403, "UnrecognizedClientException"))
    async with running_sink(h):
        kind, error = await h.put(b"x")
        ready, reason = h.sink.ready()
    assert kind == "refused" and not ready and "UnrecognizedClientException" in reason
    assert len(h.logged) == 1 and "check the AWS credentials" in h.logged[0]


async def test_received_mode_answers_at_once_and_releases_after_storage(autojump_clock):
    fake, h = harness(ack=False)
    fake.plan(Plan("status", 500))
    async with running_sink(h):
        kind, extra = await h.put(b"quick")
        assert (kind, extra) == ("ok", None) and not h.ring_empty
    assert fake.stored_datas() == [b"quick"] and h.ring_empty


async def test_received_mode_drops_records_it_gives_up(autojump_clock):
    fake, h = harness(ack=False, retry_deadline=1.0)
    fake.plan(*[Plan("status", 500)] * 50)
    async with running_sink(h):
        assert (await h.put(b"lost"))[0] == "ok"
    assert h.sink.statistics().dropped == 1 and h.ring_empty and fake.stored == []


async def test_a_client_that_goes_away_leaves_no_slot_behind(autojump_clock):
    fake, h = harness()
    fake.plan(Plan("slow", delay=2.0), *[Plan("status", 500)] * 100)
    async with running_sink(h):
        with trio.move_on_after(1.0):
            await h.put(b"in a call")  # cancelled while its call is in progress
        with trio.move_on_after(2.5):
            await h.put(b"backing off")  # cancelled while waiting to retry
        await trio.sleep(5)
        stats = h.sink.statistics()
    assert stats.abandoned == 2 and stats.held == 0
    assert fake.stored_datas() == [b"in a call"]  # stored, but its client was gone
    assert h.ring_empty


async def test_shutdown_sends_what_is_queued_without_lingering(autojump_clock):
    fake, h = harness(ack=False, linger=60.0)
    async with running_sink(h):
        await h.put(b"queued")
        start = trio.current_time()
    assert trio.current_time() - start < 1.0
    assert fake.stored_datas() == [b"queued"] and h.ring_empty
    assert (await h.put(b"late"))[0] == "refused"


async def test_queue_full_is_refused(autojump_clock):
    fake, h = harness(ack=False, linger=10.0)
    h.sink._delivery.max_entries = 2
    async with running_sink(h):
        assert [(await h.put(b"%d" % i))[0] for i in range(3)] == ["ok", "ok", "refused"]


async def test_describe_stream_summary_sets_the_record_limit(autojump_clock):
    fake = FakeStreams(max_record_size_kib=2048)
    _, h = harness(fake, max_record_bytes=0)  # auto
    async with running_sink(h):
        assert h.sink.max_record_bytes == 2 * MIB
        assert h.sink.stream_max_record_bytes == 2 * MIB
    _, larger = harness(FakeStreams(max_record_size_kib=10240), max_record_bytes=MIB)
    async with running_sink(larger):
        assert larger.sink.max_record_bytes == MIB  # the flag's lower limit wins


async def test_describe_stream_summary_denied_keeps_the_flag(autojump_clock):
    async def handler(target, body):
        if target.endswith("DescribeStreamSummary"):
            return Reply(400, b'{"__type":"AccessDeniedException","message":"no"}')
        raise TransientError("ConnectionClosedError", "down")

    h = SinkHarness(MemoryEndpoint(handler))
    async with running_sink(h):
        assert h.sink.max_record_bytes == MIB and h.sink.ready() == (True, "ok")


async def test_zero_copy_ring_exported_once_per_builder_and_bodies_reused(autojump_clock, monkeypatch):
    import sinks.aws.putrecords as putrecords

    exports = []
    real_source = putrecords._Batch.source

    def counting_source(self, buf):
        exports.append(buf)
        return real_source(self, buf)

    monkeypatch.setattr(putrecords._Batch, "source", counting_source)
    fake = FakeStreams()
    bodies = []

    async def handler(target, body):
        if target.endswith(".PutRecords"):
            bodies.append(body)
            await trio.sleep(0.1)  # calls overlap
        answer = fake.handle(target, bytes(body))
        return Reply(answer[1], answer[2])

    h = SinkHarness(MemoryEndpoint(handler), max_in_flight=2, batch_records=2)
    async with running_sink(h):
        for _ in range(5):
            await put_all(h, [b"a", b"b", b"c", b"d"])
    assert len(exports) == 2 and all(buf is h.ring.buffer for buf in exports)
    assert len(bodies) == 10
    assert all(type(body) is memoryview for body in bodies)
    assert len({id(body.obj) for body in bodies}) == 2  # the two preallocated bodies, reused
    assert len(fake.stored) == 20


async def test_a_large_batch_is_hashed_in_the_thread_that_encoded_it(autojump_clock):
    import hashlib

    from sinks.aws.sink import ENCODE_IN_THREAD_BYTES

    fake = FakeStreams()
    seen = []

    class Recording(MemoryEndpoint):
        async def call(self, target, body, digest=None):
            if target.endswith(".PutRecords"):
                seen.append((bytes(body), digest))
            return await super().call(target, body, digest)

    h = SinkHarness(Recording(memory_endpoint(fake)._handler), batch_records=2)
    async with running_sink(h):
        await put_all(h, [b"s", b"m"])  # small: encoded and hashed on the loop
        await put_all(h, [b"L" * ENCODE_IN_THREAD_BYTES, b"l"])
    (small, small_digest), (large, large_digest) = seen
    assert small_digest is None  # the endpoint hashes it
    assert large_digest == hashlib.sha256(large).hexdigest()
    assert fake.stored_datas() == [b"s", b"m", b"L" * ENCODE_IN_THREAD_BYTES, b"l"]


async def test_a_large_batch_is_encoded_behind_the_requests_unless_the_sink_falls_behind(
        autojump_clock, monkeypatch):
    from sinks import worker
    from sinks.aws.sink import ENCODE_IN_THREAD_BYTES

    backgrounds = []
    run_sync = worker.run_sync

    async def recording(fn, *args, background=False):
        backgrounds.append(background)
        return await run_sync(fn, *args, background=background)

    monkeypatch.setattr(worker, "run_sync", recording)
    large = b"L" * ENCODE_IN_THREAD_BYTES
    # The autojump clock runs on while a job is in its thread: a deadline
    # far enough away keeps the queued records from expiring meanwhile.
    fake, h = harness(batch_records=1, max_in_flight=2, retry_deadline=1e6)
    async with running_sink(h):
        await put_all(h, [large])
        # A builder was free and nothing waited: the job yields the CPU to the requests.
        assert backgrounds == [True]
        await put_all(h, [large, large, large])
    # The call that took the last free builder runs its job at the loop's priority.
    assert backgrounds[1] is True and False in backgrounds[2:]
    assert len(fake.stored) == 4


async def test_record_keys_follow_the_partition_key_setting():
    fake, h = harness(partition_key="header:X-Route", explicit_hash_key_header="X-Hash")
    lookup = {b"x-route": b"eu", b"x-hash": b"42"}.get
    assert h.sink.record_keys("rid", None, lookup) == ("eu", "42", 2)


# -- configuration -----------------------------------------------------------------


def test_options_from_config():
    config = from_args(["--sink", "kinesis", "--stream", "logs", "--ack", "received",
                        "--partition-key", "tenant", "--batch-records", "100", "--linger", "50ms",
                        "--max-in-flight", "2", "--retry-deadline", "5s", "--max-record-size", "2MiB"], {})
    options = StreamOptions.from_config(config)
    assert (options.service, options.stream, options.ack, options.partition_key) == (
        "kinesis", "logs", False, "tenant")
    assert (options.batch_records, options.linger, options.max_in_flight) == (100, 0.05, 2)
    assert options.retry_deadline == 5.0
    # A 2 MiB record needs a request that can hold it.
    assert options.limits() == (100, 5 * MIB, 2 * MIB)
    assert StreamOptions("kinesis", "s", max_record_bytes=10 * MIB).limits()[1] == 10 * MIB


def test_env_twins_fill_the_settings():
    config = from_args([], {"SLUICE_SINK": "kinesis", "SLUICE_STREAM": "from-env",
                            "SLUICE_REGION": "eu-west-1", "SLUICE_ENDPOINT_URL": "https://x"})
    assert (config.sink, config.stream, config.region, config.endpoint_url) == (
        "kinesis", "from-env", "eu-west-1", "https://x")


def test_sink_builds_its_batches_from_the_ring_it_is_given():
    ring_buffer = bytearray(1 << 16)
    sink = StreamSink(lambda slot: None, ring_buffer, StreamOptions("kinesis", "logs"))
    assert sink.max_record_bytes == MIB and sink.describe().startswith("kinesis (stream logs")


# -- the whole gateway against moto ---------------------------------------------


@pytest.fixture
def stream(moto, aws_env):
    aws_env(moto.key, moto.secret, moto.region)
    client = moto.client("kinesis")
    name = "s-" + uuid.uuid4().hex[:12]
    client.create_stream(StreamName=name, ShardCount=2)
    return client, name


async def test_records_read_back_from_moto_equal_envelope_and_body(moto, stream):
    client, name = stream
    key = 26  # random partition keys are record ids
    largest = MIB - envelope_len() - key
    bodies = [b"", b"x", b'{"path":"/users","status":200}', bytes(range(256)) * 256,
              bytes((i * 7) % 251 for i in range(largest))]
    flags = ["--sink", "kinesis", "--stream", name, "--endpoint-url", moto.url, "--max-body", "1MiB"]
    async with gateway_in_process(flags) as (gateway, port):
        answers = [await trio.to_thread.run_sync(post, port, body) for body in bodies]
        too_large = await trio.to_thread.run_sync(post, port, b"y" * (largest + 1))
        ready = await trio.to_thread.run_sync(get, port, "/readyz")
    assert [status for status, _, _ in answers] == [202] * len(bodies)
    assert too_large[0] == 413 and b"exceeds the 1048576-byte limit" in too_large[2]
    assert ready[0] == 200
    stored = {}
    for record in read_stream(client, name):
        stored[record["PartitionKey"]] = record
    assert len(stored) == len(bodies)
    for body, (_, _, answer) in zip(bodies, answers):
        doc = json.loads(answer)
        record = stored[doc["id"]]
        meta, _, data = record["Data"].partition(b"\n")
        assert data == body and json.loads(meta)["id"] == doc["id"]
        assert (doc["shard_id"], doc["sequence_number"]) == (record["ShardId"], record["SequenceNumber"])
    assert gateway.ring.used == 0 and gateway.ring.live == 0


async def test_oversized_record_is_refused_before_its_body_is_sent(moto, stream):
    _, name = stream
    flags = ["--sink", "kinesis", "--stream", name, "--endpoint-url", moto.url,
             "--max-record-size", "64KiB", "--partition-key", "header:X-Key"]
    async with gateway_in_process(flags) as (gateway, port):
        # Expect: 100-continue and no body: the answer must come without it.
        head = (b"POST /v1/logs HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nX-Key: %s\r\n"
                b"Expect: 100-continue\r\n\r\n")
        largest = 64 * 1024 - envelope_len() - 3
        status, _, body = await trio.to_thread.run_sync(http_exchange, port, head % (10, b"k" * 257))
        assert status == 400 and b"partition key of 257 characters" in body
        status, _, body = await trio.to_thread.run_sync(http_exchange, port, head % (largest + 1, b"key"))
        assert status == 413 and b"partition key 3) exceeds the 65536-byte limit" in body
        status, _, _ = await trio.to_thread.run_sync(http_exchange, port, head % (largest, b"key"))
        assert status == 100  # fits: the body is asked for
        assert gateway.accepted == 0


async def test_wrong_secret_is_a_403_that_stops_the_sink(moto, stream, aws_env, capsys):
    _, name = stream
    aws_env(moto.key, "not-the-secret", moto.region)
    flags = ["--sink", "kinesis", "--stream", name, "--endpoint-url", moto.url]
    async with gateway_in_process(flags) as (gateway, port):
        answers = [await trio.to_thread.run_sync(post, port, b"body %d" % i) for i in range(3)]
        status, _, body = await trio.to_thread.run_sync(get, port, "/readyz")
    assert [a[0] for a in answers] == [503] * 3
    assert all(b"retry-after" in a[1] for a in answers)
    assert status == 503 and b"SignatureDoesNotMatch" in body
    (event,) = log_events(capsys.readouterr().err, "sink_not_ready")
    assert event["sink"] == "kinesis" and "check the AWS credentials" in event["reason"]
    assert gateway.ring.used == 0


async def test_missing_stream_is_reported_at_start(moto, aws_env, capsys):
    aws_env(moto.key, moto.secret, moto.region)
    flags = ["--sink", "kinesis", "--stream", "no-such-stream", "--endpoint-url", moto.url]
    async with gateway_in_process(flags) as (gateway, port):
        status, _, body = await trio.to_thread.run_sync(get, port, "/readyz")
        answer = await trio.to_thread.run_sync(post, port, b"x")
    assert status == 503 and b"ResourceNotFoundException" in body
    assert answer[0] == 503 and json.loads(answer[2])["error"] == "sink_unavailable"
    (event,) = log_events(capsys.readouterr().err, "sink_not_ready")
    assert "does the stream exist" in event["reason"]


async def test_explicit_hash_key_header_reaches_moto(moto, stream):
    client, name = stream
    flags = ["--sink", "kinesis", "--stream", name, "--endpoint-url", moto.url,
             "--explicit-hash-key-header", "X-Hash"]
    # In the upper shard's range (moto fails on exactly 2**128-1, the top of it).
    top = b"%d" % (2**127 + 5)
    async with gateway_in_process(flags) as (gateway, port):
        status, _, body = await trio.to_thread.run_sync(post, port, b"to the last shard",
                                                        b"X-Hash: " + top + b"\r\n")
        bad = await trio.to_thread.run_sync(post, port, b"x", b"X-Hash: 12ab\r\n")
    assert (status, bad[0]) == (202, 400), body
    shards = client.list_shards(StreamName=name)["Shards"]
    last = max(shards, key=lambda s: int(s["HashKeyRange"]["EndingHashKey"]))
    assert json.loads(body)["shard_id"] == last["ShardId"]

