"""The one failure of configuration: a setting whose value cannot work."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A setting's value is not acceptable; the message names the flag."""
