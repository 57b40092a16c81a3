"""The telepresence.yaml file format, version 1, as pydantic models.

These models describe the file as written, shorthands included: they are the source of the JSON
schema, of docs/configuration.md and of the first validation pass. The attribute docstrings are the
documentation (Skaffold style: sentences ending with a period). What the rest of tpconf uses is the
resolved view in :mod:`tpconf.config.project`, built from these by :mod:`tpconf.config.resolve`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

from tpconf.config import values
from tpconf.config.methods import DEFAULT_METHOD, MethodCatalog
from tpconf.config.project import ExportFormat, RestartPolicy
from tpconf.config.values import BadValue

#: The only format version this tpconf reads.
SUPPORTED_VERSIONS = (1,)

#: The proxy image used when neither `agent-image` nor `new.image` says otherwise.
DEFAULT_AGENT_IMAGE = "tpconf/agent:0.1.0"

#: Where a deployment's pod filesystem appears when `volumes.root` is not set: relative to the
#: directory of telepresence.yaml, `{name}` is the deployment's name.
DEFAULT_VOLUMES_ROOT = ".tpconf/{name}"


def kebab(name: str) -> str:
    """The key of a field in the file: ``also_proxy`` is written `also-proxy`."""
    return name.rstrip("_").replace("_", "-")


def custom_error(message: str, hint: str | None = None) -> PydanticCustomError:
    """A validation error whose message (and hint) are shown to the user as they are."""
    return PydanticCustomError("tpconf", "{message}", {"message": message, "hint": hint})


def _checked(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Run a :mod:`values` check, turning :class:`BadValue` into a validation error."""

    def run(value: Any) -> Any:
        try:
            return check(value)
        except BadValue as exc:
            raise custom_error(exc.message, exc.hint) from None

    return run


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        defer_build=True,
        # Attribute docstrings are read by tpconf.config.schema, only when the schema is built.
        alias_generator=kebab,
        validate_by_alias=True,
        # `also_proxy` must be an unknown key (with a "did you mean `also-proxy`"), not an alias.
        validate_by_name=False,
        serialize_by_alias=True,
    )


# ---- shorthands ---------------------------------------------------------------------------------


def _flag_or_mapping(key: str, string_key: str | None = None) -> Callable[[Any], Any]:
    """`key: true` (or empty) means the defaults, `key: NAME` sets `string_key`."""

    def normalise(value: Any) -> Any:
        if value is None or value is True:
            return {}
        if value is False:
            raise custom_error(
                f"`{key}: false` is not allowed",
                hint=f"remove `{key}` and use one of `new`, `swap`, `existing` or `intercept`",
            )
        if isinstance(value, str) and string_key is not None:
            return {string_key: value}
        return value

    return normalise


def _deployment_and_container(key: str) -> Callable[[Any], Any]:
    """`key: NAME:CONTAINER` sets both; otherwise as :func:`_flag_or_mapping`."""

    def normalise(value: Any) -> Any:
        if isinstance(value, str) and ":" in value:
            deployment, _, container = value.partition(":")
            return {"deployment": deployment, "container": container}
        return _flag_or_mapping(key, "deployment")(value)

    return normalise


def _header_value(value: Any) -> Any:
    # A number or boolean in YAML is what the user typed: compare it as text.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int | float) else value


def _volumes(value: Any) -> Any:
    if value is False:
        return None
    if value is True or value is None:
        return {}
    return value


def _export(value: Any) -> Any:
    return {"file": value} if isinstance(value, str) else value


def _run(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise custom_error("`run` is empty", hint="write a command, or remove `run`")
        return value
    if isinstance(value, list):
        if not value:
            raise custom_error("`run` is an empty list", hint="write a command, or remove `run`")
        argv = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, str | int | float):
                raise custom_error(
                    f"each argument of `run` must be a string, got {values.describe(item)}",
                    hint='quote it, for example `["sleep", "10"]`',
                )
            argv.append(str(item))
        return tuple(argv)
    raise custom_error(
        f"expected a command string or a list of arguments, got {values.describe(value)}",
        hint='for example `run: npm start` or `run: ["npm", "start"]`',
    )


