"""sinks/jit.py: a task inside ``paused()`` runs its steps with PyPy's JIT tracing off.

The instrument is driven here with a stand-in for ``pypyjit.set_param`` so
that both interpreters check what each task's steps run under; the last test
uses PyPy's own.
"""

from __future__ import annotations

import platform
from typing import Dict, List, Tuple

import pytest
import trio

from sinks import jit


class Params:
    """Records the JIT's thresholds as ``set_param`` leaves them."""

    def __init__(self) -> None:
        self.now: Dict[str, int] = dict(jit.PYPY_DEFAULTS)
        self.calls = 0

    def set_param(self, **values: int) -> None:
        self.calls += 1
        self.now.update(values)

    @property
    def tracing(self) -> bool:
        return all(value > 0 for value in self.now.values())


async def test_only_the_steps_inside_the_block_run_with_tracing_paused():
    params = Params()
    pause = jit.install(params.set_param)
    assert pause is not None
    seen: List[Tuple[str, bool]] = []

    async def caller() -> None:
        seen.append(("caller before", params.tracing))
        with jit.paused():
            for _ in range(3):
                seen.append(("caller inside", params.tracing))
                await trio.lowlevel.checkpoint()
            seen.append(("caller inside", params.tracing))
        seen.append(("caller after", params.tracing))
        await trio.lowlevel.checkpoint()
        seen.append(("caller after", params.tracing))

    async def other() -> None:
        for _ in range(6):
            seen.append(("other", params.tracing))
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            nursery.start_soon(other)
    finally:
        trio.lowlevel.remove_instrument(pause)
    assert {(who, tracing) for who, tracing in seen} == {
        ("caller before", True), ("caller inside", False), ("caller after", True), ("other", True)}
    assert pause.paused_steps == 3
    assert params.now == jit.PYPY_DEFAULTS


async def test_an_exception_inside_the_block_still_resumes_tracing():
    params = Params()
    pause = jit.install(params.set_param)
    try:
        with pytest.raises(ValueError):
            with jit.paused():
                await trio.lowlevel.checkpoint()
                raise ValueError("the call failed")
        assert params.tracing
        await trio.lowlevel.checkpoint()
        assert params.tracing
    finally:
        trio.lowlevel.remove_instrument(pause)


async def test_without_install_the_block_changes_nothing():
    with jit.paused():
        await trio.lowlevel.checkpoint()
    if platform.python_implementation() != "PyPy":
        assert jit.install() is None


@pytest.mark.skipif(platform.python_implementation() != "PyPy", reason="pypyjit is PyPy's")
async def test_pypys_own_jit_takes_the_settings():
    pause = jit.install()
    assert pause is not None
    try:
        with jit.paused():
            await trio.lowlevel.checkpoint()
            total = sum(range(10000))  # a loop that is not traced here
        assert total == 49995000
        assert pause.paused_steps == 1
    finally:
        trio.lowlevel.remove_instrument(pause)


@pytest.mark.parametrize("mode, ack, linger, pauses", [
    ("pause", "kinesis", "auto", True),
    ("compile", "received", "auto", False),
    # auto: paused when batches linger 100 ms or more (a few calls a second).
    ("auto", "received", "auto", True),
    ("auto", "kinesis", "auto", False),
    ("auto", "received", "20ms", False),
    ("auto", "kinesis", "100ms", True),
])
async def test_a_serving_process_pauses_the_jit_in_the_sink_only_on_pypy_and_when_asked(
        mode, ack, linger, pauses):
    from gateway.cli.serve import pause_sink_jit
    from gateway.config import settings

    installed = pause_sink_jit(settings.load({"sink_jit": mode, "ack": ack, "linger": linger}, {}))
    pause = jit._CURRENT.get()
    try:
        assert installed == (pauses and platform.python_implementation() == "PyPy")
        assert (pause is not None) == installed
    finally:
        if pause is not None:
            trio.lowlevel.remove_instrument(pause)


async def test_nested_blocks_keep_tracing_paused_until_the_outer_one_ends():
    params = Params()
    pause = jit.install(params.set_param)
    try:
        with jit.paused():
            with jit.paused():
                await trio.lowlevel.checkpoint()
            assert not params.tracing
            await trio.lowlevel.checkpoint()
            assert not params.tracing
        assert params.tracing
    finally:
        trio.lowlevel.remove_instrument(pause)
    assert pause.paused_steps == 2


async def test_settling_raises_the_thresholds_and_takes_the_pause_out_of_the_loop():
    params = Params()
    pause = jit.install(params.set_param)
    settled = {name: value * jit.SETTLED_SCALE for name, value in jit.PYPY_DEFAULTS.items()}
    try:
        with jit.paused():
            await trio.lowlevel.checkpoint()
            # Settled while a paused block runs: its steps stay paused until it ends.
            assert jit.settle()
            assert not params.tracing
            await trio.lowlevel.checkpoint()
            assert not params.tracing
        assert params.now == settled
        # Settled thresholds keep the calls from being traced: no more pausing,
        # and no instrument left in every task's steps.
        steps = pause.paused_steps
        with jit.paused():
            await trio.lowlevel.checkpoint()
            assert params.now == settled
        assert pause.paused_steps == steps
        assert not pause.installed
    finally:
        if pause.installed:
            trio.lowlevel.remove_instrument(pause)


async def test_settling_with_no_paused_block_takes_the_pause_out_at_once():
    params = Params()
    pause = jit.install(params.set_param)
    assert jit.settle()
    assert not pause.installed
    steps = pause.paused_steps
    with jit.paused():
        await trio.lowlevel.checkpoint()
    assert pause.paused_steps == steps
    assert params.now["threshold"] == jit.PYPY_DEFAULTS["threshold"] * jit.SETTLED_SCALE


async def test_settling_without_the_sinks_pause_sets_the_thresholds_itself():
    params = Params()
    assert jit.settle(set_param=params.set_param)
    assert params.now == {name: value * jit.SETTLED_SCALE for name, value in jit.PYPY_DEFAULTS.items()}
    assert jit.settle(0, set_param=params.set_param)
    assert not params.tracing  # 0: nothing new is traced


async def test_a_serving_process_settles_once_enough_requests_were_accepted(autojump_clock):
    from gateway.cli import serve
    from gateway.config import settings

    class Counting:
        accepted = 0

    params = Params()
    gateway = Counting()
    pause = jit.install(params.set_param)
    try:
        async with trio.open_nursery() as nursery:
            started = serve.settle_jit(settings.load({"jit_settle": "100"}, {}), gateway, nursery)
            assert started == (platform.python_implementation() == "PyPy")
            if not started:
                nursery.start_soon(serve._settle_jit_after, gateway, 100)
            await trio.sleep(10.5)
            assert params.now == jit.PYPY_DEFAULTS  # not yet: 0 of 100
            gateway.accepted = 100
            await trio.sleep(serve.JIT_SETTLE_POLL * 1.5)  # the task looks once in between
            assert params.now["trace_eagerness"] == jit.PYPY_DEFAULTS["trace_eagerness"] * jit.SETTLED_SCALE
        assert not pause.installed  # settling took it out of the loop
    finally:
        if pause.installed:
            trio.lowlevel.remove_instrument(pause)
    assert not serve.settle_jit(settings.load({"jit_settle": "0"}, {}), gateway, nursery)
