"""Cluster DNS as the pod sees it: the pod's search list and ndots, its nameserver, over TCP.

Owns :class:`ClusterResolver`, which the SOCKS server (Tor RESOLVE / RESOLVE_PTR, CONNECT by
name) and the local DNS server of vpn-tcp use. Queries are built and parsed with dnslib and
sent with a two-byte length prefix (DNS over TCP, RFC 7766) on connections opened through a
:class:`~tpconf.net.Dialer`, so in production they ride SSH ``direct-tcpip`` channels and reach
the nameserver from inside the proxy pod.

* **Search list** (glibc ``res_search``): a name with a trailing dot is absolute; a name with
  fewer than ``ndots`` dots tries each search domain first and then itself; any other name tries
  itself first and then the search domains. NXDOMAIN, NODATA and SERVFAIL go on to the next
  candidate; a timeout stops the search. The candidates are asked *concurrently* and the first
  one, in order, that has data wins: same answer as glibc, one round trip instead of up to four
  (with the Kubernetes default ``ndots:5`` even ``svc.ns.svc.cluster.local`` has a long list).
* **Cache**: answers live for their smallest TTL (capped by ``max_ttl``); NXDOMAIN and NODATA
  for the SOA minimum capped by ``negative_ttl`` (5 s by default), so a Service created after
  start is found within seconds. SERVFAIL and timeouts are not cached.
* **Coalescing**: identical questions in flight share one query. The query runs in the
  resolver's own task group, so a caller that gives up does not waste it: it still fills the cache.
* **Connections**: a few long-lived connections per nameserver carry pipelined queries, matched by
  ID. Another one is opened only when the existing ones have a query stuck for longer than
  ``stall``: CoreDNS answers the queries of one connection in order, and a name it forwards
  upstream must not hold back cluster names. A connection the server closes (CoreDNS does so
  after 128 queries or when idle) is dropped and its unanswered queries are sent again.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream
from dnslib import QTYPE, RCODE, RR, DNSError, DNSHeader, DNSLabel, DNSQuestion, DNSRecord

from tpconf import errors

if TYPE_CHECKING:
    from anyio.abc import ByteStream, TaskGroup

    from tpconf.net import Dialer

log = logging.getLogger(__name__)

NOERROR = 0
SERVFAIL = 2
NXDOMAIN = 3


class ResolveError(errors.ProxyError):
    """Raised when a name cannot be resolved in the cluster."""


class NameNotFound(ResolveError):
    """Raised when the cluster's nameserver says the name does not exist (NXDOMAIN)."""


class NoRecords(ResolveError):
    """Raised when the name exists in the cluster but has no record of the asked type (NODATA)."""


class ServerFailure(ResolveError):
    """Raised when the cluster's nameserver answers with an error (SERVFAIL, REFUSED, ...)."""


class ResolveTimeout(errors.Transient, ResolveError):
    """Raised when the cluster's nameserver cannot be reached or does not answer in time."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer of the cluster's nameserver, as cached.

    ``records`` and ``authority`` are dnslib ``RR`` objects and must not be modified (they are
    shared by every reader of the cache).
    """

    name: str
    """The absolute name that was asked, lower case, with its trailing dot."""
    qtype: int
    rcode: int
    records: tuple[Any, ...]
    authority: tuple[Any, ...]
    expires: float
    """When the cache drops it, on the resolver's clock."""

    @property
    def has_data(self) -> bool:
        """Whether the answer holds a record of the asked type (or anything, for ANY)."""
        if self.rcode != NOERROR:
            return False
        if self.qtype == QTYPE.ANY:
            return bool(self.records)
        return any(rr.rtype == self.qtype for rr in self.records)

    def values(self) -> list[str]:
        """The records of the asked type as text (addresses; names without trailing dot)."""
        out = []
        for rr in self.records:
            if rr.rtype == self.qtype:
                text = str(rr.rdata)
                out.append(text[:-1] if rr.rtype in _NAME_TYPES and text.endswith(".") else text)
        return out


_NAME_TYPES = frozenset({QTYPE.PTR, QTYPE.CNAME, QTYPE.NS})


@dataclass(frozen=True, slots=True)
class SrvTarget:
    """One SRV record: where ``_port._proto.name`` is served."""

    priority: int
    weight: int
    port: int
    target: str
    """Host name, without the trailing dot."""


