"""greenchan/stores/history.py: ids, kept messages, resuming exactly once, in both stores.

Real servers (greenchan's Server, real redis-server processes, server and
publisher processes) and real clients (websocket-client, requests); no mocks.
Every wait is bounded; nothing depends on how fast anything is.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote

import gevent
import gevent.queue
import pytest
import redis
import requests
import websocket

from greenchan import Channel, Event, MemoryChannelStore, RedisChannelStore, Server, with_channel
from greenchan.stores import encode, history as history_module

from redis_server import redis_server  # noqa: F401  (a fixture)

TIMEOUT = 10  # seconds, for any single wait
POLLED = 300  # messages a long-poll client takes in the racing tests (one request each)


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    with gevent.Timeout(timeout, AssertionError(f"not true within {timeout} s: {predicate}")):
        while True:
            value = predicate()
            if value:
                return value
            gevent.sleep(0.01)


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


@pytest.fixture(params=["memory", "redis"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def make_store(request, kind):
    """``make_store(**options)``: a store of this test's kind (Redis on a fresh server)."""
    made: List[Any] = []
    holder: Dict[str, Any] = {}

    def make(**options: Any) -> Any:
        if kind == "memory":
            store = MemoryChannelStore(**options)
        else:
            if "redis" not in holder:
                holder["redis"] = request.getfixturevalue("redis_server")
            store = RedisChannelStore(holder["redis"].url, **options)
        made.append(store)
        return store

    make.kind = kind  # type: ignore[attr-defined]
    make.redis = lambda: holder.get("redis")  # type: ignore[attr-defined]
    yield make
    for store in made:
        if isinstance(store, RedisChannelStore):
            store.close()


def join_app(store: Any, results: List[Tuple[str, bool]]) -> Any:
    """Joins the groups in the path (``/a,b``), resuming from ``channel.last_event_id``."""

    @with_channel
    def app(channel):
        for group in channel.environ["PATH_INFO"].strip("/").split(","):
            results.append((group, store.add_to_group(group, channel, since=channel.last_event_id)))

    return app


def ws(port: int, path: str) -> websocket.WebSocket:
    return websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=TIMEOUT)


def ids_of(store: Any, group: str) -> Dict[Any, str]:
    """message -> id, from the group's history."""
    return {message: msg_id for msg_id, message in store.history(group)}


@pytest.fixture
def calls(monkeypatch) -> List[Tuple[str, Any]]:
    """Record the store's calls to the channel's history side, keeping what they do."""
    seen: List[Tuple[str, Any]] = []
    for name in ("_send_tagged", "_position", "_resumed"):
        original = getattr(Channel, name)

        def recorder(self, *args, _name=name, _original=original):
            seen.append((_name, args))
            return _original(self, *args)

        monkeypatch.setattr(Channel, name, recorder)
    return seen


# -- ids, history(), since ----------------------------------------------------------


def test_ids_history_and_since(make_store):
    store = make_store(history=5)
    assert store.history("room") == []
    assert store.history("room", since="anything") is None
    for i in range(3):
        store.broadcast("room", f"m{i}")
    kept = store.history("room")
    assert [m for _, m in kept] == ["m0", "m1", "m2"]
    ids = [i for i, _ in kept]
    assert len(set(ids)) == 3 and all(isinstance(i, str) for i in ids)
    tag = history_module.group_tag("room")
    parts = [i.split(":") for i in ids]
    assert {p[0] for p in parts} == {tag} and len({p[1] for p in parts}) == 1  # one tag, one epoch
    assert all(c in "0123456789abcdef:-" for i in ids for c in i)  # safe in SSE, headers, URLs
    assert store.history("room", since=ids[0]) == kept[1:]
    assert store.history("room", since=ids[2]) == []  # the newest: nothing after it
    # Not ids of this history: unknown epoch, another group's tag, garbage, a future number.
    other_epoch = ":".join([tag, "00000000", parts[0][2]])
    for bad in (other_epoch, ids[0].replace(tag, "ffffff", 1), "", "x", "a:b:c", ids[2] + "9"):
        assert store.history("room", since=bad) is None, bad
    # Every type of message comes back as it was broadcast.
    event = Event("e", event="tick", retry=5)
    store.broadcast("room", b"\x00\xff")
    store.broadcast("room", event)
    store.broadcast("room", {"status": 201, "body": "d"})
    got = [m for _, m in store.history("room", since=ids[2])]
    assert got[0] == b"\x00\xff" and got[2]["body"] == "d"
    assert (got[1].data, got[1].event, got[1].retry) == ("e", "tick", 5)
    with pytest.raises(TypeError, match="render="):
        store.broadcast("room", lambda channel, attachment: "x")


