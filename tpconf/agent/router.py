"""The intercept router of the tpconf agent: the sidecar's listeners, which send each connection,
or each HTTP/1.1 request, to the app container or to a developer's machine.

Runs inside the agent image (standard library only, Debian's python3). For each intercepted
container port APP the agent listens on its own port AGENT (the Services' targetPort points at
it while the Deployment is intercepted) and decides, per connection and per request:

- a developer's *all* route on the port: the whole connection goes to their machine, as bytes;
- otherwise, if the connection speaks HTTP/1.x, each request is routed on its own: the first
  developer route whose headers all match takes it, anything else goes to the app, on a
  keep-alive connection of its own (bytes intact, chunked and streamed bodies, 100-continue);
  an ``Upgrade`` that the target accepts (101, e.g. a WebSocket) turns the rest of the
  connection into bytes to that target;
- anything else (TLS, HTTP/2 prior knowledge, a database protocol) goes to the app as bytes.

Routes come from developers' ``tpconf up`` through a Unix socket (reached over SSH as a
``direct-streamlocal`` channel): one JSON request per line. A route lives as long as the
connection that made it, so a developer who leaves, crashes or loses the network takes their
routes with them and the app gets the traffic back. A developer's target is a remote forward
of their SSH connection (127.0.0.1:PORT in the pod); when nothing answers there, a matching
request gets a 502 that says so, and other requests are not affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("tpconf-agent.router")

#: Bytes read at a time when relaying.
CHUNK = 256 * 1024
#: A request or response head larger than this is not HTTP we route (it is passed through).
MAX_HEAD = 64 * 1024
#: Seconds to wait for a developer's machine to start answering a routed request.
TARGET_CONNECT_TIMEOUT = 10.0
#: Seconds a new connection may stay silent before it is taken for a protocol in which the
#: server speaks first (MySQL, SMTP): it then goes to the app as bytes. HTTP clients send their
#: request at once, so this never delays HTTP.
FIRST_BYTES_WAIT = 0.2

_METHOD = re.compile(rb"^[A-Z]{3,10} [^ ]+ HTTP/1\.[01]\r\n")
_HTTP_PREFIXES = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ",
                  b"CONNECT ", b"TRACE ")  # fmt: skip


class RouteError(Exception):
    """A route that cannot be added (it overlaps another developer's)."""


@dataclass(frozen=True)
class HeaderRule:
    """One header a request must have: ``value`` exactly, or matching it as a regex."""

    name: str
    value: str
    regex: bool = False

    def matches(self, values: list[str]) -> bool:
        if self.regex:
            # re caches compiled patterns: no compile per request.
            return any(re.fullmatch(self.value, v) for v in values)
        return self.value in values


@dataclass(frozen=True)
class Route:
    """Where requests (or connections) for one intercepted port go for one developer."""

    app_port: int
    target: tuple[str, int]
    headers: tuple[HeaderRule, ...]
    who: str
    session: int

    @property
    def everything(self) -> bool:
        return not self.headers

    def matches(self, headers: dict[str, list[str]]) -> bool:
        return all(rule.matches(headers.get(rule.name, [])) for rule in self.headers)


@dataclass
class Table:
    """The routes of every intercepted port."""

    routes: dict[int, list[Route]] = field(default_factory=dict)

    def set(self, route: Route) -> None:
        """Add ``route``, replacing the same session's route for the port; refuse overlaps."""
        others = [r for r in self.routes.get(route.app_port, []) if r.session != route.session]
        for other in others:
            if other.everything or route.everything:
                raise RouteError(
                    f"port {route.app_port} is intercepted by {other.who} "
                    + ("for every request" if other.everything else "with headers")
                    + (
                        "; an intercept without headers needs the port to itself"
                        if route.everything
                        else "; add `headers` to share it"
                    )
                )
            if set(other.headers) == set(route.headers):
                raise RouteError(
                    f"port {route.app_port} is intercepted by {other.who} with the same headers"
                )
        self.routes[route.app_port] = [*others, route]

    def remove(self, session: int, app_port: int | None = None) -> None:
        for port in list(self.routes):
            if app_port is None or port == app_port:
                self.routes[port] = [r for r in self.routes[port] if r.session != session]

    def everything(self, app_port: int) -> Route | None:
        return next((r for r in self.routes.get(app_port, []) if r.everything), None)

    def match(self, app_port: int, headers: dict[str, list[str]]) -> Route | None:
        return next((r for r in self.routes.get(app_port, []) if r.matches(headers)), None)

    def describe(self) -> list[dict[str, object]]:
        return [
            {"port": r.app_port, "who": r.who, "headers": [[h.name, h.value, h.regex] for h in r.headers]}
            for routes in self.routes.values()
            for r in routes
        ]  # fmt: skip


# ---- HTTP/1.1 framing ----------------------------------------------------------------------------


class NotHttp(Exception):
    """The bytes are not an HTTP/1.x message we can route."""


@dataclass
class Head:
    """A request or response head: the raw bytes (relayed as they are) and what routing needs."""

    raw: bytes
    first: str
    headers: dict[str, list[str]]

    def values(self, name: str) -> list[str]:
        return self.headers.get(name, [])

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.values(name) for t in v.split(",") if t.strip()}

    @property
    def chunked(self) -> bool:
        return "chunked" in self.tokens("transfer-encoding")

    @property
    def length(self) -> int | None:
        values = self.values("content-length")
        if not values:
            return None
        try:
            return int(values[0])
        except ValueError:
            raise NotHttp("bad Content-Length") from None


