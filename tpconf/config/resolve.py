"""From the validated file to the resolved :class:`~tpconf.config.project.Project`.

This is where the rules that span several keys live: exactly one operation per deployment, a
remote port exposed once, one interactive shell, no two deployments on the same Kubernetes
Deployment, volume roots and export files not shared. Each method's own rules (for example one
context for all `vpn-tcp` deployments) are its module's, run through :class:`RuleReport` here. It
also applies `defaults`, makes local paths absolute and collects the warnings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpconf.config import models, values
from tpconf.config.methods import MethodCatalog
from tpconf.config.project import (
    ConfigWarning,
    DeploymentSpec,
    EnvExport,
    EnvSpec,
    ExistingOp,
    ExportFormat,
    HeaderMatch,
    InterceptOp,
    Mount,
    NewOp,
    Operation,
    PortMapping,
    Project,
    SwapOp,
    VolumesSpec,
    VpnSpec,
)
from tpconf.config.yamlsource import DocPath, Locator, format_loc
from tpconf.errors import ConfigError, ConfigErrors

_OPERATIONS = ("new", "swap", "existing", "intercept")
_PRIVILEGED_PORT_HINT = (
    "expose a port of 1024 or more in the pod (for example `8080:8080`); "
    "with `swap`, the Deployment's container port decides"
)


@dataclass
class _Resolver:
    file: models.TelepresenceFile
    locator: Locator
    base_dir: Path
    errors: dict[tuple[str, str, str], ConfigError] = field(default_factory=dict)
    warnings: dict[tuple[str, str, str], ConfigWarning] = field(default_factory=dict)

    # -- reporting ---------------------------------------------------------------------------------

    def error(
        self, message: str, path: DocPath, *, at_key: bool = True, hint: str | None = None
    ) -> None:
        position = self.locator.key(path) if at_key else self.locator.value(path)
        loc = format_loc(path)
        self.errors.setdefault(
            (str(position), loc, message),
            ConfigError(message, position=position, loc=loc, hint=hint),
        )

    def warn(
        self, message: str, path: DocPath, *, at_key: bool = True, hint: str | None = None
    ) -> None:
        position = self.locator.key(path) if at_key else self.locator.value(path)
        loc = format_loc(path)
        self.warnings.setdefault(
            (str(position), loc, message),
            ConfigWarning(message, position=position, loc=loc, hint=hint),
        )

    # -- helpers -----------------------------------------------------------------------------------

    def setting(self, name: str, deployment: models.Deployment, attr: str) -> tuple[Any, DocPath]:
        """A deployment's own value, else the default; and the path of the key that set it."""
        key = models.kebab(attr)
        if attr in deployment.model_fields_set:
            return getattr(deployment, attr), ("deployments", name, key)
        if attr in self.file.defaults.model_fields_set:
            return getattr(self.file.defaults, attr), ("defaults", key)
        return getattr(self.file.defaults, attr), ("deployments", name)

    def shown(self, path: Path) -> str:
        """A resolved local path as the user would write it: relative to the file if below it."""
        return (
            path.relative_to(self.base_dir).as_posix()
            if path.is_relative_to(self.base_dir)
            else str(path)
        )

    def local_path(self, text: str) -> Path:
        return Path(os.path.normpath(self.base_dir / Path(text).expanduser()))

    # -- per deployment ----------------------------------------------------------------------------

    def operation(self, name: str, deployment: models.Deployment, image: str) -> Operation | None:
        here: DocPath = ("deployments", name)
        present = [op for op in _OPERATIONS if getattr(deployment, op) is not None]
        if not present:
            self.error(
                "no operation: set one of `new`, `swap`, `existing` or `intercept`",
                here,
                hint="`new: true` creates a proxy Deployment, `swap: NAME` replaces a Deployment's "
                "pods, `existing: NAME` uses a Deployment that already runs the proxy, "
                "`intercept: NAME` receives a Deployment's traffic while it keeps serving",
            )
            return None
        if len(present) > 1:
            for extra in present[1:]:
                self.error(
                    f"`{present[0]}` and `{extra}` cannot be combined: a deployment has exactly "
                    "one of `new`, `swap`, `existing` and `intercept`",
                    (*here, extra),
                    hint=f"remove `{extra}` or `{present[0]}`",
                )
            return None
        if deployment.new is not None:
            created = deployment.new.name or name
            if not created[0].isalpha():
                self.error(
                    f"`{created}` cannot be the name of a new deployment: the Service created "
                    "with it must start with a letter",
                    (*here, "new", "name") if deployment.new.name else here,
                    hint="rename the deployment, or set `new.name`",
                )
            return NewOp(image=deployment.new.image or image, name=deployment.new.name)
        if deployment.swap is not None:
            return SwapOp(deployment.swap.deployment or name, deployment.swap.container)
        if deployment.intercept is not None:
            return self.intercept(name, deployment.intercept)
        assert deployment.existing is not None
        return ExistingOp(deployment.existing.deployment or name)

    def intercept(self, name: str, intercept: models.Intercept) -> InterceptOp:
        here: DocPath = ("deployments", name, "intercept")
        ports: list[PortMapping] = []
        seen: dict[int, int] = {}
        for index, (local, remote) in enumerate(intercept.ports):
            if remote in seen:
                self.error(
                    f"container port {remote} is intercepted twice (first as `ports[{seen[remote]}]`)",
                    (*here, "ports", index),
                    at_key=False,
                    hint="a container port reaches one local port; remove one of them",
                )
                continue
            seen[remote] = index
            ports.append(PortMapping(local=local, remote=remote))
        headers = tuple(
            HeaderMatch(header, value.regex, regex=True)
            if isinstance(value, models.HeaderRegex)
            else HeaderMatch(header, value)
            for header, value in sorted(intercept.headers.items())
        )
        return InterceptOp(intercept.deployment or name, intercept.container, tuple(ports), headers)

    def expose(self, name: str, deployment: models.Deployment) -> tuple[PortMapping, ...]:
        items, path = self.setting(name, deployment, "expose")
        mappings: list[PortMapping] = []
        first: dict[int, int] = {}
        for index, (local, remote) in enumerate(items):
            item = (*path, index)
            if remote in first:
                self.error(
                    f"remote port {remote} is exposed twice (first as `{format_loc((*path, first[remote]))}`)",
                    item,
                    at_key=False,
                    hint="a pod port can reach only one local port; remove one of them",
                )
                continue
            first[remote] = index
            if remote < 1024:
                self.warn(
                    f"remote port {remote} is below 1024: the proxy in the pod must run as root "
                    "to listen on it, which OpenShift-style clusters do not allow",
                    item,
                    at_key=False,
                    hint=_PRIVILEGED_PORT_HINT,
                )
            mappings.append(PortMapping(local=local, remote=remote))
        return tuple(mappings)

    def volumes(self, name: str, deployment: models.Deployment) -> VolumesSpec | None:
        volumes, path = self.setting(name, deployment, "volumes")
        if volumes is None:
            return None
        root = self.local_path(volumes.root or models.DEFAULT_VOLUMES_ROOT.format(name=name))
        mounts: list[Mount] = []
        seen: dict[str, int] = {}
        for index, mount in enumerate(volumes.mounts):
            if mount.pod in seen:
                self.error(
                    f"pod path `{mount.pod}` is mounted twice (first in `mounts[{seen[mount.pod]}]`)",
                    (*path, "mounts", index, "pod"),
                    at_key=False,
                )
                continue
            seen[mount.pod] = index
            mounts.append(Mount(mount.pod, self.local_path(mount.local), mount.read_only))
        return VolumesSpec(root=root, mounts=tuple(mounts), real_paths=volumes.real_paths)

    def env(self, name: str, deployment: models.Deployment) -> EnvSpec:
        env, _ = self.setting(name, deployment, "env")
        export = None
        if env.export is not None:
            fmt: ExportFormat = env.export.format or (
                "json" if env.export.file.endswith(".json") else "dotenv"
            )
            export = EnvExport(self.local_path(env.export.file), fmt)
        return EnvSpec(set=tuple(sorted(env.set.items())), export=export)

    def deployment(self, name: str, deployment: models.Deployment) -> DeploymentSpec | None:
        image, _ = self.setting(name, deployment, "agent_image")
        operation = self.operation(name, deployment, image)
        method, _ = self.setting(name, deployment, "method")
        also_proxy, _ = self.setting(name, deployment, "also_proxy")
        run, run_path = self.setting(name, deployment, "run")
        shell, shell_path = self.setting(name, deployment, "shell")
        if shell and run is not None:
            self.error(
                "`shell: true` and `run` cannot be combined",
                shell_path,
                hint=f"remove `run` (`{format_loc(run_path)}`), or set `shell: false`",
            )
        expose = self.expose(name, deployment)
        if isinstance(operation, InterceptOp) and expose:
            self.error(
                "`expose` does not apply to `intercept`: the intercepted ports are the "
                "container's own",
                self.setting(name, deployment, "expose")[1],
                hint="list the ports under `intercept.ports` (`LOCAL:REMOTE` as in `expose`), "
                "or use `from-pod` to reach this machine from the pod's localhost",
            )
        from_pod, from_path = self.setting(name, deployment, "from_pod")
        for port in sorted(set(from_pod) & {m.remote for m in expose}):
            self.error(
                f"port {port} is in both `from-pod` and `expose`: the pod can listen on it once",
                from_path,
                hint="remove it from one of them (`expose` also reaches it from the pod itself)",
            )
        volumes = self.volumes(name, deployment)
        env = self.env(name, deployment)
        restart, _ = self.setting(name, deployment, "restart")
        if shell and "restart" in deployment.model_fields_set and restart != "no":
            self.warn(
                "`restart` has no effect with `shell: true`: leaving the shell ends `tpconf up`",
                ("deployments", name, "restart"),
                hint="remove `restart`, or use `run` instead of the shell",
            )
        if operation is None:
            return None
        return DeploymentSpec(
            name=name,
            operation=operation,
            method=method,
            expose=expose,
            also_proxy=tuple(values.also_proxy(item) for item in also_proxy),
            volumes=volumes,
            env=env,
            run=run,
            shell=shell,
            namespace=deployment.namespace or self.file.namespace,
            context=deployment.context or self.file.context,
            agent_image=operation.image if isinstance(operation, NewOp) else image,
            to_pod=self.setting(name, deployment, "to_pod")[0],
            from_pod=self.setting(name, deployment, "from_pod")[0],
            restart=restart,
            profiles=deployment.profiles,
            image=deployment.image,
            container_args=self.setting(name, deployment, "container_args")[0],
        )

    # -- across deployments ------------------------------------------------------------------------

    def across(self, specs: list[DeploymentSpec], methods: MethodCatalog) -> None:
        self.allowed_contexts(specs)
        self.one_shell(specs)
        self.distinct_targets(specs)
        self.distinct_paths(specs)
        self.image_needs_method(specs, methods)
        for name, rules in methods.items():
            rules.check([spec for spec in specs if spec.method == name], _Report(self))

    def image_needs_method(self, specs: list[DeploymentSpec], methods: MethodCatalog) -> None:
        """`image` and `container-args` only mean something to a method that runs containers."""
        runners = [f"`{name}`" for name, rules in methods.items() if rules.runs_image]
        for spec in specs:
            if methods[spec.method].runs_image:
                continue
            own = self.file.deployments[spec.name].model_fields_set
            for key in ("image", "container-args"):
                # An inherited `container-args` is for the deployments that run containers.
                if key.replace("-", "_") in own:
                    self.warn(
                        f"`{key}` has no effect with method `{spec.method}`: the process runs "
                        "on this machine",
                        ("deployments", spec.name, key),
                        hint=f"set `method: {runners[0].strip('`')}` to run it in a container, "
                        f"or remove `{key}`"
                        if runners
                        else f"remove `{key}`",
                    )

    def own_or_inherited(self, spec: DeploymentSpec, attr: str) -> DocPath:
        return self.setting(spec.name, self.file.deployments[spec.name], attr)[1]

    def allowed_contexts(self, specs: list[DeploymentSpec]) -> None:
        """The contexts the file names must be allowed; the current one is checked by `up`."""
        allowed = self.file.allowed_contexts
        if allowed is None:
            return
        if not allowed:
            self.error(
                "`allowed-contexts` is empty: no context would be allowed",
                ("allowed-contexts",),
                hint="list the contexts tpconf may change, or remove `allowed-contexts`",
            )
            return
        for spec in specs:
            if spec.context is None or spec.context in allowed:
                continue
            own = "context" in self.file.deployments[spec.name].model_fields_set
            path: DocPath = ("deployments", spec.name, "context") if own else ("context",)
            self.error(
                f"context `{spec.context}` is not in `allowed-contexts` ({', '.join(allowed)})",
                path,
                at_key=False,
                hint="use one of the allowed contexts (`--context NAME`), or add it to "
                "`allowed-contexts` if tpconf may change that cluster",
            )

    def one_shell(self, specs: list[DeploymentSpec]) -> None:
        shells = [spec for spec in specs if spec.shell]
        for spec in shells[1:]:
            self.error(
                f"only one deployment can have `shell: true`, and `{shells[0].name}` has it "
                "(the shell takes the terminal)",
                self.own_or_inherited(spec, "shell"),
                hint="use `run` for the others",
            )

    def distinct_targets(self, specs: list[DeploymentSpec]) -> None:
        owners: dict[tuple[str | None, str | None, str], str] = {}
        for spec in specs:
            target = spec.target
            key = (spec.context, spec.namespace, target)
            if key in owners:
                self.error(
                    f"Kubernetes Deployment `{target}` is already used by `{owners[key]}`",
                    ("deployments", spec.name),
                    hint="each Deployment can be proxied by one entry only",
                )
            else:
                owners[key] = spec.name

    def distinct_paths(self, specs: list[DeploymentSpec]) -> None:
        roots: dict[Path, str] = {}
        exports: dict[Path, str] = {}
        for spec in specs:
            if spec.volumes is not None:
                if spec.volumes.root in roots:
                    self.error(
                        f"volume root `{self.shown(spec.volumes.root)}` is also used by `{roots[spec.volumes.root]}`",
                        self.own_or_inherited(spec, "volumes"),
                        hint="give each deployment its own `volumes.root`",
                    )
                roots.setdefault(spec.volumes.root, spec.name)
            export = spec.env.export
            if export is not None:
                if export.file in exports:
                    self.error(
                        f"export file `{self.shown(export.file)}` is also written by `{exports[export.file]}`",
                        self.own_or_inherited(spec, "env"),
                        hint="give each deployment its own `env.export` file",
                    )
                exports.setdefault(export.file, spec.name)


