"""torsocks around a local process (inject-tcp): its config, pointed at a SOCKS server of ours.

torsocks (``LD_PRELOAD``) turns the process's TCP connections into SOCKS CONNECTs and its name
lookups into Tor RESOLVE requests to ``TorAddress:TorPort``: the SOCKS server of
``tpconf.proxy`` on 127.0.0.1, which sends them through the deployment's pod. The generated
configuration also sets:

- ``AllowInbound 1``: the process may ``listen()`` and ``accept()``, which ``expose`` needs
  (torsocks refuses both by default);
- ``AllowOutboundLocalhost 1``: connections to 127.0.0.1 stay local instead of being refused.

Only the wrapped process tree is affected, so several deployments with inject-tcp can run side
by side. torsocks cannot wrap Go, static or setuid programs (see ``docs``; vpn-tcp covers them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tpconf.errors import ProcessError

__all__ = [
    "TorsocksWrapper",
    "find_torsocks",
    "prepare_torsocks",
    "torsocks_config",
    "torsocks_wrapper",
]

_INSTALL_HINT = (
    "install the Debian/Ubuntu package `torsocks` (sudo apt install torsocks), "
    "or use `method: vpn-tcp`"
)


@dataclass(frozen=True)
class TorsocksWrapper:
    """What inject-tcp adds to a process: an argv prefix and environment variables."""

    argv: tuple[str, ...]
    """Put in front of the command, e.g. ``("/usr/bin/torsocks",)``."""

    env: Mapping[str, str] = field(hash=False)
    """Add to the process environment: ``TORSOCKS_CONF_FILE``."""

    config_file: Path
    """The generated torsocks configuration."""


def find_torsocks(path: str | None = None) -> str:
    """The absolute path of ``torsocks`` on ``path`` (``$PATH`` by default).

    Raises :class:`~tpconf.errors.ProcessError` with the package to install when it is missing.
    """
    found = shutil.which("torsocks", path=path)
    if found is None:
        raise ProcessError(
            "torsocks is not installed, and method inject-tcp runs the process under it",
            hint=_INSTALL_HINT,
        )
    return os.path.abspath(found)


def torsocks_config(socks_port: int, *, address: str = "127.0.0.1") -> str:
    """The torsocks configuration for a SOCKS server at ``address:socks_port``."""
    if not 0 < socks_port < 65536:
        raise ValueError(f"invalid SOCKS port {socks_port}")
    return (
        "# Written by tpconf for method inject-tcp.\n"
        f"TorAddress {address}\n"
        f"TorPort {socks_port}\n"
        "AllowInbound 1\n"
        "AllowOutboundLocalhost 1\n"
    )


def prepare_torsocks(
    socks_port: int,
    directory: str | os.PathLike[str],
    *,
    address: str = "127.0.0.1",
    torsocks: str | None = None,
) -> TorsocksWrapper:
    """Write ``torsocks.conf`` into ``directory`` (which the caller keeps private and removes).

    ``torsocks`` is the executable to use; it is looked up on ``$PATH`` when ``None``.
    """
    executable = torsocks or find_torsocks()
    config = Path(directory, "torsocks.conf")
    config.write_text(torsocks_config(socks_port, address=address), encoding="utf-8")
    config.chmod(0o600)
    return TorsocksWrapper(
        argv=(executable,), env={"TORSOCKS_CONF_FILE": str(config)}, config_file=config
    )


@contextmanager
def torsocks_wrapper(
    socks_port: int, *, address: str = "127.0.0.1", torsocks: str | None = None
) -> Iterator[TorsocksWrapper]:
    """:func:`prepare_torsocks` in a private temporary directory (0700), removed on exit.

    Checks for torsocks before creating anything, so a missing package fails first.
    """
    executable = torsocks or find_torsocks()
    with tempfile.TemporaryDirectory(prefix="tpconf-torsocks-") as directory:
        os.chmod(directory, 0o700)
        yield prepare_torsocks(socks_port, directory, address=address, torsocks=executable)
