from __future__ import annotations

import json
import random
import sys

import botocore.serialize
import botocore.session
import botocore.validate
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinks.aws import putrecords
from sinks.aws.b64 import available_backends
from sinks.aws.errors import MalformedResponse, PermanentError, ThrottledError, TransientError
from sinks.aws.limits import EXPLICIT_HASH_KEY_MAX, KIB, MIB
from sinks.aws.putrecords import (
    FirehoseBatch,
    PutRecordsBatch,
    RecordRejected,
    RecordTooLarge,
    parse_put_record_batch_response,
    parse_put_records_response,
)
from tests.support.batches import add

BACKENDS = available_backends()
SESSION = botocore.session.get_session()
MODELS = {svc: SESSION.get_service_model(svc) for svc in ("kinesis", "firehose")}
OPERATIONS = {"kinesis": "PutRecords", "firehose": "PutRecordBatch"}
slow = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def botocore_request(service, params):
    """Validate and serialize *params* exactly as a botocore client would."""
    model = MODELS[service]
    op = model.operation_model(OPERATIONS[service])
    report = botocore.validate.ParamValidator().validate(params, op.input_shape)
    assert not report.has_errors(), report.generate_report()
    return botocore.serialize.create_serializer(model.protocol).serialize_to_request(params, op)


def kinesis_params(records, stream_name="logs", stream_arn=None):
    """PutRecords params in the service model's member order."""
    entries = []
    for data, key, hash_key in records:
        entry = {"Data": bytes(data)}
        if hash_key is not None:
            entry["ExplicitHashKey"] = hash_key
        entry["PartitionKey"] = key
        entries.append(entry)
    params = {"Records": entries}
    if stream_name is not None:
        params["StreamName"] = stream_name
    if stream_arn is not None:
        params["StreamARN"] = stream_arn
    return params


def firehose_params(records, name="logs"):
    return {"DeliveryStreamName": name, "Records": [{"Data": bytes(d)} for d in records]}


def blob(n, seed=0):
    return random.Random(seed).getrandbits(8 * n).to_bytes(n, "little") if n else b""


def utf16_units(key):
    return len(key.encode("utf-16-le", "surrogatepass")) // 2


small_data = st.one_of(st.binary(max_size=40), st.binary(max_size=700),
                       st.integers(2000, 40_000).map(blob))
keys = st.one_of(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=260),
                 st.sampled_from(['"', "\\", "\x00\x1f\x7f", "\u2028", "é\U0001F600"]))
hash_keys = st.one_of(st.none(), st.integers(0, EXPLICIT_HASH_KEY_MAX).map(str))


# -- protocol ---------------------------------------------------------------


@pytest.mark.parametrize("service", ["kinesis", "firehose"])
def test_botocore_speaks_json_1_1(service):
    assert MODELS[service].protocol == "json"
    assert MODELS[service].metadata["jsonVersion"] == "1.1"


def test_headers_match_botocore():
    req = botocore_request("kinesis", kinesis_params([(b"x", "k", None)]))
    batch = PutRecordsBatch("logs")
    assert req["headers"] == {"X-Amz-Target": batch.target, "Content-Type": batch.content_type}
    req = botocore_request("firehose", firehose_params([b"x"]))
    fh = FirehoseBatch("logs")
    assert req["headers"] == {"X-Amz-Target": fh.target, "Content-Type": fh.content_type}


def test_botocore_follows_dict_order_not_model_order():
    # Why "the same records" means model order: botocore keeps the caller's order.
    params = {"StreamName": "logs", "Records": [{"PartitionKey": "k", "Data": b"x"}]}
    body = botocore_request("kinesis", params)["body"]
    assert body == b'{"StreamName": "logs", "Records": [{"PartitionKey": "k", "Data": "eA=="}]}'


# -- bodies equal botocore's --------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@slow
@given(records=st.lists(st.tuples(small_data, keys, hash_keys), min_size=1, max_size=30),
       from_source=st.booleans())
def test_put_records_body_is_botocores(backend, records, from_source):
    batch = PutRecordsBatch("logs", backend=backend)
    ring = bytearray(b"".join(d for d, _, _ in records))
    source = batch.source(ring)
    accepted, offset = [], 0
    for data, key, hash_key in records:
        start, offset = offset, offset + len(data)
        if utf16_units(key) > 256:
            with pytest.raises(RecordRejected):
                add(batch, data, key, hash_key)
            continue
        if from_source:
            assert batch.add_from(source, start, offset, key, hash_key)
        else:
            assert add(batch, memoryview(ring)[start:offset], key, hash_key)
        accepted.append((data, key, hash_key))
    if accepted:
        assert bytes(batch.body()) == botocore_request("kinesis", kinesis_params(accepted))["body"]
        assert len(batch) == len(accepted)
    source.close()
    batch.close()


