"""``start`` and ``stop``: one request's operation, dispatched by its type.

The operations themselves live in :mod:`tpconf.cluster.proxies` (``new``, ``existing``),
:mod:`tpconf.cluster.swaps` (``swap``, ``restore``) and :mod:`tpconf.cluster.intercepts`
(``intercept``, ``leave``); a ``match`` with ``assert_never`` makes mypy check that every
operation type is handled.
"""

from __future__ import annotations

from typing import assert_never

from tpconf.cluster.client import Cluster
from tpconf.cluster.intercepts import intercept, leave
from tpconf.cluster.model import Existing, Intercept, New, Proxy, ProxyRequest, Swap
from tpconf.cluster.objects import Progress, quiet
from tpconf.cluster.proxies import existing, new, stop_existing, stop_new
from tpconf.cluster.swaps import restore, swap


async def start(cluster: Cluster, req: ProxyRequest, *, progress: Progress = quiet) -> Proxy:
    """Run the request's operation (``new``, ``swap``, ``existing`` or ``intercept``)."""
    match req.operation:
        case New():
            return await new(cluster, req, progress=progress)
        case Swap():
            return await swap(cluster, req, progress=progress)
        case Existing():
            return await existing(cluster, req, progress=progress)
        case Intercept():
            return await intercept(cluster, req, progress=progress)
        case unknown:
            assert_never(unknown)


async def stop(cluster: Cluster, req: ProxyRequest, *, progress: Progress = quiet) -> list[str]:
    """Undo :func:`start` for one request (the reconciler's stop); what it did. Idempotent.

    ``new``: its objects deleted; ``swap``: the Deployment restored; ``existing``: its keys
    Secret released but kept, since the user's Deployment mounts it; ``intercept``: this
    developer's hold dropped, the Deployment and its Services restored by the last to leave.
    """
    match req.operation:
        case New():
            return await stop_new(cluster, req, progress=progress)
        case Swap(deployment=deployment):
            return await restore(
                cluster,
                req.namespace,
                deployment,
                owner=req.owner,
                project=req.project,
                progress=progress,
            )
        case Existing():
            return await stop_existing(cluster, req, progress=progress)
        case Intercept():
            return await leave(cluster, req, progress=progress)
        case unknown:
            assert_never(unknown)
