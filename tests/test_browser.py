"""End to end in headless Chromium: examples/chat.html + greenchan.js + the chat server.

Two pages (two browser contexts, as two people) talk in one room over WebSocket,
over SSE and over long-polling (the page's WebSocket, and for long-polling its
EventSource too, removed before any script runs), and go on talking after the
server restarts on the same port. A screenshot of each scenario goes to
tests/artifacts/. Set GREENCHAN_UPDATE_DOCS=1 to refresh docs/chat.png.

Without Chromium or playwright these tests skip, unless the environment variable
CI is set: then they fail, so a CI run cannot pass without running them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from greenchan import Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "tests", "artifacts")
DOCS_SHOT = os.path.join(ROOT, "docs", "chat.png")
WAIT_MS = 20000  # any single wait in the browser
RECONNECT_MS = 45000  # the page's backoff is capped at 10 s; this leaves room for a slow machine
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Scripts run in the page before its own: take transports away.
NO_WEBSOCKET = "window.WebSocket = undefined;"
NO_EVENTSOURCE = "window.EventSource = undefined;"
# As behind a proxy that refuses upgrades: every WebSocket goes to a closed port.
BLOCKED_WEBSOCKET = """(() => {
    const Real = window.WebSocket;
    window.WebSocket = function (url, protocols) { return new Real("ws://127.0.0.1:9/blocked", protocols); };
    window.WebSocket.prototype = Real.prototype;
})();"""


def _chromium() -> str:
    return shutil.which("chromium") or shutil.which("chromium-browser") or ""


def _missing() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    if not _chromium():
        return "chromium is not installed (apt-get install chromium)"
    return ""


def _load_chat() -> Any:
    spec = importlib.util.spec_from_file_location(
        "greenchan_example_chat_browser", os.path.join(ROOT, "examples", "chat.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run: {reason}; CI is set, so this is a failure, not a skip")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    os.makedirs(ARTIFACTS, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS, timeout=60000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def chat() -> Any:
    return _load_chat()


class ChatServer:
    """The chat example on a gevent Server in this process; restartable on its port."""

    def __init__(self, chat: Any, **options: Any) -> None:
        self.chat = chat
        self.options = options
        self.app = chat.make_app()
        self.server = Server(self.app, port=0, **options).start()
        self.port = self.server.port

    def url(self, room: str, user: str, transports: str = "") -> str:
        url = f"http://127.0.0.1:{self.port}/?room={room}&user={user}"
        return url + (f"&transports={transports}" if transports else "")

    def stop(self) -> None:
        self.server.stop()

    def start_again(self) -> None:
        # A new process would start with empty rooms and no sessions: so does a new
        # app on a new Server. The pages come back in new sessions (hello new=true).
        self.app = self.chat.make_app()
        self.server = Server(self.app, port=self.port, **self.options).start()

    def close(self) -> None:
        if self.server.status != "stopped":
            self.stop()


@pytest.fixture
def chat_server(chat: Any) -> Iterator[ChatServer]:
    srv = ChatServer(chat)
    try:
        yield srv
    finally:
        srv.close()


class Person:
    """One chat page in its own browser context (its own connections and storage)."""

    def __init__(
        self, browser: Any, server: ChatServer, room: str, user: str, init_scripts: tuple[str, ...], transports: str = ""
    ):
        self.user = user
        self.context = browser.new_context(viewport={"width": 760, "height": 420})
        self.context.set_default_timeout(WAIT_MS)
        for script in init_scripts:
            self.context.add_init_script(script)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.goto(server.url(room, user, transports))

    def wait_open(self, transport: str, timeout: int = WAIT_MS) -> None:
        self.page.wait_for_selector('body[data-state="open"]', timeout=timeout)
        assert self.page.get_attribute("body", "data-transport") == transport
        assert self.page.evaluate("window.chat.transport") == transport

    def say(self, text: str) -> None:
        self.page.fill("#text", text)
        self.page.click("#send")
        # The input is cleared once greenchan.js took the message (sent or queued).
        self.page.wait_for_function("document.getElementById('text').value === ''")

    def sees(self, user: str, text: str) -> None:
        line = self.page.locator(f'li.message[data-user="{user}"] .text', has_text=text)
        line.first.wait_for(state="visible")
        # Shown once: a message replayed after a reconnect is not shown twice.
        assert self.page.locator(f'li.message[data-user="{user}"] .text').all_inner_texts().count(text) == 1

    def shot(self, name: str) -> None:
        self.page.screenshot(path=os.path.join(ARTIFACTS, name + ".png"))

    def close(self) -> None:
        assert not self.errors, f"{self.user}'s page raised: {self.errors}"
        self.context.close()


TRANSPORTS: dict[str, tuple[str, ...]] = {
    "websocket": (),
    "sse": (NO_WEBSOCKET,),
    "longpoll": (NO_WEBSOCKET, NO_EVENTSOURCE),
}


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll"])
def test_two_pages_talk(browser, chat_server, transport):
    room = "talk-" + transport
    ann = Person(browser, chat_server, room, "ann", TRANSPORTS[transport])
    ben = Person(browser, chat_server, room, "ben", TRANSPORTS[transport])
    try:
        ann.wait_open(transport)
        ben.wait_open(transport)
        ann.say("hello ben, this is " + transport)
        ben.sees("ann", "hello ben, this is " + transport)
        ann.sees("ann", "hello ben, this is " + transport)
        ben.say("hi ann, loud and clear")
        ann.sees("ben", "hi ann, loud and clear")
        ann.say("three in a row: one")
        ann.say("three in a row: two")
        ann.say("three in a row: three")
        ben.sees("ann", "three in a row: three")
        texts = ben.page.locator('li.message[data-user="ann"] .text').all_inner_texts()
        assert texts[-3:] == ["three in a row: one", "three in a row: two", "three in a row: three"]
        ann.shot(transport + "-ann")
        ben.shot(transport + "-ben")
        if transport == "websocket" and os.environ.get("GREENCHAN_UPDATE_DOCS"):
            ann.page.screenshot(path=DOCS_SHOT)
    finally:
        ann.close()
        ben.close()


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll"])
def test_pages_reconnect_after_a_server_restart(browser, chat_server, transport):
    # The transport is forced (the page's ?transports=): a page that tries its
    # WebSocket an instant before the server is back would rightly fall back to SSE.
    room = "restart-" + transport
    ann = Person(browser, chat_server, room, "ann", (), transport)
    ben = Person(browser, chat_server, room, "ben", (), transport)
    try:
        ann.wait_open(transport)
        ben.wait_open(transport)
        ann.say("before the restart")
        ben.sees("ann", "before the restart")

        chat_server.stop()
        for person in (ann, ben):
            person.page.wait_for_selector('body[data-state="reconnecting"]')
            assert "reconnecting in" in person.page.inner_text("#status")
        # Said while the server is down: queued by greenchan.js, sent on reconnect.
        ann.say("said while the server was down")
        assert ann.page.evaluate("window.chat.queued") == 1
        ann.shot(f"restart-{transport}-down")

        chat_server.start_again()
        ann.wait_open(transport, timeout=RECONNECT_MS)
        ben.wait_open(transport, timeout=RECONNECT_MS)
        ben.sees("ann", "said while the server was down")
        ben.say("after the restart")
        ann.sees("ben", "after the restart")
        # Its acknowledgement may come a moment after ben's message has: wait for it.
        ann.page.wait_for_function("() => window.chat.queued === 0", timeout=RECONNECT_MS)
        # Not sent a second time to the new session (the stopping server acknowledged it).
        ben.sees("ann", "before the restart")
        ann.shot(f"restart-{transport}-ann")
        ben.shot(f"restart-{transport}-ben")
    finally:
        ann.close()
        ben.close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_backoff_queue_limit_and_drops(browser, chat_server):
    """greenchan.js alone, against a port where nothing listens."""
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"http://127.0.0.1:{chat_server.port}/greenchan.js")
        page.set_content(f'<script src="http://127.0.0.1:{chat_server.port}/greenchan.js"></script>')
        page.wait_for_function("!!window.greenchan")
        page.evaluate(
            """(port) => {
            window.log = {reconnecting: [], drop: [], close: [], open: 0};
            const c = window.c = greenchan.connect("http://127.0.0.1:" + port + "/nothing",
                {maxQueue: 2, reconnectDelay: 40, maxReconnectDelay: 200, reconnectJitter: 0.5});
            c.onopen = () => { log.open += 1; };
            c.onreconnecting = (e) => log.reconnecting.push(e.delay);
            c.ondrop = (e) => log.drop.push([e.data, e.reason]);
            c.onclose = (e) => log.close.push(e.reason);
            log.sent = [c.send("a"), c.send("b"), c.send("c")];
        }""",
            _closed_port(),
        )
        page.wait_for_function("window.log.reconnecting.length >= 7")
        log = page.evaluate("window.log")
        assert log["sent"] == [True, True, False]
        assert log["drop"] == [["c", "queue full (2 messages)"]]
        for attempt, delay in enumerate(log["reconnecting"][:7]):
            base = min(200, 40 * 2**attempt)
            assert base * 0.5 <= delay <= base, (attempt, delay)
        assert log["open"] == 0
        # Between two attempts, or in one (the delays are at most 200 ms): never open.
        assert page.evaluate("window.c.state") in ("reconnecting", "connecting")

        page.evaluate("window.c.close()")
        log = page.evaluate("window.log")
        assert log["drop"][1:] == [
            ["a", "closed before it could be sent"],
            ["b", "closed before it could be sent"],
        ]
        assert log["close"] == ["closed by the client"]
        assert page.evaluate("window.c.send('late')") is False
        assert page.evaluate("window.log.drop.length") == 4
        assert not errors, errors
    finally:
        context.close()


def test_falls_back_when_websocket_cannot_open(browser, chat_server):
    ann = Person(browser, chat_server, "blocked", "ann", (BLOCKED_WEBSOCKET,))
    ben = Person(browser, chat_server, "blocked", "ben", ())
    try:
        ann.wait_open("sse")
        ben.wait_open("websocket")
        ann.say("my websocket is blocked")
        ben.sees("ann", "my websocket is blocked")
        ben.say("yours goes over SSE then")
        ann.sees("ben", "yours goes over SSE then")
        ann.shot("blocked-websocket-ann")
    finally:
        ann.close()
        ben.close()


def test_a_rejected_post_is_reported_and_the_rest_goes_on(browser, chat):
    srv = ChatServer(chat, max_body=1000)
    ann = Person(browser, srv, "limits", "ann", (NO_WEBSOCKET,))
    ben = Person(browser, srv, "limits", "ben", ())
    try:
        ann.wait_open("sse")
        ben.wait_open("websocket")
        ann.say("x" * 1500)  # over max_body: the server answers 413
        ann.page.locator("li.drop", has_text="rejected by the server: HTTP 413").wait_for()
        ann.say("a short one")
        ben.sees("ann", "a short one")
        assert "x" * 1500 not in ben.page.inner_text("#messages")
        ann.shot("rejected-post-ann")
    finally:
        ann.close()
        ben.close()
        srv.close()
