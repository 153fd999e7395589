"""A client for testing greenchan handlers, in the manner of Flask's test client.

It drives a real greenchan ``Server`` over real sockets, so what a test sees is
what a browser or a curl would::

    from greenchan import with_channel
    from greenchan.testing import TestClient

    @with_channel
    def app(channel):
        channel.send("welcome")
        channel.on_receive(lambda message: channel.send("echo:" + message))

    for transport in ("websocket", "sse", "longpoll"):
        with TestClient(app, transport=transport) as client:
            assert client.receive() == "welcome"
            client.send("hi")
            assert client.receive() == "echo:hi"

Given a WSGI application (a ``with_channel`` handler, a Flask or Bottle app) it
starts a ``Server`` on a free port of 127.0.0.1 and stops it when the client
closes; given a running ``Server`` or a base URL it connects to that, so several
clients can share one server (group broadcasts).

**Sessions (the default).** Over ``"websocket"``, ``"sse"`` and ``"longpoll"``
the client speaks greenchan.js's session wire (docs/sessions.md): a ``gc_cid``,
the hello, frame counting and acknowledgements, numbered POSTs. So the handler
runs once for the client, and ``send`` / ``receive`` behave the same over every
transport. ``drop()`` cuts the connection as a network failure would and
``reconnect()`` resumes the session, on the same or another transport. A message
the server refuses (a POST answered 413, a WebSocket closed with 1009) is
dropped and the next ones take its number, as greenchan.js does.

**Plain mode** (``session=False``, and always for ``transport="http"``): what
an http-kit style client does. A plain WebSocket; a plain SSE stream (one GET,
``send`` POSTs); plain long-polling (a GET after another, each one a new run of
the handler; ``send`` POSTs); or ``"http"``: one request (``method``, ``body``)
whose response body arrives through ``receive``.

**gevent.** No monkey-patching is needed: the client uses gevent's sockets and
greenlets itself, and an in-process server runs whenever the test waits in the
client (``receive``, ``send``, ``close``, ``wait_for``) or in ``gevent.sleep``.
Without monkey-patching, do not block the thread otherwise (``time.sleep``, an
unpatched ``requests`` call) while the server has work to do. greenchan's own
tests run monkey-patched (tests/conftest.py), where anything goes.
"""
from __future__ import annotations

import base64
import collections
import json
import os
import re
import time
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union
from urllib.parse import urlencode, urlsplit

import gevent
import gevent.event
import gevent.lock
from gevent import socket
from websockets.client import ClientProtocol
from websockets.datastructures import Headers
from websockets.exceptions import InvalidState
from websockets.frames import Opcode
from websockets.http11 import Response as _HandshakeResponse
from websockets.uri import parse_uri

from .channel import Channel, ChannelClosed, CloseStatus, Event
from .http import body_message
from .server import Server

__all__ = ["TestClient", "Rejected", "Response", "wait_for"]

Message = Union[str, bytes]
HeadersLike = Union[Mapping[str, str], Iterable[Tuple[str, str]], None]

TRANSPORTS = ("websocket", "sse", "longpoll", "http")

# Marks the requests that carry this client's channel, so that ``client.channel``
# can find the server's Channel for a plain client (sessions are found by id).
_TOKEN_HEADER = "X-Greenchan-Test-Client"
_TOKEN_ENVIRON = "HTTP_X_GREENCHAN_TEST_CLIENT"

# greenchan.js's acknowledgement policy (docs/sessions.md), so the server sees
# what it sees from browsers: every 8 frames, or soon after the first one.
_ACK_EVERY = 8
_ACK_DELAY = {"websocket": 0.2, "sse": 0.5}

# A plain long-poll answered with nothing (204) polls again after this pause,
# so that a server that answers at once is not hammered in a tight loop.
_EMPTY_POLL_PAUSE = 0.05

# Client states: open, lost (the connection ended without a close; a session
# can be resumed with reconnect()), closed (by either side, for good).
_OPEN, _LOST, _CLOSED = "open", "lost", "closed"


class Rejected(Exception):
    """The server answered an HTTP error instead of a channel (403, 404, 500...).

    Raised by ``TestClient(...)`` when it waits for the opening answer (a
    WebSocket handshake, a session's first request), by ``receive()`` in plain
    HTTP modes, and by ``send()`` when a POST is refused.
    """

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        super().__init__(f"the server answered HTTP {status}: {body[:200]!r}")
        #: The response's status code, headers (case-insensitive) and body.
        self.status = status
        self.headers = headers
        self.body = body


class Response(NamedTuple):
    """A complete HTTP answer: what ``send()`` returns in plain HTTP modes."""

    status: int
    headers: Headers
    body: bytes


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Wait until ``predicate()`` is true and return its value; ``TimeoutError`` after ``timeout``.

    For what the server does on its own time (a callback-style handler joined a
    group, ``on_close`` ran): checked every 10 ms, and the server runs meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout} s: {predicate!r}")
        gevent.sleep(0.01)


