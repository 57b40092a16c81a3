"""A stand-in for ``kubectl port-forward``: a real child process that forwards real TCP.

Behaviour from the environment: FAKE_KUBECTL_TARGET (host:port to forward to),
FAKE_KUBECTL_MODE (ok, fail, forbidden, silent, stubborn: ignores SIGTERM), FAKE_KUBECTL_LOG
(a file that gets one line per start: pid and argv, and `KUBECONFIG=...` when that is set).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except OSError:
        writer.close()


async def _serve(target_host: str, target_port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        print("Handling connection for 8022", flush=True)
        up_reader, up_writer = await asyncio.open_connection(target_host, target_port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        writer.close()
        up_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(f"Forwarding from 127.0.0.1:{port} -> 8022", flush=True)
    await server.serve_forever()


def main() -> None:
    mode = os.environ.get("FAKE_KUBECTL_MODE", "ok")
    with open(os.environ["FAKE_KUBECTL_LOG"], "a") as log:
        kubeconfig = os.environ.get("KUBECONFIG")
        where = f" KUBECONFIG={kubeconfig}" if kubeconfig is not None else ""
        log.write(f"{os.getpid()} {' '.join(sys.argv[1:])}{where}\n")
    if mode == "fail":
        print(
            "error: unable to forward port because pod is not running. Current status=Pending",
            file=sys.stderr,
        )
        sys.exit(1)
    if mode == "forbidden":
        print(
            'Error from server (Forbidden): pods "agent" is forbidden: User "dev" cannot create'
            ' resource "pods/portforward" in API group "" in the namespace "ns"',
            file=sys.stderr,
        )
        sys.exit(1)
    if mode == "silent":
        signal.pause()
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen(["sleep", "60"])  # a grandchild in our process group
    host, _, port = os.environ["FAKE_KUBECTL_TARGET"].rpartition(":")
    asyncio.run(_serve(host, int(port)))


if __name__ == "__main__":
    main()
