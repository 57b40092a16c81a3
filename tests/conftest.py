"""Shared fixtures: the anyio backend, and the real cluster for e2e tests.

``cluster`` (session) is the one way every test reaches Kubernetes: an :class:`E2ECluster`, the
cluster of ``$KUBECONFIG`` when it is set (any real cluster: kind, k3d, a cloud one), else the
project's local one (/var/lib/tpconf-cluster/admin.kubeconfig). The fixture never builds or starts
a cluster: ``make test`` and ``make test-e2e`` start the local one first (``make cluster
agent-image``). When no cluster answers, every test that asks for one fails with that advice.
Nothing is mocked; tests that use the cluster are marked ``e2e`` (``pytest -m 'not e2e'`` needs none).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from tpconf.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
LOCAL_STATE = Path("/var/lib/tpconf-cluster")
LOCAL_KUBECONFIG = LOCAL_STATE / "admin.kubeconfig"
NO_CLUSTER_HINT = (
    "run `make cluster agent-image` (the local cluster, needs root) or set KUBECONFIG to a running "
    "cluster; `pytest -m 'not e2e'` runs the tests that need none"
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass(frozen=True)
class E2ECluster:
    """A reachable cluster, as admin: its kubeconfig and the kubectl that matches it."""

    kubeconfig: str
    kubectl_path: str

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raises with its stderr when ``check`` fails."""
        proc = subprocess.run(
            [self.kubectl_path, "--kubeconfig", self.kubeconfig, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def connect(self, namespace: str | None = None) -> Cluster:
        """tpconf's own client for this cluster (close it when done)."""
        from tpconf.cluster import connect

        return connect(kubeconfig=self.kubeconfig, namespace=namespace)

    def api_client(self) -> ApiClient:
        """The plain ``kubernetes`` client, for test setup only (close it when done)."""
        from kubernetes import config

        client: ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=self.kubeconfig, persist_config=False
        )
        return client

    def problem(self) -> str | None:
        """Why this cluster cannot be used, or None when its API server answers ready."""
        if not Path(self.kubeconfig).is_file():
            return f"no kubeconfig at {self.kubeconfig}"
        try:
            proc = self.kubectl("get", "--raw=/readyz", "--request-timeout=10s", check=False)
        except subprocess.TimeoutExpired:
            return f"the API server of {self.kubeconfig} did not answer within 120 s"
        if proc.returncode != 0 or proc.stdout.strip() != "ok":
            why = proc.stderr.strip().splitlines()[-1:] or [proc.stdout.strip()]
            return f"the API server of {self.kubeconfig} is not ready: {why[0]}"
        return None


def admin_ca_data() -> str | None:
    """The CA of the test cluster's kubeconfig (base64 PEM), for clients built from a token."""
    from tpconf.kubeconfig import files_of, minified_view, parts

    kubeconfig = os.environ.get("KUBECONFIG") or str(LOCAL_KUBECONFIG)
    _, cluster, _ = parts(minified_view(files_of(kubeconfig)))
    ca = cluster.get("certificate-authority-data")
    return str(ca) if ca else None


def _kubectl_path() -> str | None:
    local = LOCAL_STATE / "bin" / "kubectl"
    if local.exists():
        return str(local)
    return shutil.which("kubectl")


@pytest.fixture(scope="session")
def cluster() -> E2ECluster:
    """The running cluster (``$KUBECONFIG``, else the local one); fails when none answers."""
    kubeconfig = os.environ.get("KUBECONFIG") or str(LOCAL_KUBECONFIG)
    kubectl = _kubectl_path()
    if kubectl is None:
        pytest.fail(f"no cluster: kubectl not found; {NO_CLUSTER_HINT}", pytrace=False)
    found = E2ECluster(kubeconfig=kubeconfig, kubectl_path=kubectl)
    problem = found.problem()
    if problem is not None:
        pytest.fail(f"no cluster: {problem}; {NO_CLUSTER_HINT}", pytrace=False)
    return found


@pytest.fixture
def namespace(cluster: E2ECluster) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting for it to go)."""
    name = f"tpconf-test-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _reaches_the_cluster(item: pytest.Item) -> bool:
    """Whether ``item`` gets the ``cluster`` fixture above, directly or through other fixtures
    (a parameter or another fixture of that name does not count)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "cluster" in callspec.params:
        return False
    info = getattr(item, "_fixtureinfo", None)  # pytest's own record of the fixture closure
    if info is None or not info.name2fixturedefs.get("cluster"):
        return False
    used = info.name2fixturedefs["cluster"][-1].func  # the closest definition wins
    return (used.__module__, used.__name__) == (__name__, "cluster")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reaches the cluster must be marked ``e2e``: else ``pytest -m 'not e2e'``
    would run it on a machine without one. Checked before ``-m`` deselects anything."""
    del config
    unmarked = [
        i.nodeid for i in items if _reaches_the_cluster(i) and not i.get_closest_marker("e2e")
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests use the `cluster` fixture but are not marked e2e: " + ", ".join(unmarked)
        )


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
