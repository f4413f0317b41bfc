"""Configuration: every setting, its default, its bound and where it comes from.

Each setting is one row of :data:`SETTINGS`: a flag (``--ring-size``), the
matching environment variable (``SLUICE_RING_SIZE``), a parser for its text
form, a default, and the reason for the default.  Flags win over environment
variables, which win over defaults.  :func:`load` returns a frozen
:class:`Config` or raises :class:`ConfigError` whose message starts with the
flag it is about, so the CLI can print it as one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .envelope import MAX_ENVELOPE_BYTES
from .http import DEFAULT_MAX_HEAD

__all__ = ["Config", "ConfigError", "SETTINGS", "load", "add_arguments", "parse_size", "parse_duration"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class ConfigError(ValueError):
    """A setting's value is not acceptable; the message names the flag."""


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """Bytes from ``"32MiB"``, ``"64k"``, ``"1048576"`` (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError("not a size: %r (use e.g. 1048576, 64KiB, 32MiB)" % text)
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_duration(text: str) -> float:
    """Seconds from ``"10s"``, ``"500ms"``, ``"2m"``, ``"1.5"``."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError("not a duration: %r (use e.g. 10s, 500ms, 2m)" % text)
    return float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "").lower()]


def parse_listen(text: str) -> Tuple[str, int]:
    """``(host, port)`` from ``"127.0.0.1:8080"`` or ``"[::1]:8080"``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError("not HOST:PORT: %r" % text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if number > 65535:
        raise ValueError("port out of range: %d" % number)
    return host, number


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError("must be one of %s, not %r" % (", ".join(choices), text))
        return text
    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not a whole number: %r" % text) from None


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configurable value."""

    name: str
    parse: Callable[[str], object]
    default: str
    help: str
    minimum: Optional[float] = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "SLUICE_" + self.name.upper()


SETTINGS: List[Setting] = [
    Setting("listen", parse_listen, "127.0.0.1:8080",
            "address to listen on, HOST:PORT (port 0 picks a free port)"),
    Setting("sink", _choice("file", "null"), "file",
            "where records go: file (segment files in --data-dir) or null (dropped)"),
    Setting("data_dir", str, "./sluice-data", "directory of the file sink's segments"),
    Setting("ring_size", parse_size, "32MiB",
            "bytes preallocated for bodies in flight; at least twice the largest record",
            minimum=64 * KiB),
    Setting("max_body", parse_size, "1MiB",
            "largest body accepted; larger ones get 413 before they are read", minimum=0),
    Setting("max_head", parse_size, str(DEFAULT_MAX_HEAD),
            "largest request head (request line + headers); larger gets 431 (h11 and node.js: 16KiB)",
            minimum=1 * KiB),
    Setting("head_timeout", parse_duration, "10s",
            "time allowed for a request head once its first byte arrived; then 408",
            minimum=0.001),
    Setting("body_timeout", parse_duration, "60s",
            "time allowed for a whole body once its head arrived; then 408 (nginx: 60s)",
            minimum=0.001),
    Setting("idle_timeout", parse_duration, "75s",
            "keep-alive connections idle this long are closed; keep it above a load "
            "balancer's idle timeout (nginx: 75s)", minimum=0.001),
    Setting("max_connections", _int, "1024",
            "open connections at most; more get 503 and are closed (nginx worker_connections)",
            minimum=1),
    Setting("ring_wait", parse_duration, "1s",
            "how long a request waits for ring space before 503 + Retry-After", minimum=0),
    Setting("shutdown_timeout", parse_duration, "30s",
            "on SIGTERM/SIGINT, how long in-flight requests may take before they are cut",
            minimum=0),
    Setting("segment_size", parse_size, "128MiB",
            "file sink: a segment file is closed and a new one started past this size",
            minimum=64 * KiB),
    Setting("flush_interval", parse_duration, "50ms",
            "file sink: queued records are written at least this often", minimum=0.001),
]

_BY_NAME: Dict[str, Setting] = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    """The effective configuration of one gateway process."""

    listen: Tuple[str, int]
    sink: str
    data_dir: str
    ring_size: int
    max_body: int
    max_head: int
    head_timeout: float
    body_timeout: float
    idle_timeout: float
    max_connections: int
    ring_wait: float
    shutdown_timeout: float
    segment_size: int
    flush_interval: float

    @property
    def max_record(self) -> int:
        """Largest record a body of ``max_body`` can make (envelope included)."""
        return self.max_body + MAX_ENVELOPE_BYTES

    def describe(self) -> str:
        """One line for the startup message."""
        host, port = self.listen
        where = "[%s]" % host if ":" in host else host
        sink = self.sink if self.sink != "file" else "file (%s)" % self.data_dir
        return "listening on http://%s:%d, sink %s" % (where, port, sink)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every setting; defaults stay None so env can fill in."""
    for setting in SETTINGS:
        parser.add_argument(
            setting.flag, dest=setting.name, default=None, metavar=setting.name.split("_")[-1].upper(),
            help="%s (env %s, default %s)" % (setting.help, setting.env, setting.default),
        )


def load(flags: Mapping[str, Optional[str]], environ: Mapping[str, str]) -> Config:
    """The configuration from flag values (by setting name) and the environment."""
    values: Dict[str, object] = {}
    for setting in SETTINGS:
        text = flags.get(setting.name)
        source = setting.flag
        if text is None:
            text = environ.get(setting.env)
            source = setting.env
        if text is None:
            text = setting.default
            source = setting.flag
        try:
            value = setting.parse(text)
        except ValueError as exc:
            raise ConfigError("%s: %s" % (source, exc)) from None
        if setting.minimum is not None and value < setting.minimum:  # type: ignore[operator]
            raise ConfigError("%s: must be at least %s, got %r" % (source, setting.minimum, text))
        values[setting.name] = value
    config = Config(**values)  # type: ignore[arg-type]
    _check(config)
    return config


def _check(config: Config) -> None:
    if config.ring_size < 2 * config.max_record:
        raise ConfigError(
            "--ring-size: must hold at least two of the largest records (2 x %d bytes for "
            "--max-body %d), got %d" % (config.max_record, config.max_body, config.ring_size))


def from_args(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Parse ``argv`` (flags only) and ``environ``; a convenience for tests."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    namespace, extra = parser.parse_known_args(list(argv))
    if extra:
        raise ConfigError("%s: unknown option" % extra[0])
    return load(vars(namespace), environ)
