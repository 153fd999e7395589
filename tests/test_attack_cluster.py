"""Attacks on RedisChannelStore's Redis Cluster support (API.md "Redis Cluster", docs/cluster.md).

The promise under attack: everything of the Redis store holds on a cluster, exactly-once
delivery in order, history and resume, presence, outage behaviour, reconnect and
resubscribe, and a shard's failover or a slot move loses nothing history can give back.
Each test disrupts a real local cluster (tests/redis_cluster.py) while numbered
broadcasts flow, then checks every WebSocket member got every accepted broadcast of
each of its groups once, in order, and that no shard subscription or subscriber
connection was left behind. Attacks: two masters killed in a row, a master killed
and then its successor, the whole cluster restarted, resumes and leaves during a
failover, join/leave churn on hundreds of groups while slots move (and a slot moved
back and forth), a broadcast storm during a failover, odd group names, a store given
a RedisCluster object, history off during a failover, leaks after many failovers,
broadcast's return value, and the cluster fully down.

A test marked xfail(strict=True) reproduces a bug that is still open; its reason
says what is wrong. Every loop is bounded; no assertion is about timing.
"""
from __future__ import annotations

import logging
import os
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Sequence

import gevent
import pytest
import redis.exceptions
import websocket

from greenchan import RedisChannelStore, with_channel

from redis_cluster import RedisCluster, group_on, key_slot, redis_cluster, redis_cluster_replicas  # noqa: F401
from test_redis_cluster import processes  # noqa: F401  (fixture)

pytestmark = pytest.mark.cluster

TIMEOUT = 30  # seconds, for any single wait (failovers on a busy 2-core machine)
PREFIX = "t:"


def wait_until(predicate: Any, timeout: float = TIMEOUT) -> Any:
    with gevent.Timeout(timeout, AssertionError(f"not true within {timeout} s: {predicate}")):
        while True:  # bounded by the timeout
            value = predicate()
            if value:
                return value
            gevent.sleep(0.02)


def channel_of(group: str) -> str:
    return PREFIX + "{" + group + "}"


class Node:
    """A store (one 'process') behind a real server: WebSocket members join groups by query."""

    def __init__(self, url: Any, serve: Any, **options: Any) -> None:
        settings = dict(prefix=PREFIX, history=1000, reconnect_max=0.5, socket_timeout=2)
        settings.update(options)
        self.store = RedisChannelStore(url, **settings)
        store = self.store

        @with_channel
        def app(channel: Any) -> None:
            query = urllib.parse.parse_qs(channel.environ.get("QUERY_STRING", ""))
            since = query.get("since", [None])[0]
            results = [store.add_to_group(g, channel, since=since) for g in query.get("g", [])]
            channel.send("joined " + "".join("1" if r else "0" for r in results))

        self.server = serve(app, ping_interval=None)

    def join(self, groups: Sequence[str], since: Optional[str] = None) -> "Member":
        query = [("g", g) for g in groups] + ([("since", since)] if since else [])
        client = websocket.create_connection(
            f"ws://127.0.0.1:{self.server.port}/?{urllib.parse.urlencode(query)}", timeout=TIMEOUT)
        member = Member(client, groups)
        with gevent.Timeout(TIMEOUT, AssertionError("no answer to a join")):
            for _ in range(100_000):  # bounded; a resume replays what came after since first
                answer = client.recv()
                if answer.startswith("joined "):
                    member.results = answer[len("joined "):]
                    return member
                member.take(answer)
        raise AssertionError("no answer to a join")

    def close(self) -> None:
        self.store.close()


class Member:
    """A WebSocket member and what it received, by group (messages are 'group/number')."""

    def __init__(self, client: websocket.WebSocket, groups: Sequence[str]) -> None:
        self.client, self.groups, self.results = client, list(groups), ""
        self.got: Dict[str, List[int]] = {g: [] for g in groups}

    def take(self, message: str) -> None:
        group, _, n = message.rpartition("/")
        self.got[group].append(int(n))

    def read_until(self, last: Dict[str, int], timeout: float = TIMEOUT) -> Dict[str, List[int]]:
        """Read until every group's number ``last[group]`` arrived (or fail saying what is missing)."""
        try:
            with gevent.Timeout(timeout):
                while any(last[g] not in self.got[g] for g in last):  # bounded by the timeout
                    self.take(self.client.recv())
        except gevent.Timeout:
            raise AssertionError(f"missing: got {self.got}, want up to {last}") from None
        return self.got

    def close(self) -> None:
        self.client.close()


