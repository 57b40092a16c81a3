"""The ``existing`` operation followed from docs/agent.md and the hints alone.

The e2e test applies the Deployment of docs/agent.md exactly as written (the docs are what is
tested), runs ``existing`` through the public API, logs in over SSH, and checks that the keys
Secret outlives ``stop`` and ``down`` so that the Deployment's next pod still starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from tests.cluster.conftest import OWNER, PROJECT, Namespace, proxy_request
from tests.conftest import E2ECluster
from tpconf import errors
from tpconf.cluster import (
    AgentKeys,
    Cluster,
    DownReport,
    Existing,
    PodRef,
    Proxy,
    ProxyRequest,
    down,
    leftovers,
    start,
    stop,
    wait_for_pod,
)
from tpconf.cluster import labels as L
from tpconf.cluster import manifests as M
from tpconf.cluster.objects import check_ours, ours, released
from tpconf.config import DEFAULT_AGENT_IMAGE
from tpconf.tunnel import PortForwardTarget, ProxyKeys, kubectl_port_forward, open_tunnel

ROOT = Path(__file__).resolve().parents[2]
AGENT_DOCS = ROOT / "docs/agent.md"


def documented_deployment() -> dict[str, Any]:
    """The one Deployment among the YAML blocks of docs/agent.md."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", AGENT_DOCS.read_text(), re.MULTILINE | re.DOTALL)
    found = [d for d in map(yaml.safe_load, blocks) if (d or {}).get("kind") == "Deployment"]
    assert len(found) == 1, "docs/agent.md shows exactly one Deployment"
    return dict(found[0])


# ---- without a cluster ------------------------------------------------------------------------


def test_the_missing_mount_hint_gives_the_working_mode_and_the_secret_the_code_uses() -> None:
    body = documented_deployment()
    body["spec"]["template"]["spec"]["volumes"] = []
    with pytest.raises(errors.ClusterError) as info:
        M.check_existing(body, DEFAULT_AGENT_IMAGE)
    hint = info.value.hint or ""
    assert f"secretName: {M.keys_secret_name('tpconf-proxy')}," in hint
    assert M.KEYS_MODE == 0o440
    assert "defaultMode: 0440}" in hint
    assert yaml.safe_load("defaultMode: 0440")["defaultMode"] == M.KEYS_MODE


