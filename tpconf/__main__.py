"""`python -m tpconf`: the same as the `tpconf` command."""

from __future__ import annotations

import sys

from tpconf.cli import main

sys.exit(main())