class Publisher:
    """Numbered broadcasts to ``groups`` (round robin) through ``store`` until stopped.

    ``accepted[group]`` are the numbers broadcast returned for, ``refused[group]`` those
    it raised for; ``counts`` what broadcast returned.
    """

    def __init__(self, store: RedisChannelStore, groups: Sequence[str], pace: float = 0.005) -> None:
        self.store, self.groups, self.pace = store, list(groups), pace
        self.accepted: Dict[str, List[int]] = {g: [] for g in groups}
        self.refused: Dict[str, List[int]] = {g: [] for g in groups}
        self.counts: List[int] = []
        self.errors: List[str] = []
        self.paused = False
        self.slowest_refusal = 0.0  # seconds: reported, never asserted on
        self._stop = False
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        for n in range(1_000_000):  # bounded: stopped long before
            if self._stop:
                return
            if self.paused:
                gevent.sleep(self.pace)
                continue
            group = self.groups[n % len(self.groups)]
            started = time.monotonic()
            try:
                self.counts.append(self.store.broadcast(group, f"{group}/{n}"))
                self.accepted[group].append(n)
            except redis.exceptions.RedisError as exc:
                self.refused[group].append(n)
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self.slowest_refusal = max(self.slowest_refusal, time.monotonic() - started)
            gevent.sleep(self.pace)

    def wait_more(self, count: int = 20) -> None:
        """Until every group has ``count`` more accepted broadcasts than now."""
        now = {g: len(a) for g, a in self.accepted.items()}
        try:
            wait_until(lambda: all(len(self.accepted[g]) >= now[g] + count for g in self.groups))
        except AssertionError:
            raise AssertionError(
                f"broadcasts stalled: accepted {now} -> { {g: len(a) for g, a in self.accepted.items()} }, "
                f"refused { {g: len(r) for g, r in self.refused.items()} }, last errors {self.errors[-3:]}, "
                f"publisher {'dead: %r' % self._greenlet.exception if self._greenlet.dead else 'running'}"
            ) from None

    def stop(self) -> Dict[str, List[int]]:
        self._stop = True
        self._greenlet.join(TIMEOUT)
        return self.accepted


def check_once_in_order(member: Member, accepted: Dict[str, List[int]], refused: Dict[str, List[int]],
                        after: Optional[Dict[str, int]] = None) -> None:
    """The member got every accepted number (above ``after[group]``) of its groups, once, in
    order; a refused broadcast may have been delivered (a timeout after Redis took it)."""
    want = {g: [n for n in accepted[g] if after is None or n > after[g]] for g in member.groups}
    last = {g: numbers[-1] for g, numbers in want.items() if numbers}
    member.read_until(last)
    for group in member.groups:
        got = member.got[group]
        missing = sorted(set(want[group]) - set(got))
        twice = sorted(n for n in set(got) if got.count(n) > 1)
        extra = sorted(set(got) - set(want[group]) - set(refused[group]))
        assert not missing and not twice and not extra and got == sorted(got), (
            f"{group}: missing {missing}, twice {twice}, extra {extra}, in order {got == sorted(got)}")


def shard_subscribers(cluster: RedisCluster, port: int) -> Dict[str, int]:
    """greenchan's connections on the node at ``port`` holding shard subscriptions, by name."""
    found: Dict[str, int] = {}
    for client in cluster.node_client(port).client_list():
        if client["name"].startswith("greenchan-sub-") and int(client.get("ssub", 0)):
            found[client["name"]] = found.get(client["name"], 0) + 1
    return found


def shard_channels(cluster: RedisCluster) -> Dict[int, List[bytes]]:
    """Every running node's active shard channels of this test's prefix."""
    return {port: sorted(cluster.node_client(port).execute_command("PUBSUB", "SHARDCHANNELS", PREFIX + "*"))
            for port in cluster.running()}


def numsub(cluster: RedisCluster, group: str) -> int:
    """Subscribers of the group's shard channel on the master that owns it."""
    name = channel_of(group)
    reply = cluster.node_client(cluster.master_of(name)).execute_command("PUBSUB", "SHARDNUMSUB", name)
    return int(reply[1])


def nothing_left(cluster: RedisCluster) -> bool:
    """No shard channel of ours anywhere, no greenchan connection holding a shard subscription."""
    return not any(shard_channels(cluster).values()) and not any(
        shard_subscribers(cluster, port) for port in cluster.running())


def epochs_agree(cluster: RedisCluster) -> bool:
    """Every node knows the newest config epoch. A slot moved back before they do may never
    settle: the new owner does not bump its epoch past one it has not heard of yet, and the
    nodes end up disagreeing on the slot's owner (Redis answers MOVED back and forth; the
    fixture's migrate_slot times out). Not greenchan's doing: wait for this between moves."""
    epochs = set()
    for port in cluster.running():
        info = cluster.node_client(port).execute_command("CLUSTER", "INFO").decode()
        epochs.add(next(line for line in info.splitlines() if line.startswith("cluster_current_epoch")))
    return len(epochs) == 1


def subscriptions_settled(cluster: RedisCluster, groups: Sequence[str], processes: int) -> bool:
    """Each group has ``processes`` subscribers on its owner, none anywhere else."""
    owners = {port: set() for port in cluster.running()}
    for group in groups:
        owners[cluster.master_of(channel_of(group))].add(channel_of(group).encode())
    channels = shard_channels(cluster)
    return all(set(channels[p]) == owners[p] for p in owners) and all(
        numsub(cluster, g) == processes for g in groups)


@pytest.fixture
def nodes(serve):
    """``nodes(url, **options)``: a Node; every store closed at teardown."""
    made: List[Node] = []

    def make(url: Any, **options: Any) -> Node:
        made.append(Node(url, serve, **options))
        return made[-1]

    yield make
    for node in made:
        node.close()


# -- failovers -----------------------------------------------------------------------


