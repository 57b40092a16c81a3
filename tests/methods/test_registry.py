"""The method registry: every registered method is accepted by the file, its schema and docs,
described by `plan` and `status`, and planned like any other (issue 10: adding a method is a
module and a registry line, and forgetting a place must fail here, not silently).
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import jsonschema  # type: ignore[import-untyped]
import pytest

from tests.proxy.fakes import POD_NAMESERVER, POD_SEARCH, FakeNameserver, MapDialer
from tpconf.cli import print_status
from tpconf.cluster import ClusterNetworks
from tpconf.config import DEFAULT_METHOD, parse_project
from tpconf.config.schema import docs_text, json_schema
from tpconf.methods import REGISTRY, LaunchRequest, Link, Outbound, Services
from tpconf.proxy import ClusterResolver
from tpconf.reconcile import state
from tpconf.reconcile.describe import describe_deployment
from tpconf.reconcile.plan import Unit, desired_facets, plan

METHODS = sorted(REGISTRY)


def file_text(method: str) -> str:
    runs_image = method in REGISTRY and REGISTRY[method].runs_image
    image = "    image: app:dev\n" if runs_image else ""
    return f"version: 1\ndeployments:\n  web:\n    new: true\n    method: {method}\n{image}"


def test_the_registry_holds_the_default_method_and_each_under_its_own_name() -> None:
    assert DEFAULT_METHOD in REGISTRY
    assert all(name == method.name for name, method in REGISTRY.items())
    assert all(method.summary and not method.summary.endswith(".") for method in REGISTRY.values())


@pytest.mark.parametrize("name", METHODS)
def test_each_method_is_accepted_by_the_loader_and_the_schema(name: str, tmp_path: Path) -> None:
    project = parse_project(file_text(name), methods=REGISTRY, base_dir=tmp_path, env={})
    assert project.deployment("web").method == name
    schema = json_schema(REGISTRY)
    entry: dict[str, object] = {"new": True, "method": name}
    if REGISTRY[name].runs_image:
        entry["image"] = "app:dev"
    jsonschema.validate({"version": 1, "deployments": {"web": entry}}, schema)
    method = schema["$defs"]["Deployment"]["properties"]["method"]
    assert name in method["enum"]
    assert f"`{name}` ({REGISTRY[name].summary})" in method["description"]
    assert f"`{name}` ({REGISTRY[name].summary})" in docs_text(REGISTRY)


def test_a_name_outside_the_registry_is_refused_with_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="expected") as info:
        parse_project(file_text("no-such-method"), methods=REGISTRY, base_dir=tmp_path, env={})
    assert all(f"`{name}`" in str(info.value) for name in METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_each_method_is_described_by_plan_and_planned(name: str, tmp_path: Path) -> None:
    project = parse_project(file_text(name), methods=REGISTRY, base_dir=tmp_path, env={})
    spec = project.deployment("web")
    lines = describe_deployment(spec)
    own = REGISTRY[name].describe(spec)
    assert own and all(line in lines for line in own)
    the_plan = plan({}, desired_facets(project, REGISTRY))
    assert [a.unit for a in the_plan.starts] == list(Unit)


@pytest.mark.parametrize("name", METHODS)
def test_each_method_is_described_by_status(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    row = state.DeploymentRow(
        name="web", namespace="ns", method=name, operation="new", outbound=f"{name} detail"
    )
    print_status(state.Snapshot(pid=1, session="s", config="c", started=0, deployments=(row,)))
    shown = capsys.readouterr().out
    assert name in shown and f"{name} detail" in shown


@pytest.mark.anyio
async def test_inject_tcp_runs_a_socks_server_and_wraps_the_process_with_torsocks() -> None:
    """A method's runtime, run as the outbound unit runs it: its status and its process launch."""
    nameserver = FakeNameserver()
    async with anyio.create_task_group() as tg:
        await tg.start(nameserver.serve_tcp)
        dialer = MapDialer(routes={(POD_NAMESERVER, 53): ("127.0.0.1", nameserver.port)})
        async with ClusterResolver(dialer, [POD_NAMESERVER], POD_SEARCH) as resolver:
            project = parse_project(file_text("inject-tcp"), methods=REGISTRY, env={})
            spec = project.deployment("web")
            link = Link(spec, project, dialer, resolver, _no_networks, lambda text: None)
            runtime = REGISTRY["inject-tcp"].runtime(Services(tg, lambda name, text: None))
            outbound: Outbound = await tg.start(runtime.outbound, link)
            port = int(outbound.status().split(":")[1].split()[0])
            async with await anyio.connect_tcp("127.0.0.1", port):
                pass  # the SOCKS server listens on loopback
            with outbound.launch(LaunchRequest(spec, {}, None, ())) as launch:
                assert launch.prefix == ()  # torsocks's library is preloaded, no script runs
                assert "libtorsocks" in launch.env["LD_PRELOAD"]
                config = anyio.Path(launch.env["TORSOCKS_CONF_FILE"])
                assert f"TorPort {port}" in await config.read_text()
            assert not await config.exists()
        tg.cancel_scope.cancel()


async def _no_networks() -> ClusterNetworks:
    raise AssertionError("inject-tcp does not route networks")


def test_the_status_file_keeps_the_outbound_line() -> None:
    row = state.DeploymentRow(
        name="a", namespace="n", method="vpn-tcp", operation="swap", outbound="routes 10.0.0.0/8"
    )
    snap = state.Snapshot(pid=1, session="s", config="c", started=0, deployments=(row,))
    assert json.loads(snap.to_json())["deployments"][0]["outbound"] == "routes 10.0.0.0/8"
    assert state.Snapshot.from_json(snap.to_json()).deployments == (row,)
