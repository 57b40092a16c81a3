"""inject-tcp wrapping with the real torsocks: its config, CONNECT arriving at a SOCKS server, listening.

The SOCKS server here is a minimal test-local responder (tpconf.proxy is not imported: the supervisor
must not depend on it); it records each request and answers "succeeded".
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from tpconf.errors import ProcessError
from tpconf.supervisor.torsocks import (
    find_torsocks,
    find_torsocks_library,
    prepare_torsocks,
    torsocks_config,
    torsocks_wrapper,
)

needs_torsocks = pytest.mark.skipif(
    shutil.which("torsocks") is None, reason="the Debian package torsocks is not installed"
)


#: The recorder answers CONNECTs to this port "connection refused", others "succeeded".
REFUSED_PORT = 9


class Socks5Recorder:
    """Answers SOCKS5 without authentication and records (command, host, port)."""

    def __init__(self) -> None:
        self.requests: list[tuple[int, str, int]] = []
        self.port = 0

    async def handle(self, stream: SocketStream) -> None:
        async with stream:
            data = BufferedByteReceiveStream(stream)
            _version, count = await data.receive_exactly(2)
            await data.receive_exactly(count)
            await stream.send(b"\x05\x00")
            _version, command, _reserved, kind = await data.receive_exactly(4)
            if kind == 1:
                host = str(IPv4Address(await data.receive_exactly(4)))
            elif kind == 4:
                host = str(IPv6Address(await data.receive_exactly(16)))
            else:
                host = (await data.receive_exactly((await data.receive_exactly(1))[0])).decode()
            port = int.from_bytes(await data.receive_exactly(2), "big")
            self.requests.append((command, host, port))
            code = 5 if port == REFUSED_PORT else 0  # 5: connection refused
            await stream.send(bytes((5, code, 0, 1)) + bytes(6))


@pytest.fixture
async def socks() -> AsyncIterator[Socks5Recorder]:
    recorder = Socks5Recorder()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    recorder.port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, recorder.handle)
        yield recorder
        tg.cancel_scope.cancel()


def test_the_config_points_at_the_socks_port_and_allows_inbound_and_localhost() -> None:
    assert torsocks_config(41234) == (
        "# Written by tpconf for method inject-tcp.\n"
        "TorAddress 127.0.0.1\n"
        "TorPort 41234\n"
        "AllowInbound 1\n"
        "AllowOutboundLocalhost 1\n"
    )
    with pytest.raises(ValueError, match="invalid SOCKS port"):
        torsocks_config(0)


def fake_torsocks(directory: Path, *, library: bool = True) -> Path:
    """A script laid out like Debian's torsocks, naming a library in ``directory``."""
    script = directory / "torsocks"
    script.write_text(
        "#!/bin/sh\n"
        f"prefix={directory}\n"
        'LIBDIR="${prefix}/lib/torsocks"\n'
        'LIB_NAME="libtorsocks"\n'
        'SHLIB_EXT="so"\n'
        'SHLIB="${LIBDIR}/${LIB_NAME}.${SHLIB_EXT}"\n'
        'exec "$@"\n'
    )
    script.chmod(0o755)
    if library:
        (directory / "lib" / "torsocks").mkdir(parents=True)
        (directory / "lib" / "torsocks" / "libtorsocks.so").write_bytes(b"")
    return script


def test_the_wrapper_lives_in_a_private_directory_removed_afterwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_torsocks(tmp_path)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libmine.so")
    monkeypatch.delenv("TORSOCKS_LOG_LEVEL", raising=False)
    with torsocks_wrapper(41234, torsocks=str(fake)) as wrapper:
        directory = wrapper.config_file.parent
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE(wrapper.config_file.stat().st_mode) == 0o600
        assert "TorPort 41234\n" in wrapper.config_file.read_text()
        assert wrapper.argv == ()  # the script is not run: the library is preloaded
        assert wrapper.env == {
            "LD_PRELOAD": f"{tmp_path}/lib/torsocks/libtorsocks.so:/usr/lib/libmine.so",
            "TORSOCKS_CONF_FILE": str(wrapper.config_file),
            "TORSOCKS_LOG_LEVEL": "1",
        }
    assert not directory.exists()


