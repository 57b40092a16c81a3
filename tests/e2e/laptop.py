"""A "laptop" in a network namespace made by the test: its only way to the cluster's networks is
tpconf. It reaches the API server (a local address of the host) through a veth, but the host drops
everything it would forward from that veth, so pod and Service addresses, and two extra host
addresses, are reachable only through tunnels. Used by the vpn-tcp and fault e2e tests.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import E2ECluster
from tests.e2e.harness import TPCONF, Up, tpconf_env


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Laptop:
    netns: str
    host_if: str
    gateway: str
    kubeconfig: Path
    listed: str  # also-proxy address, reachable only from the cluster
    unlisted: str  # same kind of address, not in also-proxy
    api_server: str = ""
    """The API server's address as the laptop reaches it (the node's IP)."""

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def nat_rules(self) -> str:
        return self.run("iptables-save", "-t", "nat").stdout


def _marker_server(address: str) -> socket.socket:
    server = socket.create_server((address, 8099))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(1024)
                body = f"marker {address}\n".encode()
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    threading.Thread(target=serve, daemon=True).start()
    return server


@contextmanager
def make_laptop(cluster: E2ECluster, tmp_path: Path) -> Iterator[Laptop]:
    """A laptop namespace, torn down afterwards (root: network namespaces, iptables)."""
    if os.geteuid() != 0:
        pytest.skip("vpn-tcp needs root (network namespaces, iptables)")
    n = random.randint(2, 250)
    ns, host_if, ns_if = f"tpvpn{n}", f"tpvh{n}", f"tpvn{n}"
    gateway, inside = f"10.249.{n}.1", f"10.249.{n}.2"
    listed, unlisted = f"10.77.{n}.1", f"10.78.{n}.1"
    node_ip = sh("sh", "-c", "ip -4 route get 1.1.1.1 | awk '{print $7; exit}'").stdout.strip()
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    for entry in config["clusters"]:
        entry["cluster"]["server"] = f"https://{node_ip}:6443"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    undo: list[list[str]] = []
    servers: list[socket.socket] = []
    try:
        sh("ip", "netns", "add", ns)
        undo.append(["ip", "netns", "del", ns])
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        undo.append(["ip", "link", "del", host_if])
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{gateway}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        for cmd in (
            ["ip", "addr", "add", f"{inside}/30", "dev", ns_if],
            ["ip", "link", "set", ns_if, "up"],
            ["ip", "link", "set", "lo", "up"],
            ["ip", "route", "add", "default", "via", gateway],
        ):
            sh("ip", "netns", "exec", ns, *cmd)
        # Nothing the host would forward from the laptop gets through: only tunnels reach the
        # cluster. The two marker addresses are the host's own, so they are dropped on INPUT.
        for rule in (
            ["FORWARD", "-i", host_if, "-j", "DROP"],
            ["INPUT", "-i", host_if, "-d", listed, "-j", "DROP"],
            ["INPUT", "-i", host_if, "-d", unlisted, "-j", "DROP"],
        ):
            sh("iptables", "-I", *rule)
            undo.append(["iptables", "-D", *rule])
        for address in (listed, unlisted):
            sh("ip", "addr", "add", f"{address}/32", "dev", "lo")
            undo.append(["ip", "addr", "del", f"{address}/32", "dev", "lo"])
            servers.append(_marker_server(address))
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {gateway}\n")
        undo.append(["rm", "-rf", str(etc)])
        yield Laptop(ns, host_if, gateway, kubeconfig, listed, unlisted, node_ip)
    finally:
        for server in servers:
            server.close()
        for cmd in reversed(undo):
            sh(*cmd, check=False)


class NetnsUp(Up):
    """`tpconf up` inside the laptop namespace."""

    def __init__(self, cluster: E2ECluster, project: Path, laptop: Laptop) -> None:
        super().__init__(cluster, project)
        self.laptop = laptop

    def start(self, *args: str) -> NetnsUp:
        env = tpconf_env(self.cluster)
        env["KUBECONFIG"] = str(self.laptop.kubeconfig)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.laptop.netns, *TPCONF, "up", *args],
            cwd=self.project, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        return self


def netns_down(
    cluster: E2ECluster, project: Path, laptop: Laptop
) -> subprocess.CompletedProcess[str]:
    """`tpconf down` inside the laptop."""
    env = tpconf_env(cluster)
    env["KUBECONFIG"] = str(laptop.kubeconfig)
    return subprocess.run(
        ["ip", "netns", "exec", laptop.netns, *TPCONF, "down"], cwd=project, env=env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
