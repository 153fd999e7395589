"""examples/chat.py: WebSocket, SSE and long-poll users of one room talk to each other.

Real clients on real sockets: websocket-client for WebSocket users, requests for the
HTTP fallback users (an SSE stream or long-polls to listen, POSTs to speak), all
following the wire convention of greenchan.js. Every wait is bounded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import uuid
from typing import Any, Callable

import gevent
import gevent.queue
import pytest
import requests
import websocket

from greenchan import Server

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
    app = chat.make_app(poll_timeout=1.0, presence_grace=0.5)
    yield app
    app.close()


@pytest.fixture
def server(chat_app):
    with Server(chat_app, port=0) as srv:
        yield srv


def _wait_for(predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Polls `predicate` until it is true; fails after `timeout` seconds."""
    with gevent.Timeout(timeout, AssertionError("timed out waiting for " + what)):
        while True:
            value = predicate()
            if value:
                return value
            gevent.sleep(0.01)


class _Client:
    """One chat user; a greenlet listens and puts every record it gets in `inbox`."""

    transport = ""

    def __init__(self, port: int, room: str, user: str) -> None:
        self.base = f"http://127.0.0.1:{port}/chat"
        self.room, self.user = room, user
        self.cid = uuid.uuid4().hex
        self.inbox: gevent.queue.Queue = gevent.queue.Queue()
        self.last = ""
        self.errors: list[BaseException] = []
        self._greenlet: gevent.Greenlet | None = None

    def params(self, **extra: str) -> dict[str, str]:
        p = {"room": self.room, "user": self.user, "gc_transport": self.transport, "gc_cid": self.cid}
        if self.last:
            p["gc_last"] = self.last
        p.update(extra)
        return p

    def start(self) -> _Client:
        self._greenlet = gevent.spawn(self._guarded)
        return self

    def _guarded(self) -> None:
        try:
            self.listen()
        except Exception as exc:  # noqa: BLE001 (surfaced by expect())
            self.errors.append(exc)

    def listen(self) -> None:
        raise NotImplementedError

    def got(self, raw: str) -> None:
        record = json.loads(raw)
        self.last = record["id"]
        self.inbox.put(record)

    def say(self, text: str) -> None:
        r = requests.post(
            self.base,
            params=self.params(),
            timeout=TIMEOUT,
            data=json.dumps({"type": "message", "text": text}).encode(),
            headers={"Content-Type": "text/plain; charset=utf-8"},
        )
        assert r.status_code in (200, 204), r.status_code

    def expect(self, predicate: Callable[[dict], bool], what: str) -> dict:
        """The next record that matches (earlier ones are skipped)."""
        with gevent.Timeout(TIMEOUT, AssertionError(f"{self.user}: timed out waiting for {what}")):
            while True:
                assert not self.errors, self.errors
                try:
                    record = self.inbox.get(timeout=0.2)
                except gevent.queue.Empty:
                    continue
                if predicate(record):
                    return record

    def expect_text(self, text: str, user: str) -> dict:
        return self.expect(
            lambda r: r["type"] == "message" and r["text"] == text and r["user"] == user,
            f"{text!r} from {user}",
        )

    def records(self) -> list[dict]:
        out = []
        while not self.inbox.empty():
            out.append(self.inbox.get())
        return out

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=TIMEOUT)


