"""Channels outside greenchan's server: under gevent-websocket and plain WSGI servers.

greenchan's own transports take the socket over from its pywsgi handler. Under
another server there is no socket to take, so ``with_channel`` falls back to
what that server offers, with the same Channel semantics (``on_receive`` in
order, ``on_close`` once, ``CloseStatus``, ``send`` returns False when closed):

- ``GeventWebSocketTransport``: the request came through gevent-websocket's
  ``WebSocketHandler`` (or its gunicorn worker ``GeventWebSocketWorker``), which
  already answered the handshake and put a ``ws`` object at
  ``environ["wsgi.websocket"]``. A reader greenlet calls ``ws.receive()``, a writer
  greenlet drains a bounded outbound queue through ``ws.send()``. This lets an
  application move to greenchan one route at a time.
- ``WsgiTransport``: an HTTP channel under any WSGI server (``gunicorn -k gevent``,
  gevent-websocket's HTTP requests): the application returns an iterator that
  yields each chunk the channel sends, so long-polling and streaming work.
- A WebSocket upgrade that no server answered is refused with a 500 that names
  the fix: greenchan's server or ``greenchan.gunicorn.Worker``.

What a foreign server cannot give: ``reject()`` and ``accept(headers=...)`` after
gevent-websocket already sent its 101, an Origin refusal as 403 (it becomes close
1008), negotiated subprotocols, and a graceful 1001 on shutdown (that needs
greenchan's server, which knows every open channel).
"""
from __future__ import annotations

import collections
import logging
import socket
import struct
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

import gevent
from gevent.event import Event as _Flag
from gevent.hub import get_hub, getcurrent
from gevent.timeout import Timeout

from .channel import Channel, CloseStatus, Event, run_handler
from .http import body_message, read_body
from .options import DEFAULTS, Options
from .server import UPGRADE_KEY
from .origin import CORS_KEY, check_origin, origin_allowed
from .websocket import wants_upgrade
from .wire import first_response, has_header, header_items, reason, to_bytes

__all__ = ["GeventWebSocketTransport", "WsgiTransport", "flask_compatible", "serve_foreign"]

log = logging.getLogger("greenchan.geventwebsocket")

# Over this multiple of ``send_buffer`` a client is cut off at once, as in connection.py.
HARD_LIMIT_FACTOR = 2

_OPCODE_CLOSE, _OPCODE_PING, _OPCODE_PONG = 0x8, 0x9, 0xA
_NOT_GIVEN: Any = object()

UPGRADE_FIX = (
    "WebSocket upgrade needs greenchan's server (greenchan.Server, the greenchan command) "
    "or its gunicorn worker (gunicorn -k greenchan.gunicorn.Worker), or gevent-websocket's "
    "WebSocketHandler; this request came through {software}"
)


def flask_compatible(app: Callable) -> Callable:
    """Wrap a WSGI app served by gevent-websocket so Werkzeug routes upgrades to plain routes.

    Werkzeug's router answers 400 to a WebSocket on a route not marked
    ``websocket=True``; greenchan's server hides the Upgrade header from it, and this
    middleware does the same under gevent-websocket: ``app.wsgi_app =
    flask_compatible(app.wsgi_app)``.
    """

    def wrapped(environ: dict, start_response: Callable) -> Any:
        if environ.get("wsgi.websocket") is not None and "HTTP_UPGRADE" in environ:
            environ[UPGRADE_KEY] = environ.pop("HTTP_UPGRADE")
        return app(environ, start_response)

    return wrapped


