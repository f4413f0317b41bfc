"""Partition keys and explicit hash keys, decided from a request head.

Theory of operation
-------------------
Kinesis routes each record to a shard by the MD5 of its partition key, or by
an explicit hash key when one is given.  Sluice decides both from the request
head, before the body is read, so a bad key is answered ``400`` without
uploading anything, and the key's size counts towards the record size checked
for ``413`` (the service counts data plus partition key).

`KeyPolicy.parse` reads the ``--partition-key`` setting:

``random``
    the record's id.  Ids are unique per record, so MD5 spreads records
    evenly over the shards, and no random number is drawn per request.
``tenant``
    the tenant the request was authenticated as; requests without a tenant
    (access control off) fall back to ``random``.
``header:NAME``
    the value of request header NAME; a request without it (or with an
    empty value) falls back to ``random``.

``--explicit-hash-key-header NAME`` names a header whose value, when present,
is sent as the record's ExplicitHashKey.

Header values are bytes; they become text as latin-1, the same mapping the
envelope uses, so every byte value survives.  Nothing here does I/O.

The service's rules for keys live here and nowhere else: `check_partition_key`
(length in UTF-16 code units, size in UTF-8 bytes as it counts against the
record) and `is_explicit_hash_key`, used both when a request head is read and
when a request body is built (``sinks.aws.putrecords``).
"""
from __future__ import annotations

import re
from typing import Optional

from sinks.aws.limits import (
    EXPLICIT_HASH_KEY_MAX,
    EXPLICIT_HASH_KEY_MAX_DIGITS,
    PARTITION_KEY_MAX_CHARS,
    PARTITION_KEY_MIN_CHARS,
)
from sinks.base import HeaderLookup, RecordKeys
from sinks.errors import InvalidRecordKey

__all__ = ["KeyPolicy", "NO_KEYS", "RANDOM", "TENANT", "HEADER", "parse_key_setting",
           "check_partition_key", "key_bytes", "is_explicit_hash_key"]

RANDOM = "random"
TENANT = "tenant"
HEADER = "header:"

NO_KEYS: RecordKeys = (None, None, 0)

# RFC 9110 token: the characters allowed in a header name.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HASH_KEY = re.compile(r"0|[1-9][0-9]{0,%d}" % (EXPLICIT_HASH_KEY_MAX_DIGITS - 1))


def _header_name(text: str, what: str) -> bytes:
    if not _TOKEN.fullmatch(text):
        raise ValueError("%s must be a header name, got %r" % (what, text))
    return text.lower().encode("ascii")


def parse_key_setting(text: str) -> str:
    """Validate a ``--partition-key`` value: random, tenant or header:NAME."""
    if text in (RANDOM, TENANT):
        return text
    if text.startswith(HEADER):
        _header_name(text[len(HEADER):], "header:NAME")
        return text
    raise ValueError("must be random, tenant or header:NAME, not %r" % text)


def key_bytes(key: str) -> int:
    """What a partition key adds to its record's size: its UTF-8 bytes."""
    return len(key) if key.isascii() else len(key.encode("utf-8"))


def check_partition_key(key: str) -> int:
    """Validate a partition key; return `key_bytes`.

    The service counts characters as UTF-16 code units (it is written in
    Java), which is never fewer than code points: a key that passes here
    passes either reading.  Raises `InvalidRecordKey`.
    """
    if not isinstance(key, str):
        raise InvalidRecordKey("partition key must be str, not %s" % type(key).__name__)
    if key.isascii():
        units = size = len(key)
    else:
        try:
            size = len(key.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidRecordKey("partition key contains a lone surrogate") from None
        units = len(key.encode("utf-16-le")) // 2
    if units > PARTITION_KEY_MAX_CHARS:
        raise InvalidRecordKey("partition key of %d characters exceeds the %d-character limit"
                               % (units, PARTITION_KEY_MAX_CHARS))
    if units < PARTITION_KEY_MIN_CHARS:
        raise InvalidRecordKey("partition key must have at least %d character" % PARTITION_KEY_MIN_CHARS)
    return size


def is_explicit_hash_key(value: str) -> bool:
    """Whether ``value`` is an ExplicitHashKey: a decimal number from 0 to 2**128-1."""
    return (isinstance(value, str) and _HASH_KEY.fullmatch(value) is not None
            and int(value) <= EXPLICIT_HASH_KEY_MAX)


class KeyPolicy:
    """Decides a record's partition key and explicit hash key."""

    __slots__ = ("mode", "header", "hash_key_header")

    def __init__(self, setting: str = RANDOM, hash_key_header: str = "") -> None:
        setting = parse_key_setting(setting)
        self.mode = setting if not setting.startswith(HEADER) else HEADER
        self.header = _header_name(setting[len(HEADER):], "header:NAME") if self.mode == HEADER else b""
        self.hash_key_header = (_header_name(hash_key_header, "--explicit-hash-key-header")
                                if hash_key_header else b"")

    def keys(self, record_id: str, tenant: Optional[bytes], header: HeaderLookup) -> RecordKeys:
        """The keys of one record; raises InvalidRecordKey for a key the service would refuse."""
        raw: Optional[bytes] = None
        if self.mode == TENANT:
            raw = tenant
        elif self.mode == HEADER:
            raw = header(self.header)
        if raw:
            key = raw.decode("latin-1")
            size = check_partition_key(key)
        else:
            key = record_id
            size = len(record_id)
        hash_key: Optional[str] = None
        if self.hash_key_header:
            value = header(self.hash_key_header)
            if value is not None:
                hash_key = value.decode("latin-1")
                if not is_explicit_hash_key(hash_key):
                    raise InvalidRecordKey("explicit hash key must be a decimal number from 0 to 2**128-1")
        return key, hash_key, size
