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
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Callable, Dict, Optional, Set

try:  # Python 3.8+: typing has them
    from typing import Protocol, runtime_checkable
except ImportError:  # pragma: no cover
    from typing_extensions import Protocol, runtime_checkable  # type: ignore

import gevent
import gevent.event
import gevent.lock
from gevent.hub import get_hub, getcurrent

from .channel import Channel, Event, check_message

__all__ = ["ChannelStore", "MemoryChannelStore", "RedisChannelStore"]

log = logging.getLogger("greenchan.stores")

Render = Callable[[Channel, Any, Any], Any]


@runtime_checkable
class ChannelStore(Protocol):
    """What the stores share: groups of channels, each with an attachment."""

    def add_to_group(self, group: str, channel: Channel, attachment: Any = None) -> None:
        """Put ``channel`` in ``group`` (again: replace its attachment)."""

    def remove_from_group(self, group: str, channel: Channel) -> None:
        """Take ``channel`` out of ``group``; nothing happens if it is not in it."""

    def broadcast(self, group: str, message: Any) -> int:
        """Send ``message`` to every member of ``group``."""

    def members(self, group: str) -> Dict[Channel, Any]:
        """A copy of ``{channel: attachment}`` for this process's members."""


class _Groups:
    """Local membership, shared by both stores: groups, attachments, close hooks."""

    def __init__(self, render: Optional[Render] = None) -> None:
        if render is not None and not callable(render):
            raise TypeError("render must be a function render(channel, attachment, data)")
        self.render = render
        # group -> {channel: attachment}; a group exists only while it has members.
        self._groups: Dict[str, Dict[Channel, Any]] = {}
        # channel -> the groups it is in, so closing leaves them all in one step.
        self._memberships: Dict[Channel, Set[str]] = {}

    def add_to_group(self, group: str, channel: Channel, attachment: Any = None) -> None:
        """Put ``channel`` in ``group`` with ``attachment``; it leaves when it closes.

        Adding a channel that is already a member replaces its attachment.
        Adding a closed channel does nothing.
        """
        if not isinstance(group, str):
            raise TypeError(f"a group name is a str, not {type(group).__name__}")
        if not channel.is_open:
            return
        created = group not in self._groups
        members = self._groups.setdefault(group, {})
        members[channel] = attachment
        groups = self._memberships.get(channel)
        if groups is None:
            groups = self._memberships[channel] = set()
            # One hook per channel and store, whatever the number of groups.
            channel._add_close_hook(self._channel_closed)
        groups.add(group)
        if created:
            self._group_created(group)

    def remove_from_group(self, group: str, channel: Channel) -> None:
        """Take ``channel`` out of ``group``; nothing happens if it is not in it."""
        groups = self._memberships.get(channel)
        if groups is None or group not in groups:
            return
        groups.discard(group)
        if not groups:
            del self._memberships[channel]
            channel._remove_close_hook(self._channel_closed)
        self._leave(group, channel)

    def members(self, group: str) -> Dict[Channel, Any]:
        """A copy of ``{channel: attachment}``: the members in this process."""
        return dict(self._groups.get(group, ()))

    def _channel_closed(self, channel: Channel) -> None:
        for group in self._memberships.pop(channel, ()):
            self._leave(group, channel)

    def _leave(self, group: str, channel: Channel) -> None:
        members = self._groups.get(group)
        if members is None:
            return
        members.pop(channel, None)
        if not members:
            del self._groups[group]
            self._group_removed(group)

    def _group_created(self, group: str) -> None:
        """The first local member joined ``group``."""

    def _group_removed(self, group: str) -> None:
        """The last local member left ``group``."""

    def _deliver(self, group: str, data: Any, fn: Optional[Callable[[Channel, Any], Any]] = None) -> int:
        """Send to each local member of ``group``; the number of sends that went out."""
        members = self._groups.get(group)
        if not members:
            return 0
        render = self.render
        sent = 0
        # A snapshot: a send can close a member (long-polling) and so change the group.
        for channel, attachment in list(members.items()):
            try:
                if fn is not None:
                    message = fn(channel, attachment)
                elif render is not None:
                    message = render(channel, attachment, data)
                else:
                    message = data
                if message is not None and channel.send(message, wait=False):
                    sent += 1
            except Exception:
                log.exception("broadcast to %r in group %r failed", channel, group)
        return sent


