"""The labels and annotations tpconf puts on what it creates or swaps, and how it reads them back.

Everything created carries the labels ``app.kubernetes.io/managed-by: tpconf``,
``tpconf.io/session`` and ``tpconf.io/deployment``, and the annotations ``tpconf.io/owner``
(``user@host``) and ``tpconf.io/project`` (a hash of the project path). A swapped Deployment is
not created by tpconf: it only gets the ``SWAP_*`` annotations, which are enough to restore it
after a crash (docs/architecture.md, "State and recovery"). The keys Secret of an ``existing`` Deployment also carries
``tpconf.io/existing``; its owner annotations are removed when it is released.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import socket
from collections.abc import Mapping

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "tpconf"
SESSION = "tpconf.io/session"
DEPLOYMENT = "tpconf.io/deployment"
#: Selector label unique to one proxy's pods (value: the proxy Deployment's name).
PROXY = "tpconf.io/proxy"
#: On the keys Secret of an ``existing`` Deployment (value: that Deployment's name): the user's
#: Deployment mounts it, so it outlives ``tpconf up`` and ``tpconf down`` only releases it.
EXISTING = "tpconf.io/existing"
#: On the agent's pod template only (not in the Deployment's selector): one value per start, so
#: that waiting for the pod of a re-created proxy can never pick the previous one's pod.
START = "tpconf.io/start"

OWNER = "tpconf.io/owner"
PROJECT = "tpconf.io/project"

SWAPPED_BY = "tpconf.io/swapped-by"
SWAP_PROJECT = "tpconf.io/swap-project"
ORIGINAL_REPLICAS = "tpconf.io/original-replicas"
SWAP_SESSION = "tpconf.io/swap-session"
PROXY_DEPLOYMENT = "tpconf.io/proxy-deployment"
SWAP_ANNOTATIONS = (SWAPPED_BY, SWAP_PROJECT, ORIGINAL_REPLICAS, SWAP_SESSION, PROXY_DEPLOYMENT)

MANAGED_SELECTOR = f"{MANAGED_BY}={MANAGED_BY_VALUE}"

_LABEL_OK = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def label_value(text: str) -> str:
    """``text`` if it is a valid label value, else a valid one derived from it (stable, unique)."""
    if len(text) <= 63 and _LABEL_OK.match(text):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    cleaned = re.sub(r"[^-A-Za-z0-9_.]", "-", text)[:50].strip("-_.")
    return f"{cleaned}-{digest}" if cleaned else digest


def project_id(path: str | os.PathLike[str]) -> str:
    """The ``tpconf.io/project`` value: a short hash of the project directory's real path."""
    real = os.path.realpath(os.fspath(path))
    return hashlib.sha256(real.encode()).hexdigest()[:16]


def default_owner() -> str:
    """``user@host`` of this process: the ``tpconf.io/owner`` value.

    Under ``sudo`` (vpn-tcp needs root) it is the user who ran sudo, so that a later ``tpconf
    down`` without sudo still recognises the swaps as this user's.
    """
    user = os.environ.get("SUDO_USER") or getpass.getuser()
    return f"{user}@{socket.gethostname()}"


def created_labels(*, config_name: str, session_id: str) -> dict[str, str]:
    """Labels of every object tpconf creates."""
    return {
        MANAGED_BY: MANAGED_BY_VALUE,
        SESSION: label_value(session_id),
        DEPLOYMENT: label_value(config_name),
    }


def owner_annotations(*, owner: str, project: str) -> dict[str, str]:
    """Annotations of every object tpconf creates."""
    return {OWNER: owner, PROJECT: project}


def swap_annotations(
    *, owner: str, project: str, original_replicas: int, session_id: str, proxy: str
) -> dict[str, str]:
    """Annotations recorded on a Deployment before it is scaled to 0 by a swap."""
    return {
        SWAPPED_BY: owner,
        SWAP_PROJECT: project,
        ORIGINAL_REPLICAS: str(original_replicas),
        SWAP_SESSION: session_id,
        PROXY_DEPLOYMENT: proxy,
    }


def is_ours(annotations: Mapping[str, str] | None, *, owner: str, project: str) -> bool:
    """Whether an object tpconf created belongs to this owner and project."""
    annotations = annotations or {}
    return annotations.get(OWNER) == owner and annotations.get(PROJECT) == project


def is_our_swap(annotations: Mapping[str, str] | None, *, owner: str, project: str) -> bool:
    """Whether a swapped Deployment was swapped by this owner and project."""
    annotations = annotations or {}
    return annotations.get(SWAPPED_BY) == owner and annotations.get(SWAP_PROJECT) == project


def selector_string(labels: Mapping[str, str]) -> str:
    """``k=v,k2=v2`` for a label selector query."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
