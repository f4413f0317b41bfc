"""The ring's bookkeeping (plain bytes, no I/O) and the Trio waiting on top of it."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from buffers import (
    COMMITTED,
    IN_FLIGHT,
    RELEASED,
    RESERVED,
    Overloaded,
    RingBuffer,
    RingFull,
    SlotStateError,
    WaitingRing,
)

# -- the state table -----------------------------------------------------------

_ALLOWED = {
    (RESERVED, "commit"): COMMITTED,
    (RESERVED, "release"): RELEASED,
    (COMMITTED, "hand_off"): IN_FLIGHT,
    (COMMITTED, "release"): RELEASED,
    (IN_FLIGHT, "release"): RELEASED,
}


def _slot_in(ring: RingBuffer, state: str):
    slot = ring.reserve(10)
    if state in (COMMITTED, IN_FLIGHT):
        ring.commit(slot, 10)
    if state == IN_FLIGHT:
        ring.hand_off(slot)
    if state == RELEASED:
        ring.release(slot)
    assert slot.state == state
    return slot


def _act(ring: RingBuffer, slot, action: str) -> None:
    if action == "commit":
        ring.commit(slot, slot.size)
    elif action == "hand_off":
        ring.hand_off(slot)
    else:
        ring.release(slot)


@pytest.mark.parametrize("state", [RESERVED, COMMITTED, IN_FLIGHT, RELEASED])
@pytest.mark.parametrize("action", ["commit", "hand_off", "release"])
def test_state_table(state, action):
    ring = RingBuffer(100)
    slot = _slot_in(ring, state)
    expected = _ALLOWED.get((state, action))
    if expected is None:
        with pytest.raises(SlotStateError):
            _act(ring, slot, action)
        assert slot.state == state
    else:
        _act(ring, slot, action)
        assert slot.state == expected


def test_slot_of_another_ring_is_refused():
    ring, other = RingBuffer(100), RingBuffer(100)
    slot = other.reserve(10)
    for action in ("commit", "hand_off", "release"):
        with pytest.raises(SlotStateError):
            _act(ring, slot, action)
    assert other.live == 1 and ring.live == 0


def test_double_release_is_refused_and_counts_once():
    ring = RingBuffer(100)
    a = ring.reserve(10)
    b = ring.reserve(10)
    ring.release(b)
    with pytest.raises(SlotStateError):
        ring.release(b)
    assert ring.live == 1
    ring.release(a)
    assert ring.live == 0 and ring.used == 0


@pytest.mark.parametrize("size", [0, -1, 101])
def test_reserve_size_out_of_range(size):
    ring = RingBuffer(100)
    with pytest.raises(ValueError):
        ring.reserve(size)
    assert ring.used == 0 and ring.live == 0


@pytest.mark.parametrize("nbytes", [-1, 11])
def test_commit_outside_the_slot(nbytes):
    ring = RingBuffer(100)
    slot = ring.reserve(10)
    with pytest.raises(ValueError):
        ring.commit(slot, nbytes)
    assert slot.state == RESERVED and len(slot.view) == 10


def test_ring_capacity_must_be_positive():
    with pytest.raises(ValueError):
        RingBuffer(0)


# -- bookkeeping -------------------------------------------------------------

def test_reserve_hands_out_contiguous_slots_in_order():
    ring = RingBuffer(100)
    a, b, c = ring.reserve(30), ring.reserve(50), ring.reserve(20)
    assert [(s.offset, s.size, len(s.view)) for s in (a, b, c)] == [(0, 30, 30), (30, 50, 50), (80, 20, 20)]
    assert ring.used == 100 and ring.live == 3
    assert not ring.can_reserve(1)
    with pytest.raises(RingFull):
        ring.reserve(1)


def test_views_are_the_rings_memory():
    ring = RingBuffer(64)
    ring.reserve(5)
    slot = ring.reserve(10)
    assert slot.view.obj is ring.buffer
    assert not slot.view.readonly
    slot.view[:] = b"0123456789"
    assert ring.buffer[slot.offset:slot.offset + 10] == b"0123456789"
    narrowed = ring.commit(slot, 4)
    assert narrowed.obj is ring.buffer and slot.view.obj is ring.buffer
    assert len(narrowed) == len(slot.view) == 4
    assert bytes(narrowed) == b"0123"
    narrowed[0:1] = b"X"
    assert ring.buffer[slot.offset:slot.offset + 1] == b"X"


def test_a_released_slot_is_free_at_once_whatever_its_age():
    ring = RingBuffer(90)
    a, b, c = ring.reserve(30), ring.reserve(30), ring.reserve(30)
    ring.release(b)  # a, older, is still held
    assert ring.used == 60 and ring.live == 2
    assert ring.can_reserve(30) and not ring.can_reserve(31)
    assert ring.reserve(30).offset == 30
    ring.release(a)
    ring.release(c)
    assert ring.used == 30


def test_neighbouring_free_regions_merge():
    ring = RingBuffer(90)
    a, b, c = ring.reserve(30), ring.reserve(30), ring.reserve(30)
    ring.release(a)
    ring.release(c)
    assert ring.statistics()["largest_free"] == 30
    ring.release(b)  # joins the regions on both sides
    assert ring.used == 0 and ring.statistics()["largest_free"] == 90
    assert ring.reserve(90).offset == 0


def test_reservations_go_to_the_lowest_offset_that_fits():
    ring = RingBuffer(100)
    a, b, c, d = ring.reserve(10), ring.reserve(30), ring.reserve(20), ring.reserve(40)
    ring.release(a)  # 10 free at 0
    ring.release(c)  # 20 free at 40
    assert ring.reserve(15).offset == 40  # too big for the region at 0
    assert ring.reserve(10).offset == 0
    assert ring.reserve(5).offset == 55
    assert not ring.can_reserve(1)
    ring.release(b)
    ring.release(d)


def test_a_slot_held_long_pins_only_its_own_bytes():
    # A slow upload reserved just before others come and go: everything
    # around it is reused, and the ring refuses only when no free region fits.
    ring = RingBuffer(100)
    slow = ring.reserve(10)
    for _ in range(50):
        burst = [ring.reserve(30), ring.reserve(60)]
        for slot in burst:
            ring.release(slot)
    assert ring.used == 10 and ring.can_reserve(90)
    ring.release(slow)


def test_commit_gives_the_unused_tail_back_at_once():
    ring = RingBuffer(100)
    a, b = ring.reserve(50), ring.reserve(50)
    ring.commit(a, 10)
    assert a.size == 10 and len(a.view) == 10
    assert ring.used == 60
    assert ring.reserve(40).offset == 10
    ring.release(a)
    ring.release(b)


def test_commit_to_zero_bytes():
    ring = RingBuffer(100)
    a = ring.reserve(30)
    b = ring.reserve(70)
    ring.commit(b, 0)
    assert ring.used == 30 and len(b.view) == 0 and ring.live == 2
    assert ring.reserve(70).offset == 30
    ring.release(a)
    ring.release(b)  # holds no bytes; releasing it frees none


def test_statistics_and_largest_free_agree_with_can_reserve():
    ring = RingBuffer(100)
    assert ring.statistics() == {"capacity": 100, "used": 0, "live_slots": 0, "largest_free": 100}
    a, b = ring.reserve(30), ring.reserve(50)
    ring.release(a)
    stats = ring.statistics()
    assert stats["used"] == 50 and stats["live_slots"] == 1
    assert stats["largest_free"] == 30  # 30 at the start, 20 at the end
    assert ring.can_reserve(30) and not ring.can_reserve(31)
    ring.release(b)


def test_full_ring_has_no_largest_free():
    ring = RingBuffer(100)
    a = ring.reserve(100)
    assert ring.statistics()["largest_free"] == 0 and not ring.can_reserve(1)
    ring.release(a)


def test_ring_empties_to_offset_zero():
    ring = RingBuffer(100)
    a = ring.reserve(70)
    ring.release(a)
    assert ring.reserve(100).offset == 0


# -- properties --------------------------------------------------------------

class RingMachine(RuleBasedStateMachine):
    """Random reserve / commit / hand-off / release against a small ring.

    Every reservation is filled with its own byte; the model remembers what
    each live slot's bytes must be, so an overlap or a view that is not the
    ring's memory shows up as changed bytes.  From the live slots alone the
    model knows the free regions: a reservation is refused only when none is
    large enough, and otherwise lands at the lowest one that is.
    """

    slots = Bundle("slots")

    def __init__(self) -> None:
        super().__init__()
        self.ring = RingBuffer(97)
        self.live = {}  # slot -> expected bytes
        self.fill = 0

    def free_runs(self):
        """The model's free regions: (start, length), lowest first."""
        runs, at = [], 0
        for start, size in sorted((s.offset, len(v)) for s, v in self.live.items() if v):
            if start > at:
                runs.append((at, start - at))
            at = start + size
        if at < self.ring.capacity:
            runs.append((at, self.ring.capacity - at))
        return runs

    @rule(target=slots, size=st.integers(1, 97))
    def reserve(self, size):
        ring = self.ring
        fits = ring.can_reserve(size)
        stats = ring.statistics()
        # Refused only when no free region is large enough; else the lowest that is.
        lowest = next((start for start, length in self.free_runs() if length >= size), None)
        try:
            slot = ring.reserve(size)
        except RingFull:
            assert not fits and lowest is None
            assert size > stats["largest_free"]
            return None
        assert fits and size <= stats["largest_free"]
        assert slot.offset == lowest
        assert 0 <= slot.offset and slot.offset + size <= ring.capacity
        assert slot.view.obj is ring.buffer and len(slot.view) == size
        self.fill = self.fill % 255 + 1
        pattern = bytes([self.fill]) * size
        slot.view[:] = pattern
        assert ring.buffer[slot.offset:slot.offset + size] == pattern
        self.live[slot] = pattern
        return slot

    @rule(slot=slots, data=st.data())
    def commit(self, slot, data):
        if slot is None or slot.state != RESERVED:
            return
        nbytes = data.draw(st.integers(0, slot.size))
        view = self.ring.commit(slot, nbytes)
        assert len(view) == nbytes and slot.size == nbytes
        self.live[slot] = self.live[slot][:nbytes]

    @rule(slot=slots)
    def hand_off(self, slot):
        if slot is None or slot.state != COMMITTED:
            return
        self.ring.hand_off(slot)

    @rule(slot=consumes(slots))
    def release(self, slot):
        if slot is None or slot not in self.live:
            return  # refused, or released by release_everything
        self.ring.release(slot)
        del self.live[slot]
        assert len(slot.view) == 0

    @rule(most=st.one_of(st.none(), st.integers(0, 200)))
    def trim(self, most):
        # Never touches a live slot's bytes (the invariant below checks them).
        assert 0 <= self.ring.trim(most) <= (most if most is not None else self.ring.capacity + 4096)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release_everything(self, data):
        order = data.draw(st.permutations(list(self.live)))
        for slot in order:
            self.ring.release(slot)
        self.live.clear()
        assert self.ring.used == 0
        full = self.ring.reserve(self.ring.capacity)
        self.ring.release(full)

    @invariant()
    def live_slices_are_intact_and_disjoint(self):
        ring = self.ring
        spans = []
        for slot, expected in self.live.items():
            assert slot.state in (RESERVED, COMMITTED, IN_FLIGHT)
            assert bytes(slot.view) == expected
            assert ring.buffer[slot.offset:slot.offset + len(expected)] == expected
            assert 0 <= slot.offset <= slot.offset + slot.size <= ring.capacity
            if slot.size:
                spans.append((slot.offset, slot.offset + slot.size))
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start

    @invariant()
    def accounting(self):
        ring = self.ring
        assert ring.live == len(self.live)
        assert ring.used == sum(len(v) for v in self.live.values())
        if not self.live:
            assert ring.used == 0
            assert ring.can_reserve(ring.capacity)
        stats = ring.statistics()
        assert stats["used"] == ring.used and stats["live_slots"] == ring.live
        largest = stats["largest_free"]
        assert largest == max((length for _, length in self.free_runs()), default=0)
        if largest:
            assert ring.can_reserve(largest)
        if largest < ring.capacity:
            assert not ring.can_reserve(largest + 1)

    def teardown(self):
        for slot in list(self.live):
            self.ring.release(slot)
        assert self.ring.used == 0 and self.ring.live == 0
        assert self.ring.can_reserve(self.ring.capacity)


RingMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestRingMachine = RingMachine.TestCase


# -- WaitingRing ---------------------------------------------------------------

async def _reserve_into(wring: WaitingRing, size: int, out: list, task_status=trio.TASK_STATUS_IGNORED):
    task_status.started()
    out.append(await wring.reserve(size))


async def test_waiting_reserve_is_immediate_when_space_is_free():
    wring = WaitingRing(RingBuffer(100), max_wait=1.0)
    slot = await wring.reserve(40)
    assert slot.offset == 0 and wring.statistics()["waits"] == 0
    wring.release(slot)
    assert wring.used == 0


async def test_waiters_are_woken_in_fifo_order():
    wring = WaitingRing(RingBuffer(100), max_wait=60)
    a, b = wring.reserve_nowait(50), wring.reserve_nowait(50)
    first, second = [], []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_reserve_into, wring, 50, first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_reserve_into, wring, 50, second)
        await trio.testing.wait_all_tasks_blocked()
        assert wring.statistics()["waiting"] == 2
        wring.release(a)
        await trio.testing.wait_all_tasks_blocked()
        assert len(first) == 1 and not second
        assert first[0].offset == 0
        wring.release(b)
    assert second[0].offset == 50
    assert wring.statistics()["waits"] == 2 and wring.statistics()["waiting"] == 0
    wring.release(first[0])
    wring.release(second[0])
    assert wring.used == 0