def test_the_documented_deployment_is_what_the_code_expects() -> None:
    body = documented_deployment()
    name = body["metadata"]["name"]
    assert M.check_existing(body, DEFAULT_AGENT_IMAGE) == "tpconf-agent"
    pod = body["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == DEFAULT_AGENT_IMAGE == "tpconf/agent:0.1.0"
    assert pod["volumes"] == [
        {
            "name": "tpconf-keys",
            "secret": {"secretName": M.keys_secret_name(name), "defaultMode": M.KEYS_MODE},
        }
    ]
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == M.KEYS_MOUNT


def _secret(annotations: dict[str, str], **labels: str) -> dict[str, Any]:
    labels = {L.MANAGED_BY: L.MANAGED_BY_VALUE, **labels}
    return {"metadata": {"name": "s", "labels": labels, "annotations": annotations}}


def test_a_released_secret_is_nobodys_and_may_be_claimed_by_anyone(keys: AgentKeys) -> None:
    held = _secret(L.owner_annotations(owner="alice@a", project="p"))
    free = _secret({})
    bob = proxy_request("ns", keys, operation=Existing("x"), owner="bob@b", project="q")
    assert ours(held, owner="alice@a", project="p") and not ours(held, owner="bob@b", project="q")
    assert ours(held, owner=None, project=None), "down --all: anyone's"
    assert released(free) and not released(held)
    assert not ours(free, owner="bob@b", project="q")
    check_ours(free, bob, "secrets")
    with pytest.raises(errors.ClusterError, match="in use by tpconf of alice@a") as info:
        check_ours(held, bob, "secrets")
    assert "tpconf down" in str(info.value.hint)
    mine = _secret({}, **{L.MANAGED_BY: "someone"})
    with pytest.raises(errors.ClusterError, match="not created by tpconf") as info:
        check_ours(mine, bob, "secrets")
    assert "kubectl -n ns delete secret s" in str(info.value.hint)


def test_down_reports_a_released_secret_as_kept() -> None:
    report = DownReport(released=['Secret "p-tpconf-keys" in namespace "n"'])
    assert report.lines() == [
        'released Secret "p-tpconf-keys" in namespace "n" (kept: its Deployment mounts it)'
    ]


# ---- on the real cluster ----------------------------------------------------------------------


def _request(ns: str, name: str, keys: ProxyKeys, **kwargs: Any) -> ProxyRequest:
    return proxy_request(
        ns,
        AgentKeys(keys.host_private_key, keys.client_public_key),
        name=name,
        operation=Existing(name),
        ports=(),
        **kwargs,
    )


async def _login(cluster: E2ECluster, pod: PodRef, keys: ProxyKeys) -> str:
    """Log in to the agent over a port-forward, pinning its host key; the login name."""
    target = PortForwardTarget(
        namespace=pod.namespace,
        resource=f"pod/{pod.pod}",
        kubectl=cluster.kubectl_path,
        kubeconfig=cluster.kubeconfig,
    )
    async with (
        kubectl_port_forward(target) as forward,
        open_tunnel(forward.endpoint, keys.credentials("tpconf")) as tunnel,
    ):
        return (await tunnel.run("id -un", timeout=20)).stdout.decode().strip()


async def _replacement(kube: Cluster, proxy: Proxy, old: PodRef) -> PodRef:
    """The Ready pod that replaced pod ``old``."""
    with anyio.fail_after(90):
        while True:
            pod = await wait_for_pod(kube, proxy, timeout=90)
            if pod.pod != old.pod:
                return pod
            await anyio.sleep(0.5)


@contextmanager
def _secret_kept(ns: Namespace, name: str) -> Iterator[None]:
    """The keys Secret is there, unchanged, after the block."""
    before = ns.core.read_namespaced_secret(name, ns.name)
    yield
    after = ns.core.read_namespaced_secret(name, ns.name)
    assert after.metadata.uid == before.metadata.uid
    assert after.data == before.data


@pytest.mark.e2e
@pytest.mark.anyio
@pytest.mark.timeout(240)
async def test_the_documented_existing_deployment_works_and_keeps_its_secret(
    cluster: E2ECluster, kube: Cluster, namespace: Namespace
) -> None:
    body = documented_deployment()
    name = body["metadata"]["name"]
    secret = M.keys_secret_name(name)
    namespace.apps.create_namespaced_deployment(namespace.name, body)
    first_keys = ProxyKeys.generate(comment="first")
    first = _request(namespace.name, name, first_keys)

    proxy = await start(kube, first)
    pod = await wait_for_pod(kube, proxy, timeout=90)
    assert await _login(cluster, pod, first_keys) == "tpconf"

    # Someone else's `up` cannot take the Deployment over while ours runs.
    bob_keys = ProxyKeys.generate(comment="bob")
    bob = _request(namespace.name, name, bob_keys, owner="bob@other", project="f" * 16)
    with pytest.raises(errors.ClusterError, match=f"in use by tpconf of {OWNER}"):
        await start(kube, bob)

    # The end of `up`, then `down` and `down --all`: the Secret stays, released.
    with _secret_kept(namespace, secret):
        await stop(kube, first)
        assert await down(kube, [namespace.name], owner=OWNER, project=PROJECT) == DownReport()
        everything = await down(kube, [namespace.name], owner=OWNER, project=PROJECT, all=True)
        assert everything == DownReport()
    kept = namespace.core.read_namespaced_secret(secret, namespace.name).metadata
    assert kept.labels[L.EXISTING] == name
    assert L.OWNER not in (kept.annotations or {})

    # So the Deployment's next pod starts (it mounts the Secret).
    namespace.core.delete_namespaced_pod(pod.pod, namespace.name)
    again = await _replacement(kube, proxy, pod)
    assert await _login(cluster, again, first_keys) == "tpconf"

    # A second `up` (here bob's) writes new keys and restarts the pods.
    proxy = await start(kube, bob)
    third = await _replacement(kube, proxy, again)
    assert await _login(cluster, third, bob_keys) == "tpconf"

    # bob's `up` is killed: `tpconf down` releases the Secret it held, and deletes nothing.
    found = await leftovers(kube, [namespace.name], owner="bob@other", project="f" * 16)
    assert found.lines() == [f'claimed Secret "{secret}" in namespace "{namespace.name}"']
    with _secret_kept(namespace, secret):
        report = await down(kube, [namespace.name], owner="bob@other", project="f" * 16)
    assert report.released == [f'Secret "{secret}" in namespace "{namespace.name}"']
    assert not report.deleted
    await start(kube, first)  # free again: ours can take it
    await stop(kube, first)
