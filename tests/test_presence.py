"""Presence (API.md, "Presence"): who is in a group, in one process and across processes.

Real servers, real WebSocket clients, real redis-server processes; every wait bounded,
no timing thresholds in assertions.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from typing import Any, Callable, List, Tuple

import gevent
import gevent.pool
import pytest
import requests
import websocket

from greenchan import MemoryChannelStore, RedisChannelStore, Server, with_channel

from redis_server import RedisServer, redis_server  # noqa: F401  (a fixture)

TIMEOUT = 10


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    with gevent.Timeout(timeout, AssertionError(f"not true within {timeout} s: {predicate}")):
        while True:
            value = predicate()
            if value:
                return value
            gevent.sleep(0.02)


def ws(port: int, path: str) -> websocket.WebSocket:
    return websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=TIMEOUT)


@pytest.fixture
def made():
    """Servers and stores made by a test, stopped afterwards."""
    things: List[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Server):
            thing.stop(timeout=1)
        elif isinstance(thing, RedisChannelStore):
            thing.close()


def presence_app(store: Any) -> Any:
    """``/<group>?key`` or ``/<group>?key&<meta JSON>``: join with presence, then echo."""

    @with_channel
    def app(channel):
        group = channel.environ["PATH_INFO"].strip("/")
        key, _, meta = channel.environ["QUERY_STRING"].partition("&")
        presence = (key, json.loads(requests.utils.unquote(meta))) if meta else key
        store.add_to_group(group, channel, presence=presence)

        @channel.on_receive
        def leave(message):
            if message == "leave":
                store.remove_from_group(group, channel)
                channel.send("left")

        channel.send("joined")

    return app


def make_store(kind: str, made: List[Any], url: str = "", **kwargs: Any) -> Any:
    kwargs.setdefault("presence_ttl", 2)
    store = MemoryChannelStore() if kind == "memory" else RedisChannelStore(url, **kwargs)
    made.append(store)
    return store


def record(store: Any) -> List[Tuple[str, str, Any, bool]]:
    events: List[Tuple[str, str, Any, bool]] = []
    store.on_presence(lambda group, key, meta, joined: events.append((group, key, meta, joined)))
    return events


# -- both stores ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis", "redis-history"])
def test_tabs_metas_and_events_once(kind, request, made):
    url = request.getfixturevalue("redis_server").url if kind != "memory" else ""
    if kind == "redis-history":
        store = make_store("redis", made, url, history=10)
    else:
        store = make_store(kind, made, url)
    events = record(store)
    server = Server(presence_app(store), port=0, ping_interval=None).start()
    made.append(server)

    tabs = [ws(server.port, f"/room?ann&%7B%22tab%22%3A{i}%7D") for i in range(3)]
    assert [t.recv() for t in tabs] == ["joined"] * 3
    bob = ws(server.port, "/room?bob")
    assert bob.recv() == "joined"
    wait_until(lambda: len(events) == 2)
    present = store.presence("room")
    assert sorted(m["tab"] for m in present["ann"]) == [0, 1, 2]
    assert present["bob"] == [None]
    assert events == [("room", "ann", {"tab": 0}, True), ("room", "bob", None, True)]

    tabs[0].close()  # a closed tab leaves at once, no event: ann is still here
    tabs[1].send("leave")  # leaving the group, the same
    assert tabs[1].recv() == "left"
    wait_until(lambda: len(store.presence("room").get("ann", [])) == 1)
    assert store.presence("room")["ann"] == [{"tab": 2}]
    tabs[2].close()  # the last tab: one leave
    bob.close()
    wait_until(lambda: store.presence("room") == {})
    wait_until(lambda: len(events) == 4)
    gevent.sleep(0.2)  # room for a wrong extra event to show up
    assert sorted(events[2:]) == [("room", "ann", {"tab": 2}, False), ("room", "bob", None, False)]
    tabs[1].close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_presence_is_checked(kind, request, made):
    url = request.getfixturevalue("redis_server").url if kind == "redis" else ""
    store = make_store(kind, made, url)
    not_a_channel = object()  # checked before the channel is looked at
    for bad, error in [(5, TypeError), ((5, None), TypeError), (("", None), ValueError),
                       (("ann", {1, 2}), ValueError), (("ann", object()), ValueError), ((1, 2, 3), TypeError)]:
        with pytest.raises(error, match="presence"):
            store.add_to_group("room", not_a_channel, presence=bad)
    with pytest.raises(TypeError):
        store.on_presence("not a function")


# -- RedisChannelStore across processes -----------------------------------------------

APP = textwrap.dedent(
    '''
    from gevent import monkey
    monkey.patch_all()
    import json, sys
    from greenchan import RedisChannelStore, Server, with_channel

    store = RedisChannelStore(sys.argv[1], presence_ttl=float(sys.argv[2]), prefix="t:")
    events = []
    store.on_presence(lambda group, key, meta, joined: events.append([group, key, meta, joined]))

    @with_channel
    def app(channel):
        path = channel.environ["PATH_INFO"]
        if path.startswith("/join/"):
            store.add_to_group(path[len("/join/"):], channel, presence=channel.environ["QUERY_STRING"])
            channel.send("joined")
        elif path.startswith("/presence/"):
            try:
                channel.send(json.dumps(store.presence(path[len("/presence/"):])))
            except Exception as exc:
                channel.send({"status": 503, "body": f"{type(exc).__name__}: {exc}"})
        elif path == "/events":
            channel.send(json.dumps(events))

    server = Server(app, port=0, ping_interval=None).start()
    print(server.port, flush=True)
    import gevent.event, signal
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    stop.wait()
    server.stop(timeout=1)
    store.close()
    '''
)


@pytest.fixture
def processes(tmp_path):
    script = tmp_path / "presence_app.py"
    script.write_text(APP)
    procs: List[subprocess.Popen] = []

    def start(url: str, ttl: float) -> Tuple[subprocess.Popen, int]:
        proc = subprocess.Popen([sys.executable, str(script), url, str(ttl)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        with gevent.Timeout(TIMEOUT * 2, AssertionError("the app process did not start")):
            line = proc.stdout.readline()
        assert line.strip().isdigit(), f"app process said {line!r}"
        return proc, int(line)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=TIMEOUT)


def _get(port: int, path: str) -> Any:
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT).json()


def test_two_processes_and_a_sigkill(redis_server, processes):
    proc_a, port_a = processes(redis_server.url, 1)
    proc_b, port_b = processes(redis_server.url, 1)
    r = redis_server.client()

    ann_a = ws(port_a, "/join/room?ann")
    ann_b = ws(port_b, "/join/room?ann")  # a second tab, in the other process
    cid_a = ws(port_a, "/join/room?cid")
    dan_b = ws(port_b, "/join/room?dan")
    assert [c.recv() for c in (ann_a, ann_b, cid_a, dan_b)] == ["joined"] * 4
    for port in (port_a, port_b):  # every process sees every process's members
        assert wait_until(lambda p=port: _get(p, "/presence/room") == {"ann": [None, None], "cid": [None], "dan": [None]})
        assert wait_until(lambda p=port: len(_get(p, "/events")) == 3)
        assert sorted(k for _, k, _, j in _get(port, "/events")) == ["ann", "cid", "dan"]

    proc_a.kill()  # SIGKILL with ann (one of two tabs) and cid attached
    proc_a.wait(timeout=TIMEOUT)
    wait_until(lambda: _get(port_b, "/presence/room") == {"ann": [None], "dan": [None]})
    wait_until(lambda: len(_get(port_b, "/events")) == 4)
    gevent.sleep(1.5)  # more refreshes: a wrong second leave would show up
    events = _get(port_b, "/events")
    assert events[3:] == [["room", "cid", None, False]]  # ann still has a tab: no event

    ann_b.close()
    dan_b.close()
    wait_until(lambda: _get(port_b, "/presence/room") == {})
    wait_until(lambda: len(_get(port_b, "/events")) == 6)
    wait_until(lambda: not r.keys("t:*"))  # nothing left, the dead process's heartbeat included
    for c in (ann_a, cid_a):
        c.close()


def test_redis_restart_presence_whole_again(redis_server, made):
    store = make_store("redis", made, redis_server.url, reconnect_max=0.5)
    events = record(store)
    server = Server(presence_app(store), port=0, ping_interval=None).start()
    made.append(server)
    clients = [ws(server.port, f"/room?u{i}") for i in range(3)] + [ws(server.port, "/other?u0")]
    assert [c.recv() for c in clients] == ["joined"] * 4
    wait_until(lambda: len(events) == 4)
    whole = {"u0": [None], "u1": [None], "u2": [None]}
    assert store.presence("room") == whole

    redis_server.kill()
    with pytest.raises(Exception) as info:  # as broadcast does
        store.presence("room")
    assert "ConnectionError" in type(info.value).__name__
    redis_server.start()
    wait_until(lambda: _presence_or_none(store, "room") == whole)
    # Each group is registered again on its own (on a cluster, on its own shard).
    wait_until(lambda: _presence_or_none(store, "other") == {"u0": [None]})
    gevent.sleep(1.5)  # refreshes and the reconciliation: no join reported twice
    assert len(events) == 4
    for c in clients:
        c.close()
    wait_until(lambda: not redis_server.client().keys("greenchan:*presence*"))


def test_a_leave_missed_by_the_subscriber_is_reported_once(redis_server, made):
    """Pub/sub keeps nothing: a leave published while a process's subscriber was
    away is reported by its reconciliation after reconnecting, once."""
    watcher = make_store("redis", made, redis_server.url, reconnect_min=1, reconnect_max=1)
    host = make_store("redis", made, redis_server.url)  # another "process": its own id
    events = record(watcher)
    server = Server(presence_app(host), port=0, ping_interval=None).start()
    made.append(server)
    ann = ws(server.port, "/room?ann")
    assert ann.recv() == "joined"
    wait_until(lambda: events == [("room", "ann", None, True)])

    addr = "%s:%s" % watcher._links[None].conn._sock.getsockname()[:2]
    redis_server.client().client_kill(addr)  # the watcher is deaf for a second
    ann.close()
    wait_until(lambda: host.presence("room") == {})
    wait_until(lambda: len(events) == 2)
    assert events[1] == ("room", "ann", None, False)
    gevent.sleep(1.5)  # room for a wrong second report
    assert len(events) == 2


def _presence_or_none(store: Any, group: str) -> Any:
    try:
        return store.presence(group)
    except Exception:
        return None


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_thousand_channels_leave_nothing(kind, request, made):
    server_redis = request.getfixturevalue("redis_server") if kind == "redis" else None
    store = make_store(kind, made, server_redis.url if server_redis else "")
    events = record(store)
    server = Server(presence_app(store), port=0, ping_interval=None).start()
    made.append(server)
    pool = gevent.pool.Pool(100)
    clients = pool.map(lambda i: ws(server.port, f"/room?u{i % 250}"), range(1000))
    assert pool.map(lambda c: c.recv(), clients) == ["joined"] * 1000
    present = store.presence("room")
    assert len(present) == 250 and all(len(metas) == 4 for metas in present.values())
    wait_until(lambda: len(events) == 250)

    pool.map(lambda c: c.close(), clients)
    wait_until(lambda: store.presence("room") == {})
    wait_until(lambda: len(events) == 500)
    assert sorted(k for _, k, _, joined in events if not joined) == sorted(f"u{i}" for i in range(250))
    assert not store._present
    if server_redis is not None:
        r = server_redis.client()
        wait_until(lambda: not [k for k in r.keys("*") if b"presence" in k])
        assert not store._fields


# -- a process deemed dead, and the reapers (presence.py, "A process that was paused") --


def test_a_paused_process_is_reaped_and_comes_back(redis_server, processes):
    """SIGSTOP past the TTL: the other process reaps it (one leave); SIGCONT: it finds
    its heartbeat gone and registers again under a new id (one join), in both processes."""
    proc_a, port_a = processes(redis_server.url, 1)
    _, port_b = processes(redis_server.url, 1)
    ann = ws(port_a, "/join/room?ann")
    bob = ws(port_b, "/join/room?bob")
    assert [ann.recv(), bob.recv()] == ["joined"] * 2
    both = {"ann": [None], "bob": [None]}
    for port in (port_a, port_b):
        wait_until(lambda p=port: _get(p, "/presence/room") == both and len(_get(p, "/events")) == 2)

    proc_a.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: _get(port_b, "/presence/room") == {"bob": [None]})
        wait_until(lambda: len(_get(port_b, "/events")) == 3)
    finally:
        proc_a.send_signal(signal.SIGCONT)
    wait_until(lambda: _get(port_b, "/presence/room") == both)
    for port in (port_a, port_b):  # a heard its own leave on resuming, then its join
        wait_until(lambda p=port: len(_get(p, "/events")) == 4)
        assert _get(port, "/events")[2:] == [["room", "ann", None, False], ["room", "ann", None, True]]
    assert _get(port_a, "/presence/room") == both

    ann.close()  # the channel lived through it all: its leave, once
    wait_until(lambda: _get(port_b, "/presence/room") == {"bob": [None]})
    bob.close()
    wait_until(lambda: _get(port_b, "/presence/room") == {})
    gevent.sleep(1.5)  # more refreshes: a wrong extra event would show up
    for port in (port_a, port_b):
        assert [e[1:] for e in _get(port, "/events")[4:]] == [["ann", None, False], ["bob", None, False]]
    wait_until(lambda: not redis_server.client().keys("t:*"))


def _claim(client: Any, store: Any, dead: str, lease_ms: int) -> List[bytes]:
    """Take ``dead`` out of the heartbeats as a reaper would, and stop there (a reaper
    that is slow, or dies); its entries, as the refresh script hands them over."""
    from greenchan.stores.presence import REFRESH_LUA

    def claimed() -> Any:
        # "My previous refresh was just now", and a TTL long enough that a slow
        # machine between the two calls does not make it look cut off.
        seconds, micros = client.time()
        reply = client.eval(REFRESH_LUA, 2, store._procs_key, store._reapings_key, "a-reaper", 60_000, 0,
                            16, lease_ms, store._entries_prefix, store._reaping_prefix,
                            seconds * 1000 + micros // 1000)
        return dict(zip(reply[3::2], reply[4::2])).get(dead.encode())

    return wait_until(claimed)


@pytest.mark.parametrize("reaper_first", [False, True])
def test_a_reaper_and_the_process_it_reaps_meet_once(redis_server, made, reaper_first):
    """The race of presence.py: a process deemed dead comes back while a reaper is
    on its entries. Whichever runs first in the group, each change is reported once
    and the entry is there in the end, under the process's new id."""
    paused = make_store("redis", made, redis_server.url, presence_ttl=1)
    watcher = make_store("redis", made, redis_server.url, presence_ttl=60)  # its own refreshes: far off
    events = record(watcher)
    server = Server(presence_app(paused), port=0, ping_interval=None).start()
    made.append(server)
    ann = ws(server.port, "/room?ann")
    assert ann.recv() == "joined"
    wait_until(lambda: events == [("room", "ann", None, True)])

    paused._refresher.kill()  # paused: no heartbeat from now on
    old = paused._proc
    entries = _claim(redis_server.client(), paused, old, 60_000)
    if reaper_first:
        watcher._reap(old, entries)
        wait_until(lambda: len(events) == 2)
    paused._refresh()  # it comes back: heartbeat gone, a new id, its entry moved or added
    assert paused._proc != old
    if not reaper_first:
        watcher._reap(old, entries)  # finds nothing of the old id left
    paused._refresher = None
    paused._start_refresher()

    assert watcher.presence("room") == {"ann": [None]}
    fields = redis_server.client().hkeys("greenchan:{room}:presence")
    assert [f.decode().split(":")[0] for f in fields] == [paused._proc]
    expected = [("room", "ann", None, True)]
    if reaper_first:
        expected += [("room", "ann", None, False), ("room", "ann", None, True)]
    wait_until(lambda: len(events) == len(expected))
    ann.close()
    expected.append(("room", "ann", None, False))
    wait_until(lambda: len(events) == len(expected))
    gevent.sleep(0.5)  # room for a wrong extra event
    assert events == expected
    wait_until(lambda: not redis_server.client().keys("greenchan:*presence*"))


