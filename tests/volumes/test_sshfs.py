"""Volumes: real sshfs mounts in passive mode, the SFTP side a real OpenSSH sftp-server child.

The SFTP stream is the sftp-server's stdin/stdout, pumped by tpconf exactly as it pumps an SSH
channel in production. FUSE mounting needs root here (no user_allow_other setup), so the mount
tests are marked ``root`` and skipped without it; the pure helpers run everywhere.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import anyio
import pytest
from anyio.abc import ByteStream, Process

from tests.orphans import killed_parent, survivors
from tpconf.errors import MountError, PrivilegeError
from tpconf.pids import ProcessId
from tpconf.volumes import (
    Mount,
    check_fuse,
    claim_mount_point,
    is_mounted,
    local_path,
    real_path_wrapper,
    remove_leftover_mounts,
    run_mount,
    telepresence_env,
)
from tpconf.volumes.sshfs import _ProcessStream, command_stream, mounted_at, source_host

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
T = TypeVar("T")

root = pytest.mark.root
skip_unless_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SFTP_SERVER) or shutil.which("sshfs") is None,
    reason="needs root (FUSE), sshfs and OpenSSH's sftp-server",
)


class SftpServers:
    """An :data:`SftpOpener` starting one real sftp-server child per stream."""

    def __init__(self) -> None:
        self.streams: list[_ProcessStream] = []

    async def __call__(self) -> ByteStream:
        stream = await command_stream([SFTP_SERVER])
        self.streams.append(stream)
        return stream


@pytest.fixture
def pod(tmp_path: Path) -> Path:
    """A fake pod filesystem, as the agent's sftp-server would see it."""
    fs = tmp_path / "pod"
    sa = fs / "var/run/secrets/kubernetes.io/serviceaccount"
    sa.mkdir(parents=True)
    (sa / "namespace").write_text("default")
    (sa / "token").write_text("eyJhbGciOi.token")
    (fs / "etc/config").mkdir(parents=True)
    (fs / "etc/config/app.yaml").write_text("greeting: hello\n")
    return fs


@asynccontextmanager
async def mounted(
    mount: Mount, opener: SftpServers, *, retry_delay: float = 0.05
) -> AsyncIterator[Path]:
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(15):
            path: Path = await tg.start(
                functools.partial(run_mount, mount, opener, retry_delay=retry_delay)
            )
        try:
            yield path
        finally:
            tg.cancel_scope.cancel()


def on_mount(fn: Callable[[], T]) -> Awaitable[T]:
    """Run file I/O on a mount in a worker thread: the event loop pumps the mount's SFTP
    stream, so touching the mount from the loop's own thread would deadlock (uninterruptibly).
    """
    return anyio.to_thread.run_sync(fn)


# --- pure helpers ----------------------------------------------------------------------------


def test_telepresence_env_names_the_root_and_the_mount_paths() -> None:
    env = telepresence_env(
        "/tmp/tel-root", ["/var/run/secrets/kubernetes.io/serviceaccount", "/etc/config"]
    )
    assert env == {
        "TELEPRESENCE_ROOT": "/tmp/tel-root",
        "TELEPRESENCE_MOUNTS": "/var/run/secrets/kubernetes.io/serviceaccount:/etc/config",
    }


def test_a_pod_path_maps_under_the_root_and_may_not_escape_it() -> None:
    assert local_path("/r", "/etc/config") == Path("/r/etc/config")
    with pytest.raises(ValueError, match="absolute"):
        local_path("/r", "/etc/../../home")


def test_the_real_path_wrapper_binds_each_mount_path_from_the_root() -> None:
    if shutil.which("proot") is None:
        pytest.skip("proot is not installed")
    argv = real_path_wrapper("/tmp/r", ["/var/run/secrets/kubernetes.io", "/etc/config"])
    assert argv[1:] == [
        "-b", "/tmp/r/etc/config:/etc/config",
        "-b", "/tmp/r/var/run/secrets/kubernetes.io:/var/run/secrets/kubernetes.io",
    ]  # fmt: skip


