"""PutRecords and PutRecordBatch bodies and responses, without I/O.

Theory of operation
-------------------
A batch owns one ``bytearray`` sized once, from the service limits, for the
largest body those limits allow, and lays the JSON out in place: the fixed
head at `reset`, then per record an opening, the base64 text (written by
`sinks.aws.b64` straight from the caller's buffer) and a closing, and the fixed
tail at `body`.  `body` seals the batch and returns a memoryview of the
buffer, valid until `reset`.  Nothing is copied per record except the
unavoidable base64.

The layout is byte-for-byte what botocore sends for the same parameters
built in the service model's member order: ``json.dumps`` defaults (``", "``
and ``": "`` separators, ``ensure_ascii``), members in order, absent members
left out.  botocore emits members in the order of the caller's dict, so
"the same parameters" means a dict built in model order: ``Records`` then
``StreamName`` then ``StreamARN``; ``Data``, ``ExplicitHashKey``,
``PartitionKey`` per record; ``DeliveryStreamName`` then ``Records``.

``add_from`` returns False when the record would break a batch limit (records per
request or bytes per request): seal this batch and start another.  A record
no batch can carry raises `RecordRejected`.  Sizes count raw bytes before
base64, with the partition key as UTF-8, as the services do.

Responses: `parse_put_records_response` and `parse_put_record_batch_response`
read a 200 body into a `PutRecordsResult`; `sinks.aws.errors.classify_error` turns any other
response into a `ServiceError`, and per-record failures get the same
classes, so the sender has one tree to decide on.
"""
from __future__ import annotations

import json
import mmap
import re
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from sinks.aws.b64 import AUTO, NUL_SLACK, Base64Writer, Source, encoded_length
from sinks.aws.errors import (
    MalformedResponse,
    ServiceError,
    ThrottledError,
    classify_record_error,
)
from sinks.aws.limits import (
    DELIVERY_STREAM_NAME_MAX_CHARS,
    EXPLICIT_HASH_KEY_MAX_DIGITS,
    FIREHOSE_MAX_RECORD_BYTES,
    FIREHOSE_TARGET_PREFIX,
    JSON_CONTENT_TYPE,
    KINESIS_DEFAULT_MAX_RECORD_BYTES,
    KINESIS_LARGE_MAX_RECORD_BYTES,
    KINESIS_TARGET_PREFIX,
    NAME_PATTERN,
    PARTITION_KEY_MAX_CHARS,
    PUT_RECORD_BATCH_MAX_RECORDS,
    PUT_RECORD_BATCH_MAX_REQUEST_BYTES,
    PUT_RECORDS_LARGE_MAX_REQUEST_BYTES,
    PUT_RECORDS_MAX_RECORDS,
    PUT_RECORDS_MAX_REQUEST_BYTES,
    STREAM_ARN_MAX_CHARS,
    STREAM_NAME_MAX_CHARS,
)
from sinks.aws.partition_keys import check_partition_key, is_explicit_hash_key
from sinks.errors import InvalidRecordKey

__all__ = [
    "BatchLimits",
    "PutRecordsBatch",
    "FirehoseBatch",
    "RecordRejected",
    "RecordTooLarge",
    "RecordResult",
    "PutRecordsResult",
    "parse_put_records_response",
    "parse_put_record_batch_response",
]

# Escaped partition keys are remembered per batch; the number of distinct
# keys is usually the number of tenants or hosts.  Past this many the memo is
# cleared rather than grown, or dropped for good if fewer lookups than that
# found a key there: keys that never repeat (random keys, one per record)
# would only make garbage that outlives the collector's young generation.
_KEY_MEMO_MAX = 4096

# json.dumps(ensure_ascii=True) writes at most 6 bytes ("\\u00e9") per UTF-16
# code unit, and partition keys are at most PARTITION_KEY_MAX_CHARS units.
_MAX_ESCAPED_KEY = 6 * PARTITION_KEY_MAX_CHARS + 2  # with the quotes

