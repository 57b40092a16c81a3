"""The tunnel to a real agent pod: pinned SSH over `kubectl port-forward`, dial, pod info,
and reconnection after the pod is deleted. Drives tpconf.cluster and tpconf.tunnel directly."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from functools import partial

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
