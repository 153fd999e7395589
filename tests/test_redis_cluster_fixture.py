"""The local Redis Cluster of tests/redis_cluster.py does what the cluster tests rely on.

Also written down here, as tests: what Redis itself does to shard subscribers when a
slot moves or a master changes, and SPUBLISH inside a script, since RedisChannelStore's
cluster mode is designed around it. redis-py only, no greenchan.

    .venv/bin/python -m pytest -m cluster tests/test_redis_cluster_fixture.py
"""
from __future__ import annotations

import time
from typing import Any, List, Tuple

import pytest
import redis
from redis_cluster import RedisCluster, group_on, key_slot
from redis_cluster import redis_cluster, redis_cluster_replicas  # noqa: F401  (fixtures)

pytestmark = pytest.mark.cluster


def ssubscribe(cluster: RedisCluster, port: int, channel: str) -> Any:
    """A shard subscriber on the node at ``port``, its subscription confirmed."""
    pubsub = cluster.node_client(port, protocol=2).pubsub()
    pubsub.ssubscribe(channel)
    assert next_message(pubsub) == ("ssubscribe", channel.encode(), 1)
    return pubsub


def next_message(pubsub: Any, timeout: float = 5.0) -> Tuple[str, bytes, Any]:
    """The next message of a subscriber (bounded): (type, channel, data)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message:
            return message["type"], message["channel"], message["data"]
    raise AssertionError(f"no message within {timeout} s")


def test_the_cluster_is_ok_and_every_node_agrees(redis_cluster: RedisCluster) -> None:
    assert len(redis_cluster.nodes) == 3 and redis_cluster.masters() == redis_cluster.running()
    assert redis_cluster.url == f"redis+cluster://127.0.0.1:{redis_cluster.nodes[0]}"
    for port in redis_cluster.nodes:
        node = redis_cluster.node_client(port)
        assert node.cluster("info")["cluster_state"] == "ok"
        assert int(node.cluster("info")["cluster_slots_assigned"]) == 16384
    client = redis_cluster.client()
    client.set("greeting", "hello")
    assert client.get("greeting") == b"hello"


def test_keys_land_on_the_master_group_on_chose(redis_cluster: RedisCluster) -> None:
    client = redis_cluster.client()
    for port in redis_cluster.masters():
        group = group_on(redis_cluster, port)
        key = f"greenchan:{{{group}}}:history"
        assert redis_cluster.node_client(port).cluster("keyslot", key) == key_slot(key) == key_slot(group)
        client.set(key, port)
        assert redis_cluster.master_of(key) == port
        assert redis_cluster.node_client(port).get(key) == str(port).encode()
        for other in set(redis_cluster.masters()) - {port}:
            with pytest.raises(redis.exceptions.MovedError):
                redis_cluster.node_client(other).get(key)


def test_migrate_slot_moves_keys_and_shard_channels(redis_cluster: RedisCluster) -> None:
    """The keys follow the slot; so does SPUBLISH, to a subscriber on the new owner.
    Redis tells the subscriber on the old owner with a ``sunsubscribe`` it did not ask for."""
    source, target = redis_cluster.masters()[:2]
    group = group_on(redis_cluster, source)
    key, channel = f"greenchan:{{{group}}}:history", f"greenchan:{{{group}}}"
    client = redis_cluster.client()
    client.set(key, "kept")
    old = ssubscribe(redis_cluster, source, channel)
    assert redis_cluster.migrate_slot(key_slot(key), target) == 1
    assert redis_cluster.master_of(key) == target
    assert redis_cluster.node_client(target).get(key) == b"kept"
    with pytest.raises(redis.exceptions.MovedError):
        redis_cluster.node_client(source).get(key)
    assert next_message(old) == ("sunsubscribe", channel.encode(), 0)
    new = ssubscribe(redis_cluster, target, channel)
    assert redis_cluster.client().spublish(channel, "moved") == 1
    assert next_message(new) == ("smessage", channel.encode(), b"moved")
    with pytest.raises(redis.exceptions.MovedError):
        redis_cluster.node_client(source).execute_command("SPUBLISH", channel, "lost")


def test_a_slot_half_migrated_answers_ask(redis_cluster: RedisCluster) -> None:
    source, target = redis_cluster.masters()[:2]
    group = group_on(redis_cluster, source)
    moved, stays = f"{{{group}}}:moved", f"{{{group}}}:stays"
    client = redis_cluster.client()
    client.set(moved, 1)
    client.set(stays, 2)
    slot = key_slot(group)
    assert redis_cluster.begin_migration(slot, target) == source
    redis_cluster.node_client(source).migrate("127.0.0.1", target, moved, 0, 5000)
    with pytest.raises(redis.exceptions.AskError):
        redis_cluster.node_client(source).get(moved)
    assert redis_cluster.node_client(source).get(stays) == b"2"
    assert client.get(moved) == b"1"  # redis-py follows the ASK
    assert redis_cluster.move_keys(slot, source, target) == 1
    redis_cluster.end_migration(slot, target)
    assert redis_cluster.master_of(slot) == target and client.get(stays) == b"2"


def test_spublish_in_a_script(redis_cluster: RedisCluster) -> None:
    """SPUBLISH works inside a script whose keys share the channel's hash tag, the
    channel passed as an argument. Declared among the keys it works too, except while
    its slot migrates: Redis counts the channel as a key missing from the keyspace
    and answers TRYAGAIN to the whole script until the migration ends."""
    source, target = redis_cluster.masters()[:2]
    group = group_on(redis_cluster, source)
    meta, channel = f"greenchan:{{{group}}}:meta", f"greenchan:{{{group}}}"
    in_args = "redis.call('INCR', KEYS[1]); return redis.call('SPUBLISH', ARGV[1], ARGV[2])"
    in_keys = "redis.call('INCR', KEYS[1]); return redis.call('SPUBLISH', KEYS[2], ARGV[1])"
    subscriber = ssubscribe(redis_cluster, source, channel)
    node = redis_cluster.node_client(source)
    assert node.eval(in_args, 1, meta, channel, "a") == 1
    assert node.eval(in_keys, 2, meta, channel, "b") == 1
    other = f"greenchan:{{{group_on(redis_cluster, target)}}}"
    with pytest.raises(redis.exceptions.ResponseError):  # "a non local key" (7.0)
        node.eval(in_args, 1, meta, other, "c")
    redis_cluster.begin_migration(key_slot(group), target)
    assert node.eval(in_args, 1, meta, channel, "d") == 1
    with pytest.raises(redis.exceptions.TryAgainError):
        node.eval(in_keys, 2, meta, channel, "e")
    received: List[bytes] = [next_message(subscriber)[2] for _ in range(3)]
    assert received == [b"a", b"b", b"d"]
    redis_cluster.move_keys(key_slot(group), source, target)
    redis_cluster.end_migration(key_slot(group), target)


def test_kill_and_failover_promote_a_replica(redis_cluster_replicas: RedisCluster) -> None:
    """A replica takes over a killed master's slots and data; a shard subscriber on
    that replica keeps its subscription through the promotion. The old master,
    restarted, comes back as the replica of its successor."""
    cluster = redis_cluster_replicas
    master = cluster.masters()[0]
    (replica,) = cluster.replicas_of(master)
    group = group_on(cluster, master)
    key, channel = f"greenchan:{{{group}}}:history", f"greenchan:{{{group}}}"
    cluster.client().set(key, "replicated")
    assert cluster.node_client(master).wait(1, 5000) == 1
    subscriber = ssubscribe(cluster, replica, channel)
    assert cluster.failover(master) == replica
    assert cluster.master_of(key) == replica and master not in cluster.running()
    assert cluster.client().get(key) == b"replicated"
    assert cluster.client().spublish(channel, "after") == 1
    assert next_message(subscriber) == ("smessage", channel.encode(), b"after")
    cluster.restart(master)
    assert cluster.replicas_of(replica) == [master]


def test_manual_failover_swaps_roles(redis_cluster_replicas: RedisCluster) -> None:
    """CLUSTER FAILOVER: the replica becomes master, the master its replica, and
    Redis ``sunsubscribe``s the shard subscribers of the demoted master."""
    cluster = redis_cluster_replicas
    master = cluster.masters()[0]
    (replica,) = cluster.replicas_of(master)
    channel = f"greenchan:{{{group_on(cluster, master)}}}"
    subscriber = ssubscribe(cluster, master, channel)
    cluster.manual_failover(replica)
    assert replica in cluster.masters() and cluster.replicas_of(replica) == [master]
    assert next_message(subscriber) == ("sunsubscribe", channel.encode(), 0)
    assert cluster.healthy()
