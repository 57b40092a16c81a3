"""The units of one deployment, what each hands the next, and how the loop wires them.

A unit is a coroutine run in its own task by ``loop.py``: it sets its part up, reports it with
``task_status.started(result)`` (so a start-up error reaches the caller of ``tg.start``), then
stays until cancelled; its ``finally`` undoes what it did, shielded, so a cancelled ``tpconf up``
still restores a swapped Deployment. Each unit's result is a frozen value, and the later units
that need it receive it as an argument (:func:`starter`)::

    proxy ──ProxyReady──► tunnel ──TunnelReady──► outbound ──OutboundReady──► process
                                   ├────────────► volumes ──VolumesReady───► export, process
                                   └────────────► expose (with ProxyReady)

Live facts that change while a unit runs (the tunnel's state and current pod, the process's
exit) are held by small status objects the results point to; only the unit that owns one writes
it. docs/architecture.md draws the whole picture.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar, assert_never

import anyio
from anyio.abc import SocketStream, TaskStatus

from tpconf import cluster, volumes
from tpconf.config import DeploymentSpec, ExistingOp, InterceptOp, NewOp, Project, SwapOp
from tpconf.errors import ProxyError, TpconfError, explain
from tpconf.methods import Launch, LaunchRequest, Link, MethodRuntime, Outbound
from tpconf.net import relay
from tpconf.proxy import ClusterResolver
from tpconf.reconcile.launching import command_prefix
from tpconf.reconcile.plan import Unit
from tpconf.reconcile.routes import Routes, route_specs
from tpconf.reconcile.session import AGENT_USER, Session
from tpconf.supervisor import (
    OutputSink,
    pod_environment,
    process_environment,
    withheld_variables,
    write_export,
)
from tpconf.supervisor.process import ProcessExit, ProcessSpec, run_restarting
from tpconf.supervisor.shell import run_shell
from tpconf.tunnel import (
    PodInfo,
    PortForwardTarget,
    ProxyKeys,
    SupervisedForward,
    SupervisedTunnel,
    TunnelEvent,
    TunnelState,
    fetch_pod_info,
    load_ssh_library,
    port_forward_transport,
    run_tunnel,
)

log = logging.getLogger(__name__)

#: Cluster-side cleanup (restoring a swap) gets this long after cancellation before giving up;
#: `tpconf down` finds whatever it could not finish.
CLEANUP_TIMEOUT = 60.0


# ---- what the session lends every unit -----------------------------------------------------------


@dataclass(frozen=True)
class Services:
    """What a running ``up`` lends the units of every deployment, besides its :class:`Session`."""

    session: Session
    output: OutputSink
    """Where processes' output and progress lines go."""
    methods: Mapping[str, MethodRuntime]
    """Each method's runtime for this session, by name (:mod:`tpconf.methods`)."""
    request_stop: Callable[[], None] = lambda: None
    """Ends the session as a signal would (an interactive shell that exits calls it)."""

    def notice(self, name: str, text: str) -> None:
        """A progress line for deployment ``name``."""
        self.output.notice(name, text)


@dataclass(frozen=True)
class Context:
    """What every unit of one deployment gets: the spec it starts with, and the services."""

    spec: DeploymentSpec
    project: Project
    services: Services

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def session(self) -> Session:
        return self.services.session

    def notice(self, text: str) -> None:
        """A progress line for this deployment."""
        self.services.notice(self.name, text)


# ---- what units hand each other ------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyReady:
    """The proxy pod runs: created (``new``), swapped in (``swap``) or found (``existing``)."""

    client: cluster.Cluster
    request: cluster.ProxyRequest
    proxy: cluster.Proxy
    keys: ProxyKeys
    pod: cluster.PodRef
    """The first Ready pod (the tunnel follows re-created ones: :attr:`LinkStatus.pod`)."""


