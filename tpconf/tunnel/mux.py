"""The fast data path: ``dial()`` as channels of one port-forward stream to the agent's relay.

Through SSH every byte is encrypted and framed in Python, then again by the agent's sshd, in
32 KiB packets: on the bench's two cores that was 4.7 CPU-s per 100 MB against 1.1 for a bare
``kubectl port-forward`` (bench/RESULTS.md). The port-forward stream is already authenticated
and encrypted by the API server and the kubelet (Telepresence 2 relies on the same), so the
relay (``tpconf/agent/relay.py``) carries the bytes in plain frames of up to 1 MiB instead:

``type:u8 channel:u32 length:u32 payload`` (big-endian), with the types ``OPEN`` (window:u32
port:u16 host), ``OPEN_SUBSYSTEM`` (window:u32 name: ``sftp`` runs ``sftp-server`` on the
channel, for the volumes), ``OPEN_OK`` (window:u32), ``OPEN_FAIL`` (kind:u8 code:i16 text), ``DATA``,
``EOF``, ``CLOSE`` (abort:u8) and ``WINDOW`` (increment:u32).

Security: the relay is started per SSH connection (an exec session, so only this session's
client key can start one), gets a fresh 32-byte key on its stdin, listens on 127.0.0.1 only,
accepts a single connection and drops the listener, and both ends prove the key before any
frame (HMAC-SHA256 over the relay's nonce, each way). Nothing listens on the pod IP.

Flow control: each channel announces a receive window (``TunnelSettings.relay_window``) and
re-opens it as its reader consumes, so neither end holds more than a window per channel and
neither ever stops reading the stream (a stream that is not read stalls all others: see
:mod:`tpconf.tunnel.spdy`). TCP half-close travels as ``EOF``.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import os
import socket
import struct

import anyio
import anyio.lowlevel

from tpconf.errors import TunnelDown
from tpconf.net import BoundedStream, WriteGate

log = logging.getLogger(__name__)

MAGIC = b"TPRELAY1"
NONCE = 32
CLIENT_LABEL = b"tpconf-relay client"
SERVER_LABEL = b"tpconf-relay server"
OPEN, OPEN_OK, OPEN_FAIL, DATA, EOF, CLOSE, WINDOW, OPEN_SUBSYSTEM = 1, 2, 3, 4, 5, 6, 7, 8
HEADER = struct.Struct(">BII")
#: Bytes a channel may send before the relay has connected it (``dial(early=True)``); the relay
#: keeps them until then. One relay chunk: a client's first request fits.
EARLY_WINDOW = 256 * 1024
#: Largest frame payload (the relay refuses larger ones).
MAX_FRAME = 1024 * 1024
FAIL_GAIERROR = 1


def mac(key: bytes, label: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, label + nonce, hashlib.sha256).digest()


def new_key() -> bytes:
    """A fresh relay key (32 random bytes)."""
    return os.urandom(32)


class _Writer:
    """What :class:`MuxChannel`'s ``send`` writes to: frames within the peer's window.

    Bytes beyond the window wait here (one ``send()`` at most: the gate holds the sender until
    they are out), so the peer never receives more than it announced.
    """

    def __init__(self, channel: MuxChannel) -> None:
        self._channel = channel

    def write(self, data: bytes) -> None:
        ch = self._channel
        ch._pending.append(bytes(data))
        ch._pending_size += len(data)
        ch._flush()

    def write_eof(self) -> None:
        ch = self._channel
        ch._eof_pending = True
        ch._flush()

    def is_closing(self) -> bool:
        return self._channel._lost or self._channel._mux.closed

    def pause_reading(self) -> None:
        """Nothing to pause: the peer sends only within the window."""

    def resume_reading(self) -> None:
        pass


class MuxChannel(BoundedStream):
    """One ``dial()``: a byte stream to a TCP connection the relay made from the pod."""

    def __init__(self, mux: MuxSession, channel: int, *, window: int) -> None:
        super().__init__(read_limit=window)
        self._mux = mux
        self.id = channel
        self._window = window
        self._consumed = 0  # read since the last WINDOW we sent
        self._send_window = 0
        self._sent = 0  # DATA bytes sent (before OPEN_OK, they count against its window)
        self.open_error: BaseException | None = None
        """Why the relay could not connect, for a channel used before it knew (``early``)."""
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._eof_pending = False
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._connected(_Writer(self))

    # ---- reading ---------------------------------------------------------------------------

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._buffer.receive(max_bytes)
        self._consumed += len(data)
        if self._consumed >= self._window // 4 and not self._lost:
            self._mux._send(WINDOW, self.id, struct.pack(">I", self._consumed))
            self._consumed = 0
        return data

    # ---- writing ---------------------------------------------------------------------------

    def _flush(self) -> None:
        mux = self._mux
        while self._pending and self._send_window > 0 and not self._lost:
            chunk = self._pending[0]
            take = min(len(chunk), self._send_window, MAX_FRAME)
            if take == len(chunk):
                self._pending.pop(0)
            else:
                self._pending[0] = chunk[take:]
                chunk = chunk[:take]
            self._pending_size -= take
            self._send_window -= take
            self._sent += take
            mux._send(DATA, self.id, chunk)
        if self._eof_pending and not self._pending and not self._lost:
            self._eof_pending = False
            mux._send(EOF, self.id)
        self._update_gate()

    def _update_gate(self) -> None:
        if self._pending or self._mux.writing_paused:
            self._gate.pause()
        else:
            self._gate.resume()

    def _shut(self) -> None:
        if self._lost:
            return
        abort = bool(self._pending) or not self._opened.done()
        self._mux._send(CLOSE, self.id, b"\x01" if abort else b"\x00")
        self._mux._forget(self.id)
        self._lose(None)

    # ---- from the session --------------------------------------------------------------------

    def _open_ok(self, window: int) -> None:
        self._send_window = window - self._sent  # what was sent early is in the relay's window
        if not self._opened.done():
            self._opened.set_result(None)
        self._flush()

    def _open_fail(self, exc: Exception) -> None:
        self.open_error = exc
        if not self._opened.done():
            self._opened.set_exception(exc)
            self._opened.exception()  # retrieved: an early channel may never await it
        self._lose(exc)

    def _window_increment(self, increment: int) -> None:
        self._send_window += increment
        self._flush()

    def _lost_by_peer(self, abort: bool) -> None:
        self._lose(ConnectionResetError(errno.ECONNRESET, "reset in the pod") if abort else None)


class MuxSession(asyncio.Protocol):
    """The client end of the relay's connection (an ``asyncio.Protocol`` over a port-forward
    stream). :meth:`handshake`, then :meth:`dial` per outbound connection."""

    def __init__(self, key: bytes, *, window: int, where: str) -> None:
        self._key = key
        self.window = window
        self.where = where
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[str] = loop.create_future()
        self._hello = b""
        self._state = "nonce"
        self._nonce = b""
        self._channels: dict[int, MuxChannel] = {}
        self._next = 1
        self.closed = False
        self.writing_paused = False
        self.gate = WriteGate()
        self._head = b""
        self._kind = self._chan = self._remaining = 0
        self._payload = bytearray()
        self.owned: list[object] = []
        """What lives as long as the session (the relay's exec session, its watcher)."""

    # ---- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    #: The port-forward stream may hand over memoryviews of what it received (no copy).
    takes_views = True

    def data_received(self, data: bytes | memoryview) -> None:
        if self._state != "open":
            data = self._handshake_data(data)
            if not data:
                return
        pos, size = 0, len(data)
        view = memoryview(data)
        while pos < size:
            if self._remaining:
                take = min(self._remaining, size - pos)
                chunk = data if take == size else view[pos : pos + take]  # no copy
                pos += take
                self._remaining -= take
                if self._kind == DATA:
                    channel = self._channels.get(self._chan)
                    if channel is not None and not channel._lost:
                        channel._buffer.feed(chunk)
                else:
                    self._payload += chunk
                    if not self._remaining:
                        self._frame(self._kind, self._chan, bytes(self._payload))
                continue
            need = HEADER.size - len(self._head)
            self._head += data[pos : pos + need]
            pos += min(need, size - pos)
            if len(self._head) < HEADER.size:
                continue
            self._kind, self._chan, self._remaining = HEADER.unpack(self._head)
            self._head = b""
            if self._remaining > MAX_FRAME:
                self._broken(f"a frame of {self._remaining} bytes from the relay")
                return
            self._payload = bytearray()
            if not self._remaining and self._kind != DATA:
                self._frame(self._kind, self._chan, b"")

    def eof_received(self) -> bool:
        return False  # the relay's end: close our side too (connection_lost follows)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        reason = f"the relay at {self.where} went away" + (f": {exc}" if exc else "")
        error = TunnelDown(reason)
        if not self._ready.done():
            self._ready.set_exception(error)
        for channel in list(self._channels.values()):
            if not channel._opened.done():
                channel._open_fail(error)
            else:
                channel._lose(error)
        self._channels.clear()
        self.gate.resume()
        if not self.lost.done():
            self.lost.set_result(reason)

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.gate.pause()
        for channel in self._channels.values():
            channel._update_gate()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.gate.resume()
        for channel in list(self._channels.values()):
            channel._update_gate()

    # ---- handshake -------------------------------------------------------------------------------

    def _handshake_data(self, data: bytes | memoryview) -> bytes:
        self._hello += bytes(data)
        if self._state == "nonce":
            if len(self._hello) < len(MAGIC) + NONCE:
                return b""
            magic, self._nonce = (
                self._hello[: len(MAGIC)],
                self._hello[len(MAGIC) : len(MAGIC) + NONCE],
            )
            self._hello = self._hello[len(MAGIC) + NONCE :]
            if magic != MAGIC:
                self._broken("this is not tpconf's relay")
                return b""
            assert self._transport is not None
            self._transport.write(mac(self._key, CLIENT_LABEL, self._nonce))
            self._state = "proof"
        if len(self._hello) < NONCE:
            return b""
        proof, rest = self._hello[:NONCE], self._hello[NONCE:]
        self._hello = b""
        if not hmac.compare_digest(proof, mac(self._key, SERVER_LABEL, self._nonce)):
            self._broken("the relay did not prove the session key")
            return b""
        self._state = "open"
        if not self._ready.done():
            self._ready.set_result(None)
        return rest

    async def handshake(self, timeout: float) -> None:
        """Wait until both ends have proven the key."""
        with anyio.fail_after(timeout):
            await self._ready

    def _broken(self, why: str) -> None:
        log.warning("relay at %s: %s; closing it", self.where, why)
        if not self._ready.done():
            self._ready.set_exception(TunnelDown(f"relay at {self.where}: {why}"))
        if self._transport is not None:
            self._transport.abort()

    # ---- frames ------------------------------------------------------------------------------

    def _frame(self, kind: int, chan: int, payload: bytes) -> None:
        channel = self._channels.get(chan)
        if channel is None:
            return  # closed on our side meanwhile
        if kind == WINDOW:
            (increment,) = struct.unpack(">I", payload)
            channel._window_increment(increment)
        elif kind == EOF:
            channel._buffer.feed_eof()
        elif kind == OPEN_OK:
            (window,) = struct.unpack(">I", payload)
            channel._open_ok(window)
        elif kind == OPEN_FAIL:
            self._channels.pop(chan, None)
            channel._open_fail(_open_error(payload))
        elif kind == CLOSE:
            self._channels.pop(chan, None)
            channel._lost_by_peer(payload[:1] == b"\x01")

    def _send(self, kind: int, chan: int, payload: bytes = b"") -> None:
        transport = self._transport
        if transport is None or self.closed:
            return
        head = HEADER.pack(kind, chan, len(payload))
        if len(payload) <= 65536:
            transport.write(head + payload)
        else:
            transport.writelines([head, payload])

    def _forget(self, chan: int) -> None:
        self._channels.pop(chan, None)

    # ---- dialing -----------------------------------------------------------------------------

    async def open_subsystem(self, name: str) -> MuxChannel:
        """A channel to a program in the pod (``sftp``: ``sftp-server``'s stdin and stdout)."""
        return await self._open(OPEN_SUBSYSTEM, struct.pack(">I", self.window) + name.encode())

    async def dial(self, host: str, port: int, *, early: bool = False) -> MuxChannel:
        """A TCP connection from the pod to ``host:port``; ``OSError`` when the pod's connect
        failed (``socket.gaierror`` for a name), :class:`TunnelDown` when the relay is gone.

        ``OPEN`` leaves before the first wait, so a cancelled dial is always told to the relay
        (which then closes the connection it made).

        ``early``: return at once, without waiting for the relay to connect: up to
        :data:`EARLY_WINDOW` bytes may be sent meanwhile (the relay keeps them until it is
        connected), which saves a round trip through the API server for a client whose connect
        has already succeeded (vpn-tcp's). A failed connect then shows as the channel breaking,
        with :attr:`MuxChannel.open_error` saying why."""
        payload = struct.pack(">IH", self.window, port) + host.encode()
        return await self._open(OPEN, payload, early=early)

    async def _open(self, kind: int, payload: bytes, *, early: bool = False) -> MuxChannel:
        if early:
            await anyio.lowlevel.checkpoint()  # the one wait: before anything is registered
        if self.closed:
            raise TunnelDown(f"the relay at {self.where} is gone")
        chan = self._next
        self._next += 1
        channel = MuxChannel(self, chan, window=self.window)
        self._channels[chan] = channel
        self._send(kind, chan, payload)
        if early:
            channel._send_window = EARLY_WINDOW
            return channel
        try:
            await channel._opened
        except BaseException:
            if chan in self._channels:  # cancelled: the relay drops it when it opens
                self._channels.pop(chan)
                self._send(CLOSE, chan, b"\x01")
            raise
        return channel

    @property
    def channel_count(self) -> int:
        """Channels open now (tests and the bench read it)."""
        return len(self._channels)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _open_error(payload: bytes) -> Exception:
    kind, code = struct.unpack(">Bh", payload[:3])
    text = payload[3:].decode(errors="replace")
    if kind == FAIL_GAIERROR:
        return socket.gaierror(code, f"{text} (resolved in the pod)")
    return OSError(code, f"from the pod: {text}")
