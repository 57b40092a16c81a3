"""Discovery of the pod and Service networks: the parsing, then the real cluster.

The local cluster's pods get addresses from CNI host-local in 10.88.0.0/16 (its nodes have no
``spec.podCIDRs``) and its Service range is 10.0.0.0/24; the e2e tests assert exactly those.
"""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import anyio
import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from tests.cluster.conftest import WORKLOAD_IMAGE, Namespace
from tests.conftest import admin_ca_data
from tests.e2e import harness
from tpconf import errors
from tpconf.cluster import Cluster, ClusterNetworks, discover_networks, from_token
from tpconf.cluster import errors as cerrors
from tpconf.cluster import networks as N
from tpconf.cluster.transport import ApiStatus

POD_NET = IPv4Network("10.88.0.0/16")
SERVICE_NET = IPv4Network("10.0.0.0/24")

# What kube-apiserver 1.34 answers to the dry-run probe (copied from a real 422 Status).
RANGE_MESSAGE = (
    'Service "tpconf-range-probe-x" is invalid: spec.clusterIPs: Invalid value: ["1.1.1.1"]: '
    "failed to allocate IP 1.1.1.1: the provided IP (1.1.1.1) is not in the valid range. "
    "The range of valid IPs is 10.0.0.0/24"
)


def nets(*cidrs: str) -> tuple[IPv4Network, ...]:
    return tuple(IPv4Network(c) for c in cidrs)


def api_exception(status: int, message: str, reason: str) -> ApiStatus:
    body = json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": status,
        }
    ).encode()
    resp = urllib3.HTTPResponse(body=body, status=status, reason=reason, preload_content=True)
    return ApiStatus.of(resp)


# ---- unit -------------------------------------------------------------------------------------


def test_node_pod_cidrs_are_united_ipv4_only_with_the_old_single_field_as_fallback() -> None:
    nodes: list[dict[str, Any]] = [
        {"spec": {"podCIDRs": ["10.244.0.0/24", "fd00:10:244::/64"], "podCIDR": "10.244.0.0/24"}},
        {"spec": {"podCIDR": "10.244.1.0/24"}},
        {"spec": {}},
    ]
    assert N.node_pod_networks(nodes) == nets("10.244.0.0/23")
    assert N.node_pod_networks([{"spec": {}}, {}]) == ()


def test_host_network_pods_and_pods_on_node_ips_are_ignored() -> None:
    node = {"status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.2"}]}}
    pods: list[dict[str, Any]] = [
        {"status": {"podIP": "10.88.0.22", "podIPs": [{"ip": "10.88.0.22"}, {"ip": "fd00::5"}]}},
        {"spec": {"hostNetwork": True}, "status": {"podIP": "172.18.0.5"}},
        {"status": {"podIP": "192.0.2.2", "hostIP": "192.0.2.2"}},  # node IP, by the node list
        {"status": {"podIP": "198.51.100.7", "hostIP": "198.51.100.7"}},  # = its hostIP
        {"status": {"phase": "Pending"}},
    ]
    assert N.pod_addresses(pods, N.node_addresses([node])) == {IPv4Address("10.88.0.22")}


def test_observed_ips_stand_for_their_slash_16_never_wider() -> None:
    def of(*ips: str) -> tuple[IPv4Network, ...]:
        return N.networks_of(IPv4Address(ip) for ip in ips)

    assert of("10.88.0.22") == (POD_NET,)
    assert of("10.88.0.22", "10.88.200.1") == (POD_NET,)
    # Two private blocks stay apart; only adjacent /16s merge.
    assert of("10.88.0.22", "192.168.5.5") == nets("10.88.0.0/16", "192.168.0.0/16")
    assert of("10.88.0.22", "10.89.0.1") == nets("10.88.0.0/15")
    assert of("10.88.0.22", "10.90.0.1") == nets("10.88.0.0/16", "10.90.0.0/16")
    assert of("100.64.3.4", "172.17.0.2") == nets("100.64.0.0/16", "172.17.0.0/16")
    # Outside the private blocks only the /24: public traffic is not captured.
    assert of("203.0.113.9") == nets("203.0.113.0/24")


