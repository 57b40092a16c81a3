"""The vpn-tcp variants: a real ``tpconf up`` with ``method: vpn-tcp`` in a "laptop" netns.

As tests/e2e/test_vpn.py does it (the machine's own routing is never touched):

- a network namespace ``tpbench<N>`` with a veth pair to the host (``10.248.N.0/30``), a
  default route via the host end, ``/etc/netns/<ns>/resolv.conf`` naming the host end as its
  nameserver, and a kubeconfig pointing at the node's address (the host's ``127.0.0.1`` is not
  the namespace's). The host drops everything it would *forward* from the veth, so the
  namespace reaches the cluster's pod and Service addresses only through tpconf;
- ``ip netns exec NS python -m tpconf up`` with one ``new`` deployment, ``method: vpn-tcp``,
  ``volumes: false``, in the bench namespace: its iptables rules (``TPCONF-*`` chains) and DNS
  redirect live in the namespace;
- the measuring client, ``ip netns exec NS python -m bench.nsworker`` (:mod:`bench.nsworker`),
  is an ordinary process of the "machine": its connections to the echo Service's ClusterIP are
  redirected by the kernel to tpconf's transparent proxy, its ``getaddrinfo`` goes to the
  nameserver of its resolv.conf and is redirected to tpconf's DNS server.

For uncached DNS lookups, ``dns-0`` … ``dns-K`` Services (same selector as ``echo``) are created
beside it: each uncached sample asks a name tpconf has never seen.

Cleanup, also on failure: the worker is stopped, ``tpconf up`` gets SIGINT (its own cleanup)
and then SIGKILL for whatever is left (:class:`bench.uphost.UpProcess`), ``tpconf down`` runs
in the namespace (removes leftover ``TPCONF-*`` chains), then the iptables rules on the host,
the veth, ``/etc/netns/<ns>`` and the namespace are removed. Without root nothing is created
and the rows say ``not measured: needs root``.
"""

from __future__ import annotations

import json
import os
import random
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml

from bench.echo import PORT
from bench.kube import BenchNamespace, kubeconfig
from bench.uphost import TPCONF, UpProcess, up_env

NEEDS_ROOT = "not measured: needs root"
DEPLOYMENT = "vpnbench"
ROOT = Path(__file__).resolve().parent.parent


def _sh(*args: str, check: bool = True, timeout: float = 30.0) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def node_address() -> str:
    """The host's address on its default route: the API server as seen from the namespace."""
    match = re.search(r"\bsrc (\S+)", _sh("ip", "-4", "route", "get", "1.1.1.1"))
    if not match:
        raise RuntimeError("no source address on the default route")
    return match.group(1)


