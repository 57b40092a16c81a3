"""Shared fixtures: the anyio backend, and the real cluster for e2e tests.

The ``cluster`` fixture uses ``$KUBECONFIG`` when it is set (any real cluster: kind, k3d, a cloud
one) and otherwise starts the project's own local cluster once per test session (``make cluster``,
idempotent). It never mocks anything: a test that needs the cluster and cannot get one fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCAL_STATE = Path("/var/lib/tpconf-cluster")
LOCAL_KUBECONFIG = LOCAL_STATE / "admin.kubeconfig"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass(frozen=True)
class Cluster:
    """A reachable cluster and the kubectl that matches it."""

    kubeconfig: Path
    kubectl_path: str

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raises with its stderr when ``check`` fails."""
        proc = subprocess.run(
            [self.kubectl_path, "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc


def _kubectl_path() -> str:
    local = LOCAL_STATE / "bin" / "kubectl"
    if local.exists():
        return str(local)
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: run `make cluster` or put kubectl on PATH")
    return found


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    env = os.environ.get("KUBECONFIG")
    if env:
        return Cluster(kubeconfig=Path(env), kubectl_path=_kubectl_path())
    subprocess.run(["make", "-C", str(ROOT), "cluster", "agent-image"], check=True, timeout=3600)
    return Cluster(kubeconfig=LOCAL_KUBECONFIG, kubectl_path=_kubectl_path())


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting for it to go)."""
    name = f"tpconf-test-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With TPCONF_NO_SKIPS=1 (CI sets it) a skipped test fails: on a machine set up by
    scripts/install-deps.sh every test can run, so a skip there means something is missing."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("TPCONF_NO_SKIPS") == "1" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but TPCONF_NO_SKIPS=1 forbids skips: {reason}"
