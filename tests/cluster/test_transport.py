"""How requests reach the API server (tpconf.cluster.transport), against a real local HTTP server:
urllib3 directly for the kubeconfigs it handles, the kubernetes library for the others."""

from __future__ import annotations

import json
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from tests.conftest import E2ECluster
from tpconf import errors
from tpconf.cluster import connect
from tpconf.cluster.client import path
from tpconf.cluster.transport import Direct, Library


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeApiServer:
    """A real HTTP server on loopback that records requests and answers from a table."""

    url: str
    seen: list[Seen] = field(default_factory=list)
    answers: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    record = FakeApiServer(url="")

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}  # case is not significant
            record.seen.append(Seen(self.command, self.path, headers, body))
            status, payload = record.answers.get(self.path.split("?")[0], (200, {"kind": "Ok"}))
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    record.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield record
    server.shutdown()
    server.server_close()


def _kubeconfig(tmp_path: Path, server: str, user: dict[str, Any]) -> str:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "here",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "here", "context": {"cluster": "c", "user": "u", "namespace": "ns"}}],
    }
    out = tmp_path / "kubeconfig"
    out.write_text(yaml.safe_dump(config))
    return str(out)


@pytest.mark.anyio
async def test_a_token_user_goes_direct_with_its_token_query_and_json_body(
    api: FakeApiServer, tmp_path: Path
) -> None:
    cluster = connect(kubeconfig=_kubeconfig(tmp_path, api.url, {"token": "s3cret"}))
    try:
        assert isinstance(cluster.transport, Direct)
        assert (cluster.namespace, cluster.context, cluster.server) == ("ns", "here", api.url)
        with anyio.fail_after(10):
            answer = await cluster.request(
                "PATCH",
                path("deployments", "ns", "web"),
                what="patch",
                query={"dryRun": "All", "force": True},
                body={"spec": {"replicas": 0}},
                content_type="application/merge-patch+json",
            )
        assert answer == {"kind": "Ok"}
        seen = api.seen[-1]
        assert seen.method == "PATCH"
        assert seen.path == "/apis/apps/v1/namespaces/ns/deployments/web?dryRun=All&force=true"
        assert seen.headers["authorization"] == "Bearer s3cret"
        assert seen.headers["content-type"] == "application/merge-patch+json"
        assert seen.headers["accept"] == "application/json"
        assert json.loads(seen.body) == {"spec": {"replicas": 0}}
    finally:
        cluster.close()


