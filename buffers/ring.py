"""The ring: one preallocated buffer that every record body lives in.

Theory of operation
-------------------
A :class:`RingBuffer` owns one buffer of fixed capacity, allocated once: an
anonymous ``mmap`` rather than a ``bytearray``, because a bytearray is zeroed
(every page resident at once, and PyPy briefly holds a second copy while
building it), while the kernel gives an mmap's pages only as they are first
written.  The ring starts again at offset 0 whenever it empties, and also whenever
the first :data:`WRAP_AT` bytes are free (and at least twice the bytes then
in flight), so a gateway whose ring never quite empties still touches only
about that many pages plus what is in flight, not the whole buffer.

A writer calls :meth:`RingBuffer.reserve` for ``n`` bytes and gets a
:class:`Slot` whose ``view`` is a writable ``memoryview`` of exactly those
bytes, contiguous in the buffer.  The writer fills it (``recv_into`` straight
from a socket), reports how many bytes landed with :meth:`RingBuffer.commit`,
and hands the slot on.  Whoever holds the slot last (a sink, once the record is
stored) calls :meth:`RingBuffer.release`.

Slots are handed out in ring order and may be released in any order; the space
of a released slot is reused once every slot reserved before it is released
too.  Free space is therefore the gap between the newest slot's end (``head``)
and the oldest live slot's start (``tail``), going round the end of the buffer.
A reservation never straddles the end: when the bytes left before the end are
too few, the reservation starts again at offset 0 and the skipped bytes stay
unused until the ring wraps past them.

Nothing here waits or does I/O: :meth:`RingBuffer.reserve` raises
:class:`RingFull` when the space is not there, and ``buffers.waiting`` adds the
Trio wait on top.

Slot states (everything that moves a slot lives in ``_TRANSITIONS``)::

    RESERVED --commit--> COMMITTED --hand_off--> IN_FLIGHT --release--> RELEASED
        |                    |                                    ^
        +------release-------+-----------------release-----------+

``RESERVED`` slots being written may be released directly (the client went
away).  A free region of the buffer has no slot at all.
"""

from __future__ import annotations

import mmap
from collections import deque
from typing import Deque, Dict, Tuple

__all__ = [
    "WRAP_AT",
    "RESERVED",
    "COMMITTED",
    "IN_FLIGHT",
    "RELEASED",
    "RingBuffer",
    "Slot",
    "RingError",
    "RingFull",
    "SlotStateError",
]

#: A ring that never empties goes back to offset 0 once the first this many
#: bytes (or a quarter of a smaller ring), and twice what is in flight, are
#: free, so the pages it writes stay about this plus what is in flight: a
#: 32 MiB ring at a few hundred requests a second keeps well under 8 MiB
#: resident.
WRAP_AT = 4 * 1024 * 1024

RESERVED = "reserved"
COMMITTED = "committed"
IN_FLIGHT = "in_flight"
RELEASED = "released"

_TRANSITIONS: Dict[Tuple[str, str], str] = {
    (RESERVED, "commit"): COMMITTED,
    (RESERVED, "release"): RELEASED,
    (COMMITTED, "hand_off"): IN_FLIGHT,
    (COMMITTED, "release"): RELEASED,
    (IN_FLIGHT, "release"): RELEASED,
}


class RingError(Exception):
    """Base class of the ring's errors."""


class RingFull(RingError):
    """Not enough contiguous free space for the reservation right now."""


class SlotStateError(RingError):
    """A slot was moved in a way the state table does not allow."""


class Slot:
    """A reserved region of the ring.

    ``view`` is a writable memoryview of the whole reservation; after
    :meth:`RingBuffer.commit`, of the bytes that landed; once released,
    empty.  ``offset`` is the region's start in the ring's buffer.
    """

    __slots__ = ("offset", "size", "state", "_ring", "_span")

    def __init__(self, ring: RingBuffer, offset: int, size: int) -> None:
        self._ring = ring
        self.offset = offset
        self.size = size
        # Bytes of the buffer this slot keeps from reuse; can exceed ``size``
        # after a commit that could not give the tail back.
        self._span = size
        self.state = RESERVED

    @property
    def view(self) -> memoryview:
        # Made on each use rather than kept: a slot lives as long as its
        # record waits for the sink, and on PyPy a kept view was two more
        # objects per record that young collections moved to the old
        # generation.  Its users take it once or twice.
        if self.state is RELEASED:
            return self._ring._empty
        return self._ring._view[self.offset:self.offset + self.size]

    def __repr__(self) -> str:
        return "<Slot %s offset=%d size=%d>" % (self.state, self.offset, self.size)


