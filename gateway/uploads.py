"""Bounds on chunked uploads in progress, per tenant and per client address.

A chunked body's size is unknown until it ends, so each one reserves a whole
``--max-body`` slot of the ring and is charged to the byte rate and the
monthly quota only once stored.  :class:`ChunkedUploads` counts those in
progress in one process and refuses one more past its bounds.  No I/O.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, Iterator, Optional, Tuple

from gateway import errors

__all__ = ["ChunkedUploads", "MAX_CHUNKED_PER_TENANT", "MAX_CHUNKED_PER_ADDRESS"]

#: Chunked uploads in progress at once per tenant and per client address.
#: This bounds what silent chunked connections hold of the ring, and how far
#: concurrent chunked uploads can overshoot a tenant's quota (by this many
#: bodies per gateway process).  Agents send one request at a time per
#: connection and rarely open more than a couple.
MAX_CHUNKED_PER_TENANT = 4
MAX_CHUNKED_PER_ADDRESS = 4
#: What a body with a Content-Length holds: nothing (nullcontext is reusable).
_NOT_COUNTED = contextlib.nullcontext()


class ChunkedUploads:
    """Chunked uploads in progress, by tenant and by client address."""

    def __init__(self) -> None:
        self._counts: Dict[object, int] = {}

    def hold(self, length: Optional[int], peer: str, tenant: Optional[str]) -> ContextManager[None]:
        """Count a chunked upload (``length`` None) while the block runs.

        Raises :class:`gateway.errors.TooManyUploads` when the address or the
        tenant already has its most; a body with a length is not counted
        (and costs no object per request: the shared no-op context).
        """
        if length is not None:
            return _NOT_COUNTED
        return self._hold_chunked(peer, tenant)

    @contextlib.contextmanager
    def _hold_chunked(self, peer: str, tenant: Optional[str]) -> Iterator[None]:
        counts = self._counts
        keys: Tuple[object, ...] = (("address", peer),) if tenant is None else (
            ("address", peer), ("tenant", tenant))
        if counts.get(("address", peer), 0) >= MAX_CHUNKED_PER_ADDRESS:
            raise errors.TooManyUploads(
                "more than %d chunked uploads at once from one address: send one at a time "
                "or with Content-Length" % MAX_CHUNKED_PER_ADDRESS, retry_after=1.0)
        if tenant is not None and counts.get(("tenant", tenant), 0) >= MAX_CHUNKED_PER_TENANT:
            raise errors.TooManyUploads(
                "more than %d chunked uploads at once for tenant %s: send one at a time "
                "or with Content-Length" % (MAX_CHUNKED_PER_TENANT, tenant), retry_after=1.0)
        for key in keys:
            counts[key] = counts.get(key, 0) + 1
        try:
            yield
        finally:
            for key in keys:
                left = counts[key] - 1
                if left:
                    counts[key] = left
                else:
                    del counts[key]
