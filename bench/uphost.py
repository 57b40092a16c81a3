"""A real ``tpconf up`` as a child process, and the cluster watched beside it.

- :class:`UpProcess`: ``python -m tpconf up`` in a fresh project folder (its own session),
  every output line timestamped (``time.monotonic``) by a reader thread as it arrives; stopped
  with SIGINT as a user would (tpconf's own cleanup), then anything of it still alive (its
  process group, and descendants recorded before the stop) gets SIGKILL; stale FUSE mounts under
  the project are lazily unmounted before the folder is removed.
- :class:`ClusterWatch`: Deployments and pods of the bench namespace, watched from *before*
  ``tpconf up`` starts, so each Deployment's first appearance and each proxy pod's first Ready
  are known to the watch's latency (milliseconds) rather than to the API's one-second
  timestamps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from bench.kube import KUBECTL, BenchNamespace, client, kubeconfig, watch

TPCONF = [sys.executable, "-m", "tpconf", "up"]
PROXY_LABEL = "tpconf.io/proxy"


def up_env() -> dict[str, str]:
    env = dict(os.environ)
    if kubeconfig():
        env["KUBECONFIG"] = str(kubeconfig())
    env["TPCONF_KUBECTL"] = KUBECTL
    env["NO_COLOR"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # lines are timestamped when they arrive on the pipe
    if os.path.isabs(KUBECTL):
        env["PATH"] = f"{os.path.dirname(KUBECTL)}:{env.get('PATH', '')}"
    return env


def write_config(project: Path, text: str) -> float:
    """Save telepresence.yaml as editors do (temp file renamed over it); return the save time."""
    tmp = project / ".telepresence.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(project / "telepresence.yaml")
    return time.monotonic()


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat:
                children.setdefault(stat[0], []).append(int(entry))
                starts[int(entry)] = stat[1]
    out: dict[int, int] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = starts[child]
            todo.append(child)
    return out


def vm_hwm_mb(pid: int) -> float:
    """Peak resident set (VmHWM) of one process, MB; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return 0.0


