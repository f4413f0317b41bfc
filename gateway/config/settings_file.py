"""Settings from a TOML file (``--config FILE``, ``SLUICE_CONFIG``).

The file is flat: each key is a setting's name as in
:data:`gateway.config.settings.SETTINGS`, in snake_case (``ring_size``, the flag
``--ring-size`` without its dashes), and each value a TOML string, integer,
float or boolean.  Values become the same text a flag would carry and go
through the same parsers, so ``ring_size = "256MiB"`` and
``ring_size = 268435456`` mean the same.  Anything else (an unknown key, a
table, an array, a date) is refused with a :class:`~gateway.config.errors.ConfigError`
that names the file and the key.

Reading the file does no parsing of values; :func:`gateway.config.settings.load` does,
after flags and environment variables had their say.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, Optional

from gateway.config.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9 and 3.10
    import tomli as tomllib

__all__ = ["SettingsFile", "read_settings_file", "MAX_FILE_BYTES"]

#: A settings file is a few dozen lines; anything this large is the wrong file.
MAX_FILE_BYTES = 1024 * 1024


class SettingsFile:
    """The settings one file gives: name -> text, as a flag would give it."""

    __slots__ = ("path", "values")

    def __init__(self, path: str, values: Dict[str, str]) -> None:
        self.path = path
        self.values = values

    def where(self, name: str) -> str:
        """How errors name the key ``name`` of this file: ``FILE: name``."""
        return "%s: %s" % (self.path, name)

    def get(self, name: str) -> Optional[str]:
        return self.values.get(name)


def _text(value: Any) -> Optional[str]:
    """The flag text of a TOML value, or None for a type settings never take."""
    if isinstance(value, bool):  # before int: a bool is an int
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return None


def read_settings_file(path: str, known: Iterable[str], *, given_by: str = "--config") -> SettingsFile:
    """Read and check the file at ``path`` against the setting names ``known``.

    ``given_by`` (the flag or variable that named the file) prefixes errors
    about the file as a whole.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError("%s: cannot read %s: %s" % (given_by, path, exc.strerror or exc)) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError("%s: %s is over %d bytes: not a settings file" % (given_by, path, MAX_FILE_BYTES))
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: not UTF-8 text (%s)" % (path, exc.reason)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("%s: not valid TOML: %s" % (path, exc)) from None
    names = set(known)
    values: Dict[str, str] = {}
    for key, value in document.items():
        if key not in names:
            spelled = key.replace("-", "_")
            hint = (" (keys are snake_case: %s)" % spelled if spelled in names
                    else " (see sluice serve --help for the settings)")
            raise ConfigError("%s: unknown setting %r%s" % (path, key, hint))
        text = _text(value)
        if text is None:
            raise ConfigError("%s: %s: must be a string, number or boolean, not a %s"
                              % (path, key, _toml_type(value)))
        values[key] = text
    return SettingsFile(path, values)


def _toml_type(value: Any) -> str:
    if isinstance(value, dict):
        return "table"
    if isinstance(value, list):
        return "array"
    return "date or time"