@dataclass(frozen=True)
class _Report:
    """The resolver as a method's rules see it (:class:`~tpconf.config.methods.RuleReport`)."""

    resolver: _Resolver

    def _path(self, spec: DeploymentSpec, key: str) -> DocPath:
        attr = key.replace("-", "_")
        deployment = self.resolver.file.deployments[spec.name]
        if attr in models.Deployment.model_fields and attr not in models.Defaults.model_fields:
            # `context`, `namespace`: only a deployment or the top level sets them.
            if attr in deployment.model_fields_set:
                return ("deployments", spec.name, key)
            return (key,) if getattr(self.resolver.file, attr, None) else ("deployments", spec.name)
        return self.resolver.own_or_inherited(spec, attr)

    def error(
        self, spec: DeploymentSpec, message: str, *, key: str = "method", hint: str | None = None
    ) -> None:
        self.resolver.error(message, self._path(spec, key), hint=hint)

    def warn(
        self, spec: DeploymentSpec, message: str, *, key: str = "method", hint: str | None = None
    ) -> None:
        self.resolver.warn(message, self._path(spec, key), hint=hint)

    def sets(self, spec: DeploymentSpec, key: str) -> bool:
        deployment = self.resolver.file.deployments[spec.name]
        return key.replace("-", "_") in deployment.model_fields_set


