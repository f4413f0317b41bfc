"""The effective configuration as operators see it: ``sluice config check`` and the startup event.

Every setting is shown as the text it was given (or its default) with where
it came from, secrets masked: the password of a Redis URL (or of any other
URL setting) becomes ``***``, and a setting whose name says it is a secret is
shown only as ``***``.
"""

from __future__ import annotations

import json
from typing import Dict, List, Mapping, NamedTuple

from gateway.config.secrets import redacted_url
from gateway.config.settings import SETTINGS, Origin

__all__ = ["Row", "masked", "rows", "settings_dict", "render_check"]

#: Settings holding URLs that may carry a password in their user info or query.
_URL_SETTINGS = ("redis", "endpoint_url")
#: Words in a setting's name that make its whole value secret.
_SECRET_WORDS = ("secret", "password", "token", "credential")


class Row(NamedTuple):
    """One setting of the effective configuration."""

    name: str
    value: str  # masked
    source: str  # default, file, env or flag
    where: str  # the flag, the variable or FILE: key


def masked(name: str, text: str) -> str:
    """``text``, the value of setting ``name``, safe to print."""
    if not text:
        return text
    if any(word in name for word in _SECRET_WORDS):
        return "***"
    if name in _URL_SETTINGS:
        return redacted_url(text)
    return text


def rows(origins: Mapping[str, Origin]) -> List[Row]:
    """Every setting in :data:`~gateway.config.SETTINGS` order, masked."""
    out = []
    for setting in SETTINGS:
        origin = origins[setting.name]
        out.append(Row(setting.name, masked(setting.name, origin.text), origin.source, origin.where))
    return out


def settings_dict(origins: Mapping[str, Origin]) -> Dict[str, str]:
    """Setting name -> masked text, for the startup event."""
    return {row.name: row.value for row in rows(origins)}


def render_check(table: List[Row]) -> str:
    """``sluice config check``'s output: TOML lines, each commented with its source."""
    lines = []
    for row in table:
        source = row.source if row.source == "default" else "%s %s" % (row.source, row.where)
        if row.source == "file":
            source = "file %s" % row.where.rsplit(": ", 1)[0]
        lines.append("%s = %s  # %s" % (row.name, json.dumps(row.value), source))
    return "\n".join(lines) + "\n"
