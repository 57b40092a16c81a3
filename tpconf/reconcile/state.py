"""``.tpconf``, a project's state directory, and the snapshot of a running ``tpconf up`` in it.

The directory holds ``state.json`` (this module), ``control.sock`` (:mod:`.control`),
``children.json`` (:mod:`tpconf.pids`) and the default volume roots. :func:`check_dir` refuses a
directory that is a symbolic link (the socket and the files would land wherever it points) or
that belongs to another user, and names ``sudo`` when root made it.

``state.json`` is written atomically after every reconcile pass and every unit state change, and
removed on a clean exit. It names its ``up`` by pid *and* start time
(:class:`~tpconf.pids.ProcessId`): after a crash, the pid may run something else, and that must
not look like a running ``up``. A file that is left behind says a crashed ``up`` ran here:
``tpconf status`` says so and ``tpconf down`` cleans up. A file that is not a snapshot (edited,
truncated, written by something else) is reported with what is wrong and how to get rid of it.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tpconf.errors import TpconfError
from tpconf.pids import ProcessId

STATE_FILE = "state.json"

#: The children of a running ``up`` that lead a process group (:func:`tpconf.pids.recording`).
CHILDREN_FILE = "children.json"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _owner_error(path: Path, owner: int, what: str) -> TpconfError:
    me = _user(os.geteuid())
    if owner == 0:
        return TpconfError(
            f"{path} {what} root: a `sudo tpconf up` made it",
            hint=f"run tpconf with sudo here too (`sudo -E tpconf down` cleans up), or give it "
            f"back: `sudo chown -R {me} {path}`",
        )
    return TpconfError(
        f"{path} {what} user {_user(owner)}, not {me}",
        hint=f"tpconf keeps its socket and state only where {me} alone can write: run it as "
        f"{_user(owner)}, or remove {path}",
    )


def check_dir(state_dir: Path) -> None:
    """Refuse a state directory tpconf must not use: a symbolic link, not a directory, or
    another user's (root may use any). A missing one is fine: it is made, mode 0700, on use."""
    try:
        info = os.lstat(state_dir)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise TpconfError(
            f"{state_dir} is a symbolic link: tpconf keeps its control socket and state only in "
            "a real directory of the project",
            hint=f"remove the link (`rm {state_dir}`); tpconf makes the directory itself",
        )
    if not stat.S_ISDIR(info.st_mode):
        raise TpconfError(
            f"{state_dir} is not a directory", hint=f"remove it (`rm {state_dir}`) or rename it"
        )
    if info.st_uid != os.geteuid() and os.geteuid() != 0:
        raise _owner_error(state_dir, info.st_uid, "belongs to")


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
    pid_start: int = 0
    """When the ``up`` started (clock ticks after boot); ``0``: not known (an older tpconf)."""
    boot: str = ""
    """The boot the ``up`` ran in (``/proc/sys/kernel/random/boot_id``)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        """Raises ``ValueError`` or ``TypeError`` saying what is wrong with a text that is not
        a snapshot."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("expected a JSON object")
        rows = data.get("deployments", [])
        if not isinstance(rows, list):
            raise TypeError("`deployments` must be a list")
        values = _checked(cls, data, skip={"deployments"}, where="")
        return cls(
            **values,
            deployments=tuple(
                DeploymentRow(**_checked(DeploymentRow, row, where=f"deployments[{i}].", skip=()))
                for i, row in enumerate(rows)
            ),
        )

    @property
    def process(self) -> ProcessId:
        return ProcessId(self.pid, self.pid_start, self.boot)

    @property
    def alive(self) -> bool:
        """Whether the ``tpconf up`` that wrote this is still running (not a reused pid)."""
        if self.pid_start:
            return self.process.alive()
        # An older tpconf recorded the pid alone: it must at least still be a tpconf.
        try:
            return b"tpconf" in Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False


# What each field of the file may hold (JSON has one number type for int and float).
_KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "str | None": (str, type(None)),
    "float | None": (int, float, type(None)),
    "tuple[str, ...]": (list,),
}


def _checked(
    cls: type[Snapshot | DeploymentRow],
    data: object,
    *,
    where: str,
    skip: set[str] | tuple[()],
) -> dict[str, Any]:
    """The fields of ``cls`` in ``data``, type-checked; fields a newer tpconf added are ignored."""
    if not isinstance(data, dict):
        raise TypeError(f"`{where.rstrip('.') or 'the file'}` must be a JSON object")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"`{where}{f.name}` is missing")
            continue
        raw = data[f.name]
        if isinstance(raw, bool) or not isinstance(raw, _KINDS[str(f.type)]):
            raise TypeError(f"`{where}{f.name}` has the wrong type: {json.dumps(raw)[:40]}")
        value: Any = raw
        if f.type == "tuple[str, ...]":
            if not all(isinstance(item, str) for item in value):
                raise ValueError(f"`{where}{f.name}` must be a list of strings")
            value = tuple(value)
        values[f.name] = value
    pid = values.get("pid")
    if isinstance(pid, int) and pid <= 0:
        raise ValueError(f"`{where}pid` must be a positive whole number, not {pid}")
    return values


def _stamped(snapshot: Snapshot) -> Snapshot:
    """``snapshot`` naming its writer by start time too, when it is this process."""
    if snapshot.pid_start or snapshot.pid != os.getpid():
        return snapshot
    me = ProcessId.own()
    return replace(snapshot, pid_start=me.start, boot=me.boot)


def write(state_dir: Path, snapshot: Snapshot) -> None:
    """Atomically replace the state file (a small write: ``up`` does it on its event loop)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".state-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(_stamped(snapshot).to_json())
    os.replace(tmp, state_dir / STATE_FILE)


def read(state_dir: Path) -> Snapshot | None:
    """The last snapshot, or ``None`` when no ``up`` ran here.

    Raises :class:`~tpconf.errors.TpconfError` for a file that cannot be read or is not a
    snapshot, saying what is wrong and how to go on.
    """
    path = state_dir / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        try:
            owner = path.stat().st_uid
        except OSError:
            raise TpconfError(f"cannot read {path}: {exc.strerror}") from None
        raise _owner_error(path, owner, "is readable only by") from None
    except OSError as exc:
        raise TpconfError(
            f"cannot read {path}: {exc.strerror}", hint=_WAY_OUT.format(path)
        ) from exc
    try:
        return Snapshot.from_json(text)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError too
        raise TpconfError(
            f"{path} is not a state file of tpconf: {exc}", hint=_WAY_OUT.format(path)
        ) from None


_WAY_OUT = (
    "it only records what a `tpconf up` ran: `tpconf down` cleans up without it (and removes "
    "it), or remove it yourself (`rm {}`)"
)


def read_leftover(state_dir: Path) -> tuple[Snapshot | None, str | None]:
    """For ``tpconf down``: the snapshot, or ``None`` and why the file was of no use."""
    try:
        return read(state_dir), None
    except TpconfError as exc:
        return None, exc.message


def remove(state_dir: Path) -> None:
    """Forget the snapshot (clean exit, or ``tpconf down`` done)."""
    (state_dir / STATE_FILE).unlink(missing_ok=True)