def stream_and_disrupt(cluster: RedisCluster, nodes: Any, disrupt: Any, groups: Sequence[str]) -> Publisher:
    """Two stores with a member each in every group, a third store publishing; ``disrupt()``
    mid-stream; then every member must have everything accepted, once, in order."""
    a, b = nodes(cluster.url), nodes(cluster.url)
    publisher = nodes(cluster.url)
    members = [a.join(groups), b.join(groups)]
    stream = Publisher(publisher.store, groups)
    stream.wait_more()
    disrupt(stream)
    stream.wait_more()
    wait_until(lambda: subscriptions_settled(cluster, groups, 2))
    stream.wait_more()
    accepted = stream.stop()
    print(f"slowest refused broadcast: {stream.slowest_refusal:.2f} s")  # reported, not asserted
    for member in members:
        check_once_in_order(member, accepted, stream.refused)
        member.close()
    return stream


def test_two_masters_killed_in_a_row(redis_cluster_replicas, nodes):
    cluster = redis_cluster_replicas
    first, second, third = cluster.masters()
    groups = [group_on(cluster, port) for port in (first, second, third)]

    def disrupt(stream: Publisher) -> None:
        cluster.failover(first)
        gevent.sleep(0.5)
        cluster.failover(second)

    stream = stream_and_disrupt(cluster, nodes, disrupt, groups)
    assert stream.refused[groups[0]] and stream.refused[groups[1]]  # both shards were down a while
    assert {e.partition(":")[0] for e in stream.errors} <= {"ConnectionError", "ClusterDownError", "TimeoutError"}


def test_a_killed_master_comes_back_and_its_successor_dies(redis_cluster_replicas, nodes):
    cluster = redis_cluster_replicas
    master = cluster.masters()[0]
    groups = [group_on(cluster, master), group_on(cluster, cluster.masters()[1], prefix="calm")]

    def disrupt(stream: Publisher) -> None:
        successor = cluster.failover(master)
        cluster.restart(master)  # back, empty, as the successor's replica
        wait_until(lambda: cluster.replicas_of(successor) == [master])
        stream.wait_more()
        # Nothing unreplicated when the successor dies (that loss is the next test's):
        # the old master, resynced, takes over again with the whole history.
        stream.paused = True
        wait_until(lambda: replicated(cluster, successor, master))
        cluster.failover(successor)
        stream.paused = False

    stream_and_disrupt(cluster, nodes, disrupt, groups)
    assert cluster.master_of(channel_of(groups[0])) == master



def test_a_failover_that_loses_the_unreplicated_tail(redis_cluster_replicas, nodes):
    """Redis replicates asynchronously: messages a master accepted and its subscribers got live
    may be missing on the replica that takes over (documented: they cannot be given back).
    What follows the failover must still arrive. The loss is made certain here: the replica
    is cut from its master (and cannot re-authenticate) while broadcasts go on. (Found at
    9876067: the new master renumbered from the last replicated message and members dropped
    the next broadcasts as duplicates; fixed in 1976bf7.)"""
    cluster = redis_cluster_replicas
    master = cluster.masters()[0]
    replica = cluster.replicas_of(master)[0]
    groups = [group_on(cluster, master)]

    def disrupt(stream: Publisher) -> None:
        cluster.node_client(replica).config_set("masterauth", "not-the-password")
        cluster.node_client(master).client_kill_filter(_type="replica")
        stream.wait_more()  # delivered live, never replicated
        cluster.failover(master)
        cluster.node_client(replica).config_set("masterauth", "")

    stream_and_disrupt(cluster, nodes, disrupt, groups)



@pytest.mark.xfail(strict=True, reason=(
    "after a failover that lost the unreplicated tail of a group, the new master numbers the "
    "next broadcast right after the last replicated one, so a client whose position is the "
    "last replicated message resumes 'recovered' (history() answers a list, the join True) "
    "though every accepted message of the lost tail is gone: a silent loss"))
def test_a_resume_across_a_lost_tail_is_not_recovered(redis_cluster_replicas, nodes):
    cluster = redis_cluster_replicas
    master = cluster.masters()[0]
    replica = cluster.replicas_of(master)[0]
    group = group_on(cluster, master)
    a = nodes(cluster.url)
    for n in range(3):
        a.store.broadcast(group, f"{group}/{n}")
    wait_until(lambda: replicated(cluster, master, replica))
    position = a.store.history(group)[-1][0]  # what a client got before it dropped
    cluster.node_client(replica).config_set("masterauth", "not-the-password")
    cluster.node_client(master).client_kill_filter(_type="replica")
    for n in range(3, 8):  # accepted, never replicated: the client will never get them
        a.store.broadcast(group, f"{group}/{n}")
    cluster.failover(master)
    cluster.node_client(replica).config_set("masterauth", "")
    wait_until(lambda: _accepts(a.store, group, f"{group}/8"))
    kept = a.store.history(group, since=position)
    assert kept is None, f"continuity claimed across 3..7, which are gone: {[m for _, m in kept]}"
    member = a.join([group], since=position)
    assert member.results == "0"
    member.close()


def _accepts(store: RedisChannelStore, group: str, message: str) -> bool:
    try:
        store.broadcast(group, message)
        return True
    except redis.exceptions.RedisError:
        return False


# -- the whole cluster down ---------------------------------------------------------


def kill_everything(cluster: RedisCluster) -> None:
    for port in cluster.running():
        cluster.kill(port)


def start_everything(cluster: RedisCluster) -> None:
    """Start every killed node again (empty, from its nodes.conf) and wait for a healthy cluster."""
    import time

    for port in cluster.nodes:
        cluster._spawn(port)
    deadline = time.monotonic() + TIMEOUT
    for port in cluster.nodes:
        cluster._wait_ping(port, deadline)
    cluster._until(deadline, "the whole cluster is back", cluster.healthy)


