"""The intercept router, with real peers on loopback: Python's own HTTP server as the app and as
a developer's machine, Python's own HTTP client (a different implementation from the router's),
raw sockets for what clients do by hand (chunked uploads, WebSocket upgrade, 100-continue,
protocols in which the server speaks first), and the control socket as tpconf uses it.

Scope: tpconf/agent/router.py only; the sidecar in a real pod is covered in tests/e2e.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import http.server
import json
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tpconf.agent.router import Router

pytestmark = pytest.mark.anyio


class Handler(http.server.BaseHTTPRequestHandler):
    """An app: says who it is, echoes a digest of the body, upgrades to a WebSocket-like echo."""

    protocol_version = "HTTP/1.1"
    name = "app"

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self, body: bytes, status: int = 200, *, chunked: bool = False) -> None:
        self.send_response(status)
        self.send_header("x-served-by", self.name)
        if chunked:
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for piece in (body[: len(body) // 2], body[len(body) // 2 :]):
                if piece:
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding") == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length", "0")))

    def do_GET(self) -> None:
        if self.headers.get("upgrade") == "echo":
            self.send_response(101)
            self.send_header("upgrade", "echo")
            self.send_header("connection", "upgrade")
            self.end_headers()
            self.wfile.flush()
            while line := self.rfile.readline():
                self.wfile.write(self.name.encode() + b":" + line)
                self.wfile.flush()
            self.close_connection = True
            return
        self._reply(f"{self.name} {self.path}".encode(), chunked=self.path == "/chunked")

    def do_POST(self) -> None:
        body = self._body()
        self._reply(f"{self.name} {hashlib.sha256(body).hexdigest()}".encode())


@dataclass
class Server:
    port: int
    server: http.server.ThreadingHTTPServer


@contextlib.contextmanager
def http_server(name: str) -> Iterator[Server]:
    handler = type(f"{name}Handler", (Handler,), {"name": name})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(server.server_address[1], server)
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Rig:
    router: Router
    app: Server
    dev: Server
    port: int
    """The agent's port (what a client connects to)."""
    app_port: int
    control: Path


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    with http_server("app") as app, http_server("dev") as dev:
        agent_port = free_port()
        router = Router({app.port: agent_port}, app_host="127.0.0.1")
        await router.start("127.0.0.1")
        control = tmp_path / "router.sock"
        server = await router.serve_control(str(control))
        try:
            yield Rig(router, app, dev, agent_port, app.port, control)
        finally:
            router.close()
            server.close()
            await router.drain(0)


