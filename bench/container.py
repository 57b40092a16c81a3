"""Row 11: ``container``: a process inside the container method's app container against the same
process under inject-tcp, in one ``tpconf up`` and interleaved rounds.

One ``tpconf up`` runs two ``new`` deployments in the bench namespace: ``binj`` (inject-tcp)
and ``bctr`` (container, the tools image). Each round runs the same timer (:data:`TIMER`,
standard library, fed to ``python3 -`` on stdin) once per method with ``tpconf exec``: on this
machine under torsocks, and in a container on the network container's namespace. The timer
resolves the echo Service once, then times what the rows say against the bench's echo server
(:mod:`bench.echo`):

- *new connection + 1 round trip*: connect, ``E`` + ``ping``, read it back;
- *bulk download / upload*: one connection, :attr:`~bench.context.Sizes.bulk_bytes`.

inject-tcp: torsocks → SOCKS on loopback → the tunnel. container: the nat rule in the namespace
→ the transparent proxy there → a Unix socket to tpconf (the bridge) → the tunnel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio

from bench.context import Bench
from bench.core import Row, at_least_ratio, within_ms
from bench.echo import PORT
from bench.kube import DEBIAN_IMAGE
from bench.uphost import running_up, up_env

TIMER = textwrap.dedent(
    """
    import json, socket, sys, time
    host, port, mode, amount = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    def connect():
        s = socket.create_connection(address, timeout=60)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    def exactly(s, n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            if not chunk:
                raise SystemExit("closed early")
            data += chunk
        return data
    out = []
    if mode == "rtt":
        for _ in range(amount + 3):
            t = time.perf_counter()
            with connect() as s:
                s.sendall(b"Eping")
                exactly(s, 4)
            out.append((time.perf_counter() - t) * 1e3)
        out = out[3:]
    elif mode == "download":
        with connect() as s:
            t = time.perf_counter()
            s.sendall(b"D" + amount.to_bytes(8, "big"))
            got = 0
            while chunk := s.recv(1 << 20):
                got += len(chunk)
            assert got == amount, got
            out.append(amount / (time.perf_counter() - t) / 1e6)
    else:
        block = bytes(1 << 20)
        with connect() as s:
            t = time.perf_counter()
            s.sendall(b"U" + amount.to_bytes(8, "big"))
            left = amount
            while left > 0:
                s.sendall(block[: min(left, len(block))])
                left -= len(block)
            exactly(s, 1)
            out.append(amount / (time.perf_counter() - t) / 1e6)
    print(json.dumps(out))
    """
)

INJECT, CONTAINER = "binj", "bctr"
VARIANTS = {INJECT: "inject-tcp", CONTAINER: "container"}


def _config(ns: str) -> str:
    deployments = {
        INJECT: {"new": True, "volumes": False, "run": ["sleep", "infinity"]},
        CONTAINER: {
            "new": True,
            "method": "container",
            "image": DEBIAN_IMAGE,
            "volumes": False,
            "run": ["sleep", "infinity"],
        },
    }
    return json.dumps({"version": 1, "namespace": ns, "deployments": deployments})


def _time(project: Path, name: str, mode: str, amount: int) -> list[float]:
    done = subprocess.run(
        [sys.executable, "-m", "tpconf", "exec", name, "--"]
        + ["python3", "-", "echo", str(PORT), mode, str(amount)],
        cwd=project,
        env=up_env(),
        input=TIMER,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"tpconf exec {name} ({mode}): {done.stderr.strip()[-500:]}")
    samples: list[float] = json.loads(done.stdout.strip().splitlines()[-1])
    return samples


def _measure(bench: Bench) -> None:
    rounds = 1 if bench.quick else 5
    count = 20 if bench.quick else 100
    size = bench.sizes.bulk_bytes
    rtt_name = "container: new connection + 1 round trip to a Service, from the process"
    rtt = {
        name: bench.table.add(
            Row(rtt_name, variant, "ms", reference=None if name == INJECT else "inject-tcp")
        )
        for name, variant in VARIANTS.items()
    }
    rtt[CONTAINER].target, rtt[CONTAINER].check = "within 1 ms of inject-tcp", within_ms(1.0)
    bulk: dict[str, dict[str, Row]] = {}
    for direction in ("download", "upload"):
        name = f"container: bulk {direction} {size // 1_000_000} MB, from the process"
        bulk[direction] = {
            key: bench.table.add(
                Row(
                    name,
                    variant,
                    "MB/s",
                    reference=None if key == INJECT else "inject-tcp",
                    higher_is_better=True,
                )
            )
            for key, variant in VARIANTS.items()
        }
        row = bulk[direction][CONTAINER]
        row.target, row.check = "at least 0.8x inject-tcp", at_least_ratio(0.8)

    with running_up(_config(bench.ns.name)) as up:
        for name in VARIANTS:
            up.wait_line(rf"^{name}\s+ready", 300)
        for _ in range(rounds):
            for name in VARIANTS:
                rtt[name].samples += _time(up.project, name, "rtt", count)
                for direction, rows in bulk.items():
                    rows[name].samples += _time(up.project, name, direction, size)
    rtt[CONTAINER].note = "transparent proxy in the namespace + a Unix socket to tpconf"


async def container(bench: Bench) -> None:
    await anyio.to_thread.run_sync(_measure, bench)
