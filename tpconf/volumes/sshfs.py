"""sshfs mounts of the proxy pod's filesystem, over an SFTP byte stream; kept mounted.

sshfs runs in *passive* mode (``-o passive``): it speaks SFTP on its stdin and stdout (pipes;
anyio's raw UNIX-socket stream raced on cancellation here, pipes use asyncio transports), and
tpconf pumps them to and from an SFTP stream (in
production an SSH ``sftp`` subsystem channel on the deployment's existing SSH connection; for a
plain ``ssh`` or a local server, :func:`command_stream`). No second SSH login, no key on disk.

:func:`run_mount` is one reconciler unit per mount (the root, and each mapping): it mounts,
reports ``started`` once the kernel shows the mount, notices a dropped mount (sshfs exits when
the stream ends; a stale ``ENOTCONN`` mount left by a killed sshfs is cleared) and mounts again
with a fresh stream. On the way out it unmounts, checks ``/proc/self/mountinfo`` that the mount
is gone and only then removes the folder, with ``rmdir``: never a recursive delete.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import ByteStream, Process, TaskStatus
from anyio.streams.stapled import StapledByteStream

from tpconf.errors import MountError, PrivilegeError, TpconfError
from tpconf.net import relay
from tpconf.pids import ProcessId, open_child

log = logging.getLogger(__name__)

#: Opens a new SFTP byte stream (an SSH "sftp" subsystem channel in production).
SftpOpener = Callable[[], Awaitable[ByteStream]]

#: The "host" in sshfs's source, ``tpconf.PID.START:/remote/path`` (the ``tpconf up`` that
#: made the mount, by :class:`~tpconf.pids.ProcessId`): shows in ``mount``, marks a mount as
#: tpconf's and says whether the ``up`` that made it still runs (:func:`owner`).
SOURCE_HOST = "tpconf"
#: Bytes of sshfs's error output kept to explain a failed mount (its last words).
STDERR_TAIL = 4096


@dataclass(frozen=True)
class Mount:
    """One sshfs mount: ``remote_path`` in the pod, shown at ``local_path``."""

    remote_path: str
    local_path: Path
    read_only: bool = False


def check_fuse(*, sshfs: str = "sshfs", device: str = "/dev/fuse") -> None:
    """Raise :class:`PrivilegeError` unless FUSE and sshfs are usable here."""
    if shutil.which(sshfs) is None:
        raise PrivilegeError(
            "volumes need sshfs, which is not installed",
            hint="install it (Debian: `apt install sshfs`), or turn volumes off for the"
            " deployment; see docs/volumes.md",
        )
    if not os.path.exists(device):
        raise PrivilegeError(
            f"volumes need FUSE: {device} does not exist",
            hint="load the module (`sudo modprobe fuse`); in a container, pass --device"
            " /dev/fuse; or turn volumes off for the deployment; see docs/volumes.md",
        )
    if not os.access(device, os.R_OK | os.W_OK):
        raise PrivilegeError(
            f"volumes need FUSE: {device} is not readable and writable by this user",
            hint="check its permissions (normally 0666), or turn volumes off for the deployment",
        )


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash are written as \\ooo)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[tuple[Path, str, str]]:
    """(mount point, file system type, source) of every mount this process sees."""
    result = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 2:
            result.append((Path(_unescape(fields[4])), tail[0], _unescape(tail[1])))
    return result


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a mount point now (by ``/proc/self/mountinfo``, never ``stat``)."""
    return mounted_at(path) is not None


def mounted_at(path: str | os.PathLike[str]) -> tuple[str, str] | None:
    """(file system type, source) of the topmost mount at ``path``, if it is a mount point."""
    target = Path(os.path.abspath(path))
    found = [(fstype, source) for point, fstype, source in mounts() if point == target]
    return found[-1] if found else None


