"""Sessions: one channel per greenchan.js client, across requests, transports and reconnects.

The design, the wire and the states are in docs/sessions.md. In short: every
request that carries ``gc_cid`` is first a plain channel (the *carrier*, served
exactly as a request without ``gc_cid`` would be), and ``serve`` below is its
handler. It finds or starts the client's ``Session``, which owns the channel the
application's handler gets, and hands the carrier to it: a WebSocket, an SSE
stream or a waiting long-poll carries frames to the client, a POST carries one
client message in.

The session numbers what it sends (frames) and keeps each frame until the
client acknowledges it, so a frame lost with a dropped carrier is sent again on
the next one; client messages carry numbers too, so a retried POST is not
delivered twice. The ``Session`` is the session channel's transport: the channel
calls ``send``, ``close``... on it as on any transport.
"""
from __future__ import annotations

import base64
import collections
import json
import logging
import os
import re
from typing import Any, Callable, Deque, Dict, Optional, Tuple
from urllib.parse import parse_qs

import gevent
import gevent.event
from gevent.hub import get_hub

from . import counters
from .channel import Channel, CloseStatus, Event, run_handler
from .forwarding import CLAIM_MS, Forwarder, forwarder
from .options import Options
from .origin import page_origin, same_page

__all__ = ["serve", "session_params"]

log = logging.getLogger("greenchan.sessions")

# A client id is a capability: at least 128 bits (32 hex digits) from the
# client's CSPRNG. Shorter or odd ids are refused rather than trusted.
_CID = re.compile(r"[A-Za-z0-9_-]{32,128}\Z")

# How long a long-poll waits for a frame before it answers an empty list; well
# under the 60 s that proxies and greenchan.js give up after.
POLL_WAIT = 25.0

# Acknowledge client messages over a WebSocket every this many, or this long
# after the first unacknowledged one.
_ACK_EVERY = 16
_ACK_DELAY = 0.2

_FRAME_OVERHEAD = 64

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]

Frame = Any  # str | bytes (a message) or dict (a control frame)

ATTACHED, DETACHED, CLOSED = "attached", "detached", "closed"


def session_params(environ: dict) -> Optional[Dict[str, str]]:
    """The ``gc_*`` query parameters of a session request, or None for a plain one."""
    query = environ.get("QUERY_STRING", "")
    if "gc_cid=" not in query:
        return None
    return {k: v[-1] for k, v in parse_qs(query).items() if k.startswith("gc_")}


def _number(params: Dict[str, str], name: str, default: int = 0) -> int:
    try:
        return max(0, int(params.get(name, default)))
    except ValueError:
        return default


def _registry(server: Any) -> Dict[str, "Session"]:
    sessions = getattr(server, "sessions", None)
    if sessions is None:
        sessions = server.sessions = {}
    return sessions


def serve(inner: Channel, handler: Callable, server: Any, options: Options, params: Dict[str, str], args: tuple, kwargs: dict) -> None:
    """The handler of every carrier: route it to its session (a new one if needed)."""
    cid = params.get("gc_cid", "")
    if not _CID.match(cid):
        inner.reject(400, "gc_cid must be 32 to 128 characters of [A-Za-z0-9_-]\n")
        return
    sessions = _registry(server)
    session = sessions.get(cid)
    fwd = forwarder(server) if session is None else None
    if fwd is not None and _forwarded(fwd, inner, params):
        return  # another process holds this session (forwarding.py)
    origin = page_origin(inner.environ)
    if session is not None and not session.allows(inner.environ, origin):
        counters.reject("origin")
        log.warning("session %s… pinned to origin %r refused a request from %r", cid[:8], session.origin, origin)
        inner.reject(403, "This session belongs to another origin\n")
        return
    method = inner.environ.get("REQUEST_METHOD")
    if method == "POST":
        if params.get("gc_close") == "1":
            if session is not None:
                session.client_closed()
            inner.send({"headers": _HEADERS, "body": "{}"})
            return
        if session is not None and session.state is CLOSED:
            inner.send({"status": 410, "headers": _HEADERS, "body": _JSON.encode({"closed": True})})
            return
        if session is None and "gc_seq" not in params:  # an acknowledgement for a session gone
            inner.send({"status": 410, "headers": _HEADERS, "body": _JSON.encode({"closed": True})})
            return
    if session is None or (session.state is CLOSED and method != "POST" and not session.owes(params)):
        limit = options.max_connections
        if limit is not None and server._connections > limit:
            # No slot for it to be away in (this request's own connection counted):
            # 503 before the handler runs, as for a connection over the limit.
            counters.reject("max_connections")
            inner.reject(503, "Too many connections, retry.\n", {"Retry-After": "1"})
            return
        if session is not None:
            session.forget()
        session = Session(cid, inner, server, options, params)
        sessions[cid] = session
        if origin is not None:
            session.origin = origin
        if fwd is not None:
            fwd.hold(session)
        session.start(handler, args, kwargs)
        if method == "POST":
            session.post(inner, params)
        return
    if session.origin is None and origin is not None:
        session.origin = origin
    if method == "POST":
        session.post(inner, params)
    else:
        session.attach(inner, params)


