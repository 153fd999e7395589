"""One subscriber connection of a ``RedisChannelStore``, and the greenlet that reads it.

A store on one Redis has one of these, for every group and the presence events.
On a Redis Cluster it has one per master that owns a group with members in this
process (``SSUBSCRIBE``: a shard hears only its own groups), plus one for the
presence events (classic ``SUBSCRIBE``, which every node of a cluster hears).

The subscriber knows connections and replies; the store knows groups. It asks
the store which channels it should be subscribed to (``_wants``, ``_wanted``)
and tells it what happened (``_on_message``, ``_link_up``, ``_link_down``,
``_outage``, ``_auth_failed``, ``_shard_moved``).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, Optional, Set, Tuple

import gevent
import gevent.event
import gevent.lock
from gevent.hub import get_hub, getcurrent

log = logging.getLogger("greenchan.stores")

#: Channels per SUBSCRIBE when a connection subscribes everything at once.
_BATCH = 1000


class Subscriber:
    """A subscriber connection, kept up: connect, subscribe, read; on failure, again.

    ``node`` is the ``(host, port)`` of a cluster master, or None: the store's
    URL (one Redis), or on a cluster whichever master the store picks at each
    connection. ``sharded`` chooses ``SSUBSCRIBE`` over ``SUBSCRIBE``.
    """

    def __init__(self, store: Any, node: Optional[Tuple[str, int]], sharded: bool) -> None:
        self.store = store
        self.node = node
        self.sharded = sharded
        self._verbs = ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        self.conn: Any = None  # while connected
        self.subscribed: Set[bytes] = set()  # channels subscribed on conn
        # channel -> flag set when its subscription is confirmed. A flag means
        # "a subscription is due or on its way"; none, and the channel is in
        # ``subscribed``: it is in effect.
        self.confirm: Dict[bytes, gevent.event.Event] = {}
        # channel -> subscriptions sent on conn not yet confirmed: a flag is set
        # only when the last one is, so a confirmation that answers an earlier
        # one (before a leave and a rejoin) does not count.
        self.outstanding: Dict[bytes, int] = {}
        # channel -> our unsubscriptions not yet answered: any other
        # unsubscription is the server's (a cluster slot moved away).
        self.leaving: Dict[bytes, int] = {}
        self.write_lock = gevent.lock.RLock()  # one writer at a time on conn
        self.up = False  # connected, and every subscription sent on connecting confirmed
        self.ever_up = False  # so a reconnection is known as one (a gap to catch up)
        self.tried = gevent.event.Event()  # set after the first attempt
        self.ping_pending = False  # between the PING that ends a (re)subscription and its reply
        self.outage_logged = False
        self.closed = False
        self.delay = store.reconnect_min
        self.reader = gevent.spawn(self._run)

    def __repr__(self) -> str:
        where = "%s:%s" % self.node if self.node else "home"
        return f"<Subscriber {where} {'up' if self.up else 'down'} {len(self.subscribed)} channel(s)>"

    # -- what the store calls --------------------------------------------------------

    def expect(self, key: bytes) -> None:
        """A channel is wanted: until it is confirmed, ``wait`` has a flag to wait on."""
        if key not in self.subscribed and key not in self.confirm:
            self.confirm[key] = gevent.event.Event()

    def release(self, key: bytes) -> None:
        """A channel is no longer wanted: wake whoever waits for it."""
        if key not in self.subscribed:
            flag = self.confirm.pop(key, None)
            if flag is not None:
                flag.set()

    def sync(self, key: bytes) -> None:
        """Make the subscription of ``key`` match whether the store wants it here."""
        if self.store._wants(self, key) == (key in self.subscribed) or self.conn is None:
            return  # nothing to do, or the reconnection will subscribe what is due
        if getcurrent() is get_hub():  # a close hook in the hub: no I/O here
            gevent.spawn(self.sync, key)
            return
        with self.write_lock:
            conn = self.conn
            want = self.store._wants(self, key)
            if conn is None or want == (key in self.subscribed):
                return
            try:
                conn.send_command(self._verbs[0] if want else self._verbs[1], key, check_health=False)
            except self.store._errors as exc:
                log.debug("subscription change for %r failed: %s", key, exc)
                conn.disconnect()  # the reader sees it and reconnects
                return
            if want:
                self.subscribed.add(key)
                self.outstanding[key] = self.outstanding.get(key, 0) + 1
            else:
                self.subscribed.discard(key)
                self.leaving[key] = self.leaving.get(key, 0) + 1

    def wait(self, key: bytes, timeout: float) -> bool:
        """Wait (at most ``timeout``) for ``key``'s subscription; True if it is in effect."""
        flag = self.confirm.get(key)
        if flag is not None:
            if not self.tried.is_set():  # just started: wait for the first connection
                self.tried.wait(timeout)
            if self.up:
                flag.wait(timeout)
        return self.up and key in self.subscribed and key not in self.confirm

    def close(self, block: bool = True) -> None:
        """Stop reading, drop the connection, wake every waiter."""
        self.closed = True
        reader, self.reader = self.reader, None
        if reader is not None and reader is not getcurrent():
            reader.kill(block=block, timeout=self.store.socket_timeout)
        self.drop()
        self.up = False
        for flag in self.confirm.values():
            flag.set()
        self.confirm.clear()

    def drop(self) -> bool:
        """Drop the connection; True if it was up until now."""
        was_up, self.up = self.up, False
        with self.write_lock:
            conn, self.conn = self.conn, None
            self.subscribed = set()
            self.outstanding = {}
            self.leaving = {}
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:
                pass
        return was_up

    # -- the reader greenlet ---------------------------------------------------------

    def _run(self) -> None:
        """Connect, subscribe, read; on failure back off and do it again."""
        store = self.store
        exceptions = store._redis.exceptions
        while not self.closed:
            try:
                conn = store._connect(self)
                with self.write_lock:
                    self.conn = conn
                    keys = list(store._wanted(self))
                    self.subscribed = set(keys)
                    self.outstanding = dict.fromkeys(keys, 1)
                    self.leaving = {}
                    if self.sharded:  # one slot per SSUBSCRIBE: one command each
                        commands = [(self._verbs[0], key) for key in keys]
                    else:
                        commands = [(self._verbs[0], *keys[i:i + _BATCH]) for i in range(0, len(keys), _BATCH)]
                    # Redis answers in order: the PING's reply means every
                    # subscription above is in effect, and this connection is up.
                    commands.append(("PING",))
                    conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                    self.ping_pending = True
                self._read(conn)
            except exceptions.AuthenticationError as exc:
                self.drop()
                store._auth_failed(exc)
            except Exception as exc:
                if self.closed:  # closed under it (a master let go of): nothing to report
                    break
                if isinstance(exc, store._errors):  # redis-py's, a cluster's included
                    store._outage(self, self.drop(), exc)
                else:
                    log.exception("RedisChannelStore reader failed; reconnecting")
                    self.drop()
            self.tried.set()
            if self.closed:
                break
            store._link_down(self)  # a cluster looks where its groups are now
            gevent.sleep(self.delay)
            self.delay = min(self.delay * 2, store.reconnect_max)

    def _read(self, conn: Any) -> None:
        """Read the connection until it fails."""
        # RESP3 (redis-py 5's option, 8's default) delivers pub/sub replies as
        # push messages, which read_response swallows unless asked for them.
        params = inspect.signature(conn.read_response).parameters
        kwargs = {"push_request": True} if "push_request" in params else {}
        on_message = self.store._on_message
        redirected = self.store._redis.exceptions.AskError  # MovedError's base too
        while True:
            try:
                reply = conn.read_response(**kwargs)
            except redirected as exc:
                if not self.sharded:
                    raise
                self._redirected(exc.slot_id)  # the connection is fine: read on
                continue
            if isinstance(reply, list) and reply:
                kind = reply[0]
                if kind == b"message" or kind == b"smessage":
                    on_message(self, reply[1], reply[2])
                    continue
                if kind == b"subscribe" or kind == b"ssubscribe":
                    self._confirmed(reply[1])
                    continue
                if kind == b"unsubscribe" or kind == b"sunsubscribe":
                    self._unsubscribed(reply[1])
                    continue
                if kind != b"pong":
                    continue
            elif reply != b"PONG":
                continue
            if self.ping_pending:
                self._connected()

    def _confirmed(self, key: bytes) -> None:
        """Redis confirmed a subscription of ``key``: once the last one is, wake the waiters."""
        left = self.outstanding.get(key, 1) - 1
        if left > 0:
            self.outstanding[key] = left
            return
        self.outstanding.pop(key, None)
        flag = self.confirm.pop(key, None)
        if flag is not None:
            flag.set()

    def _unsubscribed(self, key: bytes) -> None:
        """A shard channel's unsubscription: ours, or the server's when its slot moved away."""
        mine = self.leaving.get(key, 0)
        if mine:
            if mine == 1:
                del self.leaving[key]
            else:
                self.leaving[key] = mine - 1
            return
        if not self.sharded:
            return  # a classic subscription ends only when we ask
        self.subscribed.discard(key)
        self.store._shard_moved(self, key)

    def _redirected(self, slot: int) -> None:
        """A master answered a subscription with MOVED or ASK: that slot is not its own
        (a resharding in progress, or a slot map older than the cluster's). Its channels
        are not subscribed here; the store looks where they are now."""
        from redis.crc import key_slot

        refused = [key for key in self.subscribed if key_slot(key) == slot]
        for key in refused:
            self.subscribed.discard(key)
            self.outstanding.pop(key, None)
        if refused:
            self.store._shard_moved(self, refused[0])

    def _connected(self) -> None:
        """Every subscription sent on connecting is in effect: up."""
        self.ping_pending = False
        reconnected, self.ever_up = self.ever_up, True
        self.up = True
        self.delay = self.store.reconnect_min
        self.tried.set()
        self.store._link_up(self, reconnected)