class MemoryChannelStore(_Groups):
    """Groups and broadcast within one process.

    ``render=fn(channel, attachment, data)``, if given, makes each member's
    message from the broadcast data; returning ``None`` skips that member.
    Works with or without gevent monkey-patching.
    """

    def broadcast(self, group: str, message: Any) -> int:
        """Send ``message`` to every member of ``group``; return how many it reached.

        ``message`` is a ``str``, ``bytes``, response ``dict`` or ``Event``, or a
        function ``fn(channel, attachment)`` returning one per member (``None``
        skips the member; ``render`` is not applied then). The count is the
        number of members whose ``send`` took the message (a closed or cut-off
        member does not count). It never blocks.
        """
        if callable(message):
            return self._deliver(group, None, message)
        if self.render is None:
            check_message(message)
        return self._deliver(group, message)


# -- the wire format of RedisChannelStore --------------------------------------
#
# One tag byte, then the payload, so that the common case (text) costs one byte:
#   b"s" + UTF-8 text                         str
#   b"b" + the bytes                          bytes, bytearray, memoryview
#   b"e" + JSON {event,id,retry} + b"\n" + UTF-8 data                 Event
#   b"d" + JSON {status,headers,body: "s"|"b"|null} + b"\n" + body    response dict
# Compact JSON never contains a raw newline, so the first b"\n" ends it.

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(message: Any) -> bytes:
    """The bytes a ``RedisChannelStore`` publishes for ``message``."""
    if isinstance(message, str):
        return b"s" + message.encode()
    if isinstance(message, (bytes, bytearray, memoryview)):
        return b"b" + bytes(message)
    if isinstance(message, Event):
        fields = {k: getattr(message, k) for k in ("event", "id", "retry") if getattr(message, k) is not None}
        return b"e" + _JSON.encode(fields).encode() + b"\n" + message.data.encode()
    if isinstance(message, dict):
        check_message(message)
        body = message.get("body")
        meta: Dict[str, Any] = {}
        if "status" in message:
            meta["status"] = int(message["status"])
        headers = message.get("headers")
        if headers is not None:
            items = headers.items() if hasattr(headers, "items") else headers
            meta["headers"] = [[str(k), str(v)] for k, v in items]
        if isinstance(body, str):
            meta["body"], raw = "s", body.encode()
        elif body is not None:
            meta["body"], raw = "b", bytes(body)
        else:
            raw = b""
        return b"d" + _JSON.encode(meta).encode() + b"\n" + raw
    check_message(message)  # raises the TypeError that says what can be sent
    raise TypeError(f"cannot broadcast {type(message).__name__}")  # pragma: no cover


def decode(payload: bytes) -> Any:
    """The message ``encode`` made ``payload`` from."""
    tag, rest = payload[:1], payload[1:]
    if tag == b"s":
        return rest.decode()
    if tag == b"b":
        return bytes(rest)
    head, _, raw = rest.partition(b"\n")
    meta = json.loads(head)
    if tag == b"e":
        return Event(raw.decode(), event=meta.get("event"), id=meta.get("id"), retry=meta.get("retry"))
    if tag == b"d":
        message: Dict[str, Any] = {}
        if "status" in meta:
            message["status"] = meta["status"]
        if "headers" in meta:
            message["headers"] = [tuple(pair) for pair in meta["headers"]]
        kind = meta.get("body")
        if kind == "s":
            message["body"] = raw.decode()
        elif kind == "b":
            message["body"] = bytes(raw)
        return message
    raise ValueError(f"unknown greenchan message tag {tag!r}")


