"""Serve greenchan's browser client, ``greenchan.js``, with one line.

Plain WSGI (a dispatch on ``PATH_INFO``)::

    import greenchan.static
    if environ["PATH_INFO"] == "/greenchan.js":
        return greenchan.static.javascript(environ, start_response)

Flask::

    app.add_url_rule("/greenchan.js", view_func=greenchan.static.javascript)

Bottle::

    app.route("/greenchan.js", callback=greenchan.static.javascript)

``javascript`` is a WSGI application and also a zero-argument view: called with no
arguments it returns itself, and Flask runs a returned WSGI application with the
request's environ; as the callback of the Bottle route being served it returns a
``bottle.HTTPResponse`` instead, because Bottle cannot run a returned WSGI
application (it answered 500, logging nothing). Either way the answer carries
``ETag``, ``Last-Modified`` and ``Cache-Control: public, max-age=3600``, and a
conditional request that matches gets ``304 Not Modified``.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import sys
import threading
from collections.abc import Iterable
from typing import Any, Callable

__all__ = ["JAVASCRIPT_PATH", "StaticFile", "javascript"]

#: Where the client lives inside the installed package.
JAVASCRIPT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "greenchan.js")

StartResponse = Callable[..., Any]


class StaticFile:
    """A WSGI application (and zero-argument Flask view) that serves one file.

    The file is read once and read again only when its modification time or size
    changes, so an edited file is picked up without a restart and an unchanged one
    costs a ``stat`` per request.
    """

    def __init__(self, path: str, content_type: str, max_age: int = 3600, name: str = "static_file") -> None:
        self.path = path
        self.content_type = content_type
        # An hour: long enough to spare the server the requests of a busy page,
        # short enough that a deploy reaches every browser the same afternoon.
        # Revalidation with the ETag is cheap (304, no body) after that.
        self.max_age = max_age
        # Flask takes a view's endpoint name from __name__.
        self.__name__ = name
        self._lock = threading.Lock()
        self._key: tuple[float, int] | None = None
        self._body = b""
        self._etag = ""
        self._last_modified = ""
        self._mtime = 0

    def _load(self) -> tuple[bytes, str, str, int]:
        st = os.stat(self.path)
        key = (st.st_mtime, st.st_size)
        with self._lock:
            if key != self._key:
                with open(self.path, "rb") as f:
                    body = f.read()
                self._body = body
                self._etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
                self._mtime = int(st.st_mtime)
                self._last_modified = email.utils.formatdate(self._mtime, usegmt=True)
                self._key = key
            return self._body, self._etag, self._last_modified, self._mtime

    def _not_modified(self, environ: dict, etag: str, mtime: int) -> bool:
        # RFC 9110 13.1.2: If-None-Match wins over If-Modified-Since when present,
        # and compares weakly (a W/ prefix from a proxy still matches).
        inm = environ.get("HTTP_IF_NONE_MATCH")
        if inm is not None:
            tags = [t.strip() for t in inm.split(",")]
            return "*" in tags or etag in [t.removeprefix("W/") for t in tags]
        ims = environ.get("HTTP_IF_MODIFIED_SINCE")
        if ims:
            try:
                since = email.utils.parsedate_to_datetime(ims).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                return False
            return mtime <= since
        return False

    def __call__(self, environ: dict | None = None, start_response: StartResponse | None = None) -> Any:
        if environ is None and start_response is None:
            bottle_environ = self._bottle_environ()
            if bottle_environ is not None:
                return self._bottle_response(bottle_environ)
            # Called as a zero-argument view (Flask): hand back the WSGI app,
            # which the framework then calls with the request's environ.
            return self
        if environ is None or start_response is None:
            raise TypeError(
                "StaticFile is called as app(environ, start_response), or with no arguments as a view"
            )
        return self.wsgi(environ, start_response)

    def _bottle_environ(self) -> dict | None:
        """The environ of the Bottle request whose route callback is this file, else None."""
        bottle = sys.modules.get("bottle")  # imported by the application, if it uses Bottle
        if bottle is None:
            return None
        flask = sys.modules.get("flask")
        if flask is not None and flask.has_request_context():
            return None
        try:
            environ = bottle.request.environ
        except RuntimeError:  # no Bottle request in this thread or greenlet
            return None
        # Only for the route being served now: a greenlet keeps its last Bottle
        # request bound after it (hence the Flask check above, too).
        route = environ.get("bottle.route")
        return environ if route is not None and route.callback is self else None

    def _bottle_response(self, environ: dict) -> Any:
        """This file's answer to ``environ`` as a ``bottle.HTTPResponse``."""
        import bottle

        answer: dict = {}

        def start_response(status: str, headers: list, exc_info: Any = None) -> None:
            answer["status"], answer["headers"] = status, headers

        body = b"".join(self.wsgi(environ, start_response))
        return bottle.HTTPResponse(body, status=answer["status"], headers=answer["headers"])

    def wsgi(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        """Answers one request for the file."""
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
            return [b""]
        try:
            body, etag, last_modified, mtime = self._load()
        except OSError:
            msg = b"greenchan: %s is missing from the installed package; reinstall greenchan" % os.fsencode(
                self.path
            )
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(msg)))],
            )
            return [msg]
        headers: list[tuple[str, str]] = [
            ("ETag", etag),
            ("Last-Modified", last_modified),
            ("Cache-Control", f"public, max-age={self.max_age}"),
        ]
        if self._not_modified(environ, etag, mtime):
            start_response("304 Not Modified", headers)
            return [b""]
        headers += [("Content-Type", self.content_type), ("Content-Length", str(len(body)))]
        start_response("200 OK", headers)
        return [b""] if method == "HEAD" else [body]


#: ``greenchan.js``, ready to mount at any URL.
javascript = StaticFile(JAVASCRIPT_PATH, "application/javascript; charset=utf-8", name="greenchan_js")