def test_service_cidr_objects_give_their_ipv4_cidrs() -> None:
    items: list[dict[str, Any]] = [
        {"spec": {"cidrs": ["10.0.0.0/24", "fd00:10:96::/112"]}},
        {"spec": {"cidrs": ["10.0.1.0/24"]}},
        {"spec": {}},
    ]
    assert N.service_cidr_networks(items) == nets("10.0.0.0/23")


def test_the_range_is_parsed_from_the_api_servers_422_message() -> None:
    exc = api_exception(422, RANGE_MESSAGE, "Invalid")
    assert N.parse_service_range(cerrors.status_message(exc)) == (SERVICE_NET,)
    # Older servers (one range per family) and several ranges.
    older = (
        'Service "x" is invalid: spec.clusterIPs: Invalid value: []string{"1.1.1.1"}: '
        "failed to allocate IP 1.1.1.1: provided IP is not in the valid range. "
        "The range of valid IPs is 10.96.0.0/12"
    )
    assert N.parse_service_range(older) == nets("10.96.0.0/12")
    several = "The range of valid IPs is 10.0.0.0/24, 10.5.0.0/16 and fd00::/108"
    assert N.parse_service_range(several) == nets("10.0.0.0/24", "10.5.0.0/16")
    assert N.parse_service_range('Service "x" is invalid: spec.ports: Required value') == ()


def test_the_422_survives_translation_as_the_cause_the_message_may_be_trimmed() -> None:
    exc = api_exception(422, RANGE_MESSAGE, "Invalid")
    with pytest.raises(errors.ClusterError) as info, cerrors.mapped("dry-run a Service"):
        raise exc
    assert not isinstance(info.value, errors.ClusterUnreachable)
    assert info.value.__cause__ is exc


def test_api_server_address_is_an_ipv4_literal_or_none() -> None:
    assert N.api_server_address("https://127.0.0.1:6443") == IPv4Address("127.0.0.1")
    assert N.api_server_address("https://203.0.113.10") == IPv4Address("203.0.113.10")
    assert N.api_server_address("203.0.113.10:6443") == IPv4Address("203.0.113.10")
    assert N.api_server_address("https://k8s.example.com:6443") is None
    assert N.api_server_address("https://[2001:db8::1]:6443") is None


# ---- e2e --------------------------------------------------------------------------------------


def _service_account(ns: Namespace, sa: str, admin: Cluster) -> Cluster:
    ns.core.create_namespaced_service_account(ns.name, {"metadata": {"name": sa}})
    token = ns.core.create_namespaced_service_account_token(
        sa, ns.name, {"spec": {"expirationSeconds": 3600}}
    ).status.token
    return from_token(admin.server, token, ca_data=admin_ca_data(), namespace=ns.name)


def _grant(ns: Namespace, where: str, name: str, sa: str, rules: list[dict[str, Any]]) -> None:
    ns.rbac.create_namespaced_role(where, {"metadata": {"name": name}, "rules": rules})
    ns.rbac.create_namespaced_role_binding(
        where,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns.name}],
        },
    )


async def _running_pod(ns: Namespace, name: str) -> str:
    """Start a pod in the namespace; its pod IP once it has one."""
    body = harness.pod(
        name, WORKLOAD_IMAGE, command=["sleep", "infinity"], terminationGracePeriodSeconds=0
    )
    ns.core.create_namespaced_pod(ns.name, body)
    with anyio.fail_after(60):
        while True:
            pod = await anyio.to_thread.run_sync(ns.core.read_namespaced_pod, name, ns.name)
            if pod.status.pod_ip:
                return str(pod.status.pod_ip)
            await anyio.sleep(0.3)


