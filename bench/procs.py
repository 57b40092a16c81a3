"""Child processes of the bench: the local echo server, bare ``kubectl port-forward``, and
the tpconf side (:mod:`bench.side`). Each is a context manager that stops its process group."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.echo import SERVER
from bench.kube import KUBECTL, kubeconfig
from bench.side import SideConfig


def read_line(proc: subprocess.Popen[bytes], pattern: str, timeout: float) -> re.Match[str]:
    """Read stdout until a line matches ``pattern``; raise with stderr if the child ends first."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk.decode(errors="replace")
            for line in buffer.splitlines():
                match = re.search(pattern, line)
                if match:
                    return match
    stderr = ""
    if proc.stderr is not None and proc.poll() is not None:
        stderr = proc.stderr.read().decode(errors="replace")[-2000:]
    raise RuntimeError(f"{proc.args!r}: no {pattern!r} within {timeout:g} s: {buffer} {stderr}")


def stop(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    if proc.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
    proc.wait(grace)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@contextmanager
def local_echo() -> Iterator[tuple[str, int]]:
    """The echo server on 127.0.0.1, in its own process (as in the pod)."""
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", SERVER, "127.0.0.1", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        match = read_line(proc, r"LISTENING (\d+)", 10)
        yield ("127.0.0.1", int(match.group(1)))
    finally:
        stop(proc)


@contextmanager
def kubectl_port_forward(
    namespace: str,
    resource: str,
    port: int,
    pids: list[int] | None = None,
    *,
    prefix: Sequence[str] = (),
    config: Path | None = None,
) -> Iterator[tuple[str, int]]:
    """A bare ``kubectl port-forward RESOURCE :PORT``; each local connection is a new stream.
    Its pid is appended to ``pids`` (for CPU accounting). ``prefix`` runs it elsewhere (``ip
    netns exec NS``) with that place's kubeconfig ``config``."""
    cmd = [*prefix, KUBECTL]
    if config or kubeconfig():
        cmd += ["--kubeconfig", str(config or kubeconfig())]
    cmd += ["-n", namespace, "port-forward", resource, f":{port}", "--address", "127.0.0.1"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    if pids is not None:
        pids.append(proc.pid)
    try:
        match = read_line(proc, r"Forwarding from 127\.0\.0\.1:(\d+)", 30)
        yield ("127.0.0.1", int(match.group(1)))
    finally:
        stop(proc)


@contextmanager
def tpconf_side(cfg: SideConfig, timeout: float = 60.0) -> Iterator[dict[str, Any]]:
    """``python -m bench.side``: yields its ready line (ports, timings, cipher)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.side"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write((json.dumps(asdict(cfg)) + "\n").encode())
        proc.stdin.flush()
        match = read_line(proc, r"^(\{.*\"socks_port\".*\})$", timeout)
        info: dict[str, Any] = json.loads(match.group(1))
        info["pid"] = proc.pid
        yield info
    finally:
        try:
            proc.stdin.close()
            proc.wait(3)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop(proc)
