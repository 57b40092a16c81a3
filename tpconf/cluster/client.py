"""The connection to one cluster: an ``ApiClient`` plus the namespace of the context.

Requests are plain JSON in and out (``kubectl get -o json`` shapes, camelCase), sent through the
client's authenticated REST layer, not its generated model classes: those reject fields they do
not know, and a swap must copy a pod template exactly, whatever the server version.

The ``kubernetes`` client blocks, so every request runs in a worker thread (abandoned on
cancellation) with a ``_request_timeout``; watches also pass ``timeoutSeconds``. Errors are
translated by :mod:`tpconf.cluster.errors` at this boundary.

The kubeconfig is read as kubectl reads it (:func:`kubeconfig_files`): every file of
``$KUBECONFIG``, merged, the first file that names a context, cluster or user winning, and the
first ``current-context`` too (the client library alone would take the last one); missing and
empty files are left out. kubectl children get the same list (``KUBECONFIG``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from tpconf.cluster import errors as cerrors

#: Seconds to connect and to read one response; watches add their own ``timeoutSeconds``.
REQUEST_TIMEOUT = (5.0, 30.0)
DEFAULT_KUBECONFIG = "~/.kube/config"
MERGE_PATCH = "application/merge-patch+json"

JSON = dict[str, Any]
Query = Mapping[str, str | int | bool]


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
    """An API client bound to a default namespace. Build it with :func:`connect`."""

    api: k8s.ApiClient
    namespace: str = "default"
    request_timeout: tuple[float, float] = REQUEST_TIMEOUT
    context: str = ""
    """The kubeconfig context it was made from (``""``: not from a kubeconfig)."""

    @property
    def server(self) -> str:
        """The API server URL (for messages)."""
        return str(self.api.configuration.host)

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
        """One blocking request; returns the urllib3 response (unread), raises ApiException."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = [
            (k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in (query or {}).items()
        ]
        method, url, headers, body, _ = self.api.param_serialize(
            method=method,
            resource_path=resource_path,
            query_params=params or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.rest_client.request(  # type: ignore[no-untyped-call]
            method, url, headers=headers, body=body, _request_timeout=timeout
        )
        if not 200 <= resp.status <= 299:
            resp.read()
            raise ApiException(http_resp=resp)
        return resp.response

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
        self.api.close()  # type: ignore[no-untyped-call]


def kubeconfig_files(kubeconfig: str | None = None) -> list[str]:
    """The kubeconfig files kubectl would read, in order: ``kubeconfig`` (one path, or several
    joined by ``:``), else ``$KUBECONFIG``, else ``~/.kube/config``; only those that exist and
    are not empty (kubectl skips the others too)."""
    listing = kubeconfig or os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    found: list[str] = []
    for entry in listing.split(os.pathsep):
        path = os.path.expanduser(entry)
        if path and path not in found and os.path.isfile(path) and os.path.getsize(path):
            found.append(path)
    return found


def current_context(files: Sequence[str]) -> str | None:
    """The first ``current-context`` of ``files``, as kubectl picks it (``None``: none set)."""
    for path in files:
        try:
            with open(path, encoding="utf-8") as stream:
                data = yaml.safe_load(stream)
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue  # the client library reports what is wrong with it
        current = data.get("current-context") if isinstance(data, dict) else None
        if current:
            return str(current)
    return None


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
    files = kubeconfig_files(kubeconfig)
    listing = kubeconfig or os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    source = os.pathsep.join(files) or listing
    if context:
        source += f" (context {context})"
    try:
        if not files:
            raise ConfigException(f"no kubeconfig file found ({listing})")
        joined = os.pathsep.join(files)
        contexts, _ = k8s_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=joined
        )
        name = context or current_context(files)
        if name is None:
            raise ConfigException("no current-context is set and no context was named")
        matching = [c for c in contexts if c.get("name") == name]
        if not matching:
            names = ", ".join(sorted(str(c.get("name")) for c in contexts)) or "none"
            raise ConfigException(f"no context {name!r} (contexts: {names})")
        api = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=joined, context=name, persist_config=False
        )
    except ConfigException as exc:
        raise cerrors.translate_config(exc, source=source) from exc
    except OSError as exc:
        raise cerrors.translate_config(ConfigException(str(exc)), source=source) from exc
    ctx_ns = (matching[0].get("context") or {}).get("namespace")
    return Cluster(api=api, namespace=namespace or ctx_ns or "default", context=name)


def from_token(server: str, token: str, *, ca_file: str | None, namespace: str) -> Cluster:
    """A :class:`Cluster` authenticating with a bearer token (e.g. a ServiceAccount's)."""
    conf = k8s.Configuration(host=server)
    conf.api_key = {"BearerToken": token}
    conf.api_key_prefix = {"BearerToken": "Bearer"}
    if ca_file:
        conf.ssl_ca_cert = ca_file
    return Cluster(api=k8s.ApiClient(conf), namespace=namespace)
