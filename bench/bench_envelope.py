"""Record ids and the envelope line written in front of each body."""

from __future__ import annotations

import pytest

from sinks.envelope import RecordIds, envelope

NOW_MS = 1_795_680_518_430


def test_record_ids(benchmark) -> None:
    ids = RecordIds(seed=7)
    state = [NOW_MS]

    def next_id() -> str:
        state[0] += 1  # a new millisecond each call: the time part is redone
        return ids.next(state[0])

    assert len(benchmark(next_id)) == 26


@pytest.mark.parametrize("content_type", [b"application/json", b'text/plain; charset="utf-8"'],
                         ids=["plain", "escaped"])
def test_envelope_into_slot(benchmark, throughput, content_type: bytes) -> None:
    """Id, envelope line and its copy into the slot: what ``_ingest`` does per record."""
    ids = RecordIds(seed=7)
    slot = memoryview(bytearray(4096))

    def write() -> int:
        meta = envelope(ids.next(NOW_MS), None, NOW_MS, content_type, b"gzip")
        slot[:len(meta)] = meta
        return len(meta)

    size = benchmark(write)
    throughput(size)
