"""Prototype of a fix to ``tpconf.tunnel.open_tunnel`` (measured here, proposed in RESULTS.md).

``open_tunnel`` passes ``host=""`` with a connected socket; asyncssh then takes the peer name
from the socket, and the ``kubernetes`` client's port-forward socket is one end of an AF_UNIX
``socketpair`` whose peer name is empty: asyncssh fails with ``TypeError: cannot unpack
non-iterable NoneType object``. Giving asyncssh a nominal host and port for a socket endpoint
fixes it (the host key is pinned by key, not by host name, so the name is not used to trust).
This is the same call as ``open_tunnel`` otherwise.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncssh

from tpconf.tunnel import AGENT_SSH_PORT, Credentials, Tunnel, TunnelSettings
from tpconf.tunnel import connection as conn_module
from tpconf.tunnel import settings as settings_module


@asynccontextmanager
async def open_tunnel_on_socket(
    sock: socket.socket, credentials: Credentials, *, settings: TunnelSettings
) -> AsyncIterator[Tunnel]:
    client_key, host_key = conn_module._import_keys(credentials)
    client = conn_module._Client()
    conn, _ = await asyncssh.create_connection(
        lambda: client,
        "localhost",  # the fix: a nominal peer for a socketpair (no peer name)
        AGENT_SSH_PORT,
        sock=sock,
        username=credentials.username,
        client_keys=[client_key],
        known_hosts=([host_key], [], []),
        preferred_auth="publickey",
        agent_path=None,
        config=None,
        encryption_algs=list(settings_module.CIPHERS),
        keepalive_interval=settings.keepalive_interval,
        keepalive_count_max=settings.keepalive_count_max,
        connect_timeout=settings.connect_timeout,
    )
    try:
        yield Tunnel(conn, client, where="a socketpair", settings=settings)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(settings.close_timeout):
            conn.close()
            await conn.wait_closed()
        conn.abort()


class CoalescingTransport:
    """Prototype: joins the SSH packets written in one event-loop turn into one ``write``.

    asyncssh writes every SSH packet (32 KiB of data at most) with its own ``transport.write``,
    so a 256 KiB ``chan.write`` becomes 8 ``send()`` calls, each waking the reader on the other
    side (kubectl) separately. Here they are buffered and written once, at the end of the turn.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def coalesce_writes(tunnel: Tunnel) -> None:
    """Install :class:`CoalescingTransport` under a live tunnel's SSH connection."""
    conn: Any = tunnel._conn
    conn._transport = CoalescingTransport(conn._transport)
