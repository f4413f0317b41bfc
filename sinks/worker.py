"""Blocking work of the sinks in worker threads, some yielding to the event loop.

The sinks' jobs (encoding and hashing a Kinesis batch, writing the file
sink's or the spool's files) run in threads of their own, kept for reuse.

- **Background jobs at lower CPU priority.**  A job marked ``background``
  runs in a thread at nice `NICE` (Linux), so on a busy core the event loop
  takes the CPU back as soon as a request arrives.  At the design load a
  batch's base64 and SHA-256 took a few milliseconds in one go; pinned to
  the loop's core, at the same priority as the loop, the requests arriving
  meanwhile often waited for them (p99 about 0.4 ms higher).  Under
  contention such a job gets about a tenth of the core, so a caller that is
  falling behind (at saturation, batches waiting for their turn) must not
  mark its job ``background``: with every job at nice 10, a gateway
  saturated with 1 MB bodies stored a quarter fewer records.
- **Not Trio's thread cache.**  A thread's priority cannot be raised again
  without privileges, so these threads are not shared with
  ``trio.to_thread.run_sync``.  They are also never renamed: Trio names its
  thread for every job, with two ``pthread_setname_np`` calls through ctypes,
  which on PyPy runs as Python holding the interpreter lock and leaves
  argument objects with finalizers for the collector.

A thread is started when a job finds every thread of its priority busy, so
jobs never queue behind each other; the threads are daemons and stay for the
process's life (as many as jobs ever ran at once, a few).
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Any, Callable, List, Optional, Tuple, TypeVar

import trio

__all__ = ["run_sync", "NICE"]

T = TypeVar("T")

#: Niceness of the threads of background jobs (0 is the loop's; 19 the
#: lowest).  Weight 110 against the loop's 1024: a job gets about a tenth of
#: a core the loop keeps busy, and all of it when the loop is idle.
NICE = 10

Job = Tuple[Callable[[], None], Callable[[], None]]


class _Threads:
    """Daemon threads taking jobs from one queue, one more whenever all are busy."""

    def __init__(self, nice: int) -> None:
        self.nice = nice
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, job: Callable[[], None], deliver: Callable[[], None]) -> None:
        """Run ``job()`` (which must not raise), then ``deliver()``, in one of the threads."""
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._jobs.put((job, deliver))
        if spawn:
            threading.Thread(target=self._serve, name="sluice-sink-worker", daemon=True).start()

    def _serve(self) -> None:
        if self.nice:
            lower_priority(self.nice)
        jobs = self._jobs
        while True:
            job, deliver = jobs.get()
            job()
            deliver()
            del job, deliver  # the job's arguments are not kept while idle
            with self._lock:
                self._idle += 1


def lower_priority(nice: int) -> Optional[int]:
    """Give the calling thread niceness ``nice``; its niceness after, or None
    where a thread's own niceness cannot be set (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    # On Linux a thread is a task: PRIO_PROCESS with its id sets that thread only.
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError:
        return None
    return os.getpriority(os.PRIO_PROCESS, tid)


_threads = _Threads(0)
_background = _Threads(NICE)


async def run_sync(fn: Callable[..., T], *args: Any, background: bool = False) -> T:
    """``fn(*args)`` in a sink worker thread; its result, or its exception.

    ``background``: run it at nice `NICE`, behind the event loop's work.

    Like ``trio.to_thread.run_sync`` with its defaults, the wait cannot be
    cancelled once the job started: the job owns what it was given until it
    returns.  ``fn`` must not call back into Trio (``trio.from_thread``).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()

    done: List[Any] = []

    def job() -> None:
        try:
            done.append((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - raised again in the task
            done.append((False, exc))

    def deliver() -> None:
        try:
            token.run_sync_soon(trio.lowlevel.reschedule, task)
        except trio.RunFinishedError:  # the run was torn down around its waiting task
            pass

    (_background if background else _threads).submit(job, deliver)
    await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
    ok, value = done.pop()
    if ok:
        return value  # type: ignore[no-any-return]
    try:
        raise value
    finally:
        del value  # no cycle through the traceback
