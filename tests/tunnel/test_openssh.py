"""The tunnel against Debian's OpenSSH sshd, run unprivileged as the agent runs it.

sshd runs as a non-root user on a random 127.0.0.1 port with a generated config like the agent's
(keys from ProxyKeys, no passwords, forwarding allowed, sftp subsystem). When the tests run as
root, sshd runs as the first non-root user with a login shell (root sshd would need
/run/sshd and would not show non-root behaviour such as ports below 1024 being refused).
Skipped only when /usr/sbin/sshd is absent (or, as root, no non-root user has a shell).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from tpconf.errors import ForwardFailed, HostKeyMismatch
from tpconf.tunnel import (
    ProxyKeys,
    TunnelSettings,
    fetch_pod_info,
    open_tunnel,
)
from tpconf.tunnel.keys import AUTHORIZED_KEYS, HOST_PRIVATE_KEY

from .peers import tcp_server
from .test_connection import _sftp_init, _transfer

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not os.path.exists(SSHD), reason=f"{SSHD} is not installed"),
]


def _sshd_user() -> pwd.struct_passwd | None:
    if os.getuid() != 0:
        return pwd.getpwuid(os.getuid())
    shells = {line.strip() for line in Path("/etc/shells").read_text().splitlines()}
    for entry in sorted(pwd.getpwall(), key=lambda e: e.pw_uid):
        if entry.pw_uid != 0 and entry.pw_shell in shells:
            return entry
    # A fresh machine may have none: as root, make one (the agent runs sshd non-root too).
    made = subprocess.run(
        ["useradd", "--system", "--shell", "/bin/sh", "--no-create-home", "tpconf-sshd-test"],
        capture_output=True, check=False,
    )  # fmt: skip
    if made.returncode not in (0, 9):  # 9: the user exists already
        return None
    return pwd.getpwnam("tpconf-sshd-test")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Sshd:
    port: int
    user: str
    directory: Path


def _prepare(keys: ProxyKeys, user: pwd.struct_passwd) -> tuple[Path, int, Path]:
    """Write the agent-like files sshd reads; return (directory, port, config)."""
    directory = Path(tempfile.mkdtemp(prefix="tpconf-sshd-"))
    directory.chmod(0o755)
    port = _free_port()
    secret = keys.to_secret_data()
    for name in (HOST_PRIVATE_KEY, AUTHORIZED_KEYS):
        path = directory / name
        path.write_text(secret[name])
        path.chmod(0o600)
        os.chown(path, user.pw_uid, user.pw_gid)
    config = directory / "sshd_config"
    config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {directory / HOST_PRIVATE_KEY}\n"
        f"AuthorizedKeysFile {directory / AUTHORIZED_KEYS}\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "StrictModes no\n"
        "PidFile none\n"
        "UsePAM no\n"
        "AllowTcpForwarding yes\n"
        "GatewayPorts clientspecified\n"
        f"Subsystem sftp {SFTP_SERVER}\n"
        "LogLevel ERROR\n"
    )
    config.chmod(0o644)
    return directory, port, config


@pytest.fixture
async def sshd(keys: ProxyKeys) -> AsyncIterator[Sshd]:
    user = _sshd_user()
    if user is None:
        pytest.skip("running as root and no non-root user has a login shell to run sshd as")
    directory, port, config = _prepare(keys, user)
    log = directory / "sshd.log"
    with log.open("wb") as log_file:
        process = await anyio.open_process(
            [SSHD, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            user=user.pw_uid if os.getuid() == 0 else None,
            group=user.pw_gid if os.getuid() == 0 else None,
            extra_groups=[] if os.getuid() == 0 else None,
            start_new_session=True,
        )
    try:
        with anyio.fail_after(5):
            while True:
                if process.returncode is not None:
                    pytest.fail(f"sshd exited: {log.read_text()}")
                try:
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await anyio.sleep(0.02)
        yield Sshd(port=port, user=user.pw_name, directory=directory)
    finally:
        with anyio.CancelScope(shield=True):
            process.terminate()
            await process.wait()
            await process.aclose()
        shutil.rmtree(directory, ignore_errors=True)


async def test_openssh_accepts_the_generated_keys_and_runs_commands(
    sshd: Sshd, keys: ProxyKeys
) -> None:
    async with open_tunnel(("127.0.0.1", sshd.port), keys.credentials(sshd.user)) as tunnel:
        result = await tunnel.run("echo $USER; exit 4")
    assert result == (4, f"{sshd.user}\n".encode(), b"")


async def test_openssh_with_another_host_key_is_refused(
    sshd: Sshd, keys: ProxyKeys, other_keys: ProxyKeys
) -> None:
    credentials = keys.credentials(sshd.user)
    pinned_wrong = type(credentials)(
        username=sshd.user, client_key=keys.client_private_key, host_key=other_keys.host_public_key
    )
    with pytest.raises(HostKeyMismatch):
        async with open_tunnel(("127.0.0.1", sshd.port), pinned_wrong):
            pytest.fail("connected despite a wrong host key")


async def test_openssh_dial_half_close_and_bulk(sshd: Sshd, keys: ProxyKeys) -> None:
    async with open_tunnel(("127.0.0.1", sshd.port), keys.credentials(sshd.user)) as tunnel:
        async with (
            tcp_server("reply-after-eof") as port,
            await tunnel.dial("127.0.0.1", port) as stream,
        ):
            await stream.send(b"half")
            await stream.send_eof()
            with anyio.fail_after(5):
                assert b"".join([c async for c in stream]) == b"got HALF"
        async with tcp_server("echo") as port, await tunnel.dial("127.0.0.1", port) as stream:
            with anyio.fail_after(20):
                await _transfer(stream, 10 * 1024 * 1024)
        with pytest.raises(ConnectionRefusedError):
            await tunnel.dial("127.0.0.1", _free_port())


async def test_openssh_remote_forward_on_all_interfaces_and_refusals(
    sshd: Sshd, keys: ProxyKeys
) -> None:
    settings = TunnelSettings(command_timeout=5)
    async with (
        open_tunnel(
            ("127.0.0.1", sshd.port), keys.credentials(sshd.user), settings=settings
        ) as tunnel,
        tcp_server("echo") as local_port,
    ):
        forward = await tunnel.forward_remote(0, local_port)  # 0.0.0.0, as for `expose`
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", forward.port) as client:
                await client.send(b"ping")
                assert await client.receive() == b"ping"
        with socket.socket() as busy:
            busy.bind(("0.0.0.0", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(ForwardFailed, match=f"port {port}"):
                await tunnel.forward_remote(port, local_port)
        with pytest.raises(ForwardFailed, match="port 81") as caught:
            await tunnel.forward_remote(81, local_port)  # sshd is not root
        assert caught.value.hint is not None and "NET_BIND_SERVICE" in caught.value.hint


async def test_openssh_serves_pod_info_and_sftp(sshd: Sshd, keys: ProxyKeys) -> None:
    podinfo = sshd.directory / "podinfo.json"
    podinfo.write_text(
        '{"env": {"A": "1", "HOME": "/home/agent", "TPCONF_PORT": "8022"},'
        ' "resolv_conf": "nameserver 10.96.0.10\\nsearch ns.svc.cluster.local\\noptions ndots:5\\n",'
        ' "hostname": "web-1", "mounts": ["/var/run/secrets/kubernetes.io/serviceaccount"]}'
    )
    podinfo.chmod(0o644)
    async with open_tunnel(("127.0.0.1", sshd.port), keys.credentials(sshd.user)) as tunnel:
        info = await fetch_pod_info(tunnel, path=str(podinfo))
        assert dict(info.env) == {"A": "1"}
        assert info.resolv_conf.nameservers == ("10.96.0.10",)
        assert info.resolv_conf.ndots == 5
        async with await tunnel.open_sftp_stream() as stream:
            await stream.send(_sftp_init())
            with anyio.fail_after(5):
                reply = await stream.receive()
            assert reply[4] == 2  # SSH_FXP_VERSION
