"""The session's one VPN, shared by every vpn-tcp deployment (Telepresence 1 issue 888).

A vpn-tcp deployment *joins* with its tunnel and resolver: its routes (the cluster's pod and
Service networks, discovered or set under `vpn:` in the file, plus its resolved `also-proxy`)
go through its own tunnel. The first member starts the transparent proxy, its iptables rules
and the local DNS server (with the machine's DNS redirected to it); the last member to leave
stops them. A member leaving removes only its routes: the others keep working, and a range two
members route falls over to the one that stays. DNS is answered through one member's resolver;
when that member leaves, the DNS server restarts on the next member's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

import anyio
from anyio.abc import TaskGroup, TaskStatus

from tpconf import cluster
from tpconf.config import VpnSpec
from tpconf.errors import TpconfError
from tpconf.methods import routing
from tpconf.methods.vpn import VPN
from tpconf.proxy import ClusterResolver, DnsServer
from tpconf.reconcile.session import Session
from tpconf.tunnel import SupervisedTunnel

log = logging.getLogger(__name__)


@dataclass
class _Member:
    tunnel: SupervisedTunnel
    resolver: ClusterResolver
    networks: frozenset[IPv4Network] = frozenset()
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class _Task:
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)

    async def stop(self) -> None:
        self.scope.cancel()
        with anyio.CancelScope(shield=True):
            await self.done.wait()


class SharedVpn:
    """Starts and stops the VPN as vpn-tcp deployments join and leave."""

    def __init__(self, tg: TaskGroup, session: Session) -> None:
        self._tg = tg
        self._session = session
        self._lock = anyio.Lock()
        self._members: dict[str, _Member] = {}
        self._vpn: VPN | None = None
        self._vpn_task: _Task | None = None
        self._dns_task: _Task | None = None
        self._dns_owner: str | None = None
        self.spec = VpnSpec()

    def routes(self) -> dict[str, tuple[str, ...]]:
        """Routed ranges per deployment, for the status."""
        return {name: tuple(sorted(map(str, m.networks))) for name, m in self._members.items()}

    async def join(self, name: str, tunnel: SupervisedTunnel, resolver: ClusterResolver,
                   client: cluster.Cluster, namespace: str, also_proxy: tuple[object, ...]) -> None:  # fmt: skip
        """Route ``name``'s ranges through ``tunnel``; start the VPN if it is the first."""
        async with self._lock:
            member = _Member(tunnel=tunnel, resolver=resolver)
            networks, exclude = await self._networks(member, client, namespace, also_proxy)
            if self._vpn is None:
                routing.check_privileges()
                vpn, task = VPN(), _Task()
                await self._tg.start(self._run, task, vpn.run, "vpn", name="vpn")
                self._vpn, self._vpn_task = vpn, task  # only a VPN that started is shared
            self._members[name] = member
            try:
                await self._vpn.set_routes(name, networks, tunnel, exclude=exclude)
                member.networks = frozenset(networks)
                if self._dns_task is None:
                    await self._start_dns(name)
            except BaseException:
                # The caller's `leave` never runs for a join that failed: undo it here.
                with anyio.CancelScope(shield=True):
                    await self._leave(name)
                raise
            shown = ", ".join(sorted(map(str, networks)))
            self._session.notice(name, f"vpn-tcp routes {shown}")

    async def update(self, name: str, client: cluster.Cluster, namespace: str,
                     also_proxy: tuple[object, ...]) -> None:  # fmt: skip
        """Recompute ``name``'s ranges (also-proxy changed); open connections are kept."""
        async with self._lock:
            member = self._members.get(name)
            if member is None or self._vpn is None:
                return
            networks, exclude = await self._networks(member, client, namespace, also_proxy)
            await self._vpn.set_routes(name, networks, member.tunnel, exclude=exclude)
            member.networks = frozenset(networks)

    async def leave(self, name: str) -> None:
        """Stop routing ``name``'s ranges; stop everything when it was the last member."""
        async with self._lock:
            await self._leave(name)

    async def _leave(self, name: str) -> None:
        if self._members.pop(name, None) is None or self._vpn is None:
            return
        await self._vpn.remove_routes(name)
        if self._dns_owner == name and self._dns_task is not None:
            await self._vpn.redirect_dns(None)
            await self._dns_task.stop()
            self._dns_task = self._dns_owner = None
            if self._members:
                await self._start_dns(next(iter(self._members)))
        if not self._members and self._vpn_task is not None:
            await self._vpn_task.stop()  # removes the rules, shielded
            self._vpn = self._vpn_task = None

    async def _networks(
        self,
        member: _Member,
        client: cluster.Cluster,
        namespace: str,
        also_proxy: tuple[object, ...],
    ) -> tuple[set[IPv4Network], list[IPv4Address]]:
        found = await cluster.discover_networks(client, namespace)
        pods = set(self.spec.pod_cidrs) or set(found.pod_networks)
        services = set(self.spec.service_cidrs) or set(found.service_networks)
        member.sources = dict(found.sources)
        extra = await routing.resolve_also_proxy(
            [str(entry) for entry in also_proxy], member.resolver.addresses
        )
        for host in extra.unresolved:
            log.warning("also-proxy %s did not resolve in the cluster", host)
        networks = {n for n in pods | services if isinstance(n, IPv4Network)} | set(extra.networks)
        exclude = [found.api_server] if found.api_server is not None else []
        return networks, exclude

    async def _start_dns(self, name: str) -> None:
        assert self._vpn is not None
        member = self._members[name]
        upstreams = routing.read_nameservers()
        upstream = (str(upstreams[0]), 53) if upstreams else ("127.0.0.1", 53)
        reverse = sorted({str(n) for m in self._members.values() for n in m.networks})
        server = DnsServer(
            member.resolver,
            upstream=upstream,
            reverse_networks=reverse,
            upstream_mark=self._vpn.mark,
        )
        self._dns_task = _Task()
        port = await self._tg.start(self._run, self._dns_task, server.serve, name, name="vpn-dns")
        self._dns_owner = name
        await self._vpn.redirect_dns(port, upstreams)

    async def _run(
        self, task: _Task, serve: Serve, who: str, *, task_status: TaskStatus[int]
    ) -> None:
        """Run the VPN or the DNS server; a failure after start is reported, not raised, so
        that it ends neither the other deployments nor the session."""
        started = False

        def report_started(port: int) -> None:
            nonlocal started
            started = True
            task_status.started(port)

        try:
            with task.scope:
                await serve(task_status=_Started(report_started))
        except Exception as exc:
            if not started:
                raise
            log.debug("vpn-tcp part failed", exc_info=True)
            message = exc.render() if isinstance(exc, TpconfError) else repr(exc)
            self._session.notice(who, f"vpn-tcp failed: {message}")
        finally:
            task.done.set()


class _Started:
    """A TaskStatus that tells :meth:`SharedVpn._run` when its task has started."""

    def __init__(self, callback: Callable[[int], None]) -> None:
        self._callback = callback

    def started(self, value: int) -> None:
        self._callback(value)


Serve = Callable[..., Awaitable[None]]