def test_missing_sshfs_or_fuse_gives_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(PrivilegeError, match="volumes need sshfs") as info:
        check_fuse(sshfs="/nonexistent/sshfs")
    assert "apt install sshfs" in info.value.render()
    with pytest.raises(PrivilegeError, match="volumes need FUSE: .* does not exist"):
        check_fuse(device=str(tmp_path / "fuse"))


# --- real mounts -----------------------------------------------------------------------------


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_the_pods_files_are_readable_under_the_mount(pod: Path, tmp_path: Path) -> None:
    blob = os.urandom(3 << 20)
    (pod / "blob.bin").write_bytes(blob)
    opener = SftpServers()
    async with mounted(Mount(str(pod), tmp_path / "root"), opener) as root_dir:
        assert is_mounted(root_dir)
        namespace = root_dir / "var/run/secrets/kubernetes.io/serviceaccount/namespace"
        assert await on_mount(namespace.read_text) == "default"
        assert await on_mount((root_dir / "blob.bin").read_bytes) == blob
        written = root_dir / "written.txt"
        await on_mount(lambda: written.write_text("from the laptop"))  # read-write by default
    assert (pod / "written.txt").read_text() == "from the laptop"


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_a_read_only_mount_refuses_writes(pod: Path, tmp_path: Path) -> None:
    async with mounted(Mount(str(pod), tmp_path / "ro", read_only=True), SftpServers()) as ro:
        assert await on_mount((ro / "etc/config/app.yaml").read_text) == "greeting: hello\n"
        with pytest.raises(OSError) as info:
            await on_mount(lambda: (ro / "etc/config/new.yaml").write_text("x"))
        assert info.value.errno == errno.EROFS
    assert not (pod / "etc/config/new.yaml").exists()


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_a_mapping_mounts_a_subtree_at_its_local_path(pod: Path, tmp_path: Path) -> None:
    target = tmp_path / "project/secrets"
    remote = str(pod / "var/run/secrets/kubernetes.io")
    async with mounted(Mount(remote, target, read_only=True), SftpServers()) as mapped:
        assert mapped == target
        assert await on_mount((target / "serviceaccount/token").read_text) == "eyJhbGciOi.token"
        assert await on_mount(lambda: os.listdir(target)) == ["serviceaccount"]


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_a_dropped_sftp_stream_is_noticed_and_mounted_again(
    pod: Path, tmp_path: Path
) -> None:
    opener = SftpServers()
    async with mounted(Mount(str(pod), tmp_path / "root"), opener) as root_dir:
        token = root_dir / "var/run/secrets/kubernetes.io/serviceaccount/token"
        assert await on_mount(token.read_text) == "eyJhbGciOi.token"
        opener.streams[0].process.kill()  # the SSH channel dies
        with anyio.fail_after(10):
            while len(opener.streams) < 2 or not is_mounted(root_dir):  # noqa: ASYNC110 (polls the mount table)
                await anyio.sleep(0.02)
        assert await on_mount(token.read_text) == "eyJhbGciOi.token"


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_teardown_unmounts_before_it_removes_only_the_folder_it_made(
    pod: Path, tmp_path: Path
) -> None:
    made = tmp_path / "made-by-tpconf"
    existing = tmp_path / "existing"
    existing.mkdir()
    async with (
        mounted(Mount(str(pod), made), SftpServers()),
        mounted(Mount(str(pod / "etc"), existing), SftpServers()),
    ):
        assert is_mounted(made) and is_mounted(existing)
    assert not is_mounted(made) and not made.exists()
    assert not is_mounted(existing) and existing.is_dir() and os.listdir(existing) == []
    assert (pod / "etc/config/app.yaml").exists()  # nothing was deleted through the mount


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_a_killed_sshfs_leaves_a_stale_mount_that_is_cleared_and_remounted(
    pod: Path, tmp_path: Path
) -> None:
    opener = SftpServers()
    async with mounted(Mount(str(pod), tmp_path / "root"), opener) as root_dir:
        found = await anyio.run_process(["pgrep", "-f", f"sshfs {source_host()}:{pod} {root_dir}"])
        os.kill(int(found.stdout.split()[0]), 9)
        with anyio.fail_after(10):
            while len(opener.streams) < 2 or not is_mounted(root_dir):  # noqa: ASYNC110 (polls the mount table)
                await anyio.sleep(0.02)
        app = root_dir / "etc/config/app.yaml"
        assert await on_mount(app.read_text) == "greeting: hello\n"