# 4*ceil(n/3) <= 4n/3 + 8/3: each record's base64 can exceed its share of
# 4/3 of the payload by less than 3 bytes.
_B64_SLACK_PER_RECORD = 3

_NAME = re.compile(NAME_PATTERN)
_STREAM_ARN = re.compile(r"arn:aws.*:kinesis:.*:[0-9]{12}:stream/\S+")

_OPEN_FIRST = b'{"Data": "'
_OPEN_NEXT = b', {"Data": "'
_FIREHOSE_CLOSE = b'"}'
_HASH_KEY_OPEN = b'", "ExplicitHashKey": "'
_KEY_OPEN = b'", "PartitionKey": '


class RecordRejected(ValueError):
    """A record that no batch can carry: drop it or dead-letter it.

    ``status`` is the HTTP status a gateway answers with when the record came
    straight from a client request.
    """

    status = 400
    reason = "record_rejected"


class RecordTooLarge(RecordRejected):
    """The record (data plus partition key) exceeds the per-record limit."""

    status = 413
    reason = "record_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"record of {size} bytes exceeds the {limit}-byte limit")
        self.size = size
        self.limit = limit


class BatchLimits(NamedTuple):
    """One request's limits, and the one rule for whether a record joins a batch.

    ``records`` per request, ``bytes`` per request and ``record_bytes`` per
    record, in bytes as the service counts them (data plus partition key).
    """

    records: int
    bytes: int
    record_bytes: int

    def admits(self, count: int, used: int, size: int) -> bool:
        """Whether a record of ``size`` joins a batch of ``count`` records and ``used`` bytes.

        False means the batch is full: seal it and start another.  A record
        that no batch can carry raises `RecordTooLarge`.
        """
        limit = self.record_bytes if self.record_bytes < self.bytes else self.bytes
        if size > limit:
            raise RecordTooLarge(size, limit)
        return count < self.records and used + size <= self.bytes


def _json_str(value: str) -> bytes:
    return encode_basestring_ascii(value).encode("ascii")


def _check_name(value: str, what: str, max_chars: int) -> str:
    if not isinstance(value, str) or not (
        1 <= len(value) <= max_chars and _NAME.fullmatch(value)
    ):
        raise ValueError(f"{what} must be 1..{max_chars} of [a-zA-Z0-9_.-]: {value!r}")
    return value


def _check_limit(value: int, what: str, ceiling: int) -> int:
    if not isinstance(value, int) or not 1 <= value <= ceiling:
        raise ValueError(f"{what} must be 1..{ceiling}, got {value!r}")
    return value


def _partition_key(key: str) -> Tuple[int, bytes]:
    """Validate *key*; return its UTF-8 size and its JSON string literal."""
    try:
        size = check_partition_key(key)
    except InvalidRecordKey as exc:
        raise RecordRejected(str(exc)) from None
    return size, _json_str(key)


def _hash_key(value: str) -> bytes:
    if not is_explicit_hash_key(value):
        raise RecordRejected(f"explicit hash key must be a decimal 0..2**128-1: {value!r}")
    return value.encode("ascii")