class TestClient:
    """One client of a greenchan channel; see the module's docstring for a tour.

    ``TestClient(target, path=None, *, transport="websocket", ...)`` connects at
    once and returns when the channel is open: for a session, once the server's
    hello arrived (so the handler has run, or is waiting in ``receive``); for a
    plain client, once the handshake completed (WebSocket) or, with the server in
    this process, once the server took the request.

    - ``target``: a WSGI app (a server is started for it, on a free port, and
      stopped by ``close()``), a running ``greenchan.Server``, or a base URL
      (``"http://127.0.0.1:8000/"``).
    - ``path``: the route, with its query if any (default: the URL's, else ``/``).
    - ``transport``: ``"websocket"``, ``"sse"``, ``"longpoll"`` or ``"http"``.
    - ``session``: speak the session wire (default for every transport but
      ``"http"``); ``False`` for a plain client.
    - ``headers``: sent with every request (``Origin``, ``Cookie``...).
    - ``subprotocols``: offered in the WebSocket handshake.
    - ``last_event_id``: where to resume from (``gc_last`` for a session,
      ``Last-Event-ID`` for a plain client), as a reconnecting client would.
    - ``method``, ``body``: the request of ``transport="http"`` (default: a GET,
      or a POST when there is a ``body``).
    - ``timeout``: bounds the opening, each ``send``, ``close``, and is the
      default of ``receive``.
    - ``server_options``: options of the server started for an app.
    """

    __test__ = False  # a class named Test* that pytest must not collect

    __slots__ = (
        "server", "url", "transport", "session", "timeout",
        "status", "headers", "subprotocol", "hello", "last_event_id", "last_event",
        "close_code", "close_reason",
        "_own_server", "_address", "_path", "_extra_headers", "_subprotocols", "_method", "_body",
        "_token", "_carrier", "_state", "_error", "_inferred", "_closing", "_channel",
        "_inbox", "_arrived", "_ready",
        "_sid", "_recv", "_acked", "_ack_timer", "_helpers", "_seq", "_unconfirmed", "_next_id", "_ids", "_sending",
        "_too_big",
    )

    def __init__(
        self,
        target: Any,
        path: Optional[str] = None,
        *,
        transport: str = "websocket",
        session: Optional[bool] = None,
        headers: HeadersLike = None,
        subprotocols: Optional[Sequence[str]] = None,
        last_event_id: Optional[str] = None,
        method: Optional[str] = None,
        body: Optional[Message] = None,
        timeout: float = 5.0,
        server_options: Optional[Dict[str, Any]] = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
        if session is None:
            session = transport != "http"
        elif session and transport == "http":
            raise ValueError("transport='http' is one plain request: it has no session")
        if (method is not None or body is not None) and transport != "http":
            raise ValueError("method and body are for transport='http'; the other transports send with send()")
        self.timeout = timeout
        #: The transport in use (``reconnect()`` may change it).
        self.transport = transport
        #: The session's client id (``gc_cid``; ``channel.session`` on the server), or None.
        self.session: Optional[str] = os.urandom(16).hex() if session else None
        self._own_server = False
        #: The server, when it runs in this process (given, or started for an app).
        self.server: Optional[Server] = None
        self.url = self._resolve(target, path, server_options)
        split = urlsplit(self.url)
        self._address = (split.hostname or "127.0.0.1", split.port or 80)
        self._path = (split.path or "/") + (f"?{split.query}" if split.query else "")
        self._extra_headers = list(headers.items() if isinstance(headers, Mapping) else headers or [])
        self._subprotocols = list(subprotocols) if subprotocols else None
        self._method = (method or ("POST" if body is not None else "GET")).upper()
        self._body = body.encode() if isinstance(body, str) else body
        self._token = os.urandom(8).hex()
        #: The last opening response: 101 for a WebSocket, the stream's or the last poll's head.
        self.status: Optional[int] = None
        self.headers: Optional[Headers] = None
        #: The negotiated WebSocket subprotocol.
        self.subprotocol: Optional[str] = None
        #: The session's last hello: ``{"sid", "new", "in"}`` (docs/sessions.md).
        self.hello: Optional[dict] = None
        #: The id of the last message received from a group with history (or given).
        self.last_event_id = last_event_id
        #: The ``Event`` of the last message ``receive()`` returned from a plain SSE stream.
        self.last_event: Optional[Event] = None
        #: The close code and reason: the server's, or this client's when it closed first.
        self.close_code: Optional[int] = None
        self.close_reason: Optional[str] = None
        self._carrier: Any = None
        self._state = _OPEN
        self._error: Optional[Rejected] = None
        self._inferred: Optional[CloseStatus] = None  # the status as the wire tells it
        self._closing = False
        self._channel: Optional[Channel] = None
        self._inbox: Deque[Tuple[Message, Optional[Event]]] = collections.deque()
        self._arrived = gevent.event.Event()
        self._ready = gevent.event.Event()
        # Session bookkeeping, as greenchan.js keeps it.
        self._sid = ""  # the session instance of the last hello
        self._recv = 0  # frames of that instance received
        self._acked = 0  # the count last acknowledged
        self._ack_timer: Optional[gevent.Greenlet] = None
        self._helpers: "set[gevent.Greenlet]" = set()  # acknowledgement POSTs in flight
        self._seq = 0  # the number of the last message sent
        # One numbered message at a time, as greenchan.js posts them: two POSTs
        # racing from two greenlets could arrive out of order (409).
        self._sending = gevent.lock.Semaphore()
        self._unconfirmed: Deque[Tuple[int, Message]] = collections.deque()
        self._next_id: Optional[list] = None  # the group and id of the next message
        self._ids: Dict[str, str] = {}  # per group, the last id received (gc_last)
        self._too_big = False  # the last WebSocket was closed with 1009
        try:
            self._open()
        except BaseException:
            self._teardown()
            raise

    # -- public API --------------------------------------------------------------

    def send(self, data: Message) -> Optional[Response]:
        """Send one message (``str`` or ``bytes``) to the server's channel.

        In a session it reaches the handler once, in order, over any transport:
        a WebSocket message, or a POST that returns once the server took it.
        In plain mode: a WebSocket message, or a POST (a new plain channel on
        the server) whose answer is returned. Raises ``ChannelClosed`` once the
        channel is closed, ``Rejected`` for a refused POST.
        """
        if not isinstance(data, (str, bytes, bytearray, memoryview)):
            raise TypeError(f"send() takes str or bytes, not {type(data).__name__}")
        if self.transport == "http":
            raise TypeError("transport='http' is one request: give its body as TestClient(..., body=...)")
        if not isinstance(data, str):
            data = bytes(data)
        if self._state is not _OPEN:
            raise ChannelClosed(self.close_status)
        if self.session:
            with self._sending:
                self._seq += 1
                self._unconfirmed.append((self._seq, data))
                self._send_numbered(self._seq, data)
            return None
        if self.transport == "websocket":
            self._ws_send(data)
            return None
        return self._post_plain(data)

    def receive(self, timeout: Optional[float] = None) -> Message:
        """The next message from the server (``str`` or ``bytes``).

        Waits up to ``timeout`` seconds (default: the client's ``timeout``), then
        raises ``TimeoutError``. Once the channel is closed and every message
        received before has been returned, raises ``ChannelClosed`` (its
        ``status`` is ``close_status``); ``Rejected`` if the server refused.
        """
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            if self._inbox:
                message, self.last_event = self._inbox.popleft()
                return message
            if self._error is not None:
                raise self._error
            if self._state is not _OPEN:
                raise ChannelClosed(self.close_status)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message within {wait} s")
            self._arrived.clear()
            self._arrived.wait(left)

    def __iter__(self) -> Iterator[Message]:
        """Every message until the channel closes (each within ``timeout``)."""
        while True:
            try:
                yield self.receive()
            except ChannelClosed:
                return

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the channel as a client does, then stop the server started for an app.

        A WebSocket sends a close frame (in a session, 1000 ends the session and
        any other code is a drop the server waits out, as greenchan.js does); a
        session over HTTP POSTs ``gc_close=1``; a plain HTTP client hangs up.
        With the server in this process, returns once its channel is closed
        (within ``timeout``), so ``close_status`` is final. Idempotent.
        """
        if self._closing:
            return
        self._closing = True
        try:
            if self._state is _OPEN or (self.session and self._state is _LOST):
                self._close_channel(code, reason)
        finally:
            self._teardown()

    def drop(self) -> None:
        """Cut the connection as a network failure would: no close frame, no ``gc_close``.

        The client is ``dropped`` until ``reconnect()``; a session's server
        channel stays open (for ``session_grace``) and keeps what is sent to it.
        """
        if self._closing:
            raise ChannelClosed(self.close_status)
        self._drop_carrier()
        if self._state is _OPEN:
            self._state, self.close_code, self.close_reason = _LOST, 1006, ""
            self._arrived.set()

    def reconnect(self, transport: Optional[str] = None) -> None:
        """Drop the connection (unless it is dropped already) and connect again.

        A session resumes: the same server channel, what was sent meanwhile
        arrives, and unconfirmed messages are sent again (or, if the server
        forgot it, a new session starts: ``hello["new"]``, the handler runs
        again); ``transport`` switches it to another transport. A closed session
        cannot come back (``ChannelClosed``). A plain client gets a new channel
        (the handler runs again), with ``Last-Event-ID`` if it has one, as an
        ``EventSource`` reconnects after its stream ended.
        """
        if self._closing or (self.session and self._state is _CLOSED):
            raise ChannelClosed(self.close_status)
        if transport is not None:
            if transport not in TRANSPORTS or (self.session and transport == "http"):
                raise ValueError(f"cannot reconnect a {'session' if self.session else 'plain client'} over {transport!r}")
            self.transport = transport
        self._drop_carrier()
        self._state, self._error = _OPEN, None
        self._open()

    @property
    def is_open(self) -> bool:
        """True until the channel closed, the client closed it or the connection was lost."""
        return self._state is _OPEN

    @property
    def dropped(self) -> bool:
        """True when the connection ended without the channel being closed.

        The server's close frame never came: a network failure, a server cut.
        A greenchan.js client would reconnect; ``reconnect()`` does, and a
        session resumes if the server still holds it.
        """
        return self._state is _LOST

    @property
    def channel(self) -> Optional[Channel]:
        """The server's ``Channel`` for this client, when the server runs in this process.

        For a session, its one channel; for a plain client, the channel of the
        current connection or request (or the last one, once closed). ``None``
        when the server is elsewhere, or a plain request's channel came and went
        before the client looked (a quick ``"http"`` answer). Assert on it directly:
        ``client.channel in store.members("room")``, ``client.channel.transport``.
        """
        if self.server is None:
            return None
        found = self._channel
        if found is not None and (self.session or found.is_open):
            return found
        if self.session:
            held = getattr(self.server, "sessions", {}).get(self.session)
            found = held.channel if held is not None else None
        else:
            found = self._plain_channel()
        if found is not None:
            self._channel = found
        return self._channel

    @property
    def close_status(self) -> Optional[CloseStatus]:
        """What the server's channel closed with; ``None`` while it is open.

        Exact when the server runs in this process (it is read from
        ``client.channel``). Otherwise it is what the wire tells: the server's
        close code (1011 ``INTERNAL_ERROR``, 1013 ``SLOW_CONSUMER``, 1001 and
        application codes ``SERVER_CLOSE``...), ``NORMAL`` after this client
        closed a WebSocket or a session, ``CLIENT_CLOSE`` after it hung up a
        plain HTTP request. ``None`` while the client is open (``is_open``;
        between two plain long-polls, say), and when the connection was
        ``dropped`` unless the server is in this process (a session's channel
        may well be open still: ``reconnect()`` resumes it).
        """
        if self._state is _OPEN:
            return None
        channel = self.channel
        if channel is not None:
            return channel.close_status
        return self._inferred if self._state is _CLOSED else None

    def __enter__(self) -> "TestClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "session" if self.session else "plain"
        return f"<TestClient {self.transport} {mode} {self.url} {self._state}>"

    # -- connecting --------------------------------------------------------------

    def _resolve(self, target: Any, path: Optional[str], server_options: Optional[Dict[str, Any]]) -> str:
        """The base URL, starting a server for an app."""
        if server_options and (isinstance(target, (str, Server))):
            raise ValueError("server_options are for a server the client starts: pass an app")
        if isinstance(target, Server):
            if target.status != "running":
                raise ValueError("the Server is not running: start it first (with Server(app, port=0) as server: ...)")
            self.server = target
            host = target.host if target.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
            base = f"http://{host}:{target.port}/"
        elif isinstance(target, str):
            split = urlsplit(target)
            if split.scheme not in ("http", "ws"):
                raise ValueError(f"TestClient connects to http:// (or ws://) URLs, not {target!r}")
            base = "http" + target[len(split.scheme):]
        elif callable(target):
            self.server = Server(target, host="127.0.0.1", port=0, **(server_options or {})).start()
            self._own_server = True
            base = f"http://127.0.0.1:{self.server.port}/"
        else:
            raise TypeError(f"TestClient connects to a WSGI app, a greenchan.Server or a URL, not {type(target).__name__}")
        if path is None:
            return base
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        split = urlsplit(base)
        return f"{split.scheme}://{split.netloc}{path}"

    def _open(self) -> None:
        """Open a connection over ``self.transport``; return once the channel is open."""
        self._ready.clear()
        self.status = self.headers = None
        if not self.session and self.transport != "websocket":
            carrier = self._carrier = _Carrier()
            carrier.greenlet = gevent.spawn(self._plain_http, carrier)
            if self.server is not None:  # wait until the server took the request
                wait_for(lambda: self.status is not None or self._state is not _OPEN or self._plain_channel(), self.timeout)
            return
        if self.transport == "websocket":
            target = self._session_target("websocket") if self.session else self._path
            ws = self._carrier = _WebSocket(self)
            response = ws.open(self._address, target, self._headers(token=True), self._subprotocols, self.timeout)
            self.status, self.headers, self.subprotocol = response.status_code, response.headers, ws.proto.subprotocol
            if not self.session:
                self._channel = self._plain_channel()  # found now, while it surely is registered
                return
        elif self.transport == "sse":
            carrier = self._carrier = _Carrier()
            with _deadline(self.timeout, "the event stream did not start"):
                http = carrier.http = self._request("GET", self._session_target("sse"), self._headers(("Accept", "text/event-stream"), token=True))
                http.read_head()
            self.status, self.headers = http.status, http.headers
            if http.status != 200:
                with _deadline(self.timeout, "the refusal's body did not arrive"):
                    raise Rejected(http.status, http.headers, http.read())
            carrier.greenlet = gevent.spawn(self._read_stream, carrier, http)
        else:
            carrier = self._carrier = _Carrier()
            self._poll(carrier, opening=True)
            carrier.greenlet = gevent.spawn(self._poll_loop, carrier)
        if not self._ready.wait(self.timeout):
            raise TimeoutError(f"no session hello within {self.timeout} s (is the handler blocked before its first send or receive?)")
        if self._error is not None:
            raise self._error
        if self.hello is None:
            raise ConnectionError(f"the connection ended before the session's hello (close code {self.close_code})")
        if self.hello.get("new"):
            self._channel = None
        self._channel = self.channel  # kept: the server forgets a session once it is closed
        for seq, data in list(self._unconfirmed):  # what the server has not got yet
            self._send_numbered(seq, data)

    def _headers(self, *extra: Tuple[str, str], token: bool = False) -> List[Tuple[str, str]]:
        headers = list(self._extra_headers)
        headers.extend(extra)
        if token:
            headers.append((_TOKEN_HEADER, self._token))
        return headers

    def _request(self, method: str, target: str, headers: List[Tuple[str, str]], body: Optional[bytes] = None) -> "_Http":
        return _Http(self._address, method, target, headers, body)

    def _exchange(self, method: str, target: str, headers: List[Tuple[str, str]], body: Optional[bytes], timeout: Optional[float], what: str) -> Response:
        """One complete request and answer, within ``timeout`` (``TimeoutError`` names ``what``)."""
        with _deadline(timeout, what):
            http = self._request(method, target, headers, body)
            try:
                http.read_head()
                return Response(http.status, http.headers, http.read())
            finally:
                http.close()

    def _session_target(self, transport: str, **extra: str) -> str:
        """The route with the session's parameters, as greenchan.js builds them."""
        params = {"gc_transport": transport, "gc_cid": self.session}
        if self._sid:
            params["gc_sid"] = self._sid
        params["gc_ack"] = str(self._recv)
        params["gc_next"] = str(self._unconfirmed[0][0] if self._unconfirmed else self._seq + 1)
        last = " ".join(self._ids.values()) or self.last_event_id
        if last:
            params["gc_last"] = last
        params.update(extra)
        if self._sid:
            self._acked = self._recv  # this request acknowledges what came
        return self._path + ("&" if "?" in self._path else "?") + urlencode(params)

    def _plain_channel(self) -> Optional[Channel]:
        """The open channel of this plain client's current request, found by its token."""
        for channel in list(getattr(self.server, "_channels", ())):
            environ = channel.environ
            if environ.get(_TOKEN_ENVIRON) == self._token and environ.get("greenchan.channel") is channel and channel.is_open:
                return channel
        return None

    # -- closing -----------------------------------------------------------------

    def _close_channel(self, code: int, reason: str) -> None:
        ws = self._carrier if isinstance(self._carrier, _WebSocket) else None
        closes = True  # the server's channel closes now
        if ws is not None and self._state is _OPEN:
            ws.close(code, reason, self.timeout)
            status = CloseStatus.NORMAL if code == 1000 else CloseStatus.from_code(code)
            closes = not self.session or code == 1000
        elif self.session:
            # The connection goes first: a poll answered meanwhile must not poll
            # again, and start a new session once this one is gone.
            self._drop_carrier()
            try:
                self._exchange("POST", self._session_target(self.transport, gc_close="1"), self._headers(), b"", self.timeout, "the answer to gc_close")
            except (OSError, EOFError, ValueError, TimeoutError):
                pass  # the server is gone: nothing left to close
            code, reason, status = 1000, "", CloseStatus.NORMAL
        else:
            code, reason, status = None, None, CloseStatus.CLIENT_CLOSE  # type: ignore[assignment]
        self._state, self.close_code, self.close_reason, self._inferred = _CLOSED, code, reason, status
        self._drop_carrier()
        channel = self.channel
        if channel is not None and closes:
            try:
                wait_for(lambda: channel.close_status is not None, self.timeout)
            except TimeoutError:
                pass  # close_status stays None: the server did not notice
        self._arrived.set()

    def _drop_carrier(self) -> None:
        carrier, self._carrier = self._carrier, None
        if carrier is not None:
            carrier.stop()
        self._cancel_ack()

    def _teardown(self) -> None:
        self._drop_carrier()
        for helper in list(self._helpers):
            helper.kill(block=False)
        if self._own_server and self.server is not None:
            self.server.stop(timeout=self.timeout)

    # -- what the connection brings ---------------------------------------------

    def _push(self, message: Message, event: Optional[Event] = None) -> None:
        self._inbox.append((message, event))
        self._arrived.set()

    def _ended(self, carrier: Any, state: str, code: Optional[int], reason: Optional[str], status: Optional[CloseStatus]) -> None:
        """The channel closed (``_CLOSED``) or the connection ended without a close (``_LOST``)."""
        if carrier is not self._carrier or self._state is not _OPEN or self._closing:
            return
        self._state, self.close_code, self.close_reason, self._inferred = state, code, reason, status
        self._cancel_ack()
        self._arrived.set()
        self._ready.set()

    def _lost(self, carrier: Any, code: Optional[int] = 1006, reason: Optional[str] = "") -> None:
        self._ended(carrier, _LOST, code, reason, None)

    def _rejected(self, carrier: Any, error: Rejected) -> None:
        if carrier is self._carrier and self._state is _OPEN:
            self._error = error
        status = CloseStatus.INTERNAL_ERROR if error.status == 500 else CloseStatus.SERVER_CLOSE
        self._ended(carrier, _CLOSED, None, None, status)

    # -- sessions ----------------------------------------------------------------

    def _hello(self, carrier: Any, hello: dict) -> None:
        if carrier is not self._carrier:
            return
        if hello.get("sid") != self._sid:  # a session instance this client has not seen
            self._sid, self._recv, self._acked, self._next_id = hello.get("sid", ""), 0, 0, None
            self._channel = None  # a new session has a new channel (long-polls go on into it)
        self.hello = hello
        self._confirm(int(hello.get("in", 0)))
        if self._too_big and self._unconfirmed:
            # The first message the server has not got is the one it refused with
            # 1009 without counting it: greenchan.js drops it and the rest move up
            # a number, instead of closing the socket again on every reconnect.
            big, _ = self._unconfirmed.popleft()
            self._unconfirmed = collections.deque((n - (n > big), m) for n, m in self._unconfirmed)
            self._seq -= 1
        self._too_big = False
        self._ready.set()

    def _frame(self, carrier: Any, frame: Any) -> None:
        """One counted frame of the session: a message, or a control frame (a dict)."""
        if carrier is not self._carrier or self._state is not _OPEN:
            return
        self._recv += 1
        if isinstance(frame, dict):
            if "id" in frame:
                self._next_id = frame["id"]
            elif "pos" in frame:
                self._remember(*frame["pos"])
            elif "close" in frame:
                code, reason = frame["close"]
                self._ended(carrier, _CLOSED, code, reason, _status_for(code, reason))
                return
        else:
            if self._next_id:
                self._remember(*self._next_id)
                self._next_id = None
            self._push(frame)
        self._schedule_ack()

    def _remember(self, group: str, msg_id: str) -> None:
        self._ids[group] = msg_id
        self.last_event_id = msg_id

    def _confirm(self, count: int) -> None:
        while self._unconfirmed and self._unconfirmed[0][0] <= count:
            self._unconfirmed.popleft()

    def _send_numbered(self, seq: int, data: Message) -> None:
        """A session message: over a WebSocket numbered by its place, else a POST with ``gc_seq``."""
        if self.transport == "websocket":
            self._ws_send("\x00" + data if isinstance(data, str) and data[:1] == "\x00" else data)
            return
        content_type = "text/plain;charset=UTF-8" if isinstance(data, str) else "application/octet-stream"
        body = data.encode() if isinstance(data, str) else data
        target = self._session_target(self.transport, gc_seq=str(seq))
        answer = self._exchange("POST", target, self._headers(("Content-Type", content_type)), body, self.timeout, "the answer to a message's POST")
        if answer.status == 410:  # the session is closed; its close frame is on the way
            raise ChannelClosed(self.close_status)
        if answer.status != 200:
            if 400 <= answer.status < 500 and answer.status not in (408, 409, 429):
                # Refused for good and not counted by the server: greenchan.js
                # forgets it, and the next message takes its number.
                self._unconfirmed = collections.deque((n - (n > seq), m) for n, m in self._unconfirmed if n != seq)
                self._seq -= 1
            raise Rejected(*answer)
        confirmed = json.loads(answer.body)
        if confirmed.get("sid") == self._sid:
            self._confirm(int(confirmed.get("in", 0)))

    def _schedule_ack(self) -> None:
        if self.transport == "longpoll":  # the next poll acknowledges
            return
        if self._recv - self._acked >= _ACK_EVERY:
            self._send_ack()
        elif self._ack_timer is None:
            self._ack_timer = gevent.spawn_later(_ACK_DELAY[self.transport], self._send_ack)

    def _send_ack(self) -> None:
        self._cancel_ack()
        if self._recv == self._acked or self._carrier is None or self._state is not _OPEN:
            return
        if isinstance(self._carrier, _WebSocket):
            self._acked = self._recv
            try:
                self._carrier.send("\x00" + json.dumps({"ack": self._recv}))
            except (OSError, InvalidState):
                pass  # the connection is going: the next one acknowledges
        else:
            helper = gevent.spawn(self._post_ack, self._session_target("sse"))
            self._helpers.add(helper)
            helper.link(self._helpers.discard)

    def _post_ack(self, target: str) -> None:
        try:
            self._exchange("POST", target, self._headers(("Content-Type", "text/plain")), b"", self.timeout, "the answer to an acknowledgement")
        except (OSError, EOFError, TimeoutError, ValueError):
            pass  # lost acknowledgements are sent again by the next one or the reconnect

    def _cancel_ack(self) -> None:
        timer, self._ack_timer = self._ack_timer, None
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)

    # -- WebSocket ---------------------------------------------------------------

    def _ws_send(self, data: Message) -> None:
        carrier = self._carrier
        if not isinstance(carrier, _WebSocket):
            raise ChannelClosed(self.close_status)
        try:
            carrier.send(data)
        except (OSError, InvalidState) as exc:
            raise ChannelClosed(self.close_status) from exc

    def _ws_message(self, ws: "_WebSocket", message: Message) -> None:
        if not self.session:
            if ws is self._carrier:
                self._push(message)
            return
        if isinstance(message, str) and message[:1] == "\x00":
            if message[1:2] != "\x00":
                control = json.loads(message[1:])
                if "hello" in control:
                    self._hello(ws, control["hello"])
                elif isinstance(control.get("ack"), int):
                    self._confirm(control["ack"])
                else:
                    self._frame(ws, control)
                return
            message = message[1:]
        self._frame(ws, message)

    def _ws_closed(self, ws: "_WebSocket", code: Optional[int], reason: Optional[str]) -> None:
        """The server's close frame (code and reason), or None: the TCP connection ended."""
        if code is None:
            self._lost(ws)
        elif self.session:  # the session's close came as a frame; this one ends the connection
            if code == 1009 and ws is self._carrier and self._state is _OPEN:
                self._too_big = True  # a message of ours was refused: see _hello
            self._lost(ws, code, reason)
        else:
            self._ended(ws, _CLOSED, code, reason, _status_for(code, reason or ""))

    # -- HTTP --------------------------------------------------------------------

    def _read_stream(self, carrier: "_Carrier", http: "_Http") -> None:
        """Read a response's body: events of a stream, chunks, or the whole body."""
        try:
            content_type = http.headers.get("Content-Type", "")
            if content_type.startswith("text/event-stream"):
                parser = _SseParser(self.last_event_id)
                for piece in http.pieces():
                    for kind, data, event_id in parser.feed(piece):
                        self._sse_event(carrier, kind, data, event_id)
            else:
                for piece in http.pieces():
                    if carrier is self._carrier:
                        self._push(_decode(piece, content_type))
        except (OSError, EOFError, ValueError):
            self._lost(carrier)
            return
        finally:
            http.close()
        if self.session:  # a session's stream ends after its close frame, else it was cut
            self._lost(carrier)
            return
        if self.transport == "longpoll":  # one poll of many
            return
        status = CloseStatus.SERVER_CLOSE if http.status < 500 else CloseStatus.INTERNAL_ERROR
        self._ended(carrier, _CLOSED, None, None, status)

    def _sse_event(self, carrier: "_Carrier", kind: str, data: str, event_id: Optional[str]) -> None:
        if not self.session:
            if carrier is self._carrier:
                if event_id is not None:
                    self.last_event_id = event_id
                self._push(data, Event(data, event=None if kind == "message" else kind, id=event_id))
            return
        if kind == "gc":
            control = json.loads(data)
            if "hello" in control:
                self._hello(carrier, control["hello"])
            else:
                self._frame(carrier, control)
        elif kind == "gct":
            self._frame(carrier, json.loads(data))
        elif kind == "gcb":
            self._frame(carrier, base64.b64decode(data))
        else:
            self._frame(carrier, data)

    def _poll(self, carrier: "_Carrier", opening: bool = False) -> bool:
        """One long-poll of a session; False once the session is over."""
        extra = {"gc_open": "1"} if opening else {}
        target = self._session_target("longpoll", **extra)
        headers = self._headers(("Accept", "application/json"), token=True)
        # A waiting poll is answered within sessions.POLL_WAIT; a drop kills this greenlet.
        status, self.headers, body = self._exchange("GET", target, headers, None, self.timeout if opening else None, "the answer to the opening poll")
        if carrier is not self._carrier:
            return False
        self.status = status
        if status >= 400 or (opening and status != 200):
            error = Rejected(status, self.headers, body)
            if opening:
                raise error
            self._rejected(carrier, error)
            return False
        if status != 200:  # the poll's channel ended without a frame (a 204): cut
            self._lost(carrier)
            return False
        answer = json.loads(body)
        if "hello" in answer:
            self._hello(carrier, answer["hello"])
        elif opening:
            raise ConnectionError(f"the opening poll was answered without a hello: {answer!r}")
        for frame in answer["f"][max(0, self._recv - answer["from"]):]:  # skip what came before
            self._frame(carrier, _from_json(frame))
        return self._state is _OPEN and not self._closing

    def _poll_loop(self, carrier: "_Carrier") -> None:
        try:
            while self._poll(carrier):
                pass
        except (OSError, EOFError, ValueError):
            self._lost(carrier)

    def _plain_http(self, carrier: "_Carrier") -> None:
        """A plain client's requests: one for SSE and "http", a GET after another for long-polling."""
        while True:
            headers = self._headers(token=True)
            body = None
            method = "GET"
            if self.transport == "sse":
                headers.append(("Accept", "text/event-stream"))
            if self.transport == "http":
                method, body = self._method, self._body
            elif self.last_event_id:
                headers.append(("Last-Event-ID", self.last_event_id))
            try:
                http = carrier.http = self._request(method, self._path, headers, body)
                http.read_head()
            except (OSError, EOFError, ValueError):
                self._lost(carrier)
                return
            if carrier is not self._carrier:
                http.close()
                return
            self.status, self.headers = http.status, http.headers
            if http.status >= 400:
                try:
                    answer = http.read()
                except (OSError, EOFError, ValueError):
                    answer = b""
                http.close()
                self._rejected(carrier, Rejected(http.status, http.headers, answer))
                return
            event_id = http.headers.get("Greenchan-Event-Id")
            if event_id:
                self.last_event_id = event_id
            self._read_stream(carrier, http)
            if self.transport != "longpoll" or self._state is not _OPEN:
                return
            if http.status == 204:
                gevent.sleep(_EMPTY_POLL_PAUSE)

    def _post_plain(self, data: Message) -> Response:
        content_type = "text/plain;charset=UTF-8" if isinstance(data, str) else "application/octet-stream"
        body = data.encode() if isinstance(data, str) else data
        answer = self._exchange("POST", self._path, self._headers(("Content-Type", content_type)), body, self.timeout, "the answer to a POST")
        if answer.status >= 400:
            raise Rejected(*answer)
        return answer