def qtype_code(qtype: int | str) -> int:
    """``"AAAA"`` -> 28; numbers pass through."""
    if isinstance(qtype, int):
        return qtype
    return int(getattr(QTYPE, qtype.upper()))


def absolute(name: str) -> str:
    """The lower-case absolute form of ``name`` (trailing dot), as used in cache keys."""
    name = name.lower()
    return name if name.endswith(".") else name + "."


#: A label of a host name, in ASCII: letters, digits, ``-`` inside, ``_`` (``_http._tcp``).
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def host_name(name: str) -> str | None:
    """The absolute, lower-case ASCII form of host name ``name``, or ``None`` if it is none.

    Non-ASCII labels become their IDNA form (``bücher.de`` -> ``xn--bcher-kva.de.``). ``None``
    for a name longer than 253 characters, an empty label or one over 63 octets, characters
    other than letters, digits, ``-`` (not first or last) and ``_``, or IDNA that fails: no
    nameserver can have such a name, so it is answered NXDOMAIN without asking (dnslib raised
    on some, and others came back as a different name and timed out).
    """
    text = name.removesuffix(".")
    labels = []
    for label in text.split("."):
        if not label.isascii():
            try:
                label = label.encode("idna").decode("ascii")
            except UnicodeError:
                return None
        label = label.lower()
        if not _LABEL.fullmatch(label):
            return None
        labels.append(label)
    result = ".".join(labels)
    return result + "." if len(result) <= 253 else None


def reverse_name(address: str) -> str:
    """``10.0.0.1`` -> ``1.0.0.10.in-addr.arpa.``; raises ``ValueError`` on a non-address."""
    return ipaddress.ip_address(address).reverse_pointer + "."


def build_reply(request: Any, answer: Answer, *, now: float, owner: Any = None) -> Any:
    """A reply to the dnslib ``request`` with its ID and question, carrying ``answer``.

    TTLs are the time left in the cache. With ``owner``, records owned by ``answer.name`` are
    given that owner instead (a search-list expansion answered under the name the client asked).
    """
    header = DNSHeader(
        id=request.header.id, qr=1, aa=0, ra=1, rd=request.header.rd, rcode=answer.rcode
    )
    reply = DNSRecord(header, q=request.q)
    left = max(0, int(answer.expires - now))
    matched = DNSLabel(answer.name)
    for rr in answer.records:
        rname = owner if owner is not None and rr.rname == matched else rr.rname
        reply.add_answer(RR(rname, rr.rtype, rr.rclass, min(rr.ttl, left), rr.rdata))
    for rr in answer.authority:
        reply.add_auth(RR(rr.rname, rr.rtype, rr.rclass, min(rr.ttl, left), rr.rdata))
    return reply


@dataclass(eq=False)
class _Slot:
    """One query waiting on a connection for its response."""

    sent: float
    event: anyio.Event = field(default_factory=anyio.Event)
    data: bytes | None = None
    """The response; None when the connection was lost first."""


class _Connection:
    """One TCP connection to a nameserver, carrying pipelined queries matched by ID."""

    def __init__(self, stream: ByteStream, server: str) -> None:
        self.stream = stream
        self.server = server
        self.pending: dict[int, _Slot] = {}
        self.closed = False
        self._send_lock = anyio.Lock()

    def stalled(self, now: float, stall: float) -> bool:
        return any(now - slot.sent > stall for slot in self.pending.values())

    def new_id(self) -> int:
        while True:
            qid = random.getrandbits(16)
            if qid not in self.pending:
                return qid

    async def send(self, packet: bytes) -> None:
        async with self._send_lock:
            await self.stream.send(len(packet).to_bytes(2, "big") + packet)

    async def read_responses(self) -> None:
        """Hand each response to its query until the connection ends, then fail the rest."""
        reader = BufferedByteReceiveStream(self.stream)
        try:
            while True:
                size = int.from_bytes(await reader.receive_exactly(2), "big")
                data = await reader.receive_exactly(size)
                slot = self.pending.pop(int.from_bytes(data[:2], "big"), None)
                if slot is not None:
                    slot.data = data
                    slot.event.set()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
            log.debug("nameserver %s closed a DNS connection", self.server)
        except anyio.ClosedResourceError:
            pass
        finally:
            self.closed = True
            for slot in self.pending.values():
                slot.event.set()
            self.pending.clear()
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await self.stream.aclose()

    async def abort(self) -> None:
        """Close after a query timed out: the server (or the tunnel to it) may be stuck."""
        self.closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(1):
            await self.stream.aclose()


