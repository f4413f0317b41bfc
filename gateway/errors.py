"""The failures a request can meet, each carrying the HTTP answer it gets.

Theory of operation: every failure a caller handles differently is one leaf
class.  Each class carries its ``status`` (an HTTP status code, like h11's
``error_status_hint``), and an instance carries what the response needs
(``retry_after``, extra headers, a short machine-readable ``reason``).  Foreign
exceptions (h11, redis-py, botocore) are translated once, where they are
caught, with ``raise ... from exc``.

The layers below the gateway raise their own failures with the same hints:
:class:`buffers.Overloaded` (no room in the ring or the spool) and
:class:`sinks.errors.SinkError` (:class:`~sinks.errors.SinkUnavailable`,
:class:`~sinks.errors.InvalidRecordKey`).  :data:`ANSWERED` names every
failure a request is answered for, and :func:`response_for` is the one place
that turns any of them into a response.
"""

from __future__ import annotations

import json
import math
from typing import List, Tuple, Union

from buffers import Overloaded
from sinks.errors import InvalidRecordKey, SinkError, SinkUnavailable

__all__ = [
    "RequestError",
    "BadRequest",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "MethodNotAllowed",
    "RequestTimeout",
    "LengthRequired",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "HeadersTooLarge",
    "NotImplementedFraming",
    "VersionNotSupported",
    "RateLimited",
    "TooManyUploads",
    "QuotaExceeded",
    "Overloaded",
    "SinkUnavailable",
    "InvalidRecordKey",
    "AccessUnavailable",
    "ANSWERED",
    "retry_after_seconds",
    "response_for",
]

Headers = List[Tuple[bytes, bytes]]


def retry_after_seconds(delay: float) -> int:
    """Seconds for a ``Retry-After`` header: rounded up, never 0."""
    return max(1, int(math.ceil(delay)))


class RequestError(Exception):
    """A request that is answered with an error status."""

    status = 500
    reason = "internal_error"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.reason)

    @property
    def message(self) -> str:
        return str(self)

    def headers(self) -> Headers:
        """Extra response headers for this failure."""
        return []


class BadRequest(RequestError):
    """Malformed request line, headers, framing or body (400)."""

    status = 400
    reason = "bad_request"


class Unauthorized(RequestError):
    """Missing, unknown or revoked API key (401)."""

    status = 401
    reason = "unauthorized"

    def headers(self) -> Headers:
        return [(b"www-authenticate", b'Bearer realm="sluice"')]


class Forbidden(RequestError):
    """A valid key whose tenant is disabled (403)."""

    status = 403
    reason = "forbidden"


class NotFound(RequestError):
    """No such route (404)."""

    status = 404
    reason = "not_found"


class MethodNotAllowed(RequestError):
    """The route exists but not for this method (405)."""

    status = 405
    reason = "method_not_allowed"

    def __init__(self, allow: bytes, message: str = "") -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> Headers:
        return [(b"allow", self.allow)]


class RequestTimeout(RequestError):
    """The client was too slow sending the head or the body (408)."""

    status = 408
    reason = "request_timeout"


class LengthRequired(RequestError):
    """A body with neither Content-Length nor chunked framing (411)."""

    status = 411
    reason = "length_required"


class PayloadTooLarge(RequestError):
    """The record would exceed the configured maximum (413)."""

    status = 413
    reason = "payload_too_large"


class UnsupportedMediaType(RequestError):
    """A body in a content type or encoding the route does not take (415)."""

    status = 415
    reason = "unsupported_media_type"


class HeadersTooLarge(RequestError):
    """The request head exceeds the configured maximum (431)."""

    status = 431
    reason = "headers_too_large"


class NotImplementedFraming(RequestError):
    """A Transfer-Encoding other than chunked (501)."""

    status = 501
    reason = "not_implemented"


class VersionNotSupported(RequestError):
    """A request line naming an HTTP version other than 1.x (505)."""

    status = 505
    reason = "http_version_not_supported"


class _RetryLater(RequestError):
    """A failure the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str = "", *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> Headers:
        return [(b"retry-after", b"%d" % retry_after_seconds(self.retry_after))]


class RateLimited(_RetryLater):
    """The tenant is over its request or byte rate (429).

    ``limit``, ``remaining`` and ``reset`` fill the ``RateLimit-*`` headers.
    """

    status = 429
    reason = "rate_limited"

    def __init__(self, message: str = "", *, retry_after: float, limit: int,
                 remaining: int = 0, reset: float = 0.0) -> None:
        super().__init__(message, retry_after=retry_after)
        self.limit = limit
        self.remaining = remaining
        self.reset = reset

    def headers(self) -> Headers:
        return super().headers() + [
            (b"ratelimit-limit", b"%d" % self.limit),
            (b"ratelimit-remaining", b"%d" % self.remaining),
            (b"ratelimit-reset", b"%d" % retry_after_seconds(self.reset)),
        ]


class QuotaExceeded(_RetryLater):
    """The tenant used up a monthly quota (429).

    ``quota`` names it (``"monthly_bytes"`` or ``"monthly_records"``) and
    ``resets_at`` is the unix time (seconds) when the next month starts.
    """

    status = 429
    reason = "quota_exceeded"

    def __init__(self, message: str = "", *, quota: str, resets_at: int,
                 retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after)
        self.quota = quota
        self.resets_at = resets_at


class TooManyUploads(_RetryLater):
    """Too many chunked uploads at once from one tenant or address (429)."""

    status = 429
    reason = "too_many_uploads"


class AccessUnavailable(_RetryLater):
    """Access control could not decide (Redis down, fail-closed mode) (503)."""

    status = 503
    reason = "access_unavailable"


#: Every failure a request is answered for, from any layer.
ANSWERED = (RequestError, Overloaded, SinkError)
Answered = Union[RequestError, Overloaded, SinkError]


def response_for(exc: Answered) -> Tuple[int, Headers, bytes]:
    """``(status, headers, JSON body)`` of the answer to ``exc``, one of :data:`ANSWERED`.

    The body is ``{"error": reason, "message": text}``; a quota answer adds
    ``quota`` and ``resets_at``.
    """
    doc: dict = {"error": exc.reason, "message": str(exc)}
    if isinstance(exc, QuotaExceeded):
        doc["quota"] = exc.quota
        doc["resets_at"] = exc.resets_at
    body = json.dumps(doc, separators=(",", ":")).encode()
    if isinstance(exc, RequestError):
        extra = exc.headers()
    elif exc.retry_after is not None:
        extra = [(b"retry-after", b"%d" % retry_after_seconds(exc.retry_after))]
    else:
        extra = []
    return exc.status, [(b"content-type", b"application/json")] + extra, body
