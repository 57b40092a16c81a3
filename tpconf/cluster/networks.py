"""Discover the cluster's pod and Service networks, which vpn-tcp routes through the cluster.

Each range is found the most reliable way the server and the user's RBAC allow, and
:attr:`ClusterNetworks.sources` says which way, for ``tpconf status``:

Pods
    1. the union of the nodes' ``spec.podCIDRs`` (``spec.podCIDR`` on old nodes), when set;
    2. else the networks of the pod IPs observed (pods of all namespaces, or of ``namespace``
       when listing cluster-wide is forbidden). Host-network pods are left out: their IP is the
       node's. An observed IP stands for its **/16** (``10.88.0.22`` -> ``10.88.0.0/16``): CNI
       plugins such as host-local hand out addresses from a range the API does not show, and a
       /16 covers the usual per-node and per-cluster pod ranges without ever being wider, so a
       few observed pods cover the pods created later without catching unrelated private
       networks. Outside the private blocks (RFC 1918 and 100.64.0.0/10) an observed IP stands
       for its /24 only: public traffic stays untouched.

Services
    1. the ``networking.k8s.io/v1`` ServiceCIDR objects (Kubernetes 1.33+), their IPv4 ``cidrs``;
    2. else the API server's own answer to a dry-run Service with an out-of-range
       ``clusterIP`` (``The range of valid IPs is 10.0.0.0/24``) in ``namespace``; nothing is
       created;
    3. else, as a guess, the ``kubernetes`` Service's clusterIP widened to a /24.

API server
    The kubeconfig's server when it is an IPv4 literal (vpn routing must never send it through
    the tunnel that depends on it), else ``None``; hostnames are not resolved here.

RBAC: everything beyond the namespaced Role of docs/rbac.yaml is optional. A forbidden or
unserved request only moves discovery to the next way; only an unreachable API server
(:class:`~tpconf.errors.ClusterUnreachable`, transient) fails it. A range that cannot be found
at all is empty, and its source says why (``telepresence.yaml`` can set it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Network,
    collapse_addresses,
    ip_address,
    ip_network,
)
from typing import Any
from urllib.parse import urlsplit

from tpconf import errors
from tpconf.cluster import errors as cerrors
from tpconf.cluster.client import Cluster, path
from tpconf.cluster.transport import ApiStatus

JSON = dict[str, Any]

#: The blocks pod networks are normally allocated from.
PRIVATE_BLOCKS = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
    IPv4Network("100.64.0.0/10"),
)
#: The network an observed pod IP stands for, inside / outside the private blocks.
OBSERVED_PREFIX = 16
PUBLIC_OBSERVED_PREFIX = 24
#: The last-resort Service network around the ``kubernetes`` Service's clusterIP.
GUESSED_SERVICE_PREFIX = 24
#: An address no Service range contains in practice, for the dry-run probe.
OUT_OF_RANGE_IP = "1.1.1.1"
#: Pods listed per page, and at most in all: a sample is enough to find the networks.
POD_PAGE = 500
POD_MAX = 2000

SERVICE_CIDRS_PATH = "/apis/networking.k8s.io/v1/servicecidrs"
_RANGE_MESSAGE = re.compile(r"range of valid IPs is (?P<ranges>.*)", re.IGNORECASE | re.DOTALL)
_CIDR = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}/\d{1,2}\b")


@dataclass(frozen=True)
class ClusterNetworks:
    """What vpn-tcp routes: pod and Service networks (IPv4, collapsed), and the API server.

    ``sources`` maps ``pods``, ``services`` and ``api_server`` to how each was found.
    """

    pod_networks: tuple[IPv4Network, ...]
    service_networks: tuple[IPv4Network, ...]
    api_server: IPv4Address | None
    sources: dict[str, str] = field(default_factory=dict, hash=False)


# ---- pure parts -------------------------------------------------------------------------------


def ipv4_networks(values: Iterable[object]) -> tuple[IPv4Network, ...]:
    """The IPv4 CIDRs among ``values``, collapsed; IPv6 and malformed values are skipped."""
    found: list[IPv4Network] = []
    for value in values:
        if not isinstance(value, str):
            continue
        try:
            net = ip_network(value.strip(), strict=False)
        except ValueError:
            continue
        if isinstance(net, IPv4Network):
            found.append(net)
    return tuple(collapse_addresses(found))


def _ipv4(value: object) -> IPv4Address | None:
    if not isinstance(value, str):
        return None
    try:
        addr = ip_address(value.strip())
    except ValueError:
        return None
    return addr if isinstance(addr, IPv4Address) else None


def node_pod_networks(nodes: Iterable[Mapping[str, Any]]) -> tuple[IPv4Network, ...]:
    """The union of the nodes' ``spec.podCIDRs`` (or ``spec.podCIDR``), IPv4 only."""
    cidrs: list[object] = []
    for node in nodes:
        spec = node.get("spec") or {}
        cidrs.extend(spec.get("podCIDRs") or [spec.get("podCIDR")])
    return ipv4_networks(cidrs)


