"""The parts a configuration names: the sink, built for the ring its records
live in, and the access control.

:func:`make_sink` is how :class:`~gateway.server.Gateway` (and the spool,
for the sink behind it) gets its sink from ``--sink`` and ``--ack``;
:func:`make_access` is how it gets its access control from ``--redis``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from buffers import WaitingRing
from gateway.config.settings import Config
from gateway.observe import logs
from gateway.observe.telemetry import Histogram
from sinks.base import Release, Sink, health_reporter

if TYPE_CHECKING:
    from gateway.access.control import AccessControl

__all__ = ["make_sink", "make_access"]


def make_sink(config: Config, ring: WaitingRing, release: Optional[Release] = None,
              given_up: Optional[Release] = None) -> Sink:
    """The sink named by ``config.sink``, storing records that live in ``ring``.

    With ``--ack spool`` that sink sits behind the spool, which builds it
    with its own ``release`` and ``given_up`` (see sinks/base.py).
    """
    if config.ack == "spool" and release is None:
        from sinks.spool.sink import SpooledSink

        return SpooledSink.from_config(config, ring, lambda r, g: make_sink(config, ring, r, g),
                                       log=logs.emit)
    release = release or ring.release
    report = health_reporter(logs.emit)
    if config.sink == "null":
        from sinks.null import NullSink

        return NullSink(release)
    if config.sink in ("kinesis", "firehose"):
        from sinks.aws.sink import StreamOptions, StreamSink

        # The sink encodes records straight from the ring's buffer.
        return StreamSink(release, ring.buffer, StreamOptions.from_config(config),
                          given_up=given_up, report=report, histogram=Histogram, log=logs.emit)
    from sinks.file import FileSink

    return FileSink(release, config.data_dir, segment_bytes=config.segment_size,
                    flush_interval=config.flush_interval, report=report)


def _report_access(access: AccessControl, line: str) -> None:
    """Access control's rare state changes (Redis down, back): one event each."""
    if access.redis_state == "down":
        logs.emit("redis_down", level="error", detail=line)
    else:
        logs.emit("redis_up", detail=line)


def make_access(config: Config) -> Optional[AccessControl]:
    """The access control ``config`` asks for (``--redis``), or None when it is off."""
    if not config.access_control:
        return None
    from gateway.access.control import AccessConfig, AccessControl

    access = AccessControl(AccessConfig.from_config(config),
                           report=lambda line: _report_access(access, line), log=logs.emit)
    return access
