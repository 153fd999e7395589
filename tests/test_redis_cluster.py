"""RedisChannelStore on a real Redis Cluster: sharded pub/sub, history, failover, resharding.

Two greenchan processes share a local cluster (tests/redis_cluster.py) started
from redis-server; groups are chosen to land on the masters the test wants.
Run with ``.venv/bin/python -m pytest -m cluster``.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from typing import Any, Callable, Dict, List

import gevent
import pytest
import requests
import websocket

from greenchan import RedisChannelStore, with_channel

from redis_cluster import group_on, key_slot, redis_cluster, redis_cluster_replicas  # noqa: F401  (fixtures)

pytestmark = pytest.mark.cluster

TIMEOUT = 20  # seconds, for any single wait (a failover takes a few)

APP = textwrap.dedent(
    '''
    from gevent import monkey
    monkey.patch_all()
    import json, os, sys
    from greenchan import RedisChannelStore, Server, with_channel

    store = RedisChannelStore(sys.argv[1], prefix="t:", history=1000, reconnect_max=0.5)

    @with_channel
    def app(channel):
        path = channel.environ["PATH_INFO"]
        if path.startswith("/join/"):
            for group in path[len("/join/"):].split(","):
                store.add_to_group(group, channel)
            channel.send("joined")
        elif path.startswith("/broadcast/"):
            body = channel.receive(timeout=5)
            try:
                channel.send(str(store.broadcast(path[len("/broadcast/"):], body)))
            except Exception as exc:
                channel.send({"status": 503, "body": f"{type(exc).__name__}: {exc}"})
        elif path == "/state":
            channel.send(json.dumps({
                "pid": os.getpid(),
                "up": store._up,
                "links": {f"{k[0]}:{k[1]}" if k else "home": sorted(x.decode() for x in v.subscribed)
                          for k, v in store._links.items()},
            }))

    server = Server(app, port=0, ping_interval=None).start()
    print(server.port, flush=True)
    server.serve_forever()
    '''
)


@pytest.fixture
def processes(tmp_path):
    """``start(url)`` runs the app above in a process of its own; its port."""
    script = tmp_path / "cluster_app.py"
    script.write_text(APP)
    procs: List[subprocess.Popen] = []

    def start(url: str) -> int:
        proc = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        with gevent.Timeout(TIMEOUT, AssertionError("the app process did not start")):
            line = proc.stdout.readline()
        assert line.strip().isdigit(), f"app process said {line!r}"
        return int(line)

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=TIMEOUT)


def wait_until(predicate: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    with gevent.Timeout(timeout, AssertionError(f"not true within {timeout} s: {predicate}")):
        while True:
            value = predicate()
            if value:
                return value
            gevent.sleep(0.02)


def ws(port: int, path: str) -> websocket.WebSocket:
    client = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=TIMEOUT)
    assert client.recv() == "joined"
    return client


def post(port: int, group: str, data: str) -> requests.Response:
    return requests.post(f"http://127.0.0.1:{port}/broadcast/{group}", data=data.encode(),
                         headers={"Content-Type": "text/plain"}, timeout=TIMEOUT)


def state(port: int) -> Dict[str, Any]:
    return requests.get(f"http://127.0.0.1:{port}/state", timeout=TIMEOUT).json()


def shard_subscribers(cluster: Any, port: int) -> Dict[str, int]:
    """greenchan's connections on the master at ``port`` holding shard subscriptions, by name."""
    found: Dict[str, int] = {}
    for client in cluster.node_client(port).client_list():
        if client["name"].startswith("greenchan-sub-") and int(client.get("ssub", 0)):
            found[client["name"]] = found.get(client["name"], 0) + 1
    return found


# -- sharded pub/sub ---------------------------------------------------------------


