"""A prober: every 0.25 s a new TCP connection to HOST:PORT (an echo server), and one connection
kept open and pinged as often; each outcome a JSON line in LOG with the wall-clock time.

Run as a deployment's process (inject-tcp) or inside the laptop namespace (vpn-tcp). The fault
tests read the log to measure when connections work again, and whether a kept connection broke.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = open(path, "a", buffering=1)  # noqa: SIM115 - the log lives as long as the process
lock = threading.Lock()


def record(kind: str, ok: bool, error: str = "") -> None:
    with lock:
        log.write(json.dumps({"t": time.time(), "kind": kind, "ok": ok, "error": error}) + "\n")


def ping(conn: socket.socket) -> None:
    conn.sendall(b"ping\n")
    got = b""
    while not got.endswith(b"\n"):
        data = conn.recv(64)
        if not data:
            raise ConnectionError("closed")
        got += data
    if got != b"ping\n":
        raise ConnectionError(f"got {got!r}")


def new_connections() -> None:
    while True:
        try:
            with socket.create_connection((host, port), timeout=3) as conn:
                conn.settimeout(3)
                ping(conn)
            record("new", True)
        except OSError as exc:
            record("new", False, repr(exc))
        time.sleep(0.25)


def kept_connection() -> None:
    while True:
        try:
            with socket.create_connection((host, port), timeout=3) as conn:
                conn.settimeout(5)
                record("opened", True)
                while True:
                    ping(conn)
                    record("live", True)
                    time.sleep(0.25)
        except OSError as exc:
            record("live", False, repr(exc))
            time.sleep(0.25)


threading.Thread(target=new_connections, daemon=True).start()
kept_connection()
