"""What ``tpconf up`` would do, in words: the lines of ``tpconf plan`` for each deployment.

Pure: the file's resolved spec in, lines out. The operation's lines are written here (one case
per operation, checked exhaustive by mypy); the method's come from its module
(:meth:`tpconf.methods.Method.describe`).
"""

from __future__ import annotations

import shlex
from typing import assert_never

from tpconf.config import DeploymentSpec, ExistingOp, InterceptOp, NewOp, SwapOp
from tpconf.methods import REGISTRY


def operation_lines(spec: DeploymentSpec) -> list[str]:
    """What happens in the cluster for ``spec``."""
    ns = spec.namespace or "(current namespace)"
    match spec.operation:
        case NewOp(image=image):
            lines = [f"+ create Deployment {ns}/{spec.target} running {image}"]
            ports = ", ".join(str(m.remote) for m in spec.expose)
            if ports:
                lines.append(f"+ create Service {ns}/{spec.target} on port(s) {ports}")
            return lines
        case SwapOp(deployment=deployment, container=container):
            which = f" (container {container})" if container else ""
            swap = (
                f"~ swap Deployment {ns}/{deployment}{which}: scale to 0, run a proxy with its "
                "labels, env and volumes; restored on exit"
            )
            return [swap]
        case ExistingOp(deployment=deployment):
            return [f"= use the proxy already running in Deployment {ns}/{deployment}"]
        case InterceptOp(deployment=deployment, container=container, ports=ports, headers=headers):
            which = f" container {container}" if container else ""
            shown = ", ".join(str(m) for m in ports) or "every port it declares"
            joins = (
                f"~ intercept Deployment {ns}/{deployment}{which} ({shown}): the agent joins its "
                "pods as a sidecar, the app keeps serving; its Services point at the agent; "
                "restored when the last developer stops"
            )
            lines = [joins]
            if headers:
                match = ", ".join(
                    f"{h.name} ~ /{h.value}/" if h.regex else f"{h.name}: {h.value}"
                    for h in headers
                )
                lines.append(
                    f"+ route the HTTP requests with {match} here; the rest stays with the app"
                )
            else:
                lines.append("+ route every connection of those ports here")
            return lines
        case _:
            assert_never(spec.operation)


def describe_deployment(spec: DeploymentSpec) -> list[str]:
    """Every line of ``tpconf plan`` for one deployment."""
    lines = operation_lines(spec)
    lines.append(
        "+ tunnel: port-forward to the agent (in this process), SSH with a pinned host key,"
        " data over the agent's relay"
    )
    lines.extend(REGISTRY[spec.method].describe(spec))
    if spec.volumes is not None:
        lines.append(f"+ mount the pod's filesystem at {spec.volumes.root}")
        lines.extend(f"+ mount pod path {m.pod} at {m.local}" for m in spec.volumes.mounts)
    lines.extend(f"+ expose: cluster port {m.remote} -> localhost:{m.local}" for m in spec.expose)
    if isinstance(spec.operation, SwapOp):
        lines.append("+ expose: the swapped container's own ports, each to the same local port")
    lines.extend(f"+ to-pod: localhost:{p} -> the pod's localhost:{p}" for p in spec.to_pod)
    lines.extend(f"+ from-pod: the pod's localhost:{p} -> localhost:{p}" for p in spec.from_pod)
    if spec.env.export is not None:
        lines.append(f"+ write the pod environment to {spec.env.export.file}")
    if spec.shell:
        lines.append("+ an interactive shell with the pod's environment")
    elif spec.run is not None:
        command = spec.run if isinstance(spec.run, str) else shlex.join(spec.run)
        lines.append(f"+ run: {command}")
    return lines