@dataclass
class LinkStatus:
    """The tunnel's state and the pod it reaches now; written by the tunnel unit only."""

    pod: cluster.PodRef
    state: TunnelState = TunnelState.CONNECTING
    workload: str | None = None
    """The container the process stands in for, when it is not the agent's (an intercept's
    app container)."""


@dataclass(frozen=True)
class TunnelReady:
    """SSH to the agent is up (it reconnects by itself) and the pod's facts have been read."""

    tunnel: SupervisedTunnel
    pod_info: PodInfo
    link: LinkStatus


@dataclass(frozen=True)
class OutboundReady:
    """Cluster DNS as the pod resolves it, and the method's network side."""

    resolver: ClusterResolver
    outbound: Outbound


@dataclass(frozen=True)
class VolumesReady:
    """Where the pod's filesystem is mounted (``root`` is ``None`` with `volumes: false`)."""

    root: Path | None
    mounts: tuple[str, ...]
    """The pod's mount points (``TELEPRESENCE_MOUNTS``)."""


@dataclass(frozen=True, order=True)
class Forward:
    """A port of the pod (on ``bind``) whose connections come to ``local`` here."""

    remote: int
    local: int
    bind: str = "0.0.0.0"
    why: str = "expose"

    def __str__(self) -> str:
        where = f"the pod's localhost:{self.remote}" if self.bind == "127.0.0.1" else None
        where = where or f"cluster port {self.remote}"
        return f"{where} -> localhost:{self.local} ({self.why})"


def wanted_forwards(spec: DeploymentSpec, proxy: ProxyReady) -> set[Forward]:
    """`expose`, a swapped container's own ports (unless `expose` maps them), and `from-pod`."""
    forwards = {Forward(m.remote, m.local) for m in spec.expose}
    if isinstance(spec.operation, SwapOp):
        exposed = {m.remote for m in spec.expose}
        why = "the swapped container's port"
        forwards |= {Forward(p, p, why=why) for p in proxy.proxy.ports if p not in exposed}
    forwards |= {Forward(p, p, bind="127.0.0.1", why="from-pod") for p in spec.from_pod}
    return forwards


def delivered_ports(spec: DeploymentSpec, proxy: ProxyReady) -> frozenset[int]:
    """The local ports the cluster sends connections to: the forwards', an intercept's routes'."""
    ports = {forward.local for forward in wanted_forwards(spec, proxy)}
    if isinstance(spec.operation, InterceptOp):
        routes = route_specs(spec.operation, proxy.proxy.intercepted)
        ports |= {route.local_port for route in routes}
    return frozenset(ports)


