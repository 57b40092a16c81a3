"""Invalid telepresence.yaml files: the exact message and position of every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpconf.config import parse_project
from tpconf.errors import ConfigError, ConfigErrors
from tpconf.methods import REGISTRY

# (case id, file content, every error as `file:line:col: loc: message`, one per line)
INVALID = [
    (
        "unsupported-version",
        "version: 2\ndeployments: {}\n",
        "telepresence.yaml:1:10: version: unsupported version `2`: this tpconf reads version 1",
    ),
    (
        "version-string",
        "version: one\ndeployments: {}\n",
        "telepresence.yaml:1:10: version: unsupported version `one`: this tpconf reads version 1",
    ),
    (
        "missing-version",
        "deployments: {}\n",
        "telepresence.yaml:1:1: missing required key `version`",
    ),
    (
        "missing-deployments",
        "version: 1\n",
        "telepresence.yaml:1:1: missing required key `deployments`",
    ),
    (
        "root-list",
        "- version: 1\n",
        "telepresence.yaml:1:1: the top level must be a mapping with keys such as `version` and `deployments`, not a list",
    ),
    (
        "root-scalar",
        "hello\n",
        "telepresence.yaml:1:1: the top level must be a mapping with keys such as `version` and `deployments`, not a string",
    ),
    (
        "deployments-list",
        "version: 1\ndeployments: [a]\n",
        "telepresence.yaml:2:1: deployments: expected a mapping, got a list",
    ),
    (
        "unknown-top-key",
        "version: 1\ndeploy: {}\ndeployments: {}\n",
        "telepresence.yaml:2:1: deploy: unknown key `deploy`",
    ),
    (
        "snake-case-key",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    also_proxy: [db]\n",
        "telepresence.yaml:5:5: deployments.hello.also_proxy: unknown key `also_proxy`",
    ),
    (
        "misspelled-key",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    expsoe: [8080]\n",
        "telepresence.yaml:5:5: deployments.hello.expsoe: unknown key `expsoe`",
    ),
    (
        "unknown-key-no-match",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    zzz: 1\n",
        "telepresence.yaml:5:5: deployments.hello.zzz: unknown key `zzz`",
    ),
    (
        "bad-expose-shape",
        'version: 1\ndeployments:\n  hello:\n    new: true\n    expose: [8080, "8080:80:1"]\n',
        "telepresence.yaml:5:20: deployments.hello.expose[1]: expected PORT or LOCAL:REMOTE, got `8080:80:1`",
    ),
    (
        "expose-out-of-range",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    expose: [0, 70000]\n",
        "telepresence.yaml:5:14: deployments.hello.expose[0]: port 0 is out of range: ports are 1 to 65535\ntelepresence.yaml:5:17: deployments.hello.expose[1]: port 70000 is out of range: ports are 1 to 65535",
    ),
    (
        "expose-bool",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    expose: [true]\n",
        "telepresence.yaml:5:14: deployments.hello.expose[0]: expected PORT or LOCAL:REMOTE, got `true`",
    ),
    (
        "expose-not-list",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    expose: 8080\n",
        "telepresence.yaml:5:13: deployments.hello.expose: expected a list, got `8080`",
    ),
    (
        "expose-remote-twice",
        'version: 1\ndeployments:\n  hello:\n    new: true\n    expose: [8080, "9090:8080"]\n',
        "telepresence.yaml:5:20: deployments.hello.expose[1]: remote port 8080 is exposed twice (first as `deployments.hello.expose[0]`)",
    ),
    (
        "method-typo",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    method: vpn\n",
        "telepresence.yaml:5:13: deployments.hello.method: `vpn` is not allowed: expected `inject-tcp` or `vpn-tcp` or `container`",
    ),
    (
        "container-without-image",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    method: container\n",
        "telepresence.yaml:3:3: deployments.hello: method `container` needs `image`: the image the process runs in",
    ),
    (
        "container-shell",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    method: container\n    image: app:dev\n    shell: true\n",
        "telepresence.yaml:7:5: deployments.hello.shell: `shell: true` does not apply to method `container`",
    ),
    (
        "container-args-network",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    method: container\n    image: app:dev\n    container-args: [--network=host]\n",
        "telepresence.yaml:7:5: deployments.hello.container-args: `--network` cannot be in `container-args`: the app container joins the network container's namespace",
    ),
    (
        "image-in-defaults",
        "version: 1\ndefaults:\n  image: app:dev\ndeployments: {}\n",
        "telepresence.yaml:3:3: defaults.image: `image` cannot be set in `defaults`",
    ),
    (
        "no-operation",
        "version: 1\ndeployments:\n  hello:\n    run: make\n",
        "telepresence.yaml:3:3: deployments.hello: no operation: set one of `new`, `swap`, `existing` or `intercept`",
    ),
    (
        "two-operations",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    swap: hello\n",
        "telepresence.yaml:5:5: deployments.hello.swap: `new` and `swap` cannot be combined: a deployment has exactly one of `new`, `swap`, `existing` and `intercept`",
    ),
    (
        "new-false",
        "version: 1\ndeployments:\n  hello:\n    new: false\n",
        "telepresence.yaml:4:10: deployments.hello.new: `new: false` is not allowed",
    ),
    (
        "bad-deployment-name",
        "version: 1\ndeployments:\n  Hello_World:\n    new: true\n",
        "telepresence.yaml:3:3: deployments.Hello_World: deployment name `Hello_World` is not a valid Kubernetes name",
    ),
    (
        "new-name-starts-with-digit",
        "version: 1\ndeployments:\n  1st:\n    new: true\n",
        "telepresence.yaml:3:3: deployments.1st: `1st` cannot be the name of a new deployment: the Service created with it must start with a letter",
    ),
    (
        "bad-swap-target",
        'version: 1\ndeployments:\n  web:\n    swap: "Web:app"\n',
        "telepresence.yaml:4:11: deployments.web.swap: deployment name `Web` is not a valid Kubernetes name",
    ),
    (
        "bad-container",
        "version: 1\ndeployments:\n  web:\n    swap: {deployment: web, container: App}\n",
        "telepresence.yaml:4:40: deployments.web.swap.container: container name `App` is not a valid Kubernetes name",
    ),
    (
        "same-target-twice",
        "version: 1\ndeployments:\n  web:\n    swap: true\n  web2:\n    swap: web\n",
        "telepresence.yaml:5:3: deployments.web2: Kubernetes Deployment `web` is already used by `web`",
    ),
    (
        "also-proxy-bad",
        "version: 1\ndeployments:\n  hello:\n    swap: true\n    method: vpn-tcp\n    also-proxy: [bad_host, 10.1.2.3/8, 300.1.1.1]\n",
        "telepresence.yaml:6:18: deployments.hello.also-proxy[0]: `bad_host` is not a valid hostname, IP address or CIDR\ntelepresence.yaml:6:28: deployments.hello.also-proxy[1]: `10.1.2.3/8` has host bits set\ntelepresence.yaml:6:40: deployments.hello.also-proxy[2]: `300.1.1.1` is not an IP address or CIDR",
    ),
    (
        "mount-relative-pod-path",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    volumes:\n      mounts:\n        - pod: var/run\n          local: ./run\n",
        "telepresence.yaml:7:16: deployments.hello.volumes.mounts[0].pod: pod path `var/run` is not absolute",
    ),
    (
        "mount-missing-local",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    volumes:\n      mounts:\n        - pod: /var/run\n",
        "telepresence.yaml:7:11: deployments.hello.volumes.mounts[0]: missing required key `local`",
    ),
    (
        "mount-pod-twice",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    volumes:\n      mounts:\n        - {pod: /a, local: ./a}\n        - {pod: /a/, local: ./b}\n",
        "telepresence.yaml:8:17: deployments.hello.volumes.mounts[1].pod: pod path `/a` is mounted twice (first in `mounts[0]`)",
    ),
    (
        "shared-volume-root",
        "version: 1\ndeployments:\n  a:\n    new: true\n    volumes: {root: data}\n  b:\n    new: true\n    volumes: {root: ./data}\n",
        "telepresence.yaml:8:5: deployments.b.volumes: volume root `data` is also used by `a`",
    ),
    (
        "env-bad-name-and-value",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    env:\n      set:\n        1X: a\n        B: [1]\n",
        "telepresence.yaml:7:9: deployments.hello.env.set.1X: `1X` is not a valid environment variable name\ntelepresence.yaml:8:9: deployments.hello.env.set.B: expected a string value, got a list",
    ),
    (
        "env-export-format",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    env:\n      export: {file: out.env, format: yaml}\n",
        "telepresence.yaml:6:39: deployments.hello.env.export.format: `yaml` is not allowed: expected `dotenv` or `json`",
    ),
    (
        "shared-export-file",
        "version: 1\ndefaults:\n  env: {export: .env}\ndeployments:\n  a:\n    new: true\n  b:\n    new: true\n",
        "telepresence.yaml:3:3: defaults.env: export file `.env` is also written by `a`",
    ),
    (
        "run-empty-list",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    run: []\n",
        "telepresence.yaml:5:5: deployments.hello.run: `run` is an empty list",
    ),
    (
        "run-mapping",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    run: {cmd: x}\n",
        "telepresence.yaml:5:5: deployments.hello.run: expected a command string or a list of arguments, got a mapping",
    ),
    (
        "run-and-shell",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    run: make\n    shell: true\n",
        "telepresence.yaml:6:5: deployments.hello.shell: `shell: true` and `run` cannot be combined",
    ),
    (
        "two-shells",
        "version: 1\ndeployments:\n  a:\n    new: true\n    shell: true\n  b:\n    new: true\n    shell: true\n",
        "telepresence.yaml:8:5: deployments.b.shell: only one deployment can have `shell: true`, and `a` has it (the shell takes the terminal)",
    ),
    (
        "shell-not-bool",
        "version: 1\ndeployments:\n  a:\n    new: true\n    shell: sometimes\n",
        "telepresence.yaml:5:12: deployments.a.shell: expected `true` or `false`, got `sometimes`",
    ),
    (
        "vpn-contexts-differ",
        "version: 1\ndeployments:\n  a:\n    swap: true\n    method: vpn-tcp\n  b:\n    swap: true\n    method: vpn-tcp\n    context: staging\n",
        "telepresence.yaml:9:5: deployments.b.context: `vpn-tcp` deployments share one VPN, so they must use the same context: `a` uses the current context, `b` uses context `staging`",
    ),
    (
        "vpn-contexts-differ-defaults",
        "version: 1\ncontext: prod\ndefaults:\n  method: vpn-tcp\ndeployments:\n  a:\n    swap: true\n  b:\n    swap: true\n    context: staging\n",
        "telepresence.yaml:10:5: deployments.b.context: `vpn-tcp` deployments share one VPN, so they must use the same context: `a` uses context `prod`, `b` uses context `staging`",
    ),
    (
        "namespace-in-defaults",
        "version: 1\ndefaults:\n  namespace: dev\ndeployments: {}\n",
        "telepresence.yaml:3:3: defaults.namespace: `namespace` cannot be set in `defaults`",
    ),
    (
        "bad-namespace",
        "version: 1\nnamespace: Dev\ndeployments: {}\n",
        "telepresence.yaml:2:12: namespace: namespace `Dev` is not a valid Kubernetes name",
    ),
    (
        "bad-image",
        'version: 1\ndeployments:\n  hello:\n    new: {image: "my image"}\n',
        "telepresence.yaml:4:18: deployments.hello.new.image: `my image` is not a valid image reference",
    ),
    (
        "vpn-bad-cidr",
        "version: 1\nvpn:\n  pod-cidrs: [10.0.0.0/33]\ndeployments: {}\n",
        "telepresence.yaml:3:15: vpn.pod-cidrs[0]: `10.0.0.0/33` is not an IP address or CIDR",
    ),
    (
        "duplicate-key",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    run: a\n    run: b\n",
        "telepresence.yaml:6:5: deployments.hello.run: duplicate key `run` (first defined on line 5)",
    ),
    (
        "duplicate-deployment",
        "version: 1\ndeployments:\n  hello:\n    new: true\n  hello:\n    swap: true\n",
        "telepresence.yaml:5:3: deployments.hello: duplicate key `hello` (first defined on line 3)",
    ),
    (
        "unset-variable",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    run: echo ${NOT_SET}\n",
        "telepresence.yaml:5:10: deployments.hello.run: environment variable `NOT_SET` is not set",
    ),
    (
        "bad-variable-syntax",
        "version: 1\ndeployments:\n  hello:\n    new: true\n    run: echo ${1X}\n",
        "telepresence.yaml:5:10: deployments.hello.run: `${1X}` is not a valid variable reference",
    ),
    (
        "yaml-syntax",
        "version: 1\ndeployments: {hello: [1\n",
        "telepresence.yaml:3:1: invalid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)",
    ),
    (
        "yaml-bad-indent",
        "version: 1\ndeployments:\n  hello:\n    new: true\n   run: x\n",
        "telepresence.yaml:5:4: invalid YAML: expected <block end>, but found '<block mapping start>' (while parsing a block mapping)",
    ),
    (
        "tab-indent",
        "version: 1\ndeployments:\n\thello:\n    new: true\n",
        "telepresence.yaml:3:1: tab character used for indentation",
    ),
    (
        "two-documents",
        "version: 1\ndeployments: {}\n---\nversion: 1\n",
        "telepresence.yaml:3:1: invalid YAML: the file holds more than one YAML document",
    ),
    (
        "custom-tag",
        "version: 1\ndeployments:\n  hello:\n    new: !true yes\n",
        "telepresence.yaml:4:10: deployments.hello.new: YAML tag `!true` is not supported",
    ),
    (
        "non-string-key",
        "version: 1\ndeployments:\n  ? [a, b]\n  : {new: true}\n",
        "telepresence.yaml:3:5: deployments: a key must be a plain string, not a list or mapping",
    ),
    (
        "undefined-alias",
        "version: 1\ndeployments: *nope\n",
        "telepresence.yaml:2:14: invalid YAML: found undefined alias 'nope'",
    ),
    (
        "several-errors-sorted",
        "version: 1\ndeployments:\n  b:\n    new: true\n    expose: [x]\n  a:\n    new: true\n    methd: vpn-tcp\n",
        "telepresence.yaml:5:14: deployments.b.expose[0]: expected PORT or LOCAL:REMOTE, got `x`\ntelepresence.yaml:8:5: deployments.a.methd: unknown key `methd`",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_an_invalid_file_is_reported_with_exact_positions(
    text: str, expected: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_project(text, base_dir=tmp_path, methods=REGISTRY, env={})
    assert str(info.value) == expected
    assert "Traceback" not in info.value.render()


def test_the_table_has_at_least_thirty_cases() -> None:
    assert len(INVALID) >= 30
    assert len({c[0] for c in INVALID}) == len(INVALID)


def _error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_project(text, methods=REGISTRY, env={})
    return info.value


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("expsoe", "expose"),
        ("also_proxy", "also-proxy"),
        ("agent_image", "agent-image"),
        ("Method", "method"),
        ("volume", "volumes"),
    ],
)
def test_a_misspelled_key_gets_a_did_you_mean(key: str, suggestion: str) -> None:
    error = _error(f"version: 1\ndeployments:\n  hello:\n    new: true\n    {key}: 1\n")
    assert error.hint == f"did you mean `{suggestion}`?"


def test_a_misspelled_key_in_a_nested_model_is_suggested_from_that_model() -> None:
    text = "version: 1\ndeployments:\n  h:\n    new: true\n    volumes: {mounts: [{pod: /a, local: b, readonly: true}]}\n"
    assert _error(text).hint == "did you mean `read-only`?"


def test_an_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    error = _error("version: 1\nvpn: {zzz: 1}\ndeployments: {}\n")
    assert error.hint == "valid keys here: `pod-cidrs`, `service-cidrs`"


def test_a_method_typo_gets_a_did_you_mean() -> None:
    error = _error("version: 1\ndeployments:\n  h:\n    new: true\n    method: vpn\n")
    assert error.hint == "did you mean `vpn-tcp`?"


def test_the_expose_hint_shows_both_forms() -> None:
    error = _error('version: 1\ndeployments:\n  h:\n    new: true\n    expose: ["8080:80:1"]\n')
    assert error.hint is not None
    assert "for example `8080` or `8080:80`" in error.hint


def test_a_missing_operation_hint_names_the_three_operations() -> None:
    error = _error("version: 1\ndeployments:\n  h:\n    run: x\n")
    assert error.hint is not None
    for op in ("new: true", "swap: NAME", "existing: NAME"):
        assert op in error.hint


def test_the_unsupported_version_message_names_the_supported_one() -> None:
    error = _error("version: 3\ndeployments: {}\n")
    assert error.message == "unsupported version `3`: this tpconf reads version 1"
    assert error.hint is not None and "version: 1" in error.hint


def test_an_unsupported_version_hides_the_other_errors() -> None:
    error = _error("version: 2\nsomething: else\n")
    assert not isinstance(error, ConfigErrors)


def test_all_errors_of_one_file_are_reported_sorted_by_position() -> None:
    text = (
        "version: 1\n"
        "deployments:\n"
        "  b:\n"
        "    new: true\n"
        "    shell: maybe\n"
        "  a:\n"
        "    new: true\n"
        "    expose: [0]\n"
        "    nope: 1\n"
    )
    error = _error(text)
    assert isinstance(error, ConfigErrors)
    assert [(e.position.line, e.loc) for e in error.errors] == [
        (5, "deployments.b.shell"),
        (8, "deployments.a.expose[0]"),
        (9, "deployments.a.nope"),
    ]
    assert error.render().count("\n  hint: ") == 1


def test_a_duplicate_key_names_the_line_of_the_first() -> None:
    error = _error("version: 1\nversion: 1\ndeployments: {}\n")
    assert str(error) == (
        "telepresence.yaml:2:1: version: duplicate key `version` (first defined on line 1)"
    )


def test_errors_name_the_file_as_given() -> None:
    with pytest.raises(ConfigError) as info:
        parse_project(
            "version: 1\n", filename="sub/dir/telepresence.yaml", methods=REGISTRY, env={}
        )
    assert str(info.value).startswith("sub/dir/telepresence.yaml:1:1: ")


def test_an_alias_bomb_is_refused() -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    lines.append("deployments: {}")
    error = _error("\n".join(lines) + "\n")
    assert "too many values" in error.render()


def test_a_recursive_alias_is_refused() -> None:
    error = _error("version: 1\ndeployments: &d\n  a: *d\n")
    assert isinstance(error, ConfigError)