@pytest.mark.e2e
@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_admin_finds_pods_from_observed_ips_and_services_from_service_cidrs(
    kube: Cluster, namespace: Namespace
) -> None:
    found = await discover_networks(kube, namespace.name)
    assert isinstance(found, ClusterNetworks)
    assert found.pod_networks == (POD_NET,)
    assert "observed in all namespaces" in found.sources["pods"]
    assert "no spec.podCIDRs" in found.sources["pods"]
    assert found.service_networks == (SERVICE_NET,)
    assert found.sources["services"] == "ServiceCIDR objects (networking.k8s.io/v1)"
    assert found.api_server == IPv4Address("127.0.0.1")
    assert "127.0.0.1:6443" in found.sources["api_server"]


@pytest.mark.e2e
@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_without_the_service_cidr_api_the_dry_run_message_gives_the_range(
    kube: Cluster, namespace: Namespace
) -> None:
    found = await discover_networks(kube, namespace.name, service_cidr_api=False)
    assert found.service_networks == (SERVICE_NET,)
    assert "dry-run Service" in found.sources["services"]
    # Dry run: nothing was created.
    assert namespace.core.list_namespaced_service(namespace.name).items == []


@pytest.fixture
def default_role_cleanup(namespace: Namespace) -> Iterator[str]:
    """A Role name in the default namespace, deleted after the test."""
    name = f"tpconf-e2e-{uuid.uuid4().hex[:8]}"
    yield name
    for delete in (
        namespace.rbac.delete_namespaced_role_binding,
        namespace.rbac.delete_namespaced_role,
    ):
        try:
            delete(name, "default")
        except ApiException as exc:
            if exc.status != 404:
                raise


@pytest.mark.e2e
@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_a_namespaced_user_falls_back_to_namespace_pods_and_the_dry_run(
    kube: Cluster, namespace: Namespace
) -> None:
    ip = await _running_pod(namespace, "sample")
    _grant(
        namespace,
        namespace.name,
        "tpconf-dev",
        "dev",
        [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
            {"apiGroups": [""], "resources": ["services"], "verbs": ["create"]},
        ],
    )
    dev = _service_account(namespace, "dev", kube)
    try:
        found = await discover_networks(dev, namespace.name)
    finally:
        dev.close()
    assert IPv4Address(ip) in POD_NET
    assert found.pod_networks == (POD_NET,)
    assert f'namespace "{namespace.name}"' in found.sources["pods"]
    assert "listing nodes is not allowed" in found.sources["pods"]
    assert found.service_networks == (SERVICE_NET,)  # ServiceCIDRs forbidden -> dry run
    assert "dry-run Service" in found.sources["services"]


@pytest.mark.e2e
@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_a_user_with_almost_no_rights_gets_the_guess_and_no_failure(
    kube: Cluster, namespace: Namespace, default_role_cleanup: str
) -> None:
    # Only `get` on the kubernetes Service: no pods, no ServiceCIDRs, no dry run.
    _grant(
        namespace,
        "default",
        default_role_cleanup,
        "guest",
        [
            {
                "apiGroups": [""],
                "resources": ["services"],
                "resourceNames": ["kubernetes"],
                "verbs": ["get"],
            }
        ],
    )
    guest = _service_account(namespace, "guest", kube)
    nobody = _service_account(namespace, "nobody", kube)
    try:
        found = await discover_networks(guest, namespace.name)
        nothing = await discover_networks(nobody, namespace.name)
    finally:
        guest.close()
        nobody.close()
    assert found.pod_networks == ()
    assert found.sources["pods"].startswith("unknown: listing pods is not allowed")
    assert found.service_networks == (SERVICE_NET,)  # 10.0.0.1 widened to /24
    assert found.sources["services"].startswith("guess: the kubernetes Service's clusterIP")
    assert nothing.pod_networks == nothing.service_networks == ()
    assert nothing.sources["services"].startswith("unknown:")
    assert nothing.api_server == IPv4Address("127.0.0.1")


@pytest.mark.anyio
async def test_an_unreachable_api_server_fails_discovery_as_transient() -> None:
    # A real connection to a port nobody listens on: not a fallback case, a transient error.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = from_token(f"https://127.0.0.1:{port}", "t", ca_data=None, namespace="dev", retries=0)
    try:
        with pytest.raises(errors.ClusterUnreachable), anyio.fail_after(10):
            await discover_networks(c, "dev")
    finally:
        c.close()