def parse_head(raw: bytes) -> Head:
    """Parse a head (through the blank line); raise :class:`NotHttp` if it is not one."""
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise NotHttp("undecodable") from None
    lines = text.split("\r\n")
    first = lines[0]
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise NotHttp(f"bad header line {line[:40]!r}")
        headers.setdefault(name.lower(), []).append(value.strip())
    return Head(raw, first, headers)


async def read_head(reader: asyncio.StreamReader) -> Head | None:
    """The next head, or ``None`` at a clean end of the stream before one starts."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise NotHttp("the stream ended inside a head") from None
    except asyncio.LimitOverrunError:
        raise NotHttp("head too large") from None
    return parse_head(raw)


async def relay_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    chunked: bool,
    length: int | None,
    until_eof: bool = False,
) -> None:
    """Copy one message body as it is framed (bytes intact), streaming."""
    if chunked:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            writer.write(size_line)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise NotHttp("bad chunk size") from None
            if size == 0:
                # Trailers, then the blank line.
                while True:
                    line = await reader.readuntil(b"\r\n")
                    writer.write(line)
                    if line == b"\r\n":
                        break
                await writer.drain()
                return
            await _copy_exactly(reader, writer, size + 2)  # the data and its CRLF
    elif length is not None:
        await _copy_exactly(reader, writer, length)
    elif until_eof:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()


async def _copy_exactly(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while n > 0:
        data = await reader.read(min(n, CHUNK))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        writer.write(data)
        n -= len(data)
        await writer.drain()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Copy bytes until EOF, then pass the EOF on (half-close); ``False`` if a side broke."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        return False
    return True


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Bytes both ways until both directions end; a reset on one side ends both (the other
    side would otherwise wait forever for bytes that cannot come)."""
    forth = asyncio.create_task(pipe(a[0], b[1]))
    back = asyncio.create_task(pipe(b[0], a[1]))
    try:
        for done in asyncio.as_completed((forth, back)):
            if not await done:
                break
    finally:
        for task in (forth, back):
            task.cancel()
        await asyncio.gather(forth, back, return_exceptions=True)


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.close()


def bad_gateway(text: str) -> bytes:
    body = (text + "\n").encode()
    return (
        b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"x-tpconf: intercept\r\nconnection: close\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


# ---- the router ----------------------------------------------------------------------------------


Connector = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port, limit=MAX_HEAD)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


