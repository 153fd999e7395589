"""A chat with rooms over WebSocket, Server-Sent Events and long-polling.

Run it with one command, no Redis, nothing to build::

    python examples/chat.py            # http://127.0.0.1:8080/
    python examples/chat.py --port 9000

Open the page in two browsers; add ``?room=games&user=ann`` to pick a room and a
name, and ``&transports=sse,longpoll`` to see the fallbacks carry the same chat.

The room is the README's short route: greenchan.js and the library keep one
channel per page, whatever the transport and across reconnects (docs/sessions.md),
so the handler runs once per visitor and reads as if every client had a WebSocket.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import os
import sys
import time
from typing import Any

try:
    from greenchan import ChannelClosed, MemoryChannelStore, Server, with_channel
except ImportError:  # run from a checkout without installing: python examples/chat.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from greenchan import ChannelClosed, MemoryChannelStore, Server, with_channel
from urllib.parse import parse_qs

import greenchan.static

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")
RECENT = 50  # messages of a room that a newcomer sees


def _clean(values: list[str] | None, default: str, limit: int = 32) -> str:
    value = (values or [""])[-1].strip()[:limit]
    return "".join(ch for ch in value if ch.isprintable()) or default


class Chat:
    """The chat as one WSGI application: the page, greenchan.js and the room route."""

    def __init__(self) -> None:
        self.store = MemoryChannelStore()
        self.recent: dict[str, collections.deque[str]] = collections.defaultdict(
            lambda: collections.deque(maxlen=RECENT)
        )
        # Message ids, so that a page that starts a new session (it was away longer
        # than the grace) does not show the recent messages it already has twice.
        self.ids = (f"{os.urandom(4).hex()}.{n}" for n in itertools.count(1))
        self.route = with_channel(self.room)
        self.store.on_presence(self.presence_changed)

    def __call__(self, environ: dict, start_response: Any) -> Any:
        path = environ.get("PATH_INFO") or "/"
        if path == "/chat":
            return self.route(environ, start_response)
        if path == "/greenchan.js":
            return greenchan.static.javascript(environ, start_response)
        if path in ("/", "/index.html"):
            with open(PAGE, "rb") as f:
                return _answer(start_response, "200 OK", "text/html; charset=utf-8", f.read())
        if path == "/favicon.ico":  # none, and no error in the browser's console either
            return _answer(start_response, "204 No Content", None, b"")
        return _answer(start_response, "404 Not Found", "text/plain", b"not found\n")

    def room(self, channel: Any) -> None:
        """One visitor of a room: runs once per page, whatever carries it."""
        query = parse_qs(channel.environ.get("QUERY_STRING", ""))
        room, user = _clean(query.get("room"), "lobby"), _clean(query.get("user"), "guest")
        group = "room:" + room
        if channel.session is None and not channel.is_websocket:
            # A plain request (no greenchan.js), e.g. curl -d hi '.../chat?user=curl':
            # its body is one message; it does not stay in the room.
            try:
                self.say(room, user, channel.receive(timeout=0))
            except (TimeoutError, ChannelClosed):
                pass  # a GET: nothing to say
            channel.close()
            return
        channel.send(json.dumps({"type": "welcome", "room": room, "user": user}))
        # Session sends never block, so nothing said meanwhile falls between these two.
        for record in self.recent[room]:
            channel.send(record)
        # Present as user: the join and leave records come from presence_changed.
        self.store.add_to_group(group, channel, user, presence=user)
        channel.on_receive(lambda message: self.say(room, user, message))

    # WHO IS ONLINE: the store's presence (docs/presence.md). on_presence runs once per
    # user's first and last page in the room (not for a second tab) and, with a
    # RedisChannelStore, in every process: each tells its own members, so nobody
    # hears it twice.
    def presence_changed(self, group: str, user: str, meta: Any, joined: bool) -> None:
        if not group.startswith("room:"):
            return
        record = {"type": "join" if joined else "leave", "user": user, "online": self.online(group)}
        payload = json.dumps(dict(record, room=group[len("room:"):], ts=time.time()))
        for channel in self.store.members(group):
            channel.send(payload, wait=False)  # never blocks: this may run in a close hook

    def online(self, group: str) -> list[str]:
        return sorted(self.store.presence(group))

    def say(self, room: str, user: str, message: Any) -> None:
        """A message from the page (JSON with a text) or from curl (plain text)."""
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
            self.publish(room, {"type": "message", "id": next(self.ids), "user": user, "text": text})

    def publish(self, room: str, record: dict[str, Any]) -> None:
        payload = json.dumps(dict(record, room=room, ts=time.time()))
        if record["type"] == "message":  # not a join or leave: newcomers see it
            self.recent[room].append(payload)
        self.store.broadcast("room:" + room, payload)


def _answer(start_response: Any, status: str, ctype: str | None, body: bytes) -> list[bytes]:
    headers = [("Content-Length", str(len(body))), ("Cache-Control", "no-cache")]
    if ctype:
        headers.append(("Content-Type", ctype))
    start_response(status, headers)
    return [body]


def make_app() -> Chat:
    """A fresh chat: its own rooms (tests make one per server)."""
    return Chat()


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
