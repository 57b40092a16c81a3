"""Processes by identity, and the children tpconf starts: none outlives ``tpconf up``.

A pid names a process only while it runs: once it exits the kernel hands the number to the next
one. :class:`ProcessId` pairs the pid with the process's start time (``/proc/PID/stat`` field 22,
clock ticks after boot) and the boot id, so the state file, the owner of vpn-tcp's iptables chains
and the record of children each name one process, ever; a reused pid is never taken for tpconf.

Every child tpconf starts goes through :func:`open_child`, which arms the kernel's parent-death
signal (``PR_SET_PDEATHSIG``) in the child before it runs the program: when ``tpconf up`` dies,
however it dies (``kill -9``, the OOM killer), the kernel signals each child. The signal reaches
only the direct child; what it started (``sh -c CMD`` forks CMD) would outlive it. So while
``up`` records (:func:`recording`), every child that leads its own process group is written to
``.tpconf/children.json``, and a *janitor* runs beside ``up``: a small process the kernel sends
SIGTERM when ``up`` dies, which then stops what is left of those groups
(:func:`stop_leftovers`). ``tpconf down`` does the same for whatever the janitor could not.

Linux only (``/proc``, ``prctl``); elsewhere children start without the signal and liveness falls
back to the pid alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from anyio._core._eventloop import get_async_backend
from anyio.abc import Process

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


# ---- which process is which --------------------------------------------------------------------


@functools.cache
def _boot_id() -> str:
    """This boot's id (it changes only with a reboot, which ends this process too)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (field 3 onwards)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


@dataclass(frozen=True)
class ProcessId:
    """One process, ever: its pid, when it started (clock ticks after boot) and the boot."""

    pid: int
    start: int
    boot: str

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        """The identity of the running process ``pid`` (``None``: none, or a zombie)."""
        fields = _stat_fields(pid)
        if fields is None or len(fields) < 20 or fields[0] in (b"Z", b"X"):
            return None
        return cls(pid, int(fields[19]), _boot_id())

    @classmethod
    def own(cls) -> ProcessId:
        """This process."""
        found = cls.of(os.getpid())
        return found if found is not None else cls(os.getpid(), 0, "")

    def alive(self) -> bool:
        """Whether this very process still runs (not another one that got its pid)."""
        if not self.boot:  # recorded where /proc was missing: the pid is all there is
            return _pid_exists(self.pid)
        return ProcessId.of(self.pid) == self

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ProcessId:
        """Raises ``ValueError`` or ``TypeError`` naming the field that is wrong."""
        pid, start, boot = data.get("pid"), data.get("start", 0), data.get("boot", "")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(f"`pid` must be a positive whole number, not {pid!r}")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValueError(f"`start` must be a whole number, not {start!r}")
        if not isinstance(boot, str):
            raise TypeError(f"`boot` must be a string, not {boot!r}")
        return cls(pid, start, boot)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``.

    Zombies are left out: an orphan whose new parent does not reap it (a container's pid 1
    often does not) still answers ``kill(0)`` but is already gone. Without ``/proc`` (macOS)
    the answer is ``[pgid]`` while the kernel still knows the group.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    if not Path("/proc/self/stat").exists():
        return [pgid]
    members = []
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            fields = _stat_fields(int(entry.name))
            if (
                fields
                and len(fields) > 2
                and int(fields[2]) == pgid
                and fields[0] not in (b"Z", b"X")
            ):
                members.append(int(entry.name))
    return members


# ---- children that die with tpconf -------------------------------------------------------------


def _dies_with(parent: int, sig: signal.Signals) -> Callable[[], None]:
    def arm() -> None:  # runs in the child between fork and exec: no locks, no logging
        _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


async def open_child(
    command: Sequence[str],
    *,
    death_signal: signal.Signals = signal.SIGKILL,
    stdin: int | IO[Any] | None = subprocess.PIPE,
    stdout: int | IO[Any] | None = subprocess.PIPE,
    stderr: int | IO[Any] | None = subprocess.PIPE,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    start_new_session: bool = False,
) -> Process:
    """Start ``command`` like :func:`anyio.open_process`; it gets ``death_signal`` when tpconf dies.

    The kernel sends the signal when the *thread* that started the child ends: call this from
    the event loop's thread (an ``async`` caller does), never from a worker thread. A child that
    leads its own group (``start_new_session``) is recorded for ``tpconf down`` while ``up``
    records (:func:`recording`).
    """
    options: dict[str, Any] = {}
    if _prctl is not None:
        options["preexec_fn"] = _dies_with(os.getpid(), death_signal)
    # anyio.open_process has no preexec_fn; its backend passes the option on to asyncio.
    process: Process = await get_async_backend().open_process(
        list(command),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        cwd=cwd,
        env=env,
        startupinfo=None,
        creationflags=0,
        start_new_session=start_new_session,
        pass_fds=(),
        **options,
    )
    if start_new_session and _record is not None:
        found = ProcessId.of(process.pid)
        if found is not None:
            _record.add(Child(found, Path(command[0]).name))
    return process


# ---- the record `tpconf down` reads ------------------------------------------------------------


