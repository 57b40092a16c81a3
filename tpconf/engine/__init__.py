"""tpconf.engine: the local container engine (Docker), as the container method uses it.

One path for every call to the ``docker`` CLI (:mod:`tpconf.engine.docker`), its failures turned
into :class:`~tpconf.errors.EngineError` with what to do. Everything tpconf starts carries the
labels of :data:`~tpconf.engine.docker.LABELS`, so ``tpconf down`` finds what a killed ``up``
left.
"""

from __future__ import annotations

from tpconf.engine.docker import (
    LABEL_DEPLOYMENT,
    LABEL_MANAGED,
    LABEL_PROJECT,
    LABEL_ROLE,
    LABEL_SESSION,
    Docker,
    EngineNotRunning,
    find_docker,
)

__all__ = [
    "LABEL_DEPLOYMENT",
    "LABEL_MANAGED",
    "LABEL_PROJECT",
    "LABEL_ROLE",
    "LABEL_SESSION",
    "Docker",
    "EngineNotRunning",
    "find_docker",
]