def test_trimmed_history_is_not_continuable(make_store):
    size = 3
    store = make_store(history=size)
    store.broadcast("room", "first")
    (first_id, _), = store.history("room")
    # Redis trims whole stream nodes (MAXLEN ~, 100 entries a node): go well past them.
    total = size + 1 if make_store.kind == "memory" else 400
    for i in range(total):
        store.broadcast("room", str(i))
    kept = store.history("room")
    assert [m for _, m in kept] == [str(i) for i in range(total - size, total)]  # the newest N
    assert store.history("room", since=first_id) is None  # what followed it is gone
    assert store.history("room", since=kept[0][0]) == kept[1:]


def test_ttl(make_store):
    store = make_store(history=10, history_ttl=0.3)
    store.broadcast("room", "a")
    store.broadcast("room", "b")
    a, b = (i for i, _ in store.history("room"))
    gevent.sleep(0.5)  # past the ttl: both expired
    assert store.history("room") == []
    store.broadcast("room", "c")
    (c, _), = store.history("room")
    assert store.history("room", since=a) is None  # b, which followed it, expired
    assert store.history("room", since=b) == [(c, "c")]  # b itself expired, but nothing after it did
    with pytest.raises(ValueError, match="history_ttl"):
        make_store(history_ttl=5)
    with pytest.raises(ValueError, match="history"):
        make_store(history=-1)


def test_composite_since_picks_this_groups_id(make_store):
    store = make_store(history=10)
    store.broadcast("a", "a1")
    store.broadcast("b", "b1")
    store.broadcast("a", "a2")
    store.broadcast("b", "b2")
    a1 = ids_of(store, "a")["a1"]
    b1 = ids_of(store, "b")["b1"]
    composite = f"{a1} {b1}"
    assert [m for _, m in store.history("a", since=composite)] == ["a2"]
    assert [m for _, m in store.history("b", since=composite)] == ["b2"]
    assert store.history("c", since=composite) is None  # no id for c in it: not a position


def test_epochs_memory_new_store_instance():
    old = MemoryChannelStore(history=10)
    old.broadcast("room", "x")
    (old_id, _), = old.history("room")
    new = MemoryChannelStore(history=10)  # a restarted process
    new.broadcast("room", "y")
    assert new.history("room", since=old_id) is None
    assert new.history("room")[0][0].split(":")[1] != old_id.split(":")[1]  # another epoch


def test_epochs_redis_flushed_or_restarted_empty(redis_server, servers):  # noqa: F811
    store = RedisChannelStore(redis_server.url, history=10, reconnect_min=0.05, reconnect_max=0.2)
    results: List[Tuple[str, bool]] = []
    try:
        server = servers(join_app(store, results))
        store.broadcast("room", "x")
        (before, _), = store.history("room")
        redis_server.client().flushall()
        store.broadcast("room", "y")
        after = store.history("room")
        assert [m for _, m in after] == ["y"] and after[0][0].split(":")[1] != before.split(":")[1]
        assert store.history("room", since=before) is None
        client = ws(server.port, "/room?gc_last=" + quote(before))
        wait_until(lambda: results)
        assert results == [("room", False)]  # never taken for a position in the new epoch
        client.close()

        redis_server.kill()
        redis_server.start()  # empty: the group's epoch is gone

        def back() -> bool:
            try:
                store.broadcast("room", "z")
                return True
            except redis.exceptions.ConnectionError:
                return False

        wait_until(back)
        assert store.history("room", since=after[0][0]) is None
    finally:
        store.close()


