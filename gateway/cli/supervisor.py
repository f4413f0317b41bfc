"""The supervising parent of ``sluice serve --workers N`` (N > 1).

Theory of operation
-------------------
The parent accepts no connection.  It holds the port with a socket bound
with ``SO_REUSEPORT`` but not listening (:func:`reserve_port`): ``--listen``
with port 0 is resolved once, a port taken by another program is refused at
start, and the port stays the gateway's while workers come and go.  Each
worker (:mod:`gateway.cli.worker`, a fresh interpreter, never a fork) is a whole
gateway listening on that port with ``SO_REUSEPORT``; the kernel spreads new
connections over the listening workers.

Slots.  Worker *i* lives in slot *i*.  The slot's keeper task starts a worker
with the slot's :class:`Generation` (a checked configuration), waits for it to
listen, waits for it to exit, and starts the next one: at once when the exit
was asked for (a reload), after :class:`RestartPolicy`'s backoff when it was
not (a crash).  A worker's per-worker directories (``DIR/worker-<i>`` for the
file sink and the spool) belong to the slot, so a restarted worker finds what
its predecessor left.

Generations.  Generation 0 is the configuration read at start.  SIGHUP reads
it again (flags, ``SLUICE_*`` variables and the ``--config`` file); an
invalid one is logged and ignored.  Settings that cannot change while the
gateway runs (:data:`FIXED_SETTINGS`) keep their running values and are
reported.  Then the slots are rolled one at a time: the old worker drains
(stops accepting, finishes its requests within ``--shutdown-timeout``, closes
idle connections) and exits, the new one starts in its slot, and the next
slot follows once it listens.  Old and new workers of one slot never overlap,
because they share the slot's directories (the spool locks its own); the
other workers serve meanwhile.  If the first new worker fails to start, the
reload is abandoned and its slot goes back to the running generation.

Stopping.  SIGTERM or SIGINT sends every worker one SIGTERM (it drains); a
second signal sends a second (it stops now).  The parent exits once every
worker has.  Workers run in their own sessions, so a terminal's Ctrl-C
reaches only the parent, which forwards it once; if the parent dies anyway,
each worker sees its stdin pipe end and drains (:mod:`gateway.cli.worker`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import trio

from gateway.cli.worker import ERROR_PREFIX, MAX_STATUS_BYTES, READY_LINE, WorkerSpec, worker_dir
from gateway.config import settings as _config
from gateway.config import view as config_view
from gateway.config.secrets import SECRET_FLAG_MARK
from gateway.observe import logs, metrics
from gateway.observe.memory import release_relocations
from sinks.backoff import NO_JITTER, RetryPolicy

__all__ = [
    "FIXED_SETTINGS",
    "Generation",
    "RestartPolicy",
    "START_TIMEOUT",
    "Supervisor",
    "changed_settings",
    "reload_texts",
    "reserve_port",
    "supervise",
    "worker_settings",
]

#: A worker that crashed is started again after this long, doubling for each
#: crash in a row: one crash costs a blink, a crash loop does not spin.
RESTART_FIRST_DELAY = 0.5
#: The longest wait between restarts of a worker that keeps crashing.
RESTART_MAX_DELAY = 30.0
#: A worker that served this long before it exited was not crash-looping: the
#: backoff starts over (systemd's StartLimitIntervalSec: 10 s).
RESTART_STABLE_AFTER = 10.0
#: A worker must listen within this long of its start: PyPy starts in about a
#: second, access control adds one Redis probe (--redis-timeout).  One that
#: takes longer is killed and counts as a failed start.
START_TIMEOUT = 60.0
#: Settings a running gateway keeps on reload: the port is held by the parent
#: and listened on by the workers that keep serving; the metrics directory
#: holds every worker's counts; a spool directory may hold records not sent yet.
FIXED_SETTINGS = ("listen", "metrics_dir", "spool_dir")
#: Settings only the parent uses; workers get the directory in their environment.
_PARENT_ONLY = ("metrics_dir",)


# -- policy (no I/O) --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """How long to wait before starting again a worker that exited unasked."""

    first_delay: float = RESTART_FIRST_DELAY
    max_delay: float = RESTART_MAX_DELAY
    stable_after: float = RESTART_STABLE_AFTER

    @property
    def backoff(self) -> RetryPolicy:
        """The delays: doubling from ``first_delay`` up to ``max_delay``, without jitter."""
        return RetryPolicy(base=self.first_delay, cap=self.max_delay, deadline=None, jitter=NO_JITTER)

    def next(self, failures: int, ran_for: float) -> Tuple[int, float]:
        """``(failures, delay)`` after a worker that ran ``ran_for`` seconds exited.

        ``failures`` counts the crashes in a row before this one (a worker
        that never listened ran 0 seconds).
        """
        failures = 1 if ran_for >= self.stable_after else failures + 1
        return failures, self.backoff.ceiling(failed=failures)


def _texts(origins: Mapping[str, _config.Origin]) -> Dict[str, str]:
    """The settings not left at their defaults, as flag texts."""
    return {name: origin.text for name, origin in origins.items() if origin.source != "default"}


@dataclasses.dataclass(frozen=True)
class Generation:
    """One checked configuration the workers run, numbered from 0 (the one read at start)."""

    number: int
    config: _config.Config
    origins: Mapping[str, _config.Origin]

    @property
    def texts(self) -> Dict[str, str]:
        return _texts(self.origins)


def worker_settings(generation: Generation, index: int, port: int) -> Dict[str, str]:
    """Worker ``index``'s settings as flag texts: the generation's, with its own
    directories, the parent's port and, with access control, its share of
    ``--instance-count``."""
    config = generation.config
    out = {name: text for name, text in generation.texts.items() if name not in _PARENT_ONLY}
    host = config.listen[0]
    out["listen"] = "%s:%d" % ("[%s]" % host if ":" in host else host, port)
    out["data_dir"] = worker_dir(config.data_dir, index)
    if config.ack == "spool":
        out["spool_dir"] = worker_dir(config.spool_dir, index)
    if config.access_control:
        # Fail-open admits 1/--instance-count of a tenant's rates per process
        # while Redis is down; each worker is such a process.
        limit = next(s.maximum for s in _config.SETTINGS if s.name == "instance_count") or 1
        out["instance_count"] = str(int(min(limit, config.instance_count * config.workers)))
    return out


def changed_settings(old: _config.Config, new: _config.Config) -> List[str]:
    """Names of the settings whose values differ."""
    return [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def reload_texts(running: Generation, config: _config.Config,
                 origins: Mapping[str, _config.Origin]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """The new configuration's texts with :data:`FIXED_SETTINGS` kept at their
    running values, and those kept (name -> running text)."""
    texts = _texts(origins)
    kept = {}
    for name in FIXED_SETTINGS:
        if getattr(config, name) != getattr(running.config, name):
            kept[name] = running.origins[name].text
            if name in running.texts:
                texts[name] = running.texts[name]
            else:
                texts.pop(name, None)
    return texts, kept


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``, not listening (raises OSError)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


# -- the driver ---------------------------------------------------------------------------


class _Worker:
    """One worker process, from its start to its exit."""

    __slots__ = ("index", "generation", "process", "status", "ready", "error", "terms", "retired")

    def __init__(self, index: int, generation: int, process: trio.Process,
                 status: trio.lowlevel.FdStream) -> None:
        self.index = index
        self.generation = generation
        self.process = process
        self.status = status
        self.ready = False
        #: The configuration error it reported instead of listening.
        self.error: Optional[str] = None
        #: SIGTERMs sent: 1 drains it, 2 stops it now.
        self.terms = 0
        #: Its exit was asked for (a reload, fewer workers): no restart delay.
        self.retired = False

    @property
    def pid(self) -> int:
        return self.process.pid


class _Slot:
    """Worker index ``index``: the generation its next process runs, and the process now."""

    __slots__ = ("index", "generation", "worker", "failed", "backoff", "done")

    def __init__(self, index: int, generation: Generation) -> None:
        self.index = index
        #: None: the slot is going away (fewer workers after a reload).
        self.generation: Optional[Generation] = generation
        self.worker: Optional[_Worker] = None
        #: The last worker that exited before it listened.
        self.failed: Optional[_Failure] = None
        self.backoff: Optional[trio.CancelScope] = None
        self.done = False


class _Failure(NamedTuple):
    """A worker that exited before it listened: its generation, exit code and error line."""

    generation: int
    code: Optional[int]
    error: Optional[str]


def _exit_status(code: Optional[int]) -> object:
    """An exit code as logged: the number, or the signal's name."""
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return code
    return code


