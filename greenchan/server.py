"""The gevent server: a pywsgi handler that lets a channel take over its socket.

``gevent.pywsgi`` parses requests and runs the WSGI application; greenchan's
handler adds what a channel needs on top: the socket and this handler in the
environ (so a WebSocket can take the connection over and an HTTP channel can
write its own response), a deadline on reading request headers, the connection
limit, and a registry of open channels so ``stop()`` can close each one.
"""
from __future__ import annotations

import email.parser
import errno
import logging
import signal
import socket
import time
from typing import Any, Callable, Optional, Set

import gevent
from gevent import pywsgi
from gevent.event import Event as _Flag
from gevent.pool import Pool
from gevent.timeout import Timeout

from .options import Options

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


_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 12\r\nConnection: close\r\n\r\nBad request\n"
)
_HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 32\r\nConnection: close\r\n\r\nRequest header fields too large\n"
)

# At most this many request header lines, as http.client allows; past it
# pywsgi printed a traceback, greenchan answers 431.
MAX_HEADERS = 100

# After an error response (400, 414, 431), how long and how much of the
# client's unread input is discarded before the socket closes: closing with
# unread input makes the kernel send a reset, which can destroy the response
# before the client reads it. Bounded so that junk cannot hold a greenlet.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20

# accept() errors that mean "out of descriptors or memory for now": the
# accept loop pauses and retries instead of logging a traceback per attempt.
_ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_RETRY_MIN, _ACCEPT_RETRY_MAX = 0.05, 1.0


class _HeaderDeadline(Timeout):
    """The client took longer than ``handshake_timeout`` to send its headers."""


class _HeadersTooLarge(ValueError):
    """The request headers passed ``max_header_size`` bytes or ``MAX_HEADERS`` lines."""


class Handler(pywsgi.WSGIHandler):
    """pywsgi's handler, with the socket exposed so a channel can take it over."""

    # pywsgi's attributes, typed here for mypy (None once the handler is done).
    socket: Any
    close_connection: bool
    _deadline: Optional[Timeout] = None
    _detached = False
    # True while waiting for a request line: an idle keep-alive connection,
    # which stop() may cut at once.
    _idle = False

    def handle(self) -> None:
        server: "Server" = self.server.greenchan
        try:  # once per connection: every channel send is a message to deliver now
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        if not server._admit():
            try:
                self.socket.sendall(_UNAVAILABLE)
                self.socket.close()
            except OSError:
                pass
            return
        self._greenlet = gevent.getcurrent()
        server._handlers.add(self)
        try:
            super().handle()
        except _HeaderDeadline:
            log.debug("closing %s: request headers not received in time", self.client_address)
        finally:
            self._cancel_deadline()
            server._handlers.discard(self)
            if not self._detached:
                server._release()

    def read_requestline(self) -> str:
        timeout = self.server.greenchan.options.handshake_timeout
        if timeout:
            self._deadline = _HeaderDeadline.start_new(timeout)
        self._idle = True
        try:
            return super().read_requestline()
        finally:
            self._idle = False

    def read_request(self, raw_requestline: str) -> bool:
        # pywsgi takes "GET /" as HTTP/0.9 and then waits for headers that an
        # HTTP/0.9 client never sends; nothing speaks HTTP/0.9 any more: 400.
        if len(raw_requestline.split()) == 2:
            raise ValueError(f"HTTP/0.9 request line {raw_requestline.strip()[:100]!r}")
        return super().read_request(raw_requestline)

    def MessageClass(self, fp: Any, *args: Any) -> Any:
        """Read the request headers within ``max_header_size`` and ``MAX_HEADERS``.

        pywsgi (through ``http.client``) reads up to 100 lines of 64 KiB each, and
        prints a traceback past 100 lines; the whole block is bounded here instead.
        """
        limit = self.server.greenchan.options.max_header_size
        lines = []
        size = 0
        while True:
            line = fp.readline(limit - size + 1)
            size += len(line)
            if size > limit:
                raise _HeadersTooLarge(f"request headers larger than {limit} bytes")
            if line in (b"\r\n", b"\n", b""):
                break
            lines.append(line)
            if len(lines) > MAX_HEADERS:
                raise _HeadersTooLarge(f"more than {MAX_HEADERS} request headers")
        text = b"".join(lines).decode("iso-8859-1")
        return email.parser.Parser(_class=pywsgi.OldMessage).parsestr(text)

    def _handle_client_error(self, ex: Exception) -> tuple:
        """A malformed request is the client's problem: answer it, log below ERROR."""
        if isinstance(ex, _HeadersTooLarge):
            log.info("431 to %s: %s", self.client_address, ex)
            return ("431", _HEADERS_TOO_LARGE)
        log.debug("400 to %s: %s", self.client_address, ex)
        return ("400", _BAD_REQUEST)

    def handle_one_request(self) -> Any:
        result = super().handle_one_request()
        if isinstance(result, tuple):  # an error response for a request we could not parse
            self._cancel_deadline()
            self.status = result[0]
            self._answer_and_linger(result[1])
            return None
        return result

    def _answer_and_linger(self, response: bytes) -> None:
        sock = self.socket
        try:
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
        return env

    def run_application(self) -> None:
        env = self.environ
        try:
            self.result = self.application(env, self.start_response)
            if not env.get(RESPONDED_KEY):
                self.process_result()
        finally:
            close = getattr(self.result, "close", None)
            self.result = None
            if close is not None:
                close()
        if env.get(RESPONDED_KEY):
            self.close_connection = self.close_connection or env[RESPONDED_KEY] == "close"
        if self.close_connection:
            # pywsgi would now read and discard the rest of the request body, with
            # no limit and no deadline (a 413 for "Content-Length: 10**20" would
            # wait for all of it); the connection closes, so there is no need.
            self.wsgi_input = _NO_INPUT

    def detach(self) -> Any:
        """Give up the socket: pywsgi will neither read nor close it again."""
        sock = self.socket
        self._detached = True
        self.close_connection = True
        self.environ[RESPONDED_KEY] = "close"
        self.socket = None
        return sock

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

    def log_request(self) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", self.format_request())


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
        for channel in list(self._channels):
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
