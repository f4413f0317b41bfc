"""OTLP/HTTP logs (``POST /otlp/v1/logs``): what the head decides and every answer, without I/O.

Theory of operation
-------------------
An OpenTelemetry exporter posts an ``ExportLogsServiceRequest``, binary
protobuf or JSON, maybe gzip- or deflate-compressed.  Sluice stores that body
untouched as one record, exactly like a ``/v1/logs`` body: the envelope line
records the content type and encoding, and consumers decode the body with the
OpenTelemetry proto definitions.  Nothing here reads the body.

The request's ``Content-Type`` picks the encoding of every answer, as the
OTLP/HTTP specification requires ("the server MUST use the same Content-Type
in the response as it received in the request"):

- success is ``200`` with an empty ``ExportLogsServiceResponse``: no bytes in
  protobuf, ``{}`` in JSON (:func:`success_headers`, :data:`SUCCESS_BODIES`);
- every failure keeps the status and headers that :func:`gateway.errors.response_for`
  gives it (``429``/``503`` with ``Retry-After``, ``401``, ``413``...), with a
  ``google.rpc.Status`` body instead of Sluice's JSON one
  (:func:`response_for`).  Exporters retry exactly 429, 502, 503 and 504, so a
  request answered anything else was either stored (``200``) or never will be.

:func:`check_head` refuses, with ``415``, a content type or content encoding
that an OTLP consumer could not decode.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

from gateway import errors

__all__ = [
    "LOGS_PATH",
    "PROTOBUF",
    "JSON",
    "MEDIA_TYPES",
    "CONTENT_ENCODINGS",
    "MAX_MESSAGE_BYTES",
    "SUCCESS_BODIES",
    "encoding_of",
    "check_head",
    "success_headers",
    "status_code_for",
    "status_protobuf",
    "response_for",
]

#: The route: an exporter with ``OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:PORT/otlp``
#: appends the specification's default ``/v1/logs``.
LOGS_PATH = b"/otlp/v1/logs"

PROTOBUF = "protobuf"
JSON = "json"
#: Content types of the OTLP/HTTP specification ("Binary Protobuf Encoding",
#: "JSON Protobuf Encoding"), lower case, parameters removed.
MEDIA_TYPES: Dict[bytes, str] = {b"application/x-protobuf": PROTOBUF, b"application/json": JSON}
#: Content encodings stored as sent: the specification's gzip, and deflate,
#: which the OpenTelemetry Python exporter also offers.  Both decode with the
#: standard library (``zlib``); anything else would leave consumers with a
#: body they may not be able to read, so it is refused.
CONTENT_ENCODINGS = frozenset((b"gzip", b"deflate", b"identity"))
#: Longest ``Status.message`` sent.  Messages are Sluice's own one-line
#: texts (under 200 bytes); the bound keeps error answers small whatever
#: a message quotes.
MAX_MESSAGE_BYTES = 512

#: The empty ``ExportLogsServiceResponse`` (``partial_success`` unset, as the
#: specification requires on full success), by encoding.
SUCCESS_BODIES: Dict[str, bytes] = {PROTOBUF: b"", JSON: b"{}"}
_CONTENT_TYPES: Dict[str, bytes] = {PROTOBUF: b"application/x-protobuf", JSON: b"application/json"}
_HEADERS: Dict[str, List[Tuple[bytes, bytes]]] = {
    encoding: [(b"content-type", value)] for encoding, value in _CONTENT_TYPES.items()}

# google.rpc.Code values (google/rpc/code.proto).  OTLP clients do not act on
# the code (the HTTP status decides); it is there for people reading logs.
_UNKNOWN = 2
_INVALID_ARGUMENT = 3
_DEADLINE_EXCEEDED = 4
_NOT_FOUND = 5
_PERMISSION_DENIED = 7
_RESOURCE_EXHAUSTED = 8
_INTERNAL = 13
_UNIMPLEMENTED = 12
_UNAVAILABLE = 14
_UNAUTHENTICATED = 16
#: HTTP status -> google.rpc.Code, after the HTTP mapping in google/rpc/code.proto.
_CODES: Dict[int, int] = {
    400: _INVALID_ARGUMENT, 401: _UNAUTHENTICATED, 403: _PERMISSION_DENIED, 404: _NOT_FOUND,
    405: _UNIMPLEMENTED, 408: _DEADLINE_EXCEEDED, 411: _INVALID_ARGUMENT, 413: _INVALID_ARGUMENT,
    415: _INVALID_ARGUMENT, 429: _RESOURCE_EXHAUSTED, 431: _INVALID_ARGUMENT, 500: _INTERNAL,
    501: _UNIMPLEMENTED, 503: _UNAVAILABLE, 505: _UNIMPLEMENTED,
}


def _media_type(content_type: Optional[bytes]) -> bytes:
    """``content_type`` without parameters, trimmed and lower case."""
    if content_type is None:
        return b""
    semicolon = content_type.find(b";")
    if semicolon >= 0:
        content_type = content_type[:semicolon]
    return content_type.strip().lower()


def encoding_of(content_type: Optional[bytes]) -> Optional[str]:
    """:data:`PROTOBUF` or :data:`JSON` for a request ``Content-Type``; None if neither."""
    return MEDIA_TYPES.get(_media_type(content_type))


def check_head(content_type: Optional[bytes], content_encoding: Optional[bytes]) -> str:
    """The request's encoding; raises :class:`~gateway.errors.UnsupportedMediaType` (415)."""
    encoding = encoding_of(content_type)
    if encoding is None:
        raise errors.UnsupportedMediaType(
            "Content-Type %s is not OTLP: send application/x-protobuf or application/json"
            % ("missing" if content_type is None else repr(content_type.decode("latin-1"))))
    if content_encoding is not None and content_encoding.strip().lower() not in CONTENT_ENCODINGS:
        raise errors.UnsupportedMediaType(
            "Content-Encoding %r is not supported: send gzip, deflate or none"
            % content_encoding.decode("latin-1"))
    return encoding


