"""The tunnel to a proxy pod: a port-forward (in process) + one pinned SSH connection + the relay.

The only package that imports the SSH library (asyncssh). What it owns:

- :mod:`~tpconf.tunnel.settings`: tunables, credentials, endpoints (no SSH library: asyncssh
  loads with the first connection);
- :mod:`~tpconf.tunnel.keys`: per-proxy client and host keys, as the Secret holds them;
- :mod:`~tpconf.tunnel.connection`: one pinned SSH connection: ``dial`` (a
  :class:`tpconf.net.Dialer`), remote forwards, commands, the sftp stream;
- :mod:`~tpconf.tunnel.coalesce`: the SSH connection's socket, one write per event-loop turn;
- :mod:`~tpconf.tunnel.stream`: an SSH channel as an anyio byte stream;
- :mod:`~tpconf.tunnel.spdy`, :mod:`~tpconf.tunnel.kubeapi`: port-forward in this process;
- :mod:`~tpconf.tunnel.mux`: the agent's relay, the data path of ``dial()`` and sftp;
- :mod:`~tpconf.tunnel.portforward`: the transport per attempt (in process, or a ``kubectl
  port-forward`` child);
- :mod:`~tpconf.tunnel.session`: supervision: reconnect with back-off, state changes;
- :mod:`~tpconf.tunnel.podinfo`: the pod's env, resolv.conf, hostname and mounts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
from tpconf.tunnel.settings import (
    AGENT_SSH_PORT,
    DEFAULT_SETTINGS,
    CommandResult,
    Credentials,
    Endpoint,
    TunnelSettings,
)

if TYPE_CHECKING:
    from tpconf.tunnel.connection import RemoteForward, Tunnel, open_tunnel

#: Names of :mod:`tpconf.tunnel.connection`, which imports the SSH library (0.1-0.2 s): loaded
#: on first use, so that ``up`` reaches the API server first.
_CONNECTION = ("RemoteForward", "Tunnel", "open_tunnel")


def load_ssh_library() -> None:
    """Import the SSH library now. Its import takes about 0.3 s (a search for liboqs that runs
    ``ldconfig``, ``gcc`` and ``ld`` included): the proxy unit calls this in a worker thread
    while its pod starts, so the first tunnel does not import it in the event loop after the pod
    is Ready."""
    from tpconf.tunnel import connection  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _CONNECTION:
        from tpconf.tunnel import connection

        return getattr(connection, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "load_ssh_library",
    "open_tunnel",
    "port_forward_transport",
    "run_tunnel",
]
