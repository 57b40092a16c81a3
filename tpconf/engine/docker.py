"""The ``docker`` CLI, as tpconf calls it: checks, images, labelled containers, cleanup.

tpconf talks to the engine through its CLI (not its API socket) so that whatever the user's
``docker`` reaches (``DOCKER_HOST``, a context, rootless Docker) is what tpconf reaches. A call
that fails is translated here, once, into :class:`~tpconf.errors.EngineError` with what to do:
no ``docker`` program, an engine that is not running, no permission on its socket, a missing
image. Container commands (``docker run ...``) are built here and run by the caller, which
supervises them like any other child.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio

from tpconf.errors import EngineError, Transient, trim_payload

#: Labels on every container tpconf starts (values: see :meth:`Docker.labels`).
LABEL_MANAGED = "tpconf.io/managed"
LABEL_SESSION = "tpconf.io/session"
LABEL_PROJECT = "tpconf.io/project"
LABEL_DEPLOYMENT = "tpconf.io/deployment"
LABEL_ROLE = "tpconf.io/role"
"""``network`` (the proxy container) or ``app`` (the deployment's process)."""
LABEL_LAUNCH = "tpconf.io/launch"
"""On an app container: the launch that started it (removed with it)."""

#: A query of the engine (version, inspect, ps) gets this long: a hung engine must not hang `up`.
QUERY_TIMEOUT = 20.0
#: Removing containers stops them first (``rm -f`` sends SIGKILL): seconds for the lot.
REMOVE_TIMEOUT = 60.0

_NOT_RUNNING = (
    "cannot connect to the docker daemon",
    "is the docker daemon running",
    "connection refused",
)
_NO_PERMISSION = ("permission denied",)


class EngineNotRunning(Transient, EngineError):
    """The engine does not answer: nothing of tpconf's can be running in it either. Retried
    with back-off: an engine being started (Docker Desktop takes a while) is picked up."""

    delay = 5.0


def find_docker() -> str:
    """The path of the ``docker`` program; :class:`EngineError` when there is none."""
    path = shutil.which("docker")
    if path is None:
        raise EngineError(
            "method `container` needs Docker, and there is no `docker` program on PATH",
            hint="install Docker (Debian and Ubuntu: `sudo apt-get install docker.io`), "
            "or use `method: inject-tcp`",
        )
    return path


@dataclass(frozen=True)
class Container:
    """A container tpconf started, as ``docker ps`` lists it."""

    id: str
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Docker:
    """The user's ``docker`` CLI at ``path``."""

    path: str

    @classmethod
    def find(cls) -> Docker:
        return cls(find_docker())

    async def call(
        self, *args: str, timeout: float = QUERY_TIMEOUT
    ) -> subprocess.CompletedProcess[bytes]:
        """``docker ARGS``, its output captured; :class:`EngineError` if it cannot be run."""
        try:
            with anyio.fail_after(timeout):
                return await anyio.run_process([self.path, *args], check=False)
        except TimeoutError:
            raise EngineError(
                f"`docker {args[0]}` did not answer within {timeout:.0f} s",
                hint="check the Docker engine (`docker info`); restart it if it hangs",
            ) from None
        except OSError as exc:
            raise EngineError(f"cannot run {self.path}: {exc.strerror or exc}") from exc

    def _failure(self, args: Sequence[str], stderr: bytes) -> EngineError:
        text = trim_payload(stderr.decode(errors="replace"))
        lowered = text.lower()
        if any(sign in lowered for sign in _NOT_RUNNING):
            return EngineNotRunning(
                "the Docker engine is not running (or `docker` cannot reach it)",
                hint="start it (`sudo systemctl start docker`, or start Docker Desktop), "
                "then check with `docker info`",
            )
        if any(sign in lowered for sign in _NO_PERMISSION):
            return EngineError(
                "no permission to use the Docker engine",
                hint="add yourself to the `docker` group (`sudo usermod -aG docker $USER`, "
                "then log in again), or use rootless Docker",
            )
        return EngineError(f"`docker {' '.join(args[:2])}` failed: {text or 'no message'}")

    async def check(self) -> str:
        """The engine's version; :class:`EngineError` if it cannot be used."""
        done = await self.call("version", "--format", "{{.Server.Version}}")
        if done.returncode != 0:
            raise self._failure(("version",), done.stderr)
        return done.stdout.decode().strip()

    async def has_image(self, ref: str) -> bool:
        """Whether the engine holds image ``ref`` (nothing is pulled)."""
        done = await self.call("image", "inspect", "--format", "{{.Id}}", ref)
        if done.returncode == 0:
            return True
        if b"no such image" in done.stderr.lower():
            return False
        raise self._failure(("image", "inspect"), done.stderr)

    async def require_image(self, ref: str, *, hint: str) -> None:
        """:class:`EngineError` with ``hint`` unless the engine holds ``ref``."""
        if not await self.has_image(ref):
            raise EngineError(f"image {ref} is not in the local Docker engine", hint=hint)

    async def containers(self, labels: Mapping[str, str]) -> list[Container]:
        """The containers (running or not) that carry all of ``labels``."""
        filters = [
            arg for key, value in labels.items() for arg in ("--filter", f"label={key}={value}")
        ]
        template = "{{.ID}}\t{{.Names}}\t{{.Labels}}"
        done = await self.call("ps", "--all", "--no-trunc", *filters, "--format", template)
        if done.returncode != 0:
            raise self._failure(("ps",), done.stderr)
        found = []
        for line in done.stdout.decode().splitlines():
            ident, name, raw = (line.split("\t", 2) + ["", ""])[:3]
            pairs = (item.partition("=") for item in raw.split(",") if item)
            found.append(Container(ident, name, {k: v for k, _, v in pairs}))
        return found

    async def remove(self, labels: Mapping[str, str]) -> list[Container]:
        """Remove (stopping them first) the containers that carry all of ``labels``."""
        found = await self.containers(labels)
        if found:
            done = await self.call("rm", "--force", *(c.id for c in found), timeout=REMOVE_TIMEOUT)
            # A container removed meanwhile (its --rm ran) is not a failure.
            if done.returncode != 0 and b"no such container" not in done.stderr.lower():
                raise self._failure(("rm",), done.stderr)
        return found


def label_args(labels: Mapping[str, str]) -> list[str]:
    """``--label KEY=VALUE`` for each of ``labels``."""
    return [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
