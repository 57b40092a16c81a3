"""Where the pod's volumes appear to the local process: pure helpers, no mounting.

Two ways, both documented in docs/volumes.md:

- ``$TELEPRESENCE_ROOT`` (Telepresence 1's way): the pod's filesystem is mounted under a local
  folder and the program reads ``$TELEPRESENCE_ROOT/var/run/secrets/...``;
  ``$TELEPRESENCE_MOUNTS`` lists the pod's volume mount paths, ``:``-separated.
- real paths: the program is started under ``proot -b ROOT/PATH:PATH ...`` so it opens
  ``/var/run/secrets/...`` unchanged. No root needed; a private mount namespace (root only)
  would do the same with bind mounts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from tpconf.errors import PrivilegeError


def telepresence_env(root: str | os.PathLike[str], mount_paths: Sequence[str]) -> dict[str, str]:
    """``TELEPRESENCE_ROOT`` and ``TELEPRESENCE_MOUNTS`` for the local process."""
    return {
        "TELEPRESENCE_ROOT": str(Path(root)),
        "TELEPRESENCE_MOUNTS": ":".join(mount_paths),
    }


def local_path(root: str | os.PathLike[str], pod_path: str) -> Path:
    """Where ``pod_path`` (absolute, in the pod) is found under the mounted ``root``."""
    pure = PurePosixPath(pod_path)
    if not pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"pod path must be absolute and without '..': {pod_path!r}")
    return Path(root).joinpath(*pure.parts[1:])


def real_path_wrapper(
    root: str | os.PathLike[str], mount_paths: Sequence[str], *, proot: str = "proot"
) -> list[str]:
    """The argv prefix that shows each of ``mount_paths`` at its real path (proot binds).

    For example ``real_path_wrapper("/tmp/r", ["/var/run/secrets/kubernetes.io"])`` is
    ``["proot", "-b", "/tmp/r/var/run/secrets/kubernetes.io:/var/run/secrets/kubernetes.io"]``.
    """
    binary = shutil.which(proot)
    if binary is None:
        raise PrivilegeError(
            "the real-path option needs proot, which is not installed",
            hint="install it (Debian: `apt install proot`), or read the files under"
            " $TELEPRESENCE_ROOT instead; see docs/volumes.md",
        )
    argv = [binary]
    for path in sorted(set(mount_paths), key=lambda p: (len(PurePosixPath(p).parts), p)):
        if ":" in path:
            raise ValueError(f"proot cannot bind a path with ':' in it: {path!r}")
        argv += ["-b", f"{local_path(root, path)}:{path}"]
    return argv