def test_history_off_changes_nothing(make_store, servers, calls):
    store = make_store()
    assert store.history("room") == [] and store.history("room", since="x") is None
    results: List[Tuple[str, bool]] = []
    server = servers(join_app(store, results))
    plain = ws(server.port, "/room")
    resuming = ws(server.port, "/room?gc_last=abc")
    wait_until(lambda: len(results) == 2)
    assert sorted(results) == [("room", False), ("room", True)]  # history=0: any since is False
    raw = None
    if make_store.kind == "redis":
        raw = make_store.redis().client().pubsub()
        raw.subscribe("greenchan:room")
        wait_until(lambda: raw.get_message(timeout=0.01))  # the subscribe confirmation
    store.broadcast("room", "hello")
    assert plain.recv() == resuming.recv() == "hello"
    assert [name for name, _ in calls if name != "_resumed"] == []  # plain sends, no ids, no position
    if raw is not None:  # the same bytes on Redis as before history existed
        message = wait_until(lambda: raw.get_message(timeout=0.01))
        assert message["data"] == b"shello"
        raw.close()
    plain.close()
    resuming.close()


def test_round_trips_and_memory_per_message(redis_server):  # noqa: F811
    store = RedisChannelStore(redis_server.url, history=1000)
    r = redis_server.client()
    try:
        store.broadcast("room", "warm up")  # loads the script
        before = r.info("commandstats")
        for i in range(200):
            store.broadcast("room", f"message {i:04d}")
        after = r.info("commandstats")

        def calls_of(stats: dict, name: str) -> int:
            return stats.get(f"cmdstat_{name}", {}).get("calls", 0)

        assert calls_of(after, "evalsha") - calls_of(before, "evalsha") == 200  # one round trip each
        for name in ("publish", "xadd"):  # run inside the script, once per broadcast
            assert calls_of(after, name) - calls_of(before, name) == 200
        assert calls_of(after, "script|load") == calls_of(before, "script|load")
        assert r.xlen("greenchan:{room}:history") == 201
    finally:
        store.close()


# -- joining with since, on a real server -------------------------------------------


def test_join_replays_then_goes_live(make_store, servers, calls):
    store = make_store(history=10)
    results: List[Tuple[str, bool]] = []
    server = servers(join_app(store, results))
    for i in range(5):
        store.broadcast("room", f"m{i}")
    ids = ids_of(store, "room")

    client = ws(server.port, "/room?gc_last=" + quote(ids["m1"]))
    assert [client.recv() for _ in range(3)] == ["m2", "m3", "m4"]  # the replay, in order
    wait_until(lambda: results)
    assert results == [("room", True)]
    store.broadcast("room", "live")
    assert client.recv() == "live"
    sent = [args for name, args in calls if name == "_send_tagged"]
    assert [(m, g, i) for m, g, i in sent] == [
        ("m2", "room", ids["m2"]), ("m3", "room", ids["m3"]), ("m4", "room", ids["m4"]),
        ("live", "room", ids_of(store, "room")["live"]),
    ]
    # Told where it stands once it is live (the newest it has), and that it resumed.
    assert ("_position", ("room", ids["m4"])) in calls
    assert ("_resumed", ("room", True)) in calls

    # Lost continuity: nothing replayed, live from now, False, told so.
    calls.clear()
    tag, _, position = ids["m0"].split(":")
    lost = ws(server.port, "/room?gc_last=" + quote(f"{tag}:00000000:{position}"))  # another epoch
    wait_until(lambda: len(results) == 2)
    assert results[1] == ("room", False)
    store.broadcast("room", "after")
    assert lost.recv() == "after"
    assert client.recv() == "after"
    assert ("_resumed", ("room", False)) in calls

    # No since: live, True, and the position, so it can resume later having received nothing.
    calls.clear()
    fresh = ws(server.port, "/room")
    wait_until(lambda: len(results) == 3)
    assert results[2] == ("room", True)
    position = [args for name, args in calls if name == "_position"]
    assert position == [("room", ids_of(store, "room")["after"])]
    assert not [name for name, _ in calls if name == "_resumed"]
    for c in (client, lost, fresh):
        c.close()


def test_position_of_an_empty_group_continues(make_store, servers, calls):
    store = make_store(history=10)
    results: List[Tuple[str, bool]] = []
    server = servers(join_app(store, results))
    first = ws(server.port, "/room")
    wait_until(lambda: results)
    (position,) = [args[1] for name, args in calls if name == "_position"]
    assert store.history("room", since=position) == []  # the start of this epoch
    first.close()
    store.broadcast("room", "one")
    store.broadcast("room", "two")
    assert [m for _, m in store.history("room", since=position)] == ["one", "two"]
    again = ws(server.port, "/room?gc_last=" + quote(position))
    assert [again.recv(), again.recv()] == ["one", "two"]
    wait_until(lambda: len(results) == 2)
    assert results[1] == ("room", True)
    again.close()


