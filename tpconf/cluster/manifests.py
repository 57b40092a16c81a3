"""Pure builders of the objects tpconf sends to the cluster, as JSON dicts (no I/O).

- ``new``: Deployment ``NAME`` (1 replica, ``Recreate``) running the agent, a ClusterIP Service
  ``NAME`` for the exposed remote ports, both selecting ``tpconf.io/proxy=NAME`` only.
- ``swap``: Deployment ``<original>-tpconf`` whose pod template is the original's with the chosen
  container turned into the agent (image, command; probes, lifecycle and workingDir removed; env,
  envFrom, volumeMounts, ports and resources kept; securityContext made restricted-compatible).
- keys: Secret ``<deployment>-tpconf-keys`` (``host_key``, ``authorized_keys``) mounted read-only
  at :data:`KEYS_MOUNT` with mode :data:`KEYS_MODE`; for ``existing`` it is labelled
  ``tpconf.io/existing`` and owned by nothing (the user's Deployment mounts it).

Pod Security: the agent container is always ``restricted``-compliant (non-root, no privilege
escalation, capabilities dropped, RuntimeDefault seccomp). Exposed remote ports below 1024 use
the pod sysctl ``net.ipv4.ip_unprivileged_port_start`` (a "safe" sysctl, allowed by the
``restricted`` profile and by the kubelet by default), lowered to the smallest such port: no
capability, no root, and only inside the pod's network namespace.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Mapping, Sequence
from typing import Any

from tpconf import errors
from tpconf.cluster import labels as L
from tpconf.cluster.model import AgentKeys, ProxyRequest

JSON = dict[str, Any]

AGENT_CONTAINER = "tpconf-agent"
KEYS_VOLUME = "tpconf-keys"
KEYS_MOUNT = "/etc/tpconf/keys"
HOST_KEY_FILE = "host_key"
AUTHORIZED_KEYS_FILE = "authorized_keys"
#: Mode of the key files. Secret files are owned by root (group: root, or the pod's fsGroup);
#: the agent runs as a non-root uid with gid 0 (the image's ``USER 1000:0``, OpenShift's rule),
#: so group read is what lets it copy them into its private 0700 directory (docs/agent.md).
#: 0400 would need an ``fsGroup``, which OpenShift's SCCs restrict and which, in a swapped pod,
#: would re-own the workload's own volumes. No other container mounts the Secret.
KEYS_MODE = 0o440
#: The agent image's user and group (docs/agent.md); used when a pod would run the agent as root.
AGENT_UID = 1000
AGENT_GID = 0
#: The first port a non-root user may bind is lowered to this sysctl's value for low ports.
UNPRIVILEGED_PORT_SYSCTL = "net.ipv4.ip_unprivileged_port_start"
SWAP_SUFFIX = "-tpconf"
KEYS_SUFFIX = "-tpconf-keys"
RESOURCES: JSON = {
    "requests": {"cpu": "25m", "memory": "64Mi"},
    "limits": {"cpu": "1", "memory": "256Mi"},
}
#: Container fields of the replaced container that would break the agent.
REMOVED_FIELDS = (
    "command",
    "args",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
    "workingDir",
)
AGENT_REPOSITORY = "tpconf/agent"
#: The port of the agent's sshd, on the pod's 127.0.0.1 only.
AGENT_SSH_PORT = 8022


def startup_probe(ports: Sequence[int] = ()) -> JSON:
    """The agent container's probe: it passes once sshd (and ``ports``, the intercept listeners
    of a sidecar) accept connections on the pod's 127.0.0.1.

    Ready must mean that: without a probe a pod is Ready as soon as the entrypoint starts, and an
    agent that crashes a moment later would look Ready to :func:`~tpconf.cluster.wait_for_pod`.
    A tcpSocket probe cannot reach 127.0.0.1, so it is an exec (docs/agent.md).

    A startup probe, and no readiness probe: a container without a readiness probe is Ready once
    its startup probe passes, and then the kubelet stops probing. A readiness probe would run an
    exec in every agent every second for the whole session, on a node teammates share. With 10
    idle agents the 2-core test node was 0.94-0.99 cores busy under readiness probes and
    0.12-0.19 under startup probes (0.10 with no agent). An agent that dies later ends its
    container (sshd, or the sidecar's router, is PID 1), and the restarted container is probed
    again.

    Each probe waits up to a second for the ports, trying every 50 ms. The kubelet's first
    startup probe comes at its own tick, which may fall before sshd listens; a probe that failed
    at once would add a whole period to every start. 60 failed probes (about two minutes,
    :func:`~tpconf.cluster.wait_for_pod`'s timeout) and the kubelet restarts the container.

    What it costs: the kubelet runs a readiness probe at once when it sees the container running,
    a startup probe only at its next tick, so a start of 1 or 3 deployments took 0.2-0.9 s
    longer (10 took 1.7-1.9 s less: the node was not busy with probes). A readiness probe every
    10 seconds instead kept the quick start most of the time, but in 4 starts of 15 that first
    run did not pass and Ready waited a whole period (12 s to start one deployment).
    """
    opens = " && ".join(f": 3<>/dev/tcp/127.0.0.1/{port}" for port in (AGENT_SSH_PORT, *ports))
    wait = f"for _ in {{1..20}}; do {{ {opens}; }} 2>/dev/null && exit 0; sleep 0.05; done; exit 1"
    return {
        "exec": {"command": ["bash", "-c", wait]},
        "periodSeconds": 1,
        "timeoutSeconds": 3,
        "failureThreshold": 60,
    }


def swap_proxy_name(deployment: str) -> str:
    """Name of the proxy Deployment that stands in for swapped ``deployment``."""
    return deployment + SWAP_SUFFIX


def keys_secret_name(deployment: str) -> str:
    """Name of the keys Secret: ``<deployment>-tpconf-keys`` (for ``new``, the proxy itself;
    for ``swap``, the swapped Deployment; for ``existing``, the user's Deployment)."""
    return deployment + KEYS_SUFFIX


def agent_selector(req: ProxyRequest, proxy: str) -> str:
    """The label selector of the agent pod of this start of proxy Deployment ``proxy``."""
    return L.selector_string(
        {
            L.PROXY: L.label_value(proxy),
            L.SESSION: L.label_value(req.session_id),
            L.START: L.label_value(req.start_id),
        }
    )


def object_metadata(
    req: ProxyRequest, name: str, extra_labels: Mapping[str, str] | None = None
) -> JSON:
    return {
        "name": name,
        "namespace": req.namespace,
        "labels": {
            **L.created_labels(config_name=req.name, session_id=req.session_id),
            **dict(extra_labels or {}),
        },
        "annotations": L.owner_annotations(owner=req.owner, project=req.project),
    }


def owner_reference(deployment: Mapping[str, Any]) -> JSON:
    """An ownerReference to a created Deployment (for garbage collection with it)."""
    meta = deployment["metadata"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": False,
        "blockOwnerDeletion": False,
    }


def keys_secret(req: ProxyRequest, *, name: str, owner: Mapping[str, Any] | None = None) -> JSON:
    """The keys Secret; ``owner`` (a created Deployment) makes it garbage-collected with it."""
    meta = object_metadata(req, name)
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    return _secret(meta, req.keys)


def existing_keys_secret(req: ProxyRequest, deployment: str) -> JSON:
    """The keys Secret of ``existing`` Deployment ``deployment``: owned by nothing, labelled
    ``tpconf.io/existing`` (so that ``tpconf down`` releases it instead of deleting it)."""
    meta = object_metadata(
        req, keys_secret_name(deployment), {L.EXISTING: L.label_value(deployment)}
    )
    return _secret(meta, req.keys)


def _secret(meta: JSON, keys: AgentKeys) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "stringData": secret_data(keys),
    }


def secret_data(keys: AgentKeys) -> dict[str, str]:
    """The Secret's files."""
    return {HOST_KEY_FILE: keys.host_private_key, AUTHORIZED_KEYS_FILE: keys.authorized_keys}


def keys_volume(secret: str) -> JSON:
    """The pod volume of the keys Secret."""
    return {
        "name": KEYS_VOLUME,
        "secret": {"secretName": secret, "defaultMode": KEYS_MODE},
    }


def keys_mount() -> JSON:
    """The agent container's mount of the keys volume."""
    return {"name": KEYS_VOLUME, "mountPath": KEYS_MOUNT, "readOnly": True}


def restricted_container_security(
    original: Mapping[str, Any] | None = None,
    *,
    pod_security: Mapping[str, Any] | None = None,
) -> JSON:
    """A container securityContext the ``restricted`` Pod Security Standard admits.

    The user of ``original`` is kept, so the agent reads the pod's volumes (served over sshfs)
    with the workload's permissions, except root: the agent never runs as root, so a root user
    becomes :data:`AGENT_UID`. The group is always :data:`AGENT_GID` (0): the agent needs it to
    read the keys and to name its uid in /etc/passwd (docs/agent.md); :func:`swap_deployment`
    adds the workload's own group to the pod's ``supplementalGroups``.
    ``privileged``, added capabilities and ``readOnlyRootFilesystem`` (the agent writes to
    /tmp) are dropped; SELinux/AppArmor/Windows options are kept.
    """
    sc = copy.deepcopy(dict(original or {}))
    for key in ("privileged", "readOnlyRootFilesystem", "procMount"):
        sc.pop(key, None)
    sc["allowPrivilegeEscalation"] = False
    sc["capabilities"] = {"drop": ["ALL"]}
    sc["runAsNonRoot"] = True
    sc["seccompProfile"] = {"type": "RuntimeDefault"}
    pod_sc = pod_security or {}
    effective_uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    if effective_uid == 0:
        sc["runAsUser"] = AGENT_UID
    sc["runAsGroup"] = AGENT_GID
    return sc


def low_ports_sysctl(ports: Sequence[int]) -> JSON | None:
    """The sysctl that lets a non-root agent bind the lowest port below 1024, if any."""
    low = [p for p in ports if p < 1024]
    if not low:
        return None
    return {"name": UNPRIVILEGED_PORT_SYSCTL, "value": str(min(low))}


def _with_sysctl(pod_sc: JSON, sysctl: JSON | None) -> JSON:
    if sysctl is None:
        return pod_sc
    others = [s for s in pod_sc.get("sysctls") or [] if s.get("name") != sysctl["name"]]
    return {**pod_sc, "sysctls": [*others, sysctl]}


def new_deployment(req: ProxyRequest) -> JSON:
    """The ``new`` operation's Deployment: one agent pod, selected by ``tpconf.io/proxy``."""
    name = req.name
    proxy = {L.PROXY: L.label_value(name)}
    meta = object_metadata(req, name, proxy)
    pod_sc: JSON = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    pod_sc = _with_sysctl(pod_sc, low_ports_sysctl(req.expose_remote_ports))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": dict(proxy)},
            "template": {
                "metadata": {
                    "labels": {**meta["labels"], L.START: L.label_value(req.start_id)},
                    "annotations": {},
                },
                "spec": {
                    # As Telepresence 1's proxy: the service-account token is one of the pod's
                    # volumes the local process gets under $TELEPRESENCE_ROOT.
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": True,
                    "securityContext": pod_sc,
                    "containers": [
                        {
                            "name": AGENT_CONTAINER,
                            "image": req.agent_image,
                            "imagePullPolicy": "IfNotPresent",
                            "ports": [
                                {"name": f"tcp-{p}", "containerPort": p, "protocol": "TCP"}
                                for p in req.expose_remote_ports
                            ],
                            "startupProbe": startup_probe(),
                            "resources": copy.deepcopy(RESOURCES),
                            "securityContext": restricted_container_security(),
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "volumeMounts": [keys_mount()],
                        }
                    ],
                    "volumes": [keys_volume(keys_secret_name(name))],
                },
            },
        },
    }


