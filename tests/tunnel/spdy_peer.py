"""A local stand-in for the API server + container runtime's port-forward (SPDY/3.1).

It answers the upgrade request as the API server does (``101``, ``X-Stream-Protocol-Version:
portforward.k8s.io``), pairs error and data streams by ``requestid`` as the runtime does, and
connects each pair to ``127.0.0.1:ports.get(port, port)``: a refused connect is written on the
error stream, then both streams end, as containerd does. Bytes go both ways; a FIN from the
client half-closes the socket and the socket's EOF is sent as FIN. Like spdystream it has no flow
control. ``frames`` counts the data frames it received, per stream id.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tpconf.tunnel import spdy


class _Pod(asyncio.Protocol):
    """The pod-side socket of one data stream."""

    def __init__(self, server: _Conn, stream_id: int) -> None:
        self.server = server
        self.stream_id = stream_id
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.server.send_data(self.stream_id, data)

    def eof_received(self) -> bool:
        self.server.send_data(self.stream_id, b"", fin=True)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class _Conn(asyncio.Protocol):
    def __init__(self, peer: SpdyPeer) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.buffer = b""
        self.decompress = zlib.decompressobj(zdict=spdy.DICTIONARY)
        self.compress = zlib.compressobj(zdict=spdy.DICTIONARY)
        self.pairs: dict[str, dict[str, int]] = {}
        self.ports: dict[str, int] = {}
        self.sockets: dict[int, _Pod] = {}
        self.pending: dict[int, list[bytes]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer.connections.append(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            self.peer.requests.append(head.decode())
            assert self.transport is not None
            if self.peer.refuse:
                self.transport.write(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden"
                )
                self.transport.close()
                return
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                b"X-Stream-Protocol-Version: portforward.k8s.io\r\n\r\n"
            )
            self.upgraded = True
        while len(self.buffer) >= 8:
            first, second = struct.unpack(">II", self.buffer[:8])
            length = second & 0xFFFFFF
            if len(self.buffer) < 8 + length:
                return
            payload, self.buffer = self.buffer[8 : 8 + length], self.buffer[8 + length :]
            flags = second >> 24
            if first & 0x80000000:
                self.control(first & 0xFFFF, flags, payload)
            else:
                self.data(first, flags, payload)

    def control(self, kind: int, flags: int, payload: bytes) -> None:
        if kind == spdy.SYN_STREAM:
            stream_id = struct.unpack(">I", payload[:4])[0]
            headers = spdy.decode_headers(self.decompress.decompress(payload[10:]))
            assert self.transport is not None
            reply = (
                struct.pack(">I", stream_id)
                + self.compress.compress(spdy.encode_headers({}))
                + self.compress.flush(zlib.Z_SYNC_FLUSH)
            )
            self.transport.write(spdy.control_frame(spdy.SYN_REPLY, reply))
            pair = self.pairs.setdefault(headers["requestid"], {})
            pair[headers["streamtype"]] = stream_id
            self.ports[headers["requestid"]] = int(headers["port"])
            if len(pair) == 2:
                self.pending[pair["data"]] = []
                asyncio.ensure_future(self.forward(headers["requestid"]))
        elif kind == spdy.RST_STREAM:
            stream_id = struct.unpack(">I", payload[:4])[0]
            pod = self.sockets.pop(stream_id, None)
            if pod is not None and pod.transport is not None:
                pod.transport.abort()
        elif kind == spdy.PING:
            self.peer.pings.append(payload)

    def data(self, stream_id: int, flags: int, payload: bytes) -> None:
        self.peer.frames[stream_id] += 1
        pod = self.sockets.get(stream_id)
        if stream_id in self.pending:  # not connected yet: keep order
            self.pending[stream_id].append(payload + (b"\0FIN" if flags & 1 else b""))
            return
        if pod is None or pod.transport is None:
            return
        if payload:
            pod.transport.write(payload)
        if flags & spdy.FLAG_FIN:
            pod.transport.write_eof()

    async def forward(self, request: str) -> None:
        pair, port = self.pairs[request], self.ports[request]
        loop = asyncio.get_running_loop()
        data_id = pair["data"]
        try:
            _, pod = await loop.create_connection(
                lambda: _Pod(self, data_id), "127.0.0.1", self.peer.ports.get(port, port)
            )
        except OSError as exc:
            text = f"failed to connect to localhost:{port} inside namespace: {exc}"
            self.send_data(pair["error"], text.encode(), fin=True)
            self.send_data(data_id, b"", fin=True)
            self.pending.pop(data_id, None)
            return
        self.sockets[data_id] = pod
        for item in self.pending.pop(data_id):
            fin = item.endswith(b"\0FIN")
            self.data_after_connect(pod, item[:-4] if fin else item, fin)

    def data_after_connect(self, pod: _Pod, payload: bytes, fin: bool) -> None:
        assert pod.transport is not None
        if payload:
            pod.transport.write(payload)
        if fin:
            pod.transport.write_eof()

    def send_data(self, stream_id: int, data: bytes, *, fin: bool = False) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(spdy.data_frame_header(stream_id, len(data), fin=fin) + data)

    def ping(self, ident: int) -> None:
        assert self.transport is not None
        self.transport.write(spdy.control_frame(spdy.PING, struct.pack(">I", ident)))

    def connection_lost(self, exc: Exception | None) -> None:
        for pod in self.sockets.values():
            if pod.transport is not None:
                pod.transport.abort()


class SpdyPeer:
    """The listener; ``ports`` maps a pod port to the local port that plays it."""

    def __init__(self) -> None:
        self.port = 0
        self.ports: dict[int, int] = {}
        self.connections: list[_Conn] = []
        self.requests: list[str] = []
        self.pings: list[bytes] = []
        self.frames: Counter[int] = Counter()
        self.refuse = False

    def drop(self) -> None:
        """Cut every connection, as an API server restart would."""
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abort()


@asynccontextmanager
async def spdy_peer() -> AsyncIterator[SpdyPeer]:
    peer = SpdyPeer()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Conn(peer), "127.0.0.1", 0)
    peer.port = server.sockets[0].getsockname()[1]
    try:
        yield peer
    finally:
        server.close()
        peer.drop()
