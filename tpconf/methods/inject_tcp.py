"""inject-tcp: the process runs under torsocks, pointed at a SOCKS server of its own deployment.

Every TCP connection and name lookup of the wrapped process tree goes through the deployment's
pod (the SOCKS server dials through the tunnel and resolves names as the pod does); nothing else
on the machine changes and no root is needed. torsocks cannot wrap Go, static or setuid programs
(vpn-tcp covers those).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus

from tpconf.config import DeploymentSpec, Project, RuleReport
from tpconf.methods.base import Launch, LaunchRequest, Link, MethodRuntime, Outbound, Services

# The SOCKS server and the torsocks wrapper are imported where they run: every command loads the
# registry (`tpconf validate` too), and the proxy package with dnslib would add ~0.1 s to each.


@dataclass(frozen=True)
class SocksOutbound:
    """The deployment's SOCKS server; a process gets torsocks pointed at it."""

    port: int

    def status(self) -> str:
        return f"SOCKS on 127.0.0.1:{self.port} (torsocks)"

    async def update(self, spec: DeploymentSpec, project: Project) -> None:
        pass  # nothing of inject-tcp changes in place

    @contextlib.contextmanager
    def launch(self, request: LaunchRequest) -> Iterator[Launch]:
        from tpconf.supervisor import torsocks

        with torsocks.torsocks_wrapper(self.port) as wrapper:
            yield Launch(prefix=wrapper.argv, env=wrapper.env)


class _Runtime:
    async def outbound(self, link: Link, *, task_status: TaskStatus[Outbound]) -> None:
        from tpconf.proxy import SocksServer

        async with anyio.create_task_group() as tg:
            port = await tg.start(SocksServer(link.resolver, link.dialer).serve)
            task_status.started(SocksOutbound(port))


class InjectTcp:
    """The :class:`~tpconf.methods.base.Method` of `method: inject-tcp`."""

    name = "inject-tcp"
    summary = (
        "the process's connections and name lookups go through the proxy pod, by torsocks; "
        "no root needed"
    )

    runs_image = False

    def check(self, specs: Sequence[DeploymentSpec], report: RuleReport) -> None:
        for spec in specs:
            if spec.also_proxy:
                report.warn(
                    spec,
                    "`also-proxy` has no effect with method `inject-tcp`: all of the process's "
                    "connections already go through the cluster",
                    key="also-proxy",
                    hint="remove `also-proxy`, or use `method: vpn-tcp`",
                )

    def describe(self, spec: DeploymentSpec) -> list[str]:
        return ["+ SOCKS proxy and cluster DNS for the process (torsocks)"]

    def outbound_facet(self, spec: DeploymentSpec, project: Project) -> Hashable:
        return ()

    def runtime(self, services: Services) -> MethodRuntime:
        return _Runtime()


METHOD = InjectTcp()