class _Carrier:
    """An HTTP connection of the client: the greenlet that reads it, its current request."""

    __slots__ = ("greenlet", "http")

    def __init__(self) -> None:
        self.greenlet: Optional[gevent.Greenlet] = None
        self.http: Optional[_Http] = None

    def stop(self) -> None:
        """Cut it at once, as a network failure would."""
        if self.greenlet is not None and self.greenlet is not gevent.getcurrent():
            self.greenlet.kill(block=True, timeout=1)  # it closes its request as it unwinds
        if self.http is not None:
            self.http.close()


class _WebSocket:
    """A WebSocket connection: websockets' sans-I/O ``ClientProtocol`` over a gevent socket."""

    __slots__ = ("client", "proto", "sock", "greenlet", "_lock", "_opcode", "_parts", "_reported")

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.proto: Any = None
        self.sock: Any = None
        self.greenlet: Optional[gevent.Greenlet] = None
        # The reader (pongs, acknowledgements) and the test's greenlet both write.
        self._lock = gevent.lock.RLock()
        self._opcode = Opcode.TEXT
        self._parts: List[bytes] = []
        self._reported = False  # the server's close frame was passed on

    def open(self, address: Tuple[str, int], target: str, headers: List[Tuple[str, str]], subprotocols: Optional[List[str]], timeout: float) -> _HandshakeResponse:
        """The opening handshake; ``Rejected`` unless the server answers 101."""
        # No size limit: the server's limits are under test, not the client's.
        self.proto = proto = ClientProtocol(parse_uri(f"ws://{address[0]}:{address[1]}{target}"), subprotocols=subprotocols, max_size=None)  # type: ignore[arg-type]
        request = proto.connect()
        for name, value in headers:
            if name in request.headers:
                del request.headers[name]
            request.headers[name] = value
        proto.send_request(request)
        response = None
        early: List[Any] = []  # frames that came with the 101 (a session's hello)
        with _deadline(timeout, "no WebSocket handshake"):
            self.sock = socket.create_connection(address)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._flush()
            while response is None:
                data = self.sock.recv(65536)
                if data:
                    proto.receive_data(data)
                else:
                    proto.receive_eof()
                for event in proto.events_received():
                    if isinstance(event, _HandshakeResponse):
                        response = event
                    else:
                        early.append(event)
                if not data and response is None:
                    raise ConnectionError("the server closed the connection during the WebSocket handshake")
        if proto.handshake_exc is not None:
            self.stop()
            if response.status_code != 101:
                raise Rejected(response.status_code, response.headers, bytes(response.body or b""))
            raise proto.handshake_exc
        self.greenlet = gevent.spawn(self._read, early)
        return response

    def send(self, data: Message) -> None:
        with self._lock:
            if isinstance(data, str):
                self.proto.send_text(data.encode())
            else:
                self.proto.send_binary(data)
            self._flush()

    def close(self, code: int, reason: str, timeout: float) -> None:
        """The closing handshake: our close frame, the server's, the end of TCP (within ``timeout``)."""
        try:
            with self._lock:
                self.proto.send_close(code, reason)
                self._flush()
        except (OSError, InvalidState):
            pass
        if self.greenlet is not None:
            self.greenlet.join(timeout)
        self.stop()

    def stop(self) -> None:
        """Cut the connection: no close frame, as a network failure would."""
        if self.greenlet is not None and self.greenlet is not gevent.getcurrent():
            self.greenlet.kill(block=True, timeout=1)
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass

    def _flush(self) -> None:
        with self._lock:
            for data in self.proto.data_to_send():
                if data:
                    self.sock.sendall(data)
                else:  # the protocol's end of stream: half-close
                    try:
                        self.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass

    def _read(self, early: List[Any]) -> None:
        client, proto = self.client, self.proto
        try:
            self._frames(early)
            while True:
                data = self.sock.recv(65536)
                if not data:
                    proto.receive_eof()
                    self._flush()
                    break
                proto.receive_data(data)
                self._flush()  # pongs and the close reply go out at once
                self._frames(proto.events_received())
        except OSError:
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
        if not self._reported:
            client._ws_closed(self, None, None)

    def _frames(self, frames: List[Any]) -> None:
        for frame in frames:
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                self._opcode, self._parts = opcode, [bytes(frame.data)]
            elif opcode is Opcode.CONT:
                self._parts.append(bytes(frame.data))
            else:  # pings are answered by the protocol; the close frame below
                continue
            if frame.fin:
                data, self._parts = b"".join(self._parts), []
                self.client._ws_message(self, data.decode() if self._opcode is Opcode.TEXT else data)
        close = self.proto.close_rcvd
        if close is not None and not self._reported:
            self._reported = True
            self.client._ws_closed(self, int(close.code), close.reason)