class _Batch:
    """Shared layout: head, records joined by ", ", tail."""

    target = ""
    content_type = JSON_CONTENT_TYPE

    def __init__(self, head: bytes, tail: bytes, max_record_tail: int, *,
                 max_records: int, max_bytes: int, max_record_bytes: int,
                 backend: str) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_record_bytes = max_record_bytes
        self.limits = BatchLimits(max_records, max_bytes, max_record_bytes)
        self._head = head
        self._tail = tail
        per_record = len(_OPEN_NEXT) + max_record_tail + _B64_SLACK_PER_RECORD
        capacity = (len(head) + len(tail) + NUL_SLACK
                    + encoded_length(max_bytes) + max_records * per_record)
        # An anonymous mmap rather than a bytearray: a bytearray is zeroed,
        # so every page of the largest possible request (megabytes, per
        # batch in flight) would be resident from the start; the kernel gives
        # an mmap's pages only as batches first reach them.
        self._buf: Any = mmap.mmap(-1, capacity)
        self._view = memoryview(self._buf)
        self._writer = Base64Writer(self._buf, backend=backend)
        self.backend = self._writer.backend
        self.capacity = capacity
        self._pos = 0
        self._count = 0
        self._payload = 0
        self._sealed = False
        self.reset()

    def __len__(self) -> int:
        return self._count

    @property
    def payload_bytes(self) -> int:
        """Bytes counted against the request limit so far."""
        return self._payload

    @property
    def sealed(self) -> bool:
        return self._sealed

    def source(self, buf: Any) -> Source:
        """Export a long-lived buffer (the ring's) once, for `add_from`."""
        return self._writer.source(buf)

    def reset(self) -> None:
        """Empty the batch for reuse; earlier `body` views go stale."""
        head = self._head
        self._view[: len(head)] = head
        self._pos = len(head)
        self._count = 0
        self._payload = 0
        self._sealed = False

    def body(self) -> memoryview:
        """Seal the batch and return the finished JSON body."""
        if not self._count:
            raise ValueError("an empty batch has no body: the API needs 1 record or more")
        tail = self._tail
        end = self._pos + len(tail)
        self._view[self._pos : end] = tail
        self._sealed = True
        return self._view[:end]

    def close(self) -> None:
        """Release the body buffer's export.

        The buffer itself goes with the batch: a call abandoned on a timeout
        may still hold a view of its body.
        """
        self._writer.close()

    def _admit(self, size: int) -> bool:
        if self._sealed:
            raise RuntimeError("batch is sealed; reset() it before adding")
        return self.limits.admits(self._count, self._payload, size)

    def _open(self) -> int:
        opening = _OPEN_NEXT if self._count else _OPEN_FIRST
        pos = self._pos
        end = pos + len(opening)
        self._view[pos:end] = opening
        return end

    def _close(self, pos: int, closing: bytes, size: int) -> None:
        end = pos + len(closing)
        self._view[pos:end] = closing
        self._pos = end
        self._count += 1
        self._payload += size


