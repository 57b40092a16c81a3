"""Row 4: DNS lookup of a Service name.

- ``ClusterResolver`` (what the SOCKS server's RESOLVE uses), uncached (its cache emptied before
  each lookup; the query rides a relay channel (the tunnel as `tpconf up` makes it: port-forward in
  this process) to the pod's nameserver, read from the
  agent's resolv.conf with ``fetch_pod_info``) and cached;
- the vpn-tcp ``DnsServer`` over UDP on 127.0.0.1, uncached, cached, and cached with its reply
  cache emptied (the answer built anew with dnslib);
- vpn-tcp end to end, the machine's resolver: glibc ``getaddrinfo(AF_INET)`` of a short Service
  name by a process of the "laptop" namespace (:mod:`bench.nsworker`); its query to the
  namespace's nameserver is redirected (iptables) to the DnsServer of the ``tpconf up`` running
  there. *Uncached*: a name asked for the first time (``dns-<i>``, one Service per sample,
  :mod:`bench.vpn`); *cached*: the same name again right after; *UDP query cached*: then the
  same question as one raw UDP packet to the same nameserver (the redirect + DnsServer without
  glibc's own work: resolv.conf, nsswitch, a new socket);
- ``getaddrinfo`` inside a cluster pod (glibc, no cache; the loop runs in the pod, so kubectl
  exec start-up is not counted): the reference.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ConnectedUDPSocket
from dnslib import DNSRecord

from bench.context import Bench, Deadline
from bench.core import Row, below
from bench.kube import kubectl
from bench.vpn import NEEDS_ROOT
from tpconf.proxy import ClusterResolver, DnsServer
from tpconf.tunnel import (
    PodInfo,
    PortForwardTarget,
    SupervisedTunnel,
    fetch_pod_info,
    port_forward_transport,
    run_tunnel,
)

REF = "in-pod getaddrinfo"
NO_REPLY_CACHE = "vpn-tcp DnsServer/UDP cached, reply cache emptied"
VPN_RESOLVER = "vpn-tcp netns getaddrinfo"
VPN_QUERY = "vpn-tcp netns UDP query cached"
#: variant -> target (ms; 0: none, it only splits the cached lookup's time)
VPN_VARIANTS = {f"{VPN_RESOLVER} uncached": 5.0, f"{VPN_RESOLVER} cached": 0.2, VPN_QUERY: 0.0}

IN_POD = """
import socket, time, json, sys
name, n = sys.argv[1], int(sys.argv[2])
out = []
for _ in range(n):
    t = time.perf_counter()
    socket.getaddrinfo(name, 7000, socket.AF_INET, socket.SOCK_STREAM)
    out.append((time.perf_counter() - t) * 1e3)
