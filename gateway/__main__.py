from __future__ import annotations

from gateway.cli.main import entry_point

entry_point()