class PutRecordsBatch(_Batch):
    """A Kinesis Data Streams PutRecords body, built in place.

    Give ``stream_name``, ``stream_arn`` or both.  ``max_bytes`` and
    ``max_record_bytes`` may be raised to the large-record limits for
    streams configured for them.
    """

    target = KINESIS_TARGET_PREFIX + ".PutRecords"

    def __init__(
        self,
        stream_name: Optional[str] = None,
        *,
        stream_arn: Optional[str] = None,
        max_records: int = PUT_RECORDS_MAX_RECORDS,
        max_bytes: int = PUT_RECORDS_MAX_REQUEST_BYTES,
        max_record_bytes: int = KINESIS_DEFAULT_MAX_RECORD_BYTES,
        backend: str = AUTO,
    ) -> None:
        if stream_name is None and stream_arn is None:
            raise ValueError("PutRecords needs a stream name or a stream ARN")
        tail = b"]"
        if stream_name is not None:
            _check_name(stream_name, "stream name", STREAM_NAME_MAX_CHARS)
            tail += b', "StreamName": ' + _json_str(stream_name)
        if stream_arn is not None:
            if not (isinstance(stream_arn, str) and len(stream_arn) <= STREAM_ARN_MAX_CHARS
                    and _STREAM_ARN.fullmatch(stream_arn)):
                raise ValueError(f"not a Kinesis stream ARN: {stream_arn!r}")
            tail += b', "StreamARN": ' + _json_str(stream_arn)
        self.stream_name = stream_name
        self.stream_arn = stream_arn
        self._keys: Optional[Dict[str, Tuple[int, bytes]]] = {}
        self._key_hits = 0
        max_record_tail = (len(_HASH_KEY_OPEN) + EXPLICIT_HASH_KEY_MAX_DIGITS
                           + len(_KEY_OPEN) + _MAX_ESCAPED_KEY + 1)
        super().__init__(
            b'{"Records": [', tail + b"}", max_record_tail,
            max_records=_check_limit(max_records, "max_records", PUT_RECORDS_MAX_RECORDS),
            max_bytes=_check_limit(max_bytes, "max_bytes", PUT_RECORDS_LARGE_MAX_REQUEST_BYTES),
            max_record_bytes=_check_limit(
                max_record_bytes, "max_record_bytes", KINESIS_LARGE_MAX_RECORD_BYTES),
            backend=backend,
        )

    def _closing(self, partition_key: str, explicit_hash_key: Optional[str]) -> Tuple[int, bytes]:
        keys = self._keys
        memo = keys.get(partition_key) if keys is not None else None
        if memo is not None:
            self._key_hits += 1
        else:
            key_size, literal = _partition_key(partition_key)
            memo = (key_size, _KEY_OPEN + literal + b"}")
            if keys is not None:
                self._remember(keys, partition_key, memo)
        if explicit_hash_key is None:
            return memo
        # The memo's closing starts with _KEY_OPEN; the hash key goes before it.
        closing = _HASH_KEY_OPEN + _hash_key(explicit_hash_key) + memo[1]
        return memo[0], closing

    def _remember(self, keys: Dict[str, Tuple[int, bytes]], partition_key: str,
                  memo: Tuple[int, bytes]) -> None:
        if len(keys) >= _KEY_MEMO_MAX:
            if self._key_hits < _KEY_MEMO_MAX:
                self._keys = None  # the keys seldom repeat: memoize no more
                return
            keys.clear()
            self._key_hits = 0
        keys[partition_key] = memo

    def add_from(self, source: Source, start: int, stop: int, partition_key: str,
                 explicit_hash_key: Optional[str] = None) -> bool:
        """Append ``source[start:stop]``; False if the batch is full."""
        key_size, closing = self._closing(partition_key, explicit_hash_key)
        size = stop - start + key_size
        if not self._admit(size):
            return False
        pos = self._writer.encode_into(source, start, stop, self._open())
        self._close(pos, closing, size)
        return True


class FirehoseBatch(_Batch):
    """A Firehose PutRecordBatch body, built in place."""

    target = FIREHOSE_TARGET_PREFIX + ".PutRecordBatch"

    def __init__(
        self,
        delivery_stream_name: str,
        *,
        max_records: int = PUT_RECORD_BATCH_MAX_RECORDS,
        max_bytes: int = PUT_RECORD_BATCH_MAX_REQUEST_BYTES,
        max_record_bytes: int = FIREHOSE_MAX_RECORD_BYTES,
        backend: str = AUTO,
    ) -> None:
        _check_name(delivery_stream_name, "delivery stream name", DELIVERY_STREAM_NAME_MAX_CHARS)
        self.delivery_stream_name = delivery_stream_name
        head = b'{"DeliveryStreamName": ' + _json_str(delivery_stream_name) + b', "Records": ['
        super().__init__(
            head, b"]}", len(_FIREHOSE_CLOSE),
            max_records=_check_limit(max_records, "max_records", PUT_RECORD_BATCH_MAX_RECORDS),
            max_bytes=_check_limit(max_bytes, "max_bytes", PUT_RECORD_BATCH_MAX_REQUEST_BYTES),
            max_record_bytes=_check_limit(
                max_record_bytes, "max_record_bytes", FIREHOSE_MAX_RECORD_BYTES),
            backend=backend,
        )

    def add_from(self, source: Source, start: int, stop: int) -> bool:
        """Append ``source[start:stop]``; False if the batch is full."""
        size = stop - start
        if not self._admit(size):
            return False
        pos = self._writer.encode_into(source, start, stop, self._open())
        self._close(pos, _FIREHOSE_CLOSE, size)
        return True