print(json.dumps(out))
"""


@asynccontextmanager
async def tunnel_to_agent(bench: Bench) -> AsyncIterator[tuple[SupervisedTunnel, PodInfo]]:
    """The tunnel as ``tpconf up`` makes it: port-forward in this process, SSH, the relay."""
    cfg = bench.side_config()
    target = PortForwardTarget(
        namespace=cfg.namespace,
        resource=f"pod/{cfg.pod}",
        kubectl=cfg.kubectl,
        kubeconfig=cfg.kubeconfig,
    )
    creds = bench.ns.keys.credentials("tpconf")
    async with anyio.create_task_group() as tg:
        tunnel = await tg.start(run_tunnel, port_forward_transport(target), creds)
        live = tunnel.current
        if live is not None:
            await live.relay_ready()  # queries go over the relay as soon as up's do
        yield tunnel, await fetch_pod_info(tunnel)
        tg.cancel_scope.cancel()


def _vpn_lookups(bench: Bench, rows: dict[str, Row]) -> bool:
    """One uncached + one cached lookup through the laptop's resolver (next unused name).

    False when it failed: the rows say so, the run fails, the other variants go on."""
    vpn = bench.vpn
    if vpn is None or not vpn.dns_names:
        return False
    assert vpn.worker is not None
    service, address = vpn.dns_names.popitem()
    try:
        for op, variant in (
            ("resolve", f"{VPN_RESOLVER} uncached"),
            ("resolve", f"{VPN_RESOLVER} cached"),
            ("query", VPN_QUERY),
        ):
            answer = vpn.worker.call(op, 10, name=service)
            if answer["addresses"] != [address]:
                raise RuntimeError(f"{service} resolved to {answer['addresses']}, not {address}")
            rows[variant].samples.append(float(answer["value"]))
    except Exception as exc:  # noqa: BLE001 - reported in the row and the exit status
        bench.failures.append(f"DNS / vpn-tcp: {exc}")
        for variant in VPN_VARIANTS:
            rows[variant].samples.clear()
            rows[variant].status = f"error: {type(exc).__name__}"
        return False
    return True


async def _udp_query(udp: ConnectedUDPSocket, packet: bytes) -> bytes:
    with anyio.fail_after(5):
        await udp.send(packet)
        return await udp.receive()


async def dns(bench: Bench) -> None:
    name = "DNS lookup of a Service"
    count = bench.sizes.dns_count
    short = "echo"
    fqdn = f"echo.{bench.ns.name}.svc.cluster.local."
    rows = {
        v: bench.table.add(Row(name, v, "ms", reference=REF))
        for v in (
            REF,
            "inject-tcp resolver uncached",
            "inject-tcp resolver cached",
            "vpn-tcp DnsServer/UDP uncached",
            "vpn-tcp DnsServer/UDP cached",
            NO_REPLY_CACHE,
        )
    }
    for v, limit in (("uncached", 5.0), ("cached", 0.2)):
        for prefix in ("inject-tcp resolver", "vpn-tcp DnsServer/UDP"):
            rows[f"{prefix} {v}"].target = f"< {limit:g} ms"
            rows[f"{prefix} {v}"].check = below(limit)
    vpn = bench.vpn_ready()
    for variant, limit in VPN_VARIANTS.items():
        target = f"< {limit:g} ms" if limit else ""
        if vpn is None:
            bench.table.slot(name, variant, bench.vpn_status or NEEDS_ROOT, target)
        else:
            rows[variant] = bench.table.add(Row(name, variant, "ms", reference=REF))
            if limit:
                rows[variant].target, rows[variant].check = target, below(limit)

    out = await anyio.to_thread.run_sync(
        lambda: kubectl(
            "-n", bench.ns.name, "exec", bench.ns.echo, "--",
            "python3", "-c", IN_POD, short, str(max(count, 20)),
        )
    )  # fmt: skip
    rows[REF].samples = json.loads(out)[1:]  # the first one includes loading NSS modules
    rows[REF].note = "glibc getaddrinfo(AF_INET) of the short name, timed in the pod"

    async with tunnel_to_agent(bench) as (tunnel, info):
        rc = info.resolv_conf
        bench.meta["pod_resolv_conf"] = {"search": rc.search, "ndots": rc.ndots}
        async with ClusterResolver(tunnel, rc.nameservers, rc.search, rc.ndots) as resolver:
            server = DnsServer(resolver, upstream=("127.0.0.1", 9))
            async with anyio.create_task_group() as tg:
                port = await tg.start(server.serve)
                udp = await anyio.create_connected_udp_socket("127.0.0.1", port)
                packet = DNSRecord.question(fqdn, "A").pack()
                await resolver.addresses(short)  # warm: the DNS connection through the tunnel
                deadline = Deadline(60)
                for _ in range(count):
                    if not deadline:
                        break
                    for cached in (False, True):
                        if not cached:
                            resolver._cache.clear()
                        start = time.perf_counter()
                        addresses = await resolver.addresses(short)
                        elapsed = (time.perf_counter() - start) * 1e3
                        assert addresses == [bench.ns.echo_ip], addresses
                        v = "cached" if cached else "uncached"
                        rows[f"inject-tcp resolver {v}"].samples.append(elapsed)
                    for cached in (False, True):
                        if not cached:
                            resolver._cache.clear()
                        start = time.perf_counter()
                        reply = DNSRecord.parse(await _udp_query(udp, packet))
                        elapsed = (time.perf_counter() - start) * 1e3
                        assert str(reply.a.rdata) == bench.ns.echo_ip, reply
                        v = "cached" if cached else "uncached"
                        rows[f"vpn-tcp DnsServer/UDP {v}"].samples.append(elapsed)
                    # The resolver's answer is cached; the reply is built anew (dnslib).
                    server._replies.clear()
                    start = time.perf_counter()
                    reply = DNSRecord.parse(await _udp_query(udp, packet))
                    elapsed = (time.perf_counter() - start) * 1e3
                    assert str(reply.a.rdata) == bench.ns.echo_ip, reply
                    rows[NO_REPLY_CACHE].samples.append(elapsed)
                    if vpn is not None and not await anyio.to_thread.run_sync(
                        _vpn_lookups, bench, rows
                    ):
                        vpn = None
                await udp.aclose()
                tg.cancel_scope.cancel()
    rows[
        "inject-tcp resolver uncached"
    ].note = (
        f"short name {short!r}: search list applied (ndots {rc.ndots}), candidates asked at once"
    )
    rows[
        "vpn-tcp DnsServer/UDP uncached"
    ].note = "FQDN over UDP to tpconf's DnsServer on 127.0.0.1 (no iptables redirect)"
    rows[NO_REPLY_CACHE].note = (
        "the resolver's answer cached, the DnsServer's reply cache emptied first: the reply is"
        " built with dnslib (what the reply cache saves)"
    )
    if f"{VPN_RESOLVER} uncached" in rows:
        rows[f"{VPN_RESOLVER} uncached"].note = (
            "a process in the laptop netns: getaddrinfo(AF_INET) of a never-asked short Service"
            " name -> iptables DNS redirect -> tpconf up's DnsServer -> cluster DNS via the tunnel"
        )
