"""container: the process runs in a local container whose network is the cluster's.

Telepresence 1's ``--docker-run``, declared. Two containers per deployment, both labelled
(:mod:`tpconf.engine`):

- the **network container** (``tpconf-SESSION-NAME``), started from the agent image with no
  network but loopback and ``NET_ADMIN`` in its own namespace only. Its program
  (``tpconf/agent/netproxy.py``) redirects every TCP connection to a transparent proxy and
  answers DNS on 127.0.0.1 with the pod's search list; both hand their work to tpconf through
  a Unix socket (:mod:`tpconf.proxy.bridge`), which dials from the proxy pod through the
  deployment's tunnel and asks the pod's nameserver. Nothing on the machine changes and no
  root is needed beyond what Docker needs;
- the **app container**, from `image`, started by the process unit like any command (the
  prefix is ``docker run ... --network container:NETWORK IMAGE``, the command `run`, or the
  image's own): the pod's environment, its volumes at their real paths and under
  ``TELEPRESENCE_ROOT``, `container-args`. Being a command, it is supervised, restarted by
  `restart`, replaced when `image` or `run` changes, and stopped by a signal that ``docker``
  passes on.

Connections the cluster sends to this machine (`expose`, `from-pod`, a swap's or an intercept's
ports) arrive on loopback here, where this method listens and carries them into the namespace
(``PORT`` on the network container's socket). `to-pod` ports are the pod's: in the namespace,
``localhost:PORT`` is redirected to the pod's localhost.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream, Process, SocketStream, TaskGroup, TaskStatus

from tpconf.config import DeploymentSpec, InterceptOp, Project, RuleReport
from tpconf.engine import (
    LABEL_DEPLOYMENT,
    LABEL_MANAGED,
    LABEL_PROJECT,
    LABEL_ROLE,
    LABEL_SESSION,
    Docker,
)
from tpconf.engine.docker import LABEL_LAUNCH, label_args
from tpconf.errors import EngineError, ProxyError, Transient
from tpconf.methods.base import Launch, LaunchRequest, Link, MethodRuntime, Outbound, Services
from tpconf.pids import open_child

log = logging.getLogger(__name__)

#: Where the agent image keeps the network container's program.
NETPROXY = "/usr/local/lib/tpconf-agent/netproxy.py"
#: Where the bridge's directory appears in the network container.
BRIDGE_MOUNT = "/run/tpconf"
#: The network container gets this long to say it is ready (it starts Python, sets two rules).
READY_TIMEOUT = 30.0
#: And this long to stop once ``docker`` passed SIGTERM on, before the containers are removed.
STOP_TIMEOUT = 10.0

#: ``docker run`` with a terminal when the command has one (``tpconf exec`` on a terminal),
#: without when it has pipes (the process unit, an IDE): ``--tty`` would merge its output.
_RUN_WITH_TTY_IF_ANY = (
    'if [ -t 0 ] && [ -t 1 ]; then exec "$0" run --tty "$@"; fi; exec "$0" run "$@"'
)

#: Options of `container-args` that would undo what the method sets up.
_REFUSED_ARGS = {
    "--network": "the app container joins the network container's namespace",
    "--net": "the app container joins the network container's namespace",
    "-d": "the process unit supervises the container: it must stay attached",
    "--detach": "the process unit supervises the container: it must stay attached",
    "-p": "use `expose`: its ports are published on this machine's loopback",
    "--publish": "use `expose`: its ports are published on this machine's loopback",
    "-P": "use `expose`: its ports are published on this machine's loopback",
    "--publish-all": "use `expose`: its ports are published on this machine's loopback",
    "--rm": "tpconf removes the container already",
}

#: A variable goes to the env file only if docker reads it back unchanged from there.
_ENV_FILE_NAME = re.compile(r"^[^#\s=][^\s=]*$")
#: Variables that steer the ``docker`` CLI itself: the pod's values for these reach the
#: container only through the env file, never through the CLI's environment.
_CLI_VARIABLES = re.compile(
    r"^(PATH|HOME|DOCKER_.*|XDG_.*|TMPDIR|HTTPS?_PROXY|NO_PROXY)$", re.IGNORECASE
)


class NetworkContainerStopped(Transient, EngineError):
    """The network container ended while the deployment ran (retried with back-off)."""

    delay = 2.0


def inbound_ports(spec: DeploymentSpec) -> tuple[tuple[int, ...], ...]:
    """What of ``spec`` decides where this method listens: `expose`, `from-pod`, `to-pod`, an
    intercept's ports (the swapped container's own come with the proxy)."""
    op = spec.operation
    intercepted = tuple(sorted(m.local for m in op.ports)) if isinstance(op, InterceptOp) else ()
    exposed = tuple(sorted({m.local for m in spec.expose}))
    return (exposed, tuple(spec.from_pod), tuple(spec.to_pod), intercepted)


def container_name(session_id: str, deployment: str) -> str:
    """The network container's name: one per session and deployment, valid for Docker."""
    cleaned = re.sub(r"[^a-zA-Z0-9_.-]", "-", deployment)
    return f"tpconf-{session_id}-{cleaned}"[:120]


