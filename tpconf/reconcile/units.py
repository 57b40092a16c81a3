"""The units of one deployment: each is a coroutine run in its own task by ``loop.py``.

A unit sets its part up, calls ``task_status.started()`` (so a start-up error reaches the caller
of ``tg.start``), then stays until cancelled; its ``finally`` undoes what it did, shielded, so a
cancelled ``tpconf up`` still restores a swapped Deployment. Units of a deployment share a
:class:`Runtime`, filled in start order (proxy, tunnel, outbound, volumes, expose, export,
process), which is what lets a later unit use an earlier one's result.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from anyio.abc import TaskStatus

from tpconf import cluster, volumes
from tpconf.config import DeploymentSpec, ExistingOp, NewOp, SwapOp
from tpconf.methods import inject
from tpconf.proxy import ClusterResolver, SocksServer
from tpconf.reconcile.session import AGENT_USER, Session
from tpconf.supervisor import (
    ProcessExit,
    ProcessSpec,
    pod_environment,
    run_process,
    run_shell,
    write_export,
)
from tpconf.tunnel import (
    PodInfo,
    PortForwardTarget,
    ProxyKeys,
    SupervisedForward,
    SupervisedTunnel,
    TunnelEvent,
    fetch_pod_info,
    port_forward_transport,
    run_tunnel,
)

log = logging.getLogger(__name__)

#: Cluster-side cleanup (restoring a swap) gets this long after cancellation before giving up;
#: `tpconf down` finds whatever it could not finish.
CLEANUP_TIMEOUT = 60.0


@dataclass
class Runtime:
    """What the units of one deployment know about each other."""

    spec: DeploymentSpec
    session: Session
    request: cluster.ProxyRequest | None = None
    client: cluster.Cluster | None = None
    proxy: cluster.Proxy | None = None
    pod: cluster.PodRef | None = None
    keys: ProxyKeys | None = None
    tunnel: SupervisedTunnel | None = None
    tunnel_state: str = "starting"
    pod_info: PodInfo | None = None
    resolver: ClusterResolver | None = None
    socks_port: int | None = None
    forwards: dict[tuple[int, int], SupervisedForward] = field(default_factory=dict)
    volume_root: str | None = None
    volume_mounts: tuple[str, ...] = ()
    process_state: str = "not started"
    process_exit: ProcessExit | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def need_tunnel(self) -> SupervisedTunnel:
        if self.tunnel is None:  # the planner starts the tunnel first: a bug if we get here
            raise RuntimeError(f"{self.name}: tunnel not started")
        return self.tunnel

    def need_pod_info(self) -> PodInfo:
        if self.pod_info is None:
            raise RuntimeError(f"{self.name}: pod info not read")
        return self.pod_info

    def pod_env(self) -> dict[str, str]:
        """The pod's side of the process environment (what `env.export` and `tpconf env` show)."""
        info = self.need_pod_info()
        assert self.pod is not None
        return pod_environment(
            info.env,
            pod=self.pod.pod,
            container=self.pod.container,
            root=self.volume_root,
            mounts=self.volume_mounts or info.mounts,
            overrides=self.spec.env.as_dict(),
        )


UnitFn = Callable[..., Any]


def _operation(spec: DeploymentSpec) -> cluster.Operation:
    op = spec.operation
    if isinstance(op, NewOp):
        return cluster.New()
    if isinstance(op, SwapOp):
        return cluster.Swap(deployment=op.deployment, container=op.container)
    assert isinstance(op, ExistingOp)
    return cluster.Existing(deployment=op.deployment)


def _image(spec: DeploymentSpec) -> str:
    op = spec.operation
    return op.image if isinstance(op, NewOp) and op.image else spec.agent_image


async def proxy_unit(rt: Runtime, *, task_status: TaskStatus[None]) -> None:
    """The proxy pod: create (new), swap, or adopt (existing); wait until Ready; undo at stop."""
    spec, session = rt.spec, rt.session
    client = await session.cluster(spec.context, spec.namespace)
    keys = await anyio.to_thread.run_sync(partial(ProxyKeys.generate, comment=spec.name))
    request = cluster.ProxyRequest(
        name=spec.name,
        namespace=spec.namespace or client.namespace,
        operation=_operation(spec),
        agent_image=_image(spec),
        session_id=session.session_id,
        owner=session.owner,
        project=session.project,
        keys=cluster.AgentKeys(
            host_private_key=keys.host_private_key, authorized_keys=keys.client_public_key
        ),
        expose_remote_ports=tuple(sorted({m.remote for m in spec.expose})),
    )
    rt.client, rt.keys, rt.request = client, keys, request
    progress = partial(session.notice, spec.name)
    await session.preflight(client, request.namespace, type(request.operation))
    try:
        rt.proxy = await cluster.start(client, request, progress=progress)
        rt.pod = await cluster.wait_for_pod(client, rt.proxy, progress=progress)
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT) as scope:
            await cluster.stop(client, request, progress=progress)  # progress says what it does
        if scope.cancelled_caught:
            session.notice(spec.name, "cleanup timed out: run `tpconf down` to finish it")


