"""The control socket with real Unix-socket clients: idle and endless clients are dropped, a
crowd is answered "busy", other users are refused, and `up` keeps answering through it all."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from tests import users
from tpconf.errors import TpconfError
from tpconf.reconcile import control

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def handler(request: dict[str, object]) -> dict[str, object]:
    if request.get("op") == "boom":
        raise RuntimeError("kaput")
    if request.get("op") == "slow":
        await anyio.sleep(float(str(request["seconds"])))
    return {"echo": request}


@asynccontextmanager
async def serving(state_dir: Path) -> AsyncIterator[Path]:
    async with anyio.create_task_group() as tg:
        path = await tg.start(control.serve, state_dir, handler)
        try:
            yield path
        finally:
            tg.cancel_scope.cancel()


async def raw_client(path: Path) -> anyio.abc.SocketStream:
    return await anyio.connect_unix(path)


async def reply_of(stream: anyio.abc.SocketStream) -> dict[str, object]:
    data = b""
    with anyio.fail_after(5):
        while not data.endswith(b"\n"):
            data += await stream.receive()
    answer: dict[str, object] = json.loads(data)
    return answer


async def test_a_request_is_answered_and_the_socket_removed_afterwards(tmp_path: Path) -> None:
    async with serving(tmp_path / ".tpconf") as path:
        assert (path.stat().st_mode & 0o777) == 0o600
        assert (path.parent.stat().st_mode & 0o777) == 0o700
        assert await control.request(path.parent, {"op": "ping"}) == {"echo": {"op": "ping"}}
    assert not path.exists()


async def test_an_idle_client_is_dropped_and_others_are_served_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.5)
    async with serving(tmp_path) as path:
        idle = await raw_client(path)
        unfinished = await raw_client(path)
        await unfinished.send(b'{"op": "pi')  # and never the rest of the line
        async with idle, unfinished:
            assert await control.request(tmp_path, {"op": "ping"}) == {"echo": {"op": "ping"}}
            for stream in (idle, unfinished):
                assert await reply_of(stream) == {
                    "error": "bad request: nothing arrived within 0.5 s"
                }
                with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
                    await stream.receive()  # and hung up on


async def test_more_clients_than_the_limit_are_told_busy_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 2)
    async with serving(tmp_path) as path:
        held = [await raw_client(path) for _ in range(2)]
        await anyio.sleep(0.1)  # both taken in by the server
        extra = await raw_client(path)
        async with extra:
            assert await reply_of(extra) == {"error": "tpconf up is busy: try again"}
        for stream in held:
            await stream.send(b'{"op": "ping"}\n')
            assert await reply_of(stream) == {"echo": {"op": "ping"}}
            await stream.aclose()


async def test_garbage_and_handler_bugs_are_answered_as_errors_and_up_keeps_serving(
    tmp_path: Path,
) -> None:
    async with serving(tmp_path) as path:
        for sent in (b"\xff\xfe\n", b"[1, 2]\n", b"not json\n"):
            async with await raw_client(path) as stream:
                await stream.send(sent)
                assert str((await reply_of(stream))["error"]).startswith("bad request")
        with pytest.raises(TpconfError, match="RuntimeError: kaput"):
            await control.request(tmp_path, {"op": "boom"})
        assert await control.request(tmp_path, {"op": "ping"}) == {"echo": {"op": "ping"}}


async def test_asking_where_no_up_runs_says_so(tmp_path: Path) -> None:
    with pytest.raises(TpconfError, match="tpconf up is not running for this project"):
        await control.request(tmp_path, {"op": "ping"})


async def test_a_socket_that_answers_something_else_is_named(tmp_path: Path) -> None:
    path = tmp_path / control.SOCKET_NAME
    listener = await anyio.create_unix_listener(path)

    async def impostor(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.send(b"HTTP/1.0 200 OK\n")

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, impostor)
        with pytest.raises(TpconfError, match="answered something that is not tpconf's"):
            await control.request(tmp_path, {"op": "ping"})
        tg.cancel_scope.cancel()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    with users.shared_dir("tpconf-control-") as path:
        yield path


ASK = """
import anyio, sys
from pathlib import Path
from tpconf.errors import TpconfError
from tpconf.reconcile import control
try:
    print(anyio.run(control.request, Path(sys.argv[1]), {"op": "ping"}))
except TpconfError as exc:
    print(exc.render())
"""


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: acts as another user")
async def test_another_user_is_refused_even_if_the_socket_is_opened_to_everyone(
    shared_dir: Path,
) -> None:
    state_dir = shared_dir / ".tpconf"
    async with serving(state_dir) as path:
        shown = await anyio.to_thread.run_sync(users.as_nobody, ASK, str(state_dir))
        assert shown == (
            "tpconf up runs here as another user (root, under sudo?)\n"
            "  hint: ask it as that user: `sudo -E tpconf env NAME`"
        )
        # Someone loosened the modes: the peer's credentials still decide.
        state_dir.chmod(0o755)
        path.chmod(0o666)
        shown = await anyio.to_thread.run_sync(users.as_nobody, ASK, str(state_dir))
        assert shown == "not allowed: this tpconf up belongs to another user"
        assert await control.request(state_dir, {"op": "ping"}) == {"echo": {"op": "ping"}}


async def test_a_client_that_hangs_up_mid_request_does_not_end_up(tmp_path: Path) -> None:
    async with serving(tmp_path) as path:
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(path))
            sock.sendall(b'{"op":')
            sock.close()
        assert await control.request(tmp_path, {"op": "ping"}) == {"echo": {"op": "ping"}}


async def test_a_slow_answer_is_waited_for_as_long_as_the_caller_says(tmp_path: Path) -> None:
    async with serving(tmp_path):
        reply = await control.request(tmp_path, {"op": "slow", "seconds": 0.3}, timeout=5)
        assert reply == {"echo": {"op": "slow", "seconds": 0.3}}
        with pytest.raises(TpconfError) as info:
            await control.request(tmp_path, {"op": "slow", "seconds": 5}, timeout=0.2)
        assert info.value.message == "tpconf up did not answer within 0.2 s"
