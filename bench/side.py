"""The tpconf side, in its own process as ``tpconf up`` would be: ``python -m bench.side``.

Reads one JSON line of :class:`SideConfig` on stdin, then:

1. opens the byte path to the agent's sshd: a ``kubectl port-forward`` child
   (``tpconf.tunnel.kubectl_port_forward``) or the ``kubernetes`` client's websocket
   port-forward (a socket handed to asyncssh);
2. opens the SSH connection with ``tpconf.tunnel.open_tunnel`` and reads the pod info;
3. serves, on 127.0.0.1: the inject-tcp SOCKS server (``tpconf.proxy.SocksServer`` +
   ``ClusterResolver`` over the tunnel), and a plain forward (each connection = one
   ``direct-tcpip`` channel to ``fwd_target``, relayed with ``tpconf.net.relay``) that
   measures the tunnel without SOCKS;
4. prints one JSON line (ports and timings) and runs until stdin closes.

``ciphers``, ``window``, ``max_packet`` and ``read_limit`` override tpconf's defaults so the
bench can compare settings without editing tpconf (prototyping only).
"""

from __future__ import annotations

import json
import resource
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import anyio.abc
import kubernetes.stream
from anyio.abc import ByteStream, SocketAttribute

import tpconf.tunnel.connection as tunnel_connection
from bench.kube import client, config
from bench.proto import coalesce_writes, open_tunnel_on_socket
from tpconf import collector
from tpconf.net import LocalDialer, relay
from tpconf.proxy import ClusterResolver, SocksServer
from tpconf.tunnel import (
    Credentials,
    Endpoint,
    PortForwardTarget,
    TunnelSettings,
    fetch_pod_info,
    kubectl_port_forward,
    open_tunnel,
)
from tpconf.tunnel.kubeapi import api_server


@dataclass
class SideConfig:
    namespace: str
    pod: str
    username: str
    client_key: str
    host_key: str
    fwd_target: tuple[str, int]
    transport: str = "kubectl"
    """``kubectl`` (a child), ``inproc`` (tpconf's own port-forward, ``tpconf.tunnel.spdy``) or
    ``ws`` (the kubernetes client's websocket port-forward)."""
    relay: bool = True
    """With ``inproc``: dial through the agent's relay (``False``: SSH channels)."""
    kubectl: str = "kubectl"
    kubeconfig: str | None = None
    ciphers: list[str] | None = None
    window: int | None = None
    max_packet: int | None = None
    read_limit: int | None = None
    relay_chunk: int | None = None
    coalesce: bool = False
    """Prototype: join the SSH packets of one event-loop turn into one socket write."""
    extra: dict[str, Any] = field(default_factory=dict)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    del soft


@asynccontextmanager
async def byte_path(cfg: SideConfig) -> AsyncIterator[Endpoint]:
    """The way to the agent's sshd, per ``cfg.transport``."""
    if cfg.transport == "kubectl":
        target = PortForwardTarget(
            namespace=cfg.namespace,
            resource=f"pod/{cfg.pod}",
            kubectl=cfg.kubectl,
            kubeconfig=cfg.kubeconfig,
        )
        async with kubectl_port_forward(target) as forward:
            yield forward.endpoint
        return
    if cfg.transport == "inproc":
        api = await api_server(cfg.kubeconfig, None)
        if api is None:
            raise RuntimeError("the kubeconfig needs kubectl for port-forward")
        async with api.port_forward(cfg.namespace, cfg.pod) as link:
            yield link
        return
    if cfg.transport == "ws":
        portforward: Any = kubernetes.stream.portforward

        def open_ws() -> Any:
            config.load_kube_config(config_file=cfg.kubeconfig)
            core = client.CoreV1Api()
            return portforward(
                core.connect_get_namespaced_pod_portforward,
                cfg.pod,
                cfg.namespace,
                ports="8022",
            )

        pf = await anyio.to_thread.run_sync(open_ws)
        sock = pf.socket(8022)._socket
        assert isinstance(sock, socket.socket)
        try:
            yield sock
        finally:
            pf.close()
        return
    raise ValueError(f"unknown transport {cfg.transport!r}")


async def main() -> None:
    raise_nofile()
    collector.tune_for_serving()  # as `tpconf up` does before serving
    cfg = SideConfig(**json.loads(sys.stdin.readline()))
    cfg.fwd_target = (cfg.fwd_target[0], int(cfg.fwd_target[1]))
    if cfg.ciphers:
        vars(tunnel_connection)["CIPHERS"] = tuple(cfg.ciphers)  # prototype: the cipher preference
    if cfg.relay_chunk:
        # The chunk is a keyword default of the one relay (tpconf.net) that SOCKS also uses.
        assert relay.__kwdefaults__ is not None
        relay.__kwdefaults__["chunk"] = cfg.relay_chunk
    overrides: dict[str, Any] = {}
    if cfg.window:
        overrides["channel_window"] = cfg.window
    if cfg.max_packet:
        overrides["channel_max_packet"] = cfg.max_packet
    if cfg.read_limit:
        overrides["read_limit"] = cfg.read_limit
    settings = TunnelSettings(**overrides, relay=cfg.relay)
    credentials = Credentials(cfg.username, cfg.client_key, cfg.host_key)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    async with byte_path(cfg) as endpoint:
        timings["transport_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        if isinstance(endpoint, socket.socket):
            opened = open_tunnel_on_socket(endpoint, credentials, settings=settings)
        else:
            opened = open_tunnel(endpoint, credentials, settings=settings)
        async with opened as tunnel:
            timings["ssh_s"] = time.perf_counter() - t1
            if cfg.coalesce:
                coalesce_writes(tunnel)
            t2 = time.perf_counter()
            info = await fetch_pod_info(tunnel)
            timings["podinfo_s"] = time.perf_counter() - t2
            rc = info.resolv_conf
            async with (
                ClusterResolver(tunnel, rc.nameservers, rc.search, rc.ndots) as resolver,
                anyio.create_task_group() as tg,
            ):
                socks = SocksServer(resolver, tunnel)
                socks_port = await tg.start(socks.serve)
                # The same SOCKS server dialing from this machine: the floor of inject-tcp's
                # per-connection cost, without any tunnel (the concurrency row's reference).
                local_socks = SocksServer(resolver, LocalDialer())
                local_socks_port = await tg.start(local_socks.serve)

                async def forward(client: ByteStream) -> None:
                    async with client:
                        try:
                            remote = await tunnel.dial(*cfg.fwd_target)
                        except OSError:
                            return
                        async with remote:
                            await relay(client, remote)

                listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
                fwd_port = listener.extra(SocketAttribute.local_port)
                tg.start_soon(listener.serve, forward)
                line = {
                    "socks_port": socks_port,
                    "local_socks_port": local_socks_port,
                    "fwd_port": fwd_port,
                    "timings": timings,
                    "cipher": tunnel._conn.get_extra_info("send_cipher"),
                    "relay": await tunnel.relay_ready() is not None,
                    "resolv": asdict(rc),
                }
                print(json.dumps(line), flush=True)
                await anyio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin
                tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(main)