def node_addresses(nodes: Iterable[Mapping[str, Any]]) -> frozenset[IPv4Address]:
    """Every IPv4 address in the nodes' ``status.addresses``."""
    out: set[IPv4Address] = set()
    for node in nodes:
        for entry in (node.get("status") or {}).get("addresses") or []:
            addr = _ipv4((entry or {}).get("address"))
            if addr is not None:
                out.add(addr)
    return frozenset(out)


def pod_addresses(
    pods: Iterable[Mapping[str, Any]], node_ips: Iterable[IPv4Address] = ()
) -> frozenset[IPv4Address]:
    """The IPv4 pod IPs of ``pods``, without host-network pods (their IP is a node's)."""
    nodes = set(node_ips)
    out: set[IPv4Address] = set()
    for pod in pods:
        spec = pod.get("spec") or {}
        status = pod.get("status") or {}
        if spec.get("hostNetwork"):
            continue
        host_ip = _ipv4(status.get("hostIP"))
        ips = [entry.get("ip") for entry in status.get("podIPs") or [] if entry]
        ips.append(status.get("podIP"))
        for value in ips:
            addr = _ipv4(value)
            if addr is not None and addr != host_ip and addr not in nodes:
                out.add(addr)
    return frozenset(out)


def networks_of(addresses: Iterable[IPv4Address]) -> tuple[IPv4Network, ...]:
    """The networks observed pod IPs stand for: their /16 in a private block, else their /24.

    Collapsed, so ``10.88.0.22`` and ``10.88.3.9`` give ``10.88.0.0/16``; ``10.88.0.22`` and
    ``10.89.0.1`` give ``10.88.0.0/15`` (two adjacent /16s, nothing else).
    """
    nets = []
    for addr in addresses:
        private = any(addr in block for block in PRIVATE_BLOCKS)
        prefix = OBSERVED_PREFIX if private else PUBLIC_OBSERVED_PREFIX
        nets.append(IPv4Network(f"{addr}/{prefix}", strict=False))
    return tuple(collapse_addresses(nets))


def service_cidr_networks(items: Iterable[Mapping[str, Any]]) -> tuple[IPv4Network, ...]:
    """The IPv4 ``spec.cidrs`` of ServiceCIDR objects, collapsed."""
    cidrs: list[object] = []
    for item in items:
        cidrs.extend((item.get("spec") or {}).get("cidrs") or [])
    return ipv4_networks(cidrs)


def parse_service_range(message: str) -> tuple[IPv4Network, ...]:
    """The IPv4 ranges in the API server's ``... The range of valid IPs is 10.0.0.0/24``."""
    m = _RANGE_MESSAGE.search(message)
    if not m:
        return ()
    return ipv4_networks(_CIDR.findall(m["ranges"]))


def api_server_address(server: str) -> IPv4Address | None:
    """The API server's IPv4 address when the kubeconfig's ``server`` URL names one."""
    try:
        host = urlsplit(server if "://" in server else f"//{server}").hostname
    except ValueError:
        return None
    return _ipv4(host)


# ---- requests ---------------------------------------------------------------------------------


def _tolerated(exc: errors.ClusterError) -> bool:
    """Whether discovery may go on after ``exc`` (forbidden, not served, refused)."""
    return not isinstance(exc, errors.ClusterUnreachable)


async def _list(cluster: Cluster, resource_path: str, *, what: str, limit: int) -> list[JSON]:
    """The items of a collection, following ``continue`` up to ``limit`` items."""
    items: list[JSON] = []
    token = ""
    while len(items) < limit:
        query: dict[str, str | int | bool] = {"limit": min(POD_PAGE, limit - len(items))}
        if token:
            query["continue"] = token
        page = await cluster.request("GET", resource_path, what=what, query=query)
        items.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue") or ""
        if not token:
            break
    return items


