"""Presence on a Redis Cluster (API.md, "Presence" and "Redis Cluster").

A real local 3-master cluster (tests/redis_cluster.py), groups put on different
shards, greenchan processes started as subprocesses (the app of test_presence.py);
every wait bounded, no timing thresholds in assertions. Run them with

    .venv/bin/python -m pytest tests/test_presence_cluster.py -m cluster
"""
from __future__ import annotations

import signal
from typing import Any, Dict, List

import gevent
import pytest

from greenchan import RedisChannelStore, Server

from redis_cluster import RedisCluster, group_on, redis_cluster, redis_cluster_replicas  # noqa: F401
from test_presence import _claim, _get, presence_app, processes, record, wait_until, ws  # noqa: F401

pytestmark = pytest.mark.cluster


def three_groups(cluster: RedisCluster) -> List[str]:
    """One group on each master, so that every step crosses shards if it can."""
    return [group_on(cluster, port) for port in cluster.masters()]


def keys_by_node(cluster: RedisCluster, pattern: str) -> Dict[int, List[bytes]]:
    return {port: sorted(cluster.node_client(port).keys(pattern)) for port in cluster.masters()}


def no_keys(cluster: RedisCluster, pattern: str) -> bool:
    return not any(keys_by_node(cluster, pattern).values())


@pytest.fixture
def made():
    things: List[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Server):
            thing.stop(timeout=1)
        else:
            thing.close()


def test_two_processes_three_shards_and_a_sigkill(redis_cluster, processes):
    g1, g2, g3 = groups = three_groups(redis_cluster)
    proc_a, port_a = processes(redis_cluster.url, 1)
    _, port_b = processes(redis_cluster.url, 1)

    clients = {
        "ann@a:1": ws(port_a, f"/join/{g1}?ann"),
        "ann@a:2": ws(port_a, f"/join/{g2}?ann"),
        "ann@b:1": ws(port_b, f"/join/{g1}?ann"),  # a second tab, in the other process
        "bob@b:2": ws(port_b, f"/join/{g2}?bob"),
        "bob@b:3": ws(port_b, f"/join/{g3}?bob"),
    }
    assert [c.recv() for c in clients.values()] == ["joined"] * 5
    everyone = {g1: {"ann": [None, None]}, g2: {"ann": [None], "bob": [None]}, g3: {"bob": [None]}}
    for port in (port_a, port_b):  # every process sees every process's members, on every shard
        for group in groups:
            wait_until(lambda p=port, g=group: _get(p, f"/presence/{g}") == everyone[g])
        wait_until(lambda p=port: len(_get(p, "/events")) == 4)
        assert sorted((g, k) for g, k, _, joined in _get(port, "/events") if joined) == sorted(
            [(g1, "ann"), (g2, "ann"), (g2, "bob"), (g3, "bob")])

    # Each group's keys on its own shard; the processes' keys on the {presence} one.
    for group in groups:
        owner = redis_cluster.master_of("{%s}" % group)
        assert f"t:{{{group}}}:presence".encode() in keys_by_node(redis_cluster, "t:*")[owner]
    procs_owner = redis_cluster.master_of("{presence}")
    assert b"t:{presence}:procs" in keys_by_node(redis_cluster, "t:*")[procs_owner]

    proc_a.kill()  # SIGKILL: ann's tab in g1 (another is in b) and ann's only one in g2
    proc_a.wait(timeout=10)
    wait_until(lambda: _get(port_b, f"/presence/{g2}") == {"bob": [None]})
    wait_until(lambda: _get(port_b, f"/presence/{g1}") == {"ann": [None]})
    wait_until(lambda: len(_get(port_b, "/events")) == 5)
    gevent.sleep(1.5)  # more refreshes: a wrong second leave would show up
    assert _get(port_b, "/events")[4:] == [[g2, "ann", None, False]]

    for name in ("ann@b:1", "bob@b:2", "bob@b:3"):
        clients[name].close()
    for group in groups:
        wait_until(lambda g=group: _get(port_b, f"/presence/{g}") == {})
    wait_until(lambda: len(_get(port_b, "/events")) == 8)
    assert sorted((g, k) for g, k, _, joined in _get(port_b, "/events")[5:]) == sorted(
        [(g1, "ann"), (g2, "bob"), (g3, "bob")])
    # Nothing left on any node: entries, counts, heartbeats (the dead one's too), reapings.
    wait_until(lambda: no_keys(redis_cluster, "t:*"))
    for c in clients.values():
        c.close()


