"""``RedisChannelStore``: groups whose broadcasts reach every process sharing a Redis."""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional, Set, Tuple
from urllib.parse import unquote, urlsplit, urlunsplit

import gevent
import gevent.event
import gevent.lock
from gevent.hub import get_hub, getcurrent

from .. import counters
from ..channel import Channel
from .codec import decode, encode
from .groups import Render, _Groups
from .history import EPOCH_RETENTION, PUBLISH_LUA, Cursor, _observe_resume, check_options, make_id, new_epoch, tell_resumed
from .presence import presence_entry
from .redis_history import SHAS, RedisHistory
from .redis_presence import RedisPresence
from .subscriber import Subscriber

log = logging.getLogger("greenchan.stores")

# A password may also ride in the query string (redis-py reads ?password=).
_QUERY_SECRET = re.compile(r"(?i)((?:^|&)password=)[^&]*")


def redact(url: str) -> str:
    """``url`` with its credentials replaced by ``***``: what logs and errors show.

    ``redis://user:secret@host:6379/0`` becomes ``redis://***@host:6379/0``, and a
    ``password=`` query parameter becomes ``password=***``, because log files and
    error reports travel further than the configuration they came from.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable Redis URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = _QUERY_SECRET.sub(r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secrets(url: str) -> Set[str]:
    """The credential strings of ``url`` (raw and decoded), to scrub from error texts."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return set()
    found = set()
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    if ":" in userinfo:
        found.add(userinfo.partition(":")[2])
    for match in re.finditer(r"(?i)(?:^|&)password=([^&]*)", parts.query):
        found.add(match.group(1))
    found |= {unquote(value) for value in found}
    return {value for value in found if value}



