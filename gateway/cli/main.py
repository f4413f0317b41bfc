"""The ``sluice`` command: ``serve`` runs the gateway, ``read`` shows stored records,
``config check`` prints the effective configuration, ``keys`` and ``tenants``
manage API keys and limits in Redis (:mod:`gateway.cli.admin`); ``sluice --version``
prints the version and the interpreter.

While serving, the gateway reports its state changes as events on stderr
(:mod:`gateway.observe.logs`); a configuration refused at start is one plain line,
``sluice: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import trio

from gateway import __version__
from gateway.cli import admin as admin_cli
from gateway.cli import spool as spool_cli
from gateway.cli.serve import (
    SECRET_FLAG_MARK,
    config_error,
    interpreter,
    serve_until_drained,
    start_warnings,
    started_fields,
    tune_serving_process,
    watch_signals,
)
from gateway.config import settings as _config
from gateway.config import view as config_view
from gateway.observe import logs, metrics
from gateway.server import Gateway, open_listener

__all__ = ["main", "version_line"]


def version_line() -> str:
    """``sluice 0.1.0 (PyPy 7.3.11 (Python 3.9.16))``: what ``sluice --version`` prints."""
    return "sluice %s (%s)" % (__version__, interpreter())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Log-ingestion gateway.")
    parser.add_argument("--version", action="version", version=version_line(),
                        help="print the version and the Python interpreter, then exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    serve = commands.add_parser("serve", help="run the gateway",
                                description="Run the gateway. Every flag has a SLUICE_* environment twin "
                                            "and a key of the --config file.")
    _config.add_arguments(serve)
    read = commands.add_parser("read", help="print records stored by the file sink",
                               description="Print the records in a file sink's directory, oldest first "
                                           "(then those of its worker-<i> directories, one per worker "
                                           "of --workers N): by default each record's metadata line "
                                           "with its body size.")
    read.add_argument("directory", help="the file sink's --data-dir")
    read.add_argument("--body", action="store_true",
                      help="print each record whole (metadata line, then the body, then a newline)")
    config_command = commands.add_parser("config", help="check the configuration",
                                         description="Check settings without serving.")
    actions = config_command.add_subparsers(dest="config_command", metavar="ACTION")
    actions.required = True
    check = actions.add_parser(
        "check", help="print the effective configuration",
        description="Print every setting of 'sluice serve' with its value and where it came from "
                    "(default, file, env or flag), secrets masked. Exit status 0 if the "
                    "configuration is valid, else 2 with the error on stderr.")
    _config.add_arguments(check)
    admin_cli.add_admin_commands(commands)
    spool_cli.add_spool_commands(commands)
    return parser


async def _serve(config: _config.Config, origins: Dict[str, _config.Origin]) -> None:
    try:
        listener = await open_listener(*config.listen)
    except OSError as exc:
        raise SystemExit("sluice: error: --listen %s:%d: %s" % (config.listen[0], config.listen[1],
                                                                  exc.strerror or exc)) from None
    gateway = Gateway(config)
    async with trio.open_nursery() as nursery:
        host, port = (await nursery.start(serve_until_drained, gateway, listener, nursery.cancel_scope))[:2]
        # Signals are handled from here on: whoever reads "started" may stop it.
        await nursery.start(watch_signals, gateway, True)
        tune_serving_process(config, gateway, nursery)
        logs.emit("started", **started_fields(config, origins, gateway, host, port))
        # After "started": a start that fails says only why.
        start_warnings(config, origins, os.environ)  # type: ignore[arg-type]
    logs.emit("stopped", requests=gateway.requests, accepted=gateway.accepted, errors=gateway.errors,
              internal_errors=gateway.internal_errors)


def _read(directory: str, body: bool) -> int:
    """Print every record; a damaged segment or record is reported on stderr and skipped.

    Exit status 1 when anything was skipped (or the directory is unreadable).
    """
    from gateway.cli.worker import worker_dirs
    from sinks.envelope import split_record
    from sinks.file import SegmentError, read_records

    out = sys.stdout.buffer
    problems = [0]

    def report(exc: SegmentError) -> None:
        problems[0] += 1
        print("sluice read: %s (skipped)" % exc, file=sys.stderr)

    # With --workers N each worker writes to DIR/worker-<i>: those follow DIR's own.
    try:
        for path in [directory] + worker_dirs(directory):
            for number, record in enumerate(read_records(path, report)):
                if body:
                    out.write(record)
                    out.write(b"\n")
                    continue
                try:
                    meta, data = split_record(record)
                except ValueError as exc:
                    problems[0] += 1
                    print("sluice read: %s: record %d: %s (skipped)" % (path, number, exc),
                          file=sys.stderr)
                    continue
                meta["body_bytes"] = len(data)
                out.write(json.dumps(meta, separators=(",", ":")).encode() + b"\n")
    except BrokenPipeError:  # pragma: no cover - e.g. piped into head
        return 0
    except OSError as exc:
        print("sluice read: %s" % exc, file=sys.stderr)
        return 1
    out.flush()
    return 1 if problems[0] else 0


#: PyPy sizes its young generation from the CPU cache, which on some machines
#: means a nursery of 150 MB and an idle process of over 200 MB.  4 MB halves
#: minor-collection time per request and keeps the process small; an operator's
#: own PYPY_GC_NURSERY always wins.
PYPY_NURSERY = "4MB"
#: Bytes an incremental major-collection step marks; PyPy's default is four
#: times the nursery.  1 MB cut the longest marking step under a 500 req/s load
#: from about 22 ms to under 3 ms, for the same total time in the collector.
PYPY_INCREMENT_STEP = "1MB"
#: How far the heap grows past what the last major collection left before the
#: next one starts (PyPy's default is 1.82).  Most of the heap is the imported
#: modules, so it grew to nearly twice their size between collections: at
#: 1.4 the steady RSS under 500 req/s was about 16 MB lower for the same CPU
#: (1.25 made a third more collections and used more CPU).
PYPY_MAJOR_COLLECT = "1.4"
#: The PyPy garbage-collector settings ``sluice serve`` applies unless the
#: operator set them (the variables are read when the interpreter starts).
PYPY_GC_SETTINGS = {"PYPY_GC_NURSERY": PYPY_NURSERY, "PYPY_GC_INCREMENT_STEP": PYPY_INCREMENT_STEP,
                    "PYPY_GC_MAJOR_COLLECT": PYPY_MAJOR_COLLECT}


def pypy_gc_environment(environ: Mapping[str, str]) -> Dict[str, str]:
    """The PyPy GC variables missing from ``environ``, with our values."""
    return {name: value for name, value in PYPY_GC_SETTINGS.items() if name not in environ}


def argv_without_secrets(argv: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """``argv`` without a ``--redis`` URL that holds a password, and the environment that gives it.

    For the PyPy restart: the new process's command line (shown by ``ps``)
    then holds no password, and the setting's value is the same (a flag and
    its environment twin outrank the settings file alike).
    """
    out: List[str] = []
    environ: Dict[str, str] = {}
    from gateway.config.secrets import has_password

    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        value = None
        if arg == "--redis" and i + 1 < len(argv):
            value, step = argv[i + 1], 2
        elif arg.startswith("--redis="):
            value, step = arg[len("--redis="):], 1
        if value is not None and has_password(value):
            environ["SLUICE_REDIS_URL"] = value
            environ[SECRET_FLAG_MARK] = "--redis"
            i += step
            continue
        out.append(arg)
        i += 1
    return out, environ


def _restore_secret_flag(args: argparse.Namespace, environ: MutableMapping[str, str]) -> None:
    """Undo :func:`argv_without_secrets` after the PyPy restart, inside this process only.

    The URL is a flag again for the settings (errors name ``--redis``, and
    the start warns of a password given on the command line), and the
    environment is as the operator left it.
    """
    if environ.get(SECRET_FLAG_MARK) == "--redis" and getattr(args, "redis", None) is None:
        args.redis = environ.pop("SLUICE_REDIS_URL", None)
        del environ[SECRET_FLAG_MARK]


def _tune_pypy_gc() -> None:
    """On PyPy, restart once with our GC settings unless the operator chose them."""
    if platform.python_implementation() == "PyPy" and "PYPY_GC_NURSERY" not in os.environ:
        os.environ.update(pypy_gc_environment(os.environ))
        argv, secrets = argv_without_secrets(sys.argv[1:])
        os.environ.update(secrets)
        os.execv(sys.executable, [sys.executable, "-m", "gateway"] + argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "read":
        return _read(args.directory, args.body)
    if args.command in ("keys", "tenants"):
        return admin_cli.run(args)
    if args.command == "spool":
        return spool_cli.run(args)
    _restore_secret_flag(args, os.environ)
    try:
        config, origins = _config.load_with_origins(vars(args), os.environ)
    except _config.ConfigError as exc:
        print("sluice: error: %s" % exc, file=sys.stderr)
        return 2
    if args.command == "config":
        sys.stdout.write(config_view.render_check(config_view.rows(origins)))
        return 0
    logs.configure(log_format=config.log_format)
    if config.workers > 1:
        from gateway.cli.supervisor import supervise

        return supervise(config, origins, lambda: _config.load_with_origins(vars(args), os.environ))
    try:
        # Multiprocess metrics: empty --metrics-dir, or join a supervisor's directory.
        config = metrics.configure(config, os.environ)
        trio.run(_serve, config, origins)
    except Exception as exc:
        # A setting found wrong while starting (e.g. no AWS region), maybe
        # inside the nurseries' exception groups.
        found = config_error(exc)
        if found is None:
            raise
        print("sluice: error: %s" % found, file=sys.stderr)
        return 2
    return 0


def entry_point() -> None:  # pragma: no cover - console script
    if sys.argv[1:2] == ["serve"]:
        _tune_pypy_gc()
    sys.exit(main())
