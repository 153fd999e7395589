"""The Channel: one client conversation, whatever transport carries it.

A channel's life is a small state machine (in the manner of h11)::

    CONNECTING --accept--> OPEN --close--> CLOSED
         \\______________________________/^

``CONNECTING`` exists only for a WebSocket before its handshake; an HTTP channel
starts ``OPEN``. The move to ``CLOSED`` happens once (``_finish``), and that one
move is what schedules ``on_close``, so "exactly once" is a property of the state
machine rather than of scattered flags.

The channel knows nothing about frames or chunked encoding: a transport object
(``websocket.py``, ``http.py``) turns its calls into bytes and feeds it messages
through ``_deliver``.
"""
from __future__ import annotations

import collections
import enum
import logging
import re
import time
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Union
from urllib.parse import parse_qs

import gevent
from gevent.hub import Waiter, get_hub, getcurrent
from gevent.timeout import Timeout

from . import counters
from .wire import header_items

__all__ = ["Channel", "ChannelClosed", "CloseStatus", "Event", "Message"]

log = logging.getLogger("greenchan.channel")

# One line per closed channel; silent until the application gives it a handler
# (it does not propagate, so an application's root logging stays as it was).
_access = logging.getLogger("greenchan.access")
_access.propagate = False
if _access.level == logging.NOTSET:
    _access.setLevel(logging.INFO)  # a handler is all it takes to turn it on

Message = Union[str, bytes]

CONNECTING, OPEN, CLOSED = "connecting", "open", "closed"


class CloseStatus(str, enum.Enum):
    """Why a channel closed; the values are http-kit's keywords."""

    SERVER_CLOSE = "server-close"
    CLIENT_CLOSE = "client-close"
    NORMAL = "normal"
    GOING_AWAY = "going-away"
    PROTOCOL_ERROR = "protocol-error"
    UNSUPPORTED = "unsupported"
    NO_STATUS = "no-status-received"
    INVALID_DATA = "invalid-payload-data"
    POLICY_VIOLATION = "policy-violation"
    MESSAGE_TOO_BIG = "message-too-big"
    INTERNAL_ERROR = "internal-server-error"
    SLOW_CONSUMER = "slow-consumer"
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def from_code(cls, code: Optional[int]) -> "CloseStatus":
        """The status for a close code received from a WebSocket client."""
        return _BY_CODE.get(code, cls.UNKNOWN)  # type: ignore[arg-type]


_BY_CODE = {
    1000: CloseStatus.NORMAL,
    1001: CloseStatus.GOING_AWAY,
    1002: CloseStatus.PROTOCOL_ERROR,
    1003: CloseStatus.UNSUPPORTED,
    1005: CloseStatus.NO_STATUS,
    1006: CloseStatus.GOING_AWAY,
    1007: CloseStatus.INVALID_DATA,
    1008: CloseStatus.POLICY_VIOLATION,
    1009: CloseStatus.MESSAGE_TOO_BIG,
    1011: CloseStatus.INTERNAL_ERROR,
}


class ChannelClosed(Exception):
    """Raised by ``receive()`` once the channel is closed and drained."""

    def __init__(self, status: Optional[CloseStatus] = None) -> None:
        super().__init__(f"channel closed ({status})" if status else "channel closed")
        self.status = status


class Event:
    """One Server-Sent Event; on a WebSocket only ``data`` is sent, as text."""

    __slots__ = ("data", "event", "id", "retry")

    def __init__(
        self,
        data: Any,
        event: Optional[str] = None,
        id: Optional[str] = None,
        retry: Optional[int] = None,
    ) -> None:
        self.data = data if isinstance(data, str) else str(data)
        self.event = event
        self.id = id
        self.retry = retry
        for name in ("event", "id"):
            value = getattr(self, name)
            if value is not None and ("\n" in value or "\r" in value):
                raise ValueError(f"Event {name} cannot contain a newline")

    def encode(self) -> bytes:
        """The ``text/event-stream`` form: one ``data:`` line per line of data."""
        lines = []
        if self.event is not None:
            lines.append(f"event: {self.event}")
        if self.id is not None:
            lines.append(f"id: {self.id}")
        if self.retry is not None:
            lines.append(f"retry: {int(self.retry)}")
        # The SSE format splits lines at CR, LF and CRLF only; str.splitlines()
        # would also split at U+2028, form feed and others, and drop a final
        # newline, so the client would not get the text that was sent.
        lines.extend("data: " + line for line in _SSE_LINES.split(self.data))
        return ("\n".join(lines) + "\n\n").encode()

    def __repr__(self) -> str:
        return f"Event({self.data!r}, event={self.event!r}, id={self.id!r})"