def test_several_groups_one_composite_since(make_store, servers):
    store = make_store(history=10)
    results: List[Tuple[str, bool]] = []
    server = servers(join_app(store, results))
    for group in ("a", "b"):
        store.broadcast(group, f"{group}1")
        store.broadcast(group, f"{group}2")
    since = f"{ids_of(store, 'a')['a1']} {ids_of(store, 'b')['b1']}"
    client = ws(server.port, "/a,b,c?gc_last=" + quote(since))
    assert sorted([client.recv(), client.recv()]) == ["a2", "b2"]
    wait_until(lambda: len(results) == 3)
    # c: the client has positions, none for c: continuity unknown, not assumed.
    assert results == [("a", True), ("b", True), ("c", False)]
    client.close()


def test_already_a_member_keeps_its_place(make_store, servers):
    store = make_store(history=10)
    channels: gevent.queue.Queue = gevent.queue.Queue()

    @with_channel
    def app(channel):
        store.add_to_group("room", channel)
        channels.put(channel)

    server = servers(app)
    client = ws(server.port, "/")
    channel = channels.get(timeout=TIMEOUT)
    store.broadcast("room", "one")
    assert client.recv() == "one"
    old = ids_of(store, "room")["one"].rsplit(":", 1)[0] + ":0"
    assert store.add_to_group("room", channel, attachment="new", since=old) is True
    assert store.members("room") == {channel: "new"}
    store.broadcast("room", "two")
    assert client.recv() == "two"  # no replay of "one"
    client.close()


def test_broadcast_during_an_outage_raises(redis_server, servers):  # noqa: F811
    store = RedisChannelStore(redis_server.url, history=10, reconnect_min=0.05, reconnect_max=0.2)
    results: List[Tuple[str, bool]] = []
    try:
        server = servers(join_app(store, results))
        store.broadcast("room", "x")
        (x, _), = store.history("room")
        redis_server.kill()
        with pytest.raises(redis.exceptions.ConnectionError):
            store.broadcast("room", "lost")
        with pytest.raises(redis.exceptions.ConnectionError):
            store.history("room")
        client = ws(server.port, "/room?gc_last=" + quote(x))
        wait_until(lambda: results)
        assert results == [("room", False)]  # continuity cannot be checked: not assumed
        client.close()
    finally:
        store.close()


def test_lost_subscriber_connection_is_caught_up_from_history(redis_server, servers, caplog):  # noqa: F811
    store = RedisChannelStore(redis_server.url, history=1000, reconnect_min=0.2, reconnect_max=0.5)
    other = RedisChannelStore(redis_server.url, history=1000)  # another process's store
    results: List[Tuple[str, bool]] = []
    try:
        server = servers(join_app(store, results))
        client = ws(server.port, "/room")
        wait_until(lambda: results)
        other.broadcast("room", "0")
        assert client.recv() == "0"
        r = redis_server.client()
        r.client_kill_filter(_type="pubsub")  # as Redis does to a subscriber over its buffer limit
        wait_until(lambda: not store._up)
        for i in range(1, 50):  # published while this process is not subscribed
            other.broadcast("room", str(i))
        got = [client.recv() for _ in range(49)]
        assert got == [str(i) for i in range(1, 50)]  # all, once, in order
        other.broadcast("room", "50")
        assert client.recv() == "50"
        assert any("replayed to its members" in rec.getMessage() for rec in caplog.records)
        client.close()
    finally:
        store.close()
        other.close()


def test_a_message_the_subscription_missed_comes_from_the_history(redis_server, servers):  # noqa: F811
    """A pub/sub message lost with the connection still up (a cluster's shard changing
    hands) shows as a gap in the numbers: the members get it from the history first."""
    store = RedisChannelStore(redis_server.url, history=100)
    results: List[Tuple[str, bool]] = []
    try:
        server = servers(join_app(store, results))
        client = ws(server.port, "/room")
        wait_until(lambda: results)
        store.broadcast("room", "0")
        assert client.recv() == "0"
        stream, meta = store._history_keys("room")
        size, ttl, retention = store._publish_args
        for lost in ("1", "2"):  # numbered and kept, published where nobody listens
            store._eval(history_module.PUBLISH_LUA, (stream, meta, b"nowhere", encode(lost), size, ttl,
                                                     history_module.new_epoch(), retention, "PUBLISH"))
        store.broadcast("room", "3")
        assert [client.recv() for _ in range(3)] == ["1", "2", "3"]  # once each, in order
        store.broadcast("room", "4")
        assert client.recv() == "4"
        client.close()
    finally:
        store.close()


