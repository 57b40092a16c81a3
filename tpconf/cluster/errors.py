"""Translate the API client's exceptions into :mod:`tpconf.errors`, at the boundary.

``ApiStatus`` (:mod:`tpconf.cluster.transport`) is mapped by HTTP status (403 Forbidden naming
the verb and resource, 404 NotFound naming the object, 5xx/429 ClusterUnreachable, the rest
ClusterError), urllib3's connection errors become ClusterUnreachable. Remote payloads are trimmed
(:func:`tpconf.errors.trim_payload`) and, for Secrets, dropped: no key material in messages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import urllib3.exceptions

from tpconf import errors
from tpconf.cluster.transport import ApiStatus

RBAC_HINT = (
    "ask a cluster admin to grant the Role that `tpconf rbac` prints "
    "(tpconf rbac | kubectl apply -n {namespace} -f -, then bind it to you)"
)
UNREACHABLE_HINT = (
    "check the kubeconfig and context (`kubectl config current-context`, $KUBECONFIG, "
    "`context:` in telepresence.yaml) and that the API server is running"
)

_FORBIDDEN = re.compile(
    r'User "(?P<user>[^"]*)" cannot (?P<verb>\S+) resource "(?P<resource>[^"]+)"'
    r'(?: in API group "(?P<group>[^"]*)")?'
    r'(?: in the namespace "(?P<namespace>[^"]*)")?'
)


class Conflict(errors.ClusterError):
    """Raised when an object already exists (``AlreadyExists``) or changed meanwhile (409)."""

    def __init__(self, message: str, *, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


@dataclass(frozen=True)
class Denied:
    """What RBAC refused, parsed from the API server's 403 message."""

    user: str
    verb: str
    resource: str
    group: str
    namespace: str | None

    @property
    def qualified(self) -> str:
        """``pods/portforward`` or ``deployments.apps``: how ``kubectl auth can-i`` names it."""
        if not self.group:
            return self.resource
        base, _, sub = self.resource.partition("/")
        return f"{base}.{self.group}" + (f"/{sub}" if sub else "")


def parse_forbidden(message: str) -> Denied | None:
    """Parse ``User "x" cannot create resource "deployments" in API group "apps" ...``."""
    m = _FORBIDDEN.search(message)
    if not m:
        return None
    return Denied(
        user=m["user"],
        verb=m["verb"],
        resource=m["resource"],
        group=m["group"] or "",
        namespace=m["namespace"],
    )


def status_message(exc: ApiStatus) -> str:
    """The ``message`` of the ``Status`` body of an API error, else the body or reason."""
    body = exc.body.decode("utf-8", "replace")
    if body:
        try:
            data = json.loads(body)
        except ValueError:
            return str(body)
        message = data.get("message") if isinstance(data, dict) else None
        if isinstance(message, str):
            return message
        return str(body)
    return str(exc.reason or "")


def _status_reason(exc: ApiStatus) -> str | None:
    try:
        data = json.loads(exc.body or "")
    except (ValueError, TypeError):
        return None
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, str) else None


def translate_api(exc: ApiStatus, *, what: str, sensitive: bool = False) -> errors.ClusterError:
    """The :class:`~tpconf.errors.ClusterError` for ``exc``, raised while doing ``what``.

    ``what`` describes the request for the message, e.g. ``create Deployment "web" in
    namespace "dev"``. With ``sensitive`` (Secrets) the server's payload is left out.
    """
    status = int(exc.status or 0)
    message = status_message(exc)
    detail = "" if sensitive else f": {errors.trim_payload(message)}"
    if status == 403:
        denied = parse_forbidden(message)
        if denied is not None:
            where = f' in namespace "{denied.namespace}"' if denied.namespace else " cluster-wide"
            return errors.Forbidden(
                f'cannot {what}: user "{denied.user}" may not {denied.verb} '
                f"{denied.qualified}{where}",
                hint=RBAC_HINT.format(namespace=denied.namespace or "NAMESPACE"),
            )
        return errors.Forbidden(f"cannot {what}: forbidden{detail}")
    if status == 404:
        return errors.NotFound(
            f"cannot {what}: not found",
            hint="check the name, the namespace and the context",
        )
    if status == 409:
        reason = _status_reason(exc) or "Conflict"
        return Conflict(f"cannot {what}: {reason}{detail}", reason=reason)
    if status == 401:
        return errors.ClusterError(
            f"cannot {what}: the API server rejected the credentials (401 Unauthorized)",
            hint="log in again or refresh the credentials of the kubeconfig's user",
        )
    if status == 429 or status >= 500:
        return errors.ClusterUnreachable(
            f"cannot {what}: the API server answered {status}{detail}",
        )
    if status == 0:
        return errors.ClusterUnreachable(f"cannot {what}: {exc.reason}", hint=UNREACHABLE_HINT)
    return errors.ClusterError(f"cannot {what}: {status} {exc.reason}{detail}")


def translate_connection(exc: Exception, *, what: str) -> errors.ClusterUnreachable:
    """The :class:`~tpconf.errors.ClusterUnreachable` for a transport error."""
    reason = getattr(exc, "reason", None) or exc
    return errors.ClusterUnreachable(
        f"cannot {what}: the API server is unreachable ({errors.trim_payload(str(reason))})",
        hint=UNREACHABLE_HINT,
    )


#: Transport errors (urllib3 wraps socket errors in these; OSError covers the rest).
CONNECTION_ERRORS: tuple[type[Exception], ...] = (urllib3.exceptions.HTTPError, OSError)


@contextmanager
def mapped(what: str, *, sensitive: bool = False) -> Iterator[None]:
    """Translate client exceptions raised inside the block (see :func:`translate_api`)."""
    try:
        yield
    except ApiStatus as exc:
        raise translate_api(exc, what=what, sensitive=sensitive) from exc
    except CONNECTION_ERRORS as exc:
        raise translate_connection(exc, what=what) from exc


def translate_config(exc: Exception, *, source: str) -> errors.ClusterError:
    """The error for an unusable kubeconfig (missing file, unknown context)."""
    return errors.ClusterError(
        f"cannot load the kubeconfig {source}: {errors.trim_payload(str(exc))}",
        hint=UNREACHABLE_HINT,
    )
