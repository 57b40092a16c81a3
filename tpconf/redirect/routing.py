"""What vpn-tcp routes, and the iptables rules that make the kernel send it to the VPN.

Owns three things, all local to this machine:

- :class:`RouteTable`: which destination ranges go through the cluster, and through which
  deployment's :class:`~tpconf.net.Dialer` (longest-prefix match). One table for the session:
  every vpn-tcp deployment adds its ranges under its own *owner* key and removing one owner
  leaves the others' ranges (and a range two owners share) in place.
- :func:`resolve_also_proxy`: turns `also-proxy` entries (hostnames, addresses, CIDRs) into
  ranges, hostnames through a resolver the reconciler passes in (the cluster's).
- :class:`Routing`: the nat rules, in tpconf's own chains, applied with one atomic
  ``iptables-restore --noflush`` transaction per change. Only the rules that change are touched
  and NAT is only consulted for a connection's first packet, so open connections (conntrack
  entries) survive any update.

The rules (``nat`` table; ``TPCONF`` is the default chain prefix)::

    OUTPUT         -j TPCONF-OUTPUT                      (inserted first, before KUBE-*)
    TPCONF-OUTPUT  -m comment --comment tpconf-up:PID:START:PROJECT     who made them
                   -m mark --mark MARK -j RETURN         our own upstream DNS (SO_MARK)
                   -p udp -d NAMESERVER --dport 53 -j REDIRECT --to-ports DNS_PORT
                   -p tcp -d NAMESERVER --dport 53 -j REDIRECT --to-ports DNS_PORT
                   -o lo -j RETURN                       local destinations
                   -d 127.0.0.0/8 -j RETURN
                   -d API_SERVER -j RETURN               the tunnel's own transport
                   -p tcp -j TPCONF-ROUTES
    TPCONF-ROUTES  -d CIDR -p tcp -j REDIRECT --to-ports VPN_PORT    (one per routed range)

The chains are the machine's (one network namespace's), so they carry their owner: the
``tpconf up`` that made them, by pid and start time (:class:`~tpconf.pids.ProcessId`), and its
project directory. A second project's vpn-tcp ``up`` is refused, naming the first, while that one
runs; rules whose ``up`` is gone (a crash) are taken over or removed; ``tpconf down`` never
removes the rules of an ``up`` that still runs. A lock file serialises the check and the first
write, so two ``up`` starting together cannot both take the chains.

IPv4 only: IPv6 ranges and nameservers are ignored with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import quote, unquote

import anyio

from tpconf.errors import PrivilegeError, ProxyError
from tpconf.pids import ProcessId

log = logging.getLogger(__name__)

#: The firewall mark that exempts a socket from every tpconf rule. The local DNS server sets
#: it (``SO_MARK``) on the socket it forwards non-cluster queries with, so those reach the
#: machine's real nameserver instead of being redirected back to itself. The value stays clear
#: of the bits kube-proxy (0x4000, 0x8000), Docker and Calico use.
DNS_UPSTREAM_MARK = 0x54500000

DEFAULT_CHAIN_PREFIX = "TPCONF"

PRIVILEGE_MESSAGE = "vpn-tcp needs root: run `sudo -E tpconf up`, see docs/vpn-tcp.md"

_CAP_NET_ADMIN = 12

D = TypeVar("D")


# --- which ranges are routed, through whom ---------------------------------------------------


@dataclass
class _Claim(Generic[D]):
    owner: str
    dialer: D
    order: int


class RouteTable(Generic[D]):
    """The routed ranges of every vpn-tcp deployment, and the dialer that serves each.

    ``D`` is the dialer type (a :class:`~tpconf.net.Dialer` in production). When two owners
    claim the same range, the first one to claim it serves it until it goes away; then the next
    one takes over. That way deployments of the same cluster share its Service range and
    removing one never breaks the others.
    """

    def __init__(self) -> None:
        self._claims: dict[IPv4Network, list[_Claim[D]]] = {}
        self._counter = 0

    def set(self, owner: str, networks: Iterable[IPv4Network], dialer: D) -> None:
        """Make ``owner``'s ranges exactly ``networks``, served by ``dialer``."""
        self.remove(owner)
        self._counter += 1
        for network in set(networks):
            self._claims.setdefault(network, []).append(_Claim(owner, dialer, self._counter))

    def remove(self, owner: str) -> None:
        """Forget ``owner``'s ranges; ranges other owners also claim stay routed."""
        for network in list(self._claims):
            kept = [c for c in self._claims[network] if c.owner != owner]
            if kept:
                self._claims[network] = kept
            else:
                del self._claims[network]

    def owners(self) -> dict[str, frozenset[IPv4Network]]:
        """Each owner's ranges, for the status display."""
        result: dict[str, set[IPv4Network]] = {}
        for network, claims in self._claims.items():
            for claim in claims:
                result.setdefault(claim.owner, set()).add(network)
        return {owner: frozenset(nets) for owner, nets in result.items()}

    def networks(self) -> frozenset[IPv4Network]:
        """Every routed range (what the kernel must redirect)."""
        return frozenset(self._claims)

    def lookup(self, address: IPv4Address | str) -> tuple[str, D] | None:
        """The owner and dialer of the most specific range containing ``address``."""
        addr = ipaddress.ip_address(address)
        if not isinstance(addr, IPv4Address):
            return None
        best: IPv4Network | None = None
        for network in self._claims:
            if addr in network and (best is None or network.prefixlen > best.prefixlen):
                best = network
        if best is None:
            return None
        claim = min(self._claims[best], key=lambda c: c.order)
        return claim.owner, claim.dialer


