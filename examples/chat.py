"""A chat with rooms that works over WebSocket, Server-Sent Events and long-polling.

Run it with one command, no Redis, nothing to build::

    python examples/chat.py            # http://127.0.0.1:8080/
    python examples/chat.py --port 9000

Open the page in two browsers; add ``?room=games&user=ann`` to pick a room and a
name, and ``&transports=sse,longpoll`` to see the fallbacks carry the same chat.

One handler, ``ChatApp.channel``, serves the three transports. It follows the wire
convention of greenchan.js (see the comment at the top of
``greenchan/static/greenchan.js``):

* a WebSocket stays in the room's group; its messages arrive through ``on_receive``;
* an SSE GET (``Accept: text/event-stream``) stays in the group and gets ``Event``s;
* a long-poll GET takes the next message it has not seen, or waits in the group for
  one (a broadcast completes the response and the channel leaves the group);
* a POST (from SSE and long-poll clients) carries one message in its body.

Each room keeps its last messages with ids, so a client that comes back with
``gc_last`` gets what it missed, whatever its transport.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

import gevent

try:
    from greenchan import ChannelClosed, Event, MemoryChannelStore, Server, with_channel
except ImportError:  # run from a checkout without installing: python examples/chat.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from greenchan import ChannelClosed, Event, MemoryChannelStore, Server, with_channel
import greenchan.static

log = logging.getLogger("greenchan.examples.chat")

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = os.path.join(HERE, "chat.html")


def _clean(value: str | None, default: str, limit: int = 32) -> str:
    value = (value or "").strip()[:limit]
    return "".join(ch for ch in value if ch.isprintable()) or default


class _Session:
    """One browser tab: its client id (gc_cid) across reconnects and transports."""

    __slots__ = ("last_seen", "open", "room", "user")

    def __init__(self, user: str, room: str) -> None:
        self.user = user
        self.room = room
        self.open = 0  # requests or sockets of this session in progress
        self.last_seen = time.monotonic()


class _Room:
    __slots__ = ("history", "name", "seq")

    def __init__(self, name: str, keep: int) -> None:
        self.name = name
        self.seq = 0
        # (seq, id, json) of the last messages: what a returning client can catch up on.
        self.history: collections.deque[tuple[int, str, str]] = collections.deque(maxlen=keep)


class ChatApp:
    """The chat as one WSGI application: the page, greenchan.js and the channel.

    ``history``: messages kept per room for clients that come back (gc_last).
    ``poll_timeout``: how long a long-poll GET waits before a 204; under the 30 to
    60 s after which proxies and browsers give up on a silent request.
    ``presence_grace``: how long a session may have no request in progress (a
    long-poller between two polls, a tab reconnecting) before it counts as gone.
    """

    def __init__(
        self,
        store: MemoryChannelStore | None = None,
        history: int = 100,
        poll_timeout: float = 25.0,
        presence_grace: float = 10.0,
    ) -> None:
        self.store = store if store is not None else MemoryChannelStore()
        self.poll_timeout = poll_timeout
        self.presence_grace = presence_grace
        self.keep = history
        # Message ids are "<epoch>.<seq>": after a restart the epoch differs, so an
        # old gc_last is recognised as unknown and the whole history is replayed.
        self.epoch = uuid.uuid4().hex[:8]
        self.rooms: dict[str, _Room] = {}
        self.sessions: dict[str, _Session] = {}
        self._reaper: gevent.Greenlet | None = None
        self.channel = with_channel(self._channel)

    # -- WSGI dispatch ------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/chat":
            if self._reaper is None:
                self._reaper = gevent.spawn(self._reap)
            return self.channel(environ, start_response)
        if path == "/greenchan.js":
            return greenchan.static.javascript(environ, start_response)
        if path in ("/", "/index.html"):
            with open(PAGE, "rb") as f:
                body = f.read()
            start_response(
                "200 OK",
                [
                    ("Content-Type", "text/html; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-cache"),
                ],
            )
            return [body]
        body = b"not found\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    def close(self) -> None:
        """Stops the presence greenlet (tests create many apps in one process)."""
        if self._reaper is not None:
            self._reaper.kill(block=False)

    # -- the one handler ------------------------------------------------------------

    def _channel(self, channel: Any) -> None:
        env = channel.environ
        q = {k: v[-1] for k, v in parse_qs(env.get("QUERY_STRING", "")).items()}
        room = self._room(_clean(q.get("room"), "lobby"))
        user = _clean(q.get("user"), "guest")
        cid = _clean(q.get("gc_cid"), "", 64) or uuid.uuid4().hex
        last = q.get("gc_last", "")
        method = env.get("REQUEST_METHOD", "GET")

        if method == "POST":
            # The body is one message; receive() returns it whatever its Content-Type.
            self._touch(cid, user, room)
            try:
                message = channel.receive(timeout=10)
            except (ChannelClosed, TimeoutError):
                message = None
            if message:
                self._say(room, user, message)
            channel.close()  # 204 No Content
            return
        if method not in ("GET", "HEAD") and not channel.is_websocket:
            channel.send({"status": 405, "headers": {"Allow": "GET, POST"}, "body": "use GET or POST\n"})
            return

        group = "room:" + room.name
        if channel.is_websocket:
            self._catch_up(channel, room, last, group, "websocket")
            self._attach(cid, user, room, channel)
            channel.on_receive(lambda message: self._say(room, user, message))
            return

        if "text/event-stream" in env.get("HTTP_ACCEPT", ""):
            # Start the stream at once: the client calls the transport open when
            # the headers arrive. A named event is not shown as a message.
            channel.send(Event("open", event="greenchan-open"))
            self._catch_up(channel, room, last, group, "sse")
            self._attach(cid, user, room, channel)
            return

        # Long-poll: one message per response. Touch first: a new session's own
        # "joined" is then already in the history this poll looks at.
        self._touch(cid, user, room)
        pending = self._after(room, last)
        if pending:
            channel.send(self._longpoll_response(pending[0][1], pending[0][2]))
            return
        if q.get("gc_open"):
            channel.close()  # 204 at once: the client knows the server is there
            return
        self.store.add_to_group(group, channel, "longpoll")
        timer = gevent.spawn_later(self.poll_timeout, channel.close)  # then 204
        self._attach(cid, user, room, channel, timer)

    def _catch_up(self, channel: Any, room: _Room, last: str, group: str, kind: str) -> None:
        """Sends what the client missed, then joins the group, in order.

        A send may yield to other greenlets, and a message said meanwhile lands in
        the history; so loop until nothing is left, then join the group without
        yielding in between: no message is missed and none comes out of order.
        """
        pending = self._after(room, last)
        while pending:
            for _, rid, payload in pending:
                channel.send(Event(payload, id=rid) if kind == "sse" else payload)
            last = pending[-1][1]
            pending = self._after(room, last)
        self.store.add_to_group(group, channel, kind)

    @staticmethod
    def _longpoll_response(rid: str, payload: str) -> dict[str, Any]:
        return {
            "status": 200,
            "headers": {
                "Content-Type": "application/json; charset=utf-8",
                "Cache-Control": "no-store",
                "Greenchan-Event-Id": rid,
            },
            "body": payload,
        }

    # -- rooms and messages ---------------------------------------------------------

    def _room(self, name: str) -> _Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = _Room(name, self.keep)
        return room

    def _after(self, room: _Room, last: str) -> list[tuple[int, str, str]]:
        """The kept messages after the id `last` (all of them if it is unknown)."""
        epoch, _, seq = last.partition(".")
        if epoch == self.epoch and seq.isdigit():
            n = int(seq)
            return [m for m in room.history if m[0] > n]
        return list(room.history)

    def _say(self, room: _Room, user: str, message: Any) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        text = message
        try:
            data = json.loads(message)
            if isinstance(data, dict):
                text = str(data.get("text", ""))
        except ValueError:
            pass  # plain text is a message too
        text = text.strip()[:2000]
        if text:
            self._publish(room, {"type": "message", "user": user, "text": text})

    def _publish(self, room: _Room, record: dict[str, Any]) -> None:
        room.seq += 1
        rid = f"{self.epoch}.{room.seq}"
        record = dict(record, id=rid, room=room.name, ts=time.time())
        payload = json.dumps(record)
        room.history.append((room.seq, rid, payload))
        sse, longpoll = Event(payload, id=rid), self._longpoll_response(rid, payload)

        def render(channel: Any, kind: str) -> Any:
            return sse if kind == "sse" else longpoll if kind == "longpoll" else payload

        self.store.broadcast("room:" + room.name, render)

    # -- presence -------------------------------------------------------------------

    def _touch(self, cid: str, user: str, room: _Room) -> _Session:
        session = self.sessions.get(cid)
        if session is None:
            session = self.sessions[cid] = _Session(user, room.name)
            self._publish(room, {"type": "join", "user": user, "online": self._online(room.name)})
        session.last_seen = time.monotonic()
        return session

    def _attach(
        self, cid: str, user: str, room: _Room, channel: Any, timer: gevent.Greenlet | None = None
    ) -> None:
        """Counts the channel as the session's until it closes (on_close is set here, once)."""
        session = self._touch(cid, user, room)
        session.open += 1

        def detach(status: Any) -> None:
            session.open -= 1
            session.last_seen = time.monotonic()
            if timer is not None:
                timer.kill(block=False)

        channel.on_close(detach)

    def _online(self, room: str) -> list[str]:
        return sorted({s.user for s in self.sessions.values() if s.room == room})

    def _reap(self) -> None:
        while True:
            gevent.sleep(min(2.0, self.presence_grace / 2))
            now = time.monotonic()
            for cid, s in list(self.sessions.items()):
                if s.open <= 0 and now - s.last_seen > self.presence_grace:
                    del self.sessions[cid]
                    self._publish(
                        self._room(s.room), {"type": "leave", "user": s.user, "online": self._online(s.room)}
                    )


def make_app(**options: Any) -> ChatApp:
    """A fresh chat (its own store, rooms and history); options go to ChatApp."""
    return ChatApp(**options)


app = make_app()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="greenchan chat example")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = Server(app, host=args.host, port=args.port)
    server.start()
    # Tests and scripts wait for this line (it carries the port when --port 0).
    print(f"chat: serving on http://{args.host}:{server.port}/", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
