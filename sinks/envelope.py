"""Record envelope v1: one JSON metadata line, a newline, then the raw body.

The envelope is laid out in the record's ring slot in front of the body, so a
record is one contiguous slice::

    {"v":1,"id":"01JDQ2...","tenant":null,"received_at":1732600000000,
     "content_type":"application/json","content_encoding":null}\\n<body bytes>

(one line in a record; folded here).

Consumers split at the first ``\\n``: the metadata line never contains a raw
newline (JSON escapes it), and the body is passed through untouched.

Record ids are 26-character ULIDs (Crockford base32): 48 bits of milliseconds,
then 40 bits chosen at random when the process starts and a 40-bit counter, so
ids sort by time and are unique across processes without coordination.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_FIELD_BYTES",
    "MAX_ENVELOPE_BYTES",
    "RecordIds",
    "envelope",
    "split_record",
]

ENVELOPE_VERSION = 1

#: Longest header value copied into the envelope.  Content types and encodings
#: in practice are under 100 bytes; longer values are refused with 400 rather
#: than truncated.
MAX_FIELD_BYTES = 256

#: Bound on the metadata line: fixed text, a 26-char id, three fields of at
#: most MAX_FIELD_BYTES, each escaped at worst to 6 bytes per input byte.
MAX_ENVELOPE_BYTES = 160 + 26 + 3 * 6 * MAX_FIELD_BYTES

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_SAFE = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\x7e]*\Z")


def _base32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


class RecordIds:
    """Makes record ids: ULIDs, monotonic within this process."""

    def __init__(self, seed: Optional[int] = None) -> None:
        if seed is None:
            seed = int.from_bytes(os.urandom(5), "big")
        self._process = _base32(seed & (2**40 - 1), 8)
        self._counter = 0
        self._last_ms = -1
        self._time_part = ""

    def next(self, now_ms: int) -> str:
        """The id of a record received at ``now_ms`` (unix milliseconds)."""
        if now_ms > self._last_ms:
            # A wall clock stepping back keeps the last time part, so ids
            # stay monotonic (the counter still makes them unique).
            self._last_ms = now_ms
            self._time_part = _base32(now_ms & (2**48 - 1), 10)
        self._counter = (self._counter + 1) & (2**40 - 1)
        return self._time_part + self._process + _base32(self._counter, 8)


def _json_value(value: Optional[bytes]) -> bytes:
    if value is None:
        return b"null"
    if _SAFE.match(value):
        return b'"' + value + b'"'
    # Header values are bytes; obs-text bytes are kept as their latin-1 code
    # points so nothing is lost or rejected by the JSON encoding.
    return json.dumps(value.decode("latin-1")).encode("ascii")


def envelope(record_id: str, tenant: Optional[bytes], received_at_ms: int,
             content_type: Optional[bytes], content_encoding: Optional[bytes]) -> bytes:
    """The metadata line of a record, newline included."""
    return b"".join((
        b'{"v":1,"id":"', record_id.encode("ascii"),
        b'","tenant":', _json_value(tenant),
        b',"received_at":', b"%d" % received_at_ms,
        b',"content_type":', _json_value(content_type),
        b',"content_encoding":', _json_value(content_encoding),
        b"}\n",
    ))


def split_record(record) -> tuple:
    """Split a stored record into ``(metadata dict, body memoryview)``."""
    view = memoryview(record)
    newline = bytes(view[:MAX_ENVELOPE_BYTES + 1]).find(b"\n")
    if newline < 0:
        raise ValueError("record has no envelope line")
    meta = json.loads(bytes(view[:newline]))
    if not isinstance(meta, dict):
        raise ValueError("record's envelope line is not a JSON object")
    return meta, view[newline + 1:]
