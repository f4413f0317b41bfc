"""The ring: one preallocated buffer that every record body lives in.

Theory of operation
-------------------
A :class:`RingBuffer` owns one buffer of fixed capacity, allocated once: an
anonymous ``mmap`` rather than a ``bytearray``, because a bytearray is zeroed
(every page resident at once, and PyPy briefly holds a second copy while
building it), while the kernel gives an mmap's pages only as they are first
written.

A writer calls :meth:`RingBuffer.reserve` for ``n`` bytes and gets a
:class:`Slot` whose ``view`` is a writable ``memoryview`` of exactly those
bytes, contiguous in the buffer.  The writer fills it (``recv_into`` straight
from a socket), reports how many bytes landed with :meth:`RingBuffer.commit`,
and hands the slot on.  Whoever holds the slot last (a sink, once the record is
stored) calls :meth:`RingBuffer.release`.

Slots may be released in any order, and a released slot's space is free again
at once.  The ring keeps its free regions sorted by offset, merged with their
neighbours, and places each reservation at the lowest offset where it fits
(address-ordered first fit).  Two things follow:

- a slot held for seconds (a slow upload, a record waiting for a throttled
  sink) holds only its own bytes: the ring refuses a reservation only when no
  free region is large enough, however old the slots around it are;
- a gateway whose ring never empties keeps writing the same low pages, so the
  pages it makes resident stay near the most bytes ever in flight at once,
  not the whole buffer.

Pages once written stay resident until :meth:`RingBuffer.trim` gives back
those above everything reserved since the trim before it (the gateway trims
every few seconds), so a ring that filled once during a burst or a sink's
outage shrinks back to what the load needs.

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
from bisect import bisect_right
from typing import Dict, List, Optional, Tuple

__all__ = [
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

#: The unit :meth:`RingBuffer.trim` gives back in.
PAGE = mmap.PAGESIZE

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

    __slots__ = ("offset", "size", "state", "_ring")

    def __init__(self, ring: RingBuffer, offset: int, size: int) -> None:
        self._ring = ring
        self.offset = offset
        self.size = size
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
        # Private, so that pages given back by trim() are freed, not kept
        # as shared memory that only leaves this process's page tables.
        self.buffer = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE)
        self._view = memoryview(self.buffer)
        self._empty = self._view[0:0]
        # The free regions, lowest offset first, never adjacent to each other
        # (a freed region is merged with its neighbours): two lists of ints
        # rather than a list of pairs, so placing a slot allocates nothing.
        self._free_starts: List[int] = [0]
        self._free_sizes: List[int] = [capacity]
        self._used = 0
        self._live = 0
        # The end of the highest reservation since the last trim, and how far
        # pages may be resident (everything reserved up to the last trim).
        self._high = 0
        self._touched = 0

    # -- queries ---------------------------------------------------------

    @property
    def used(self) -> int:
        """Bytes held by slots not yet released."""
        return self._used

    @property
    def live(self) -> int:
        """Number of slots not yet released."""
        return self._live

    def can_reserve(self, size: int) -> bool:
        """Whether :meth:`reserve` of ``size`` bytes would succeed now."""
        return 0 < size and self._fit(size) >= 0

    def statistics(self) -> dict:
        """A snapshot of occupancy, for /readyz and metrics."""
        return {
            "capacity": self.capacity,
            "used": self._used,
            "live_slots": self._live,
            "largest_free": max(self._free_sizes, default=0),
        }

    # -- moves -----------------------------------------------------------

    def reserve(self, size: int) -> Slot:
        """Reserve ``size`` contiguous bytes, or raise :class:`RingFull`."""
        if size < 1:
            raise ValueError("reservations are at least 1 byte")
        if size > self.capacity:
            raise ValueError("reservation of %d bytes exceeds the ring's %d" % (size, self.capacity))
        at = self._fit(size)
        if at < 0:
            raise RingFull("no %d contiguous bytes free" % size)
        starts, sizes = self._free_starts, self._free_sizes
        offset = starts[at]
        left = sizes[at] - size
        if left:
            starts[at] = offset + size
            sizes[at] = left
        else:
            del starts[at]
            del sizes[at]
        self._used += size
        self._live += 1
        if offset + size > self._high:
            self._high = offset + size
        return Slot(self, offset, size)

    def commit(self, slot: Slot, nbytes: int) -> memoryview:
        """Record that ``nbytes`` landed at the start of ``slot``.

        Returns the narrowed view; the slot's unused tail is free again at once.
        """
        if not 0 <= nbytes <= slot.size:
            raise ValueError("committed %d bytes into a %d-byte slot" % (nbytes, slot.size))
        self._move(slot, "commit")
        unused = slot.size - nbytes
        if unused:
            self._free(slot.offset + nbytes, unused)
            slot.size = nbytes
        return slot.view

    def hand_off(self, slot: Slot) -> None:
        """Mark a committed slot as taken by a sink."""
        self._move(slot, "hand_off")

    def release(self, slot: Slot) -> None:
        """Give the slot's space back, free for the next reservation at once."""
        self._move(slot, "release")
        self._live -= 1
        if slot.size:
            self._free(slot.offset, slot.size)

    def trim(self, most: Optional[int] = None) -> int:
        """Give the kernel back the pages above every live slot and every
        reservation since the last trim, the highest first and at most
        ``most`` bytes of them; returns how many bytes.

        Pages given back cost a page fault each when written again, so a
        caller trims every few seconds: pages the load used in that time stay.
        """
        top = self._live_top()
        keep = _whole_pages(max(top, self._high))
        touched = min(self.capacity, _whole_pages(max(self._touched, self._high)))
        self._high = top
        if most is not None:
            keep = max(keep, _whole_pages(touched - most))
        if keep >= touched:
            self._touched = touched
            return 0
        self.buffer.madvise(mmap.MADV_DONTNEED, keep, touched - keep)
        self._touched = keep
        return touched - keep

    # -- internals -------------------------------------------------------

    def _live_top(self) -> int:
        """The end of the highest live slot (0 with none)."""
        starts = self._free_starts
        if starts and starts[-1] + self._free_sizes[-1] == self.capacity:
            return starts[-1]
        return self.capacity

    def _move(self, slot: Slot, action: str) -> None:
        if slot._ring is not self:
            raise SlotStateError("slot belongs to another ring")
        new = _TRANSITIONS.get((slot.state, action))
        if new is None:
            raise SlotStateError("cannot %s a %s slot" % (action, slot.state))
        slot.state = new

    def _fit(self, size: int) -> int:
        """Index of the lowest free region of at least ``size`` bytes, or -1."""
        at = 0
        for free in self._free_sizes:
            if free >= size:
                return at
            at += 1
        return -1

    def _free(self, offset: int, size: int) -> None:
        """Return ``[offset, offset + size)`` to the free regions, merged with its neighbours."""
        self._used -= size
        starts, sizes = self._free_starts, self._free_sizes
        at = bisect_right(starts, offset)  # the first free region after it
        end = offset + size
        joins_next = at < len(starts) and starts[at] == end
        if at and starts[at - 1] + sizes[at - 1] == offset:
            if joins_next:
                sizes[at - 1] += size + sizes[at]
                del starts[at]
                del sizes[at]
            else:
                sizes[at - 1] += size
        elif joins_next:
            starts[at] = offset
            sizes[at] += size
        else:
            starts.insert(at, offset)
            sizes.insert(at, size)


def _whole_pages(nbytes: int) -> int:
    """``nbytes`` rounded up to a whole number of pages."""
    return -(-nbytes // PAGE) * PAGE
