"""How a local process of a deployment is started, for the process unit and for ``tpconf exec``.

A process gets the method's launch (inject-tcp: torsocks pointed at the deployment's SOCKS
server) and, with `volumes.real-paths`, proot in front of that, so that the method's wrapper and
the command both see the pod's paths. ``tpconf exec`` asks the running ``up`` for the same:
:class:`HeldLaunches` keeps one launch per deployment for as long as the deployment's outbound
side runs, because the command the CLI execs outlives the request, and torsocks reads its
configuration file again in every process that command starts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

from tpconf import volumes
from tpconf.config import DeploymentSpec
from tpconf.methods import Launch, LaunchRequest, Outbound

log = logging.getLogger(__name__)


def command_prefix(
    spec: DeploymentSpec, launch: Launch, root: Path | None, mounts: tuple[str, ...]
) -> tuple[str, ...]:
    """What goes in front of a command of ``spec``: proot outermost, then the method's prefix
    (a container method mounts the real paths itself)."""
    prefix = launch.prefix
    real_paths = spec.volumes is not None and spec.volumes.real_paths
    if real_paths and root is not None and not launch.contained:
        prefix = (*volumes.real_path_wrapper(str(root), mounts), *prefix)
    return tuple(prefix)


class HeldLaunches:
    """The launches made for ``tpconf exec``, one per deployment, each kept until its outbound
    side is replaced or stopped (:meth:`prune`), or ``up`` ends (:meth:`close`)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[Outbound, contextlib.ExitStack, Launch]] = {}

    def get(self, name: str, outbound: Outbound, request: LaunchRequest) -> Launch:
        """The launch for deployment ``name`` whose outbound side is ``outbound`` (``request``
        is used when a new one is made)."""
        held = self._held.get(name)
        if held is not None and held[0] is outbound:
            return held[2]
        self.release(name)
        stack = contextlib.ExitStack()
        launch = stack.enter_context(outbound.launch(request))
        self._held[name] = (outbound, stack, launch)
        return launch

    def prune(self, current: Mapping[str, Outbound]) -> None:
        """Release the launches whose deployment no longer runs that outbound side."""
        for name, (outbound, _, _) in list(self._held.items()):
            if current.get(name) is not outbound:
                self.release(name)

    def release(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is not None:
            try:
                held[1].close()
            except OSError as exc:  # a temporary file someone removed first
                log.debug("releasing the launch of %s: %s", name, exc)

    def close(self) -> None:
        for name in list(self._held):
            self.release(name)