@pytest.mark.parametrize("backend", BACKENDS)
@slow
@given(records=st.lists(small_data, min_size=1, max_size=30))
def test_firehose_body_is_botocores(backend, records):
    batch = FirehoseBatch("delivery-1", backend=backend)
    for data in records:
        assert add(batch, data)
    assert bytes(batch.body()) == botocore_request("firehose", firehose_params(records, "delivery-1"))["body"]


@pytest.mark.parametrize("name,arn", [
    ("logs", "arn:aws:kinesis:eu-west-1:111122223333:stream/logs"),
    (None, "arn:aws-cn:kinesis:cn-north-1:111122223333:stream/a\"b"),
])
def test_stream_arn(name, arn):
    batch = PutRecordsBatch(name, stream_arn=arn)
    add(batch, b"x", "k")
    assert bytes(batch.body()) == botocore_request(
        "kinesis", kinesis_params([(b"x", "k", None)], name, arn))["body"]


def test_key_memo_overflow_stays_correct(monkeypatch):
    monkeypatch.setattr(putrecords, "_KEY_MEMO_MAX", 3)
    batch = PutRecordsBatch("logs")
    records = [(b"d%d" % i, "key-%d" % (i % 7), None) for i in range(40)]
    for r in records:
        assert add(batch, *r)
    assert bytes(batch.body()) == botocore_request("kinesis", kinesis_params(records))["body"]


@pytest.mark.parametrize("distinct, kept", [(2, True), (10 ** 6, False)])
def test_the_key_memo_is_kept_for_keys_that_repeat_and_dropped_for_unique_ones(monkeypatch, distinct, kept):
    monkeypatch.setattr(putrecords, "_KEY_MEMO_MAX", 8)
    batch = PutRecordsBatch("logs")
    records = [(b"d%d" % i, "key-%d" % (i % distinct), None) for i in range(40)]
    for r in records:
        assert add(batch, *r)
    assert (batch._keys is not None) == kept
    assert bytes(batch.body()) == botocore_request("kinesis", kinesis_params(records))["body"]


# -- limits ------------------------------------------------------------------


@slow
@given(max_records=st.integers(1, 6), max_bytes=st.integers(1, 3000),
       max_record_bytes=st.integers(1, 3000),
       records=st.lists(st.tuples(st.integers(0, 1200), st.text(min_size=1, max_size=8)),
                        min_size=1, max_size=40))
def test_add_refuses_exactly_at_the_limits(max_records, max_bytes, max_record_bytes, records):
    batch = PutRecordsBatch("logs", max_records=max_records, max_bytes=max_bytes,
                            max_record_bytes=max_record_bytes)
    held = []

    def seal():
        body = bytes(batch.body())
        assert body == botocore_request("kinesis", kinesis_params(held))["body"]
        assert len(body) <= batch.capacity
        held.clear()
        batch.reset()

    for n, key in records:
        data = blob(n, n)
        size = n + len(key.encode("utf-8"))
        payload = sum(len(d) + len(k.encode("utf-8")) for d, k, _ in held)
        if size > min(max_record_bytes, max_bytes):
            with pytest.raises(RecordTooLarge) as info:
                add(batch, data, key)
            assert info.value.size == size and info.value.status == 413
            continue
        fits = len(held) < max_records and payload + size <= max_bytes
        assert add(batch, data, key) is fits
        if not fits:
            seal()
            payload = 0
            assert add(batch, data, key)
        held.append((data, key, None))
        assert len(batch) == len(held) <= max_records
        assert batch.payload_bytes == payload + size <= max_bytes
    if held:
        seal()


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_kinesis_limits(backend):
    batch = PutRecordsBatch("logs", backend=backend)
    big = blob(MIB - 1)
    for _ in range(5):
        assert add(batch, big, "k")
    assert batch.payload_bytes == 5 * MIB
    assert not add(batch, b"", "k")  # one more byte breaks 5 MiB
    with pytest.raises(RecordTooLarge):
        add(batch, big, "kk")  # 1 MiB + 1
    assert bytes(batch.body()) == botocore_request(
        "kinesis", kinesis_params([(big, "k", None)] * 5))["body"]
    batch.reset()
    for _ in range(500):
        assert add(batch, b"x", "k")
    assert not add(batch, b"", "k")