def new_service(req: ProxyRequest) -> JSON | None:
    """The ``new`` operation's ClusterIP Service, or ``None`` when no port is exposed."""
    if not req.expose_remote_ports:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_metadata(req, req.name),
        "spec": {
            "type": "ClusterIP",
            "selector": {L.PROXY: L.label_value(req.name)},
            "ports": [
                {"name": f"tcp-{p}", "port": p, "targetPort": p, "protocol": "TCP"}
                for p in sorted(set(req.expose_remote_ports))
            ],
        },
    }


def choose_container(
    containers: Sequence[Mapping[str, Any]], wanted: str | None, *, what: str
) -> int:
    """Index of the container to replace: ``wanted``, or the first; errors list the names."""
    names = [str(c.get("name")) for c in containers]
    if wanted is None:
        if not names:
            raise errors.ClusterError(f"{what} has no containers")
        return 0
    if wanted in names:
        return names.index(wanted)
    raise errors.NotFound(
        f"{what} has no container {wanted!r} (containers: {', '.join(names)})",
        hint="name one of them in `swap:` of this deployment in telepresence.yaml "
        "(`swap: DEPLOYMENT:CONTAINER`, or `container:` under `swap:`)",
    )


def swap_deployment(req: ProxyRequest, original: Mapping[str, Any], container: str | None) -> JSON:
    """The proxy Deployment standing in for ``original`` (a Deployment as JSON)."""
    orig_meta = original["metadata"]
    orig_name = str(orig_meta["name"])
    what = f'Deployment "{orig_name}"'
    name = swap_proxy_name(orig_name)
    proxy = {L.PROXY: L.label_value(name)}
    template = copy.deepcopy(original["spec"]["template"])
    tmeta = template.get("metadata") or {}
    spec = template["spec"]
    containers = spec["containers"]
    index = choose_container(containers, container, what=what)
    pod_sc = spec.get("securityContext") or {}
    agent = dict(containers[index])
    for key in REMOVED_FIELDS:
        agent.pop(key, None)
    agent["image"] = req.agent_image
    agent["imagePullPolicy"] = "IfNotPresent"
    agent["startupProbe"] = startup_probe()
    agent["terminationMessagePolicy"] = "FallbackToLogsOnError"
    agent["securityContext"] = restricted_container_security(
        agent.get("securityContext"), pod_security=pod_sc
    )
    mounts = [m for m in agent.get("volumeMounts") or [] if m.get("name") != KEYS_VOLUME]
    agent["volumeMounts"] = [*mounts, keys_mount()]
    containers[index] = agent
    volumes = [v for v in spec.get("volumes") or [] if v.get("name") != KEYS_VOLUME]
    spec["volumes"] = [*volumes, keys_volume(keys_secret_name(orig_name))]
    # The swapped container's own ports are exposed automatically: they may be low too.
    ports = [*req.expose_remote_ports, *container_ports(original, str(agent["name"]))]
    share_workload_group(spec, containers_orig_sc(original, index), low_ports=ports)

    created = L.created_labels(config_name=req.name, session_id=req.session_id)
    # The original's labels win over ours (a Service may select on any of them, even
    # app.kubernetes.io/managed-by); the tpconf.io/ ones are always ours.
    template_labels = {**created, **(tmeta.get("labels") or {}), **proxy}
    template_labels[L.SESSION] = created[L.SESSION]
    template_labels[L.DEPLOYMENT] = created[L.DEPLOYMENT]
    template_labels[L.START] = L.label_value(req.start_id)
    template["metadata"] = {
        "labels": template_labels,
        "annotations": dict(tmeta.get("annotations") or {}),
    }
    selector = copy.deepcopy(original["spec"].get("selector") or {})
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), **proxy}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_metadata(req, name, proxy),
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 1,
            "strategy": {"type": "Recreate"},
            "selector": selector,
            "template": template,
        },
    }