class Supervisor:
    """Runs the workers of one gateway until SIGTERM/SIGINT; :meth:`run` returns the exit status.

    ``load`` reads the configuration again (on SIGHUP) and raises
    :class:`~gateway.config.errors.ConfigError`; ``port`` is the reserved port and
    ``metrics_dir`` the prepared multiprocess metrics directory
    (``private_metrics``: made for this supervisor alone).
    """

    def __init__(self, generation: Generation,
                 load: Callable[[], Tuple[_config.Config, Dict[str, _config.Origin]]],
                 port: int, metrics_dir: str, *, private_metrics: bool = False,
                 python: str = sys.executable, policy: RestartPolicy = RestartPolicy()) -> None:
        self.current = generation
        self._last_number = generation.number
        self.port = port
        self.metrics_dir = metrics_dir
        #: ``metrics_dir`` is this supervisor's to remove (its workers do if it is killed).
        self._private_metrics = private_metrics
        self._load = load
        self._command = [python, "-m", "gateway.cli.worker"]
        self._policy = policy
        self._env = dict(os.environ)
        #: The PyPy restart's mark of a password moved off the command line,
        #: for the warning once every worker listens (workers don't need it).
        self._marks: Dict[str, str] = {}
        mark = self._env.pop(SECRET_FLAG_MARK, None)
        if mark is not None:
            self._marks[SECRET_FLAG_MARK] = mark
        self._env[metrics.MULTIPROC_ENV] = metrics_dir
        self._slots: List[_Slot] = []
        self._stopping = False
        self._changed = trio.Event()
        self._keepers: Optional[trio.Nursery] = None
        self._outer: Optional[trio.Nursery] = None
        self._started = False
        #: The first worker refused the configuration at start (exit status 2): as for
        #: one process, the line ``sluice: error: ...`` says it all, without events.
        self._refused = False
        self._reload_pending = False
        self._reload_scope: Optional[trio.CancelScope] = None
        self._reloading = False
        self._reload_again = False
        self.exit_status = 0

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as outer:
                self._outer = outer
                outer.start_soon(self._watch_signals, signals)
                async with trio.open_nursery() as keepers:
                    self._keepers = keepers
                    await self._start_first()
                # Every keeper returned: every worker exited after a stop.
                outer.cancel_scope.cancel()
        if not self._refused:
            logs.emit("supervisor_stopped", exit_status=self.exit_status)
        return self.exit_status

    # -- state changes, watched by the waits below -------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _settled(self, slot: _Slot, generation: int) -> Tuple[str, Optional[_Failure]]:
        """``("ready", None)`` once a worker of ``generation`` listens in ``slot``;
        ``("failed", failure)`` if it exited before; ``("stopping", None)``."""
        while True:
            worker = slot.worker
            if self._stopping:
                return "stopping", None
            if worker is not None and worker.generation == generation and worker.ready:
                return "ready", None
            if slot.failed is not None and slot.failed.generation == generation:
                return "failed", slot.failed
            await self._changed.wait()

    def _pids(self) -> List[int]:
        return [slot.worker.pid for slot in self._slots if slot.worker is not None]

    def _url(self) -> str:
        config = self.current.config
        host = config.listen[0]
        return "%s://%s:%d" % ("https" if config.tls else "http",
                               "[%s]" % host if ":" in host else host, self.port)

    # -- start and stop ------------------------------------------------------------------

    async def _start_first(self) -> None:
        generation = self.current
        count = generation.config.workers
        self._slots = [_Slot(index, generation) for index in range(count)]
        # Worker 0 alone first: a configuration refused while starting (no
        # AWS region, say) is one error line, not one per worker.
        for batch in ([0], range(1, count)):
            for index in batch:
                self._start_keeper(self._slots[index])
            for index in batch:
                outcome, failure = await self._settled(self._slots[index], generation.number)
                if outcome == "stopping":
                    return
                if failure is not None:
                    self.exit_status = 2 if failure.code == 2 else 1
                    self._refused = failure.code == 2 and failure.error is not None
                    if self._refused:
                        # As a single process would say it: one line, exit status 2.
                        print("sluice: error: %s" % failure.error, file=sys.stderr)
                    else:
                        logs.emit("supervisor_failed", level="error", worker=index,
                                  exit_status=_exit_status(failure.code), error=failure.error,
                                  detail="a worker exited before it listened: stopping")
                    self._stop(None)
                    return
        self._started = True
        if self._reload_pending:
            assert self._outer is not None
            self._outer.start_soon(self._reload, "SIGHUP")
        logs.emit("supervisor_started", url=self._url(), workers=count, pids=self._pids(),
                  pid=os.getpid(), metrics_dir=self.metrics_dir,
                  config=config_view.settings_dict(generation.origins))
        from gateway.cli.serve import start_warnings

        start_warnings(generation.config, dict(generation.origins), self._marks)

    def _start_keeper(self, slot: _Slot) -> None:
        assert self._keepers is not None
        self._keepers.start_soon(self._keep, slot)

    async def _watch_signals(self, signals) -> None:
        assert self._outer is not None
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                if not self._started:
                    self._reload_pending = True  # once every worker listens
                elif not self._stopping:
                    self._outer.start_soon(self._reload, name)
            else:
                self._stop(name)

    def _stop(self, name: Optional[str]) -> None:
        live = [slot.worker for slot in self._slots if slot.worker is not None]
        if not self._stopping:
            self._stopping = True
            if not self._refused:
                logs.emit("supervisor_stopping", signal=name, workers=len(live),
                          shutdown_timeout=self.current.config.shutdown_timeout)
            if self._reload_scope is not None:
                self._reload_scope.cancel()
            for slot in self._slots:
                if slot.backoff is not None:
                    slot.backoff.cancel()
            for worker in live:
                if worker.terms == 0:
                    self._terminate(worker)
            self._notify()
        else:
            logs.emit("supervisor_stopping_now", signal=name, workers=len(live))
            for worker in live:
                while worker.terms < 2:
                    self._terminate(worker)

    def _terminate(self, worker: _Worker) -> None:
        worker.terms += 1
        if worker.process.returncode is None:
            worker.process.send_signal(signal.SIGTERM)

    # -- one slot ------------------------------------------------------------------------

    async def _keep(self, slot: _Slot) -> None:
        """Run ``slot``'s workers one after the other until stopped or the slot goes away."""
        failures = 0
        try:
            while not self._stopping and slot.generation is not None:
                generation = slot.generation
                worker = await self._spawn(slot.index, generation)
                started = trio.current_time()
                code: Optional[int] = 127  # not started: as a shell says "command not found"
                if worker is not None:
                    slot.worker = worker
                    if slot.generation is not generation:
                        self._retire(slot)  # a reload came while it was being started
                    self._notify()
                    try:
                        code = await self._run(worker)
                    finally:
                        slot.worker = None
                    metrics.mark_process_dead(worker.pid, self.metrics_dir)
                ran_for = trio.current_time() - started if worker is not None and worker.ready else 0.0
                if worker is None or not worker.ready:
                    slot.failed = _Failure(generation.number, code, worker.error if worker else None)
                self._notify()
                if not self._started and slot.failed is not None:
                    # A failed first start stops the gateway (_start_first): no restart.
                    while not self._stopping:
                        await self._changed.wait()
                    continue
                fields: Dict[str, Any] = {
                    "worker": slot.index, "pid": worker.pid if worker else None,
                    "generation": generation.number, "exit_status": _exit_status(code),
                    "ran_for": round(ran_for, 3)}
                if worker is not None and worker.error is not None:
                    fields["error"] = worker.error
                if self._stopping or slot.generation is None or (worker is not None and worker.retired):
                    if not self._refused:
                        gone = self._stopping or slot.generation is None
                        logs.emit("worker_exited", **fields, restart_in=None if gone else 0)
                    continue
                failures, delay = self._policy.next(failures, ran_for)
                logs.emit("worker_exited", level="error", **fields, restart_in=delay)
                with trio.CancelScope() as scope:
                    slot.backoff = scope
                    await trio.sleep(delay)
                slot.backoff = None
        finally:
            slot.done = True
            self._notify()

    async def _spawn(self, index: int, generation: Generation) -> Optional[_Worker]:
        """Start worker ``index`` of ``generation``; None if the process could not be started."""
        status_read, status_write = os.pipe()
        spec = WorkerSpec(index, generation.number, worker_settings(generation, index, self.port),
                          status_write, self._private_metrics)
        try:
            process = await trio.lowlevel.open_process(
                self._command, stdin=subprocess.PIPE, pass_fds=(status_write,),
                start_new_session=True, env=self._env)
        except OSError as exc:
            os.close(status_read)
            logs.emit("worker_not_started", level="error", worker=index, error=str(exc))
            return None
        finally:
            os.close(status_write)
        worker = _Worker(index, generation.number, process, trio.lowlevel.FdStream(status_read))
        assert process.stdin is not None
        try:
            await process.stdin.send_all(spec.encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it exited at once: its status ends and the exit is seen below
        return worker

    async def _run(self, worker: _Worker) -> Optional[int]:
        """Wait for ``worker`` to listen, then to exit; its exit code."""
        process = worker.process
        try:
            if self._stopping:
                self._terminate(worker)
            with trio.move_on_after(START_TIMEOUT) as waiting:
                worker.ready, worker.error = await self._wait_ready(worker)
            if waiting.cancelled_caught:
                logs.emit("worker_start_timeout", level="error", worker=worker.index, pid=worker.pid,
                          timeout=START_TIMEOUT)
                process.kill()
            elif worker.ready:
                self._notify()
            return await process.wait()
        except BaseException:
            # Cancelled (the parent is failing): let it drain on its own.
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            raise
        finally:
            worker.status.close()
            if process.stdin is not None:
                process.stdin.close()  # type: ignore[attr-defined]

    @staticmethod
    async def _wait_ready(worker: _Worker) -> Tuple[bool, Optional[str]]:
        """Whether the worker listens, or the error it reported (None: it just exited)."""
        line = b""
        while not line.endswith(b"\n") and len(line) < MAX_STATUS_BYTES:
            chunk = await worker.status.receive_some(MAX_STATUS_BYTES)
            if not chunk:
                break
            line += chunk
        if line == READY_LINE:
            return True, None
        if line.startswith(ERROR_PREFIX):
            return False, line[len(ERROR_PREFIX):].decode("utf-8", "replace").strip()
        return False, None

    # -- reload ----------------------------------------------------------------------------

    async def _reload(self, name: str) -> None:
        if self._reloading:
            self._reload_again = True  # read the configuration again after this reload
            return
        self._reloading = True
        try:
            with trio.CancelScope() as scope:
                self._reload_scope = scope
                again = True
                while again and not self._stopping:
                    self._reload_again = False
                    await self._reload_once(name)
                    again = self._reload_again
        finally:
            self._reloading = False
            self._reload_scope = None

    async def _reload_once(self, name: str) -> None:
        running = self.current

        def load() -> Tuple[_config.Config, Dict[str, _config.Origin], Dict[str, str]]:
            config, origins = self._load()
            texts, kept = reload_texts(running, config, origins)
            # The settings kept must make a valid whole with the new ones.
            return _config.load_with_origins(texts, {}) + (kept,)

        try:
            # Reads the settings file and the TLS files: off the event loop.
            config, origins, kept = await trio.to_thread.run_sync(load)
        except Exception as exc:  # a ConfigError; anything else must not stop the gateway either
            logs.emit("reload_failed", level="error", signal=name,
                      error=str(exc) if isinstance(exc, _config.ConfigError) else repr(exc),
                      detail="configuration refused: generation %d keeps running" % running.number)
            return
        # Numbers are never reused (a failed reload's included): a slot's
        # outcome is matched to its generation by number.
        self._last_number += 1
        new = Generation(self._last_number, config, origins)
        logs.emit("reloading", level="warning" if kept else "info", signal=name, generation=new.number,
                  workers=config.workers, changed=changed_settings(running.config, config),
                  kept={k: config_view.masked(k, v) for k, v in kept.items()})
        if config.log_format != running.config.log_format:
            logs.configure(log_format=config.log_format)
        count = len(self._slots)
        for index in range(max(count, config.workers)):
            slot = self._slots[index] if index < count else None
            if index >= config.workers:
                assert slot is not None
                slot.generation = None
                self._retire(slot)
                while not slot.done:
                    await self._changed.wait()
                continue
            if slot is None:
                slot = _Slot(index, new)
                self._slots.append(slot)
                self._start_keeper(slot)
            else:
                slot.generation = new
                self._retire(slot)
            outcome, failure = await self._settled(slot, new.number)
            if outcome == "stopping":
                return
            if failure is not None and index == 0:
                slot.generation = running
                logs.emit("reload_failed", level="error", signal=name, worker=index,
                          exit_status=_exit_status(failure.code),
                          error=failure.error or "the first worker of generation %d exited before it "
                                                 "listened" % new.number,
                          detail="generation %d keeps running" % running.number)
                return
        del self._slots[config.workers:]
        self.current = new
        logs.emit("reloaded", generation=new.number, workers=config.workers, pids=self._pids())

    def _retire(self, slot: _Slot) -> None:
        worker = slot.worker
        if worker is not None:
            worker.retired = True
            if worker.terms == 0:
                self._terminate(worker)
        elif slot.backoff is not None:
            slot.backoff.cancel()  # waiting to restart a crashed worker: start the new one now


def supervise(config: _config.Config, origins: Dict[str, _config.Origin],
              load: Callable[[], Tuple[_config.Config, Dict[str, _config.Origin]]]) -> int:
    """``sluice serve`` with ``--workers`` above 1: run the workers until stopped; the exit status."""
    host, port = config.listen
    try:
        reservation = reserve_port(host, port)
    except OSError as exc:
        print("sluice: error: --listen %s:%d: %s" % (host, port, exc.strerror or exc), file=sys.stderr)
        return 2
    made = ""
    try:
        directory = config.metrics_dir
        if directory:
            try:
                metrics.prepare_directory(directory)
            except OSError as exc:
                print("sluice: error: --metrics-dir: %s: %s" % (directory, exc.strerror or exc),
                      file=sys.stderr)
                return 2
        else:
            # /metrics must report the whole gateway, whichever worker answers.
            directory = made = tempfile.mkdtemp(prefix="sluice-metrics-")
        supervisor = Supervisor(Generation(0, config, origins), load, reservation.getsockname()[1],
                                directory, private_metrics=bool(made))
        release_relocations()
        return trio.run(supervisor.run)
    finally:
        reservation.close()
        if made:
            shutil.rmtree(made, ignore_errors=True)
