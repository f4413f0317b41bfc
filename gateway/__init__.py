"""Sluice: an HTTP log-ingestion gateway that keeps bodies in a preallocated ring."""

from __future__ import annotations

__version__ = "0.1.0"
