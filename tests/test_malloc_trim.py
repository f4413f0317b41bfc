"""--malloc-trim: malloc's free pages go back to the kernel after each major collection.

The trimming task is driven here by a counter standing in for the count of
major collections; one test runs glibc's real malloc_trim.
"""

from __future__ import annotations

import sys
import threading

import pytest
import trio

from gateway.config.settings import from_args
from gateway.observe.memory import malloc_trimmer, trim_after_collections


async def test_a_trim_follows_each_new_major_collection_and_only_then():
    collections, trims = [0], []
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: trim_after_collections(
            lambda: collections[0], lambda: trims.append(collections[0]), every=0.01,
            task_status=task_status))
        await trio.sleep(0.05)
        assert trims == []
        collections[0] = 1
        await trio.sleep(0.05)
        collections[0] = 3  # two collections between looks: one trim
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert trims == [1, 3]


async def test_a_trim_runs_in_a_thread_and_never_two_at_once():
    collections, entered, release = [0], [], threading.Event()

    def slow_trim():
        entered.append(threading.current_thread() is not threading.main_thread())
        release.wait(5)

    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: trim_after_collections(
            lambda: collections[0], slow_trim, every=0.01, task_status=task_status))
        collections[0] = 1
        await trio.sleep(0.05)  # the loop runs on while the trim is under way
        collections[0] = 2
        await trio.sleep(0.05)
        assert entered == [True]
        release.set()
        await trio.sleep(0.05)
        assert entered == [True, True]
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_trimmer_calls_glibc():
    trim = malloc_trimmer()
    assert trim is not None
    assert trim() in (0, 1)


def test_malloc_trim_is_on_unless_turned_off():
    assert from_args([], {}).malloc_trim == "on"
    assert from_args(["--malloc-trim", "off"], {}).malloc_trim == "off"
    assert from_args([], {"SLUICE_MALLOC_TRIM": "off"}).malloc_trim == "off"


class _Nursery:
    def __init__(self):
        self.started = []

    def start_soon(self, fn, *args):
        self.started.append(fn)


def test_serving_starts_the_trimming_task_when_on():
    from gateway.cli.serve import trim_malloc

    nursery = _Nursery()
    assert not trim_malloc(from_args(["--malloc-trim", "off"], {}), None, nursery)
    assert nursery.started == []
    if sys.platform.startswith("linux"):
        assert trim_malloc(from_args([], {}), None, nursery)
        assert nursery.started == [trim_after_collections]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_arena_cap_takes_unless_the_operator_chose_one(monkeypatch):
    from gateway.observe.memory import limit_malloc_arenas

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not limit_malloc_arenas()
