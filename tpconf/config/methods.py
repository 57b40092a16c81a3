"""What the file format knows about methods: nothing but what their registry tells it.

The methods live in :mod:`tpconf.methods`, a higher layer. Whoever loads a file hands the loader
the registry (a :data:`MethodCatalog`); from it the loader learns the valid values of `method`,
and each method checks its own rules across the deployments that use it (:meth:`MethodRules.check`),
reporting through :class:`RuleReport` so that its errors and warnings carry positions like any
other. Adding a method therefore never touches this package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tpconf.config.project import DeploymentSpec

#: The method of a deployment that does not set one.
DEFAULT_METHOD = "inject-tcp"


class RuleReport(Protocol):
    """Where a method's rules report what they find (implemented by the resolver)."""

    def error(
        self, spec: DeploymentSpec, message: str, *, key: str = "method", hint: str | None = None
    ) -> None:
        """An error at ``key`` (kebab-case) of the deployment, or of `defaults` if inherited."""

    def warn(
        self, spec: DeploymentSpec, message: str, *, key: str = "method", hint: str | None = None
    ) -> None:
        """A warning at ``key`` of the deployment, or of `defaults` if inherited."""

    def sets(self, spec: DeploymentSpec, key: str) -> bool:
        """Whether the deployment's own entry sets ``key`` (not inherited, not defaulted)."""


class MethodRules(Protocol):
    """The part of a method the file format needs."""

    @property
    def name(self) -> str:
        """The value of `method` that selects it."""

    @property
    def summary(self) -> str:
        """One sentence for the reference: how the process reaches the cluster, what it needs."""

    @property
    def runs_image(self) -> bool:
        """Whether it runs the process in a container of `image` (`image` is refused otherwise)."""

    def check(self, specs: Sequence[DeploymentSpec], report: RuleReport) -> None:
        """Report what is wrong (or probably unintended) in the deployments using the method."""


MethodCatalog = Mapping[str, MethodRules]
"""The registry as the loader sees it: method name -> rules."""