def _mount(source: str, target: str, *, read_only: bool = False) -> list[str]:
    """``--mount`` for a bind mount; fields quoted as Docker's CSV parser reads them."""
    fields = ["type=bind", f"source={source}", f"target={target}"]
    if read_only:
        fields.append("readonly")
    line = io.StringIO()
    csv.writer(line, lineterminator="").writerow(fields)
    return ["--mount", line.getvalue()]


def relative_sources(args: Sequence[str], base: Path) -> list[str]:
    """`container-args` with the relative sources of ``-v``/``--volume`` made absolute against
    the project's folder, as compose reads ``./src:/app`` (Docker itself refuses them)."""
    out: list[str] = []
    follows_flag = False
    for arg in args:
        if follows_flag:
            out.append(_absolute_source(arg, base))
        elif arg.startswith("--volume="):
            out.append("--volume=" + _absolute_source(arg.removeprefix("--volume="), base))
        else:
            out.append(arg)
        follows_flag = arg in ("-v", "--volume")
    return out


def _absolute_source(volume: str, base: Path) -> str:
    source, colon, rest = volume.partition(":")
    if source in (".", "..") or source.startswith(("./", "../")):
        source = os.path.normpath(base / source)
    return source + colon + rest


def volume_args(root: Path | None, mounts: Sequence[str]) -> list[str]:
    """The pod's filesystem at ``TELEPRESENCE_ROOT`` (the same path inside), and each of the
    pod's mount points at its real path."""
    if root is None:
        return []
    args = _mount(str(root), str(root))
    for point in sorted(mounts):
        args += _mount(str(root) + point, point)
    return args


@dataclass
class _EnvFile:
    """The pod's side of the environment, as ``docker run`` takes it: an env file (mode 0600,
    removed with the launch) and, for values a file line cannot hold, ``-e NAME`` with the
    value in the ``docker`` command's own environment."""

    path: Path
    args: list[str] = field(default_factory=list)
    passed: dict[str, str] = field(default_factory=dict)

    @classmethod
    def write(cls, directory: Path, env: Mapping[str, str]) -> _EnvFile:
        fd, name = tempfile.mkstemp(prefix="env-", dir=directory)
        made = cls(Path(name), ["--env-file", name])
        lines = []
        for key, value in env.items():
            if _ENV_FILE_NAME.match(key) and "\n" not in value and "\r" not in value:
                lines.append(f"{key}={value}\n")
            elif _CLI_VARIABLES.match(key) or "=" in key or not key:
                log.warning("container: variable %r cannot be passed to the container", key)
            else:
                made.args += ["--env", key]
                made.passed[key] = value
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as out:
            out.writelines(lines)
        return made