# --- also-proxy --------------------------------------------------------------------------------

#: Resolves a hostname to addresses (in production: the cluster resolver, through the tunnel).
Resolver = Callable[[str], Awaitable[Iterable[str]]]


@dataclass(frozen=True)
class AlsoProxy:
    """The ranges `also-proxy` entries stand for."""

    networks: frozenset[IPv4Network]
    unresolved: tuple[str, ...] = ()
    """Hostnames the resolver could not resolve (shown in the status, retried on reload)."""


async def resolve_also_proxy(entries: Iterable[str], resolve: Resolver) -> AlsoProxy:
    """Turn `also-proxy` entries into ranges: CIDRs as given, addresses and names as ``/32``."""
    networks: set[IPv4Network] = set()
    unresolved: list[str] = []
    for entry in entries:
        entry = entry.strip()
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            pass
        else:
            if isinstance(network, IPv4Network):
                networks.add(network)
            else:
                log.warning("also-proxy %s: IPv6 is not routed by vpn-tcp yet; ignored", entry)
            continue
        try:
            addresses = list(await resolve(entry))
        except (OSError, ProxyError) as exc:
            log.warning("also-proxy %s: cannot resolve through the cluster: %s", entry, exc)
            unresolved.append(entry)
            continue
        v4 = [a for a in addresses if isinstance(ipaddress.ip_address(a), IPv4Address)]
        if not v4:
            log.warning("also-proxy %s: no IPv4 address", entry)
            unresolved.append(entry)
        networks.update(IPv4Network(a) for a in v4)
    return AlsoProxy(frozenset(networks), tuple(unresolved))


def read_nameservers(path: str | os.PathLike[str] = "/etc/resolv.conf") -> list[IPv4Address]:
    """The IPv4 nameservers of a resolv.conf (the ones DNS is redirected away from)."""
    result: list[IPv4Address] = []
    for line in Path(path).read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                addr = ipaddress.ip_address(words[1].split("%", 1)[0])
            except ValueError:
                continue
            if isinstance(addr, IPv4Address):
                result.append(addr)
            else:
                log.warning("nameserver %s: IPv6 DNS is not redirected; ignored", addr)
    return result


# --- the rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DnsRedirect:
    """Send DNS for ``nameservers`` to the local DNS server on ``127.0.0.1:port``."""

    nameservers: tuple[IPv4Address, ...]
    port: int


