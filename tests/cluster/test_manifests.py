"""Pure manifest builders of tpconf.cluster: new, swap, keys, existing checks, labels."""

from __future__ import annotations

import copy
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tpconf import errors
from tpconf.cluster import labels as L
from tpconf.cluster import manifests as M
from tpconf.cluster.model import AgentKeys, Existing, New, ProxyRequest, Swap

AGENT = "tpconf/agent:0.1.0"


def request(operation: Any = None, ports: tuple[int, ...] = (8080,)) -> ProxyRequest:
    return ProxyRequest(
        name="web",
        namespace="dev",
        operation=operation or New(),
        agent_image=AGENT,
        session_id="abc123",
        owner="alice@laptop",
        project="p" * 16,
        keys=AgentKeys(host_private_key="HOSTKEY", authorized_keys="ssh-ed25519 AAAA alice"),
        expose_remote_ports=ports,
    )


def original_deployment() -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "dev", "resourceVersion": "42", "uid": "u-1"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {
                    "labels": {"app": "web", "app.kubernetes.io/managed-by": "Helm"},
                    "annotations": {"prometheus.io/scrape": "true"},
                },
                "spec": {
                    "serviceAccountName": "web-sa",
                    "securityContext": {"runAsUser": 0, "runAsGroup": 3000},
                    "volumes": [{"name": "config", "configMap": {"name": "web-config"}}],
                    "containers": [
                        {
                            "name": "app",
                            "image": "example/web:1.2",
                            "command": ["/web"],
                            "args": ["--port", "8080"],
                            "workingDir": "/srv",
                            "env": [{"name": "GREETING", "value": "hi"}],
                            "envFrom": [{"configMapRef": {"name": "web-env"}}],
                            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                            "livenessProbe": {"httpGet": {"path": "/", "port": 8080}},
                            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}},
                            "startupProbe": {"httpGet": {"path": "/", "port": 8080}},
                            "lifecycle": {"preStop": {"exec": {"command": ["sleep", "1"]}}},
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/web"}],
                            "securityContext": {"privileged": True, "readOnlyRootFilesystem": True},
                            "futureField": {"kept": True},
                        },
                        {"name": "sidecar", "image": "example/log:1", "args": ["--tail"]},
                    ],
                },
            },
        },
    }


def test_everything_created_carries_the_tpconf_labels_and_owner_annotations() -> None:
    req = request()
    objects = [
        M.new_deployment(req),
        M.new_service(req),
        M.keys_secret(req, name="web-tpconf-keys"),
        M.swap_deployment(request(Swap("web")), original_deployment(), None),
    ]
    for obj in objects:
        assert obj is not None
        assert obj["metadata"]["labels"][L.MANAGED_BY] == "tpconf"
        assert obj["metadata"]["labels"][L.SESSION] == "abc123"
        assert obj["metadata"]["labels"][L.DEPLOYMENT] == "web"
        assert obj["metadata"]["annotations"] == {L.OWNER: "alice@laptop", L.PROJECT: "p" * 16}


def test_new_deployment_runs_the_agent_restricted_with_a_unique_selector() -> None:
    dep = M.new_deployment(request())
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["selector"] == {"matchLabels": {L.PROXY: "web"}}
    assert spec["template"]["metadata"]["labels"][L.PROXY] == "web"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "sysctls" not in pod["securityContext"]
    (agent,) = pod["containers"]
    assert agent["image"] == AGENT
    assert agent["imagePullPolicy"] == "IfNotPresent"
    assert agent["securityContext"]["allowPrivilegeEscalation"] is False
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "runAsUser" not in agent["securityContext"]  # the image's USER applies
    assert agent["volumeMounts"] == [
        {"name": "tpconf-keys", "mountPath": "/etc/tpconf/keys", "readOnly": True}
    ]
    assert pod["volumes"] == [
        {"name": "tpconf-keys", "secret": {"secretName": "web-tpconf-keys", "defaultMode": 0o440}}
    ]


