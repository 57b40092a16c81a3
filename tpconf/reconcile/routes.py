"""An intercept's routes: a connection to the router of every Ready replica, and a route on it.

For each pod of an intercepted Deployment that runs the agent, ``up`` keeps a tunnel of its own
(port-forward + SSH, reconnecting by itself), and on each connection it makes

- a remote forward per intercepted port, on a port the agent picks on the pod's 127.0.0.1, to
  the local port the traffic is for;
- one connection to the router's control socket (``direct-streamlocal``), on which it adds a
  route per port: where to (that remote forward), and which requests (the headers).

A route lives as long as that control connection, so when a tunnel drops the replica gives its
traffic back to the app, and when it comes back the routes are made again. Replicas that
appear are joined within :data:`POLL_SECONDS`; those that go away take their routes with them.
An edit of the headers or local ports replaces the routes in place: no pod restarts, and the
other developers' routes are not touched.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ByteStream, TaskStatus

from tpconf import cluster
from tpconf.config import HeaderMatch, InterceptOp
from tpconf.errors import TpconfError, TunnelDown, TunnelError
from tpconf.tunnel import (
    PortForwardTarget,
    ProxyKeys,
    TunnelEvent,
    TunnelState,
    port_forward_transport,
    run_tunnel,
)

if TYPE_CHECKING:  # the SSH library loads with the first connection, not at start (issue 15)
    from tpconf.tunnel import RemoteForward, Tunnel

log = logging.getLogger(__name__)

#: The router's control socket in the agent (tpconf/agent/entrypoint.py).
ROUTER_SOCKET = "/tmp/tpconf/router.sock"
#: Seconds between two looks at which replicas are Ready.
POLL_SECONDS = 2.0


class RouteRefused(TpconfError):
    """Raised when a replica's router refuses a route (it overlaps another developer's)."""


@dataclass(frozen=True)
class RouteSpec:
    """What traffic of one intercepted container port comes to which local port."""

    app_port: int
    local_port: int
    headers: tuple[HeaderMatch, ...]


def route_specs(op: InterceptOp, intercepted: tuple[tuple[int, int], ...]) -> list[RouteSpec]:
    """One route per port the sidecar intercepts, to the local port the file maps it to."""
    local = {m.remote: m.local for m in op.ports}
    return [RouteSpec(app, local.get(app, app), op.headers) for app, _agent in intercepted]


@dataclass
class _Replica:
    """One replica's connection: its control stream and remote forwards, while connected."""

    pod: cluster.PodRef
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    tunnel: Tunnel | None = None
    control: ByteStream | None = None
    forwards: dict[int, tuple[int, RemoteForward]] = field(default_factory=dict)
    """app port -> (local port, its remote forward)."""
    lock: anyio.Lock = field(default_factory=anyio.Lock)


