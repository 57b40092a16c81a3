"""Waiting for a proxy's pod to become Ready, with progress and clear failures.

:func:`pod_state` is pure: it reads one pod's JSON and says Ready, still progressing (and how:
Pending, ContainerCreating, Running) or failed (image pull, crash, config error, unschedulable).
:func:`wait_for_pod` watches the pods of a proxy's selector and applies it to the newest one
that is not terminating; when no pod exists it reads the Deployment's ``ReplicaFailure``
condition, which is where Pod Security admission and quota refusals show up.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from tpconf import errors
from tpconf.cluster.client import Cluster, path
from tpconf.cluster.model import PodRef, Proxy

JSON = dict[str, Any]
Progress = Callable[[str], None]

IMAGE_ERRORS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
)
#: Image errors that a wait can mend: the image may be being pushed or loaded into the node.
IMAGE_NOT_YET = IMAGE_ERRORS - {"InvalidImageName"}
#: Why a pod stops that its Deployment mends by making another one.
EVICTED = frozenset({"Evicted", "Preempting", "Shutdown", "NodeShutdown", "Terminated"})
CONFIG_ERRORS = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
)
#: Key material must never reach a message: long base64 runs and PEM blocks are blanked.
_SECRETISH = re.compile(
    r"-----BEGIN[^-]*-----.*?(-----END[^-]*-----|$)|[A-Za-z0-9+/=]{40,}", re.DOTALL
)


@dataclass(frozen=True)
class PodState:
    """What one pod is doing, as :func:`pod_state` reads it."""

    kind: Literal["ready", "progress", "image", "crash", "config", "unschedulable", "stopped"]
    text: str
    image: str | None = None
    container: str | None = None
    exit_code: int | None = None
    #: A crashed container's termination message (its last log lines with
    #: ``terminationMessagePolicy: FallbackToLogsOnError``).
    message: str | None = None


def redact(text: str) -> str:
    """``text`` with anything looking like key material replaced by ``[redacted]``."""
    return _SECRETISH.sub("[redacted]", text)


#: What the kubelet answers (with status 200) while a restarted container's log is not there.
_KUBELET_LOG_ERRORS = ("unable to retrieve container logs", "failed to try resolving symlinks")


def log_tail(text: str, limit: int = errors.PAYLOAD_MAX) -> str:
    """The end of a log (where the error is), at most ``limit`` characters; already redacted."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    newline = cut.find("\n")
    return "…" + (cut[newline + 1 :] if 0 <= newline < limit // 2 else cut)


def _statuses(pod: Mapping[str, Any]) -> list[JSON]:
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def pod_state(pod: Mapping[str, Any], container: str) -> PodState:
    """Classify one pod for the agent ``container`` (pure; see the module docstring)."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    if phase in ("Failed", "Succeeded"):
        reason = status.get("reason") or phase
        return PodState("stopped", f"{reason}: {status.get('message') or 'the pod stopped'}")
    scheduled = conditions.get("PodScheduled") or {}
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return PodState("unschedulable", str(scheduled.get("message") or "Unschedulable"))
    for cs in _statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        name = cs.get("name")
        if reason in IMAGE_ERRORS:
            return PodState(
                "image",
                f"{reason}: {waiting.get('message') or ''}".strip(": "),
                image=cs.get("image"),
                container=name,
            )
        if reason in CONFIG_ERRORS:
            return PodState("config", f"{reason}: {waiting.get('message') or ''}", container=name)
        last = (cs.get("lastState") or {}).get("terminated")
        if name == container and (
            reason == "CrashLoopBackOff" or (last and cs.get("restartCount"))
        ):
            code = (last or {}).get("exitCode")
            return PodState(
                "crash",
                f"{reason or 'restarted'} (exit code {code})",
                container=name,
                exit_code=code,
                message=(last or {}).get("message"),
            )
    ours = next(
        (cs for cs in status.get("containerStatuses") or [] if cs.get("name") == container), None
    )
    if ours and ours.get("ready") and (conditions.get("Ready") or {}).get("status") == "True":
        return PodState("ready", "Ready")
    if ours and "running" in (ours.get("state") or {}):
        return PodState("progress", "Running, not Ready yet")
    if ours:
        waiting = (ours.get("state") or {}).get("waiting") or {}
        return PodState("progress", str(waiting.get("reason") or "ContainerCreating"))
    if scheduled.get("status") == "True":
        return PodState("progress", "ContainerCreating")
    return PodState("progress", "Pending (scheduling)")


def image_failure(state: PodState, *, pod: str) -> errors.PodFailed:
    """The error for an image that cannot be pulled: transient unless its name is invalid."""
    reason = state.text.partition(":")[0]
    kind = errors.ImageNotReady if reason in IMAGE_NOT_YET else errors.PodFailed
    return kind(
        f'pod "{pod}" cannot pull image {state.image} for container "{state.container}" '
        f"({errors.trim_payload(state.text)})",
        hint="load or push the image where the cluster can pull it (tpconf tries again "
        "meanwhile), or set `agent-image` in telepresence.yaml to an image that exists",
    )


def stop_failure(state: PodState, *, pod: str, namespace: str) -> errors.PodFailed:
    """The error for a pod that stopped or cannot start its containers: transient when it was
    evicted (or its node went away), since its Deployment makes another one."""
    text = errors.trim_payload(redact(state.text))
    if state.kind == "stopped" and state.text.partition(":")[0] in EVICTED:
        return errors.PodEvicted(
            f'pod "{pod}" stopped: {text}',
            hint=f"its Deployment makes another one; `kubectl -n {namespace} get pods` shows it",
        )
    return errors.PodFailed(
        f'pod "{pod}" cannot start: {text}', hint=f"kubectl -n {namespace} describe pod {pod}"
    )


def replica_failure(deployment: Mapping[str, Any]) -> str | None:
    """The message of a Deployment's ``ReplicaFailure`` condition (pod creation refused)."""
    for c in (deployment.get("status") or {}).get("conditions") or []:
        if c.get("type") == "ReplicaFailure" and c.get("status") == "True":
            return str(c.get("message") or c.get("reason") or "ReplicaFailure")
    return None


def _admission_error(message: str, *, proxy: Proxy) -> errors.PodFailed:
    if "PodSecurity" in message:
        return errors.PodFailed(
            f'Pod Security admission refused the pods of Deployment "{proxy.deployment}" '
            f'in namespace "{proxy.namespace}": {errors.trim_payload(message)}',
            hint="the agent container itself is `restricted`-compliant; another container or "
            "setting of the swapped pod template is not, or the namespace's "
            "pod-security.kubernetes.io/enforce label forbids the sysctl "
            "net.ipv4.ip_unprivileged_port_start used for remote ports below 1024 "
            "(expose a port >= 1024 instead)",
        )
    return errors.PodFailed(
        f'Deployment "{proxy.deployment}" in namespace "{proxy.namespace}" cannot create its '
        f"pod: {errors.trim_payload(message)}"
    )


async def _crash_logs(cluster: Cluster, namespace: str, pod: str, container: str) -> str:
    """The last log lines of the crashed (else the current) container, redacted; may be empty.

    Right after a restart the runtime may not serve the previous container's log yet (the
    kubelet then answers 200 with :data:`_KUBELET_LOG_ERRORS`): try again shortly.
    """
    for attempt in range(3):
        for previous in (True, False):
            try:
                text = await cluster.text(
                    path("pods", namespace, pod, "log"),
                    what=f'read the log of pod "{pod}"',
                    query={"container": container, "previous": previous, "tailLines": 10},
                )
            except errors.ClusterError:
                continue
            text = text.strip()
            if text and not text.startswith(_KUBELET_LOG_ERRORS):
                return redact(text)
        if attempt < 2:
            await anyio.sleep(0.5)
    return ""


async def _last_warning(cluster: Cluster, namespace: str, pod: str) -> str | None:
    try:
        events = await cluster.request(
            "GET",
            path("events", namespace),
            what=f'list the events of pod "{pod}"',
            query={"fieldSelector": f"involvedObject.name={pod}"},
        )
    except errors.ClusterError:
        return None
    warnings = [e for e in events.get("items") or [] if e.get("type") == "Warning"]
    if not warnings:
        return None
    last = max(warnings, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    return f"{last.get('reason')}: {redact(str(last.get('message') or ''))}"


def _newest_live(pods: Mapping[str, JSON]) -> JSON | None:
    live = [p for p in pods.values() if not p["metadata"].get("deletionTimestamp")]
    if not live:
        return None
    return max(live, key=lambda p: p["metadata"].get("creationTimestamp") or "")


async def wait_for_pod(
    cluster: Cluster,
    proxy: Proxy,
    *,
    timeout: float = 120.0,
    progress: Progress | None = None,
    unschedulable_grace: float = 15.0,
) -> PodRef:
    """Wait until the newest pod of ``proxy`` is Ready; report each change through ``progress``.

    Raises :class:`~tpconf.errors.PodFailed` (image pull, crash with its exit code and last log
    lines, container config, Pod Security or quota refusal, unschedulable for longer than
    ``unschedulable_grace`` seconds with the scheduler's message) or
    :class:`~tpconf.errors.WaitTimeout` naming what it waited for and the last state seen.
    """
    say = progress or (lambda _text: None)
    ns = proxy.namespace
    pods_path = path("pods", ns)
    deploy_path = path("deployments", ns, proxy.deployment)
    query = {"labelSelector": proxy.selector}
    what = f'watch the pods of Deployment "{proxy.deployment}" in namespace "{ns}"'
    deadline = anyio.current_time() + timeout
    pods: dict[str, JSON] = {}
    version: str | None = None
    last_text: str | None = None
    unschedulable_since: float | None = None
    newest: JSON | None = None

    while True:
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            break
        if version is None:
            listing = await cluster.request("GET", pods_path, what=what, query=query)
            pods = {p["metadata"]["name"]: p for p in listing.get("items") or []}
            version = str(listing["metadata"]["resourceVersion"])
        else:
            event = await cluster.next_event(
                pods_path,
                what=what,
                resource_version=version,
                timeout=min(remaining, 5.0 if newest is not None else 2.0),
                query=query,
            )
            if event is not None:
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    version = None  # 410 Gone or similar: list again
                    continue
                name = obj["metadata"]["name"]
                version = str(obj["metadata"]["resourceVersion"])
                if event.get("type") == "DELETED":
                    pods.pop(name, None)
                else:
                    pods[name] = obj

        newest = _newest_live(pods)
        if newest is None:
            deployment = await cluster.request(
                "GET", deploy_path, what=f'read Deployment "{proxy.deployment}"'
            )
            refused = replica_failure(deployment)
            if refused:
                raise _admission_error(refused, proxy=proxy)
            text = "waiting for the pod to be created"
            if text != last_text:
                say(text)
                last_text = text
            continue

        pod_name = newest["metadata"]["name"]
        state = pod_state(newest, proxy.container)
        text = f"pod {pod_name}: {state.text}"
        if text != last_text:
            say(text)
            last_text = text
        if state.kind == "ready":
            return PodRef(namespace=ns, pod=pod_name, container=proxy.container)
        if state.kind == "image":
            raise image_failure(state, pod=pod_name)
        if state.kind == "crash":
            logs = redact(state.message.strip()) if state.message else ""
            logs = logs or await _crash_logs(cluster, ns, pod_name, proxy.container)
            tail = f"; last log lines:\n{log_tail(logs)}" if logs else ""
            raise errors.PodFailed(
                f'agent container "{proxy.container}" of pod "{pod_name}" keeps crashing: '
                f"{state.text}{tail}",
                hint=f"kubectl -n {ns} logs {pod_name} -c {proxy.container} --previous",
            )
        if state.kind in ("config", "stopped"):
            raise stop_failure(state, pod=pod_name, namespace=ns)
        if state.kind == "unschedulable":
            now = anyio.current_time()
            unschedulable_since = unschedulable_since or now
            if now - unschedulable_since >= unschedulable_grace:
                raise errors.PodFailed(
                    f'pod "{pod_name}" cannot be scheduled: {errors.trim_payload(state.text)}',
                    hint="free resources or relax the pod's nodeSelector/affinity/tolerations",
                )
        else:
            unschedulable_since = None

    seen = last_text or "nothing"
    warning = None
    if newest is not None:
        warning = await _last_warning(cluster, ns, newest["metadata"]["name"])
    extra = f"; last warning: {errors.trim_payload(warning)}" if warning else ""
    raise errors.WaitTimeout(
        f'timed out after {timeout:g} s waiting for the pod of Deployment "{proxy.deployment}" '
        f'in namespace "{ns}" to become Ready (last seen: {seen}){extra}',
        hint=f"kubectl -n {ns} describe pods -l {proxy.selector}",
    )


async def ready_pods(cluster: Cluster, proxy: Proxy) -> list[PodRef]:
    """The pods of ``proxy`` whose agent is Ready now (an intercept's replicas), by name."""
    listing = await cluster.request(
        "GET",
        path("pods", proxy.namespace),
        what=f'list the pods of Deployment "{proxy.deployment}" in namespace "{proxy.namespace}"',
        query={"labelSelector": proxy.selector},
    )
    ready = [
        PodRef(namespace=proxy.namespace, pod=pod["metadata"]["name"], container=proxy.container)
        for pod in listing.get("items") or []
        if not pod["metadata"].get("deletionTimestamp")
        and pod_state(pod, proxy.container).kind == "ready"
    ]
    return sorted(ready, key=lambda ref: ref.pod)
