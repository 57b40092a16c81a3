"""The kubeconfig read as kubectl reads it (tpconf.kubeconfig), checked against kubectl itself."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import _kubectl_path
from tpconf.kubeconfig import KubeconfigError, files_of, minified_view, parts


def _write(path: Path, data: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def two_files(tmp_path: Path) -> list[str]:
    """Two kubeconfigs that overlap, with relative paths, as a team's $KUBECONFIG may be."""
    (tmp_path / "a" / "certs").mkdir(parents=True)
    (tmp_path / "a" / "certs" / "ca.pem").write_text("CA-OF-A\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ca.pem").write_text("CA-OF-B\n")
    (tmp_path / "b" / "client.crt").write_text("CERT-OF-B\n")
    (tmp_path / "b" / "client.key").write_text("KEY-OF-B\n")
    (tmp_path / "b" / "token").write_text("tok\n")
    first = _write(
        tmp_path / "a" / "config",
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "shared",
                    "cluster": {
                        "server": "https://a.example:6443",
                        "certificate-authority": "certs/ca.pem",
                    },
                }
            ],
            "users": [{"name": "dev", "user": {"token": "from-a"}}],
            "contexts": [
                {"name": "staging", "context": {"cluster": "shared", "user": "dev"}},
            ],
        },
    )
    second = _write(
        tmp_path / "b" / "config",
        {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "other",
            "clusters": [
                {"name": "shared", "cluster": {"server": "https://b.example"}},
                {
                    "name": "own",
                    "cluster": {
                        "server": "https://own.example:8443",
                        "certificate-authority": "ca.pem",
                        "tls-server-name": "api.internal",
                    },
                },
            ],
            "users": [
                {"name": "dev", "user": {"token": "from-b"}},
                {
                    "name": "certs",
                    "user": {"client-certificate": "client.crt", "client-key": "client.key"},
                },
                {"name": "files", "user": {"tokenFile": "token"}},
                {
                    "name": "plugin",
                    "user": {
                        "exec": {
                            "apiVersion": "client.authentication.k8s.io/v1",
                            "command": "bin/get-token",
                            "args": ["--x"],
                            "interactiveMode": "Never",
                        }
                    },
                },
            ],
            "contexts": [
                {"name": "staging", "context": {"cluster": "own", "user": "certs"}},
                {
                    "name": "other",
                    "context": {"cluster": "own", "user": "certs", "namespace": "team"},
                },
                {"name": "tokens", "context": {"cluster": "shared", "user": "files"}},
                {"name": "exec", "context": {"cluster": "own", "user": "plugin"}},
            ],
        },
    )
    return [first, second]


def test_the_first_file_wins_each_name_and_the_current_context(two_files: list[str]) -> None:
    view = minified_view(two_files)
    ctx, cluster, user = parts(view)
    assert view["current-context"] == "other"  # only the second file sets one
    assert ctx == {"cluster": "own", "user": "certs", "namespace": "team"}
    assert cluster["server"] == "https://own.example:8443"
    # Relative paths are read from the directory of the file that names them, then inlined.
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA-OF-B\n"
    assert base64.b64decode(user["client-certificate-data"]) == b"CERT-OF-B\n"
    assert "client-key" not in user

    ctx, cluster, user = parts(minified_view(two_files, "staging"))
    assert ctx["cluster"] == "shared" and user == {"token": "from-a"}  # a's, not b's
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA-OF-A\n"

    _, _, user = parts(minified_view(two_files, "tokens"))
    assert user["tokenFile"] == os.path.join(os.path.dirname(two_files[1]), "token")
    _, _, user = parts(minified_view(two_files, "exec"))
    assert user["exec"]["command"] == os.path.join(os.path.dirname(two_files[1]), "bin/get-token")


def test_an_unknown_or_missing_context_names_the_ones_there_are(two_files: list[str]) -> None:
    with pytest.raises(KubeconfigError, match=r"no context 'prod' \(contexts: exec, other, "):
        minified_view(two_files, "prod")
    with pytest.raises(KubeconfigError, match="no current-context is set"):
        minified_view(two_files[:1])


def test_a_file_that_is_not_yaml_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "config"
    bad.write_text("clusters: [\n")
    with pytest.raises(KubeconfigError, match=f"{bad} is not valid YAML"):
        minified_view([str(bad)])
    bad.write_text("- a list\n")
    with pytest.raises(KubeconfigError, match="not a kubeconfig"):
        minified_view([str(bad)])


def test_files_of_skips_missing_and_empty_files_like_kubectl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = _write(tmp_path / "full", {"current-context": "x"})
    (tmp_path / "empty").write_text("")
    listing = os.pathsep.join([str(tmp_path / "missing"), str(tmp_path / "empty"), full, full])
    assert files_of(listing) == [full]
    monkeypatch.setenv("KUBECONFIG", listing)
    assert files_of() == [full]


@pytest.mark.parametrize("context", [None, "staging", "other", "tokens", "exec"])
def test_the_view_is_what_kubectl_config_view_minify_flatten_prints(
    two_files: list[str], context: str | None
) -> None:
    kubectl = _kubectl_path()
    assert kubectl is not None, "kubectl is built by `make cluster` (tests/cluster/build.sh)"
    cmd = [kubectl, "config", "view", "--minify", "--flatten", "--raw", "-o", "json"]
    if context:
        cmd += ["--context", context]
    env = {**os.environ, "KUBECONFIG": os.pathsep.join(two_files)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True)
    theirs = json.loads(out.stdout)
    ours = minified_view(two_files, context)
    # kubectl prints a token file and a plugin's command as written, and resolves them against
    # the file's directory when it uses them (client-go's ResolveLocalPaths): the view holds them
    # resolved.
    base = os.path.dirname(two_files[1])
    kube_user = parts(theirs)[2]
    if "tokenFile" in kube_user:
        kube_user["tokenFile"] = os.path.join(base, kube_user["tokenFile"])
    if "exec" in kube_user:
        # kubectl also prints the defaults it fills in (`env: null`, `provideClusterInfo: false`).
        spec = {k: v for k, v in kube_user["exec"].items() if v not in (None, False)}
        kube_user["exec"] = {**spec, "command": os.path.join(base, spec["command"])}
    for mine, kube in zip(parts(ours), parts(theirs), strict=True):
        assert mine == kube
    assert ours["current-context"] == theirs["current-context"]