def test_a_paused_process_comes_back_on_every_shard(redis_cluster, processes):
    g1, _, g3 = three_groups(redis_cluster)
    proc_a, port_a = processes(redis_cluster.url, 1)
    _, port_b = processes(redis_cluster.url, 1)
    anns = [ws(port_a, f"/join/{g}?ann") for g in (g1, g3)]
    bob = ws(port_b, f"/join/{g1}?bob")
    assert [c.recv() for c in (*anns, bob)] == ["joined"] * 3
    whole = {g1: {"ann": [None], "bob": [None]}, g3: {"ann": [None]}}
    for port in (port_a, port_b):
        wait_until(lambda p=port: len(_get(p, "/events")) == 3)

    proc_a.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: _get(port_b, f"/presence/{g1}") == {"bob": [None]})
        wait_until(lambda: _get(port_b, f"/presence/{g3}") == {})
        wait_until(lambda: len(_get(port_b, "/events")) == 5)
    finally:
        proc_a.send_signal(signal.SIGCONT)
    for group in (g1, g3):
        wait_until(lambda g=group: _get(port_b, f"/presence/{g}") == whole[g])
    for port in (port_a, port_b):  # a leave and a join of ann in each group, each once
        wait_until(lambda p=port: len(_get(p, "/events")) == 7)
        later = _get(port, "/events")[3:]
        for group in (g1, g3):
            assert [joined for g, k, _, joined in later if g == group and k == "ann"] == [False, True]

    for c in (*anns, bob):
        c.close()
    for group in (g1, g3):
        wait_until(lambda g=group: _get(port_b, f"/presence/{g}") == {})
    wait_until(lambda: len(_get(port_b, "/events")) == 10)
    gevent.sleep(1.5)  # room for a wrong extra event
    assert len(_get(port_b, "/events")) == 10
    wait_until(lambda: no_keys(redis_cluster, "t:*"))


@pytest.mark.parametrize("reaper_first", [False, True])
def test_a_reaper_and_the_process_it_reaps_meet_once(redis_cluster, made, reaper_first):
    """presence.py's race on a cluster: the process's slot and the group's are on
    different shards; whichever reaches the group first, each change once."""
    group = next(g for g in three_groups(redis_cluster)
                 if redis_cluster.master_of("{%s}" % g) != redis_cluster.master_of("{presence}"))
    paused = RedisChannelStore(redis_cluster.url, presence_ttl=1)
    made.append(paused)
    watcher = RedisChannelStore(redis_cluster.url, presence_ttl=60)  # its own refreshes: far off
    made.append(watcher)
    events = record(watcher)
    server = Server(presence_app(paused), port=0, ping_interval=None).start()
    made.append(server)
    ann = ws(server.port, f"/{group}?ann")
    assert ann.recv() == "joined"
    wait_until(lambda: events == [(group, "ann", None, True)])

    paused._refresher.kill()
    old = paused._proc
    entries = _claim(redis_cluster.client(), paused, old, 60_000)
    if reaper_first:
        watcher._reap(old, entries)
        wait_until(lambda: len(events) == 2)
    paused._refresh()
    assert paused._proc != old
    if not reaper_first:
        watcher._reap(old, entries)
    paused._refresher = None
    paused._start_refresher()

    assert watcher.presence(group) == {"ann": [None]}
    expected = [(group, "ann", None, True)]
    if reaper_first:
        expected += [(group, "ann", None, False), (group, "ann", None, True)]
    wait_until(lambda: len(events) == len(expected))
    ann.close()
    expected.append((group, "ann", None, False))
    wait_until(lambda: len(events) == len(expected))
    gevent.sleep(0.5)  # room for a wrong extra event
    assert events == expected
    wait_until(lambda: no_keys(redis_cluster, "greenchan:*presence*"))


def _get_or_none(port: int, path: str) -> Any:
    try:
        return _get(port, path)
    except ValueError:  # a 503: the cluster is failing over
        return None