def test_the_whole_cluster_down_then_back(redis_cluster, nodes):
    cluster = redis_cluster
    groups = [group_on(cluster, port) for port in cluster.masters()]
    a, b = nodes(cluster.url), nodes(cluster.url)
    members = [a.join(groups), b.join(groups)]
    for group in groups:
        assert a.store.broadcast(group, f"{group}/-1") == 2
    for member in members:
        member.read_until(dict.fromkeys(groups, -1))
        member.got = {g: [] for g in groups}
    kill_everything(cluster)

    # Down: broadcast raises redis's ConnectionError (within socket_timeout, not forever),
    # history is refused too, and a join with since= joins live and says False.
    for group in groups:
        started = time.monotonic()
        with gevent.Timeout(TIMEOUT, AssertionError("broadcast hung while the cluster was down")):
            with pytest.raises(redis.exceptions.ConnectionError):
                b.store.broadcast(group, f"{group}/lost")
        print(f"broadcast refused in {time.monotonic() - started:.2f} s while down")  # not asserted
    with gevent.Timeout(TIMEOUT, AssertionError("a join hung while the cluster was down")):
        late = a.join(groups[:1], since="0123ab:00000000:0-0")
    assert late.results == "0"

    start_everything(cluster)
    # Back: every store resubscribes by itself; broadcasts flow to old and new members.
    wait_until(lambda: subscriptions_settled(cluster, groups, 2))
    stream = Publisher(b.store, groups)
    stream.wait_more()
    accepted = stream.stop()
    for member in members:
        check_once_in_order(member, accepted, stream.refused)
    check_once_in_order(late, accepted, stream.refused)
    assert stream.counts[-1] == 2
    for member in (*members, late):
        member.close()
    wait_until(lambda: nothing_left(cluster))


# -- resumes and leaves during a failover -------------------------------------------------


def test_resumes_and_leaves_during_a_failover(redis_cluster_replicas, nodes):
    """Clients keep coming back with since= (a position from the history) and leaving while the
    group's master dies: each resumed member gets every accepted message after its position,
    once, in order, whether it joined before, during or after the failover."""
    cluster = redis_cluster_replicas
    master = cluster.masters()[0]
    group = group_on(cluster, master)
    a, publisher = nodes(cluster.url), nodes(cluster.url)
    stream = Publisher(publisher.store, [group], pace=0.01)
    stream.wait_more()
    resumed: List[tuple] = []  # (member, position number, join result)
    done = False

    def churn() -> None:
        for i in range(200):  # bounded
            if done:
                return
            try:
                kept = publisher.store.history(group)
            except redis.exceptions.RedisError:
                kept = None
            if kept:
                position, message = kept[max(0, len(kept) - 5 - i % 7)]
                member = a.join([group], since=position)
                resumed.append((member, int(message.rpartition("/")[2]), member.results))
                if len(resumed) > 2 and i % 3 == 0:
                    leaving = resumed.pop(0)[0]
                    leaving.close()
            gevent.sleep(0.05)

    worker = gevent.spawn(churn)
    gevent.sleep(0.3)
    cluster.failover(master)
    stream.wait_more()
    wait_until(lambda: subscriptions_settled(cluster, [group], 1))
    gevent.sleep(0.3)
    done = True
    worker.join(TIMEOUT)
    stream.wait_more()
    accepted = stream.stop()
    assert len(resumed) >= 3
    for member, number, result in resumed:
        if result == "1":
            check_once_in_order(member, accepted, stream.refused, after={group: number})
        else:  # continuity lost (a join while the shard was down): live, once, in order
            got = member.read_until({group: accepted[group][-1]})[group]
            assert got == sorted(set(got)), f"joined live: {got}"
        member.close()
    wait_until(lambda: nothing_left(cluster))


def replicated(cluster: RedisCluster, master: int, replica: int) -> bool:
    """The replica has everything the master wrote."""
    offset = cluster.node_client(master).info("replication")["master_repl_offset"]
    return cluster.node_client(replica).info("replication").get("slave_repl_offset") == offset


# -- slots moving under churn ------------------------------------------------------------