def test_lost_subscriber_past_the_history_is_told_and_gets_what_is_kept(redis_server, servers, caplog, calls):  # noqa: F811
    store = RedisChannelStore(redis_server.url, history=10, reconnect_min=0.3, reconnect_max=0.5)
    other = RedisChannelStore(redis_server.url, history=10)
    results: List[Tuple[str, bool]] = []
    try:
        server = servers(join_app(store, results))
        client = ws(server.port, "/room")
        wait_until(lambda: results)
        redis_server.client().client_kill_filter(_type="pubsub")
        wait_until(lambda: not store._up)
        for i in range(400):  # far past what is kept (Redis trims whole nodes of 100)
            other.broadcast("room", str(i))
        kept = [int(m) for _, m in other.history("room")]
        assert kept == list(range(390, 400))
        first = int(client.recv())
        assert 0 < first <= 390  # the oldest still kept, not what was trimmed
        rest = [int(client.recv()) for _ in range(399 - first)]
        assert [first] + rest == list(range(first, 400))  # what is kept, in order, once
        wait_until(lambda: ("_resumed", ("room", False)) in calls)  # and told it did not resume
        wait_until(lambda: any("could not be given everything" in rec.getMessage() for rec in caplog.records))
        other.broadcast("room", "live")
        assert client.recv() == "live"
        client.close()
    finally:
        store.close()
        other.close()


def test_render_applies_to_replay_and_live(make_store, servers):
    store = make_store(history=10, render=lambda channel, attachment, data: f"{attachment}:{data}")
    ready: List[bool] = []

    @with_channel
    def app(channel):
        ready.append(store.add_to_group("room", channel, attachment="ann", since=channel.last_event_id))

    server = servers(app)
    store.broadcast("room", "a")
    store.broadcast("room", "b")
    client = ws(server.port, "/?gc_last=" + quote(ids_of(store, "room")["a"]))
    assert client.recv() == "ann:b"
    wait_until(lambda: ready)
    store.broadcast("room", "c")
    assert client.recv() == "ann:c"
    assert [m for _, m in store.history("room")] == ["a", "b", "c"]  # kept as broadcast
    client.close()


# -- exactly once, racing -------------------------------------------------------------


def ws_resume_loop(port: int, store: Any, start: str, count: int, seed: int, hosts: List[int] = None) -> List[int]:
    """A plain WebSocket client that reads a few messages, drops, resumes; what it got."""
    rng = random.Random(seed)
    received: List[int] = []
    since = start
    ports = hosts or [port]
    for attempt in range(count):  # bounded: each round reads at least one message
        client = ws(ports[attempt % len(ports)], "/room?gc_last=" + quote(since))
        for _ in range(rng.randint(1, 80)):
            received.append(int(client.recv()))
            if received[-1] == count - 1:
                break
        client.close()
        if received[-1] == count - 1:
            return received
        since = ids_of(store, "room")[str(received[-1])]
    return received


def longpoll_resume_loop(ports: List[int], start: str, count: int) -> List[int]:
    """A plain long-poll client: one message per response, its id in Greenchan-Event-Id.

    It reads the first ``count`` messages (one request each, so fewer than the others).
    """
    received: List[int] = []
    since = start
    for attempt in range(count):  # bounded: one message per request
        port = ports[attempt % len(ports)]
        response = requests.get(f"http://127.0.0.1:{port}/room", params={"gc_last": since}, timeout=TIMEOUT)
        assert response.status_code == 200, response.status_code
        received.append(int(response.text))
        since = response.headers["Greenchan-Event-Id"]
        if received[-1] == count - 1:
            break
    return received


def sse_resume_loop(ports: List[int], start: str, count: int, seed: int) -> List[int]:
    """A plain EventSource-like client: reads some events, drops, reconnects with Last-Event-ID."""
    rng = random.Random(seed)
    received: List[int] = []
    last = start
    for attempt in range(count):  # bounded
        port = ports[attempt % len(ports)]
        headers = {"Accept": "text/event-stream", "Last-Event-ID": last}
        with requests.get(f"http://127.0.0.1:{port}/room", headers=headers, stream=True, timeout=TIMEOUT) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            want, data, event_id = rng.randint(1, 80), None, last
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif line == "" and data is not None:
                    received.append(int(data))
                    last, data = event_id, None
                    want -= 1
                    if not want or received[-1] == count - 1:
                        break
        if received and received[-1] == count - 1:
            break
    return received


