"""The seam between the tunnel and its users: something that opens TCP streams elsewhere.

The proxy, the VPN and the DNS resolver need "a TCP connection to host:port as seen from the
pod", and must not know that an SSH channel provides it (the layers forbid them to import the
tunnel). The tunnel implements :class:`Dialer`; the reconciler hands it to them.
"""

from __future__ import annotations

from typing import Protocol

from anyio.abc import ByteStream


class Dialer(Protocol):
    """Opens TCP connections from another place (the proxy pod, or locally in tests)."""

    async def dial(self, host: str, port: int) -> ByteStream:
        """Connect to ``host:port``; raises ``OSError`` or a :class:`~tpconf.errors.TunnelError`."""
        ...


class LocalDialer:
    """A :class:`Dialer` that connects from this machine. For tests and for localhost."""

    async def dial(self, host: str, port: int) -> ByteStream:
        import anyio

        return await anyio.connect_tcp(host, port)