def _forwarded(fwd: Forwarder, inner: Channel, params: Dict[str, str]) -> bool:
    """True if another process holds the session and took this request; False if
    this process may go on (and, when the request starts a session, claimed it)."""
    starts = inner.environ.get("REQUEST_METHOD") != "POST" or ("gc_seq" in params and params.get("gc_close") != "1")
    try:
        for _ in range(int(CLAIM_MS / 50)):  # bounded: a claim lasts CLAIM_MS
            if fwd.forward(inner, params, lambda: _body(inner)):
                return True
            if not starts or fwd.claim(params["gc_cid"]):
                return False
            gevent.sleep(0.05)  # another process is starting it: forward once it holds it
    except Exception as exc:  # Redis is down: serve here rather than not at all
        log.warning("session %s… not forwarded (%s); serving it in this process", params["gc_cid"][:8], exc)
    return False


def _body(inner: Channel) -> Any:
    try:
        return inner.receive(timeout=0)
    except Exception:
        return b""


class Session:
    """One client's session: the transport of its channel, the keeper of its frames."""

    __slots__ = (
        "cid", "sid", "channel", "server", "options", "origin", "state", "started",
        "_pending", "_carrier", "_kind", "_frames", "_base", "_size",
        "_in", "_in_acked", "_ack_timer", "_grace", "_slot", "_space", "_poll_timer",
    )

    def __init__(self, cid: str, first: Channel, server: Any, options: Options, params: Dict[str, str]) -> None:
        self.cid = cid
        # The instance id: a client that knows another one has not seen this
        # session's frames, so its gc_ack is not about them.
        self.sid = base64.urlsafe_b64encode(os.urandom(9)).decode()
        self.server = server
        self.options = options
        self.origin: Optional[str] = None
        self.state = DETACHED
        self.started = False  # the first carrier was attached (reject() no longer works)
        self._pending: Optional[Tuple[Channel, Dict[str, str]]] = (first, params)
        self._carrier: Optional[Channel] = None
        self._kind = ""
        # Frames not yet acknowledged: number _base + 1 is _frames[0].
        self._frames: Deque[Tuple[Frame, int]] = collections.deque()
        self._base = 0
        self._size = 0
        # Client messages: the last number delivered, and the last acknowledged.
        self._in = _number(params, "gc_next", 1) - 1
        self._in_acked = self._in
        self._ack_timer: Any = None
        self._grace: Any = None
        self._slot = False  # holds a max_connections slot while detached
        self._space = gevent.event.Event()
        self._poll_timer: Any = None
        self.channel = Channel(first.environ, self, False, options.max_queue)

    def allows(self, environ: dict, origin: Optional[str]) -> bool:
        """The session's pin: a request from another page origin is not its client.

        A browser request that carries no ``Origin`` and that the browser marks as
        not same-origin (an ``<img>`` or ``<script>`` of another site or subdomain
        holding a stolen ``gc_cid``) is not greenchan.js, which always sends one then.
        """
        if self.origin is None:
            return True
        if origin is None:
            return environ.get("HTTP_SEC_FETCH_SITE", "none").lower() in ("same-origin", "none")
        return same_page(self.origin, origin)

    @property
    def kind(self) -> str:
        """The transport the client is on now (``channel.transport``)."""
        return self._kind or "longpoll"

    # -- life --------------------------------------------------------------------

    def start(self, handler: Callable, args: tuple, kwargs: dict) -> None:
        """Run the application's handler, once for the session, in this request's greenlet."""
        self.server._register(self.channel)
        run_handler(self.channel, handler, args, kwargs)
        if self.channel.is_open:
            self.accept_now()

    def accept_now(self, subprotocol: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        """Attach the first carrier (the handler sent, received or returned)."""
        if self._pending is not None:
            first, params = self._pending
            self._pending = None
            self.started = True
            if first.is_open:
                self.attach(first, params, new=True)
            else:
                self._detached(handover=True)

    def attach(self, carrier: Channel, params: Dict[str, str], new: bool = False) -> None:
        """Make ``carrier`` the client's connection and send it what it has not got."""
        if params.get("gc_sid") == self.sid:
            self._trim(_number(params, "gc_ack"))
        old, self._carrier = self._carrier, None
        if old is not None:
            self._let_go(old)
        if self.state is not CLOSED:  # a closed one is forgotten when its grace ends
            self._stop_grace()
        kind = carrier.transport
        if kind == "longpoll" and carrier.environ.get("HTTP_ACCEPT", "").startswith("text/event-stream"):
            kind = "sse"
        self._kind = kind
        self.channel.is_websocket = kind == "websocket"
        hello = {"hello": {"sid": self.sid, "new": new, "in": self._in}}
        if self.state is not CLOSED:
            self.state = ATTACHED
        if kind == "longpoll":
            if self._frames or params.get("gc_open") == "1" or self.state is CLOSED:
                self._answer_poll(carrier, hello)
                return
            self._carrier = carrier
            self._poll_timer = get_hub().loop.timer(POLL_WAIT)
            self._poll_timer.start(self._poll_expired, carrier)
            carrier.on_close(lambda status: self._carrier_closed(carrier))
            return
        self._carrier = carrier
        if kind == "websocket":
            carrier.on_receive(self._ws_message)
        carrier.on_close(lambda status: self._carrier_closed(carrier))
        self._write(carrier, hello)
        for frame, _ in list(self._frames):
            self._write(carrier, frame)
        if self.state is CLOSED:
            self._end_carrier(carrier)

    def owes(self, params: Dict[str, str]) -> bool:
        """A closed session still has frames for this client (its ``close`` frame at
        least): the client comes back to learn how it ended, not to start over."""
        return params.get("gc_sid") == self.sid and _number(params, "gc_ack") < self._base + len(self._frames)

    def _poll_expired(self, carrier: Channel) -> None:
        if self._carrier is carrier:
            self._carrier = None
            self._answer_poll(carrier, None)

    def _answer_poll(self, carrier: Channel, hello: Optional[dict]) -> None:
        if self._poll_timer is not None:
            self._poll_timer.stop()
            self._poll_timer = None
        body: Dict[str, Any] = {"hello": hello["hello"]} if hello else {"in": self._in}
        body["from"] = self._base
        body["f"] = [_json_frame(frame) for frame, _ in self._frames]
        carrier.send({"headers": _HEADERS, "body": _JSON.encode(body)}, wait=False)
        if self._carrier is None:
            self._detached(handover=isinstance(carrier, Channel))

    def _let_go(self, carrier: Channel) -> None:
        """A newer carrier replaced this one: end it without ending the session."""
        if carrier.transport == "longpoll" and carrier.is_open:
            self._answer_poll(carrier, None)
        else:
            carrier.close(1000, "replaced by a newer connection")

    def _carrier_closed(self, carrier: Channel) -> None:
        if carrier is self._carrier:
            self._carrier = None
            if self._poll_timer is not None:
                self._poll_timer.stop()
                self._poll_timer = None
            if self.state is ATTACHED:
                self._detached(handover=isinstance(carrier, Channel))
            if carrier.transport == "websocket" and carrier.close_code == 1000 and carrier.close_status is CloseStatus.NORMAL:
                self.client_closed()

    def _detached(self, handover: bool) -> None:
        """No carrier: keep the frames, hold a connection slot, start the grace timer.

        With ``handover`` the carrier was a connection of this process, which
        frees its slot as it ends: the session takes that slot over (so
        ``max_connections`` slots hold that many detached sessions); a carrier
        of another process frees nothing here, so a free slot is needed.
        """
        if self.state is CLOSED:
            return
        self.state = DETACHED
        if not self._slot:
            if handover:
                self.server._connections += 1
            elif not self.server._admit():
                log.warning("session %s… dropped: max_connections reached while it was away", self.cid[:8])
                self._finish(CloseStatus.GOING_AWAY)
                return
            self._slot = True
        if self._grace is None:
            self._grace = get_hub().loop.timer(self.options.session_grace)
            self._grace.start(self._grace_over)

    def _stop_grace(self) -> None:
        if self._grace is not None:
            self._grace.stop()
            self._grace = None
        if self._slot:
            self._slot = False
            self.server._release()

    def _grace_over(self) -> None:
        self._grace = None
        if self.state is CLOSED:
            self.forget()
        else:
            log.debug("session %s… ended: the client stayed away %s s", self.cid[:8], self.options.session_grace)
            self._finish(CloseStatus.GOING_AWAY)

    # -- frames out ------------------------------------------------------------------

    def send(self, data: Any, close: Optional[bool], wait: bool) -> bool:
        """The channel's send: one frame, kept until the client acknowledges it."""
        if isinstance(data, Event):
            data = data.data
        elif isinstance(data, dict):
            data = data.get("body")
            data = b"" if data is None else data
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        ok = self._push(data)
        self.accept_now()  # after the push: the first answer carries the frame
        if ok and close:
            self.close(1000, "")
        return ok

    def send_tagged(self, data: Any, group: str, msg_id: str) -> bool:
        """A message of a group with history: its id first, so the client can resume."""
        return self._push({"id": [group, msg_id]}) and self.send(data, None, False)

    def control(self, frame: dict) -> bool:
        """A control frame (a group's position, a resume's result)."""
        ok = self._push(frame)
        self.accept_now()
        return ok

    def _push(self, frame: Frame) -> bool:
        if self.state is CLOSED:
            return False
        # What a kept frame costs besides its bytes (the deque slot, the tuple):
        # counted, so that empty messages cannot pile up without bound either.
        size = (len(frame) if not isinstance(frame, dict) else 64) + _FRAME_OVERHEAD
        self._frames.append((frame, size))
        self._size += size
        if self._size > self.options.send_buffer and len(self._frames) > 1:
            log.warning("session %s…: %d bytes unacknowledged, closing as slow consumer", self.cid[:8], self._size)
            self._finish(CloseStatus.SLOW_CONSUMER, 1013, "slow consumer")
            return False
        carrier = self._carrier
        if carrier is not None:
            if self._kind == "longpoll":
                self._carrier = None
                self._answer_poll(carrier, None)
            else:
                self._write(carrier, frame)
        return True

    def _write(self, carrier: Channel, frame: Frame) -> None:
        if self._kind == "websocket":
            if isinstance(frame, dict):
                carrier.send("\x00" + _JSON.encode(frame), wait=False)
            elif isinstance(frame, str) and frame[:1] == "\x00":
                carrier.send("\x00" + frame, wait=False)
            else:
                carrier.send(frame, wait=False)
        else:  # sse
            carrier.send(_sse_event(frame), wait=False)

    def _trim(self, ack: int) -> None:
        """The client has ``ack`` frames: forget those."""
        frames = self._frames
        while self._base < ack and frames:
            _, size = frames.popleft()
            self._size -= size
            self._base += 1

    # -- messages in -----------------------------------------------------------------

    def post(self, inner: Channel, params: Dict[str, str]) -> None:
        """A POST: acknowledgements, and one client message if it has a number."""
        if params.get("gc_sid") == self.sid and "gc_ack" in params:
            self._trim(_number(params, "gc_ack"))
        if "gc_seq" in params:
            seq = _number(params, "gc_seq")
            if seq > self._in + 1:
                inner.send({"status": 409, "headers": _HEADERS, "body": _JSON.encode({"in": self._in, "sid": self.sid})})
                return
            if seq == self._in + 1:
                try:
                    message = inner.receive(timeout=0)
                except (TimeoutError, Exception):
                    message = b""
                self._in = self._in_acked = seq
                self._take(message)
        inner.send({"headers": _HEADERS, "body": _JSON.encode({"in": self._in, "sid": self.sid})})

    def _ws_message(self, message: Any) -> None:
        if isinstance(message, str) and message[:1] == "\x00":
            if message[1:2] != "\x00":
                self._ws_control(message[1:])
                return
            message = message[1:]
        self._in += 1
        self._take(message)
        if self._in - self._in_acked >= _ACK_EVERY:
            self._send_ack()
        elif self._ack_timer is None:
            self._ack_timer = get_hub().loop.timer(_ACK_DELAY)
            self._ack_timer.start(self._send_ack)

    def _ws_control(self, text: str) -> None:
        try:
            control = json.loads(text)
        except ValueError:
            log.debug("session %s…: unreadable control frame dropped", self.cid[:8])
            return
        if isinstance(control, dict) and isinstance(control.get("ack"), int):
            self._trim(control["ack"])

    def _send_ack(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.stop()
            self._ack_timer = None
        carrier = self._carrier
        if carrier is not None and self._kind == "websocket" and self._in != self._in_acked:
            self._in_acked = self._in
            carrier.send("\x00" + _JSON.encode({"ack": self._in}), wait=False)

    def _take(self, message: Any) -> None:
        """Deliver a client message; wait (holding its carrier) while the queue is full."""
        channel = self.channel
        if not channel.is_open:
            return
        if not channel._deliver(message):
            self._space.clear()
            self._space.wait(self.options.send_timeout)

    def resume_reading(self) -> None:
        self._space.set()

    # -- closing ---------------------------------------------------------------------

    def close(self, code: int = 1000, reason: str = "", status: CloseStatus = CloseStatus.SERVER_CLOSE) -> None:
        """The application (or the server) ends the session; the client is told."""
        if not self.started and self._pending is not None and status is CloseStatus.INTERNAL_ERROR:
            self.reject(500, "Internal Server Error\n", None)
            return
        if self.state is CLOSED:
            return
        self._push({"close": [code, reason]})
        self.accept_now()
        self._finish(status, code, reason, keep=True)

    def client_closed(self) -> None:
        """greenchan.js's ``chan.close()``: the session ends at once."""
        self._finish(CloseStatus.NORMAL, 1000, "")
        self.forget()

    def reject(self, status: int, body: Any, headers: Any) -> None:
        if self._pending is not None:
            first, _ = self._pending
            self._pending = None
            first.reject(status, body, headers)
        self._finish(CloseStatus.SERVER_CLOSE)
        self.forget()

    def shutdown(self) -> None:
        """The server is stopping: the channel closes (``on_close`` runs) and the
        carrier ends, but with no ``close`` frame: that would end greenchan.js for
        good. The client reconnects, as after a drop, and starts a new session on
        the server that comes back (or another process)."""
        carrier = self._carrier
        if carrier is not None and self._kind == "websocket":
            # What was received goes unacknowledged for up to _ACK_DELAY: say it now,
            # or the client sends it again to the new session, which delivers it twice.
            self._send_ack()
            self._carrier = None
            carrier.close(1001, "server shutting down")
        self._finish(CloseStatus.SERVER_CLOSE, 1001, "server shutting down")

    def abort(self) -> None:
        self._finish(CloseStatus.SERVER_CLOSE)
        self.forget()

    def ping(self, payload: bytes) -> bool:
        carrier = self._carrier
        return carrier is not None and carrier.is_websocket and carrier.ping(payload)

    def _finish(self, status: CloseStatus, code: Optional[int] = None, reason: Optional[str] = None, keep: bool = False) -> None:
        """CLOSED: run on_close (through the channel), end the carrier; with ``keep``
        the last frames stay for a client that comes back within the grace."""
        if self.state is CLOSED:
            return
        self.state = CLOSED
        self.channel._finish(status, code, reason)
        self.server._unregister(self.channel)
        if self._ack_timer is not None:
            self._ack_timer.stop()
            self._ack_timer = None
        carrier = self._carrier
        if carrier is not None:
            if self._kind == "longpoll":
                self._carrier = None
                self._answer_poll(carrier, None)
            else:
                self._end_carrier(carrier)
        if not keep:
            self.forget()
        elif self._grace is None:
            self._grace = get_hub().loop.timer(self.options.session_grace)
            self._grace.start(self._grace_over)

    def _end_carrier(self, carrier: Channel) -> None:
        self._carrier = None
        carrier.close(1000, "session closed")

    def forget(self) -> None:
        """Leave the registry: the client id, if it comes back, starts a new session."""
        self._stop_grace()
        sessions = _registry(self.server)
        if sessions.get(self.cid) is self:
            del sessions[self.cid]
            fwd = getattr(self.server, "forwarder", None)
            if fwd is not None:
                fwd.release(self.cid)

    def __repr__(self) -> str:
        return f"<Session {self.cid[:8]}… {self.state} {self._kind}>"


def _json_frame(frame: Frame) -> Any:
    if isinstance(frame, dict):
        return {"c": frame}
    if isinstance(frame, bytes):
        return {"b": base64.b64encode(frame).decode()}
    return frame


def _sse_event(frame: Frame) -> Event:
    if isinstance(frame, dict):
        return Event(_JSON.encode(frame), event="gc")
    if isinstance(frame, bytes):
        return Event(base64.b64encode(frame).decode(), event="gcb")
    if "\r" in frame:  # EventSource turns CR into LF: send the exact text as JSON
        return Event(_JSON.encode(frame), event="gct")
    return Event(frame)
