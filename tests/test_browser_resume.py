"""A lost session resumes its groups from Redis on another process, in Chromium (issue 12).

Two greenchan processes share one Redis store with history. A page loads
greenchan.js through a TCP relay (tests/relay.py) pointing at process A and joins
group "room" with ``since=channel.last_event_id``. The test broadcasts "1".."N" to
the room from its own store at a steady pace. Mid-stream process A is SIGKILLed
(its session dies with it) and the relay is pointed at process B: greenchan.js
reconnects, B has no session for it, starts a new one, and the handler's
``add_to_group`` resumes the room from the ids greenchan.js sends in ``gc_last``.
The page must get exactly 1..N, in order, once each, and be told ``recovered``.

Skips without Chromium, playwright or redis-server; fails instead when CI is set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from conftest import wait_for
from greenchan import RedisChannelStore
from redis_server import REDIS_SERVER, redis_server  # noqa: F401  (a fixture)
from relay import Relay
from test_browser import CHROMIUM_ARGS, _chromium, _missing

WAIT_MS = 30000  # any single wait in the browser
N = 300  # messages broadcast
PACE = 0.02  # seconds between two: about 6 s of stream, the kill in the middle

APP = r'''
import sys
from gevent import monkey; monkey.patch_all()
import greenchan.static
from greenchan import RedisChannelStore, Server, with_channel

store = RedisChannelStore(sys.argv[1], history=1000)

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>resume</title>
<script src="/greenchan.js"></script>
<script>
"use strict";
window.got = []; window.resumes = []; window.opens = []; window.reconnecting = 0;
window.start = function (transport) {
  var c = window.chan = greenchan.connect("/chan", {transports: [transport], reconnectDelay: 100,
    maxReconnectDelay: 400, reconnectJitter: 0, connectTimeout: 5000});
  c.onmessage = function (e) { got.push(e.data); };
  c.onresume = function (e) { resumes.push(e.recovered); };
  c.onopen = function (e) { opens.push(e.reconnected); };
  c.onreconnecting = function () { reconnecting += 1; };
};
</script></head><body>resume</body></html>
"""

@with_channel
def room(channel):
    store.add_to_group("room", channel, since=channel.last_event_id)

def app(environ, start_response):
    path = environ.get("PATH_INFO")
    if path == "/chan":
        return room(environ, start_response)
    if path == "/greenchan.js":
        return greenchan.static.javascript(environ, start_response)
    if path == "/page":
        headers = [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(PAGE)))]
        start_response("200 OK", headers)
        return [PAGE]
    start_response("204 No Content", [])
    return [b""]

server = Server(app, port=0, store=store, session_grace=60).start()
print(server.port, flush=True)
server.serve_forever()
'''


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _missing() or ("" if REDIS_SERVER else "redis-server is not installed")
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
def two_processes(
    tmp_path: Any, redis_server: Any  # noqa: F811
) -> Iterator[tuple[list[int], list[subprocess.Popen]]]:
    script = tmp_path / "resume_app.py"
    script.write_text(APP)
    command = [sys.executable, str(script), redis_server.url]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        ports = []
        for proc in procs:
            with gevent.Timeout(20, AssertionError("the app process did not start")):
                ports.append(int(proc.stdout.readline()))
        yield ports, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _broadcast(store: RedisChannelStore, n: int, pace: float) -> None:
    """The third party: "1".."n" to the room, one every ``pace`` seconds."""
    for i in range(1, n + 1):
        store.broadcast("room", str(i))
        gevent.sleep(pace)


@pytest.mark.parametrize("transport", ["websocket", "sse", "longpoll"])
def test_a_killed_process_and_the_room_resumes_on_the_other(
    browser, two_processes, redis_server, transport  # noqa: F811
):
    (a, b), procs = two_processes
    relay = Relay(a).start()
    publisher = RedisChannelStore(redis_server.url, history=1000)
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    sender = None
    try:
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"http://127.0.0.1:{relay.port}/page")
        page.evaluate("(t) => start(t)", transport)
        page.wait_for_function("window.opens.length === 1", timeout=WAIT_MS)
        # The page is a member of the room on A before the first message goes out.
        # A subscribed to the room: the first message cannot go out before the page joined.
        watcher = redis_server.client()
        wait_for(lambda: watcher.pubsub_numsub(publisher.prefix + "room")[0][1] >= 1, timeout=10)
        sender = gevent.spawn(_broadcast, publisher, N, PACE)
        page.wait_for_function("window.got.length >= 60", timeout=WAIT_MS)

        sid = page.evaluate("window.chan._sid")
        procs[0].send_signal(signal.SIGKILL)  # the session dies with A
        procs[0].wait(timeout=10)
        relay.cut()
        relay.retarget(b)
        relay.restore()

        page.wait_for_function("(n) => window.got.length >= n", arg=N, timeout=45000)
        sender.join(timeout=30)
        assert sender.successful()
        gevent.sleep(0.3)  # a duplicate after the last one would land here
        got = page.evaluate("window.got")
        assert got == [str(i) for i in range(1, N + 1)], _describe(got)
        assert True in page.evaluate("window.resumes"), page.evaluate("window.resumes")
        assert False not in page.evaluate("window.resumes")
        # A new session on B: another instance id (over long-polling Chromium may retry
        # the cut poll by itself, so no onopen need come; the data and onresume must).
        assert page.evaluate("window.chan._sid") != sid
        assert relay.accepted >= 2
        assert not errors, errors
    finally:
        if sender is not None:
            sender.kill(block=False)
        context.close()
        relay.stop()
        publisher.close()


def _describe(got: list[str]) -> str:
    """Where the page's list goes wrong: missing and doubled numbers."""
    numbers = [int(x) for x in got if x.isdigit()]
    missing = sorted(set(range(1, N + 1)) - set(numbers))
    doubled = sorted({x for x in numbers if numbers.count(x) > 1})
    other = [x for x in got if not x.isdigit()]
    return f"{len(got)} messages; missing {missing[:20]}; twice {doubled[:20]}; other {other[:5]}"