#: The key of the validation context that holds the method registry (a ``MethodCatalog``).
METHODS_CONTEXT = "methods"


def _method(value: str, info: ValidationInfo) -> str:
    """A method the registry handed to the loader knows (see :mod:`tpconf.config.methods`)."""
    methods: MethodCatalog = (info.context or {})[METHODS_CONTEXT]
    if value in methods:
        return value
    shown = " or ".join(f"`{name}`" for name in methods)
    close = difflib.get_close_matches(value, list(methods), n=1, cutoff=0.6)
    raise custom_error(
        f"`{value}` is not allowed: expected {shown}",
        hint=f"did you mean `{close[0]}`?" if close else None,
    )


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


def _absolute_pod_path(value: str) -> str:
    if not value.startswith("/"):
        raise custom_error(
            f"pod path `{value}` is not absolute",
            hint="write the path as the pod sees it, for example `/var/run/secrets/kubernetes.io`",
        )
    return "/" + "/".join(part for part in value.split("/") if part and part != ".")


def _non_empty(value: str) -> str:
    if not value.strip():
        raise custom_error("must not be empty")
    return value


Port = Annotated[int, Field(ge=1, le=65535)]
ExposeItem = Annotated[
    tuple[int, int],
    BeforeValidator(
        _checked(values.expose),
        json_schema_input_type=Port | Annotated[str, Field(pattern=r"^[0-9]+(:[0-9]+)?$")],
    ),
]
AlsoProxyItem = Annotated[
    str, BeforeValidator(_checked(lambda v: str(values.also_proxy(v))), json_schema_input_type=str)
]
Cidr = Annotated[
    str, BeforeValidator(_checked(lambda v: str(values.cidr(v))), json_schema_input_type=str)
]
DeploymentName = Annotated[
    str, AfterValidator(_checked(lambda v: values.dns_label(v, "deployment name")))
]
NamespaceName = Annotated[str, AfterValidator(_checked(lambda v: values.dns_label(v, "namespace")))]
DeploymentRef = Annotated[
    str, AfterValidator(_checked(lambda v: values.dns_subdomain(v, "deployment name")))
]
ContainerName = Annotated[
    str, AfterValidator(_checked(lambda v: values.dns_label(v, "container name")))
]
EnvName = Annotated[str, AfterValidator(_checked(values.env_name))]
EnvValue = Annotated[
    str,
    BeforeValidator(_checked(values.env_value), json_schema_input_type=str | int | float | bool),
]
Image = Annotated[str, AfterValidator(_checked(values.image))]
NonEmpty = Annotated[str, AfterValidator(_non_empty)]
OptionalName = Annotated[NamespaceName | None, BeforeValidator(_empty_is_none)]
OptionalContext = Annotated[NonEmpty | None, BeforeValidator(_empty_is_none)]
ProfileName = Annotated[str, AfterValidator(_checked(values.profile))]


def _restart(value: Any) -> Any:
    # `restart: no` is a string in YAML 1.2, but a YAML 1.1 habit may quote it or write `false`.
    return "no" if value is False else value


# ---- operations ---------------------------------------------------------------------------------


class New(_Model):
    """Create a new Deployment (and a Service of the same name) that runs the proxy.

    Written `new: true`, or as a mapping to set the name or the image.
    """

    name: DeploymentName | None = None
    """Name of the Deployment and Service created; `${VAR}` makes it personal on a shared namespace. For example: `api-${USER}`. Defaults to the name of this entry."""

    image: Image | None = None
    """Image of the proxy Deployment. Defaults to the deployment's `agent-image`."""