@dataclass(frozen=True)
class RuleSet:
    """Everything the nat rules depend on; :meth:`Routing.apply` makes the kernel match it."""

    proxy_port: int
    networks: frozenset[IPv4Network] = frozenset()
    exclude: frozenset[IPv4Network] = frozenset()
    """Never redirected: the API server address(es) the tunnel's port-forward goes to."""
    dns: DnsRedirect | None = None
    mark: int = DNS_UPSTREAM_MARK

    def head_rules(self, routes_chain: str) -> list[str]:
        """The rules of the ``-OUTPUT`` chain, in order (without ``-A CHAIN``)."""
        rules = [f"-m mark --mark {self.mark:#x} -j RETURN"]
        if self.dns is not None:
            rules += [
                f"-d {ns}/32 -p {proto} -m {proto} --dport 53 -j REDIRECT --to-ports {self.dns.port}"
                for ns in self.dns.nameservers
                for proto in ("udp", "tcp")
            ]
        rules += ["-o lo -j RETURN", "-d 127.0.0.0/8 -j RETURN"]
        rules += [f"-d {net} -j RETURN" for net in sorted(self.exclude)]
        rules.append(f"-p tcp -j {routes_chain}")
        return rules

    def route_rules(self) -> set[str]:
        """The rules of the ``-ROUTES`` chain (order does not matter)."""
        return {
            f"-d {net} -p tcp -j REDIRECT --to-ports {self.proxy_port}" for net in self.networks
        }


_OWNER_TAG = "tpconf-up"


@dataclass(frozen=True)
class RulesOwner:
    """The ``tpconf up`` whose nat rules these are."""

    process: ProcessId
    project: str
    """Its project directory ("" if it did not say)."""

    def comment(self) -> str:
        """The rule comment that records it (iptables allows 255 characters)."""
        project = quote(self.project, safe="/._-~+")[:200]
        return f"{_OWNER_TAG}:{self.process.pid}:{self.process.start}:{project}"

    @classmethod
    def parse(cls, comment: str) -> RulesOwner | None:
        tag, _, rest = comment.partition(":")
        pid, _, rest = rest.partition(":")
        start, _, project = rest.partition(":")
        if tag != _OWNER_TAG or not pid.isdigit() or not start.isdigit():
            return None
        # Chains live no longer than the boot: the boot of now is theirs.
        return cls(ProcessId(int(pid), int(start), ProcessId.own().boot), unquote(project))

    def running(self) -> bool:
        """Whether its ``up`` runs, and is another process than this one."""
        return self.process.alive() and self.process.pid != os.getpid()

    def describe(self) -> str:
        return f"{self.project or 'a project'} (tpconf up, pid {self.process.pid})"


@dataclass
class _Existing:
    chains: set[str] = field(default_factory=set)
    jumps: list[tuple[str, str]] = field(default_factory=list)  # (builtin chain, rule spec)
    owner: RulesOwner | None = None


def _parse_nat(save_output: str, prefix: str) -> _Existing:
    existing = _Existing()
    for line in save_output.splitlines():
        if line.startswith(":") and line[1:].startswith(prefix + "-"):
            existing.chains.add(line[1:].split()[0])
        elif line.startswith("-A "):
            _, chain, spec = line.split(" ", 2)
            if not chain.startswith(prefix + "-") and f"-j {prefix}-" in spec:
                existing.jumps.append((chain, spec))
            elif chain == f"{prefix}-OUTPUT" and spec.startswith("-m comment --comment "):
                comment = spec.removeprefix("-m comment --comment ").strip().strip('"')
                existing.owner = RulesOwner.parse(comment) or existing.owner
    return existing


#: Held (``flock``) while the chains are checked and first written: two ``up`` starting
#: together must not both find them free.
LOCK_FILE = "/run/lock/tpconf-vpn.lock"


def _take_lock() -> int:
    path = LOCK_FILE if os.path.isdir(os.path.dirname(LOCK_FILE)) else "/tmp/tpconf-vpn.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.asynccontextmanager
