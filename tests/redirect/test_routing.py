"""vpn-tcp's rules on a machine several projects share, and the DNS redirect that never outlives
its server (issue 11): real iptables, in a network namespace each test makes.

"Another project's ``tpconf up``" is a real process of this machine (a ``sleep``) whose identity
the rules record as their owner: while it runs its rules are refused to others and kept by
``tpconf down``; once it is gone they are taken over or removed.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from ipaddress import IPv4Address, IPv4Network

import anyio
import pytest
from anyio.abc import TaskStatus

from tpconf.errors import ProxyError, explain
from tpconf.methods.vpn_tcp import Serve, run_dns
from tpconf.pids import ProcessId
from tpconf.redirect import VPN
from tpconf.redirect.routing import Routing, RuleSet, RulesOwner, remove_leftovers, rules_owner

pytestmark = [
    pytest.mark.root,
    pytest.mark.anyio,
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, iptables"),
]

RULES = RuleSet(proxy_port=4000, networks=frozenset({IPv4Network("10.123.0.0/16")}))


@pytest.fixture
def netns() -> Iterator[list[str]]:
    """A fresh network namespace; yields the command prefix that runs a program in it."""
    name = f"tpconf-rt-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
    try:
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def nat(prefix: list[str]) -> str:
    """The nat table as iptables-save prints it, less its comment lines: they carry the time of
    the dump, so two dumps a second apart differ (CI met one)."""
    out = subprocess.run(
        [*prefix, "iptables-save", "-t", "nat"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return "".join(line for line in out.splitlines(keepends=True) if not line.startswith("#"))


@pytest.fixture
def ups() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Starts other projects' `tpconf up`, as far as the rules can tell: running processes."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        started.append(subprocess.Popen(["sleep", "120"]))
        return started[-1]

    yield start
    for process in started:
        process.kill()
        process.wait()


@pytest.fixture
def other_up(ups: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    return ups()


def identity(process: subprocess.Popen[bytes]) -> ProcessId:
    found = ProcessId.of(process.pid)
    assert found is not None
    return found


async def test_a_second_project_is_refused_naming_the_first_and_its_rules_stay(
    netns: list[str], other_up: subprocess.Popen[bytes]
) -> None:
    first = Routing(command_prefix=netns, project="/home/dev/shop", owner=identity(other_up))
    await first.apply(RULES)
    before = nat(netns)
    assert f'--comment "tpconf-up:{other_up.pid}:' in before
    second = Routing(command_prefix=netns, project="/home/dev/blog")
    with pytest.raises(ProxyError) as info:
        await second.apply(RuleSet(proxy_port=5000))
    assert info.value.message == (
        f"vpn-tcp is in use on this machine by /home/dev/shop (tpconf up, pid {other_up.pid}): "
        "one project at a time can route the machine's traffic and DNS"
    )
    assert info.value.hint == (
        "stop that `tpconf up` first, or use `method: inject-tcp` in this project"
    )
    assert nat(netns) == before  # not a rule touched
    assert second.applied is None


async def test_a_refused_vpn_leaves_the_running_projects_rules_in_place(
    netns: list[str], other_up: subprocess.Popen[bytes]
) -> None:
    await Routing(command_prefix=netns, project="/home/dev/shop", owner=identity(other_up)).apply(
        RULES
    )
    before = nat(netns)
    vpn = VPN(command_prefix=netns)
    refused = pytest.RaisesExc(ProxyError, match="vpn-tcp is in use on this machine by /home/")
    with pytest.RaisesGroup(refused, flatten_subgroups=True):
        async with anyio.create_task_group() as tg:
            await tg.start(vpn.run)
    assert nat(netns) == before  # its own cleanup on the way out did not take them either


async def test_the_rules_of_a_project_whose_up_is_gone_are_taken_over(
    netns: list[str], other_up: subprocess.Popen[bytes]
) -> None:
    first = Routing(command_prefix=netns, project="/home/dev/shop", owner=identity(other_up))
    await first.apply(RULES)
    other_up.kill()  # that `up` crashed: its rules stay behind
    other_up.wait()
    second = Routing(command_prefix=netns, project="/home/dev/blog")
    await second.apply(RuleSet(proxy_port=5000, networks=frozenset({IPv4Network("10.9.0.0/16")})))
    rules = nat(netns)
    assert "10.123.0.0/16" not in rules and "--to-ports 5000" in rules
    assert rules.count("-A OUTPUT -j TPCONF-OUTPUT") == 1
    owner = await rules_owner(command_prefix=netns)
    assert owner == RulesOwner(ProcessId.own(), "/home/dev/blog")
    await second.cleanup()
    assert "TPCONF" not in nat(netns)


async def test_down_keeps_the_rules_of_a_running_up_and_removes_them_once_it_is_gone(
    netns: list[str], other_up: subprocess.Popen[bytes]
) -> None:
    await Routing(command_prefix=netns, project="/srv/a b", owner=identity(other_up)).apply(RULES)
    assert await remove_leftovers(command_prefix=netns) == set()
    assert "TPCONF-ROUTES -d 10.123.0.0/16" in nat(netns)
    owner = await rules_owner(command_prefix=netns)
    assert owner is not None and owner.running()
    assert owner.describe() == f"/srv/a b (tpconf up, pid {other_up.pid})"  # spaces survive
    other_up.kill()
    other_up.wait()
    assert await remove_leftovers(command_prefix=netns) == {"TPCONF-OUTPUT", "TPCONF-ROUTES"}
    assert "TPCONF" not in nat(netns)


async def test_rules_of_an_older_tpconf_without_an_owner_are_leftovers(netns: list[str]) -> None:
    script = (
        "*nat\n:TPCONF-OUTPUT - [0:0]\n:TPCONF-ROUTES - [0:0]\n-I OUTPUT 1 -j TPCONF-OUTPUT\n"
        "-A TPCONF-OUTPUT -p tcp -j TPCONF-ROUTES\nCOMMIT\n"
    )
    await anyio.run_process([*netns, "iptables-restore", "--noflush"], input=script.encode())
    assert await rules_owner(command_prefix=netns) is None
    assert await remove_leftovers(command_prefix=netns) == {"TPCONF-OUTPUT", "TPCONF-ROUTES"}


async def test_two_ups_starting_together_cannot_both_take_the_rules(
    netns: list[str], ups: Callable[[], subprocess.Popen[bytes]]
) -> None:
    contenders = [
        Routing(command_prefix=netns, project=f"/p/{n}", owner=identity(ups())) for n in (1, 2)
    ]
    refused: list[str] = []

    async def take(routing: Routing) -> None:
        try:
            await routing.apply(RULES)
        except ProxyError:
            refused.append(routing.project)

    async with anyio.create_task_group() as tg:
        for routing in contenders:
            tg.start_soon(take, routing)
    owner = await rules_owner(command_prefix=netns)
    assert owner is not None
    assert sorted([owner.project, *refused]) == ["/p/1", "/p/2"]
    assert nat(netns).count("-A OUTPUT -j TPCONF-OUTPUT") == 1


# --- the DNS redirect never outlives the DNS server ------------------------------------------


class FlakyServer:
    """A DNS server stand-in: listens on a real UDP port, and fails when :meth:`fail` is called."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self._failed = anyio.Event()

    def __call__(self) -> FlakyServer:
        self._failed = anyio.Event()
        return self

    async def serve(self, *, task_status: TaskStatus[int]) -> None:
        async with await anyio.create_udp_socket(local_host="127.0.0.1") as udp:
            port = udp.extra(anyio.abc.SocketAttribute.local_port)
            self.ports.append(port)
            task_status.started(port)
            await self._failed.wait()
            raise ProxyError("the DNS server cannot accept: too many open files")

    def fail(self) -> None:
        self._failed.set()


