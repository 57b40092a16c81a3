"""Checks and parsers for the scalar values of telepresence.yaml: ports, names, hosts, CIDRs.

Each function returns the normalised value or raises :class:`BadValue` with a message written for
the user and a hint that names the fix. The models turn them into validation errors.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

#: What an entry of `also-proxy` becomes: a hostname (lowercase, no trailing dot) or a network
#: (a single address is a /32 or /128 network).
AlsoProxyTarget = str | ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPOSE = re.compile(r"(\d+)(?::(\d+))?")


class BadValue(ValueError):
    """Raised by the checks of this module; ``message`` and ``hint`` are shown to the user."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


def describe(value: Any) -> str:
    """How a wrong value is named in a message: `a list`, `a mapping`, `` `80` ``."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    text = str(value)
    return f"`{text}`" if len(text) <= 40 else f"`{text[:37]}...`"


def port(value: Any) -> int:
    """A TCP port, 1-65535."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadValue(f"expected a port number, got {describe(value)}")
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise BadValue(f"expected a port number, got {describe(value)}")
        value = int(value.strip())
    number = int(value)
    if not 1 <= number <= 65535:
        raise BadValue(f"port {number} is out of range: ports are 1 to 65535")
    return number


def expose(value: Any) -> tuple[int, int]:
    """An `expose` entry: `PORT` or `LOCAL:REMOTE`, as ``(local, remote)``."""
    example = "for example `8080` or `8080:80`"
    if isinstance(value, int) and not isinstance(value, bool):
        return port(value), port(value)
    if isinstance(value, str):
        match = _EXPOSE.fullmatch(value.strip())
        if match is not None:
            local = port(match[1])
            return local, port(match[2]) if match[2] else local
    raise BadValue(
        f"expected PORT or LOCAL:REMOTE, got {describe(value)}",
        hint=f"write the port this machine listens on and the port the cluster uses, {example}",
    )


def dns_label(value: str, what: str) -> str:
    """A DNS-1123 label: lowercase letters, digits and '-', at most 63 characters."""
    if not value:
        raise BadValue(f"{what} is empty")
    if len(value) > 63:
        raise BadValue(f"{what} `{value[:20]}...` is longer than 63 characters")
    if _LABEL.fullmatch(value) is None:
        suggestion = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")
        hint = "use lowercase letters, digits and '-', starting and ending with a letter or digit"
        if suggestion and _LABEL.fullmatch(suggestion):
            hint += f", for example `{suggestion}`"
        raise BadValue(f"{what} `{value}` is not a valid Kubernetes name", hint=hint)
    return value


def dns_subdomain(value: str, what: str) -> str:
    """A DNS-1123 subdomain (a Deployment's name): labels separated by dots, at most 253."""
    if not value:
        raise BadValue(f"{what} is empty")
    if len(value) > 253 or not all(_LABEL.fullmatch(part) for part in value.split(".")):
        raise BadValue(
            f"{what} `{value}` is not a valid Kubernetes name",
            hint="use lowercase letters, digits, '-' and '.'",
        )
    return value


def env_name(value: str) -> str:
    """An environment variable name a shell can use."""
    if _ENV_NAME.fullmatch(value) is None:
        raise BadValue(
            f"`{value}` is not a valid environment variable name",
            hint="use letters, digits and '_', not starting with a digit",
        )
    return value


def env_value(value: Any) -> str:
    """An environment value: a string; numbers and booleans are written as YAML wrote them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise BadValue(
        f"expected a string value, got {describe(value)}",
        hint='quote the value, for example `FOO: ""` for an empty one',
    )


def network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR such as `10.0.0.0/8`, or a single address."""
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        fixed = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise BadValue(
            f"`{value}` is not an IP address or CIDR",
            hint="write an address or a network, for example `10.0.0.0/8` or `2001:db8::/32`",
        ) from None
    raise BadValue(f"`{value}` has host bits set", hint=f"write the network: `{fixed}`")


def cidr(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network of the VPN settings: a CIDR, or a single address."""
    if not isinstance(value, str):
        raise BadValue(f"expected a CIDR, got {describe(value)}", hint="for example `10.96.0.0/12`")
    return network(value.strip())


def hostname(value: str) -> str:
    """An RFC 1123 hostname, lowercased, without a trailing dot."""
    name = value.removesuffix(".")
    labels = name.split(".")
    valid = (
        0 < len(name) <= 253
        and all(len(label) <= 63 and _HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )
    if not valid:
        raise BadValue(
            f"`{value}` is not a valid hostname, IP address or CIDR",
            hint="for example `db.example.com`, `10.1.2.3` or `10.0.0.0/8`",
        )
    return name.lower()


def also_proxy(value: Any) -> AlsoProxyTarget:
    """An `also-proxy` entry: a hostname, an IPv4/IPv6 address or a CIDR."""
    if not isinstance(value, str):
        raise BadValue(
            f"expected a hostname, IP address or CIDR, got {describe(value)}",
            hint="for example `db.example.com`, `10.1.2.3` or `10.0.0.0/8`",
        )
    text = value.strip()
    looks_ip = "/" in text or ":" in text or bool(re.fullmatch(r"[\d.]+", text))
    return network(text) if looks_ip else hostname(text)


def image(value: str) -> str:
    """A container image reference: non-empty, no whitespace."""
    if not value or any(c.isspace() for c in value):
        raise BadValue(
            f"`{value}` is not a valid image reference",
            hint="for example `tpconf/agent:0.1.0`",
        )
    return value


#: An HTTP field name (RFC 9110 token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_name(value: str) -> str:
    """An HTTP header name, lowercased (header names are case-insensitive)."""
    if _HEADER_NAME.fullmatch(value) is None:
        raise BadValue(
            f"`{value}` is not a valid HTTP header name",
            hint="use letters, digits and '-', for example `x-dev-user`",
        )
    return value.lower()


def regex(value: str) -> str:
    """A Python regular expression that compiles."""
    try:
        re.compile(value)
    except re.error as exc:
        raise BadValue(
            f"`{value}` is not a valid regular expression: {exc}",
            hint="write a Python regular expression; to match the text exactly, give the value "
            "without `regex`",
        ) from None
    return value


_PROFILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def profile(value: str) -> str:
    """A profile name, as docker compose allows them: letters, digits, `_`, `.`, `-`."""
    if not _PROFILE.fullmatch(value):
        raise BadValue(
            f"`{value}` is not a valid profile name",
            hint="use letters, digits, `_`, `.` and `-`, starting with a letter or digit",
        )
    return value
