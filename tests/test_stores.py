"""greenchan/stores/: groups and broadcast, in one process and across processes.

Real servers (greenchan's Server, real redis-server processes) and real clients
(websocket-client, requests, raw sockets); no mocks. Every wait is bounded.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import traceback
from typing import Any, Callable, Dict, List

import gevent
import gevent.queue
import greenlet
import pytest
import redis
import requests
import websocket

from greenchan import (
    ChannelStore,
    CloseStatus,
    Event,
    MemoryChannelStore,
    RedisChannelStore,
    Server,
    with_channel,
)
from greenchan.stores import decode, encode

from redis_server import REDIS_SERVER, RedisServer, redis_server  # noqa: F401  (a fixture)

TIMEOUT = 10  # seconds, for any single wait


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll ``predicate`` until it is true; fail if it is not within ``timeout``."""
    with gevent.Timeout(timeout, AssertionError(f"not true within {timeout} s: {predicate}")):
        while True:
            value = predicate()
            if value:
                return value
            gevent.sleep(0.01)


def ws(port: int, path: str = "/") -> websocket.WebSocket:
    return websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=TIMEOUT)


def query(channel: Any) -> str:
    return channel.environ.get("QUERY_STRING", "")


def assert_empty(store: Any) -> None:
    """Nothing left behind in the store's internals."""
    assert store._groups == {}
    assert store._memberships == {}
    if isinstance(store, RedisChannelStore):
        assert not subscribed(store)
        # Nothing pending once Redis answered the last (un)subscriptions.
        wait_until(lambda: not any(link.confirm or link.leaving or link.outstanding for link in store._links.values()))


def subscribed(store: Any) -> set:
    """The channels a Redis store is subscribed to, on all its connections."""
    return set().union(*(link.subscribed for link in store._links.values()))


