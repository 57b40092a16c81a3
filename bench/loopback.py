"""The tunnel alone on loopback: write coalescing and window settings, no cluster in the path.

``tpconf.tunnel.open_tunnel`` to an in-process asyncssh server playing the agent (the test
peer ``tests.tunnel.peers.agent_server``), bulk up and down through one ``direct-tcpip`` channel
to a loopback sink / source, per :class:`~tpconf.tunnel.TunnelSettings` variant, interleaved in
each run. Everything runs in this process on 127.0.0.1: this isolates the CPU cost of tpconf's
SSH path from ``kubectl port-forward`` and the cluster (the ``tuning`` rows have those).
"""

from __future__ import annotations

import time

import anyio

from bench.context import Bench, Deadline
from bench.core import Row
from tests.tunnel.peers import agent_server, tcp_server
from tpconf.tunnel import ProxyKeys, Tunnel, TunnelSettings, open_tunnel

REF = "coalesced (default)"
VARIANTS = {
    REF: TunnelSettings(),
    "packet by packet": TunnelSettings(write_coalesce=0),
    "packet by packet, 2 MiB window": TunnelSettings(
        write_coalesce=0, channel_window=2 << 20, read_limit=1 << 20
    ),
}
USER = "agent"
BLOCK = bytes(256 * 1024)


async def _upload(tunnel: Tunnel, port: int, size: int) -> float:
    """MB/s of ``size`` bytes to the sink, which answers with the count it got."""
    async with await tunnel.dial("127.0.0.1", port) as stream:
        start = time.perf_counter()
        for _ in range(size // len(BLOCK)):  # sizes are multiples of 256 KiB
            await stream.send(BLOCK)
        await stream.send_eof()
        got = int.from_bytes(await stream.receive(), "big")
        elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"the sink got {got} bytes of {size}")
    return got / elapsed / 1e6


async def _download(tunnel: Tunnel, port: int, size: int) -> float:
    """MB/s of ``size`` bytes asked from the source."""
    async with await tunnel.dial("127.0.0.1", port) as stream:
        start = time.perf_counter()
        await stream.send(size.to_bytes(8, "big"))
        received = 0
        async for chunk in stream:
            received += len(chunk)
        elapsed = time.perf_counter() - start
    if received != size:
        raise RuntimeError(f"received {received} bytes of {size}")
    return received / elapsed / 1e6


async def loopback(bench: Bench) -> None:
    size = bench.sizes.loopback_bytes
    mib = size >> 20
    rows = {
        (direction, variant): bench.table.add(
            Row(
                f"loopback tunnel: {direction} {mib} MiB",
                variant,
                "MB/s",
                reference=REF,
                higher_is_better=True,
            )
        )
        for direction in ("upload", "download")
        for variant in VARIANTS
    }
    rows[
        "upload", REF
    ].note = "in-process asyncssh agent server on 127.0.0.1, one direct-tcpip channel; no kubectl"
    keys = ProxyKeys.generate(comment="bench")
    deadline = Deadline(300)
    async with (
        agent_server(keys) as agent,
        tcp_server("sink") as sink,
        tcp_server("source") as source,
    ):
        for _ in range(bench.sizes.loopback_runs):
            if not deadline:
                break
            for variant, settings in VARIANTS.items():
                credentials = keys.credentials(USER)
                async with open_tunnel(
                    ("127.0.0.1", agent.port), credentials, settings=settings
                ) as tunnel:
                    with anyio.fail_after(120):
                        rows["upload", variant].samples.append(await _upload(tunnel, sink, size))
                        rows["download", variant].samples.append(
                            await _download(tunnel, source, size)
                        )
