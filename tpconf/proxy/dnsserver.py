"""The local DNS server of vpn-tcp: cluster names from the cluster, everything else unchanged.

Owns :class:`DnsServer`, UDP and TCP on 127.0.0.1 (one port for both). The machine's DNS
traffic is redirected to it for the session (that is the VPN's job, not this module's).

Which names are the cluster's (the rules, in order). The machine's own resolver sends a short
name here as it is (``hello.``, ``hello.default.``) once its own search list has failed:

1. names under the cluster domain (``cluster.local``, so ``*.svc.cluster.local``), asked as
   they are;
2. reverse names (``in-addr.arpa``, ``ip6.arpa``) of addresses in the routed networks;
3. a single label (``hello``) that exists in the cluster once one of the pod's search domains
   is appended;
4. ``NAME.NAMESPACE`` (one dot) when the namespace exists in the cluster (its
   ``NAMESPACE.svc.<cluster domain>`` exists) and so does ``NAME.NAMESPACE.svc.<cluster domain>``;
5. any other name with dots goes upstream first, and to the cluster (the pod's search list)
   only when the upstream says it does not exist: ``hello.default.svc`` still works, and a
   Service ``example`` in a namespace ``com`` no longer answers ``example.com`` for the whole
   machine (unless namespace ``com`` exists: rule 4, a name the cluster owns by its own rules).

An answer from rules 3 to 5 comes back under the name the client asked. "Exists" includes
NODATA, so an AAAA question for an IPv4-only Service gets an empty answer, not the upstream's
NXDOMAIN. A name that is no valid host name (too long, a label over 63 octets, characters
other than letters, digits, ``-`` and ``_``; non-ASCII labels are asked in their IDNA form) is
not the cluster's: it goes upstream, whose answer (NXDOMAIN, most likely) is the reply.

Every other query is forwarded byte for byte to the upstream resolver (the machine's original
one) over UDP, with a TCP retry when a TCP client's answer came back truncated. When the cluster
cannot be asked (tunnel down), the name is forwarded rather than failed: the machine's DNS must
keep working. Replies keep the client's ID and question. No client is left waiting: a question
that is not answered within ``timeout`` gets SERVFAIL.

**Upstream mark.** The machine's DNS traffic is redirected here by the VPN, so the upstream
queries of this server must not be: with ``upstream_mark``, every upstream socket (UDP, and the
TCP retry) carries that firewall mark (``SO_MARK``, needs CAP_NET_ADMIN), which the VPN's
redirect rules exempt. The value is the VPN's to choose and is passed in (this package does not
import ``tpconf.methods``).

**Reply cache.** The cluster's answers come from the resolver's cache, but building a reply with
dnslib for each query costs more than the lookup. So the packed reply of a cluster answer is kept
per question (name in lower case, type, class) and a repeated question is answered by copying it
with the client's ID, RD bit and question bytes (the name's case as the client wrote it) patched
in, without parsing the query with dnslib. An entry is used only while it is byte for byte what
the slow path would build: while the resolver still holds the very answers it was built from
(so a refreshed or dropped cache entry is noticed at once) and until the whole number of seconds
left of the answer's TTL goes down by one (the TTLs in a reply are the time left in the cache, so
they keep decreasing: an entry lives one second at most and is then built afresh). Upstream
answers are never cached here: that is the upstream resolver's business.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import ByteStream, ConnectedUDPSocket, SocketAttribute, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from dnslib import QTYPE, DNSError, DNSHeader, DNSRecord

from tpconf import errors
from tpconf.net import TCPListener
from tpconf.proxy.resolver import (
    NOERROR,
    NXDOMAIN,
    SERVFAIL,
    ResolveError,
    build_reply,
    host_name,
)

if TYPE_CHECKING:
    from anyio.abc import UDPSocket

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

#: Most queries of one TCP connection answered at once: past this the next query is not read
#: until one is answered, so a client that pipelines without reading the replies is slowed
#: down, not buffered (issue 11: 1.3 GB from one such client).
MAX_TCP_IN_FLIGHT = 32

#: Most TCP connections served at once (more are reset; UDP is unaffected).
MAX_TCP_CONNECTIONS = 1024

#: Most packed replies kept for repeated questions (each lives one second at most).
MAX_CACHED_REPLIES = 4096

#: Byte 2 of a reply header (QR set, opcode 0, AA and TC clear) by the query's RD bit.
_REPLY_FLAGS = (b"\x80", b"\x81")


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
    :meth:`serve` reports it. ``upstream_mark``, when set, is the firewall mark (``SO_MARK``) of
    every upstream socket, so the redirect of the machine's DNS traffic lets them through;
    :meth:`serve` raises :class:`~tpconf.errors.ProxyError` at once if it cannot be set.
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
        upstream_mark: int | None = None,
    ) -> None:
        if upstream_mark is not None and not 0 <= upstream_mark < 1 << 32:
            raise ValueError(f"upstream_mark must be a 32-bit value, not {upstream_mark:#x}")
        self.resolver = resolver
        self.upstream = upstream
        self.cluster_domain = cluster_domain.strip(".").lower()
        self.reverse_networks = [ipaddress.ip_network(n) for n in reverse_networks]
        self.port = port
        self.timeout = timeout
        self.upstream_mark = upstream_mark
        self._udp_in_flight = 0
        self._replies: dict[bytes, _CachedReply] = {}

    # -- routing ------------------------------------------------------------------------------

    def is_cluster_name(self, qname: str) -> bool:
        """Rules 1 and 2: names that are the cluster's without asking it."""
        name = qname.lower().rstrip(".")
        if name == self.cluster_domain or name.endswith("." + self.cluster_domain):
            return True
        address = reverse_address(name)
        return address is not None and any(address in net for net in self.reverse_networks)

    def search_candidates(self, qname: str) -> list[str]:
        """``qname`` with each of the pod's search domains appended (rules 3 and 5)."""
        name = qname.lower().rstrip(".")
        if not name or reverse_address(name):
            return []
        return [f"{name}.{domain}." for domain in self.resolver.search]

    # -- answering ----------------------------------------------------------------------------

    async def answer(self, packet: bytes, *, tcp: bool = False) -> bytes | None:
        """The reply to one DNS message; ``None`` when it cannot even be answered with an error."""
        cached = self.cached_reply(packet, tcp=tcp)
        if cached is not None:
            return cached
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
            except errors.ProxyError as exc:  # the upstream socket cannot be marked
                log.warning("%s", errors.explain(exc).render())
        return reply if reply is not None else _servfail(request)

    async def _answer(self, packet: bytes, request: Any, *, tcp: bool) -> bytes:
        if request.header.opcode != 0 or len(request.questions) != 1:
            return await self.forward(packet, tcp=tcp)
        qname = str(request.q.qname)
        qtype = request.q.qtype
        if self.is_cluster_name(qname):  # rules 1 and 2
            answer = await self.resolver.query(qname, qtype)
            return self._cluster_reply(packet, request, answer, tcp=tcp)
        name = qname.lower().rstrip(".")
        if not name or reverse_address(name) or host_name(name) is None:
            return await self.forward(packet, tcp=tcp)
        labels = name.split(".")
        if len(labels) == 1:  # rule 3
            return await self._from_search_list(packet, request, tcp=tcp) or await self.forward(
                packet, tcp=tcp
            )
        if len(labels) == 2:  # rule 4
            namespace = f"{labels[1]}.svc.{self.cluster_domain}."
            exists = await self._cluster_answer([namespace], qtype)
            if exists is not None:
                found = await self._cluster_answer([f"{name}.svc.{self.cluster_domain}."], qtype)
                if found is not None:
                    return self._cluster_reply(
                        packet, request, found, tcp=tcp, owner=request.q.qname, before=[namespace]
                    )
        reply = await self.forward(packet, tcp=tcp)  # rule 5
        if len(reply) > 3 and reply[3] & 0x0F == NXDOMAIN:
            # Not remembered: the reply holds only while the upstream has no such name.
            cluster = await self._from_search_list(packet, request, tcp=tcp, remember=False)
            if cluster is not None:
                return cluster
        return reply

    async def _cluster_answer(self, names: Sequence[str], qtype: int) -> Answer | None:
        """The first of ``names`` that exists in the cluster (NODATA included), or ``None``:
        none does, or the cluster cannot tell within half the timeout (then the name goes
        upstream, so the machine's DNS keeps working with the tunnel down)."""
        found: Answer | None = None
        with anyio.move_on_after(self.timeout / 2), contextlib.suppress(ResolveError):
            found = await self.resolver.first_answer(names, qtype, nodata_is_answer=True)
        return found if found is not None and found.rcode == NOERROR else None

    async def _from_search_list(
        self, packet: bytes, request: Any, *, tcp: bool, remember: bool = True
    ) -> bytes | None:
        """The reply from the first search-list expansion of the question that exists."""
        names = self.search_candidates(str(request.q.qname))
        found = await self._cluster_answer(names, request.q.qtype) if names else None
        if found is None:
            return None
        # The names before the one found decided the answer too (they had nothing).
        before = names[: names.index(found.name)] if remember and found.name in names else None
        return self._cluster_reply(
            packet, request, found, tcp=tcp, owner=request.q.qname, before=before
        )

    def _cluster_reply(
        self,
        packet: bytes,
        request: Any,
        answer: Answer,
        *,
        tcp: bool,
        owner: Any = None,
        before: Sequence[str] | None = (),
    ) -> bytes:
        """Build the reply to ``request`` from ``answer``, remember it, fit it to the client.

        ``before`` are the names whose (cached) answers were passed over for ``answer``; ``None``
        when that is not known, and then the reply is not remembered.
        """
        now = self.resolver.clock()
        data = bytes(build_reply(request, answer, now=now, owner=owner).pack())
        if before is not None:
            answers = [answer]
            for name in before:
                passed = self.resolver.cached(name, answer.qtype)
                if passed is None:  # not cached (SERVFAIL): asked again next time
                    break
                answers.append(passed)
            else:
                # Right while the TTLs written (whole seconds left) are, and the answers live.
                left = max(0, int(answer.expires - now))
                expires = min(a.expires for a in answers)
                until = min(answer.expires - left, math.nextafter(expires, -math.inf))
                self._remember(packet, data, tuple(answers), until, now)
        return _fit(data, request, tcp=tcp)

    # -- the reply cache ----------------------------------------------------------------------

    def cached_reply(self, packet: bytes, *, tcp: bool = False) -> bytes | None:
        """The reply to ``packet`` from the reply cache, or ``None`` (:meth:`answer` it then).

        Never raises; costs a few dictionary look-ups and a byte copy.
        """
        if not self._replies:
            return None
        question = _plain_question(packet)
        if question is None:
            return None
        key, name_end, limit = question
        entry = self._replies.get(key)
        if entry is None:
            return None
        holds = self.resolver.holds
        if self.resolver.clock() > entry.until or not all(map(holds, entry.answers)):
            del self._replies[key]
            return None
        data = entry.data
        if not tcp and len(data) > limit:
            return None  # the slow path truncates it
        return b"".join(
            (
                packet[:2],
                _REPLY_FLAGS[packet[2] & 0x01],
                data[3:12],
                packet[12:name_end],
                data[name_end:],
            )
        )

    def _remember(
        self, packet: bytes, data: bytes, answers: tuple[Answer, ...], until: float, now: float
    ) -> None:
        question = _plain_question(packet)
        if question is None or now > until or not all(map(self.resolver.holds, answers)):
            return
        key, name_end, _ = question
        if data[12:name_end].lower() != key[: name_end - 12]:
            return  # dnslib wrote the question differently: the client's bytes cannot be patched in
        if key not in self._replies and len(self._replies) >= MAX_CACHED_REPLIES:
            for stale in [k for k, e in self._replies.items() if e.until < now]:
                del self._replies[stale]
            while len(self._replies) >= MAX_CACHED_REPLIES:
                del self._replies[next(iter(self._replies))]
        self._replies[key] = _CachedReply(data, answers, until)

    async def forward(self, packet: bytes, *, tcp: bool = False) -> bytes:
        """Send ``packet`` unchanged to the upstream resolver; its reply, unchanged."""
        async with await self._upstream_udp() as sock:
            await sock.send(packet)
            while True:
                data = await sock.receive()
                if data[:2] == packet[:2]:
                    break
        if tcp and len(data) > 2 and data[2] & 0x02:  # TC: the whole answer needs TCP
            stream = await self._upstream_tcp()
            async with stream:
                await stream.send(len(packet).to_bytes(2, "big") + packet)
                reader = BufferedByteReceiveStream(stream)
                size = int.from_bytes(await reader.receive_exactly(2), "big")
                data = await reader.receive_exactly(size)
        return data

    async def _upstream_udp(self) -> ConnectedUDPSocket:
        sock = await self._upstream_socket(socket.SOCK_DGRAM)
        try:
            return await ConnectedUDPSocket.from_socket(sock)
        except BaseException:
            sock.close()
            raise

    async def _upstream_tcp(self) -> SocketStream:
        sock = await self._upstream_socket(socket.SOCK_STREAM)
        try:
            return await SocketStream.from_socket(sock)
        except BaseException:
            sock.close()
            raise

    async def _upstream_socket(self, kind: socket.SocketKind) -> socket.socket:
        """A non-blocking socket connected to the upstream resolver, marked before it connects."""
        host, port = self.upstream
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            address: tuple[Any, ...] = (host, port)
        except ValueError:  # a host name
            family, _, _, _, address = (await anyio.getaddrinfo(host, port, type=kind))[0]
        sock = socket.socket(family, kind)
        try:
            sock.setblocking(False)
            if self.upstream_mark is not None:
                self._mark(sock)
            err = sock.connect_ex(address)
            if err == errno.EINPROGRESS:
                await anyio.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"upstream resolver {host}:{port}: {os.strerror(err)}")
        except BaseException:
            sock.close()
            raise
        return sock

    def _mark(self, sock: socket.socket) -> None:
        assert self.upstream_mark is not None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.upstream_mark)
        except OSError as exc:
            raise errors.ProxyError(
                f"cannot mark the DNS server's upstream queries with {self.upstream_mark:#x} "
                f"(SO_MARK): {exc.strerror or exc}",
                hint="setting a firewall mark needs CAP_NET_ADMIN: run vpn-tcp as root "
                "(`sudo -E tpconf up`)",
            ) from exc

    # -- transports ---------------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve UDP and TCP on one loopback port until cancelled; ``started(port)`` once bound."""
        if self.upstream_mark is not None:  # fail now, not on the first forwarded query
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                self._mark(probe)
        udp, tcp = await self._bind()
        async with udp, tcp, anyio.create_task_group() as tg:
            port = udp.extra(SocketAttribute.local_port)
            log.debug("DNS server listening on 127.0.0.1:%d (UDP, TCP)", port)
            await tg.start(partial(tcp.serve, self._tcp_client))
            task_status.started(port)
            async for packet, (host, client_port) in udp:
                reply = self.cached_reply(packet)
                if reply is not None:  # answered here: a task costs more than the answer
                    try:
                        await udp.sendto(reply, host, client_port)
                    except Exception:  # one query's trouble never stops the server
                        log.debug("DNS reply to %s:%d failed", host, client_port, exc_info=True)
                    continue
                if self._udp_in_flight >= MAX_UDP_IN_FLIGHT:
                    continue
                self._udp_in_flight += 1
                tg.start_soon(self._udp_query, udp, packet, host, client_port)

    async def _bind(self) -> tuple[UDPSocket, TCPListener]:
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
                tcp = TCPListener.bind(
                    "127.0.0.1", port, name="DNS over TCP", max_connections=MAX_TCP_CONNECTIONS
                )
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

    async def _tcp_client(self, stream: ByteStream) -> None:
        """Serve pipelined queries on one connection; replies may come out of order."""
        lock = anyio.Lock()
        slots = anyio.Semaphore(MAX_TCP_IN_FLIGHT)

        async def reply(data: bytes) -> None:
            async with lock:
                await stream.send(len(data).to_bytes(2, "big") + data)

        async def one(packet: bytes) -> None:
            try:
                data = await self.answer(packet, tcp=True)
                if data is not None:
                    await reply(data)
            finally:
                slots.release()

        try:
            async with anyio.create_task_group() as tg:
                reader = BufferedByteReceiveStream(stream)
                while True:
                    with anyio.move_on_after(TCP_IDLE_TIMEOUT) as idle:
                        size = int.from_bytes(await reader.receive_exactly(2), "big")
                        packet = await reader.receive_exactly(size)
                    if idle.cancelled_caught:
                        break
                    cached = self.cached_reply(packet, tcp=True)
                    if cached is not None:
                        await reply(cached)
                        continue
                    await slots.acquire()  # the next query is read once one is answered
                    tg.start_soon(one, packet)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            pass


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


