"""examples/chat.py: WebSocket, SSE and long-poll users of one room talk to each other.

Real clients on real sockets: greenchan.testing's TestClient speaks greenchan.js's
session wire over each transport (so the chat's one handler runs once per user),
requests plays curl. Every wait is bounded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from typing import Any, Callable

import gevent
import pytest
import requests

from greenchan import CloseStatus, Server
from greenchan.testing import TestClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT_PY = os.path.join(ROOT, "examples", "chat.py")
TIMEOUT = 10  # seconds, for any single wait


def _load_chat() -> Any:
    spec = importlib.util.spec_from_file_location("greenchan_example_chat", CHAT_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chat = _load_chat()


@pytest.fixture
def chat_app():
    return chat.make_app()


@pytest.fixture
def server(chat_app):
    with Server(chat_app, port=0) as srv:
        yield srv


class User:
    """One chat page: a session over ``transport``, in ``room`` as ``user``."""

    def __init__(self, server: Server, room: str, user: str, transport: str) -> None:
        self.user = user
        self.client = TestClient(server, f"/chat?room={room}&user={user}", transport=transport, timeout=TIMEOUT)
        self.records: list[dict] = []  # every record received, in order
        self.read = 0  # how many of them expect() has gone past

    def say(self, text: str) -> None:
        self.client.send(json.dumps({"type": "message", "text": text}))

    def expect(self, predicate: Callable[[dict], bool], what: str) -> dict:
        """The next record that matches (earlier ones are skipped)."""
        with gevent.Timeout(TIMEOUT, AssertionError(f"{self.user}: timed out waiting for {what}")):
            while True:
                while self.read < len(self.records):
                    record = self.records[self.read]
                    self.read += 1
                    if predicate(record):
                        return record
                self.records.append(json.loads(self.client.receive()))

    def expect_text(self, text: str, user: str) -> dict:
        return self.expect(
            lambda r: r["type"] == "message" and r["text"] == text and r["user"] == user,
            f"{text!r} from {user}",
        )

    def close(self) -> None:
        self.client.close()


def test_users_on_every_transport_share_a_room(server):
    alice = User(server, "r1", "alice", "websocket")
    bob = User(server, "r1", "bob", "sse")
    carol = User(server, "r1", "carol", "longpoll")
    dave = User(server, "r2", "dave", "websocket")
    try:
        assert alice.expect(lambda r: True, "the greeting") == {"type": "welcome", "room": "r1", "user": "alice"}
        alice.expect(lambda r: r["type"] == "join" and r["user"] == "carol", "carol's join")

        alice.say("hello from a websocket")
        bob.expect_text("hello from a websocket", "alice")
        carol.expect_text("hello from a websocket", "alice")
        alice.expect_text("hello from a websocket", "alice")

        bob.say("hello from sse + POST")
        alice.expect_text("hello from sse + POST", "bob")
        carol.expect_text("hello from sse + POST", "bob")

        carol.say("hello from long-poll + POST")
        alice.expect_text("hello from long-poll + POST", "carol")
        bob.expect_text("hello from long-poll + POST", "carol")

        dave.say("other room")
        dave.expect_text("other room", "dave")
        assert all(r["room"] == "r2" for r in dave.records)
        assert not any(r["room"] == "r2" for u in (alice, bob, carol) for r in u.records)
    finally:
        for u in (alice, bob, carol, dave):
            u.close()


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll"])
def test_the_handler_runs_once_per_user(server, transport):
    """Over SSE and long-polling a user makes many requests: one greeting, one join."""
    watcher = User(server, "once", "watcher", "websocket")
    user = User(server, "once", "ann", transport)
    try:
        for i in range(5):
            user.say(f"m{i}")
        user.expect_text("m4", "ann")
        watcher.expect_text("m4", "ann")
        assert [r["type"] for r in user.records].count("welcome") == 1
        assert [(r["type"], r["user"]) for r in watcher.records].count(("join", "ann")) == 1
    finally:
        user.close()
        watcher.close()


def test_messages_arrive_in_order_on_every_transport(server):
    listeners = [User(server, "order", name, name) for name in ("websocket", "sse", "longpoll")]
    talker = User(server, "order", "talker", "websocket")
    try:
        texts = [f"m{i}" for i in range(20)]
        for t in texts:
            talker.say(t)
        for u in listeners:
            got = [u.expect(lambda r: r["type"] == "message", "a message")["text"] for _ in texts]
            assert got == texts, (u.user, got)
    finally:
        for u in listeners + [talker]:
            u.close()


def test_a_newcomer_sees_the_recent_messages(server):
    talker = User(server, "recent", "talker", "websocket")
    try:
        talker.say("one")
        talker.say("two")
        talker.expect_text("two", "talker")
        late = User(server, "recent", "late", "longpoll")
        try:
            assert [late.expect(lambda r: r["type"] == "message", "history")["text"] for _ in range(2)] == ["one", "two"]
        finally:
            late.close()
    finally:
        talker.close()


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll"])
def test_a_user_who_drops_gets_what_was_said_meanwhile(server, transport):
    talker = User(server, "drop", "talker", "websocket")
    away = User(server, "drop", "away", transport)
    try:
        away.expect(lambda r: r["type"] == "join" and r["user"] == "away", "its own join")
        away.client.drop()
        talker.say("while you were away")
        talker.expect_text("while you were away", "talker")
        away.client.reconnect()
        away.expect_text("while you were away", "talker")
        assert not any(r["type"] == "leave" for r in talker.records)  # a drop is not a leave
    finally:
        away.close()
        talker.close()


def test_plain_text_post_is_a_message(server):
    reader = User(server, "plain", "reader", "websocket")
    try:
        r = requests.post(
            f"http://127.0.0.1:{server.port}/chat",
            params={"room": "plain", "user": "curl"},
            data=b"plain words",
            headers={"Content-Type": "text/plain"},
            timeout=TIMEOUT,
        )
        assert r.status_code == 204
        reader.expect_text("plain words", "curl")
        assert not any(r["type"] == "join" and r["user"] == "curl" for r in reader.records)
    finally:
        reader.close()


def test_presence_join_and_leave(server):
    watcher = User(server, "presence", "watcher", "websocket")
    try:
        visitor = User(server, "presence", "visitor", "longpoll")
        joined = watcher.expect(lambda r: r["type"] == "join" and r["user"] == "visitor", "visitor's join")
        assert joined["online"] == ["visitor", "watcher"]
        visitor.close()  # chan.close(): the session ends at once, not after the grace
        assert visitor.client.close_status is CloseStatus.NORMAL
        left = watcher.expect(lambda r: r["type"] == "leave" and r["user"] == "visitor", "visitor's leave")
        assert left["online"] == ["watcher"]
    finally:
        watcher.close()


def test_page_and_client_are_served(server):
    base = f"http://127.0.0.1:{server.port}"
    page = requests.get(base + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert '<script src="/greenchan.js"></script>' in page.text
    js = requests.get(base + "/greenchan.js", timeout=TIMEOUT)
    assert js.status_code == 200 and "window" in js.text
    assert js.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert requests.get(base + "/favicon.ico", timeout=TIMEOUT).status_code == 204
    assert requests.get(base + "/nope", timeout=TIMEOUT).status_code == 404


def test_runs_with_one_command_and_stops_on_sigterm(tmp_path):
    # `python examples/chat.py --port 0` from a directory that is not the checkout.
    proc = subprocess.Popen(
        [sys.executable, CHAT_PY, "--port", "0"],
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with gevent.Timeout(30, AssertionError("chat.py did not say where it serves")):
            line = ""
            while "serving on" not in line:
                line = proc.stdout.readline()
                assert line, "chat.py exited early"
        url = line.split("serving on ", 1)[1].strip()
        assert requests.get(url, timeout=TIMEOUT).status_code == 200
        with TestClient(url, "/chat?room=cli&user=ann", transport="sse", timeout=TIMEOUT) as ann:
            assert json.loads(ann.receive())["type"] == "welcome"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
