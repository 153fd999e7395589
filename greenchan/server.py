"""The gevent server: a pywsgi handler that lets a channel take over its socket.

``gevent.pywsgi`` parses requests and runs the WSGI application; greenchan's
handler adds what a channel needs on top: the socket and this handler in the
environ (so a WebSocket can take the connection over and an HTTP channel can
write its own response), a deadline on reading request headers, the connection
limit, and a registry of open channels so ``stop()`` can close each one.
"""
from __future__ import annotations

import errno
import io
import logging
import re
import signal
import socket
import time
from typing import Any, Callable, Optional, Set, Union

import gevent
from gevent import pywsgi
from gevent.event import Event as _Flag
from gevent.pool import Pool
from gevent.timeout import Timeout

from . import counters
from .options import Options
from .request import MAX_EMPTY_LINES, BadRequest, Body, parse_headers, parse_request_line

__all__ = ["Server", "run_server"]

log = logging.getLogger("greenchan.server")

SERVER_KEY = "greenchan.server"
HANDLER_KEY = "greenchan.handler"
UPGRADE_KEY = "greenchan.upgrade"
# Set by a transport that wrote its own response or took the socket over:
# pywsgi must not write the application's (empty) response after it.
RESPONDED_KEY = "greenchan.responded"

_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 29\r\nConnection: close\r\n\r\n"
    b"Too many connections, retry.\n"
)


def _error_response(status: int, text: str) -> bytes:
    body = text.encode() + b"\n"
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, text.encode(), len(body), body)
    )


# The answers to requests that cannot be parsed (see request.py for which gets which).
_ERRORS = {
    400: _error_response(400, "Bad Request"),
    413: _error_response(413, "Content Too Large"),
    414: _error_response(414, "URI Too Long"),
    431: _error_response(431, "Request Header Fields Too Large"),
    501: _error_response(501, "Not Implemented"),
    505: _error_response(505, "HTTP Version Not Supported"),
}

# The scheme and authority of an absolute-form request target.
_AUTHORITY = re.compile(r"[^:/?#]+://[^/?#]*")

# At most this many request header lines, as http.client allows; past it
# pywsgi printed a traceback, greenchan answers 431.
MAX_HEADERS = 100

# When a connection closes after a response (every error response, and any
# response that ends its connection), how long and how much of the client's
# unread input is discarded after our FIN: closing with unread input makes the
# kernel send a reset, which can destroy the response before the client reads
# it. Bounded so that junk cannot hold a greenlet.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20

# A request body the application left unread is read and dropped, so the next
# request on the connection can be parsed, up to this many bytes (within
# handshake_timeout); a larger rest closes the connection instead.
_DISCARD_BYTES = 64 << 10

# accept() errors that mean "out of descriptors or memory for now": the
# accept loop pauses and retries instead of logging a traceback per attempt.
_ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_RETRY_MIN, _ACCEPT_RETRY_MAX = 0.05, 1.0


class _HeaderDeadline(Timeout):
    """The client took longer than ``handshake_timeout`` to send its headers."""


class _HeadersTooLarge(ValueError):
    """The request headers passed ``max_header_size`` bytes or ``MAX_HEADERS`` lines."""