def share_workload_group(
    spec: JSON, workload: Mapping[str, Any] | None, *, low_ports: Sequence[int] = ()
) -> None:
    """Fit a pod ``spec`` that runs the agent beside (or instead of) a workload container.

    The agent runs with group 0 (:func:`restricted_container_security`); the workload's own
    group joins the pod's ``supplementalGroups`` so the agent reads its volumes as it does.
    ``low_ports`` below 1024 get the unprivileged-port sysctl.
    """
    pod_sc = spec.get("securityContext") or {}
    new_pod_sc = _with_sysctl(dict(pod_sc), low_ports_sysctl(low_ports))
    workload_gid = (workload or {}).get("runAsGroup", pod_sc.get("runAsGroup"))
    if workload_gid not in (None, AGENT_GID):
        groups = list(new_pod_sc.get("supplementalGroups") or [])
        if workload_gid not in groups:
            new_pod_sc["supplementalGroups"] = [*groups, workload_gid]
    if new_pod_sc or "securityContext" in spec:
        spec["securityContext"] = new_pod_sc


def containers_orig_sc(deployment: Mapping[str, Any], index: int) -> JSON | None:
    """The securityContext of container ``index`` of a Deployment's pod template."""
    sc = deployment["spec"]["template"]["spec"]["containers"][index].get("securityContext")
    return dict(sc) if sc else None


