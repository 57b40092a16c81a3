"""``python -m bench [--quick]``: see bench/RESULTS.md."""

from __future__ import annotations

import sys

from bench.run import main

sys.exit(main())