class ExposeReady:
    """The pod's ports that reach this machine, and `to-pod`: the pod's localhost ports that
    this machine reaches. :meth:`update` applies an edit in place."""

    def __init__(
        self, ctx: Context, proxy: ProxyReady, tunnel: TunnelReady, tg: anyio.abc.TaskGroup
    ) -> None:
        self._ctx = ctx
        self._proxy = proxy
        self._tunnel = tunnel
        self._tg = tg
        self.forwards: dict[Forward, SupervisedForward] = {}
        self.to_pod: dict[int, anyio.CancelScope] = {}

    async def open(self, forward: Forward) -> None:
        self.forwards[forward] = await self._tunnel.tunnel.forward_remote(
            forward.remote, forward.local, bind_host=forward.bind
        )
        self._ctx.notice(str(forward))

    def close(self, forward: Forward) -> None:
        remote = self.forwards.pop(forward, None)
        if remote is not None:
            remote.close()

    async def listen(self, port: int) -> None:
        """`to-pod`: localhost:PORT here connects to localhost:PORT in the pod."""
        self.to_pod[port] = await self._tg.start(self._listen, port)
        self._ctx.notice(f"localhost:{port} -> the pod's localhost:{port} (to-pod)")

    async def _listen(self, port: int, *, task_status: TaskStatus[anyio.CancelScope]) -> None:
        try:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        except OSError as exc:
            raise ProxyError(
                f"to-pod: cannot listen on localhost:{port}: {exc.strerror or exc}",
                hint=f"stop what uses port {port} here, or remove it from `to-pod`",
            ) from exc

        async def connect(client: SocketStream) -> None:
            async with client:
                try:
                    upstream = await self._tunnel.tunnel.dial("127.0.0.1", port)
                except (OSError, TpconfError) as exc:
                    log.info("to-pod %d: %s", port, exc)
                    return
                async with upstream:
                    await relay(client, upstream)

        with anyio.CancelScope() as scope:
            async with listener:
                task_status.started(scope)
                await listener.serve(connect)

    async def update(self, spec: DeploymentSpec) -> None:
        """Close what was removed, open what was added; fit a ``new`` proxy's Service."""
        wanted = wanted_forwards(spec, self._proxy)
        for forward in [f for f in self.forwards if f not in wanted]:
            self.close(forward)
            self._ctx.notice(f"no longer forwarded: {forward}")
        for forward in sorted(wanted - set(self.forwards)):
            await self.open(forward)
        for port in [p for p in self.to_pod if p not in spec.to_pod]:
            self.to_pod.pop(port).cancel()
        for port in spec.to_pod:
            if port not in self.to_pod:
                await self.listen(port)
        ports = tuple(sorted({m.remote for m in spec.expose}))
        await cluster.update_service_ports(self._proxy.client, self._proxy.request, ports)


@dataclass(frozen=True)
class ExportReady:
    """The environment file written for `env.export` (``None``: none asked for)."""

    file: Path | None


@dataclass
class ProcessStatus:
    """What the process unit shows of its command; written by the process unit only."""

    pid: int | None = None
    shell: bool = False
    exit: ProcessExit | None = None
    restarts: int = 0
    """How often `restart` started the command again."""

    def describe(self) -> str:
        again = f", restarted {self.restarts}x" if self.restarts else ""
        if self.exit is not None:
            return "stopped" if self.exit.stopped else self.exit.describe() + again
        if self.pid is None:
            return "none"
        return f"{'interactive shell' if self.shell else 'running'} (pid {self.pid}{again})"


@dataclass(frozen=True)
class ProcessReady:
    """The local command runs (or there is none: ``status.pid`` is ``None``)."""

    status: ProcessStatus = field(default_factory=ProcessStatus)


def pod_env(spec: DeploymentSpec, tunnel: TunnelReady, mounted: VolumesReady) -> dict[str, str]:
    """The pod's side of the process environment (what `env.export` and `tpconf env` show)."""
    pod = tunnel.link.pod
    return pod_environment(
        tunnel.pod_info.env,
        pod=pod.pod,
        container=tunnel.link.workload or pod.container,
        root=str(mounted.root) if mounted.root is not None else None,
        mounts=mounted.mounts,
        overrides=spec.env.as_dict(),
    )


# ---- the units -----------------------------------------------------------------------------------


def _operation(spec: DeploymentSpec) -> cluster.Operation:
    match spec.operation:
        case NewOp():
            return cluster.New()
        case SwapOp(deployment=deployment, container=container):
            return cluster.Swap(deployment=deployment, container=container)
        case ExistingOp(deployment=deployment):
            return cluster.Existing(deployment=deployment)
        case InterceptOp(deployment=deployment, container=container, ports=ports):
            remote = tuple(m.remote for m in ports)
            return cluster.Intercept(deployment=deployment, container=container, ports=remote)
        case _:
            assert_never(spec.operation)