def test_new_service_exposes_the_remote_ports_and_selects_only_the_proxy() -> None:
    svc = M.new_service(request(ports=(9000, 8080, 8080)))
    assert svc is not None
    assert svc["spec"]["selector"] == {L.PROXY: "web"}
    assert svc["spec"]["ports"] == [
        {"name": "tcp-8080", "port": 8080, "targetPort": 8080, "protocol": "TCP"},
        {"name": "tcp-9000", "port": 9000, "targetPort": 9000, "protocol": "TCP"},
    ]
    assert M.new_service(request(ports=())) is None


def test_low_remote_ports_lower_the_unprivileged_port_sysctl_to_the_lowest_one() -> None:
    pod = M.new_deployment(request(ports=(8080, 443, 80)))["spec"]["template"]["spec"]
    assert pod["securityContext"]["sysctls"] == [
        {"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"}
    ]
    agent = pod["containers"][0]
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_keys_secret_is_owned_by_the_proxy_deployment_when_given() -> None:
    owner = {"metadata": {"name": "web", "uid": "u-9"}}
    secret = M.keys_secret(request(), name="web-tpconf-keys", owner=owner)
    assert secret["stringData"] == {
        "host_key": "HOSTKEY",
        "authorized_keys": "ssh-ed25519 AAAA alice",
    }
    (ref,) = secret["metadata"]["ownerReferences"]
    assert ref["kind"] == "Deployment"
    assert ref["uid"] == "u-9"


def test_agent_keys_never_show_in_repr() -> None:
    keys = AgentKeys(host_private_key="SECRET-HOST", authorized_keys="SECRET-AUTH")
    assert "SECRET" not in repr(keys)
    assert "SECRET" not in repr(request())