async def _machine_lock() -> AsyncIterator[None]:
    fd = await anyio.to_thread.run_sync(_take_lock)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def check_privileges() -> None:
    """Raise :class:`PrivilegeError` unless we can change nat rules (root or CAP_NET_ADMIN)."""
    if os.geteuid() != 0 and not _has_cap_net_admin():
        raise PrivilegeError(PRIVILEGE_MESSAGE, hint="or give up vpn-tcp: `method: inject-tcp`")
    if shutil.which("iptables-restore") is None:
        raise PrivilegeError(
            "vpn-tcp needs iptables: `iptables-restore` is not on PATH",
            hint="install it (Debian: `apt install iptables`), see docs/vpn-tcp.md",
        )


def _has_cap_net_admin() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    return False


class Routing:
    """tpconf's nat chains: created on the first :meth:`apply`, removed by :meth:`cleanup`.

    ``command_prefix`` is put in front of every iptables command (for example
    ``["ip", "netns", "exec", NS]``); the reconciler leaves it empty.
    """

    def __init__(
        self,
        *,
        chain_prefix: str = DEFAULT_CHAIN_PREFIX,
        command_prefix: Sequence[str] = (),
        project: str = "",
        owner: ProcessId | None = None,
    ) -> None:
        self.chain_prefix = chain_prefix
        self.head_chain = f"{chain_prefix}-OUTPUT"
        self.routes_chain = f"{chain_prefix}-ROUTES"
        self.project = project
        """The project directory the rules are recorded as made for (shown to other projects)."""
        self.owner = owner
        """Who the rules are recorded as made by (``None``: this process)."""
        self._prefix = list(command_prefix)
        self._applied: RuleSet | None = None
        self._lock = anyio.Lock()

    def _owner(self) -> RulesOwner:
        return RulesOwner(self.owner or ProcessId.own(), self.project)

    @property
    def applied(self) -> RuleSet | None:
        """The rule set the kernel has now (``None`` before the first apply and after cleanup)."""
        return self._applied

    async def apply(self, rules: RuleSet) -> None:
        """Make the kernel's rules match ``rules``, in one atomic transaction; no-op if equal."""
        async with self._lock:
            old = self._applied
            if old == rules:
                return
            if old is None:
                check_privileges()
                async with _machine_lock():
                    await self._restore(await self._first(rules))
            else:
                lines = ["*nat"]
                old_head = old.head_rules(self.routes_chain)
                new_head = rules.head_rules(self.routes_chain)
                if old_head != new_head:
                    lines.append(f":{self.head_chain} - [0:0]")
                    lines += [f"-A {self.head_chain} {r}" for r in self._head(rules)]
                old_routes, new_routes = old.route_rules(), rules.route_rules()
                lines += [f"-D {self.routes_chain} {r}" for r in sorted(old_routes - new_routes)]
                lines += [f"-A {self.routes_chain} {r}" for r in sorted(new_routes - old_routes)]
                await self._restore([*lines, "COMMIT"])
            self._applied = rules
            log.info(
                "vpn-tcp routes %s",
                ", ".join(str(n) for n in sorted(rules.networks)) or "nothing",
            )

    def _head(self, rules: RuleSet) -> list[str]:
        owner = f'-m comment --comment "{self._owner().comment()}"'
        return [owner, *rules.head_rules(self.routes_chain)]

    async def _first(self, rules: RuleSet) -> list[str]:
        """The transaction that takes the chains: refused while another ``up`` holds them."""
        existing = _parse_nat(await self._save(), self.chain_prefix)
        if existing.owner is not None and existing.owner.running():
            raise ProxyError(
                f"vpn-tcp is in use on this machine by {existing.owner.describe()}: one project "
                "at a time can route the machine's traffic and DNS",
                hint="stop that `tpconf up` first, or use `method: inject-tcp` in this project",
            )
        if existing.chains:
            log.warning("taking over the vpn-tcp rules a crashed tpconf up left")
        # Declaring a chain in a --noflush transaction creates it, or empties it when a crashed
        # session left it behind; both chains are then written in full.
        lines = ["*nat", f":{self.head_chain} - [0:0]", f":{self.routes_chain} - [0:0]"]
        if ("OUTPUT", f"-j {self.head_chain}") not in existing.jumps:
            lines.append(f"-I OUTPUT 1 -j {self.head_chain}")
        lines += [f"-A {self.head_chain} {r}" for r in self._head(rules)]
        lines += [f"-A {self.routes_chain} {r}" for r in sorted(rules.route_rules())]
        return [*lines, "COMMIT"]

    async def cleanup(self) -> None:
        """Remove tpconf's chains and the jumps to them, unless another running ``up`` made them;
        idempotent; other chains untouched."""
        async with self._lock:
            existing = _parse_nat(await self._save(), self.chain_prefix)
            # A refused `apply` ends here too: the chains of the `up` that refused it stay.
            owner = existing.owner
            if owner is None or owner.process == self._owner().process or not owner.process.alive():
                await _remove_chains(self, existing)
            self._applied = None

    async def leftovers(self) -> set[str]:
        """The names of tpconf's chains that exist now."""
        return _parse_nat(await self._save(), self.chain_prefix).chains

    async def _save(self) -> str:
        return await self._run([*self._prefix, "iptables-save", "-t", "nat"], None)

    async def _restore(self, lines: list[str]) -> None:
        script = "\n".join(lines) + "\n"
        log.debug("iptables-restore --noflush:\n%s", script)
        await self._run([*self._prefix, "iptables-restore", "-w", "5", "--noflush"], script)

    async def _run(self, argv: list[str], stdin: str | None) -> str:
        try:
            result = await anyio.run_process(
                argv, input=stdin.encode() if stdin is not None else None, check=False
            )
        except FileNotFoundError as exc:
            raise PrivilegeError(
                f"vpn-tcp needs iptables: {exc.filename} not found",
                hint="install it (Debian: `apt install iptables`), see docs/vpn-tcp.md",
            ) from exc
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()
            if "Permission denied" in err or "you must be root" in err:
                raise PrivilegeError(PRIVILEGE_MESSAGE, hint=err)
            raise ProxyError(f"{argv[len(self._prefix)]} failed: {err}")
        return result.stdout.decode()


