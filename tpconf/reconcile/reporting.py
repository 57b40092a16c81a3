"""What `tpconf up` reports, as an interface: the CLI renders it (this layer renders nothing).

Kept apart from ``up.py`` so that the CLI can implement it without importing the whole runtime
(the Kubernetes client and the SSH library) for commands that do not need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tpconf.config import ConfigWarning
from tpconf.errors import ConfigError, TpconfError
from tpconf.reconcile import state
from tpconf.reconcile.plan import Plan

if TYPE_CHECKING:  # the session imports the Kubernetes client: not for `tpconf validate`
    from tpconf.reconcile.session import ClusterTarget


class Reporter:
    """What ``up`` tells the user; the CLI implements it (the reconcile layer renders nothing)."""

    def warnings(self, warnings: tuple[ConfigWarning, ...]) -> None: ...
    def plan(self, plan: Plan) -> None: ...
    def status(self, snapshot: state.Snapshot) -> None: ...
    def config_error(self, error: ConfigError) -> None: ...
    def error(self, error: TpconfError) -> None: ...
    def message(self, text: str) -> None: ...

    def clusters(self, targets: Sequence[ClusterTarget]) -> None:
        """The contexts, API servers and namespaces about to be changed (before any change)."""

    def starting(self, names: Sequence[str]) -> None:
        """The first start of these deployments begins (a terminal shows a live line each)."""

    def started(self) -> None:
        """The first start is over (done, failed or cancelled)."""