def _fit(data: bytes, request: Any, *, tcp: bool) -> bytes:
    """``data``; over UDP, a reply that does not fit the client's size is truncated (TC)."""
    if tcp:
        return data
    limit = CLASSIC_UDP_SIZE
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            limit = max(CLASSIC_UDP_SIZE, rr.rclass)
    if len(data) <= limit:
        return data
    header = DNSHeader(
        id=request.header.id, qr=1, ra=1, rd=request.header.rd, tc=1, rcode=data[3] & 0x0F
    )
    return bytes(DNSRecord(header, q=request.q).pack())


@dataclass(frozen=True, slots=True)
class _CachedReply:
    """A packed reply built from the resolver's ``answers``, right until ``until`` (included)."""

    data: bytes
    answers: tuple[Answer, ...]
    until: float


def _plain_question(packet: bytes) -> tuple[bytes, int, int] | None:
    """Read a plain query without dnslib: ``(key, end of the question's name, UDP size)``.

    Plain: not a response, opcode QUERY, one question, nothing else but an optional EDNS OPT
    record. The key is the question's wire bytes with the name in lower case (ASCII only, as DNS
    compares names; label lengths are at most 63, below any letter). ``None`` for anything else.
    """
    n = len(packet)
    if n < 17 or packet[2] & 0xF8 or packet[4:10] != b"\x00\x01\x00\x00\x00\x00":
        return None
    additional = (packet[10] << 8) | packet[11]
    if additional > 1:
        return None
    i = 12
    while i < n and (length := packet[i]):
        if length > 63:  # a compression pointer or a reserved label type
            return None
        i += length + 1
    name_end = i + 1
    end = name_end + 4
    if end > n:
        return None
    limit = CLASSIC_UDP_SIZE
    if additional:
        if n < end + 11 or packet[end : end + 3] != b"\x00\x00\x29":  # root name, type OPT
            return None
        limit = max(CLASSIC_UDP_SIZE, (packet[end + 3] << 8) | packet[end + 4])
    return packet[12:name_end].lower() + packet[name_end:end], name_end, limit