async def proxy_unit(ctx: Context, *, task_status: TaskStatus[ProxyReady]) -> None:
    """The proxy pod: create (new), swap, or adopt (existing); wait until Ready; undo at stop."""
    spec, session = ctx.spec, ctx.session
    client = await session.cluster(spec.context, spec.namespace)
    keys = await anyio.to_thread.run_sync(partial(ProxyKeys.generate, comment=spec.name))
    request = cluster.ProxyRequest(
        # `new`: the name of the Deployment and Service (`new.name`, else the entry's).
        name=spec.target if isinstance(spec.operation, NewOp) else spec.name,
        namespace=spec.namespace or client.namespace,
        operation=_operation(spec),
        agent_image=spec.agent_image,
        session_id=session.session_id,
        owner=session.owner,
        project=session.project,
        keys=cluster.AgentKeys(
            host_private_key=keys.host_private_key, authorized_keys=keys.client_public_key
        ),
        expose_remote_ports=tuple(sorted({m.remote for m in spec.expose} | set(spec.from_pod))),
        shared_keys=keys.to_secret_data(),
    )
    await session.preflight(client, request.namespace, type(request.operation))
    try:
        async with anyio.create_task_group() as meanwhile:
            # What the tunnel needs that does not depend on the pod, while the pod starts.
            meanwhile.start_soon(_target(ctx, client, namespace=request.namespace).prepare)
            meanwhile.start_soon(
                partial(anyio.to_thread.run_sync, load_ssh_library, abandon_on_cancel=True)
            )
            proxy = await cluster.start(client, request, progress=ctx.notice)
            if proxy.shared_keys is not None:  # an intercept: the keys its developers share
                keys = await anyio.to_thread.run_sync(ProxyKeys.from_secret_data, proxy.shared_keys)
            pod = await cluster.wait_for_pod(client, proxy, progress=ctx.notice)
        task_status.started(ProxyReady(client, request, proxy, keys, pod))
        if isinstance(request.operation, cluster.Intercept):
            await _hold_intercept(ctx, client, request)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT) as scope:
            await cluster.stop(client, request, progress=ctx.notice)  # it says what it does
        if scope.cancelled_caught:
            ctx.notice("cleanup timed out: run `tpconf down` to finish it")


async def _hold_intercept(
    ctx: Context, client: cluster.Cluster, request: cluster.ProxyRequest
) -> None:
    """Renew this developer's Lease on the intercept for as long as the unit runs."""
    failing = False
    while True:
        await anyio.sleep(cluster.RENEW_SECONDS)
        try:
            await cluster.renew(client, request)
        except TpconfError as exc:
            # The others see a lapsed Lease only after LEASE_SECONDS: keep trying until then.
            if not failing:
                ctx.notice(f"cannot renew the intercept's lease: {explain(exc).render()}")
            failing = True
        else:
            if failing:
                ctx.notice("the intercept's lease is renewed again")
            failing = False


def _target(
    ctx: Context,
    client: cluster.Cluster,
    pod: cluster.PodRef | None = None,
    *,
    namespace: str = "",
) -> PortForwardTarget:
    """What the tunnel port-forwards to: ``pod``, or (no pod yet) only the way there."""
    return PortForwardTarget(
        namespace=pod.namespace if pod is not None else namespace,
        resource=f"pod/{pod.pod}" if pod is not None else "",
        kubectl=ctx.session.kubectl,
        kubeconfig=ctx.session.kubeconfig,
        # The context tpconf resolved: the kubeconfig's current one may change while up runs.
        context=client.context or ctx.spec.context,
    )


