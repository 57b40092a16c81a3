"""The API server as ``kubectl port-forward`` reaches it, for the in-process port-forward.

:func:`api_server` reads the kubeconfig once per kubeconfig and context as kubectl would
(:func:`tpconf.kubeconfig.minified_view`: kubectl's merge of a ``$KUBECONFIG`` list, its choice
of context, files inlined), and turns it into an :class:`ApiServer`: where to connect, the TLS
context (the cluster's CA, a client certificate), and the ``Authorization`` header (a token, a
token file read per connection, or an ``exec`` credential plugin run as kubectl runs it, its
answer kept until it expires).

Settings this module does not handle return ``None`` with the reason logged, and the caller
falls back to a ``kubectl port-forward`` child, which handles everything kubectl does: an
``auth-provider`` user, basic auth, a ``proxy-url`` or ``$HTTPS_PROXY``, an exec plugin that
must talk to the terminal.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import ssl
import subprocess
import urllib.parse
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from tpconf.errors import TunnelDown
from tpconf.kubeconfig import (
    KubeconfigError,
    Unsupported,
    files_of,
    minified_view,
    parts,
    refuse_foreign_user,
    server_url,
    tls_context,
)
from tpconf.tunnel.spdy import PortForwardError, SpdyConnection, upgrade_request

log = logging.getLogger(__name__)

#: Seconds before an exec credential's expiry at which it is fetched again.
EXEC_MARGIN = 60.0


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


def from_config_view(view: dict[str, Any]) -> ApiServer:
    """An :class:`ApiServer` from a minified, flattened kubeconfig view (what
    :func:`~tpconf.kubeconfig.minified_view` returns, and ``kubectl config view --minify
    --flatten --raw -o json`` prints).

    Raises :class:`Unsupported` for settings that need kubectl itself.
    """
    _, cluster, user = parts(view)
    if not cluster:
        raise Unsupported("no cluster in the kubeconfig's current context")
    refuse_foreign_user(user)
    url = server_url(cluster)
    assert url.hostname is not None  # server_url checked it
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
    tls = tls_context(cluster, user) if url.scheme == "https" else None
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


_CACHE: dict[tuple[str | None, str | None], ApiServer | None] = {}
#: One lock per event loop (an asyncio lock belongs to the loop it first waited in).
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def api_server(kubeconfig: str | None, context: str | None) -> ApiServer | None:
    """The API server kubectl would port-forward through, or ``None`` when only kubectl itself
    can (the reason is logged). Read once per process for each kubeconfig and context."""
    key = (kubeconfig, context)
    if key in _CACHE:
        return _CACHE[key]
    lock = _LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:
        if key in _CACHE:
            return _CACHE[key]
        server: ApiServer | None = None
        try:
            # A worker thread: the CA and client certificate are read and parsed here.
            view = await anyio.to_thread.run_sync(minified_view, files_of(kubeconfig), context)
            server = from_config_view(view)
        except (Unsupported, KubeconfigError, OSError, ValueError, ssl.SSLError) as exc:
            log.info("port-forward goes through kubectl: %s", exc)
        _CACHE[key] = server
        return server
