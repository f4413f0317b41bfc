"""sinks/worker.py: a job in a worker thread, its result or exception back in the task."""

from __future__ import annotations

import threading

import pytest
import trio

from sinks.worker import run_sync


async def test_the_job_runs_in_another_thread_and_its_result_comes_back():
    here = threading.get_ident()
    ident, name = await run_sync(lambda: (threading.get_ident(), threading.current_thread().name))
    assert ident != here
    assert await run_sync(sum, [1, 2, 3]) == 6
    # The thread was not renamed for the job.
    assert "sum" not in name and "from" not in name


async def test_the_jobs_exception_is_raised_in_the_task():
    def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await run_sync(fail)


async def test_a_job_that_started_finishes_even_when_the_caller_is_cancelled():
    started, release = threading.Event(), threading.Event()
    done = []

    def job() -> str:
        started.set()
        release.wait(5)
        done.append(True)
        return "finished"

    results = []

    async def caller() -> None:
        results.append(await run_sync(job))

    with trio.move_on_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.to_thread.run_sync(started.wait)
            nursery.cancel_scope.cancel()
            release.set()
    assert done == [True] and results == ["finished"]


async def test_a_caller_cancelled_before_the_job_starts_never_runs_it():
    ran = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await run_sync(ran.append, 1)
    assert ran == [] and scope.cancelled_caught
