"""Keeping PyPy's JIT compiler out of the sink's calls to AWS.

At the design load the sink makes a few calls a second, and each call runs a
long path through botocore's signing, h11 and Trio's streams once.  PyPy's
JIT kept tracing and compiling pieces of that path for as long as the
gateway ran (about 70 loops and bridges in two minutes of steady state),
each time inside one of the call's steps, where it held the event loop for
up to 20 ms while requests waited.  Code that runs a few times a second gains
little from being compiled; the per-record loops around it (filling batches,
settling answers) run hundreds of times a second and gain a lot, so only the
call itself is kept out.

`JitPause` is a Trio instrument: a task inside `paused` runs its steps with
the JIT's thresholds set to "never", and they are set back to the process's
normal values when the step ends.  Machine code compiled earlier still runs, and
the rest of the process compiles as before.  `install` puts it in the running
loop on PyPy (the gateway does, unless ``--sink-jit compile``); without it,
`paused` does nothing.  It leaves the loop when the process settles (below).

The rest of the process keeps compiling too, long after it is warm: in a
10-minute run at the design load, 42 loops and 137 bridges were traced after
the first 30 seconds (about 0.9 s of tracing and compiling), each inside some
task's step, holding the event loop for up to 40 ms.  Most were bridges:
guards in hot code (Trio's, the Redis reply parser, the body reader) failing
seldom enough to reach PyPy's threshold only after minutes.  `settle` raises
the normal thresholds for good once the gateway is warm, so only code that
turns very hot is still compiled.
"""
from __future__ import annotations

import contextlib
import platform
from typing import Any, Callable, ContextManager, Dict, Iterator, Optional

import trio

__all__ = ["JitPause", "install", "paused", "settle", "PYPY_DEFAULTS", "SETTLED_SCALE"]

#: PyPy's own values of the thresholds that start tracing and compiling: a
#: loop, a function, a bridge from a failing guard.  They (or the settled
#: ones) are put back after a paused step, so values given with ``pypy --jit``
#: for these three do not hold once the sink has called.
PYPY_DEFAULTS: Dict[str, int] = {"threshold": 1039, "function_threshold": 1619, "trace_eagerness": 200}
_NEVER: Dict[str, int] = {name: -1 for name in PYPY_DEFAULTS}
#: After `settle`, a loop, function or failing guard must run this many
#: times more often than PyPy's defaults ask before it is traced.
SETTLED_SCALE = 100
_CURRENT: trio.lowlevel.RunVar = trio.lowlevel.RunVar("sluice_jit_pause", default=None)


class JitPause(trio.abc.Instrument):
    """Runs the steps of tasks inside `region` with the JIT's tracing paused."""

    def __init__(self, set_param: Callable[..., None]) -> None:
        self._set_param = set_param
        #: Tasks inside `region`, with how deep (regions may nest).
        self._tasks: Dict[Any, int] = {}
        self._paused = False
        #: Steps begun with the JIT paused.
        self.paused_steps = 0
        #: The thresholds outside paused steps.
        self.normal: Dict[str, int] = dict(PYPY_DEFAULTS)
        #: Whether `install` put it in the loop and it is still there.
        self._installed = False
        self._retiring = False

    @property
    def installed(self) -> bool:
        """Whether it is in the Trio loop (from `install` until the process settles)."""
        return self._installed

    def before_task_step(self, task: Any) -> None:
        if task in self._tasks:
            self._pause()
            self.paused_steps += 1

    def after_task_step(self, task: Any) -> None:
        if self._paused:
            self._resume()

    @contextlib.contextmanager
    def region(self) -> Iterator[None]:
        """The current task's steps run paused until the block ends."""
        task = trio.lowlevel.current_task()
        tasks = self._tasks
        tasks[task] = tasks.get(task, 0) + 1
        self._pause()
        try:
            yield
        finally:
            depth = tasks.pop(task) - 1
            if depth:
                tasks[task] = depth
            else:
                self._resume()
                if self._retiring and not tasks:
                    self._retire()

    def settle(self, normal: Dict[str, int]) -> None:
        """Use ``normal`` as the thresholds from now on, and leave the loop.

        Settled thresholds keep a few calls a second from ever being traced,
        so pausing has nothing left to do, and an instrument costs every
        task's every step: it is removed once no task is inside `region`.
        """
        self.normal = dict(normal)
        if not self._paused:
            self._set_param(**self.normal)
        self._retiring = True
        if _CURRENT.get() is self:
            _CURRENT.set(None)
        if not self._tasks:
            self._retire()

    def _retire(self) -> None:
        if self._installed:
            self._installed = False
            trio.lowlevel.remove_instrument(self)

    def _pause(self) -> None:
        if not self._paused:
            self._set_param(**_NEVER)
            self._paused = True

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self._set_param(**self.normal)


def install(set_param: Optional[Callable[..., None]] = None) -> Optional[JitPause]:
    """Put a `JitPause` in the running Trio loop, on PyPy (or with ``set_param``
    in place of ``pypyjit.set_param``); it, or None where there is no JIT."""
    if set_param is None:
        if platform.python_implementation() != "PyPy":
            return None
        import pypyjit  # type: ignore[import-not-found]

        set_param = pypyjit.set_param
    pause = JitPause(set_param)
    trio.lowlevel.add_instrument(pause)
    pause._installed = True
    _CURRENT.set(pause)
    return pause


def settle(scale: int = SETTLED_SCALE, set_param: Optional[Callable[..., None]] = None) -> bool:
    """From now on, trace only what runs ``scale`` times as often as PyPy's
    defaults ask (0: trace nothing new); False where there is no JIT.

    Call it inside the Trio run, so an installed `JitPause` keeps the new
    thresholds after its paused steps.
    """
    normal = {name: value * scale for name, value in PYPY_DEFAULTS.items()} if scale else dict(_NEVER)
    pause: Optional[JitPause] = _CURRENT.get()
    if pause is not None:
        pause.settle(normal)
        return True
    if set_param is None:
        if platform.python_implementation() != "PyPy":
            return False
        import pypyjit  # type: ignore[import-not-found]

        set_param = pypyjit.set_param
    set_param(**normal)
    return True


def paused() -> ContextManager[None]:
    """A block whose steps run with the JIT paused, when `install` ran in this loop."""
    pause: Optional[JitPause] = _CURRENT.get()
    if pause is None:
        return contextlib.nullcontext()
    return pause.region()
