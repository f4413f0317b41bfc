"""Serving one gateway process: shared by ``sluice serve`` and each worker of ``--workers N``.

:func:`serve_until_drained` runs the server until it has drained,
:func:`watch_signals` turns SIGTERM/SIGINT (and SIGHUP) into draining,
:func:`started_fields` is what the ``started`` event says, and
:func:`config_error` finds a configuration error a start-up raised.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
from typing import Any, Dict, Optional

import trio

from gateway.config import settings as _config
from gateway.config import view as config_view
from gateway.config.errors import ConfigError
from gateway.config.secrets import SECRET_FLAG_MARK
from gateway.observe import logs
from gateway.observe.memory import (
    freeze_startup_heap,
    malloc_trimmer,
    release_relocations,
    trim_after_collections,
)
from gateway.server import Gateway
from sinks import jit as sink_jit
from sinks.aws.sink import linger_of
from sinks.errors import SinkConfigError

__all__ = ["serve_until_drained", "watch_signals", "started_fields", "config_error",
           "interpreter", "start_warnings", "pause_sink_jit", "settle_jit", "trim_malloc",
           "tune_serving_process", "trim_ring", "SECRET_FLAG_MARK"]

#: Seconds between two looks at the accepted count before the JIT settles.
JIT_SETTLE_POLL = 1.0
#: ``--sink-jit auto`` pauses the JIT in the sink's calls when batches linger
#: this long or more, that is a few calls a second: compiling them then
#: stalls the loop for little gain.  With --ack kinesis (10 ms, fifty calls a
#: second at the design load) compiled calls cost about 10% of a core less.
PAUSE_LINGER = 0.1
#: Most bytes of the ring one trim (every ``--ring-trim``) gives back: about
#: 0.25 ms of the loop, so a 128 MiB ring that filled in an outage shrinks
#: back within about five minutes at the default 10 s.
RING_TRIM_MOST = 4 * 1024 * 1024


def started_fields(config: _config.Config, origins: Dict[str, _config.Origin], gateway: Gateway,
                   host: str, port: int) -> Dict[str, Any]:
    """The fields of the ``started`` event of a gateway listening on ``host:port``."""
    shown = "[%s]" % host if ":" in host else host
    sink = gateway.sink.describe() if config.sink != "file" or config.ack == "spool" else (
        "file (%s)" % os.path.abspath(config.data_dir))
    fields: Dict[str, Any] = {}
    if gateway.sink.max_record_bytes is not None:
        fields["max_record_bytes"] = gateway.sink.max_record_bytes
    return dict(url="%s://%s:%d" % ("https" if config.tls else "http", shown, port),
                sink=sink, **fields, access=_describe_access(config), tls=config.tls,
                interpreter=interpreter(), pid=os.getpid(),
                config=config_view.settings_dict(origins))




def pause_sink_jit(config: _config.Config) -> bool:
    """With ``--sink-jit pause`` on PyPy (or ``auto`` and batches lingering
    :data:`PAUSE_LINGER` or more), run the sink's calls with the JIT's
    tracing paused (`sinks.jit`); True when that was set up."""
    mode = config.sink_jit
    if mode == "auto":
        mode = "pause" if linger_of(config) >= PAUSE_LINGER else "compile"
    return mode == "pause" and sink_jit.install() is not None


def settle_jit(config: _config.Config, gateway: Gateway, nursery: trio.Nursery) -> bool:
    """On PyPy with ``--jit-settle N``, settle the JIT (:func:`sinks.jit.settle`) once
    ``N`` requests were accepted, from a task of ``nursery``; True when that was started."""
    if not config.jit_settle or platform.python_implementation() != "PyPy":
        return False
    nursery.start_soon(_settle_jit_after, gateway, config.jit_settle)
    return True


async def _settle_jit_after(gateway: Gateway, requests: int) -> None:
    while gateway.accepted < requests:
        await trio.sleep(JIT_SETTLE_POLL)
    sink_jit.settle()
    logs.emit("jit_settled", requests=gateway.accepted, scale=sink_jit.SETTLED_SCALE)


def trim_malloc(config: _config.Config, gateway: Gateway, nursery: trio.Nursery) -> bool:
    """With ``--malloc-trim on``, hand malloc's free pages back after each major
    collection, in a task of ``nursery``; True when that was started."""
    trim = malloc_trimmer() if config.malloc_trim == "on" else None
    if trim is None:
        return False
    nursery.start_soon(trim_after_collections, lambda: gateway.telemetry.gc.major.count, trim)
    return True


async def trim_ring(gateway: Gateway, every: float, most: int = RING_TRIM_MOST) -> None:
    """Every ``every`` seconds, give back the ring's pages unused since the last time."""
    while True:
        await trio.sleep(every)
        gateway.ring.trim(most)


