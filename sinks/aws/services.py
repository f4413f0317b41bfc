"""What differs between Kinesis Data Streams and Firehose, said once per service.

The stream sink (``sinks.aws.sink``) is one driver for both services; every
difference between them is a field of the service's `ServiceProfile`: its
limits, the operation and its body builder, how a record joins a body, how
an answer is read, what a stored record's acknowledgement carries, and the
words of its messages.  Nothing here does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Union

from sinks.aws.b64 import Source
from sinks.aws.limits import (
    FIREHOSE_MAX_RECORD_BYTES,
    KINESIS_DEFAULT_MAX_RECORD_BYTES,
    KINESIS_LARGE_MAX_RECORD_BYTES,
    PUT_RECORD_BATCH_MAX_RECORDS,
    PUT_RECORD_BATCH_MAX_REQUEST_BYTES,
    PUT_RECORDS_LARGE_MAX_REQUEST_BYTES,
    PUT_RECORDS_MAX_RECORDS,
)
from sinks.aws.partition_keys import key_bytes
from sinks.aws.putrecords import (
    BatchLimits,
    FirehoseBatch,
    PutRecordsBatch,
    PutRecordsResult,
    RecordResult,
    parse_put_record_batch_response,
    parse_put_records_response,
)
from sinks.aws.record_limit import AUTO, stream_limits

__all__ = ["ServiceProfile", "KINESIS", "FIREHOSE", "PROFILES", "profile_for"]

Batch = Union[PutRecordsBatch, FirehoseBatch]


@dataclass(frozen=True)
class ServiceProfile:
    """One service as the stream sink sees it."""

    #: ``--sink`` value and botocore's service name.
    name: str
    #: What the service calls a stream, for messages.
    stream_kind: str
    #: The Config field that names the stream.
    stream_setting: str
    #: The IAM action a put needs, for the hint of an access-denied error.
    put_action: str
    #: Ceilings of one request: records, bytes, bytes per record.
    max_records: int
    max_request_bytes: int
    max_record_bytes: int
    #: Bytes per record until the stream's own limit is read, with
    #: ``--max-record-size auto``.
    default_record_bytes: int
    #: Whether each stream has its own record limit (``MaxRecordSizeInKiB``,
    #: read by ``sinks.aws.follow_limit`` at start and while running), and a
    #: record larger than --batch-bytes raises its request's size to hold it.
    follows_record_limit: bool
    #: ``(stream, limits) -> batch``: a preallocated request body.
    new_batch: Callable[[str, BatchLimits], Batch]
    #: ``(batch, source, start, stop, partition key, hash key) -> fits``.
    add: Callable[[Any, Source, int, int, Optional[str], Optional[str]], bool]
    #: Whether records carry partition keys (decided from the request head).
    keyed: bool
    #: Whether records go out as Kinesis records: ``--aggregation kpl`` applies,
    #: and Kinesis records, PUT payload units and bytes sent are counted.
    kinesis_records: bool
    #: ``partition key -> bytes it adds to the record`` (0 for a service without keys).
    key_bytes: Callable[[str], int]
    #: ``(200 body, records sent) -> per-record results``.
    parse: Callable[..., PutRecordsResult]
    #: The fields a stored record's ``202`` answer carries.
    ack_fields: Callable[[RecordResult], Dict[str, Any]]

    def limits(self, batch_records: int, batch_bytes: int, max_record_bytes: int) -> BatchLimits:
        """A request's limits from the settings (``max_record_bytes`` may be `AUTO`),
        within the service's ceilings, until a stream's own limit is read."""
        records = min(batch_records, self.max_records)
        record = self.default_record_bytes
        if max_record_bytes != AUTO:
            record = min(max_record_bytes, self.max_record_bytes)
        if self.follows_record_limit:
            stream = stream_limits(record, AUTO, batch_bytes)
            return BatchLimits(records, stream.request_bytes, stream.record_bytes)
        return BatchLimits(records, min(batch_bytes, self.max_request_bytes), record)

    def capacity(self, limits: BatchLimits) -> BatchLimits:
        """What a preallocated request body holds: the service's largest when
        the stream's limit is followed (it may be raised while running), else
        ``limits``."""
        if self.follows_record_limit:
            return limits._replace(bytes=self.max_request_bytes, record_bytes=self.max_record_bytes)
        return limits


def _put_records_batch(stream: str, limits: BatchLimits) -> Batch:
    arn = stream if stream.startswith("arn:") else None
    return PutRecordsBatch(None if arn else stream, stream_arn=arn, max_records=limits.records,
                           max_bytes=limits.bytes, max_record_bytes=limits.record_bytes)


def _put_record_batch(stream: str, limits: BatchLimits) -> Batch:
    return FirehoseBatch(stream, max_records=limits.records, max_bytes=limits.bytes,
                         max_record_bytes=limits.record_bytes)


def _add_keyed(batch: Any, source: Source, start: int, stop: int, partition_key: Optional[str],
               hash_key: Optional[str]) -> bool:
    return batch.add_from(source, start, stop, partition_key, hash_key)


def _add_unkeyed(batch: Any, source: Source, start: int, stop: int, partition_key: Optional[str],
                 hash_key: Optional[str]) -> bool:
    return batch.add_from(source, start, stop)


def _no_key_bytes(key: str) -> int:
    return 0


def _kinesis_ack(result: RecordResult) -> Dict[str, Any]:
    fields: Dict[str, Any] = {"shard_id": result.shard_id, "sequence_number": result.sequence_number}
    if result.sub_sequence is not None:  # a record sent in a KPL aggregate
        fields["sub_sequence"] = result.sub_sequence
    return fields


def _firehose_ack(result: RecordResult) -> Dict[str, Any]:
    return {"record_id": result.record_id}


KINESIS = ServiceProfile(
    name="kinesis", stream_kind="stream", stream_setting="stream",
    put_action="kinesis:PutRecords",
    max_records=PUT_RECORDS_MAX_RECORDS, max_request_bytes=PUT_RECORDS_LARGE_MAX_REQUEST_BYTES,
    max_record_bytes=KINESIS_LARGE_MAX_RECORD_BYTES,
    default_record_bytes=KINESIS_DEFAULT_MAX_RECORD_BYTES, follows_record_limit=True,
    new_batch=_put_records_batch, add=_add_keyed, keyed=True, kinesis_records=True,
    key_bytes=key_bytes,
    parse=parse_put_records_response, ack_fields=_kinesis_ack,
)

FIREHOSE = ServiceProfile(
    name="firehose", stream_kind="delivery stream", stream_setting="delivery_stream",
    put_action="firehose:PutRecordBatch",
    max_records=PUT_RECORD_BATCH_MAX_RECORDS, max_request_bytes=PUT_RECORD_BATCH_MAX_REQUEST_BYTES,
    max_record_bytes=FIREHOSE_MAX_RECORD_BYTES,
    default_record_bytes=FIREHOSE_MAX_RECORD_BYTES, follows_record_limit=False,
    new_batch=_put_record_batch, add=_add_unkeyed, keyed=False, kinesis_records=False,
    key_bytes=_no_key_bytes,
    parse=parse_put_record_batch_response, ack_fields=_firehose_ack,
)

#: Profiles by ``--sink`` value.
PROFILES: Dict[str, ServiceProfile] = {p.name: p for p in (KINESIS, FIREHOSE)}


def profile_for(service: str) -> ServiceProfile:
    """The profile of ``service``; ValueError for a service that has none."""
    profile = PROFILES.get(service)
    if profile is None:
        raise ValueError("unknown stream service %r" % service)
    return profile
