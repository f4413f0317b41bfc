"""The configuration reference, ``docs/configuration.md``, built from :data:`SETTINGS`.

Every setting of ``sluice serve`` is one row of
:data:`gateway.config.settings.SETTINGS`; this module turns those rows into
Markdown so that the reference cannot drift from the code:

    python -m gateway.config.reference            print the page
    python -m gateway.config.reference --write    write docs/configuration.md
    python -m gateway.config.reference --check    exit 1 if docs/configuration.md differs

The page is a summary table (flag, environment variable, settings-file key,
default) and then one section per setting with its description, the kind of
value it takes, its bounds and what it needs.  The output depends only on
:data:`SETTINGS`: no dates, no paths of the machine, and a default that
depends on the machine (``--workers auto``) is rendered as its rule.
``tests/test_docs.py`` checks that the committed page equals :func:`render`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import List, Optional, Sequence

from gateway.config.settings import (
    ACCESS_SETTINGS,
    CONFIG_FILE_ENV,
    SETTINGS,
    SPOOL_SETTINGS,
    Setting,
)

__all__ = ["render", "reference_path", "write", "check", "main"]

#: The generated page, relative to the repository root.
RELATIVE_PATH = os.path.join("docs", "configuration.md")

#: What a value looks like, by the name of the setting's parser.
_VALUE_KINDS = {
    "parse_size": "a size: bytes, or a number with `B`, `KiB`, `MiB`, `GiB` (also `k`, `M`, `G`; "
                  "all binary)",
    "parse_size_or_auto": "`auto`, or a size: bytes, or a number with `B`, `KiB`, `MiB`, `GiB` "
                          "(also `k`, `M`, `G`; all binary)",
    "parse_duration": "a duration: seconds, or a number with `ms`, `s`, `m`, `h`",
    "parse_listen": "`HOST:PORT` (`[::1]:8080` for IPv6)",
    "parse_workers": "a whole number, or `auto`",
    "parse_redis_url": "a Redis URL: `redis://`, `rediss://`, `redis+cluster://`, "
                       "`rediss+cluster://` or `unix://`",
    "parse_key_setting": "`random`, `tenant` or `header:NAME`",
    "_int": "a whole number",
    "_fraction": "a number",
    "_header_name": "an HTTP header name",
    "_stream_name": "a stream name (letters, digits, `_`, `.`, `-`) or an ARN",
}

#: Defaults whose value depends on the machine: the rule, not the value.
_DEFAULT_RULES = {
    "workers": "`auto`: one worker per CPU (`os.cpu_count()`, which in a container may count "
               "the host's CPUs)",
}

#: A flag (``--data-dir``) or an upper-case name (``AWS_DEFAULT_REGION``) in a help text.
_FLAG_IN_TEXT = re.compile(r"(?<![\w`-])--[a-z][a-z0-9-]*")
_NAME_IN_TEXT = re.compile(r"(?<![\w`])[A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9](?![\w`])")

_KiB = 1024
_UNITS = ((1024 ** 3, "GiB"), (1024 ** 2, "MiB"), (_KiB, "KiB"))

_INTRO = """\
<!-- Generated from gateway/config/settings.py by `python -m gateway.config.reference --write`;
     do not edit by hand: tests/test_docs.py checks that this page matches the code. -->

# Configuration reference

Every setting of `sluice serve` is a flag, an environment variable and a key
of the settings file (`--config FILE`). A flag wins over the variable, which
wins over the settings file, which wins over the default. How to write a
settings file, how values are checked and how to see the configuration a
gateway would run with (`sluice config check`):
[Configuration guide](configuration-guide.md).

Sizes take `B`, `KiB`, `MiB`, `GiB` (also `k`, `M`, `G`, all binary);
durations take `ms`, `s`, `m`, `h` (a plain number is seconds). In the
settings file a value may also be a TOML integer, float or boolean, read as
the flag's text would be (`ring_size = 268435456` is `--ring-size 256MiB`).
"""


def _code(text: str) -> str:
    return "`%s`" % text


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


def _anchor(setting: Setting) -> str:
    """The GitHub anchor of the setting's heading (``### `--ring-size` ``)."""
    return setting.flag


