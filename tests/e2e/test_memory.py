"""Memory under a slow reader: an upload through tpconf to a Service that reads 1 MB/s.

A process of the "laptop" tries to upload 1 GB to an in-cluster reader paced at 1 MB/s, once
through inject-tcp (a `run:` process under torsocks, started by `tpconf up`) and once through
vpn-tcp (a process of a network namespace the test makes, not a child of tpconf). Without
backpressure tpconf reads the upload as fast as loopback allows and holds it: ~1 GB of RSS
within seconds (issue 11 measured 5.66 GB after 10 s through vpn-tcp).

This is a memory bound, not a timing. Uploading 1 GB at 1 MB/s would take 17 minutes, and is
not needed: once every buffer on the way is full, the writer is blocked and tpconf's memory can
only stay where it is. So each test waits until the writer has been blocked (the upload advances
at the reader's pace) and then keeps it blocked for :data:`BLOCKED_FOR` seconds, asserting that
the peak RSS of `tpconf up` (the kernel's high-water mark, ``VmHWM``, start-up included) stays
under :data:`PEAK_RSS_LIMIT` and that the writer is still far from done. The numbers are
printed (``-s``) for the closing note of issue 11.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import E2ECluster
from tests.e2e.harness import TOOLS, Up, deploy, deployment, file_text, service, write_config
from tests.e2e.laptop import Laptop, NetnsUp

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

#: The bound of issue 11: tpconf's peak RSS while a writer is blocked behind a slow reader.
PEAK_RSS_LIMIT = 150 * 1024 * 1024
#: How long the writer is kept blocked while the bound is checked.
BLOCKED_FOR = 30.0
#: What the writer tries to upload.
UPLOAD = 1024**3
#: The reader's pace, bytes per second.
READER_RATE = 1_000_000

READER = textwrap.dedent(
    f"""\
    import socket, threading, time
    server = socket.create_server(("0.0.0.0", 9000), backlog=16)
    def serve(conn):
        got, start = 0, time.monotonic()
        while data := conn.recv(65536):
            got += len(data)
            ahead = got / {READER_RATE} - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        conn.close()
    while True:
        threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
    """
)

# Sends as fast as the connection takes it, and writes how far it got (renamed into place).
# With --socks it speaks SOCKS5 itself to the deployment's server (the port is in the torsocks
# config tpconf gives the process), and pipelines: greeting, CONNECT and data in one go, without
# waiting for the replies. torsocks waits for each reply, which hid issue 11's unbounded reads.
WRITER = textwrap.dedent(
    f"""\
    import os, re, socket, sys
    socks = sys.argv[1] == "--socks"
    host, progress = sys.argv[-2:]
    if socks:
        conf = open(os.environ["TORSOCKS_CONF_FILE"]).read()
        port = int(re.search(r"^TorPort (\\d+)", conf, re.M).group(1))
        conn = socket.create_connection(("127.0.0.1", port), timeout=600)
        name = host.encode()
        conn.sendall(b"\\5\\1\\0" + b"\\5\\1\\0\\3" + bytes([len(name)]) + name + (9000).to_bytes(2, "big"))
    else:
        conn = socket.create_connection((host, 9000), timeout=600)
    chunk = b"x" * (1024 * 1024)
    sent = 0
    while sent < {UPLOAD}:
        conn.sendall(chunk)
        sent += len(chunk)
        with open(progress + ".tmp", "w") as out:
            out.write(str(sent))
        os.replace(progress + ".tmp", progress)
    """
)


def slow_reader(cluster: E2ECluster, ns: str) -> None:
    deploy(
        cluster,
        ns,
        deployment("sink", TOOLS, command=["python3", "-c", READER]),
        service("sink", [9000]),
    )


def memory(pid: int) -> tuple[int, int]:
    """(current, peak) RSS of ``pid`` in bytes, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def sent(progress: Path) -> int:
    text = file_text(progress)
    return int(text) if text else 0


