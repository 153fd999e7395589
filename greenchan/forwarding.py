"""Sessions across processes: a request reaches any process, the session lives in one.

With gunicorn ``-w N`` or several hosts and no sticky routing, the requests of
one greenchan.js session land on any process. The process that started the
session (its *holder*) subscribes to a Redis channel of its own for it,
``<prefix>sess:{<gc_cid>}``; a process that gets a request for a session it does
not hold publishes the request there, and PUBLISH's reply says whether a holder
is alive (1) or not (0: the session is gone, this process starts a new one).
The channels ride on the store's subscriber connections (its outages, its
reconnections); on a Redis Cluster they are shard channels (SPUBLISH), the
session id in braces choosing the shard.

- A POST is answered by the holder through the forwarding process's inbox
  (``<prefix>node:{<id>}``), which then answers the client.
- A carrier (a WebSocket, an SSE stream, a long-poll) stays where it arrived; the
  holder's session writes to a ``RemoteCarrier``, whose frames travel to the
  forwarding process and out through the real carrier; what the client sends
  over a forwarded WebSocket, and the carrier's end, travel back.

Two processes that get the first requests of one client at once must not both
start it: a process takes ``<prefix>sess:{<gc_cid>}:claim`` (SET NX, a few seconds)
before it starts a session, and the other forwards once the winner subscribed.

Everything travels as one Redis message: a JSON header line, then the payload
in the stores' codec (str, bytes, a response dict or an Event).
"""
from __future__ import annotations

import base64
import collections
import itertools
import json
import logging
import os
from typing import Any, Callable, Deque, Dict, Optional

import gevent
import gevent.event

from . import counters
from .channel import Channel, CloseStatus
from .origin import page_origin
from .stores.codec import decode, encode

log = logging.getLogger("greenchan.forwarding")

# How long a forwarding process waits for the holder's answer to a POST.
ANSWER_TIMEOUT = 10.0
# How long a claim to start a session stands (the holder subscribes well within it).
CLAIM_MS = 5000

_JSON = json.JSONEncoder(separators=(",", ":"))
_NONE = b"-"  # no payload


def forwarder(server: Any) -> Optional["Forwarder"]:
    """The server's forwarder, if it was given a ``RedisChannelStore`` (else None)."""
    fwd = getattr(server, "forwarder", None)
    if fwd is None:
        store = getattr(server.options, "store", None)
        if store is None or not hasattr(store, "_url"):
            return None
        fwd = server.forwarder = Forwarder(store)
    return fwd


