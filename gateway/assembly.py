"""The sink a configuration names, built for the ring its records live in.

:func:`make_sink` is how :class:`~gateway.server.Gateway` (and the spool,
for the sink behind it) gets its sink from ``--sink`` and ``--ack``.
"""

from __future__ import annotations

from typing import Optional

from buffers import WaitingRing
from gateway.config.settings import Config
from gateway.observe import logs
from gateway.observe.telemetry import Histogram
from sinks.base import Release, Sink, health_reporter

__all__ = ["make_sink"]


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
