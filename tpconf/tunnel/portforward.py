"""A ``kubectl port-forward`` child: the way from this machine to the agent's sshd (127.0.0.1:8022
in the pod).

:func:`kubectl_port_forward` starts ``kubectl [--context C] -n NS port-forward pod/NAME :8022
--address 127.0.0.1`` in its own process group (a kubeconfig, one file or a list as in
``$KUBECONFIG``, is given as ``KUBECONFIG``: ``--kubeconfig`` takes one file only), learns the local port from its
``Forwarding from 127.0.0.1:PORT -> 8022`` line, and on exit stops the whole group (SIGTERM,
then SIGKILL after a grace period); the kernel kills it if tpconf dies first (even by
``kill -9``: :func:`tpconf.pids.open_child`). One kubectl serves one SSH connection: when it dies, the SSH
connection through it drops and the supervisor (:mod:`tpconf.tunnel.session`) starts a new one.

:func:`port_forward_transport` uses the child only when this process cannot speak port-forward
itself (:mod:`tpconf.tunnel.kubeapi` says when); otherwise each attempt is one in-process
connection to the API server (:mod:`tpconf.tunnel.spdy`).

stderr goes to an unnamed temporary file, so kubectl never blocks on a full pipe and its last
words can be quoted when it fails.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import IO

import anyio
from anyio.abc import Process

from tpconf.errors import Forbidden, TpconfError, TunnelDown, TunnelError, trim_payload
from tpconf.pids import open_child
from tpconf.tunnel.kubeapi import api_server
from tpconf.tunnel.session import Transport
from tpconf.tunnel.settings import AGENT_SSH_PORT, Endpoint

log = logging.getLogger(__name__)

#: ``TPCONF_PORT_FORWARD=kubectl``: always a ``kubectl port-forward`` child (no relay either).
PORT_FORWARD_ENV = "TPCONF_PORT_FORWARD"

_FORWARDING = re.compile(rb"Forwarding from 127\.0\.0\.1:(\d+) -> (\d+)")


@dataclass(frozen=True)
class PortForwardTarget:
    """What to port-forward to, and with which kubectl."""

    namespace: str
    resource: str
    """``pod/NAME``; ``deployment/NAME`` also works (kubectl picks one of its pods each start)."""
    remote_port: int = AGENT_SSH_PORT
    kubectl: str = "kubectl"
    """The kubectl executable: a path, or a name looked up on ``PATH``."""
    kubeconfig: str | None = None
    """One file or a ``:``-separated list, as in ``$KUBECONFIG`` (``None``: kubectl's own)."""
    context: str | None = None
    in_process: bool = field(default_factory=lambda: os.environ.get(PORT_FORWARD_ENV) != "kubectl")
    """Speak port-forward in this process (:mod:`tpconf.tunnel.spdy`) when kubectl's settings for
    the context allow it (:mod:`tpconf.tunnel.kubeapi`), instead of a ``kubectl`` child per
    connection: no 55 MB process per deployment, and the relay's fast data path. ``False``
    always uses the child."""

    async def prepare(self) -> None:
        """Read the kubeconfig for the in-process port-forward now (once per process), so that
        the first connection does not wait for it after its pod is Ready: the proxy unit calls
        this while the pod starts."""
        if self.in_process:
            await api_server(self.kubeconfig, self.context)

    def env(self) -> dict[str, str] | None:
        """kubectl's environment: ours, with ``KUBECONFIG`` when one is set."""
        return {**os.environ, "KUBECONFIG": self.kubeconfig} if self.kubeconfig else None

    def command(self) -> list[str]:
        """The kubectl command line."""
        cmd = [self.kubectl]
        if self.context:
            cmd += ["--context", self.context]
        cmd += ["-n", self.namespace, "port-forward", self.resource, f":{self.remote_port}"]
        return [*cmd, "--address", "127.0.0.1"]


class PortForward:
    """A running ``kubectl port-forward``."""

    def __init__(self, process: Process, stderr: IO[bytes], target: PortForwardTarget) -> None:
        self._process = process
        self._stderr = stderr
        self.target = target
        self.local_port = 0
        """The local port on 127.0.0.1 that reaches the pod's port."""

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """kubectl's exit status, or None while it runs."""
        return self._process.returncode

    @property
    def endpoint(self) -> Endpoint:
        """Where to connect: ``("127.0.0.1", local_port)``."""
        return ("127.0.0.1", self.local_port)

    async def wait(self) -> int:
        """Wait until kubectl exits (it should not: then restart it); return its status."""
        return await self._process.wait()

    def stderr_tail(self, limit: int = 2048) -> str:
        """The end of what kubectl wrote on stderr so far."""
        self._stderr.flush()
        size = self._stderr.seek(0, os.SEEK_END)
        self._stderr.seek(max(0, size - limit))
        return self._stderr.read().decode(errors="replace").strip()

    async def _wait_ready(self, timeout: float) -> None:
        assert self._process.stdout is not None
        buffer = b""
        with anyio.move_on_after(timeout):
            async for chunk in self._process.stdout:
                buffer += chunk
                match = _FORWARDING.search(buffer)
                if match:
                    self.local_port = int(match.group(1))
                    return
                buffer = buffer[-200:]
            await self._process.wait()  # stdout closed: kubectl is exiting
            raise self._failure(f"exited with status {self._process.returncode}")
        raise TunnelDown(
            f"`{' '.join(self.target.command())}` did not start forwarding within {timeout:g} s:"
            f" {trim_payload(self.stderr_tail()) or 'no output'}",
            hint="is the proxy pod running? check it with `kubectl get pods`",
        )

    def _failure(self, what: str) -> TpconfError:
        text = self.stderr_tail()
        lowered = text.lower()
        command = " ".join(self.target.command())
        if "forbidden" in lowered:
            return Forbidden(
                f"not allowed to port-forward to {self.target.resource} in namespace"
                f" {self.target.namespace}: {trim_payload(text)}",
                hint="the RBAC Role needs verb `create` on resource `pods/portforward`"
                " (`tpconf rbac` prints the Role tpconf needs)",
            )
        return TunnelDown(
            f"`{command}` {what}: {trim_payload(text) or 'no output'}",
            hint="tpconf restarts it; if this persists, check the proxy pod with `kubectl get pods`",
        )

    async def _stop(self, grace: float) -> None:
        with anyio.CancelScope(shield=True):
            if self._process.returncode is None:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(self._process.pid, sig)
                    except ProcessLookupError:
                        break
                    with anyio.move_on_after(grace):
                        await self._process.wait()
                        break
                    log.debug("kubectl port-forward (pid %d) ignored %s", self.pid, sig.name)
            await self._process.wait()
            await self._process.aclose()
            self._stderr.close()


@asynccontextmanager
async def kubectl_port_forward(
    target: PortForwardTarget, *, ready_timeout: float = 20.0, stop_grace: float = 2.0
) -> AsyncIterator[PortForward]:
    """Run ``kubectl port-forward`` while the block runs; yields once it forwards.

    Raises :class:`TunnelDown` when kubectl exits or stays silent (retrying can help: the pod
    may be starting), :class:`~tpconf.errors.Forbidden` when RBAC forbids ``pods/portforward``,
    :class:`TunnelError` when kubectl cannot be run at all.
    """
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by PortForward._stop
    try:
        process = await open_child(
            target.command(),
            env=target.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,  # its own process group: we signal the group
        )
    except OSError as exc:
        stderr.close()
        raise TunnelError(
            f"cannot run {target.kubectl!r}: {exc}",
            hint="install kubectl, or set the path to it in tpconf's settings",
        ) from exc
    forward = PortForward(process, stderr, target)
    try:
        await forward._wait_ready(ready_timeout)
        log.debug("kubectl port-forward (pid %d) on 127.0.0.1:%d", forward.pid, forward.local_port)
        yield forward
    finally:
        await forward._stop(stop_grace)


TargetSource = PortForwardTarget | Callable[[], Awaitable[PortForwardTarget]]
"""A fixed target, or an async callable that finds the current proxy pod for each attempt."""


def port_forward_transport(
    target: TargetSource, *, ready_timeout: float = 20.0, stop_grace: float = 2.0
) -> Transport:
    """A :data:`~tpconf.tunnel.session.Transport` that opens a fresh port-forward for every
    connection attempt: in this process when it can (see :attr:`PortForwardTarget.in_process`),
    else a ``kubectl port-forward`` child."""

    @asynccontextmanager
    async def transport() -> AsyncIterator[Endpoint]:
        current = target if isinstance(target, PortForwardTarget) else await target()
        kind, _, name = current.resource.partition("/")
        api = None
        if current.in_process and kind == "pod":
            api = await api_server(current.kubeconfig, current.context)
        if api is not None:
            async with api.port_forward(current.namespace, name, timeout=ready_timeout) as link:
                yield link
            return
        async with kubectl_port_forward(
            current, ready_timeout=ready_timeout, stop_grace=stop_grace
        ) as forward:
            yield forward.endpoint

    return transport
