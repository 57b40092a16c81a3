"""tpconf.volumes: the pod's filesystem on this machine, through sshfs over the tunnel's SFTP.

:mod:`tpconf.volumes.sshfs` mounts and keeps mounts alive; :mod:`tpconf.volumes.paths` computes
``TELEPRESENCE_ROOT``/``TELEPRESENCE_MOUNTS`` and the proot real-path wrapper.
"""

from __future__ import annotations

from tpconf.errors import MountError
from tpconf.volumes.paths import local_path, real_path_wrapper, telepresence_env
from tpconf.volumes.sshfs import (
    Mount,
    SftpOpener,
    check_fuse,
    claim_mount_point,
    command_stream,
    is_mounted,
    leftover_mounts,
    remove_leftover_mounts,
    run_mount,
    unmount,
)

__all__ = [
    "Mount",
    "MountError",
    "SftpOpener",
    "check_fuse",
    "claim_mount_point",
    "command_stream",
    "is_mounted",
    "leftover_mounts",
    "local_path",
    "real_path_wrapper",
    "remove_leftover_mounts",
    "run_mount",
    "telepresence_env",
    "unmount",
]
