"""The connection to one cluster: a transport plus the namespace of the context.

Requests are plain JSON in and out (``kubectl get -o json`` shapes, camelCase), not the
``kubernetes`` library's generated model classes: those reject fields they do not know, and a
swap must copy a pod template exactly, whatever the server version. The transport
(:mod:`tpconf.cluster.transport`) is urllib3 with the kubeconfig's credentials, or the
``kubernetes`` library's REST layer for the credentials only it handles.

Requests block, so every one runs in a worker thread (abandoned on cancellation) with a
timeout; watches also pass ``timeoutSeconds``. Errors are translated by
:mod:`tpconf.cluster.errors` at this boundary.

The kubeconfig is read as kubectl reads it (:mod:`tpconf.kubeconfig`): every file of
``$KUBECONFIG``, merged, the first file that names a context, cluster or user winning, and the
first ``current-context`` too; missing and empty files are left out. kubectl children get the
same list (``KUBECONFIG``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio

from tpconf import kubeconfig as kconf
from tpconf.cluster import errors as cerrors
from tpconf.cluster.transport import Direct, Library, Query, Transport

#: Seconds to connect and to read one response; watches add their own ``timeoutSeconds``.
REQUEST_TIMEOUT = (5.0, 30.0)
DEFAULT_KUBECONFIG = kconf.DEFAULT_FILE
MERGE_PATCH = "application/merge-patch+json"

JSON = dict[str, Any]


_GROUPS = {
    "deployments": "/apis/apps/v1",
    "replicasets": "/apis/apps/v1",
    "leases": "/apis/coordination.k8s.io/v1",
}


def path(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    """The REST path of a namespaced object or collection; ``kind`` is the plural resource.

    ``deployments`` live in ``apps/v1``, ``leases`` in ``coordination.k8s.io/v1``, everything
    else tpconf touches in the core ``v1``.
    """
    base = _GROUPS.get(kind, "/api/v1")
    out = f"{base}/namespaces/{quote(namespace, safe='')}/{kind}"
    if name is not None:
        out += "/" + quote(name, safe="")
    if sub is not None:
        out += "/" + sub
    return out


@dataclass
class Cluster:
    """A transport to the API server bound to a default namespace. Build it with
    :func:`connect`."""

    transport: Transport
    namespace: str = "default"
    request_timeout: tuple[float, float] = REQUEST_TIMEOUT
    context: str = ""
    """The kubeconfig context it was made from (``""``: not from a kubeconfig)."""

    @property
    def server(self) -> str:
        """The API server URL (for messages)."""
        return self.transport.server

    def _send(
        self,
        method: str,
        resource_path: str,
        *,
        query: Query | None,
        body: Any,
        content_type: str,
        timeout: float | tuple[float, float],
    ) -> Any:
        """One blocking request; returns the response (unread), raises ApiStatus."""
        return self.transport.send(
            method,
            resource_path,
            query=query,
            body=body,
            content_type=content_type,
            timeout=timeout,
        )

    async def request(
        self,
        method: str,
        resource_path: str,
        *,
        what: str,
        query: Query | None = None,
        body: Any = None,
        content_type: str = "application/json",
        sensitive: bool = False,
    ) -> JSON:
        """One JSON request in a worker thread, errors translated; returns the response JSON."""

        def run() -> JSON:
            with cerrors.mapped(what, sensitive=sensitive):
                raw = self._send(
                    method,
                    resource_path,
                    query=query,
                    body=body,
                    content_type=content_type,
                    timeout=self.request_timeout,
                ).data
            data: JSON = json.loads(raw) if raw else {}
            return data

        # A read may be abandoned on cancellation; a write may not: a scale-to-0 that lands after
        # a cancelled swap's restore would leave the Deployment at 0 with nothing to restore it.
        # Writes are bounded by the request timeout instead.
        return await anyio.to_thread.run_sync(run, abandon_on_cancel=method == "GET")

    async def text(self, resource_path: str, *, what: str, query: Query | None = None) -> str:
        """A GET whose answer is text (pod logs)."""

        def run() -> str:
            with cerrors.mapped(what):
                raw: bytes = self._send(
                    "GET",
                    resource_path,
                    query=query,
                    body=None,
                    content_type="",
                    timeout=self.request_timeout,
                ).data
            return raw.decode("utf-8", "replace")

        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)

    async def next_event(
        self,
        resource_path: str,
        *,
        what: str,
        resource_version: str,
        timeout: float,
        query: Query | None = None,
    ) -> JSON | None:
        """Watch a collection from ``resource_version``; the first event, or ``None`` on timeout.

        One event per request keeps this simple and cancellable: the thread returns within
        ``timeout`` (server side ``timeoutSeconds``, client side the read timeout).
        """
        seconds = max(1, int(timeout))
        params: dict[str, str | int | bool] = {
            **(query or {}),
            "watch": True,
            "resourceVersion": resource_version,
            "timeoutSeconds": seconds,
            "allowWatchBookmarks": False,
        }

        def run() -> JSON | None:
            with cerrors.mapped(what):
                resp = self._send(
                    "GET",
                    resource_path,
                    query=params,
                    body=None,
                    content_type="",
                    timeout=(self.request_timeout[0], seconds + 5.0),
                )
                try:
                    buffer = b""
                    for chunk in resp.stream(4096, decode_content=False):
                        buffer += chunk
                        line, sep, _ = buffer.partition(b"\n")
                        if sep:
                            event: JSON = json.loads(line)
                            return event
                    return json.loads(buffer) if buffer.strip() else None
                finally:
                    resp.close()

        return await anyio.to_thread.run_sync(run, abandon_on_cancel=True)

    def close(self) -> None:
        """Close the connection pool."""
        self.transport.close()


def connect(
    kubeconfig: str | None = None,
    context: str | None = None,
    namespace: str | None = None,
) -> Cluster:
    """A :class:`Cluster` from the kubeconfig and a context (``None``: the current one).

    ``kubeconfig`` defaults to ``$KUBECONFIG`` (all its files, merged as kubectl merges them),
    then ``~/.kube/config``; ``namespace`` defaults to the context's namespace, then
    ``default``. Reads local files only: the first request is what finds out whether the API
    server is reachable.
    """
    files = kconf.files_of(kubeconfig)
    listing = kubeconfig or os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    source = os.pathsep.join(files) or listing
    if context:
        source += f" (context {context})"
    try:
        if not files:
            raise kconf.KubeconfigError(f"no kubeconfig file found ({listing})")
        view = kconf.minified_view(files, context)
        name = str(view["current-context"])
        transport: Transport
        try:
            transport = Direct.from_view(view)
        except kconf.Unsupported:
            transport = _library(os.pathsep.join(files), name, source)
    except kconf.KubeconfigError as exc:
        raise cerrors.translate_config(exc, source=source) from exc
    except (OSError, ValueError) as exc:  # a certificate that does not load, bad base64
        raise cerrors.translate_config(exc, source=source) from exc
    ctx_ns, _, _ = kconf.parts(view)
    return Cluster(
        transport=transport,
        namespace=namespace or ctx_ns.get("namespace") or "default",
        context=name,
    )


def _library(files: str, context: str, source: str) -> Library:
    """The ``kubernetes`` library's client, for a kubeconfig only it handles."""
    from kubernetes.config.config_exception import ConfigException

    try:
        return Library.from_files(files, context)
    except ConfigException as exc:
        raise cerrors.translate_config(exc, source=source) from exc


def from_token(
    server: str, token: str, *, ca_data: str | None, namespace: str, retries: int | None = None
) -> Cluster:
    """A :class:`Cluster` authenticating with a bearer token (e.g. a ServiceAccount's);
    ``ca_data`` is the cluster's CA, base64 PEM as in a kubeconfig; ``retries`` of a failed
    connection (``None``: urllib3's default)."""
    tls = None
    if server.startswith("https:"):
        tls = kconf.tls_context({"certificate-authority-data": ca_data}, {})
    return Cluster(
        transport=Direct(server, tls=tls, token=token, retries=retries), namespace=namespace
    )