class _Http:
    """One HTTP/1.1 request over a gevent socket (``Connection: close``) and its response."""

    __slots__ = ("sock", "rfile", "status", "headers", "_method")

    def __init__(self, address: Tuple[str, int], method: str, target: str, headers: List[Tuple[str, str]], body: Optional[bytes]) -> None:
        self._method = method
        self.status = 0
        self.headers = Headers()
        self.sock = socket.create_connection(address)
        self.rfile = self.sock.makefile("rb")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {address[0]}:{address[1]}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        except BaseException:
            self.close()
            raise

    def read_head(self) -> None:
        """The status line and headers (after any 1xx)."""
        while True:
            line = self.rfile.readline(65537)
            if not line:
                raise EOFError("the server closed the connection before answering")
            status = int(line.split(None, 2)[1])
            headers = Headers()
            while True:
                line = self.rfile.readline(65537)
                if line in (b"\r\n", b"\n"):
                    break
                if not line:
                    raise EOFError("the response head was cut short")
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip()] = value.strip()
            if not 100 <= status < 200:
                self.status, self.headers = status, headers
                return

    def pieces(self) -> Iterator[bytes]:
        """The body as the server wrote it: each chunk of a chunked body, a
        Content-Length body whole, a close-delimited one read by read; EOFError if cut short."""
        if self._method == "HEAD" or self.status in (204, 304):
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise EOFError("a chunked body was cut short")
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                data = self._exactly(size)
                self._exactly(2)
                yield data
        elif "Content-Length" in self.headers:
            yield self._exactly(int(self.headers["Content-Length"]))
        else:
            while True:
                data = self.rfile.read1(65536)
                if not data:
                    return
                yield data

    def read(self) -> bytes:
        return b"".join(self.pieces())

    def _exactly(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) < size:
            raise EOFError("the body was cut short")
        return data

    def close(self) -> None:
        # The socket first: the server sees the hang-up even if the reader is
        # still in use by a greenlet being killed (closing it then is refused).
        for closable in (self.sock, self.rfile):
            try:
                closable.close()
            except (OSError, RuntimeError):
                pass


