"""The ``sluice`` command: ``serve`` runs the gateway, ``read`` shows stored records,
``keys`` and ``tenants`` manage API keys and limits in Redis (:mod:`gateway.admin_cli`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
from typing import Optional, Sequence

import trio

from . import admin_cli
from . import config as _config
from .server import Gateway, open_listener

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Log-ingestion gateway.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    serve = commands.add_parser("serve", help="run the gateway",
                                description="Run the gateway. Every flag has a SLUICE_* environment twin.")
    _config.add_arguments(serve)
    read = commands.add_parser("read", help="print records stored by the file sink",
                               description="Print the records in a file sink's directory, oldest first: "
                                           "by default each record's metadata line with its body size.")
    read.add_argument("directory", help="the file sink's --data-dir")
    read.add_argument("--body", action="store_true",
                      help="print each record whole (metadata line, then the body, then a newline)")
    admin_cli.add_admin_commands(commands)
    return parser


async def _serve(config: _config.Config) -> None:
    try:
        listener = await open_listener(*config.listen)
    except OSError as exc:
        raise SystemExit("sluice: error: --listen %s:%d: %s" % (config.listen[0], config.listen[1],
                                                                  exc.strerror or exc)) from None
    gateway = Gateway(config)
    async with trio.open_nursery() as nursery:
        host, port = (await nursery.start(_serve_until_drained, gateway, listener, nursery.cancel_scope))[:2]
        shown = "[%s]" % host if ":" in host else host
        sink = gateway.sink.describe() if config.sink != "file" else "file (%s)" % os.path.abspath(
            config.data_dir)
        print("sluice: listening on http://%s:%d, sink %s, %s" % (
            shown, port, sink, _describe_access(config)), file=sys.stderr, flush=True)
        nursery.start_soon(_watch_signals, gateway)
    print("sluice: stopped", file=sys.stderr, flush=True)


def _describe_access(config: _config.Config) -> str:
    """The startup line's part about access control; never shows a password."""
    if not config.access_control:
        return "access control off (no --redis)"
    from .keystore import redacted_url, split_redis_url

    _, cluster = split_redis_url(config.redis, config.redis_cluster)
    return "access control on (Redis%s %s, on failure %s)" % (
        " Cluster" if cluster else "", redacted_url(config.redis), config.on_redis_failure)


async def _serve_until_drained(gateway: Gateway, listener, done: trio.CancelScope, *,
                               task_status=trio.TASK_STATUS_IGNORED) -> None:
    await gateway.serve([listener], task_status=task_status)
    done.cancel()


async def _watch_signals(gateway: Gateway) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if gateway.draining:
                gateway.stop_now()
            else:
                print("sluice: shutting down", file=sys.stderr, flush=True)
                gateway.drain()


def _read(directory: str, body: bool) -> int:
    from sinks.file import SegmentError, read_records

    from .envelope import split_record

    out = sys.stdout.buffer
    try:
        for record in read_records(directory):
            meta, data = split_record(record)
            if body:
                out.write(record)
                out.write(b"\n")
            else:
                meta["body_bytes"] = len(data)
                out.write(json.dumps(meta, separators=(",", ":")).encode() + b"\n")
    except (SegmentError, OSError) as exc:
        print("sluice read: %s" % exc, file=sys.stderr)
        return 1
    except BrokenPipeError:  # pragma: no cover - e.g. piped into head
        return 0
    out.flush()
    return 0


#: PyPy sizes its young generation from the CPU cache, which on some machines
#: means a nursery of 150 MB and an idle process of over 200 MB.  4 MB halves
#: minor-collection time per request and keeps the process small; an operator's
#: own PYPY_GC_NURSERY always wins.
PYPY_NURSERY = "4MB"


def _tune_pypy_gc() -> None:
    """On PyPy, restart once with a small nursery unless one was chosen."""
    if platform.python_implementation() == "PyPy" and "PYPY_GC_NURSERY" not in os.environ:
        os.environ["PYPY_GC_NURSERY"] = PYPY_NURSERY
        os.execv(sys.executable, [sys.executable, "-m", "gateway"] + sys.argv[1:])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "read":
        return _read(args.directory, args.body)
    if args.command in ("keys", "tenants"):
        return admin_cli.run(args)
    try:
        config = _config.load(vars(args), os.environ)
    except _config.ConfigError as exc:
        print("sluice: error: %s" % exc, file=sys.stderr)
        return 2
    try:
        trio.run(_serve, config)
    except Exception as exc:
        # A setting found wrong while starting (e.g. no AWS region), maybe
        # inside the nurseries' exception groups.
        found = _config_error(exc)
        if found is None:
            raise
        print("sluice: error: %s" % found, file=sys.stderr)
        return 2
    return 0


def _config_error(exc: BaseException) -> Optional[_config.ConfigError]:
    if isinstance(exc, _config.ConfigError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _config_error(inner)
        if found is not None:
            return found
    return None


def entry_point() -> None:  # pragma: no cover - console script
    if sys.argv[1:2] == ["serve"]:
        _tune_pypy_gc()
    sys.exit(main())
