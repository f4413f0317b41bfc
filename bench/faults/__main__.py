"""``python -m bench.faults``: see bench/faults/__init__.py."""
from __future__ import annotations

import sys

from bench.faults.run import main

sys.exit(main())
