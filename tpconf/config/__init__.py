"""telepresence.yaml: the file format (models), loading with precise errors, the resolved view.

Owns everything about the file and nothing about the cluster: no network, no processes. The rest
of tpconf calls :func:`load_project` and works with :class:`Project` and :class:`DeploymentSpec`.
"""

from __future__ import annotations

from tpconf.config.loading import (
    DEFAULT_FILENAME,
    OVERRIDE_FILENAME,
    ConfigFiles,
    Document,
    find_config_file,
    load_document,
    load_project,
    parse_project,
    project_of,
)
from tpconf.config.methods import DEFAULT_METHOD, MethodCatalog, MethodRules, RuleReport
from tpconf.config.models import DEFAULT_AGENT_IMAGE, TelepresenceFile
from tpconf.config.project import (
    ConfigWarning,
    DeploymentSpec,
    EnvExport,
    EnvSpec,
    ExistingOp,
    HeaderMatch,
    InterceptOp,
    Mount,
    NewOp,
    Operation,
    PortMapping,
    Project,
    RestartPolicy,
    SwapOp,
    VolumesSpec,
    VpnSpec,
)

__all__ = [
    "DEFAULT_AGENT_IMAGE",
    "DEFAULT_FILENAME",
    "DEFAULT_METHOD",
    "OVERRIDE_FILENAME",
    "ConfigFiles",
    "ConfigWarning",
    "DeploymentSpec",
    "Document",
    "EnvExport",
    "EnvSpec",
    "ExistingOp",
    "HeaderMatch",
    "InterceptOp",
    "MethodCatalog",
    "MethodRules",
    "Mount",
    "NewOp",
    "Operation",
    "PortMapping",
    "Project",
    "RestartPolicy",
    "RuleReport",
    "SwapOp",
    "TelepresenceFile",
    "VolumesSpec",
    "VpnSpec",
    "find_config_file",
    "load_document",
    "load_project",
    "parse_project",
    "project_of",
]
