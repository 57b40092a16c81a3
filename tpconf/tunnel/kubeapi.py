"""The API server as ``kubectl port-forward`` reaches it, for the in-process port-forward.

:func:`api_server` asks kubectl once per kubeconfig and context for the settings it would use
(``kubectl config view --minify --flatten --raw -o json``: kubectl's own merge of a
``$KUBECONFIG`` list, its choice of context, files inlined), and turns them into an
:class:`ApiServer`: where to connect, the TLS context (the cluster's CA, a client certificate),
and the ``Authorization`` header (a token, a token file read per connection, or an ``exec``
credential plugin run as kubectl runs it, its answer kept until it expires).

Settings this module does not handle return ``None`` with the reason logged, and the caller
falls back to a ``kubectl port-forward`` child, which handles everything kubectl does: an
``auth-provider`` user, basic auth, a ``proxy-url`` or ``$HTTPS_PROXY``, an exec plugin that
must talk to the terminal.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import os
import ssl
import subprocess
import tempfile
import urllib.parse
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from tpconf.errors import TunnelDown
from tpconf.tunnel.spdy import PortForwardError, SpdyConnection, upgrade_request

log = logging.getLogger(__name__)

#: Seconds before an exec credential's expiry at which it is fetched again.
EXEC_MARGIN = 60.0


class Unsupported(Exception):
    """These settings need kubectl itself (the message says which)."""


@dataclass
class ExecPlugin:
    """A ``users[].user.exec`` entry: a command that prints an ``ExecCredential``."""

    command: str
    args: list[str]
    env: dict[str, str]
    api_version: str
    token: str = ""
    expires: float = 0.0
    """``time.time()`` when :attr:`token` stops being valid (0: never fetched; inf: no expiry)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def current(self) -> str:
        async with self.lock:
            import time

            if self.token and time.time() < self.expires - EXEC_MARGIN:
                return self.token
            info = {
                "apiVersion": self.api_version,
                "kind": "ExecCredential",
                "spec": {"interactive": False},
            }
            env = {**os.environ, **self.env, "KUBERNETES_EXEC_INFO": json.dumps(info)}
            result = await anyio.run_process(
                [self.command, *self.args], env=env, stdin=subprocess.DEVNULL, check=False
            )
            if result.returncode:
                raise TunnelDown(
                    f"the kubeconfig's credential plugin {self.command!r} failed"
                    f" ({result.returncode}): {result.stderr.decode(errors='replace')[-300:]}",
                    hint="run `kubectl get pods` to see it work (or fail) with the same kubeconfig",
                )
            status = json.loads(result.stdout).get("status") or {}
            token = status.get("token")
            if not token:
                raise TunnelDown(
                    f"the credential plugin {self.command!r} gave no token (client certificates"
                    " from plugins go through kubectl)"
                )
            self.token = str(token)
            self.expires = _expiry(status.get("expirationTimestamp"))
            return self.token


def _expiry(stamp: object) -> float:
    if not isinstance(stamp, str) or not stamp:
        return float("inf")
    try:
        return datetime.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0  # unreadable: ask again next time