def hold_blocked_writers(pid: int, progress: list[Path], label: str) -> None:
    """Wait for the writers to be blocked, keep them so for BLOCKED_FOR s; assert the RSS bound.

    ``progress``: the files where the writers report how much they sent.
    """
    limit = READER_RATE * len(progress)  # each writer has a reader of its own

    def total() -> int:
        return sum(map(sent, progress))

    deadline = time.monotonic() + 120
    while not all(map(sent, progress)):
        assert time.monotonic() < deadline, "the writers never started sending"
        time.sleep(0.2)
    # Blocked: over 3 s, the uploads advanced no faster than a few times the readers' pace.
    window: list[tuple[float, int]] = []
    while True:
        now, done = time.monotonic(), total()
        window = [(t, n) for t, n in window if now - t <= 3.5] + [(now, done)]
        rss, peak = memory(pid)
        assert peak < PEAK_RSS_LIMIT, (
            f"{label}: tpconf up grew to {peak / 2**20:.0f} MiB with the writers at "
            f"{done / 2**20:.0f} MiB"
        )
        if now - window[0][0] >= 3.0 and done - window[0][1] < 3 * 3.5 * limit:
            break
        assert max(map(sent, progress)) < UPLOAD and now < deadline, (
            f"{label}: the writers were never blocked: {done / 2**20:.0f} MiB sent, "
            f"tpconf up at {rss / 2**20:.0f} MiB (peak {peak / 2**20:.0f} MiB)"
        )
        time.sleep(0.2)
    blocked_at, start_sent = time.monotonic(), total()
    highest = 0
    while time.monotonic() - blocked_at < BLOCKED_FOR:
        rss, peak = memory(pid)
        highest = max(highest, rss)
        assert peak < PEAK_RSS_LIMIT, f"{label}: tpconf up peaked at {peak / 2**20:.0f} MiB"
        time.sleep(0.5)
    done = total()
    _, peak = memory(pid)
    print(  # the numbers for issue 11's closing note
        f"\n{label}: {len(progress)} writer(s) blocked for {BLOCKED_FOR:.0f} s at "
        f"{start_sent / 2**20:.0f} MiB sent, {(done - start_sent) / BLOCKED_FOR / 1e6:.2f} MB/s "
        f"meanwhile; tpconf up RSS at most {highest / 2**20:.1f} MiB in that time, "
        f"peak (VmHWM) {peak / 2**20:.1f} MiB",
        file=sys.stderr,
    )
    assert peak < PEAK_RSS_LIMIT
    # Still blocked at the end: what passed meanwhile is what the readers took, no more.
    assert done - start_sent < 3 * BLOCKED_FOR * limit, (done, start_sent)
    assert max(map(sent, progress)) < UPLOAD


def upload_project(
    cluster: E2ECluster, ns: str, project: Path, method: str, run: str | None = None
) -> Path:
    """The slow reader in the cluster; the writer script and a telepresence.yaml with one
    deployment ``upload`` in ``project``. Returns the writer script."""
    slow_reader(cluster, ns)
    writer = project / "writer.py"
    writer.write_text(WRITER)
    config = (
        f"version: 1\nnamespace: {ns}\ndefaults:\n  method: {method}\n  volumes: false\n"
        "deployments:\n  upload:\n    new: true\n"
    )
    write_config(project, config + (f"    run: {run}\n" if run else ""))
    return writer


def test_inject_tcp_upload_to_a_slow_reader_keeps_tpconf_memory_bounded(
    cluster: E2ECluster, namespace: str, tmp_path: Path
) -> None:
    run = "python3 writer.py sink torsocks.txt & python3 writer.py --socks sink socks.txt & wait"
    upload_project(cluster, namespace, tmp_path, "inject-tcp", run)
    up = Up(cluster, tmp_path).start()
    try:
        up.wait_for(r"upload ready")
        assert up.process is not None
        progress = [tmp_path / "torsocks.txt", tmp_path / "socks.txt"]
        hold_blocked_writers(up.process.pid, progress, "inject-tcp")
    finally:
        assert up.stop() == 0, up.output[-3000:]


@pytest.mark.root
def test_vpn_tcp_upload_to_a_slow_reader_keeps_tpconf_memory_bounded(
    cluster: E2ECluster,
    namespace: str,
    tmp_path: Path,
    laptop: Laptop,
) -> None:
    writer_file = upload_project(cluster, namespace, tmp_path, "vpn-tcp")
    up = NetnsUp(cluster, tmp_path, laptop).start()
    writer: subprocess.Popen[bytes] | None = None
    try:
        up.wait_for(r"^upload ready")
        assert up.process is not None
        argv = [sys.executable, str(writer_file), f"sink.{namespace}", str(tmp_path / "sent.txt")]
        with (tmp_path / "writer.log").open("wb") as log:
            writer = subprocess.Popen(
                ["ip", "netns", "exec", laptop.netns, *argv], stdout=log, stderr=log
            )
        hold_blocked_writers(up.process.pid, [tmp_path / "sent.txt"], "vpn-tcp")
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        assert up.stop() == 0, up.output[-3000:]
