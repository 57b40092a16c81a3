"""Supervision: reconnection with back-off, state changes, waiting dials, restored forwards."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anyio
import pytest

from tpconf.errors import HostKeyMismatch, TunnelDown
from tpconf.net import Dialer
from tpconf.tunnel import (
    Endpoint,
    ProxyKeys,
    TunnelEvent,
    TunnelSettings,
    TunnelState,
    run_tunnel,
)
from tpconf.tunnel.session import Transport

from .peers import AgentServer, agent_server, tcp_server

pytestmark = pytest.mark.anyio

FAST = TunnelSettings(
    backoff_initial=0.05,
    backoff_max=0.2,
    first_connect_timeout=2,
    dial_wait=5,
    keepalive_interval=1,
)


def _transport(agent: AgentServer) -> Transport:
    @asynccontextmanager
    async def transport() -> AsyncIterator[Endpoint]:
        yield ("127.0.0.1", agent.port)

    return transport


async def _echo_once(dialer: Dialer, port: int) -> bytes:
    stream = await dialer.dial("127.0.0.1", port)
    async with stream:
        await stream.send(b"ping")
        return bytes(await stream.receive())


async def test_the_supervised_tunnel_reconnects_after_the_server_restarts(
    keys: ProxyKeys,
) -> None:
    events: list[TunnelEvent] = []
    dropped = anyio.Event()

    def on_state(event: TunnelEvent) -> None:
        events.append(event)
        if event.state is TunnelState.RECONNECTING:
            dropped.set()

    async with (
        agent_server(keys) as agent,
        tcp_server("echo") as echo_port,
        tcp_server("reply-after-eof") as local_port,
        anyio.create_task_group() as tg,
    ):
        tunnel = await tg.start(
            partial(run_tunnel, settings=FAST, on_state=on_state),
            _transport(agent),
            keys.credentials("u"),
        )
        assert await _echo_once(tunnel, echo_port) == b"ping"
        forward = await tunnel.forward_remote(0, local_port, bind_host="127.0.0.1")
        first_forward_port = forward.port

        await agent.kill()
        with anyio.fail_after(5):
            await dropped.wait()
        async with anyio.create_task_group() as dials:  # dial during the outage waits
            results: list[bytes] = []

            async def dial_now() -> None:
                results.append(await _echo_once(tunnel, echo_port))

            dials.start_soon(dial_now)
            await anyio.sleep(0.3)
            await agent.start()  # same port, as a new kubectl port-forward would give
        assert results == [b"ping"]

        states = [event.state for event in events]
        assert states[:2] == [TunnelState.CONNECTING, TunnelState.CONNECTED]
        assert TunnelState.RECONNECTING in states and states[-1] is TunnelState.CONNECTED
        reconnecting = next(e for e in events if e.state is TunnelState.RECONNECTING)
        assert reconnecting.reason  # says why

        # the remote forward came back on the new connection
        assert forward.current is not None and forward.error is None
        with anyio.fail_after(5):
            async with await anyio.connect_tcp("127.0.0.1", forward.port) as client:
                await client.send(b"again")
                await client.send_eof()
                assert b"".join([c async for c in client]) == b"got AGAIN"
        assert first_forward_port > 0
        forward.close()
        tg.cancel_scope.cancel()


async def test_a_host_key_mismatch_fails_at_start_and_is_not_retried(
    keys: ProxyKeys, other_keys: ProxyKeys
) -> None:
    events: list[TunnelEvent] = []
    async with (
        agent_server(keys, host_private_key=other_keys.host_private_key) as agent,
        anyio.create_task_group() as tg,
    ):
        with pytest.raises(HostKeyMismatch):
            await tg.start(
                partial(run_tunnel, settings=FAST, on_state=events.append),
                _transport(agent),
                keys.credentials("u"),
            )
    assert [e.state for e in events] == [TunnelState.CONNECTING, TunnelState.FAILED]


async def test_no_agent_at_all_fails_after_the_first_connect_timeout(keys: ProxyKeys) -> None:
    agent = AgentServer(keys)
    await agent.start()
    await agent.kill()  # a port nobody listens on
    events: list[TunnelEvent] = []
    settings = TunnelSettings(backoff_initial=0.05, backoff_max=0.1, first_connect_timeout=0.5)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(5), pytest.raises(TunnelDown, match="within 0.5 s"):
            await tg.start(
                partial(run_tunnel, settings=settings, on_state=events.append),
                _transport(agent),
                keys.credentials("u"),
            )
    states = [e.state for e in events]
    assert states[0] is TunnelState.CONNECTING and states[-1] is TunnelState.FAILED
    assert TunnelState.RECONNECTING in states


async def test_dial_gives_up_after_dial_wait_while_the_agent_is_gone(keys: ProxyKeys) -> None:
    settings = TunnelSettings(backoff_initial=0.05, backoff_max=0.1, dial_wait=0.3)
    async with agent_server(keys) as agent, anyio.create_task_group() as tg:
        tunnel = await tg.start(
            partial(run_tunnel, settings=settings), _transport(agent), keys.credentials("u")
        )
        await agent.kill()
        with anyio.fail_after(5), pytest.raises(TunnelDown, match="did not come back"):
            await tunnel.dial("127.0.0.1", 9)
        tg.cancel_scope.cancel()
