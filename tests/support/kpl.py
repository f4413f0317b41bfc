"""Two independent judges of KPL aggregated records, for the tests.

:func:`lenient_deaggregate` is PyPI ``aws-kinesis-agg`` (what a Python
consumer or Lambda uses); it lets a bad digest or a missing required field
through.  :func:`strict_parse` is the ``protobuf`` runtime with the message
classes built at test time from the KPL's ``.proto`` (proto2, so required
fields count): magic, MD5 and ``IsInitialized`` must all hold, and the
runtime's own serialisation of the parsed message must give back the exact
bytes (field order, varint widths).
"""
from __future__ import annotations

import base64
import hashlib
from typing import Any, Dict, Iterable, List, NamedTuple, Optional

import pytest

pytest.importorskip("six", reason="aws-kinesis-agg imports six without declaring it")
agg_deaggregator = pytest.importorskip("aws_kinesis_agg.deaggregator")
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # noqa: E402

MAGIC = b"\xf3\x89\x9a\xc2"


def _message_classes() -> Any:
    """AggregatedRecord of the KPL's aggregation format (amazon-kinesis-producer
    ``aws/kinesis/protobuf/messages.proto``), without protoc."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="sluice_test_kpl.proto", package="sluice_test_kpl", syntax="proto2")
    field = descriptor_pb2.FieldDescriptorProto
    req, opt, rep = field.LABEL_REQUIRED, field.LABEL_OPTIONAL, field.LABEL_REPEATED
    tag = fdp.message_type.add(name="Tag")
    tag.field.add(name="key", number=1, label=req, type=field.TYPE_STRING)
    tag.field.add(name="value", number=2, label=opt, type=field.TYPE_STRING)
    record = fdp.message_type.add(name="Record")
    record.field.add(name="partition_key_index", number=1, label=req, type=field.TYPE_UINT64)
    record.field.add(name="explicit_hash_key_index", number=2, label=opt, type=field.TYPE_UINT64)
    record.field.add(name="data", number=3, label=req, type=field.TYPE_BYTES)
    record.field.add(name="tags", number=4, label=rep, type=field.TYPE_MESSAGE,
                     type_name=".sluice_test_kpl.Tag")
    agg = fdp.message_type.add(name="AggregatedRecord")
    agg.field.add(name="partition_key_table", number=1, label=rep, type=field.TYPE_STRING)
    agg.field.add(name="explicit_hash_key_table", number=2, label=rep, type=field.TYPE_STRING)
    agg.field.add(name="records", number=3, label=rep, type=field.TYPE_MESSAGE,
                  type_name=".sluice_test_kpl.Record")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("sluice_test_kpl.AggregatedRecord"))


AggregatedRecord = _message_classes()


class SubRecord(NamedTuple):
    partition_key: str
    explicit_hash_key: Optional[str]
    data: bytes


def strict_parse(blob: bytes) -> List[SubRecord]:
    """The user records of an aggregate; AssertionError on anything not exact."""
    assert blob[:4] == MAGIC, "no magic"
    proto, digest = blob[4:-16], blob[-16:]
    assert len(blob) > 20 and hashlib.md5(proto).digest() == digest, "bad digest"
    message = AggregatedRecord()
    message.ParseFromString(proto)
    assert message.IsInitialized(), message.FindInitializationErrors()
    assert message.SerializeToString() == proto, "not the runtime's serialisation"
    out = []
    for sub in message.records:
        ehk = (message.explicit_hash_key_table[sub.explicit_hash_key_index]
               if sub.HasField("explicit_hash_key_index") else None)
        out.append(SubRecord(message.partition_key_table[sub.partition_key_index], ehk, sub.data))
    return out


def strict_user_records(data: bytes, partition_key: str,
                        explicit_hash_key: Optional[str] = None) -> List[SubRecord]:
    """A Kinesis record's user records as KCL sees them: an aggregate's
    sub-records, or the record itself."""
    if data[:4] == MAGIC:
        return strict_parse(data)
    return [SubRecord(partition_key, explicit_hash_key, data)]


def lenient_deaggregate(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """aws-kinesis-agg over boto3-shaped records (``Data`` bytes,
    ``PartitionKey``, ``SequenceNumber``...); ``Data`` of each result is bytes."""
    shaped = []
    for r in records:
        shaped.append({
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "sequenceNumber": r.get("SequenceNumber", "0"),
                "approximateArrivalTimestamp": 0,
                "partitionKey": r["PartitionKey"],
                "explicitHashKey": r.get("ExplicitHashKey"),
                "data": base64.b64encode(bytes(r["Data"])),
            },
        })
    out = []
    for user in agg_deaggregator.iter_deaggregate_records(shaped):
        k = user["kinesis"]
        out.append({"PartitionKey": k["partitionKey"],
                    "ExplicitHashKey": k.get("explicitHashKey"),
                    "SequenceNumber": k["sequenceNumber"],
                    "SubSequenceNumber": k.get("subSequenceNumber"),
                    "Data": base64.b64decode(k["data"])})
    return out
