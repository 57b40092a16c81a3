"""tpconf.cluster: the Kubernetes side of a proxy (the only package that imports ``kubernetes``).

Public API for the reconciler::

    cluster = connect(kubeconfig=None, context=None, namespace=None)
    await preflight(cluster, namespace, operations=(New, Swap, Existing))
    proxy = await start(cluster, ProxyRequest(...), progress=print)   # new|swap|existing|intercept
    pod = await wait_for_pod(cluster, proxy, timeout=120, progress=print)
    ...                                                               # tunnel to pod.pod:8022
    await stop(cluster, request)                                      # undo one request
    report = await down(cluster, [namespace], owner=..., project=..., all=False)

Modules:

- ``client``: the connection, worker threads, timeouts; ``transport``: how requests travel;
  ``errors``: ApiStatus -> tpconf.errors;
- ``model``: the requests and results above; ``labels``: labels and annotations; ``manifests``:
  pure builders of the objects;
- ``objects``: reading, writing and deleting objects, and the one check of whose they are;
- ``proxies``: the ``new`` and ``existing`` operations; ``swaps``: ``swap`` and ``restore``;
  ``intercepts``: ``intercept`` (the sidecar, its Leases, the Services) and its restore, with
  the pure builders in ``sidecar``; ``operations``: ``start``/``stop``, dispatching on the
  operation;
- ``cleanup``: ``leftovers`` and ``down``; ``access``: the RBAC each operation needs, ``preflight``;
- ``pods``: waiting for the agent pod, the Ready replicas; ``networks``: the pod and Service
  ranges (vpn-tcp).
"""

from tpconf.cluster.access import namespace_rules, preflight
from tpconf.cluster.cleanup import Leftovers, down, leftovers
from tpconf.cluster.client import Cluster, connect, from_token
from tpconf.cluster.intercepts import RENEW_SECONDS, renew
from tpconf.cluster.labels import default_owner, project_id
from tpconf.cluster.model import (
    AgentKeys,
    DownReport,
    Existing,
    Intercept,
    New,
    Operation,
    PodRef,
    Proxy,
    ProxyRequest,
    Swap,
)
from tpconf.cluster.networks import ClusterNetworks, discover_networks
from tpconf.cluster.operations import start, stop
from tpconf.cluster.pods import ready_pods, wait_for_pod
from tpconf.cluster.proxies import existing, new, update_service_ports
from tpconf.cluster.swaps import restore, swap

__all__ = [
    "RENEW_SECONDS",
    "AgentKeys",
    "Cluster",
    "ClusterNetworks",
    "DownReport",
    "Existing",
    "Intercept",
    "Leftovers",
    "New",
    "Operation",
    "PodRef",
    "Proxy",
    "ProxyRequest",
    "Swap",
    "connect",
    "default_owner",
    "discover_networks",
    "down",
    "existing",
    "from_token",
    "leftovers",
    "namespace_rules",
    "new",
    "preflight",
    "project_id",
    "ready_pods",
    "renew",
    "restore",
    "start",
    "stop",
    "swap",
    "update_service_ports",
    "wait_for_pod",
]