async def rules_owner(
    *, chain_prefix: str = DEFAULT_CHAIN_PREFIX, command_prefix: Sequence[str] = ()
) -> RulesOwner | None:
    """Who made the tpconf chains there are now (``None``: none, or made by an older tpconf)."""
    routing = Routing(chain_prefix=chain_prefix, command_prefix=command_prefix)
    return _parse_nat(await routing._save(), chain_prefix).owner


async def remove_leftovers(
    *, chain_prefix: str = DEFAULT_CHAIN_PREFIX, command_prefix: Sequence[str] = ()
) -> set[str]:
    """Remove every chain named ``PREFIX-*`` in the nat table and every jump to them, unless
    another ``tpconf up`` that still runs made them (:meth:`RulesOwner.running`).

    For ``tpconf down`` after a crash; returns the names of the chains it removed.
    """
    routing = Routing(chain_prefix=chain_prefix, command_prefix=command_prefix)
    existing = _parse_nat(await routing._save(), chain_prefix)
    if existing.owner is not None and existing.owner.running():
        log.info("vpn-tcp rules of %s kept: it still runs", existing.owner.describe())
        return set()
    return await _remove_chains(routing, existing)


async def _remove_chains(routing: Routing, existing: _Existing) -> set[str]:
    if not existing.chains and not existing.jumps:
        return set()
    lines = ["*nat"]
    lines += [f"-D {chain} {spec}" for chain, spec in existing.jumps]
    lines += [f"-F {chain}" for chain in sorted(existing.chains)]
    lines += [f"-X {chain}" for chain in sorted(existing.chains)]
    lines.append("COMMIT")
    await routing._restore(lines)
    log.info("removed nat chains %s", ", ".join(sorted(existing.chains)))
    return existing.chains
