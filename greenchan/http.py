"""The HTTP transport: long-polling, streaming and Server-Sent Events.

The first ``send`` decides the shape of the response (API.md): with ``close``
(the default) it is a complete response with ``Content-Length`` and the channel
is done, which is long-polling; without it the response is a stream, chunked on
HTTP/1.1 and close-delimited on HTTP/1.0, that later sends extend. Each send goes
to the socket at once. While the channel waits, a hang-up watch on the socket
notices a client that goes away, so ``on_close`` runs without polling.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from gevent.hub import Waiter

from .channel import Channel, CloseStatus, Event, _wake
from .connection import Connection
from .options import Options
from .origin import CORS_KEY
from .server import RESPONDED_KEY
from .wire import first_response, http_response, response_head, to_bytes

log = logging.getLogger("greenchan.http")


def has_body(environ: dict) -> bool:
    """True if the request announces a body (a length, or chunked encoding)."""
    return bool(environ.get("CONTENT_LENGTH")) or environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"


def read_body(environ: dict, max_body: int) -> Optional[bytes]:
    """The whole request body, or None if it is larger than ``max_body``."""
    if not has_body(environ):
        return b""
    length = environ.get("CONTENT_LENGTH")
    chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
    if length and int(length) > max_body:
        return None
    body = environ["wsgi.input"].read() if not chunked else environ["wsgi.input"].read(max_body + 1)
    if len(body) > max_body:
        return None
    return body


def body_message(environ: dict, body: bytes) -> Any:
    """A ``str`` for text/* and application/json bodies, else ``bytes`` (API.md)."""
    ctype = environ.get("CONTENT_TYPE", "").lower()
    if ctype.startswith("text/") or ctype.startswith("application/json"):
        charset = "utf-8"
        for param in ctype.split(";")[1:]:
            key, _, value = param.strip().partition("=")
            if key == "charset" and value:
                charset = value.strip('"')
        try:
            return body.decode(charset)
        except (LookupError, UnicodeDecodeError):
            return body
    return body


class HttpTransport:
    """Carries one channel over one HTTP response; created by ``with_channel``."""

    # Looked up by Channel per group message; sessions.py's transport has them.
    send_tagged = None
    control = None

    __slots__ = ("channel", "handler", "server", "options", "conn", "started", "_chunked", "_close_delimited", "_keep_alive", "_waiter", "_head", "_sse")

    def __init__(self, environ: dict, handler: Any, server: Any, options: Options) -> None:
        self.handler = handler
        self.server = server
        self.options = options
        self.conn = conn = Connection(handler.socket, options.send_buffer, options.send_timeout)
        conn.on_slow = self._slow
        conn.on_closed = self._lost
        self.started = False
        self._chunked = False
        self._close_delimited = False
        version = environ.get("SERVER_PROTOCOL", "HTTP/1.0")
        self._keep_alive = not handler.close_connection and version == "HTTP/1.1"
        self._head = environ.get("REQUEST_METHOD") == "HEAD"
        self._sse = False  # the stream is text/event-stream
        self._waiter: Optional[Waiter] = None
        self.channel: Channel = None  # type: ignore[assignment]

    @property
    def kind(self) -> str:
        """``channel.transport``: a long-poll until the first send starts a stream."""
        if not (self._chunked or self._close_delimited):
            return "longpoll"
        return "sse" if self._sse else "stream"

    def watch(self) -> None:
        """Notice at once when the client hangs up, while the channel is open.

        Whatever the client sends meanwhile (a pipelined request) is kept, up to
        ``max_header_size`` bytes, and handed back to the request parser when the
        response is complete. A client that sends more while its response is
        pending is closed (``PROTOCOL_ERROR``): reading no further would hide its
        hang-up behind the unread bytes, and buffering more would let one client
        grow the server's memory.
        """
        self.conn.watch_hangup(
            self._hangup, self.handler.take_buffered(), self.options.max_header_size, self._overflow
        )

    def accept_now(self, subprotocol: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        """Nothing to accept on HTTP: the channel is open from the start."""

    def resume_reading(self) -> None:
        """The body is one message, already read: nothing to resume."""

    # -- outbound --------------------------------------------------------------

    def send(self, data: Any, close: Optional[bool], wait: bool) -> bool:
        if not self.started:
            return self._start(data, close, wait)
        body = self._body(data)
        if close is None:
            close = False
        if self._chunked:
            out = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if close:
                out += b"0\r\n\r\n"
        else:
            out = body
        ok = self.conn.write(out, wait) if out else not self.conn.closed
        if close:
            self._complete()
        return ok

    def _start(self, data: Any, close: Optional[bool], wait: bool) -> bool:
        is_event = isinstance(data, Event)
        if close is None:
            close = not is_event
        status, headers = first_response(data)
        headers += self.handler.environ.get(CORS_KEY, ())
        body = self._body(data)
        self.started = True
        if close:
            headers.append(("Content-Length", str(len(body))))
            if not self._keep_alive:
                headers.append(("Connection", "close"))
            out = response_head(status, headers) + (b"" if self._head else body)
            ok = self.conn.write(out, wait)
            self._complete()
            return ok
        # A stream: tell proxies (nginx) not to buffer it.
        self._sse = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers)
        self.channel._set_kind("sse" if self._sse else "stream")
        headers.append(("X-Accel-Buffering", "no"))
        if self.handler.environ.get("SERVER_PROTOCOL") == "HTTP/1.1":
            self._chunked = True
            headers.append(("Transfer-Encoding", "chunked"))
            if not self._keep_alive:
                headers.append(("Connection", "close"))
            out = response_head(status, headers) + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"")
        else:
            self._close_delimited = True
            self._keep_alive = False
            headers.append(("Connection", "close"))
            out = response_head(status, headers, "HTTP/1.0") + body
        return self.conn.write(out, wait)

    @staticmethod
    def _body(data: Any) -> bytes:
        if isinstance(data, Event):
            return data.encode()
        if isinstance(data, dict):
            data = data.get("body")
        return to_bytes(data)

    # -- closing ---------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "", status: CloseStatus = CloseStatus.SERVER_CLOSE) -> None:
        """End the response: 204 if it never started, the end of a stream if it did."""
        if not self.started:
            self.started = True
            if status is CloseStatus.INTERNAL_ERROR:
                out = http_response(500, None, "Internal Server Error\n", close=True)
                self._keep_alive = False
            else:
                head = [] if self._keep_alive else [("Connection", "close")]
                head += self.handler.environ.get(CORS_KEY, ())
                out = response_head(204, head)
            self.conn.write(out, wait=False)
        elif self._chunked and status is not CloseStatus.INTERNAL_ERROR:
            self.conn.write(b"0\r\n\r\n", wait=False)
        else:  # a close-delimited stream, or a failure mid-stream: end the connection
            self._keep_alive = False
        self._complete(status)

    def reject(self, status: int, body: Any, headers: Any) -> None:
        self.started = True
        self._keep_alive = False
        self.conn.write(http_response(status, headers, body, close=True), wait=False)
        self._complete()

    def shutdown(self) -> None:
        """The server is stopping: end the response."""
        self.close()

    def abort(self) -> None:
        self.conn.abort()

    def _complete(self, status: CloseStatus = CloseStatus.SERVER_CLOSE) -> None:
        self.channel._finish(status)
        if self._waiter is not None:
            _wake(self._waiter)

    def _hangup(self) -> None:
        log.debug("%r: client went away", self.channel)
        self.conn.abort()

    def _lost(self) -> None:
        self.channel._finish(CloseStatus.CLIENT_CLOSE)
        if self._waiter is not None:
            _wake(self._waiter)

    def _overflow(self) -> None:
        log.info("%r: client sent more than %d bytes while its response was pending: closing",
                 self.channel, self.options.max_header_size)
        self.channel._finish(CloseStatus.PROTOCOL_ERROR)
        self.conn.abort()

    def _slow(self) -> None:
        log.warning("%r: client not reading, closing as slow consumer", self.channel)
        self.channel._finish(CloseStatus.SLOW_CONSUMER)
        self.conn.abort()

    # -- the request's greenlet ------------------------------------------------

    def wait_done(self) -> None:
        """Block the request's greenlet until the response is complete, then hand
        the connection back to pywsgi."""
        if self.channel.is_open:
            self._waiter = Waiter()
            try:
                self._waiter.get()
            finally:
                self._waiter = None
        conn = self.conn
        environ = self.handler.environ
        if not conn.closed and not conn.flush(self.options.send_timeout):
            conn.abort()
        pending = conn.take_kept()
        # The response is written: pywsgi reads the next request on this
        # connection (what the client sent meanwhile first), or closes it
        # (after a close-delimited or failed response).
        keep_alive = self._keep_alive and not conn.closed
        environ[RESPONDED_KEY] = "keep-alive" if keep_alive else "close"
        if not conn.closed:
            conn.release()
        if keep_alive:
            self.handler.push_back(pending)
        self.server._unregister(self.channel)
