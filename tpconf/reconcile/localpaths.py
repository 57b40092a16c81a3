"""Every path on this machine that ``tpconf up`` mounts over or writes, and the ones outside the
project directory.

Pure: the resolved project in, paths and warnings out. ``tpconf plan`` lists the paths; ``plan``
and ``up`` warn about those outside the project directory, where a typo (``/etc``, ``~/.ssh``)
would reach the rest of the machine. The volumes unit itself refuses a path that is a mount point
or holds files (:func:`tpconf.volumes.claim_mount_point`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tpconf.config import ConfigWarning, Project
from tpconf.errors import Position

#: tpconf's own directory in the project (:mod:`tpconf.reconcile.state`).
STATE_DIR = ".tpconf"


@dataclass(frozen=True)
class LocalPath:
    """A path ``up`` mounts over or writes, and why."""

    path: Path
    what: str
    """What is put there, for example ``the pod's filesystem is mounted``."""
    deployment: str | None = None
    """Whose it is (``None``: the project's own state directory)."""
    key: str = ""
    """The config key that sets it, for example ``volumes.root``."""


def local_paths(project: Project) -> list[LocalPath]:
    """Every path ``up`` mounts over or writes for ``project``, state directory first."""
    paths = [LocalPath(project.base_dir / STATE_DIR, "state, control socket, children record")]
    for spec in project.deployments:
        if spec.volumes is not None:
            paths.append(
                LocalPath(
                    spec.volumes.root,
                    "the pod's filesystem is mounted",
                    spec.name,
                    "volumes.root",
                )
            )
            paths.extend(
                LocalPath(m.local, f"pod path {m.pod} is mounted", spec.name, "volumes.mounts")
                for m in spec.volumes.mounts
            )
        if spec.env.export is not None:
            paths.append(
                LocalPath(
                    spec.env.export.file, "the pod environment is written", spec.name, "env.export"
                )
            )
    return paths


def outside_project(project: Project) -> tuple[ConfigWarning, ...]:
    """A warning for each path ``up`` would mount over or write outside the project directory."""
    return tuple(
        ConfigWarning(
            f"{local.path} is outside the project directory {project.base_dir}: {local.what} there",
            position=Position(str(project.source_path)),
            loc=f"deployments.{local.deployment}.{local.key}",
            hint=f"check `{local.key}`: a relative path is relative to the file's directory",
        )
        for local in local_paths(project)
        if local.deployment is not None and not local.path.is_relative_to(project.base_dir)
    )
