"""Which systems tpconf runs on, and what does not work elsewhere, and why.

tpconf runs on Linux. Each part that needs it is named here, so that another system hears at
once what will not work instead of meeting a failure halfway through a start.
"""

from __future__ import annotations

import sys

#: What each part of tpconf needs of the system, for the README and for the warning below.
NEEDS = {
    "inject-tcp": "torsocks, which works by LD_PRELOAD (macOS strips DYLD_INSERT_LIBRARIES "
    "from system programs under System Integrity Protection; Windows has no preloading)",
    "vpn-tcp": "iptables (Linux netfilter) to redirect the cluster's addresses, and root",
    "volumes": "sshfs on FUSE (macOS needs macFUSE, Windows has none)",
    "up": "Linux process control: children that die with tpconf (PR_SET_PDEATHSIG) and a "
    "control socket that checks its clients (SO_PEERCRED)",
}

_NAMES = {"darwin": "macOS", "win32": "Windows", "cygwin": "Windows (Cygwin)"}


def limitations(system: str | None = None) -> list[str]:
    """What will not work on ``system`` (``sys.platform`` by default), one line each; empty
    on Linux."""
    system = sys.platform if system is None else system
    if system.startswith("linux"):
        return []
    name = _NAMES.get(system, system)
    return [
        f"tpconf runs on Linux; on {name} these will not work:",
        *(f"  {part}: needs {need}" for part, need in NEEDS.items()),
        "  use a Linux machine or VM (on Windows, WSL 2)",
    ]
