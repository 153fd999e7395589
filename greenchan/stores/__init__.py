"""Groups of channels and broadcast: in one process, or across processes with Redis.

::

    store = MemoryChannelStore()                          # one process
    store = RedisChannelStore("redis://127.0.0.1:6379/0") # every process sharing that Redis

    @with_channel
    def room(channel):
        store.add_to_group("room:1", channel, attachment={"since_ts": 0})

    store.broadcast("room:1", "hello")   # every member, wherever it is connected

Membership is always local to the process: a store holds this process's
channels, and a channel leaves every group by itself when it closes (a close
hook, which runs before the user's ``on_close`` and does not replace it). A
group with no members is forgotten, so nothing is left behind.

A broadcast sends with ``channel.send(message, wait=False)``, which never
blocks: a member that cannot keep up is left to its own send buffer and closed
with ``CloseStatus.SLOW_CONSUMER``, and every other member still gets the
message. A long-polling member gets a complete response and leaves the group
(its channel is done); streaming, SSE and WebSocket members stay. Members are
iterated over a snapshot, because a send can close a member and change the group.

``render=fn(channel, attachment, data)`` shapes the message per member (an
``Event`` for SSE members, a filter by ``since_ts``...); it may return ``None``
to skip a member.

Greenlets only: a store is not meant to be shared between OS threads.

gevent monkey-patching
    ``MemoryChannelStore`` does no I/O and works with or without it.
    ``RedisChannelStore`` needs it (``from gevent import monkey;
    monkey.patch_all()`` first thing in the program, as gunicorn's gevent
    workers do): redis-py uses the standard library's blocking sockets and
    locks, which without patching would stop every connection of the process
    while one greenlet waits for Redis. It checks and raises ``RuntimeError``
    with that fix rather than freeze a server.

The package, one idea per file:

``groups.py``
    the ``ChannelStore`` protocol and the membership both stores share
``memory.py``
    ``MemoryChannelStore``
``redis.py``
    ``RedisChannelStore``: publishing, subscriptions, a Redis Cluster's shards
``subscriber.py``
    one subscriber connection of a Redis store and the greenlet that reads it
``redis_history.py``, ``redis_presence.py``
    the Redis store's history (join, live delivery, catch-up) and presence
``codec.py``
    the bytes a message is while it crosses processes
``history.py``
    history and resuming: ids, kept messages, the exactly-once join (its
    docstring is the design; docs/history.md is the user's side)
``presence.py``
    presence: the layout in Redis and its scripts (docs/presence.md)
"""
from __future__ import annotations

from .codec import decode, encode  # noqa: F401  (importable from here, as before the split)
from .groups import ChannelStore
from .memory import MemoryChannelStore
from .redis import RedisChannelStore, redact  # noqa: F401

__all__ = ["ChannelStore", "MemoryChannelStore", "RedisChannelStore"]
