"""The local DNS server of vpn-tcp: cluster names from the cluster, everything else unchanged.

Owns :class:`DnsServer`, UDP and TCP on 127.0.0.1 (one port for both). The machine's DNS
traffic is redirected to it for the session (that is the VPN's job, not this module's).

Which names are the cluster's (the rule, in order):

1. names under the cluster domain (``cluster.local``), asked as they are;
2. reverse names (``in-addr.arpa``, ``ip6.arpa``) of addresses in the routed networks;
3. names with fewer dots than the pod's ``ndots`` that exist in the cluster once one of the
   pod's search domains is appended: ``hello`` and ``hello.default`` (which the machine's own
   resolver sends here as ``hello.`` and ``hello.default.`` after its own search list fails).
   The answer comes back under the name the client asked. "Exists" includes NODATA, so an AAAA
   question for an IPv4-only Service gets an empty answer, not the upstream's NXDOMAIN.

Every other query is forwarded byte for byte to the upstream resolver (the machine's original
one) over UDP, with a TCP retry when a TCP client's answer came back truncated. When the cluster
cannot be asked for rule 3 (tunnel down), the name is forwarded rather than failed: the machine's
DNS must keep working. Replies keep the client's ID and question. No client is left waiting: a
question that is not answered within ``timeout`` gets SERVFAIL.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import SocketAttribute, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from dnslib import QTYPE, DNSError, DNSHeader, DNSRecord

from tpconf import errors
from tpconf.proxy.resolver import NOERROR, SERVFAIL, ResolveError, build_reply

if TYPE_CHECKING:
    from anyio.abc import SocketStream, UDPSocket

    from tpconf.proxy.resolver import Answer, ClusterResolver

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: UDP replies larger than this (or the client's EDNS size) are truncated (TC) so the client
#: asks again over TCP.
CLASSIC_UDP_SIZE = 512

#: Most UDP queries handled at once; more are dropped (the client retries).
MAX_UDP_IN_FLIGHT = 512

#: A TCP client that sends nothing for this long is disconnected (RFC 7766 suggests seconds).
TCP_IDLE_TIMEOUT = 10.0


def reverse_address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``1.0.0.10.in-addr.arpa.`` -> 10.0.0.1; ``None`` for other names and partial ones."""
    labels = name.lower().rstrip(".").split(".")
    try:
        if labels[-2:] == ["in-addr", "arpa"] and len(labels) == 6:
            return ipaddress.IPv4Address(".".join(reversed(labels[:4])))
        if labels[-2:] == ["ip6", "arpa"] and len(labels) == 34:
            nibbles = "".join(reversed(labels[:32]))
            return ipaddress.IPv6Address(int(nibbles, 16))
    except ValueError:
        return None
    return None


