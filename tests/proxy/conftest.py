"""Fixtures of the proxy tests: a fake pod nameserver on loopback and a resolver that uses it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from tests.proxy.fakes import POD_NAMESERVER, POD_SEARCH, FakeClock, FakeNameserver, MapDialer
from tpconf.proxy.resolver import ClusterResolver


@pytest.fixture
async def nameserver() -> AsyncIterator[FakeNameserver]:
    server = FakeNameserver()
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve_tcp)
        yield server
        tg.cancel_scope.cancel()


@pytest.fixture
def dialer(nameserver: FakeNameserver) -> MapDialer:
    return MapDialer(routes={(POD_NAMESERVER, 53): ("127.0.0.1", nameserver.port)})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def resolver(dialer: MapDialer, clock: FakeClock) -> AsyncIterator[ClusterResolver]:
    async with ClusterResolver(
        dialer, [POD_NAMESERVER], POD_SEARCH, ndots=5, timeout=1.0, clock=clock
    ) as resolver:
        yield resolver
