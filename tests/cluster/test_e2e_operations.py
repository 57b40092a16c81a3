"""new / swap / restore / existing / down / preflight against the real local cluster.

Each test has its own namespace. Nothing is mocked: the agent image is the one `make
agent-image` loaded, workloads run tpconf.local/debian:12.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tests.cluster.conftest import (
    AGENT_IMAGE,
    OWNER,
    PROJECT,
    REPO,
    Namespace,
    config_map,
    proxy_request,
    workload,
)
from tests.conftest import E2ECluster, admin_ca_data
from tests.e2e.harness import container, deployment, secret_volume
from tpconf import errors
from tpconf.cluster import (
    AgentKeys,
    Cluster,
    Existing,
    New,
    Swap,
    down,
    existing,
    from_token,
    new,
    preflight,
    restore,
    stop,
    swap,
    wait_for_pod,
)
from tpconf.cluster import labels as L
from tpconf.reconcile.session import Session

pytestmark = [pytest.mark.e2e, pytest.mark.anyio, pytest.mark.timeout(180)]


def make_workload(ns: Namespace, name: str = "web", replicas: int = 2) -> None:
    ns.core.create_namespaced_config_map(ns.name, config_map(name))
    ns.apps.create_namespaced_deployment(ns.name, workload(name, replicas))


async def wait_replicas(ns: Namespace, name: str, ready: int, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while True:
            dep = await anyio.to_thread.run_sync(ns.deployment, name)
            if (dep.status.ready_replicas or 0) == ready and (dep.status.replicas or 0) == ready:
                return
            await anyio.sleep(0.3)


def pods_of(ns: Namespace, selector: str) -> list[Any]:
    return [
        p
        for p in ns.core.list_namespaced_pod(ns.name, label_selector=selector).items
        if p.metadata.deletion_timestamp is None
    ]


async def test_new_creates_a_deployment_and_service_whose_pod_becomes_ready(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    req = proxy_request(namespace.name, keys, ports=(8080, 9090))
    seen: list[str] = []
    proxy = await new(kube, req, progress=seen.append)
    pod = await wait_for_pod(kube, proxy, timeout=90, progress=seen.append)
    assert seen[-1].endswith("Ready")
    assert pod.container == "tpconf-agent"
    svc = namespace.core.read_namespaced_service("web", namespace.name)
    assert [(p.name, p.port, p.target_port) for p in svc.spec.ports] == [
        ("tcp-8080", 8080, 8080),
        ("tcp-9090", 9090, 9090),
    ]
    dep = namespace.deployment("web")
    secret = namespace.core.read_namespaced_secret("web-tpconf-keys", namespace.name)
    assert secret.metadata.owner_references[0].uid == dep.metadata.uid
    for meta in (dep.metadata, svc.metadata, secret.metadata):
        assert meta.labels[L.MANAGED_BY] == "tpconf"
        assert meta.labels[L.SESSION] == req.session_id
        assert meta.annotations[L.OWNER] == OWNER
    # Re-running `up` (new session) replaces our own objects instead of failing.
    again = proxy_request(namespace.name, keys, ports=(8080,))
    proxy2 = await new(kube, again)
    await wait_for_pod(kube, proxy2, timeout=90)
    assert namespace.deployment("web").metadata.labels[L.SESSION] == again.session_id
    done = await stop(kube, again)
    assert 'Deployment "web" in namespace "' + namespace.name + '"' in done[0]


async def test_new_refuses_to_take_over_an_object_that_is_not_ours(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    make_workload(namespace, "web", 1)
    with pytest.raises(errors.ClusterError, match="already exists and was not created by tpconf"):
        await new(kube, proxy_request(namespace.name, keys))


async def test_swap_replaces_the_pods_keeping_labels_env_and_volumes_then_restores(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    make_workload(namespace, "web", 2)
    await wait_replicas(namespace, "web", 2)
    req = proxy_request(namespace.name, keys, name="api", operation=Swap("web"))
    proxy = await swap(kube, req)
    assert proxy.deployment == "web-tpconf"
    assert proxy.container == "app"
    assert proxy.ports == (8080,)
    ref = await wait_for_pod(kube, proxy, timeout=90)

    pod = namespace.core.read_namespaced_pod(ref.pod, namespace.name)
    assert pod.metadata.labels["app"] == "web", "the original's Services select the proxy"
    app, sidecar = pod.spec.containers
    assert app.image == AGENT_IMAGE
    assert app.readiness_probe is None, "no exec into the agent every second"
    assert "/dev/tcp/127.0.0.1/8022" in app.startup_probe.var_exec.command[-1]
    assert [(e.name, e.value) for e in app.env] == [("GREETING", "hello from the pod")]
    assert app.env_from[0].config_map_ref.name == "web-config"
    assert {m.mount_path for m in app.volume_mounts} >= {"/etc/app", "/etc/tpconf/keys"}
    assert sidecar.image == "tpconf.local/debian:12"
    assert app.security_context.run_as_user == 2000, "the workload's own uid is kept"

    original = namespace.deployment("web")
    assert original.spec.replicas == 0
    annotations = original.metadata.annotations
    assert annotations[L.SWAPPED_BY] == OWNER
    assert annotations[L.ORIGINAL_REPLICAS] == "2"
    assert annotations[L.SWAP_SESSION] == req.session_id
    assert annotations[L.PROXY_DEPLOYMENT] == "web-tpconf"

    # No fight between the ReplicaSets: the original's selector matches the proxy pod too.
    await wait_replicas(namespace, "web", 0)
    await anyio.sleep(3)
    assert [p.metadata.name for p in pods_of(namespace, "app=web")] == [ref.pod]
    assert namespace.deployment("web").spec.replicas == 0

    # A second swap, by someone else, is refused with who and how.
    other = proxy_request(
        namespace.name, keys, name="api", operation=Swap("web"), owner="bob@other"
    )
    with pytest.raises(errors.AlreadySwapped, match=f"already swapped by {OWNER}") as info:
        await swap(kube, other)
    assert info.value.hint is not None and "tpconf down" in info.value.hint

    done = await restore(kube, namespace.name, "web", owner=OWNER, project=PROJECT)
    assert done
    restored = namespace.deployment("web")
    assert restored.spec.replicas == 2
    assert not set(restored.metadata.annotations or {}) & set(L.SWAP_ANNOTATIONS)
    with pytest.raises(ApiException) as gone:
        namespace.deployment("web-tpconf")
    assert gone.value.status == 404
    await wait_replicas(namespace, "web", 2)
    assert await restore(kube, namespace.name, "web", owner=OWNER, project=PROJECT) == []


async def test_swap_of_a_missing_container_lists_the_containers(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    make_workload(namespace, "web", 1)
    req = proxy_request(namespace.name, keys, operation=Swap("web", "db"))
    with pytest.raises(errors.NotFound, match=r"containers: app, sidecar"):
        await swap(kube, req)
    assert not (namespace.deployment("web").metadata.annotations or {}).get(L.SWAPPED_BY)


CHILD = textwrap.dedent(
    """
    import sys, anyio
    from tpconf.cluster import AgentKeys, ProxyRequest, Swap, connect, swap
    kubeconfig, namespace, host_key, authorized = sys.argv[1:5]
    async def main():
        c = connect(kubeconfig=kubeconfig, namespace=namespace)
        req = ProxyRequest(name="api", namespace=namespace, operation=Swap("web"),
                           agent_image="tpconf/agent:0.1.0", session_id="child",
                           owner="e2e@tests", project="0123456789abcdef",
                           keys=AgentKeys(host_key, authorized))
        await swap(c, req)
        print("swapped", flush=True)
        await anyio.sleep(3600)
    anyio.run(main)
    """
)


async def test_down_restores_a_swap_whose_process_was_killed_with_sigkill(
    cluster: E2ECluster, kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    make_workload(namespace, "web", 2)
    await wait_replicas(namespace, "web", 2)
    argv = [sys.executable, "-c", CHILD, cluster.kubeconfig, namespace.name]
    argv += [keys.host_private_key, keys.authorized_keys]
    async with await anyio.open_process(argv, stdout=subprocess.PIPE, cwd=REPO) as child:
        try:
            assert child.stdout is not None
            out = b""
            with anyio.fail_after(60):
                while b"\n" not in out:
                    out += await child.stdout.receive()
            assert out.strip() == b"swapped"
        finally:
            os.kill(child.pid, signal.SIGKILL)
            await child.wait()
    assert child.returncode == -signal.SIGKILL
    assert namespace.deployment("web").spec.replicas == 0

    # Someone else's down does not touch it; ours does.
    assert (await down(kube, [namespace.name], owner="bob@other", project=PROJECT)).lines() == [
        "nothing to clean up"
    ]
    report = await down(kube, [namespace.name], owner=OWNER, project=PROJECT)
    assert any('Deployment "web"' in r and "replicas 2" in r for r in report.restored)
    assert any('"web-tpconf"' in d for d in report.deleted)
    assert namespace.deployment("web").spec.replicas == 2
    await wait_replicas(namespace, "web", 2)
    again = await down(kube, [namespace.name], owner=OWNER, project=PROJECT)
    assert again.lines() == ["nothing to clean up"]


async def test_the_next_up_adopts_our_own_crashed_swap_and_keeps_the_original_replicas(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    make_workload(namespace, "web", 2)
    first = proxy_request(namespace.name, keys, name="api", operation=Swap("web"))
    await swap(kube, first)  # ... and then the process "crashes": nothing restored
    second = proxy_request(namespace.name, keys, name="api", operation=Swap("web"))
    seen: list[str] = []
    proxy = await swap(kube, second, progress=seen.append)
    assert any("adopting" in s for s in seen)
    await wait_for_pod(kube, proxy, timeout=90)
    annotations = namespace.deployment("web").metadata.annotations
    assert annotations[L.ORIGINAL_REPLICAS] == "2"
    assert annotations[L.SWAP_SESSION] == second.session_id
    await stop(kube, second)
    assert namespace.deployment("web").spec.replicas == 2


def existing_proxy(name: str, image: str) -> dict[str, Any]:
    """A user's own Deployment running the agent, as docs/agent.md describes."""
    proxy = container(
        "proxy",
        image,
        startupProbe={
            "exec": {"command": ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8022"]},
            "periodSeconds": 1,
            "failureThreshold": 120,
        },
        securityContext={"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    )
    keys = secret_volume(
        "keys", "/etc/tpconf/keys", secret=f"{name}-tpconf-keys", read_only=True, mode=0o440
    )
    return deployment(
        name,
        replicas=1,
        containers=[proxy],
        volumes=[keys],
        terminationGracePeriodSeconds=1,
        securityContext={"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    )


async def test_existing_uses_a_deployment_running_the_agent_and_explains_a_bad_one(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    namespace.apps.create_namespaced_deployment(namespace.name, existing_proxy("good", AGENT_IMAGE))
    namespace.apps.create_namespaced_deployment(
        namespace.name, existing_proxy("bad", "tpconf.local/debian:12")
    )
    seen: list[str] = []
    req = proxy_request(namespace.name, keys, name="good", operation=Existing("good"))
    proxy = await existing(kube, req, progress=seen.append)
    ref = await wait_for_pod(kube, proxy, timeout=90, progress=seen.append)
    assert ref.container == "proxy"
    secret = namespace.core.read_namespaced_secret("good-tpconf-keys", namespace.name)
    assert secret.metadata.labels[L.MANAGED_BY] == "tpconf"
    # Same keys again: the pod is not restarted.
    again = await existing(kube, req)
    assert (await wait_for_pod(kube, again, timeout=30)).pod == ref.pod

    bad = proxy_request(namespace.name, keys, name="bad", operation=Existing("bad"))
    with pytest.raises(
        errors.ClusterError, match=r"does not run the tpconf agent.*proxy=tpconf.local/debian:12"
    ):
        await existing(kube, bad)
    missing = proxy_request(namespace.name, keys, name="x", operation=Existing("nope"))
    with pytest.raises(errors.NotFound, match='Deployment "nope"'):
        await existing(kube, missing)


async def test_a_namespace_enforcing_restricted_admits_the_agent_even_with_a_low_port(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    namespace.label(
        {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }
    )
    proxy = await new(kube, proxy_request(namespace.name, keys, ports=(8080, 80)))
    ref = await wait_for_pod(kube, proxy, timeout=90)
    pod = namespace.core.read_namespaced_pod(ref.pod, namespace.name)
    sysctls = {s.name: s.value for s in pod.spec.security_context.sysctls}
    assert sysctls == {"net.ipv4.ip_unprivileged_port_start": "80"}


async def test_a_restricted_namespace_refusal_is_reported_as_pod_security(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    # A workload that is not restricted-compliant (a root sidecar) swapped in a namespace that
    # enforces restricted: the proxy's ReplicaSet cannot create pods; the error says why.
    body = workload("web", 1)
    body["spec"]["template"]["spec"]["containers"][1]["securityContext"] = {"runAsUser": 0}
    namespace.core.create_namespaced_config_map(namespace.name, config_map("web"))
    namespace.apps.create_namespaced_deployment(namespace.name, body)
    namespace.label({"pod-security.kubernetes.io/enforce": "restricted"})
    proxy = await swap(kube, proxy_request(namespace.name, keys, operation=Swap("web")))
    with pytest.raises(errors.PodFailed, match="Pod Security admission refused"):
        await wait_for_pod(kube, proxy, timeout=60)
    await down(kube, [namespace.name], owner=OWNER, project=PROJECT)
    assert namespace.deployment("web").spec.replicas == 1


async def test_an_image_that_does_not_exist_gives_pod_failed_naming_the_image(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    req = proxy_request(namespace.name, keys, image="tpconf/agent:does-not-exist")
    proxy = await new(kube, req)
    with pytest.raises(errors.PodFailed, match="tpconf/agent:does-not-exist") as info:
        await wait_for_pod(kube, proxy, timeout=90)
    assert info.value.hint is not None and "set `agent-image`" in info.value.hint


async def test_a_timeout_says_what_it_was_waiting_for(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    proxy = await new(kube, proxy_request(namespace.name, keys))
    with pytest.raises(errors.WaitTimeout, match=r'waiting for the pod of Deployment "web".*Ready'):
        await wait_for_pod(kube, proxy, timeout=0.5)


def _service_account_cluster(ns: Namespace, sa: str, admin: Cluster) -> Cluster:
    ns.core.create_namespaced_service_account(ns.name, {"metadata": {"name": sa}})
    token = ns.core.create_namespaced_service_account_token(
        sa, ns.name, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    return from_token(admin.server, token, ca_data=admin_ca_data(), namespace=ns.name)


RULES_REVIEW = "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews"
ACCESS_REVIEW = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"


def _record_paths(cluster: Cluster) -> list[str]:
    """The paths of the requests ``cluster`` sends from now on, in order."""
    sent: list[str] = []
    real = cluster.request

    async def recording(method: str, resource_path: str, **kwargs: Any) -> Any:
        sent.append(resource_path)
        return await real(method, resource_path, **kwargs)

    cluster.request = recording  # type: ignore[method-assign]
    return sent


def _rbac_docs() -> tuple[dict[str, Any], dict[str, Any]]:
    role, binding = yaml.safe_load_all(Path(REPO, "docs/rbac.yaml").read_text())
    return role, binding


async def test_the_documented_role_is_enough_for_new_swap_and_down(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    role, binding = _rbac_docs()
    namespace.rbac.create_namespaced_role(namespace.name, role)
    namespace.rbac.create_namespaced_role_binding(namespace.name, binding)
    dev = _service_account_cluster(namespace, "developer", kube)
    try:
        sent = _record_paths(dev)
        await preflight(dev, namespace.name, (New, Swap, Existing))
        assert sent == [RULES_REVIEW]  # RBAC's rules cover it all: no review one by one
        make_workload(namespace, "web", 2)
        proxy = await new(dev, proxy_request(namespace.name, keys, name="fresh"))
        await wait_for_pod(dev, proxy, timeout=90)
        swapped = await swap(dev, proxy_request(namespace.name, keys, operation=Swap("web")))
        await wait_for_pod(dev, swapped, timeout=90)
        report = await down(dev, [namespace.name], owner=OWNER, project=PROJECT)
        assert report.restored and report.deleted
        assert namespace.deployment("web").spec.replicas == 2
    finally:
        dev.close()


async def test_a_role_without_port_forward_is_caught_by_preflight_naming_it(
    kube: Cluster, namespace: Namespace
) -> None:
    role, binding = _rbac_docs()
    role["rules"] = [r for r in role["rules"] if r["resources"] != ["pods/portforward"]]
    namespace.rbac.create_namespaced_role(namespace.name, role)
    namespace.rbac.create_namespaced_role_binding(namespace.name, binding)
    dev = _service_account_cluster(namespace, "developer", kube)
    try:
        sent = _record_paths(dev)
        with pytest.raises(errors.Forbidden) as info:
            await preflight(dev, namespace.name, (New,))
        # What the rules do not grant is asked one by one (another authorizer might allow it).
        assert sent == [RULES_REVIEW, ACCESS_REVIEW, ACCESS_REVIEW]
        assert info.value.message == (
            f'missing permissions in namespace "{namespace.name}": '
            "create pods/portforward, get pods/portforward"
        )
        assert info.value.hint is not None and "`tpconf rbac`" in info.value.hint
        # And a request the Role does not allow at all names verb and resource.
        with pytest.raises(errors.Forbidden, match=r"may not list deployments.apps") as forbidden:
            other = _service_account_cluster(namespace, "nobody", kube)
            try:
                await down(other, [namespace.name], owner=OWNER, project=PROJECT)
            finally:
                other.close()
        assert "`tpconf rbac`" in str(forbidden.value.hint)
    finally:
        dev.close()


async def test_a_session_asks_a_namespaces_rules_once_and_again_after_a_denial(
    kube: Cluster, namespace: Namespace, tmp_path: Path
) -> None:
    role, binding = _rbac_docs()
    full_rules = role["rules"]
    name = role["metadata"]["name"]
    namespace.rbac.create_namespaced_role(namespace.name, role)
    namespace.rbac.create_namespaced_role_binding(namespace.name, binding)
    dev = _service_account_cluster(namespace, "developer", kube)
    try:
        sent = _record_paths(dev)
        # The units of five deployments starting at once in one namespace: one request.
        session = Session(project_dir=tmp_path, kubectl="kubectl")
        async with anyio.create_task_group() as tg:
            for op in (New, Swap, Existing, New, Swap):
                tg.start_soon(session.preflight, dev, namespace.name, op)
        assert sent == [RULES_REVIEW]

        without = [r for r in full_rules if r["resources"] != ["pods/portforward"]]
        namespace.rbac.patch_namespaced_role(name, namespace.name, {"rules": without})
        with anyio.fail_after(30):
            while True:
                session = Session(project_dir=tmp_path, kubectl="kubectl")
                sent.clear()
                try:
                    await session.preflight(dev, namespace.name, New)
                except errors.Forbidden:
                    break
                await anyio.sleep(0.2)  # RBAC's cache follows the Role within moments
        assert sent == [RULES_REVIEW, ACCESS_REVIEW, ACCESS_REVIEW]

        # Once the Role grants port-forward again, the next check asks for the rules again.
        namespace.rbac.patch_namespaced_role(name, namespace.name, {"rules": full_rules})
        with anyio.fail_after(30):
            while True:
                sent.clear()
                try:
                    await session.preflight(dev, namespace.name, New)
                    break
                except errors.Forbidden:
                    await anyio.sleep(0.2)
        assert sent == [RULES_REVIEW]
        sent.clear()
        await session.preflight(dev, namespace.name, New)
        assert sent == []  # checked once per namespace and operation
    finally:
        dev.close()


async def test_a_crashing_agent_gives_pod_failed_with_exit_code_and_log_lines(
    kube: Cluster, namespace: Namespace, keys: AgentKeys
) -> None:
    # An existing proxy whose keys are mounted 0400: the non-root agent cannot read them.
    body = existing_proxy("broken", AGENT_IMAGE)
    body["spec"]["template"]["spec"]["volumes"][0]["secret"]["defaultMode"] = 0o400
    namespace.apps.create_namespaced_deployment(namespace.name, body)
    req = proxy_request(namespace.name, keys, name="broken", operation=Existing("broken"))
    proxy = await existing(kube, req)
    with pytest.raises(errors.PodFailed, match=r"keeps crashing.*exit code 1") as info:
        await wait_for_pod(kube, proxy, timeout=90)
    assert "Permission denied" in info.value.message
    assert "PRIVATE KEY" not in info.value.render()