class Forwarder:
    """One per process: the Redis side of sessions held here and forwarded from here."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.node = base64.urlsafe_b64encode(os.urandom(9)).decode()
        self.prefix = store.prefix
        self.inbox = f"{self.prefix}node:{{{self.node}}}"
        self._held: Dict[str, Any] = {}  # gc_cid -> the Session held here
        self._remote: Dict[str, "RemoteCarrier"] = {}  # carrier id -> carrier forwarded to us
        self._proxied: Dict[str, Channel] = {}  # carrier id -> our carrier of a session held elsewhere
        self._answers: Dict[str, gevent.event.AsyncResult] = {}
        self._ids = itertools.count(1)
        store._listen(self.inbox, self._arrived)

    # -- the holder's side -----------------------------------------------------------

    def claim(self, cid: str) -> bool:
        """Take the right to start ``cid``'s session (no other process is starting it)."""
        return bool(self.store._execute("SET", f"{self._topic(cid)}:claim", self.node, "NX", "PX", CLAIM_MS))

    def hold(self, session: Any) -> None:
        """Serve forwarded requests of ``session`` from now on."""
        self._held[session.cid] = session
        self.store._listen(self._topic(session.cid), self._arrived)

    def release(self, cid: str) -> None:
        """``cid``'s session is gone: other processes now start a new one."""
        if self._held.pop(cid, None) is not None:
            self.store._unlisten(self._topic(cid))

    # -- the forwarding side ---------------------------------------------------------

    def forward(self, inner: Channel, params: Dict[str, str], take_body: Callable[[], Any]) -> bool:
        """Send this request to the holder of its session; False if none is alive."""
        cid = params["gc_cid"]
        environ = inner.environ
        head = {
            "cid": cid, "reply": self.inbox, "params": params,
            "origin": page_origin(environ), "fetch_site": environ.get("HTTP_SEC_FETCH_SITE", "none"),
            "accept": environ.get("HTTP_ACCEPT", ""),
        }
        if environ.get("REQUEST_METHOD") == "POST":
            rid = f"{self.node}:{next(self._ids)}"
            answer = self._answers[rid] = gevent.event.AsyncResult()
            head.update(op="post", rid=rid)
            try:
                if not self._publish(self._topic(cid), head, take_body()):
                    return False
                reply = answer.get(timeout=ANSWER_TIMEOUT)
            except gevent.Timeout:
                reply = {"status": 503, "headers": [("Retry-After", "1")], "body": "session holder did not answer\n"}
            finally:
                self._answers.pop(rid, None)
            inner.send(reply)
            return True
        carrier = f"{self.node}:{next(self._ids)}"
        head.update(op="attach", carrier=carrier, kind=inner.transport)
        self._proxied[carrier] = inner
        if not self._publish(self._topic(cid), head, None):
            del self._proxied[carrier]
            return False
        if inner.is_websocket:
            inner.on_receive(lambda message: self._publish(self._topic(cid), {"op": "in", "cid": cid, "carrier": carrier}, message))

        def gone(status: CloseStatus) -> None:
            if self._proxied.pop(carrier, None) is not None:
                self._publish(self._topic(cid), {
                    "op": "gone", "cid": cid, "carrier": carrier,
                    "code": inner.close_code, "status": status.value,
                }, None)

        inner.on_close(gone)
        return True

    # -- Redis -------------------------------------------------------------------------

    def _topic(self, cid: str) -> str:
        return f"{self.prefix}sess:{{{cid}}}"

    def _publish(self, channel: str, head: dict, payload: Any) -> bool:
        data = _JSON.encode(head).encode() + b"\n" + (_NONE if payload is None else encode(payload))
        return bool(self.store._execute(self.store._publish_verb, channel, data))

    def _arrived(self, raw: bytes) -> None:
        """A message on the inbox or a held session's channel, in the store's reader."""
        line, _, rest = raw.partition(b"\n")
        try:
            head = json.loads(line)
            payload = None if rest == _NONE else decode(rest)
        except Exception:
            log.exception("unreadable forwarded session message dropped")
            return
        if head.get("op") in ("post", "attach"):
            gevent.spawn(self._dispatch, head, payload)  # may wait: off the reader
        else:
            self._dispatch(head, payload)  # never waits, and keeps the order

    def _dispatch(self, head: dict, payload: Any) -> None:
        op = head.get("op")
        if op in ("send", "close", "reject"):  # to one of our carriers, from the holder
            inner = self._proxied.get(head["carrier"])
            if inner is None:
                return
            if op == "send":
                inner.send(payload, close=head.get("close"), wait=False)
            elif op == "reject":
                inner.reject(head["status"], payload or "", None)
            else:
                inner.close(head.get("code", 1000), head.get("reason", ""))
            return
        if op == "answer":
            answer = self._answers.get(head["rid"])
            if answer is not None:
                answer.set(payload)
            return
        session = self._held.get(head.get("cid", ""))
        if op in ("in", "gone"):
            remote = self._remote.get(head["carrier"])
            if remote is not None:
                remote._arrived(op, head, payload)
            return
        if session is None:  # gone meanwhile: the client starts over
            if op == "post":
                self._answer(head, {"status": 410, "headers": [("Content-Type", "application/json")], "body": '{"closed":true}'})
            elif op == "attach":
                self._publish(head["reply"], {"op": "close", "carrier": head["carrier"], "code": 1000, "reason": "session gone"}, None)
            return
        origin = head.get("origin")
        if not session.allows({"HTTP_SEC_FETCH_SITE": head.get("fetch_site", "none")}, origin):
            counters.reject("origin")
            log.warning("session %s… pinned to origin %r refused a forwarded request from %r", session.cid[:8], session.origin, origin)
            if op == "post":
                self._answer(head, {"status": 403, "body": "This session belongs to another origin\n"})
            else:
                self._publish(head["reply"], {"op": "reject", "carrier": head["carrier"], "status": 403}, "This session belongs to another origin\n")
            return
        if session.origin is None and origin is not None:
            session.origin = origin
        params = head["params"]
        if op == "post" and params.get("gc_close") == "1":
            session.client_closed()
            self._answer(head, {"headers": [("Content-Type", "application/json")], "body": "{}"})
        elif op == "post":
            session.post(_PostProxy(self, head, payload), params)
        elif op == "attach":
            remote = RemoteCarrier(self, head)
            self._remote[remote.id] = remote
            session.attach(remote, params)

    def _answer(self, head: dict, reply: Any) -> None:
        self._publish(head["reply"], {"op": "answer", "rid": head["rid"]}, reply)


