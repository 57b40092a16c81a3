"""The bench's test server, run in a cluster pod and locally as the loopback floor.

One asyncio program (:data:`SERVER`, run with ``python3 -c``), no dependency beyond the standard
library, so ``tpconf.local/debian:12`` runs it as is. The first byte of a connection picks the
mode:

- ``E``: echo everything back (round trips, concurrency);
- ``U`` + 8-byte big-endian length: read that many bytes, then answer ``K`` (upload);
- ``D`` + 8-byte big-endian length: send that many bytes, then close (download).

It prints ``LISTENING <port>`` once it listens (port 0 picks one).
"""

from __future__ import annotations

SERVER = r"""
import asyncio, sys
CHUNK = bytes(256 * 1024)

async def handle(reader, writer):
    try:
        mode = await reader.readexactly(1)
        if mode == b"E":
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        elif mode in (b"U", b"D"):
            size = int.from_bytes(await reader.readexactly(8), "big")
            if mode == b"U":
                while size > 0:
                    data = await reader.read(min(size, 1 << 20))
                    if not data:
                        break
                    size -= len(data)
                writer.write(b"K")
            else:
                view = memoryview(CHUNK)
                while size > 0:
                    writer.write(view[: min(size, len(CHUNK))])
                    size -= len(CHUNK)
                    await writer.drain()
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]), backlog=4096)
    print("LISTENING", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""

#: The port the server listens on in the pod, and the Service's port.
PORT = 7000