async def test_one_release_wakes_every_waiter_that_now_fits():
    wring = WaitingRing(RingBuffer(100), max_wait=60)
    hold = wring.reserve_nowait(100)
    got = [[], [], [], []]
    async with trio.open_nursery() as nursery:
        for i, size in enumerate((30, 30, 30, 20)):
            nursery.start_soon(_reserve_into, wring, size, got[i])
            await trio.testing.wait_all_tasks_blocked()
        wring.release(hold)
        await trio.testing.wait_all_tasks_blocked()
        # Granted in queue order while they fit; the fourth waits its turn.
        assert [slot.offset for (slot,) in got[:3]] == [0, 30, 60]
        assert got[3] == [] and wring.statistics()["waiting"] == 1
        wring.release(got[0][0])
    assert got[3][0].offset == 0
    assert wring.live == 3


async def test_large_waiter_is_not_starved_by_later_small_ones():
    wring = WaitingRing(RingBuffer(100), max_wait=60)
    a, b = wring.reserve_nowait(60), wring.reserve_nowait(40)
    big, small = [], []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_reserve_into, wring, 80, big)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_reserve_into, wring, 10, small)
        await trio.testing.wait_all_tasks_blocked()
        wring.release(a)  # 60 free: the small one would fit, but queues behind
        await trio.testing.wait_all_tasks_blocked()
        assert not big and not small
        assert wring.can_reserve(10)
        with pytest.raises(RingFull):
            wring.reserve_nowait(10)
        late = []
        nursery.start_soon(_reserve_into, wring, 10, late)
        await trio.testing.wait_all_tasks_blocked()
        assert not late and wring.statistics()["waiting"] == 3
        wring.release(b)
    assert big[0].offset == 0 and big[0].size == 80
    assert {small[0].offset, late[0].offset} == {80, 90}
    for slot in big + small + late:
        wring.release(slot)
    assert wring.used == 0


