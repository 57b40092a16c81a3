"""The measuring client: blocking sockets for round trips and bulk, asyncio for concurrency.

Targets are ``(host, port)`` of something that reaches the echo server (:mod:`bench.echo`);
with ``socks`` set, the client speaks SOCKS5 to it first and CONNECTs to ``target`` (the
Service's ClusterIP: torsocks sends RESOLVE first, then CONNECT to the address; RESOLVE is
measured in the DNS rows).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass

import anyio

Address = tuple[str, int]
CHUNK = bytes(256 * 1024)


@dataclass(frozen=True)
class Route:
    """How to reach the echo server: connect to ``address``, via SOCKS5 to ``target`` if set."""

    address: Address
    socks_target: Address | None = None


def socks_request(target: Address) -> bytes:
    host, port = target
    try:
        packed = ipaddress.IPv4Address(host).packed
        addr = b"\x01" + packed
    except ValueError:
        name = host.encode()
        addr = b"\x03" + bytes((len(name),)) + name
    return b"\x05\x01\x00" + addr + port.to_bytes(2, "big")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def open_stream(route: Route, timeout: float = 30.0) -> socket.socket:
    """A connected socket to the echo server (SOCKS handshake done, as torsocks does it)."""
    sock = socket.create_connection(route.address, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if route.socks_target is not None:
        sock.sendall(b"\x05\x01\x00")
        if _recv_exactly(sock, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS: no acceptable method")
        sock.sendall(socks_request(route.socks_target))
        head = _recv_exactly(sock, 4)
        if head[1] != 0:
            raise ConnectionError(f"SOCKS CONNECT failed: reply {head[1]}")
        _recv_exactly(sock, {1: 4, 4: 16}.get(head[3], 0) + 2)
    return sock


def round_trip(route: Route) -> float:
    """Seconds for: new connection, send ``ping``, get it back."""
    start = time.perf_counter()
    with open_stream(route) as sock:
        sock.sendall(b"Eping")
        _recv_exactly(sock, 4)
        elapsed = time.perf_counter() - start
    return elapsed


def upload(route: Route, size: int) -> float:
    """MB/s (10^6 bytes) sending ``size`` bytes until the server confirms it has them all."""
    with open_stream(route, timeout=300) as sock:
        start = time.perf_counter()
        sock.sendall(b"U" + size.to_bytes(8, "big"))
        view = memoryview(CHUNK)
        left = size
        while left > 0:
            n = min(left, len(CHUNK))
            sock.sendall(view[:n])
            left -= n
        if _recv_exactly(sock, 1) != b"K":
            raise ConnectionError("upload not confirmed")
        return size / (time.perf_counter() - start) / 1e6


def download(route: Route, size: int) -> float:
    """MB/s receiving ``size`` bytes."""
    with open_stream(route, timeout=300) as sock:
        start = time.perf_counter()
        sock.sendall(b"D" + size.to_bytes(8, "big"))
        buf = bytearray(1 << 20)
        left = size
        while left > 0:
            n = sock.recv_into(buf)
            if not n:
                raise ConnectionError(f"download ended {left} bytes short")
            left -= n
        return size / (time.perf_counter() - start) / 1e6


async def _one_async(route: Route, timeout: float) -> float:
    start = time.perf_counter()
    with anyio.fail_after(timeout):
        stream = await anyio.connect_tcp(*route.address)
        async with stream:
            buffer = b""

            async def need(size: int) -> bytes:
                nonlocal buffer
                while len(buffer) < size:
                    buffer += await stream.receive()
                data, buffer = buffer[:size], buffer[size:]
                return data

            if route.socks_target is not None:
                await stream.send(b"\x05\x01\x00")
                if await need(2) != b"\x05\x00":
                    raise ConnectionError("SOCKS: no acceptable method")
                await stream.send(socks_request(route.socks_target))
                head = await need(4)
                if head[1] != 0:
                    raise ConnectionError(f"SOCKS CONNECT failed: reply {head[1]}")
                await need({1: 4, 4: 16}.get(head[3], 0) + 2)
            await stream.send(b"Eping")
            await need(4)
    return time.perf_counter() - start


@dataclass
class ConcurrencyResult:
    latencies: list[float]
    """Seconds per completed connection (connect + handshake + round trip)."""
    failed: int
    errors: dict[str, int]
    wall: float


async def concurrent(route: Route, count: int, timeout: float = 60.0) -> ConcurrencyResult:
    """Open ``count`` connections at once; each does one round trip."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    start = time.perf_counter()

    async def one() -> None:
        try:
            latencies.append(await _one_async(route, timeout))
        except Exception as exc:  # noqa: BLE001 - counted, that is the measurement
            key = type(exc).__name__
            errors[key] = errors.get(key, 0) + 1

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    failed = sum(errors.values())
    return ConcurrencyResult(latencies, failed, errors, time.perf_counter() - start)
