"""Following edits of telepresence.yaml, its override file and ``.env`` (the only importer of
watchfiles).

Editors save atomically (write a temp file, rename it over the original), which a watch on the
file itself loses after the first save; so the *directories* are watched and events are filtered
to the files' paths (a file that does not exist yet counts once it is created). The debounce is short because a reload must restart a process within 500 ms of
the save (DESIGN.md section 5); a burst of events within it still yields once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
from watchfiles import Change, awatch

#: Milliseconds of quiet before a burst of events counts as one save.
DEBOUNCE_MS = 40
#: How often the watcher checks for events, in milliseconds.
STEP_MS = 10


async def config_changes(
    paths: Path | Sequence[Path], *, stop: anyio.Event | None = None
) -> AsyncIterator[None]:
    """Yield once per save (or delete/create) of any of ``paths``."""
    wanted = [paths] if isinstance(paths, Path) else list(paths)
    # The directory is resolved, not the file: a missing file has nothing to resolve yet.
    targets = {Path(await anyio.Path(p.parent).resolve()) / p.name for p in wanted}
    directories = sorted({t.parent for t in targets})

    def ours(_change: Change, changed: str) -> bool:
        return Path(changed) in targets

    async for _ in awatch(
        *directories,
        watch_filter=ours,
        debounce=DEBOUNCE_MS,
        step=STEP_MS,
        recursive=False,
        stop_event=stop,
    ):
        yield
