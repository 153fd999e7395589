"""greenchan.js sessions end to end in headless Chromium (issue 11, docs/sessions.md).

One handler (greets once, counts messages per session, echoes) serves a page that
loads greenchan.js with one transport forced. Over each transport: the greeting
comes once, the counts are right, every message reaches the other side once and
in order both ways, and ``chan.close()`` runs ``on_close`` at once. A TCP relay
(tests/relay.py) between the page and the server drops the network mid-conversation
and brings it back within the grace: the session goes on, nothing lost or doubled.
Requests without ``gc_cid`` (requests' POST, a plain EventSource) stay plain
channels, and a client id stolen by a page of another origin is refused.

Skips without Chromium or playwright, fails instead when CI is set (as test_browser).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from typing import Any

import gevent
import pytest
import requests

from conftest import wait_for
from greenchan import CloseStatus, Event, Server, with_channel
from relay import Relay
from test_browser import CHROMIUM_ARGS, _chromium, _missing
import greenchan.static

WAIT_MS = 30000  # any single wait in the browser
TRANSPORTS = ["websocket", "sse", "longpoll"]

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sessions</title>
<script src="/greenchan.js"></script>
<script>
"use strict";
window.log = {messages: [], opens: [], closes: [], reconnecting: 0, drops: [], resumes: [], sent: 0};
// A message as text: binary ones as "bin:" and their bytes (all ASCII here).
function show(data) {
  if (typeof data === "string") return data;
  return "bin:" + String.fromCharCode.apply(null, new Uint8Array(data));
}
window.connect = function (transport, options, clientId) {
  var o = {transports: [transport], reconnectDelay: 100, maxReconnectDelay: 400, reconnectJitter: 0,
           maxQueue: 1000, connectTimeout: 5000};
  Object.keys(options || {}).forEach(function (k) { o[k] = options[k]; });
  var c = window.chan = greenchan.connect("/chan", o);
  if (clientId) c.clientId = clientId;  // a stolen id (the first request goes out after this)
  c.onopen = function (e) { log.opens.push([e.transport, e.reconnected]); };
  c.onmessage = function (e) { log.messages.push(show(e.data)); };
  c.onclose = function (e) { log.closes.push([e.code, e.reason]); };
  c.onreconnecting = function () { log.reconnecting += 1; };
  c.ondrop = function (e) { log.drops.push([show(e.data), e.reason]); };
  c.onresume = function (e) { log.resumes.push([e.group, e.recovered]); };
  return c.clientId;
};
// Message i: "c<i>", every binaryEvery-th as bytes. All at once (every = 0) or one per `every` ms.
function message(i, binaryEvery) {
  var text = "c" + i;
  return i % binaryEvery === 0 ? new TextEncoder().encode(text) : text;
}
window.sendNumbered = function (n, binaryEvery, every) {
  if (!every) {
    for (var i = 1; i <= n; i++) if (chan.send(message(i, binaryEvery))) log.sent += 1;
    return;
  }
  var next = 1;
  var timer = setInterval(function () {
    if (next > n) { clearInterval(timer); return; }
    if (chan.send(message(next, binaryEvery))) log.sent += 1;
    next += 1;
  }, every);
};
window.plainEventSource = function () {
  window.plain = [];
  var es = new EventSource("/chan");
  es.onmessage = function (e) { plain.push(e.data); es.close(); };
  es.onerror = function () { plain.push("error"); es.close(); };
};
</script></head><body>sessions</body></html>
"""


