"""How the API client's requests reach the API server: :class:`Direct`, urllib3 with the
kubeconfig's credentials, or :class:`Library`, the ``kubernetes`` library's REST layer.

``Direct`` handles what most kubeconfigs hold (a bearer token, a token file, a client
certificate, the cluster's CA, ``insecure-skip-tls-verify``, ``tls-server-name``) and costs a
fifth of the ``kubernetes`` library's import, a third of a second of every ``tpconf up`` on a
laptop. Everything else (``exec`` and ``auth-provider`` plugins, basic auth, impersonation, a
proxy) goes through ``Library``, imported only then; both answer the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode

import urllib3

from tpconf import __version__
from tpconf.errors import ClusterError
from tpconf.kubeconfig import JSON, parts, refuse_foreign_user, server_url, tls_context

if TYPE_CHECKING:
    import ssl

    from kubernetes.client import ApiClient

Query = Mapping[str, str | int | bool]
Timeout = float | tuple[float, float]

#: Connections kept per API server. Requests run in worker threads, one per request in flight:
#: start-up and watches of 10 deployments use about 20 at once; more are opened and closed.
POOL_SIZE = 32


class ApiStatus(Exception):
    """An answer of the API server outside 2xx: its status, reason and body (a ``Status``)."""

    def __init__(self, status: int, reason: str, body: bytes) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.body = body

    @classmethod
    def of(cls, resp: urllib3.BaseHTTPResponse) -> ApiStatus:
        return cls(resp.status, str(resp.reason or ""), resp.data)


class Transport(Protocol):
    """Sends one request and returns the response unread (``.data``, ``.stream()``)."""

    server: str

    def send(
        self,
        method: str,
        path: str,
        *,
        query: Query | None,
        body: Any,
        content_type: str,
        timeout: Timeout,
    ) -> urllib3.BaseHTTPResponse: ...

    def close(self) -> None: ...


def _pairs(query: Query | None) -> list[tuple[str, str]]:
    """Query parameters as the API server reads them (booleans in lower case)."""
    return [
        (k, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in (query or {}).items()
    ]


def _headers(body: Any, content_type: str) -> dict[str, str]:
    """What every request says of itself: JSON back, and the body's type when it has one."""
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = content_type
    return headers


def _checked(resp: urllib3.BaseHTTPResponse) -> urllib3.BaseHTTPResponse:
    if not 200 <= resp.status <= 299:
        raise ApiStatus.of(resp)
    return resp


class Direct:
    """urllib3 to ``server`` with a bearer token (or a file read per request) and TLS."""

    def __init__(
        self,
        server: str,
        *,
        tls: ssl.SSLContext | None,
        server_name: str | None = None,
        verify: bool = True,
        token: str = "",
        token_file: str = "",
        retries: urllib3.Retry | int | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self._token, self._token_file = token, token_file
        options: dict[str, Any] = {"maxsize": POOL_SIZE, "block": False}
        if retries is not None:
            options["retries"] = retries
        if tls is not None:
            options["ssl_context"] = tls
            options["cert_reqs"] = "CERT_REQUIRED" if verify else "CERT_NONE"
            if not verify:
                options["assert_hostname"] = False
                # The kubeconfig asks for it (as kubectl, which does not warn per request).
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            elif server_name:
                options["server_hostname"] = server_name
        self._pool = urllib3.connection_from_url(self.server, **options)

    @classmethod
    def from_view(cls, view: JSON) -> Direct:
        """From a minified kubeconfig view; :class:`~tpconf.kubeconfig.Unsupported` for what needs
        ``Library``."""
        _, cluster, user = parts(view)
        url = server_url(cluster)
        refuse_foreign_user(user, also=("exec", "as-user-extra"))
        return cls(
            url.geturl(),
            tls=tls_context(cluster, user) if url.scheme == "https" else None,
            server_name=cluster.get("tls-server-name") or None,
            verify=not cluster.get("insecure-skip-tls-verify"),
            token=str(user.get("token") or ""),
            token_file=str(user.get("tokenFile") or ""),
        )

    def _request_headers(self, body: Any, content_type: str) -> dict[str, str]:
        headers = {**_headers(body, content_type), "User-Agent": f"tpconf/{__version__}"}
        token = self._token
        if self._token_file:
            # Read per request, as client-go re-reads it: a projected token is rotated in place.
            try:
                with open(self._token_file, encoding="utf-8") as stream:
                    token = stream.read().strip()
            except OSError as exc:
                raise ClusterError(
                    f"cannot read the kubeconfig's token file {self._token_file}: "
                    f"{exc.strerror or exc}",
                    hint="check the user's `tokenFile` in the kubeconfig",
                ) from exc
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def send(
        self,
        method: str,
        path: str,
        *,
        query: Query | None,
        body: Any,
        content_type: str,
        timeout: Timeout,
    ) -> urllib3.BaseHTTPResponse:
        connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
        resp = self._pool.urlopen(
            method,
            path + ("?" + urlencode(_pairs(query)) if query else ""),
            body=None if body is None else json.dumps(body).encode(),
            headers=self._request_headers(body, content_type),
            timeout=urllib3.Timeout(connect=connect, read=read),
            preload_content=False,
            redirect=False,
        )
        return _checked(resp)

    def close(self) -> None:
        self._pool.close()


class Library:
    """The ``kubernetes`` library's authenticated REST layer, for kubeconfigs ``Direct`` does
    not handle."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api
        self.server = str(api.configuration.host)

    @classmethod
    def from_files(cls, files: str, context: str) -> Library:
        """A client from the ``:``-joined kubeconfig files and the context (imports the
        library; raises its ``ConfigException``)."""
        from kubernetes import config

        api = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=files, context=context, persist_config=False
        )
        return cls(api)

    def send(
        self,
        method: str,
        path: str,
        *,
        query: Query | None,
        body: Any,
        content_type: str,
        timeout: Timeout,
    ) -> urllib3.BaseHTTPResponse:
        from kubernetes.client.exceptions import ApiException

        method, url, headers, body, _ = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=_pairs(query) or None,
            header_params=_headers(body, content_type),
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            resp = self.api.rest_client.request(  # type: ignore[no-untyped-call]
                method, url, headers=headers, body=body, _request_timeout=timeout
            )
        except ApiException as exc:  # the library's own: a TLS failure (status 0)
            raise ApiStatus(int(exc.status or 0), str(exc.reason or ""), b"") from exc
        raw: urllib3.BaseHTTPResponse = resp.response
        return _checked(raw)

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]
