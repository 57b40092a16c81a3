"""A snapshot of a running ``tpconf up``, kept in ``.tpconf/state.json`` for ``tpconf status``.

Written atomically after every reconcile pass and every unit state change; removed on a clean
exit. A file whose pid is gone is what a crashed ``up`` left behind: ``tpconf status`` says so and
``tpconf down`` cleans the cluster up.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "state.json"


@dataclass(frozen=True)
class DeploymentRow:
    """One deployment in the status table."""

    name: str
    namespace: str
    method: str
    operation: str
    pod: str = ""
    tunnel: str = ""
    exposes: tuple[str, ...] = ()
    outbound: str = ""
    """What the method set up (its :meth:`~tpconf.methods.Outbound.status`)."""
    process: str = ""
    error: str | None = None
    """Why it is not (fully) working: the first line of the error."""
    retry_at: float | None = None
    """When it is retried by itself after a transient error (``time.time()``), if it is."""
    attempt: int = 0
    """The number of the next automatic retry."""

    def problem(self, now: float | None = None) -> str | None:
        """The error as the status shows it, with the retry countdown if one is pending."""
        if self.error is None:
            return None
        if self.retry_at is None:
            return f"failed: {self.error}"
        wait = max(0.0, self.retry_at - (time.time() if now is None else now))
        return f"retrying in {wait:.0f}s (attempt {self.attempt}): {self.error}"


@dataclass(frozen=True)
class Snapshot:
    """What ``tpconf status`` shows of a running ``up``."""

    pid: int
    session: str
    config: str
    started: float
    deployments: tuple[DeploymentRow, ...] = field(default_factory=tuple)
    updated: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        data = json.loads(text)
        rows = tuple(
            DeploymentRow(**{**row, "exposes": tuple(row.get("exposes", ()))})
            for row in data.pop("deployments", ())
        )
        return cls(**data, deployments=rows)

    @property
    def alive(self) -> bool:
        """Whether the ``tpconf up`` that wrote this is still running."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def write(state_dir: Path, snapshot: Snapshot) -> None:
    """Atomically replace the state file (a small write: ``up`` does it on its event loop)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".state-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(snapshot.to_json())
    os.replace(tmp, state_dir / STATE_FILE)


def read(state_dir: Path) -> Snapshot | None:
    """The last snapshot, or ``None`` when no ``up`` ran here (or the file is unreadable)."""
    try:
        return Snapshot.from_json((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def remove(state_dir: Path) -> None:
    """Forget the snapshot (clean exit)."""
    (state_dir / STATE_FILE).unlink(missing_ok=True)