def tune_serving_process(config: _config.Config, gateway: Gateway, nursery: trio.Nursery) -> None:
    """What a serving process (a gateway, or one worker) does to itself once it
    serves: freeze its start-up heap (CPython), give back its libraries'
    relocation pages, pause the JIT in the sink's calls and settle it (PyPy),
    and start trimming malloc and the ring, each as ``config`` says."""
    freeze_startup_heap()
    release_relocations()
    pause_sink_jit(config)
    settle_jit(config, gateway, nursery)
    trim_malloc(config, gateway, nursery)
    if config.ring_trim:
        nursery.start_soon(trim_ring, gateway, config.ring_trim)


def start_warnings(config: _config.Config, origins: Dict[str, _config.Origin],
                   environ: Dict[str, str], euid: Optional[int] = None) -> None:
    """Warn once at start about a password on the command line and about running as root."""
    from gateway.config.secrets import has_password

    origin = origins.get("redis")
    moved = environ.pop(SECRET_FLAG_MARK, None)
    if config.redis and has_password(config.redis) and (
            moved or (origin is not None and origin.source == "flag")):
        logs.emit("secret_on_command_line", level="warning", setting="--redis",
                  detail="the Redis password given with --redis is visible to other local users "
                         "(ps, /proc/PID/cmdline): give the URL in SLUICE_REDIS_URL or the "
                         "--config file instead")
    if euid is None:
        euid = os.geteuid() if hasattr(os, "geteuid") else -1
    if euid == 0:
        logs.emit("running_as_root", level="warning",
                  detail="sluice needs no privileges: run it as an unprivileged user, so a flaw "
                         "in it cannot reach the rest of the machine (a port below 1024 needs "
                         "only CAP_NET_BIND_SERVICE)")


def interpreter() -> str:
    """``CPython 3.11.7`` or ``PyPy 7.3.11 (Python 3.9.16)``."""
    name, version = platform.python_implementation(), platform.python_version()
    pypy = getattr(sys, "pypy_version_info", None)
    if pypy is not None:
        return "%s %d.%d.%d (Python %s)" % (name, pypy.major, pypy.minor, pypy.micro, version)
    return "%s %s" % (name, version)


def _describe_access(config: _config.Config) -> str:
    """The startup line's part about access control; never shows a password."""
    if not config.access_control:
        return "access control off (no --redis)"
    from gateway.access.keystore import redacted_url, split_redis_url

    _, cluster = split_redis_url(config.redis, config.redis_cluster)
    return "access control on (Redis%s %s, on failure %s)" % (
        " Cluster" if cluster else "", redacted_url(config.redis), config.on_redis_failure)


async def serve_until_drained(gateway: Gateway, listener, done: trio.CancelScope, *,
                               task_status=trio.TASK_STATUS_IGNORED) -> None:
    await gateway.serve([listener], task_status=task_status)
    done.cancel()


async def watch_signals(gateway: Gateway, hangup: bool = False, fields: Optional[Dict[str, Any]] = None,
                         *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """SIGTERM/SIGINT: drain, then stop now.  With ``hangup`` (a single process,
    ``--workers 1``) SIGHUP reloads the TLS certificate and key (other
    settings need a restart, which the event says) instead of ending the
    process.  ``fields`` are added to the events (a worker's index)."""
    fields = fields or {}
    watched = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hangup else ())
    with trio.open_signal_receiver(*watched) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                await _hangup(gateway, name)
            elif gateway.draining:
                logs.emit("stopping_now", signal=name, connections=gateway.connections, **fields)
                gateway.stop_now()
            else:
                logs.emit("stopping", signal=name, connections=gateway.connections,
                          shutdown_timeout=gateway.config.shutdown_timeout, **fields)
                gateway.drain()


async def _hangup(gateway: Gateway, name: str) -> None:
    """SIGHUP in a single process: a renewed certificate is taken up; the rest needs a restart."""
    other = ("a single process (--workers 1) reads its other settings only at start: restart "
             "it to apply them, or run --workers 2 or more to reload on SIGHUP")
    if gateway.tls is None:
        logs.emit("reload_unsupported", level="warning", signal=name, detail=other)
        return
    from gateway.http.tls import CertificateError

    try:
        await gateway.reload_tls()
    except CertificateError as exc:
        logs.emit("tls_reload_failed", level="error", signal=name, error=str(exc),
                  detail="still serving the certificate loaded before")
        return
    logs.emit("tls_reloaded", signal=name, cert=gateway.config.tls_cert,
              detail="new connections get the certificate read now; " + other)


def config_error(exc: BaseException) -> Optional[BaseException]:
    """The configuration error inside ``exc`` (maybe in exception groups), or None.

    A sink refuses a setting it finds wrong while starting (no AWS region, a
    locked spool directory) with a :class:`~sinks.errors.SinkConfigError`.
    """
    if isinstance(exc, (ConfigError, SinkConfigError)):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = config_error(inner)
        if found is not None:
            return found
    return None