@pytest.fixture
def servers():
    started: List[Server] = []

    def start(app: Any, **options: Any) -> Server:
        options.setdefault("ping_interval", None)
        server = Server(app, port=0, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(timeout=1)


@pytest.fixture
def stores():
    made: List[Any] = []

    def make(kind: str, url: str = "", **kwargs: Any) -> Any:
        store = MemoryChannelStore(**kwargs) if kind == "memory" else RedisChannelStore(url, **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        if isinstance(store, RedisChannelStore):
            store.close()


# -- the protocol and the wire format --------------------------------------------


def test_both_stores_follow_the_protocol(redis_server):
    assert isinstance(MemoryChannelStore(), ChannelStore)
    store = RedisChannelStore(redis_server.url)
    try:
        assert isinstance(store, ChannelStore)
    finally:
        store.close()


@pytest.mark.parametrize(
    "message",
    ["", "héllo\nwörld", b"", b"\x00\xff\n", bytearray(b"ab"), {"body": "x"}, {},
     {"status": 201, "headers": {"X-A": "1"}, "body": b"\xff\n"}, {"headers": [("X-B", "2")], "body": "é"}],
)
def test_encoding_round_trips(message):
    decoded = decode(encode(message))
    if isinstance(message, dict) and isinstance(message.get("headers"), dict):
        message = dict(message, headers=list(message["headers"].items()))
    assert decoded == (bytes(message) if isinstance(message, bytearray) else message)


def test_encoding_events_and_compactness():
    event = decode(encode(Event("a\nb", event="tick", id="7", retry=100)))
    assert (event.data, event.event, event.id, event.retry) == ("a\nb", "tick", "7", 100)
    assert encode("hi") == b"shi"  # one tag byte for the common case
    assert encode(Event("x")) == b"e{}\nx"
    with pytest.raises(TypeError):
        encode(42)
    with pytest.raises(TypeError):
        encode({"bogus": 1})


# -- MemoryChannelStore on a real server -----------------------------------------


def test_membership_attachments_auto_leave(servers):
    store = MemoryChannelStore()
    closed: Dict[str, Any] = {}

    @with_channel
    def app(channel):
        name, _, since = query(channel).partition("=")
        store.add_to_group("room", channel, attachment={"since_ts": int(since)})
        store.add_to_group("lobby:" + name, channel)
        channel.on_close(lambda status: closed.__setitem__(name, status))
        channel.send("joined")

    server = servers(app)
    a, b = ws(server.port, "/?a=10"), ws(server.port, "/?b=20")
    assert a.recv() == b.recv() == "joined"
    members = store.members("room")
    assert sorted(att["since_ts"] for att in members.values()) == [10, 20]
    assert all(ch.is_websocket and ch.is_open for ch in members)
    members.clear()  # a copy: the store is untouched
    assert len(store.members("room")) == 2
    assert store.members("nowhere") == {}

    # Explicit leave: the group disappears, the channel keeps no hook of ours.
    (chan_b,) = store.members("lobby:b")
    store.remove_from_group("lobby:b", chan_b)
    store.remove_from_group("lobby:b", chan_b)  # not a member any more: no-op
    assert "lobby:b" not in store._groups
    store.add_to_group("room", chan_b, attachment={"since_ts": 21})  # replaces
    assert store.members("room")[chan_b] == {"since_ts": 21}

    a.close()  # auto-leave on close, and the app's on_close still runs
    wait_until(lambda: "a" in closed)
    assert closed["a"] is CloseStatus.NORMAL
    assert list(store.members("room").values()) == [{"since_ts": 21}]
    assert "lobby:a" not in store._groups
    b.close()
    wait_until(lambda: "b" in closed)
    assert_empty(store)
    # A closed channel is not added, and broadcasting to nobody reaches nobody.
    store.add_to_group("room", chan_b)
    assert_empty(store)
    assert store.broadcast("room", "anyone?") == 0


def test_broadcast_function_per_member(servers):
    store = MemoryChannelStore()

    @with_channel
    def app(channel):
        store.add_to_group("room", channel, attachment={"since_ts": int(query(channel))})
        channel.send("joined")

    server = servers(app)
    clients = [ws(server.port, f"/?{ts}") for ts in (5, 15, 25)]
    assert [c.recv() for c in clients] == ["joined"] * 3

    def newer_than_10(channel, attachment):
        ts = attachment["since_ts"]
        return f"since {ts}" if ts > 10 else None  # None skips the member

    assert store.broadcast("room", newer_than_10) == 2
    assert store.broadcast("room", "all") == 3
    assert clients[0].recv() == "all"
    assert clients[1].recv() == "since 15"
    assert clients[2].recv() == "since 25"
    assert clients[1].recv() == "all"
    with pytest.raises(TypeError):
        store.broadcast("room", 3.14)
    for c in clients:
        c.close()
    wait_until(lambda: not store._groups)
    assert_empty(store)


def test_mixed_group_websocket_long_poll_sse(servers):
    def render(channel, attachment, data):
        return Event(data) if attachment == "sse" else data

    store = MemoryChannelStore(render=render)

    @with_channel
    def app(channel):
        kind = query(channel)
        if kind == "sse":
            channel.send(Event("ready"))  # starts the stream before joining
        store.add_to_group("room", channel, attachment=kind)
        if kind == "ws":
            channel.send("joined")

    server = servers(app)
    base = f"http://127.0.0.1:{server.port}/"
    sock = ws(server.port, "/?ws")
    assert sock.recv() == "joined"

    sse_lines: gevent.queue.Queue = gevent.queue.Queue()
    sse = requests.get(base + "?sse", stream=True, timeout=TIMEOUT)
    assert sse.headers["Content-Type"] == "text/event-stream"
    reader = gevent.spawn(lambda: [sse_lines.put(line) for line in sse.iter_lines(decode_unicode=True) if line])
    assert sse_lines.get(timeout=TIMEOUT) == "data: ready"

    poll = gevent.spawn(requests.get, base + "?poll", timeout=TIMEOUT)
    wait_until(lambda: len(store.members("room")) == 3)

    assert store.broadcast("room", "one") == 3
    response = poll.get(timeout=TIMEOUT)
    assert (response.status_code, response.text) == (200, "one")
    assert response.headers["Content-Length"] == "3"
    # The long-poll completed and left at once; the others stay.
    assert sorted(store.members("room").values()) == ["sse", "ws"]
    assert sock.recv() == "one"
    assert sse_lines.get(timeout=TIMEOUT) == "data: one"

    assert store.broadcast("room", "two") == 2
    assert sock.recv() == "two"
    assert sse_lines.get(timeout=TIMEOUT) == "data: two"

    sock.close()
    reader.kill()
    sse.close()
    wait_until(lambda: not store._groups)
    assert_empty(store)


def _raw_ws_that_never_reads(port: int) -> socket.socket:
    """A client that completes the handshake and then never reads again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up quickly
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /?slow HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        assert chunk, "connection closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101")
    return sock


def test_slow_reader_is_cut_off_and_never_blocks_the_broadcast(servers):
    store = MemoryChannelStore()
    statuses: Dict[str, Any] = {}

    @with_channel
    def app(channel):
        name = query(channel)
        channel.on_close(lambda status: statuses.__setitem__(name, status))
        store.add_to_group("room", channel, attachment=name)
        channel.accept()

    server = servers(app, send_buffer=64 * 1024, send_timeout=0.5)
    slow = _raw_ws_that_never_reads(server.port)
    fast = [ws(server.port, f"/?fast{i}") for i in range(3)]
    received: List[List[str]] = [[] for _ in fast]

    def read(client, into):
        while True:
            into.append(client.recv())

    readers = [gevent.spawn(read, c, r) for c, r in zip(fast, received)]
    wait_until(lambda: len(store.members("room")) == 4)

    # Watch for the broadcasting greenlet switching away: that is what blocking is.
    me = greenlet.getcurrent()
    broadcasting = [False]
    switched_away: List[Any] = []

    def trace(event, args):
        if event in ("switch", "throw") and broadcasting[0] and args[0] is me:
            switched_away.append(args[1])

    padding = "x" * 8192
    sent: List[str] = []

    def broadcast(i: int) -> None:
        message = f"{i:06d}{padding}"
        previous = greenlet.settrace(trace)
        broadcasting[0] = True
        try:
            store.broadcast("room", message)
        finally:
            broadcasting[0] = False
            greenlet.settrace(previous)
        sent.append(message)
        # The fast members keep up (bounded wait): they must not be cut off.
        wait_until(lambda: all(len(r) == len(sent) for r in received))

    i = 0
    while "slow" not in statuses and i < 4000:  # 32 MB: far beyond any socket buffer
        broadcast(i)
        i += 1
    wait_until(lambda: "slow" in statuses)
    assert statuses["slow"] is CloseStatus.SLOW_CONSUMER
    for j in range(i, i + 20):  # the others carry on
        broadcast(j)

    assert switched_away == []
    assert all(r == sent for r in received)  # every message, in order
    assert sorted(store.members("room").values()) == ["fast0", "fast1", "fast2"]
    assert not any(name.startswith("fast") for name in statuses)
    for reader in readers:
        reader.kill()
    for client in fast:
        client.close()
    slow.close()
    wait_until(lambda: not store._groups)
    assert_empty(store)


def test_many_groups_leave_nothing_behind_memory(servers):
    _many_groups(servers, MemoryChannelStore(), None)


def test_many_groups_leave_nothing_behind_redis(redis_server, servers, stores):
    _many_groups(servers, stores("redis", redis_server.url), redis_server.client())


def _many_groups(servers, store, r) -> None:
    groups = [f"g{n}" for n in range(500)]

    @with_channel
    def app(channel):
        for group in groups:
            store.add_to_group(group, channel, attachment=query(channel))

        @channel.on_receive
        def leave(message):
            for group in groups[::2]:
                store.remove_from_group(group, channel)
            channel.send("left")

        channel.send("joined")

    server = servers(app)
    clients = [ws(server.port, f"/?c{i}") for i in range(3)]
    assert [c.recv() for c in clients] == ["joined"] * 3
    assert len(store._groups) == 500 and len(store._memberships) == 3
    if r is not None:
        assert len(r.pubsub_channels("greenchan:*")) == 500

    store.broadcast("g499", "hi")
    assert [c.recv() for c in clients] == ["hi"] * 3

    for c in clients:
        c.send("leave")
        assert c.recv() == "left"
    assert len(store._groups) == 250
    if r is not None:
        wait_until(lambda: len(r.pubsub_channels("greenchan:*")) == 250)
        assert all(int(ch.decode()[len("greenchan:g"):]) % 2 for ch in r.pubsub_channels("greenchan:*"))

    for c in clients:
        c.close()
    wait_until(lambda: not store._groups)
    if r is not None:  # unsubscribing happens in the background
        wait_until(lambda: r.pubsub_channels() == [] and not subscribed(store))
    assert_empty(store)


# -- RedisChannelStore --------------------------------------------------------------


def test_redis_in_process_exactly_once_and_render(redis_server, servers, stores):
    store = stores("redis", redis_server.url, render=lambda ch, att, data: f"{att}:{data}")

    @with_channel
    def app(channel):
        store.add_to_group("room", channel, attachment=query(channel))
        channel.send("joined")  # after add_to_group: the subscription is in effect

    server = servers(app)
    a, b = ws(server.port, "/?alice"), ws(server.port, "/?bob")
    assert a.recv() == b.recv() == "joined"
    # PUBLISH's count: subscribers (processes), not members.
    assert store.broadcast("room", "1") == 1
    assert store.broadcast("room", "2") == 1
    assert store.broadcast("nobody-here", "x") == 0
    assert [a.recv(), a.recv()] == ["alice:1", "alice:2"]  # once each, in order
    assert [b.recv(), b.recv()] == ["bob:1", "bob:2"]
    with pytest.raises(TypeError, match="a function cannot cross processes.*render="):
        store.broadcast("room", lambda channel, attachment: "x")
    a.close()
    b.close()
    wait_until(lambda: not store._groups)
    wait_until(lambda: redis_server.client().pubsub_channels() == [] and not subscribed(store))
    assert_empty(store)


APP = textwrap.dedent(
    '''
    import sys
    if sys.argv[3] == "patch":
        from gevent import monkey
        monkey.patch_all()
    import json, os
    from greenchan import MemoryChannelStore, RedisChannelStore, Server, with_channel

    url, tag = sys.argv[1], sys.argv[2]

    def render(channel, attachment, data):
        return f"{tag}:{attachment}:{data}"

    if url == "memory":
        store = MemoryChannelStore(render=render)
    else:
        store = RedisChannelStore(url, render=render, prefix="t:")

    @with_channel
    def app(channel):
        path = channel.environ["PATH_INFO"]
        if path.startswith("/join/"):
            for group in path[len("/join/"):].split(","):
                store.add_to_group(group, channel, attachment=channel.environ["QUERY_STRING"])
            channel.send("joined")
        elif path.startswith("/broadcast/"):
            body = channel.receive(timeout=5)
            try:
                channel.send(str(store.broadcast(path[len("/broadcast/"):], body)))
            except Exception as exc:
                channel.send({"status": 503, "body": f"{type(exc).__name__}: {exc}"})
        elif path == "/function":
            try:
                store.broadcast("room", lambda channel, attachment: "x")
            except TypeError as exc:
                channel.send(str(exc))
        elif path == "/state":
            channel.send(json.dumps({
                "groups": {g: len(m) for g, m in store._groups.items()},
                "memberships": len(store._memberships),
                "pid": os.getpid(),
            }))

    server = Server(app, port=0, ping_interval=None).start()
    print(server.port, flush=True)
    server.serve_forever()
    '''
)


@pytest.fixture
def processes(tmp_path):
    """``start(url, tag, patch=True)`` runs the app above in its own process."""
    script = tmp_path / "store_app.py"
    script.write_text(APP)
    procs: List[subprocess.Popen] = []

    def start(url: str, tag: str, patch: bool = True) -> int:
        proc = subprocess.Popen(
            [sys.executable, str(script), url, tag, "patch" if patch else "no-patch"],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        with gevent.Timeout(TIMEOUT * 2, AssertionError("the app process did not start")):
            line = proc.stdout.readline()
        assert line.strip().isdigit(), f"app process said {line!r}"
        return int(line)

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            assert proc.wait(timeout=TIMEOUT) == 0  # graceful stop, store included
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
            raise


def _state(port: int) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/state", timeout=TIMEOUT).json()


def _post(port: int, group: str, data: str) -> requests.Response:
    return requests.post(
        f"http://127.0.0.1:{port}/broadcast/{group}", data=data.encode(),
        headers={"Content-Type": "text/plain"}, timeout=TIMEOUT,
    )


def test_redis_two_processes(redis_server, processes):
    port_a = processes(redis_server.url, "A")
    port_b = processes(redis_server.url, "B")
    r = redis_server.client()

    alice = ws(port_a, "/join/room?alice")
    bob = ws(port_b, "/join/room?bob")
    carol = ws(port_a, "/join/g1,g2,g3,room?carol")
    assert alice.recv() == bob.recv() == carol.recv() == "joined"

    response = _post(port_b, "room", "hello")  # made on B, reaches A too
    assert (response.status_code, response.text) == (200, "2")  # two processes
    assert alice.recv() == "A:alice:hello"  # render runs in each process
    assert carol.recv() == "A:carol:hello"
    assert bob.recv() == "B:bob:hello"
    assert _post(port_a, "g2", "only carol").text == "1"
    assert carol.recv() == "A:carol:only carol"

    text = requests.get(f"http://127.0.0.1:{port_a}/function", timeout=TIMEOUT).text
    assert "a function cannot cross processes" in text and "render=" in text

    # One subscriber connection per process, whatever the number of groups.
    pids = {_state(port_a)["pid"], _state(port_b)["pid"]}
    subscribers = [c["name"] for c in r.client_list() if c["name"].startswith("greenchan-sub-")]
    assert sorted(subscribers) == sorted(f"greenchan-sub-{pid}" for pid in pids)
    assert dict(r.pubsub_numsub("t:room", "t:g1")) == {b"t:room": 2, b"t:g1": 1}
    assert sorted(r.pubsub_channels("t:*")) == [b"t:g1", b"t:g2", b"t:g3", b"t:room"]

    carol.close()  # A keeps room (alice) but drops g1..g3
    wait_until(lambda: sorted(r.pubsub_channels("t:*")) == [b"t:room"])
    alice.close()
    bob.close()
    wait_until(lambda: r.pubsub_channels() == [])
    for port in (port_a, port_b):
        assert {k: v for k, v in _state(port).items() if k != "pid"} == {"groups": {}, "memberships": 0}
    assert _post(port_a, "room", "anyone?").text == "0"


def test_redis_restart_mid_run(redis_server, servers, stores, caplog):
    caplog.set_level(logging.DEBUG, logger="greenchan.stores")
    store = stores("redis", redis_server.url, reconnect_min=0.05, reconnect_max=0.5)

    @with_channel
    def app(channel):
        store.add_to_group("room", channel)
        channel.send("joined")

    server = servers(app)
    client = ws(server.port, "/")
    assert client.recv() == "joined"
    assert store.broadcast("room", "before") == 1
    assert client.recv() == "before"

    redis_server.kill()
    for n in range(3):  # the caller sees the outage, every time
        with pytest.raises(redis.exceptions.ConnectionError):
            store.broadcast("room", f"during {n}")
    redis_server.start()  # same port, empty: no subscriptions

    def broadcast_succeeds() -> bool:
        try:
            return store.broadcast("room", "after") == 1
        except redis.exceptions.ConnectionError:
            return False

    wait_until(broadcast_succeeds)  # the store resubscribed by itself
    assert client.recv() == "after"  # nothing sent during the outage arrives
    assert dict(redis_server.client().pubsub_numsub("greenchan:room")) == {b"greenchan:room": 1}

    records = [rec for rec in caplog.records if rec.name == "greenchan.stores"]
    warnings = [rec.getMessage() for rec in records if rec.levelno == logging.WARNING]
    # Its member was being served: the outage is reported as the loss it is, and its
    # end at the same level (an operator looks for both).
    assert len(warnings) == 2, warnings
    assert "lost for this process's members" in warnings[0] and "is back" in warnings[1]

    client.close()
    wait_until(lambda: not store._groups)
    wait_until(lambda: redis_server.client().pubsub_channels() == [] and not subscribed(store))
    assert_empty(store)


def test_store_close_stops_everything(redis_server, stores):
    store = stores("redis", redis_server.url)
    assert store.broadcast("room", "x") == 0  # starts the connections
    r = redis_server.client()
    assert any(c["name"].startswith("greenchan-sub-") for c in r.client_list())
    store.close()
    assert store._links == {}
    wait_until(lambda: not any(c["name"].startswith("greenchan-") for c in r.client_list()))
    with pytest.raises(RuntimeError, match="closed"):
        store.broadcast("room", "x")


def test_without_monkey_patching(redis_server, processes):
    # The memory store serves a process that is not monkey-patched...
    port = processes("memory", "M", patch=False)
    client = ws(port, "/join/room?solo")
    assert client.recv() == "joined"
    assert _post(port, "room", "plain gevent").text == "1"
    assert client.recv() == "M:solo:plain gevent"
    client.close()
    # ...and the Redis store refuses to run there, saying what to do.
    result = subprocess.run(
        [sys.executable, "-c", f"from greenchan import RedisChannelStore; RedisChannelStore({redis_server.url!r})"],
        capture_output=True, text=True, timeout=TIMEOUT * 3,
    )
    assert result.returncode != 0
    assert "RuntimeError: RedisChannelStore needs gevent monkey-patching" in result.stderr
    assert "monkey.patch_all()" in result.stderr


# -- issue 10: credentials, message size, rejoin --------------------------------------

PASSWORD = "pw-Sekr1t-9f3"  # distinctive, so a leak anywhere is found by a substring search


class PasswordRedis(RedisServer):
    """A redis-server started with ``--requirepass`` (tests/redis_server.py's, plus the flag)."""

    def __init__(self, password: str) -> None:
        super().__init__()
        self.password = password

    def start(self, timeout: float = 10.0) -> "PasswordRedis":
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--requirepass", self.password],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _answers(self), timeout)
        return self

    def client(self):
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=5, socket_connect_timeout=5)

    def url_with(self, password: str) -> str:
        return f"redis://:{password}@127.0.0.1:{self.port}/0"


def _answers(server: RedisServer) -> bool:
    assert server.proc.poll() is None, "redis-server exited"
    try:
        return bool(server.client().ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture
def password_redis():
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = PasswordRedis(PASSWORD).start()
    yield server
    server.stop()


def _everything_logged(caplog) -> str:
    return "\n".join(
        rec.getMessage() + (rec.exc_text or "") for rec in caplog.records
    ) + caplog.text


def _joined_client(servers, store, group: str = "room") -> websocket.WebSocket:
    @with_channel
    def app(channel):
        store.add_to_group(group, channel)
        channel.send("joined")

    client = ws(servers(app).port)
    assert client.recv() == "joined"
    return client


def test_redis_credentials_never_shown(password_redis, servers, stores, caplog):
    caplog.set_level(logging.DEBUG, logger="greenchan.stores")
    store = stores("redis", password_redis.url_with(PASSWORD), reconnect_min=0.05, reconnect_max=0.2)
    assert PASSWORD not in store.url and store.url.startswith("redis://***@127.0.0.1:")
    client = _joined_client(servers, store)
    assert store.broadcast("room", "one") == 1
    assert client.recv() == "one"

    password_redis.kill()
    errors = []
    for _ in range(3):
        with pytest.raises(redis.exceptions.ConnectionError) as info:
            store.broadcast("room", "during")
        errors.append("".join(traceback.format_exception(info.type, info.value, info.tb)))
    password_redis.start()

    def broadcast_succeeds() -> bool:
        try:
            return store.broadcast("room", "two") == 1
        except redis.exceptions.ConnectionError:
            return False

    wait_until(broadcast_succeeds)
    assert client.recv() == "two"
    logged = _everything_logged(caplog)
    assert "***@127.0.0.1" in logged  # the URL is there, redacted
    assert PASSWORD not in logged
    assert not any(PASSWORD in text for text in errors)
    assert all("***@127.0.0.1" in text for text in errors)


@pytest.mark.parametrize("password", ["wrong-Pw-77", None])
def test_redis_wrong_password_is_a_clear_error(password_redis, password, stores, caplog):
    caplog.set_level(logging.DEBUG, logger="greenchan.stores")
    url = password_redis.url_with(password) if password else password_redis.url
    store = stores("redis", url, reconnect_min=0.01, reconnect_max=0.02)
    admin = password_redis.client()
    for _ in range(3):  # every time, not "unreachable": authentication failed
        with pytest.raises(redis.exceptions.AuthenticationError, match="authentication failed"):
            store.broadcast("room", "x")
    # The store keeps trying (a changed password on the server may fix it)...
    seen = admin.info("stats")["total_connections_received"]
    wait_until(lambda: admin.info("stats")["total_connections_received"] >= seen + 5)
    with pytest.raises(redis.exceptions.AuthenticationError, match="check the user and password"):
        store.broadcast("room", "x")
    # ...logging it once, as an ERROR, never as an outage, never with the password.
    records = [rec for rec in caplog.records if rec.name == "greenchan.stores" and rec.levelno >= logging.INFO]
    assert [(rec.levelno, "authentication failed" in rec.getMessage()) for rec in records] == [(logging.ERROR, True)]
    assert password is None or password not in _everything_logged(caplog)

    if password:  # the server now takes the store's password: the store recovers by itself
        admin.config_set("requirepass", password)

        def broadcast_succeeds() -> bool:
            try:
                return store.broadcast("room", "x") == 0
            except redis.exceptions.AuthenticationError:
                return False

        wait_until(broadcast_succeeds)
        assert "is back" in caplog.records[-1].getMessage()


def test_redis_refuses_a_message_too_large_to_deliver(redis_server, servers, stores, caplog):
    caplog.set_level(logging.INFO, logger="greenchan.stores")
    store = stores("redis", redis_server.url)
    assert store.max_message_size == 1 << 20  # the documented default
    client = _joined_client(servers, store)
    for message in ("x" * (1 << 20), b"x" * (1 << 20), {"body": "x" * (1 << 20)}):
        with pytest.raises(ValueError, match="max_message_size.*reference to the data"):
            store.broadcast("room", message)
    at_limit = "y" * ((1 << 20) - 1)  # plus its one tag byte: exactly the limit
    assert store.broadcast("room", at_limit) == 1
    assert client.recv() == at_limit
    assert [rec for rec in caplog.records if rec.levelno >= logging.WARNING] == []

    small = stores("redis", redis_server.url, max_message_size=10)
    with pytest.raises(ValueError, match=r"11-byte message .* \(10 bytes\)"):
        small.broadcast("room", "0123456789")


def test_redis_subscriber_cut_by_redis_is_reported_as_a_loss(redis_server, servers, stores, caplog):
    caplog.set_level(logging.INFO, logger="greenchan.stores")
    # No size check: what Redis does with a 40 MiB message (over its 32 MiB
    # pub/sub output buffer hard limit) is cut the subscriber.
    store = stores("redis", redis_server.url, max_message_size=None, reconnect_min=0.05)
    client = _joined_client(servers, store)
    assert store.broadcast("room", "x" * (40 << 20)) == 1  # Redis took it...

    def warned() -> List[str]:
        return [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]

    wait_until(warned)  # ...and the loss is reported, not passed off as a plain outage
    (warning,) = warned()
    assert "lost for this process's members" in warning
    assert "client-output-buffer-limit" in warning

    def broadcast_succeeds() -> bool:
        try:
            return store.broadcast("room", "after") == 1
        except redis.exceptions.ConnectionError:
            return False

    wait_until(broadcast_succeeds)
    assert client.recv() == "after"  # the big one never came


@pytest.mark.timeout(60)
def test_redis_rejoin_right_after_the_last_leave_is_prompt(redis_server, servers, stores):
    # subscribe_timeout=60: a stall would be the whole minute, far past the bound below.
    store = stores("redis", redis_server.url, subscribe_timeout=60)
    channels: gevent.queue.Queue = gevent.queue.Queue()

    @with_channel
    def app(channel):
        channel.accept()
        channels.put(channel)

    server = servers(app)
    client = ws(server.port)
    channel = channels.get(timeout=TIMEOUT)
    store.add_to_group("room", channel)
    assert store.broadcast("room", "first") == 1
    assert client.recv() == "first"

    # The last member leaves in the hub, as a close hook run there does: the
    # UNSUBSCRIBE is deferred to a greenlet. The test greenlet resumes first.
    waiter = gevent.hub.Waiter()

    def leave_in_hub() -> None:
        store.remove_from_group("room", channel)
        waiter.switch(None)

    gevent.get_hub().loop.run_callback(leave_in_hub)
    waiter.get()
    assert store.members("room") == {}
    with gevent.Timeout(TIMEOUT, AssertionError("add_to_group stalled on a confirmation nothing sets")):
        store.add_to_group("room", channel)  # joined again at once
    assert not any(link.confirm for link in store._links.values())
    assert store.broadcast("room", "after rejoin") == 1
    assert client.recv() == "after rejoin"
    wait_until(lambda: dict(redis_server.client().pubsub_numsub("greenchan:room")) == {b"greenchan:room": 1})
    client.close()
    wait_until(lambda: not store._groups and not subscribed(store))
    assert_empty(store)
