"""Kubernetes port-forward in this process: SPDY/3.1 streams over one connection to the API server.

``kubectl port-forward`` upgrades ``POST /api/v1/namespaces/NS/pods/NAME/portforward`` to
SPDY/3.1 (subprotocol ``portforward.k8s.io``) and opens, per local connection, a pair of streams
to the container runtime's forwarder: an *error* stream (the runtime writes why a forward
failed, e.g. "connection refused") and a *data* stream (the bytes to and from
``localhost:PORT`` in the pod's network namespace). The API server and the kubelet only copy the
upgraded bytes; the SPDY session runs between this process and the runtime (containerd's
``spdystream``).

:class:`SpdyConnection` is that session as an asyncio protocol: :func:`connect` sends the upgrade
request over the transport it is given (TLS to the API server, see :mod:`tpconf.tunnel.kubeapi`),
and :meth:`SpdyConnection.open_port` returns a :class:`SpdyStream` per forwarded connection.
A stream is an ``asyncio.Transport`` to the protocol it is given (asyncssh's, the relay
multiplexer's), so they run over it unchanged.

What the other end does not do, and why it shapes the users of this module:

- **no flow control**: spdystream ignores WINDOW_UPDATE and hands each data frame to the
  stream's reader through an unbuffered channel, five worker goroutines per connection. A
  stream whose reader stops blocks its worker and, 50 frames later, every stream of the
  connection. So nothing on a stream may stop reading for long: the SSH connection and the relay
  multiplexer each bound what they buffer with windows of their own, and this module never
  pauses the socket for one stream.
- **no half-close**: the runtime closes the pod-side socket one second after either direction
  ends (containerd's ``portForward``). A stream is therefore one long-lived byte pipe (SSH, the
  multiplexer), never one TCP connection of the user's whose half-close must survive.

Frames (SPDY/3, big-endian): control ``1|version 15|type 16|flags 8|length 24|payload``, data
``0|stream id 31|flags 8|length 24|payload``; header blocks are zlib-compressed with the SPDY/3
dictionary, one compression context per direction for the whole connection.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import zlib
from collections.abc import Callable
from typing import Any

from tpconf.errors import TunnelDown

log = logging.getLogger(__name__)

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = (
    1,
    2,
    3,
    4,
    6,
    7,
    8,
    9,
)
FLAG_FIN = 0x01
#: RST_STREAM status codes (SPDY/3 section 2.6.3).
RST_PROTOCOL_ERROR, RST_CANCEL = 1, 5
#: The protocol the API server and the runtime speak over the upgraded connection.
PORTFORWARD_PROTOCOL = "portforward.k8s.io"

#: Queued frame bytes at which they are written at once rather than at the end of the turn.
COALESCE = 1024 * 1024

#: Most payload bytes in one data frame (SPDY allows 2^24 - 1). A large frame is one header
#: per megabyte instead of one per socket read; spdystream hands a frame over whole.
MAX_FRAME = 1024 * 1024

_DATA_HEADER = struct.Struct(">II")
_CONTROL_HEADER = struct.Struct(">HHI")
_U32 = struct.Struct(">I")

_DICTIONARY_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language"
    " accept-ranges age allow authorization cache-control connection content-base"
    " content-encoding content-language content-length content-location content-md5"
    " content-range content-type date etag expect expires from host if-match if-modified-since"
    " if-none-match if-range if-unmodified-since last-modified location max-forwards pragma"
    " proxy-authenticate proxy-authorization range referer retry-after server te trailer"
    " transfer-encoding upgrade user-agent vary via warning www-authenticate method get status"
    " 200\x00OK version HTTP/1.1 url public set-cookie keep-alive origin"
)
_DICTIONARY_TAIL = (
    b"100101201202205206300302303304305306307402405406407408409410411412413414415416417502504"
    b"505203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 "
    b"Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 "
    b"Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, "
    b"Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    b"application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    b"gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)


def _dictionary() -> bytes:
    """The SPDY/3 header compression dictionary (spec section 2.6.10.1): length-prefixed words,
    then a tail of plain text."""
    words = (w.replace("\x00", " ").encode() for w in _DICTIONARY_WORDS.split(" "))
    return b"".join(_U32.pack(len(w)) + w for w in words) + _DICTIONARY_TAIL


DICTIONARY = _dictionary()


def encode_headers(headers: dict[str, str]) -> bytes:
    """An uncompressed SPDY/3 header block (names lower-case, as SPDY/3 requires)."""
    parts = [_U32.pack(len(headers))]
    for name, value in headers.items():
        raw_name, raw_value = name.lower().encode(), value.encode()
        parts += [_U32.pack(len(raw_name)), raw_name, _U32.pack(len(raw_value)), raw_value]
    return b"".join(parts)


def decode_headers(block: bytes) -> dict[str, str]:
    """The pairs of an uncompressed header block (a repeated name keeps its last value)."""
    (count,) = _U32.unpack_from(block, 0)
    pos, out = 4, {}
    for _ in range(count):
        (size,) = _U32.unpack_from(block, pos)
        name = block[pos + 4 : pos + 4 + size].decode(errors="replace")
        pos += 4 + size
        (size,) = _U32.unpack_from(block, pos)
        out[name] = block[pos + 4 : pos + 4 + size].decode(errors="replace")
        pos += 4 + size
    return out


def data_frame_header(stream_id: int, length: int, *, fin: bool = False) -> bytes:
    return _DATA_HEADER.pack(stream_id, (FLAG_FIN << 24 if fin else 0) | length)


def control_frame(kind: int, payload: bytes, *, flags: int = 0) -> bytes:
    return _CONTROL_HEADER.pack(0x8000 | VERSION, kind, flags << 24 | len(payload)) + payload


class PortForwardError(TunnelDown):
    """Raised (or passed to a stream's protocol) when the runtime could not forward a port, or
    the API server refused the upgrade."""


class SpdyStream(asyncio.Transport):
    """One SPDY stream: an ``asyncio.Transport`` to its protocol. Writes become data frames."""

    def __init__(self, conn: SpdyConnection, stream_id: int, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._conn = conn
        self.stream_id = stream_id
        self._protocol = protocol
        self._fin_sent = False
        self._fin_received = False
        self._closed = False
        self.error_text = ""
        """What the runtime wrote on this stream's error stream (empty: nothing went wrong)."""

    # ---- asyncio.Transport --------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self._fin_sent or not data:
            return
        self._conn._send_data(self.stream_id, data)

    def writelines(self, list_of_data: Any) -> None:
        """One data frame of all the pieces, without joining them (the relay's header and
        payload)."""
        if self._closed or self._fin_sent:
            return
        parts = [p for p in list_of_data if len(p)]
        if parts:
            self._conn._send_parts(self.stream_id, parts)

    def write_eof(self) -> None:
        if not self._fin_sent and not self._closed:
            self._fin_sent = True
            self._conn._send_data(self.stream_id, b"", fin=True)
            self._maybe_done()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        """Send FIN (once) and forget the stream; the protocol hears ``connection_lost``."""
        if self._closed:
            return
        if not self._fin_sent and not self._conn.is_closing():
            self._fin_sent = True
            self._conn._send_data(self.stream_id, b"", fin=True)
        self._lose(None)

    def abort(self) -> None:
        """Reset the stream (RST_STREAM CANCEL); the protocol hears ``connection_lost``."""
        if self._closed:
            return
        self._conn._send_reset(self.stream_id, RST_CANCEL)
        self._lose(None)

    def is_closing(self) -> bool:
        return self._closed or self._conn.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return ("localhost", 0)  # nominal: the pod's loopback, through the API server
        if name == "sockname":
            return ("localhost", 0)
        return default

    def pause_reading(self) -> None:
        """Not done per stream: the runtime has no flow control (see the module docstring)."""

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self._closed

    def get_write_buffer_size(self) -> int:
        return self._conn.write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._conn.write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """The connection's limits are shared by all its streams: not set per stream."""

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # ---- from the connection ------------------------------------------------------------

    def _data(self, data: bytes | memoryview) -> None:
        if not self._closed:
            protocol = self._protocol
            if isinstance(data, memoryview) and not getattr(protocol, "takes_views", False):
                data = bytes(data)  # asyncssh and the like get bytes
            protocol.data_received(data)  # type: ignore[arg-type]

    def _fin(self) -> None:
        if self._fin_received or self._closed:
            return
        self._fin_received = True
        keep_open = self._protocol.eof_received()
        if not keep_open:
            self.close()
            return
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._fin_sent and self._fin_received:
            self._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._conn._forget(self.stream_id)
        if exc is None and self.error_text:
            exc = PortForwardError(f"port-forward failed: {self.error_text}")
        self._protocol.connection_lost(exc)


class _ErrorStream(asyncio.Protocol):
    """The error stream of a pair: collects what the runtime writes and gives it to the data
    stream when it ends (the runtime then closes the data stream too)."""

    LIMIT = 4096

    def __init__(self) -> None:
        self.data: SpdyStream | None = None
        self._text = b""

    def data_received(self, data: bytes | memoryview) -> None:
        self._text = (self._text + bytes(data))[: self.LIMIT]
        if self.data is not None:
            self.data.error_text = self._text.decode(errors="replace").strip()

    def eof_received(self) -> bool:
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        pass


class SpdyConnection(asyncio.Protocol):
    """One upgraded connection to the API server; opens port-forward streams to one pod.

    Make one with :func:`connect`. Reading is never paused (see the module docstring); writing
    follows the socket: while its buffer is over the high-water mark, every stream's protocol is
    told ``pause_writing``.
    """

    def __init__(self, request: bytes, *, where: str) -> None:
        self._request = request
        self.where = where
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.upgraded: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self._http = b""
        self._upgraded = False
        self._streams: dict[int, SpdyStream | _ErrorStreamHolder] = {}
        self._next_id = 1
        self._next_request = 0
        self._compress = zlib.compressobj(zlib.Z_BEST_SPEED, zdict=DICTIONARY)
        self._decompress = zlib.decompressobj(zdict=DICTIONARY)
        # Parser state: a data frame's payload is delivered as it arrives (no reassembly).
        self._head = b""
        self._remaining = 0  # payload bytes of the current data frame still to come
        self._current: int = 0  # its stream id
        self._current_fin = False
        self._control: bytearray | None = None  # a control frame being collected
        self._control_need = 0
        self._writing_paused = False
        self._out: list[Any] = []  # frames of this event-loop turn (see _write)
        self._out_size = 0
        self._flush_scheduled = False

    # ---- asyncio.Protocol (the socket) ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if not self._upgraded:
            self._http += data
            end = self._http.find(b"\r\n\r\n")
            if end < 0:
                if len(self._http) > 65536:
                    self._fail(PortForwardError(f"{self.where}: no HTTP response head"))
                return
            head, rest = self._http[:end], self._http[end + 4 :]
            self._http = b""
            if not self._check_upgrade(head, rest):
                return
            self._upgraded = True
            if not self.upgraded.done():
                self.upgraded.set_result(None)
            data = rest
            if not data:
                return
        self._parse(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"the port-forward connection to {self.where} was lost" + (
            f": {exc}" if exc else ""
        )
        error = PortForwardError(reason)
        if not self.upgraded.done():
            self.upgraded.set_exception(error)
        for stream in list(self._streams.values()):
            if isinstance(stream, SpdyStream):
                stream._lose(error)
        self._streams.clear()
        if not self.closed.done():
            self.closed.set_result(reason)

    def pause_writing(self) -> None:
        self._writing_paused = True
        for stream in list(self._streams.values()):
            if isinstance(stream, SpdyStream):
                stream._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        for stream in list(self._streams.values()):
            if isinstance(stream, SpdyStream):
                stream._protocol.resume_writing()

    # ---- the upgrade ------------------------------------------------------------------------

    def _check_upgrade(self, head: bytes, rest: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status == 101 and headers.get("x-stream-protocol-version") == PORTFORWARD_PROTOCOL:
            return True
        body = rest[:600].decode(errors="replace").strip()
        message = f"the API server refused port-forward to {self.where}: {lines[0]}"
        if body:
            message += f": {body}"
        error: Exception
        if status in (401, 403):
            from tpconf.errors import Forbidden

            error = Forbidden(
                message,
                hint="the RBAC Role needs verb `create` on resource `pods/portforward`"
                " (`tpconf rbac` prints the Role tpconf needs)",
            )
        else:
            error = PortForwardError(message)
        self._fail(error)
        return False

    def _fail(self, exc: Exception) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()

    # ---- frames in ----------------------------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        pos, size = 0, len(data)
        view = memoryview(data)
        while pos < size:
            if self._remaining:
                take = min(self._remaining, size - pos)
                chunk = data if take == size else view[pos : pos + take]  # no copy
                pos += take
                self._remaining -= take
                stream = self._streams.get(self._current)
                if stream is not None:
                    stream._data(chunk)
                if not self._remaining and self._current_fin:
                    self._stream_fin(self._current)
                continue
            if self._control is not None:
                take = min(self._control_need, size - pos)
                self._control += data[pos : pos + take]
                pos += take
                self._control_need -= take
                if not self._control_need:
                    frame, self._control = self._control, None
                    self._control_frame(bytes(frame))
                continue
            need = 8 - len(self._head)
            if need > 0:
                self._head += data[pos : pos + need]
                pos += min(need, size - pos)
                if len(self._head) < 8:
                    continue
            first, second = _DATA_HEADER.unpack(self._head)
            self._head = b""
            flags, length = second >> 24, second & 0xFFFFFF
            if first & 0x80000000:
                kind = first & 0xFFFF
                self._control = bytearray(_U32.pack(kind) + bytes((flags,)))
                self._control_need = length
                if not length:
                    frame, self._control = self._control, None
                    self._control_frame(bytes(frame))
                continue
            self._current, self._current_fin = first, bool(flags & FLAG_FIN)
            self._remaining = length
            if not length and self._current_fin:
                self._stream_fin(first)

    def _control_frame(self, frame: bytes) -> None:
        (kind,) = _U32.unpack_from(frame, 0)
        flags, payload = frame[4], frame[5:]
        if kind in (SYN_REPLY, HEADERS):
            (stream_id,) = _U32.unpack_from(payload, 0)
            self._decompress.decompress(payload[4:])  # keeps the shared zlib context in step
            if flags & FLAG_FIN:
                self._stream_fin(stream_id & 0x7FFFFFFF)
        elif kind == RST_STREAM:
            stream_id, status = struct.unpack_from(">II", payload, 0)
            self._stream_reset(stream_id & 0x7FFFFFFF, status)
        elif kind == PING:
            if self._transport is not None and not self._transport.is_closing():
                self._write([control_frame(PING, payload)])
        elif kind == GOAWAY:
            log.debug("port-forward to %s: the server sent GOAWAY", self.where)
            if self._transport is not None:
                self._transport.close()
        elif kind == SYN_STREAM:
            # The server never opens streams in this protocol: refuse.
            (stream_id,) = _U32.unpack_from(payload, 0)
            self._decompress.decompress(payload[10:])
            self._send_reset(stream_id & 0x7FFFFFFF, RST_PROTOCOL_ERROR)
        # SETTINGS, WINDOW_UPDATE and unknown types: nothing to do (no flow control there).

    def _stream_fin(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if isinstance(stream, SpdyStream):
            stream._fin()
        elif isinstance(stream, _ErrorStreamHolder):
            self._streams.pop(stream_id, None)

    def _stream_reset(self, stream_id: int, status: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if isinstance(stream, SpdyStream):
            stream._lose(
                PortForwardError(
                    stream.error_text or f"the port-forward stream was reset (status {status})"
                )
            )

    # ---- frames out ---------------------------------------------------------------------------

    def _send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, fin: bool = False
    ) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        size = len(data)
        if size <= MAX_FRAME:
            head = data_frame_header(stream_id, size, fin=fin)
            if size <= 65536:
                self._write([head + bytes(data)])
            else:
                self._write([head, data])
            return
        view = memoryview(data)
        for start in range(0, size, MAX_FRAME):
            part = view[start : start + MAX_FRAME]
            last = start + MAX_FRAME >= size
            self._write([data_frame_header(stream_id, len(part), fin=fin and last), part])

    def _write(self, pieces: list[Any]) -> None:
        """Queue frames; the frames of one event-loop turn leave in one ``writelines`` at its
        end (small ones joined: one TLS record and one ``send()`` for 1,000 OPENs or window
        updates, not one each), at once past :data:`COALESCE` bytes."""
        self._out += pieces
        self._out_size += sum(len(p) for p in pieces)
        if self._out_size >= COALESCE:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out, self._out_size = self._out, [], 0
        transport = self._transport
        if not out or transport is None or transport.is_closing():
            return
        batch: list[Any] = []
        small = bytearray()
        for piece in out:
            if len(piece) < 16384:
                small += piece
                continue
            if small:
                batch.append(bytes(small))
                small = bytearray()
            batch.append(piece)
        if small:
            batch.append(bytes(small))
        transport.writelines(batch)

    def _send_parts(self, stream_id: int, parts: list[Any]) -> None:
        """``parts`` as one data frame (several when over :data:`MAX_FRAME`); a small first part
        travels with the frame header, the rest as they are (no copy)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        size = sum(len(p) for p in parts)
        if size > MAX_FRAME:
            self._send_data(stream_id, b"".join(parts))
            return
        head = data_frame_header(stream_id, size)
        if len(parts[0]) <= 256:
            head += bytes(parts[0])
            parts = parts[1:]
        self._write([head, *parts])

    def _send_reset(self, stream_id: int, status: int) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            self._write([control_frame(RST_STREAM, struct.pack(">II", stream_id, status))])

    def _syn(self, headers: dict[str, str]) -> int:
        assert self._transport is not None
        stream_id = self._next_id
        self._next_id += 2
        block = self._compress.compress(encode_headers(headers))
        block += self._compress.flush(zlib.Z_SYNC_FLUSH)
        # stream id, associated stream id, priority 0 + slot 0, then the header block
        payload = struct.pack(">IIH", stream_id, 0, 0) + block
        self._write([control_frame(SYN_STREAM, payload)])
        return stream_id

    # ---- streams --------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def write_buffer_size(self) -> int:
        queued = self._out_size
        return (
            queued if self._transport is None else queued + self._transport.get_write_buffer_size()
        )

    def write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0) if self._transport is None else self._transport.get_write_buffer_limits()

    @property
    def stream_count(self) -> int:
        """Data streams open now (tests and the bench read it)."""
        return sum(isinstance(s, SpdyStream) for s in self._streams.values())

    def open_port(
        self, port: int, protocol_factory: Callable[[], asyncio.Protocol]
    ) -> tuple[SpdyStream, asyncio.Protocol]:
        """A new connection to ``localhost:port`` in the pod: an error stream and a data stream.

        Returns at once (the runtime connects when it gets the streams; data written meanwhile
        waits in order). A failure to connect reaches the protocol as ``connection_lost`` with
        a :class:`PortForwardError` that quotes the runtime.
        """
        if self.is_closing():
            raise PortForwardError(f"the port-forward connection to {self.where} is closed")
        request = str(self._next_request)
        self._next_request += 1
        common = {"port": str(port), "requestid": request}
        error_id = self._syn({"streamtype": "error", **common})
        self._send_data(error_id, b"", fin=True)  # we never write on it (as kubectl)
        holder = _ErrorStreamHolder(error_id)
        self._streams[error_id] = holder
        protocol = protocol_factory()
        data_id = self._syn({"streamtype": "data", **common})
        stream = SpdyStream(self, data_id, protocol)
        holder.watcher.data = stream
        self._streams[data_id] = stream
        protocol.connection_made(stream)
        if self._writing_paused:
            protocol.pause_writing()
        return stream, protocol

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def close(self) -> None:
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _ErrorStreamHolder:
    """An error stream in the connection's table: its data goes to an :class:`_ErrorStream`."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.watcher = _ErrorStream()

    def _data(self, data: bytes | memoryview) -> None:
        self.watcher.data_received(data)

    def _fin(self) -> None:
        pass


def upgrade_request(host: str, path: str, headers: dict[str, str]) -> bytes:
    """The HTTP/1.1 request that turns the connection into a SPDY session."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        "User-Agent: tpconf",
        "Content-Length: 0",
        "Connection: Upgrade",
        "Upgrade: SPDY/3.1",
        f"X-Stream-Protocol-Version: {PORTFORWARD_PROTOCOL}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
