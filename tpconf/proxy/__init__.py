"""The local side of the cluster's network: SOCKS for inject-tcp, DNS for vpn-tcp.

The only package that imports dnslib. Everything here reaches the cluster through a
:class:`~tpconf.net.Dialer` and listens on loopback only.

* :mod:`~tpconf.proxy.resolver`: :class:`ClusterResolver`, names as the pod resolves them.
* :mod:`~tpconf.proxy.socks`: :class:`SocksServer`, SOCKS5 with Tor RESOLVE for torsocks.
* :mod:`~tpconf.proxy.dnsserver`: :class:`DnsServer`, the machine's DNS during vpn-tcp.
"""

from __future__ import annotations

from tpconf.proxy.dnsserver import DnsServer
from tpconf.proxy.resolver import (
    ClusterResolver,
    NameNotFound,
    NoRecords,
    ResolveError,
    ResolveTimeout,
    ServerFailure,
    SrvTarget,
)
from tpconf.proxy.socks import SocksServer

__all__ = [
    "ClusterResolver",
    "DnsServer",
    "NameNotFound",
    "NoRecords",
    "ResolveError",
    "ResolveTimeout",
    "ServerFailure",
    "SocksServer",
    "SrvTarget",
]