class HeaderRegex(_Model):
    """A header value given as a regular expression."""

    regex: Annotated[str, AfterValidator(_checked(values.regex))]
    """Python regular expression the whole header value must match. For example: `alice|bob`."""


HeaderName = Annotated[str, AfterValidator(_checked(values.header_name))]
HeaderValue = Annotated[
    str | HeaderRegex,
    BeforeValidator(_header_value, json_schema_input_type=str | int | bool | HeaderRegex),
]


class Intercept(_Model):
    """Receive an existing Deployment's traffic without taking it away from the team.

    tpconf adds its agent to the Deployment's pods as a sidecar; the app keeps running and
    serving, and connections to the intercepted ports reach the local process: all of them, or
    only the HTTP requests whose `headers` match (the rest still go to the app). Written
    `intercept: true` (the Deployment named like this entry), `intercept: NAME`,
    `intercept: NAME:CONTAINER`, or as a mapping. The Deployment and its Services are restored
    exactly when the last developer stops intercepting it.
    """

    deployment: DeploymentRef | None = None
    """Name of the Deployment to intercept. Defaults to the name of this entry."""

    container: ContainerName | None = None
    """Container whose ports are intercepted. Defaults to the first container."""

    ports: tuple[ExposeItem, ...] = ()
    """Container ports to intercept, as `PORT` or `LOCAL:REMOTE` (traffic for container port `REMOTE` reaches `LOCAL` here). For example: `[8080, "9000:9090"]`. Defaults to every TCP port the container declares, each to the same local port."""

    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    """Only HTTP/1.1 requests with all these headers reach this machine; every other request goes to the app. A value is matched exactly, or as `{regex: ...}`. For example: `{x-dev-user: alice}`. Defaults to every connection."""


class Swap(_Model):
    """Replace the pods of an existing Deployment by a proxy that keeps its labels, env and volumes.

    Written `swap: true` (the Deployment named like this entry), `swap: NAME`,
    `swap: NAME:CONTAINER`, or as a mapping. The Deployment is restored when tpconf stops.
    """

    deployment: DeploymentRef | None = None
    """Name of the Deployment to swap. Defaults to the name of this entry."""

    container: ContainerName | None = None
    """Container to replace in a pod with several containers. Defaults to the only container."""


class Existing(_Model):
    """Use an existing Deployment whose pods already run the proxy image.

    Written `existing: true` (the Deployment named like this entry), `existing: NAME`, or as a
    mapping.
    """

    deployment: DeploymentRef | None = None
    """Name of the Deployment. Defaults to the name of this entry."""


# ---- per-deployment settings --------------------------------------------------------------------


class Mount(_Model):
    """One volume of the pod made available at a local path."""

    pod: Annotated[str, AfterValidator(_absolute_pod_path)]
    """Absolute path in the pod. For example: `/var/run/secrets/kubernetes.io`."""

    local: NonEmpty
    """Local path where it appears, relative to the directory of telepresence.yaml. For example: `./.k8s`."""

    read_only: bool = False
    """Refuse writes to the local copy. Defaults to `false`."""


class Volumes(_Model):
    """Where the pod's filesystem appears on this machine (its `$TELEPRESENCE_ROOT`).

    Written as a mapping, or `false` to mount nothing.
    """

    root: NonEmpty | None = None
    """Local folder where the pod's volumes appear, relative to the directory of telepresence.yaml. Defaults to `.tpconf/<name>`."""

    mounts: tuple[Mount, ...] = ()
    """Pod paths also made available at chosen local paths. Defaults to none."""

    real_paths: bool = False
    """Run the process so that the pod's volumes appear at their real paths (for example `/var/run/secrets`) instead of under the root. Defaults to `false`."""