def success_headers(content_type: Optional[bytes]) -> List[Tuple[bytes, bytes]]:
    """Headers of the ``200`` to a request of ``content_type`` (one :func:`check_head` passed)."""
    return _HEADERS[encoding_of(content_type) or JSON]


def status_code_for(http_status: int) -> int:
    """The ``google.rpc.Code`` sent in the ``Status`` of an ``http_status`` answer."""
    return _CODES.get(http_status, _UNKNOWN)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _message_bytes(message: str) -> bytes:
    data = message.encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        # Cut on a character boundary so the string field stays valid UTF-8.
        data = data[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return data


def status_protobuf(code: int, message: str) -> bytes:
    """A binary ``google.rpc.Status``: field 1 ``code`` (int32), field 2 ``message`` (string)."""
    data = _message_bytes(message)
    out = b"\x08" + _varint(code) if code else b""
    if data:
        out += b"\x12" + _varint(len(data)) + data
    return out


def _status_json(code: int, message: str) -> bytes:
    text = _message_bytes(message).decode("utf-8")
    return json.dumps({"code": code, "message": text}, separators=(",", ":")).encode()


def response_for(exc: errors.Answered,
                 content_type: Optional[bytes]) -> Tuple[int, List[Tuple[bytes, bytes]], bytes]:
    """``(status, headers, body)`` of the OTLP/HTTP answer to ``exc``.

    Status and headers (``Retry-After``, ``RateLimit-*``, ``WWW-Authenticate``)
    are those of :func:`gateway.errors.response_for`; the body is a
    ``google.rpc.Status`` in the request's encoding, JSON when the request's
    content type is not an OTLP one (a ``415``, or no head).
    """
    status, headers, _ = errors.response_for(exc)
    encoding = encoding_of(content_type) or JSON
    code = status_code_for(status)
    body = status_protobuf(code, str(exc)) if encoding == PROTOBUF else _status_json(code, str(exc))
    extra = [(name, value) for name, value in headers if name != b"content-type"]
    return status, _HEADERS[encoding] + extra, body
