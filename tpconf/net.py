"""The seam between the tunnel and its users: something that opens TCP streams elsewhere.

The proxy, the VPN and the DNS resolver need "a TCP connection to host:port as seen from the
pod", and must not know that an SSH channel provides it (the layers forbid them to import the
tunnel). The tunnel implements :class:`Dialer`; the reconciler hands it to them.
"""

from __future__ import annotations

from typing import Protocol

import anyio
from anyio.abc import ByteStream

#: Bytes asked for per read when relaying: large reads keep per-chunk overhead low in bulk
#: transfers, and a read returns what is there, so small exchanges are not delayed.
RELAY_CHUNK = 256 * 1024


class Dialer(Protocol):
    """Opens TCP connections from another place (the proxy pod, or locally in tests)."""

    async def dial(self, host: str, port: int) -> ByteStream:
        """Connect to ``host:port``; raises ``OSError`` or a :class:`~tpconf.errors.TunnelError`."""
        ...


async def relay(a: ByteStream, b: ByteStream, *, chunk: int = RELAY_CHUNK) -> None:
    """Copy bytes both ways until both directions have ended (SOCKS, vpn-tcp, sshfs use it).

    An EOF is passed on as an EOF (half-close), not turned into a close: a client that shuts
    down its write side still gets the reply. A broken side (reset, closed) stops both
    directions. The caller closes the streams.
    """

    async def pump(source: ByteStream, sink: ByteStream) -> None:
        try:
            while True:
                try:
                    data = await source.receive(chunk)
                except anyio.EndOfStream:
                    break
                await sink.send(data)
            await sink.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump, a, b)
        tg.start_soon(pump, b, a)


class LocalDialer:
    """A :class:`Dialer` that connects from this machine. For tests and for localhost."""

    async def dial(self, host: str, port: int) -> ByteStream:
        return await anyio.connect_tcp(host, port)
