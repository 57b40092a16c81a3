"""Test helper run inside a network namespace with `ip netns exec NS python vpn_netns_helper.py`.

``vpn`` role: tpconf's :class:`~tpconf.redirect.transparent.VPN` with test dialers that map cluster
addresses to "target" servers on this namespace's loopback (reachable only through a dialer,
like Services through the tunnel). It reads JSON commands on stdin, answers one JSON line per
command on stdout and also reports every dial as ``{"event": "dial", ...}``.

``peer`` role: the "outside world" on the other end of the veth: a tagged TCP server answering
as ``direct`` (so a connection that was *not* intercepted is recognisable) and a UDP "upstream
nameserver" answering ``upstream:<query>``.

Tagged servers: an HTTP request gets ``200`` with the tag as body; ``SEND <n>`` gets n bytes;
anything else is echoed as ``<tag>:<data>``. The ``stalled`` target (10.123.0.9) accepts and never
reads and takes 0.3 s to dial; the ``memory`` command reports this process's RSS and its peak (bytes).
"""

from __future__ import annotations

import json
import socket
import sys
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketStream

from tpconf.redirect.routing import DNS_UPSTREAM_MARK
from tpconf.redirect.transparent import VPN

#: The address of the target that never reads (dialed with a delay, as through a tunnel).
STALLED = "10.123.0.9"


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def tagged_server(
    tag: str, host: str, port: int, *, task_status: anyio.abc.TaskStatus[int]
) -> None:
    async def handle(stream: SocketStream) -> None:
        async with stream:
            try:
                while True:
                    data = await stream.receive()
                    if data.startswith(b"GET "):
                        body = tag.encode() + b"\n"
                        head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n"
                        await stream.send(head.encode() + body)
                        return
                    if data.startswith(b"SEND "):
                        left = int(data.split()[1])
                        chunk = b"x" * (1 << 20)
                        while left > 0:
                            await stream.send(chunk[:left])
                            left -= len(chunk)
                        return
                    await stream.send(tag.encode() + b":" + data)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return

    listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(handle)


async def stalled_server(*, task_status: anyio.abc.TaskStatus[int]) -> None:
    """Accepts and never reads (a small receive buffer: what is sent waits in the proxy)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    accepted = []
    with listener:
        task_status.started(listener.getsockname()[1])
        while True:
            await anyio.wait_readable(listener)
            accepted.append(listener.accept()[0])


def memory() -> dict[str, int]:
    status = Path("/proc/self/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return {
        "rss": int(fields["VmRSS"].split()[0]) * 1024,
        "peak": int(fields["VmHWM"].split()[0]) * 1024,
    }


async def udp_responder(
    tag: str, host: str, port: int, *, task_status: anyio.abc.TaskStatus[int]
) -> None:
    async with await anyio.create_udp_socket(local_host=host, local_port=port) as udp:
        task_status.started(udp.extra(anyio.abc.SocketAttribute.local_port))
        async for data, addr in udp:
            await udp.sendto(tag.encode() + b":" + data, *addr)


class TestDialer:
    """Maps a cluster address to a target server on loopback; reports each dial."""

    def __init__(self, name: str, targets: dict[str, int]) -> None:
        self.name = name
        self.targets = targets

    async def dial(self, host: str, port: int) -> ByteStream:
        emit({"event": "dial", "dialer": self.name, "host": host, "port": port})
        if host not in self.targets:
            raise ConnectionRefusedError(f"{host}:{port} is not a test target")
        if host == STALLED:
            await anyio.sleep(0.3)  # a dial through the tunnel takes a while: the client sends
        return await anyio.connect_tcp("127.0.0.1", self.targets[host])


def marked_query(server: str, payload: bytes) -> bytes:
    """What the local DNS server does for non-cluster names: ask upstream with SO_MARK set."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, DNS_UPSTREAM_MARK)
        sock.settimeout(5)
        sock.sendto(payload, (server, 53))
        return sock.recv(4096)


async def run_vpn() -> None:
    vpn = VPN(cleanup_timeout=5)
    async with anyio.create_task_group() as tg:
        targets = {
            "a": await tg.start(tagged_server, "target-a", "127.0.0.1", 0),
            "b": await tg.start(tagged_server, "target-b", "127.0.0.1", 0),
            "stalled": await tg.start(stalled_server),
        }
        dialers = {
            "a": TestDialer("a", {"10.123.0.5": targets["a"], STALLED: targets["stalled"]}),
            "b": TestDialer("b", {"10.125.0.7": targets["b"]}),
        }
        dns_port: int | None = None
        vpn_scope = anyio.CancelScope()
        vpn_done = anyio.Event()

        async def run_vpn_unit(*, task_status: anyio.abc.TaskStatus[int]) -> None:
            try:
                with vpn_scope:
                    await vpn.run(task_status=task_status)
            finally:
                vpn_done.set()

        port = await tg.start(run_vpn_unit)
        emit({"event": "ready", "port": port})
        stdin = anyio.wrap_file(sys.stdin)
        async for line in stdin:
            cmd = json.loads(line)
            reply: dict[str, Any] = {"ok": True}
            try:
                match cmd["cmd"]:
                    case "routes":
                        await vpn.set_routes(
                            cmd["owner"],
                            [IPv4Network(c) for c in cmd["cidrs"]],
                            dialers[cmd["dialer"]],
                            exclude=[IPv4Network(x) for x in cmd.get("exclude", [])],
                        )
                    case "remove":
                        await vpn.remove_routes(cmd["owner"])
                    case "dns":
                        if cmd["on"]:
                            if dns_port is None:
                                dns_port = await tg.start(udp_responder, "local", "127.0.0.1", 0)
                            await vpn.redirect_dns(dns_port)
                        else:
                            await vpn.redirect_dns(None)
                    case "upstream":
                        data = await anyio.to_thread.run_sync(
                            marked_query, cmd["server"], cmd["payload"].encode()
                        )
                        reply["reply"] = data.decode()
                    case "ping":
                        pass
                    case "memory":
                        reply.update(memory())
                    case "stop":
                        vpn_scope.cancel()
                        await vpn_done.wait()
            except Exception as exc:  # noqa: BLE001 (reported to the test as the reply)
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            emit(reply)
            if cmd["cmd"] == "stop":
                break
        tg.cancel_scope.cancel()


async def run_peer() -> None:
    async with anyio.create_task_group() as tg:
        await tg.start(tagged_server, "direct", "0.0.0.0", 80)
        await tg.start(tagged_server, "direct", "0.0.0.0", 7)
        await tg.start(udp_responder, "upstream", "0.0.0.0", 53)
        emit({"event": "ready"})
        await anyio.wrap_file(sys.stdin).read()  # until the test closes our stdin
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    anyio.run(run_vpn if sys.argv[1] == "vpn" else run_peer, backend="asyncio")
