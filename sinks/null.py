"""The null sink: drops every record at once (for benchmarks)."""

from __future__ import annotations

from typing import Optional

from sinks.base import Record, Sink, SinkStatistics

__all__ = ["NullSink"]


class NullSink(Sink):
    """Releases each record's slot as soon as it is put."""

    name = "null"

    def __init__(self, release) -> None:
        super().__init__(release)
        self.records = 0
        self.bytes = 0

    async def put(self, record: Record) -> Optional[dict]:
        self.records += 1
        self.bytes += record.slot.size
        self._release(record.slot)
        return None

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(stored=self.records, stored_bytes=self.bytes)
