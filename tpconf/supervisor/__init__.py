"""tpconf.supervisor: the local side of a deployment: its environment and its process.

- :mod:`.env`: compose the process environment; write ``env.export`` files (dotenv, JSON).
- :mod:`.process`: run a command supervised (own process group, prefixed output, stop ladder).
- :mod:`.shell`: ``shell: true``, an interactive shell on the terminal.
- :mod:`.output`: where process output goes (``name | line``).
- :mod:`.torsocks`: torsocks around a process (inject-tcp), pointed at a SOCKS server.
"""

from __future__ import annotations

from tpconf.supervisor.env import (
    ExportFormat,
    pod_environment,
    process_environment,
    telepresence_variables,
    to_dotenv,
    to_json,
    withheld_variables,
    write_export,
)
from tpconf.supervisor.output import CaptureSink, ConsoleSink, OutputSink
from tpconf.supervisor.process import ProcessExit, ProcessSpec, hurry, run_process
from tpconf.supervisor.shell import run_shell
from tpconf.supervisor.torsocks import TorsocksWrapper, find_torsocks, torsocks_wrapper

__all__ = [
    "CaptureSink",
    "ConsoleSink",
    "ExportFormat",
    "OutputSink",
    "ProcessExit",
    "ProcessSpec",
    "TorsocksWrapper",
    "find_torsocks",
    "hurry",
    "pod_environment",
    "process_environment",
    "run_process",
    "run_shell",
    "telepresence_variables",
    "to_dotenv",
    "to_json",
    "torsocks_wrapper",
    "withheld_variables",
    "write_export",
]