class _Flight:
    """One query in flight, shared by every caller asking the same question meanwhile."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.answer: Answer | None = None
        self.error: ResolveError | None = None

    async def wait(self) -> Answer:
        await self.event.wait()
        if self.answer is None:
            raise self.error or ResolveTimeout("the cluster resolver stopped")
        return self.answer


class _Done(_Flight):
    """A cache hit dressed as a finished flight."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        self.answer = answer
        self.event.set()

    async def wait(self) -> Answer:
        assert self.answer is not None
        return self.answer


class ClusterResolver:
    """Resolves names as a process in the proxy pod would, through ``dialer``.

    Use it as an async context manager: it owns a task group for its connections and queries.

    ``nameservers``, ``search`` and ``ndots`` come from the pod's ``/etc/resolv.conf``.
    ``timeout`` bounds one query; it is shared by ``attempts`` tries, in turn on each nameserver
    and each on a fresh connection if the previous one got stuck, before :class:`ResolveTimeout`. ``negative_ttl`` caps how long a missing
    name is remembered, so a Service created later is found within that many seconds.
    ``stall`` is how long a query may wait behind others on a connection before another
    connection is opened, up to ``max_connections`` per nameserver.
    """

    def __init__(
        self,
        dialer: Dialer,
        nameservers: Sequence[str],
        search: Sequence[str] = (),
        ndots: int = 1,
        *,
        port: int = 53,
        timeout: float = 3.0,
        attempts: int = 2,
        negative_ttl: float = 5.0,
        max_ttl: float = 300.0,
        max_entries: int = 4096,
        stall: float = 0.05,
        max_connections: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not nameservers:
            raise ValueError("ClusterResolver needs at least one nameserver")
        self.nameservers = tuple(nameservers)
        self.search = tuple(s.strip(".").lower() for s in search if s.strip("."))
        self.ndots = ndots
        self.port = port
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.negative_ttl = negative_ttl
        self.max_ttl = max_ttl
        self.max_entries = max_entries
        self.stall = stall
        self.max_connections = max_connections
        self.clock = clock
        #: Queries sent to nameservers (not cache hits): for tests and the status line.
        self.queries_sent = 0
        self._dialer = dialer
        self._cache: dict[tuple[str, int], Answer] = {}
        self._flights: dict[tuple[str, int], _Flight] = {}
        self._pools: dict[str, list[_Connection]] = {}
        self._dial_lock = anyio.Lock()
        self._tg: TaskGroup | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self._tg = None
            self._pools.clear()

    # -- search list --------------------------------------------------------------------------

    def candidates(self, name: str) -> list[str]:
        """The absolute names glibc would try for ``name``, in order."""
        if name.endswith("."):
            return [name.lower()]
        name = name.lower()
        expanded = [f"{name}.{domain}." for domain in self.search]
        if name.count(".") >= self.ndots:
            return [name + ".", *expanded]
        return [*expanded, name + "."]

    # -- typed lookups ------------------------------------------------------------------------

    async def resolve(self, name: str, qtype: int | str = "A") -> Answer:
        """The answer for ``name`` with the search list applied; raises a :class:`ResolveError`."""
        return await self.first_answer(self.candidates(name), qtype)

    async def addresses(self, name: str) -> list[str]:
        """IPv4 addresses of ``name``, else its IPv6 ones; an address literal is returned as is."""
        with contextlib.suppress(ValueError):
            return [str(ipaddress.ip_address(name))]
        try:
            return (await self.resolve(name, QTYPE.A)).values()
        except NoRecords:
            return (await self.resolve(name, QTYPE.AAAA)).values()

    async def srv(self, name: str) -> list[SrvTarget]:
        """SRV records of ``name`` (e.g. ``_http._tcp.svc.ns``), search list applied."""
        answer = await self.resolve(name, QTYPE.SRV)
        return [
            SrvTarget(
                rr.rdata.priority, rr.rdata.weight, rr.rdata.port, str(rr.rdata.target).rstrip(".")
            )
            for rr in answer.records
            if rr.rtype == QTYPE.SRV
        ]

    async def reverse(self, address: str) -> list[str]:
        """Names of ``address`` (PTR), without trailing dots."""
        try:
            name = reverse_name(address)
        except ValueError:
            raise NameNotFound(f"{address!r} is not an IP address") from None
        answer = await self.first_answer([name], QTYPE.PTR)
        return answer.values()

    async def exchange(self, packet: bytes) -> bytes:
        """Answer a raw DNS query through the cluster, as is (no search list), any type.

        The reply keeps the query's ID and question. Raises ``ValueError`` on a malformed packet
        and :class:`ResolveTimeout` when the nameserver does not answer.
        """
        try:
            request = DNSRecord.parse(packet)
        except DNSError as exc:
            raise ValueError(f"malformed DNS query: {exc}") from None
        if len(request.questions) != 1:
            raise ValueError("a DNS query must have exactly one question")
        answer = await self.query(str(request.q.qname), request.q.qtype)
        return bytes(build_reply(request, answer, now=self.clock()).pack())

    # -- the engine ---------------------------------------------------------------------------

    async def first_answer(
        self, names: Sequence[str], qtype: int | str, *, nodata_is_answer: bool = False
    ) -> Answer:
        """Ask all ``names`` at once; the first, in order, with data wins (glibc's rules).

        With ``nodata_is_answer``, a name that exists without records of this type wins too.
        """
        code = qtype_code(qtype)
        flights = []
        for name in names:
            flight = self._flight(absolute(name), code)
            flights.append(flight)
            cached = flight.answer if isinstance(flight, _Done) else None
            if cached is not None and (
                cached.has_data or (nodata_is_answer and cached.rcode == NOERROR)
            ):
                break  # the names after a cached answer would not be looked at
        nodata: Answer | None = None
        servfail: Answer | None = None
        for flight in flights:
            answer = await flight.wait()
            if answer.has_data:
                return answer
            if answer.rcode == NOERROR:
                if nodata_is_answer:
                    return answer
                nodata = nodata or answer
            elif answer.rcode != NXDOMAIN:
                servfail = servfail or answer
        shown = min(names, key=len).rstrip(".") if names else ""  # the name as written
        type_name = QTYPE.get(code, str(code))
        if nodata is not None:
            raise NoRecords(f"{nodata.name.rstrip('.')} has no {type_name} record in the cluster")
        if servfail is not None:
            rcode = RCODE.get(servfail.rcode, str(servfail.rcode))
            raise ServerFailure(f"the cluster's nameserver answered {rcode} for {shown}")
        raise NameNotFound(f"{shown} was not found in the cluster")

    async def query(self, name: str, qtype: int | str) -> Answer:
        """The answer for exactly ``name`` (cached, coalesced); rcodes are not raised."""
        return await self._flight(absolute(name), qtype_code(qtype)).wait()

    def cached(self, name: str, qtype: int | str) -> Answer | None:
        """The live cache entry for exactly ``name``, if any."""
        key = (absolute(name), qtype_code(qtype))
        answer = self._cache.get(key)
        if answer is not None and answer.expires > self.clock():
            return answer
        return None

    def holds(self, answer: Answer) -> bool:
        """Whether ``answer`` is still the cache's entry for its question (not replaced, not
        dropped); it says nothing about expiry, which the caller checks against ``expires``."""
        return self._cache.get((answer.name, answer.qtype)) is answer

    def _flight(self, name: str, qtype: int) -> _Flight:
        asked = host_name(name)
        if asked is None:  # no nameserver has it: NXDOMAIN, not cached, nothing asked
            return _Done(Answer(name, qtype, NXDOMAIN, (), (), self.clock()))
        name = asked
        key = (name, qtype)
        answer = self._cache.get(key)
        if answer is not None:
            if answer.expires > self.clock():
                return _Done(answer)
            del self._cache[key]
        flight = self._flights.get(key)
        if flight is None:
            if self._tg is None:
                raise RuntimeError("use ClusterResolver as an async context manager")
            flight = self._flights[key] = _Flight()
            self._tg.start_soon(self._fly, key, flight, name=f"dns {name} {qtype}")
        return flight

    async def _fly(self, key: tuple[str, int], flight: _Flight) -> None:
        try:
            with anyio.fail_after(self.timeout):
                flight.answer = await self._ask(*key)
            self._store(key, flight.answer)
        except TimeoutError:
            flight.error = ResolveTimeout(
                f"the cluster's nameserver did not answer for {key[0].rstrip('.')} "
                f"within {self.timeout:g} s"
            )
        except ResolveError as exc:
            flight.error = exc
        except (DNSError, ValueError) as exc:  # dnslib: bad label, or IDNA (a UnicodeError)
            flight.error = NameNotFound(f"{key[0].rstrip('.')} is not a valid name: {exc}")
        except Exception as exc:  # a bug or an odd dialer: fail this query, not the resolver
            log.exception("DNS query for %s failed", key[0])
            flight.error = ServerFailure(f"DNS query for {key[0].rstrip('.')} failed: {exc}")
        finally:
            del self._flights[key]
            flight.event.set()

    def _store(self, key: tuple[str, int], answer: Answer) -> None:
        if answer.expires <= self.clock():
            return
        if len(self._cache) >= self.max_entries:
            now = self.clock()
            for stale in [k for k, a in self._cache.items() if a.expires <= now]:
                del self._cache[stale]
            while len(self._cache) >= self.max_entries:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = answer

    async def _ask(self, name: str, qtype: int) -> Answer:
        """Send one question until a nameserver answers; the caller bounds the time."""
        per_attempt = self.timeout / self.attempts
        last: BaseException | None = None
        lost = 0
        attempt = 0
        while attempt < self.attempts:
            server = self.nameservers[attempt % len(self.nameservers)]
            try:
                conn = await self._connection(server)
            except (OSError, errors.TunnelError) as exc:
                log.debug("cannot reach nameserver %s: %s", server, exc)
                last = exc
                attempt += 1
                continue
            qid = conn.new_id()
            packet = _question(qid, name, qtype)
            slot = _Slot(sent=anyio.current_time())
            conn.pending[qid] = slot
            try:
                self.queries_sent += 1
                with anyio.move_on_after(per_attempt) as scope:
                    await conn.send(packet)
                    await slot.event.wait()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                last = exc
                slot.data = None
            finally:
                conn.pending.pop(qid, None)
            if scope.cancelled_caught:
                await conn.abort()
                attempt += 1
                continue
            if slot.data is None:
                # The server closed the connection (idle, or its per-connection query limit):
                # a fresh connection gets the question again; this does not count as an attempt.
                lost += 1
                if lost > 3:
                    attempt += 1
                continue
            answer = self._parse(slot.data, name, qtype)
            if answer is not None:
                return answer
            attempt += 1
        raise ResolveTimeout(
            f"no answer from the cluster's nameserver ({', '.join(self.nameservers)}) for "
            f"{name.rstrip('.')}" + (f": {last}" if last else "")
        )

    def _parse(self, data: bytes, name: str, qtype: int) -> Answer | None:
        try:
            response = DNSRecord.parse(data)
        except DNSError:
            log.warning("malformed DNS response for %s", name)
            return None
        q = response.q
        if q is None or str(q.qname).lower() != name or q.qtype != qtype:
            log.warning("DNS response does not match the question %s", name)
            return None
        records = tuple(response.rr)
        authority = tuple(response.auth)
        rcode = response.header.rcode
        now = self.clock()
        if rcode == NOERROR and records:
            ttl = min(min(rr.ttl for rr in records), self.max_ttl)
        elif rcode in (NOERROR, NXDOMAIN):
            ttl = min([self.negative_ttl, *_soa_ttls(authority)])
        else:
            ttl = 0
        return Answer(name, qtype, rcode, records, authority, now + ttl)

    async def _connection(self, server: str) -> _Connection:
        pool = self._pools.setdefault(server, [])
        conn = self._pick(pool)
        if conn is not None:
            return conn
        async with self._dial_lock:
            conn = self._pick(pool)
            if conn is not None:
                return conn
            stream = await self._dialer.dial(server, self.port)
            conn = _Connection(stream, server)
            pool.append(conn)
            assert self._tg is not None
            self._tg.start_soon(conn.read_responses, name=f"dns connection {server}")
            return conn

    def _pick(self, pool: list[_Connection]) -> _Connection | None:
        """The least busy live connection, unless all are stalled and another may be opened."""
        pool[:] = [c for c in pool if not c.closed]
        if not pool:
            return None
        best = min(pool, key=lambda c: len(c.pending))
        if len(pool) < self.max_connections and best.stalled(anyio.current_time(), self.stall):
            return None
        return best


def _question(qid: int, name: str, qtype: int) -> bytes:
    record = DNSRecord(DNSHeader(id=qid, rd=1), q=DNSQuestion(name, qtype))
    return bytes(record.pack())


def _soa_ttls(authority: Iterable[Any]) -> list[float]:
    return [min(rr.ttl, rr.rdata.times[-1]) for rr in authority if rr.rtype == QTYPE.SOA]
