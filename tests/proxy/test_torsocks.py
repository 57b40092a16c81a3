"""Real torsocks wrapping real curl and Python children, talking to our SOCKS server.

The fake cluster: the pod nameserver knows ``hello.default.svc.cluster.local`` = 10.96.1.1, and
the dialer maps 10.96.1.1:PORT to an HTTP server on this machine's loopback. What these tests
prove is the path torsocks takes: a name lookup arrives as Tor RESOLVE of the name as written
(the search list is ours to apply), the connection as CONNECT to the returned address, and the
reverse lookup of 127.0.0.1 that ``python3 -m http.server`` does at start-up is answered.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream

from tests.proxy.fakes import HELLO_IP, MapDialer
from tpconf.proxy.resolver import ClusterResolver
from tpconf.proxy.socks import Command, SocksServer

TORSOCKS = shutil.which("torsocks")
CURL = shutil.which("curl")

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(TORSOCKS is None, reason="torsocks is not installed (Debian: torsocks)"),
]

BODY = b"hello from the cluster\n"


async def http_handler(stream: SocketStream) -> None:
    async with stream:
        request = b""
        while b"\r\n\r\n" not in request:
            try:
                request += await stream.receive()
            except anyio.EndOfStream:
                return
        head = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY)
        await stream.send(head + BODY)


@pytest.fixture
async def http_port(dialer: MapDialer) -> AsyncIterator[int]:
    """An HTTP server that the fake cluster shows as 10.96.1.1 on the same port."""
    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        port: int = listener.extra(SocketAttribute.local_port)
        dialer.routes[(HELLO_IP, port)] = ("127.0.0.1", port)
        tg.start_soon(listener.serve, http_handler)
        yield port
        tg.cancel_scope.cancel()


@pytest.fixture
async def socks(resolver: ClusterResolver, dialer: MapDialer) -> AsyncIterator[SocksServer]:
    server = SocksServer(resolver, dialer)
    async with anyio.create_task_group() as tg:
        server.port = await tg.start(server.serve)
        yield server
        tg.cancel_scope.cancel()


@pytest.fixture
def torsocks_env(socks: SocksServer, tmp_path: Path) -> dict[str, str]:
    """The environment of a torsocks child pointed at the running SocksServer."""
    conf = tmp_path / "torsocks.conf"
    conf.write_text(
        f"TorAddress 127.0.0.1\nTorPort {socks.port}\nAllowInbound 1\nAllowOutboundLocalhost 1\n"
    )
    return {**os.environ, "TORSOCKS_CONF_FILE": str(conf)}


async def run(argv: list[str], env: Mapping[str, str]) -> tuple[int, str, str]:
    assert TORSOCKS is not None
    with anyio.fail_after(10):
        done = await anyio.run_process([TORSOCKS, *argv], env=env, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest.mark.parametrize("host", ["hello", "hello.default", "hello.default.svc.cluster.local"])
async def test_curl_reaches_a_service_by_its_short_and_long_names(
    torsocks_env: dict[str, str], http_port: int, dialer: MapDialer, host: str
) -> None:
    assert CURL is not None
    code, out, err = await run([CURL, "-sS", f"http://{host}:{http_port}/"], torsocks_env)
    assert (code, out) == (0, BODY.decode()), err
    assert (HELLO_IP, http_port) in dialer.calls  # CONNECT to the address RESOLVE returned


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_curl_fails_fast_on_an_unknown_name(
    torsocks_env: dict[str, str], http_port: int
) -> None:
    assert CURL is not None
    started = anyio.current_time()
    code, _, _ = await run([CURL, "-sS", f"http://nosuch:{http_port}/"], torsocks_env)
    assert code != 0
    assert anyio.current_time() - started < 5


async def test_a_python_child_resolves_and_connects_through_the_cluster(
    torsocks_env: dict[str, str], http_port: int
) -> None:
    script = (
        "import socket, sys, urllib.request\n"
        "print(socket.gethostbyname('hello'))\n"
        f"print(urllib.request.urlopen('http://hello.default:{http_port}/').read().decode(),"
        " end='')\n"
    )
    code, out, err = await run([sys.executable, "-c", script], torsocks_env)
    assert (code, out) == (0, f"{HELLO_IP}\n{BODY.decode()}"), err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("bind", "lookup"),
    [
        # getfqdn("127.0.0.1") at start-up: a reverse lookup, answered "localhost" locally.
        (["--bind", "127.0.0.1"], Command.RESOLVE_PTR),
        # getfqdn("::") looks up this machine's host name: not in the cluster, a quick error.
        ([], Command.RESOLVE),
    ],
)
async def test_python_http_server_starts_under_torsocks_and_is_reachable(
    torsocks_env: dict[str, str],
    socks: SocksServer,
    tmp_path: Path,
    bind: list[str],
    lookup: Command,
) -> None:
    assert TORSOCKS is not None
    (tmp_path / "index.html").write_text("served by a wrapped process\n")
    port = free_port()
    argv = [TORSOCKS, sys.executable, "-m", "http.server", str(port), *bind]
    async with await anyio.open_process(argv, env=torsocks_env, cwd=tmp_path) as process:
        try:
            with anyio.fail_after(5):
                while True:
                    try:
                        stream = await anyio.connect_tcp("127.0.0.1", port)
                        break
                    except OSError:
                        await anyio.sleep(0.05)
                async with stream:
                    await stream.send(b"GET /index.html HTTP/1.0\r\n\r\n")
                    response = b""
                    while True:
                        try:
                            response += await stream.receive()
                        except anyio.EndOfStream:
                            break
            assert response.startswith(b"HTTP/1.0 200")
            assert response.endswith(b"served by a wrapped process\n")
            assert socks.requests == {lookup: 1}
        finally:
            process.terminate()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()


async def test_a_failed_reverse_lookup_after_a_good_one_is_not_given_the_earlier_name(
    torsocks_env: dict[str, str],
) -> None:
    """torsocks 2.3 turned a failed RESOLVE_PTR into the previous lookup's name, and printed an
    ERROR line; the SOCKS server answers an address without a name with the address."""
    script = (
        "import socket\n"
        f"print(socket.gethostbyaddr('{HELLO_IP}')[0])\n"
        "print(socket.gethostbyaddr('10.96.9.9')[0])\n"
    )
    code, out, err = await run([sys.executable, "-c", script], torsocks_env)
    assert (code, out) == (0, "hello.default.svc.cluster.local\n10.96.9.9\n"), err
    assert "ERROR" not in err
