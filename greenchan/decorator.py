"""with_channel: a handler becomes a WSGI app, a Flask view or a Bottle route."""
from __future__ import annotations

import functools
import io
import logging
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, overload

from gevent.timeout import Timeout

from . import counters
from .channel import Channel, run_handler
from .http import HttpTransport, body_message, has_body, read_body
from .options import ROUTE_OPTIONS
from .server import HANDLER_KEY, RESPONDED_KEY, SERVER_KEY, answer_and_close
from .origin import check_origin
from .sessions import serve as serve_session, session_params
from .websocket import WebSocketTransport, wants_upgrade
from .wire import http_response

__all__ = ["with_channel"]

log = logging.getLogger("greenchan")

Handler = Callable[..., Any]

if TYPE_CHECKING:  # typing only: ParamSpec is in typing from 3.10, and greenchan runs on 3.9
    from _typeshed.wsgi import StartResponse, WSGIEnvironment
    from typing_extensions import Concatenate, ParamSpec, Protocol

    P = ParamSpec("P")

    class ChannelView(Protocol[P]):
        """What ``with_channel`` returns: a WSGI application, and a view of the route's arguments."""

        greenchan_handler: Callable[..., object]

        @overload
        def __call__(self, environ: WSGIEnvironment, start_response: StartResponse, /) -> Iterable[bytes]: ...
        @overload
        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any: ...


class _BodyTimeout(Exception):
    """The request body did not arrive within ``handshake_timeout``."""


@overload
def with_channel(handler: Callable[Concatenate[Channel, P], object]) -> ChannelView[P]: ...
@overload
def with_channel(
    handler: None = None,
    *,
    subprotocols: Optional[Sequence[str]] = ...,
    origins: Optional[Sequence[str]] = ...,
    max_message_size: Optional[int] = ...,
    ping_interval: Optional[float] = ...,
    ping_timeout: Optional[float] = ...,
) -> Callable[[Callable[Concatenate[Channel, P], object]], ChannelView[P]]: ...


def with_channel(handler: Optional[Handler] = None, **options: Any) -> Any:
    """Turn ``handler(channel, *args, **kwargs)`` into a WSGI app or a framework view.

    Use it bare (``@with_channel``) or with per-route options
    (``@with_channel(subprotocols=["chat.v1"])``): ``subprotocols``, ``origins``,
    ``max_message_size``, ``ping_interval``, ``ping_timeout``. Under Flask or
    Bottle put it below the route decorator; route arguments arrive as keyword
    arguments and the framework's ``request`` works while the handler runs.
    """
    unknown = set(options) - ROUTE_OPTIONS
    if unknown:
        raise TypeError(
            f"with_channel() got unknown option(s) {sorted(unknown)}; per-route options "
            f"are {sorted(ROUTE_OPTIONS)} (set the others on the server)"
        )
    if handler is None:
        return lambda fn: with_channel(fn, **options)
    if not callable(handler):
        raise TypeError("with_channel() decorates a function: @with_channel or @with_channel(...)")

    @functools.wraps(handler)
    def app(*args: Any, **kwargs: Any) -> Any:
        if len(args) == 2 and not kwargs and isinstance(args[0], dict) and "wsgi.version" in args[0]:
            return _serve(args[0], args[1], handler, (), {}, options)
        environ = _framework_environ()
        result = _serve(environ, None, handler, args, kwargs, options)
        if callable(result):  # under a foreign server: a WSGI app, which Flask runs
            return result
        return ""  # the channel wrote the response; greenchan's server drops this one

    app.greenchan_handler = handler  # type: ignore[attr-defined]
    return app


def _framework_environ() -> dict:
    """The environ of the Flask or Bottle request being served."""
    flask = sys.modules.get("flask")
    if flask is not None and flask.has_request_context():
        return flask.request.environ
    bottle = sys.modules.get("bottle")
    if bottle is not None:
        try:
            return bottle.request.environ
        except RuntimeError:
            pass
    raise TypeError(
        "a with_channel app is called as a WSGI app (environ, start_response), or as "
        "a Flask or Bottle view inside a request; this call was neither"
    )