async def tunnel_unit(
    ctx: Context, proxy: ProxyReady, *, task_status: TaskStatus[TunnelReady]
) -> None:
    """Port-forward + SSH to the agent, reconnecting by itself; reads the pod info once up."""
    link = LinkStatus(pod=proxy.pod, workload=proxy.proxy.workload)
    # The first attempt goes to the pod the proxy unit saw Ready (one API request less after
    # Ready). If this unit restarted after that pod was replaced, the port-forward to it fails
    # as Transient and the next attempt asks for the Ready one, as every later attempt does.
    ready_now: list[cluster.PodRef] = [proxy.pod]

    async def current_pod() -> PortForwardTarget:
        if ready_now:
            link.pod = ready_now.pop()
        else:
            link.pod = await cluster.wait_for_pod(proxy.client, proxy.proxy, timeout=300)
        return _target(ctx, proxy.client, link.pod)

    def on_state(event: TunnelEvent) -> None:
        link.state = event.state
        if event.state is TunnelState.RECONNECTING:
            ctx.notice(f"tunnel lost ({event.reason}); reconnecting")
        elif event.state is TunnelState.CONNECTED and event.attempt:
            ctx.notice("tunnel reconnected")

    async with anyio.create_task_group() as tg:
        tunnel = await tg.start(
            partial(run_tunnel, on_state=on_state),
            port_forward_transport(current_pod),
            proxy.keys.credentials(AGENT_USER),
        )
        info = await fetch_pod_info(tunnel)
        task_status.started(TunnelReady(tunnel, info, link))


async def outbound_unit(
    ctx: Context,
    proxy: ProxyReady,
    tunnel: TunnelReady,
    *,
    task_status: TaskStatus[OutboundReady],
) -> None:
    """The cluster resolver, and the method's network side (:mod:`tpconf.methods`)."""
    resolv = tunnel.pod_info.resolv_conf
    async with ClusterResolver(
        tunnel.tunnel, resolv.nameservers, search=resolv.search, ndots=resolv.ndots
    ) as resolver:
        link = Link(
            spec=ctx.spec,
            project=ctx.project,
            dialer=tunnel.tunnel,
            resolver=resolver,
            discover_networks=partial(
                cluster.discover_networks, proxy.client, proxy.request.namespace
            ),
            notice=ctx.notice,
            delivered_ports=partial(delivered_ports, proxy=proxy),
        )
        runtime = ctx.services.methods[ctx.spec.method]
        async with anyio.create_task_group() as tg:
            outbound = await tg.start(runtime.outbound, link)
            task_status.started(OutboundReady(resolver, outbound))


async def volumes_unit(
    ctx: Context, tunnel: TunnelReady, *, task_status: TaskStatus[VolumesReady]
) -> None:
    """The pod's filesystem under the volume root, plus each mapping at its own local path.

    sshfs speaks SFTP over a channel of the deployment's SSH connection (no second login), and
    is mounted again by itself if the mount drops.
    """
    mounts = tuple(tunnel.pod_info.mounts)
    config = ctx.spec.volumes
    if config is None:
        task_status.started(VolumesReady(root=None, mounts=mounts))
        await anyio.sleep_forever()
        return
    wanted = [volumes.Mount("/", config.root, read_only=False)]
    wanted += [volumes.Mount(m.pod, m.local, read_only=m.read_only) for m in config.mounts]
    async with anyio.create_task_group() as tg:
        for mount in wanted:
            await tg.start(volumes.run_mount, mount, tunnel.tunnel.open_sftp_stream)
        ctx.notice(f"pod filesystem mounted at {config.root}")
        task_status.started(VolumesReady(root=config.root, mounts=mounts))


async def expose_unit(
    ctx: Context,
    proxy: ProxyReady,
    tunnel: TunnelReady,
    *,
    task_status: TaskStatus[ExposeReady],
) -> None:
    """Remote forwards (`expose`, a swapped container's ports, `from-pod`) and `to-pod`
    listeners: pod port REMOTE -> 127.0.0.1:LOCAL here, and back."""
    async with anyio.create_task_group() as tg:
        exposed = ExposeReady(ctx, proxy, tunnel, tg)
        try:
            for forward in sorted(wanted_forwards(ctx.spec, proxy)):
                await exposed.open(forward)
            for port in ctx.spec.to_pod:
                await exposed.listen(port)
            task_status.started(exposed)
            await anyio.sleep_forever()
        finally:
            for forward in list(exposed.forwards):
                exposed.close(forward)
            tg.cancel_scope.cancel()