def test_churn_on_hundreds_of_groups_while_slots_move(redis_cluster, nodes):
    """300 groups over every shard; members keep joining and leaving them while slots move
    (one back and forth quickly). Steady members get everything once, in order; in the end
    no shard subscription and no shard connection is left, and while members remained each
    group had exactly one subscriber per process, on its owner only."""
    cluster = redis_cluster
    masters = cluster.masters()
    groups = [f"churn:{i}" for i in range(300)]
    a, b, publisher = nodes(cluster.url), nodes(cluster.url), nodes(cluster.url)
    streamed = [group_on(cluster, masters[0], prefix="moving"), group_on(cluster, masters[1], prefix="bouncing")]
    steady = [a.join(streamed), b.join(streamed)]
    stream = Publisher(publisher.store, streamed)
    done = False
    churned = []

    def churn(node: Node, seed: int) -> None:
        held: List[Member] = []
        for i in range(10_000):  # bounded; stopped by done
            if done:
                break
            picked = [groups[(seed + i * 7 + k * 31) % len(groups)] for k in range(5)]
            held.append(node.join(picked))
            churned.append(1)
            if len(held) > 4:
                held.pop(0).close()
            gevent.sleep(0.01)
        for member in held:
            member.close()

    workers = [gevent.spawn(churn, a, 0), gevent.spawn(churn, b, 13)]
    stream.wait_more()
    # The slots of a few churned groups and of the streamed ones move.
    for group in [*groups[:3], streamed[0]]:
        slot = key_slot(channel_of(group))
        to = next(port for port in masters if port != cluster.master_of(slot))
        cluster.migrate_slot(slot, to)
    slot = key_slot(channel_of(streamed[1]))
    home = cluster.master_of(slot)
    away = next(port for port in masters if port != home)
    cluster.migrate_slot(slot, away)  # and back at once
    wait_until(lambda: epochs_agree(cluster))
    cluster.migrate_slot(slot, home)
    stream.wait_more()
    done = True
    for worker in workers:
        worker.join(TIMEOUT)
        assert worker.successful(), worker.exception
    assert len(churned) > 20
    wait_until(lambda: subscriptions_settled(cluster, streamed, 2))
    for port in cluster.running():  # one shard connection per store per master, at most
        assert sum(shard_subscribers(cluster, port).values()) <= 2, shard_subscribers(cluster, port)
    stream.wait_more()
    accepted = stream.stop()
    for member in steady:
        check_once_in_order(member, accepted, stream.refused)
        member.close()
    wait_until(lambda: nothing_left(cluster))


def test_history_while_the_cluster_is_down_raises_redis_connection_error(redis_cluster, nodes):
    """On one Redis, history() during an outage raises redis's ConnectionError (a RedisError,
    what an application catches); the cluster must not answer with another family. (Found at
    3ec145c: it let redis-py's RedisClusterException through: not a RedisError.)"""
    cluster = redis_cluster
    group = group_on(cluster, cluster.masters()[0])
    a = nodes(cluster.url)
    a.store.broadcast(group, f"{group}/0")
    assert [m for _, m in a.store.history(group)] == [f"{group}/0"]
    kill_everything(cluster)
    with gevent.Timeout(TIMEOUT, AssertionError("history hung while the cluster was down")):
        with pytest.raises(redis.exceptions.RedisError):
            a.store.history(group)



def test_a_slot_moved_away_and_back_mid_stream(redis_cluster, nodes):
    """A slot moved to another master and straight back while broadcasts flow: broadcasts are
    redirected both ways (a few may be refused while keys move) and go on afterwards; members
    get everything accepted, once, in order."""
    cluster = redis_cluster
    home, away = cluster.masters()[:2]
    group = group_on(cluster, home, prefix="bouncing")
    slot = key_slot(channel_of(group))

    def disrupt(stream: Publisher) -> None:
        cluster.migrate_slot(slot, away)
        wait_until(lambda: epochs_agree(cluster))
        cluster.migrate_slot(slot, home)

    stream_and_disrupt(cluster, nodes, disrupt, [group])
    assert cluster.master_of(slot) == home


# -- names, clients, options -------------------------------------------------------------

