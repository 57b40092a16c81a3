"""What a tunnel is configured with, free of the SSH library (importing asyncssh takes 0.1-0.2 s:
:mod:`tpconf.tunnel.connection` loads it when the first SSH connection is made, so ``up``
reaches the API server without it; docs/architecture.md, "Start").

:class:`TunnelSettings` (every tunable with the measurement behind its default),
:class:`Credentials`, :class:`CommandResult`, :data:`Endpoint` and the agent's port and relay
command.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeAlias

from tpconf.tunnel.coalesce import MAX_COALESCE

if TYPE_CHECKING:
    from tpconf.tunnel.spdy import SpdyConnection

#: Unread bytes above which an SSH channel stops reading (back-pressure to the sender); half the
#: default channel window (see ``TunnelSettings.read_limit``).
DEFAULT_READ_LIMIT = 4 * 1024 * 1024

Endpoint: TypeAlias = "tuple[str, int] | socket.socket | SpdyConnection"
"""Where the agent's sshd is reached: a local TCP address (the ``kubectl port-forward`` port), a
connected socket (e.g. the one the ``kubernetes`` client's port-forward hands out), or this
process's own port-forward connection to the pod (:mod:`tpconf.tunnel.spdy`), which also
carries the relay (:mod:`tpconf.tunnel.mux`)."""

#: The port the agent's sshd listens on inside the pod.
AGENT_SSH_PORT = 8022
#: The command that starts the agent's relay (tpconf/agent/relay.py) in an exec session.
RELAY_COMMAND = "tpconf-agent relay"

#: Fastest first. AES-GCM uses AES-NI through OpenSSL; asyncssh's own default puts
#: chacha20-poly1305 first, which is much slower in Python.
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)


@dataclass(frozen=True)
class TunnelSettings:
    """Runtime tunables of a tunnel. Tests pass small values; nobody patches ``sleep``."""

    keepalive_interval: float = 5.0
    """Seconds between SSH keepalives when the connection is idle."""
    keepalive_count_max: int = 3
    """Unanswered keepalives after which the connection counts as dropped (~15 s by default)."""
    connect_timeout: float = 15.0
    """Seconds for TCP connect, SSH handshake and authentication together."""
    close_timeout: float = 2.0
    """Seconds a clean SSH close may take before the connection is dropped."""
    command_timeout: float = 30.0
    """Default limit for :meth:`Tunnel.run`."""
    channel_window: int = 8 * 1024 * 1024
    """SSH receive window of each channel, in bytes: how much the agent may send before it
    waits for our window adjust. The path to the pod (kubectl, apiserver, kubelet) has a long
    and jittery round trip, so a 2 MiB window stalled downloads: 8 MiB (with ``read_limit``
    4 MiB) measured 1.16-1.31x faster downloads and 1.21x faster uploads through kubectl
    port-forward (bench/RESULTS.md, tunnel tuning). The price is memory when a reader lags:
    such a channel holds up to ``read_limit + channel_window`` (12 MiB) before the agent stops."""
    channel_max_packet: int = 32 * 1024
    """Largest SSH data packet we accept on a channel, in bytes (OpenSSH sends 32 KiB). 256 KiB
    measured 0.92-1.41x, i.e. noise: kept at OpenSSH's size."""
    write_coalesce: int = MAX_COALESCE
    """Most bytes of SSH packets joined into one socket write (the packets written in one
    event-loop turn leave together, see :mod:`tpconf.tunnel.coalesce`); 0 writes every packet
    on its own, as asyncssh does. Measured through kubectl port-forward: uploads 1.60-2.07x
    (bench/RESULTS.md, tunnel tuning), because kubectl and the kube chain behind it wake up per
    write rather than per byte."""
    read_limit: int = DEFAULT_READ_LIMIT
    """Unread bytes per channel above which the channel stops taking data, so its window is no
    longer re-opened and the far end stops. Raised with ``channel_window`` from 1 MiB (measured
    together, see there): a reader that lags briefly no longer stalls the window."""
    relay: bool = True
    """Carry ``dial()`` over the agent's relay (:mod:`tpconf.tunnel.mux`) instead of SSH
    channels, when the tunnel runs on this process's own port-forward (not a ``kubectl`` child)
    and the agent image has the relay. Measured on the bench's 2 cores (bench/RESULTS.md, issue
    15): bulk from 0.51-0.66x of a bare ``kubectl port-forward`` over SSH to >= 0.9x, CPU per
    100 MB from ~4x to <= 1.5x. ``False`` keeps every byte in SSH (the comparison's baseline)."""
    relay_window: int = 4 * 1024 * 1024
    """Bytes the other end may send on one relay channel before the reader has consumed them:
    what a channel holds at most when its reader lags (each end, each direction). The path has
    a long, jittery round trip through the API server and the kubelet; 4 MiB keeps a 150 MB/s
    transfer going through 25 ms of acknowledgement delay."""
    relay_timeout: float = 10.0
    """Seconds to start the relay and prove the session key to it, before falling back to SSH."""

    backoff_initial: float = 0.2
    """Supervision: first delay before reconnecting, doubled after each failure."""
    backoff_max: float = 5.0
    """Supervision: the longest delay between reconnection attempts."""
    first_connect_timeout: float = 30.0
    """Supervision: seconds the first connection may take (retries included) before failing."""
    dial_wait: float = 10.0
    """Supervision: seconds ``dial()`` waits for a reconnection before raising TunnelDown."""


#: The defaults, shared (the dataclass is frozen).
DEFAULT_SETTINGS = TunnelSettings()


@dataclass(frozen=True, repr=False)
class Credentials:
    """Who we log in as and whom we trust: the client half and the pinned host half of ProxyKeys."""

    username: str
    client_key: str
    """OpenSSH private key text."""
    host_key: str
    """The one host public key accepted (``ssh-ed25519 AAAA...``)."""

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, host_key={self.host_key!r})"


class CommandResult(NamedTuple):
    """What :meth:`Tunnel.run` returns."""

    exit_status: int
    """The exit status; negative for a signal, -1 when unknown."""
    stdout: bytes
    stderr: bytes
