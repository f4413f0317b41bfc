"""Preallocated buffers that log bodies live in from socket to sink."""

from __future__ import annotations

from buffers.pool import BufferPool
from buffers.ring import (
    COMMITTED,
    IN_FLIGHT,
    RELEASED,
    RESERVED,
    RingBuffer,
    RingError,
    RingFull,
    Slot,
    SlotStateError,
)
from buffers.waiting import Overloaded, WaitingRing

__all__ = [
    "BufferPool",
    "RingBuffer",
    "Slot",
    "RingError",
    "RingFull",
    "SlotStateError",
    "WaitingRing",
    "Overloaded",
    "RESERVED",
    "COMMITTED",
    "IN_FLIGHT",
    "RELEASED",
]
