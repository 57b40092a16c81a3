"""Row "start": how soon ``tpconf`` gets going (issue 15, item 3).

- ``tpconf validate``: wall time of ``python -m tpconf validate`` on a one-deployment file.
- ``tpconf up -> first API request``: a ``tpconf up`` child whose kubeconfig points at a TCP
  proxy in front of the API server (same certificates: the server's address stays 127.0.0.1,
  only the port differs); the time from spawn to the proxy's first accepted connection. The
  child is then stopped (SIGINT: its own cleanup).
- ``python -c pass``: the interpreter alone, the floor of both.
- ``imports: validate's libraries`` (click, pydantic with one model, ruamel.yaml, anyio) and
  ``imports: + urllib3, PyYAML`` (the API client's transport and the kubeconfig reader): what
  tpconf cannot start without while those libraries are its dependencies; the distance from
  them to the tpconf rows is tpconf's own share. ``imports: + kubernetes.config`` is what the
  start needed while the API client was the ``kubernetes`` library's (now only for kubeconfigs
  that need it: exec and auth-provider plugins, basic auth, impersonation, a proxy).

Runs interleaved (one of each per round). The note of the up row lists the largest cumulative
imports of ``python -X importtime -m tpconf up --help`` (what runs before the first request).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench.context import Bench, Deadline
from bench.core import Row, below
from bench.kube import kubeconfig
from bench.uphost import UpProcess, up_env


class FirstConnection:
    """A TCP proxy to ``upstream`` that notes when its first connection arrives."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.first: float | None = None
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.first is None:
                self.first = time.monotonic()
            threading.Thread(target=self._pipe_pair, args=(conn,), daemon=True).start()

    def _pipe_pair(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            conn.close()
            return
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def _proxied_kubeconfig(folder: Path, port: int) -> tuple[Path, tuple[str, int]]:
    """A copy of the kubeconfig whose server is the proxy; the real server's address."""
    source = kubeconfig()
    assert source is not None, "the start row needs a kubeconfig file"
    data = yaml.safe_load(Path(source).read_text())
    cluster = data["clusters"][0]["cluster"]
    host, _, real_port = cluster["server"].removeprefix("https://").partition(":")
    cluster["server"] = f"https://{host}:{port}"
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o600)
    return path, (host, int(real_port or 443))


def _config(ns: str) -> str:
    deployment = {"new": True, "method": "inject-tcp", "volumes": False, "run": "sleep 3600"}
    return json.dumps({"version": 1, "namespace": ns, "deployments": {"start": deployment}})


def _validate(project: Path) -> float:
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "tpconf", "validate"],
        cwd=project,
        env=up_env(),
        check=True,
        capture_output=True,
        timeout=60,
    )
    return (time.monotonic() - start) * 1e3


#: The libraries each start needs before its own code runs (one pydantic model: the first model
#: builds pydantic's schema machinery).
VALIDATE_LIBRARIES = (
    "import click, anyio, ruamel.yaml\n"
    "from pydantic import BaseModel\n"
    "class M(BaseModel):\n"
    "    x: int = 0\n"
    "M.model_validate({'x': 1})"
)
UP_LIBRARIES = VALIDATE_LIBRARIES + "\nimport urllib3, yaml"
LIBRARY_CLIENT = VALIDATE_LIBRARIES + "\nimport kubernetes.config"


def _bare(code: str = "pass") -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    return (time.monotonic() - start) * 1e3


def _first_request(project: Path) -> float:
    folder = Path(tempfile.mkdtemp(prefix="tpconf-bench-start-"))
    proxy = FirstConnection(("127.0.0.1", 0))
    path, upstream = _proxied_kubeconfig(folder, proxy.port)
    proxy.upstream = upstream
    env = up_env()
    env["KUBECONFIG"] = str(path)
    up = UpProcess(project, env=env)
    try:
        up.start()
        deadline = time.monotonic() + 30
        while proxy.first is None and time.monotonic() < deadline:
            time.sleep(0.001)
        if proxy.first is None:
            raise RuntimeError(f"tpconf up made no API request within 30 s:\n{up.tail()}")
        return (proxy.first - up.started) * 1e3
    finally:
        up.stop()
        proxy.close()


def _importtime() -> str:
    """The largest cumulative imports of ``tpconf up`` before it runs (``--help`` exits there)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import tpconf.cli, tpconf.reconcile.up"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stderr
    rows = []
    for line in out.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if parts[1].isdigit() and len(parts[2]) - len(parts[2].lstrip()) <= 2:
            rows.append((int(parts[1]), parts[2].strip()))
    rows.sort(reverse=True)
    return ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in rows[:8])


def start(bench: Bench) -> None:
    name = "start"
    rows = {
        "python -c pass": bench.table.add(Row(name, "python -c pass", "ms")),
        "validate libraries": bench.table.add(Row(name, "imports: validate's libraries", "ms")),
        "up libraries": bench.table.add(Row(name, "imports: + urllib3, PyYAML", "ms")),
        "library client": bench.table.add(Row(name, "imports: + kubernetes.config", "ms")),
        "validate": bench.table.add(Row(name, "tpconf validate", "ms")),
        "up": bench.table.add(Row(name, "tpconf up -> first API request", "ms")),
    }
    rows["validate"].target, rows["validate"].check = "<= 200 ms", below(200.001)
    rows["up"].target, rows["up"].check = "<= 300 ms", below(300.001)
    project = Path(tempfile.mkdtemp(prefix="tpconf-bench-start-project-"))
    (project / "telepresence.yaml").write_text(_config(bench.ns.name))
    _validate(project)  # warm the page cache and .pyc files
    deadline = Deadline(300)
    for _ in range(bench.sizes.startup_runs):
        if not deadline:
            break
        rows["python -c pass"].samples.append(_bare())
        rows["validate libraries"].samples.append(_bare(VALIDATE_LIBRARIES))
        rows["up libraries"].samples.append(_bare(UP_LIBRARIES))
        rows["library client"].samples.append(_bare(LIBRARY_CLIENT))
        rows["validate"].samples.append(_validate(project))
        rows["up"].samples.append(_first_request(project))
    rows["up"].note = "largest imports (cumulative): " + _importtime()