async def routes_unit(
    ctx: Context, proxy: ProxyReady, *, task_status: TaskStatus[Routes | None]
) -> None:
    """An intercept's routes on every Ready replica (nothing for the other operations)."""
    op = ctx.spec.operation
    if not isinstance(op, InterceptOp):
        task_status.started(None)
        await anyio.sleep_forever()
        return
    routes = Routes(
        client=proxy.client,
        proxy=proxy.proxy,
        keys=proxy.keys,
        username=AGENT_USER,
        who=f"{ctx.session.owner} ({ctx.name})",
        target=partial(_target, ctx, proxy.client),
        notice=ctx.notice,
        specs=route_specs(op, proxy.proxy.intercepted),
    )
    await routes.run(task_status=task_status)


async def export_unit(
    ctx: Context,
    tunnel: TunnelReady,
    mounted: VolumesReady,
    *,
    task_status: TaskStatus[ExportReady],
) -> None:
    """`env.export`: the pod environment written as dotenv or JSON (mode 0600)."""
    export = ctx.spec.env.export
    if export is not None:
        env = pod_env(ctx.spec, tunnel, mounted)
        header = f"tpconf: {ctx.name}"
        await anyio.to_thread.run_sync(
            partial(write_export, export.file, env, export.format, header=header)
        )
        ctx.notice(f"environment written to {export.file}")
    task_status.started(ExportReady(export.file if export else None))
    await anyio.sleep_forever()


async def process_unit(
    ctx: Context,
    tunnel: TunnelReady,
    outbound: OutboundReady,
    mounted: VolumesReady,
    *,
    task_status: TaskStatus[ProcessReady],
) -> None:
    """`run`: the local command, supervised, started again as `restart` says (compose's
    policies; the default `no` leaves an exited command exited until the file changes)."""
    spec = ctx.spec
    status = ProcessStatus(shell=spec.shell)
    pod_side = pod_env(spec, tunnel, mounted)
    overrides = spec.env.as_dict()
    withheld = {
        name: tunnel.pod_info.env[name]
        for name in withheld_variables(tunnel.pod_info.env, overrides)
    }
    request = LaunchRequest(spec, pod_side, mounted.root, mounted.mounts, withheld)
    with outbound.outbound.launch(request) as launch:
        if withheld and not launch.contained:
            ctx.notice(
                f"the pod's {', '.join(withheld)} not passed on: they change how programs on "
                "this machine start (set them in `env.set` to pass them)"
            )
        if spec.run is None and not spec.shell and not launch.contained:
            task_status.started(ProcessReady(status))
            await anyio.sleep_forever()
        try:
            await _run_process(ctx, launch, request, status, task_status=task_status)
        finally:
            if launch.cleanup is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT):
                    await launch.cleanup()


