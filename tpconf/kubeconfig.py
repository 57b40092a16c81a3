"""The kubeconfig as kubectl reads it: one context's cluster and user, and their TLS settings.

:func:`minified_view` merges the files of a ``$KUBECONFIG`` list the way kubectl does (the first
file that names a context, cluster or user wins, and the first ``current-context``), picks the
context, resolves relative file paths against the file that holds them and inlines the
certificate files: what ``kubectl config view --minify --flatten --raw -o json`` prints, without
starting kubectl. :func:`tls_context` turns a cluster and user into the TLS settings client-go
would use.

Both the API client (:mod:`tpconf.cluster.client`) and the in-process port-forward
(:mod:`tpconf.tunnel.kubeapi`) connect with these, so tpconf reads a kubeconfig one way. Settings
this module does not handle raise :class:`Unsupported`; the callers then fall back to the
``kubernetes`` library and to a ``kubectl`` child, which handle everything kubectl does.
"""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
import urllib.parse
from collections.abc import Sequence
from typing import Any

import yaml

JSON = dict[str, Any]

#: Fields holding a path, per section, resolved against the directory of their file (client-go's
#: ``ResolveLocalPaths``); the flattened view inlines the certificate ones as ``*-data``.
_PATHS = {
    "cluster": ("certificate-authority",),
    "user": ("client-certificate", "client-key", "tokenFile"),
}
_INLINED = ("certificate-authority", "client-certificate", "client-key")


class Unsupported(Exception):
    """These settings need the ``kubernetes`` library or kubectl itself (the message says which)."""


class KubeconfigError(Exception):
    """The kubeconfig cannot be used: no file, no such context, a file that does not parse."""


DEFAULT_FILE = "~/.kube/config"


def files_of(kubeconfig: str | None = None) -> list[str]:
    """The kubeconfig files kubectl would read, in order: ``kubeconfig`` (one path, or several
    joined by ``:``), else ``$KUBECONFIG``, else ``~/.kube/config``; only those that exist and
    are not empty (kubectl skips the others too)."""
    listing = kubeconfig or os.environ.get("KUBECONFIG") or DEFAULT_FILE
    found: list[str] = []
    for entry in listing.split(os.pathsep):
        path = os.path.expanduser(entry)
        if path and path not in found and os.path.isfile(path) and os.path.getsize(path):
            found.append(path)
    return found


