"""Reusable fixed-size buffers: per-connection receive buffers and the like.

A connection borrows one buffer for its lifetime and gives it back when it
closes, so connection churn does not allocate.  The pool keeps at most
``keep`` idle buffers; borrowing beyond what it holds allocates a new one
(the server bounds how many are out at once by its connection limit).
"""

from __future__ import annotations

from typing import List

__all__ = ["BufferPool"]


class BufferPool:
    """Buffers of ``size`` bytes, kept for reuse."""

    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self.keep = keep
        self._idle: List[bytearray] = []
        self.allocated = 0

    def borrow(self) -> bytearray:
        """A buffer of ``size`` bytes (contents unspecified)."""
        if self._idle:
            return self._idle.pop()
        self.allocated += 1
        return bytearray(self.size)

    def give_back(self, buffer: bytearray) -> None:
        """Return a buffer from :meth:`borrow`."""
        if len(buffer) != self.size:
            raise ValueError("buffer is not from this pool")
        if len(self._idle) < self.keep:
            self._idle.append(buffer)

    def statistics(self) -> dict:
        return {"size": self.size, "idle": len(self._idle), "allocated": self.allocated}
