"""Following edits of telepresence.yaml (the only importer of watchfiles).

Editors save atomically (write a temp file, rename it over the original), which a watch on the
file itself loses after the first save; so the *directory* is watched and events are filtered to
the file's name. The debounce is short because a reload must restart a process within 500 ms of
the save (DESIGN.md section 5); a burst of events within it still yields once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from watchfiles import Change, awatch

#: Milliseconds of quiet before a burst of events counts as one save.
DEBOUNCE_MS = 40
#: How often the watcher checks for events, in milliseconds.
STEP_MS = 10


async def config_changes(path: Path, *, stop: anyio.Event | None = None) -> AsyncIterator[None]:
    """Yield once per save (or delete/create) of ``path``."""
    target = Path(await anyio.Path(path).resolve())

    def ours(_change: Change, changed: str) -> bool:
        return Path(changed).name == target.name

    async for _ in awatch(
        target.parent,
        watch_filter=ours,
        debounce=DEBOUNCE_MS,
        step=STEP_MS,
        recursive=False,
        stop_event=stop,
    ):
        yield