def container_ports(deployment: Mapping[str, Any], container: str) -> tuple[int, ...]:
    """The TCP container ports of ``container`` in a Deployment's pod template."""
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c.get("name") == container:
            return tuple(
                int(p["containerPort"])
                for p in c.get("ports") or []
                if p.get("protocol", "TCP") == "TCP"
            )
    return ()


def image_repository(image: str) -> str:
    """``registry/team/tpconf/agent`` of ``registry/team/tpconf/agent:0.1.0@sha256:...``."""
    image = image.split("@", 1)[0]
    slash = image.rfind("/")
    colon = image.rfind(":")
    return image[:colon] if colon > slash else image


def is_agent_image(image: str, agent_image: str) -> bool:
    """Whether ``image`` is the agent: the configured image's repository, or ``*/tpconf/agent``."""
    repo = image_repository(image)
    return (
        repo == image_repository(agent_image)
        or repo == AGENT_REPOSITORY
        or repo.endswith("/" + AGENT_REPOSITORY)
    )


def check_existing(deployment: Mapping[str, Any], agent_image: str) -> str:
    """The agent container of an ``existing`` Deployment; explains what is wrong otherwise."""
    name = str(deployment["metadata"]["name"])
    spec = deployment["spec"]["template"]["spec"]
    containers = spec.get("containers") or []
    agents = [c for c in containers if is_agent_image(str(c.get("image", "")), agent_image)]
    if not agents:
        images = ", ".join(f"{c.get('name')}={c.get('image')}" for c in containers)
        raise errors.ClusterError(
            f'Deployment "{name}" does not run the tpconf agent: no container uses '
            f"{agent_image} or another */{AGENT_REPOSITORY} image (containers: {images})",
            hint=f"use `swap:` instead of `existing:` for an ordinary workload, or add a "
            f"container of {agent_image} to it that mounts Secret {keys_secret_name(name)} at "
            f"{KEYS_MOUNT}",
        )
    agent = agents[0]
    secret = keys_secret_name(name)
    volumes = {
        v.get("name"): v
        for v in spec.get("volumes") or []
        if (v.get("secret") or {}).get("secretName") == secret
    }
    mounted = [
        m
        for m in agent.get("volumeMounts") or []
        if m.get("name") in volumes and m.get("mountPath") == KEYS_MOUNT
    ]
    if not mounted:
        raise errors.ClusterError(
            f'Deployment "{name}": container "{agent.get("name")}" runs the agent but does not '
            f'mount Secret "{secret}" at {KEYS_MOUNT}',
            hint=f"add a volume {{secret: {{secretName: {secret}, defaultMode: 0{KEYS_MODE:o}}}}} "
            f"and a volumeMount at {KEYS_MOUNT} (readOnly) to the agent container; tpconf writes "
            "the keys into that Secret",
        )
    return str(agent["name"])


def decoded(secret: Mapping[str, Any]) -> dict[str, str]:
    """A Secret's ``data``, base64-decoded."""
    return {
        k: base64.b64decode(v).decode("utf-8", "replace")
        for k, v in (secret.get("data") or {}).items()
    }
