"""Run in a network namespace: ``ip netns exec NS python -m tests.proxy.dns_netns_helper MARK``.

Two upstream nameservers on the namespace's loopback: the "right" one on port 53 and a "wrong"
one on port 5300, to which the test's iptables rule redirects port-53 traffic that does not
carry the mark. A :class:`~tpconf.proxy.dnsserver.DnsServer` with ``upstream_mark=MARK``
("none": no mark) forwards ``upstream.example.`` over UDP and ``big.example.`` (truncated over
UDP, so a TCP client's query is retried over TCP) to 127.0.0.1:53. Prints one JSON line: the
addresses each transport got, or the error the server refused to start with.
"""

from __future__ import annotations

import json
import sys

import anyio
from dnslib import QTYPE

from tests.proxy.fakes import POD_NAMESERVER, FakeNameserver, MapDialer, tcp_ask, udp_ask
from tpconf.errors import ProxyError
from tpconf.proxy.dnsserver import DnsServer
from tpconf.proxy.resolver import ClusterResolver

WRONG_PORT = 5300


def upstream(last_octet: int, big_prefix: str) -> FakeNameserver:
    server = FakeNameserver()
    server.add(f"upstream.example. 60 IN A 192.0.2.{last_octet}")
    for i in range(3):
        server.add(f"big.example. 60 IN A {big_prefix}.{i}")
    server.truncate_udp.add("big.example.")
    return server


def addresses(reply: object) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]  # type: ignore[attr-defined]


async def main(mark: int | None) -> dict[str, object]:
    right, wrong = upstream(1, "198.51.100"), upstream(66, "203.0.113")
    async with anyio.create_task_group() as tg:
        for server, port in ((right, 53), (wrong, WRONG_PORT)):
            await tg.start(server.serve_udp, port)
            await tg.start(server.serve_tcp, port)
        async with ClusterResolver(MapDialer(), [POD_NAMESERVER], ndots=1, timeout=0.5) as resolver:
            dns = DnsServer(resolver, upstream=("127.0.0.1", 53), upstream_mark=mark)
            try:
                port = await tg.start(dns.serve)
            except ProxyError as exc:
                tg.cancel_scope.cancel()
                return {"error": exc.render()}
            with anyio.fail_after(5):
                udp = await udp_ask(port, "upstream.example.")
                tcp = await tcp_ask(port, "big.example.")
        tg.cancel_scope.cancel()
    return {
        "udp": addresses(udp),
        "tcp": addresses(tcp),
        "right": right.questions,
        "wrong": wrong.questions,
    }


if __name__ == "__main__":
    mark = None if sys.argv[1] == "none" else int(sys.argv[1], 0)
    print(json.dumps(anyio.run(main, mark, backend="asyncio")))
