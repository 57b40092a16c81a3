"""What the proxy pod looks like from inside: its env, DNS settings, hostname and mounts.

The agent's entrypoint writes :data:`PODINFO_PATH` at start-up, before sshd runs. That file is
the contract with the agent image (``tpconf/agent``); keep both sides to exactly this schema::

    {
      "env": {"NAME": "value", ...},          # the container's environment as Kubernetes gave it
      "resolv_conf": "...",                   # the text of /etc/resolv.conf
      "hostname": "web-7d9c-abcde",
      "mounts": ["/var/run/secrets/kubernetes.io/serviceaccount", ...]
    }

:func:`fetch_pod_info` reads it through the tunnel and drops what belongs to the image or the
agent rather than to the pod (``HOME``, ``PATH``, ``HOSTNAME``, shell bookkeeping, ``TPCONF_*``,
``SSH_*``).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from tpconf.errors import TunnelError, trim_payload
from tpconf.tunnel.settings import CommandResult

#: Where the agent's entrypoint writes the pod info.
PODINFO_PATH = "/tmp/tpconf/podinfo.json"

#: Variables of the image, the shell or sshd, never of the pod's spec.
DROPPED_ENV = frozenset({"HOME", "PATH", "HOSTNAME", "PWD", "OLDPWD", "SHLVL", "_"})
#: Prefixes of the agent's own variables.
DROPPED_ENV_PREFIXES = ("TPCONF_", "SSH_", "SSHD_")

#: glibc's limit on ``ndots`` (resolv.conf(5)).
_NDOTS_MAX = 15


@dataclass(frozen=True)
class ResolvConf:
    """The pod's ``/etc/resolv.conf``, as the resolver applies it (resolv.conf(5))."""

    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    """Search domains, in order; the last ``search`` or ``domain`` line wins."""
    ndots: int = 1
    """Names with fewer dots than this are tried with the search domains first."""
    timeout: float = 5.0
    """Seconds to wait for a nameserver."""
    attempts: int = 2
    """Rounds through the nameservers."""

    @classmethod
    def parse(cls, text: str) -> ResolvConf:
        """Parse resolv.conf text; unknown lines and malformed options are ignored, as glibc does."""
        nameservers: list[str] = []
        search: tuple[str, ...] = ()
        ndots, timeout, attempts = 1, 5.0, 2
        for raw in text.splitlines():
            words = raw.split()
            if not words or words[0].startswith(("#", ";")):
                continue
            keyword, args = words[0], words[1:]
            if keyword == "nameserver" and args:
                nameservers.append(args[0])
            elif keyword == "search":
                search = tuple(_drop_comment(args))
            elif keyword == "domain" and args:
                search = (args[0],)
            elif keyword == "options":
                for option in _drop_comment(args):
                    name, _, value = option.partition(":")
                    try:
                        if name == "ndots":
                            ndots = min(max(int(value), 0), _NDOTS_MAX)
                        elif name == "timeout":
                            timeout = float(max(int(value), 1))
                        elif name == "attempts":
                            attempts = max(int(value), 1)
                    except ValueError:
                        continue
        return cls(
            nameservers=tuple(nameservers),
            search=tuple(domain.rstrip(".") for domain in search if domain != "."),
            ndots=ndots,
            timeout=timeout,
            attempts=attempts,
        )


def _drop_comment(words: list[str]) -> list[str]:
    for index, word in enumerate(words):
        if word.startswith(("#", ";")):
            return words[:index]
    return words


@dataclass(frozen=True)
class PodInfo:
    """The proxy pod as its processes see it."""

    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """The container's environment (pod template env, envFrom, Service variables)."""
    resolv_conf: ResolvConf = ResolvConf()
    hostname: str = ""
    mounts: tuple[str, ...] = ()
    """Mount paths of the pod's volumes, e.g. ``/var/run/secrets/kubernetes.io/serviceaccount``."""

    @classmethod
    def from_json(cls, text: str | bytes) -> PodInfo:
        """Parse the agent's podinfo.json; raises :class:`TunnelError` if it breaks the schema."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise _bad(f"it is not JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise _bad("it is not a JSON object")
        env = data.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise _bad("`env` is not an object of strings")
        resolv = data.get("resolv_conf", "")
        hostname = data.get("hostname", "")
        mounts = data.get("mounts", [])
        if not isinstance(resolv, str):
            raise _bad("`resolv_conf` is not a string")
        if not isinstance(hostname, str):
            raise _bad("`hostname` is not a string")
        if not isinstance(mounts, list) or not all(isinstance(m, str) for m in mounts):
            raise _bad("`mounts` is not a list of strings")
        return cls(
            env=MappingProxyType({k: v for k, v in env.items() if _keep_env(k)}),
            resolv_conf=ResolvConf.parse(resolv),
            hostname=hostname,
            mounts=tuple(mounts),
        )


def _keep_env(name: str) -> bool:
    return name not in DROPPED_ENV and not name.startswith(DROPPED_ENV_PREFIXES)


def _bad(why: str) -> TunnelError:
    return TunnelError(
        f"the agent's pod info ({PODINFO_PATH}) is malformed: {why}",
        hint="the agent image and tpconf disagree on its format: use the agent image of this"
        " tpconf version (the `image` setting)",
    )


class CommandRunner(Protocol):
    """What :func:`fetch_pod_info` needs: a Tunnel or a SupervisedTunnel."""

    async def run(self, command: str, *, timeout: float | None = None) -> CommandResult: ...


async def fetch_pod_info(tunnel: CommandRunner, *, path: str = PODINFO_PATH) -> PodInfo:
    """Read and parse the pod info the agent wrote at start-up."""
    result = await tunnel.run(f"cat {shlex.quote(path)}")
    if result.exit_status != 0:
        raise TunnelError(
            f"could not read the agent's pod info {path}:"
            f" {trim_payload(result.stderr.decode(errors='replace')) or result.exit_status}",
            hint="the agent's entrypoint writes it at start-up: use the agent image of this tpconf"
            " version (the `image` setting)",
        )
    return PodInfo.from_json(result.stdout)