def test_a_reaper_that_dies_midway_is_taken_over(redis_server, made):
    """A reaper that took a dead process and died before its leaves: once its lease
    runs out, another process's refresh takes the reaping over; each leave once."""
    dead = make_store("redis", made, redis_server.url, presence_ttl=1)
    reaper = make_store("redis", made, redis_server.url, presence_ttl=1)
    events = record(reaper)
    server = Server(presence_app(dead), port=0, ping_interval=None).start()
    made.append(server)
    clients = [ws(server.port, path) for path in ("/room?ann", "/room?bob", "/hall?ann")]
    assert [c.recv() for c in clients] == ["joined"] * 3
    wait_until(lambda: len(events) == 3)

    dead._refresher.kill()  # it dies (its channels stay open: nobody takes them out but a reaper)
    _claim(redis_server.client(), dead, dead._proc, 500)  # and the first reaper dies too
    wait_until(lambda: reaper.presence("room") == {} and reaper.presence("hall") == {})
    wait_until(lambda: len(events) == 6)
    gevent.sleep(1)  # more refreshes: a second reaper's extra leave would show up
    assert sorted(e for e in events if not e[3]) == [
        ("hall", "ann", None, False), ("room", "ann", None, False), ("room", "bob", None, False)]
    r = redis_server.client()
    wait_until(lambda: not r.keys("greenchan:{presence}:reaping*"))
    for c in clients:
        c.close()
