"""The WebSocket transport: handshake, frames, keepalive and the close handshake.

websockets' sans-I/O ``ServerProtocol`` is the protocol engine: it validates the
handshake, parses and checks frames (masking, control frames, sizes, the close
handshake, permessage-deflate). This module is the thin I/O layer around it, on
a ``Connection`` driven by the hub, plus what the engine leaves to its I/O
layers: reassembling fragments, validating UTF-8, keepalive pings.
"""
from __future__ import annotations

import codecs
import io
import logging
import socket
import time
from typing import Any, Dict, Optional, Sequence
from urllib.parse import urlsplit

from gevent.hub import get_hub
from websockets.datastructures import Headers
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from .channel import Channel, CloseStatus, Event
from . import frames
from .frames import ENGINE, ENGINE_END, MESSAGES_LAST, MORE
from .connection import Connection
from .options import Options
from .server import HANDLER_KEY, RESPONDED_KEY, UPGRADE_KEY
from .wire import http_response

log = logging.getLogger("greenchan.websocket")

_TEXT, _BINARY, _CONT, _PING, _PONG, _CLOSE = (
    Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING, Opcode.PONG, Opcode.CLOSE,
)
_OPEN = State.OPEN


class _QuietLogger(logging.LoggerAdapter):
    """websockets logs each connection at INFO; at scale that belongs at DEBUG."""

    def info(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


# Binary messages from this size on are not copied behind their frame header
# (with frames.FrameReader, 256 KiB echo went from 0.84x to 1.3-1.5x aiohttp in
# bench/); below it one buffer and one send are cheaper.
_LARGE = 65536

_protocol_log = _QuietLogger(logging.getLogger("greenchan.websocket.protocol"), {})


def wants_upgrade(environ: dict) -> bool:
    """True if the request asks for a WebSocket (greenchan's server moved the header)."""
    upgrade = environ.get(UPGRADE_KEY) or environ.get("HTTP_UPGRADE", "")
    return upgrade.lower() == "websocket"


def origin_allowed(environ: dict, origins: Optional[Sequence[str]]) -> bool:
    """API.md's Origin policy: same origin by default; no Origin header passes."""
    origin = environ.get("HTTP_ORIGIN")
    if origin is None or (origins is not None and "*" in origins):
        return True
    if origins is not None:
        return origin in origins
    host = environ.get("HTTP_HOST", "")
    try:
        parts = urlsplit(origin)
        netloc = parts.netloc.lower()
        default = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}.get(parts.scheme, "")
    except ValueError:
        return False
    host = host.lower()
    return netloc == host or netloc + default == host or netloc == host + default


def _request(environ: dict) -> Request:
    headers = Headers()
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-")] = value
    headers["Upgrade"] = environ.get(UPGRADE_KEY) or environ.get("HTTP_UPGRADE", "")
    path = environ.get("PATH_INFO", "/")
    if environ.get("QUERY_STRING"):
        path += "?" + environ["QUERY_STRING"]
    return Request(path, headers)


def _own(sock: Any) -> socket.socket:
    """Take the file descriptor away from gevent's socket object.

    pywsgi's server closes its socket object when the request's greenlet ends;
    a detached object makes that close a no-op, and the WebSocket lives on in a
    plain non-blocking socket driven by the hub (connection.py).
    """
    family, kind, proto = sock.family, sock.type, sock.proto
    raw = socket.socket(family, kind, proto, fileno=sock.detach())
    raw.setblocking(False)
    return raw


def _server_order(protocol: ServerProtocol, offered: Sequence[str]) -> Optional[str]:
    """The first of the server's subprotocols that the client offers, else none:
    a client that needs one then fails its own check, as browsers do."""
    for candidate in protocol.available_subprotocols or ():
        if candidate in offered:
            return candidate
    return None


class _ServerProtocol(ServerProtocol):
    """websockets' engine, except for a close frame inside a fragmented message.

    RFC 6455 section 5.4 lets control frames arrive between the fragments of a
    message; websockets answers a close there with 1002, Autobahn 7.1.5 expects
    the close echoed. The partial message is dropped and the close proceeds.
    """

    def recv_frame(self, frame: Any) -> None:
        if frame.opcode is _CLOSE:
            for name in ("current_size", "cur_size"):  # websockets >= 16, older
                if getattr(self, name, None) is not None:
                    setattr(self, name, None)
        super().recv_frame(frame)


