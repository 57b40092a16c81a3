"""``tpconf init``: a first telepresence.yaml, written for Deployments of the cluster.

It reads the Deployments of the current namespace (nothing is changed in the cluster) and writes
a commented file: one entry per picked Deployment, swapped by default, with the other operations,
the methods and the usual keys in comments; the schema line for editors (the schema is written to
``.tpconf/``, which ``tpconf up`` refreshes); and the lines ``.gitignore`` needs (the state
directory and the personal override file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpconf.cluster.client import path as api_path
from tpconf.config import DEFAULT_FILENAME, OVERRIDE_FILENAME
from tpconf.errors import TpconfError
from tpconf.reconcile.schemacopy import SCHEMA_COPY, write_schema
from tpconf.reconcile.session import Session

#: What ``.gitignore`` gets: the state directory (sockets, logs, volume roots) and the
#: personal override file.
GITIGNORE = (".tpconf/", OVERRIDE_FILENAME)


@dataclass(frozen=True)
class Container:
    name: str
    ports: tuple[int, ...]


@dataclass(frozen=True)
class Found:
    """A Deployment of the namespace, as ``init`` describes it."""

    name: str
    containers: tuple[Container, ...]


@dataclass(frozen=True)
class Cluster:
    """Where ``init`` looked."""

    context: str
    server: str
    namespace: str
    deployments: tuple[Found, ...]


async def discover(session: Session, context: str | None, namespace: str | None) -> Cluster:
    """The Deployments of ``namespace`` (default: the context's), read-only."""
    client = await session.cluster(context, namespace)
    ns = namespace or client.namespace
    listing = await client.request(
        "GET", api_path("deployments", ns), what=f'list the Deployments in namespace "{ns}"'
    )
    found = [_found(item) for item in listing.get("items") or []]
    return Cluster(client.context, client.server, ns, tuple(sorted(found, key=lambda f: f.name)))


def _found(item: dict[str, Any]) -> Found:
    spec = ((item.get("spec") or {}).get("template") or {}).get("spec") or {}
    containers = tuple(
        Container(
            str(c.get("name")),
            tuple(
                int(p["containerPort"])
                for p in c.get("ports") or []
                if p.get("protocol", "TCP") == "TCP" and "containerPort" in p
            ),
        )
        for c in spec.get("containers") or []
    )
    return Found(str(item["metadata"]["name"]), containers)


def pick(found: Sequence[Found], wanted: Sequence[str]) -> list[Found]:
    """The Deployments named in ``wanted`` (names or 1-based numbers of ``found``)."""
    by_name = {f.name: f for f in found}
    out: list[Found] = []
    for entry in wanted:
        key = entry.strip()
        if key.isdigit() and 1 <= int(key) <= len(found):
            chosen = found[int(key) - 1]
        elif key in by_name:
            chosen = by_name[key]
        else:
            names = ", ".join(by_name) or "none"
            raise TpconfError(
                f"no Deployment {key} in the namespace (Deployments: {names})",
                hint="name Deployments of the namespace, or pick another with `-n NAMESPACE`",
            )
        if chosen not in out:
            out.append(chosen)
    return out


def _entry(found: Found) -> list[str]:
    first = found.containers[0] if found.containers else Container("main", ())
    target = found.name if len(found.containers) <= 1 else f"{found.name}:{first.name}"
    ports = ", ".join(str(p) for p in first.ports)
    lines = [
        f"  {found.name}:",
        "    # swap: the Deployment's pods are replaced by a proxy while tpconf runs, and",
        "    # restored after. Or `intercept:` (the app keeps serving; all or only matching",
        "    # requests come here), or `new: true` (a proxy Deployment of its own).",
        f"    swap: {target}",
        "    # method: inject-tcp   # or vpn-tcp: every program of this machine (needs root)",
    ]
    if ports:
        lines.append(f"    # The container's ports ({ports}) reach the same ports on this machine.")
    lines += [
        "    # run: npm start       # your command, with the pod's environment and network",
        "    # restart: on-failure",
    ]
    return lines


def config_text(cluster: Cluster, picked: Sequence[Found]) -> str:
    """The commented telepresence.yaml for ``picked`` (an example entry when empty)."""
    context = cluster.context or "(current)"
    lines = [
        f"# yaml-language-server: $schema={SCHEMA_COPY}",
        f"# Written by `tpconf init` from namespace {cluster.namespace} of context {context}.",
        f"# Every key: `tpconf schema --print`. Yours only: {OVERRIDE_FILENAME} (not committed).",
        "version: 1",
        f"namespace: {cluster.namespace}",
    ]
    if cluster.context:
        lines.append(f"# allowed-contexts: [{cluster.context}]   # refuse any other cluster")
    lines.append("deployments:")
    for found in picked:
        lines += _entry(found)
    if not picked:
        lines += [
            "  # No Deployment picked: a proxy of its own, reaching the cluster from here.",
            "  quickstart:",
            "    new: true",
            "    run: curl -s http://kubernetes.default:443 || true",
        ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Written:
    """What ``init`` wrote."""

    config: Path
    schema: Path
    gitignore: Path
    ignored: tuple[str, ...]
    """The lines added to ``.gitignore`` (none when it had them)."""


def write(project_dir: Path, text: str, *, force: bool = False) -> Written:
    """Write telepresence.yaml (refused over an existing one unless ``force``), the schema and
    the missing ``.gitignore`` lines."""
    config = project_dir / DEFAULT_FILENAME
    if config.exists() and not force:
        raise TpconfError(
            f"{config} exists already",
            hint="edit it, or overwrite it with `tpconf init --force`",
        )
    config.write_text(text, encoding="utf-8")
    schema = write_schema(project_dir)
    ignore = project_dir / ".gitignore"
    existing = ignore.read_text(encoding="utf-8") if ignore.exists() else ""
    have = {line.strip() for line in existing.splitlines()}
    missing = tuple(line for line in GITIGNORE if line not in have)
    if missing:
        prefix = "" if not existing or existing.endswith("\n") else "\n"
        header = "# tpconf: its state, and personal overrides\n"
        ignore.write_text(existing + prefix + header + "\n".join(missing) + "\n", encoding="utf-8")
    return Written(config, schema, ignore, missing)