def test_swap_keeps_labels_env_volumes_and_sidecars_and_replaces_image_and_command() -> None:
    original = original_deployment()
    before = copy.deepcopy(original)
    dep = M.swap_deployment(request(Swap("web")), original, None)
    assert original == before, "the original is not modified"
    assert dep["metadata"]["name"] == "web-tpconf"
    template = dep["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert labels["app"] == "web"
    assert labels["app.kubernetes.io/managed-by"] == "Helm", "a Service may select on it"
    assert labels[L.PROXY] == "web-tpconf"
    assert labels[L.SESSION] == "abc123"
    assert template["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    assert dep["spec"]["selector"] == {"matchLabels": {"app": "web", L.PROXY: "web-tpconf"}}
    pod = template["spec"]
    assert pod["serviceAccountName"] == "web-sa"
    agent, sidecar = pod["containers"]
    assert sidecar == {"name": "sidecar", "image": "example/log:1", "args": ["--tail"]}
    assert agent["name"] == "app"
    assert agent["image"] == AGENT
    for removed in set(M.REMOVED_FIELDS) - {"startupProbe"}:
        assert removed not in agent
    assert agent["startupProbe"] == M.startup_probe(), "Ready = sshd accepts connections"
    assert agent["env"] == [{"name": "GREETING", "value": "hi"}]
    assert agent["envFrom"] == [{"configMapRef": {"name": "web-env"}}]
    assert agent["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert agent["futureField"] == {"kept": True}, "fields unknown to tpconf are copied"
    assert agent["volumeMounts"] == [
        {"name": "config", "mountPath": "/etc/web"},
        {"name": "tpconf-keys", "mountPath": "/etc/tpconf/keys", "readOnly": True},
    ]
    assert [v["name"] for v in pod["volumes"]] == ["config", "tpconf-keys"]
    assert pod["volumes"][1]["secret"]["secretName"] == "web-tpconf-keys"


def test_swap_makes_the_agent_non_root_and_restricted() -> None:
    dep = M.swap_deployment(request(Swap("web")), original_deployment(), None)
    pod = dep["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert sc == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
        "runAsUser": M.AGENT_UID,  # the pod said root: never for the agent
        "runAsGroup": 0,
    }
    assert pod["securityContext"]["supplementalGroups"] == [3000], "keeps the workload's group"


def test_swap_keeps_a_non_root_user_of_the_workload() -> None:
    original = original_deployment()
    original["spec"]["template"]["spec"]["securityContext"] = {"runAsUser": 4242}
    dep = M.swap_deployment(request(Swap("web")), original, None)
    sc = dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert "runAsUser" not in sc  # inherited from the pod: 4242
    assert sc["runAsGroup"] == 0


def test_swap_picks_the_named_container_and_lists_the_names_when_missing() -> None:
    dep = M.swap_deployment(request(Swap("web", "sidecar")), original_deployment(), "sidecar")
    app, sidecar = dep["spec"]["template"]["spec"]["containers"]
    assert app["image"] == "example/web:1.2"
    assert sidecar["image"] == AGENT
    with pytest.raises(errors.NotFound, match=r"no container 'db' \(containers: app, sidecar\)"):
        M.swap_deployment(request(Swap("web", "db")), original_deployment(), "db")


def test_swap_adds_the_low_port_sysctl_to_existing_ones() -> None:
    original = original_deployment()
    original["spec"]["template"]["spec"]["securityContext"] = {
        "sysctls": [{"name": "net.ipv4.tcp_syncookies", "value": "1"}]
    }
    dep = M.swap_deployment(request(Swap("web"), ports=(443,)), original, None)
    assert dep["spec"]["template"]["spec"]["securityContext"]["sysctls"] == [
        {"name": "net.ipv4.tcp_syncookies", "value": "1"},
        {"name": "net.ipv4.ip_unprivileged_port_start", "value": "443"},
    ]


def test_swap_annotations_record_owner_replicas_session_and_proxy() -> None:
    assert L.swap_annotations(
        owner="alice@laptop", project="p1", original_replicas=2, session_id="s1", proxy="web-tpconf"
    ) == {
        "tpconf.io/swapped-by": "alice@laptop",
        "tpconf.io/swap-project": "p1",
        "tpconf.io/original-replicas": "2",
        "tpconf.io/swap-session": "s1",
        "tpconf.io/proxy-deployment": "web-tpconf",
    }


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("tpconf/agent:0.1.0", True),
        ("registry.example.com:5000/tpconf/agent:0.2.0", True),
        ("tpconf/agent@sha256:abcd", True),
        ("registry.example.com/team/agent:0.1.0", False),
        ("nginx:1.27", False),
        ("tpconf/agent-debug:0.1.0", False),
    ],
)
def test_agent_image_is_recognised_by_repository(image: str, expected: bool) -> None:
    assert M.is_agent_image(image, AGENT) is expected


def test_a_configured_agent_image_in_another_repository_is_recognised() -> None:
    assert M.is_agent_image("reg.example.com/team/agent:9", "reg.example.com/team/agent:1")


def existing_deployment(image: str = AGENT, secret: str = "web-tpconf-keys") -> dict[str, Any]:
    return {
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "spec": {
                    "containers": [
                        {"name": "app", "image": "example/web:1"},
                        {
                            "name": "proxy",
                            "image": image,
                            "volumeMounts": [{"name": "keys", "mountPath": "/etc/tpconf/keys"}],
                        },
                    ],
                    "volumes": [{"name": "keys", "secret": {"secretName": secret}}],
                }
            },
        },
    }


def test_existing_finds_the_agent_container() -> None:
    assert M.check_existing(existing_deployment(), AGENT) == "proxy"


def test_existing_without_the_agent_image_says_what_runs_instead() -> None:
    with pytest.raises(errors.ClusterError, match=r"does not run the tpconf agent.*proxy=nginx:1"):
        M.check_existing(existing_deployment(image="nginx:1"), AGENT)


def test_existing_without_the_keys_secret_says_what_to_mount() -> None:
    with pytest.raises(errors.ClusterError, match=r'does not mount Secret "web-tpconf-keys"') as e:
        M.check_existing(existing_deployment(secret="other"), AGENT)
    assert e.value.hint is not None and "/etc/tpconf/keys" in e.value.hint