@pytest.mark.parametrize("backend", BACKENDS)
def test_worst_case_bodies_fit_the_preallocated_buffer(backend):
    # Keys escaping to 6 bytes per character, maximal hash keys, and data
    # sizes of 3k+1 (the most base64 padding) filling the request limit.
    key = "\x01" * 256
    kinesis = PutRecordsBatch("k" * 128, backend=backend)
    size = (5 * MIB) // 500 - 256
    size -= (size - 1) % 3
    records = [(blob(size, i), key, str(EXPLICIT_HASH_KEY_MAX)) for i in range(500)]
    for r in records:
        assert add(kinesis, *r)
    body = kinesis.body()
    assert body.nbytes <= kinesis.capacity
    assert bytes(body) == botocore_request("kinesis", kinesis_params(records, "k" * 128))["body"]

    firehose = FirehoseBatch("f" * 64, backend=backend)
    size = (4 * MIB) // 500
    size -= (size - 1) % 3
    datas = [blob(size, i) for i in range(500)]
    for d in datas:
        assert add(firehose, d)
    assert firehose.body().nbytes <= firehose.capacity
    assert bytes(firehose.body()) == botocore_request("firehose", firehose_params(datas, "f" * 64))["body"]


def test_default_firehose_limits():
    batch = FirehoseBatch("logs")
    chunk = blob(1000 * KIB)
    for _ in range(4):
        assert add(batch, chunk)
    assert not add(batch, blob(96 * KIB + 1))  # 4 MiB is 4,000 KiB + 96 KiB
    assert add(batch, blob(96 * KIB))
    with pytest.raises(RecordTooLarge):
        add(batch, blob(1000 * KIB + 1))


@pytest.mark.parametrize("key", [
    "", "x" * 257, "\U0001F600" * 129, "ok\ud800", b"bytes", None,
])
def test_bad_partition_keys_are_rejected(key):
    batch = PutRecordsBatch("logs")
    with pytest.raises(RecordRejected) as info:
        add(batch, b"data", key)
    assert info.value.status == 400
    assert len(batch) == 0


def test_partition_key_length_counts_utf16_units():
    batch = PutRecordsBatch("logs")
    assert add(batch, b"", "\U0001F600" * 128)
    assert add(batch, b"", "é" * 256)
    assert batch.payload_bytes == 4 * 128 + 2 * 256


@pytest.mark.parametrize("hash_key", [
    "", "01", "-1", "+1", " 1", "1 ", "1.0", "\u0661", str(EXPLICIT_HASH_KEY_MAX + 1),
    "1" * 40, 5,
])
def test_bad_explicit_hash_keys_are_rejected(hash_key):
    with pytest.raises(RecordRejected):
        add(PutRecordsBatch("logs"), b"data", "k", hash_key)


def test_rejection_wins_over_a_full_batch():
    batch = PutRecordsBatch("logs", max_records=1)
    assert add(batch, b"x", "k")
    assert not add(batch, b"x", "k")
    with pytest.raises(RecordTooLarge):
        add(batch, blob(MIB), "k")


@pytest.mark.parametrize("kwargs", [
    {}, {"stream_name": "bad name"}, {"stream_name": "x" * 129}, {"stream_name": ""},
    {"stream_name": "s", "max_records": 501}, {"stream_name": "s", "max_records": 0},
    {"stream_name": "s", "max_bytes": 10 * MIB + 1}, {"stream_name": "s", "max_record_bytes": 0},
    {"stream_arn": "arn:aws:s3:::bucket"},
])
def test_bad_kinesis_config(kwargs):
    with pytest.raises(ValueError):
        PutRecordsBatch(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"delivery_stream_name": "x" * 65}, {"delivery_stream_name": "a/b"},
    {"delivery_stream_name": "s", "max_bytes": 4 * MIB + 1},
    {"delivery_stream_name": "s", "max_record_bytes": 1000 * KIB + 1},
])
def test_bad_firehose_config(kwargs):
    with pytest.raises(ValueError):
        FirehoseBatch(**kwargs)


def test_large_record_stream_config():
    batch = PutRecordsBatch("logs", max_bytes=10 * MIB, max_record_bytes=10 * MIB)
    assert add(batch, blob(10 * MIB - 1), "k")
    assert not add(batch, b"", "k")


# -- lifecycle and zero-copy -------------------------------------------------


def test_seal_reset_and_reuse():
    batch = PutRecordsBatch("logs")
    with pytest.raises(ValueError):
        batch.body()
    add(batch, b"one", "k")
    first = batch.body()
    assert batch.sealed
    with pytest.raises(RuntimeError):
        add(batch, b"two", "k")
    batch.reset()
    add(batch, b"two", "k")
    second = batch.body()
    assert first.obj is second.obj is batch._buf  # one buffer for the batch's life
    assert bytes(second) == botocore_request("kinesis", kinesis_params([(b"two", "k", None)]))["body"]


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="needs tracemalloc")
def test_building_from_the_ring_does_not_copy_payloads():
    import tracemalloc

    ring = bytearray(blob(4 * MIB))
    batch = PutRecordsBatch("logs")
    source = batch.source(ring)
    step = 10 * KIB

    def fill():
        batch.reset()
        for i in range(400):
            assert batch.add_from(source, i * step, (i + 1) * step, "tenant-%d" % (i % 4))
        return batch.body()

    fill()  # warm the key memo
    tracemalloc.start()
    try:
        body = fill()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert body.nbytes > 5 * MIB
    # 4 MB of payload; python backend would allocate 13 KiB per record at once.
    assert peak < 64 * KIB


