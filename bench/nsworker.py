"""The measuring client inside the "laptop" network namespace (vpn-tcp rows).

``ip netns exec NS python -m bench.nsworker``: a process of the machine that is *not* a child
of ``tpconf up``, reaching the cluster only through the kernel's redirect to tpconf's
transparent proxy (TCP) and DNS server (port 53 of the namespace's nameserver). It stays up for
the whole run, so no sample pays interpreter start-up: one JSON request per stdin line, one JSON
answer per stdout line, each timed here with the same code as the host-side variants
(:mod:`bench.client`)::

    {"op": "rtt", "host": H, "port": P}             -> {"value": seconds}
    {"op": "upload" | "download", "host", "port", "size"} -> {"value": MB/s}
    {"op": "resolve", "name": N}                    -> {"value": ms, "addresses": [...]}
    {"op": "query", "name": N}     -> {"value": ms, "addresses": [...]}  (one A question over UDP
                                      to resolv.conf's nameserver: the same path without glibc)

A failed request answers ``{"error": "..."}``; the worker keeps going.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

from bench import client
from bench.client import Route


def resolve(name: str) -> tuple[float, list[str]]:
    """glibc ``getaddrinfo(AF_INET)`` through the namespace's resolv.conf: ms, addresses."""
    start = time.perf_counter()
    infos = socket.getaddrinfo(name, 7000, socket.AF_INET, socket.SOCK_STREAM)
    elapsed = (time.perf_counter() - start) * 1e3
    return elapsed, sorted({str(info[4][0]) for info in infos})


def nameserver() -> str:
    with open("/etc/resolv.conf") as f:
        for line in f:
            fields = line.split()
            if fields[:1] == ["nameserver"] and len(fields) > 1:
                return fields[1]
    raise RuntimeError("no nameserver in /etc/resolv.conf")


def query(name: str) -> tuple[float, list[str]]:
    """One A question in one UDP packet to the nameserver (as glibc sends it): ms, addresses."""
    from dnslib import QTYPE, DNSRecord

    packet = DNSRecord.question(name.rstrip(".") + ".", "A").pack()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.connect((nameserver(), 53))
        start = time.perf_counter()
        sock.send(packet)
        reply = sock.recv(4096)
        elapsed = (time.perf_counter() - start) * 1e3
    record = DNSRecord.parse(reply)
    return elapsed, sorted(str(rr.rdata) for rr in record.rr if rr.rtype == QTYPE.A)


def handle(request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "resolve":
        ms, addresses = resolve(request["name"])
        return {"value": ms, "addresses": addresses}
    if op == "query":
        ms, addresses = query(request["name"])
        return {"value": ms, "addresses": addresses}
    route = Route((request["host"], int(request["port"])))
    if op == "rtt":
        return {"value": client.round_trip(route)}
    if op == "upload":
        return {"value": client.upload(route, int(request["size"]))}
    if op == "download":
        return {"value": client.download(route, int(request["size"]))}
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = handle(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - reported to the bench, which decides
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
