"""A local control socket of a running ``tpconf up``: how ``tpconf env NAME`` gets the pod env,
``tpconf exec NAME`` what its command runs with, and ``tpconf up NAME``/``down NAME`` start and
stop deployments of the running ``up``.

The environment holds whatever the pod has (Secrets included), so it is not written to disk
unless the file asks (`env.export`); instead ``up`` answers on ``.tpconf/control.sock``, a Unix
socket only its owner can open (mode 0600, in a 0700 directory that
:func:`~tpconf.reconcile.state.check_dir` has checked is no symbolic link), and only to clients
of its own user or root (``SO_PEERCRED``). One JSON request per line, one JSON answer. A client
that sends nothing, or never finishes its line, is dropped after :data:`REQUEST_TIMEOUT`, and at
most :data:`MAX_CLIENTS` are served at once: no client can tie ``up`` down.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

from tpconf.errors import TpconfError, explain

SOCKET_NAME = "control.sock"
MAX_REQUEST = 4096

#: Seconds a client has to send its request line.
REQUEST_TIMEOUT = 5.0

#: Seconds ``tpconf env`` waits for the answer.
ANSWER_TIMEOUT = 10.0

#: Clients served at once; more are answered "busy" at once.
MAX_CLIENTS = 16

#: Seconds ``tpconf up NAME``/``down NAME`` wait for the running ``up`` to start or stop them.
SELECT_TIMEOUT = 300.0

Handler = Callable[[dict[str, object]], Awaitable[dict[str, object]]]
"""Answers one request (it may take a while: starting a deployment)."""


def _prepare(state_dir: Path) -> Path:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    path = state_dir / SOCKET_NAME
    path.unlink(missing_ok=True)  # a crashed `up` leaves its socket behind
    return path


def _peer_uid(stream: SocketStream) -> int | None:
    sock = stream.extra(SocketAttribute.raw_socket)
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):  # not Linux: the 0700 directory is the only guard
        return None
    _, uid, _ = struct.unpack("3i", raw)
    return int(uid)


async def _read_request(stream: SocketStream) -> bytes:
    """One line (or all until the client half-closes), at most :data:`MAX_REQUEST` bytes."""
    data = b""
    with anyio.fail_after(REQUEST_TIMEOUT):
        while b"\n" not in data and len(data) < MAX_REQUEST:
            try:
                data += await stream.receive(MAX_REQUEST - len(data))
            except anyio.EndOfStream:
                break
    return data.split(b"\n", 1)[0]


async def serve(
    state_dir: Path, handler: Handler, *, task_status: TaskStatus[Path] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Answer requests until cancelled; the socket is removed afterwards."""
    path = await anyio.to_thread.run_sync(_prepare, state_dir)
    listener = await anyio.create_unix_listener(path, mode=0o600)
    allowed = {os.geteuid(), 0}
    busy = anyio.CapacityLimiter(MAX_CLIENTS)

    async def answer(stream: SocketStream) -> None:
        # Nothing a client sends (or does: hang up mid-request, say nothing) may end the `up`
        # serving it.
        async with stream:
            uid = _peer_uid(stream)
            try:
                busy.acquire_nowait()
            except anyio.WouldBlock:
                reply: dict[str, object] = {"error": "tpconf up is busy: try again"}
            else:
                try:
                    if uid is not None and uid not in allowed:
                        reply = {"error": "not allowed: this tpconf up belongs to another user"}
                    else:
                        reply = await _reply(stream, handler)
                finally:
                    busy.release()
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(json.dumps(reply).encode() + b"\n")

    try:
        async with listener:
            task_status.started(path)
            await listener.serve(answer)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.Path(path).unlink(missing_ok=True)


async def _reply(stream: SocketStream, handler: Handler) -> dict[str, object]:
    try:
        request = json.loads((await _read_request(stream)).decode())
    except TimeoutError:
        return {"error": f"bad request: nothing arrived within {REQUEST_TIMEOUT:g} s"}
    except (ValueError, anyio.BrokenResourceError) as exc:
        return {"error": f"bad request: {exc}"}
    if not isinstance(request, dict):
        return {"error": "bad request: expected a JSON object"}
    try:
        return await handler(request)
    except Exception as exc:  # noqa: BLE001 - a bug answers as an error, not a crash
        return {"error": explain(exc).render()}


async def request(
    state_dir: Path, payload: dict[str, object], *, timeout: float = ANSWER_TIMEOUT
) -> dict[str, object]:
    """Send one request to the ``up`` running for this project; wait ``timeout`` seconds for
    the answer."""
    path = state_dir / SOCKET_NAME
    try:
        stream = await anyio.connect_unix(path)
    except PermissionError as exc:
        raise TpconfError(
            "tpconf up runs here as another user (root, under sudo?)",
            hint="ask it as that user: `sudo -E tpconf env NAME`",
        ) from exc
    except OSError as exc:
        raise TpconfError(
            "tpconf up is not running for this project",
            hint="start `tpconf up` first: the environment comes from the proxy pod",
        ) from exc
    data = b""
    async with stream:
        with anyio.move_on_after(timeout) as waited:
            # A refusal may come (and the socket close) before the request is read.
            with contextlib.suppress(anyio.BrokenResourceError):
                await stream.send(json.dumps(payload).encode() + b"\n")
            while not data.endswith(b"\n"):
                try:
                    data += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    if waited.cancelled_caught:
        raise TpconfError(
            f"tpconf up did not answer within {timeout:g} s",
            hint="is it stuck? `tpconf status` shows what it does; Ctrl-C stops it",
        )
    try:
        reply = json.loads(data.decode())
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise TpconfError(
            f"{path} answered something that is not tpconf's: {data[:80]!r}",
            hint="is another program using it? stop `tpconf up`, remove the socket, start it again",
        )
    if "error" in reply:
        raise TpconfError(str(reply["error"]))
    return reply


async def running(state_dir: Path) -> bool:
    """Whether a ``tpconf up`` answers on this project's socket."""
    try:
        await request(state_dir, {"op": "ping"})
    except TpconfError:
        return False
    return True


async def select(
    state_dir: Path, *, add: list[str] | None = None, remove: list[str] | None = None
) -> dict[str, object] | None:
    """Have the ``up`` running for this project start (``add``) or stop (``remove``) some of
    its deployments; ``None`` when none runs."""
    if not await running(state_dir):
        return None
    payload: dict[str, object] = {"op": "select", "add": add or [], "remove": remove or []}
    return await request(state_dir, payload, timeout=SELECT_TIMEOUT)
