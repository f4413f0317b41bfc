"""A Kinesis stream's record and request limits, as the sink follows them.

Theory of operation
-------------------
A data stream carries its own largest record, ``MaxRecordSizeInKiB``
(1024 to 10240), set by ``CreateStream`` or ``UpdateMaxRecordSize`` and read
with ``DescribeStreamSummary``.  The sink reads it at start, again every
`REFRESH_INTERVAL`, and at once when the service refuses a record for its
size.  From the stream's limit and the operator's settings, `stream_limits`
decides what the sink enforces:

* the record limit (envelope line + body + partition key): the stream's,
  or ``--max-record-size`` when that is lower (`AUTO` follows the stream);
  a ``--max-record-size`` above the stream's is refused at start
  (`check_configured`), since records between the two would be accepted
  with ``202`` and then refused by the service;
* the request limit (data + partition keys of one PutRecords): at least one
  whole record, at most what the service documents for the stream
  (`service_request_bytes`).

The server turns the record limit into a body limit per request with
:func:`sinks.base.body_room`.  Nothing here does I/O.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from sinks.aws.limits import (
    KIB,
    KINESIS_DEFAULT_MAX_RECORD_BYTES,
    KINESIS_LARGE_MAX_RECORD_BYTES,
    PUT_RECORDS_LARGE_MAX_REQUEST_BYTES,
    PUT_RECORDS_MAX_REQUEST_BYTES,
)

__all__ = [
    "AUTO",
    "REFRESH_INTERVAL",
    "StreamLimits",
    "RecordLimitTooHigh",
    "stream_record_bytes",
    "service_request_bytes",
    "stream_limits",
    "check_configured",
    "is_size_error",
]

#: ``--max-record-size auto``: the stream's own limit.
AUTO = 0

#: How often a running sink reads the stream's limit again.  Raising it takes
#: effect in the service within about a minute of ``UpdateMaxRecordSize``
#: (the call is asynchronous: the stream goes through ``UPDATING``), and one
#: ``DescribeStreamSummary`` a minute is far below its quota of 20 calls per
#: second per account.
REFRESH_INTERVAL = 60.0


class RecordLimitTooHigh(ValueError):
    """``--max-record-size`` is above what the stream takes."""

    def __init__(self, configured: int, stream: int) -> None:
        super().__init__(
            "%d bytes is more than the stream takes (MaxRecordSizeInKiB %d = %d bytes): records "
            "between the two would be accepted and then refused by Kinesis; lower it, use auto, "
            "or raise the stream's limit (aws kinesis update-max-record-size)"
            % (configured, stream // KIB, stream))
        self.configured = configured
        self.stream = stream


@dataclass(frozen=True)
class StreamLimits:
    """What the sink enforces for one reading of the stream's limit."""

    #: The stream's MaxRecordSizeInKiB, in bytes.
    stream_record_bytes: int
    #: Largest record accepted: envelope line + body + partition key.
    record_bytes: int
    #: Largest request: data + partition keys of one PutRecords.
    request_bytes: int


def stream_record_bytes(body: bytes) -> Optional[int]:
    """The stream's record limit from a ``DescribeStreamSummary`` answer, or None.

    A summary without ``MaxRecordSizeInKiB`` (endpoints from before large
    records) means the 1 MiB every stream had; an unreadable answer, or a
    value outside 1024..10240 KiB, gives None (the caller keeps what it had).
    """
    try:
        summary = json.loads(body)["StreamDescriptionSummary"]
        if not isinstance(summary, dict):
            return None
        kib = summary.get("MaxRecordSizeInKiB")
    except (ValueError, KeyError, TypeError):
        return None
    if kib is None:
        return KINESIS_DEFAULT_MAX_RECORD_BYTES
    if isinstance(kib, bool) or not isinstance(kib, int):
        return None
    size = kib * KIB
    if not KINESIS_DEFAULT_MAX_RECORD_BYTES <= size <= KINESIS_LARGE_MAX_RECORD_BYTES:
        return None
    return size


def service_request_bytes(stream_bytes: int) -> int:
    """The request limit the service documents for a stream with this record limit.

    10 MiB for a stream whose records may exceed 1 MiB (the large-record
    launch raised PutRecords to 10 MiB); 5 MiB otherwise, which every
    endpoint and emulator accepts (see sinks/aws/limits.py).
    """
    if stream_bytes > KINESIS_DEFAULT_MAX_RECORD_BYTES:
        return PUT_RECORDS_LARGE_MAX_REQUEST_BYTES
    return PUT_RECORDS_MAX_REQUEST_BYTES


def check_configured(configured: int, stream_bytes: int) -> None:
    """Raise `RecordLimitTooHigh` if ``--max-record-size`` exceeds the stream's limit."""
    if configured != AUTO and configured > stream_bytes:
        raise RecordLimitTooHigh(configured, stream_bytes)


def stream_limits(stream_bytes: int, configured: int, batch_bytes: int) -> StreamLimits:
    """The limits the sink enforces: ``configured`` (or `AUTO`) within the stream's.

    ``batch_bytes`` (``--batch-bytes``) bounds requests, but a request
    always holds at least one largest record, and never more than the service
    takes for this stream.
    """
    record = stream_bytes if configured == AUTO else min(configured, stream_bytes)
    request = min(max(batch_bytes, record), service_request_bytes(stream_bytes))
    return StreamLimits(stream_bytes, record, request)


_SIZE_WORDS = ("size", "length", "too large", "exceed")


def is_size_error(code: str, message: str) -> bool:
    """Whether a refusal says a record was too large for the stream.

    Kinesis answers an oversized record in ``PutRecords`` with
    ``InvalidArgumentException`` ("Record data size ... exceeds the stream's
    max record size") per record, or the whole call with
    ``ValidationException`` ("Member must have length less than or equal
    to ...").  Either means the stream's limit may have changed.
    """
    if code not in ("InvalidArgumentException", "ValidationException"):
        return False
    lowered = message.lower()
    for word in _SIZE_WORDS:
        if word in lowered:
            return True
    return False