def test_two_processes_one_shard_connection_per_master(redis_cluster, processes):
    cluster = redis_cluster
    masters = cluster.masters()
    groups = [group_on(cluster, port) for port in masters]
    a, b = processes(cluster.url), processes(cluster.url)
    joined = ",".join(groups)
    clients = [ws(a, f"/join/{joined}"), ws(b, f"/join/{joined}")]

    for group in groups:  # published from B, heard in both processes
        response = post(b, group, f"hello {group}")
        assert (response.status_code, response.text) == (200, "2")
    for client in clients:
        assert sorted(client.recv() for _ in groups) == sorted(f"hello {g}" for g in groups)

    names = {f"greenchan-sub-{state(port)['pid']}" for port in (a, b)}
    for port, group in zip(masters, groups):
        node = cluster.node_client(port)
        # Only the owner has the group's shard channel, with one subscriber per process.
        assert node.execute_command("PUBSUB", "SHARDCHANNELS", "t:*") == [f"t:{{{group}}}".encode()]
        assert node.execute_command("PUBSUB", "SHARDNUMSUB", f"t:{{{group}}}") == [f"t:{{{group}}}".encode(), 2]
        # One shard connection per process per master, not per group or client.
        assert shard_subscribers(cluster, port) == dict.fromkeys(names, 1)

    # A second group on the first master rides the same connection.
    extra = group_on(cluster, masters[0], prefix="extra")
    more = ws(a, f"/join/{extra}")
    assert post(b, extra, "again").text == "1"
    assert more.recv() == "again"
    assert shard_subscribers(cluster, masters[0]) == dict.fromkeys(names, 1)

    for client in (*clients, more):
        client.close()
    for port in masters:  # the last member gone, the shard subscriptions go too
        wait_until(lambda: cluster.node_client(port).execute_command("PUBSUB", "SHARDCHANNELS") == [])
    wait_until(lambda: all(not shard_subscribers(cluster, port) for port in masters))


def test_history_and_resume_on_a_cluster(redis_cluster, serve):
    cluster = redis_cluster
    store = RedisChannelStore(cluster.url, history=10)
    try:
        groups = [group_on(cluster, port) for port in cluster.masters()]

        @with_channel
        def app(channel):
            since = channel.environ.get("QUERY_STRING") or None
            group = channel.environ["PATH_INFO"].strip("/")
            channel.send("resumed" if store.add_to_group(group, channel, since=since) else "live")

        server = serve(app, ping_interval=None)
        for group in groups:
            for n in range(5):
                store.broadcast(group, f"{group}/{n}")
            kept = store.history(group)
            assert [m for _, m in kept] == [f"{group}/{n}" for n in range(5)]
            client = websocket.create_connection(f"ws://127.0.0.1:{server.port}/{group}?{kept[1][0]}", timeout=TIMEOUT)
            assert [client.recv() for _ in range(4)] == [f"{group}/2", f"{group}/3", f"{group}/4", "resumed"]
            store.broadcast(group, f"{group}/live")
            assert client.recv() == f"{group}/live"
            client.close()
    finally:
        store.close()


def test_bad_names_for_a_cluster(redis_cluster):
    with pytest.raises(ValueError, match="brace"):
        RedisChannelStore(redis_cluster.url, prefix="app{1}:")
    store = RedisChannelStore(redis_cluster.client())  # a RedisCluster object works too
    try:
        with pytest.raises(ValueError, match="start with"):
            store.broadcast("}room", "x")
        assert store.broadcast("room", "x") == 0
    finally:
        store.close()


# -- failover and resharding ----------------------------------------------------------


class Stream:
    """Numbered broadcasts to ``group`` through ``port``, one every ``pace`` s, until stopped.

    ``accepted`` are the numbers a broadcast returned for; a refused one (503:
    the shard is failing over) is tried again with the next number.
    """

    def __init__(self, port: int, group: str, pace: float = 0.01) -> None:
        self.accepted: List[int] = []
        self.refused = 0
        self._port, self._group, self._pace = port, group, pace
        self._stop = False
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        for n in range(100_000):  # bounded: stopped long before
            if self._stop:
                return
            try:
                ok = post(self._port, self._group, f"{self._group}/{n}").status_code == 200
            except requests.RequestException:
                ok = False
            if ok:
                self.accepted.append(n)
            else:
                self.refused += 1
            gevent.sleep(self._pace)

    def stop(self) -> List[int]:
        self._stop = True
        self._greenlet.join(TIMEOUT)
        return self.accepted


