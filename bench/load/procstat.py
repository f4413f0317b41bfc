"""CPU time and memory of a process tree, from ``/proc``.

:class:`TreeSampler` samples the resident set of a process and its
descendants (``/proc/PID/statm``) every ``interval`` seconds in a thread;
:func:`cpu_seconds` sums ``utime + stime`` of the tree (``/proc/PID/stat``).
Descendants matter for nginx (master + worker) and any server that forks.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Dict, List, Optional, Tuple

__all__ = ["TreeSampler", "cpu_seconds", "tree"]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
#: Samples kept: an hour at 100 ms.
MAX_SAMPLES = 36_000


def _stat_fields(pid: int) -> Optional[List[str]]:
    try:
        with open("/proc/%d/stat" % pid) as f:
            text = f.read()
    except OSError:
        return None
    # The command name may contain spaces; it ends at the last ')'.
    return text[text.rindex(")") + 2:].split()


def tree(root: int) -> List[int]:
    """``root`` and its live descendants."""
    parents: Dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields:
                parents[int(name)] = int(fields[1])
    found, frontier = [root], [root]
    for _ in range(16):  # process trees here are two levels deep
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        if not frontier:
            break
        found.extend(frontier)
    return found


def cpu_seconds(pids: List[int]) -> float:
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS


def rss_bytes(pids: List[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/statm" % pid) as f:
                total += int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


class TreeSampler:
    """RSS of a process tree every ``interval`` seconds, in a thread."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.samples: List[Tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._pids = [root]

    def start(self) -> TreeSampler:
        self._pids = tree(self.root)
        self._thread.start()
        return self

    def pids(self) -> List[int]:
        return list(self._pids)

    def _run(self) -> None:
        refreshed = time.monotonic()
        while not self._stop.wait(self.interval) and len(self.samples) < MAX_SAMPLES:
            if time.monotonic() - refreshed > 1.0:
                self._pids = tree(self.root)
                refreshed = time.monotonic()
            self.samples.append((time.time(), rss_bytes(self._pids)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