def serve_foreign(
    environ: dict,
    start_response: Optional[Callable],
    handler: Callable,
    args: tuple,
    kwargs: dict,
    route_options: dict,
) -> Any:
    """Serve a ``with_channel`` handler under a server that is not greenchan's."""
    options = DEFAULTS.replace(**route_options)
    software = environ.get("SERVER_SOFTWARE", "an unknown WSGI server")
    if environ.get("wsgi.websocket") is None:
        refusal = check_origin(environ, options.origins)
        if refusal is not None:
            status, headers = refusal
            return _plain(start_response, status, "Origin not allowed\n" if status == 403 else "", headers)
    ws = environ.get("wsgi.websocket")
    if ws is not None:
        return _serve_websocket(environ, ws, handler, args, kwargs, options)
    if wants_upgrade(environ):
        message = UPGRADE_FIX.format(software=software)
        log.error("%s", message)
        return _plain(start_response, 500, message + "\n")
    # The client's socket, for the hang-up watch: gunicorn names it, pywsgi's
    # input keeps it (looked up before the body replaces the input).
    sock = environ.get("gunicorn.socket") or environ.get("gunicorn.sock") or _pywsgi_socket(environ.get("wsgi.input"))
    body = read_body(environ, options.max_body)
    if body is None:
        return _plain(start_response, 413, "Request body too large\n")
    import io

    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    transport = WsgiTransport(environ, options)
    channel = Channel(environ, transport, False, options.max_queue)
    transport.channel = channel
    if body:
        channel._deliver(body_message(environ, body))
    transport.watch(sock)
    run_handler(channel, handler, args, kwargs)
    if start_response is None:  # a Flask view: Flask runs a returned WSGI callable
        return lambda env, sr: transport.iterate(sr)
    return transport.iterate(start_response)


def _pywsgi_socket(wsgi_input: Any) -> Any:
    """The client socket behind gevent.pywsgi's ``Input`` (its rfile wraps a SocketIO)."""
    sock = getattr(wsgi_input, "socket", None)
    if sock is None:
        raw = getattr(getattr(wsgi_input, "rfile", None), "raw", None)
        sock = getattr(raw, "_sock", None)
    return sock


def _plain(start_response: Optional[Callable], status: int, body: str, extra: Optional[list] = None) -> Any:
    data = body.encode()
    headers = list(extra or [])
    if status != 204:
        headers += [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))]

    def respond(env: Any, sr: Callable) -> List[bytes]:
        sr(f"{status} {reason(status)}", headers)
        return [data]

    if start_response is None:
        return respond
    return respond(None, start_response)


def _serve_websocket(environ: dict, ws: Any, handler: Callable, args: tuple, kwargs: dict, options: Options) -> List[bytes]:
    if not origin_allowed(environ, options.origins):
        # gevent-websocket already sent the 101: a close is all that is left.
        log.warning("refused WebSocket from origin %r", environ.get("HTTP_ORIGIN"))
        try:
            _send_close(ws, 1008, b"Origin not allowed")
        except Exception:
            pass
        ws.closed = True
        return []
    transport = GeventWebSocketTransport(ws, options)
    channel = Channel(environ, transport, True, options.max_queue)
    transport.channel = channel
    channel._opened()
    transport.start()
    run_handler(channel, handler, args, kwargs)
    # gevent-websocket closes the ws as soon as the application returns, so the
    # request's greenlet stays here while the channel lives (callback style).
    transport.wait_done()
    return []


def _backpressure(transport: Any, backlog: int, total: int, wait: bool) -> bool:
    """connection.py's send-buffer rule, for the transports of foreign servers:
    over ``send_buffer`` a sender waits up to ``send_timeout``; a backlog past
    twice the buffer, or a wait that times out, cuts the client as slow."""
    limit = transport.options.send_buffer
    if total <= limit:
        return True
    if backlog > HARD_LIMIT_FACTOR * limit:
        transport._slow()
        return False
    transport._space.clear()
    if wait and getcurrent() is not get_hub():
        if not transport._space.wait(transport.options.send_timeout):
            transport._slow()
            return False
    return True