def resolve(
    file: models.TelepresenceFile,
    locator: Locator,
    *,
    source_path: Path,
    base_dir: Path,
    methods: MethodCatalog,
    display: str = "telepresence.yaml",
) -> Project:
    """Apply defaults, check the rules between keys (and each method's) and build the
    :class:`Project`.

    Raises :class:`ConfigError` or :class:`ConfigErrors` with every violation.
    """
    resolver = _Resolver(file, locator, base_dir)
    specs = [
        spec
        for name, deployment in file.deployments.items()
        if (spec := resolver.deployment(name, deployment)) is not None
    ]
    resolver.across(specs, methods)
    errors = list(resolver.errors.values())
    if errors:
        raise ConfigErrors(errors) if len(errors) > 1 else errors[0]
    warnings = sorted(
        resolver.warnings.values(),
        key=lambda w: (w.position.line or 0, w.position.column or 0, w.loc),
    )
    return Project(
        source_path=source_path,
        base_dir=base_dir,
        context=file.context,
        namespace=file.namespace,
        vpn=VpnSpec(
            pod_cidrs=tuple(values.network(c) for c in file.vpn.pod_cidrs),
            service_cidrs=tuple(values.network(c) for c in file.vpn.service_cidrs),
        ),
        deployments=tuple(specs),
        warnings=tuple(warnings),
        allowed_contexts=file.allowed_contexts,
        display=display,
    )