class EnvExport(_Model):
    """A file where the deployment's environment is written, for tools that run outside tpconf.

    Written as a mapping, or as the file name alone (`export: .env.web`).
    """

    file: NonEmpty
    """Path of the file, relative to the directory of telepresence.yaml. For example: `.env.web`."""

    format: ExportFormat | None = None
    """Valid values are `dotenv` and `json`. Defaults to `json` for a file ending in `.json`, else `dotenv`."""


class Env(_Model):
    """The environment of the local process: the pod's environment plus these changes."""

    set: dict[EnvName, EnvValue] = Field(default_factory=dict)
    """Variables set on top of the pod's environment. Numbers and booleans are written as in the file. For example: `{DEBUG: "1"}`."""

    export: Annotated[
        EnvExport | None, BeforeValidator(_export, json_schema_input_type=str | EnvExport)
    ] = None
    """Also write the environment to this file. Defaults to no file."""


class _Settings(_Model):
    method: Annotated[str, AfterValidator(_method)] = DEFAULT_METHOD
    """How the local process reaches the cluster. Defaults to `inject-tcp`."""

    expose: tuple[ExposeItem, ...] = ()
    """Ports of the proxy pod whose connections are delivered to this machine, as `PORT` or `LOCAL:REMOTE` (listen on `LOCAL` here, reachable as `REMOTE` in the cluster). For example: `[8080, "9000:90"]`. Defaults to none."""

    to_pod: tuple[Port, ...] = ()
    """Ports of the pod's own `localhost` made reachable as `localhost:PORT` here (the pod's other containers, for example a database sidecar). For example: `[5432]`. Defaults to none."""

    from_pod: tuple[Port, ...] = ()
    """Ports of this machine made reachable as `localhost:PORT` inside the pod (for its other containers). For example: `[9090]`. Defaults to none."""

    also_proxy: tuple[AlsoProxyItem, ...] = ()
    """Hostnames, IP addresses and CIDRs outside the cluster that are reached through the cluster (for example a cloud database). Only `vpn-tcp` needs it. For example: `[db.example.com, 10.0.0.0/8]`."""

    volumes: Annotated[
        Volumes | None, BeforeValidator(_volumes, json_schema_input_type=bool | Volumes)
    ] = Volumes()
    """Where the pod's volumes appear locally, or `false` to mount nothing. Defaults to the whole pod filesystem under `.tpconf/<name>`."""

    env: Env = Env()
    """Changes to the process's environment and an optional export file."""

    run: Annotated[
        str | tuple[str, ...] | None, BeforeValidator(_run, json_schema_input_type=str | list[str])
    ] = None
    """Command to run with the cluster's environment, network and volumes: a shell string or a list of arguments. For example: `npm start`. Defaults to no command."""

    shell: bool = False
    """Start an interactive shell instead of `run`. At most one deployment may set it. Defaults to `false`."""

    restart: Annotated[
        RestartPolicy, BeforeValidator(_restart, json_schema_input_type=RestartPolicy | bool)
    ] = "no"
    """When `run` is started again after it exits, as in docker compose: `no` (never), `on-failure` (after a non-zero exit code or a signal) or `always`. The delay doubles from 0.5 s to at most 30 s, and starts again at 0.5 s once the command has run for 10 s. Valid values are `no`, `on-failure` and `always`. Defaults to `no`."""

    agent_image: Image = DEFAULT_AGENT_IMAGE
    """Image of the proxy for `new` and `swap`. Defaults to `tpconf/agent:0.1.0`."""

    container_args: tuple[NonEmpty, ...] = ()
    """More `docker run` options for the app container of `method: container`, one argument per item; a relative source of `--volume` is relative to the directory of telepresence.yaml, as in compose. For example: `[--user, "1000", --volume, "./src:/app/src"]`. Defaults to none."""


class Defaults(_Settings):
    """Values every deployment inherits. A key set on a deployment replaces the whole default value of that key (mappings such as `env` are not merged)."""


