"""The transparent TCP proxy of vpn-tcp: the kernel redirects a connection here, we relay it.

The kernel redirects TCP for the routed ranges (see :mod:`tpconf.redirect.routing`) to a
listener on ``127.0.0.1:PORT``. For each connection, :class:`TransparentProxy` reads where the
program meant to go (``SO_ORIGINAL_DST``), picks the dialer of the deployment that routes that
address (longest-prefix match), dials it (an SSH ``direct-tcpip`` channel from the proxy pod in
production) and relays bytes both ways, half-close included.

:class:`VPN` is the unit the reconciler runs: ``port = await tg.start(vpn.run)``, then
:meth:`VPN.set_routes` / :meth:`VPN.remove_routes` per deployment and :meth:`VPN.redirect_dns`
once the local DNS server listens. On exit it removes its rules; `tpconf down` after a crash
calls :func:`~tpconf.redirect.routing.remove_leftovers`.

IPv4 only: ``SO_ORIGINAL_DST`` is read for IPv4 and only IPv4 rules are written.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network

import anyio
from anyio.abc import ByteStream, SocketAttribute, TaskStatus

from tpconf.errors import TpconfError, explain
from tpconf.net import MAX_CONNECTIONS, Dialer, TCPListener, relay, set_reset_on_close
from tpconf.redirect.routing import (
    DNS_UPSTREAM_MARK,
    DnsRedirect,
    RouteTable,
    Routing,
    RuleSet,
    check_privileges,
    read_nameservers,
)

__all__ = ["DNS_UPSTREAM_MARK", "VPN", "TransparentProxy", "original_destination"]

log = logging.getLogger(__name__)

#: ``SO_ORIGINAL_DST`` from ``<linux/netfilter_ipv4.h>`` (not exported by :mod:`socket`).
SO_ORIGINAL_DST = 80


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """The address a redirected IPv4 connection was meant for, from conntrack."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def _reset(stream: ByteStream) -> None:
    """Make the coming close send a RST: the program sees "connection reset", like a refusal."""
    set_reset_on_close(stream.extra(SocketAttribute.raw_socket))


