"""Acting as another local user in tests: a directory every user can enter, and Python code run
as user ``nobody`` (needs root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def shared_dir(prefix: str) -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_nobody(code: str, *args: str) -> str:
    """Run ``python -c code ARGS...`` as user nobody; its stdout, stripped."""
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", code, *args],
        check=False, capture_output=True, text=True, timeout=20, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()
