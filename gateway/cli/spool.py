"""``sluice spool inspect DIR``: what a ``--ack spool`` directory still holds.

It only reads the files (a gateway may be running, or stopped after a crash):
per segment the records, those not yet confirmed stored by the sink, their
bytes and when the oldest of them arrived.  A torn tail (a write cut short by
a crash) is shown as dropped bytes; the gateway drops it at its next start.
A file that is not a segment is listed with what is wrong with it.  Files
are mapped, not read: a segment of any size costs no heap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import sys
import time
from typing import Any, Iterator, List, Optional, Set

__all__ = ["add_spool_commands", "run", "inspect"]


def add_spool_commands(commands) -> None:
    """Add ``spool inspect`` to the ``sluice`` subcommands."""
    spool = commands.add_parser("spool", help="look into a --ack spool directory",
                                description="Look into a --ack spool directory.")
    actions = spool.add_subparsers(dest="spool_command", metavar="ACTION")
    actions.required = True
    inspect_cmd = actions.add_parser(
        "inspect", help="print what is pending: segments, records, bytes, oldest record",
        description="Print each spool segment with its records, those not yet confirmed stored by "
                    "the sink, their bytes and the arrival time of the oldest; then the totals.")
    inspect_cmd.add_argument("directory", help="the gateway's --spool-dir")
    inspect_cmd.add_argument("--json", action="store_true", help="one JSON document instead of a table")


def inspect(directory: str) -> dict:
    """The spool's contents as a JSON-ready dict (raises OSError, SpoolError)."""
    from sinks.spool.layout import (
        SpoolError,
        acked_name,
        list_segments,
        parse_acks,
        segment_name,
        summarize_segment,
    )

    segments: List[dict] = []
    oldest: Optional[int] = None
    totals = {"records": 0, "pending_records": 0, "pending_bytes": 0, "dropped_bytes": 0, "file_bytes": 0}
    for sequence in list_segments(directory):
        path = os.path.join(directory, segment_name(sequence))
        try:
            with _mapped(path) as data:
                acked: Set[int] = set()
                try:
                    with _mapped(os.path.join(directory, acked_name(sequence))) as entries:
                        acked = parse_acks(entries)
                except FileNotFoundError:
                    pass
                try:
                    summary = summarize_segment(data, acked)
                except SpoolError as exc:
                    # Not a segment (a crafted or foreign file): shown, not fatal.
                    segments.append({"segment": segment_name(sequence), "error": str(exc),
                                     "file_bytes": len(data)})
                    totals["file_bytes"] += len(data)
                    continue
                file_bytes = len(data)
        except FileNotFoundError:
            continue  # deleted by a running gateway meanwhile
        segments.append({
            "segment": segment_name(sequence), "records": summary.records,
            "pending_records": summary.pending, "pending_bytes": summary.pending_bytes,
            "oldest_pending_ms": summary.oldest_pending_ms, "dropped_bytes": summary.dropped,
            "file_bytes": file_bytes,
        })
        totals["records"] += summary.records
        totals["pending_records"] += summary.pending
        totals["pending_bytes"] += summary.pending_bytes
        totals["dropped_bytes"] += summary.dropped
        totals["file_bytes"] += file_bytes
        if summary.oldest_pending_ms is not None and (oldest is None or summary.oldest_pending_ms < oldest):
            oldest = summary.oldest_pending_ms
    doc: dict = {"directory": directory, "segments": segments}
    doc.update(totals)
    doc["oldest_pending_ms"] = oldest
    return doc


@contextlib.contextmanager
def _mapped(path: str) -> Iterator[Any]:
    """The file's bytes, mapped rather than read: a segment of any size costs no heap."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped


def _when(ms: Optional[int]) -> str:
    if ms is None:
        return "-"
    seconds = ms // 1000
    return "%s.%03dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)), ms % 1000)


def _table(doc: dict) -> str:
    lines = ["%-24s %9s %9s %14s %8s  %s" % ("SEGMENT", "RECORDS", "PENDING", "PENDING_BYTES", "DROPPED",
                                             "OLDEST_PENDING")]
    for seg in doc["segments"]:
        if "error" in seg:
            lines.append("%-24s %s" % (seg["segment"], seg["error"]))
            continue
        lines.append("%-24s %9d %9d %14d %8d  %s" % (
            seg["segment"], seg["records"], seg["pending_records"], seg["pending_bytes"],
            seg["dropped_bytes"], _when(seg["oldest_pending_ms"])))
    oldest = doc["oldest_pending_ms"]
    age = "" if oldest is None else " (%.0f s ago)" % max(0.0, time.time() - oldest / 1000.0)
    lines.append("total: %d segment%s, %d of %d records pending (%d bytes), %d bytes on disk; "
                 "oldest pending record received %s%s" % (
                     len(doc["segments"]), "" if len(doc["segments"]) == 1 else "s",
                     doc["pending_records"], doc["records"], doc["pending_bytes"], doc["file_bytes"],
                     _when(oldest), age))
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    """Run ``sluice spool ...``; returns the exit status."""
    from sinks.spool.layout import SpoolError

    if not os.path.isdir(args.directory):
        print("sluice spool inspect: %s: no such directory" % args.directory, file=sys.stderr)
        return 1
    try:
        doc = inspect(args.directory)
    except (OSError, SpoolError) as exc:
        print("sluice spool inspect: %s" % exc, file=sys.stderr)
        return 1
    out = json.dumps(doc, separators=(",", ":")) + "\n" if args.json else _table(doc)
    sys.stdout.write(out)
    sys.stdout.flush()
    bad = [seg for seg in doc["segments"] if "error" in seg]
    for seg in bad:
        print("sluice spool inspect: %s: %s" % (seg["segment"], seg["error"]), file=sys.stderr)
    return 1 if bad else 0
