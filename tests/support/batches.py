"""Adding one-off buffers to PutRecords and PutRecordBatch bodies, the way the sink adds ring slices."""

from __future__ import annotations

from typing import Any, Optional, Union

from sinks.aws.putrecords import FirehoseBatch, PutRecordsBatch

__all__ = ["add"]


def add(batch: Union[PutRecordsBatch, FirehoseBatch], data: Any, partition_key: Optional[str] = None,
        explicit_hash_key: Optional[str] = None) -> bool:
    """``batch.add_from`` of all of ``data``, exported for this call only."""
    with batch.source(data) as source:
        if isinstance(batch, FirehoseBatch):
            return batch.add_from(source, 0, source.nbytes)
        return batch.add_from(source, 0, source.nbytes, partition_key,  # type: ignore[arg-type]
                              explicit_hash_key)