class Routes:
    """The routes of one intercept on every Ready replica (the ``routes`` unit's result)."""

    def __init__(
        self,
        *,
        client: cluster.Cluster,
        proxy: cluster.Proxy,
        keys: ProxyKeys,
        username: str,
        who: str,
        target: Callable[[cluster.PodRef], PortForwardTarget],
        notice: Callable[[str], None],
        specs: list[RouteSpec],
    ) -> None:
        self._client = client
        self._proxy = proxy
        self._credentials = keys.credentials(username)
        self._who = who
        self._target = target
        self._notice = notice
        self.specs = specs
        self.replicas: dict[str, _Replica] = {}
        self.intercepted = proxy.intercepted
        """(container port, agent port) pairs of the sidecar."""

    async def run(self, *, task_status: TaskStatus[Routes]) -> None:
        """Follow the Ready replicas until cancelled; started once the current ones route."""
        async with anyio.create_task_group() as tg:
            await self._sync(tg)
            if not self.replicas:
                raise TunnelError(
                    f'no pod of Deployment "{self._proxy.deployment}" runs the agent Ready'
                )
            task_status.started(self)
            while True:
                await anyio.sleep(POLL_SECONDS)
                await self._sync(tg)

    async def _sync(self, tg: anyio.abc.TaskGroup) -> None:
        pods = {ref.pod: ref for ref in await cluster.ready_pods(self._client, self._proxy)}
        for name in [n for n in self.replicas if n not in pods]:
            self.replicas.pop(name).scope.cancel()
            self._notice(f"pod {name} is gone: its routes went with it")
        for name, ref in pods.items():
            if name not in self.replicas:
                replica = _Replica(ref)
                self.replicas[name] = replica
                await tg.start(self._replica, replica)

    async def _replica(self, replica: _Replica, *, task_status: TaskStatus[None]) -> None:
        """One replica: its tunnel, and its routes on every connection of it."""
        pod = replica.pod

        def on_state(event: TunnelEvent) -> None:
            if event.state is TunnelState.RECONNECTING:
                self._notice(f"routes on pod {pod.pod} lost ({event.reason}); reconnecting")

        async def transport_target() -> PortForwardTarget:
            return self._target(pod)

        with replica.scope:
            async with anyio.create_task_group() as tg:
                supervised = await tg.start(
                    partial(run_tunnel, on_state=on_state),
                    port_forward_transport(transport_target),
                    self._credentials,
                )
                first = True
                while True:
                    live = await supervised.wait_connected(timeout=math.inf)
                    try:
                        await self._connect(replica, live)
                        if first:
                            first = False
                            task_status.started()
                            self._notice(f"routing on pod {pod.pod}")
                        await live.wait_closed()
                    except TunnelDown:
                        pass  # the tunnel reconnects; the routes are made again then
                    finally:
                        await self._disconnect(replica)

    async def _connect(self, replica: _Replica, live: Tunnel) -> None:
        async with replica.lock:
            replica.tunnel = live
            replica.control = await live.open_unix(ROUTER_SOCKET)
            await self._apply(replica)

    async def _disconnect(self, replica: _Replica) -> None:
        with anyio.CancelScope(shield=True):
            await self._forget(replica)

    async def _forget(self, replica: _Replica) -> None:
        async with replica.lock:
            if replica.control is not None:
                await replica.control.aclose()
            for _local, forward in replica.forwards.values():
                forward.close()
            replica.control, replica.tunnel = None, None
            replica.forwards.clear()

    async def _apply(self, replica: _Replica) -> None:
        """Make the replica's routes what :attr:`specs` says (on its current connection)."""
        live, control = replica.tunnel, replica.control
        if live is None or control is None:
            return  # reconnecting: the routes are made when it is back
        wanted = {spec.app_port: spec for spec in self.specs}
        for app_port in [p for p in replica.forwards if p not in wanted]:
            await self._ask(control, {"op": "unroute", "port": app_port})
            replica.forwards.pop(app_port)[1].close()
        for spec in self.specs:
            current = replica.forwards.get(spec.app_port)
            if current is None or current[0] != spec.local_port:
                # The agent picks the port, on its 127.0.0.1: only the router can reach it.
                forward = await live.forward_remote(0, spec.local_port, bind_host="127.0.0.1")
                if current is not None:
                    current[1].close()
                replica.forwards[spec.app_port] = (spec.local_port, forward)
            request = {
                "op": "route",
                "port": spec.app_port,
                "headers": [[h.name, h.value, h.regex] for h in spec.headers],
                "target": ["127.0.0.1", replica.forwards[spec.app_port][1].port],
                "who": self._who,
            }
            await self._ask(control, request)

    async def _ask(self, control: ByteStream, request: dict[str, object]) -> None:
        await control.send(json.dumps(request).encode() + b"\n")
        answer = b""
        with anyio.fail_after(10):
            while not answer.endswith(b"\n"):
                answer += await control.receive()
        reply = json.loads(answer)
        if "error" in reply:
            raise RouteRefused(
                f"the intercept of Deployment {self._proxy.deployment!r} refused this route: "
                f"{reply['error']}",
                hint="give this deployment's `intercept.headers` values no one else uses",
            )

    async def update(self, specs: list[RouteSpec]) -> None:
        """Replace the routes on every replica (an edit of the headers or local ports)."""
        self.specs = specs
        for replica in list(self.replicas.values()):
            async with replica.lock:
                await self._apply(replica)
