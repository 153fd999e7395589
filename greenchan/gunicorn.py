"""greenchan's gunicorn worker: ``gunicorn -k greenchan.gunicorn.Worker -w 4 app:app``.

gunicorn's gevent pywsgi worker, with greenchan's request handler (so a channel
can take its socket over) and greenchan's graceful stop: on SIGTERM, on
``--max-requests`` and on a reload, every WebSocket gets close 1001, every HTTP
channel ends, every ``on_close`` runs, and handlers get ``--graceful-timeout``
seconds to finish before what is left is cut. SIGINT and SIGQUIT (gunicorn's
quick shutdown) do the same within about a second.

Server options come from ``GREENCHAN_<OPTION>`` environment variables, which
gunicorn passes on from its own environment, from ``--env`` / ``raw_env``, or
from a config file that sets ``os.environ``::

    gunicorn -k greenchan.gunicorn.Worker -w 4 \\
        --env GREENCHAN_PING_INTERVAL=30 --env GREENCHAN_ORIGINS=https://example.com app:app

gunicorn's ``--worker-connections`` (default 1000) bounds the connections of
each worker, WebSockets included: raise it for many idle WebSockets, or set
``GREENCHAN_MAX_CONNECTIONS`` below it so that clients over the limit get a
503 with ``Retry-After`` instead of waiting in the accept queue.

greenchan's log records (the ``greenchan`` logger and its children) go to
gunicorn's error log, with its format, its destination (``--error-logfile``,
syslog) and its level (``--log-level``). A ``greenchan`` logger that the
application or a ``--log-config`` gave handlers of its own is left alone.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, List, Optional

import gevent
from gevent.event import Event as _Flag
from gevent.pool import Pool
from gunicorn.http.wsgi import base_environ
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import VERSION, GeventPyWSGIWorker, PyWSGIHandler, PyWSGIServer

from . import server as _server
from .__main__ import options_from_environ

__all__ = ["Worker"]

# gunicorn's quick shutdown (SIGINT, SIGQUIT) waits this long for close handshakes.
QUICK_STOP_TIMEOUT = 1.0


class Handler(_server.Handler, PyWSGIHandler):
    """greenchan's handler with gunicorn's access log, environ keys and max_requests."""

    def get_environ(self) -> dict:
        env = super().get_environ()
        # pywsgi serves the requests of a keep-alive connection itself, so gunicorn
        # never counts them: count here for --max-requests.
        worker = self.server.worker
        worker.nr += 1
        if worker.nr >= worker.max_requests and worker.alive:
            worker.log.info("Autorestarting worker after current request.")
            worker.alive = False
        return env

    def log_request(self) -> None:
        if self.status is None:  # a channel wrote its own response
            self.status = "101 Switching Protocols" if self.environ.get(_server.UPGRADE_KEY) else "-"
        PyWSGIHandler.log_request(self)


_LOGGER = logging.getLogger("greenchan")


def _route_logging(glog: Any) -> List[logging.Handler]:
    """Send the ``greenchan`` logger tree to gunicorn's error log; returns the handlers added.

    Without this, greenchan's records reach no handler in a gunicorn worker
    (gunicorn configures only its own loggers): WARNING and above print through
    logging's last resort, bare, with no time, level or pid, and INFO never shows,
    whatever ``--log-level`` says. The handlers are gunicorn's own objects, so
    format and destination follow gunicorn's configuration; ``propagate`` is off
    so that a root handler (an application's ``basicConfig``) does not print
    every record a second time.
    """
    if _LOGGER.handlers:  # configured by a --log-config / logconfig_dict: theirs
        return []
    error_log = getattr(glog, "error_log", None) or logging.getLogger("gunicorn.error")
    handlers = list(error_log.handlers)
    if not handlers:  # gunicorn's error log itself goes through the root logger
        return []
    for handler in handlers:
        _LOGGER.addHandler(handler)
    if _LOGGER.level == logging.NOTSET:
        _LOGGER.setLevel(error_log.getEffectiveLevel())
    _LOGGER.propagate = False
    return handlers


class _WSGIServer(PyWSGIServer):
    greenchan: _server.Server
    worker: "Worker"


class Worker(GeventPyWSGIWorker):
    """gunicorn's gevent (pywsgi) worker, serving greenchan channels and stopping them gracefully.

    Monkey-patching is gunicorn's: ``GeventWorker.init_process`` calls
    ``patch_all()`` and reinitialises the hub before it imports the application.
    """

    server_class = _WSGIServer
    wsgi_handler = Handler

    greenchan: _server.Server
    _servers: List[_WSGIServer] = []
    _stopped: Optional[_Flag] = None

    def load_wsgi(self) -> None:
        routed = _route_logging(self.log)
        super().load_wsgi()
        if routed and len(_LOGGER.handlers) > len(routed):
            # The application configured the greenchan logger itself while it
            # was imported: its handlers win, ours would print every record twice.
            for handler in routed:
                _LOGGER.removeHandler(handler)
            _LOGGER.propagate = True
        # Read in the worker, after gunicorn applied --env / raw_env.
        self.greenchan = _server.Server(self.wsgi, **options_from_environ())
        self.greenchan.status = "running"

    def run(self) -> None:
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for sock in self.sockets:
            sock.setblocking(1)
            environ = base_environ(self.cfg)
            environ.update({"wsgi.multithread": True, "SERVER_SOFTWARE": VERSION})
            wsgi = self.server_class(
                sock, application=self.wsgi, spawn=Pool(self.worker_connections), log=self.log,
                handler_class=self.wsgi_handler, environ=environ, **ssl_args,
            )
            wsgi.greenchan = self.greenchan
            wsgi.worker = self
            wsgi.start()
            servers.append(wsgi)
        self._servers = servers
        while self.alive:
            self.notify()
            gevent.sleep(0.5)
        self._stop(self.cfg.graceful_timeout)

    def _stop(self, timeout: float) -> None:
        """Stop accepting, close every channel (1001), wait up to ``timeout``, cut the rest."""
        if self._stopped is not None:  # a quick stop and the main loop may both get here
            self._stopped.wait()
            return
        self._stopped = _Flag()
        server = self.greenchan
        server.status = "stopping"
        log = _server.log
        log.info("worker %s stopping: closing %d channel(s)", self.pid, len(server._channels))
        for wsgi in self._servers:
            wsgi.close()
        server._close_all([wsgi.pool for wsgi in self._servers], timeout, tick=self.notify)
        server.status = "stopped"
        gevent.sleep(0)  # let the on_close greenlets just scheduled run
        self._stopped.set()

    def handle_quit(self, sig: int, frame: Any) -> None:
        # Quick shutdown (SIGINT, SIGQUIT): still 1001 and every on_close, but
        # wait only briefly for the clients. Out of the signal handler, as gunicorn does.
        def quit() -> None:
            self.alive = False
            if getattr(self, "greenchan", None) is not None:
                self._stop(min(QUICK_STOP_TIMEOUT, self.cfg.graceful_timeout))
            self.cfg.worker_int(self)
            sys.exit(0)

        gevent.spawn(quit)
