"""torsocks around a local process (inject-tcp): its config, pointed at a SOCKS server of ours.

torsocks's library (``LD_PRELOAD``) turns the process's TCP connections into SOCKS CONNECTs and
its name lookups into Tor RESOLVE requests to ``TorAddress:TorPort``: the SOCKS server of
``tpconf.proxy`` on 127.0.0.1, which sends them through the deployment's pod. The generated
configuration also sets:

- ``AllowInbound 1``: the process may ``listen()`` and ``accept()``, which ``expose`` needs
  (torsocks refuses both by default);
- ``AllowOutboundLocalhost 1``: connections to 127.0.0.1 stay local instead of being refused.

The library is preloaded directly (``LD_PRELOAD``, the path read from the ``torsocks`` script's
own settings), not by running the script: the script takes ``sh``, ``show``, ``on`` and ``off``
as its own sub-commands, so ``run: [sh, -c, ...]`` printed ``LD_PRELOAD=""`` and exited 0
without running anything. A local ``LD_PRELOAD`` is kept after torsocks's. torsocks's own log is
off (``TORSOCKS_LOG_LEVEL=1``; set it in tpconf's environment to see it, 5 is debug): its ERROR
lines reached the program's terminal, and the SOCKS server logs failures on tpconf's side.

Only the wrapped process tree is affected, so several deployments with inject-tcp can run side
by side. torsocks cannot wrap Go or static programs, and the loader ignores ``LD_PRELOAD`` for
setuid, setgid and file-capability programs (the script refused to start those; now their
connections leave directly, not through the pod): vpn-tcp covers them. ``getnameinfo`` is not
one of the calls torsocks answers, so it cannot name cluster addresses (``gethostbyaddr`` can).
"""

from __future__ import annotations

import os
import re
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
    "find_torsocks_library",
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
    """Put in front of the command: nothing, the library is preloaded through :attr:`env`."""

    env: Mapping[str, str] = field(hash=False)
    """Add to the process environment: ``LD_PRELOAD``, ``TORSOCKS_CONF_FILE``,
    ``TORSOCKS_LOG_LEVEL``."""

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


#: The settings of the torsocks script that make the library's path, in the order it sets them.
_SCRIPT_SETTING = re.compile(
    r"^(prefix|exec_prefix|libdir|LIBDIR|LIB_NAME|SHLIB_EXT|SHLIB)=\"?([^\"\n]*)\"?[ \t]*$",
    re.MULTILINE,
)


def find_torsocks_library(torsocks: str) -> str:
    """The library the ``torsocks`` script at ``torsocks`` preloads (its ``SHLIB`` setting).

    Raises :class:`~tpconf.errors.ProcessError` when the script names none, or a missing file.
    """
    try:
        text = Path(torsocks).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ProcessError(
            f"cannot read {torsocks}: {exc.strerror or exc}", hint=_INSTALL_HINT
        ) from exc
    settings: dict[str, str] = {}
    for match in _SCRIPT_SETTING.finditer(text):
        name, value = match.groups()
        settings.setdefault(name, re.sub(r"\$\{(\w+)\}", lambda m: settings.get(m[1], ""), value))
    library = settings.get("SHLIB", "")
    if not os.path.isabs(library) or not os.path.isfile(library):
        raise ProcessError(
            f"{torsocks} does not name its library (libtorsocks), or it is missing"
            + (f": {library}" if library else ""),
            hint=_INSTALL_HINT,
        )
    return library


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

    ``torsocks`` is the script whose library to preload; it is looked up on ``$PATH`` when
    ``None``. A local ``LD_PRELOAD`` (tpconf's environment) is kept after torsocks's library.
    """
    library = find_torsocks_library(torsocks or find_torsocks())
    config = Path(directory, "torsocks.conf")
    config.write_text(torsocks_config(socks_port, address=address), encoding="utf-8")
    config.chmod(0o600)
    preload = ":".join(p for p in (library, os.environ.get("LD_PRELOAD", "")) if p)
    env = {
        "LD_PRELOAD": preload,
        "TORSOCKS_CONF_FILE": str(config),
        "TORSOCKS_LOG_LEVEL": os.environ.get("TORSOCKS_LOG_LEVEL", "1"),
    }
    return TorsocksWrapper(argv=(), env=env, config_file=config)


@contextmanager
def torsocks_wrapper(
    socks_port: int, *, address: str = "127.0.0.1", torsocks: str | None = None
) -> Iterator[TorsocksWrapper]:
    """:func:`prepare_torsocks` in a private temporary directory (0700), removed on exit.

    Checks for torsocks before creating anything, so a missing package fails first.
    """
    executable = torsocks or find_torsocks()
    find_torsocks_library(executable)
    with tempfile.TemporaryDirectory(prefix="tpconf-torsocks-") as directory:
        os.chmod(directory, 0o700)
        yield prepare_torsocks(socks_port, directory, address=address, torsocks=executable)