@asynccontextmanager
async def hand_mount(pod: Path, point: Path, host: str) -> AsyncIterator[Process]:
    """An sshfs mount of ``pod`` at ``point`` with source ``host:pod``, as another tpconf (or an
    older one) would have made it; yields the sshfs process."""
    await anyio.Path(point).mkdir(exist_ok=True)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sftp = await anyio.open_process([SFTP_SERVER], stdin=ours.fileno(), stdout=ours.fileno())
        sshfs = await anyio.open_process(
            ["sshfs", f"{host}:{pod}", str(point), "-f", "-o", "passive"],
            stdin=theirs.fileno(), stdout=theirs.fileno(),
        )  # fmt: skip
    try:
        with anyio.fail_after(10):
            while not is_mounted(point):  # noqa: ASYNC110 (polls the mount table)
                await anyio.sleep(0.02)
        yield sshfs
    finally:
        for child in (sshfs, sftp):
            if child.returncode is None:
                child.kill()
            await child.wait()
            await child.aclose()
        if is_mounted(point):
            await anyio.run_process(["fusermount3", "-u", "-z", str(point)], check=False)


def gone_up() -> str:
    """The source host of a ``tpconf up`` that no longer runs (its pid now runs this test)."""
    me = ProcessId.own()
    return f"tpconf.{me.pid}.{me.start + 1}"


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_tpconf_down_unmounts_only_what_a_crashed_up_left(pod: Path, tmp_path: Path) -> None:
    crashed, running, older = tmp_path / "crashed", tmp_path / "running", tmp_path / "older"
    async with (
        hand_mount(pod, crashed, gone_up()) as sshfs,
        hand_mount(pod, running, source_host()),  # another project's `up`, running
        hand_mount(pod, older, "tpconf"),  # a tpconf that did not name its `up`
    ):
        sshfs.kill()  # killed with tpconf: the mount stays behind, stale
        await sshfs.wait()
        assert is_mounted(crashed)
        assert sorted(await remove_leftover_mounts()) == [crashed, older]
        assert not is_mounted(crashed) and not is_mounted(older)
        assert is_mounted(running)
        assert await remove_leftover_mounts() == []


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_a_mount_point_that_is_not_tpconfs_is_refused_and_left_mounted(
    pod: Path, tmp_path: Path
) -> None:
    point = tmp_path / "tmpfs"
    point.mkdir()
    await anyio.run_process(["mount", "-t", "tmpfs", "tpconf-test", str(point)])
    try:
        with pytest.raises(MountError, match="is already a mount point \\(tmpfs tpconf-test\\)"):
            with anyio.fail_after(15):
                await run_mount(Mount(str(pod), point), SftpServers())
        assert is_mounted(point)
    finally:
        await anyio.run_process(["umount", str(point)])


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_the_mount_of_another_running_up_is_refused_and_left_mounted(
    pod: Path, tmp_path: Path
) -> None:
    point = tmp_path / "shared"
    other = await anyio.open_process(["sleep", "60"])
    try:
        other_id = ProcessId.of(other.pid)
        assert other_id is not None
        async with hand_mount(pod, point, f"tpconf.{other.pid}.{other_id.start}"):
            with pytest.raises(
                MountError, match=f"mounted by another running tpconf up \\(pid {other.pid}\\)"
            ):
                with anyio.fail_after(15):
                    await run_mount(Mount(str(pod), point), SftpServers())
            assert is_mounted(point)
    finally:
        other.kill()
        await other.wait()
        await other.aclose()


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_what_a_crashed_up_left_at_the_path_is_unmounted_and_mounted_again(
    pod: Path, tmp_path: Path
) -> None:
    point = tmp_path / "root"
    async with hand_mount(pod, point, gone_up()) as sshfs:
        sshfs.kill()
        await sshfs.wait()
        async with mounted(Mount(str(pod), point), SftpServers()) as root_dir:
            assert mounted_at(root_dir) == ("fuse.sshfs", f"{source_host()}:{pod}")
            assert (
                await on_mount((root_dir / "etc/config/app.yaml").read_text) == "greeting: hello\n"
            )