def test_label_values_are_made_valid() -> None:
    assert L.label_value("web") == "web"
    long = "x" * 80
    assert len(L.label_value(long)) <= 63
    assert L.label_value(long) != L.label_value(long + "y")
    assert L.label_value("a b") != "a b"


def test_project_id_is_stable_per_real_path(tmp_path: Any) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "p")
    assert L.project_id(tmp_path / "p") == L.project_id(tmp_path / "link")
    assert L.project_id(tmp_path / "p") != L.project_id(tmp_path)


def test_existing_operation_has_its_own_deployment_name() -> None:
    assert Existing("proxy").deployment == "proxy"


def test_docs_rbac_yaml_is_a_role_and_a_binding() -> None:
    role, binding = yaml.safe_load_all((Path(__file__).parents[2] / "docs/rbac.yaml").read_text())
    assert role["kind"] == "Role" and binding["kind"] == "RoleBinding"
    resources = {res for rule in role["rules"] for res in rule["resources"]}
    assert {"pods/portforward", "deployments/scale", "secrets", "pods/log"} <= resources


def test_every_agent_container_is_probed_only_until_sshd_accepts() -> None:
    """A startup probe and no readiness probe: the kubelet stops exec'ing into the agent once it
    is up (a readiness probe would run one exec per agent per second for the whole session)."""
    from tpconf.cluster.sidecar import sidecar

    new_agent = M.new_deployment(request())["spec"]["template"]["spec"]["containers"][0]
    swap_pod = M.swap_deployment(request(Swap("web")), original_deployment(), None)
    swap_agent = swap_pod["spec"]["template"]["spec"]["containers"][0]
    app = {"name": "app", "image": "example/web:1", "ports": [{"containerPort": 8080}]}
    side = sidecar(app, {}, {8080: 18080}, AGENT)
    for agent in (new_agent, swap_agent, side):
        assert "readinessProbe" not in agent
        assert "livenessProbe" not in agent
        probe = agent["startupProbe"]
        assert "/dev/tcp/127.0.0.1/8022" in probe["exec"]["command"][-1]
        assert probe["periodSeconds"] == 1
        assert probe["timeoutSeconds"] > 1, "one probe waits up to a second for the ports"
        assert probe["failureThreshold"] * probe["periodSeconds"] >= 60
    # The sidecar is also not started before its intercept listener accepts.
    assert "/dev/tcp/127.0.0.1/18080" in side["startupProbe"]["exec"]["command"][-1]


def _run_probe(probe: dict[str, Any], ports: dict[int, int]) -> int:
    """Run ``probe``'s command here, each of its ports replaced by a test port; its exit code."""
    *argv, script = probe["exec"]["command"]
    script = re.sub(r"/127\.0\.0\.1/(\d+)\b", lambda m: f"/127.0.0.1/{ports[int(m[1])]}", script)
    done = subprocess.run([*argv, script], check=False, capture_output=True, timeout=10)
    return done.returncode


def test_the_probe_waits_for_every_port_and_fails_when_one_stays_closed() -> None:
    """The probe's shell runs for real (bash), against real listeners on free ports."""
    probe = M.startup_probe([18080])
    assert probe["exec"]["command"][:2] == ["bash", "-c"]
    with socket.create_server(("127.0.0.1", 0)) as ssh, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
        ports = {8022: ssh.getsockname()[1], 18080: closed.getsockname()[1]}
        start = time.monotonic()
        assert _run_probe(probe, ports) == 1
        assert 0.9 < time.monotonic() - start < 5, "it kept trying for about a second"

    with socket.create_server(("127.0.0.1", 0)) as ssh, socket.socket() as late:
        late.bind(("127.0.0.1", 0))
        timer = threading.Timer(0.3, late.listen)
        timer.start()
        ports = {8022: ssh.getsockname()[1], 18080: late.getsockname()[1]}
        start = time.monotonic()
        assert _run_probe(probe, ports) == 0
        assert time.monotonic() - start < 1.0, "it passed as soon as both ports accepted"
        timer.join()