async def test_max_wait_expiry_raises_overloaded_and_leaves_the_ring_consistent(autojump_clock):
    wring = WaitingRing(RingBuffer(100), max_wait=1.5)
    hold = wring.reserve_nowait(100)
    start = trio.current_time()
    with pytest.raises(Overloaded):
        await wring.reserve(10)
    assert trio.current_time() - start >= 1.5
    assert isinstance(Overloaded("x"), RingFull)
    stats = wring.statistics()
    assert stats["waiting"] == 0 and stats["overloads"] == 1 and stats["waits"] == 1
    assert wring.live == 1
    wring.release(hold)
    assert wring.used == 0
    slot = wring.reserve_nowait(100)
    wring.release(slot)


async def test_expired_head_of_queue_lets_the_next_waiter_in(autojump_clock):
    wring = WaitingRing(RingBuffer(100), max_wait=1.0)
    a, b = wring.reserve_nowait(50), wring.reserve_nowait(50)
    small = []
    outcome = []

    async def big():
        try:
            await wring.reserve(100)
        except Overloaded:
            outcome.append("overloaded")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(big)
        await trio.sleep(0.25)
        nursery.start_soon(_reserve_into, wring, 50, small)
        await trio.sleep(0.25)
        wring.release(a)  # 50 free at the start; the big one still does not fit
        await trio.sleep(0.25)
        assert not small
    assert outcome == ["overloaded"]
    # Granted when the big one gave up, before its own wait ran out.
    assert small[0].offset == 0
    wring.release(small[0])
    wring.release(b)
    assert wring.used == 0 and wring.statistics()["waiting"] == 0


