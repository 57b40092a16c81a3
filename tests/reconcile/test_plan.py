"""The planner is pure: every kind of change maps to exactly the unit actions it needs."""

from __future__ import annotations

import dataclasses

import pytest

from tpconf.reconcile.plan import ALL_UNITS, Action, Facets, Unit, plan


def facets(**changes: object) -> Facets:
    base = Facets(
        cluster=("ctx", "default", "new", "tpconf/agent:0.1.0", False),
        method="inject-tcp",
        outbound=(),
        links=((), ()),
        routes=(),
        exposes=frozenset({(8080, 8080)}),
        volumes=("root",),
        process=(("curl", "x"), False, (), "inject-tcp"),
        export=None,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def actions(running: dict[str, Facets], desired: dict[str, Facets]) -> list[str]:
    return [str(a) for a in plan(running, desired).actions]


def test_nothing_changed_means_an_empty_plan() -> None:
    p = plan({"a": facets()}, {"a": facets()})
    assert not p
    assert p.actions == ()


def test_first_start_starts_every_unit_in_dependency_order() -> None:
    p = plan({}, {"a": facets()})
    assert [a.unit for a in p.starts] == list(ALL_UNITS)
    assert p.stops == () and p.updates == ()


def test_removed_deployment_stops_every_unit_in_reverse_order() -> None:
    p = plan({"a": facets(), "b": facets()}, {"b": facets()})
    assert [a.unit for a in p.stops] == list(reversed(ALL_UNITS))
    assert {a.deployment for a in p.actions} == {"a"}


def test_run_change_restarts_only_that_process() -> None:
    new = facets(process=(("curl", "y"), False, (), "inject-tcp"))
    assert actions({"a": facets(), "b": facets()}, {"a": new, "b": facets()}) == [
        "- a: process (changed)",
        "+ a: process",
    ]


def test_expose_change_updates_forwards_in_place() -> None:
    new = facets(exposes=frozenset({(8080, 8080), (9000, 90)}))
    assert actions({"a": facets()}, {"a": new}) == ["~ a: expose (+9000:90)"]
    back = actions({"a": new}, {"a": facets()})
    assert back == ["~ a: expose (-9000:90)"]


def test_also_proxy_change_updates_routes_in_place() -> None:
    new = facets(outbound=("10.1.0.0/16",))
    assert actions({"a": facets()}, {"a": new}) == ["~ a: outbound (inject-tcp settings changed)"]


def test_method_change_restarts_outbound_and_process_but_keeps_the_tunnel() -> None:
    new = facets(method="vpn-tcp")
    got = plan({"a": facets()}, {"a": new})
    assert [a.unit for a in got.stops] == [Unit.PROCESS, Unit.OUTBOUND]
    assert [a.unit for a in got.starts] == [Unit.OUTBOUND, Unit.PROCESS]


def test_volumes_change_remounts_and_restarts_the_process() -> None:
    got = plan({"a": facets()}, {"a": facets(volumes=("other",))})
    assert [a.unit for a in got.stops] == [Unit.PROCESS, Unit.VOLUMES]
    assert [a.unit for a in got.starts] == [Unit.VOLUMES, Unit.PROCESS]


def test_export_change_rewrites_only_the_env_file() -> None:
    got = plan({"a": facets()}, {"a": facets(export=("x.env", "dotenv"))})
    assert [str(a) for a in got.actions] == ["- a: export (changed)", "+ a: export"]


@pytest.mark.parametrize(
    "cluster",
    [
        ("other-ctx", "default", "new", "tpconf/agent:0.1.0", False),
        ("ctx", "other-ns", "new", "tpconf/agent:0.1.0", False),
        ("ctx", "default", "swap", "tpconf/agent:0.1.0", False),
        ("ctx", "default", "new", "tpconf/agent:0.2.0", False),
        ("ctx", "default", "new", "tpconf/agent:0.1.0", True),
    ],
    ids=["context", "namespace", "operation", "image", "privilege"],
)
def test_cluster_change_recreates_the_whole_deployment(cluster: tuple[object, ...]) -> None:
    got = plan({"a": facets(), "b": facets()}, {"a": facets(cluster=cluster), "b": facets()})
    assert [a.unit for a in got.stops] == list(reversed(ALL_UNITS))
    assert [a.unit for a in got.starts] == list(ALL_UNITS)
    assert {a.deployment for a in got.actions} == {"a"}
    assert all(a.detail == "proxy changed" for a in got.stops)


def test_stops_come_before_starts_across_deployments() -> None:
    got = plan({"old": facets()}, {"new": facets()})
    verbs = [a.verb for a in got.actions]
    assert verbs == ["stop"] * len(ALL_UNITS) + ["start"] * len(ALL_UNITS)


def test_starts_follow_the_new_file_order() -> None:
    got = plan({}, {"z": facets(), "a": facets()})
    assert got.deployments("start") == ("z", "a")


def test_action_renders_like_terraform_plan() -> None:
    assert str(Action("update", "web", Unit.EXPOSE, "+8080:80")) == "~ web: expose (+8080:80)"
    assert str(Action("start", "web", Unit.PROXY)) == "+ web: proxy"