class Deployment(_Settings):
    """One Deployment proxied to this machine. Exactly one of `new`, `swap`, `existing` and `intercept` is set."""

    new: Annotated[
        New | None,
        BeforeValidator(_flag_or_mapping("new"), json_schema_input_type=bool | New | None),
    ] = None
    """Create a new proxy Deployment and Service named like this entry. `true` or a mapping."""

    swap: Annotated[
        Swap | None,
        BeforeValidator(
            _deployment_and_container("swap"), json_schema_input_type=bool | str | Swap | None
        ),
    ] = None
    """Swap an existing Deployment for a proxy while tpconf runs. `true`, `NAME`, `NAME:CONTAINER` or a mapping."""

    existing: Annotated[
        Existing | None,
        BeforeValidator(
            _flag_or_mapping("existing", "deployment"),
            json_schema_input_type=bool | str | Existing | None,
        ),
    ] = None
    """Use an existing Deployment that already runs the proxy. `true`, `NAME` or a mapping."""

    intercept: Annotated[
        Intercept | None,
        BeforeValidator(
            _deployment_and_container("intercept"),
            json_schema_input_type=bool | str | Intercept | None,
        ),
    ] = None
    """Add the proxy to an existing Deployment's pods; its traffic (or the requests whose headers match) reaches this machine while the app keeps serving. `true`, `NAME`, `NAME:CONTAINER` or a mapping."""

    namespace: OptionalName = None
    """Namespace of the Deployment. Defaults to the top-level `namespace`."""

    context: OptionalContext = None
    """Kubernetes context (in kubeconfig) of the cluster. Defaults to the top-level `context`."""

    image: Image | None = None
    """With `method: container`, the image the process runs in, from the local Docker engine (tpconf never pulls it): its own command, or `run`. For example: `myapp:dev`."""

    profiles: tuple[ProfileName, ...] = ()
    """Start this deployment only when one of these profiles is active (`tpconf up --profile NAME`, or `$TPCONF_PROFILES`) or it is named on the command line (`tpconf up NAME`), as in docker compose. For example: `[debug]`. Defaults to none: always started."""


class Vpn(_Model):
    """Settings shared by every `vpn-tcp` deployment (they share one VPN)."""

    pod_cidrs: tuple[Cidr, ...] = ()
    """Networks of the cluster's pods to route. Defaults to the networks discovered in the cluster."""

    service_cidrs: tuple[Cidr, ...] = ()
    """Networks of the cluster's Services to route. Defaults to the networks discovered in the cluster."""


class TelepresenceFile(_Model):
    """A telepresence.yaml file: the deployments proxied to this machine."""

    model_config = ConfigDict(title="telepresence.yaml")

    version: Literal[1]
    """Version of this file format. Valid values are `1`."""

    context: OptionalContext = None
    """Kubernetes context (in kubeconfig) of the cluster. Empty or absent means the current context. For example: `${KUBE_CONTEXT:-}`."""

    namespace: OptionalName = None
    """Namespace of the deployments. Defaults to the context's namespace."""

    allowed_contexts: tuple[NonEmpty, ...] | None = None
    """The only Kubernetes contexts tpconf may change for this project: any other context, named in the file, by `--context` or current in the kubeconfig, is refused before anything is touched. For example: `[kind-dev, minikube]`. Defaults to any context."""

    defaults: Defaults = Defaults()
    """Values every deployment inherits unless it sets them itself."""

    vpn: Vpn = Vpn()
    """Settings of the VPN shared by the `vpn-tcp` deployments."""

    deployments: dict[DeploymentName, Deployment]
    """The deployments, by name. The name of a `new` deployment is the name of the Deployment and Service created. Order is kept."""


#: Keys that a deployment may set but `defaults` may not, with the place to set them instead.
NOT_IN_DEFAULTS = {
    "namespace": "at the top level or on each deployment",
    "context": "at the top level or on each deployment",
    "profiles": "on each deployment",
    "image": "on each deployment",
}
