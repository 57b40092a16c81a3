"""vpn-tcp: the whole machine reaches the cluster's networks; one VPN per session, shared.

The method's runtime is the session's VPN, shared by every vpn-tcp deployment (Telepresence 1
issue 888).

A vpn-tcp deployment *joins* with its tunnel and resolver: its routes (the cluster's pod and
Service networks, discovered or set under `vpn:` in the file, plus its resolved `also-proxy`)
go through its own tunnel. The first member starts the transparent proxy, its iptables rules
and the local DNS server (with the machine's DNS redirected to it); the last member to leave
stops them. A member leaving removes only its routes: the others keep working, and a range two
members route falls over to the one that stays. DNS is answered through one member's resolver;
when that member leaves, the DNS server restarts on the next member's.

The machine's DNS never points at nothing: the redirect to the DNS server is in place only while
the server listens (:func:`run_dns`). If the server fails, the redirect is removed at once (the
machine's own nameservers answer again, cluster names do not), the failure is shown, and the
server is started again with back-off. The iptables rules record the project that made them, so
a second project's vpn-tcp is refused naming this one (:mod:`tpconf.redirect.routing`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Coroutine, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from tpconf.config import DeploymentSpec, Project, RuleReport, VpnSpec
from tpconf.errors import explain
from tpconf.methods.base import Launch, LaunchRequest, Link, MethodRuntime, Outbound, Services

if TYPE_CHECKING:
    from tpconf.redirect import VPN

# The DNS server and the iptables side are imported where they run: every command loads the
# registry (`tpconf validate` too), and they would add ~0.1 s to each.

log = logging.getLogger(__name__)


@dataclass
class _Member:
    link: Link
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
    """Starts and stops the VPN as vpn-tcp deployments join and leave (the method's runtime)."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._lock = anyio.Lock()
        self._members: dict[str, _Member] = {}
        self._vpn: VPN | None = None
        self._vpn_task: _Task | None = None
        self._dns_task: _Task | None = None
        self._dns_owner: str | None = None

    def routes(self, name: str) -> tuple[str, ...]:
        """The ranges routed through deployment ``name``'s pod, for the status."""
        member = self._members.get(name)
        return tuple(sorted(map(str, member.networks))) if member else ()

    async def outbound(self, link: Link, *, task_status: TaskStatus[Outbound]) -> None:
        await self.join(link, link.project.vpn, link.spec.also_proxy)
        try:
            task_status.started(VpnOutbound(self, link.name))
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.leave(link.name)

    async def join(self, link: Link, spec: VpnSpec, also_proxy: tuple[object, ...]) -> None:
        """Route ``link``'s ranges through its tunnel; start the VPN if it is the first."""
        name = link.name
        async with self._lock:
            member = _Member(link=link)
            networks, exclude = await self._networks(member, spec, also_proxy)
            if self._vpn is None:
                from tpconf.redirect import VPN, routing

                routing.check_privileges()
                vpn, task = VPN(), _Task()
                # What another project's `up` is told when it finds this one's rules.
                vpn.routing.project = str(link.project.base_dir)
                tg = self._services.task_group
                await tg.start(self._run, task, vpn.run, "vpn", name="vpn")
                self._vpn, self._vpn_task = vpn, task  # only a VPN that started is shared
            self._members[name] = member
            try:
                await self._vpn.set_routes(name, networks, member.link.dialer, exclude=exclude)
                member.networks = frozenset(networks)
                if self._dns_task is None:
                    await self._start_dns(name)
            except BaseException:
                # The caller's `leave` never runs for a join that failed: undo it here.
                with anyio.CancelScope(shield=True):
                    await self._leave(name)
                raise
            shown = ", ".join(sorted(map(str, networks)))
            link.notice(f"vpn-tcp routes {shown}")

    async def update(self, name: str, spec: VpnSpec, also_proxy: tuple[object, ...]) -> None:
        """Recompute ``name``'s ranges (also-proxy changed); open connections are kept."""
        async with self._lock:
            member = self._members.get(name)
            if member is None or self._vpn is None:
                return
            networks, exclude = await self._networks(member, spec, also_proxy)
            await self._vpn.set_routes(name, networks, member.link.dialer, exclude=exclude)
            member.networks = frozenset(networks)
            member.link.notice("vpn-tcp routes updated")

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
        self, member: _Member, spec: VpnSpec, also_proxy: tuple[object, ...]
    ) -> tuple[set[IPv4Network], list[IPv4Address]]:
        from tpconf.redirect import routing

        found = await member.link.discover_networks()
        pods = set(spec.pod_cidrs) or set(found.pod_networks)
        services = set(spec.service_cidrs) or set(found.service_networks)
        member.sources = dict(found.sources)
        extra = await routing.resolve_also_proxy(
            [str(entry) for entry in also_proxy], member.link.resolver.addresses
        )
        for host in extra.unresolved:
            log.warning("also-proxy %s did not resolve in the cluster", host)
        networks = {n for n in pods | services if isinstance(n, IPv4Network)} | set(extra.networks)
        exclude = [found.api_server] if found.api_server is not None else []
        return networks, exclude

    async def _start_dns(self, name: str) -> None:
        from tpconf.proxy import DnsServer
        from tpconf.redirect import routing

        vpn = self._vpn
        assert vpn is not None
        member = self._members[name]
        upstreams = routing.read_nameservers()
        upstream = (str(upstreams[0]), 53) if upstreams else ("127.0.0.1", 53)
        reverse = sorted({str(n) for m in self._members.values() for n in m.networks})

        def server() -> Serve:
            return DnsServer(
                member.link.resolver,
                upstream=upstream,
                reverse_networks=reverse,
                upstream_mark=vpn.mark,
            ).serve

        serve = partial(
            run_dns, vpn, server, upstreams, notice=lambda text: self._services.notice(name, text)
        )
        self._dns_task = _Task()
        tg = self._services.task_group
        await tg.start(self._run, self._dns_task, serve, name, name="vpn-dns")
        self._dns_owner = name

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
            self._services.notice(who, f"vpn-tcp failed: {explain(exc).render()}")
        finally:
            task.done.set()


