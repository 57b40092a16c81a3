"""CPU seconds per process, from ``/proc/PID/stat`` (utime + stime of every live process).

:func:`snapshot` before and after a transfer, :func:`spent` for the difference per process
name (``kubectl``, ``kube-apiserver``, ``python3``…). A process that ends between the two
snapshots is missed; the bench's processes live across a whole row. ``getrusage`` would see
only this process and its waited-for children; the port-forward chain (kubectl, the API
server, the kubelet, containerd) and the agent in the pod are other processes.
"""

from __future__ import annotations

import os
from collections import Counter

TICKS = os.sysconf("SC_CLK_TCK")

Snapshot = dict[int, tuple[str, int]]


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    name = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
    fields = raw[raw.rindex(b")") + 2 :].split()
    return name, int(fields[11]) + int(fields[12])


def snapshot(pids: list[int] | None = None) -> Snapshot:
    """Every process's (name, CPU ticks); only ``pids`` when given."""
    out: Snapshot = {}
    for pid in pids if pids is not None else (int(p) for p in os.listdir("/proc") if p.isdigit()):
        stat = _stat(pid)
        if stat is not None:
            out[pid] = stat
    return out


def spent(before: Snapshot, after: Snapshot) -> Counter[str]:
    """CPU seconds per process name between two snapshots (processes in both)."""
    out: Counter[str] = Counter()
    for pid, (name, ticks) in after.items():
        if pid in before and before[pid][0] == name:
            out[name] += ticks - before[pid][1]
    return Counter({name: ticks / TICKS for name, ticks in out.items()})


def by_pid(before: Snapshot, after: Snapshot, pids: list[int]) -> float:
    """CPU seconds of ``pids`` between two snapshots."""
    return sum((after[p][1] - before[p][1]) / TICKS for p in pids if p in before and p in after)


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out
