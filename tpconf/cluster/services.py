"""Keeping a ``new`` proxy's Service in line with the file's ``expose`` list on hot reload."""

from __future__ import annotations

import dataclasses

from tpconf.cluster import manifests as M
from tpconf.cluster import operations
from tpconf.cluster.client import Cluster
from tpconf.cluster.model import New, ProxyRequest


async def update_service_ports(cluster: Cluster, req: ProxyRequest, ports: tuple[int, ...]) -> None:
    """Make Service ``req.name`` expose exactly ``ports`` (create, patch, or delete it).

    Only the ``new`` operation owns a Service; a swapped Deployment keeps its own Services, which
    select the proxy pod already.
    """
    if not isinstance(req.operation, New):
        return
    wanted = dataclasses.replace(req, expose_remote_ports=ports)
    body = M.new_service(wanted)
    if body is None:
        await operations._delete(cluster, "services", req.namespace, req.name)
    else:
        await operations._apply(cluster, "services", body, wanted)