class TransparentProxy:
    """The loopback listener the nat rules redirect to; dials through ``routes``.

    ``max_connections`` bounds the connections relayed at once; more are reset, and fd
    exhaustion only slows accepting down (see :class:`~tpconf.net.TCPListener`).
    """

    def __init__(
        self,
        routes: RouteTable[Dialer],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        dial_timeout: float = 10.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.routes = routes
        self.host = host
        self.port = port
        self.dial_timeout = dial_timeout
        self.max_connections = max_connections
        #: The listener while :meth:`serve` runs (its counters: active, refused, exhausted).
        self.listener: TCPListener | None = None

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status.started(port)`` once bound."""
        listener = TCPListener.bind(
            self.host, self.port, name="vpn-tcp proxy", max_connections=self.max_connections
        )
        async with listener:
            self.port = listener.port
            log.info("vpn-tcp proxy listening on %s:%d", self.host, self.port)
            self.listener = listener
            try:
                await listener.serve(self._handle, task_status=task_status)
            finally:
                self.listener = None

    async def _handle(self, client: ByteStream) -> None:
        try:
            await self._proxy(client)
        except Exception as exc:  # noqa: BLE001 - one connection's failure must not stop the VPN
            log.error("vpn-tcp: %s", explain(exc).render())

    async def _proxy(self, client: ByteStream) -> None:
        try:
            host, port = original_destination(client.extra(SocketAttribute.raw_socket))
        except OSError as exc:
            log.warning("vpn-tcp: connection without an original destination: %s", exc)
            return
        found = self.routes.lookup(host)
        if found is None:
            log.debug("vpn-tcp: %s:%d is not routed; reset", host, port)
            _reset(client)
            return
        owner, dialer = found
        # The client's connect has already succeeded (the kernel answered for the address):
        # with the relay, its bytes can go before the pod has connected, saving a round trip
        # through the API server (``dial_early``); a failed connect then breaks the stream and
        # says why in ``open_error``, and the client is reset as before.
        dial = getattr(dialer, "dial_early", dialer.dial)
        try:
            with anyio.fail_after(self.dial_timeout):
                upstream = await dial(host, port)
        except (OSError, TpconfError) as exc:  # TimeoutError is an OSError
            log.info("vpn-tcp: %s:%d via %s failed: %s", host, port, owner, exc)
            _reset(client)
            return
        log.debug("vpn-tcp: %s:%d via %s", host, port, owner)
        async with upstream:
            await relay(client, upstream)
        failed = getattr(upstream, "open_error", None)
        if failed is not None:
            log.info("vpn-tcp: %s:%d via %s failed: %s", host, port, owner, failed)
            _reset(client)


class VPN:
    """The session's one vpn-tcp proxy, its routes, its nat rules and its DNS redirect.

    ``command_prefix`` runs iptables elsewhere (a network namespace in tests).
    """

    def __init__(
        self,
        *,
        port: int = 0,
        mark: int = DNS_UPSTREAM_MARK,
        dial_timeout: float = 10.0,
        cleanup_timeout: float = 5.0,
        chain_prefix: str = "TPCONF",
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.routes: RouteTable[Dialer] = RouteTable()
        self.proxy = TransparentProxy(self.routes, port=port, dial_timeout=dial_timeout)
        self.routing = Routing(chain_prefix=chain_prefix, command_prefix=command_prefix)
        self.mark = mark
        self.cleanup_timeout = cleanup_timeout
        self._exclude: dict[str, frozenset[IPv4Network]] = {}
        self._dns: DnsRedirect | None = None
        self._running = False

    async def run(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, then remove the rules; ``started(port)`` once rules are in."""
        check_privileges()
        async with anyio.create_task_group() as tg:
            port = await tg.start(self.proxy.serve)
            try:
                self._running = True
                await self._sync()
                task_status.started(port)
                await anyio.sleep_forever()
            finally:
                self._running = False
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.cleanup_timeout):
                    await self.routing.cleanup()

    async def set_routes(
        self,
        owner: str,
        networks: Iterable[IPv4Network],
        dialer: Dialer,
        *,
        exclude: Iterable[IPv4Network | IPv4Address] = (),
    ) -> None:
        """Route ``networks`` through ``dialer`` for deployment ``owner`` (replaces its old set).

        ``exclude``: addresses never to redirect, above all the API server the deployment's
        port-forward goes to (a routed range must not capture the tunnel itself).
        """
        self.routes.set(owner, networks, dialer)
        self._exclude[owner] = frozenset(IPv4Network(x) for x in exclude)
        await self._sync()

    async def remove_routes(self, owner: str) -> None:
        """Stop routing ``owner``'s ranges; ranges another deployment routes stay."""
        self.routes.remove(owner)
        self._exclude.pop(owner, None)
        await self._sync()

    async def redirect_dns(
        self, port: int | None, nameservers: Sequence[IPv4Address] | None = None
    ) -> None:
        """Send DNS for ``nameservers`` (default: /etc/resolv.conf's) to ``127.0.0.1:port``.

        ``port=None`` undoes it. The DNS server must set ``SO_MARK`` = :attr:`mark` on the
        socket it forwards other names upstream with.
        """
        if port is None:
            self._dns = None
        else:
            servers = read_nameservers() if nameservers is None else nameservers
            self._dns = DnsRedirect(tuple(servers), port)
        await self._sync()

    def rule_set(self) -> RuleSet:
        """The rules the current routes, exclusions and DNS redirect call for."""
        exclude: frozenset[IPv4Network] = frozenset().union(*self._exclude.values())
        return RuleSet(
            proxy_port=self.proxy.port,
            networks=self.routes.networks(),
            exclude=exclude,
            dns=self._dns,
            mark=self.mark,
        )

    async def _sync(self) -> None:
        if self._running:
            await self.routing.apply(self.rule_set())