ODD_NAMES = [
    *(pytest.param(name, id=str(i)) for i, name in enumerate(
        ["a{b}c", "{x}", "a}b", "{", "a:b:c", "ü/日本語 ✓", "x" * 5000, "with space", "{}", "a{}b"])),
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_group_names(redis_cluster, nodes, name):
    """Braces, colons, unicode, a very long name: the group's keys and shard channel share
    one slot (its scripts run on one node), broadcasts arrive once, history and resume work,
    and the subscription goes away with the last member."""
    cluster = redis_cluster
    a, b = nodes(cluster.url), nodes(cluster.url)
    member = a.join([name])
    for n in range(3):
        assert b.store.broadcast(name, f"{name}/{n}") == 1
    check_once_in_order(member, {name: [0, 1, 2]}, {name: []})
    kept = b.store.history(name)
    assert [m for _, m in kept] == [f"{name}/{n}" for n in range(3)]
    late = b.join([name], since=kept[0][0])
    assert late.results == "1" and late.got == {name: [1, 2]}
    assert numsub(cluster, name) == 2  # a and b
    for client in (member, late):
        client.close()
    wait_until(lambda: nothing_left(cluster))


@pytest.mark.parametrize("name", ["}room", ""], ids=["close-brace", "empty"])
def test_names_a_cluster_cannot_shard_are_refused(redis_cluster, nodes, name):
    """A group starting with '}' is refused (docs/cluster.md); so must be any name whose keys
    would not share a slot: the empty name's keys t:{}:history and t:{}:meta have an empty
    hash tag (found at 9876067: every broadcast failed with CROSSSLOT, first reported as a
    ConnectionError; refused since 1976bf7)."""
    a = nodes(redis_cluster.url)
    with pytest.raises(ValueError):
        a.store.broadcast(name, "x")
    with pytest.raises(ValueError):
        a.store.history(name)


@pytest.mark.parametrize("decode", [False, True], ids=["bytes", "decode_responses"])
def test_a_store_given_a_redis_cluster_object_follows_a_failover(redis_cluster_replicas, nodes, decode):
    """docs/cluster.md: a redis.cluster.RedisCluster you made works like the URL, through a
    failover too; an application's client often has decode_responses=True (found at 3ec145c:
    its options reached the store's own connections: history() raised TypeError and
    broadcasts to a group with members failed as 'cannot be reached' for ever)."""
    cluster = redis_cluster_replicas
    master = cluster.masters()[0]
    groups = [group_on(cluster, master), group_on(cluster, cluster.masters()[1], prefix="calm")]

    def disrupt(stream: Publisher) -> None:
        cluster.failover(master)

    a = nodes(cluster.client(decode_responses=decode))
    b = nodes(cluster.url)
    members = [a.join(groups), b.join(groups)]
    stream = Publisher(a.store, groups)
    stream.wait_more()
    assert [m for _, m in a.store.history(groups[0])][-1].startswith(groups[0])
    disrupt(stream)
    stream.wait_more()
    wait_until(lambda: subscriptions_settled(cluster, groups, 2))
    stream.wait_more()
    accepted = stream.stop()
    assert stream.counts[-1] == 2
    for member in members:
        check_once_in_order(member, accepted, stream.refused)
        member.close()
    wait_until(lambda: nothing_left(cluster))


def test_history_off_during_a_failover_warns_and_goes_on(redis_cluster_replicas, nodes, caplog):
    """Without history the messages published while the shard changes hands are lost to this
    process's members (documented) and a WARNING says how many groups; afterwards every
    broadcast arrives once, in order."""
    cluster = redis_cluster_replicas
    master = cluster.masters()[0]
    groups = [group_on(cluster, master, prefix=f"off{i}") for i in range(3)]
    a, publisher = nodes(cluster.url, history=0), nodes(cluster.url, history=0)
    member = a.join(groups)
    stream = Publisher(publisher.store, groups)
    stream.wait_more()
    with caplog.at_level(logging.WARNING, logger="greenchan"):
        cluster.failover(master)
        wait_until(lambda: subscriptions_settled(cluster, groups, 1))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "3 group" in r.getMessage()]
    assert warned, [r.getMessage() for r in caplog.records]
    after = {g: stream.accepted[g][-1] for g in groups}
    stream.wait_more()
    accepted = stream.stop()
    want = {g: [n for n in accepted[g] if n > after[g]] for g in groups}
    got = member.read_until({g: want[g][-1] for g in groups})
    for group in groups:
        tail = [n for n in got[group] if n > after[group]]
        assert tail == want[group] or tail == [n for n in want[group] if n in tail], group
        assert got[group] == sorted(set(got[group])), f"{group}: twice or out of order"
    member.close()


# -- leaks ------------------------------------------------------------------------------


def own_sockets() -> int:
    """This process's open sockets, from /proc."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def test_many_failovers_leak_nothing(redis_cluster_replicas, nodes):
    """Planned failovers back and forth, on every shard, with members and broadcasts:
    afterwards one shard connection per master for the store, no shard channel on a
    replica, and the store's sockets and greenlets do not grow with the failovers."""
    from conftest import greenlet_count

    cluster = redis_cluster_replicas
    masters = cluster.masters()
    groups = [group_on(cluster, port, prefix=f"leak{i}") for i, port in enumerate(masters)]
    a = nodes(cluster.url)
    member = a.join(groups)
    stream = Publisher(a.store, groups, pace=0.01)
    sizes = []
    for round_ in range(6):
        for group in groups:
            owner = cluster.master_of(channel_of(group))
            cluster.manual_failover(cluster.replicas_of(owner)[0])
        stream.wait_more(5)
        wait_until(lambda: subscriptions_settled(cluster, groups, 1))
        wait_until(lambda: all(sum(shard_subscribers(cluster, p).values()) == (p in cluster.masters())
                               for p in cluster.running()))
        sizes.append((own_sockets(), greenlet_count()))
    accepted = stream.stop()
    check_once_in_order(member, accepted, stream.refused)
    # 18 failovers: a socket or greenlet left per failover would show; a pooled connection
    # to each node seen (6) would not be a leak.
    assert sizes[-1][0] <= sizes[0][0] + len(cluster.nodes) and sizes[-1][1] <= sizes[0][1], sizes
    member.close()
    wait_until(lambda: nothing_left(cluster))


# -- a broadcast storm and what broadcast returns ------------------------------------------------


