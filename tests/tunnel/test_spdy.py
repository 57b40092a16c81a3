"""The in-process port-forward (tpconf.tunnel.spdy, .kubeapi) against a local SPDY peer that
answers as the API server and the runtime do (tests/tunnel/spdy_peer.py); the real cluster's is
in tests/e2e/test_tunnel.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from tpconf.errors import Forbidden
from tpconf.kubeconfig import Unsupported
from tpconf.tunnel import spdy
from tpconf.tunnel.kubeapi import ApiServer, from_config_view
from tpconf.tunnel.spdy import PortForwardError, SpdyConnection

from .peers import tcp_server
from .spdy_peer import SpdyPeer, spdy_peer

pytestmark = pytest.mark.anyio


class Collect(asyncio.Protocol):
    """A stream's protocol that keeps what arrives."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.error: BaseException | None = None

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof.set()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.error = exc
        self.lost.set()


def local_api(peer: SpdyPeer) -> ApiServer:
    return ApiServer(host="127.0.0.1", port=peer.port, prefix="/k8s", tls=None, server_name=None)


@asynccontextmanager
async def link(peer: SpdyPeer) -> AsyncIterator[SpdyConnection]:
    async with local_api(peer).port_forward("ns", "pod-1", timeout=5) as conn:
        yield conn


def test_the_header_dictionary_is_spdy3s() -> None:
    # SHA-256 of the 1423-byte dictionary of the SPDY/3 draft, section 2.6.10.1.
    assert len(spdy.DICTIONARY) == 1423
    digest = hashlib.sha256(spdy.DICTIONARY).hexdigest()
    assert digest == "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"


def test_header_blocks_round_trip_with_lower_case_names() -> None:
    block = spdy.encode_headers({"streamType": "data", "Port": "8022"})
    assert spdy.decode_headers(block) == {"streamtype": "data", "port": "8022"}


async def test_upgrade_asks_for_portforward_of_the_pod_with_the_servers_path() -> None:
    async with spdy_peer() as peer, link(peer):
        (request,) = peer.requests
        first, *headers = request.split("\r\n")
        assert first == "POST /k8s/api/v1/namespaces/ns/pods/pod-1/portforward HTTP/1.1"
        assert "Upgrade: SPDY/3.1" in headers
        assert "X-Stream-Protocol-Version: portforward.k8s.io" in headers


async def test_bytes_go_both_ways_and_half_close_survives() -> None:
    async with spdy_peer() as peer, tcp_server("reply-after-eof") as port, link(peer) as conn:
        stream, protocol = conn.open_port(port, Collect)
        assert isinstance(protocol, Collect)
        stream.write(b"hello ")
        stream.write(b"there")
        stream.write_eof()  # the server answers only after our EOF
        with anyio.fail_after(5):
            await protocol.eof.wait()
            await protocol.lost.wait()
        assert protocol.data == b"got HELLO THERE"
        assert protocol.error is None
        assert conn.stream_count == 0


async def test_a_refused_port_reaches_the_protocol_with_the_runtimes_words() -> None:
    async with spdy_peer() as peer, link(peer) as conn:
        _stream, protocol = conn.open_port(1, Collect)
        assert isinstance(protocol, Collect)
        _stream.write_eof()
        with anyio.fail_after(5):
            await protocol.lost.wait()
        assert isinstance(protocol.error, PortForwardError)
        assert "failed to connect to localhost:1" in str(protocol.error)


async def test_a_refused_upgrade_is_forbidden_with_the_rbac_hint() -> None:
    async with spdy_peer() as peer:
        peer.refuse = True
        with pytest.raises(Forbidden) as caught, anyio.fail_after(5):
            async with link(peer):
                pass
        assert "403 Forbidden" in caught.value.message
        assert caught.value.hint is not None and "pods/portforward" in caught.value.hint


async def test_a_large_write_leaves_in_frames_of_at_most_max_frame() -> None:
    size = spdy.MAX_FRAME * 2 + 5
    async with spdy_peer() as peer, tcp_server("sink") as port, link(peer) as conn:
        stream, protocol = conn.open_port(port, Collect)
        assert isinstance(protocol, Collect)
        stream.write(bytes(size))
        stream.write_eof()
        with anyio.fail_after(10):
            await protocol.eof.wait()
        assert int.from_bytes(protocol.data, "big") == size
        assert peer.frames[stream.stream_id] == 4  # 1 MiB, 1 MiB, 5 bytes, the FIN


