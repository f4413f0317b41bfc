"""One worker of a supervised gateway: ``python -m gateway.cli.worker``.

``sluice serve --workers N`` (N > 1) runs a supervisor (:mod:`gateway.cli.supervisor`)
that starts N of these.  Each is a whole gateway (its own ring, sink, access
control and listening socket, bound with ``SO_REUSEPORT`` to the one
``--listen`` address) and is started with:

- stdin: a pipe whose first line is the worker's :class:`WorkerSpec` (JSON:
  its index, its generation and its settings as flag texts, already checked
  by the supervisor).  Settings go through a pipe, not the command line or
  the environment, because ``--redis`` may hold a password.  The pipe then
  stays open as a lifeline: end of file means the supervisor is gone (even
  ``kill -9``), and the worker drains and exits rather than serve alone.
- the status descriptor named in the spec: the worker writes
  :data:`READY_LINE` there once it listens, or :data:`ERROR_PREFIX` and the
  message when it refuses its configuration (then exits with status 2), and
  closes it.  End of file before either is a failed start (a crash).
- ``PROMETHEUS_MULTIPROC_DIR`` in its environment, so ``/metrics`` reports
  every worker (:func:`gateway.observe.metrics.configure`).  When the supervisor made
  that directory for itself (no ``--metrics-dir``) it removes it at exit; if
  it was killed instead, the last worker to leave removes it: every worker
  holds a shared ``flock`` on :data:`METRICS_LOCK` there, and one that can
  turn its lock exclusive is the last.

SIGTERM/SIGINT drain the worker and a second one stops it now, as for
``sluice serve``; SIGHUP is ignored (reloading is the supervisor's job, and a
terminal hangup must not stop a worker).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import sys
from typing import Dict, List

import trio

from gateway.cli.serve import (
    config_error,
    serve_until_drained,
    started_fields,
    tune_serving_process,
    watch_signals,
)
from gateway.config import settings as _config
from gateway.observe import logs, metrics
from gateway.server import Gateway, open_listener

__all__ = ["WorkerSpec", "READY_LINE", "ERROR_PREFIX", "MAX_STATUS_BYTES", "WORKER_DIR_PREFIX",
           "worker_dir", "worker_dirs", "main"]

#: What a worker writes on its status descriptor once it listens.
READY_LINE = b"ready\n"
#: ... or, before this, the error that stopped it from listening.
ERROR_PREFIX = b"error: "
#: A status line is at most this long: an error message is one line.
MAX_STATUS_BYTES = 4096
#: A spec is a few dozen short settings; a longer first line is not one.
MAX_SPEC_BYTES = 1024 * 1024
#: In a private metrics directory: locked shared by each worker while it runs.
METRICS_LOCK = "workers.lock"
#: Per-worker directories (the file sink's --data-dir, the spool's --spool-dir)
#: are DIR/worker-<index>: a restarted worker takes its predecessor's.
WORKER_DIR_PREFIX = "worker-"
_WORKER_DIR = re.compile(r"^%s(\d+)$" % WORKER_DIR_PREFIX)


def worker_dir(base: str, index: int) -> str:
    """Worker ``index``'s own directory under ``base``."""
    return os.path.join(base, "%s%d" % (WORKER_DIR_PREFIX, index))


def worker_dirs(base: str) -> List[str]:
    """The worker directories that exist under ``base``, by index."""
    try:
        names = os.listdir(base)
    except OSError:
        return []
    found = []
    for name in names:
        match = _WORKER_DIR.match(name)
        if match and os.path.isdir(os.path.join(base, name)):
            found.append((int(match.group(1)), os.path.join(base, name)))
    return [path for _, path in sorted(found)]


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor tells a worker: its place and its settings.

    ``settings`` maps setting names to the text a flag would carry (only
    those not left at their defaults); ``status_fd`` is the descriptor to
    write :data:`READY_LINE` to.
    """

    index: int
    generation: int
    settings: Dict[str, str]
    status_fd: int
    #: The metrics directory is the supervisor's own, to remove after it.
    private_metrics: bool = False

    def encode(self) -> bytes:
        """One JSON line."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> WorkerSpec:
        """The spec in ``line``; ValueError if it is not one."""
        doc = json.loads(line)
        if not isinstance(doc, dict) or set(doc) != {f.name for f in dataclasses.fields(cls)}:
            raise ValueError("not a worker spec")
        settings = doc["settings"]
        if not isinstance(settings, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in settings.items()):
            raise ValueError("worker spec: settings must map names to strings")
        numbers = (doc["index"], doc["generation"], doc["status_fd"])
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise ValueError("worker spec: index, generation and status_fd must be whole numbers")
        if not isinstance(doc["private_metrics"], bool):
            raise ValueError("worker spec: private_metrics must be true or false")
        return cls(doc["index"], doc["generation"], settings, doc["status_fd"], doc["private_metrics"])