class _PostProxy:
    """A forwarded POST, as ``Session.post`` sees a POST's channel: its body, its answer."""

    __slots__ = ("fwd", "head", "body")

    def __init__(self, fwd: Forwarder, head: dict, body: Any) -> None:
        self.fwd, self.head, self.body = fwd, head, body

    def receive(self, timeout: Optional[float] = None) -> Any:
        return self.body

    def send(self, data: Any, close: Optional[bool] = None, wait: bool = True) -> bool:
        self.fwd._answer(self.head, data)
        return True


class RemoteCarrier:
    """A carrier held by another process, as a session sees a carrier channel."""

    __slots__ = ("fwd", "id", "reply", "cid", "environ", "_kind", "is_open", "close_code",
                 "close_status", "_on_receive", "_on_close", "_inbound", "_draining")

    def __init__(self, fwd: Forwarder, head: dict) -> None:
        self.fwd = fwd
        self.id = head["carrier"]
        self.reply = head["reply"]
        self.cid = head["cid"]
        self.environ = {"HTTP_ACCEPT": head.get("accept", ""), "HTTP_ORIGIN": head.get("origin")}
        self._kind = head.get("kind", "longpoll")
        self.is_open = True
        self.close_code: Optional[int] = None
        self.close_status: Optional[CloseStatus] = None
        self._on_receive: Optional[Callable[[Any], Any]] = None
        self._on_close: Optional[Callable[[CloseStatus], Any]] = None
        # Client messages from the forwarded WebSocket, delivered one at a time in
        # order by one greenlet (delivery waits while the session's queue is full).
        self._inbound: Deque[Any] = collections.deque()
        self._draining = False

    @property
    def transport(self) -> str:
        return self._kind

    @property
    def is_websocket(self) -> bool:
        return self._kind == "websocket"

    def send(self, data: Any, close: Optional[bool] = None, wait: bool = True) -> bool:
        if not self.is_open:
            return False
        self.fwd._publish(self.reply, {"op": "send", "carrier": self.id, "close": close}, data)
        return True

    def close(self, code: int = 1000, reason: str = "") -> bool:
        if not self.is_open:
            return False
        self.fwd._publish(self.reply, {"op": "close", "carrier": self.id, "code": code, "reason": reason}, None)
        return True

    def ping(self, payload: bytes = b"") -> bool:
        return False

    def on_receive(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        self._on_receive = fn
        return fn

    def on_close(self, fn: Callable[[CloseStatus], Any]) -> Callable[[CloseStatus], Any]:
        self._on_close = fn
        return fn

    def _arrived(self, op: str, head: dict, payload: Any) -> None:
        if op == "in":
            self._inbound.append(payload)
            if not self._draining:
                self._draining = True
                gevent.spawn(self._drain)
            return
        self.fwd._remote.pop(self.id, None)
        self.is_open = False
        self.close_code = head.get("code")
        try:
            self.close_status = CloseStatus(head.get("status"))
        except ValueError:
            self.close_status = CloseStatus.UNKNOWN
        if self._on_close is not None:
            self._on_close(self.close_status)

    def _drain(self) -> None:
        try:
            while self._inbound:
                message = self._inbound.popleft()
                if self._on_receive is not None:
                    self._on_receive(message)
        finally:
            self._draining = False