async def _run_process(
    ctx: Context,
    launch: Launch,
    request: LaunchRequest,
    status: ProcessStatus,
    *,
    task_status: TaskStatus[ProcessReady],
) -> None:
    spec = ctx.spec
    if launch.prepare is not None:
        await launch.prepare()
    # A contained process gets the pod's side from the method (the container's environment);
    # the command that starts it runs with tpconf's own.
    local = dict(os.environ) if launch.contained else None
    env = local if local is not None else process_environment(os.environ, request.pod_env)
    env.update(launch.env)
    prefix = command_prefix(spec, launch, request.root, request.mounts)

    def exited(result: ProcessExit) -> None:
        status.exit = result

    def restarted(pid: int) -> None:
        status.pid, status.exit = pid, None
        status.restarts += 1

    cwd = str(ctx.project.base_dir)
    async with anyio.create_task_group() as tg:
        if spec.shell:
            run = partial(run_shell, ctx.name, env, cwd=cwd, wrapper=prefix)
            status.pid = await tg.start(_until_exit, run, exited)
            task_status.started(ProcessReady(status))
        else:
            argv = spec.run if isinstance(spec.run, tuple) else ()
            shell = spec.run if isinstance(spec.run, str) else None
            if launch.contained:
                # All of it runs in the container (no `run`: the image's own command); only
                # the prefix's first word is this machine's.
                inner = ("/bin/sh", "-c", shell) if shell is not None else argv
                argv, shell, prefix = (*prefix, *inner), None, ()
            process = ProcessSpec(
                name=spec.name,
                env=env,
                argv=argv,
                shell=shell,
                cwd=cwd,
                wrapper=prefix,
                death_signal=launch.death_signal,
            )
            supervise = partial(
                run_restarting,
                restart=spec.restart,
                output=ctx.services.output,
                on_start=restarted,
                on_exit=exited,
            )
            status.pid = await tg.start(supervise, process)
            task_status.started(ProcessReady(status))
    if spec.shell:
        # `shell: true`: leaving the shell ends `tpconf up`, as in Telepresence 1.
        ctx.notice("shell exited; stopping")
        ctx.services.request_stop()
    await anyio.sleep_forever()


async def _until_exit(
    run: Callable[..., Awaitable[ProcessExit]],
    exited: Callable[[ProcessExit], None],
    *,
    task_status: TaskStatus[int],
) -> None:
    exited(await run(task_status=task_status))


# ---- wiring --------------------------------------------------------------------------------------

R = TypeVar("R")

StartFn = Callable[..., Awaitable[None]]
"""A unit with its arguments bound: the loop calls ``tg.start(fn)``."""


class Results:
    """The results of a deployment's started units, by unit."""

    def __init__(self, by_unit: Mapping[Unit, object]) -> None:
        self._by_unit = by_unit

    def get(self, unit: Unit, kind: type[R]) -> R:
        """The result of ``unit``; the planner starts a unit's inputs first, so a missing one
        is a bug."""
        value = self._by_unit.get(unit)
        if not isinstance(value, kind):
            raise TypeError(f"unit {unit.name.lower()} has not started ({value!r})")
        return value


def starter(unit: Unit, ctx: Context, results: Results) -> StartFn:
    """``unit`` with the results of the units it needs as its arguments."""
    proxy = partial(results.get, Unit.PROXY, ProxyReady)
    tunnel = partial(results.get, Unit.TUNNEL, TunnelReady)
    mounted = partial(results.get, Unit.VOLUMES, VolumesReady)
    match unit:
        case Unit.PROXY:
            return partial(proxy_unit, ctx)
        case Unit.TUNNEL:
            return partial(tunnel_unit, ctx, proxy())
        case Unit.OUTBOUND:
            return partial(outbound_unit, ctx, proxy(), tunnel())
        case Unit.VOLUMES:
            return partial(volumes_unit, ctx, tunnel())
        case Unit.EXPOSE:
            return partial(expose_unit, ctx, proxy(), tunnel())
        case Unit.ROUTES:
            return partial(routes_unit, ctx, proxy())
        case Unit.EXPORT:
            return partial(export_unit, ctx, tunnel(), mounted())
        case Unit.PROCESS:
            outbound = results.get(Unit.OUTBOUND, OutboundReady)
            return partial(process_unit, ctx, tunnel(), outbound, mounted())
        case _:
            assert_never(unit)


async def update(unit: Unit, result: object, spec: DeploymentSpec, project: Project) -> None:
    """Apply an edit to a running unit in place (the plan's ``update`` actions)."""
    match result:
        case ExposeReady():
            await result.update(spec)
        case Routes() if isinstance(spec.operation, InterceptOp):
            await result.update(route_specs(spec.operation, result.intercepted))
        case OutboundReady():
            await result.outbound.update(spec, project)
        case _:
            raise RuntimeError(f"unit {unit.name.lower()} cannot be updated in place")