_SSE_LINES = re.compile(r"\r\n|\r|\n")

_RESPONSE_KEYS = frozenset({"status", "headers", "body"})


def check_message(data: Any) -> None:
    """Reject what ``send`` cannot carry, with a message that says what can."""
    if isinstance(data, (str, bytes, bytearray, memoryview, Event)):
        return
    if isinstance(data, dict):
        extra = set(data) - _RESPONSE_KEYS
        if extra:
            raise TypeError(
                f"unknown response key(s) {sorted(extra)}; use status, headers, body"
            )
        return
    raise TypeError(
        f"cannot send {type(data).__name__}: send str, bytes, a response dict or an Event"
    )


def _text(message: Any) -> str:
    """The text of a message, for a wire that carries only text (SSE)."""
    if isinstance(message, dict):
        message = message.get("body")
    if message is None:
        return ""
    if isinstance(message, str):
        return message
    return bytes(message).decode("utf-8", "replace")


def _size(data: Any) -> int:
    """The payload size of an ``Event`` or a response dict (for the counters)."""
    if isinstance(data, Event):
        return len(data.data)
    if isinstance(data, dict):
        body = data.get("body")
        return 0 if body is None else len(body)
    return len(data)


def _quote(text: str) -> str:
    """A path for a key=value line: no spaces or quotes to split on."""
    return text.replace("%", "%25").replace(" ", "%20").replace('"', "%22") or "/"


