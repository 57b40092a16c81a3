"""The tunnel to a real agent pod: pinned SSH over `kubectl port-forward`, dial, pod info,
and reconnection after the pod is deleted. Drives tpconf.cluster and tpconf.tunnel directly."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import anyio
import pytest

from tests.conftest import E2ECluster
from tests.e2e.harness import helloworld
from tpconf import cluster as k8s
from tpconf.errors import HostKeyMismatch, TpconfError
from tpconf.tunnel import (
    PortForwardTarget,
    ProxyKeys,
    TunnelEvent,
    fetch_pod_info,
    kubectl_port_forward,
    open_tunnel,
    port_forward_transport,
    run_tunnel,
)
from tpconf.tunnel.kubeapi import api_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300), pytest.mark.anyio]


@dataclasses.dataclass
class Agent:
    client: k8s.Cluster
    proxy: k8s.Proxy
    pod: k8s.PodRef
    keys: ProxyKeys
    target: PortForwardTarget


@pytest.fixture
async def agent(cluster: E2ECluster, namespace: str) -> AsyncIterator[Agent]:
    helloworld(cluster, namespace)
    client = await anyio.to_thread.run_sync(cluster.connect, namespace)
    keys = ProxyKeys.generate(comment="e2e")
    request = k8s.ProxyRequest(
        name="agent",
        namespace=namespace,
        operation=k8s.New(),
        agent_image="tpconf/agent:0.1.0",
        session_id=uuid.uuid4().hex[:12],
        owner="e2e@test",
        project="e2e",
        keys=k8s.AgentKeys(keys.host_private_key, keys.client_public_key),
    )
    proxy = await k8s.start(client, request)
    try:
        pod = await k8s.wait_for_pod(client, proxy)
        target = PortForwardTarget(
            namespace=namespace,
            resource=f"pod/{pod.pod}",
            kubectl=cluster.kubectl_path,
            kubeconfig=cluster.kubeconfig,
        )
        yield Agent(client, proxy, pod, keys, target)
    finally:
        with anyio.CancelScope(shield=True):
            await k8s.stop(client, request)


async def test_pinned_ssh_dial_and_pod_info(agent: Agent, namespace: str) -> None:
    async with (
        kubectl_port_forward(agent.target) as forward,
        open_tunnel(forward.endpoint, agent.keys.credentials("tpconf")) as tunnel,
    ):
        info = await fetch_pod_info(tunnel)
        assert info.env["KUBERNETES_SERVICE_HOST"].startswith("10.")
        assert info.env["HELLOWORLD_SERVICE_HOST"].startswith("10.")
        assert f"{namespace}.svc.cluster.local" in info.resolv_conf.search
        stream = await tunnel.dial(f"helloworld.{namespace}.svc.cluster.local", 80)
        async with stream:
            await stream.send(b"GET / HTTP/1.0\r\n\r\n")
            body = b""
            with anyio.fail_after(10):
                try:
                    while True:
                        body += await stream.receive()
                except anyio.EndOfStream:
                    pass
        assert b"Welcome to nginx!" in body


async def test_a_wrong_host_key_is_refused(agent: Agent) -> None:
    other = ProxyKeys.generate(comment="impostor")
    wrong = dataclasses.replace(agent.keys.credentials("tpconf"), host_key=other.host_public_key)
    async with kubectl_port_forward(agent.target) as forward:
        with pytest.raises(HostKeyMismatch):
            async with open_tunnel(forward.endpoint, wrong):
                pass


async def test_deleting_the_agent_pod_reconnects_by_itself(
    agent: Agent, cluster: E2ECluster, namespace: str
) -> None:
    events: list[TunnelEvent] = []

    async def current() -> PortForwardTarget:
        pod = await k8s.wait_for_pod(agent.client, agent.proxy, timeout=120)
        return dataclasses.replace(agent.target, resource=f"pod/{pod.pod}")

    async with anyio.create_task_group() as tg:
        tunnel = await tg.start(
            partial(run_tunnel, on_state=events.append),
            port_forward_transport(current),
            agent.keys.credentials("tpconf"),
        )
        first = (await tunnel.run("hostname")).stdout.strip()
        cluster.kubectl("-n", namespace, "delete", "pod", agent.pod.pod, "--wait=false")
        with anyio.fail_after(120):
            while True:
                await anyio.sleep(0.5)
                try:
                    second = (await tunnel.run("hostname", timeout=5)).stdout.strip()
                except TpconfError as exc:  # the tunnel is reconnecting: try again
                    print(f"not yet: {exc}")
                    continue
                if second != first:
                    break
        assert [e.state.value for e in events if e.state.value == "reconnecting"]
        stream = await tunnel.dial(f"helloworld.{namespace}", 80)
        await stream.aclose()
        tg.cancel_scope.cancel()


def _api_connections(port: int) -> list[tuple[str, int]]:
    """This process's TCP connections to the API server's ``port``: (local address, port)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in inodes and int(remote.split(":")[1], 16) == port and fields[3] == "01":
            ip = ".".join(str(b) for b in reversed(bytes.fromhex(local.split(":")[0])))
            found.append((ip, int(local.split(":")[1], 16)))
    return found