def _size(value: float) -> str:
    number = int(value)
    if number == 0:
        return "0"
    for unit, name in _UNITS:
        if number >= unit and number % unit == 0:
            return "%d%s" % (number // unit, name)
    return "%d bytes" % number


def _duration(value: float) -> str:
    seconds = float(value)
    for unit, name in ((3600.0, "h"), (60.0, "m"), (1.0, "s"), (0.001, "ms")):
        count = seconds / unit
        if seconds >= unit and abs(count - round(count)) < 1e-9:
            return "%d%s" % (round(count), name)
    return "%gs" % seconds


def _bound(setting: Setting, value: float) -> str:
    kind = getattr(setting.parse, "__name__", "")
    if kind in ("parse_size", "parse_size_or_auto"):
        return _code(_size(value))
    if kind == "parse_duration":
        return _code(_duration(value))
    if float(value).is_integer():
        return _code("%d" % value)
    return _code("%g" % value)


def _bounds(setting: Setting) -> Optional[str]:
    low, high = setting.minimum, setting.maximum
    if low is not None and high is not None:
        return "from %s to %s" % (_bound(setting, low), _bound(setting, high))
    if low is not None:
        return "at least %s" % _bound(setting, low)
    if high is not None:
        return "at most %s" % _bound(setting, high)
    return None


def _value_kind(setting: Setting) -> Optional[str]:
    if setting.switch:
        return ("a switch: the flag takes no value; the variable and the file key take "
                "`true` or `false`")
    return _VALUE_KINDS.get(getattr(setting.parse, "__name__", ""))


def _default(setting: Setting) -> str:
    if setting.name in _DEFAULT_RULES:
        return _DEFAULT_RULES[setting.name]
    if setting.switch:
        return "off" if setting.default in ("", "false") else "on"
    if not setting.default:
        return "not set"
    return _code(setting.default)


def _short_default(setting: Setting) -> str:
    """The default as the summary table shows it (the rule's first words for a machine default)."""
    if setting.name in _DEFAULT_RULES:
        return "`%s` (one per CPU)" % setting.default
    return _default(setting)


def _needs(setting: Setting) -> Optional[str]:
    if setting.name in ACCESS_SETTINGS:
        return "`--redis`: given without it, the gateway refuses to start"
    if setting.name in SPOOL_SETTINGS:
        return "`--ack spool`: given without it, the gateway refuses to start"
    return None


def _table(settings: Sequence[Setting]) -> List[str]:
    lines = ["| flag | environment variable | settings file key | default |",
             "|---|---|---|---|",
             "| [`--config`](#--config) | `%s` | | not set |" % CONFIG_FILE_ENV]
    for setting in settings:
        lines.append("| [%s](#%s) | %s | %s | %s |" % (
            _code(setting.flag), _anchor(setting), _code(setting.env), _code(setting.name),
            _cell(_short_default(setting))))
    return lines


def _description(setting: Setting, flags: Sequence[str]) -> str:
    """The setting's help as a sentence: flags linked to their sections, variable names as code."""

    def flag(match: re.Match[str]) -> str:
        name = match.group(0)
        if name == setting.flag or name not in flags:
            return _code(name)
        return "[%s](#%s)" % (_code(name), name)

    text = _NAME_IN_TEXT.sub(lambda m: _code(m.group(0)), setting.help)
    text = _FLAG_IN_TEXT.sub(flag, text)
    text = text[:1].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _section(setting: Setting, flags: Sequence[str]) -> List[str]:
    lines = ["### %s" % _code(setting.flag), "", _description(setting, flags), ""]
    facts = [("Environment variable", _code(setting.env)),
             ("Settings file key", _code(setting.name)),
             ("Default", _default(setting))]
    kind = _value_kind(setting)
    if kind:
        facts.append(("Value", kind))
    bounds = _bounds(setting)
    if bounds:
        facts.append(("Bounds", bounds))
    needs = _needs(setting)
    if needs:
        facts.append(("Needs", needs))
    lines.extend("- %s: %s" % (label, text) for label, text in facts)
    lines.append("")
    return lines


def render() -> str:
    """The Markdown of ``docs/configuration.md``, from :data:`SETTINGS` alone."""
    lines = [_INTRO.rstrip("\n"), "", "## Summary", ""]
    lines.extend(_table(SETTINGS))
    lines.extend(["", "## Settings", "", "### `--config`", "",
                  "The settings file: a flat TOML file whose keys are the settings' file keys "
                  "below. Flags and variables win over it.", "",
                  "- Environment variable: %s" % _code(CONFIG_FILE_ENV),
                  "- Settings file key: none",
                  "- Default: not set (no settings file)",
                  "- Value: a path, relative to the gateway's working directory", ""])
    flags = [s.flag for s in SETTINGS] + ["--config"]
    for setting in SETTINGS:
        lines.extend(_section(setting, flags))
    return "\n".join(lines).rstrip("\n") + "\n"


def reference_path() -> str:
    """Where the page lives: ``docs/configuration.md`` under the repository root."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(root, RELATIVE_PATH)


def write(path: Optional[str] = None) -> str:
    """Write the page (to :func:`reference_path` unless ``path`` is given); return the path."""
    target = path or reference_path()
    with open(target, "w", encoding="utf-8", newline="\n") as page:
        page.write(render())
    return target


def check(path: Optional[str] = None) -> bool:
    """Whether the page on disk is exactly what :func:`render` gives."""
    try:
        with open(path or reference_path(), encoding="utf-8", newline="") as page:
            return page.read() == render()
    except FileNotFoundError:
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m gateway.config.reference [--write | --check]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.config.reference",
        description="Print the configuration reference (Markdown) built from the settings table.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="write %s" % RELATIVE_PATH)
    group.add_argument("--check", action="store_true",
                       help="exit 1 if %s differs from what would be written" % RELATIVE_PATH)
    args = parser.parse_args(argv)
    if args.write:
        write()
        print("wrote %s" % RELATIVE_PATH)
        return 0
    if args.check:
        if check():
            return 0
        print("%s is out of date: run `python -m gateway.config.reference --write`" % RELATIVE_PATH,
              file=sys.stderr)
        return 1
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