def test_exactly_once_racing_broadcasts_from_another_greenlet(make_store, servers):
    count = 1500
    store = make_store(history=count + 10)
    results: List[Tuple[str, bool]] = []
    server = servers(join_app(store, results))
    store.broadcast("room", "-1")
    start = ids_of(store, "room")["-1"]

    def publish() -> None:
        for i in range(count):
            store.broadcast("room", str(i))
            if i % 5 == 0:
                gevent.sleep(0.001)  # let the clients join in between

    publisher = gevent.spawn(publish)
    clients = [
        gevent.spawn(ws_resume_loop, server.port, store, start, count, seed) for seed in (1, 2)
    ]
    polling = gevent.spawn(longpoll_resume_loop, [server.port], start, POLLED)
    with gevent.Timeout(120, AssertionError("the clients did not finish")):
        publisher.get()
        got = [c.get() for c in clients]
        polled = polling.get()
    for received in got:
        assert received == list(range(count))  # nothing lost, nothing doubled, in order
    assert polled == list(range(POLLED))
    assert len(results) > 100 and all(ok for _, ok in results)
    # Nothing left behind once every client is gone.
    wait_until(lambda: not store._groups)
    if isinstance(store, RedisChannelStore):
        assert store._cursors == {} and store._live == {}


PUBLISHER = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()
    import sys, time
    from greenchan import RedisChannelStore

    url, count = sys.argv[1], int(sys.argv[2])
    store = RedisChannelStore(url, history=count + 10)
    store.broadcast("room", "-1")
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):
        store.broadcast("room", str(i))
        if i % 20 == 0:
            time.sleep(0.002)
    store.close()
    print("done", flush=True)
    """
)

SERVER = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()
    import sys
    from greenchan import RedisChannelStore, Server, with_channel

    store = RedisChannelStore(sys.argv[1], history=int(sys.argv[2]) + 10)

    @with_channel
    def app(channel):
        if not store.add_to_group("room", channel, since=channel.last_event_id):
            channel.close(4000, "continuity lost")

    server = Server(app, port=0, ping_interval=None).start()
    print(server.port, flush=True)
    server.serve_forever()
    """
)


@pytest.fixture
def scripts(tmp_path) -> Iterator[Callable[..., subprocess.Popen]]:
    procs: List[subprocess.Popen] = []

    def run(source: str, *args: Any) -> subprocess.Popen:
        path = tmp_path / f"script{len(procs)}.py"
        path.write_text(source)
        proc = subprocess.Popen([sys.executable, str(path), *map(str, args)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=TIMEOUT)


def _line(proc: subprocess.Popen) -> str:
    with gevent.Timeout(TIMEOUT * 3, AssertionError("the subprocess said nothing")):
        return proc.stdout.readline().strip()


def test_exactly_once_across_processes(redis_server, scripts):  # noqa: F811
    """Two server processes, a publisher process, clients resuming on the other server each time."""
    count = 2000
    servers_ = [scripts(SERVER, redis_server.url, count) for _ in range(2)]
    ports = [int(_line(proc)) for proc in servers_]
    publisher = scripts(PUBLISHER, redis_server.url, count)
    assert _line(publisher) == "ready"
    reader = RedisChannelStore(redis_server.url, history=count + 10)  # to map messages to ids
    try:
        start = ids_of(reader, "room")["-1"]
        publisher.stdin.write("go\n")
        publisher.stdin.flush()
        clients = [
            gevent.spawn(ws_resume_loop, ports[0], reader, start, count, 3, ports),
            gevent.spawn(sse_resume_loop, ports, start, count, 4),
        ]
        polling = gevent.spawn(longpoll_resume_loop, ports, start, POLLED)
        with gevent.Timeout(180, AssertionError("the clients did not finish")):
            got = [c.get() for c in clients]
            polled = polling.get()
        assert _line(publisher) == "done"
    finally:
        reader.close()
    for received in got:
        assert received == list(range(count))  # nothing lost, nothing doubled, in order, across processes
    assert polled == list(range(POLLED))