@dataclass(frozen=True)
class Child:
    """A child that leads its own process group, as recorded for ``tpconf down``."""

    id: ProcessId
    what: str
    """The program's name, for messages."""

    def members(self) -> list[int]:
        """The live processes of its group that are still tpconf's.

        While the leader runs, its identity decides. Once it is gone, Linux does not hand its
        pid to a new process while the group has members, so the members are the group's; if a
        process with that pid runs again, the group emptied before the pid came back.
        """
        if not self._group_may_be_ours():
            return []
        return group_members(self.id.pid)

    def _group_may_be_ours(self) -> bool:
        if self.id.boot and self.id.boot != _boot_id():
            return False
        now = ProcessId.of(self.id.pid)
        return now is None or now == self.id

    def may_have_members(self) -> bool:
        """:meth:`members` is maybe not empty: the group exists (zombies may be all it has).

        Reads two files, where :meth:`members` reads every process's: what keeping the record
        of children uses each time a child starts (10 deployments start dozens of children).
        """
        if not self._group_may_be_ours():
            return False
        try:
            os.killpg(self.id.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


class _Record:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.children: list[Child] = []

    def add(self, child: Child) -> None:
        self.children = [c for c in self.children if c.may_have_members()] + [child]
        self.write()

    def write(self) -> None:
        data = {
            "owner": ProcessId.own().to_dict(),
            "children": [{**c.id.to_dict(), "what": c.what} for c in self.children],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".children-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, self.path)


_record: _Record | None = None


def _start_janitor(path: Path) -> subprocess.Popen[bytes] | None:
    """The janitor of ``path`` (see the module doc), or ``None`` where there is no prctl.

    Started from this (the event loop's) thread, so the kernel signals it when this process
    dies, not when some worker thread ends; in a session of its own, so a Ctrl-C in the
    terminal is ``up``'s alone to handle.
    """
    if _prctl is None:
        return None
    arm = _dies_with(os.getpid(), signal.SIGTERM)

    def prepare() -> None:
        # Blocked before the signal is armed (the mask survives exec): a death of `up` while
        # the janitor starts is waited for, not the end of the janitor.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        arm()

    return subprocess.Popen(
        [sys.executable, "-m", "tpconf.pids", "janitor", str(path)],
        # Safe here: prctl, getppid and a signal mask, no lock another thread could hold.
        preexec_fn=prepare,  # noqa: PLW1509
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _janitor(path: Path) -> None:
    """Wait until the kernel says ``up`` died (SIGTERM), then stop its recorded groups."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM})
    with contextlib.suppress(OSError, ValueError, TypeError):
        stop_leftovers(path)


@contextlib.contextmanager
def recording(path: Path) -> Iterator[None]:
    """Record children that lead their own group in ``path`` while the block runs, with a
    janitor that stops them if this process dies first.

    On the way out the file is removed if every recorded group is gone, else rewritten with
    the ones still running (``tpconf down`` stops them).
    """
    global _record
    record = _record = _Record(path)
    janitor = _start_janitor(path)
    try:
        yield
    finally:
        if janitor is not None:
            janitor.kill()  # this process ends normally: it stopped its children itself
            janitor.wait()
        _record = None
        record.children = [c for c in record.children if c.members()]
        if record.children:
            with contextlib.suppress(OSError):
                record.write()
        else:
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Record:
    """What ``children.json`` says: the ``up`` that wrote it, and its children."""

    owner: ProcessId | None
    children: tuple[Child, ...] = ()


def read_record(path: Path) -> Record:
    """The record in ``path`` (an empty one if it does not exist).

    Raises ``ValueError`` or ``TypeError`` saying what is wrong with a file that is not one.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Record(None)
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("children"), list):
        raise TypeError("expected an object with `owner` and a list of `children`")
    owner = data.get("owner")
    if not isinstance(owner, dict):
        raise TypeError("`owner` must be an object")
    try:
        who = ProcessId.from_dict(owner)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"owner: {exc}") from None
    children = []
    for index, item in enumerate(data["children"]):
        if not isinstance(item, dict):
            raise TypeError(f"child {index}: expected an object")
        try:
            children.append(Child(ProcessId.from_dict(item), str(item.get("what", "?"))))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"child {index}: {exc}") from None
    return Record(who, tuple(children))


def _wait_gone(children: list[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while children and time.monotonic() < deadline and any(c.members() for c in children):
        time.sleep(0.05)


def stop_leftovers(path: Path, *, grace: float = 2.0) -> list[str]:
    """Stop what is left of the process groups recorded in ``path``; what was done, in words.

    Nothing is touched while the ``up`` that wrote the record runs. SIGTERM to each group, then
    SIGKILL to what is still there after ``grace`` seconds. The file is removed once nothing
    recorded runs. Blocking (it waits): run it in a thread. Raises ``ValueError`` or
    ``TypeError`` for a file that is not a record.
    """
    record = read_record(path)
    if record.owner is not None and record.owner.alive():
        return []
    lines: list[str] = []
    pending: list[Child] = []
    for child in record.children:
        if not child.members():
            continue
        try:
            os.killpg(child.id.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        except PermissionError:
            lines.append(
                f"could not stop process group {child.id.pid} ({child.what}): it belongs to "
                "another user; run `sudo tpconf down`"
            )
            continue
        pending.append(child)
    _wait_gone(pending, grace)
    killed = [child for child in pending if child.members()]
    for child in killed:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.id.pid, signal.SIGKILL)
    _wait_gone(killed, grace)
    for child in pending:
        how = "killed" if child in killed else "stopped"
        lines.append(f"{how} process group {child.id.pid} ({child.what}) left by tpconf up")
    if not any(c.members() for c in record.children):
        path.unlink(missing_ok=True)
    return lines


if __name__ == "__main__" and sys.argv[1:2] == ["janitor"]:
    _janitor(Path(sys.argv[2]))