_EOL = re.compile(rb"\r\n|\r|\n")


class _SseParser:
    """Server-Sent Events as ``EventSource`` reads them (WHATWG HTML, "Interpreting an event stream")."""

    __slots__ = ("_buffer", "_data", "_type", "last_id")

    def __init__(self, last_id: Optional[str] = None) -> None:
        self._buffer = b""
        self._data: Optional[List[str]] = None
        self._type = ""
        self.last_id = last_id

    def feed(self, chunk: bytes) -> List[Tuple[str, str, Optional[str]]]:
        """The events completed by ``chunk``: (type, data, last event id)."""
        buffer = self._buffer + chunk
        events: List[Tuple[str, str, Optional[str]]] = []
        start = 0
        while True:
            match = _EOL.search(buffer, start)
            # A CR at the very end may be the first half of a CRLF: wait for more.
            if match is None or (match.group() == b"\r" and match.end() == len(buffer)):
                break
            self._line(buffer[start:match.start()].decode("utf-8", "replace"), events)
            start = match.end()
        self._buffer = buffer[start:]
        return events

    def _line(self, line: str, events: List[Tuple[str, str, Optional[str]]]) -> None:
        if not line:  # dispatch; an event without data lines is not one
            if self._data is not None:
                events.append((self._type or "message", "\n".join(self._data), self.last_id))
            self._data, self._type = None, ""
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                if self._data is None:
                    self._data = []
                self._data.append(value)
            elif name == "event":
                self._type = value
            elif name == "id" and "\x00" not in value:
                self.last_id = value


def _decode(body: bytes, content_type: str) -> Message:
    """As greenchan hands a response body to a handler: ``str`` for text/* and JSON, else ``bytes``."""
    return body_message({"CONTENT_TYPE": content_type}, body)


def _from_json(frame: Any) -> Any:
    """A long-poll frame: a string (text), ``{"b": base64}`` (binary) or ``{"c": control}``."""
    if isinstance(frame, str):
        return frame
    if "b" in frame:
        return base64.b64decode(frame["b"])
    return frame["c"]


def _status_for(code: int, reason: str) -> CloseStatus:
    """The server channel's status, guessed from the close code it sent (API.md's table)."""
    if code == 1011 and "timeout" in reason:
        return CloseStatus.TIMEOUT
    if code == 1013:
        return CloseStatus.SLOW_CONSUMER
    if code in (1002, 1003, 1007, 1008, 1009, 1011):
        return CloseStatus.from_code(code)
    return CloseStatus.SERVER_CLOSE  # the application's close, or 1001 (the server stopping)


def _deadline(seconds: Optional[float], what: str) -> gevent.Timeout:
    """A bound on a step the test waits for: ``TimeoutError`` saying which step."""
    return gevent.Timeout(seconds, TimeoutError(f"{what} within {seconds} s"))
