"""The planner: a pure function from (running desired state, new desired state) to unit actions.

A deployment in the file becomes a chain of *units* that ``loop.py`` runs::

    proxy ─► tunnel ─┬─► outbound (the cluster resolver and the method's side: tpconf.methods)
                     ├─► volumes
                     ├─► expose (remote forwards of `expose`/`from-pod`, listeners of `to-pod`)
                     ├─► routes (intercept: a route per replica's router)
                     ├─► export (the env file)
                     └─► process

Each unit depends only on some *facets* of the deployment's spec. ``facets_of`` is the only place
that knows the config's field names (and asks the method what its outbound side depends on);
``plan`` compares facets, so a change of ``run`` touches the
process alone and a change of ``expose`` touches the forwards alone, and the other deployments
are not touched at all. Stops come before starts (so ports are free to rebind) and run in reverse
dependency order; starts run in dependency order.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tpconf.config import InterceptOp

if TYPE_CHECKING:
    from tpconf.config import DeploymentSpec, Project
    from tpconf.methods import Method


class Unit(enum.IntEnum):
    """The units of one deployment, in start order."""

    PROXY = 0
    TUNNEL = 1
    OUTBOUND = 2
    VOLUMES = 3
    EXPOSE = 4
    ROUTES = 5
    EXPORT = 6
    PROCESS = 7


ALL_UNITS: tuple[Unit, ...] = tuple(Unit)


@dataclass(frozen=True)
class Facets:
    """The parts of a deployment's spec that each unit depends on."""

    cluster: Hashable
    """What the proxy pod is: context, namespace, operation, agent image, privilege."""
    method: str
    outbound: Hashable
    """What the method's outbound side depends on (vpn-tcp: `also-proxy` and `vpn:`)."""
    exposes: frozenset[tuple[int, int]]
    links: Hashable
    """`to-pod` and `from-pod` (updated in place with the exposes)."""
    routes: Hashable
    """An intercept's local ports and headers (updated in place: the pods stay)."""
    volumes: Hashable
    process: Hashable
    export: Hashable


def desired_facets(project: Project, methods: Mapping[str, Method]) -> dict[str, Facets]:
    """The facets of every deployment of ``project``, in file order."""
    return {
        spec.name: facets_of(spec, methods[spec.method].outbound_facet(spec, project))
        for spec in project.deployments
    }


def facets_of(spec: DeploymentSpec, outbound: Hashable = ()) -> Facets:
    """Split a resolved deployment spec into what each unit depends on; ``outbound`` is what
    its method says the outbound side depends on."""
    exposes = frozenset((m.local, m.remote) for m in spec.expose)
    low_ports = any(remote < 1024 for _, remote in exposes)
    op = spec.operation
    pods = op.sidecar if isinstance(op, InterceptOp) else op
    return Facets(
        cluster=(spec.context, spec.namespace, pods, spec.agent_image, low_ports),
        method=spec.method,
        outbound=outbound,
        exposes=exposes,
        links=(spec.to_pod, spec.from_pod),
        routes=(op.ports, op.headers) if isinstance(op, InterceptOp) else (),
        volumes=spec.volumes,
        # The process sees the pod env through these too, so a new pod restarts it (see plan).
        process=(
            spec.run,
            spec.shell,
            spec.env.set,
            spec.method,
            spec.restart,
            spec.image,
            spec.container_args,
        ),
        # The exported file holds the pod env with the overrides and TELEPRESENCE_ROOT.
        export=(spec.env.export, spec.env.set, spec.volumes),
    )


Verb = Literal["start", "stop", "update"]


@dataclass(frozen=True)
class Action:
    """One step of a reconcile pass."""

    verb: Verb
    deployment: str
    unit: Unit
    detail: str = ""

    def __str__(self) -> str:
        sign = {"start": "+", "stop": "-", "update": "~"}[self.verb]
        text = f"{sign} {self.deployment}: {self.unit.name.lower()}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class Plan:
    """The actions of one pass: ``stops`` first (reverse order), then ``updates``, then ``starts``."""

    stops: tuple[Action, ...] = ()
    updates: tuple[Action, ...] = ()
    starts: tuple[Action, ...] = ()

    @property
    def actions(self) -> tuple[Action, ...]:
        return self.stops + self.updates + self.starts

    def __bool__(self) -> bool:
        return bool(self.actions)

    def deployments(self, verb: Verb) -> tuple[str, ...]:
        """Names of the deployments that have at least one action of ``verb``, in order."""
        seen: dict[str, None] = {}
        for action in self.actions:
            if action.verb == verb:
                seen.setdefault(action.deployment, None)
        return tuple(seen)


def _changed_units(old: Facets, new: Facets) -> tuple[set[Unit], dict[Unit, str]]:
    """Units to restart, and units to update in place (with a description), for one deployment."""
    if old.cluster != new.cluster:
        return set(ALL_UNITS), {}
    restart: set[Unit] = set()
    update: dict[Unit, str] = {}
    if old.method != new.method:
        restart |= {Unit.OUTBOUND, Unit.PROCESS}
    elif old.outbound != new.outbound:
        update[Unit.OUTBOUND] = f"{new.method} settings changed"
    if old.volumes != new.volumes:
        restart |= {Unit.VOLUMES, Unit.PROCESS}
    if old.process != new.process:
        restart.add(Unit.PROCESS)
    if old.exposes != new.exposes or old.links != new.links:
        added = sorted(new.exposes - old.exposes)
        removed = sorted(old.exposes - new.exposes)
        parts = [f"+{lo}:{re}" for lo, re in added] + [f"-{lo}:{re}" for lo, re in removed]
        if old.links != new.links:
            parts.append("to-pod/from-pod changed")
        update[Unit.EXPOSE] = " ".join(parts)
    if old.routes != new.routes:
        update[Unit.ROUTES] = "intercept ports or headers changed"
    if old.export != new.export:
        restart.add(Unit.EXPORT)
    return restart, update


def plan(running: Mapping[str, Facets], desired: Mapping[str, Facets]) -> Plan:
    """What to stop, update and start to go from ``running`` to ``desired``.

    Both mappings keep the file's deployment order; starts follow the new file's order.
    """
    stops: list[Action] = []
    updates: list[Action] = []
    starts: list[Action] = []
    for name in running:
        if name not in desired:
            stops.extend(Action("stop", name, u, "removed") for u in reversed(ALL_UNITS))
    for name, new in desired.items():
        old_facets = running.get(name)
        if old_facets is None:
            starts.extend(Action("start", name, u) for u in ALL_UNITS)
            continue
        restart, update = _changed_units(old_facets, new)
        why = "proxy changed" if len(restart) == len(ALL_UNITS) else "changed"
        stops.extend(Action("stop", name, u, why) for u in sorted(restart, reverse=True))
        updates.extend(Action("update", name, u, d) for u, d in sorted(update.items()))
        starts.extend(Action("start", name, u) for u in sorted(restart))
    return Plan(tuple(stops), tuple(updates), tuple(starts))