# --- Responses ------------------------------------------------------------


@dataclass(frozen=True)
class RecordResult:
    """The outcome of one record, in request order.

    Kinesis successes carry ``shard_id`` and ``sequence_number`` (and, for
    a record sent with aggregation on, ``sub_sequence``: its index inside
    the Kinesis record); Firehose successes carry ``record_id``; failures
    carry ``error``.
    """

    shard_id: Optional[str] = None
    sequence_number: Optional[str] = None
    record_id: Optional[str] = None
    error: Optional[ServiceError] = None
    sub_sequence: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PutRecordsResult:
    """A parsed 200 response: which records landed and which did not."""

    records: Tuple[RecordResult, ...]
    failed: int
    encrypted: bool = False

    def retryable(self) -> List[int]:
        """Indices of records to send again (after a backoff)."""
        return [i for i, r in enumerate(self.records)
                if r.error is not None and r.error.retryable]

    def rejected(self) -> List[int]:
        """Indices of records that failed for good."""
        return [i for i, r in enumerate(self.records)
                if r.error is not None and not r.error.retryable]

    @property
    def throttled(self) -> bool:
        """Whether any record was throttled (back off before resending)."""
        return any(isinstance(r.error, ThrottledError) for r in self.records)


def _load_object(body: Any) -> Dict[str, Any]:
    if isinstance(body, memoryview):
        body = body.tobytes()  # a small response, not a payload
    try:
        doc = json.loads(body)
    except (ValueError, TypeError) as exc:
        raise MalformedResponse("MalformedResponse", f"response is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise MalformedResponse("MalformedResponse", "response is not a JSON object")
    return doc


def _entries(doc: Dict[str, Any], key: str, expected: Optional[int]) -> List[Dict[str, Any]]:
    entries = doc.get(key)
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise MalformedResponse("MalformedResponse", f"response has no {key} list")
    if expected is not None and len(entries) != expected:
        raise MalformedResponse(
            "MalformedResponse", f"{len(entries)} results for {expected} records")
    return entries


def _error(entry: Dict[str, Any]) -> Optional[ServiceError]:
    code = entry.get("ErrorCode")
    if code is None:
        return None
    return classify_record_error(str(code), str(entry.get("ErrorMessage") or ""))


def parse_put_records_response(body: Any, expected: Optional[int] = None) -> PutRecordsResult:
    """Read a Kinesis PutRecords 200 body.

    *expected* is the number of records sent; a different count of results
    raises `MalformedResponse`.
    """
    doc = _load_object(body)
    results = []
    for entry in _entries(doc, "Records", expected):
        error = _error(entry)
        if error is None and entry.get("SequenceNumber") is None:
            raise MalformedResponse("MalformedResponse", "record result without outcome")
        results.append(RecordResult(
            shard_id=entry.get("ShardId"),
            sequence_number=entry.get("SequenceNumber"),
            error=error,
        ))
    failed = sum(1 for r in results if r.error is not None)
    return PutRecordsResult(tuple(results), failed, doc.get("EncryptionType") == "KMS")


def parse_put_record_batch_response(body: Any, expected: Optional[int] = None) -> PutRecordsResult:
    """Read a Firehose PutRecordBatch 200 body (see `parse_put_records_response`)."""
    doc = _load_object(body)
    results = []
    for entry in _entries(doc, "RequestResponses", expected):
        error = _error(entry)
        if error is None and entry.get("RecordId") is None:
            raise MalformedResponse("MalformedResponse", "record result without outcome")
        results.append(RecordResult(record_id=entry.get("RecordId"), error=error))
    failed = sum(1 for r in results if r.error is not None)
    return PutRecordsResult(tuple(results), failed, doc.get("Encrypted") is True)
