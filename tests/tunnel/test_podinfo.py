"""Pod info: the podinfo.json contract, resolv.conf variants, env filtering, reading it via SSH."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tpconf.errors import TunnelError
from tpconf.tunnel import PodInfo, ProxyKeys, ResolvConf, fetch_pod_info, open_tunnel

from .peers import agent_server

KUBERNETES_RESOLV = """\
search web.svc.cluster.local svc.cluster.local cluster.local
nameserver 10.96.0.10
options ndots:5
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            KUBERNETES_RESOLV,
            ResolvConf(
                nameservers=("10.96.0.10",),
                search=("web.svc.cluster.local", "svc.cluster.local", "cluster.local"),
                ndots=5,
            ),
        ),
        ("", ResolvConf()),  # defaults: ndots 1, no search list
        (
            "nameserver 1.1.1.1\nnameserver 8.8.8.8\n",
            ResolvConf(nameservers=("1.1.1.1", "8.8.8.8")),
        ),
        # the last search/domain line wins; comments and unknown lines are ignored
        (
            "# generated\nsearch a.example\ndomain b.example\n; note\nsortlist 10.0.0.0\n",
            ResolvConf(search=("b.example",)),
        ),
        ("domain b.example\nsearch x y # trailing\n", ResolvConf(search=("x", "y"))),
        # options on several lines, capped ndots, malformed values ignored, trailing dots dropped
        (
            "options ndots:20 timeout:2\noptions attempts:3 ndots:x rotate\nsearch ns.svc.\n",
            ResolvConf(search=("ns.svc",), ndots=15, timeout=2.0, attempts=3),
        ),
        (
            "options ndots:0\n  nameserver   fd00::10  \n",
            ResolvConf(nameservers=("fd00::10",), ndots=0),
        ),
    ],
)
def test_resolv_conf_is_parsed_as_the_resolver_applies_it(text: str, expected: ResolvConf) -> None:
    assert ResolvConf.parse(text) == expected


def test_pod_info_keeps_the_pods_env_and_drops_image_shell_and_agent_variables() -> None:
    info = PodInfo.from_json(
        json.dumps(
            {
                "env": {
                    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
                    "REDIS_MASTER_SERVICE_HOST": "10.96.3.4",
                    "GREETING": "hello world",
                    "HOME": "/home/agent",
                    "PATH": "/usr/bin",
                    "HOSTNAME": "web-1",
                    "PWD": "/",
                    "SHLVL": "1",
                    "_": "/usr/bin/env",
                    "TPCONF_SSH_PORT": "8022",
                    "SSH_CONNECTION": "x",
                },
                "resolv_conf": KUBERNETES_RESOLV,
                "hostname": "web-1",
                "mounts": ["/var/run/secrets/kubernetes.io/serviceaccount", "/etc/config"],
            }
        )
    )
    assert dict(info.env) == {
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "REDIS_MASTER_SERVICE_HOST": "10.96.3.4",
        "GREETING": "hello world",
    }
    assert info.hostname == "web-1"
    assert info.mounts == ("/var/run/secrets/kubernetes.io/serviceaccount", "/etc/config")
    assert info.resolv_conf.ndots == 5


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("not json", "not JSON"),
        ("[]", "not a JSON object"),
        ('{"env": {"A": 1}}', "`env`"),
        ('{"resolv_conf": 3}', "`resolv_conf`"),
        ('{"mounts": "/etc"}', "`mounts`"),
        ('{"hostname": null}', "`hostname`"),
    ],
)
def test_malformed_pod_info_says_what_is_wrong(text: str, why: str) -> None:
    with pytest.raises(TunnelError, match=why):
        PodInfo.from_json(text)


@pytest.mark.anyio
async def test_pod_info_is_read_through_the_tunnel(keys: ProxyKeys, tmp_path: Path) -> None:
    path = tmp_path / "pod info.json"  # a space: the path is quoted
    path.write_text(
        json.dumps({"env": {"A": "1"}, "resolv_conf": "", "hostname": "h", "mounts": []})
    )
    async with (
        agent_server(keys) as agent,
        open_tunnel(("127.0.0.1", agent.port), keys.credentials("u")) as tunnel,
    ):
        info = await fetch_pod_info(tunnel, path=str(path))
        assert info == PodInfo(env=info.env, hostname="h") and dict(info.env) == {"A": "1"}
        with pytest.raises(TunnelError, match="could not read the agent's pod info"):
            await fetch_pod_info(tunnel, path=str(tmp_path / "missing.json"))
