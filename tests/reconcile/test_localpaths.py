"""What `tpconf plan` says `up` will mount over or write on this machine, and the warning for
paths outside the project directory (issue 11, mounts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpconf import cli
from tpconf.config import load_project
from tpconf.methods import REGISTRY
from tpconf.reconcile.localpaths import LocalPath, local_paths, outside_project

CONFIG = """\
version: 1
deployments:
  web:
    new: true
    volumes:
      mounts:
        - {pod: /etc/config, local: config}
        - {pod: /var/run/secrets, local: /etc/app-secrets}
    env:
      export: /tmp/elsewhere/web.env
  api:
    new: true
    env:
      export: api.env
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "telepresence.yaml"
    path.write_text(CONFIG)
    return path


def test_every_path_up_mounts_over_or_writes_is_listed(config: Path) -> None:
    base = config.parent
    assert local_paths(load_project(config, methods=REGISTRY)) == [
        LocalPath(base / ".tpconf", "state, control socket, children record"),
        LocalPath(base / ".tpconf/web", "the pod's filesystem is mounted", "web", "volumes.root"),
        LocalPath(base / "config", "pod path /etc/config is mounted", "web", "volumes.mounts"),
        LocalPath(
            Path("/etc/app-secrets"), "pod path /var/run/secrets is mounted", "web", "volumes.mounts"
        ),
        LocalPath(Path("/tmp/elsewhere/web.env"), "the pod environment is written", "web", "env.export"),
        LocalPath(base / ".tpconf/api", "the pod's filesystem is mounted", "api", "volumes.root"),
        LocalPath(base / "api.env", "the pod environment is written", "api", "env.export"),
    ]  # fmt: skip


def test_paths_outside_the_project_directory_are_warned_about(config: Path) -> None:
    base = config.parent
    warnings = outside_project(load_project(config, methods=REGISTRY))
    assert [w.render() for w in warnings] == [
        (
            f"{config}: warning: deployments.web.volumes.mounts: /etc/app-secrets is outside the "
            f"project directory {base}: pod path /var/run/secrets is mounted there\n"
            "  hint: check `volumes.mounts`: a relative path is relative to the file's directory"
        ),
        (
            f"{config}: warning: deployments.web.env.export: /tmp/elsewhere/web.env is outside the "
            f"project directory {base}: the pod environment is written there\n"
            "  hint: check `env.export`: a relative path is relative to the file's directory"
        ),
    ]


def test_plan_lists_the_paths_and_warns(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    assert cli.main(["plan", "-f", str(config)]) == 0
    out, err = capsys.readouterr()
    base = config.parent
    assert "paths on this machine:\n" in out
    assert f"  {base}/.tpconf (state, control socket, children record)\n" in out
    assert "  /etc/app-secrets (web: pod path /var/run/secrets is mounted)\n" in out
    assert f"  {base}/api.env (api: the pod environment is written)\n" in out
    assert err.count("is outside the project directory") == 2
