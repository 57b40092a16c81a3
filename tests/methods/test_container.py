"""The container method's parts that run without Docker or a cluster: the bridge (a real Unix
socket, real DNS packets, real TCP peers), the env file as Docker reads it, the run options,
and the engine's errors from a real `docker` program that fails as an engine does."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import anyio
import pytest
from dnslib import QTYPE, DNSRecord

from tests.proxy.fakes import HELLO, HELLO_IP, POD_NAMESERVER, POD_SEARCH, FakeNameserver, MapDialer
from tpconf.engine import Docker, EngineNotRunning
from tpconf.errors import EngineError
from tpconf.methods.container import (
    _EnvFile,
    container_name,
    relative_sources,
    volume_args,
)
from tpconf.proxy import ClusterResolver
from tpconf.proxy.bridge import Bridge, inbound

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

SA = "/var/run/secrets/kubernetes.io/serviceaccount"
NOT_RUNNING = (
    "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
    "Is the docker daemon running?"
)


async def _echo(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        async for data in stream:
            await stream.send(data.upper())
        await stream.send_eof()


async def test_the_bridge_dials_through_the_dialer_and_answers_dns_from_the_cluster(
    tmp_path: Path,
) -> None:
    nameserver = FakeNameserver()
    echo = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with echo, anyio.create_task_group() as tg:
        tg.start_soon(echo.serve, _echo)
        await tg.start(nameserver.serve_tcp)
        echo_port = echo.extra(anyio.abc.SocketAttribute.local_port)
        dialer = MapDialer(
            routes={
                (HELLO_IP, 80): ("127.0.0.1", echo_port),
                (POD_NAMESERVER, 53): ("127.0.0.1", nameserver.port),
            }
        )
        async with ClusterResolver(dialer, [POD_NAMESERVER], POD_SEARCH) as resolver:
            bridge = Bridge(dialer, resolver)
            path = tmp_path / "out.sock"
            await tg.start(bridge.serve, path)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600

            # CONNECT: OK, then bytes both ways; the half-close reaches the far side and back.
            async with await anyio.connect_unix(path) as conn:
                await conn.send(f"CONNECT {HELLO_IP} 80\n".encode())
                assert await conn.receive() == b"OK\n"
                await conn.send(b"hello")
                await conn.send_eof()
                got = b""
                async for chunk in conn:
                    got += chunk
                assert got == b"HELLO"
            # Refused in the cluster: ERR with the reason, nothing relayed.
            async with await anyio.connect_unix(path) as conn:
                await conn.send(b"CONNECT 10.9.9.9 81\n")
                answer = await conn.receive()
                assert answer.startswith(b"ERR ") and b"10.9.9.9:81" in answer
            # DNS: length-prefixed questions, answered in order, as asked (no search list).
            async with await anyio.connect_unix(path) as conn:
                first = DNSRecord.question(HELLO, "A")
                second = DNSRecord.question("nothing.default.svc.cluster.local.", "A")
                packets = [bytes(first.pack()), bytes(second.pack())]
                await conn.send(b"DNS\n" + b"".join(struct.pack("!H", len(p)) + p for p in packets))
                replies: list[DNSRecord] = []
                buffer = b""
                while len(replies) < 2:
                    buffer += await conn.receive()
                    while (
                        len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack("!H", buffer[:2])[0]
                    ):
                        size = struct.unpack("!H", buffer[:2])[0]
                        replies.append(DNSRecord.parse(buffer[2 : 2 + size]))
                        buffer = buffer[2 + size :]
                assert replies[0].header.id == first.header.id
                assert [str(rr.rdata) for rr in replies[0].rr if rr.rtype == QTYPE.A] == [HELLO_IP]
                assert replies[1].header.id == second.header.id and not replies[1].rr
            # Anything else is refused.
            async with await anyio.connect_unix(path) as conn:
                await conn.send(b"LISTEN 80\n")
                assert await conn.receive() == b"ERR unknown request\n"
            assert bridge.connections == 1 and bridge.questions == 2
            tg.cancel_scope.cancel()
    assert not path.exists()  # removed when the bridge stops


async def test_inbound_carries_a_connection_into_the_namespace_socket(tmp_path: Path) -> None:
    """`expose`: a loopback connection here goes to the proxy container's socket as PORT + bytes."""
    socket_path = tmp_path / "in.sock"
    seen: list[bytes] = []

    async def namespace_side(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            first = await stream.receive()
            seen.append(first)
            await stream.send(b"from the app")

    listener = await anyio.create_unix_listener(socket_path)
    client_side = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, client_side, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, namespace_side)
        tg.start_soon(client_side.serve, lambda c: inbound(c, socket_path, 8080))
        port = client_side.extra(anyio.abc.SocketAttribute.local_port)
        async with await anyio.connect_tcp("127.0.0.1", port) as conn:
            assert await conn.receive() == b"from the app"
        tg.cancel_scope.cancel()
    assert seen and seen[0].startswith(b"8080\n")