class WsClient(_Client):
    transport = "websocket"

    def connect(self) -> WsClient:
        url = "ws" + self.base[4:] + "?" + requests.compat.urlencode(self.params())
        self.ws = websocket.create_connection(url, timeout=TIMEOUT)
        return self

    def listen(self) -> None:
        while True:
            try:
                self.got(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            except websocket.WebSocketConnectionClosedException:
                return

    def say(self, text: str) -> None:
        self.ws.send(json.dumps({"type": "message", "text": text}))

    def stop(self) -> None:
        super().stop()  # first the reader: one greenlet per socket at a time
        self.ws.close()


class SseClient(_Client):
    transport = "sse"

    def connect(self) -> SseClient:
        self.resp = requests.get(
            self.base,
            params=self.params(),
            stream=True,
            timeout=TIMEOUT,
            headers={"Accept": "text/event-stream"},
        )
        assert self.resp.status_code == 200
        assert self.resp.headers["Content-Type"].startswith("text/event-stream")
        return self

    def listen(self) -> None:
        event: dict[str, list[str]] = {}
        for line in self.resp.iter_lines(chunk_size=None, decode_unicode=True):
            if line == "":
                if "data" in event and not event.get("event"):
                    self.got("\n".join(event["data"]))
                event = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                event.setdefault(field, []).append(value.removeprefix(" "))

    def stop(self) -> None:
        super().stop()
        self.resp.close()


class LongPollClient(_Client):
    transport = "longpoll"

    def connect(self) -> LongPollClient:
        # The opening poll is answered at once; drain what is already there.
        while True:
            r = requests.get(self.base, params=self.params(gc_open="1"), timeout=TIMEOUT)
            if r.status_code == 204:
                return self
            assert r.status_code == 200
            self.got(r.text)

    def listen(self) -> None:
        while True:
            r = requests.get(self.base, params=self.params(), timeout=TIMEOUT)
            if r.status_code == 200:
                assert r.headers["Greenchan-Event-Id"] == json.loads(r.text)["id"]
                self.got(r.text)
            else:
                assert r.status_code == 204, r.status_code


def _longpolls_waiting(app: Any, room: str) -> int:
    return sum(1 for kind in app.store.members("room:" + room).values() if kind == "longpoll")


def test_users_on_every_transport_share_a_room(server, chat_app):
    port = server.port
    alice = WsClient(port, "r1", "alice").connect().start()
    bob = SseClient(port, "r1", "bob").connect().start()
    carol = LongPollClient(port, "r1", "carol").connect().start()
    dave = WsClient(port, "r2", "dave").connect().start()
    try:
        _wait_for(lambda: _longpolls_waiting(chat_app, "r1"), "carol's poll to wait in the room")

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
        assert all(r["room"] == "r2" for r in dave.records())
        assert not any(r.get("room") == "r2" for c in (alice, bob, carol) for r in c.records())
    finally:
        for c in (alice, bob, carol, dave):
            c.stop()


def test_messages_arrive_in_order_on_every_transport(server, chat_app):
    port = server.port
    listeners = [
        WsClient(port, "order", "w").connect().start(),
        SseClient(port, "order", "s").connect().start(),
        LongPollClient(port, "order", "l").connect().start(),
    ]
    talker = WsClient(port, "order", "talker").connect().start()
    try:
        texts = [f"m{i}" for i in range(20)]
        for t in texts:
            talker.say(t)
        for c in listeners:
            got = [c.expect(lambda r: r["type"] == "message", "a message")["text"] for _ in texts]
            assert got == texts, (c.transport, got)
    finally:
        for c in listeners + [talker]:
            c.stop()


def test_a_returning_client_gets_what_it_missed(server):
    port = server.port
    talker = WsClient(port, "back", "talker").connect()
    poller = LongPollClient(port, "back", "poller").connect()
    try:
        talker.say("one")
        talker.say("two")
        # The long-poller was away between polls: the next polls bring both, in order.
        texts = []
        while len(texts) < 2:
            r = requests.get(poller.base, params=poller.params(), timeout=TIMEOUT)
            assert r.status_code == 200
            poller.last = r.headers["Greenchan-Event-Id"]
            record = json.loads(r.text)
            if record["type"] == "message":
                texts.append(record["text"])
        assert texts == ["one", "two"]

        # An SSE or WebSocket client that reconnects with gc_last gets the rest.
        talker.say("three")
        ws = WsClient(port, "back", "poller")
        ws.last = poller.last
        ws.connect().start()
        assert ws.expect(lambda r: r["type"] == "message", "the missed message")["text"] == "three"
        ws.stop()

        # An id from another server run (another epoch) replays the whole history.
        sse = SseClient(port, "back", "late")
        sse.last = "0123abcd.1"
        sse.connect().start()
        assert sse.expect(lambda r: r["type"] == "message", "history")["text"] == "one"
        sse.stop()
    finally:
        talker.ws.close()


def test_long_poll_answers_204_when_nothing_comes(server):
    poller = LongPollClient(server.port, "quiet", "p").connect()
    r = requests.get(poller.base, params=poller.params(), timeout=TIMEOUT)
    assert r.status_code == 204


def test_plain_text_post_is_a_message(server):
    ws = WsClient(server.port, "plain", "reader").connect().start()
    try:
        r = requests.post(
            f"http://127.0.0.1:{server.port}/chat",
            params={"room": "plain", "user": "curl"},
            data=b"plain words",
            headers={"Content-Type": "text/plain"},
            timeout=TIMEOUT,
        )
        assert r.status_code == 204
        ws.expect_text("plain words", "curl")
    finally:
        ws.stop()


def test_presence_join_and_leave(server):
    watcher = WsClient(server.port, "presence", "watcher").connect().start()
    try:
        other = WsClient(server.port, "presence", "visitor").connect()
        joined = watcher.expect(lambda r: r["type"] == "join" and r["user"] == "visitor", "visitor's join")
        assert joined["online"] == ["visitor", "watcher"]
        other.ws.close()
        left = watcher.expect(lambda r: r["type"] == "leave" and r["user"] == "visitor", "visitor's leave")
        assert left["online"] == ["watcher"]
    finally:
        watcher.stop()


def test_page_and_client_are_served(server):
    base = f"http://127.0.0.1:{server.port}"
    page = requests.get(base + "/", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert '<script src="/greenchan.js"></script>' in page.text
    js = requests.get(base + "/greenchan.js", timeout=TIMEOUT)
    assert js.status_code == 200 and "window" in js.text
    assert js.headers["Content-Type"] == "application/javascript; charset=utf-8"
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
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