class _Status:
    """The status descriptor: one line, then closed (its number may then be reused)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def report(self, line: bytes) -> bool:
        """Write ``line`` and close, once; whether the supervisor got it."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return False
        try:
            os.write(fd, line)
            return True
        except OSError:
            return False  # the supervisor is gone: the lifeline ends this worker
        finally:
            os.close(fd)


class _Lifeline:
    """Whether the supervisor was lost (stdin ended before this worker was stopped)."""

    lost = False


async def _watch_supervisor(gateway: Gateway, spec: WorkerSpec, lifeline: _Lifeline) -> None:
    """Drain when stdin ends: the supervisor exited without stopping this worker."""
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    try:
        while await stream.receive_some(4096):
            pass  # the supervisor writes nothing after the spec
    finally:
        await stream.aclose()
    lifeline.lost = True
    logs.emit("supervisor_lost", level="error", worker=spec.index, pid=os.getpid(),
              detail="the supervisor exited: draining and exiting")
    gateway.drain()


async def _serve(config: _config.Config, origins: Dict[str, _config.Origin], spec: WorkerSpec,
                 status: _Status, lifeline: _Lifeline) -> None:
    try:
        listener = await open_listener(*config.listen, reuse_port=True)
    except OSError as exc:
        raise _config.ConfigError("--listen %s:%d: %s" % (config.listen[0], config.listen[1],
                                                          exc.strerror or exc)) from None
    gateway = Gateway(config)
    async with trio.open_nursery() as nursery:
        host, port = (await nursery.start(serve_until_drained, gateway, listener,
                                          nursery.cancel_scope))[:2]
        await nursery.start(watch_signals, gateway, False, {"worker": spec.index})
        nursery.start_soon(_watch_supervisor, gateway, spec, lifeline)
        tune_serving_process(config, gateway, nursery)
        # "started" before "ready": the supervisor's events follow its workers'.
        logs.emit("started", worker=spec.index, generation=spec.generation,
                  **started_fields(config, origins, gateway, host, port))
        status.report(READY_LINE)
    logs.emit("stopped", worker=spec.index, requests=gateway.requests, accepted=gateway.accepted,
              errors=gateway.errors, internal_errors=gateway.internal_errors)


def main() -> int:
    """Read the spec from stdin and serve; the exit status."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    line = sys.stdin.buffer.readline(MAX_SPEC_BYTES)
    try:
        spec = WorkerSpec.decode(line)
    except ValueError as exc:
        print("sluice worker: error: %s (started by sluice serve --workers N, not by hand)" % exc,
              file=sys.stderr)
        return 2
    status = _Status(spec.status_fd)
    lifeline = _Lifeline()
    lock = -1
    try:
        config, origins = _config.load_with_origins(spec.settings, {})
        logs.configure(log_format=config.log_format)
        config = metrics.configure(config, os.environ)
        if spec.private_metrics and config.metrics_dir:
            lock = _hold_metrics_lock(config.metrics_dir)
        trio.run(_serve, config, origins, spec, status, lifeline)
        if lifeline.lost and lock >= 0:
            _remove_if_last(config.metrics_dir, lock)
    except Exception as exc:
        found = config_error(exc)
        if found is None:
            raise
        # The supervisor logs it (or prints it, if the gateway is just starting).
        message = " ".join(str(found).split())[:MAX_STATUS_BYTES - 64]
        if not status.report(ERROR_PREFIX + message.encode("utf-8", "replace") + b"\n"):
            print("sluice: error: %s" % found, file=sys.stderr)
        return 2
    finally:
        if lock >= 0:
            os.close(lock)
    return 0


def _hold_metrics_lock(directory: str) -> int:
    """A descriptor holding a shared lock on the directory's :data:`METRICS_LOCK` (-1 if none)."""
    try:
        fd = os.open(os.path.join(directory, METRICS_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return -1
    return fd


def _remove_if_last(directory: str, lock: int) -> None:
    """The supervisor was lost: remove its private metrics directory if no other worker runs."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # another worker still holds its shared lock: it will remove the directory
    shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