@dataclass
class ContainerOutbound:
    """The network container and the listeners that carry the cluster's connections into it."""

    link: Link
    docker: Docker
    network: str
    bridge_dir: Path
    labels: Mapping[str, str]
    tg: TaskGroup
    listeners: dict[int, anyio.CancelScope] = field(default_factory=dict)
    to_pod: tuple[int, ...] = ()
    launches: Iterator[int] = field(default_factory=itertools.count)

    def status(self) -> str:
        ports = ", ".join(str(p) for p in sorted(self.listeners))
        here = f"; ports {ports} on localhost" if ports else ""
        return f"network container {self.network} (TCP and DNS through the pod){here}"

    # -- what the cluster sends here --------------------------------------------------------------

    def wanted(self, spec: DeploymentSpec) -> set[int]:
        return set(self.link.delivered_ports(spec)) - set(spec.to_pod)

    async def listen(self, port: int) -> None:
        self.listeners[port] = await self.tg.start(self._listen, port)

    async def _listen(self, port: int, *, task_status: TaskStatus[anyio.CancelScope]) -> None:
        from tpconf.proxy.bridge import inbound

        try:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        except OSError as exc:
            raise ProxyError(
                f"cannot listen on localhost:{port} for the container: {exc.strerror or exc}",
                hint=f"stop what uses port {port} here (the container's port {port} is "
                "published on it), or change the port in the file",
            ) from exc

        async def carry(client: SocketStream) -> None:
            await inbound(client, self.bridge_dir / "in.sock", port)

        with anyio.CancelScope() as scope:
            async with listener:
                task_status.started(scope)
                await listener.serve(carry)

    async def update(self, spec: DeploymentSpec, project: Project) -> None:
        wanted = self.wanted(spec)
        for port in [p for p in self.listeners if p not in wanted]:
            self.listeners.pop(port).cancel()
        for port in sorted(wanted - set(self.listeners)):
            await self.listen(port)
        if tuple(spec.to_pod) != self.to_pod:
            await self._redirect_to_pod(self.to_pod, spec.to_pod)
            self.to_pod = tuple(spec.to_pod)

    async def _redirect_to_pod(self, old: Sequence[int], new: Sequence[int]) -> None:
        """`to-pod`: the namespace's localhost:PORT redirected to the pod's (rules in place)."""
        changes = [("-D", p) for p in old if p not in new] + [
            ("-I", p) for p in new if p not in old
        ]
        for flag, port in changes:
            rule = ["-p", "tcp", "-d", "127.0.0.1", "--dport", str(port), "-j", "REDIRECT"]
            command = ["exec", "--user", "0", self.network, "iptables", "-t", "nat", flag, "OUTPUT"]
            done = await self.docker.call(*command, *rule, "--to-ports", "15001")
            if done.returncode != 0:
                raise EngineError(
                    f"to-pod {port}: cannot change the network container's rules: "
                    + done.stderr.decode(errors="replace").strip()
                )

    # -- the app container ------------------------------------------------------------------------

    @contextlib.contextmanager
    def launch(self, request: LaunchRequest) -> Iterator[Launch]:
        spec = request.spec
        if spec.image is None:  # the method's check refuses this
            raise EngineError(f"{spec.name}: method `container` needs `image`")
        image = spec.image
        launch_id = f"{self.network}-{next(self.launches)}"
        labels = {**self.labels, LABEL_ROLE: "app", LABEL_LAUNCH: launch_id}
        with tempfile.TemporaryDirectory(prefix="tpconf-env-") as private:
            # The pod's image runs here: what the pod starts with, it starts with.
            env = _EnvFile.write(Path(private), {**request.withheld, **request.pod_env})
            run = [
                "--rm",
                "--interactive",
                "--init",  # signals reach an app that runs as PID 1 without handling them
                "--pull",
                "never",
                "--network",
                f"container:{self.network}",
                *label_args(labels),
                *env.args,
                *volume_args(request.root, request.mounts),
                *relative_sources(spec.container_args, self.link.project.base_dir),
                image,
            ]

            async def prepare() -> None:
                await self.docker.require_image(image, hint=image_hint(image))

            async def cleanup() -> None:
                await self.docker.remove({LABEL_LAUNCH: launch_id})

            yield Launch(
                prefix=("/bin/sh", "-c", _RUN_WITH_TTY_IF_ANY, self.docker.path, *run),
                env=env.passed,
                contained=True,
                prepare=prepare,
                cleanup=cleanup,
                # If up dies, docker must live long enough to stop the container.
                death_signal=signal.SIGTERM,
            )


def image_hint(image: str) -> str:
    return (
        f"build it here (`docker build -t {image} DIR`) or load it (`docker load -i FILE`): "
        "tpconf uses images of the local Docker engine and pulls none"
    )


class _Runtime:
    def __init__(self, services: Services) -> None:
        self.services = services

    async def outbound(self, link: Link, *, task_status: TaskStatus[Outbound]) -> None:
        from tpconf.proxy.bridge import Bridge

        spec = link.spec
        docker = Docker.find()
        await docker.check()
        await docker.require_image(
            spec.agent_image,
            hint=f"the network container runs the agent image: `docker pull {spec.agent_image}`, "
            "or build it from tpconf/agent/Dockerfile",
        )
        if spec.image is not None:
            await docker.require_image(spec.image, hint=image_hint(spec.image))
        network = container_name(self.services.session_id, spec.name)
        labels = {
            LABEL_MANAGED: "true",
            LABEL_SESSION: self.services.session_id,
            LABEL_PROJECT: self.services.project_id,
            LABEL_DEPLOYMENT: spec.name,
        }
        bridge_dir = Path(tempfile.mkdtemp(prefix="tpconf-net-"))
        try:
            async with anyio.create_task_group() as tg:
                bridge = Bridge(link.dialer, link.resolver)
                await tg.start(bridge.serve, bridge_dir / "out.sock")
                await tg.start(_network_container, docker, network, bridge_dir, labels, link)
                outbound = ContainerOutbound(link, docker, network, bridge_dir, labels, tg)
                await outbound.update(spec, link.project)
                link.notice(f"network container {network} ready")
                task_status.started(outbound)
        finally:
            ours = {LABEL_SESSION: self.services.session_id, LABEL_DEPLOYMENT: spec.name}
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(STOP_TIMEOUT * 2),
                contextlib.suppress(EngineError),
            ):
                await docker.remove(ours)
            shutil.rmtree(bridge_dir, ignore_errors=True)