def test_a_torsocks_without_its_library_names_the_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(ProcessError, match="libtorsocks") as info:
        find_torsocks_library(str(fake_torsocks(tmp_path, library=False)))
    assert "install the Debian/Ubuntu package `torsocks`" in (info.value.hint or "")


def test_missing_torsocks_names_the_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(ProcessError) as info:
        find_torsocks(path=str(tmp_path))
    assert "torsocks is not installed" in info.value.message
    assert "install the Debian/Ubuntu package `torsocks`" in (info.value.hint or "")


async def wrapped(code: str, directory: Path, socks_port: int) -> tuple[list[str], dict[str, str]]:
    wrapper = prepare_torsocks(socks_port, directory)
    return [*wrapper.argv, sys.executable, "-c", code], {**os.environ, **wrapper.env}


@needs_torsocks
@pytest.mark.anyio
async def test_a_wrapped_connect_arrives_at_the_socks_server(
    socks: Socks5Recorder, tmp_path: Path
) -> None:
    argv, env = await wrapped(
        "import socket; socket.create_connection(('10.99.0.1', 80), timeout=5).close()",
        tmp_path,
        socks.port,
    )
    with anyio.fail_after(20):
        done = await anyio.run_process(argv, env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert socks.requests == [(1, "10.99.0.1", 80)]


@needs_torsocks
@pytest.mark.anyio
async def test_a_wrapped_process_can_listen_and_accept_locally(
    socks: Socks5Recorder, tmp_path: Path
) -> None:
    """torsocks refuses listen() on a non-loopback address unless AllowInbound is set (checked:
    EPERM); `python3 -m http.server` binds 0.0.0.0, so that is what is tested."""
    code = (
        "import socket\n"
        "server = socket.create_server(('0.0.0.0', 0))\n"
        "print(server.getsockname()[1], flush=True)\n"
        "conn, _ = server.accept()\n"
        "conn.sendall(b'hello from the wrapped process')\n"
        "conn.close()\n"
    )
    argv, env = await wrapped(code, tmp_path, socks.port)
    with anyio.fail_after(20):
        async with await anyio.open_process(
            argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as process:
            assert process.stdout is not None
            port = int(await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 16))
            async with await anyio.connect_tcp("127.0.0.1", port) as client:
                assert await client.receive() == b"hello from the wrapped process"
            assert await process.wait() == 0
    assert socks.requests == []


@needs_torsocks
@pytest.mark.anyio
async def test_a_command_named_sh_runs_under_the_wrapper(
    socks: Socks5Recorder, tmp_path: Path
) -> None:
    """`run: [sh, -c, ...]`: the torsocks script took `sh` for its own `show` and ran nothing."""
    connect = "import socket; socket.create_connection(('10.99.0.2', 81), timeout=5).close()"
    wrapper = prepare_torsocks(socks.port, tmp_path)
    argv = [*wrapper.argv, "sh", "-c", f'"$0" -c "{connect}" && echo ran', sys.executable]
    with anyio.fail_after(20):
        done = await anyio.run_process(argv, env={**os.environ, **wrapper.env}, check=False)
    assert (done.returncode, done.stdout) == (0, b"ran\n"), done.stderr.decode()
    assert socks.requests == [(1, "10.99.0.2", 81)]


@needs_torsocks
@pytest.mark.anyio
async def test_torsocks_prints_nothing_on_the_programs_terminal_unless_asked(
    socks: Socks5Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(('10.99.0.3', {REFUSED_PORT}), timeout=5)\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    stderr = {}
    for level in (None, "2"):  # tpconf's default, then the user asking for errors
        if level is None:
            monkeypatch.delenv("TORSOCKS_LOG_LEVEL", raising=False)
        else:
            monkeypatch.setenv("TORSOCKS_LOG_LEVEL", level)
        argv, env = await wrapped(code, tmp_path, socks.port)
        with anyio.fail_after(20):
            done = await anyio.run_process(argv, env=env, check=False)
        assert done.stdout == b"ConnectionRefusedError\n", done.stderr.decode()
        stderr[level] = done.stderr.decode()
    assert stderr[None] == ""
    assert "ERROR torsocks" in stderr["2"]
