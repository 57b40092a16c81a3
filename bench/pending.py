"""Row 7: slots for measurements that need units not landed yet.

Each is one function: replace its body with the measurement (see :mod:`bench.startup` for the
shape) and keep the row names.
"""

from __future__ import annotations

from bench.context import Bench


def tpconf_up(bench: Bench) -> None:
    """``tpconf up`` for 1/3/10 deployments: ready time split cluster/tpconf, peak memory."""
    for n in (1, 3, 10):
        name = f"tpconf up, {n} deployment{'s' if n > 1 else ''}"
        target = "ready < 1.5 s after pod Ready; N in parallel"
        bench.table.slot(name, "cluster time", "pending: needs `tpconf up`", target)
        bench.table.slot(name, "tpconf time", "pending: needs `tpconf up`", target)
        bench.table.slot(name, "peak RSS", "pending: needs `tpconf up`")


def hot_reload(bench: Bench) -> None:
    """File save → new process running for a ``run`` change; unrelated connection survives."""
    target = "< 500 ms; other deployment untouched"
    bench.table.slot("hot reload (run change)", "save -> new process", "pending", target)
    bench.table.slot("hot reload (run change)", "unrelated conn survives", "pending", target)


def volumes(bench: Bench) -> None:
    """Reading 50 MB through the sshfs mount vs ``kubectl cp``."""
    bench.table.slot("volume read 50 MB", "kubectl cp", "pending: needs volumes in `tpconf up`")
    bench.table.slot("volume read 50 MB", "sshfs mount", "pending: needs volumes in `tpconf up`")