async def test_cancelling_a_waiter_just_granted_gives_the_space_back():
    wring = WaitingRing(RingBuffer(100), max_wait=60)
    hold = wring.reserve_nowait(100)
    scope = trio.CancelScope()
    outcome = []

    async def waiter():
        with scope:
            outcome.append(await wring.reserve(60))
        outcome.append("cancelled" if scope.cancelled_caught else "done")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        # In one step, with no checkpoint between: the waiter is cancelled,
        # then a release grants it the space before it gets to run.
        scope.cancel()
        wring.release(hold)
        assert wring.live == 1  # granted to the cancelled waiter
    assert outcome == ["cancelled"]
    assert wring.live == 0 and wring.used == 0
    assert wring.statistics()["waiting"] == 0
    slot = wring.reserve_nowait(100)
    wring.release(slot)


async def test_cancelled_waiter_lets_the_waiter_behind_it_in():
    wring = WaitingRing(RingBuffer(100), max_wait=60)
    a, b = wring.reserve_nowait(50), wring.reserve_nowait(50)
    scope = trio.CancelScope()
    small = []

    async def big():
        with scope:
            await wring.reserve(100)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(big)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(_reserve_into, wring, 50, small)
        await trio.testing.wait_all_tasks_blocked()
        wring.release(a)
        await trio.testing.wait_all_tasks_blocked()
        assert not small
        scope.cancel()
    assert small[0].offset == 0
    wring.release(small[0])
    wring.release(b)
    assert wring.used == 0


@pytest.mark.parametrize("size", [0, 101])
async def test_waiting_reserve_refuses_impossible_sizes_even_while_others_wait(size):
    wring = WaitingRing(RingBuffer(100), max_wait=5)
    hold = wring.reserve_nowait(100)
    got = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_reserve_into, wring, 10, got)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ValueError):
            await wring.reserve(size)
        wring.release(hold)
    assert got[0].size == 10
    wring.release(got[0])
    assert wring.statistics()["waiting"] == 0 and wring.used == 0


def test_a_ring_that_never_empties_keeps_writing_the_same_pages() -> None:
    # Records held for a while (a sink batching) keep the ring from ever
    # emptying; reservations still go to the lowest free offsets, so the
    # pages it makes resident stay near the most bytes ever held at once
    # (51 records of at most 61,024 bytes here), not the whole buffer.
    from collections import deque

    ring = RingBuffer(32 * 1024 * 1024)
    held: deque = deque()
    highest = 0
    for i in range(20000):
        slot = ring.reserve(1024 + (i * 7919) % 60000)
        highest = max(highest, slot.offset + slot.size)
        ring.commit(slot, slot.size)
        ring.hand_off(slot)
        held.append(slot)
        if len(held) > 50:
            ring.release(held.popleft())
    assert ring.live == 50
    assert highest <= 2 * 51 * 61024


