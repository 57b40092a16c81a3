"""What ``tpconf up`` would do, in words: the lines of ``tpconf plan`` for each deployment.

Pure: the file's resolved spec in, lines out. The operation's lines are written here (one case
per operation, checked exhaustive by mypy); the method's come from its module
(:meth:`tpconf.methods.Method.describe`).
"""

from __future__ import annotations

import shlex
from typing import assert_never

from tpconf.config import DeploymentSpec, ExistingOp, NewOp, SwapOp
from tpconf.methods import REGISTRY


def operation_lines(spec: DeploymentSpec) -> list[str]:
    """What happens in the cluster for ``spec``."""
    ns = spec.namespace or "(current namespace)"
    match spec.operation:
        case NewOp(image=image):
            lines = [f"+ create Deployment {ns}/{spec.name} running {image}"]
            ports = ", ".join(str(m.remote) for m in spec.expose)
            if ports:
                lines.append(f"+ create Service {ns}/{spec.name} on port(s) {ports}")
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
        case _:
            assert_never(spec.operation)


def describe_deployment(spec: DeploymentSpec) -> list[str]:
    """Every line of ``tpconf plan`` for one deployment."""
    lines = operation_lines(spec)
    lines.append("+ tunnel: kubectl port-forward + SSH (pinned host key)")
    lines.extend(REGISTRY[spec.method].describe(spec))
    if spec.volumes is not None:
        lines.append(f"+ mount the pod's filesystem at {spec.volumes.root}")
        lines.extend(f"+ mount pod path {m.pod} at {m.local}" for m in spec.volumes.mounts)
    lines.extend(f"+ expose: cluster port {m.remote} -> localhost:{m.local}" for m in spec.expose)
    if spec.env.export is not None:
        lines.append(f"+ write the pod environment to {spec.env.export.file}")
    if spec.shell:
        lines.append("+ an interactive shell with the pod's environment")
    elif spec.run is not None:
        command = spec.run if isinstance(spec.run, str) else shlex.join(spec.run)
        lines.append(f"+ run: {command}")
    return lines