class Handler(pywsgi.WSGIHandler):
    """pywsgi's handler with a strict request parser (request.py), graceful closes,
    and the socket exposed so a channel can take it over."""

    # pywsgi's attributes, typed here for mypy (None once the handler is done).
    socket: Any
    close_connection: bool
    rfile: Any
    wsgi_input: Any
    time_finish: float
    _deadline: Optional[Timeout] = None
    _detached = False
    # True while waiting for a request line: an idle keep-alive connection,
    # which stop() may cut at once.
    _idle = False
    # The current request's body (its framing errors decide the answer).
    _body: Optional[Body] = None
    _chunked = False
    # The socket's raw stream while an HTTP channel waits without a read buffer
    # (take_buffered to push_back).
    _socket_io: Any = None

    def handle(self) -> None:
        server: "Server" = self.server.greenchan
        try:  # once per connection: every channel send is a message to deliver now
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        if not server._admit():
            _close_gracefully(self.socket, _UNAVAILABLE)
            self.socket = None
            return
        self._greenlet = gevent.getcurrent()
        server._handlers.add(self)
        graceful = False
        try:
            self._serve()
            graceful = True
        except _HeaderDeadline:
            counters.reject("handshake_timeout")
            log.debug("closing %s: request headers not received in time", self.client_address)
        finally:
            self._cancel_deadline()
            sock = self.socket
            if sock is not None:
                if graceful:
                    _close_gracefully(sock)
                else:
                    _close(sock)
            # pywsgi's handler drops these at the end too: they hold buffers.
            for name in ("socket", "rfile", "wsgi_input", "_body"):
                self.__dict__.pop(name, None)
            server._handlers.discard(self)
            if not self._detached:
                server._release()

    def _serve(self) -> None:
        """pywsgi's keep-alive loop, minus its close: ``handle`` closes gracefully."""
        while self.socket is not None:
            self.time_start = time.time()
            self.time_finish = 0
            result = self.handle_one_request()
            if result is None:
                break
            if result is True:
                continue
            # A request we could not parse: answer, and the connection ends.
            self._cancel_deadline()
            self.status, response = result
            try:
                self.socket.sendall(response)
            except OSError:
                pass
            self.time_finish = time.time()
            self.log_request()
            break

    # -- reading a request -------------------------------------------------------

    def read_requestline(self) -> str:
        timeout = self.server.greenchan.options.handshake_timeout
        if timeout:
            self._deadline = _HeaderDeadline.start_new(timeout)
        self._idle = True
        try:
            rfile = self.rfile
            line = rfile.readline(pywsgi.MAX_REQUEST_LINE)
            # RFC 9112 2.2: ignore empty lines before a request line (a client's
            # stray CRLF after a body, a pipelined extra line).
            for _ in range(MAX_EMPTY_LINES):
                if line != b"\r\n":
                    break
                self._idle = False
                line = rfile.readline(pywsgi.MAX_REQUEST_LINE)
            return line.decode("latin-1")
        finally:
            self._idle = False

    def read_request(self, raw_requestline: str) -> bool:
        """Parse the request strictly (request.py); raise ``BadRequest`` and kin."""
        self.requestline = raw_requestline.rstrip("\r\n")
        self._body = None
        # The line first: a client that sent junk (or HTTP/0.9) gets its 400
        # without the server waiting for headers that will not come.
        method, target, version = parse_request_line(raw_requestline)
        if target[0] != "/" and "://" in target:
            # absolute-form (RFC 9112 3.2.2): the path is what the application routes on.
            rest = _AUTHORITY.sub("", target, count=1)
            target = rest if rest.startswith("/") else "/" + rest
        self.command, self.path, self.request_version = method, target, version
        request = parse_headers(method, target, version, self._read_head())
        self.headers = request.headers
        self.content_length = request.content_length
        self._chunked = request.chunked
        self.close_connection = not request.keep_alive
        return True

    def _read_head(self) -> str:
        """The header lines, within ``max_header_size`` bytes and ``MAX_HEADERS`` lines."""
        limit = self.server.greenchan.options.max_header_size
        readline = self.rfile.readline
        lines = []
        size = 0
        while True:
            line = readline(limit - size + 1)
            size += len(line)
            if size > limit:
                raise _HeadersTooLarge(f"request headers larger than {limit} bytes")
            if line == b"\r\n":
                break
            if not line.endswith(b"\n"):
                raise BadRequest("connection closed inside the request head")
            lines.append(line)
            if len(lines) > MAX_HEADERS:
                raise _HeadersTooLarge(f"more than {MAX_HEADERS} request headers")
        return b"".join(lines).decode("latin-1")

    def _handle_client_error(self, ex: Exception) -> tuple:
        """A malformed request is the client's problem: answer it, log below ERROR."""
        if isinstance(ex, _HeadersTooLarge):
            counters.reject("header_size")
            log.info("431 to %s: %s", self.client_address, ex)
            return ("431", _ERRORS[431])
        status = ex.status if isinstance(ex, BadRequest) else 400
        counters.reject("bad_request")
        log.debug("%d to %s: %s", status, self.client_address, ex)
        return (str(status), _ERRORS[status])

    def _headers(self) -> Any:
        """The request headers as environ items (pywsgi's rules: no names with "_")."""
        for name, value in self.headers:
            if "_" in name:
                continue  # HTTP_X_Y would be ambiguous between "X-Y" and "X_Y"
            key = name.upper().replace("-", "_")
            if key != "CONTENT_TYPE" and key != "CONTENT_LENGTH":
                yield "HTTP_" + key, value

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def get_environ(self) -> dict:
        self._cancel_deadline()
        env = super().get_environ()
        env[SERVER_KEY] = self.server.greenchan
        env[HANDLER_KEY] = self
        # Werkzeug's router answers 400 to an upgrade on a route not marked
        # websocket=True; greenchan serves both on one route, so the Upgrade
        # header moves where only greenchan looks for it.
        upgrade = env.get("HTTP_UPGRADE", "")
        if upgrade.lower() == "websocket":
            env[UPGRADE_KEY] = env.pop("HTTP_UPGRADE")
        expect = env.get("HTTP_EXPECT", "").lower() == "100-continue"
        self._body = self.wsgi_input = env["wsgi.input"] = Body(
            self.rfile,
            self.content_length,
            self._chunked,
            self.socket.sendall if expect else None,
            self.server.greenchan.options.max_header_size,
        )
        env["wsgi.input_terminated"] = True
        return env

    # -- running the application ---------------------------------------------------

    def run_application(self) -> None:
        env = self.environ
        finished = False
        try:
            try:
                self.result = self.application(env, self.start_response)
                if not env.get(RESPONDED_KEY) and self._input_error() is None:
                    self.process_result()
            except Exception:
                # A body with broken framing is answered 400 below, whatever the
                # application (or a framework around it) made of the error.
                if self._input_error() is None:
                    raise
            finally:
                close = getattr(self.result, "close", None)
                self.result = None
                if close is not None:
                    close()
            finished = True
        finally:
            self._end_request(env, finished)

    def _end_request(self, env: dict, finished: bool) -> None:
        """Decide whether the connection can carry another request."""
        error = self._input_error()
        if error is not None:
            log.debug("%d to %s: %s", error.status, self.client_address, error)
            if not self.headers_sent and not env.get(RESPONDED_KEY):
                self.status = str(error.status)
                answer_and_close(self, _ERRORS[error.status])
            self.close_connection = True
        elif env.get(RESPONDED_KEY):
            self.close_connection = self.close_connection or env[RESPONDED_KEY] == "close"
        if finished and not self.close_connection:
            self._discard_body()
        # pywsgi would now read and discard the rest of the request body, with no
        # limit and no deadline (a 413 for "Content-Length: 10**20" would wait for
        # all of it); _discard_body did what is reasonable, or the connection closes.
        self.wsgi_input = _NO_INPUT

    def _input_error(self) -> Optional[BadRequest]:
        body = self._body
        return body.error if body is not None else None

    def _discard_body(self) -> None:
        """Read what the application left of the body, so the next request parses."""
        body = self._body
        if body is None or body.done:
            return
        drained = 0
        try:
            with Timeout(self.server.greenchan.options.handshake_timeout, False):
                while not body.done and drained <= _DISCARD_BYTES:
                    drained += len(body.read(16384))
        except (BadRequest, OSError):
            pass
        if not body.done:
            self.close_connection = True

    def detach(self) -> Any:
        """Give up the socket: pywsgi will neither read nor close it again."""
        sock = self.socket
        self._detached = True
        self.close_connection = True
        self.environ[RESPONDED_KEY] = "close"
        self.socket = None
        return sock

    # -- input that a channel read ahead -----------------------------------------

    def buffered_input(self) -> bytes:
        """Bytes already read from the socket into pywsgi's buffer, not yet parsed."""
        rfile = self.rfile
        sock = self.socket
        chunks = []
        old = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            while True:
                data = rfile.read1(8192)
                if not data:
                    break
                chunks.append(data)
        except OSError:
            pass
        finally:
            sock.settimeout(old)
        return b"".join(chunks)

    def take_buffered(self) -> bytes:
        """What pywsgi's read buffer holds past the request, taken out of it, and
        the buffer itself let go until ``push_back``.

        The hang-up watch of an HTTP channel reads the socket from here on; it
        starts with these bytes so that ``push_back`` returns everything in order.
        At most one non-blocking read of the socket happens (when the buffer is
        empty), so this is bounded. While the channel waits, nothing reads through
        pywsgi's buffered reader, and its 8 KiB buffer was half of what a waiting
        long-poll cost (bench/findings.md): the reader goes (its raw socket stream
        stays open), and the body that read through it, done by now, with it.
        """
        sock = self.socket
        rfile = self.rfile
        old = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            data = rfile.read1(65536) or b""
        except OSError:
            data = b""
        finally:
            sock.settimeout(old)
        raw = rfile.detach()
        if isinstance(raw, _Replay):  # pushed back earlier: its rest, unread, comes after
            data, raw = data + raw._data, raw._raw
        self._socket_io = raw
        self.rfile = self._body = self.wsgi_input = None
        return data

    def push_back(self, data: bytes) -> None:
        """A buffered reader again (after ``take_buffered``), whose first bytes are
        ``data``, then the socket's: the next request is parsed from it."""
        raw, self._socket_io = self._socket_io, None
        self.rfile = io.BufferedReader(_Replay(data, raw) if data else raw)

    def log_request(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", self.format_request())


class _Replay(io.RawIOBase):
    """A raw stream that returns some bytes already read, then the socket's."""

    def __init__(self, data: bytes, raw: Any) -> None:
        super().__init__()
        self._data = data
        # The socket's raw stream (a SocketIO). Not closed with this object: the
        # connection goes on after the replayed bytes are read.
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> Optional[int]:
        data = self._data
        if data:
            n = min(len(buffer), len(data))
            buffer[:n] = data[:n]
            self._data = data[n:]
            return n
        return self._raw.readinto(buffer)


def answer_and_close(target: Union[dict, "Handler"], response: bytes) -> None:
    """Write a complete error response (403, 408, 413...) and end the connection.

    ``target`` is the request's environ or pywsgi handler. The application's
    response is dropped, the unread request body is not drained, and when the
    application returns the connection closes gracefully: FIN after the
    response, then the client's input is read and dropped (bounded) until it
    closes too, so the client reads the response even if it was still sending.
    """
    handler = target.get(HANDLER_KEY) if isinstance(target, dict) else target
    if handler is None or handler.socket is None:
        return
    handler.environ[RESPONDED_KEY] = "close"
    handler.close_connection = True
    try:
        handler.socket.sendall(response)
    except OSError:
        pass


def _close_gracefully(sock: Any, response: bytes = b"") -> None:
    """Send ``response``, then FIN; drain the client's input (bounded); close.

    The one way every connection that answered something ends: closing with
    unread input makes the kernel reset the connection, which can destroy the
    response before the client reads it.
    """
    try:
        if response:
            sock.sendall(response)
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        with Timeout(_LINGER_SECONDS, False):
            while drained < _LINGER_BYTES:
                data = sock.recv(65536)
                if not data:
                    break
                drained += len(data)
    except OSError:
        pass
    _close(sock)


def _close(sock: Any) -> None:
    # The real socket first: pywsgi's buffered reader holds a reference that
    # would keep gevent's wrapper from closing it.
    try:
        raw = getattr(sock, "_sock", None)
        if raw is not None:
            raw.close()
        sock.close()
    except OSError:
        pass


class _NoInput:
    """Stands for the request body once the connection is closing: nothing to discard."""

    def _discard(self) -> None:
        pass


_NO_INPUT = _NoInput()


class _WSGIServer(pywsgi.WSGIServer):
    handler_class = Handler
    greenchan: "Server"
    # Set while accept() fails for want of descriptors: the pause before retrying.
    _accept_retry: Optional[float] = None
    _retry_timer: Any = None

    def do_read(self) -> Any:
        """Accept one connection; on EMFILE and kin, pause accepting and retry.

        gevent would log a traceback for every failed accept(); running out of
        file descriptors is an overload, not a bug: warn once, back off (the
        clients wait in the listen backlog), and say when accepting resumes.
        """
        try:
            args = super().do_read()
        except OSError as exc:
            if exc.errno not in _ACCEPT_EXHAUSTED:
                raise
            self._pause_accepting(exc)
            return None
        if args and self._accept_retry is not None:
            self._accept_retry = None
            log.warning("accepting connections again")
        return args

    def _pause_accepting(self, exc: OSError) -> None:
        if self._accept_retry is None:
            self._accept_retry = _ACCEPT_RETRY_MIN
            log.warning("cannot accept connections (%s): retrying until descriptors free up", exc.strerror)
        else:
            self._accept_retry = min(_ACCEPT_RETRY_MAX, self._accept_retry * 2)
        self.stop_accepting()
        self._retry_timer = self.loop.timer(self._accept_retry)
        self._retry_timer.start(self._retry_accepting)

    def _retry_accepting(self) -> None:
        self._retry_timer = None
        if self.started and not self.closed:
            self.start_accepting()

    def stop_accepting(self) -> None:
        super().stop_accepting()
        if self._retry_timer is not None:
            self._retry_timer.stop()
            self._retry_timer.close()
            self._retry_timer = None


class Server:
    """greenchan's gevent WSGI server.

    ``Server(app, host, port, **options)``; ``start()`` serves in the background,
    ``serve_forever()`` blocks until ``stop()`` or SIGTERM/SIGINT. As a context
    manager it starts on entry and stops on exit. The options are API.md's.
    """

    def __init__(self, app: Callable, host: str = "127.0.0.1", port: int = 9090, **options: Any) -> None:
        self.app = app
        self.host = host
        self.options = Options.build(options)
        self._requested_port = port
        self._wsgi: Optional[_WSGIServer] = None
        self._channels: Set[Any] = set()
        self._handlers: Set[Handler] = set()
        self._connections = 0
        self._stopped = _Flag()
        self.status = "stopped"

    # -- life cycle ------------------------------------------------------------

    def start(self) -> "Server":
        """Bind and serve in the background; return the server."""
        if self._wsgi is not None:
            return self
        wsgi = _WSGIServer(
            (self.host, self._requested_port),
            self.app,
            spawn=Pool(),
            log=None,
            error_log=_ErrorLog(),
        )
        wsgi.greenchan = self
        wsgi.init_socket()
        wsgi.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        wsgi.start()
        self._wsgi = wsgi
        self._stopped.clear()
        self.status = "running"
        counters.stopping = False
        log.info("greenchan serving on http://%s:%d/", self.host, self.port)
        return self

    @property
    def port(self) -> int:
        """The bound port (the real one when started with ``port=0``)."""
        if self._wsgi is None:
            return self._requested_port
        return self._wsgi.server_port

    def serve_forever(self) -> None:
        """Start if needed and block until stopped; SIGTERM and SIGINT stop gracefully."""
        self.start()
        handlers = [gevent.signal_handler(sig, self._stop_on_signal, sig) for sig in (signal.SIGTERM, signal.SIGINT)]
        try:
            self._stopped.wait()
        finally:
            for handler in handlers:
                handler.cancel()

    def _stop_on_signal(self, sig: int) -> None:
        log.info("received %s, stopping", signal.Signals(sig).name)
        gevent.spawn(self.stop)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every channel (WebSockets with 1001), wait, cut the rest."""
        wsgi = self._wsgi
        if wsgi is None or self.status != "running":
            if self.status == "stopping":
                self._stopped.wait()
            return
        self.status = "stopping"
        wsgi.close()
        self._close_all([wsgi.pool], timeout)
        self._wsgi = None
        self.status = "stopped"
        self._stopped.set()
        gevent.sleep(0)  # let the on_close greenlets that were just scheduled run

    def _close_all(self, pools: list, timeout: float, tick: Optional[Callable[[], Any]] = None) -> None:
        """The graceful part of ``stop()``, shared with the gunicorn worker.

        The listening sockets are already closed. Close every channel (WebSockets
        with 1001, HTTP channels end their response), then wait up to ``timeout``
        for the handlers in ``pools`` and for WebSocket close handshakes, then cut
        what is left. ``tick()`` runs about once a second while waiting (gunicorn's
        worker must keep telling its master that it is alive).
        """
        counters.stopping = True  # the health check answers 503 from now on
        # Sessions before their carriers: a session acknowledges what its client sent
        # before it ends the client's WebSocket (sessions.py, Session.shutdown).
        for channel in sorted(self._channels, key=lambda c: c.session is None):
            channel._transport.shutdown()
        for handler in list(self._handlers):
            if handler._idle:  # an idle keep-alive connection: nothing to wait for
                handler._greenlet.kill(block=False)
        deadline = time.monotonic() + timeout
        for pool in pools:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or pool.join(timeout=min(left, 1.0)):
                    break
                if tick is not None:
                    tick()
        # Handlers that returned may leave WebSockets in their close handshake:
        # let the clients answer the 1001, within the same deadline.
        while self._channels and time.monotonic() < deadline:
            gevent.sleep(0.05)
        running = [handler for pool in pools for handler in pool]
        if running or self._channels:
            log.warning(
                "stop: cutting %d handler(s) and %d channel(s) still open after %s s: %s",
                len(running), len(self._channels), timeout, sorted(map(repr, self._channels))[:10],
            )
        for channel in list(self._channels):
            channel._transport.abort()
        for pool in pools:
            pool.kill(block=True, timeout=1)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    # -- bookkeeping for transports ------------------------------------------

    def _register(self, channel: Any) -> None:
        self._channels.add(channel)

    def _unregister(self, channel: Any) -> None:
        self._channels.discard(channel)

    def _admit(self) -> bool:
        limit = self.options.max_connections
        if limit is not None and self._connections >= limit:
            counters.reject("max_connections")
            log.warning("max_connections (%d) reached: answering 503", limit)
            return False
        self._connections += 1
        return True

    def _release(self) -> None:
        self._connections -= 1

    def __repr__(self) -> str:
        return f"<greenchan.Server {self.host}:{self.port} {self.status}>"


class _ErrorLog:
    """pywsgi's error log, routed to logging instead of stderr."""

    def write(self, message: str) -> None:
        message = message.strip()
        if message:
            log.error("%s", message)

    def flush(self) -> None:
        pass


def run_server(app: Callable, **options: Any) -> Server:
    """Start a ``Server`` in the background and return it."""
    return Server(app, **options).start()
