"""sinks/worker.py: a job in a worker thread, its result or exception back in the task."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import trio

from sinks.worker import NICE, lower_priority, run_sync


async def test_the_job_runs_in_another_thread_and_its_result_comes_back():
    here = threading.get_ident()
    ident, name = await run_sync(lambda: (threading.get_ident(), threading.current_thread().name))
    assert ident != here
    assert await run_sync(sum, [1, 2, 3]) == 6
    # The thread is the sinks' own, not renamed for the job.
    assert name == "sluice-sink-worker"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")
async def test_background_jobs_run_at_lower_priority_and_others_at_the_loops():
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    loop = niceness()
    assert await run_sync(niceness, background=True) == max(NICE, loop)
    assert await run_sync(niceness) == loop
    assert await run_sync(niceness, background=True) == max(NICE, loop)
    assert niceness() == loop


async def test_jobs_do_not_wait_for_each_other():
    # Each job waits for the other to start: with one thread they would deadlock.
    first, second = threading.Event(), threading.Event()

    def meet(mine: threading.Event, other: threading.Event) -> bool:
        mine.set()
        return other.wait(5)

    results = []

    async def run(mine: threading.Event, other: threading.Event) -> None:
        results.append(await run_sync(meet, mine, other))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, first, second)
        nursery.start_soon(run, second, first)
    assert results == [True, True]


def test_a_thread_never_gets_a_higher_priority_than_it_has():
    result = []

    def lower_twice() -> None:
        result.append(lower_priority(15))
        result.append(lower_priority(5))

    thread = threading.Thread(target=lower_twice)
    thread.start()
    thread.join()
    if sys.platform.startswith("linux"):
        assert result[0] >= 15 and result[1] == result[0]
    else:
        assert result == [None, None]


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