async def test_pings_are_answered_and_a_dropped_connection_fails_its_streams() -> None:
    async with spdy_peer() as peer, tcp_server("echo") as port, link(peer) as conn:
        _stream, protocol = conn.open_port(port, Collect)
        assert isinstance(protocol, Collect)
        peer.connections[0].ping(7)
        with anyio.fail_after(5):
            while not peer.pings:  # noqa: ASYNC110 (the peer's record of pings)
                await anyio.sleep(0.01)
        assert peer.pings == [b"\0\0\0\x07"]
        peer.drop()
        with anyio.fail_after(5):
            await protocol.lost.wait()
            reason = await conn.closed
        assert isinstance(protocol.error, PortForwardError)
        assert "lost" in reason


# ---- the API server's settings, as kubectl gives them ----------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def view(cluster: dict[str, object], user: dict[str, object]) -> dict[str, object]:
    return {"clusters": [{"cluster": cluster}], "users": [{"user": user}]}


def test_a_token_user_gets_a_bearer_header_and_the_servers_port_and_path() -> None:
    server = from_config_view(
        view(
            {"server": "https://api.example:8443/base/", "insecure-skip-tls-verify": True},
            {"token": "t0k"},
        )
    )
    assert (server.host, server.port, server.prefix) == ("api.example", 8443, "/base")
    assert server.tls is not None and server.server_name == "api.example"
    assert anyio.run(server.headers) == {"Authorization": "Bearer t0k"}


@pytest.mark.parametrize(
    ("user", "cluster", "what"),
    [
        ({"auth-provider": {"name": "oidc"}}, {}, "auth-provider"),
        ({"username": "u", "password": "p"}, {}, "username"),
        ({}, {"proxy-url": "http://proxy:3128"}, "proxy-url"),
        ({"exec": {"command": "x", "interactiveMode": "Always"}}, {}, "terminal"),
    ],
)
def test_settings_only_kubectl_handles_are_unsupported(
    user: dict[str, object], cluster: dict[str, object], what: str
) -> None:
    with pytest.raises(Unsupported, match=what):
        from_config_view(view({"server": "https://h", **cluster}, user))


def test_an_exec_plugin_is_run_as_kubectl_runs_it_and_its_token_kept(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, os, sys\n"
        f"open({str(calls)!r}, 'a').write(os.environ['KUBERNETES_EXEC_INFO'] + '\\n')\n"
        "print(json.dumps({'status': {'token': 'from-' + sys.argv[1] + os.environ['EXTRA'],"
        " 'expirationTimestamp': '2999-01-01T00:00:00Z'}}))\n"
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    exec_spec = {
        "command": sys.executable,
        "args": [str(plugin), "plugin"],
        "env": [{"name": "EXTRA", "value": "!"}],
        "apiVersion": "client.authentication.k8s.io/v1",
    }
    server = from_config_view(view({"server": "http://h"}, {"exec": exec_spec}))

    async def twice() -> list[dict[str, str]]:
        return [await server.headers(), await server.headers()]

    assert anyio.run(twice) == [{"Authorization": "Bearer from-plugin!"}] * 2
    lines = calls.read_text().splitlines()
    assert len(lines) == 1  # kept until it expires
    assert json.loads(lines[0])["kind"] == "ExecCredential"


def _self_signed(name: str) -> tuple[str, str]:
    """A certificate and its key, PEM."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, key_pem


def test_a_client_certificate_and_the_clusters_ca_go_into_the_tls_context() -> None:
    ca, _ = _self_signed("cluster-ca")
    cert, key = _self_signed("admin")
    server = from_config_view(
        view(
            {"server": "https://127.0.0.1:6443", "certificate-authority-data": _b64(ca)},
            {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)},
        )
    )
    assert server.tls is not None
    subjects = [str(c["subject"]) for c in server.tls.get_ca_certs()]
    # The cluster's CA alone, as kubectl (client-go) trusts it; not the system's CAs besides.
    assert len(subjects) == 1 and "'commonName', 'cluster-ca'" in subjects[0]
    assert server.tls.verify_mode == ssl.CERT_REQUIRED and server.tls.check_hostname


def test_a_certificate_without_its_key_is_unsupported() -> None:
    cert, _ = _self_signed("admin")
    with pytest.raises(Unsupported, match="without its key"):
        from_config_view(view({"server": "https://h"}, {"client-certificate-data": _b64(cert)}))
