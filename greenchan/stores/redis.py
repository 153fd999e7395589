"""``RedisChannelStore``: groups whose broadcasts reach every process sharing a Redis."""
from __future__ import annotations

import inspect
import logging
import os
import re
from typing import Any, Dict, Optional, Set
from urllib.parse import unquote, urlsplit, urlunsplit

import gevent
import gevent.event
import gevent.lock
from gevent.hub import get_hub, getcurrent

from ..channel import Channel
from .codec import decode, encode
from .groups import Render, _Groups

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
        url: str = "redis://127.0.0.1:6379/0",
        render: Optional[Render] = None,
        *,
        prefix: str = "greenchan:",
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
        socket_timeout: float = 5.0,
        subscribe_timeout: float = 5.0,
        max_message_size: Optional[int] = MAX_MESSAGE_SIZE,
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
        # What logs and errors show; the real URL stays private.
        self.url = redact(url)
        self._url = url
        self._secrets = _secrets(url)
        self.max_message_size = max_message_size
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
        # Set while Redis refuses our credentials: what broadcast raises; the
        # ERROR is logged once per such episode.
        self._auth_error: Optional[str] = None
        self._auth_logged = False
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
        self._check_size(payload)
        self._start()
        if not self._up:
            self._tried.wait(self.socket_timeout)
        if not self._up:
            raise self._down_error()
        exceptions = self._redis.exceptions
        try:
            return int(self._publisher.publish(self._key(group), payload))
        except exceptions.AuthenticationError as exc:
            raise exceptions.AuthenticationError(
                f"PUBLISH to {self.url}: authentication failed ({self._scrub(exc)}); "
                "check the user and password in the store's URL; the message was not sent"
            ) from None
        except (exceptions.ConnectionError, exceptions.TimeoutError, OSError) as exc:
            # Scrubbed, and not chained: the original text is not ours to trust.
            raise exceptions.ConnectionError(
                f"PUBLISH to {self.url} failed: {self._scrub(exc)}"
            ) from None

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
        if self._up and not flag.wait(self.subscribe_timeout):  # in an outage, the reconnection subscribes it
            log.warning(
                "Redis did not confirm the subscription to group %r within subscribe_timeout "
                "(%s s): a broadcast made now may miss its new member", group, self.subscribe_timeout,
            )

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
        for flag in self._confirm.values():
            flag.set()
        self._confirm.clear()
        self._up = False

    # -- subscriptions -------------------------------------------------------------

    def _key(self, group: str) -> bytes:
        return (self.prefix + group).encode()

    # A flag in _confirm means "a SUBSCRIBE for this key is due or on its way";
    # the reader sets and removes it when Redis confirms. A group still in
    # _subscribed without a flag is subscribed and confirmed.

    def _group_created(self, group: str) -> None:
        if group in self._subscribed:
            # Joined again before the UNSUBSCRIBE of its last leave went out
            # (deferred from the hub, or waiting for the write lock): the
            # subscription never stopped. A flag, if any, is set by the
            # confirmation still on its way; a new one would wait for nothing.
            return
        key = self._key(group)
        if key not in self._confirm:
            self._confirm[key] = gevent.event.Event()
        self._sync(group)

    def _group_removed(self, group: str) -> None:
        if group not in self._subscribed:
            # No SUBSCRIBE is on its way for it: wake whoever waits.
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
            self._url,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.socket_timeout,
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
            client_name=f"greenchan-pub-{pid}",
        )
        self._reader = gevent.spawn(self._run)

    def _connect(self) -> Any:
        redis = self._redis
        kwargs = redis.connection.parse_url(self._url)
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
        auth_failed = self._redis.exceptions.AuthenticationError
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
            except auth_failed as exc:
                self._lost()
                self._auth_failed(exc)
            except errors as exc:
                self._outage(self._lost(), exc)
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

    def _lost(self) -> bool:
        """Drop the subscriber connection; True if the store was up until now."""
        was_up = self._up
        self._drop_connection()
        self._up = False
        return was_up

    def _outage(self, was_up: bool, exc: Exception) -> None:
        """Log an outage once: as a loss if members were being served, else as unreachable."""
        if self._outage_logged:
            log.debug("reconnecting to Redis at %s failed: %s", self.url, self._scrub(exc))
            return
        self._outage_logged = True
        if was_up and self._groups:
            log.warning(
                "lost the subscriber connection to Redis at %s (%s): messages published to "
                "this process's %d group(s) while it is disconnected are lost for this "
                "process's members (if it followed a burst of large broadcasts, Redis cut it "
                "for client-output-buffer-limit pubsub); broadcasts raise ConnectionError "
                "until it is back; reconnecting", self.url, self._scrub(exc), len(self._groups),
            )
        else:
            log.warning(
                "Redis at %s unreachable (%s): broadcasts raise ConnectionError "
                "until it is back; reconnecting", self.url, self._scrub(exc),
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

    def _connected(self) -> None:
        """Every SUBSCRIBE sent on connecting is in effect: the store is up."""
        self._ping_pending = False
        for key in list(self._confirm):
            self._confirm.pop(key).set()
        self._up = True
        self._auth_error = None
        self._delay = self.reconnect_min
        self._tried.set()
        if self._outage_logged or self._auth_logged:
            self._outage_logged = self._auth_logged = False
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