class NetnsWorker:
    """:mod:`bench.nsworker` in the namespace; :meth:`call` = one request, one answer."""

    def __init__(self, netns: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "bench.nsworker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            cwd=ROOT,
        )
        self._buffer = b""
        self._read(30)

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(f"bench.nsworker: no answer within {timeout:g} s")
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"bench.nsworker exited ({self.proc.poll()})")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        answer = self._read(timeout)
        if "error" in answer:
            raise RuntimeError(f"vpn-tcp {op}: {answer['error']}")
        return answer

    def value(self, op: str, timeout: float = 60.0, **args: Any) -> float:
        return float(self.call(op, timeout, **args)["value"])

    def close(self) -> None:
        with suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Laptop:
    """The namespace and everything made for it; :meth:`close` undoes it in reverse order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._undo: list[list[str]] = []
        n = random.randint(2, 250)
        existing = _sh("ip", "netns", "list", check=False)
        while f"tpbench{n} " in f"{existing} " or f"tpbench{n}\n" in existing:
            n = random.randint(2, 250)
        self.netns, self.host_if, ns_if = f"tpbench{n}", f"tpbh{n}", f"tpbn{n}"
        self.gateway, inside = f"10.248.{n}.1", f"10.248.{n}.2"
        self.kubeconfig = folder / "kubeconfig"
        try:
            self._do(["ip", "netns", "add", self.netns], ["ip", "netns", "del", self.netns])
            self._do(
                ["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", ns_if],
                ["ip", "link", "del", self.host_if],
            )
            _sh("ip", "link", "set", ns_if, "netns", self.netns)
            _sh("ip", "addr", "add", f"{self.gateway}/30", "dev", self.host_if)
            _sh("ip", "link", "set", self.host_if, "up")
            for cmd in (
                ["ip", "addr", "add", f"{inside}/30", "dev", ns_if],
                ["ip", "link", "set", ns_if, "up"],
                ["ip", "link", "set", "lo", "up"],
                ["ip", "route", "add", "default", "via", self.gateway],
            ):
                self.run(*cmd)
            # Only tunnels reach the cluster: nothing is forwarded from the laptop.
            rule = ["FORWARD", "-i", self.host_if, "-j", "DROP"]
            self._do(["iptables", "-w", "5", "-I", *rule], ["iptables", "-w", "5", "-D", *rule])
            etc = Path("/etc/netns") / self.netns
            etc.mkdir(parents=True, exist_ok=True)
            self._undo.append(["rm", "-rf", str(etc)])
            (etc / "resolv.conf").write_text(f"nameserver {self.gateway}\n")
            config = yaml.safe_load(Path(kubeconfig() or "~/.kube/config").expanduser().read_text())
            for entry in config["clusters"]:
                server = entry["cluster"]["server"]
                entry["cluster"]["server"] = re.sub(
                    r"//(127\.0\.0\.1|localhost)(?=[:/]|$)", f"//{node_address()}", server
                )
            self.kubeconfig.write_text(yaml.safe_dump(config))
        except BaseException:
            self.close()
            raise

    def _do(self, cmd: list[str], undo: list[str]) -> None:
        _sh(*cmd)
        self._undo.append(undo)

    def run(self, *args: str, timeout: float = 30.0) -> str:
        return _sh("ip", "netns", "exec", self.netns, *args, timeout=timeout)

    def env(self) -> dict[str, str]:
        env = up_env()
        env["KUBECONFIG"] = str(self.kubeconfig)
        return env

    def close(self) -> None:
        for cmd in reversed(self._undo):
            with suppress(Exception):
                _sh(*cmd, check=False)
        self._undo.clear()


def _config(namespace: str) -> str:
    deployment = {"new": True, "method": "vpn-tcp", "volumes": False}
    doc = {"version": 1, "namespace": namespace, "deployments": {DEPLOYMENT: deployment}}
    return json.dumps(doc, indent=2)


class VpnSession:
    """The running vpn-tcp side: ``tpconf up`` in the laptop, the worker, the DNS Services."""

    def __init__(self, laptop: Laptop, up: UpProcess, dns_names: dict[str, str]) -> None:
        self.laptop = laptop
        self.up = up
        self.dns_names = dns_names
        """Service name -> ClusterIP, each to be looked up uncached once."""
        self.worker: NetnsWorker | None = None
        self.ready_seconds: float | None = None
        self.error = ""

    def wait_ready(self, timeout: float = 120.0) -> NetnsWorker:
        """Until tpconf says the deployment is ready; then the worker (started once)."""
        if self.worker is None:
            at = self.up.wait_line(rf"^{DEPLOYMENT} ready", timeout)
            self.ready_seconds = at - self.up.started
            self.worker = NetnsWorker(self.laptop.netns)
        return self.worker


@contextmanager
def vpn_session(ns: BenchNamespace, dns_lookups: int) -> Iterator[VpnSession]:
    """Start ``tpconf up`` (vpn-tcp) in a fresh laptop namespace; ready: :meth:`wait_ready`."""
    folder = Path(tempfile.mkdtemp(prefix="tpconf-bench-vpn-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, folder, True)
        laptop = Laptop(folder)
        stack.callback(laptop.close)
        project = folder / "project"
        project.mkdir()
        (project / "telepresence.yaml").write_text(_config(ns.name))
        up = UpProcess(project, prefix=["ip", "netns", "exec", laptop.netns], env=laptop.env())
        stack.callback(_down, laptop, project)
        stack.callback(up.stop)
        up.start()
        names = {}
        for i in range(dns_lookups):
            body = {
                "metadata": {"name": f"dns-{i}"},
                "spec": {"selector": {"app": "echo"}, "ports": [{"port": PORT}]},
            }
            service = ns.core.create_namespaced_service(ns.name, body)
            names[f"dns-{i}"] = str(service.spec.cluster_ip)
        session = VpnSession(laptop, up, names)
        try:
            yield session
        finally:
            if session.worker is not None:
                session.worker.close()


def _down(laptop: Laptop, project: Path) -> None:
    """``tpconf down`` in the namespace: whatever ``up`` left (``TPCONF-*`` chains)."""
    proc = subprocess.run(
        ["ip", "netns", "exec", laptop.netns, *TPCONF[:-1], "down"],
        cwd=project,
        env=laptop.env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        print(f"bench: tpconf down (vpn laptop) failed: {proc.stderr[-1000:]}", file=sys.stderr)
    with suppress(Exception):
        if "TPCONF" in laptop.run("iptables-save", "-t", "nat"):
            print("bench: TPCONF chains left in the laptop namespace", file=sys.stderr)