def test_a_broadcast_storm_during_a_failover(redis_cluster_replicas, nodes):
    """Twenty greenlets broadcast as fast as they can to one group while its master dies:
    each publisher's accepted messages reach every member once, in that publisher's order;
    afterwards broadcast returns the number of subscribed processes again."""
    cluster = redis_cluster_replicas
    master = cluster.masters()[0]
    group = group_on(cluster, master)
    a, b = nodes(cluster.url), nodes(cluster.url)
    # Room for everything published while the stores resubscribe: with history=1000 a storm
    # of 20 greenlets outruns it, and what is trimmed before the catch-up is lost (documented).
    publisher = nodes(cluster.url, history=100_000)
    members = [a.join([group]), b.join([group])]
    accepted: Dict[int, List[int]] = {i: [] for i in range(20)}
    refused: Dict[int, List[int]] = {i: [] for i in range(20)}
    done = False

    def storm(i: int) -> None:
        for n in range(100_000):  # bounded; stopped by done
            if done:
                return
            try:
                publisher.store.broadcast(group, f"{i}:{n}")
                accepted[i].append(n)
            except redis.exceptions.RedisError:
                refused[i].append(n)
                gevent.sleep(0.01)
            gevent.sleep(0)

    storms = [gevent.spawn(storm, i) for i in range(20)]
    wait_until(lambda: all(len(v) > 5 for v in accepted.values()))
    cluster.failover(master)
    wait_until(lambda: subscriptions_settled(cluster, [group], 2))
    counts = {i: len(v) for i, v in accepted.items()}
    wait_until(lambda: all(len(v) > counts[i] + 5 for i, v in accepted.items()))
    done = True
    gevent.joinall(storms, timeout=TIMEOUT)
    assert all(refused.values()), "the shard was down a while: some broadcasts must be refused"
    for member in members:
        got: Dict[int, List[int]] = {i: [] for i in accepted}
        try:
            with gevent.Timeout(TIMEOUT):
                while any(accepted[i][-1] not in got[i] for i in accepted):  # bounded by the timeout
                    i, _, n = member.client.recv().rpartition("/")[2].partition(":")
                    got[int(i)].append(int(n))
        except gevent.Timeout:
            pass
        for i in accepted:
            missing = sorted(set(accepted[i]) - set(got[i]))
            twice = sorted(n for n in set(got[i]) if got[i].count(n) > 1)
            extra = sorted(set(got[i]) - set(accepted[i]) - set(refused[i]))
            assert not missing and not twice and not extra and got[i] == sorted(got[i]), (
                f"publisher {i}: missing {missing}, twice {twice}, extra {extra}, refused {refused[i]}, "
                f"not kept {sorted(set(accepted[i]) - {int(m.partition(':')[2]) for _, m in publisher.store.history(group) if m.startswith(f'{i}:')})}")
        member.close()
    wait_until(lambda: nothing_left(cluster))
    assert publisher.store.broadcast(group, "0:-1") == 0  # nobody left


def test_broadcast_counts_the_processes_after_a_planned_failover(redis_cluster_replicas, nodes):
    """docs/cluster.md: broadcast returns the number of processes subscribed to the group,
    the shard's own count. After a planned failover the stores stay on the demoted master
    (fed by replication) until they move; a broadcast meanwhile reaches both processes once,
    whatever the count says (it undercounts then)."""
    cluster = redis_cluster_replicas
    master = cluster.masters()[0]
    group = group_on(cluster, master)
    a, b = nodes(cluster.url), nodes(cluster.url)
    for node in (a, b):
        node.store.CLUSTER_CHECK = 3600  # their next look at the slots is far away
    members = [a.join([group]), b.join([group])]
    assert a.store.broadcast(group, f"{group}/0") == 2
    cluster.manual_failover(cluster.replicas_of(master)[0])
    count = a.store.broadcast(group, f"{group}/1")
    for member in members:
        check_once_in_order(member, {group: [0, 1]}, {group: []})
        member.close()
    # SPUBLISH's reply on the new master counts only the stores that moved there already:
    # 0, 1 or 2 though both processes got the message (docs/cluster.md: "the shard's own count").
    print("broadcast's count right after a planned failover:", count)
    assert 0 <= count <= 2


def test_a_broadcast_while_a_groups_keys_are_half_migrated(redis_cluster, nodes):
    """redis-cli reshard moves a slot's keys in batches: for a moment a group's stream may be
    on the new owner and its meta still on the old one (TRYAGAIN). A broadcast then waits a
    little and either goes through or raises redis's ConnectionError (found at 9876067: at
    once, as 'TTL exhausted'); once the keys are together broadcasts go on, and members get
    what was accepted, once, in order."""
    cluster = redis_cluster
    group = group_on(cluster, cluster.masters()[0])
    slot = key_slot(channel_of(group))
    a, publisher = nodes(cluster.url), nodes(cluster.url)
    member = a.join([group])
    assert publisher.store.broadcast(group, f"{group}/0") == 1
    to = cluster.masters()[1]
    source = cluster.begin_migration(slot, to)
    history_key = (PREFIX + "{" + group + "}:history").encode()
    cluster.node_client(source).execute_command("MIGRATE", "127.0.0.1", to, "", 0, 5000, "KEYS", history_key)
    outcomes: List[Any] = []
    for n in (1, 2):  # the split lasts as long as this test wants: refused, saying why
        try:
            outcomes.append(publisher.store.broadcast(group, f"{group}/{n}"))
        except redis.exceptions.ConnectionError as exc:
            outcomes.append(str(exc))
    print("while split:", outcomes)
    cluster.move_keys(slot, source, to)
    cluster.end_migration(slot, to)
    publisher.store.broadcast(group, f"{group}/3")  # does not raise
    accepted = [0] + [n for n, o in zip((1, 2), outcomes) if isinstance(o, int)] + [3]
    check_once_in_order(member, {group: accepted}, {group: [1, 2]})
    member.close()


# -- two real processes: their subscriber connections ---------------------------------------


