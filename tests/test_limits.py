"""The limits module agrees with the service models botocore ships."""
from __future__ import annotations

import re

import botocore.session
import pytest

from sinks.aws import limits

SESSION = botocore.session.get_session()
KINESIS = SESSION.get_service_model("kinesis")
FIREHOSE = SESSION.get_service_model("firehose")


def meta(model, shape_name, member=None):
    shape = model.shape_for(shape_name)
    if member is not None:
        shape = shape.members[member]
    return shape.metadata


def test_put_records_shapes():
    assert meta(KINESIS, "PutRecordsRequestEntryList")["max"] == limits.PUT_RECORDS_MAX_RECORDS
    entry = KINESIS.shape_for("PutRecordsRequestEntry")
    assert entry.members["Data"].metadata["max"] == limits.KINESIS_LARGE_MAX_RECORD_BYTES
    key = entry.members["PartitionKey"].metadata
    assert (key["min"], key["max"]) == (limits.PARTITION_KEY_MIN_CHARS, limits.PARTITION_KEY_MAX_CHARS)


def test_explicit_hash_key_pattern():
    pattern = KINESIS.shape_for("PutRecordsRequestEntry").members["ExplicitHashKey"].metadata["pattern"]
    digits = int(re.search(r"\\d\{0,(\d+)\}", pattern).group(1)) + 1
    assert digits == limits.EXPLICIT_HASH_KEY_MAX_DIGITS == len(str(limits.EXPLICIT_HASH_KEY_MAX))


def test_stream_names():
    name = meta(KINESIS, "StreamName")
    assert name["max"] == limits.STREAM_NAME_MAX_CHARS and name["pattern"] == limits.NAME_PATTERN
    assert meta(KINESIS, "StreamARN")["max"] == limits.STREAM_ARN_MAX_CHARS
    name = meta(FIREHOSE, "DeliveryStreamName")
    assert name["max"] == limits.DELIVERY_STREAM_NAME_MAX_CHARS
    assert name["pattern"] == limits.NAME_PATTERN


def test_put_record_batch_shapes():
    assert meta(FIREHOSE, "PutRecordBatchRequestEntryList")["max"] == limits.PUT_RECORD_BATCH_MAX_RECORDS
    assert meta(FIREHOSE, "Record", "Data")["max"] == limits.FIREHOSE_MAX_RECORD_BYTES


@pytest.mark.parametrize("model,prefix", [
    (KINESIS, limits.KINESIS_TARGET_PREFIX), (FIREHOSE, limits.FIREHOSE_TARGET_PREFIX),
])
def test_wire_protocol(model, prefix):
    assert model.metadata["targetPrefix"] == prefix
    assert limits.JSON_CONTENT_TYPE == "application/x-amz-json-" + model.metadata["jsonVersion"]


def test_defaults_sit_inside_the_ceilings():
    assert limits.KINESIS_DEFAULT_MAX_RECORD_BYTES == limits.MIB
    assert limits.KINESIS_DEFAULT_MAX_RECORD_BYTES < limits.KINESIS_LARGE_MAX_RECORD_BYTES
    assert limits.PUT_RECORDS_MAX_REQUEST_BYTES == 5 * limits.MIB
    assert limits.PUT_RECORDS_MAX_REQUEST_BYTES < limits.PUT_RECORDS_LARGE_MAX_REQUEST_BYTES
    assert limits.FIREHOSE_MAX_RECORD_BYTES == 1_024_000
    assert limits.PUT_RECORD_BATCH_MAX_REQUEST_BYTES == 4 * limits.MIB


def test_everything_exported_exists():
    for name in limits.__all__:
        assert hasattr(limits, name)
