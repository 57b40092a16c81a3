"""The tunnel to a proxy pod: ``kubectl port-forward`` + one multiplexed SSH connection.

The only package that imports the SSH library (asyncssh). What it owns:

- :mod:`~tpconf.tunnel.keys`: per-proxy client and host keys, as the Secret holds them;
- :mod:`~tpconf.tunnel.connection`: one pinned SSH connection: ``dial`` (a
  :class:`tpconf.net.Dialer`), remote forwards, commands, the sftp stream;
- :mod:`~tpconf.tunnel.coalesce`: the SSH connection's socket, one write per event-loop turn;
- :mod:`~tpconf.tunnel.stream`: an SSH channel as an anyio byte stream;
- :mod:`~tpconf.tunnel.portforward`: the ``kubectl port-forward`` child;
- :mod:`~tpconf.tunnel.session`: supervision: reconnect with back-off, state changes;
- :mod:`~tpconf.tunnel.podinfo`: the pod's env, resolv.conf, hostname and mounts.
"""

from __future__ import annotations

from tpconf.tunnel.connection import (
    AGENT_SSH_PORT,
    DEFAULT_SETTINGS,
    CommandResult,
    Credentials,
    Endpoint,
    RemoteForward,
    Tunnel,
    TunnelSettings,
    open_tunnel,
)
from tpconf.tunnel.keys import AGENT_SECRET_KEYS, ProxyKeys
from tpconf.tunnel.podinfo import PODINFO_PATH, PodInfo, ResolvConf, fetch_pod_info
from tpconf.tunnel.portforward import (
    PortForward,
    PortForwardTarget,
    kubectl_port_forward,
    port_forward_transport,
)
from tpconf.tunnel.session import (
    SupervisedForward,
    SupervisedTunnel,
    Transport,
    TunnelEvent,
    TunnelState,
    run_tunnel,
)

__all__ = [
    "AGENT_SECRET_KEYS",
    "AGENT_SSH_PORT",
    "DEFAULT_SETTINGS",
    "PODINFO_PATH",
    "CommandResult",
    "Credentials",
    "Endpoint",
    "PodInfo",
    "PortForward",
    "PortForwardTarget",
    "ProxyKeys",
    "RemoteForward",
    "ResolvConf",
    "SupervisedForward",
    "SupervisedTunnel",
    "Transport",
    "Tunnel",
    "TunnelEvent",
    "TunnelSettings",
    "TunnelState",
    "fetch_pod_info",
    "kubectl_port_forward",
    "open_tunnel",
    "port_forward_transport",
    "run_tunnel",
]