def _load(path: str) -> JSON:
    try:
        with open(path, encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise KubeconfigError(f"{path} is not valid YAML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise KubeconfigError(f"cannot read {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KubeconfigError(f"{path} is not a kubeconfig (not a mapping)")
    return data


def _resolved(section: str, entry: object, base: str) -> JSON:
    """A copy of ``entry`` with its relative paths made absolute against ``base``."""
    out = dict(entry) if isinstance(entry, dict) else {}
    for key in _PATHS.get(section, ()):
        value = out.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            out[key] = os.path.join(base, value)
    spec = out.get("exec")
    if section == "user" and isinstance(spec, dict):
        # A command with a directory in it is a path (a bare name is looked up in $PATH).
        command = spec.get("command")
        if isinstance(command, str) and os.sep in command and not os.path.isabs(command):
            out["exec"] = {**spec, "command": os.path.join(base, command)}
    return out


def _inlined(entry: JSON) -> JSON:
    """``entry`` with its certificate files read into ``*-data`` (``--flatten``)."""
    out = dict(entry)
    for key in _INLINED:
        path = out.pop(key, None)
        if path and not out.get(f"{key}-data"):
            try:
                with open(path, "rb") as stream:
                    out[f"{key}-data"] = base64.b64encode(stream.read()).decode()
            except OSError as exc:
                raise KubeconfigError(f"cannot read {key} {path}: {exc}") from exc
    return out


def minified_view(files: Sequence[str], context: str | None = None) -> JSON:
    """The one-context view of ``files`` kubectl would use, certificates inlined.

    ``context`` ``None`` is the first ``current-context`` set. Raises :class:`KubeconfigError`
    when no context is set or named, or the named one does not exist.
    """
    named: dict[str, dict[str, JSON]] = {"cluster": {}, "user": {}, "context": {}}
    current = ""
    for path in files:
        data = _load(path)
        base = os.path.dirname(os.path.abspath(path))
        current = current or str(data.get("current-context") or "")
        for section, found in named.items():
            for item in data.get(f"{section}s") or []:
                if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                    continue
                if item["name"] not in found:  # the first file that names it wins
                    found[item["name"]] = _resolved(section, item.get(section), base)
    name = context or current
    if not name:
        raise KubeconfigError("no current-context is set and no context was named")
    if name not in named["context"]:
        names = ", ".join(sorted(named["context"])) or "none"
        raise KubeconfigError(f"no context {name!r} (contexts: {names})")
    ctx = named["context"][name]
    cluster_name, user_name = str(ctx.get("cluster") or ""), str(ctx.get("user") or "")
    view: JSON = {"current-context": name, "contexts": [{"name": name, "context": ctx}]}
    view["clusters"] = (
        [{"name": cluster_name, "cluster": _inlined(named["cluster"][cluster_name])}]
        if cluster_name in named["cluster"]
        else []
    )
    view["users"] = (
        [{"name": user_name, "user": _inlined(named["user"][user_name])}]
        if user_name in named["user"]
        else []
    )
    return view


def parts(view: JSON) -> tuple[JSON, JSON, JSON]:
    """The context, cluster and user of a minified view (``{}`` for what it lacks)."""

    def first(section: str) -> JSON:
        items = view.get(f"{section}s") or []
        entry = items[0].get(section) if items and isinstance(items[0], dict) else None
        return entry if isinstance(entry, dict) else {}

    return first("context"), first("cluster"), first("user")


#: User settings neither tpconf's API client nor its port-forward speaks: an auth-provider,
#: basic auth, impersonation.
FOREIGN_USER_KEYS = ("auth-provider", "username", "password", "as", "as-groups", "as-uid")


def refuse_foreign_user(user: JSON, *, also: Sequence[str] = ()) -> None:
    """:class:`Unsupported` naming the first of :data:`FOREIGN_USER_KEYS` (and ``also``) that
    ``user`` sets."""
    for key in (*FOREIGN_USER_KEYS, *also):
        if user.get(key):
            raise Unsupported(f"users[].user.{key}")


def server_url(cluster: JSON) -> urllib.parse.SplitResult:
    """The cluster's server URL; :class:`Unsupported` when it is not one tpconf can dial."""
    url = urllib.parse.urlsplit(str(cluster.get("server") or ""))
    if url.scheme not in ("https", "http") or not url.hostname:
        raise Unsupported(f"a server URL of {cluster.get('server')!r}")
    if cluster.get("proxy-url"):
        raise Unsupported("a proxy-url")
    if proxied(url.hostname):
        raise Unsupported("$HTTPS_PROXY")
    return url


def proxied(host: str) -> bool:
    """Whether ``$HTTPS_PROXY`` (minus ``$NO_PROXY``) applies to ``host``."""
    if not (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")):
        return False
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    for entry in (e.strip() for e in no_proxy.split(",")):
        if (
            entry == "*"
            or entry
            and (host == entry.lstrip(".") or host.endswith("." + entry.lstrip(".")))
        ):
            return False
    return True


def tls_context(cluster: JSON, user: JSON) -> ssl.SSLContext:
    """The TLS settings kubectl would use: the cluster's CA alone when it names one (as
    client-go does; the system's CAs are loaded only without one, which also spares reading
    the system bundle, a third of a second of the start on a busy machine), a client
    certificate when the user has one."""
    authority = cluster.get("certificate-authority-data")
    if cluster.get("insecure-skip-tls-verify"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif authority:
        ctx = ssl.create_default_context(cadata=base64.b64decode(authority).decode())
    else:
        ctx = ssl.create_default_context()
    cert, key = user.get("client-certificate-data"), user.get("client-key-data")
    if cert and key:
        # load_cert_chain reads files only: a private file, removed as soon as it is read.
        with tempfile.TemporaryDirectory(prefix="tpconf-") as tmp:
            path = os.path.join(tmp, "client.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(cert) + b"\n" + base64.b64decode(key))
            ctx.load_cert_chain(path)
    elif cert or key:
        raise Unsupported("a client certificate without its key")
    return ctx
