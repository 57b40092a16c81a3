"""tpconf.supervisor: the local side of a deployment: its environment and its process.

- :mod:`.env`: compose the process environment; write ``env.export`` files (dotenv, JSON).
- :mod:`.process`: run a command supervised (own process group, prefixed output, stop ladder).
- :mod:`.shell`: ``shell: true``, an interactive shell on the terminal.
- :mod:`.output`: where process output goes (``name | line``).
- :mod:`.torsocks`: torsocks around a process (inject-tcp), pointed at a SOCKS server.

Only :mod:`.env` and :mod:`.output` are re-exported here: the others import asyncio, which
commands that never start a process (``validate``, ``config``, shell completion) should not pay
for (about 80 ms of ``validate``'s CPU on the bench's box). Import them from their modules.
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

__all__ = [
    "CaptureSink",
    "ConsoleSink",
    "ExportFormat",
    "OutputSink",
    "pod_environment",
    "process_environment",
    "telepresence_variables",
    "to_dotenv",
    "to_json",
    "withheld_variables",
    "write_export",
]