async def test_in_process_port_forward_carries_dial_over_the_relay_and_recovers_a_cut(
    agent: Agent, namespace: str
) -> None:
    """No kubectl child: SSH and the relay ride this process's own port-forward connection;
    cutting that connection (as a dropped API server connection would) reconnects both."""
    events: list[TunnelEvent] = []
    api = await api_server(agent.target.kubeconfig, None)
    assert api is not None  # the local cluster's kubeconfig: a client certificate
    async with anyio.create_task_group() as tg:
        tunnel = await tg.start(
            partial(run_tunnel, on_state=events.append),
            port_forward_transport(agent.target),
            agent.keys.credentials("tpconf"),
        )
        live = tunnel.current
        assert live is not None and await live.relay_ready() is not None
        host = f"helloworld.{namespace}.svc.cluster.local"
        with anyio.fail_after(30):
            async with await tunnel.dial(host, 80) as stream:
                await stream.send(b"GET / HTTP/1.0\r\n\r\n")
                await stream.send_eof()  # half-close: nginx still answers
                body = b"".join([chunk async for chunk in stream])
        assert b"Welcome to nginx!" in body
        for local, port in _api_connections(api.port):
            await anyio.run_process(
                ["ss", "-K", "-t", "src", f"{local}:{port}", "dst", f"{api.host}:{api.port}"]
            )
        with anyio.fail_after(60):
            while tunnel.current is live or tunnel.current is None:  # noqa: ASYNC110 (the supervisor's state)
                await anyio.sleep(0.1)
            async with await tunnel.dial(host, 80) as stream:
                await stream.send(b"GET / HTTP/1.0\r\n\r\n")
                assert (await stream.receive()).startswith(b"HTTP/1.1 200")
        assert tunnel.current is not None and await tunnel.current.relay_ready() is not None
        assert "reconnecting" in [e.state.value for e in events]
        tg.cancel_scope.cancel()


async def test_a_killed_kubectl_port_forward_child_is_replaced(
    agent: Agent, namespace: str
) -> None:
    """The fallback transport (a `kubectl port-forward` child, as with TPCONF_PORT_FORWARD=kubectl):
    its child killed with SIGKILL, the tunnel starts another and dials again."""
    events: list[TunnelEvent] = []
    target = dataclasses.replace(agent.target, in_process=False)
    async with anyio.create_task_group() as tg:
        tunnel = await tg.start(
            partial(run_tunnel, on_state=events.append),
            port_forward_transport(target),
            agent.keys.credentials("tpconf"),
        )
        (child,) = _port_forward_children()
        os.kill(child, signal.SIGKILL)
        host = f"helloworld.{namespace}.svc.cluster.local"
        with anyio.fail_after(60):
            while True:
                await anyio.sleep(0.2)
                try:
                    stream = await tunnel.dial(host, 80)
                except TpconfError as exc:  # the tunnel is reconnecting: try again
                    print(f"not yet: {exc}")
                    continue
                async with stream:
                    await stream.send(b"GET / HTTP/1.0\r\n\r\n")
                    assert (await stream.receive()).startswith(b"HTTP/1.1 200")
                break
        (replacement,) = _port_forward_children()
        assert replacement != child
        assert "reconnecting" in [e.state.value for e in events]
        tg.cancel_scope.cancel()


def _port_forward_children() -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(os.getpid()), "-f", "port-forward"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    return [int(pid) for pid in out.split()]