def test_presence_through_a_failover_of_the_processes_shard(redis_cluster_replicas, processes):
    """The master of the {presence} slot (heartbeats, entries, reapings) is killed and
    its replica takes over, for longer than the TTL: nobody is reaped for it, no
    change is reported, and presence goes on."""
    cluster = redis_cluster_replicas
    home = cluster.master_of("{presence}")
    near = group_on(cluster, home)  # a group on the same shard, failing over with it
    far = group_on(cluster, next(p for p in cluster.masters() if p != home))
    # A TTL shorter than the failover (about 2 s), and long enough that a loaded
    # machine still refreshes within it once the cluster is back.
    _, port_a = processes(cluster.url, 1.5)
    _, port_b = processes(cluster.url, 1.5)
    clients = [ws(port_a, f"/join/{g}?ann") for g in (near, far)]
    clients += [ws(port_b, f"/join/{g}?bob") for g in (near, far)]
    assert [c.recv() for c in clients] == ["joined"] * 4
    whole = {"ann": [None], "bob": [None]}
    for port in (port_a, port_b):
        wait_until(lambda p=port: len(_get(p, "/events")) == 4)

    cluster.failover(home)
    for port in (port_a, port_b):
        for group in (near, far):
            wait_until(lambda p=port, g=group: _get_or_none(p, f"/presence/{g}") == whole)
    gevent.sleep(3)  # refreshes past the TTL: a process wrongly reaped would show as a leave
    for port in (port_a, port_b):
        assert len(_get(port, "/events")) == 4
        for group in (near, far):
            assert _get(port, f"/presence/{group}") == whole

    for c in clients:
        c.close()
    for port in (port_a, port_b):
        wait_until(lambda p=port: len(_get(p, "/events")) == 8)
        assert sorted((g, k) for g, k, _, joined in _get(port, "/events")[4:] if not joined) == sorted(
            [(near, "ann"), (far, "ann"), (near, "bob"), (far, "bob")])
    wait_until(lambda: no_keys(cluster, "t:*"))


def test_writes_a_master_lost_are_made_good_after_it_changes(redis_cluster_replicas, made):
    """Writes a killed master did not pass on: a join (the entry is missing) and a
    leave (a ghost stays). Once the group's master changed, the process that made
    them registers its entries again and prunes its ghost; each change once."""
    cluster = redis_cluster_replicas
    master = next(p for p in cluster.masters() if p != cluster.master_of("{presence}"))
    group = group_on(cluster, master)
    store = RedisChannelStore(cluster.url, presence_ttl=1)
    made.append(store)
    watcher = RedisChannelStore(cluster.url, presence_ttl=1)
    made.append(watcher)
    events = record(watcher)
    server = Server(presence_app(store), port=0, ping_interval=None).start()
    made.append(server)
    ann, bob = ws(server.port, f"/{group}?ann"), ws(server.port, f"/{group}?bob")
    assert [ann.recv(), bob.recv()] == ["joined"] * 2
    (ann_field,) = [f for (g, _), f in store._fields.items() if store._present[g] and f.endswith(":1")]
    bob_field = ann_field[:-1] + "2"
    bob.close()
    wait_until(lambda: len(events) == 3)  # ann and bob joined, bob left

    # What the master would hold had it lost ann's join and bob's leave.
    node = cluster.node_client(master)
    entries, counts = store._presence_keys(group)
    node.hdel(entries, ann_field)
    node.hdel(counts, "ann")
    node.hset(entries, bob_field, b'["bob",null]')
    node.hset(counts, "bob", 1)
    assert watcher.presence(group) == {"bob": [None]}

    cluster.manual_failover(cluster.replicas_of(master)[0])
    wait_until(lambda: watcher.presence(group) == {"ann": [None]}, timeout=30)
    gevent.sleep(1)  # room for a wrong extra event
    # Every process heard bob's ghost leave (reported once: bob was gone already
    # for them) and ann's join again (ann was present for them: not reported).
    assert events == [(group, "ann", None, True), (group, "bob", None, True), (group, "bob", None, False)]
    ann.close()
    wait_until(lambda: len(events) == 4)
    assert events[3] == (group, "ann", None, False)
    wait_until(lambda: no_keys(cluster, "greenchan:*presence*"))