class RingBuffer:
    """A fixed buffer handing out contiguous slots, released in any order."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("ring capacity must be at least 1 byte")
        self.capacity = capacity
        self.buffer = mmap.mmap(-1, capacity)
        self._view = memoryview(self.buffer)
        self._empty = self._view[0:0]
        # Live slots (and released ones not yet reclaimed), oldest first.
        self._slots: Deque[Slot] = deque()
        self._head = 0  # end of the newest slot
        # Where the ring goes back to offset 0 early (see _place): a quarter
        # of the buffer, at most WRAP_AT, so at least that much is free
        # right after wrapping and a burst can still use the whole buffer
        # once the slots at its end are released.
        self._wrap_at = max(1, min(capacity // 4, WRAP_AT))
        self._used = 0  # bytes held by slots in _slots, counting skipped ends
        self._live = 0

    # -- queries ---------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes not available for reuse (live slots and what they pin)."""
        return self._used

    @property
    def live(self) -> int:
        """Number of slots not yet released."""
        return self._live

    def can_reserve(self, size: int) -> bool:
        """Whether :meth:`reserve` of ``size`` bytes would succeed now."""
        return self._place(size) >= 0

    def statistics(self) -> dict:
        """A snapshot of occupancy, for /readyz and metrics."""
        return {
            "capacity": self.capacity,
            "used": self._used,
            "live_slots": self._live,
            "largest_free": self._largest_free(),
        }

    # -- moves -----------------------------------------------------------

    def reserve(self, size: int) -> Slot:
        """Reserve ``size`` contiguous bytes, or raise :class:`RingFull`."""
        if size < 1:
            raise ValueError("reservations are at least 1 byte")
        if size > self.capacity:
            raise ValueError("reservation of %d bytes exceeds the ring's %d" % (size, self.capacity))
        offset = self._place(size)
        if offset < 0:
            raise RingFull("no %d contiguous bytes free" % size)
        if offset < self._head:
            # Wrapped: the bytes between the old head and the end are pinned
            # by the newest slot until it is reclaimed.
            newest = self._slots[-1]
            skipped = self.capacity - self._head
            newest._span += skipped
            self._used += skipped
        slot = Slot(self, offset, size)
        self._slots.append(slot)
        self._head = offset + size
        self._used += size
        self._live += 1
        return slot

    def commit(self, slot: Slot, nbytes: int) -> memoryview:
        """Record that ``nbytes`` landed at the start of ``slot``.

        Returns the narrowed view.  If ``slot`` is the newest reservation its
        unused tail goes back to the ring at once; otherwise it stays pinned
        until the slot is released.
        """
        if not 0 <= nbytes <= slot.size:
            raise ValueError("committed %d bytes into a %d-byte slot" % (nbytes, slot.size))
        self._move(slot, "commit")
        unused = slot.size - nbytes
        if unused and self._slots[-1] is slot and slot._span == slot.size:
            self._head -= unused
            self._used -= unused
            slot._span = nbytes
        slot.size = nbytes
        return slot.view

    def hand_off(self, slot: Slot) -> None:
        """Mark a committed slot as taken by a sink."""
        self._move(slot, "hand_off")

    def release(self, slot: Slot) -> None:
        """Give the slot's space back; reused once all older slots are released."""
        self._move(slot, "release")
        self._live -= 1
        slots = self._slots
        while slots and slots[0].state is RELEASED:
            self._used -= slots.popleft()._span
        if not slots:
            self._head = 0
            self._used = 0

    # -- internals -------------------------------------------------------

    def _move(self, slot: Slot, action: str) -> None:
        if slot._ring is not self:
            raise SlotStateError("slot belongs to another ring")
        new = _TRANSITIONS.get((slot.state, action))
        if new is None:
            raise SlotStateError("cannot %s a %s slot" % (action, slot.state))
        slot.state = new

    def _tail(self) -> int:
        return self._slots[0].offset

    def _place(self, size: int) -> int:
        """Offset where ``size`` bytes fit, or -1."""
        if not self._slots:
            return 0 if size <= self.capacity else -1
        head, tail = self._head, self._tail()
        if head > tail or (head == tail and self._used == 0):
            # Live data in [tail, head): free at the end, then at the start.
            if tail >= self._wrap_at and tail >= size + 2 * (head - tail):
                # Start again from offset 0 as soon as everything before
                # _wrap_at is free, rather than at the end of the buffer: a
                # ring that never empties then keeps writing the same pages,
                # and the rest of the buffer is never made resident.  Until
                # the slots now live are released, the ring has only the
                # start to give, so wrap early only when the start holds at
                # least twice what they hold: slow uploads holding megabytes
                # then cannot make the ring refuse while most of it is free.
                return 0
            if self.capacity - head >= size:
                return head
            if tail >= size:
                return 0
            return -1
        # Wrapped: live data in [tail, end) and [0, head); free in [head, tail).
        if tail - head >= size:
            return head
        return -1

    def _largest_free(self) -> int:
        if not self._slots:
            return self.capacity
        head, tail = self._head, self._tail()
        if head > tail or (head == tail and self._used == 0):
            # Same test as _place: only zero-byte slots left at head == tail.
            return max(self.capacity - head, tail)
        return tail - head
