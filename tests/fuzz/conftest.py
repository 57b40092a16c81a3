"""Fuzzing, time-bounded: hypothesis drives hostile input into tpconf's parsers and servers.

Every test here states what must hold for *any* input (no exception but the documented ones, a
reply or a clean close, the server still serving) and runs a bounded number of examples:
``TPCONF_FUZZ_EXAMPLES`` (default 150 per test; CI's whole fuzz suite stays within a few
minutes) under a pytest timeout. Servers run in a background event loop (``portal``) that all
examples of a module share, as a long-running ``tpconf up`` would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings

#: The settings of every fuzz test: a bounded number of examples, no per-example deadline (the
#: servers' own timeouts bound each one), fixtures shared across examples on purpose.
FUZZ = settings(
    max_examples=int(os.environ.get("TPCONF_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    """An asyncio event loop in a thread, for the module's servers."""
    with start_blocking_portal(backend="asyncio") as portal:
        yield portal