def test_the_env_file_holds_what_docker_reads_back_and_the_rest_goes_by_name(
    tmp_path: Path,
) -> None:
    env = {
        "PLAIN": "a value with = and spaces ",
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "CERT": "line one\nline two",
        "#COMMENTLIKE": "x",
        "PATH": "/pod/bin\n",  # the CLI's own PATH must not be the pod's: dropped
        "": "nameless",
    }
    made = _EnvFile.write(tmp_path, env)
    assert stat.S_IMODE(made.path.stat().st_mode) == 0o600
    lines = made.path.read_text().splitlines()
    assert lines == ["PLAIN=a value with = and spaces ", "KUBERNETES_SERVICE_HOST=10.96.0.1"]
    assert made.args == ["--env-file", str(made.path), "--env", "CERT", "--env", "#COMMENTLIKE"]
    assert made.passed == {"CERT": "line one\nline two", "#COMMENTLIKE": "x"}


def test_run_options_mount_the_pod_at_its_real_paths_and_resolve_relative_sources() -> None:
    root = Path("/home/dev/p/.tpconf/api")
    args = volume_args(root, [SA, "/etc/my,conf"])
    # Sorted, so a mount point's parent comes first; a comma is quoted as Docker's CSV reads it.
    assert args == [
        "--mount", f"type=bind,source={root},target={root}",
        "--mount", f'type=bind,"source={root}/etc/my,conf","target=/etc/my,conf"',
        "--mount",
        f"type=bind,source={root}{SA},target={SA}",
    ]  # fmt: skip
    assert volume_args(None, ["/x"]) == []
    base = Path("/home/dev/p")
    assert relative_sources(
        ["-v", "./src:/app", "--volume=../shared:/s:ro", "--workdir", "./w", "-v", "cache:/c"], base
    ) == ["-v", "/home/dev/p/src:/app", "--volume=/home/dev/shared:/s:ro", "--workdir", "./w",
          "-v", "cache:/c"]  # fmt: skip
    assert container_name("abc123", "api_v2.x") == "tpconf-abc123-api_v2.x"
    assert container_name("abc123", "a/b") == "tpconf-abc123-a-b"


def _fake_docker(tmp_path: Path, stderr: str, code: int = 1) -> Docker:
    """A `docker` program that answers as an engine in some state does."""
    program = tmp_path / "docker"
    program.write_text(f"#!/bin/sh\necho {stderr!r} >&2\nexit {code}\n")
    program.chmod(0o755)
    return Docker(str(program))


@pytest.mark.parametrize(
    ("stderr", "kind", "hint"),
    [
        (
            NOT_RUNNING,
            EngineNotRunning,
            "systemctl start docker",
        ),
        (
            "permission denied while trying to connect to the Docker daemon socket",
            EngineError,
            "usermod -aG docker",
        ),
    ],
)
async def test_engine_failures_say_what_to_do(
    tmp_path: Path, stderr: str, kind: type[EngineError], hint: str
) -> None:
    with pytest.raises(kind) as info:
        await _fake_docker(tmp_path, stderr).check()
    assert info.value.hint is not None and hint in info.value.hint


async def test_a_missing_image_is_named_with_how_to_build_it(tmp_path: Path) -> None:
    docker = _fake_docker(tmp_path, "Error: No such image: api:dev")
    assert not await docker.has_image("api:dev")
    with pytest.raises(EngineError, match="image api:dev is not in the local Docker engine"):
        await docker.require_image("api:dev", hint="build it")


async def test_no_docker_program_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.devnull)
    with pytest.raises(EngineError, match="no `docker` program") as info:
        Docker.find()
    assert info.value.hint is not None and "docker.io" in info.value.hint
