"""One SSH channel as an anyio :class:`~anyio.abc.ByteStream`.

asyncssh calls the session callbacks (``data_received``, ``eof_received``, ``pause_writing``…) on
the event loop; :class:`ChannelStream` buffers what arrives and hands it out in reads of up to
``max_bytes`` (64 KiB by default), joining the SSH packets (32 KiB at most) that are waiting.

Flow control both ways (:class:`~tpconf.net.BoundedStream`, shared with local sockets): when more than ``read_limit`` bytes wait unread, the channel stops reading, so the
SSH window is not re-opened and the far end slows down; :meth:`send` returns only once
asyncssh's send buffer is below its high-water mark (64 KiB). So a channel holds at most
``read_limit`` plus its window of received bytes (12 MiB with the defaults, for a download to a
local reader that lags) and one ``send()`` plus 64 KiB of bytes to send (an upload waits for
the agent's window).

TCP half-close: the remote EOF keeps the channel open for sending (``eof_received`` returns
``True``), and :meth:`send_eof` sends EOF while replies can still arrive.
"""

from __future__ import annotations

from typing import Any

import asyncssh
from asyncssh.channel import SSHChannel

from tpconf.net import BoundedStream
from tpconf.tunnel.settings import DEFAULT_READ_LIMIT


class ChannelStream(BoundedStream):
    """A byte stream over one SSH channel; the session object asyncssh calls back."""

    def __init__(self, *, read_limit: int = DEFAULT_READ_LIMIT) -> None:
        super().__init__(read_limit=read_limit)
        self._chan: SSHChannel[bytes] | None = None

    # ---- asyncssh session callbacks -------------------------------------------------------

    def connection_made(self, chan: Any) -> None:
        self._chan = chan
        self._connected(chan)

    def session_started(self) -> None:
        pass

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype is not None:  # stderr of a subsystem session: not part of the stream
            return
        self._buffer.feed(data)

    def eof_received(self) -> bool:
        self._buffer.feed_eof()
        return True  # keep the channel open for our side: TCP half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(exc)

    def pause_writing(self) -> None:
        self._gate.pause()

    def resume_writing(self) -> None:
        self._gate.resume()

    def _shut(self) -> None:
        if self._chan is not None and not self._lost:
            self._chan.close()  # sends what is buffered, then CHANNEL_CLOSE


class TCPChannelStream(ChannelStream, asyncssh.SSHTCPSession[bytes]):
    """A ``direct-tcpip`` channel: an outbound TCP connection made by the agent."""


class UnixChannelStream(ChannelStream, asyncssh.SSHUNIXSession[bytes]):
    """A ``direct-streamlocal`` channel: a connection the agent makes to a Unix socket."""


class SubsystemStream(ChannelStream, asyncssh.SSHClientSession[bytes]):
    """A session channel running a subsystem (``sftp``): its stdin and stdout as one stream.

    Its stderr is dropped; the exit status is not reported (sftp-server exits when the stream
    closes).
    """
