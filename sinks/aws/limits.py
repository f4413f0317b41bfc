"""Kinesis Data Streams and Firehose service limits, in one place.

Every number the sinks enforce lives here with the documentation it comes
from, so a changed quota is a one-line edit.  Sizes are in bytes of the raw
payload (before base64), which is how both services count them.

Where the documentation and the service model disagree, the smaller number
wins: a batch that fits the strict reading fits every reading.
"""
from __future__ import annotations

__all__ = [
    "KIB",
    "MIB",
    "PUT_RECORDS_MAX_RECORDS",
    "PUT_RECORDS_MAX_REQUEST_BYTES",
    "PUT_RECORDS_LARGE_MAX_REQUEST_BYTES",
    "KINESIS_DEFAULT_MAX_RECORD_BYTES",
    "KINESIS_LARGE_MAX_RECORD_BYTES",
    "PARTITION_KEY_MIN_CHARS",
    "PARTITION_KEY_MAX_CHARS",
    "EXPLICIT_HASH_KEY_MAX",
    "EXPLICIT_HASH_KEY_MAX_DIGITS",
    "STREAM_NAME_MAX_CHARS",
    "STREAM_ARN_MAX_CHARS",
    "PUT_RECORD_BATCH_MAX_RECORDS",
    "PUT_RECORD_BATCH_MAX_REQUEST_BYTES",
    "FIREHOSE_MAX_RECORD_BYTES",
    "DELIVERY_STREAM_NAME_MAX_CHARS",
    "NAME_PATTERN",
    "KINESIS_TARGET_PREFIX",
    "FIREHOSE_TARGET_PREFIX",
    "JSON_CONTENT_TYPE",
    "SHARD_WRITE_BYTES_PER_SECOND",
    "SHARD_WRITE_RECORDS_PER_SECOND",
]

KIB = 1024
MIB = 1024 * KIB

# --- Kinesis Data Streams: PutRecords -------------------------------------

# Kinesis API Reference, "PutRecords": "Each PutRecords request can support
# up to 500 records."  Service model: PutRecordsRequestEntryList max 500.
PUT_RECORDS_MAX_RECORDS = 500

# Kinesis API Reference, "PutRecords" (before the large-record launch) and
# the Developer Guide, "Quotas and limits": up to 5 MiB for the entire
# request, including partition keys.  The current PutRecords page allows
# 10 MiB (below), but 5 MiB is accepted by every endpoint and emulator
# (moto checks exactly 5,242,880), so it is the default batch size.
PUT_RECORDS_MAX_REQUEST_BYTES = 5 * MIB

# Kinesis API Reference, "PutRecords" (current): "up to a limit of 10 MiB
# for the entire request, including partition keys"; announced with large
# record support ("PutRecords request size from 5MiB to 10MiB").
PUT_RECORDS_LARGE_MAX_REQUEST_BYTES = 10 * MIB

# Developer Guide, "Handle large records": "The default maximum record size
# for existing, and newly created streams is set to 1 MiB."  Kinesis API
# Reference, "PutRecordsRequestEntry": the data blob plus the partition key
# must not exceed the maximum record size.
KINESIS_DEFAULT_MAX_RECORD_BYTES = 1 * MIB

# Kinesis API Reference, "UpdateMaxRecordSize": MaxRecordSizeInKiB between
# 1024 and 10240.  Service model: Data blob max 10485760.  Only for streams
# whose maximum record size was raised.
KINESIS_LARGE_MAX_RECORD_BYTES = 10240 * KIB

# Kinesis API Reference, "PutRecordsRequestEntry": PartitionKey "Length
# Constraints: Minimum length of 1. Maximum length of 256", "Unicode strings
# with a maximum length limit of 256 characters".  The service is written in
# Java, so "characters" are counted here as UTF-16 code units, which is never
# fewer than code points: a key that passes here passes either reading.
PARTITION_KEY_MIN_CHARS = 1
PARTITION_KEY_MAX_CHARS = 256

# Kinesis API Reference, "PutRecordsRequestEntry": ExplicitHashKey pattern
# 0|([1-9]\d{0,38}), and "an MD5 hash function is used to map partition keys
# to 128-bit integer values"; "HashKeyRange": shards split that space.  So a
# hash key is a decimal string of at most 39 digits no greater than 2**128-1.
EXPLICIT_HASH_KEY_MAX = 2**128 - 1
EXPLICIT_HASH_KEY_MAX_DIGITS = 39

# Kinesis API Reference, "PutRecords": StreamName length 1..128, pattern
# [a-zA-Z0-9_.-]+; StreamARN length 1..2048.
STREAM_NAME_MAX_CHARS = 128
STREAM_ARN_MAX_CHARS = 2048

# Developer Guide, "Quotas and limits" (provisioned mode): "Each shard can
# support up to 1,000 records per second for writes, up to a maximum total
# data write rate of 1 MB per second" (other pages say 1 MiB; the smaller
# reading is kept), counting data blobs and partition keys.  The sinks do not
# enforce these (the service throttles, and they retry); docs/operations.md
# sizes streams with them.
SHARD_WRITE_BYTES_PER_SECOND = 1000 * 1000
SHARD_WRITE_RECORDS_PER_SECOND = 1000

# --- Firehose: PutRecordBatch ----------------------------------------------

# Firehose API Reference, "PutRecordBatch": "Each PutRecordBatch request
# supports up to 500 records. Each record in the request can be as large as
# 1,000 KB (before base64 encoding), up to a limit of 4 MB for the entire
# request. These limits cannot be changed."  Developer Guide, "Amazon Data
# Firehose Quota": 500 records or 4 MiB per call, whichever is smaller.
PUT_RECORD_BATCH_MAX_RECORDS = 500
PUT_RECORD_BATCH_MAX_REQUEST_BYTES = 4 * MIB

# Firehose API Reference, "Record": Data "Maximum length of 1024000"
# (1,000 KiB), counted before base64 encoding.
FIREHOSE_MAX_RECORD_BYTES = 1000 * KIB

# Firehose API Reference, "PutRecordBatch": DeliveryStreamName length 1..64,
# pattern [a-zA-Z0-9_.-]+.
DELIVERY_STREAM_NAME_MAX_CHARS = 64

# Both API references: stream and delivery stream names.
NAME_PATTERN = r"[a-zA-Z0-9_.-]+"

# --- Wire protocol (service models: "jsonVersion" 1.1, "targetPrefix") ----

KINESIS_TARGET_PREFIX = "Kinesis_20131202"
FIREHOSE_TARGET_PREFIX = "Firehose_20150804"
JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
