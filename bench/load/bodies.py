"""Request bodies and the requests that carry them.

Body-size mixes (``--sizes``):

* ``1k``: 1,024 bytes.
* ``64k``: 65,536 bytes.
* ``1m``: 1,000,000 bytes: 1 MB rather than 1 MiB so that with the Kinesis
  sink the record (envelope line + body + partition key) stays under the
  service's 1 MiB record limit.
* ``5m``: 5 MiB (5,242,880 bytes): records a Kinesis stream takes only with
  its MaxRecordSizeInKiB raised; the harness raises the gateway's
  ``--max-body`` to fit (docs/sinks.md, "Record size").
* ``mix``: a fixed cycle of 100 sizes: 80 x 1 KiB, 15 x 16 KiB, 4 x 256 KiB,
  1 x 1,000,000 bytes, shuffled with a fixed seed (mean about 36 KiB), so that
  every run sends the same sequence.
* ``seed``: the load Sluice was designed for, API-call logs: a fixed cycle of
  100 sizes, 85 x 1 KiB, 10 x 16 KiB, 4 x 256 KiB, 1 x 900 KB, shuffled the
  same way (mean about 22 KiB).
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional

__all__ = ["MIXES", "sizes_for", "body", "request_head", "PATH", "largest_body"]

PATH = "/v1/logs"
_MIX_PARTS = ((80, 1024), (15, 16 * 1024), (4, 256 * 1024), (1, 1_000_000))
#: Seed of the ``mix`` shuffle; changing it changes every ``mix`` figure.
MIX_SEED = 20240501


_SEED_PARTS = ((85, 1024), (10, 16 * 1024), (4, 256 * 1024), (1, 900_000))


def _mix(parts=_MIX_PARTS) -> List[int]:
    sizes = [size for count, size in parts for _ in range(count)]
    random.Random(MIX_SEED).shuffle(sizes)
    return sizes


MIXES: Dict[str, List[int]] = {"1k": [1024], "64k": [65536], "1m": [1_000_000], "5m": [5 * 1024 * 1024],
                               "mix": _mix(), "seed": _mix(_SEED_PARTS)}


def sizes_for(mix: str) -> List[int]:
    """The cycle of body sizes of ``mix``."""
    try:
        return MIXES[mix]
    except KeyError:
        raise ValueError("unknown body mix %r (one of %s)" % (mix, ", ".join(MIXES))) from None


def largest_body(mixes: List[str]) -> int:
    """The largest body any of ``mixes`` sends."""
    return max(max(sizes_for(mix)) for mix in mixes)


def body(size: int) -> bytes:
    """A JSON-looking body of exactly ``size`` bytes."""
    prefix, suffix = b'{"msg":"', b'"}'
    if size < len(prefix) + len(suffix):
        return b"x" * size
    filler = size - len(prefix) - len(suffix)
    return prefix + (b"abcdefghijklmnopqrstuvwxyz0123456789" * (filler // 36 + 1))[:filler] + suffix


def request_head(size: int, host: str, token: Optional[str] = None) -> bytes:
    """The head of a keep-alive ``POST /v1/logs`` carrying ``size`` bytes."""
    lines = ["POST %s HTTP/1.1" % PATH, "Host: %s" % host, "Content-Type: application/json",
             "Content-Length: %d" % size]
    if token:
        lines.append("Authorization: Bearer %s" % token)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
