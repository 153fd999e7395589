"""The gevent server: a pywsgi handler that lets a channel take over its socket.

``gevent.pywsgi`` parses requests and runs the WSGI application; greenchan's
handler adds what a channel needs on top: the socket and this handler in the
environ (so a WebSocket can take the connection over and an HTTP channel can
write its own response), a deadline on reading request headers, the connection
limit, and a registry of open channels so ``stop()`` can close each one.
"""
from __future__ import annotations

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


class _HeaderDeadline(Timeout):
    """The client took longer than ``handshake_timeout`` to send its headers."""


class Handler(pywsgi.WSGIHandler):
    """pywsgi's handler, with the socket exposed so a channel can take it over."""

    _deadline: Optional[Timeout] = None
    _detached = False
    # True while waiting for a request line: an idle keep-alive connection,
    # which stop() may cut at once.
    _idle = False

    def handle(self) -> None:
        server: "Server" = self.server.greenchan
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


class _WSGIServer(pywsgi.WSGIServer):
    handler_class = Handler
    greenchan: "Server"


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
        left = [handler for pool in pools for handler in pool]
        if left or self._channels:
            log.warning(
                "stop: cutting %d handler(s) and %d channel(s) still open after %s s: %s",
                len(left), len(self._channels), timeout, sorted(map(repr, self._channels))[:10],
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
