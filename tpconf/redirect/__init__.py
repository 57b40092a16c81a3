"""tpconf.redirect: the machine's kernel sends TCP and DNS to tpconf's local listeners.

Owns everything vpn-tcp changes on this machine, and nothing about the cluster:

- :mod:`~tpconf.redirect.routing`: which ranges are routed through which dialer
  (:class:`RouteTable`), `also-proxy` resolution, the nameservers of /etc/resolv.conf, and the
  iptables nat rules in tpconf's own chains (:class:`Routing`), applied atomically, removed on exit
  and by ``tpconf down`` after a crash;
- :mod:`~tpconf.redirect.transparent`: the loopback listener the rules redirect to, which reads
  ``SO_ORIGINAL_DST`` and relays through the routed dialer, and :class:`VPN`, the unit that ties
  listener and rules together.
"""

from __future__ import annotations

from tpconf.redirect.routing import (
    DNS_UPSTREAM_MARK,
    AlsoProxy,
    DnsRedirect,
    RouteTable,
    Routing,
    RuleSet,
    check_privileges,
    read_nameservers,
    remove_leftovers,
    resolve_also_proxy,
)
from tpconf.redirect.transparent import VPN, TransparentProxy, original_destination

__all__ = [
    "DNS_UPSTREAM_MARK",
    "VPN",
    "AlsoProxy",
    "DnsRedirect",
    "RouteTable",
    "Routing",
    "RuleSet",
    "TransparentProxy",
    "check_privileges",
    "original_destination",
    "read_nameservers",
    "remove_leftovers",
    "resolve_also_proxy",
]
