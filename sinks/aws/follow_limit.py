"""The Kinesis sink's part that follows the stream's record limit while it runs.

A mixin of :class:`sinks.aws.sink.StreamSink` (kept apart so the sink's
driver stays readable): it reads ``MaxRecordSizeInKiB`` at start (a
``--max-record-size`` above it stops the start), every
:data:`~sinks.aws.record_limit.REFRESH_INTERVAL`, and at once when
``_limit_stale`` is set (a record refused for its size), and applies what
:mod:`sinks.aws.record_limit` decides to the sink, its delivery queue and its
builders.
"""
from __future__ import annotations

from typing import Any, List, Optional

import trio

from sinks.aws.describe import read_record_limit
from sinks.aws.limits import KINESIS_DEFAULT_MAX_RECORD_BYTES
from sinks.aws.record_limit import AUTO, REFRESH_INTERVAL, RecordLimitTooHigh, check_configured, stream_limits
from sinks.errors import SinkConfigError

__all__ = ["RecordLimitFollower"]


class RecordLimitFollower:
    """What `StreamSink` has that these methods use (set by its constructor)."""

    options: Any
    name: str
    max_record_bytes: Optional[int]
    stream_max_record_bytes: Optional[int]
    _buffer: Any
    _delivery: Any
    _builders: List[Any]
    _endpoint: Any
    _request_bytes: int
    _limit_stale: trio.Event
    _log: Any

    def _trip(self, error: Any) -> None:
        raise NotImplementedError

    async def _start_record_limit(self) -> None:
        """Read the stream's limit before taking records; refuse a setting above it."""
        stream = await self._read_record_limit()
        configured = self.options.max_record_bytes
        if stream is None:
            # Not readable (no kinesis:DescribeStreamSummary permission, an
            # endpoint without it): --max-record-size stands, or the 1 MiB
            # every stream takes.
            stream = configured if configured != AUTO else KINESIS_DEFAULT_MAX_RECORD_BYTES
        else:
            try:
                check_configured(configured, stream)
            except RecordLimitTooHigh as exc:
                raise SinkConfigError("--max-record-size", str(exc)) from None
        # Not capped by the ring here: the server refuses to start with a ring too small.
        self._set_record_limit(stream, ring_cap=False)

    async def _follow_record_limit(self) -> None:
        """Read the stream's limit every `REFRESH_INTERVAL`, or at once after a size error."""
        while True:
            with trio.move_on_after(REFRESH_INTERVAL):
                await self._limit_stale.wait()
            self._limit_stale = trio.Event()
            stream = await self._read_record_limit()
            if stream is None or stream == self.stream_max_record_bytes:
                continue
            before = self.max_record_bytes
            self._set_record_limit(stream)
            self._log("record_limit_changed", sink=self.name, stream=self.options.stream,
                      stream_max_record_bytes=stream, max_record_bytes=self.max_record_bytes,
                      was=before)

    def _set_record_limit(self, stream: int, ring_cap: bool = True) -> None:
        """Enforce the limits that follow from the stream's ``stream`` bytes per record."""
        limits = stream_limits(stream, self.options.max_record_bytes,
                                             self.options.batch_bytes)
        record = limits.record_bytes
        if ring_cap:
            # A stream raised while running is followed as far as the ring holds two records.
            record = min(record, len(self._buffer) // 2)
        self.stream_max_record_bytes = stream
        self.max_record_bytes = record
        self._request_bytes = limits.request_bytes
        self._delivery.max_bytes = limits.request_bytes
        for builder in self._builders:
            builder.set_limits(limits.request_bytes, record)

    async def _read_record_limit(self) -> Optional[int]:
        """The stream's limit in bytes, or None when it cannot be read now."""
        assert self._endpoint is not None
        stream, error = await read_record_limit(self._endpoint, self.options.stream)
        if error is not None:
            self._trip(error)
        return stream