@pytest.mark.anyio
async def test_a_folder_with_files_or_a_file_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    full = tmp_path / "home"
    full.mkdir()
    (full / ".bashrc").write_text("mine")
    with pytest.raises(
        MountError, match="is not empty: tpconf mounts only on an empty folder"
    ) as info:
        await claim_mount_point(full)
    assert info.value.hint is not None and "`volumes.root`" in info.value.hint
    assert (full / ".bashrc").read_text() == "mine"
    with pytest.raises(MountError, match="is not a folder"):
        await claim_mount_point(full / ".bashrc")
    assert await claim_mount_point(tmp_path / "new/deeper") is True  # made, with its parents
    assert await claim_mount_point(tmp_path / "new/deeper") is False  # there, empty: used


@root
@skip_unless_fuse
@pytest.mark.timeout(30)
def test_sshfs_unmounts_and_exits_when_tpconf_dies_even_on_sigkill(
    pod: Path, tmp_path: Path
) -> None:
    point = tmp_path / "root"
    with killed_parent(MOUNTING_PARENT, str(pod), str(point)) as pids:
        assert survivors(pids) == [], "sshfs or sftp-server outlived tpconf"
    assert not is_mounted(point)


# Mounts argv[1] at argv[2] with run_mount, prints the pids of its children, waits to be killed.
MOUNTING_PARENT = """
import anyio, json, os, sys
from pathlib import Path
from tpconf.volumes import Mount, command_stream, run_mount

async def sftp():
    return await command_stream(["/usr/lib/openssh/sftp-server"])

def children():
    me = str(os.getpid())
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == me]

async def main():
    async with anyio.create_task_group() as tg:
        await tg.start(run_mount, Mount(sys.argv[1], Path(sys.argv[2])), sftp)
        print(json.dumps(children()), flush=True)

anyio.run(main)
"""


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_the_real_path_option_reads_the_pods_file_at_its_real_path(
    pod: Path, tmp_path: Path
) -> None:
    if shutil.which("proot") is None:
        pytest.skip("proot is not installed")
    async with mounted(Mount(str(pod), tmp_path / "root"), SftpServers()) as root_dir:
        argv = real_path_wrapper(root_dir, ["/var/run/secrets/kubernetes.io"])
        path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        result = await anyio.run_process([*argv, "cat", path], check=False)
        assert result.stdout == b"default", result.stderr


@root
@skip_unless_fuse
@pytest.mark.anyio
async def test_reading_a_50_mb_file_through_the_mount(pod: Path, tmp_path: Path) -> None:
    size = 50 << 20
    (pod / "big.bin").write_bytes(os.urandom(size))
    async with mounted(Mount(str(pod), tmp_path / "root", read_only=True), SftpServers()) as r:

        def read() -> int:
            total = 0
            with open(r / "big.bin", "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
            return total

        start = time.perf_counter()
        assert await on_mount(read) == size
        elapsed = time.perf_counter() - start
    print(f"sshfs passive read: {size / elapsed / 1e6:.0f} MB/s")