@dataclass
class ApiServer:
    """How to open an authenticated connection to the API server."""

    host: str
    port: int
    prefix: str
    """The server URL's path (a proxy in front of the API server may put the cluster under one)."""
    tls: ssl.SSLContext | None
    server_name: str | None
    token: str = ""
    token_file: str = ""
    plugin: ExecPlugin | None = None

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    async def headers(self) -> dict[str, str]:
        token = self.token
        if self.token_file:
            token = (await anyio.Path(self.token_file).read_text()).strip()
        elif self.plugin is not None:
            token = await self.plugin.current()
        return {"Authorization": f"Bearer {token}"} if token else {}

    @asynccontextmanager
    async def port_forward(
        self, namespace: str, pod: str, *, timeout: float = 20.0
    ) -> AsyncIterator[SpdyConnection]:
        """An upgraded port-forward connection to ``pod`` (within ``timeout`` seconds); closed
        on exit."""
        quote = urllib.parse.quote
        path = f"{self.prefix}/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(pod, safe='')}/portforward"
        host_header = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        request = upgrade_request(host_header, path, await self.headers())
        loop = asyncio.get_running_loop()
        conn = SpdyConnection(request, where=f"pod/{pod} via {self.where}")
        try:
            with anyio.fail_after(timeout):
                transport, _ = await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.server_name if self.tls is not None else None,
                )
                try:
                    await conn.upgraded
                except BaseException:
                    transport.abort()
                    raise
        except TimeoutError as exc:
            raise PortForwardError(
                f"no port-forward to pod/{pod} within {timeout:g} s ({self.where})"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise PortForwardError(
                f"cannot reach the API server at {self.where} for port-forward: {exc}"
            ) from exc
        try:
            yield conn
        finally:
            transport.close()


def _tls_context(cluster: dict[str, Any], user: dict[str, Any]) -> ssl.SSLContext:
    """The TLS settings kubectl would use: the cluster's CA alone when it names one (as
    client-go does; the system's CAs are loaded only without one, which also spares reading
    the system bundle, a third of a second of the start on a busy machine), a client
    certificate when the user has one."""
    authority = cluster.get("certificate-authority-data")
    if cluster.get("insecure-skip-tls-verify"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif authority:
        ctx = ssl.create_default_context(cadata=base64.b64decode(authority).decode())
    else:
        ctx = ssl.create_default_context()
    cert, key = user.get("client-certificate-data"), user.get("client-key-data")
    if cert and key:
        # load_cert_chain reads files only: a private file, removed as soon as it is read.
        with tempfile.TemporaryDirectory(prefix="tpconf-") as tmp:
            path = os.path.join(tmp, "client.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(cert) + b"\n" + base64.b64decode(key))
            ctx.load_cert_chain(path)
    elif cert or key:
        raise Unsupported("a client certificate without its key")
    return ctx


def _proxied(host: str) -> bool:
    if not (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")):
        return False
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    for entry in (e.strip() for e in no_proxy.split(",")):
        if (
            entry == "*"
            or entry
            and (host == entry.lstrip(".") or host.endswith("." + entry.lstrip(".")))
        ):
            return False
    return True


def from_config_view(view: dict[str, Any]) -> ApiServer:
    """An :class:`ApiServer` from ``kubectl config view --minify --flatten --raw -o json``.

    Raises :class:`Unsupported` for settings that need kubectl itself.
    """
    clusters, users = view.get("clusters") or [], view.get("users") or []
    if not clusters:
        raise Unsupported("no cluster in the kubeconfig's current context")
    cluster = clusters[0].get("cluster") or {}
    user = (users[0].get("user") or {}) if users else {}
    if cluster.get("proxy-url"):
        raise Unsupported("a proxy-url")
    for key in ("auth-provider", "username", "password", "as", "as-groups", "as-uid"):
        if user.get(key):
            raise Unsupported(f"users[].user.{key}")
    url = urllib.parse.urlsplit(str(cluster.get("server") or ""))
    if url.scheme not in ("https", "http") or not url.hostname:
        raise Unsupported(f"a server URL of {cluster.get('server')!r}")
    if _proxied(url.hostname):
        raise Unsupported("$HTTPS_PROXY")
    plugin = None
    if user.get("exec"):
        spec = user["exec"]
        if spec.get("interactiveMode") == "Always":
            raise Unsupported("an exec plugin that needs the terminal")
        plugin = ExecPlugin(
            command=str(spec.get("command")),
            args=[str(a) for a in spec.get("args") or []],
            env={str(e["name"]): str(e["value"]) for e in spec.get("env") or []},
            api_version=str(spec.get("apiVersion") or "client.authentication.k8s.io/v1"),
        )
    tls = _tls_context(cluster, user) if url.scheme == "https" else None
    return ApiServer(
        host=url.hostname,
        port=url.port or (443 if url.scheme == "https" else 80),
        prefix=url.path.rstrip("/"),
        tls=tls,
        server_name=cluster.get("tls-server-name") or url.hostname,
        token=str(user.get("token") or ""),
        token_file=str(user.get("tokenFile") or ""),
        plugin=plugin,
    )


_CACHE: dict[tuple[str, str | None, str | None], ApiServer | None] = {}
#: One lock per event loop (an asyncio lock belongs to the loop it first waited in).
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def api_server(kubectl: str, kubeconfig: str | None, context: str | None) -> ApiServer | None:
    """The API server kubectl would port-forward through, or ``None`` when only kubectl itself
    can (the reason is logged). Asked once per process for each kubeconfig and context."""
    key = (kubectl, kubeconfig, context)
    if key in _CACHE:
        return _CACHE[key]
    lock = _LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:
        if key in _CACHE:
            return _CACHE[key]
        cmd = [kubectl, "config", "view", "--minify", "--flatten", "--raw", "-o", "json"]
        if context:
            cmd += ["--context", context]
        env = {**os.environ, "KUBECONFIG": kubeconfig} if kubeconfig else None
        server: ApiServer | None = None
        try:
            result = await anyio.run_process(cmd, env=env, stdin=subprocess.DEVNULL, check=False)
            if result.returncode:
                raise Unsupported(result.stderr.decode(errors="replace").strip()[-300:])
            server = from_config_view(json.loads(result.stdout))
        except (Unsupported, OSError, ValueError, ssl.SSLError) as exc:
            log.info("port-forward goes through kubectl: %s", exc)
        _CACHE[key] = server
        return server