def source_host() -> str:
    """The sshfs "host" of this process's mounts: ``tpconf.PID.START``."""
    me = ProcessId.own()
    return f"{SOURCE_HOST}.{me.pid}.{me.start}"


@dataclass(frozen=True)
class Owner:
    """The ``tpconf up`` that made an sshfs mount."""

    pid: int | None
    start: int | None
    """``None`` for a mount of a tpconf that did not record itself: its maker is unknown."""

    def alive(self) -> bool:
        if self.pid is None or self.start is None:
            return False
        found = ProcessId.of(self.pid)
        return found is not None and found.start == self.start


def owner(fstype: str, source: str) -> Owner | None:
    """Who made the mount of this type and source; ``None`` if tpconf did not make it."""
    host = source.partition(":")[0]
    if fstype != "fuse.sshfs" or not (host == SOURCE_HOST or host.startswith(SOURCE_HOST + ".")):
        return None
    _, pid, start = (host.split(".") + ["", ""])[:3]
    if not (pid.isdigit() and start.isdigit()):
        return Owner(None, None)
    return Owner(int(pid), int(start))


def is_stale(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a FUSE mount whose process is gone (``ENOTCONN``)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


async def unmount(path: str | os.PathLike[str], *, attempts: int = 5, delay: float = 0.2) -> None:
    """Unmount ``path`` and confirm it; a busy mount is retried, then detached (lazy)."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    base = [tool, "-u"] if tool else ["umount"]
    lazy = [tool, "-u", "-z"] if tool else ["umount", "-l"]
    last = ""
    for attempt in range(attempts + 1):
        if not is_mounted(path):
            return
        argv = lazy if attempt == attempts else base
        result = await anyio.run_process([*argv, str(path)], check=False)
        last = result.stderr.decode(errors="replace").strip()
        if result.returncode != 0 and attempt < attempts:
            log.debug("unmount %s: %s; retrying", path, last)
            await anyio.sleep(delay)
    if is_mounted(path):
        raise MountError(f"cannot unmount {path}: {last}", hint=f"run `fusermount3 -u {path}`")
    log.warning("%s was busy and has been detached (lazy unmount)", path)


def leftover_mounts() -> list[Path]:
    """The sshfs mounts tpconf made whose ``tpconf up`` no longer runs (deepest first)."""
    found = []
    for point, fstype, source in mounts():
        made_by = owner(fstype, source)
        if made_by is not None and not made_by.alive():
            found.append(point)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


async def remove_leftover_mounts() -> list[Path]:
    """Unmount the sshfs mounts a crashed ``tpconf up`` left (for ``tpconf down``).

    Only mounts tpconf made, and only those whose ``up`` is gone: another project's running
    ``up`` keeps its mounts. Raises :class:`MountError` naming every mount it could not remove,
    after trying them all.
    """
    removed, failed = [], []
    for point in leftover_mounts():
        try:
            await unmount(point)
        except MountError as exc:
            failed.append(exc)
        else:
            removed.append(point)
    if failed:
        raise MountError(
            "; ".join(exc.message for exc in failed),
            hint="unmounting another user's mount needs root: run `sudo tpconf down`"
            if os.geteuid() != 0
            else failed[0].hint,
        )
    return removed


async def claim_mount_point(local: Path) -> bool:
    """Make ``local`` ready for a new mount, or refuse; whether the folder had to be made.

    What a crashed ``up`` left mounted there is unmounted; anything else refuses the mount with
    a :class:`MountError`: a mount point that is not tpconf's (a system folder, another user's
    mount), a mount of a ``tpconf up`` that still runs, a file, or a folder with files in it
    (they would be hidden under the mount, or written over through it).
    """
    found = mounted_at(local)
    if found is not None:
        fstype, source = found
        made_by = owner(fstype, source)
        if made_by is None:
            raise MountError(
                f"{local} is already a mount point ({fstype} {source}): tpconf mounts only on "
                "a folder of its own",
                hint="choose another local path (`volumes.root`, or `local` of the mapping)",
            )
        if made_by.alive():
            raise MountError(
                f"{local} is mounted by another running tpconf up (pid {made_by.pid})",
                hint="stop that one, or give this deployment another local path",
            )
        log.warning("%s: unmounting what a crashed tpconf up left mounted", local)
        await unmount(local)
    elif await anyio.to_thread.run_sync(is_stale, local):
        await unmount(local)

    def check_folder() -> bool:
        if not local.exists() and not local.is_symlink():
            local.mkdir(parents=True)
            return True
        if not local.is_dir() or local.is_symlink():
            raise MountError(
                f"{local} is not a folder: tpconf mounts only on an empty folder",
                hint="choose another local path (`volumes.root`, or `local` of the mapping)",
            )
        if any(local.iterdir()):
            raise MountError(
                f"{local} is not empty: tpconf mounts only on an empty folder, so that no file "
                "of this machine is hidden or written over",
                hint="empty or remove it, or choose another local path (`volumes.root`, or "
                "`local` of the mapping)",
            )
        return False

    try:
        return await anyio.to_thread.run_sync(check_folder)
    except PermissionError as exc:
        raise MountError(
            f"cannot use {local} as a mount point: {exc.strerror}",
            hint="choose a local path this user can write to",
        ) from exc


class _ProcessStream(ByteStream):
    """A child's stdout/stdin as one byte stream; closing it ends the child."""

    def __init__(self, process: Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._stream = StapledByteStream(process.stdin, process.stdout)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await self._stream.receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await self._stream.send(item)

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()
            with anyio.move_on_after(2):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
            await self.process.aclose()


async def command_stream(argv: Sequence[str]) -> _ProcessStream:
    """An SFTP stream from a child speaking SFTP on stdio (``ssh -s HOST sftp``, sftp-server)."""
    process = await open_child(list(argv), stderr=None)
    return _ProcessStream(process)


@functools.cache
def _knows_option(sshfs: str, option: str) -> bool:
    """Whether this sshfs build lists ``option`` in its help (some patched builds add options)."""
    try:
        help_text = subprocess.run(
            [sshfs, "-h"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return option in help_text.stdout + help_text.stderr


@functools.cache
def _root_may_read() -> bool:
    """Whether to let root read the mounts: not root ourselves, and FUSE allows it
    (``user_allow_other`` in /etc/fuse.conf; without it the mount would fail)."""
    if os.geteuid() == 0:
        return False
    try:
        lines = Path("/etc/fuse.conf").read_text().splitlines()
    except OSError:
        return False
    return any(line.strip() == "user_allow_other" for line in lines)


def sshfs_argv(mount: Mount, *, sshfs: str = "sshfs") -> list[str]:
    """The sshfs command line for ``mount`` in passive mode (SFTP on stdin/stdout)."""
    # transform_symlinks: the pod's absolute symlinks (Debian's /var/run -> /run) must resolve
    # inside the mount, not on this machine, or $TELEPRESENCE_ROOT/var/run/secrets/... and the
    # real-path binds would reach the laptop's own /run. Debian's sshfs then still refuses them
    # (its `contain_symlinks`, on by default, rejects links with `..`) unless told not to.
    options = ["passive", "idmap=none", "transform_symlinks"]
    if _knows_option(sshfs, "no_contain_symlinks"):
        options.append("no_contain_symlinks")
    if mount.read_only:
        options.append("ro")
    if _root_may_read():
        # The container method's engine runs as root, and FUSE keeps even root out of another
        # user's mount unless it says otherwise.
        options.append("allow_root")
    source = f"{source_host()}:{mount.remote_path}"
    return [sshfs, source, str(mount.local_path), "-f", "-o", ",".join(options)]


async def _mount_once(
    mount: Mount,
    open_sftp: SftpOpener,
    *,
    sshfs: str,
    ready_timeout: float,
    on_ready: Callable[[], None],
) -> None:
    """Mount with a fresh stream; return when a mount drops, raise if it never came up."""
    stream = await open_sftp()
    try:
        # Its own session: a Ctrl-C on the terminal reaches tpconf's whole process group, and
        # sshfs must not exit (dropping the mount) before tpconf unmounts it in order.
        # If tpconf dies, SIGTERM lets sshfs unmount before it exits.
        process = await open_child(
            sshfs_argv(mount, sshfs=sshfs),
            death_signal=signal.SIGTERM,
            start_new_session=True,
        )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    assert process.stdin is not None and process.stdout is not None
    local = StapledByteStream(process.stdin, process.stdout)
    errors: collections.deque[bytes] = collections.deque(maxlen=16)

    async def collect_stderr() -> None:
        # The last lines say why a mount failed; a chatty sshfs must not grow tpconf.
        assert process.stderr is not None
        async for chunk in process.stderr:
            errors.append(chunk[-STDERR_TAIL:])

    mounted = False
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay, stream, local)
            tg.start_soon(collect_stderr)
            with anyio.move_on_after(ready_timeout):
                # the kernel's mount table has no event to wait on: poll it
                while process.returncode is None and not _ours(mount.local_path):  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            if process.returncode is None and _ours(mount.local_path):
                mounted = True
                on_ready()
                await process.wait()
                log.warning("volume %s dropped (sshfs exited)", mount.local_path)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                # Unmounting makes sshfs exit by itself; a signal would leave a stale mount.
                with anyio.move_on_after(5):
                    await unmount(mount.local_path)
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await process.aclose()
            await local.aclose()
            await stream.aclose()
    if not mounted:
        message = b"".join(errors)[-STDERR_TAIL:].decode(errors="replace").strip()
        raise MountError(
            f"sshfs could not mount {mount.remote_path} at {mount.local_path}: "
            + (message or f"not mounted after {ready_timeout} s")
        )


def _ours(local: Path) -> bool:
    """Whether the mount at ``local`` is this process's (never unmount someone else's)."""
    found = mounted_at(local)
    return found is not None and found[1].partition(":")[0] == source_host()


async def run_mount(
    mount: Mount,
    open_sftp: SftpOpener,
    *,
    sshfs: str = "sshfs",
    ready_timeout: float = 10.0,
    retry_delay: float = 1.0,
    task_status: TaskStatus[Path] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``mount`` mounted until cancelled; ``started(local_path)`` once it first shows.

    A failure before the first mount is raised (so ``tg.start`` reports it); later drops are
    logged and mounted again after ``retry_delay``. Unmounts and removes the folder (if this
    call created it) on the way out.
    """
    check_fuse(sshfs=sshfs)
    local = await anyio.to_thread.run_sync(Path(mount.local_path).absolute)
    mount = Mount(mount.remote_path, local, mount.read_only)
    # File system calls go to threads: a path under another mount of this process would be
    # served by this very event loop.
    created = await claim_mount_point(local)
    started = False

    def ready() -> None:
        nonlocal started
        if not started:
            started = True
            task_status.started(local)
        else:
            log.info("volume %s mounted again", local)

    try:
        while True:
            try:
                await _mount_once(
                    mount, open_sftp, sshfs=sshfs, ready_timeout=ready_timeout, on_ready=ready
                )
            except (OSError, TpconfError) as exc:
                if not started:
                    raise
                log.warning("volume %s: cannot mount again yet: %s", local, exc)
            if _ours(local) or await anyio.to_thread.run_sync(is_stale, local):
                await unmount(local)
            await anyio.sleep(retry_delay)
    finally:
        with anyio.CancelScope(shield=True):
            if _ours(local):
                await unmount(local)
            if created and not is_mounted(local):
                try:
                    await anyio.to_thread.run_sync(local.rmdir)
                except OSError as exc:
                    log.warning("cannot remove %s: %s", local, exc)
