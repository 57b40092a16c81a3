"""Real local peers for the proxy tests: a DNS server speaking real packets, a mapping dialer.

:class:`FakeNameserver` plays the pod's nameserver (CoreDNS) or the machine's upstream resolver:
dnslib packets over real loopback TCP (pipelined, answered in order like CoreDNS) and UDP.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketStream, TaskStatus, UDPSocket
from anyio.streams.buffered import BufferedByteReceiveStream
from dnslib import QTYPE, RCODE, RR, SOA, DNSHeader, DNSRecord

POD_NAMESERVER = "10.96.0.10"
POD_SEARCH = ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")
HELLO_IP = "10.96.1.1"
HELLO = "hello.default.svc.cluster.local."


def default_zone() -> dict[tuple[str, int], list[Any]]:
    """A Service ``hello`` in ``default`` (A, SRV, PTR) and an IPv6-only ``hello6``."""
    return {
        (HELLO, QTYPE.A): [RR.fromZone(f"{HELLO} 5 IN A {HELLO_IP}")[0]],
        (f"_http._tcp.{HELLO}", QTYPE.SRV): [
            RR.fromZone(f"_http._tcp.{HELLO} 5 IN SRV 0 100 80 {HELLO}")[0]
        ],
        ("1.1.96.10.in-addr.arpa.", QTYPE.PTR): [
            RR.fromZone(f"1.1.96.10.in-addr.arpa. 5 IN PTR {HELLO}")[0]
        ],
        ("hello6.default.svc.cluster.local.", QTYPE.AAAA): [
            RR.fromZone("hello6.default.svc.cluster.local. 5 IN AAAA fd00::1")[0]
        ],
        ("example.com.", QTYPE.A): [RR.fromZone("example.com. 60 IN A 93.184.216.34")[0]],
        ("example.com.", QTYPE.TXT): [RR.fromZone('example.com. 60 IN TXT "v=spf1 -all"')[0]],
    }


@dataclass
class FakeNameserver:
    """An authoritative DNS server for a small, editable zone.

    Unknown names get NXDOMAIN with an SOA whose minimum is 30 s; names that are a suffix of a
    known name (``default.svc.cluster.local``) get NODATA, as CoreDNS answers them.
    """

    zone: dict[tuple[str, int], list[Any]] = field(default_factory=default_zone)
    delays: dict[str, float] = field(default_factory=dict)
    """Seconds to wait before answering a name (answers on one connection stay in order)."""
    drop: set[str] = field(default_factory=set)
    """Names never answered."""
    servfail: set[str] = field(default_factory=set)
    truncate_udp: set[str] = field(default_factory=set)
    """Names answered over UDP with an empty truncated (TC) reply: ask again over TCP."""
    close_after: int | None = None
    """Close each TCP connection after this many answers (CoreDNS closes after 128)."""
    questions: list[tuple[str, int]] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    """The TCP port, once :meth:`serve_tcp` is listening."""

    def add(self, zone_line: str) -> None:
        rr = RR.fromZone(zone_line)[0]
        self.zone.setdefault((str(rr.rname).lower(), rr.rtype), []).append(rr)

    def count(self, name: str, qtype: int = QTYPE.A) -> int:
        return self.questions.count((name, qtype))

    async def respond(self, packet: bytes, *, udp: bool = False) -> bytes | None:
        request = DNSRecord.parse(packet)
        name, qtype = str(request.q.qname).lower(), request.q.qtype
        self.questions.append((name, qtype))
        await anyio.sleep(self.delays.get(name, 0))
        if name in self.drop:
            return None
        reply = request.reply()
        if udp and name in self.truncate_udp:
            reply.header.tc = 1
        elif name in self.servfail:
            reply.header.rcode = RCODE.SERVFAIL
        elif (name, qtype) in self.zone:
            for rr in self.zone[(name, qtype)]:
                reply.add_answer(rr)
        elif not any(known == name or known.endswith("." + name) for known, _ in self.zone):
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(
                RR(
                    "cluster.local.",
                    QTYPE.SOA,
                    ttl=30,
                    rdata=SOA(
                        "ns.dns.cluster.local.", "hostmaster.cluster.local.", (1, 1, 1, 1, 30)
                    ),
                )
            )
        return bytes(reply.pack())

    async def serve_tcp(
        self, port: int = 0, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        async with listener:
            self.port = listener.extra(SocketAttribute.local_port)
            task_status.started(self.port)
            await listener.serve(self._tcp_client)

    async def _tcp_client(self, stream: SocketStream) -> None:
        self.connections += 1
        reader = BufferedByteReceiveStream(stream)
        answered = 0
        async with stream:
            try:
                while self.close_after is None or answered < self.close_after:
                    size = int.from_bytes(await reader.receive_exactly(2), "big")
                    reply = await self.respond(await reader.receive_exactly(size))
                    if reply is not None:
                        await stream.send(len(reply).to_bytes(2, "big") + reply)
                        answered += 1
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                pass

    async def serve_udp(
        self, port: int = 0, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with (
            await anyio.create_udp_socket(
                family=socket.AF_INET, local_host="127.0.0.1", local_port=port
            ) as udp,
            anyio.create_task_group() as tg,
        ):
            task_status.started(udp.extra(SocketAttribute.local_port))
            async for packet, (host, client_port) in udp:
                tg.start_soon(self._udp_query, udp, packet, host, client_port)

    async def _udp_query(self, udp: UDPSocket, packet: bytes, host: str, port: int) -> None:
        reply = await self.respond(packet, udp=True)
        if reply is not None:
            await udp.sendto(reply, host, port)


@dataclass
class MapDialer:
    """A :class:`~tpconf.net.Dialer` that maps "cluster" addresses to local ports.

    Unmapped destinations are refused, like a channel open the pod's sshd cannot complete.
    """

    routes: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    calls: list[tuple[str, int]] = field(default_factory=list)

    async def dial(self, host: str, port: int) -> ByteStream:
        self.calls.append((host, port))
        target = self.routes.get((host, port))
        if target is None:
            raise ConnectionRefusedError(f"nothing listens on {host}:{port} in the fake cluster")
        return await anyio.connect_tcp(*target)


class FakeClock:
    """A monotonic clock the test moves forward by hand (TTLs without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def udp_ask(port: int, name: str, qtype: str = "A", *, qid: int = 4242) -> Any:
    """Ask 127.0.0.1:port over UDP; the parsed reply."""
    query = DNSRecord(DNSHeader(id=qid, rd=1), q=None)
    query.add_question(DNSRecord.question(name, qtype).q)
    async with await anyio.create_connected_udp_socket("127.0.0.1", port) as sock:
        await sock.send(bytes(query.pack()))
        return DNSRecord.parse(await sock.receive())


async def tcp_ask(port: int, name: str, qtype: str = "A", *, qid: int = 4343) -> Any:
    """Ask 127.0.0.1:port over TCP; the parsed reply."""
    query = DNSRecord(DNSHeader(id=qid, rd=1), q=None)
    query.add_question(DNSRecord.question(name, qtype).q)
    packet = bytes(query.pack())
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(len(packet).to_bytes(2, "big") + packet)
        reader = BufferedByteReceiveStream(stream)
        size = int.from_bytes(await reader.receive_exactly(2), "big")
        return DNSRecord.parse(await reader.receive_exactly(size))
