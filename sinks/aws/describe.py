"""Reading a Kinesis stream's record limit: one ``DescribeStreamSummary`` call.

The thin driver beside :mod:`sinks.aws.record_limit` (which decides what the
answer means); the stream sink calls it at start and while it runs.
"""
from __future__ import annotations

import json
from typing import Optional, Tuple

from sinks.aws.errors import CredentialsError, ServiceError, classify_error
from sinks.aws.http import Endpoint
from sinks.aws.limits import KINESIS_TARGET_PREFIX
from sinks.aws.record_limit import stream_record_bytes

__all__ = ["read_record_limit"]


async def read_record_limit(endpoint: Endpoint, stream: str) -> Tuple[Optional[int], Optional[ServiceError]]:
    """``(bytes, None)``: the stream's MaxRecordSizeInKiB in bytes; ``(None, error)``.

    ``error`` is set only for a failure that stops the sink too (credentials
    that do not work, a missing stream); anything else (no
    ``kinesis:DescribeStreamSummary`` permission, the endpoint unreachable
    for now, an unreadable answer) gives ``(None, None)``: the limit in
    force stands.
    """
    doc = {"StreamARN": stream} if stream.startswith("arn:") else {"StreamName": stream}
    try:
        reply = await endpoint.call(KINESIS_TARGET_PREFIX + ".DescribeStreamSummary",
                                    json.dumps(doc).encode())
    except CredentialsError as exc:
        return None, exc
    except ServiceError:
        return None, None
    if reply.status != 200:
        error = classify_error(reply.status, reply.body, reply.error_type)
        if isinstance(error, CredentialsError) or error.code == "ResourceNotFoundException":
            return None, error
        return None, None
    return stream_record_bytes(reply.body), None
