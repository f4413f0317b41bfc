from __future__ import annotations

from .cli import entry_point

entry_point()