def dns_rules(prefix: list[str]) -> list[str]:
    return [line for line in nat(prefix).splitlines() if "--dport 53" in line]


@asynccontextmanager
async def vpn_in(prefix: list[str]) -> AsyncIterator[VPN]:
    vpn = VPN(command_prefix=prefix)
    async with anyio.create_task_group() as tg:
        await tg.start(vpn.run)
        try:
            yield vpn
        finally:
            tg.cancel_scope.cancel()


async def test_when_the_dns_server_fails_the_redirect_goes_at_once_and_comes_back_with_it(
    netns: list[str],
) -> None:
    flaky = FlakyServer()
    notices: list[str] = []
    nameservers = [IPv4Address("10.77.0.2")]

    def server() -> Serve:
        return flaky().serve

    async with vpn_in(netns) as vpn, anyio.create_task_group() as tg:
        port = await tg.start(
            partial(run_dns, vpn, server, nameservers, notice=notices.append, retry=2.0)
        )
        assert [f"--to-ports {port}" in rule for rule in dns_rules(netns)] == [True, True]
        flaky.fail()
        with anyio.fail_after(5):
            while not notices:  # noqa: ASYNC110 (waits for the failure to be shown)
                await anyio.sleep(0.01)
        assert dns_rules(netns) == []  # gone before the failure was even shown
        assert notices[0].startswith(
            "vpn-tcp DNS server failed: the DNS server cannot accept: too many open files\n"
        )
        assert "the machine's DNS goes to its own nameservers again" in notices[0]
        assert "restarting it in 2 s" in notices[0]
        with anyio.fail_after(10):
            while len(notices) < 2:  # noqa: ASYNC110 (waits for the restart)
                await anyio.sleep(0.01)
        assert notices[1] == "vpn-tcp DNS server runs again: the machine's DNS goes through it"
        new_port = flaky.ports[-1]
        assert [f"--to-ports {new_port}" in rule for rule in dns_rules(netns)] == [True, True]
        tg.cancel_scope.cancel()


async def test_a_dns_server_that_cannot_start_fails_the_start_and_redirects_nothing(
    netns: list[str],
) -> None:
    async def broken(*, task_status: TaskStatus[int]) -> None:
        raise ProxyError("cannot set SO_MARK")

    async with vpn_in(netns) as vpn:
        with pytest.raises(BaseException) as info:  # what it says is checked below
            await run_dns(vpn, lambda: broken, [IPv4Address("10.77.0.2")], notice=print)
        assert explain(info.value).message == "cannot set SO_MARK"
        assert dns_rules(netns) == []
