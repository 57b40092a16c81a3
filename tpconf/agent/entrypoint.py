#!/usr/bin/python3
"""Entrypoint of the tpconf agent image (see docs/agent.md for the contract).

Runs as any uid (OpenShift assigns one, gid 0): makes sure that uid has a passwd entry named
`tpconf`, copies the keys from the mounted Secret into a private runtime directory (sshd refuses
group-readable host keys), records what the pod looks like in /tmp/tpconf/podinfo.json, writes
sshd's config and replaces itself with sshd in the foreground, which then receives SIGTERM as PID 1.

``tpconf-agent relay`` (run by tpconf through SSH, not by the pod) starts the relay of
``relay.py``: the data path of tpconf's connections, see there.

As an intercept sidecar (``--intercept APP:AGENT ...``) it stays PID 1 instead: it runs the
router (``router.py``: the listeners of the intercepted ports and their routes, configured over a
Unix socket that developers reach through SSH) and sshd as its child, and on SIGTERM stops both.

Standard library only: this file runs inside the image with Debian's python3, not in tpconf's
environment.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

KEYS = Path("/etc/tpconf/keys")
RUN = Path("/tmp/tpconf")
HOME = Path("/tmp/tpconf-home")
USER = "tpconf"
PORT = 8022
SSHD = "/usr/sbin/sshd"
#: The router's control socket (intercept mode); only the agent's uid can open it.
ROUTER_SOCKET = RUN / "router.sock"
#: Where the image keeps router.py (next to this file in the source tree).
LIBRARY = Path("/usr/local/lib/tpconf-agent")
#: Seconds an intercept sidecar keeps relaying open connections after SIGTERM.
DRAIN_SECONDS = 10.0

# Mount points that are the container runtime's or the agent's own, not the pod's volumes.
EXCLUDED_MOUNTS = frozenset(
    {"/", "/tmp", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf", str(KEYS), str(RUN), str(HOME)}
)
EXCLUDED_TREES = ("/proc", "/sys", "/dev")

SSHD_CONFIG = f"""\
# Written by the tpconf agent entrypoint at start-up; see docs/agent.md.
ListenAddress 127.0.0.1:{PORT}
HostKey {RUN}/host_key
AuthorizedKeysFile {RUN}/authorized_keys
PidFile none
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
PermitRootLogin no
PermitEmptyPasswords no
UsePAM no
StrictModes no
PermitUserEnvironment no
AllowUsers {USER}
AllowTcpForwarding yes
GatewayPorts clientspecified
AllowStreamLocalForwarding {{stream_local}}
AllowAgentForwarding no
X11Forwarding no
PermitTunnel no
MaxSessions 64
MaxStartups 64:30:256
ClientAliveInterval 5
ClientAliveCountMax 6
TCPKeepAlive yes
UseDNS no
PrintMotd no
PrintLastLog no
Subsystem sftp internal-sftp
LogLevel INFO
"""


def fail(message: str) -> None:
    sys.stderr.write(f"tpconf-agent: {message}\n")
    sys.exit(1)


def ensure_passwd_entry() -> None:
    """Give the current uid the login name `tpconf` (sshd refuses uids without a passwd entry).

    The image ships `tpconf` as uid 1000 and makes /etc/passwd writable by gid 0, so any uid
    that runs with gid 0 (OpenShift's rule) can rename itself.
    """
    uid, gid = os.getuid(), os.getgid()
    passwd = Path("/etc/passwd")
    lines = passwd.read_text().splitlines()
    wanted = f"{USER}:x:{uid}:{gid}:tpconf agent:{HOME}:/bin/sh"
    if wanted in lines:
        return
    others = [line for line in lines if line.split(":", 1)[0] != USER]
    try:
        passwd.write_text("\n".join([*others, wanted]) + "\n")
    except OSError as e:
        fail(
            f"cannot give uid {uid} a passwd entry, which sshd requires ({e}): run the agent "
            f"as uid 1000 (the image's default), or with gid 0 (runAsGroup: 0, the image's "
            f"default) and a writable root filesystem (no readOnlyRootFilesystem)"
        )


def install_keys() -> None:
    """Copy host key and authorized_keys out of the Secret mount into a 0700 directory."""
    for name in ("host_key", "authorized_keys"):
        if not (KEYS / name).is_file():
            fail(f"{KEYS / name} is missing: mount the proxy's Secret at {KEYS}")
    RUN.mkdir(mode=0o700, exist_ok=True)
    RUN.chmod(0o700)
    for name in ("host_key", "authorized_keys"):
        data = (KEYS / name).read_bytes()
        target = RUN / name
        target.unlink(missing_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def unescape_mount_path(path: str) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash as octal escapes."""
    for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(escaped, char)
    return path


def _symlink_aliases() -> dict[str, str]:
    """Resolved directory -> the symlink path that pod specs use (Debian: /var/run -> /run).

    The runtime resolves symlinks in a volume's mountPath, so the kernel lists
    /run/secrets/kubernetes.io/serviceaccount for a pod that declared /var/run/secrets/...;
    TELEPRESENCE_MOUNTS should show the path as declared (and as programs open it).
    """
    aliases: dict[str, str] = {}
    for link in ("/var/run", "/var/lock"):
        if os.path.islink(link):
            aliases[os.path.realpath(link)] = link
    return aliases


def volume_mounts() -> list[str]:
    paths: list[str] = []
    aliases = _symlink_aliases()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        path = unescape_mount_path(fields[1])
        for real, alias in aliases.items():
            if path.startswith(real + "/"):
                path = alias + path[len(real) :]
        if path in EXCLUDED_MOUNTS or path in paths:
            continue
        if any(path == tree or path.startswith(tree + "/") for tree in EXCLUDED_TREES):
            continue
        paths.append(path)
    return paths


def write_podinfo(env: dict[str, str]) -> None:
    try:
        resolv_conf = Path("/etc/resolv.conf").read_text()
    except OSError:
        resolv_conf = ""
    info = {
        "env": env,
        "resolv_conf": resolv_conf,
        "hostname": socket.gethostname(),
        "mounts": volume_mounts(),
    }
    tmp = RUN / "podinfo.json.tmp"
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    tmp.chmod(0o600)
    tmp.replace(RUN / "podinfo.json")


def own_address() -> str:
    """The pod's IP (the kubelet writes it into /etc/hosts for the pod's hostname)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def load_module(name: str) -> Any:
    """router.py or relay.py: in the image's library directory, or next to this file in the
    source tree."""
    sys.path.insert(0, str(LIBRARY if LIBRARY.is_dir() else Path(__file__).resolve().parent))
    return importlib.import_module(name)


def load_router() -> Any:
    return load_module("router")


async def intercept(router: Any, ports: dict[int, int], config: Path) -> int:
    """Run the router and sshd until SIGTERM; the exit code."""
    app = own_address()
    logging.basicConfig(level=logging.INFO, format="tpconf-agent: %(message)s")
    routes = router.Router(ports, app_host=app)
    await routes.start()
    control = await routes.serve_control(str(ROUTER_SOCKET))
    sshd = await asyncio.create_subprocess_exec(SSHD, "-D", "-e", "-f", str(config))
    shown = ", ".join(f"{a} -> {app}:{p}" for p, a in sorted(ports.items()))
    sys.stderr.write(f"tpconf-agent: intercepting {shown}; sshd on 127.0.0.1:{PORT}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sshd_exit = asyncio.create_task(sshd.wait())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([sshd_exit, stopped], return_when=asyncio.FIRST_COMPLETED)
    routes.close()
    control.close()
    if sshd.returncode is None:
        sshd.terminate()
    # Connections already open finish what they are doing (the pod is out of the Service's
    # endpoints by now), within the drain time.
    await routes.drain(DRAIN_SECONDS)
    try:
        code = await asyncio.wait_for(sshd_exit, 5)
    except TimeoutError:
        sshd.kill()
        return 1
    return 0 if stop.is_set() else (code or 1)


def main() -> None:
    if sys.argv[1:2] == ["relay"]:
        # tpconf's data path (relay.py): started by tpconf over SSH, as the SSH user, per session.
        load_module("relay").main()
        return
    parser = argparse.ArgumentParser(prog="tpconf-agent")
    parser.add_argument("--intercept", action="append", default=[], metavar="APP:AGENT")
    args = parser.parse_args()
    env = dict(os.environ)  # exactly as the container runtime gave it, before we touch anything
    umask = os.umask(0o077)
    ensure_passwd_entry()
    HOME.mkdir(mode=0o700, exist_ok=True)
    install_keys()
    write_podinfo(env)
    config = RUN / "sshd_config"
    # Developers reach an intercept's router socket with a direct-streamlocal channel.
    config.write_text(SSHD_CONFIG.format(stream_local="local" if args.intercept else "no"))
    os.umask(umask)
    if args.intercept:
        ports = {}
        for spec in args.intercept:
            app, _, agent = spec.partition(":")
            ports[int(app)] = int(agent)
        try:
            # libuv's event loop (Debian's python3-uvloop in the image) halves what the router
            # adds to each request (measured: +0.8 ms with asyncio's own loop, +0.5 ms).
            import uvloop  # type: ignore[import-not-found]

            uvloop.install()
        except ImportError:
            pass
        sys.exit(asyncio.run(intercept(load_router(), ports, config)))
    sys.stderr.write(f"tpconf-agent: uid {os.getuid()}, sshd on 127.0.0.1:{PORT}\n")
    sys.stderr.flush()
    # sshd becomes PID 1: it handles SIGTERM and reaps children. -e: log to stderr.
    os.execv(SSHD, [SSHD, "-D", "-e", "-f", str(config)])


if __name__ == "__main__":
    main()