def test_two_processes_after_churn_failover_and_a_moved_slot(redis_cluster_replicas, processes):
    """Two greenchan processes (the app of test_redis_cluster.py); members churn over 60 groups
    while a master fails over (planned) and a slot moves. Then each master owning a steady
    group holds exactly one greenchan-sub-<pid> shard connection per process, no other node
    holds any, each group one
    subscriber per process on its owner; when everyone left, nothing is left anywhere."""
    from test_redis_cluster import state, ws

    cluster = redis_cluster_replicas
    ports = [processes(cluster.url), processes(cluster.url)]
    names = {f"greenchan-sub-{state(port)['pid']}" for port in ports}
    masters = cluster.masters()
    steady_groups = [group_on(cluster, port, prefix="steady") for port in masters]
    steady = [ws(port, "/join/" + ",".join(steady_groups)) for port in ports]
    groups = [f"many:{i}" for i in range(60)]
    done = False

    def churn(port: int, seed: int) -> None:
        held = []
        for i in range(10_000):  # bounded; stopped by done
            if done:
                break
            held.append(ws(port, "/join/" + ",".join(groups[(seed + i * 11 + k * 7) % 60] for k in range(6))))
            if len(held) > 3:
                held.pop(0).close()
            gevent.sleep(0.02)
        for client in held:
            client.close()

    workers = [gevent.spawn(churn, port, seed) for port, seed in zip(ports, (0, 5))]
    gevent.sleep(0.5)
    cluster.manual_failover(cluster.replicas_of(masters[0])[0])
    slot = key_slot("t:{%s}" % steady_groups[1])
    cluster.migrate_slot(slot, masters[2])
    gevent.sleep(0.5)
    done = True
    for worker in workers:
        worker.join(TIMEOUT)
        assert worker.successful(), worker.exception

    seen: Dict[str, Any] = {}

    def settled() -> bool:
        owners = {cluster.master_of(channel_of(g)) for g in steady_groups}
        seen["connections"] = {port: (port in owners, shard_subscribers(cluster, port)) for port in cluster.running()}
        seen["channels"] = shard_channels(cluster)
        seen["numsub"] = {g: numsub(cluster, g) for g in steady_groups}
        return all(subs == (dict.fromkeys(names, 1) if master else {})
                   for master, subs in seen["connections"].values()) and set(seen["numsub"].values()) == {2}

    try:
        wait_until(settled)
    except AssertionError:
        raise AssertionError(f"not settled: {seen}, processes {names}, "
                             f"links {[state(port)['links'] for port in ports]}") from None
    for client in steady:
        client.close()
    wait_until(lambda: nothing_left(cluster))


# -- a shard with no master at all ------------------------------------------------------------


def test_a_shard_loses_master_and_replica_then_comes_back_empty(redis_cluster_replicas, nodes):
    """A master dies, its replica takes over, then the replica dies too: the shard has no
    master and its groups' broadcasts are refused. The replica comes back empty (a new epoch
    for its groups): members still get every broadcast accepted from then on, once, in order."""
    cluster = redis_cluster_replicas
    master, other = cluster.masters()[:2]
    lost, calm = group_on(cluster, master), group_on(cluster, other, prefix="calm")
    a, publisher = nodes(cluster.url), nodes(cluster.url)
    member = a.join([lost, calm])
    streams = {lost: Publisher(publisher.store, [lost]), calm: Publisher(publisher.store, [calm])}
    for stream in streams.values():
        stream.wait_more()
    successor = cluster.failover(master)
    streams[lost].wait_more()
    cluster.kill(successor)
    # The other masters agree the shard failed (Redis's cluster_state turns to fail).
    wait_until(lambda: "cluster_state:fail" in cluster.node_client(other).execute_command("CLUSTER", "INFO").decode())
    refused = len(streams[lost].refused[lost])
    wait_until(lambda: len(streams[lost].refused[lost]) > refused + 5)  # no master: refused
    cluster.restart(successor)  # empty: the shard's data is gone
    wait_until(lambda: subscriptions_settled(cluster, [lost, calm], 1))
    since_back = {g: s.accepted[g][-1] for g, s in streams.items()}
    for stream in streams.values():
        stream.wait_more()
    accepted = {g: s.stop()[g] for g, s in streams.items()}
    print("slowest refusal (s):", {g: round(s.slowest_refusal, 2) for g, s in streams.items()})
    got = member.read_until({g: accepted[g][-1] for g in (lost, calm)})
    for group in (lost, calm):
        assert got[group] == sorted(set(got[group])), f"{group}: twice or out of order"
        assert set(n for n in accepted[group] if n > since_back[group]) <= set(got[group]), group
    member.close()


def test_a_shard_with_no_master_stops_the_others_unless_told(redis_cluster_replicas, nodes):
    """docs/cluster.md: with Redis's default cluster-require-full-coverage yes a shard
    without a master stops every broadcast (CLUSTERDOWN, raised as ConnectionError);
    with no, the other shards' groups go on."""
    cluster = redis_cluster_replicas
    master, other = cluster.masters()[:2]
    calm = group_on(cluster, other, prefix="calm")
    a = nodes(cluster.url)
    member = a.join([calm])
    assert a.store.broadcast(calm, f"{calm}/0") == 1
    for port in [master, *cluster.replicas_of(master)]:
        cluster.kill(port)
    wait_until(lambda: "cluster_state:fail" in cluster.node_client(other).execute_command("CLUSTER", "INFO").decode())
    with pytest.raises(redis.exceptions.ConnectionError):
        a.store.broadcast(calm, f"{calm}/5")
    for port in cluster.running():
        cluster.node_client(port).config_set("cluster-require-full-coverage", "no")
    wait_until(lambda: _accepts(a.store, calm, f"{calm}/6"))
    check_once_in_order(member, {calm: [0, 6]}, {calm: [5]})
    member.close()
