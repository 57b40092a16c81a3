"""The pod's volumes on this machine (sshfs over the deployment's own SSH connection)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import E2ECluster
from tests.e2e import harness
from tests.e2e.harness import Up, file_text, wait_until, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SA = "/var/run/secrets/kubernetes.io/serviceaccount"


def test_swapped_deployment_volumes_appear_locally(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    ns = namespace
    harness.deploy(
        cluster,
        ns,
        harness.secret("db", {"password": "s3cret"}),
        harness.config_map("settings", {"mode": "fast"}),
        harness.deployment(
            "app",
            harness.NGINX,
            volumes=[
                harness.secret_volume("db", "/etc/db", read_only=True),
                harness.config_map_volume("settings", "/etc/settings"),
            ],
        ),
    )
    script = (
        'cat "$TELEPRESENCE_ROOT/etc/db/password" > password.txt; '
        'cat "$TELEPRESENCE_ROOT/etc/settings/mode" > mode.txt; '
        'echo "$TELEPRESENCE_MOUNTS" > mounts.txt; '
        "cat k8s/serviceaccount/namespace > mapped-ns.txt; "
        "if touch k8s/serviceaccount/x 2>/dev/null; then echo writable; else echo refused; fi"
        " > readonly.txt; "
        f"cat {SA}/namespace > real-path.txt"
    )
    write_config(
        tmp_path,
        f"""\
version: 1
namespace: {ns}
deployments:
  app:
    swap: true
    volumes:
      root: pod-root
      real-paths: true
      mounts:
        - pod: /var/run/secrets/kubernetes.io
          local: k8s
          read-only: true
    run: {script!r}
""",
    )
    up = Up(cluster, tmp_path).start()
    try:
        up.wait_for(r"^app ready")
        wait_until(lambda: (tmp_path / "real-path.txt").exists(), 60, "the process to finish")
        up.wait_for(r"app exited with code 0")
        assert file_text(tmp_path / "password.txt") == "s3cret"
        assert file_text(tmp_path / "mode.txt") == "fast"
        mounts = file_text(tmp_path / "mounts.txt").strip().split(":")
        assert {"/etc/db", "/etc/settings", SA} <= set(mounts), mounts
        assert file_text(tmp_path / "mapped-ns.txt") == ns
        assert file_text(tmp_path / "readonly.txt").strip() == "refused"
        assert file_text(tmp_path / "real-path.txt") == ns
        assert (tmp_path / "pod-root" / SA.lstrip("/") / "token").read_text().count(".") == 2
    finally:
        assert up.stop() == 0, up.output[-3000:]
    # Unmounted first, then removed.
    mounts_after = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in mounts_after
    assert not (tmp_path / "pod-root").exists()