class GeventWebSocketTransport:
    """Carries a channel over gevent-websocket's ``ws`` object."""

    __slots__ = (
        "ws", "options", "channel", "started", "_out", "_out_size", "_space", "_writer",
        "_reader", "_keepalive", "_resume", "_pong", "_closing", "_peer_close", "_sock",
    )

    def __init__(self, ws: Any, options: Options) -> None:
        self.ws = ws
        self.options = options
        self.channel: Channel = None  # type: ignore[assignment]
        self.started = True  # gevent-websocket sent the 101 before the application ran
        # Outbound frames wait here for the writer greenlet, so sends from several
        # greenlets never interleave and a broadcast (wait=False) never blocks.
        self._out: Deque[Tuple[str, Any, int]] = collections.deque()
        self._out_size = 0
        self._space = _Flag()
        self._space.set()
        self._writer: Optional[gevent.Greenlet] = None
        self._reader: Optional[gevent.Greenlet] = None
        self._keepalive: Optional[gevent.Greenlet] = None
        self._resume = _Flag()
        self._resume.set()
        self._pong = _Flag()
        self._closing = False  # we sent (or queued) the close frame
        self._peer_close: Optional[Tuple[int, str]] = None
        self._sock = getattr(getattr(ws, "handler", None), "socket", None)
        # gevent-websocket reads control frames inside receive(), and its
        # WebSocket has __slots__: a subclass with the same layout takes the
        # frames over, to learn the client's close code, pass pings on, route
        # pongs and the close reply through the writer, and see pongs arrive.
        ws.__class__ = _adapted(type(ws))

    def start(self) -> None:
        self._reader = gevent.spawn(self._read_loop)
        if self.options.ping_interval:
            self._keepalive = gevent.spawn(self._keepalive_loop)

    # -- inbound ---------------------------------------------------------------

    def _read_loop(self) -> None:
        ws = self.ws
        limit = self.options.max_message_size
        while self.channel.is_open:
            self._resume.wait()
            try:
                message = ws.receive()
            except Exception:  # gevent-websocket raises once it closed the ws itself
                message = None
            if message is None:
                self._receive_ended()
                return
            if isinstance(message, bytearray):
                message = bytes(message)
            if limit is not None and len(message) > limit:
                self.close(1009, "message too big", CloseStatus.MESSAGE_TOO_BIG)
                return
            if not self.channel._deliver(message):
                self._resume.clear()  # a full inbound queue: stop reading (backpressure)

    def _receive_ended(self) -> None:
        if self._peer_close is not None:
            code, text = self._peer_close
            self.channel._finish(CloseStatus.from_code(code), code, text)
        else:  # EOF or a protocol error gevent-websocket answered by closing
            self.channel._finish(CloseStatus.GOING_AWAY, 1006, "")
        self._closing = True

    def _on_close_frame(self, header: Any, payload: bytes) -> None:
        if len(payload) >= 2:
            code = struct.unpack("!H", payload[:2])[0]
            self._peer_close = (code, payload[2:].decode("utf-8", "replace"))
        else:
            self._peer_close = (1005, "")
        if not self._closing:  # answer the client's close (through the writer)
            self._closing = True
            self._enqueue("close", (self._peer_close[0] if payload else 1000, b""), 0, wait=False)

    def _on_ping_frame(self, header: Any, payload: bytes) -> None:
        self._enqueue("pong", payload, len(payload), wait=False)
        self.channel._ping_received(bytes(payload))

    def _on_pong_frame(self, header: Any, payload: bytes) -> None:
        self._pong.set()

    def resume_reading(self) -> None:
        self._resume.set()

    # -- outbound --------------------------------------------------------------

    def accept_now(self, subprotocol: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        """gevent-websocket completed the handshake before the handler ran."""

    def reject(self, status: int, body: Any, headers: Any) -> None:
        raise RuntimeError("reject() is not possible under gevent-websocket, which has already sent its 101")

    def send(self, data: Any, close: Optional[bool], wait: bool) -> bool:
        if self._closing:
            return False
        if isinstance(data, dict):
            data = data.get("body", b"")
        if isinstance(data, Event):
            data = data.data
        if isinstance(data, str):
            ok = self._enqueue("text", data, len(data), wait)
        else:
            data = bytes(data)
            ok = self._enqueue("binary", data, len(data), wait)
        if close:
            self.close(1000, "")
        return ok

    def ping(self, payload: bytes) -> bool:
        return self._enqueue("ping", bytes(payload), len(payload), wait=False)

    def _enqueue(self, kind: str, payload: Any, size: int, wait: bool) -> bool:
        if self.ws.closed and kind != "close":
            return False
        backlog = self._out_size
        self._out.append((kind, payload, size))
        self._out_size += size
        if self._writer is None:
            self._writer = gevent.spawn(self._write_loop)
        return _backpressure(self, backlog, self._out_size, wait) and (self.channel.is_open or kind == "close")

    def _write_loop(self) -> None:
        ws = self.ws
        out = self._out
        try:
            while out:
                kind, payload, size = out[0]
                try:
                    with Timeout(self.options.send_timeout):
                        if kind == "text" or kind == "binary":
                            ws.send(payload, binary=(kind == "binary"))
                        elif kind == "close":
                            _send_close(ws, *payload)
                        else:
                            ws.send_frame(payload, _OPCODE_PING if kind == "ping" else _OPCODE_PONG)
                except Timeout:
                    self._slow()
                    return
                except Exception:  # the socket is gone (WebSocketError is an OSError)
                    self._lost()
                    return
                if out:
                    out.popleft()
                self._out_size -= size
                if self._out_size <= self.options.send_buffer:
                    self._space.set()
        finally:
            self._writer = None

    # -- closing ---------------------------------------------------------------

    def close(self, code: int, reason: str, status: CloseStatus = CloseStatus.SERVER_CLOSE) -> None:
        self.channel._finish(status, code, reason)
        if not self._closing:
            self._closing = True
            self._enqueue("close", (code, reason.encode()), 0, wait=False)

    def shutdown(self) -> None:
        self.close(1001, "server shutting down")

    def abort(self) -> None:
        """Cut the connection now: the reader and the writer wake with an error."""
        self.channel._finish(CloseStatus.SERVER_CLOSE)
        self._closing = True
        self._out.clear()
        self._out_size = 0
        self._space.set()
        self._resume.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _slow(self) -> None:
        log.warning("%r: client not reading, closing as slow consumer", self.channel)
        self.channel._finish(CloseStatus.SLOW_CONSUMER, 1013, "slow consumer")
        self.abort()

    def _lost(self) -> None:
        self.channel._finish(CloseStatus.GOING_AWAY, 1006, "")
        self.abort()

    def _keepalive_loop(self) -> None:
        interval, timeout = self.options.ping_interval, self.options.ping_timeout
        while True:
            gevent.sleep(interval)
            if not self.channel.is_open:
                return
            self._pong.clear()
            self.ping(b"")
            if timeout and not self._pong.wait(timeout) and self.channel.is_open:
                log.debug("%r: no pong within %s s", self.channel, timeout)
                self.channel._finish(CloseStatus.TIMEOUT, 1011, "keepalive ping timeout")
                self.abort()
                return

    def wait_done(self) -> None:
        """Block until the conversation is over (the client's close or ours went out)."""
        if self._reader is not None:
            self._reader.join()
        deadline = Timeout(self.options.close_timeout)
        deadline.start()
        try:
            while self._writer is not None:
                self._writer.join()
        except Timeout:
            self.abort()
        finally:
            deadline.close()
        if self._keepalive is not None:
            self._keepalive.kill(block=False)
        # The close handshake is done (or abandoned): stop gevent-websocket from
        # sending a close of its own when the application returns.
        self.ws.closed = True


def _send_close(ws: Any, code: int, reason: bytes) -> None:
    """Write a close frame: gevent-websocket 0.10's ``close()`` drops the code."""
    ws.send_frame(struct.pack("!H", code) + reason, _OPCODE_CLOSE)


_ADAPTED: Dict[type, type] = {}


def _adapted(cls: type) -> type:
    """A subclass of gevent-websocket's WebSocket class whose control frames go to the transport."""
    if cls in _ADAPTED.values():
        return cls
    if cls not in _ADAPTED:

        def transport(ws: Any) -> GeventWebSocketTransport:
            return ws.environ["greenchan.channel"]._transport

        def handle_close(self: Any, header: Any, payload: bytes) -> None:
            transport(self)._on_close_frame(header, payload)

        def handle_ping(self: Any, header: Any, payload: bytes) -> None:
            transport(self)._on_ping_frame(header, payload)

        def handle_pong(self: Any, header: Any, payload: bytes) -> None:
            transport(self)._on_pong_frame(header, payload)

        _ADAPTED[cls] = type(
            "Greenchan" + cls.__name__,
            (cls,),
            {"__slots__": (), "handle_close": handle_close, "handle_ping": handle_ping, "handle_pong": handle_pong},
        )
    return _ADAPTED[cls]


class WsgiTransport:
    """Carries an HTTP channel as the WSGI response iterator of a foreign server."""

    __slots__ = ("environ", "options", "channel", "started", "_status", "_headers", "_chunks",
                 "_size", "_done", "_more", "_space", "_watcher")

    def __init__(self, environ: dict, options: Options) -> None:
        self.environ = environ
        self.options = options
        self.channel: Channel = None  # type: ignore[assignment]
        self.started = False
        self._status = "200 OK"
        self._headers: List[Tuple[str, str]] = []
        self._chunks: Deque[bytes] = collections.deque()
        self._size = 0
        self._done = False
        self._more = _Flag()  # set when there is something for the iterator
        self._space = _Flag()
        self._space.set()
        self._watcher: Any = None

    def watch(self, sock: Any) -> None:
        """Notice a client that hangs up while the channel waits, if the server
        exposes its socket (gunicorn and pywsgi do); else at the next send."""
        raw = getattr(sock, "_sock", sock)
        try:
            fileno = raw.fileno()
        except Exception:
            return
        self._watcher = watcher = get_hub().loop.io(fileno, 1)

        def readable() -> None:
            try:
                data = raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            self._unwatch()
            if not data:
                log.debug("%r: client went away", self.channel)
                self._finish(CloseStatus.CLIENT_CLOSE)

        watcher.start(readable)

    def _unwatch(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None

    def accept_now(self, subprotocol: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        """Nothing to accept on HTTP."""

    def resume_reading(self) -> None:
        """The body is one message, already read."""

    def send(self, data: Any, close: Optional[bool], wait: bool) -> bool:
        if self._done:
            return False
        if not self.started:
            if close is None:
                close = not isinstance(data, Event)
            self._start(data, close)
        body = to_bytes(data.get("body")) if isinstance(data, dict) else (
            data.encode() if isinstance(data, Event) else to_bytes(data))
        ok = self._push(body, wait)
        if close:
            self._finish(CloseStatus.SERVER_CLOSE)
        return ok

    def _start(self, data: Any, close: bool) -> None:
        status, headers = first_response(data)
        if close:
            body = data.get("body") if isinstance(data, dict) else data
            headers.append(("Content-Length", str(len(to_bytes(body)))))
        else:
            headers.append(("X-Accel-Buffering", "no"))
        self._set_head(status, headers)

    def _set_head(self, status: int, headers: list) -> None:
        self.started = True
        self._status = f"{status} {reason(status)}"
        self._headers = [(str(k), str(v)) for k, v in headers]
        self._headers += self.environ.get(CORS_KEY, ())
        self._more.set()

    def _push(self, body: bytes, wait: bool) -> bool:
        backlog = self._size
        if body:
            self._chunks.append(body)
            self._size += len(body)
            self._more.set()
        return _backpressure(self, backlog, self._size, wait)

    def close(self, code: int = 1000, reason: str = "", status: CloseStatus = CloseStatus.SERVER_CLOSE) -> None:
        if not self.started:
            if status is CloseStatus.INTERNAL_ERROR:
                self._set_head(500, [("Content-Type", "text/plain; charset=utf-8")])
                self._push(b"Internal Server Error\n", wait=False)
            else:
                self._set_head(204, [])
        self._finish(status)

    def reject(self, status: int, body: Any, headers: Any) -> None:
        data = to_bytes(body)
        items = header_items(headers)
        if not has_header(items, "Content-Type"):
            items.append(("Content-Type", "text/plain; charset=utf-8"))
        items.append(("Content-Length", str(len(data))))
        self._set_head(status, items)
        self._push(data, wait=False)
        self._finish(CloseStatus.SERVER_CLOSE)

    def shutdown(self) -> None:
        self.close()

    def abort(self) -> None:
        self._finish(CloseStatus.SERVER_CLOSE)

    def _slow(self) -> None:
        log.warning("%r: client not reading, closing as slow consumer", self.channel)
        self._chunks.clear()
        self._size = 0
        self._finish(CloseStatus.SLOW_CONSUMER)

    def _finish(self, status: CloseStatus) -> None:
        self._done = True
        self._more.set()
        self._space.set()
        self.channel._finish(status)

    def iterate(self, start_response: Callable) -> Iterator[bytes]:
        """The WSGI response: the head at the first send, then each chunk as sent."""
        try:
            while not self.started and not self._done:
                self._more.wait()
                self._more.clear()
            if not self.started:  # the client left before anything was sent
                start_response("204 No Content", [])
                return
            start_response(self._status, self._headers)
            chunks = self._chunks
            while True:
                while chunks:
                    chunk = chunks.popleft()
                    self._size -= len(chunk)
                    if self._size <= self.options.send_buffer:
                        self._space.set()
                    yield chunk
                if self._done:
                    return
                self._more.clear()
                if not chunks and not self._done:
                    self._more.wait()
        finally:
            # The server stopped iterating: the response is complete, or the
            # client went away and a write failed (GeneratorExit).
            self._unwatch()
            if self.channel.is_open:
                self._finish(CloseStatus.CLIENT_CLOSE)