async def _discover_pods(cluster: Cluster, namespace: str) -> tuple[tuple[IPv4Network, ...], str]:
    nodes: list[JSON] = []
    nodes_note = ""
    try:
        nodes = await _list(cluster, "/api/v1/nodes", what="list nodes", limit=POD_MAX)
    except errors.ClusterError as exc:
        if not _tolerated(exc):
            raise
        nodes_note = "; listing nodes is not allowed"
    from_nodes = node_pod_networks(nodes)
    if from_nodes:
        return from_nodes, f"spec.podCIDRs of {len(nodes)} node(s)"

    where = "all namespaces"
    try:
        pods = await _list(cluster, "/api/v1/pods", what="list pods cluster-wide", limit=POD_MAX)
    except errors.ClusterError as exc:
        if not _tolerated(exc):
            raise
        where = f'namespace "{namespace}" (listing pods cluster-wide is not allowed)'
        try:
            pods = await _list(
                cluster, path("pods", namespace), what=f"list pods in {namespace}", limit=POD_MAX
            )
        except errors.ClusterError as exc2:
            if not _tolerated(exc2):
                raise
            return (), f"unknown: listing pods is not allowed{nodes_note}"
    ips = pod_addresses(pods, node_addresses(nodes))
    if not ips:
        return (), f"unknown: no pod IPs observed in {where}{nodes_note}"
    return networks_of(ips), (
        f"{len(ips)} pod IP(s) observed in {where}, each standing for its /{OBSERVED_PREFIX} "
        f"(nodes have no spec.podCIDRs{nodes_note})"
    )


async def _from_service_cidrs(cluster: Cluster) -> tuple[IPv4Network, ...]:
    try:
        data = await cluster.request("GET", SERVICE_CIDRS_PATH, what="list ServiceCIDRs")
    except errors.ClusterError as exc:
        if not _tolerated(exc):
            raise
        return ()  # not served (before 1.33: 404) or not allowed
    return service_cidr_networks(data.get("items") or [])


async def _from_dry_run(cluster: Cluster, namespace: str) -> tuple[IPv4Network, ...]:
    probe = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"generateName": "tpconf-range-probe-"},
        "spec": {"type": "ClusterIP", "clusterIP": OUT_OF_RANGE_IP, "ports": [{"port": 80}]},
    }
    try:
        await cluster.request(
            "POST",
            path("services", namespace),
            what=f"dry-run a Service in namespace {namespace}",
            query={"dryRun": "All"},
            body=probe,
        )
    except errors.ClusterError as exc:
        if not _tolerated(exc):
            raise
        cause = exc.__cause__
        if isinstance(cause, ApiStatus) and cause.status == 422:
            return parse_service_range(cerrors.status_message(cause))
        return ()
    return ()  # the probe address is in range: the answer says nothing


async def _guess_from_kubernetes_service(cluster: Cluster) -> tuple[tuple[IPv4Network, ...], str]:
    try:
        svc = await cluster.request(
            "GET", path("services", "default", "kubernetes"), what="read the kubernetes Service"
        )
    except errors.ClusterError as exc:
        if not _tolerated(exc):
            raise
        return (), ""
    ip = _ipv4((svc.get("spec") or {}).get("clusterIP"))
    if ip is None:
        return (), ""
    net = IPv4Network(f"{ip}/{GUESSED_SERVICE_PREFIX}", strict=False)
    return (net,), (
        f"guess: the kubernetes Service's clusterIP {ip} widened to /{GUESSED_SERVICE_PREFIX} "
        "(the ServiceCIDR API and the dry-run probe gave nothing)"
    )


async def _discover_services(
    cluster: Cluster, namespace: str, *, service_cidr_api: bool
) -> tuple[tuple[IPv4Network, ...], str]:
    if service_cidr_api:
        nets = await _from_service_cidrs(cluster)
        if nets:
            return nets, "ServiceCIDR objects (networking.k8s.io/v1)"
    nets = await _from_dry_run(cluster, namespace)
    if nets:
        return nets, (
            f'the API server\'s valid range for clusterIP (dry-run Service in "{namespace}")'
        )
    nets, source = await _guess_from_kubernetes_service(cluster)
    if nets:
        return nets, source
    return (), "unknown: no ServiceCIDRs, dry-run probe or kubernetes Service allowed"


async def discover_networks(
    cluster: Cluster, namespace: str, *, service_cidr_api: bool = True
) -> ClusterNetworks:
    """Find the pod and Service networks of ``cluster`` and its API server's address.

    ``namespace`` is where the user may list pods and dry-run a Service when cluster-wide
    requests are forbidden. Pod networks found from pod IPs are the /16 of each observed IP in
    a private block (never wider than a /16 per IP), see the module docs. ``service_cidr_api``
    ``False`` skips the ServiceCIDR API (to exercise the dry-run fallback). Raises only
    :class:`~tpconf.errors.ClusterUnreachable`; forbidden requests fall back.
    """
    pods, pods_source = await _discover_pods(cluster, namespace)
    services, services_source = await _discover_services(
        cluster, namespace, service_cidr_api=service_cidr_api
    )
    server = cluster.server
    api_server = api_server_address(server)
    api_source = (
        f"the kubeconfig's server {server}"
        if api_server is not None
        else f"none: the kubeconfig's server {server} is not an IPv4 address"
    )
    return ClusterNetworks(
        pod_networks=pods,
        service_networks=services,
        api_server=api_server,
        sources={"pods": pods_source, "services": services_source, "api_server": api_source},
    )