class Router:
    """The listeners of the intercepted ports and the route table they share."""

    def __init__(
        self, ports: dict[int, int], *, app_host: str = "127.0.0.1", connect: Connector = _connect
    ) -> None:
        self.ports = ports
        """App (container) port -> the agent's own port."""
        self.app_host = app_host
        self.table = Table()
        self._connect = connect
        self._servers: list[asyncio.AbstractServer] = []
        self._sessions = 0
        self.active: set[asyncio.Task[object]] = set()
        """The connections being served (drained at shutdown)."""

    async def start(self, host: str = "0.0.0.0") -> None:
        """Listen on every agent port (all interfaces: the Services send traffic here)."""
        for app_port, agent_port in self.ports.items():
            server = await asyncio.start_server(
                self._handler(app_port), host, agent_port, limit=MAX_HEAD, reuse_address=True
            )
            self._servers.append(server)

    def _handler(
        self, app_port: int
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.active.add(task)
            try:
                await self.serve_connection(reader, writer, app_port)
            finally:
                self.active.discard(task)

        return handle

    def close(self) -> None:
        """Stop accepting connections (those open go on: :meth:`drain`)."""
        for server in self._servers:
            server.close()

    async def drain(self, timeout: float) -> None:
        """Let open connections finish for up to ``timeout`` seconds, then cut the rest."""
        if self.active:
            await asyncio.wait(set(self.active), timeout=timeout)
        for task in set(self.active):
            task.cancel()
        if self.active:
            await asyncio.wait(set(self.active))

    # -- one client connection ---------------------------------------------------------------------

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, app_port: int
    ) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            everything = self.table.everything(app_port)
            if everything is not None:
                await self._bytes_to(reader, writer, everything.target, first=b"", route=everything)
                return
            app = (self.app_host, app_port)
            try:
                async with asyncio.timeout(FIRST_BYTES_WAIT):  # no task, unlike wait_for
                    first = await reader.read(8)
            except TimeoutError:
                await self._bytes_to(reader, writer, app, first=b"")
                return
            if not first:
                return
            if not first.startswith(_HTTP_PREFIXES) and not any(
                p.startswith(first) for p in _HTTP_PREFIXES
            ):
                await self._bytes_to(reader, writer, app, first=first)
                return
            await HttpSession(self, reader, writer, app_port, first).run()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("intercept: connection failed")
        finally:
            _close(writer)

    async def _bytes_to(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        target: tuple[str, int],
        *,
        first: bytes,
        route: Route | None = None,
    ) -> None:
        try:
            up_reader, up_writer = await self._connect(*target)
        except OSError as exc:
            log.info("intercept: %s:%d unreachable: %s", *target, exc)
            return
        try:
            if first:
                up_writer.write(first)
            await splice((reader, writer), (up_reader, up_writer))
        finally:
            _close(up_writer)

    # -- the control socket ------------------------------------------------------------------------

    async def serve_control(self, path: str) -> asyncio.AbstractServer:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o077)
        try:
            server = await asyncio.start_unix_server(self._control, path)
        finally:
            os.umask(old)
        return server

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._sessions += 1
        session = self._sessions
        try:
            while line := await reader.readline():
                writer.write(json.dumps(self.handle(session, line)).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # The developer is gone (or their SSH connection is): the app gets its traffic back.
            self.table.remove(session)
            _close(writer)

    def handle(self, session: int, line: bytes) -> dict[str, object]:
        """One control request: ``route``, ``unroute`` or ``status``."""
        try:
            request = json.loads(line)
            op = request.get("op")
            if op == "route":
                app_port = int(request["port"])
                if app_port not in self.ports:
                    known = ", ".join(str(p) for p in sorted(self.ports)) or "none"
                    return {"error": f"port {app_port} is not intercepted (intercepted: {known})"}
                host, port = request["target"]
                route = Route(
                    app_port=app_port,
                    target=(str(host), int(port)),
                    headers=tuple(
                        HeaderRule(str(n).lower(), str(v), bool(r))
                        for n, v, r in request["headers"]
                    ),
                    who=str(request.get("who", "someone")),
                    session=session,
                )
                self.table.set(route)
                return {"ok": True}
            if op == "unroute":
                self.table.remove(session, int(request["port"]))
                return {"ok": True}
            if op == "status":
                return {"ok": True, "ports": self.ports, "routes": self.table.describe()}
            return {"error": f"unknown op {op!r}"}
        except RouteError as exc:
            return {"error": str(exc)}
        except (ValueError, KeyError, TypeError, re.error) as exc:
            return {"error": f"bad request: {exc}"}


class HttpSession:
    """One client connection speaking HTTP/1.x: each request goes where its headers say."""

    def __init__(
        self,
        router: Router,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        app_port: int,
        first: bytes,
    ) -> None:
        self.router = router
        self.reader = reader
        self.writer = writer
        self.app_port = app_port
        self.first = first
        self.upstreams: dict[
            tuple[str, int], tuple[asyncio.StreamReader, asyncio.StreamWriter]
        ] = {}

    async def run(self) -> None:
        try:
            await self._loop()
        finally:
            for _, up_writer in self.upstreams.values():
                _close(up_writer)

    async def _first_head(self) -> Head | bytes:
        """The first request's head, or the bytes read so far when it is not HTTP we route."""
        raw = self.first
        try:
            raw += await self.reader.readuntil(b"\r\n\r\n")
            head = parse_head(raw)
        except asyncio.IncompleteReadError as exc:
            return raw + exc.partial
        except (asyncio.LimitOverrunError, NotHttp):
            return raw  # a LimitOverrunError leaves the bytes in the reader
        return head if _METHOD.match(head.raw) else raw

    async def _loop(self) -> None:
        app = (self.router.app_host, self.app_port)
        first = await self._first_head()
        if isinstance(first, bytes):
            await self.router._bytes_to(self.reader, self.writer, app, first=first)
            return
        request: Head | None = first
        while request is not None:
            route = self.router.table.match(self.app_port, request.headers)
            target = route.target if route is not None else app
            if not await self._route(request, target, route):
                return
            try:
                request = await read_head(self.reader)
            except NotHttp:
                return
            if request is not None and not _METHOD.match(request.raw):
                return

    async def _route(self, request: Head, target: tuple[str, int], route: Route | None) -> bool:
        """Send one request where it goes; whether the connection can carry another."""
        reused = target in self.upstreams
        upstream = await self._upstream(target)
        if upstream is not None:
            keep = await self._exchange(request, target, upstream, route, retry=reused)
            if keep is not None:
                return keep
            # The kept-alive upstream had closed meanwhile; a request without a body can
            # be sent again on a new connection, as HTTP clients themselves do.
            upstream = await self._upstream(target)
            if upstream is not None:
                return bool(await self._exchange(request, target, upstream, route, retry=False))
        if route is not None:
            self.writer.write(
                bad_gateway(
                    f"tpconf: this request matched the intercept of {route.who}, "
                    "whose tpconf is not reachable"
                )
            )
            await self.writer.drain()
        return False

    async def _upstream(
        self, target: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        current = self.upstreams.get(target)
        if current is not None and not current[0].at_eof() and not current[1].is_closing():
            return current
        self._forget(target)  # closed by the other side while idle
        try:
            async with asyncio.timeout(TARGET_CONNECT_TIMEOUT):
                current = await self.router._connect(*target)
        except (OSError, TimeoutError) as exc:
            log.info("intercept: %s:%d unreachable: %s", *target, exc)
            return None
        self.upstreams[target] = current
        return current

    async def _exchange(
        self,
        request: Head,
        target: tuple[str, int],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        route: Route | None,
        *,
        retry: bool,
    ) -> bool | None:
        """One request and its response; whether the client connection can carry another.

        ``None``: a kept-alive upstream had closed before the request reached it, and the
        request (it has no body) may be sent again (``retry``).
        """
        up_reader, up_writer = upstream
        method = request.first.split(" ", 1)[0]
        has_body = request.chunked or bool(request.length)
        up_writer.write(request.raw)
        # The body streams while the response is read (100-continue, early answers); most
        # requests have none, and need no task for it.
        body = (
            asyncio.create_task(
                relay_body(self.reader, up_writer, chunked=request.chunked, length=request.length)
            )
            if has_body
            else None
        )
        try:
            while True:
                try:
                    response = await read_head(up_reader)
                except (NotHttp, ConnectionError):
                    response = None
                if response is None:
                    self._forget(target)
                    if retry and not has_body:
                        return None
                    if route is not None:
                        # Nothing answers on the developer's side (their local port is closed).
                        self.writer.write(
                            bad_gateway(
                                f"tpconf: this request matched the intercept of {route.who}, "
                                "but nothing is listening on their machine"
                            )
                        )
                        await self.writer.drain()
                    return False
                status = _status(response)
                self.writer.write(response.raw)
                if 100 <= status < 200 and status != 101:
                    await self.writer.drain()
                    continue  # 100 Continue, 103 Early Hints: the final response follows
                break
            if status == 101 or (method == "CONNECT" and 200 <= status < 300):
                # An accepted Upgrade (WebSocket) or tunnel: the rest of the connection is bytes.
                await self.writer.drain()
                if body is not None:
                    await body
                await splice((self.reader, self.writer), upstream)
                self._forget(target)
                return False
            no_body = method == "HEAD" or status in (204, 304)
            length = None if no_body else response.length
            until_eof = not no_body and not response.chunked and length is None
            await relay_body(
                up_reader,
                self.writer,
                chunked=not no_body and response.chunked,
                length=length,
                until_eof=until_eof,
            )
            await self.writer.drain()
            if body is not None:
                await body
        finally:
            if body is not None and not body.done():
                body.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await body
        closing = (
            until_eof
            or "close" in response.tokens("connection")
            or "close" in request.tokens("connection")
            or request.first.endswith("HTTP/1.0")
            and "keep-alive" not in request.tokens("connection")
        )
        if closing:
            self._forget(target)
        return not closing

    def _forget(self, target: tuple[str, int]) -> None:
        current = self.upstreams.pop(target, None)
        if current is not None:
            _close(current[1])


def _status(head: Head) -> int:
    parts = head.first.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise NotHttp(f"bad status line {head.first[:40]!r}")
    try:
        return int(parts[1])
    except ValueError:
        raise NotHttp("bad status code") from None
