"""Many connections through inject-tcp: each one served or cleanly refused, nothing left behind.

The SOCKS server runs in a process of its own with a small descriptor limit
(``server_child.py``); a Python client under real torsocks opens thousands of connections to
``hello`` through it, a hundred at a time, each sending ``ping`` and waiting for the echo.
Issue 11: with 1024 descriptors, ~1,000 connections through torsocks ended the SOCKS server
(``EMFILE`` escaped its accept loop) and every later connection of the process failed.

"Cleanly refused" is what a program sees when a connect fails at once (``ECONNREFUSED`` from
torsocks, or a reset); a hang, a timeout or a half-served connection is a failure. Afterwards
the server's descriptors and asyncio tasks are back where they were before the load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tpconf.net import LOG_INTERVAL
from tpconf.supervisor.torsocks import prepare_torsocks

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)

CLIENT = textwrap.dedent(
    """\
    import collections, json, socket, sys, threading, time
    port, total, workers = map(int, sys.argv[1:4])
    hold = float(sys.argv[4])
    address = socket.gethostbyname("hello")  # one RESOLVE, then connections by address
    outcomes = collections.Counter()
    lock = threading.Lock()

    def one():
        try:
            with socket.create_connection((address, port), timeout=60) as conn:
                conn.sendall(b"ping")
                echoed = b""
                while len(echoed) < 4:
                    chunk = conn.recv(4)
                    if not chunk:
                        return "closed before the echo"
                    echoed += chunk
                time.sleep(hold)  # connections overlap: the server needs more descriptors
                return "served" if echoed == b"ping" else f"wrong echo {echoed!r}"
        except (ConnectionRefusedError, ConnectionResetError):
            return "refused"
        except Exception as exc:
            return repr(exc)

    def work(count):
        for _ in range(count):
            outcome = one()
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=work, args=(total // workers,)) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(outcomes))
    """
)


@dataclass
class Server:
    """The child running the listener; :meth:`stats` asks it for its counters."""

    process: subprocess.Popen[str]
    port: int
    echo_port: int
    """Where ``hello`` answers (an echo server, reached through the SOCKS server)."""
    log: Path

    def stats(self) -> dict[str, int]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        reply: dict[str, int] = json.loads(self.process.stdout.readline())
        return reply


@pytest.fixture
def socks_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    fd_limit, max_connections = request.param
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.load.server_child", "socks", str(fd_limit),
             str(max_connections)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    try:
        assert process.stdout is not None
        ready: dict[str, Any] = json.loads(process.stdout.readline())
        yield Server(process, ready["port"], ready["echo_port"], log)
    finally:
        process.kill()
        process.wait()
        if process.stdin is not None:
            process.stdin.close()
        if process.stdout is not None:
            process.stdout.close()


def run_clients(
    server: Server, tmp_path: Path, total: int, workers: int, hold: float = 0
) -> dict[str, int]:
    """Run the client under torsocks: ``total`` connections, ``workers`` at a time, each kept
    open ``hold`` seconds after its echo; how they ended."""
    wrapper = prepare_torsocks(server.port, tmp_path)
    done = subprocess.run(
        [*wrapper.argv, sys.executable, "-c", CLIENT, str(server.echo_port), str(total),
         str(workers), str(hold)],
        env={**os.environ, **wrapper.env}, capture_output=True, text=True, timeout=150,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes: dict[str, int] = json.loads(done.stdout)
    return outcomes


def warm_up(server: Server, tmp_path: Path) -> dict[str, int]:
    """The server's counters after a first lookup and connection: its resolver then keeps a
    connection to the nameserver (two descriptors and two tasks), which is no leak."""
    assert run_clients(server, tmp_path, total=10, workers=10) == {"served": 10}
    return settled(server, {"fds": 0, "tasks": 0}, timeout=1)


def settled(server: Server, baseline: dict[str, int], timeout: float = 10) -> dict[str, int]:
    """The server's counters once its descriptors and tasks are back to ``baseline`` (or after
    ``timeout`` seconds, when they are not: the caller's assertions then show by how much)."""
    deadline = time.monotonic() + timeout
    while True:
        now = server.stats()
        if now["fds"] <= baseline["fds"] and now["tasks"] <= baseline["tasks"]:
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def load(
    server: Server, tmp_path: Path, total: int, hold: float
) -> tuple[dict[str, int], dict[str, int]]:
    """Run ``total`` connections, 100 at a time; assert each was served or cleanly refused and
    that the server's descriptors, tasks and connections are back at the baseline after.
    Returns the outcomes and the server's counters."""
    baseline = warm_up(server, tmp_path)
    started = time.monotonic()
    outcomes = run_clients(server, tmp_path, total=total, workers=100, hold=hold)
    after = settled(server, baseline)
    after["seconds"] = int(time.monotonic() - started) + 1
    print(f"\n{total} connections, 100 at a time: {dict(outcomes)}; "
          f"server before {baseline}, after {after}")  # fmt: skip
    assert set(outcomes) <= {"served", "refused"}, outcomes
    assert sum(outcomes.values()) == total
    assert outcomes["served"] > 0
    assert (after["fds"], after["tasks"], after["active"]) == (
        baseline["fds"],
        baseline["tasks"],
        0,
    )
    return outcomes, after


@pytest.mark.parametrize("socks_server", [(40, 4096)], indirect=True)
def test_ten_thousand_connections_past_the_fd_limit_are_served_or_refused_and_leave_nothing(
    socks_server: Server, tmp_path: Path
) -> None:
    _, after = load(socks_server, tmp_path, total=10_000, hold=0.05)
    assert after["exhausted"] > 0  # it did run out of descriptors, and kept serving
    log = socks_server.log.read_text()
    # logged, but not once per failed accept: at most every ten seconds, with a count
    lines = log.count("SOCKS: cannot accept connections: Too many open files")
    assert 1 <= lines <= after["seconds"] / LOG_INTERVAL + 1, log[-2000:]


@pytest.mark.parametrize("socks_server", [(4096, 20)], indirect=True)
def test_connections_past_the_listeners_cap_are_refused_and_logged_every_few_seconds(
    socks_server: Server, tmp_path: Path
) -> None:
    outcomes, after = load(socks_server, tmp_path, total=2_000, hold=0.02)
    assert outcomes["refused"] > 0
    assert after["refused"] == outcomes["refused"]
    assert after["exhausted"] == 0
    log = socks_server.log.read_text()
    lines = log.count("SOCKS: 20 connections at once, the most one listener serves")
    assert 1 <= lines <= after["seconds"] / LOG_INTERVAL + 1, log[-2000:]