@dataclass(frozen=True)
class VpnOutbound:
    """A deployment's membership of the session's VPN."""

    vpn: SharedVpn
    name: str

    def status(self) -> str:
        return "routes " + (", ".join(self.vpn.routes(self.name)) or "none")

    async def update(self, spec: DeploymentSpec, project: Project) -> None:
        await self.vpn.update(self.name, project.vpn, spec.also_proxy)

    @contextlib.contextmanager
    def launch(self, request: LaunchRequest) -> Iterator[Launch]:
        yield Launch()  # the whole machine is routed: the process needs nothing of its own


class _Started:
    """A TaskStatus that tells :meth:`SharedVpn._run` when its task has started."""

    def __init__(self, callback: Callable[[int], None]) -> None:
        self._callback = callback

    def started(self, value: int) -> None:
        self._callback(value)


Serve = Callable[..., Coroutine[Any, Any, None]]


async def run_dns(
    vpn: VPN,
    server: Callable[[], Serve],
    nameservers: Sequence[IPv4Address],
    *,
    notice: Callable[[str], None],
    retry: float = 1.0,
    retry_max: float = 30.0,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a DNS server made by ``server`` with the machine's DNS (for ``nameservers``)
    redirected to it while it listens; ``started(port)`` once both are in place.

    A failure to start is raised. A failure later removes the redirect before anything else
    (a redirect to a closed port leaves the machine with no DNS at all), is shown through
    ``notice``, and the server is started again after ``retry`` seconds, doubling up to
    ``retry_max``. On cancellation the caller removes the redirect.
    """
    started = False
    delay = retry
    while True:
        try:
            async with anyio.create_task_group() as tg:
                port = await tg.start(server())
                await vpn.redirect_dns(port, nameservers)
                if started:
                    notice("vpn-tcp DNS server runs again: the machine's DNS goes through it")
                else:
                    started = True
                    task_status.started(port)
                delay = retry
        except Exception as exc:
            if not started:
                raise
            with anyio.CancelScope(shield=True):
                await vpn.redirect_dns(None)
            log.debug("vpn-tcp DNS server failed", exc_info=True)
            notice(
                f"vpn-tcp DNS server failed: {explain(exc).render()}\n"
                "the machine's DNS goes to its own nameservers again (cluster names do not "
                f"resolve); restarting it in {delay:g} s"
            )
        else:
            with anyio.CancelScope(shield=True):
                await vpn.redirect_dns(None)
            notice(f"vpn-tcp DNS server stopped; restarting it in {delay:g} s")
        await anyio.sleep(delay)
        delay = min(retry_max, delay * 2)


def _context_text(context: str | None) -> str:
    return f"context `{context}`" if context else "the current context"


class VpnTcp:
    """The :class:`~tpconf.methods.base.Method` of `method: vpn-tcp`."""

    name = "vpn-tcp"
    summary = "routes for the cluster's networks on the whole machine; needs root"

    runs_image = False

    def check(self, specs: Sequence[DeploymentSpec], report: RuleReport) -> None:
        for spec in specs[1:]:
            first = specs[0]
            if spec.context == first.context:
                continue
            report.error(
                spec,
                f"`vpn-tcp` deployments share one VPN, so they must use the same context: "
                f"`{first.name}` uses {_context_text(first.context)}, "
                f"`{spec.name}` uses {_context_text(spec.context)}",
                key="context" if report.sets(spec, "context") and spec.context else "method",
                hint="give them the same `context`, or use `method: inject-tcp` for this one",
            )

    def describe(self, spec: DeploymentSpec) -> list[str]:
        lines = ["+ vpn-tcp routes for the whole machine (the cluster's networks, its DNS)"]
        if spec.also_proxy:
            shown = ", ".join(str(entry) for entry in spec.also_proxy)
            lines.append(f"+ also through the cluster: {shown}")
        return lines

    def outbound_facet(self, spec: DeploymentSpec, project: Project) -> Hashable:
        # The file's `vpn:` ranges are routed through every vpn-tcp deployment.
        return (spec.also_proxy, project.vpn)

    def runtime(self, services: Services) -> MethodRuntime:
        return SharedVpn(services)


METHOD = VpnTcp()
