"""Valid files: shorthands, defaults, resolution to DeploymentSpec, warnings, interpolation."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tpconf.config import (
    DEFAULT_AGENT_IMAGE,
    ConfigWarning,
    EnvExport,
    EnvSpec,
    ExistingOp,
    HeaderMatch,
    InterceptOp,
    Mount,
    NewOp,
    PortMapping,
    Project,
    SwapOp,
    VolumesSpec,
    parse_project,
)
from tpconf.config.interpolate import InterpolationError, interpolate
from tpconf.errors import ConfigError
from tpconf.methods import REGISTRY


def load(text: str, base: Path, **env: str) -> Project:
    return parse_project("version: 1\n" + text, base_dir=base, methods=REGISTRY, env=env)


def test_the_smallest_file_resolves_every_default(tmp_path: Path) -> None:
    project = load("deployments:\n  quickstart:\n    new: true\n", tmp_path)
    (spec,) = project.deployments
    assert spec.name == "quickstart"
    assert spec.operation == NewOp(DEFAULT_AGENT_IMAGE)
    assert spec.method == "inject-tcp"
    assert spec.expose == ()
    assert spec.volumes == VolumesSpec(root=tmp_path / ".tpconf" / "quickstart")
    assert spec.env == EnvSpec()
    assert spec.run is None
    assert spec.shell is False
    assert spec.namespace is None
    assert spec.context is None
    assert spec.agent_image == DEFAULT_AGENT_IMAGE
    assert project.warnings == ()
    assert project.source_path == tmp_path / "telepresence.yaml"


@pytest.mark.parametrize(
    ("written", "operation"),
    [
        ("new: true", NewOp(DEFAULT_AGENT_IMAGE)),
        ("new:", NewOp(DEFAULT_AGENT_IMAGE)),
        ("new: {}", NewOp(DEFAULT_AGENT_IMAGE)),
        ("new: {image: 'me/agent:2'}", NewOp("me/agent:2")),
        ("swap: true", SwapOp("web")),
        ("swap: other", SwapOp("other")),
        ("swap: other:app", SwapOp("other", "app")),
        ("swap: {container: app}", SwapOp("web", "app")),
        ("swap: {deployment: a.b, container: app}", SwapOp("a.b", "app")),
        ("existing: true", ExistingOp("web")),
        ("existing: proxy", ExistingOp("proxy")),
        ("existing: {deployment: proxy}", ExistingOp("proxy")),
        ("new: {name: api-dev}", NewOp(DEFAULT_AGENT_IMAGE, "api-dev")),
        ("intercept: true", InterceptOp("web")),
        ("intercept: api", InterceptOp("api")),
        ("intercept: api:app", InterceptOp("api", "app")),
        (
            "intercept: {ports: [8080, '9000:90'], headers: {X-Dev: alice, b: {regex: 'a.*'}}}",
            InterceptOp(
                "web",
                None,
                (PortMapping(8080, 8080), PortMapping(9000, 90)),
                (HeaderMatch("b", "a.*", regex=True), HeaderMatch("x-dev", "alice")),
            ),
        ),
    ],
)
def test_operation_shorthands(written: str, operation: object, tmp_path: Path) -> None:
    project = load(f"deployments:\n  web:\n    {written}\n", tmp_path)
    assert project.deployments[0].operation == operation


def test_a_personal_name_for_a_new_deployment_comes_from_the_environment(tmp_path: Path) -> None:
    project = load(
        "deployments:\n  api:\n    new:\n      name: api-${USER}\n", tmp_path, USER="alice"
    )
    spec = project.deployment("api")
    assert spec.target == "api-alice" and spec.name == "api"


def test_new_image_is_the_agent_image_of_that_deployment(tmp_path: Path) -> None:
    project = load(
        "deployments:\n  a:\n    new: {image: 'x/y:1'}\n    agent-image: z:2\n", tmp_path
    )
    assert project.deployments[0].agent_image == "x/y:1"


def test_expose_forms(tmp_path: Path) -> None:
    project = load(
        'deployments:\n  a:\n    new: true\n    expose: [8080, "9000:9090", "7000"]\n', tmp_path
    )
    assert project.deployments[0].expose == (
        PortMapping(8080, 8080),
        PortMapping(9000, 9090),
        PortMapping(7000, 7000),
    )
    assert [str(p) for p in project.deployments[0].expose] == ["8080", "9000:9090", "7000"]


def test_one_local_port_may_feed_several_remote_ports(tmp_path: Path) -> None:
    project = load(
        'deployments:\n  a:\n    new: true\n    expose: ["8080:8080", "8080:8081"]\n', tmp_path
    )
    assert len(project.deployments[0].expose) == 2


def test_also_proxy_is_parsed_into_hosts_and_networks(tmp_path: Path) -> None:
    text = (
        "deployments:\n  a:\n    swap: true\n    method: vpn-tcp\n"
        "    also-proxy: [DB.Example.com., 10.1.2.3, 10.0.0.0/8, '2001:db8::/32', '::1']\n"
    )
    assert load(text, tmp_path).deployments[0].also_proxy == (
        "db.example.com",
        ipaddress.ip_network("10.1.2.3/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("::1/128"),
    )


def test_volumes_paths_are_absolute_and_relative_to_the_file(tmp_path: Path) -> None:
    text = (
        "deployments:\n  a:\n    new: true\n    volumes:\n      root: data/a\n      real-paths: true\n"
        "      mounts:\n        - {pod: /var/run/secrets/kubernetes.io/, local: ./.k8s, read-only: true}\n"
        "        - {pod: /etc//config, local: /abs/config}\n"
    )
    volumes = load(text, tmp_path).deployments[0].volumes
    assert volumes == VolumesSpec(
        root=tmp_path / "data" / "a",
        mounts=(
            Mount("/var/run/secrets/kubernetes.io", tmp_path / ".k8s", read_only=True),
            Mount("/etc/config", Path("/abs/config")),
        ),
        real_paths=True,
    )


def test_volumes_false_mounts_nothing(tmp_path: Path) -> None:
    project = load("deployments:\n  a:\n    new: true\n    volumes: false\n", tmp_path)
    assert project.deployments[0].volumes is None


def test_env_values_are_strings_sorted_by_name(tmp_path: Path) -> None:
    text = (
        "deployments:\n  a:\n    new: true\n    env:\n      set: {Z: 1, B: true, A: text, F: 1.5}\n"
    )
    spec = load(text, tmp_path).deployments[0]
    assert spec.env.set == (("A", "text"), ("B", "true"), ("F", "1.5"), ("Z", "1"))
    assert spec.env.as_dict() == {"A": "text", "B": "true", "F": "1.5", "Z": "1"}


@pytest.mark.parametrize(
    ("written", "file", "fmt"),
    [
        ("export: .env.a", ".env.a", "dotenv"),
        ("export: out/env.json", "out/env.json", "json"),
        ("export: {file: env.txt, format: json}", "env.txt", "json"),
        ("export: {file: env.json, format: dotenv}", "env.json", "dotenv"),
    ],
)
def test_env_export_forms(written: str, file: str, fmt: str, tmp_path: Path) -> None:
    text = f"deployments:\n  a:\n    new: true\n    env:\n      {written}\n"
    assert load(text, tmp_path).deployments[0].env.export == EnvExport(tmp_path / file, fmt)  # type: ignore[arg-type]


def test_run_as_string_or_argv(tmp_path: Path) -> None:
    text = (
        "deployments:\n  a:\n    new: true\n    run: npm start\n"
        "  b:\n    new: true\n    run: [sleep, 10]\n  c:\n    new: true\n    shell: true\n"
    )
    a, b, c = load(text, tmp_path).deployments
    assert a.run == "npm start"
    assert b.run == ("sleep", "10")
    assert c.run is None and c.shell is True


def test_defaults_are_inherited_and_replaced_per_key(tmp_path: Path) -> None:
    text = (
        "namespace: dev\ncontext: kind\n"
        "defaults:\n  method: vpn-tcp\n  agent-image: me/agent:1\n  env: {set: {A: '1'}}\n"
        "deployments:\n"
        "  a:\n    swap: true\n"
        "  b:\n    swap: true\n    method: inject-tcp\n    env: {set: {B: '2'}}\n"
        "    namespace: other\n    context: kind\n"
    )
    a, b = load(text, tmp_path).deployments
    assert (a.method, a.agent_image, a.env.set, a.namespace, a.context) == (
        "vpn-tcp",
        "me/agent:1",
        (("A", "1"),),
        "dev",
        "kind",
    )
    assert (b.method, b.env.set, b.namespace) == ("inject-tcp", (("B", "2"),), "other")


def test_order_of_deployments_is_kept(tmp_path: Path) -> None:
    text = "deployments:\n" + "".join(f"  d{i}:\n    swap: true\n" for i in (3, 1, 2))
    assert load(text, tmp_path).names == ("d3", "d1", "d2")


def test_vpn_tcp_deployments_on_one_context_are_valid(tmp_path: Path) -> None:
    text = (
        "context: prod\ndeployments:\n  a:\n    swap: true\n    method: vpn-tcp\n"
        "  b:\n    swap: true\n    method: vpn-tcp\n    context: prod\n"
        "  c:\n    swap: true\n    context: staging\n"
    )
    assert len(load(text, tmp_path).deployments) == 3


def test_vpn_cidrs_are_networks(tmp_path: Path) -> None:
    text = "vpn:\n  pod-cidrs: [10.244.0.0/16]\n  service-cidrs: ['fd00::/108']\ndeployments: {}\n"
    vpn = load(text, tmp_path).vpn
    assert vpn.pod_cidrs == (ipaddress.ip_network("10.244.0.0/16"),)
    assert vpn.service_cidrs == (ipaddress.ip_network("fd00::/108"),)


def test_specs_are_hashable_and_compare_by_value(tmp_path: Path) -> None:
    text = "deployments:\n  a:\n    new: true\n    expose: [8080]\n    env: {set: {A: b}}\n"
    one, two = load(text, tmp_path), load(text, tmp_path)
    assert one.deployments == two.deployments
    assert hash(one.deployments[0]) == hash(two.deployments[0])
    changed = load(text.replace("8080", "8081"), tmp_path)
    assert changed.deployments[0] != one.deployments[0]


def test_yaml_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    text = (
        "deployments:\n  a: &base\n    new: true\n    expose: [8080]\n"
        "  b:\n    <<: *base\n    expose: [9090]\n"
    )
    _, b = load(text, tmp_path).deployments
    assert b.expose == (PortMapping(9090, 9090),)
    assert isinstance(b.operation, NewOp)


def test_yaml_1_2_booleans_only(tmp_path: Path) -> None:
    # `yes` is a string in YAML 1.2, so it is an error for a boolean and a value for env.
    text = "deployments:\n  a:\n    new: true\n    env: {set: {A: yes}}\n"
    assert load(text, tmp_path).deployments[0].env.set == (("A", "yes"),)


# ---- warnings ------------------------------------------------------------------------------------


def test_a_remote_port_below_1024_warns_at_its_position(tmp_path: Path) -> None:
    project = load('deployments:\n  a:\n    new: true\n    expose: [8080, "8081:80"]\n', tmp_path)
    (warning,) = project.warnings
    assert str(warning) == (
        "telepresence.yaml:5:20: warning: deployments.a.expose[1]: remote port 80 is below 1024: "
        "the proxy in the pod must run as root to listen on it, which OpenShift-style clusters "
        "do not allow"
    )


def test_also_proxy_with_inject_tcp_warns_at_the_key(tmp_path: Path) -> None:
    project = load("deployments:\n  a:\n    new: true\n    also-proxy: [db]\n", tmp_path)
    (warning,) = project.warnings
    assert isinstance(warning, ConfigWarning)
    assert str(warning).startswith("telepresence.yaml:5:5: warning: deployments.a.also-proxy: ")
    assert warning.hint == "remove `also-proxy`, or use `method: vpn-tcp`"


def test_a_warning_from_defaults_is_reported_once(tmp_path: Path) -> None:
    text = "defaults:\n  expose: [80]\ndeployments:\n  a:\n    new: true\n  b:\n    new: true\n"
    (warning,) = load(text, tmp_path).warnings
    assert warning.loc == "defaults.expose[0]"


def test_warnings_are_sorted_by_position(tmp_path: Path) -> None:
    text = "deployments:\n  a:\n    new: true\n    also-proxy: [db]\n    expose: [80, 81]\n"
    lines = [(w.position.line, w.position.column) for w in load(text, tmp_path).warnings]
    assert lines == sorted(lines) and len(lines) == 3


# ---- interpolation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "plain"),
        ("${A}", "a"),
        ("x-${A}-y", "x-a-y"),
        ("${UNSET:-fallback}", "fallback"),
        ("${EMPTY:-fallback}", "fallback"),
        ("${A:-fallback}", "a"),
        ("${UNSET:-}", ""),
        ("${UNSET:-a b:c}", "a b:c"),
        ("$$", "$"),
        ("$${A}", "${A}"),
        ("cost: $5", "cost: $5"),
        ("$A", "$A"),
        ("${A}${B}", "ab"),
        ("${EMPTY}", ""),
    ],
)
def test_interpolation(text: str, expected: str) -> None:
    assert interpolate(text, {"A": "a", "B": "b", "EMPTY": ""}) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${UNSET}", "environment variable `UNSET` is not set"),
        ("${", "`${` is not closed by `}`"),
        ("${A B}", "`${A B}` is not a valid variable reference"),
        ("${}", "`${}` is not a valid variable reference"),
        ("${A:default}", "`${A:default}` is not a valid variable reference"),
    ],
)
def test_interpolation_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(InterpolationError) as info:
        interpolate(text, {"A": "a"})
    assert info.value.message == message


def test_interpolation_applies_to_values_of_every_type(tmp_path: Path) -> None:
    text = (
        "context: ${CTX:-}\nnamespace: ${NS}\ndeployments:\n  a:\n    new: true\n"
        "    expose: ['${PORT}']\n    shell: ${SHELL_ON:-false}\n    run: echo $$HOME ${MSG}\n"
    )
    project = load(text, tmp_path, NS="dev", PORT="8080", MSG="hi")
    spec = project.deployments[0]
    assert project.context is None and spec.context is None
    assert spec.namespace == "dev"
    assert spec.expose == (PortMapping(8080, 8080),)
    assert spec.run == "echo $HOME hi"


def test_keys_are_not_interpolated(tmp_path: Path) -> None:
    text = "deployments:\n  a:\n    new: true\n    env: {set: {'${X}': v}}\n"
    with pytest.raises(ConfigError) as info:
        load(text, tmp_path, X="Y")
    assert info.value.message == "`${X}` is not a valid environment variable name"


def test_interpolation_uses_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TPCONF_TEST_NS", "from-env")
    text = "version: 1\nnamespace: ${TPCONF_TEST_NS}\ndeployments: {}\n"
    assert parse_project(text, base_dir=tmp_path, methods=REGISTRY).namespace == "from-env"


def test_a_version_from_a_variable_is_accepted(tmp_path: Path) -> None:
    project = parse_project(
        "version: ${V}\ndeployments: {}\n", base_dir=tmp_path, methods=REGISTRY, env={"V": "1"}
    )
    assert project.deployments == ()
