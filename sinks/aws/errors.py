"""Kinesis and Firehose failures, classified by what the sender does next.

Theory of operation
-------------------
Both services speak AWS JSON 1.1.  A failed call is a non-200 response whose
body names the error in ``__type`` (sometimes prefixed with a namespace and
``#`` or suffixed with ``:`` and a URL), or, from some front ends, only in the
``x-amzn-ErrorType`` header.  A 200 response can still carry failed records,
each with an ``ErrorCode``.  Both kinds become one of these classes::

    ServiceError              .code .message .status .retryable
    +-- TransientError        send the same records again after a backoff
    |   +-- ThrottledError    ... and slow down: the stream is over a limit
    |   +-- MalformedResponse the answer was unreadable; resend (duplicates
    |                         are possible, delivery is at least once)
    +-- PermanentError        the same request cannot succeed
        +-- CredentialsError  refresh credentials and re-sign; only then may
                              a resend succeed

`classify_error` and `classify_record_error` return an instance (they do not
raise it), so a sender can ``raise classify_error(...)`` or inspect it.

Sources: Kinesis API Reference, "PutRecords" (Errors) and "Common Errors";
Firehose API Reference, "PutRecordBatch" (Errors); botocore's standard retry
mode (``botocore/retries/standard.py``) for the throttling and transient
codes shared by all AWS services.
"""
from __future__ import annotations

import json
from typing import Any, Optional, Type

__all__ = [
    "ServiceError",
    "TransientError",
    "ThrottledError",
    "MalformedResponse",
    "PermanentError",
    "CredentialsError",
    "classify_error",
    "classify_record_error",
    "error_class",
    "MESSAGE_MAX_CHARS",
]

# Error messages are kept for logs only; a proxy's HTML error page is cut
# to this many characters.
MESSAGE_MAX_CHARS = 512


class ServiceError(Exception):
    """A failed call or record.  ``status`` is None for per-record errors."""

    retryable = False

    def __init__(self, code: str, message: str = "", status: Optional[int] = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.status = status


class TransientError(ServiceError):
    """Retry the same records after a backoff."""

    retryable = True


class ThrottledError(TransientError):
    """The stream or account is over a throughput limit: back off harder."""


class MalformedResponse(TransientError):
    """The response could not be read, so the outcome is unknown."""


class PermanentError(ServiceError):
    """Retrying the same request cannot succeed."""


class CredentialsError(PermanentError):
    """The signature or credentials were refused (expired, unknown, skewed)."""


# Kinesis "PutRecords" errors and per-record codes; Firehose "PutRecordBatch"
# uses ServiceUnavailableException for throttling ("it is possible that the
# throughput limits have been exceeded"); the rest are botocore's throttling
# codes.
_THROTTLED = frozenset({
    "ProvisionedThroughputExceededException",
    "KMSThrottlingException",
    "LimitExceededException",
    "ServiceUnavailableException",
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestThrottledException",
    "RequestThrottled",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "SlowDown",
})

# "Common Errors": InternalFailure (500), ServiceUnavailable (503); Kinesis
# model: InternalFailureException; botocore's transient codes.
_TRANSIENT = frozenset({
    "InternalFailure",
    "InternalFailureException",
    "InternalServerError",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
})

# "Common Errors": ExpiredTokenException, IncompleteSignature,
# InvalidClientTokenId, RequestExpired (clock skew), plus the JSON-protocol
# spellings the services return.
_CREDENTIALS = frozenset({
    "ExpiredTokenException",
    "ExpiredToken",
    "UnrecognizedClientException",
    "InvalidSignatureException",
    "IncompleteSignature",
    "IncompleteSignatureException",
    "InvalidClientTokenId",
    "MissingAuthenticationToken",
    "MissingAuthenticationTokenException",
    "SignatureDoesNotMatch",
    "RequestExpired",
})

# Kinesis "PutRecords" and Firehose "PutRecordBatch" errors that no retry
# fixes: missing stream, denied access, malformed input, unusable KMS key.
_PERMANENT = frozenset({
    "ResourceNotFoundException",
    "ResourceInUseException",
    "AccessDeniedException",
    "NotAuthorized",
    "OptInRequired",
    "ValidationException",
    "ValidationError",
    "InvalidArgumentException",
    "SerializationException",
    "UnknownOperationException",
    "RequestEntityTooLargeException",
    "KMSDisabledException",
    "KMSInvalidStateException",
    "KMSAccessDeniedException",
    "KMSNotFoundException",
    "KMSOptInRequired",
    "InvalidKMSResourceException",
    "InvalidSourceException",
    "DryRunOperationException",
})


def error_class(code: str, status: Optional[int] = None) -> Type[ServiceError]:
    """The class for an error *code*; *status* decides unknown codes.

    Unknown codes: 429 throttled, 408 and 5xx transient, other statuses
    permanent, and no status (a per-record error) transient: per-record
    failures are documented as throttling or internal failures, so an
    unknown one is retried within the deadline rather than dropped.
    """
    if code in _THROTTLED:
        return ThrottledError
    if code in _TRANSIENT:
        return TransientError
    if code in _CREDENTIALS:
        return CredentialsError
    if code in _PERMANENT:
        return PermanentError
    if status is None or status >= 500 or status == 408:
        return TransientError
    if status == 429:
        return ThrottledError
    return PermanentError


def _short_code(raw: str) -> str:
    # botocore's JSON error parsing: "Name:http://..." and "ns#Name".
    code = raw.split(":", 1)[0]
    return code.rsplit("#", 1)[-1].strip()


def classify_error(status: int, body: Any = b"", error_type: Optional[str] = None) -> ServiceError:
    """Classify a non-200 response.

    *error_type* is the ``x-amzn-ErrorType`` header, if any; the body's
    ``__type`` (or ``code``) wins over it.
    """
    if isinstance(body, memoryview):
        body = body.tobytes()
    doc: Any = None
    text = ""
    if body:
        try:
            doc = json.loads(body)
        except (ValueError, TypeError):
            text = body if isinstance(body, str) else bytes(body).decode("utf-8", "replace")
    if not isinstance(doc, dict):
        doc = {}
    raw = doc.get("__type") or doc.get("code") or doc.get("Code") or error_type or ""
    code = _short_code(str(raw))
    message = doc.get("message") or doc.get("Message") or text
    message = str(message)[:MESSAGE_MAX_CHARS]
    cls = error_class(code, status)
    return cls(code or f"HTTP {status}", message, status)


def classify_record_error(code: str, message: str = "") -> ServiceError:
    """Classify one failed record of a 200 response."""
    return error_class(code)(code, message[:MESSAGE_MAX_CHARS])