class Control:
    """A developer's control connection (what tpconf opens over SSH)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def ask(self, **request: object) -> dict[str, object]:
        self.writer.write(json.dumps(request).encode() + b"\n")
        await self.writer.drain()
        answer: dict[str, object] = json.loads(await self.reader.readline())
        return answer

    async def route(self, rig: Rig, headers: list[list[object]], who: str) -> dict[str, object]:
        return await self.ask(
            op="route",
            port=rig.app_port,
            headers=headers,
            target=["127.0.0.1", rig.dev.port],
            who=who,
        )

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def control(rig: Rig) -> AsyncIterator[Control]:
    reader, writer = await asyncio.open_unix_connection(str(rig.control))
    ctl = Control(reader, writer)
    try:
        yield ctl
    finally:
        ctl.close()


def get(port: int, requests: list[tuple[str, dict[str, str]]]) -> list[tuple[int, str, str]]:
    """Requests on ONE keep-alive connection, with http.client: (status, served-by, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    try:
        for path, headers in requests:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            out.append(
                (response.status, response.getheader("x-served-by") or "", response.read().decode())
            )
    finally:
        conn.close()
    return out


async def test_without_routes_every_request_goes_to_the_app_on_one_kept_alive_connection(
    rig: Rig,
) -> None:
    replies = await asyncio.to_thread(get, rig.port, [("/a", {}), ("/chunked", {})] * 2)
    assert replies == [
        (200, "app", "app /a"),
        (200, "app", "app /chunked"),
        (200, "app", "app /a"),
        (200, "app", "app /chunked"),
    ]


async def test_a_header_route_takes_only_the_matching_requests_of_a_connection(rig: Rig) -> None:
    async with control(rig) as ctl:
        assert await ctl.route(rig, [["x-dev-user", "alice", False]], "alice@laptop") == {
            "ok": True
        }
        alice = {"X-Dev-User": "alice"}
        replies = await asyncio.to_thread(
            get, rig.port, [("/1", {}), ("/2", alice), ("/3", {"x-dev-user": "bob"}), ("/4", alice)]
        )
        assert [r[1] for r in replies] == ["app", "dev", "app", "dev"]
        assert replies[1] == (200, "dev", "dev /2")


async def test_a_regex_header_matches_the_whole_value(rig: Rig) -> None:
    async with control(rig) as ctl:
        await ctl.route(rig, [["x-dev-user", "al(ice|ex)", True]], "alice")
        replies = await asyncio.to_thread(
            get,
            rig.port,
            [("/", {"x-dev-user": "alex"}), ("/", {"x-dev-user": "alexander"})],
        )
        assert [r[1] for r in replies] == ["dev", "app"]


async def test_a_route_ends_with_the_connection_that_made_it(rig: Rig) -> None:
    headers = {"x-dev-user": "alice"}
    async with control(rig) as ctl:
        await ctl.route(rig, [["x-dev-user", "alice", False]], "alice")
        assert (await asyncio.to_thread(get, rig.port, [("/", headers)]))[0][1] == "dev"
    for _ in range(100):  # the router notices the closed connection at its next read
        if not rig.router.table.describe():
            break
        await asyncio.sleep(0.01)
    assert (await asyncio.to_thread(get, rig.port, [("/", headers)]))[0][1] == "app"


async def test_overlapping_routes_of_two_developers_are_refused(rig: Rig) -> None:
    async with control(rig) as alice, control(rig) as bob, control(rig) as carol:
        assert await alice.route(rig, [["x-dev-user", "alice", False]], "alice") == {"ok": True}
        same = await bob.route(rig, [["x-dev-user", "alice", False]], "bob")
        assert "alice" in str(same["error"]) and "same headers" in str(same["error"])
        everything = await carol.route(rig, [], "carol")
        assert "to itself" in str(everything["error"])
        assert await bob.route(rig, [["x-dev-user", "bob", False]], "bob") == {"ok": True}
        # Editing one's own headers replaces one's route, it does not clash with itself.
        assert await bob.route(rig, [["x-dev-user", "robert", False]], "bob") == {"ok": True}
        routes = (await alice.ask(op="status"))["routes"]
        assert isinstance(routes, list) and len(routes) == 2


async def test_a_route_to_a_machine_where_nothing_listens_gets_a_502_and_others_are_untouched(
    rig: Rig,
) -> None:
    async with control(rig) as ctl:
        await ctl.ask(
            op="route",
            port=rig.app_port,
            headers=[["x-dev-user", "alice", False]],
            target=["127.0.0.1", free_port()],
            who="alice@laptop",
        )
        replies = await asyncio.to_thread(get, rig.port, [("/", {"x-dev-user": "alice"})])
        assert replies[0][0] == 502 and "alice@laptop" in replies[0][2]
        assert (await asyncio.to_thread(get, rig.port, [("/", {})]))[0][:2] == (200, "app")


async def raw_exchange(port: int, data: bytes, *, until: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        received = b""
        async with asyncio.timeout(10):
            while until not in received:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += chunk
        return received
    finally:
        writer.close()


async def test_a_chunked_upload_reaches_the_app_byte_for_byte(rig: Rig) -> None:
    body = bytes(range(256)) * 4000
    chunks = b"".join(
        f"{len(body[i : i + 70000]):x}\r\n".encode() + body[i : i + 70000] + b"\r\n"
        for i in range(0, len(body), 70000)
    )
    request = (
        b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    reply = await raw_exchange(rig.port, request, until=hashlib.sha256(body).hexdigest().encode())
    assert reply.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
    assert hashlib.sha256(body).hexdigest().encode() in reply


async def test_an_expect_100_continue_upload_works(rig: Rig) -> None:
    body = b"x" * 100_000
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    try:
        writer.write(
            b"POST /e HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
        )
        await writer.drain()
        async with asyncio.timeout(10):
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(body)
            await writer.drain()
            final = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in final.split(b"\r\n")[0]
    finally:
        writer.close()


async def test_an_upgrade_becomes_bytes_both_ways_with_the_routed_target(rig: Rig) -> None:
    async with control(rig) as ctl:
        await ctl.route(rig, [["x-dev-user", "alice", False]], "alice")
        for headers, who in ((b"", b"app"), (b"x-dev-user: alice\r\n", b"dev")):
            reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
            try:
                writer.write(
                    b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: echo\r\nconnection: upgrade\r\n"
                    + headers
                    + b"\r\n"
                )
                async with asyncio.timeout(10):
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 101")
                    for n in range(3):
                        writer.write(b"frame %d\n" % n)
                        assert await reader.readline() == who + b":frame %d\n" % n
            finally:
                writer.close()


async def test_non_http_bytes_and_server_first_protocols_go_to_the_app_as_bytes(
    tmp_path: Path,
) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 banner\r\n")  # the server speaks first, as SMTP or MySQL do
        while data := await reader.read(1024):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    app_port = server.sockets[0].getsockname()[1]
    agent_port = free_port()
    router = Router({app_port: agent_port})
    await router.start("127.0.0.1")
    try:
        banner = await raw_exchange(agent_port, b"", until=b"\r\n")
        assert banner == b"220 banner\r\n"
        binary = bytes([0x16, 0x03, 0x01, 0x00, 0xFF]) * 10
        assert (await raw_exchange(agent_port, binary, until=binary)).endswith(binary)
    finally:
        router.close()
        server.close()
        await router.drain(0)


async def test_a_route_for_every_connection_takes_raw_bytes_too(rig: Rig) -> None:
    async with control(rig) as ctl:
        assert await ctl.route(rig, [], "alice") == {"ok": True}
        replies = await asyncio.to_thread(get, rig.port, [("/x", {}), ("/y", {})])
        assert [r[1] for r in replies] == ["dev", "dev"]


async def test_an_app_that_closed_a_kept_alive_connection_is_dialled_again() -> None:
    class Impatient(Handler):
        timeout = 0.3  # the app closes a connection idle for this long

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Impatient)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    agent_port = free_port()
    router = Router({server.server_address[1]: agent_port})
    await router.start("127.0.0.1")
    conn = http.client.HTTPConnection("127.0.0.1", agent_port, timeout=10)
    try:

        def one(path: str) -> str:
            conn.request("GET", path)
            return conn.getresponse().read().decode()

        assert await asyncio.to_thread(one, "/first") == "app /first"
        await asyncio.sleep(0.8)  # the app has closed the router's upstream by now
        assert await asyncio.to_thread(one, "/second") == "app /second"
    finally:
        conn.close()
        router.close()
        await router.drain(0)
        server.shutdown()
        server.server_close()


async def test_a_target_that_resets_ends_the_clients_connection_at_once(rig: Rig) -> None:
    """What sshd does when nothing listens on the developer's machine: accept, then reset."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    try:
        async with control(rig) as ctl:
            await ctl.ask(
                op="route", port=rig.app_port, headers=[], target=["127.0.0.1", target], who="x"
            )
            async with asyncio.timeout(5):  # not the client's own timeout
                reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
                writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                with contextlib.suppress(ConnectionError):
                    assert await reader.read() == b""
                writer.close()
    finally:
        server.close()
