"""The cyclic garbage collector's settings for a process that serves connections (``tpconf up``).

CPython starts a young-generation collection every 700 net allocations of container objects,
and each one walks every young object still alive. A connection being served keeps a few dozen
alive (its task, coroutines, cancel scopes, transport, buffers), so under a burst the collector
walks the same live objects over and over. Measured on the SOCKS server alone, 1,000
connections opened at once, three bursts (``bench/RESULTS.md``, "Per-connection CPU and the
1,000-connection row"), where a connection cost about 2 ms of CPU in all:

=====================  ==========================  ====================
young threshold        collections (young/mid/old) collector time/conn
=====================  ==========================  ====================
700 (CPython default)  ~665 / 60 / 5               0.38-0.45 ms
2,000                  220 / 20 / 1                0.28 ms
10,000 (ours)          43 / 3 / 0                  0.18 ms
50,000                 7 / 0 / 0                   0.12 ms
=====================  ==========================  ====================

10,000 keeps each pause near 12 ms at that load (50,000: 50 ms, long enough for a client to
notice). Memory did not move: `tpconf up` peaks at 91 / 136 MB with 1 / 10 deployments as before,
and 10,000 connections in a row leave its RSS where it was.

:func:`tune_for_serving` also freezes what exists when it is called (the modules, the validated
configuration): it is never garbage, and the oldest generation's collections stop walking it.
"""

from __future__ import annotations

import gc

#: Net allocations of container objects between two young-generation collections (see above).
YOUNG_THRESHOLD = 10_000


def tune_for_serving() -> None:
    """Freeze the objects alive now and raise the young generation's threshold; the older
    generations keep theirs. Call once, after start-up's imports, before serving."""
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
