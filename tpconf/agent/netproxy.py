"""The network side of the container method, run in a proxy container on the developer's machine.

The proxy container starts with no network but loopback (``docker run --network none``); the
app container joins its network namespace. This program (standard library only; it runs in the
agent image with ``NET_ADMIN`` in that namespace alone) makes the namespace live on the cluster:

- a default route over loopback lets a connection to any address get as far as netfilter;
  a nat rule redirects every TCP connection not to loopback to :data:`REDIRECT_PORT`,
  where each is read for its original destination (``SO_ORIGINAL_DST``) and handed to tpconf
  through the bridge: a Unix socket tpconf listens on, bind-mounted into the container at
  :data:`OUT_SOCKET`, spoken to with one line, ``CONNECT HOST PORT``, answered ``OK`` or
  ``ERR why``; then bytes both ways, half-close kept;
- ``/etc/resolv.conf`` (shared with the app container) names ``127.0.0.1`` with the pod's search
  list and ndots; the DNS forwarder there hands each query to tpconf (``DNS`` on the bridge),
  which asks the pod's own nameserver, so names resolve exactly as in the pod;
- :data:`IN_SOCKET` takes connections tpconf brings in for `expose`: one line, ``PORT``, then
  bytes to and from ``127.0.0.1:PORT`` in the namespace (the app's listener).

It prints ``ready`` once all of that is in place, and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

RUN = Path("/run/tpconf")
OUT_SOCKET = RUN / "out.sock"
IN_SOCKET = RUN / "in.sock"
REDIRECT_PORT = 15001
SO_ORIGINAL_DST = 80


def configure_network() -> None:
    """A default route (over loopback: it needs no interface module, and nothing leaves by it)
    so that a connection to any address reaches netfilter; every TCP connection not to
    loopback redirected to the proxy."""
    for command in (
        ["ip", "route", "add", "default", "dev", "lo"],
        ["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-d", "127.0.0.0/8",
         "-j", "REDIRECT", "--to-ports", str(REDIRECT_PORT)],
    ):  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"tpconf-netproxy: {' '.join(command)}: {done.stderr.strip()}")


def write_resolv_conf(search: list[str], ndots: int) -> None:
    lines = ["nameserver 127.0.0.1"]
    if search:
        lines.append("search " + " ".join(search))
    lines.append(f"options ndots:{ndots}")
    Path("/etc/resolv.conf").write_text("\n".join(lines) + "\n")


def _router() -> Any:
    """router.py, beside this file (in the image's library directory and in the source tree):
    its ``splice`` is the agent's one way of relaying bytes (half-close kept)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return importlib.import_module("router")


splice = _router().splice


async def bridge(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``host:port`` in the cluster, through tpconf; ``OSError`` if refused."""
    reader, writer = await asyncio.open_unix_connection(str(OUT_SOCKET))
    writer.write(f"CONNECT {host} {port}\n".encode())
    answer = (await reader.readline()).decode().strip()
    if answer != "OK":
        writer.close()
        raise ConnectionRefusedError(answer or "the bridge closed")
    return reader, writer


async def redirected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A connection the nat rule redirected: on to where it was going, through the bridge."""
    sock = writer.get_extra_info("socket")
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        host = socket.inet_ntoa(raw[4:8])
        upstream = await bridge(host, port)
    except OSError:
        # Refused or unreachable in the cluster: a reset, as a refused connection looks.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        return
    await splice((reader, writer), upstream)


async def inbound(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A connection tpconf brings in for `expose`: ``PORT``, then the app's listener."""
    try:
        port = int((await reader.readline()).decode().strip())
        local = await asyncio.open_connection("127.0.0.1", port)
    except (OSError, ValueError):
        writer.close()
        return
    await splice((reader, writer), local)


class DnsForwarder(asyncio.DatagramProtocol):
    """UDP queries on 127.0.0.1:53, each answered by tpconf through the bridge."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.get_running_loop().create_task(self.answer(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def answer(self, query: bytes, addr: tuple[str, int]) -> None:
        reply = await ask(query)
        if reply and self.transport is not None:
            self.transport.sendto(reply, addr)


async def ask(query: bytes) -> bytes | None:
    """One DNS message, answered by tpconf (``DNS`` on the bridge); ``None`` if it was not."""
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_unix_connection(str(OUT_SOCKET))
            try:
                writer.write(b"DNS\n" + struct.pack("!H", len(query)) + query)
                size = struct.unpack("!H", await reader.readexactly(2))[0]
                return await reader.readexactly(size)
            finally:
                writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None


async def dns_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """DNS over TCP on 127.0.0.1:53 (large answers): one query at a time."""
    try:
        while True:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            reply = await ask(await reader.readexactly(size))
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # PID 1 of a container ignores SIGTERM unless it handles it: `docker stop` would wait 10 s.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await asyncio.start_server(redirected, "0.0.0.0", REDIRECT_PORT, reuse_address=True)
    await loop.create_datagram_endpoint(DnsForwarder, ("127.0.0.1", 53))
    await asyncio.start_server(dns_tcp, "127.0.0.1", 53)
    with contextlib.suppress(FileNotFoundError):
        IN_SOCKET.unlink()
    await asyncio.start_unix_server(inbound, str(IN_SOCKET))
    # tpconf (the owner of the bind-mounted directory, maybe not root) connects to it.
    owner = os.stat(RUN)
    os.chown(IN_SOCKET, owner.st_uid, owner.st_gid)
    os.chmod(IN_SOCKET, 0o600)
    sys.stdout.write("ready\n")  # what tpconf waits for
    sys.stdout.flush()
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="tpconf-netproxy")
    parser.add_argument("--search", action="append", default=[], help="the pod's search list")
    parser.add_argument("--ndots", type=int, default=5)
    args = parser.parse_args()
    configure_network()
    write_resolv_conf(args.search, args.ndots)
    asyncio.run(serve())


if __name__ == "__main__":
    main()
