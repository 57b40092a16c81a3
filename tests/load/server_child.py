"""A listener of tpconf in a process of its own, with a small file descriptor limit.

``python -m tests.load.server_child ROLE FD_LIMIT MAX_CONNECTIONS``, run by the load tests:

- ``echo``: a :class:`~tpconf.net.TCPListener` whose handler echoes until EOF;
- ``socks``: a :class:`~tpconf.proxy.SocksServer` resolving through a fake pod nameserver and
  dialing ``hello`` (10.96.1.1) to an echo server of this process: each relayed connection
  costs three descriptors here (the client's, the dial's, the echo server's).

The limit (soft and hard) is set before anything is opened, so the process runs out of
descriptors the way ``tpconf up`` does under a 1024 limit. It prints ``{"port": N}`` once
listening; then each line ``stats`` on stdin gets one JSON line with its open descriptors,
asyncio tasks and the listener's counters. Log lines (the listener's warnings) go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import sys
from typing import Any

import anyio
from anyio.abc import ByteStream

from tests.proxy.fakes import HELLO_IP, POD_NAMESERVER, POD_SEARCH, FakeNameserver, MapDialer
from tpconf.net import TCPListener
from tpconf.proxy.resolver import ClusterResolver
from tpconf.proxy.socks import SocksServer


async def echo(stream: ByteStream) -> None:
    """Echo until EOF (the listener closes the stream then)."""
    try:
        while True:
            await stream.send(await stream.receive())
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass


def stats(listener: TCPListener | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "fds": len(os.listdir("/proc/self/fd")),
        "tasks": len(asyncio.all_tasks()),
    }
    if listener is not None:
        out |= {
            "active": listener.active,
            "refused": listener.refused,
            "exhausted": listener.exhausted,
        }
    return out


def report(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def answer_stats(listener: Any) -> None:
    async for line in anyio.wrap_file(sys.stdin):
        if line.strip() == "stats":
            report(stats(listener()))


async def main(role: str, max_connections: int) -> None:
    async with anyio.create_task_group() as tg:
        if role == "echo":
            listener = TCPListener.bind(
                "127.0.0.1", 0, name="echo", max_connections=max_connections
            )
            port = await tg.start(listener.serve, echo)
            report({"port": port})
            await answer_stats(lambda: listener)
        else:
            nameserver = FakeNameserver()
            await tg.start(nameserver.serve_tcp)
            echo_listener = TCPListener.bind("127.0.0.1", 0, name="echo")
            echo_port = await tg.start(echo_listener.serve, echo)
            dialer = MapDialer(
                routes={
                    (POD_NAMESERVER, 53): ("127.0.0.1", nameserver.port),
                    (HELLO_IP, echo_port): ("127.0.0.1", echo_port),
                }
            )
            async with ClusterResolver(dialer, [POD_NAMESERVER], POD_SEARCH, ndots=5) as resolver:
                server = SocksServer(resolver, dialer, max_connections=max_connections)
                port = await tg.start(server.serve)
                dialer.calls = []  # kept by MapDialer for tests: would grow with every dial
                report({"port": port, "echo_port": echo_port})

                def current() -> TCPListener | None:
                    dialer.calls.clear()
                    return server.listener

                await answer_stats(current)
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    role, fd_limit, max_connections = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
    anyio.run(main, role, max_connections, backend="asyncio")