class RedisChannelStore(_Groups):
    """Groups whose broadcasts reach members in every process sharing a Redis.

    Membership stays local; a broadcast is a Redis ``PUBLISH`` on
    ``prefix + group``, and each process delivers it to its own members from
    its subscription, its own included, so every member sees one order.

    Each store keeps ONE subscriber connection to Redis, read by one greenlet,
    subscribed to the groups that have members in this process (subscribed when
    the first local member joins, unsubscribed when the last leaves), plus a
    small pool for ``PUBLISH``. Both are opened lazily, so a store created
    before a gunicorn fork belongs to each worker after it.

    If Redis goes away, the store logs a WARNING once, reconnects with
    exponential backoff (``reconnect_min`` doubling up to ``reconnect_max``
    seconds), resubscribes every current group and logs the recovery at INFO.
    Until then ``broadcast`` raises ``redis.exceptions.ConnectionError``: no
    member gets that message, and the caller knows. Messages published by
    others while this process is disconnected are not delivered here (Redis
    pub/sub keeps no history).

    Needs gevent monkey-patching (see the module docstring). Options:
    ``prefix`` namespaces the Redis channels; ``render`` as for
    ``MemoryChannelStore``, applied in each process, in the reader greenlet
    (so it must not block: it holds up every delivery); ``socket_timeout`` bounds
    a ``PUBLISH`` and each connection attempt; ``subscribe_timeout`` bounds how
    long ``add_to_group`` waits for Redis to confirm a new subscription.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        render: Optional[Render] = None,
        *,
        prefix: str = "greenchan:",
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        socket_timeout: float = 5.0,
        subscribe_timeout: float = 5.0,
    ) -> None:
        from gevent import monkey

        if not monkey.is_module_patched("socket"):
            raise RuntimeError(
                "RedisChannelStore needs gevent monkey-patching, because redis-py uses "
                "blocking sockets: put `from gevent import monkey; monkey.patch_all()` "
                "first in your program (gunicorn's gevent workers do it for you), or "
                "use MemoryChannelStore in a single process"
            )
        import redis  # an optional dependency: imported only when used

        super().__init__(render)
        self.url = url
        self.prefix = prefix
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.socket_timeout = socket_timeout
        self.subscribe_timeout = subscribe_timeout
        self._redis = redis
        # Set when the reader greenlet's connection is subscribed and confirmed;
        # broadcast refuses while it is not, since this process's own members
        # would silently miss the message.
        self._up = False
        # Set after the first connection attempt, so that a broadcast right
        # after start waits for it instead of failing.
        self._tried = gevent.event.Event()
        self._conn: Any = None  # the subscriber connection, while connected
        self._subscribed: Set[str] = set()  # groups SUBSCRIBEd on _conn
        # Redis channel -> flag set when its SUBSCRIBE is confirmed.
        self._confirm: Dict[bytes, gevent.event.Event] = {}
        # Several greenlets write on the one subscriber socket; one at a time.
        self._write_lock = gevent.lock.RLock()
        self._reader: Optional[gevent.Greenlet] = None
        self._publisher: Any = None
        self._pid = 0
        self._closed = False
        # True between sending the PING that ends a (re)subscription and its reply.
        self._ping_pending = False
        # An outage is logged once at WARNING, its end once at INFO.
        self._outage_logged = False
        self._delay = reconnect_min

    # -- public ------------------------------------------------------------------

    def broadcast(self, group: str, message: Any) -> int:
        """Publish ``message`` to ``group`` in every process.

        ``message`` is a ``str``, ``bytes``, response ``dict`` or ``Event``.
        Delivery to members happens in each process from its subscription, after
        this returns, so the count returned is not of members: it is the number
        of processes (Redis subscribers) that received the message, this one
        included when it has members. Raises ``redis.exceptions.ConnectionError``
        while Redis cannot be reached or this store's subscription is down.
        """
        if callable(message):
            raise TypeError(
                "RedisChannelStore.broadcast got a function: a function cannot cross "
                "processes; pass data and give the store render=fn(channel, attachment, data)"
            )
        payload = encode(message)
        self._start()
        if not self._up:
            self._tried.wait(self.socket_timeout)
        if not self._up:
            raise self._redis.exceptions.ConnectionError(
                f"Redis at {self.url} cannot be reached (reconnecting); the message was not sent"
            )
        try:
            return int(self._publisher.publish(self._key(group), payload))
        except self._redis.exceptions.ConnectionError:
            raise
        except (self._redis.exceptions.TimeoutError, OSError) as exc:
            raise self._redis.exceptions.ConnectionError(f"PUBLISH to {self.url} failed: {exc}") from exc

    def add_to_group(self, group: str, channel: Channel, attachment: Any = None) -> None:
        """As ``MemoryChannelStore.add_to_group``; the first member subscribes.

        Called from a greenlet, it returns once Redis confirmed the subscription
        (or after ``subscribe_timeout``), so a broadcast made right after it, from
        any process, reaches the new member.
        """
        self._start()
        super().add_to_group(group, channel, attachment)
        flag = self._confirm.get(self._key(group))
        if flag is None or getcurrent() is get_hub():
            return
        if not self._tried.is_set():  # just started: wait for the first connection
            self._tried.wait(self.subscribe_timeout)
        if self._up:  # during an outage the reconnection subscribes it
            flag.wait(self.subscribe_timeout)

    def close(self) -> None:
        """Stop the reader greenlet, close the connections and forget every group."""
        self._closed = True
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.kill(block=True, timeout=self.socket_timeout)
        self._drop_connection()
        if self._publisher is not None:
            self._publisher.connection_pool.disconnect()
            self._publisher = None
        for channel in list(self._memberships):
            channel._remove_close_hook(self._channel_closed)
        self._memberships.clear()
        self._groups.clear()
        self._up = False

    # -- subscriptions -------------------------------------------------------------

    def _key(self, group: str) -> bytes:
        return (self.prefix + group).encode()

    def _group_created(self, group: str) -> None:
        key = self._key(group)
        if key not in self._confirm:
            self._confirm[key] = gevent.event.Event()
        self._sync(group)

    def _group_removed(self, group: str) -> None:
        flag = self._confirm.pop(self._key(group), None)
        if flag is not None:
            flag.set()
        self._sync(group)

    def _sync(self, group: str) -> None:
        """Make the subscription of ``group`` match whether it has local members."""
        if (group in self._groups) == (group in self._subscribed) or self._conn is None:
            return  # nothing to do, or the reconnection will subscribe what is due
        if getcurrent() is get_hub():  # a close hook in the hub: no I/O here
            gevent.spawn(self._sync, group)
            return
        with self._write_lock:
            conn = self._conn
            want = group in self._groups
            if conn is None or want == (group in self._subscribed):
                return
            try:
                conn.send_command("SUBSCRIBE" if want else "UNSUBSCRIBE", self._key(group), check_health=False)
            except (self._redis.exceptions.RedisError, OSError) as exc:
                log.debug("subscription change for %r failed: %s", group, exc)
                conn.disconnect()  # the reader sees it and reconnects
                return
            if want:
                self._subscribed.add(group)
            else:
                self._subscribed.discard(group)

    # -- the reader greenlet ------------------------------------------------------

    def _start(self) -> None:
        """Start the reader greenlet (again after a fork)."""
        if self._closed:
            raise RuntimeError("this RedisChannelStore is closed")
        pid = os.getpid()
        if self._pid == pid and self._reader is not None:
            return
        self._pid = pid
        self._conn = None
        self._subscribed = set()
        self._up = False
        self._tried = gevent.event.Event()
        redis = self._redis
        self._publisher = redis.Redis.from_url(
            self.url,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            client_name=f"greenchan-pub-{pid}",
        )
        self._reader = gevent.spawn(self._run)

    def _connect(self) -> Any:
        redis = self._redis
        kwargs = redis.connection.parse_url(self.url)
        cls = kwargs.pop("connection_class", redis.connection.Connection)
        kwargs.update(
            socket_timeout=None,  # the reader waits for messages as long as it takes
            socket_connect_timeout=self.socket_timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            client_name=f"greenchan-sub-{os.getpid()}",
        )
        conn = cls(**kwargs)
        conn.connect()
        return conn

    def _run(self) -> None:
        """Connect, subscribe, read; on failure back off and do it again."""
        errors = (self._redis.exceptions.RedisError, OSError)
        self._delay = self.reconnect_min
        while not self._closed:
            try:
                conn = self._connect()
                with self._write_lock:
                    self._conn = conn
                    self._subscribed = set(self._groups)
                    keys = [self._key(g) for g in self._subscribed]
                    for i in range(0, len(keys), 1000):
                        conn.send_command("SUBSCRIBE", *keys[i:i + 1000], check_health=False)
                    # Redis answers in order: the PING's reply means every
                    # SUBSCRIBE above is in effect, and the store is up.
                    conn.send_command("PING", check_health=False)
                    self._ping_pending = True
                self._read(conn)
            except errors as exc:
                self._drop_connection()
                self._up = False
                if not self._outage_logged:
                    self._outage_logged = True
                    log.warning(
                        "Redis at %s unreachable (%s): broadcasts raise ConnectionError "
                        "until it is back; reconnecting", self.url, exc,
                    )
                else:
                    log.debug("reconnecting to Redis at %s failed: %s", self.url, exc)
            except Exception:
                log.exception("RedisChannelStore reader failed; reconnecting")
                self._drop_connection()
                self._up = False
            self._tried.set()
            gevent.sleep(self._delay)
            self._delay = min(self._delay * 2, self.reconnect_max)

    def _read(self, conn: Any) -> None:
        """Read the subscriber connection until it fails."""
        # RESP3 (redis-py 5's option, 8's default) delivers pub/sub replies as
        # push messages, which read_response swallows unless asked for them.
        params = inspect.signature(conn.read_response).parameters
        kwargs = {"push_request": True} if "push_request" in params else {}
        while True:
            reply = conn.read_response(**kwargs)
            if isinstance(reply, list) and reply:
                kind = reply[0]
                if kind == b"message":
                    self._on_message(reply[1], reply[2])
                    continue
                if kind == b"subscribe":
                    flag = self._confirm.pop(reply[1], None)
                    if flag is not None:
                        flag.set()
                    continue
                if kind != b"pong":
                    continue
            elif reply != b"PONG":
                continue
            if self._ping_pending:
                self._connected()

    def _connected(self) -> None:
        """Every SUBSCRIBE sent on connecting is in effect: the store is up."""
        self._ping_pending = False
        for key in list(self._confirm):
            self._confirm.pop(key).set()
        self._up = True
        self._delay = self.reconnect_min
        self._tried.set()
        if self._outage_logged:
            self._outage_logged = False
            log.info("Redis at %s is back; resubscribed %d group(s)", self.url, len(self._subscribed))
        # Groups that came or went while the bulk SUBSCRIBE was on its way.
        for group in set(self._groups) ^ self._subscribed:
            self._sync(group)

    def _on_message(self, key: bytes, payload: bytes) -> None:
        group = key[len(self.prefix.encode()):].decode()
        if group not in self._groups:
            return  # unsubscribed while the message was on its way
        try:
            data = decode(payload)
        except Exception:
            log.exception("undecodable message on Redis channel %r dropped", key)
            return
        self._deliver(group, data)

    def _drop_connection(self) -> None:
        with self._write_lock:
            conn, self._conn = self._conn, None
            self._subscribed = set()
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:
                pass
