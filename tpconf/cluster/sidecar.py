"""Pure builders of an intercept: the agent as a sidecar in a Deployment's pod template, and the
Service ports that point at it (no I/O).

The sidecar is the app container's twin for what a local process needs (its env, envFrom and
volume mounts, run with its user), plus the agent: for every intercepted container port APP it
listens on a port of its own, AGENT, named ``tpconf-APP`` (a Service's targetPort points at that
name while the Deployment is intercepted). It is ``restricted``-compliant, Ready once sshd and
every AGENT port accept connections, and sleeps in ``preStop`` so that kube-proxy stops sending
it traffic before it stops.

Which Service ports to switch: a non-headless Service whose selector the pod template's labels
satisfy, for each port whose targetPort (a number, a name of the app container's ports, or the
Service port itself when absent) resolves to an intercepted container port.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tpconf import errors
from tpconf.cluster import labels as L
from tpconf.cluster import manifests as M

JSON = dict[str, Any]

#: Pods with the agent as a sidecar carry this label (value: ``intercept``).
AGENT_LABEL = "tpconf.io/agent"
AGENT_LABEL_VALUE = "intercept"
#: The agent's own ports are taken from here upwards, skipping any the pod already uses.
AGENT_PORT_BASE = 17000
#: Seconds the sidecar keeps serving after it is told to stop, while endpoints catch up.
PRESTOP_SLEEP = 5
#: The keys all developers of one intercepted Deployment share: ``<deployment>-tpconf-intercept``.
SECRET_SUFFIX = "-tpconf-intercept"


def keys_secret_name(deployment: str) -> str:
    """The Secret of an intercepted Deployment's agent keys."""
    return deployment + SECRET_SUFFIX


def port_name(app_port: int) -> str:
    """The agent's name for its port in front of container port ``app_port`` (<= 15 chars)."""
    return f"tpconf-{app_port}"


def _used_ports(spec: Mapping[str, Any]) -> set[int]:
    return {
        int(p["containerPort"])
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
        for p in c.get("ports") or []
    }


def app_container(template: Mapping[str, Any], container: str | None, *, what: str) -> JSON:
    """The container whose ports are intercepted (``container``, or the first)."""
    containers = template["spec"]["containers"]
    app: JSON = containers[M.choose_container(containers, container, what=what)]
    if app.get("name") == M.AGENT_CONTAINER:
        raise errors.ClusterError(
            f"{what} already runs the tpconf agent in container {M.AGENT_CONTAINER!r}",
            hint="intercept the Deployment's own container (`intercept: DEPLOYMENT:CONTAINER`)",
        )
    return app


def intercepted_ports(app: Mapping[str, Any], wanted: Sequence[int], *, what: str) -> list[int]:
    """The container ports to intercept: ``wanted``, or every TCP port the container declares."""
    declared = [
        int(p["containerPort"]) for p in app.get("ports") or [] if p.get("protocol", "TCP") == "TCP"
    ]
    if not wanted:
        if not declared:
            raise errors.ClusterError(
                f'{what}: container "{app.get("name")}" declares no TCP port to intercept',
                hint="list the ports under `intercept.ports`, for example `ports: [8080]`",
            )
        return declared
    return list(dict.fromkeys(wanted))


def agent_ports(spec: Mapping[str, Any], app_ports: Iterable[int]) -> dict[int, int]:
    """APP -> AGENT: a free port of the pod for each intercepted port."""
    used = _used_ports(spec)
    chosen: dict[int, int] = {}
    candidate = AGENT_PORT_BASE
    for app_port in app_ports:
        while candidate in used:
            candidate += 1
        chosen[app_port] = candidate
        used.add(candidate)
    return chosen


def sidecar(
    app: Mapping[str, Any], pod_sc: Mapping[str, Any], ports: Mapping[int, int], image: str
) -> JSON:
    """The agent container, run beside ``app`` with its env and volumes."""
    agent: JSON = {
        "name": M.AGENT_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": [f"--intercept={app_port}:{agent_port}" for app_port, agent_port in ports.items()],
        "ports": [
            {"name": port_name(app_port), "containerPort": agent_port, "protocol": "TCP"}
            for app_port, agent_port in ports.items()
        ],
        "startupProbe": M.startup_probe(list(ports.values())),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP}}},
        "resources": copy.deepcopy(M.RESOURCES),
        "securityContext": M.restricted_container_security(
            app.get("securityContext"), pod_security=pod_sc
        ),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    for key in ("env", "envFrom"):
        if app.get(key):
            agent[key] = copy.deepcopy(app[key])
    mounts = [m for m in app.get("volumeMounts") or [] if m.get("name") != M.KEYS_VOLUME]
    agent["volumeMounts"] = [*copy.deepcopy(mounts), M.keys_mount()]
    return agent


def intercept_template(
    template: Mapping[str, Any],
    *,
    deployment: str,
    container: str | None,
    ports: Mapping[int, int],
    image: str,
    low_ports: Sequence[int] = (),
) -> JSON:
    """``template`` with the agent as a sidecar in front of ``ports`` (APP -> AGENT)."""
    what = f'Deployment "{deployment}"'
    out = copy.deepcopy(dict(template))
    spec = out["spec"]
    app = app_container(out, container, what=what)
    pod_sc = spec.get("securityContext") or {}
    spec["containers"] = [*spec["containers"], sidecar(app, pod_sc, ports, image)]
    volumes = [v for v in spec.get("volumes") or [] if v.get("name") != M.KEYS_VOLUME]
    spec["volumes"] = [*volumes, M.keys_volume(keys_secret_name(deployment))]
    M.share_workload_group(spec, app.get("securityContext"), low_ports=low_ports)
    meta = out.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), AGENT_LABEL: AGENT_LABEL_VALUE}
    return out


def selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Whether a Service's ``selector`` picks pods with ``labels``."""
    return bool(selector) and all(labels.get(k) == v for k, v in (selector or {}).items())


def targets(port: Mapping[str, Any], app: Mapping[str, Any]) -> int | None:
    """The container port of ``app`` that a Service ``port`` sends traffic to, if any."""
    target = port.get("targetPort", port.get("port"))
    if isinstance(target, int):
        return target
    for declared in app.get("ports") or []:
        if declared.get("name") == target:
            return int(declared["containerPort"])
    return None


def switched_ports(
    ports: Sequence[Mapping[str, Any]], app: Mapping[str, Any], intercepted: Iterable[int]
) -> list[JSON] | None:
    """A Service's ``ports`` with each intercepted target pointed at the agent (``None``: none
    of them is intercepted)."""
    wanted = set(intercepted)
    out: list[JSON] = []
    changed = False
    for port in ports:
        port = dict(port)
        if port.get("protocol", "TCP") == "TCP" and targets(port, app) in wanted:
            port["targetPort"] = port_name(int(targets(port, app) or 0))
            changed = True
        out.append(port)
    return out if changed else None


def headless(service: Mapping[str, Any]) -> bool:
    return (service.get("spec") or {}).get("clusterIP") == "None"


def template_labels(template: Mapping[str, Any]) -> dict[str, str]:
    return dict((template.get("metadata") or {}).get("labels") or {})


def agent_selector(match_labels: Mapping[str, str]) -> str:
    """The pods of an intercepted Deployment that run the agent."""
    return L.selector_string({**match_labels, AGENT_LABEL: AGENT_LABEL_VALUE})