def check_everything_once(clients: List[websocket.WebSocket], streams: Dict[str, List[int]]) -> None:
    """Each client got every accepted number of every group, once, in order per group."""
    for client in clients:
        want = {group: list(numbers) for group, numbers in streams.items()}
        got: Dict[str, List[int]] = {group: [] for group in streams}
        with gevent.Timeout(TIMEOUT, AssertionError(f"missing messages: got {got}, want {want}")):
            while any(got[g][-1:] != want[g][-1:] for g in streams):
                group, _, n = client.recv().partition("/")
                got[group].append(int(n))
        for group in streams:
            numbers = got[group]
            missing = sorted(set(want[group]) - set(numbers))
            twice = sorted(n for n in set(numbers) if numbers.count(n) > 1)
            assert numbers == want[group], f"{group}: missing {missing}, twice {twice}, extra {sorted(set(numbers) - set(want[group]))}"


def stream_through(cluster: Any, processes: Any, disrupt: Callable[[int, str], None]) -> int:
    """Two processes, a group on a master that ``disrupt(master, group)`` upsets and one on another.

    Broadcasts flow all along; every client must end with every accepted
    broadcast of both groups, each once, in order. Returns how many
    broadcasts were refused meanwhile (the failover's cost to publishers).
    """
    a, b = processes(cluster.url), processes(cluster.url)
    master, elsewhere = cluster.masters()[:2]
    group, calm = group_on(cluster, master), group_on(cluster, elsewhere, prefix="calm")
    clients = [ws(port, f"/join/{group},{calm}") for port in (a, b)]
    streams = {group: Stream(b, group), calm: Stream(a, calm)}
    wait_until(lambda: all(len(s.accepted) >= 10 for s in streams.values()))
    disrupt(master, group)
    owner = "127.0.0.1:%d" % cluster.master_of(key_slot("t:{%s}" % group))
    assert owner != "127.0.0.1:%d" % master
    for port in (a, b):  # each process follows the group to its new master
        wait_until(lambda: "t:{%s}" % group in state(port)["links"].get(owner, ()))
    counts = {g: len(s.accepted) for g, s in streams.items()}
    wait_until(lambda: all(len(s.accepted) >= counts[g] + 20 for g, s in streams.items()))
    check_everything_once(clients, {g: s.stop() for g, s in streams.items()})
    for client in clients:
        client.close()
    return streams[group].refused


def test_a_master_killed_mid_stream(redis_cluster_replicas, processes):
    cluster = redis_cluster_replicas

    def kill(master: int, group: str) -> None:
        cluster.kill(master)
        cluster.failover(master)  # a replica is promoted

    assert stream_through(cluster, processes, kill) > 0  # refused while no master had the slot


def test_a_manual_failover_mid_stream(redis_cluster_replicas, processes):
    cluster = redis_cluster_replicas
    stream_through(cluster, processes, lambda master, group: cluster.manual_failover(cluster.replicas_of(master)[0]))


def test_a_slot_moved_mid_stream(redis_cluster, processes):
    cluster = redis_cluster

    def move(master: int, group: str) -> None:
        to = next(port for port in cluster.masters() if port != master)
        cluster.migrate_slot(key_slot("t:{%s}" % group), to)

    stream_through(cluster, processes, move)


# -- sessions across processes ------------------------------------------------------


def test_sessions_across_processes_on_a_cluster(redis_cluster, tmp_path):
    from test_forwarding import one_session_on_two_processes, start_two

    processes = start_two(tmp_path, redis_cluster.url)
    (a, b), _ = next(processes)
    try:
        one_session_on_two_processes(a, b, redis_cluster.client())
    finally:
        next(processes, None)  # stops them