def _serve(environ: dict, start_response: Optional[Callable], handler: Handler, args: tuple, kwargs: dict, route_options: dict) -> Iterable[bytes]:
    server = environ.get(SERVER_KEY)
    pywsgi_handler = environ.get(HANDLER_KEY)
    if server is None or pywsgi_handler is None:
        return _unsupported(environ, start_response, handler, args, kwargs, route_options)
    options = server.options.replace(**route_options)
    refusal = check_origin(environ, options.origins)
    if refusal is not None:
        status, headers = refusal
        return _respond(environ, status, "Origin not allowed\n" if status == 403 else "", headers)
    if wants_upgrade(environ):
        transport: Any = WebSocketTransport(environ, pywsgi_handler, server, options)
        if not transport.valid:
            response = transport.response
            return _respond(environ, response.status_code, response.body, list(response.headers.raw_items()))
        channel = Channel(environ, transport, True, options.max_queue)
    else:
        body: Optional[bytes] = b""
        if has_body(environ):
            try:
                # A body that trickles in holds a connection slot: the deadline of
                # the headers bounds it too (the slowloris of request bodies).
                with Timeout(options.handshake_timeout, _BodyTimeout):
                    body = read_body(environ, options.max_body)
            except _BodyTimeout:
                counters.reject("handshake_timeout")
                log.debug("request body not received within %s s: 408", options.handshake_timeout)
                return _respond(environ, 408, "Request body not received in time\n")
        if body is None:
            counters.reject("max_body")
            return _respond(environ, 413, "Request body too large\n")
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        transport = HttpTransport(environ, pywsgi_handler, server, options)
        channel = Channel(environ, transport, False, options.max_queue)
        if body:
            channel._deliver(body_message(environ, body))
    transport.channel = channel
    server._register(channel)
    if not channel.is_websocket:
        transport.watch()
    params = session_params(environ)
    if params is None:
        run_handler(channel, handler, args, kwargs)
    else:  # a greenchan.js session: this request carries it (sessions.py)
        run_handler(channel, serve_session, (handler, server, options, params, args, kwargs), {})
    if channel.is_websocket:
        if channel.is_open:
            transport.accept_now()
    else:
        transport.wait_done()
    environ.setdefault(RESPONDED_KEY, "close")
    return []


def _respond(environ: dict, status: int, body: Any, headers: Optional[list] = None) -> Iterable[bytes]:
    """Answer a plain response before any channel exists (403, 400, 413)."""
    headers = [(k, v) for k, v in (headers or []) if k.lower() not in ("content-length", "connection")]
    answer_and_close(environ, http_response(status, headers, body, close=True))
    return []


def _unsupported(environ: dict, start_response: Optional[Callable], handler: Handler, args: tuple, kwargs: dict, route_options: dict) -> Any:
    """Not greenchan's server: gevent-websocket's ws, or a WSGI response iterator
    (see geventwebsocket.py); a Bottle route has no way to return one."""
    flask = sys.modules.get("flask")
    if start_response is not None or environ.get("wsgi.websocket") is not None or (
        flask is not None and flask.has_request_context()
    ):
        from .geventwebsocket import serve_foreign

        return serve_foreign(environ, start_response, handler, args, kwargs, route_options)
    software = environ.get("SERVER_SOFTWARE", "an unknown WSGI server")
    message = (
        "greenchan channels need greenchan's server (greenchan.Server, the greenchan "
        "command) or its gunicorn worker (gunicorn -k greenchan.gunicorn.Worker); "
        f"this request came through {software}"
    )
    log.error("%s", message)
    if start_response is None:
        raise RuntimeError(message)
    start_response("500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")])
    return [message.encode() + b"\n"]