class UpProcess:
    """One ``tpconf up`` in ``project``."""

    def __init__(
        self, project: Path, prefix: list[str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.project = project
        self.prefix = prefix or []
        """Put in front of the command (``ip netns exec NS``: it execs, the pid stays tpconf's)."""
        self.env = env
        self.lines: list[tuple[float, str]] = []
        self.started = 0.0
        self.proc: subprocess.Popen[bytes] | None = None
        self._cond = threading.Condition()
        self._eof = False
        self._family: dict[int, int] = {}

    def start(self) -> UpProcess:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*self.prefix, *TPCONF],
            cwd=self.project,
            env=self.env or up_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic()
            with self._cond:
                self.lines.append((now, raw.decode(errors="replace").rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def tail(self, count: int = 40) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines[-count:])

    def output(self, after: int = 0) -> list[str]:
        with self._cond:
            return [line for _, line in self.lines[after:]]

    def wait_line(self, pattern: str, timeout: float = 120.0, after: int = 0) -> float:
        """When the first line past ``after`` matching ``pattern`` arrived."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, line in self.lines[after:]:
                    if regex.search(line):
                        return at
                if self._eof:
                    code = self.proc.wait(5) if self.proc else None
                    raise RuntimeError(
                        f"tpconf up exited ({code}) before {pattern!r}:\n{self.tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no {pattern!r} within {timeout:g} s:\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.project / ".tpconf" / "state.json").read_text())
        return data

    def peak_rss_mb(self) -> tuple[float, float]:
        """(tpconf process alone, tpconf + every live descendant) VmHWM, MB."""
        own = vm_hwm_mb(self.pid)
        return own, own + sum(vm_hwm_mb(p) for p in descendants(self.pid))

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGINT (tpconf cleans up), then SIGKILL whatever of it is left."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._family = descendants(self.pid)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"bench: tpconf up did not stop in {timeout:g} s", file=sys.stderr)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # its own session: the group is only its
        for pid, start in self._family.items():
            stat = _proc_stat(pid)
            if stat and stat[1] == start:  # the same process, not a reused pid
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        return self.proc.returncode


def _mounts_under(path: Path) -> list[str]:
    try:
        text = Path("/proc/self/mounts").read_text()
    except OSError:
        return []
    points = [ln.split()[1].replace("\\040", " ") for ln in text.splitlines() if ln.strip()]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


@contextmanager
def running_up(config: str, prepare: Callable[[Path], None] | None = None) -> Iterator[UpProcess]:
    """``tpconf up`` with ``config`` in a fresh project folder; stopped and removed after."""
    project = Path(tempfile.mkdtemp(prefix="tpconf-bench-up-"))
    up = UpProcess(project)
    try:
        if prepare:
            prepare(project)
        write_config(project, config)
        up.start()
        yield up
    finally:
        code = up.stop()
        if code not in (0, None):
            print(f"bench: tpconf up exited {code}:\n{up.tail(15)}", file=sys.stderr)
        for point in _mounts_under(project):
            subprocess.run(["fusermount3", "-u", "-z", point], check=False, capture_output=True)
        if not _mounts_under(project):
            shutil.rmtree(project, ignore_errors=True)


class ClusterWatch:
    """First-seen times (monotonic) of Deployments and of Ready proxy pods, per proxy name."""

    def __init__(self, ns: BenchNamespace) -> None:
        self.ns = ns
        self.created: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.pods: dict[str, str] = {}
        """Live pod name -> proxy name."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._watches: list[Any] = []
        apps = client.AppsV1Api()
        for fn, handle in (
            (apps.list_namespaced_deployment, self._deployment),
            (ns.core.list_namespaced_pod, self._pod),
        ):
            threading.Thread(target=self._loop, args=(fn, handle), daemon=True).start()
        self._synced.wait(10)  # the pod watch has listed the namespace's existing pods
        time.sleep(0.2)

    def _loop(self, list_fn: Any, handle: Callable[[str, Any], None]) -> None:
        version: str | None = None
        while not self._stop.is_set():
            w = watch.Watch()
            self._watches.append(w)
            kwargs: dict[str, Any] = {"timeout_seconds": 900}
            if version:
                kwargs["resource_version"] = version
            try:
                for event in w.stream(list_fn, self.ns.name, **kwargs):
                    handle(event["type"], event["object"])
                    if self._stop.is_set():
                        break
                version = w.resource_version
            except Exception:  # noqa: BLE001 - reconnect (e.g. 410 Gone: from scratch)
                version = None
                time.sleep(0.2)

    def _deployment(self, kind: str, obj: Any) -> None:
        now = time.monotonic()
        if kind == "ADDED":
            with self._lock:
                self.created.setdefault(obj.metadata.name, now)

    def _pod(self, kind: str, obj: Any) -> None:
        now = time.monotonic()
        self._synced.set()
        proxy = (obj.metadata.labels or {}).get(PROXY_LABEL)
        if not proxy:
            return
        with self._lock:
            if kind == "DELETED":
                self.pods.pop(obj.metadata.name, None)
                return
            self.pods[obj.metadata.name] = proxy
            if obj.metadata.deletion_timestamp is None and _ready(obj):
                self.ready.setdefault(proxy, now)

    def alive(self, proxies: set[str]) -> list[str]:
        with self._lock:
            return [pod for pod, proxy in self.pods.items() if proxy in proxies]

    def wait_gone(self, proxies: set[str], timeout: float) -> None:
        """Until no pod of ``proxies`` is left (the next run starts on an idle node)."""
        deadline = time.monotonic() + timeout
        while self.alive(proxies) and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> None:
        self._stop.set()
        for w in self._watches:
            w.stop()


def _ready(pod: Any) -> bool:
    for cond in (pod.status and pod.status.conditions) or []:
        if cond.type == "Ready" and cond.status == "True":
            return True
    return False
