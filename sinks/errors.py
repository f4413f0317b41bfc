"""What a sink refuses, each failure carrying the HTTP answer it calls for.

Like h11's ``RemoteProtocolError.error_status_hint``, every exception here
carries ``status`` (the HTTP status a server should answer with), a short
machine-readable ``reason`` and, for failures worth retrying, ``retry_after``
(seconds).  The gateway maps them to responses in one place
(``gateway.errors.response_for``); sinks know nothing of HTTP beyond these hints.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["SinkError", "SinkUnavailable", "InvalidRecordKey", "SinkConfigError"]


class SinkError(Exception):
    """Base of the failures a sink reports to the code that hands it records."""

    status = 500
    reason = "internal_error"
    retry_after: Optional[float] = None


class SinkUnavailable(SinkError):
    """The sink cannot store records now; the client should retry (503)."""

    status = 503
    reason = "sink_unavailable"
    retry_after: float

    def __init__(self, message: str = "", *, retry_after: float = 1.0) -> None:
        super().__init__(message or self.reason)
        self.retry_after = retry_after


class InvalidRecordKey(SinkError):
    """A partition key or explicit hash key the service would refuse (400)."""

    status = 400
    reason = "bad_request"


class SinkConfigError(SinkError):
    """A sink setting that cannot work (a missing region, a locked spool directory).

    ``setting`` names the flag it is about, for the operator's message.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__("%s: %s" % (setting, message))
        self.setting = setting