class Counter:
    """The issue's handler: greets once, counts messages per session, echoes.

    Text goes out as an ``Event`` when the first request asked for an event
    stream, so that a plain EventSource (no session) is served too; on a session
    the library turns it into a plain message.
    """

    def __init__(self) -> None:
        self.started: list[Any] = []
        self.closed: list[tuple[Any, CloseStatus]] = []
        self.received: dict[Any, list[Any]] = collections.defaultdict(list)
        self.channels: list[Any] = []
        self.route: Any = with_channel(self.handler)

    def handler(self, channel: Any) -> None:
        self.started.append(channel.session)
        self.channels.append(channel)
        sse = "text/event-stream" in channel.environ.get("HTTP_ACCEPT", "")
        count = [0]
        channel.send(Event("welcome") if sse else "welcome")

        def on_receive(message: Any) -> None:
            count[0] += 1
            self.received[channel.session].append(message)
            if isinstance(message, bytes):
                channel.send(b"%d:%s" % (count[0], message))
            else:
                text = f"{count[0]}:{message}"
                channel.send(Event(text) if sse else text)

        channel.on_receive(on_receive)
        channel.on_close(lambda status: self.closed.append((channel.session, status)))

    def __call__(self, environ: dict, start_response: Any) -> Any:
        path = environ.get("PATH_INFO")
        if path == "/chan":
            return self.route(environ, start_response)
        if path == "/greenchan.js":
            return greenchan.static.javascript(environ, start_response)
        if path == "/page":
            body = PAGE.encode()
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        start_response("204 No Content", [])  # /favicon.ico and the like
        return [b""]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run: {reason}; CI is set, so this is a failure, not a skip")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS, timeout=60000)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def counter() -> Counter:
    return Counter()


@pytest.fixture
def server(counter: Counter) -> Iterator[Server]:
    # A large grace: an on_close seen within the test can only be an explicit close.
    srv = Server(counter, port=0, session_grace=60).start()
    try:
        yield srv
    finally:
        srv.stop(timeout=1)