class RedisChannelStore(RedisHistory, RedisPresence, _Groups):
    """Groups whose broadcasts reach members in every process sharing a Redis.

    Membership stays local; a broadcast is a Redis ``PUBLISH`` on
    ``prefix + group``, and each process delivers it to its own members from
    its subscription, its own included, so every member sees one order.

    Each store keeps ONE subscriber connection to Redis (subscriber.py), read by one greenlet,
    subscribed to the groups that have members in this process (subscribed when
    the first local member joins, unsubscribed when the last leaves) and to the
    channels of greenchan.js sessions held here (forwarding.py), plus a
    small pool for ``PUBLISH``. Both are opened lazily, so a store created
    before a gunicorn fork belongs to each worker after it.

    If Redis goes away, the store logs a WARNING once, reconnects with
    exponential backoff (``reconnect_min`` doubling up to ``reconnect_max``
    seconds), resubscribes every current group and logs the recovery at INFO.
    Until then ``broadcast`` raises ``redis.exceptions.ConnectionError``: no
    member gets that message, and the caller knows. Messages published by
    others while this process is disconnected are not delivered here (Redis
    pub/sub keeps no history): when an established subscriber connection is
    lost, the WARNING says so, since that is a loss for this process's members.
    Redis itself cuts a subscriber whose output buffer passes
    ``client-output-buffer-limit pubsub`` (a burst of large broadcasts that the
    reader could not keep up with): the same WARNING reports it.

    Credentials never reach a log or an exception: ``url`` (the attribute) and
    every message show the URL with its user and password replaced by ``***``.
    A wrong or missing password is an ERROR logged once ("authentication
    failed"), and ``broadcast`` raises ``redis.exceptions.AuthenticationError``
    (a ``ConnectionError``) saying so; the store keeps retrying, in case the
    password is changed on the server.

    ``max_message_size`` (bytes, default 1 MiB; ``None``: no check) bounds an
    encoded message: ``broadcast`` raises ``ValueError`` before publishing a
    larger one, because Redis would deliver it to no process. A subscriber is
    cut when its pub/sub output buffer passes 32 MiB at once or stays over 8 MiB
    for 60 s (Redis's default ``client-output-buffer-limit pubsub 32mb 8mb
    60``): a message over 32 MiB is never delivered anywhere, and a few of
    8 MiB in a row cut any subscriber that is momentarily busy. 1 MiB is the
    server's own default ``max_message_size`` and ``send_buffer``, so a member
    could take it in one piece, and it leaves room for 8 such messages in
    flight per subscriber under the soft limit. Raise it only together with
    Redis's limit.

    ``history=N`` keeps each group's newest ``N`` broadcasts in Redis (a stream
    per group, ``history_ttl=S`` seconds at most), for every process: a client
    resumes with ``add_to_group(..., since=id)`` on whichever process it comes
    back to, and after a lost subscriber connection the members of this process
    get what they missed from it. See greenchan/stores/history.py for the ids
    and the exactly-once join. ``history=0`` (the default) keeps nothing and
    publishes exactly as a store without history.

    On a **Redis Cluster** (``url`` ``redis+cluster://host:port``, any node, or a
    ``redis.cluster.RedisCluster``) a broadcast is an ``SPUBLISH`` that only the
    group's shard carries, the store keeps one ``SSUBSCRIBE`` connection per
    master owning a group with members here, and every key and channel of a
    group has the group's name in braces (one slot: each script stays on one
    node). It follows failovers and moved slots, and with history gives the
    members what they missed meanwhile; see docs/cluster.md.

    Needs gevent monkey-patching (see the module docstring). Options:
    ``prefix`` namespaces the Redis channels; ``render`` as for
    ``MemoryChannelStore``, applied in each process, in the reader greenlet
    (so it must not block: it holds up every delivery); ``socket_timeout`` bounds
    a ``PUBLISH`` and each connection attempt; ``subscribe_timeout`` bounds how
    long ``add_to_group`` waits for Redis to confirm a new subscription.
    """

    #: The default ``max_message_size``: see the class docstring for why.
    MAX_MESSAGE_SIZE = 1 << 20

    def __init__(
        self,
        url: Any = "redis://127.0.0.1:6379/0",
        render: Optional[Render] = None,
        *,
        prefix: str = "greenchan:",
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        socket_timeout: float = 5.0,
        subscribe_timeout: float = 5.0,
        max_message_size: Optional[int] = MAX_MESSAGE_SIZE,
        history: int = 0,
        history_ttl: Optional[float] = None,
        presence_ttl: float = 30.0,
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

        check_options(history, history_ttl)
        super().__init__(render)
        self.history_size = history
        self.history_ttl = history_ttl
        self._ttl_ms = int(history_ttl * 1000) if history_ttl else 0
        # How long a silent group's meta key (epoch, position) outlives its messages.
        self._retention_ms = max(self._ttl_ms, EPOCH_RETENTION * 1000) if history_ttl else 0
        # group -> {channel: Cursor}: where each local member is in its group's
        # sequence (history on only), so that no message reaches it twice.
        self._cursors: Dict[str, Dict[Channel, Cursor]] = {}
        # group -> the position of the newest live message read here. A member
        # without a cursor of its own is in step: that is its position too.
        self._live: Dict[str, Cursor] = {}
        # One catch-up after a reconnection at a time.
        self._catch_up_lock = gevent.lock.Semaphore()
        # group -> (stream, meta, pub/sub channel): the names a broadcast uses, made once.
        self._keys: Dict[str, Tuple[bytes, bytes, bytes]] = {}
        # What each broadcast passes the publish script, encoded once.
        self._publish_args = [str(history).encode(), str(self._ttl_ms).encode(), str(self._retention_ms).encode()]
        # What logs and errors show; the real URL stays private.
        # A Redis Cluster: a URL redis+cluster:// (rediss+cluster:// with TLS),
        # or a redis.cluster.RedisCluster already made.
        self._cluster_client: Any = None
        if isinstance(url, redis.cluster.RedisCluster):
            self._cluster_client, url = url, "redis+cluster://%s:%s" % _first_node(url)
        elif not isinstance(url, str):
            raise TypeError(f"RedisChannelStore takes a Redis URL or a redis.cluster.RedisCluster, not {type(url).__name__}")
        self._cluster = urlsplit(url).scheme.lower() in ("redis+cluster", "rediss+cluster")
        if self._cluster and ("{" in prefix or "}" in prefix):
            raise ValueError(
                f"prefix {prefix!r} has a brace: on a Redis Cluster the group's name in braces "
                "decides its shard, and a brace in the prefix would put every group on one"
            )
        # What logs and errors show; the real URL stays private.
        self.url = redact(url)
        self._url = url
        self._secrets = _secrets(url)
        self.max_message_size = max_message_size
        self.prefix = prefix
        self._prefix = prefix.encode()
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.socket_timeout = socket_timeout
        self.subscribe_timeout = subscribe_timeout
        self._redis = redis
        # The subscriber connections (subscriber.py): the home one (None), for
        # everything on one Redis and for the presence events on a cluster, and
        # on a cluster one per master owning a group with members here.
        self._links: Dict[Any, Subscriber] = {}
        # (host, port) -> a plain client of that cluster master, for broadcasts
        self._masters: Dict[Tuple[str, int], Any] = {}
        # channel -> the subscriber it is subscribed on (a cluster's shard)
        self._placed: Dict[bytes, Subscriber] = {}
        # channel -> fn(payload): what else listens on the subscriber connections
        # (session forwarding, forwarding.py)
        self._listeners: Dict[bytes, Callable[[bytes], None]] = {}
        # One look at a changed cluster at a time; another is due if asked meanwhile.
        self._rebalance_lock = gevent.lock.Semaphore()
        self._rebalance_due = False
        self._publisher: Any = None
        self._pid = 0
        self._closed = False
        # Set while Redis refuses our credentials: what broadcast raises; the
        # ERROR is logged once per such episode.
        self._auth_error: Optional[str] = None
        self._auth_logged = False
        counters.stores.add(self)  # greenchan_store_up, the health check
        self._init_presence(prefix, presence_ttl)

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
        if self._cluster:
            self._check_group(group)
        payload = encode(message)
        self._check_size(payload)
        self._start()
        # This process's own members would silently miss a message published
        # while their subscription is down: refuse it, and the caller knows.
        link = self._placed.get(self._key(group)) if self._cluster else self._links.get(None)
        if link is not None and not link.up:
            link.tried.wait(self.socket_timeout)
            if not link.up:
                raise self._down_error()
        if self._publisher is None:
            raise self._down_error()
        exceptions = self._redis.exceptions
        try:
            if not self.history_size:
                key = self._key(group)
                return int(self._direct(key, self._publish_verb, key, payload))
            # One round trip: number, keep and publish in one script.
            size, ttl, retention = self._publish_args
            keys = self._keys.get(group)
            if keys is None:
                if len(self._keys) >= 4096:
                    self._keys.clear()  # a bound, not an eviction policy: they are cheap to make
                history_key, meta_key = self._history_keys(group)
                keys = self._keys[group] = (history_key, meta_key, self._key(group))
            stream, meta, channel = keys
            args = (stream, meta, channel, payload, size, ttl, new_epoch(), retention, self._publish_verb)
            return int(self._direct(stream, "EVALSHA", SHAS[PUBLISH_LUA], 2, *args))
        except exceptions.NoScriptError:  # Redis lost it (a restart, a new master): once more
            self._execute("SCRIPT LOAD", PUBLISH_LUA)
            return int(self._publisher.execute_command("EVALSHA", SHAS[PUBLISH_LUA], 2, *args))
        except exceptions.AuthenticationError as exc:
            raise exceptions.AuthenticationError(
                f"PUBLISH to {self.url}: authentication failed ({self._scrub(exc)}); "
                "check the user and password in the store's URL; the message was not sent"
            ) from None
        except self._down_errors as exc:
            # Scrubbed, and not chained: the original text is not ours to trust.
            raise exceptions.ConnectionError(
                f"PUBLISH to {self.url} failed: {self._scrub(exc)}"
            ) from None

    def add_to_group(
        self, group: str, channel: Channel, attachment: Any = None, *, since: Optional[str] = None,
        presence: Any = None,
    ) -> bool:
        """As ``MemoryChannelStore.add_to_group``; see ``_add``.

        With ``presence`` (a key or ``(key, meta)``, checked first), the channel
        is present in the group for every process: one Redis round trip (a
        script). While Redis cannot be reached the channel still joins, and the
        refresh registers it once Redis is back.
        """
        entry = None if presence is None else presence_entry(presence)
        result = self._add(group, channel, attachment, since)
        if entry is not None and self._is_member(group, channel):
            self._set_presence(group, channel, entry)
        return result

    def _add(self, group: str, channel: Channel, attachment: Any, since: Optional[str]) -> bool:
        """As ``MemoryChannelStore.add_to_group``; the first member subscribes.

        Called from a greenlet, it returns once Redis confirmed the subscription
        (or after ``subscribe_timeout``), so a broadcast made right after it, from
        any process, reaches the new member. With history, the replay after
        ``since`` comes from Redis, whichever process the client was on before,
        and the join is exactly-once against broadcasts from every process (see
        greenchan/stores/history.py). While Redis cannot be reached, the channel
        joins live and a ``since`` gets False: continuity cannot be checked.
        """
        self._check_group(group)
        self._start()
        if not self.history_size:
            joined = self._join(group, channel, attachment)
            if joined:
                self._wait_subscribed(group)
            if since is None:
                return joined
            _observe_resume(False)
            if joined:
                tell_resumed(channel, group, False)
            return False
        if self._is_member(group, channel):
            self._groups[group][channel] = attachment
            return True
        if not channel.is_open:
            return False
        # The cursor first, buffering: from the moment the channel is a member,
        # every live message for it waits there until the replay is done.
        cursor = Cursor()
        self._cursors.setdefault(group, {})[channel] = cursor
        if not self._join(group, channel, attachment):
            self._forget_cursor(group, channel)
            return False
        try:
            recovered = self._resume(group, channel, attachment, cursor, since)
        except BaseException:  # a member never stays buffering (it would hear nothing)
            if cursor.buffer is not None and self._cursors.get(group, {}).get(channel) is cursor:
                self._flush(group, channel, attachment, cursor, force=True)
            raise
        if since is not None:
            _observe_resume(recovered)
            if channel.is_open:
                tell_resumed(channel, group, recovered)
        return recovered

    def history(self, group: str, since: Optional[str] = None) -> Optional[List[Tuple[str, Any]]]:
        """The kept messages of ``group`` after ``since`` (all if None), oldest first.

        ``[(id, message), ...]`` read from Redis (every process's broadcasts);
        None when ``since`` cannot be continued (and always for a ``since`` when
        the store keeps no history). Raises ``redis.exceptions.ConnectionError``
        while Redis cannot be reached.
        """
        self._check_group(group)
        if not self.history_size:
            return [] if since is None else None
        self._start()
        try:
            snap, entries = self._snapshot(group, since, create=False, latest=True)
        except self._redis.exceptions.AuthenticationError as exc:
            raise self._redis.exceptions.AuthenticationError(self._scrub(exc)) from None
        except self._down_errors as exc:
            raise self._redis.exceptions.ConnectionError(
                f"reading the history of {group!r} from {self.url} failed: {self._scrub(exc)}"
            ) from None
        if snap is None or entries is None:
            return [] if since is None else None
        prefix = make_id(group, snap.epoch, "")
        return [(prefix + e.sid, decode(e.payload)) for e in entries]

    def close(self) -> None:
        """Stop the reader greenlet, close the connections and forget every group."""
        try:
            self._leave_presence_on_close()
        except Exception as exc:  # best effort: the TTL takes the entries out; close goes on
            log.debug("taking this process's presence out on close failed: %s", self._scrub(exc))
        self._closed = True
        counters.stores.discard(self)  # closed is not down: the gauge and the health check forget it
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.kill(block=False)
        links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
        self._placed.clear()
        self._listeners.clear()
        self._drop_masters()
        if self._publisher is not None:
            if self._cluster:
                self._publisher.close()
            else:
                self._publisher.connection_pool.disconnect()
            self._publisher = None
        for channel in list(self._memberships):
            channel._remove_close_hook(self._channel_closed)
        self._memberships.clear()
        self._groups.clear()
        self._cursors.clear()
        self._live.clear()

    # -- subscriptions (the connections themselves: subscriber.py) -------------------

    def _key(self, group: str) -> bytes:
        """The pub/sub channel of ``group``; on a cluster, in braces: the group's slot."""
        return (self.prefix + ("{%s}" % group if self._cluster else group)).encode()

    def _group_of(self, key: bytes) -> str:
        name = key[len(self._prefix):].decode()
        return name[1:-1] if self._cluster else name

    def _check_group(self, group: Any) -> None:
        super()._check_group(group)
        if self._cluster and (not group or group.startswith("}")):
            # "{}..." is no hash tag: the group's keys would fall on different shards.
            raise ValueError(f"on a Redis Cluster a group's name is not empty and does not start with '}}': {group!r}")

    def _channels(self) -> List[bytes]:
        """Every pub/sub channel this process needs: its groups', and its listeners'."""
        return [self._key(g) for g in self._groups] + list(self._listeners)

    def _needs(self, key: bytes) -> bool:
        return key in self._listeners or self._group_of(key) in self._groups

    def _link_of(self, key: bytes) -> Optional[Subscriber]:
        """The subscriber ``key`` is (to be) subscribed on; None while the cluster is unknown."""
        if not self._cluster:
            return self._links.get(None)
        link = self._placed.get(key)
        if link is None and self._needs(key):
            node = self._owner(key)
            if node is not None:
                link = self._placed[key] = self._shard(node)
        return link

    def _wants(self, link: Subscriber, key: bytes) -> bool:
        """Whether ``link`` should be subscribed to ``key`` now."""
        if key == self._events_key:
            return link is self._links.get(None) and bool(self._presence_fns)
        if link.sharded != self._cluster:
            return False
        return self._needs(key) and (not self._cluster or self._placed.get(key) is link)

    def _wanted(self, link: Subscriber) -> List[bytes]:
        """Every channel ``link`` should be subscribed to: what it subscribes on connecting."""
        keys = []
        if link.sharded == self._cluster:
            keys = [k for k in self._channels() if not self._cluster or self._placed.get(k) is link]
        if self._presence_fns and link is self._links.get(None):
            keys.append(self._events_key)
        return keys

    def _group_created(self, group: str) -> None:
        self._subscribe(self._key(group))

    def _group_removed(self, group: str) -> None:
        self._unsubscribe(self._key(group))

    def _subscribe(self, key: bytes) -> None:
        link = self._link_of(key)
        if link is None:
            return  # the cluster is unreachable: placed when it is back
        if key in link.subscribed:
            # Wanted again before the UNSUBSCRIBE of its last leave went out
            # (deferred from the hub, or waiting for the write lock): the
            # subscription never stopped.
            return
        link.expect(key)
        link.sync(key)

    def _unsubscribe(self, key: bytes) -> None:
        link = self._placed.pop(key, None) if self._cluster else self._links.get(None)
        if link is not None:
            link.release(key)
            link.sync(key)

    def _wait_subscribed(self, group: str) -> bool:
        """Wait until Redis confirmed ``group``'s subscription; True if it is in effect."""
        return self._wait_for(self._key(group), f"group {group!r}")

    def _wait_for(self, key: bytes, what: str) -> bool:
        """Wait until Redis confirmed ``key``'s subscription; True if it is in effect.

        From a greenlet only (the hub cannot wait), at most ``subscribe_timeout``;
        during an outage it does not wait (the reconnection subscribes).
        """
        if getcurrent() is get_hub():
            return False
        link = self._link_of(key)
        if link is None:
            return False
        if link.wait(key, self.subscribe_timeout):
            return True
        if link.up and key in link.confirm:
            log.warning(
                "Redis did not confirm the subscription to %s within subscribe_timeout "
                "(%s s): a message published now may not reach it", what, self.subscribe_timeout,
            )
        return False

    def _listen(self, channel: str, fn: Callable[[bytes], None]) -> None:
        """Call ``fn(payload)`` for each message on the pub/sub ``channel`` (on a cluster,
        a shard channel: give it a hash tag). For greenchan's own use (sessions across
        processes): it rides on the store's subscriber connections and outages."""
        key = channel.encode()
        self._start()
        self._listeners[key] = fn
        self._subscribe(key)
        self._wait_for(key, f"channel {channel!r}")

    def _unlisten(self, channel: str) -> None:
        key = channel.encode()
        if self._listeners.pop(key, None) is not None:
            self._unsubscribe(key)

    def _execute(self, *args: Any) -> Any:
        """One command to Redis (routed by its key on a cluster), for greenchan's own use."""
        self._start()
        if self._publisher is None:
            raise self._down_error()
        return self._publisher.execute_command(*args)

    def _watch_events(self) -> None:
        """Subscribe to the presence events; from a greenlet, wait for Redis to confirm."""
        home = self._links.get(None)
        if home is None:
            return
        home.expect(self._events_key)
        home.sync(self._events_key)
        if getcurrent() is not get_hub():
            home.wait(self._events_key, self.subscribe_timeout)

    @property
    def _up(self) -> bool:
        """Every subscriber connection is up (``greenchan_store_up``, the health check)."""
        links = list(self._links.values())
        return bool(links) and all(link.up for link in links)

    # -- a cluster: which master owns a group, and following it when that changes ------

    def _owner(self, key: bytes) -> Optional[Tuple[str, int]]:
        """(host, port) of the master owning ``key``'s slot, as the cluster client knows it."""
        if self._publisher is None:
            return None
        try:
            node = self._publisher.get_node_from_key(key)
        except Exception as exc:  # a slot no node covers (a failover), or no topology yet
            log.debug("no owner known for %r: %s", key, exc)
            return None
        return (node.host, node.port)

    def _shard(self, node: Tuple[str, int]) -> Subscriber:
        link = self._links.get(node)
        if link is None:
            link = self._links[node] = Subscriber(self, node, sharded=True)
        return link

    def _shard_moved(self, link: Subscriber, key: bytes) -> None:
        """A master unsubscribed us from ``key``: its slot moved. Follow it."""
        log.info("Redis Cluster moved channel %r away from %s:%s; following it", key, *link.node)
        self._rebalance_soon()

    def _link_down(self, link: Subscriber) -> None:
        """A subscriber connection failed: on a cluster, its master may have changed."""
        if self._cluster and not self._closed:
            self._rebalance_soon()

    def _rebalance_soon(self) -> None:
        self._rebalance_due = True
        if not self._rebalance_lock.locked():
            gevent.spawn(self._rebalance)

    def _rebalance(self) -> None:
        """Read the cluster's slots again, and move each channel to the master that owns it.

        A group that moved (a failover, a resharding) or that a master
        unsubscribed is subscribed on its new owner; once that is confirmed, its
        members get from the history what was published in between (a catch-up,
        as after an outage). Masters left with nothing of ours are let go.
        """
        with self._rebalance_lock:
            self._rebalance_due, again = True, False
            while self._rebalance_due and not self._closed:
                if again:  # asked again meanwhile: let the cluster settle a moment
                    gevent.sleep(0.05)
                self._rebalance_due, again = False, True
                moved = self._replace()
                for key in moved:
                    link = self._placed.get(key)
                    if link is not None:
                        link.wait(key, self.subscribe_timeout)
                groups = [g for g in map(self._group_of, moved) if g in self._groups]
                if groups and self.history_size:
                    self._catch_up(groups)
                elif groups:
                    log.warning(
                        "Redis Cluster moved %d group(s) of this process to another master "
                        "(%s): messages published to them meanwhile are lost for this "
                        "process's members (the store keeps no history)",
                        len(groups), ", ".join(sorted(groups)[:10]),
                    )

    def _replace(self) -> List[bytes]:
        """Place every channel on its owner's subscriber; the channels whose subscription moved."""
        try:
            if self._publisher is None:
                self._publisher = self._new_publisher()
            else:
                self._publisher.nodes_manager.initialize()
        except Exception as exc:  # unreachable or failing over: the next attempt
            log.debug("reading the Redis Cluster's slots failed: %s", self._scrub(exc))
            return []
        moved = []
        for key in self._channels():
            node = self._owner(key)
            old = self._placed.get(key)
            if node is None:
                continue
            new = self._shard(node)
            if old is not new:
                self._placed[key] = new
                if old is not None:  # it was subscribed elsewhere: a gap to catch up
                    old.release(key)
                    old.sync(key)
                    moved.append(key)
            elif key in new.subscribed or new.conn is None:
                continue  # in effect, or on its way (the connection subscribes it)
            else:  # the master unsubscribed it (its slot moved) and owns it still, or again
                moved.append(key)
            new.expect(key)
            new.sync(key)
        for node, link in list(self._links.items()):
            if node is not None and not self._wanted(link):
                del self._links[node]
                link.close(block=False)
        return moved

    # -- connections -----------------------------------------------------------------

    def _check_size(self, payload: bytes) -> None:
        """Refuse a message Redis would cut every subscriber for (see the class docstring)."""
        limit = self.max_message_size
        if limit is not None and len(payload) > limit:
            raise ValueError(
                f"a {len(payload)}-byte message is over RedisChannelStore's max_message_size "
                f"({limit} bytes); it was not sent. Redis cuts every subscriber a message that "
                "large would reach (client-output-buffer-limit pubsub), so no process would get "
                "it: broadcast a reference to the data (a URL or a key) instead, or raise "
                "max_message_size together with Redis's client-output-buffer-limit pubsub"
            )

    def _scrub(self, exc: Any) -> str:
        """The text of ``exc`` without this store's credentials."""
        text = str(exc)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _down_error(self) -> Exception:
        exceptions = self._redis.exceptions
        if self._auth_error is not None:
            return exceptions.AuthenticationError(f"{self._auth_error}; the message was not sent")
        return exceptions.ConnectionError(
            f"Redis at {self.url} cannot be reached (reconnecting); the message was not sent"
        )

    @property
    def _down_errors(self) -> Tuple[type, ...]:
        """What a command raises when Redis (or a cluster's shard) cannot take it now."""
        exceptions = self._redis.exceptions
        return (exceptions.ConnectionError, exceptions.TimeoutError, OSError, exceptions.ClusterError,
                exceptions.RedisClusterException, exceptions.TryAgainError)

    @property
    def _errors(self) -> Tuple[type, ...]:
        """Whatever redis-py raises about Redis (RedisClusterException is not a RedisError)."""
        exceptions = self._redis.exceptions
        return (exceptions.RedisError, exceptions.RedisClusterException, OSError)

    @property
    def _publish_verb(self) -> str:
        return "SPUBLISH" if self._cluster else "PUBLISH"

    def _plain_url(self) -> str:
        """The URL as redis-py reads it: redis+cluster://h:p is redis://h:p (one node)."""
        scheme, rest = self._url.split("://", 1)
        return scheme.lower().replace("+cluster", "") + "://" + rest

    def _new_publisher(self) -> Any:
        redis = self._redis
        if not self._cluster:
            return redis.Redis.from_url(
                self._url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
                client_name=f"greenchan-pub-{os.getpid()}",
            )
        if self._cluster_client is not None:  # its nodes and options; bytes, our timeouts
            _, kwargs = self._connection_options(None)
            for name in ("host", "port", "connection_class"):
                kwargs.pop(name, None)
            kwargs.update(
                socket_timeout=self.socket_timeout, socket_connect_timeout=self.socket_timeout,
                retry=redis.retry.Retry(redis.backoff.NoBackoff(), 3), client_name=f"greenchan-pub-{os.getpid()}",
            )
            nodes = [redis.cluster.ClusterNode(n.host, n.port) for n in self._cluster_client.get_nodes()]
            return redis.cluster.RedisCluster(startup_nodes=nodes, **kwargs)
        # A few attempts, no sleeping: enough to follow a MOVED after a resharding
        # or a failover, and a broadcast during an outage still fails fast.
        return redis.cluster.RedisCluster.from_url(
            self._plain_url(),
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 3),
            client_name=f"greenchan-pub-{os.getpid()}",
        )

    def _start(self) -> None:
        """Start the subscriber connections (again after a fork)."""
        if self._closed:
            raise RuntimeError("this RedisChannelStore is closed")
        pid = os.getpid()
        if self._pid == pid and self._links:
            return
        self._pid = pid
        for link in self._links.values():  # a parent's, after a fork: not ours to close
            link.closed = True
        self._links = {}
        self._masters = {}  # a parent's, after a fork: its pools are its own
        self._placed = {}
        try:
            self._publisher = self._new_publisher()
        except Exception as exc:  # a cluster unreachable now: the home subscriber retries
            log.debug("connecting to the Redis Cluster at %s failed: %s", self.url, self._scrub(exc))
            self._publisher = None
        self._links[None] = Subscriber(self, None, sharded=False)
        for key in self._channels():
            self._subscribe(key)
        if self._cluster:
            gevent.spawn(self._watch_cluster, pid)
        self._presence_forked()

    #: Seconds between two looks at a cluster's slots. A killed master or a moved
    #: slot is noticed at once (a dropped connection, an unsubscription); this
    #: finds what no connection tells, such as a master that became a replica
    #: (Redis 7.0 keeps its shard subscribers, fed by replication).
    CLUSTER_CHECK = 5.0

    def _watch_cluster(self, pid: int) -> None:
        while not self._closed and self._pid == pid:  # a forked child runs its own
            gevent.sleep(self.CLUSTER_CHECK)
            if self._groups and not self._closed and self._pid == pid:
                self._rebalance_soon()

    def _connection_options(self, node: Optional[Tuple[str, int]]) -> Tuple[type, Dict[str, Any]]:
        """(connection class, options) for the store's Redis, or for a cluster ``node``."""
        redis = self._redis
        kwargs = redis.connection.parse_url(self._plain_url())
        cls = kwargs.pop("connection_class", redis.connection.Connection)
        if self._cluster:
            if self._cluster_client is not None:  # its options, not a URL's
                default = self._cluster_client.get_default_node().redis_connection.connection_pool
                kwargs, cls = dict(default.connection_kwargs), default.connection_class
                for injected in ("redis_connect_func", "oss_cluster_maint_notifications_handler"):
                    kwargs.pop(injected, None)
                kwargs["decode_responses"] = False  # the store reads bytes
            kwargs.pop("db", None)
            if node is not None:
                kwargs["host"], kwargs["port"] = node
        kwargs["retry"] = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
        kwargs["socket_connect_timeout"] = self.socket_timeout
        return cls, kwargs

    def _connect(self, link: Subscriber) -> Any:
        """A new connection for ``link``: to the store's Redis, or to a cluster node."""
        node = link.node
        if self._cluster:
            if self._publisher is None:
                self._publisher = self._new_publisher()
            if node is None:  # the home connection: any master hears the presence events
                owner = self._publisher.get_node_from_key(self._events_key)
                node = (owner.host, owner.port)
        cls, kwargs = self._connection_options(node)
        kwargs.update(
            socket_timeout=None,  # the reader waits for messages as long as it takes
            client_name=f"greenchan-sub-{os.getpid()}",
        )
        conn = cls(**kwargs)
        conn.connect()
        return conn

    def _direct(self, key: bytes, *command: Any) -> Any:
        """``command`` sent straight to the master that owns ``key`` (on one Redis: to it).

        On a cluster, redis-py's RedisCluster costs more per command than the
        command (its routing: about 53 µs of CPU against 21 µs for a plain
        client to the same node, bench/cluster.py), and even the client it keeps
        per node costs 20% more than a plain one: the broadcast path looks the
        owner up in the slot map and uses a plain client of its own to it. A redirection (the slot
        moved, MOVED or ASK; the cluster busy, TRYAGAIN or CLUSTERDOWN) means the
        command did not run: it goes through RedisCluster, which follows it and
        updates the slot map. A connection error is not retried (the command may
        have run): it is raised, and the store looks at the cluster again.
        """
        if not self._cluster:
            return self._publisher.execute_command(*command)
        exceptions = self._redis.exceptions
        try:
            return self._master(key).execute_command(*command)
        except (exceptions.MovedError, exceptions.AskError, exceptions.ClusterDownError):
            return self._publisher.execute_command(*command)
        except exceptions.TryAgainError:
            # A slot's keys half moved (a resharding moves them in batches): the
            # script cannot run until the group's keys are together again.
            for delay in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
                gevent.sleep(delay)
                try:
                    return self._publisher.execute_command(*command)
                except (exceptions.TryAgainError, exceptions.ClusterError):
                    continue
            raise exceptions.ConnectionError(
                "the group's keys are being moved between two masters (a resharding) and were "
                "not together again within 2 s"
            ) from None
        except (exceptions.ConnectionError, exceptions.TimeoutError, OSError):
            self._rebalance_soon()
            raise

    def _master(self, key: bytes) -> Any:
        """A plain client of the master owning ``key``'s slot (made once per master)."""
        owner = self._publisher.get_node_from_key(key)
        node = (owner.host, owner.port)
        client = self._masters.get(node)
        if client is None:
            if len(self._masters) >= 64:  # a bound: masters come and go with failovers
                self._drop_masters()
            cls, kwargs = self._connection_options(node)
            kwargs.update(socket_timeout=self.socket_timeout, client_name=f"greenchan-pub-{os.getpid()}")
            pool = self._redis.ConnectionPool(connection_class=cls, **kwargs)
            client = self._masters[node] = self._redis.Redis(connection_pool=pool)
        return client

    def _drop_masters(self) -> None:
        masters, self._masters = self._masters, {}
        for client in masters.values():
            client.connection_pool.disconnect()

    def _where(self, link: Subscriber) -> str:
        return self.url if link.node is None else "%s (master %s:%s)" % (self.url, *link.node)

    def _outage(self, link: Subscriber, was_up: bool, exc: Exception) -> None:
        """Log an outage once: as a loss if members were being served, else as unreachable."""
        if link.outage_logged:
            log.debug("reconnecting to Redis at %s failed: %s", self._where(link), self._scrub(exc))
            return
        link.outage_logged = True
        groups = len(self._wanted(link)) if link.sharded == self._cluster else 0
        if was_up and groups and self.history_size:
            log.warning(
                "lost the subscriber connection to Redis at %s (%s): messages published to "
                "this process's %d group(s) while it is disconnected will be replayed to its "
                "members from the history when it is back, as far as the history still has "
                "them (if it followed a burst of large broadcasts, Redis cut it for "
                "client-output-buffer-limit pubsub); broadcasts raise ConnectionError until "
                "then; reconnecting", self._where(link), self._scrub(exc), groups,
            )
        elif was_up and groups:
            log.warning(
                "lost the subscriber connection to Redis at %s (%s): messages published to "
                "this process's %d group(s) while it is disconnected are lost for this "
                "process's members (if it followed a burst of large broadcasts, Redis cut it "
                "for client-output-buffer-limit pubsub); broadcasts raise ConnectionError "
                "until it is back; reconnecting", self._where(link), self._scrub(exc), groups,
            )
        else:
            log.warning(
                "Redis at %s unreachable (%s): broadcasts raise ConnectionError "
                "until it is back; reconnecting", self._where(link), self._scrub(exc),
            )

    def _auth_failed(self, exc: Exception) -> None:
        """Redis refused the credentials: an ERROR once, and what broadcast raises."""
        self._auth_error = (
            f"Redis at {self.url} refused this store's credentials: authentication failed "
            f"({self._scrub(exc)}); check the user and password in the store's URL"
        )
        if self._auth_logged:
            return
        self._auth_logged = True
        log.error("%s; broadcasts raise AuthenticationError until it accepts them; retrying", self._auth_error)

    def _link_up(self, link: Subscriber, reconnected: bool) -> None:
        """Every subscription ``link`` sent on connecting is in effect."""
        self._auth_error = None
        groups = [self._group_of(k) for k in link.subscribed if k != self._events_key and k not in self._listeners]
        if link.outage_logged or self._auth_logged:
            link.outage_logged = self._auth_logged = False
            log.warning("Redis at %s is back; resubscribed %d group(s)", self._where(link), len(groups))
        # Channels that came or went while the subscriptions were on their way.
        for key in set(self._wanted(link)) ^ link.subscribed:
            link.sync(key)
        if self._cluster and link.node is None:
            # The cluster is reachable (again): place what waits for it, and
            # after an outage follow masters that changed meanwhile.
            self._rebalance_soon()
        if self.history_size and groups and reconnected:
            gevent.spawn(self._catch_up, groups)
        if link.node is None and reconnected and self._seen:
            gevent.spawn_later(self.presence_ttl / 2, self._reconcile)

    def _on_message(self, link: Subscriber, key: bytes, payload: bytes) -> None:
        if key == self._events_key:
            self._on_presence_event(payload)
            return
        if self._cluster and self._placed.get(key) is not link:
            # Moving to another master: until the old one lets go, both send
            # it. The new one's is delivered; a gap in between, caught up.
            return
        listener = self._listeners.get(key)
        if listener is not None:
            try:
                listener(payload)
            except Exception:  # not the reader's to die of
                log.exception("a listener on Redis channel %r failed", key)
            return
        group = self._group_of(key)
        if group not in self._groups:
            return  # unsubscribed while the message was on its way
        try:
            if payload[:1] != b"h":
                data = decode(payload)
            else:  # b"h<epoch>:<ms>-<n> " + payload: a message of a group with history
                head, _, body = payload.partition(b" ")
                epoch, _, sid = head[1:].decode().partition(":")
                ms, _, seq = sid.partition("-")
                data = decode(body)
                if self.history_size:
                    self._deliver_live(group, epoch, sid, int(seq), int(ms), data)
                    return
                # A store without history sharing the prefix: deliver it plainly.
        except Exception:
            log.exception("undecodable message on Redis channel %r dropped", key)
            return
        self._deliver(group, data)


def _first_node(client: Any) -> Tuple[str, int]:
    node = client.get_default_node()
    return node.host, node.port
