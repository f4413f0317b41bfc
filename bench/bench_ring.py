"""The ring's bookkeeping: reserve -> commit -> hand_off -> release."""

from __future__ import annotations

from collections import deque

from buffers.ring import RingBuffer

RECORD = 1100  # a 1 KiB body and its envelope line


def test_ring_cycle_one_slot(benchmark) -> None:
    """One record through an otherwise empty ring (it lands at offset 0 each time)."""
    ring = RingBuffer(1 << 20)

    def cycle() -> None:
        slot = ring.reserve(RECORD)
        ring.commit(slot, RECORD)
        ring.hand_off(slot)
        ring.release(slot)

    benchmark(cycle)
    assert ring.used == 0


def test_ring_wraparound_mix(benchmark) -> None:
    """A busy ring: mixed sizes, 32 records in flight, short commits.

    Each operation reserves one slot (some committed short, giving their tail
    back), hands it off and releases the oldest but one or the oldest, so
    releases come out of order and free places open up between held slots.
    """
    ring = RingBuffer(1 << 20)
    sizes = [1100, 1100, 17000, 1100, 66000, 1100, 4200, 1100]
    live: deque = deque()
    for i in range(32):
        slot = ring.reserve(sizes[i % len(sizes)])
        ring.commit(slot, slot.size)
        ring.hand_off(slot)
        live.append(slot)
    state = [0]

    def step() -> None:
        n = state[0] = state[0] + 1
        size = sizes[n % len(sizes)]
        slot = ring.reserve(size)
        ring.commit(slot, size - (n & 255))
        ring.hand_off(slot)
        live.append(slot)
        if n & 1:
            ring.release(live.popleft())
        else:
            oldest = live.popleft()
            ring.release(live.popleft())
            live.appendleft(oldest)

    benchmark(step)
    assert ring.live == len(live)