def _refusal(environ: dict) -> Optional[Response]:
    """The answer to an upgrade that RFC 6455 4.1 forbids before the engine looks.

    The opening handshake is a GET over HTTP/1.1 or later: a POST (or any other
    method) gets 405 with ``Allow: GET``, HTTP/1.0 gets 505; neither reaches the
    handler. (websockets' engine checks neither: pywsgi parsed the request line.)
    """
    if environ.get("REQUEST_METHOD", "GET") != "GET":
        body = b"A WebSocket upgrade must be a GET request.\n"
        return Response(405, "Method Not Allowed", Headers([("Allow", "GET")]), body)
    version = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    try:
        major, minor = (int(part) for part in version[len("HTTP/"):].split("."))
    except ValueError:
        major, minor = 0, 0
    if not version.startswith("HTTP/") or (major, minor) < (1, 1):
        body = b"A WebSocket upgrade needs HTTP/1.1.\n"
        return Response(505, "HTTP Version Not Supported", Headers(), body)
    return None


class WebSocketTransport:
    """Carries one channel over a WebSocket; created by ``with_channel``."""

    # What Channel looks up per send of a group message: found here, on the
    # class, instead of failing a getattr per member (sessions.py has these).
    kind = "websocket"
    send_tagged = None
    control = None

    __slots__ = (
        "channel",
        "handler",
        "server",
        "options",
        "protocol",
        "response",
        "conn",
        "started",
        "_parts",
        "_decoder",
        "_ping_timer",
        "_pong_timer",
        "_close_timer",
        "_fast",
        "_reader",
        "_resuming",
    )

    def __init__(self, environ: dict, handler: Any, server: Any, options: Options) -> None:
        self.handler = handler
        self.server = server
        self.options = options
        extensions = [ServerPerMessageDeflateFactory()] if options.compression else None
        self.protocol = protocol = _ServerProtocol(
            extensions=extensions,
            subprotocols=list(options.subprotocols) if options.subprotocols else None,  # type: ignore[arg-type]
            select_subprotocol=_server_order,  # type: ignore[arg-type]
            max_size=options.max_message_size,
            logger=_protocol_log,
        )
        self.response: Response = _refusal(environ) or protocol.accept(_request(environ))
        self.conn: Any = None  # a Connection once the handshake is sent
        self.started = False
        # One growing buffer, not a list of fragments: a flood of tiny or empty
        # fragments costs memory by the byte (max_message_size), not per fragment.
        self._parts: Optional[bytearray] = None
        self._decoder: Any = None
        self._ping_timer: Any = None
        self._pong_timer: Any = None
        self._close_timer: Any = None
        # No extension negotiated: frames.py may parse and build data frames.
        self._fast = False
        self._reader: Any = None  # frames.FrameReader once the handshake is sent
        self._resuming = False  # a _resume callback is scheduled
        self.channel: Channel = None  # type: ignore[assignment]

    @property
    def valid(self) -> bool:
        """False when the handshake request is invalid (the response says why)."""
        return self.response.status_code == 101

    # -- handshake -------------------------------------------------------------

    def accept_now(self, subprotocol: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        """Send the 101 and take the socket over from pywsgi (once)."""
        if self.started or not self.channel.is_open:
            return
        self.started = True
        response = self.response
        if subprotocol is not None:
            offered = self.handler.environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "")
            if subprotocol not in [p.strip() for p in offered.split(",")]:
                raise ValueError(f"the client did not offer subprotocol {subprotocol!r}")
            del response.headers["Sec-WebSocket-Protocol"]
            response.headers["Sec-WebSocket-Protocol"] = subprotocol
        for name, value in (headers or {}).items():
            response.headers[name] = value
        self.channel.subprotocol = response.headers.get("Sec-WebSocket-Protocol")
        handshake = self._start_engine()
        handler = self.handler
        buffered = handler.buffered_input()
        sock = _own(handler.detach())
        # pywsgi's handler, its read buffer and parsed headers are done with: an
        # idle WebSocket should not keep them (kilobytes each, DESIGN.md's budget).
        environ = handler.environ
        environ.pop(HANDLER_KEY, None)
        environ["wsgi.input"] = io.BytesIO()
        self.handler = None
        self.conn = conn = Connection(sock, self.options.send_buffer, self.options.send_timeout)
        conn.on_slow = self._slow
        conn.on_closed = self._closed
        conn.write(handshake, wait=False)
        self.channel._opened()
        conn.start_reading(self._on_data)
        if self.options.ping_interval:
            self._ping_timer = get_hub().loop.timer(self.options.ping_interval, self.options.ping_interval)
            self._ping_timer.start(self._keepalive)
        if buffered:
            self._on_data(buffered)

    def _start_engine(self) -> bytes:
        """Send the 101 through the engine, make it expect frames; the 101's bytes.

        Everything after the socket: the tests drive the transport from here
        with the bytes of any read (tests/test_websocket_split.py).
        """
        protocol = self.protocol
        protocol.send_response(self.response)
        # pywsgi parsed the request, so the engine's parser, which began by
        # waiting for one, restarts in the OPEN state and expects frames.
        protocol.parser = protocol.parse()
        next(protocol.parser)
        self._fast = not protocol.extensions
        self._reader = frames.FrameReader(self.options.max_message_size, self._fast)
        return b"".join(protocol.data_to_send())

    def reject(self, status: int, body: Any, headers: Optional[Dict[str, str]], why: CloseStatus = CloseStatus.SERVER_CLOSE) -> None:
        """Answer plain HTTP before the handshake, and close."""
        self.started = True
        self.handler.environ[RESPONDED_KEY] = "close"
        try:
            self.handler.socket.sendall(http_response(status, headers, body, close=True))
        except OSError:
            pass
        self.channel._finish(why)
        self.server._unregister(self.channel)

    # -- inbound ---------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        """One read from the socket, in the hub; ``b""`` is the end of the stream."""
        if data:
            self._reader.feed(data)
            self._parse()
        else:
            self._engine(None)

    def _parse(self) -> bool:
        """Parse what was read, frame by frame, no further than the queue has room.

        ``FrameReader`` says where each frame ends and whether the fast path or
        the engine parses it (frames.py). Returns True when it stopped at a full
        inbound queue: reading is paused (TCP backpressure) and the rest stays
        in the reader, unparsed, until the handler takes a message
        (``resume_reading``). API.md: ``max_queue`` messages, never more.
        """
        reader = self._reader
        protocol = self.protocol
        channel = self.channel
        conn = self.conn
        while True:
            if protocol.state is not _OPEN or protocol.parser_exc is not None or conn.closed:
                # Closing or failed: no message is delivered any more, so the
                # queue sets no limit; the engine takes the rest (the client's
                # close to read, or bytes to discard).
                rest = reader.rest()
                if rest and not conn.closed:
                    self._engine(rest)
                return False
            room = 1
            if not reader.left:
                queue = channel._queue
                room = channel._max_queue - len(queue) if queue else channel._max_queue
                if room <= 0:
                    if channel.is_open:
                        conn.pause_reading()
                        return True
                    room = channel._max_queue
            kind, value = reader.next(room)
            if kind <= MESSAGES_LAST:
                if kind == MORE:
                    return False
                for is_text, payload in value:  # the common case, without the engine
                    if is_text:
                        try:
                            payload = payload.decode()
                        except UnicodeDecodeError as exc:
                            self._invalid_utf8(exc)
                            break
                    channel._deliver(payload)
                else:
                    if kind == MESSAGES_LAST:
                        break
            elif kind <= ENGINE:
                self._engine(value)
                if kind != ENGINE_END:
                    break
            else:  # TOO_LONG: websockets would say 1009 (over max_size) or wait
                # for 2**63 bytes; RFC 6455 5.2 says the top bit must be 0: 1002.
                protocol.fail(1002, "payload length over 2**63")
                channel._finish(CloseStatus.PROTOCOL_ERROR, 1002, "payload length over 2**63")
                self._write_pending()
        # Every byte read is parsed: pause now if that filled the queue, rather
        # than read once more only to hold it.
        queue = channel._queue
        if queue and len(queue) >= channel._max_queue and channel.is_open and not conn.closed:
            conn.pause_reading()
            return True
        return False

    def _engine(self, data: Any) -> None:
        """Give the engine bytes of its frames (None: the end of the stream), act
        on what it parsed and write what it answered (pongs, a close)."""
        protocol = self.protocol
        if data is None:
            protocol.receive_eof()
        else:
            protocol.receive_data(data)
        # The engine writes only for a ping, a close, a failure or the end
        # of the stream: a data frame needs no data_to_send() round.
        answer = data is None
        frame: Any
        for frame in protocol.events_received():
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY or opcode is _CONT:
                self._on_data_frame(frame)
            elif opcode is _PING:
                answer = True
                self.channel._ping_received(frame.data)
            elif opcode is _PONG:
                if self._pong_timer is not None:
                    self._pong_timer.stop()
            elif opcode is _CLOSE:
                answer = True
                close = protocol.close_rcvd
                if close is not None:
                    self.channel._finish(CloseStatus.from_code(close.code), close.code, close.reason)
        if protocol.parser_exc is not None:
            answer = True
            if self.channel.is_open:
                sent = protocol.close_sent
                if sent is not None:
                    self.channel._finish(CloseStatus.from_code(sent.code), sent.code, sent.reason)
                else:  # EOF without a close frame: the client vanished
                    self.channel._finish(CloseStatus.GOING_AWAY, 1006, "")
        if answer:
            self._write_pending()

    def _on_data_frame(self, frame: Any) -> None:
        if not self.channel.is_open:
            # Failed (invalid UTF-8) earlier in this same read: the frames that
            # followed it are dropped, not appended to a message that is gone.
            return
        data = frame.data
        if frame.opcode is not _CONT:  # the first frame of a message
            if frame.fin:
                if frame.opcode is _TEXT:
                    try:
                        data = data.decode()
                    except UnicodeDecodeError as exc:
                        self._invalid_utf8(exc)
                        return
                self.channel._deliver(data)
                return
            self._parts = bytearray(data)
            self._decoder = codecs.getincrementaldecoder("utf-8")() if frame.opcode is _TEXT else None
        else:
            self._parts += data
        if self._decoder is not None:  # fail fast on invalid UTF-8 in a fragment
            try:
                self._decoder.decode(data, frame.fin)
            except UnicodeDecodeError as exc:
                self._invalid_utf8(exc)
                return
        if frame.fin:
            whole = bytes(self._parts)
            message = whole.decode() if self._decoder is not None else whole
            self._parts = self._decoder = None
            self.channel._deliver(message)

    def _invalid_utf8(self, exc: UnicodeDecodeError) -> None:
        self._parts = self._decoder = None
        self.protocol.fail(1007, f"invalid UTF-8 at position {exc.start}")
        self.channel._finish(CloseStatus.INVALID_DATA, 1007, "invalid UTF-8")
        self._write_pending()

    def resume_reading(self) -> None:
        """The handler took a message from a full queue: parse on, in the hub.

        Called from the handler's greenlet; the parsing runs in a hub callback,
        as every read does, and only then does the socket get read again, so
        the held bytes come before any new ones.
        """
        if self.conn is not None and not self._resuming:
            self._resuming = True
            get_hub().loop.run_callback(self._resume)

    def _resume(self) -> None:
        self._resuming = False
        conn = self.conn
        if conn.closed:
            return
        try:
            if not self._parse():
                conn.resume_reading()
        except Exception:
            log.exception("%r: error while parsing held input", self.channel)
            conn.abort()

    # -- outbound --------------------------------------------------------------

    def send(self, data: Any, close: Optional[bool], wait: bool) -> bool:
        if not self.started:
            self.accept_now()
        if isinstance(data, dict):
            data = data.get("body")
            if data is None:
                data = b""
        elif isinstance(data, Event):
            data = data.data
        if self._fast:  # no extension: frame it here (frames.py)
            # No engine state check on this hot path (broadcasts): the channel,
            # open, already says the connection is (Channel.send checked it).
            if isinstance(data, bytes) and len(data) >= _LARGE:
                # Header and payload in one sendmsg, without copying the payload.
                ok = self.conn.write(frames.header(2, len(data)), wait, data)
            else:
                ok = self.conn.write(frames.encode_message(data), wait)
        else:
            protocol = self.protocol
            if protocol.state is not State.OPEN:
                return False
            if isinstance(data, str):
                protocol.send_text(data.encode())
            else:
                protocol.send_binary(data)
            ok = self._write_pending(wait)
        if close:
            self.close(1000, "")
        return ok

    def ping(self, payload: bytes) -> bool:
        if not self.started:
            self.accept_now()
        if self.protocol.state is not State.OPEN:
            return False
        self.protocol.send_ping(payload)
        return self._write_pending()

    def _write_pending(self, wait: bool = False) -> bool:
        """Write what the protocol produced; honour its end-of-stream marker."""
        conn = self.conn
        ok = True
        for chunk in self.protocol.data_to_send():
            if chunk:
                ok = conn.write(chunk, wait)
            else:  # the protocol says the TCP connection should end now
                conn.linger_close(self.options.close_timeout)
        return ok

    def _keepalive(self) -> None:
        if self.protocol.state is not State.OPEN:
            return
        if self._pong_timer is not None and self._pong_timer.active:
            return  # the previous ping is still waiting for its pong
        self.ping(b"")
        timeout = self.options.ping_timeout
        if timeout:
            if self._pong_timer is None:
                self._pong_timer = get_hub().loop.timer(timeout)
            self._pong_timer.start(self._pong_missing)

    def _pong_missing(self) -> None:
        log.debug("%r: no pong within %s s", self.channel, self.options.ping_timeout)
        self.close(1011, "keepalive ping timeout", CloseStatus.TIMEOUT)
        if self.conn is not None:  # the peer is unresponsive: do not wait for it
            self.conn.abort()

    # -- closing ---------------------------------------------------------------

    def close(self, code: int, reason: str, status: CloseStatus = CloseStatus.SERVER_CLOSE) -> None:
        """Start the close handshake (or answer 500 if it never opened)."""
        if not self.started:
            if status is CloseStatus.INTERNAL_ERROR:
                self.reject(500, "Internal Server Error\n", None, status)
                return
            self.accept_now()
        self.channel._finish(status, code, reason)
        protocol = self.protocol
        if protocol.state is State.OPEN and self.conn is not None and not self.conn.closed:
            protocol.send_close(code, reason)
            self._write_pending()
            # Reading may be paused at a full queue: the client's close is
            # behind what was held, and must be seen.
            self.resume_reading()
            self._close_timer = get_hub().loop.timer(self.options.close_timeout)
            deadline = time.monotonic() + self.options.send_timeout + self.options.close_timeout
            self._close_timer.start(self._close_expired, deadline)

    def _close_expired(self, deadline: float) -> None:
        """No close reply within ``close_timeout``: cut. Unless our close frame is
        still queued behind data the client has not taken yet: a client gets
        ``send_timeout`` to read what was sent before the close, as any slow reader
        does, and cutting it earlier would drop those messages."""
        conn = self.conn
        if conn is not None and not conn.closed and conn._out_size and time.monotonic() < deadline:
            self._close_timer.start(self._close_expired, deadline)
            return
        self.abort()

    def shutdown(self) -> None:
        """The server is stopping: 503 before the handshake, 1001 after it."""
        if not self.started:
            self.reject(503, "Server shutting down\n", {"Retry-After": "1"})
        else:
            self.close(1001, "server shutting down")

    def abort(self) -> None:
        """Cut the connection now."""
        self.channel._finish(CloseStatus.SERVER_CLOSE)
        if self.conn is not None:
            self.conn.abort()

    def _slow(self) -> None:
        log.warning("%r: client not reading, closing as slow consumer", self.channel)
        self.channel._finish(CloseStatus.SLOW_CONSUMER, 1013, "slow consumer")
        self.conn.abort()

    def _closed(self) -> None:
        """The socket is closed: settle the channel and release every watcher."""
        self.channel._finish(CloseStatus.GOING_AWAY, 1006, "")
        for timer in (self._ping_timer, self._pong_timer, self._close_timer):
            if timer is not None:
                timer.stop()
                timer.close()
        self._ping_timer = self._pong_timer = self._close_timer = None
        self.server._unregister(self.channel)
        self.server._release()
