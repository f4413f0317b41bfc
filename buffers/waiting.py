"""The Trio side of the ring: wait for space instead of failing at once.

:class:`WaitingRing` wraps a :class:`~buffers.ring.RingBuffer`.  A reservation
that does not fit joins a first-come, first-served queue; each release grants
space to the queue's head for as long as the head fits, so a large request is
not starved by a stream of small ones and a release wakes only the tasks it
can serve.  How long to wait is bounded by ``max_wait`` (a cancel scope inside
:meth:`WaitingRing.reserve`), after which :class:`Overloaded` is raised and the
server answers ``503`` with ``Retry-After``.

Owners (tenants, with access control on) may hold at most ``max_share`` of
the capacity at once: a reservation that would take its owner past that is
refused at once with :class:`Overloaded` (it does not queue), so one tenant's
slow or numerous uploads leave the rest of the ring to the others.  What an
owner holds is what it reserved, until the slot is released.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, Hashable, Optional, Tuple

import trio

from buffers.ring import RingBuffer, RingFull, Slot

__all__ = ["WaitingRing", "Overloaded"]


class Overloaded(RingFull):
    """No space came free within the allowed wait (or no other room: a spool, a connection).

    Like h11's ``error_status_hint``, it carries the answer a server gives:
    ``503`` with ``Retry-After: retry_after``.  This is the one "overloaded"
    failure of the whole gateway.
    """

    status = 503
    reason = "overloaded"

    def __init__(self, message: str = "", *, retry_after: float = 1.0) -> None:
        super().__init__(message or self.reason)
        self.retry_after = retry_after


class _Waiter:
    __slots__ = ("size", "slot", "event")

    def __init__(self, size: int) -> None:
        self.size = size
        self.slot: Optional[Slot] = None
        self.event = trio.Event()


class WaitingRing:
    """A ring whose reservations wait (up to ``max_wait`` seconds) for space."""

    def __init__(self, ring: RingBuffer, *, max_wait: float, max_share: float = 1.0) -> None:
        if not 0 < max_share <= 1:
            raise ValueError("max_share must be in (0, 1], not %r" % max_share)
        self._ring = ring
        self.max_wait = max_wait
        self._queue: Deque[_Waiter] = deque()
        self.waits = 0
        self.overloads = 0
        #: Bytes one owner may hold at once.
        self.owner_limit = int(ring.capacity * max_share)
        #: Bytes held by each owner holding any; slots of owners: (owner, bytes).
        self._held: Dict[Hashable, int] = {}
        self._owned: Dict[Slot, Tuple[Hashable, int]] = {}
        #: Reservations refused because their owner held its share.
        self.share_refusals = 0

    def reserve_nowait(self, size: int) -> Slot:
        """Reserve at once or raise :class:`~buffers.ring.RingFull`.

        Refuses while others are queued, so nobody jumps the queue.
        """
        if self._queue:
            raise RingFull("reservations are queued")
        return self._ring.reserve(size)

    async def reserve(self, size: int, owner: Optional[Hashable] = None) -> Slot:
        """Reserve ``size`` bytes, waiting for releases up to ``max_wait``.

        With an ``owner``, raise :class:`Overloaded` at once if that owner
        would hold more than its share.
        """
        if owner is None:
            return await self._reserve(size)
        held = self._held.get(owner, 0)
        # An owner holding nothing may always reserve: one record is never refused for its size.
        if held and held + size > self.owner_limit:
            self.share_refusals += 1
            raise Overloaded("this tenant holds %d of the %d ring bytes one tenant may hold"
                             % (held, self.owner_limit), retry_after=1.0)
        slot = await self._reserve(size)
        # No checkpoint since the check: nothing else reserved for this owner.
        self._held[owner] = self._held.get(owner, 0) + size
        self._owned[slot] = (owner, size)
        return slot

    def held_by_owners(self) -> Dict[Hashable, int]:
        """Bytes held now by each owner holding any (a copy)."""
        return dict(self._held)

    async def _reserve(self, size: int) -> Slot:
        if not self._queue:
            try:
                return self._ring.reserve(size)
            except RingFull:
                pass
        if not 1 <= size <= self._ring.capacity:
            # Checked before queueing: a waiter the ring can never serve would
            # make some later release() raise instead.
            raise ValueError("reservation of %d bytes outside 1..%d" % (size, self._ring.capacity))
        self.waits += 1
        waiter = _Waiter(size)
        self._queue.append(waiter)
        try:
            with trio.move_on_after(self.max_wait):
                await waiter.event.wait()
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.slot is not None:
            return waiter.slot
        self._abandon(waiter)
        self.overloads += 1
        raise Overloaded("no %d bytes free in the ring within %.3gs" % (size, self.max_wait),
                         retry_after=max(1.0, self.max_wait))

    # -- the ring's own calls, passed through ------------------------------

    @property
    def buffer(self):
        """The ring's buffer (every slot's view lies in it)."""
        return self._ring.buffer

    @property
    def capacity(self) -> int:
        return self._ring.capacity

    @property
    def used(self) -> int:
        """Bytes reserved, committed or in flight."""
        return self._ring.used

    @property
    def live(self) -> int:
        """Slots not yet released."""
        return self._ring.live

    def can_reserve(self, size: int) -> bool:
        """Whether the ring has room for ``size`` bytes now."""
        return self._ring.can_reserve(size)

    def commit(self, slot: Slot, length: int) -> memoryview:
        """The body is in: keep the first ``length`` bytes of ``slot``."""
        return self._ring.commit(slot, length)

    def hand_off(self, slot: Slot) -> None:
        """The committed slot goes to the sink."""
        self._ring.hand_off(slot)

    def release(self, slot: Slot) -> None:
        """Release ``slot`` and grant the freed space to queued reservations."""
        self._ring.release(slot)
        if self._owned:
            owned = self._owned.pop(slot, None)
            if owned is not None:
                owner, size = owned
                left = self._held[owner] - size
                if left:
                    self._held[owner] = left
                else:
                    del self._held[owner]
        if self._queue:
            self._grant()

    def trim(self, most: Optional[int] = None) -> int:
        """Give back the ring's pages unused since the last trim (:meth:`RingBuffer.trim`)."""
        return self._ring.trim(most)

    def statistics(self) -> dict:
        """The ring's occupancy plus how often reservations waited or failed."""
        stats = self._ring.statistics()
        stats["waiting"] = len(self._queue)
        stats["waits"] = self.waits
        stats["overloads"] = self.overloads
        stats["share_refusals"] = self.share_refusals
        stats["owners"] = len(self._held)
        return stats

    def _grant(self) -> None:
        queue = self._queue
        while queue:
            waiter = queue[0]
            try:
                waiter.slot = self._ring.reserve(waiter.size)
            except RingFull:
                return
            queue.popleft()
            waiter.event.set()

    def _abandon(self, waiter: _Waiter) -> None:
        if waiter.slot is not None:
            # Granted while the caller was being cancelled: give it back.
            self.release(waiter.slot)
        else:
            self._queue.remove(waiter)
            # The waiter behind this one may fit where it did not.
            self._grant()