async def tunnel_unit(rt: Runtime, *, task_status: TaskStatus[None]) -> None:
    """Port-forward + SSH to the agent, reconnecting by itself; reads the pod info once up."""
    assert rt.client is not None and rt.proxy is not None and rt.keys is not None
    client, proxy, session = rt.client, rt.proxy, rt.session

    async def current_pod() -> PortForwardTarget:
        # A re-created pod has a new name: find the Ready one on every attempt.
        rt.pod = await cluster.wait_for_pod(client, proxy, timeout=300)
        return PortForwardTarget(
            namespace=rt.pod.namespace,
            resource=f"pod/{rt.pod.pod}",
            kubectl=session.kubectl,
            kubeconfig=session.kubeconfig,
            context=rt.spec.context,
        )

    def on_state(event: TunnelEvent) -> None:
        rt.tunnel_state = event.state.value
        if event.state.value == "reconnecting":
            session.notice(rt.name, f"tunnel lost ({event.reason}); reconnecting")
        elif event.state.value == "connected" and event.attempt:
            session.notice(rt.name, "tunnel reconnected")

    async with anyio.create_task_group() as tg:
        rt.tunnel = await tg.start(
            partial(run_tunnel, on_state=on_state),
            port_forward_transport(current_pod),
            rt.keys.credentials(AGENT_USER),
        )
        rt.pod_info = await fetch_pod_info(rt.tunnel)
        task_status.started()


async def outbound_unit(rt: Runtime, *, task_status: TaskStatus[None]) -> None:
    """The cluster resolver, plus the SOCKS server (inject-tcp) or the shared VPN (vpn-tcp)."""
    tunnel, info = rt.need_tunnel(), rt.need_pod_info()
    resolv = info.resolv_conf
    async with ClusterResolver(
        tunnel, resolv.nameservers, search=resolv.search, ndots=resolv.ndots
    ) as resolver:
        rt.resolver = resolver
        if rt.spec.method == "vpn-tcp":
            vpn, client, request = rt.session.vpn, rt.client, rt.request
            assert vpn is not None and client is not None and request is not None
            await vpn.join(rt.name, tunnel, resolver, client, request.namespace, rt.spec.also_proxy)
            try:
                task_status.started()
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await vpn.leave(rt.name)
        async with anyio.create_task_group() as tg:
            rt.socks_port = await tg.start(SocksServer(resolver, tunnel).serve)
            task_status.started()


async def update_routes(rt: Runtime) -> None:
    """`also-proxy` of a vpn-tcp deployment changed: re-resolve it and update its routes."""
    vpn, client, request = rt.session.vpn, rt.client, rt.request
    if rt.spec.method == "vpn-tcp" and vpn is not None and client and request:
        await vpn.update(rt.name, client, request.namespace, rt.spec.also_proxy)
        rt.session.notice(rt.name, "vpn-tcp routes updated")


async def volumes_unit(rt: Runtime, *, task_status: TaskStatus[None]) -> None:
    """The pod's filesystem under the volume root, plus each mapping at its own local path.

    sshfs speaks SFTP over a channel of the deployment's SSH connection (no second login), and
    is mounted again by itself if the mount drops.
    """
    info, spec = rt.need_pod_info(), rt.spec
    rt.volume_mounts = tuple(info.mounts)
    config = spec.volumes
    if config is None:
        task_status.started()
        await anyio.sleep_forever()
        return
    tunnel = rt.need_tunnel()
    wanted = [volumes.Mount("/", config.root, read_only=False)]
    wanted += [volumes.Mount(m.pod, m.local, read_only=m.read_only) for m in config.mounts]
    try:
        async with anyio.create_task_group() as tg:
            for mount in wanted:
                await tg.start(volumes.run_mount, mount, tunnel.open_sftp_stream)
            rt.volume_root = str(config.root)
            rt.session.notice(rt.name, f"pod filesystem mounted at {config.root}")
            task_status.started()
    finally:
        rt.volume_root = None  # unmounted: a restarted process must not be pointed at it


async def _open_forward(rt: Runtime, local: int, remote: int) -> None:
    tunnel = rt.need_tunnel()
    rt.forwards[(local, remote)] = await tunnel.forward_remote(remote, local)
    rt.session.notice(rt.name, f"cluster port {remote} -> localhost:{local}")


