"""A local control socket of a running ``tpconf up``: how ``tpconf env NAME`` gets the pod env.

The environment holds whatever the pod has (Secrets included), so it is not written to disk
unless the file asks (`env.export`); instead ``up`` answers on ``.tpconf/control.sock``, a Unix
socket only its owner can open (mode 0600, in a 0700 directory). One JSON request per line,
one JSON answer.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import anyio
from anyio.abc import SocketStream, TaskStatus

from tpconf.errors import TpconfError, explain

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096

Handler = Callable[[dict[str, object]], dict[str, object]]


def _prepare(state_dir: Path) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    path = state_dir / SOCKET_NAME
    path.unlink(missing_ok=True)  # a crashed `up` leaves its socket behind
    return path


async def serve(
    state_dir: Path, handler: Handler, *, task_status: TaskStatus[Path] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Answer requests until cancelled; the socket is removed afterwards."""
    path = await anyio.to_thread.run_sync(_prepare, state_dir)
    listener = await anyio.create_unix_listener(path, mode=0o600)

    async def answer(stream: SocketStream) -> None:
        # Nothing a client sends (or does: hang up mid-request) may end the `up` serving it.
        async with stream:
            try:
                raw = await stream.receive(MAX_REQUEST)
                request = json.loads(raw.decode())
                if isinstance(request, dict):
                    reply = handler(request)
                else:
                    reply = {"error": "bad request: expected a JSON object"}
            except (ValueError, anyio.EndOfStream) as exc:
                reply = {"error": f"bad request: {exc}"}
            except Exception as exc:  # noqa: BLE001 - a bug answers as an error, not a crash
                reply = {"error": explain(exc).render()}
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(json.dumps(reply).encode() + b"\n")

    try:
        async with listener:
            task_status.started(path)
            await listener.serve(answer)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.Path(path).unlink(missing_ok=True)


async def request(state_dir: Path, payload: dict[str, object]) -> dict[str, object]:
    """Send one request to the ``up`` running for this project."""
    path = state_dir / SOCKET_NAME
    try:
        stream = await anyio.connect_unix(path)
    except OSError as exc:
        raise TpconfError(
            "tpconf up is not running for this project",
            hint="start `tpconf up` first: the environment comes from the proxy pod",
        ) from exc
    async with stream:
        await stream.send(json.dumps(payload).encode())
        data = b""
        with anyio.fail_after(10):
            while not data.endswith(b"\n"):
                try:
                    data += await stream.receive()
                except anyio.EndOfStream:
                    break
    reply: dict[str, object] = json.loads(data.decode())
    if "error" in reply:
        raise TpconfError(str(reply["error"]))
    return reply
