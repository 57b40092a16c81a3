"""tpconf.collector: what `tpconf up` does to the garbage collector, in a child process (the
settings are process-wide, and pytest's own must stay as they are)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tpconf.collector import YOUNG_THRESHOLD

pytestmark = pytest.mark.timeout(30)

PROBE = """
import gc, json
from tpconf.collector import tune_for_serving
before = gc.get_threshold()
tune_for_serving()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
"""


def test_serving_raises_the_young_threshold_only_and_freezes_what_start_up_made() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=20
    ).stdout
    seen = json.loads(out)
    assert seen["after"][0] == YOUNG_THRESHOLD > seen["before"][0]
    assert seen["after"][1:] == seen["before"][1:]
    assert seen["frozen"] > 1000  # the modules imported so far, at least
