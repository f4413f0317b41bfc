"""Blocking work in a worker thread, for the sinks' frequent jobs.

``trio.to_thread.run_sync`` names its worker thread for every job, with two
calls of ``pthread_setname_np`` through ctypes.  On PyPy ctypes is Python
code that runs holding the interpreter lock and leaves argument objects
with finalizers for the collector (a few hundred alive at the design load,
from about five jobs a second).  `run_sync` takes a thread from the same
cache as Trio, unnamed.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import trio

__all__ = ["run_sync"]

T = TypeVar("T")


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread; its result, or its exception.

    Like ``trio.to_thread.run_sync`` with its defaults, the wait cannot be
    cancelled once the job started: the job owns what it was given until it
    returns.  ``fn`` must not call back into Trio (``trio.from_thread``).
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()

    def deliver(result: Any) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(functools.partial(fn, *args), deliver)
    return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)  # type: ignore[no-any-return]