def _close_forward(rt: Runtime, key: tuple[int, int]) -> None:
    forward = rt.forwards.pop(key, None)
    if forward is not None:
        forward.close()


async def expose_unit(rt: Runtime, *, task_status: TaskStatus[None]) -> None:
    """One remote forward per `expose` mapping: pod port REMOTE -> 127.0.0.1:LOCAL here."""
    try:
        for mapping in rt.spec.expose:
            await _open_forward(rt, mapping.local, mapping.remote)
        task_status.started()
        await anyio.sleep_forever()
    finally:
        for key in list(rt.forwards):
            _close_forward(rt, key)


async def update_exposes(rt: Runtime, new: DeploymentSpec) -> None:
    """Apply an `expose` change in place: close removed forwards, open added ones."""
    wanted = {(m.local, m.remote) for m in new.expose}
    for key in [k for k in rt.forwards if k not in wanted]:
        _close_forward(rt, key)
        rt.session.notice(rt.name, f"cluster port {key[1]} no longer forwarded")
    for local, remote in sorted(wanted - set(rt.forwards)):
        await _open_forward(rt, local, remote)
    if rt.client is not None and rt.request is not None:
        ports = tuple(sorted({remote for _, remote in wanted}))
        await cluster.update_service_ports(rt.client, rt.request, ports)


async def export_unit(rt: Runtime, *, task_status: TaskStatus[None]) -> None:
    """`env.export`: the pod environment written as dotenv or JSON (mode 0600)."""
    export = rt.spec.env.export
    if export is not None:
        env = rt.pod_env()
        await anyio.to_thread.run_sync(
            partial(write_export, export.file, env, export.format, header=f"tpconf: {rt.name}")
        )
        rt.session.notice(rt.name, f"environment written to {export.file}")
    task_status.started()
    await anyio.sleep_forever()


def process_env(rt: Runtime) -> dict[str, str]:
    """The local process's environment: local, then the pod's side (:meth:`Runtime.pod_env`)."""
    return {**os.environ, **rt.pod_env()}


async def process_unit(rt: Runtime, *, task_status: TaskStatus[None]) -> None:
    """`run`: the local command, supervised; it is not restarted when it exits (compose-like)."""
    spec = rt.spec
    if spec.run is None and not spec.shell:
        rt.process_state = "none"
        task_status.started()
        await anyio.sleep_forever()
    env = process_env(rt)
    with contextlib.ExitStack() as stack:
        prefix: tuple[str, ...] = ()
        if spec.method == "inject-tcp":
            assert rt.socks_port is not None
            wrapper = stack.enter_context(inject.torsocks_wrapper(rt.socks_port))
            env.update(wrapper.env)
            prefix = tuple(wrapper.argv)
        if spec.volumes is not None and spec.volumes.real_paths and rt.volume_root:
            # proot outermost: the torsocks wrapper and the command see the pod's paths.
            prefix = (*volumes.real_path_wrapper(rt.volume_root, rt.volume_mounts), *prefix)

        def exited(result: ProcessExit) -> None:
            rt.process_exit = result
            rt.process_state = "stopped" if result.stopped else result.describe()

        if spec.shell:
            await _interactive_shell(rt, env, prefix, exited, task_status)
            return
        argv = spec.run if isinstance(spec.run, tuple) else ()
        shell = spec.run if isinstance(spec.run, str) else None
        process = ProcessSpec(
            name=spec.name,
            env=env,
            argv=argv,
            shell=shell,
            cwd=str(rt.session.project_dir),
            wrapper=prefix,
        )
        async with anyio.create_task_group() as tg:
            pid = await tg.start(
                partial(run_process, output=rt.session.output, on_exit=exited), process
            )
            rt.process_state = f"running (pid {pid})"
            task_status.started()
        await anyio.sleep_forever()


async def _interactive_shell(
    rt: Runtime,
    env: dict[str, str],
    prefix: tuple[str, ...],
    exited: Callable[[ProcessExit], None],
    task_status: TaskStatus[None],
) -> None:
    """`shell: true`: the user's shell on this terminal; leaving it ends `tpconf up` (like v1)."""

    async def shell(*, task_status: TaskStatus[int]) -> None:
        cwd = str(rt.session.project_dir)
        exited(await run_shell(rt.name, env, cwd=cwd, wrapper=prefix, task_status=task_status))

    async with anyio.create_task_group() as tg:
        pid = await tg.start(shell)
        rt.process_state = f"interactive shell (pid {pid})"
        task_status.started()
    rt.session.notice(rt.name, "shell exited; stopping")
    rt.session.request_stop()
    await anyio.sleep_forever()