def run_handler(channel: "Channel", handler: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """Call the application's handler; an exception is logged and closes the
    channel (500 before a response or handshake, 1011 after), as API.md says."""
    try:
        handler(channel, *args, **kwargs)
    except Exception:
        environ = channel.environ
        # The route and the client, so an operator can find the request; not the
        # query string (a session's gc_cid is a capability).
        log.exception(
            "handler %s raised on %s %s from %s:%s", getattr(handler, "__name__", handler),
            environ.get("REQUEST_METHOD", "-"), environ.get("PATH_INFO", "-"),
            environ.get("REMOTE_ADDR", "-"), environ.get("REMOTE_PORT", "-"),
        )
        if channel.is_open:
            channel._transport.close(1011, "internal error", CloseStatus.INTERNAL_ERROR)


def _wake(waiter: Waiter, value: Any = None) -> None:
    """Resume a greenlet parked on ``waiter`` from any greenlet, hub included."""
    hub = get_hub()
    if getcurrent() is hub:
        waiter.switch(value)
    else:
        hub.loop.run_callback(waiter.switch, value)


# Channels whose dispatcher greenlet is parked, and the sweep that lets go of
# those that stayed idle for a whole sweep interval: a parked greenlet costs
# about 7 KiB (measured: 14.5 vs 6.9 KiB per idle WebSocket), so an idle
# channel should not keep one, but a busy one should not pay a spawn per message.
_PARKED: "set[Channel]" = set()
_SWEEP_INTERVAL = 1.0
_sweeper: List[Any] = []


def _park(channel: "Channel") -> None:
    _PARKED.add(channel)
    hub = get_hub()
    if not _sweeper or _sweeper[0] is not hub:
        timer = hub.loop.timer(_SWEEP_INTERVAL, _SWEEP_INTERVAL, ref=False)
        timer.start(_sweep)
        _sweeper[:] = [hub, timer]


def _sweep() -> None:
    for channel in list(_PARKED):
        if channel._recent:
            channel._recent = False
        elif channel._parked is not None:
            channel._unpark()


class Channel:
    """One asynchronous channel to a client: WebSocket, long-polling or streaming.

    Created by ``with_channel``, never by users. Messages from the client wait in
    a bounded inbound queue until ``on_receive`` or ``receive()`` takes them, so a
    callback registered late loses nothing. ``on_receive`` calls run in order, one
    at a time, in a greenlet that exists only while there is something to deliver.
    """

    __slots__ = (
        "environ",
        "is_websocket",
        "close_status",
        "close_code",
        "close_reason",
        "subprotocol",
        "_transport",
        "_state",
        "_queue",
        "_max_queue",
        "_on_receive",
        "_on_close",
        "_on_ping",
        "_close_hooks",
        "_waiter",
        "_dispatching",
        "_parked",
        "_recent",
        "_pinging",
        "_on_close_pending",
        # What this channel carried, for metrics and the access log (counters.py).
        "_traffic",
        "_opened_at",
        "_n_in",
        "_b_in",
        "_n_out",
        "_b_out",
        "__weakref__",
    )

    def __init__(self, environ: dict, transport: Any, is_websocket: bool, max_queue: int) -> None:
        self.environ = environ
        self.is_websocket = is_websocket
        self.close_status: Optional[CloseStatus] = None
        self.close_code: Optional[int] = None
        self.close_reason: Optional[str] = None
        self.subprotocol: Optional[str] = None
        self._transport = transport
        self._state = CONNECTING if is_websocket else OPEN
        # Created lazily: most channels of a broadcast app never receive.
        self._queue: Optional[Deque[Message]] = None
        self._max_queue = max_queue
        self._on_receive: Optional[Callable[[Message], Any]] = None
        self._on_close: Optional[Callable[[CloseStatus], Any]] = None
        self._on_ping: Optional[Callable[[bytes], Any]] = None
        # Internal listeners (groups leave on close); run before on_close.
        self._close_hooks: Optional[List[Callable[["Channel"], Any]]] = None
        self._waiter: Optional[Waiter] = None
        self._dispatching = False
        # The dispatcher greenlet, parked between messages of a busy WebSocket:
        # waking it is one switch, where spawning a greenlet per message cost 14%
        # of the 64-connection echo profile (bench/). Released when idle.
        self._parked: Optional[Waiter] = None
        self._recent = False  # a message arrived since the last idle check
        self._pinging = False  # an on_ping call is running
        self._on_close_pending = False
        self._opened_at = time.monotonic()
        self._n_in = self._b_in = self._n_out = self._b_out = 0
        if getattr(transport, "counted", True):
            kind = "websocket" if is_websocket else "sse" if "text/event-stream" in environ.get("HTTP_ACCEPT", "") else "longpoll"
            traffic = self._traffic = counters.traffic[kind]
            traffic.opened += 1
            traffic.open += 1
        else:  # a session: its carriers are the connections, counted as channels
            self._traffic = counters.Traffic()
        environ["greenchan.channel"] = self

    # -- public API --------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True until either side closes the channel."""
        return self._state is not CLOSED

    def send(self, data: Any, close: Optional[bool] = None, *, wait: bool = True) -> bool:
        """Send one message; see API.md for what ``data`` and ``close`` mean.

        Returns False, never raises, once the channel is closed. With
        ``wait=False`` (what broadcasts use) it never blocks: a full send buffer
        is left to the slow-consumer timer instead of making the caller wait.
        """
        check_message(data)
        if self._state is CLOSED:
            return False
        # Counted before it goes: a long-poll's send completes (and logs) the channel.
        size = len(data) if isinstance(data, (str, bytes)) else _size(data)
        self._n_out += 1
        self._b_out += size
        traffic = self._traffic
        traffic.messages_out += 1
        traffic.bytes_out += size
        if self._transport.send(data, close, wait):
            return True
        self._n_out -= 1
        self._b_out -= size
        traffic.messages_out -= 1
        traffic.bytes_out -= size
        return False

    def close(self, code: int = 1000, reason: str = "") -> bool:
        """Close the channel; True if this call closed it, False if already closed."""
        if self._state is CLOSED:
            return False
        self._transport.close(code, reason)
        return True

    def receive(self, timeout: Optional[float] = None) -> Message:
        """Wait for the next message; ``ChannelClosed`` once closed and drained."""
        self._transport.accept_now()
        while True:
            queue = self._queue
            if queue:
                message = queue.popleft()
                if len(queue) + 1 == self._max_queue:
                    self._transport.resume_reading()
                return message
            if self._state is CLOSED:
                raise ChannelClosed(self.close_status)
            if self._waiter is not None:
                raise RuntimeError("another greenlet is already waiting in receive()")
            self._waiter = waiter = Waiter()
            try:
                if timeout is None:
                    waiter.get()
                else:
                    with Timeout(timeout, TimeoutError("no message within %s s" % timeout)):
                        waiter.get()
            finally:
                self._waiter = None

    def __iter__(self) -> Iterator[Message]:
        while True:
            try:
                yield self.receive()
            except ChannelClosed:
                return

    def on_receive(self, fn: Callable[[Message], Any]) -> Callable[[Message], Any]:
        """Call ``fn(message)`` for each client message, in order, one at a time."""
        self._on_receive = fn
        if self._queue:
            self._start_dispatch()
        return fn

    def on_close(self, fn: Callable[[CloseStatus], Any]) -> Callable[[CloseStatus], Any]:
        """Call ``fn(status)`` once, after the last ``on_receive``; at once if closed."""
        self._on_close = fn
        if self._state is CLOSED and not self._on_close_pending:
            if self._dispatching:  # after the messages still being delivered
                self._on_close_pending = True
            else:
                self._call(fn, self.close_status)
        return fn

    def on_ping(self, fn: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        """Call ``fn(payload)`` for each client ping; the pong is sent regardless."""
        self._on_ping = fn
        return fn

    def ping(self, payload: bytes = b"") -> bool:
        """Send a WebSocket ping; False if the channel is closed."""
        if not self.is_websocket:
            raise TypeError("ping() needs a WebSocket channel")
        if self._state is CLOSED:
            return False
        return self._transport.ping(payload)

    def accept(self, subprotocol: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> None:
        """Complete the WebSocket handshake now, with extra response headers."""
        if not self.is_websocket:
            return
        if self._state is not CONNECTING:
            raise RuntimeError("the WebSocket handshake has already completed")
        self._transport.accept_now(subprotocol, headers)

    def reject(self, status: int = 403, body: Union[str, bytes] = "", headers: Optional[Dict[str, str]] = None) -> None:
        """Answer a plain HTTP response instead of a channel, and close."""
        if self._state is CLOSED:
            return
        if self._transport.started:
            raise RuntimeError("reject() must come before the response or handshake starts")
        self._transport.reject(status, body, headers)

    @property
    def transport(self) -> str:
        """``"websocket"``, ``"sse"``, ``"longpoll"`` or ``"stream"``: the one in use now."""
        kind = getattr(self._transport, "kind", None)
        if kind is not None:
            return kind
        return "websocket" if self.is_websocket else "longpoll"

    @property
    def session(self) -> Optional[str]:
        """The client id of a session channel (greenchan.js's ``gc_cid``), else None."""
        return getattr(self._transport, "cid", None)

    @property
    def last_event_id(self) -> Optional[str]:
        """The id the client says it last received: ``Last-Event-ID``, else ``gc_last``.

        What ``add_to_group(..., since=channel.last_event_id)`` resumes from; a
        greenchan.js client in several groups sends one id per group.
        """
        value = self.environ.get("HTTP_LAST_EVENT_ID")
        if value:
            return value
        query = self.environ.get("QUERY_STRING", "")
        if "gc_last=" in query:
            values = parse_qs(query).get("gc_last")
            if values and values[-1]:
                return values[-1]
        return None

    def __repr__(self) -> str:
        kind = "websocket" if self.is_websocket else "http"
        path = self.environ.get("PATH_INFO", "")
        return f"<Channel {kind} {path} {self._state}>"

    # -- the stores' side (history) ------------------------------------------

    def _send_tagged(self, message: Any, group: str, msg_id: str) -> bool:
        """Send a message of a group with history, with its id where the wire has room.

        An SSE client gets it as an ``Event`` with that ``id`` (a plain
        ``EventSource`` then resumes by itself), a long-poll client in the
        ``Greenchan-Event-Id`` header, a session (greenchan.js) in a frame of its
        own; a plain WebSocket gets the message unchanged. Never blocks.
        """
        if self._state is CLOSED:
            return False
        tagged = getattr(self._transport, "send_tagged", None)
        if tagged is not None:
            return tagged(message, group, msg_id)
        kind = self.transport
        if kind == "sse" or (kind == "longpoll" and self._wants_sse()):
            if isinstance(message, Event):
                message = Event(message.data, event=message.event, id=msg_id, retry=message.retry)
            else:
                message = Event(_text(message), id=msg_id)
        elif kind == "longpoll":
            if isinstance(message, Event):
                message = message.data
            if isinstance(message, dict):
                headers = list(header_items(message.get("headers")))
                message = dict(message, headers=headers + [("Greenchan-Event-Id", msg_id)])
            else:
                message = {"headers": [("Greenchan-Event-Id", msg_id)], "body": message}
        return self.send(message, wait=False)

    def _position(self, group: str, position: Optional[str]) -> None:
        """Tell the client where ``group`` stands as it joins, so that a client that
        has received nothing yet can still resume from there."""
        if position is None or self._state is CLOSED:
            return
        control = getattr(self._transport, "control", None)
        if control is not None:
            control({"pos": [group, position]})
        elif self.transport == "sse" or (self.transport == "longpoll" and self._wants_sse()):
            # An event with an id and no data: EventSource keeps the id, dispatches nothing.
            line = b"id: %s\n\n" % position.encode()
            if self._transport.started:
                self.send(line, wait=False)
            else:
                headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]
                self.send({"headers": headers, "body": line}, close=False, wait=False)

    def _resumed(self, group: str, recovered: bool) -> None:
        """Tell a session's client whether ``group`` resumed without a gap (``onresume``)."""
        control = getattr(self._transport, "control", None)
        if control is not None and self._state is not CLOSED:
            control({"resume": [group, recovered]})

    def _wants_sse(self) -> bool:
        return not self._transport.started and "text/event-stream" in self.environ.get("HTTP_ACCEPT", "")

    # -- the transport's side ---------------------------------------------

    def _opened(self) -> None:
        """CONNECTING -> OPEN: the WebSocket handshake went out."""
        if self._state is CONNECTING:
            self._state = OPEN

    def _deliver(self, message: Message) -> bool:
        """Queue a client message; False when the queue is full (pause reading)."""
        queue = self._queue
        if queue is None:
            queue = self._queue = collections.deque()
        queue.append(message)
        self._recent = True
        self._n_in += 1
        self._b_in += len(message)
        traffic = self._traffic
        traffic.messages_in += 1
        traffic.bytes_in += len(message)
        if self._waiter is not None:
            _wake(self._waiter)
        elif self._parked is not None:
            self._unpark()
        elif self._on_receive is not None and not self._dispatching:
            self._start_dispatch()
        return len(queue) < self._max_queue

    def _ping_received(self, payload: bytes) -> None:
        # One greenlet at a time runs on_ping, so a ping flood cannot spawn
        # greenlets without bound; pings that arrive meanwhile are skipped (the
        # pongs were already sent by the transport).
        if self._on_ping is not None and not self._pinging:
            self._pinging = True
            gevent.spawn(self._run_on_ping, payload)

    def _run_on_ping(self, payload: bytes) -> None:
        try:
            if self._on_ping is not None:
                self._call(self._on_ping, payload)
        finally:
            self._pinging = False

    def _finish(self, status: CloseStatus, code: Optional[int] = None, reason: Optional[str] = None) -> bool:
        """Move to CLOSED once; schedule ``on_close`` after the last message."""
        if self._state is CLOSED:
            return False
        self._state = CLOSED
        self.close_status = status
        self.close_code = code
        self.close_reason = reason if code is not None else None
        self._traffic.open -= 1
        key = (self.transport, status.value)
        counters.closed[key] = counters.closed.get(key, 0) + 1
        if _access.handlers:
            self._log_access()
        hooks, self._close_hooks = self._close_hooks, None
        for hook in hooks or ():
            self._call(hook, self)
        if self._waiter is not None:
            _wake(self._waiter)
        self._on_close_pending = True
        if self._parked is not None:
            self._unpark()  # the dispatcher runs on_close as it leaves
        elif not self._dispatching:
            if self._on_receive is not None and self._queue:
                self._start_dispatch()
            elif self._on_close is not None:
                gevent.spawn(self._run_on_close)
            else:  # nothing to call; one registered later runs at once
                self._on_close_pending = False
        return True

    def _set_kind(self, kind: str) -> None:
        """The transport changed (a long-poll became a stream): move the open gauge."""
        old, new = self._traffic, counters.traffic[kind]
        if new is old or self._state is CLOSED or old not in counters.traffic.values():
            return  # unchanged, over, or a session (not counted)
        old.open -= 1
        new.open += 1
        self._traffic = new

    def _log_access(self) -> None:
        """One key=value line per closed channel, for log shippers (``greenchan.access``)."""
        env = self.environ
        _access.info(
            "transport=%s method=%s path=%s peer=%s:%s duration=%.3f messages_in=%d bytes_in=%d "
            "messages_out=%d bytes_out=%d status=%s code=%s session=%s",
            self.transport, env.get("REQUEST_METHOD"), _quote(env.get("PATH_INFO", "")),
            env.get("REMOTE_ADDR", "-"), env.get("REMOTE_PORT", "-"),
            time.monotonic() - self._opened_at, self._n_in, self._b_in, self._n_out, self._b_out,
            self.close_status, self.close_code if self.close_code is not None else "-",
            (self.session or "-")[:8],
        )

    def _unpark(self) -> None:
        waiter, self._parked = self._parked, None
        _PARKED.discard(self)
        _wake(waiter)

    def _add_close_hook(self, fn: Callable[["Channel"], Any]) -> None:
        """Run ``fn(channel)`` when the channel closes (used by the stores)."""
        if self._state is CLOSED:
            self._call(fn, self)
            return
        if self._close_hooks is None:
            self._close_hooks = []
        self._close_hooks.append(fn)

    def _remove_close_hook(self, fn: Callable[["Channel"], Any]) -> None:
        if self._close_hooks and fn in self._close_hooks:
            self._close_hooks.remove(fn)

    # -- delivery ------------------------------------------------------------

    def _start_dispatch(self) -> None:
        self._dispatching = True
        gevent.spawn(self._dispatch)

    def _dispatch(self) -> None:
        """Feed queued messages to ``on_receive``; then ``on_close`` if due.

        On a WebSocket the greenlet parks when the queue is empty, and the next
        message wakes it; it leaves when the channel closes or stays idle.
        """
        queue = self._queue
        try:
            while True:
                while queue and self._on_receive is not None:
                    message = queue.popleft()
                    if len(queue) + 1 == self._max_queue:
                        self._transport.resume_reading()
                    try:
                        self._on_receive(message)
                    except Exception:
                        log.exception("on_receive of %r raised; closing with 1011", self)
                        self._transport.close(1011, "internal error", CloseStatus.INTERNAL_ERROR)
                if self._state is CLOSED or not self.is_websocket or self._on_receive is None:
                    break
                # _recent is left to the sweep: clearing it here, after every
                # message, let the sweep release busy dispatchers every second, and
                # their replacements (a greenlet each) brought on full collections
                # (bench/findings.md: echo p99 6-9 -> 1-2 ms at 5k msg/s).
                self._parked = waiter = Waiter()
                _park(self)
                try:
                    waiter.get()
                finally:
                    if self._parked is waiter:
                        self._parked = None
                        _PARKED.discard(self)
                if not queue:
                    break  # released while idle, or closed
        finally:
            self._dispatching = False
        if self._on_close_pending:
            self._run_on_close()

    def _run_on_close(self) -> None:
        if not self._on_close_pending or self._dispatching:
            return  # not due, or the dispatcher will run it after the last message
        self._on_close_pending = False
        if self._on_close is not None:
            self._call(self._on_close, self.close_status)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("callback %r of %r raised", fn, self)