# -- responses ---------------------------------------------------------------

KINESIS_OK = b"""{"FailedRecordCount":0,"Records":[
 {"SequenceNumber":"49543463076548007577105092703039560359975228518395019266","ShardId":"shardId-000000000000"},
 {"SequenceNumber":"49543463076570308322303623326179887152428262250726293522","ShardId":"shardId-000000000001"}
],"EncryptionType":"KMS"}"""

KINESIS_PARTIAL = b"""{"FailedRecordCount":4,"Records":[
 {"SequenceNumber":"49543463076548007577105092703039560359975228518395012686","ShardId":"shardId-000000000000"},
 {"ErrorCode":"ProvisionedThroughputExceededException",
  "ErrorMessage":"Rate exceeded for shard shardId-000000000001 in stream logs under account 1111"},
 {"ErrorCode":"InternalFailure","ErrorMessage":"Internal service failure."},
 {"ErrorCode":"KMSAccessDeniedException",
  "ErrorMessage":"User is not authorized to perform kms:GenerateDataKey"},
 {"ErrorCode":"KMSThrottlingException","ErrorMessage":"Rate exceeded"}
]}"""

FIREHOSE_PARTIAL = b"""{"FailedPutCount":1,"Encrypted":true,"RequestResponses":[
 {"RecordId":"49543463076548007577105092703039560359975228518395019266"},
 {"ErrorCode":"ServiceUnavailableException","ErrorMessage":"Slow down."}
]}"""


def test_parse_kinesis_success():
    result = parse_put_records_response(KINESIS_OK, expected=2)
    assert result.failed == 0 and result.encrypted
    assert [r.shard_id for r in result.records] == ["shardId-000000000000", "shardId-000000000001"]
    assert all(r.ok for r in result.records)
    assert result.retryable() == result.rejected() == [] and not result.throttled


def test_parse_kinesis_partial_failure():
    result = parse_put_records_response(memoryview(KINESIS_PARTIAL), expected=5)
    assert result.failed == 4 and not result.encrypted
    kinds = [type(r.error) for r in result.records]
    assert kinds == [type(None), ThrottledError, TransientError, PermanentError, ThrottledError]
    assert result.retryable() == [1, 2, 4]
    assert result.rejected() == [3]
    assert result.throttled
    assert result.records[1].error.code == "ProvisionedThroughputExceededException"
    assert "shardId-000000000001" in result.records[1].error.message
    assert result.records[1].error.status is None


def test_parse_firehose():
    result = parse_put_record_batch_response(FIREHOSE_PARTIAL, expected=2)
    assert result.encrypted and result.failed == 1
    assert result.records[0].record_id.startswith("4954") and result.records[0].ok
    assert isinstance(result.records[1].error, ThrottledError)
    assert result.retryable() == [1]


@pytest.mark.parametrize("parse,body,expected", [
    (parse_put_records_response, b"<html>502</html>", None),
    (parse_put_records_response, b"[]", None),
    (parse_put_records_response, b'{"FailedRecordCount":0}', None),
    (parse_put_records_response, b'{"Records":[{"ShardId":"shardId-0"}]}', None),
    (parse_put_records_response, b'{"Records":["x"]}', None),
    (parse_put_records_response, KINESIS_OK, 3),
    (parse_put_record_batch_response, b'{"RequestResponses":[{}]}', None),
    (parse_put_record_batch_response, FIREHOSE_PARTIAL, 1),
])
def test_malformed_responses(parse, body, expected):
    with pytest.raises(MalformedResponse) as info:
        parse(body, expected=expected)
    assert info.value.retryable


def test_parsed_shapes_agree_with_botocore():
    # botocore's own parser reads the same literal bodies the same way.
    import botocore.parsers

    op = MODELS["kinesis"].operation_model("PutRecords")
    parsed = botocore.parsers.create_parser("json").parse(
        {"status_code": 200, "headers": {}, "body": KINESIS_PARTIAL}, op.output_shape)
    ours = parse_put_records_response(KINESIS_PARTIAL)
    assert [e.get("ErrorCode") for e in parsed["Records"]] == [
        r.error.code if r.error else None for r in ours.records]
    assert json.loads(KINESIS_PARTIAL)["FailedRecordCount"] == ours.failed