@pytest.mark.anyio
async def test_a_token_file_is_read_for_every_request(api: FakeApiServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    cluster = connect(kubeconfig=_kubeconfig(tmp_path, api.url, {"tokenFile": "token"}))
    try:
        with anyio.fail_after(10):
            await cluster.request("GET", path("pods", "ns"), what="list pods")
            token.write_text("rotated\n")  # a projected token is replaced in place
            await cluster.request("GET", path("pods", "ns"), what="list pods")
        assert [s.headers["authorization"] for s in api.seen] == [
            "Bearer first",
            "Bearer rotated",
        ]
        token.unlink()
        with anyio.fail_after(10), pytest.raises(errors.ClusterError) as gone:
            await cluster.request("GET", path("pods", "ns"), what="list pods")
        assert gone.value.message == (
            f"cannot read the kubeconfig's token file {token}: No such file or directory"
        )
    finally:
        cluster.close()


@pytest.mark.anyio
async def test_an_error_status_is_translated_with_the_servers_message(
    api: FakeApiServer, tmp_path: Path
) -> None:
    api.answers["/api/v1/namespaces/ns/pods/gone"] = (
        404,
        {"kind": "Status", "message": 'pods "gone" not found', "reason": "NotFound", "code": 404},
    )
    api.answers["/api/v1/namespaces/ns/secrets"] = (
        422,
        {"kind": "Status", "message": "data[key]: Invalid value: s3cret-bytes", "code": 422},
    )
    cluster = connect(kubeconfig=_kubeconfig(tmp_path, api.url, {"token": "t"}))
    try:
        with anyio.fail_after(10), pytest.raises(errors.NotFound) as missing:
            await cluster.request("GET", path("pods", "ns", "gone"), what='get pod "gone"')
        assert missing.value.message == 'cannot get pod "gone": not found'
        with anyio.fail_after(10), pytest.raises(errors.ClusterError) as invalid:
            await cluster.request(
                "POST", path("secrets", "ns"), what="create Secret", body={}, sensitive=True
            )
        assert invalid.value.message == "cannot create Secret: 422 Unprocessable Entity"
    finally:
        cluster.close()


@pytest.mark.anyio
async def test_an_exec_plugin_user_goes_through_the_kubernetes_library(
    api: FakeApiServer, tmp_path: Path
) -> None:
    plugin = tmp_path / "get-token"
    plugin.write_text(
        "#!/bin/sh\n"
        'echo \'{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",'
        ' "status": {"token": "from-plugin"}}\'\n'
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": str(plugin),
            "interactiveMode": "Never",
        }
    }
    cluster = connect(kubeconfig=_kubeconfig(tmp_path, api.url, user))
    try:
        assert isinstance(cluster.transport, Library)
        with anyio.fail_after(20):
            await cluster.request("GET", path("pods", "ns"), what="list pods", query={"limit": 1})
        assert api.seen[-1].headers["authorization"] == "Bearer from-plugin"
        assert api.seen[-1].path == "/api/v1/namespaces/ns/pods?limit=1"
    finally:
        cluster.close()


def _variant(tmp_path: Path, kubeconfig: str, change: dict[str, Any], drop: str = "") -> str:
    """A copy of ``kubeconfig`` with its cluster's settings changed."""
    data = yaml.safe_load(Path(kubeconfig).read_text())
    cluster = data["clusters"][0]["cluster"]
    cluster.pop(drop, None)
    cluster.update(change)
    out = tmp_path / f"variant-{len(list(tmp_path.iterdir()))}"
    out.write_text(yaml.safe_dump(data))
    return str(out)


@pytest.mark.e2e
@pytest.mark.anyio
async def test_tls_settings_of_the_kubeconfig_are_honoured_against_the_real_api_server(
    cluster: E2ECluster, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    ca = "certificate-authority-data"
    cases: dict[str, tuple[dict[str, Any], str, bool]] = {
        "as it is": ({}, "", True),
        "the server's name": ({"tls-server-name": "kubernetes"}, "", True),
        "another name": ({"tls-server-name": "wrong.example"}, "", False),
        "no CA": ({}, ca, False),  # the system's CAs do not know the cluster's
        "insecure": ({"insecure-skip-tls-verify": True}, ca, True),
    }
    for name, (change, drop, works) in cases.items():
        client = connect(kubeconfig=_variant(tmp_path, cluster.kubeconfig, change, drop))
        try:
            assert isinstance(client.transport, Direct)
            with anyio.fail_after(30):
                if works:
                    answer = await client.request("GET", "/api/v1/namespaces/default", what="get")
                    assert answer["metadata"]["name"] == "default", name
                else:
                    with pytest.raises(errors.ClusterUnreachable, match="CERTIFICATE_VERIFY"):
                        await client.request("GET", "/api/v1/namespaces/default", what="get")
        finally:
            client.close()
    assert not [w for w in recwarn if "Unverified HTTPS" in str(w.message)]


def test_a_kubeconfig_without_the_context_is_a_clear_error(tmp_path: Path) -> None:
    config = _kubeconfig(tmp_path, "https://127.0.0.1:1", {"token": "t"})
    with pytest.raises(errors.ClusterError) as info:
        connect(kubeconfig=config, context="prod")
    assert info.value.message == (
        f"cannot load the kubeconfig {config} (context prod): no context 'prod' (contexts: here)"
    )
    assert info.value.hint is not None and "kubectl config current-context" in info.value.hint