class Page:
    """One page in its own browser context; page errors fail the test."""

    def __init__(self, browser: Any, url: str) -> None:
        self.context = browser.new_context()
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.goto(url)

    def js(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def wait(self, expression: str, arg: Any = None) -> None:
        self.page.wait_for_function(expression, arg=arg, timeout=WAIT_MS)

    def close(self) -> None:
        errors = self.errors
        self.context.close()
        assert not errors, f"the page raised: {errors}"


def _expected_from_page(n: int, binary_every: int) -> list[Any]:
    return [f"c{i}".encode() if i % binary_every == 0 else f"c{i}" for i in range(1, n + 1)]


def _echoes(n: int, binary_every: int) -> list[str]:
    return [f"bin:{i}:c{i}" if i % binary_every == 0 else f"{i}:c{i}" for i in range(1, n + 1)]


def _server_numbers(n: int, binary_every: int) -> list[str]:
    return [f"bin:s{i}" if i % binary_every == 0 else f"s{i}" for i in range(1, n + 1)]


def _send_numbered(channel: Any, n: int, binary_every: int, pause: float) -> None:
    """The server's side of the conversation: s1..sn, every binary_every-th as bytes."""
    for i in range(1, n + 1):
        text = f"s{i}"
        channel.send(text.encode() if i % binary_every == 0 else text)
        if pause:
            gevent.sleep(pause)


def _split(messages: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The page's log as (greetings, echoes, server's numbered messages)."""
    greetings = [m for m in messages if m == "welcome"]
    echoes = [m for m in messages if ":c" in m]
    numbers = [m for m in messages if m.startswith(("s", "bin:s"))]
    assert len(greetings) + len(echoes) + len(numbers) == len(messages), messages
    return greetings, echoes, numbers


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_one_session_both_ways_in_order(browser, server, counter, transport):
    n, binary_every = 200, 7
    page = Page(browser, f"http://127.0.0.1:{server.port}/page")
    try:
        cid = page.js("(t) => connect(t)", transport)
        page.wait("window.log.opens.length === 1")
        assert page.js("window.log.opens") == [[transport, False]]
        channel = wait_for(lambda: counter.channels)[0]
        assert channel.transport == transport
        sender = gevent.spawn(_send_numbered, channel, n, binary_every, 0)
        page.js("([n, b]) => sendNumbered(n, b, 0)", [n, binary_every])
        assert page.js("window.log.sent") == n
        page.wait("(n) => window.log.messages.length >= 1 + 2 * n", n)
        sender.join(timeout=10)
        assert sender.successful()

        greetings, echoes, numbers = _split(page.js("window.log.messages"))
        assert page.js("window.log.messages[0]") == "welcome"
        assert greetings == ["welcome"]
        assert echoes == _echoes(n, binary_every)  # counted per session: 1..n, in order, once
        assert numbers == _server_numbers(n, binary_every)
        assert counter.received[cid] == _expected_from_page(n, binary_every)
        assert counter.started == [cid]
        page.wait("window.chan.queued === 0")
        assert page.js("window.log.drops") == []
        assert counter.closed == []

        page.js("window.chan.close()")
        wait_for(lambda: counter.closed, timeout=10)  # well under the 60 s grace
        assert counter.closed == [(cid, CloseStatus.NORMAL)]
        assert page.js("window.log.closes") == [[1000, "closed by the client"]]
        wait_for(lambda: not server.sessions, timeout=5)
        assert counter.started == [cid]
    finally:
        page.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_network_drop_within_the_grace(browser, server, counter, transport):
    n, binary_every = 300, 11
    relay = Relay(server.port).start()
    page = Page(browser, f"http://127.0.0.1:{relay.port}/page")
    try:
        cid = page.js("(t) => connect(t)", transport)
        page.wait("window.log.opens.length === 1")
        channel = wait_for(lambda: counter.channels)[0]
        sid = page.js("window.chan._sid")
        sender = gevent.spawn(_send_numbered, channel, n, binary_every, 0.01)
        page.js("([n, b]) => sendNumbered(n, b, 10)", [n, binary_every])
        # Mid-conversation: both sides have got some of the other's messages.
        page.wait("window.log.messages.length > 60")
        wait_for(lambda: len(counter.received[cid]) > 30, timeout=10)
        relay.cut()
        page.wait("window.chan.state !== 'open'")
        # The page tries to come back and is refused while the network is down;
        # meanwhile both sides keep sending.
        wait_for(lambda: relay.refused >= 2, timeout=15)
        page.wait("window.log.reconnecting >= 2")
        relay.restore()

        page.wait("(n) => window.log.messages.length >= 1 + 2 * n", n)
        sender.join(timeout=10)
        assert sender.successful()
        wait_for(lambda: len(counter.received[cid]) >= n, timeout=10)
        greetings, echoes, numbers = _split(page.js("window.log.messages"))
        assert greetings == ["welcome"]
        assert echoes == _echoes(n, binary_every)
        assert numbers == _server_numbers(n, binary_every)
        assert counter.received[cid] == _expected_from_page(n, binary_every)
        assert counter.started == [cid]
        assert counter.closed == []
        assert page.js("window.chan._sid") == sid  # the same session, not a new one
        assert page.js("window.log.opens")[-1] == [transport, True]
        assert [False] not in [r[1:] for r in page.js("window.log.resumes")]
        assert page.js("window.log.drops") == []
        assert relay.accepted >= 2
    finally:
        page.close()
        relay.stop()


def test_plain_clients_on_the_same_route(browser, server, counter):
    # curl-like: a POST without gc_cid is one plain channel, answered by the greeting.
    answer = requests.post(f"http://127.0.0.1:{server.port}/chan", data="hi",
                           headers={"Content-Type": "text/plain"}, timeout=10)
    assert answer.status_code == 200 and answer.text == "welcome"
    wait_for(lambda: counter.received[None])
    assert counter.received[None] == ["hi"]
    # A plain EventSource in a page without greenchan.js.
    page = Page(browser, f"http://127.0.0.1:{server.port}/page")
    try:
        page.js("plainEventSource()")
        page.wait("window.plain.length > 0")
        assert page.js("window.plain") == ["welcome"]
    finally:
        page.close()
    assert counter.started == [None, None]
    assert not getattr(server, "sessions", None)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stolen_client_id_is_refused_from_another_origin(browser, server, counter, transport):
    port = server.port
    # Both origins pass the origin rule: only the session's pin can refuse the thief.
    counter.route = with_channel(origins=[f"http://127.0.0.1:{port}", f"http://localhost:{port}"])(counter.handler)
    owner = Page(browser, f"http://127.0.0.1:{port}/page")
    thief = Page(browser, f"http://localhost:{port}/page")
    try:
        cid = owner.js("(t) => connect(t)", transport)
        owner.wait("window.log.opens.length === 1")
        owner.js("chan.send('mine')")
        owner.wait("window.log.messages.length >= 2")
        wait_for(lambda: counter.received[cid] == ["mine"])

        thief.js("([t, cid]) => connect(t, {connectTimeout: 3000}, cid)", [transport, cid])
        thief.js("chan.send('stolen')")
        thief.wait("window.log.reconnecting >= 2")  # it tried, and was refused, twice
        counter.channels[0].send("for the owner only")
        owner.wait("window.log.messages.indexOf('for the owner only') >= 0")
        owner.js("chan.send('still mine')")
        owner.wait("window.log.messages.indexOf('2:still mine') >= 0")

        assert thief.js("window.log.opens") == []
        assert thief.js("window.log.messages") == []
        assert counter.received[cid] == ["mine", "still mine"]
        assert counter.started == [cid]
        assert owner.js("window.log.messages") == ["welcome", "1:mine", "for the owner only", "2:still mine"]
    finally:
        thief.close()
        owner.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_refused_message_is_dropped_and_the_rest_goes_on(browser, counter, transport):
    """Over the limit: a POST gets 413, a WebSocket message closes the socket with
    1009. Either way the server did not count it: greenchan.js reports it (ondrop),
    and the messages after it are not wedged behind it (409s, or the same message
    sent again on every reconnect), in the same session."""
    server = Server(counter, port=0, max_body=1000, max_message_size=1000, session_grace=60).start()
    page = Page(browser, f"http://127.0.0.1:{server.port}/page")
    try:
        cid = page.js("(t) => connect(t)", transport)
        page.wait("window.log.opens.length === 1")
        page.js("chan.send('a'); chan.send('x'.repeat(2000)); chan.send('b'); chan.send('c')")
        page.wait("window.log.messages.indexOf('3:c') >= 0")
        drops = page.js("window.log.drops")
        assert [d[0] for d in drops] == ["x" * 2000]
        assert drops[0][1].startswith("rejected by the server"), drops
        assert counter.received[cid] == ["a", "b", "c"]
        assert [m for m in page.js("window.log.messages") if ":" in m] == ["1:a", "2:b", "3:c"]
        assert counter.started == [cid] and counter.closed == []
    finally:
        page.close()
        server.stop(timeout=1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_closed_while_away_is_learned_on_return(browser, server, counter, transport):
    """The application closes the session while the network is down (a kick): the
    client learns it when it comes back (onclose with the application's code), and
    does not start a new session in its place (the handler does not run again)."""
    relay = Relay(server.port).start()
    page = Page(browser, f"http://127.0.0.1:{relay.port}/page")
    try:
        cid = page.js("(t) => connect(t)", transport)
        page.wait("window.log.opens.length === 1")
        channel = wait_for(lambda: counter.channels)[0]
        relay.cut()
        page.wait("window.chan.state !== 'open'")
        wait_for(lambda: server.sessions[cid].state == "detached", timeout=10)
        channel.send("last words")
        channel.close(4000, "kicked")
        relay.restore()
        page.wait("window.log.closes.length === 1")
        assert page.js("window.log.closes") == [[4000, "kicked"]]
        assert page.js("window.log.messages") == ["welcome", "last words"]
        assert counter.started == [cid]
        assert counter.closed == [(cid, CloseStatus.SERVER_CLOSE)]
    finally:
        page.close()
        relay.stop()