def test_an_upload_held_for_seconds_does_not_shrink_the_ring() -> None:
    # One slow upload reserved after 4.5 MiB of records that were then
    # stored: while it trickles in, the next 10 MB of records must still
    # find room on both sides of it.
    ring = RingBuffer(32 * 1024 * 1024)
    records = [ring.reserve(4500) for _ in range(1048)]
    slow = ring.reserve(100_000)
    for slot in records:
        ring.release(slot)
    following = [ring.reserve(100_000) for _ in range(100)]
    assert ring.used == 101 * 100_000
    for slot in following + [slow]:
        ring.release(slot)
    assert ring.used == 0


def test_uploads_held_for_seconds_do_not_make_a_mostly_free_ring_refuse() -> None:
    # Fifty slow uploads of 100 KB each hold their slots until the next fifty
    # arrive (clients that trickle, replaced as each one times out), after
    # records that were stored meanwhile: each cohort fits, in the space the
    # records left or beyond it, while the one before it is still held.
    ring = RingBuffer(32 * 1024 * 1024)
    small = [ring.reserve(100_000) for _ in range(45)]
    cohort = [ring.reserve(100_000) for _ in range(50)]
    for slot in small:
        ring.release(slot)
    for _ in range(3):
        following = [ring.reserve(100_000) for _ in range(50)]
        for slot in cohort:
            ring.release(slot)
        cohort = following
    assert ring.live == 50


def test_trim_gives_back_pages_unused_for_a_whole_interval() -> None:
    from buffers.ring import PAGE

    ring = RingBuffer(64 * PAGE)
    slot = ring.reserve(10 * PAGE)
    slot.view[:] = b"x" * (10 * PAGE)
    ring.release(slot)
    assert ring.trim() == 0  # used since the last trim: kept
    assert ring.trim() == 10 * PAGE  # unused for a whole interval
    assert ring.trim() == 0
    # Given back: the kernel hands out fresh zero pages when written again.
    again = ring.reserve(10 * PAGE)
    assert bytes(again.view[:PAGE]) == bytes(PAGE)
    ring.release(again)


def test_trim_keeps_every_live_slot_and_what_is_below_it() -> None:
    from buffers.ring import PAGE

    ring = RingBuffer(64 * PAGE)
    low = ring.reserve(3 * PAGE + 1)
    high = ring.reserve(20 * PAGE)
    high.view[:] = b"h" * (20 * PAGE)
    ring.trim()
    ring.release(high)
    top = ring.reserve(1)  # the lowest free byte: just after low
    top.view[:] = b"t"
    assert ring.trim() == 0  # high was reserved in this interval
    # Kept: up to the page holding the highest live byte (top).
    assert ring.trim() == -(-(3 * PAGE + 1 + 20 * PAGE) // PAGE) * PAGE - 4 * PAGE
    assert bytes(top.view) == b"t"
    ring.release(low)
    ring.release(top)
    ring.trim()
    assert ring.trim() == 4 * PAGE


def test_trim_gives_back_at_most_what_it_is_asked_highest_first() -> None:
    from buffers.ring import PAGE

    ring = RingBuffer(64 * PAGE)
    ring.release(ring.reserve(10 * PAGE))
    ring.trim()
    assert ring.trim(most=4 * PAGE) == 4 * PAGE
    assert ring.trim(most=4 * PAGE + 1) == 4 * PAGE  # whole pages only
    assert ring.trim(most=4 * PAGE) == 2 * PAGE
    assert ring.trim(most=4 * PAGE) == 0


def test_a_full_ring_trims_nothing() -> None:
    from buffers.ring import PAGE

    ring = RingBuffer(8 * PAGE)
    slot = ring.reserve(8 * PAGE)
    assert ring.trim() == 0 and ring.trim() == 0
    ring.release(slot)