async def _network_container(
    docker: Docker,
    name: str,
    bridge_dir: Path,
    labels: Mapping[str, str],
    link: Link,
    *,
    task_status: TaskStatus[None],
) -> None:
    """Run the network container until cancelled; it ending by itself is an error."""
    resolver = link.resolver
    search = [arg for domain in resolver.search for arg in ("--search", domain)]
    command = [
        docker.path,
        "run",
        "--rm",
        "--name",
        name,
        "--network",
        "none",
        "--cap-add",
        "NET_ADMIN",
        "--user",
        "0:0",
        "--pull",
        "never",
        *label_args({**labels, LABEL_ROLE: "network"}),
        *_mount(str(bridge_dir), BRIDGE_MOUNT),
        "--entrypoint",
        "python3",
        link.spec.agent_image,
        NETPROXY,
        *search,
        "--ndots",
        str(resolver.ndots),
    ]
    # Its own process group, recorded: if up dies, the janitor's SIGTERM reaches docker, which
    # passes it on to the container (and --rm removes it).
    process = await open_child(
        command,
        death_signal=signal.SIGTERM,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        await _wait_ready(process, name)
        task_status.started()
        async with anyio.create_task_group() as tg:
            for stream in (process.stdout, process.stderr):
                assert stream is not None
                tg.start_soon(_drain, stream, name)
        code = await process.wait()
        raise NetworkContainerStopped(
            f"the network container {name} stopped (exit code {code})",
            hint="`docker logs` has nothing after --rm: run `tpconf up --debug` to see its "
            "output; tpconf starts it again",
        )
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)  # docker passes it on
                with anyio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def _drain(stream: ByteReceiveStream, name: str) -> None:
    """Its output, once it is running, to the debug log (a full pipe would stall it)."""
    async for chunk in stream:
        log.debug("%s: %s", name, chunk.decode(errors="replace").rstrip())


async def _wait_ready(process: Process, name: str) -> None:
    assert process.stdout is not None and process.stderr is not None
    output = b""
    with anyio.move_on_after(READY_TIMEOUT) as timer:
        async for chunk in process.stdout:
            output += chunk
            if b"ready\n" in output:
                return
    errors = b""
    with anyio.move_on_after(1):
        async for chunk in process.stderr:
            errors += chunk
    text = (errors or output).decode(errors="replace").strip()[-500:]
    if timer.cancelled_caught:
        raise EngineError(
            f"the network container {name} was not ready within {READY_TIMEOUT:.0f} s: {text}"
        )
    raise EngineError(f"the network container {name} did not start: {text or 'no message'}")


class Container:
    """The :class:`~tpconf.methods.base.Method` of `method: container`."""

    name = "container"
    summary = (
        "the process runs in a local Docker container of `image` whose every TCP connection and "
        "DNS query goes through the proxy pod; Go, static and setuid programs work, volumes "
        "appear at their real paths; needs Docker, not root"
    )
    runs_image = True

    def check(self, specs: Sequence[DeploymentSpec], report: RuleReport) -> None:
        for spec in specs:
            if spec.image is None:
                report.error(
                    spec,
                    "method `container` needs `image`: the image the process runs in",
                    key="image",
                    hint="add `image: NAME:TAG` (an image of the local Docker engine)",
                )
            if spec.shell:
                report.error(
                    spec,
                    "`shell: true` does not apply to method `container`",
                    key="shell",
                    hint=f"`tpconf exec {spec.name} -- sh` opens a shell in a container on the "
                    "same network, with the same environment and volumes",
                )
            for arg in spec.container_args:
                option = arg.split("=", 1)[0]
                if option in _REFUSED_ARGS:
                    report.error(
                        spec,
                        f"`{option}` cannot be in `container-args`: {_REFUSED_ARGS[option]}",
                        key="container-args",
                        hint=f"remove `{arg}`",
                    )
            if spec.also_proxy:
                report.warn(
                    spec,
                    "`also-proxy` has no effect with method `container`: all of the container's "
                    "connections already go through the cluster",
                    key="also-proxy",
                    hint="remove `also-proxy`",
                )
            if spec.volumes is not None and spec.volumes.real_paths:
                report.warn(
                    spec,
                    "`volumes.real-paths` has no effect with method `container`: the container "
                    "always sees the pod's volumes at their real paths",
                    key="volumes",
                    hint="remove `real-paths`",
                )

    def describe(self, spec: DeploymentSpec) -> list[str]:
        command = "its own command" if spec.run is None else "`run`"
        return [
            "+ network container: all TCP and DNS through the proxy pod (Docker)",
            f"+ app container from {spec.image} running {command} in that network",
        ]

    def outbound_facet(self, spec: DeploymentSpec, project: Project) -> Hashable:
        return inbound_ports(spec)

    def runtime(self, services: Services) -> MethodRuntime:
        return _Runtime(services)


METHOD = Container()
