"""tpconf.methods: how a deployment's local process reaches the cluster, one module per method.

``REGISTRY`` is the one list of methods: the loader learns the valid values of `method` and
their rules from it, the schema and docs/configuration.md describe them from it, and the
reconciler runs them through it. Adding a method is a new module implementing
:class:`~tpconf.methods.base.Method`, one line below, and ``make schema``
(docs/architecture.md, "Adding a method").
"""

from __future__ import annotations

from collections.abc import Mapping

from tpconf.methods import container, inject_tcp, vpn_tcp
from tpconf.methods.base import (
    Launch,
    LaunchRequest,
    Link,
    Method,
    MethodRuntime,
    Outbound,
    Services,
)

REGISTRY: Mapping[str, Method] = {
    method.name: method
    for method in (
        inject_tcp.METHOD,
        vpn_tcp.METHOD,
        container.METHOD,
    )
}

__all__ = [
    "REGISTRY",
    "Launch",
    "LaunchRequest",
    "Link",
    "Method",
    "MethodRuntime",
    "Outbound",
    "Services",
]