class DnsServer:
    """Answers the machine's DNS questions: the cluster's names via ``resolver``, others upstream.

    ``upstream`` is the machine's original nameserver as ``(host, port)``. ``reverse_networks``
    are the routed CIDRs whose PTR names the cluster answers. ``port`` 0 picks a free port;
    :meth:`serve` reports it.
    """

    def __init__(
        self,
        resolver: ClusterResolver,
        *,
        upstream: tuple[str, int],
        cluster_domain: str = "cluster.local",
        reverse_networks: Sequence[str | Network] = (),
        port: int = 0,
        timeout: float = 2.0,
    ) -> None:
        self.resolver = resolver
        self.upstream = upstream
        self.cluster_domain = cluster_domain.strip(".").lower()
        self.reverse_networks = [ipaddress.ip_network(n) for n in reverse_networks]
        self.port = port
        self.timeout = timeout
        self._udp_in_flight = 0

    # -- routing ------------------------------------------------------------------------------

    def is_cluster_name(self, qname: str) -> bool:
        """Rules 1 and 2: names that are the cluster's without asking it."""
        name = qname.lower().rstrip(".")
        if name == self.cluster_domain or name.endswith("." + self.cluster_domain):
            return True
        address = reverse_address(name)
        return address is not None and any(address in net for net in self.reverse_networks)

    def search_candidates(self, qname: str) -> list[str]:
        """Rule 3: the expansions of ``qname`` with the pod's search list, or none."""
        name = qname.lower().rstrip(".")
        if not name or name.count(".") >= self.resolver.ndots or reverse_address(name):
            return []
        return [f"{name}.{domain}." for domain in self.resolver.search]

    # -- answering ----------------------------------------------------------------------------

    async def answer(self, packet: bytes, *, tcp: bool = False) -> bytes | None:
        """The reply to one DNS message; ``None`` when it cannot even be answered with an error."""
        try:
            request = DNSRecord.parse(packet)
        except DNSError:
            return _format_error(packet)
        if request.header.qr:  # a response sent to us: never answer it (reflection)
            return None
        reply: bytes | None = None
        with anyio.move_on_after(self.timeout):
            try:
                reply = await self._answer(packet, request, tcp=tcp)
            except (ResolveError, OSError, anyio.EndOfStream, anyio.IncompleteRead) as exc:
                log.debug("DNS failed for %s: %s", request.q.qname if request.q else "?", exc)
        return reply if reply is not None else _servfail(request)

    async def _answer(self, packet: bytes, request: Any, *, tcp: bool) -> bytes:
        if request.header.opcode != 0 or len(request.questions) != 1:
            return await self.forward(packet, tcp=tcp)
        qname = str(request.q.qname)
        qtype = request.q.qtype
        if self.is_cluster_name(qname):
            answer = await self.resolver.query(qname, qtype)
            return _fit(build_reply(request, answer, now=self.resolver.clock()), request, tcp=tcp)
        names = self.search_candidates(qname)
        if names:
            found: Answer | None = None
            # Half the time for the cluster at most: if it cannot tell (tunnel down), the
            # name goes upstream, so the machine's DNS keeps working.
            with anyio.move_on_after(self.timeout / 2), contextlib.suppress(ResolveError):
                found = await self.resolver.first_answer(names, qtype, nodata_is_answer=True)
            if found is not None and found.rcode == NOERROR:
                now = self.resolver.clock()
                reply = build_reply(request, found, now=now, owner=request.q.qname)
                return _fit(reply, request, tcp=tcp)
        return await self.forward(packet, tcp=tcp)

    async def forward(self, packet: bytes, *, tcp: bool = False) -> bytes:
        """Send ``packet`` unchanged to the upstream resolver; its reply, unchanged."""
        host, port = self.upstream
        async with await anyio.create_connected_udp_socket(host, port) as sock:
            await sock.send(packet)
            while True:
                data = await sock.receive()
                if data[:2] == packet[:2]:
                    break
        if tcp and len(data) > 2 and data[2] & 0x02:  # TC: the whole answer needs TCP
            stream = await anyio.connect_tcp(host, port)
            async with stream:
                await stream.send(len(packet).to_bytes(2, "big") + packet)
                reader = BufferedByteReceiveStream(stream)
                size = int.from_bytes(await reader.receive_exactly(2), "big")
                data = await reader.receive_exactly(size)
        return data

    # -- transports ---------------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve UDP and TCP on one loopback port until cancelled; ``started(port)`` once bound."""
        udp, tcp = await self._bind()
        async with udp, tcp, anyio.create_task_group() as tg:
            port = udp.extra(SocketAttribute.local_port)
            log.debug("DNS server listening on 127.0.0.1:%d (UDP, TCP)", port)
            task_status.started(port)
            tg.start_soon(tcp.serve, self._tcp_client)
            async for packet, (host, client_port) in udp:
                if self._udp_in_flight >= MAX_UDP_IN_FLIGHT:
                    continue
                self._udp_in_flight += 1
                tg.start_soon(self._udp_query, udp, packet, host, client_port)

    async def _bind(self) -> tuple[UDPSocket, Any]:
        tries = 1 if self.port else 8  # a random UDP port may be taken for TCP: pick another
        for attempt in range(tries):
            try:
                udp = await anyio.create_udp_socket(
                    family=socket.AF_INET, local_host="127.0.0.1", local_port=self.port
                )
            except OSError as exc:
                raise _port_error(self.port, exc) from exc
            port = udp.extra(SocketAttribute.local_port)
            try:
                tcp = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
            except OSError as exc:
                await udp.aclose()
                if attempt == tries - 1:
                    raise _port_error(port, exc) from exc
                continue
            return udp, tcp
        raise AssertionError("unreachable")

    async def _udp_query(self, udp: UDPSocket, packet: bytes, host: str, port: int) -> None:
        try:
            reply = await self.answer(packet)
            if reply is not None:
                await udp.sendto(reply, host, port)
        except Exception:  # one query's trouble never stops the server
            log.debug("DNS query from %s:%d failed", host, port, exc_info=True)
        finally:
            self._udp_in_flight -= 1

    async def _tcp_client(self, stream: SocketStream) -> None:
        """Serve pipelined queries on one connection; replies may come out of order."""
        lock = anyio.Lock()

        async def one(packet: bytes) -> None:
            reply = await self.answer(packet, tcp=True)
            if reply is not None:
                async with lock:
                    await stream.send(len(reply).to_bytes(2, "big") + reply)

        try:
            async with stream, anyio.create_task_group() as tg:
                reader = BufferedByteReceiveStream(stream)
                while True:
                    with anyio.move_on_after(TCP_IDLE_TIMEOUT) as idle:
                        size = int.from_bytes(await reader.receive_exactly(2), "big")
                        packet = await reader.receive_exactly(size)
                    if idle.cancelled_caught:
                        break
                    tg.start_soon(one, packet)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            pass
        except Exception:  # one connection's trouble never stops the server
            log.debug("DNS TCP connection failed", exc_info=True)


def _port_error(port: int, exc: OSError) -> errors.ProxyError:
    return errors.ProxyError(
        f"cannot listen for DNS on 127.0.0.1:{port}: {exc.strerror or exc}",
        hint="choose another DNS port, or 0 for any free one",
    )


def _servfail(request: Any) -> bytes:
    header = DNSHeader(id=request.header.id, qr=1, ra=1, rd=request.header.rd, rcode=SERVFAIL)
    return bytes(DNSRecord(header, q=request.q).pack())


def _format_error(packet: bytes) -> bytes | None:
    """FORMERR with the query's ID, or nothing when there is not even a header."""
    if len(packet) < 12 or packet[2] & 0x80:
        return None
    flags = bytes((0x80 | (packet[2] & 0x79), 0x80 | 1))  # QR, opcode and RD kept; RA; FORMERR
    return packet[:2] + flags + bytes(8)


def _fit(reply: Any, request: Any, *, tcp: bool) -> bytes:
    """Pack ``reply``; over UDP, one that does not fit the client's size is truncated (TC)."""
    data = bytes(reply.pack())
    if tcp:
        return data
    limit = CLASSIC_UDP_SIZE
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            limit = max(CLASSIC_UDP_SIZE, rr.rclass)
    if len(data) <= limit:
        return data
    header = DNSHeader(
        id=request.header.id, qr=1, ra=1, rd=request.header.rd, tc=1, rcode=reply.header.rcode
    )
    return bytes(DNSRecord(header, q=request.q).pack())
