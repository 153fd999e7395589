"""Presence on Redis: the part of ``RedisChannelStore`` that keeps who is in a group.

The data layout, the scripts and why each step is safe are in presence.py;
this mixin runs them, the same way on a single Redis and on a Redis Cluster
(every script's keys share one hash slot). It relies on the store for the
connection (``_publisher``: a ``redis.Redis`` or a ``redis.cluster.RedisCluster``,
which routes a script by its keys), the subscriber (``_watch_events``) and the
error text (``_scrub``).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import gevent
import gevent.lock
import gevent.pool
from gevent.hub import get_hub, getcurrent

from ..channel import Channel
from .presence import (
    CHUNK,
    JOIN_LUA,
    LEAVE_LUA,
    PROC_LUA,
    PRUNE_LUA,
    REAP_BATCH,
    REAPED_LUA,
    REFRESH_LUA,
    SHAS,
    PresenceEntry,
    decode_event,
    event_head,
    merge,
)

log = logging.getLogger("greenchan.stores")

#: Group scripts in flight at once when re-registering or reaping.
_PARALLEL = 16

#: Presence scripts in flight at once, whatever the number of joins and leaves
#: (a thousand channels closing together): the rest wait their turn, and the
#: client's pool (redis-py's default: 100 connections) keeps connections for
#: broadcasts and reads instead of refusing them with "Too many connections".
_IN_FLIGHT = 32


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _note(group: str, key: str) -> bytes:
    """What a process's entries hash keeps of an entry: what a reaper needs."""
    return json.dumps([group, key], separators=(",", ":"), ensure_ascii=False).encode()


class RedisPresence:
    """Mixin of ``RedisChannelStore``: presence entries, heartbeats, reaping, events."""

    def _init_presence(self, prefix: str, presence_ttl: float) -> None:
        if not isinstance(presence_ttl, (int, float)) or presence_ttl <= 0:
            raise ValueError(f"presence_ttl is a number of seconds > 0, not {presence_ttl!r}")
        self.presence_ttl = presence_ttl
        self._ttl_arg = int(presence_ttl * 1000)
        # The processes' keys: one hash tag, one slot (presence.py).
        self._procs_key = (prefix + "{presence}:procs").encode()
        self._reapings_key = (prefix + "{presence}:reaping").encode()
        self._entries_prefix = prefix + "{presence}:proc:"
        self._reaping_prefix = prefix + "{presence}:reaping:"
        self._events_key = (prefix + "presence:events").encode()
        self._proc = ""  # this process's id in Redis: drawn in _start, per process, and anew when lost
        self._drawn = 0  # the channel numbers drawn for fields (<id>:<n>): the highest
        # (group, channel) -> its field in the group's entries hash
        self._fields: Dict[Tuple[str, Channel], str] = {}
        # (group, channel) -> its field under a lost process id, still to move
        # to its new one (or to delete with it, if it leaves first).
        self._moves: Dict[Tuple[str, Channel], str] = {}
        # group -> keys whose join this process has reported: a re-registration
        # (after a Redis restart) does not report them again.
        self._seen: Dict[str, Dict[str, Any]] = {}  # group -> {key: its meta when reported}
        self._seen_version = 0  # events heard: a reconciliation yields to newer news
        # Leaves Redis did not take (an outage): (group, field, entry, old field), retried by the refresh.
        self._pending_leaves: List[Tuple[str, str, PresenceEntry, str]] = []
        # True when Redis may lack some of our entries: the refresh re-registers.
        self._presence_dirty = False
        # Whether our heartbeat is in Redis as far as we know: a step that
        # finds it gone then knows we were reaped (or Redis lost it).
        self._heartbeat_sent = False
        # True while the refresh lets our heartbeat expire (we have nothing in
        # Redis): then finding it gone is expected, not news.
        self._idle = False
        self._refresher: Optional[gevent.Greenlet] = None
        # One refresh at a time; one asked for meanwhile runs right after.
        self._refreshing = gevent.lock.Semaphore()
        self._refresh_again = False
        self._in_flight = gevent.lock.BoundedSemaphore(_IN_FLIGHT)
        # When our last refresh went through, and when we may reap again: after
        # refreshes missed (Redis, or a cluster's shard, away; or we were paused),
        # every other process gets a full TTL to push its heartbeat before we
        # judge it, or an outage longer than the TTL would reap everyone.
        self._refreshed_at = 0  # the Redis time (ms) of it
        self._reap_from = 0.0  # time.monotonic()
        # On a cluster: the master (host, port) of the processes' slot (key None)
        # and of each group where we have entries, or had within a TTL (the
        # groups we left: time.monotonic() of it), as the last refresh saw
        # them; the groups whose master changed, to prune at the re-registration.
        self._owners: Dict[Optional[str], Any] = {}
        self._left: Dict[str, float] = {}
        self._prune: Set[str] = set()

    def presence(self, group: str) -> Dict[str, List[Any]]:
        """``{key: [meta, ...]}`` of ``group`` in every process: one ``HVALS``.

        Raises ``redis.exceptions.ConnectionError`` while Redis cannot be reached.
        """
        self._check_group(group)
        self._start()
        exceptions = self._redis.exceptions
        try:
            if self._publisher is None:  # a cluster not reached yet
                raise exceptions.ConnectionError("not connected")
            values = self._publisher.hvals(self._presence_keys(group)[0])
        except exceptions.AuthenticationError as exc:
            raise exceptions.AuthenticationError(self._scrub(exc)) from None
        except self._presence_errors as exc:
            raise exceptions.ConnectionError(
                f"reading the presence of {group!r} from {self.url} failed: {self._scrub(exc)}"
            ) from None
        return merge(values)

    # -- Redis ---------------------------------------------------------------------

    @property
    def _presence_errors(self) -> Tuple[type, ...]:
        """What a presence step raises when Redis (or a cluster's shard) cannot take it."""
        exceptions = self._redis.exceptions
        return (exceptions.RedisError, exceptions.RedisClusterException, OSError)

    def _run(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        """EVALSHA one of presence.py's scripts; loaded first use and after Redis lost it.

        On a cluster the call goes to the master of its keys' slot, and
        ``SCRIPT LOAD`` to every master.
        """
        sha = SHAS[script]
        with self._in_flight:
            try:
                return self._publisher.execute_command("EVALSHA", sha, numkeys, *keys_and_args)
            except self._redis.exceptions.NoScriptError:
                self._publisher.execute_command("SCRIPT LOAD", script)
                return self._publisher.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    def _presence_keys(self, group: str) -> Tuple[bytes, bytes]:
        """The group's entries and counts hashes, in the group's slot."""
        base = f"{self.prefix}{{{group}}}:presence"
        return base.encode(), (base + ":keys").encode()

    def _proc_step(self, add: Sequence[Tuple[str, str, str]], remove: Sequence[str]) -> bool:
        """The processes' slot: push our heartbeat, note entries (field, group, key), forget some.

        False when our heartbeat was gone: nothing was written, and we took a
        new id (``_lost``). Only a reaper takes a heartbeat out, so "gone" is
        never our own doing and always means what it says.
        """
        me = self._proc
        args: List[Any] = [self._procs_key, self._entries_prefix + me, me, self._ttl_arg,
                           1 if self._heartbeat_sent else 0, len(add)]
        for field, group, key in add:
            args += (field, _note(group, key))
        args += remove
        missing = self._run(PROC_LUA, 2, *args)
        if me != self._proc:  # we changed id meanwhile: this answer is about the old one
            return not missing
        if missing:
            self._lost()
            return False
        self._heartbeat_sent = True
        self._idle = False
        if None not in self._owners:
            node = self._owner(self._procs_key)
            if node is not None:
                self._owners[None] = node
        return True

    def _lost(self) -> None:
        """Our heartbeat is gone: reaped (paused past the TTL, or left to expire while
        we had nothing), or Redis lost it.

        A reaper may be deleting our fields right now: every entry gets a new
        field under a new id, and the re-registration moves each old one to it
        (presence.py, "A process that was paused").
        """
        if self._idle:
            log.debug("presence: heartbeat expired while idle; a new process id")
        else:
            log.warning(
                "presence: this process's heartbeat was gone from Redis (paused longer than "
                "presence_ttl=%s s, or Redis lost its data); registering its %d channel(s) again",
                self.presence_ttl, len(self._fields),
            )
        self._idle = False
        self._proc = os.urandom(8).hex()
        self._heartbeat_sent = False
        for place, field in list(self._fields.items()):
            # An older name whose move is still to do stays: the new one never reached the group.
            self._moves.setdefault(place, field)
            self._fields[place] = f"{self._proc}:{field.rsplit(':', 1)[1]}"
        self._presence_dirty = True
        self._refresh_soon()

    # -- joins and leaves ----------------------------------------------------------

    def _presence_watch(self) -> None:
        """Hear every process's presence events (one more channel on the subscriber)."""
        self._start()
        self._start_refresher()
        if len(self._presence_fns) == 1:
            self._watch_events()

    def _presence_forked(self) -> None:
        """A new process (a fork) is a new process id in Redis, with nothing registered."""
        self._proc = os.urandom(8).hex()
        self._heartbeat_sent = False
        self._idle = False
        self._fields.clear()
        self._moves.clear()
        self._pending_leaves = []
        self._refreshed_at = 0
        self._owners.clear()
        self._left.clear()
        self._prune.clear()
        # The parent's greenlets do not run here: what they held is not ours to wait for.
        self._refreshing = gevent.lock.Semaphore()
        self._in_flight = gevent.lock.BoundedSemaphore(_IN_FLIGHT)
        self._refresher = None
        if self._presence_fns:
            self._start_refresher()

    def _presence_joined(self, group: str, channel: Channel, entry: PresenceEntry) -> None:
        self._drawn += 1
        field = f"{self._proc}:{self._drawn}"
        self._fields[(group, channel)] = field
        self._start_refresher()
        if getcurrent() is get_hub():
            gevent.spawn(self._register, group, channel, field, entry)
        else:
            self._register(group, channel, field, entry)

    def _register(self, group: str, channel: Channel, field: str, entry: PresenceEntry) -> None:
        """Note the entry in the processes' slot, then put it in the group's: two scripts."""
        if self._closed:
            return
        if self._publisher is None:
            self._presence_dirty = True
            return
        entries, counts = self._presence_keys(group)
        place = (group, channel)
        old = ""
        try:
            if not self._proc_step([(field, group, entry.key)], ()):
                # Our id was lost (the re-registration takes the other entries): this
                # one now, under its new name, so that it is present when we return.
                field, old = self._fields.get(place, ""), self._moves.get(place, "")
                if not field or not self._proc_step([(field, group, entry.key)], ()):
                    return
            self._run(JOIN_LUA, 2, entries, counts, self._events_key, event_head(group),
                      field, old, entry.key, entry.value)
        except self._presence_errors as exc:
            log.debug("presence join in %r not registered (the refresh will): %s", group, self._scrub(exc))
            self._presence_dirty = True
            return
        self._written(group, channel, field, old, entry)

    def _written(self, group: str, channel: Channel, field: str, old: str, entry: PresenceEntry) -> None:
        """``field`` is in the group now (moved from ``old``, if given): square it with
        what happened to the channel meanwhile (we yielded for two round trips)."""
        place = (group, channel)
        if old and self._moves.get(place) == old:
            del self._moves[place]
        if group not in self._owners:  # the master we wrote to: a change from it is news
            node = self._owner(self._presence_keys(group)[0])
            if node is not None:
                self._owners[group] = node
        current = self._fields.get(place)
        if current == field:
            return
        if current is not None and current.rsplit(":", 1)[1] == field.rsplit(":", 1)[1]:
            # The same registration, renamed: our id was lost (again) on the way.
            # What we wrote is what the next re-registration moves.
            self._moves[place] = field
        else:
            # It left (its leave may have run first), or joined again anew: take it out.
            self._unregister(group, field, entry, "")

    def _presence_left(self, group: str, channel: Channel, entry: PresenceEntry) -> None:
        field = self._fields.pop((group, channel), None)
        old = self._moves.pop((group, channel), "")
        if field is None:
            return
        if getcurrent() is get_hub():  # a close hook: no I/O in the hub
            gevent.spawn(self._unregister, group, field, entry, old)
        else:
            self._unregister(group, field, entry, old)

    def _unregister(self, group: str, field: str, entry: PresenceEntry, old: str) -> bool:
        """Take the entry out of the group's slot (``old``: its field before an id change
        too), then out of the processes' slot; False when Redis did not take it (retried)."""
        if self._publisher is None:
            return False  # closed: the TTL takes the entry out
        entries, counts = self._presence_keys(group)
        pairs = (field, entry.key, old, entry.key) if old else (field, entry.key)
        try:
            self._run(LEAVE_LUA, 2, entries, counts, self._events_key, event_head(group), *pairs)
            self._proc_step((), (field,))
        except self._presence_errors as exc:
            log.debug("presence leave in %r not registered (the refresh will retry): %s",
                      group, self._scrub(exc))
            self._pending_leaves.append((group, field, entry, old))
            return False
        if getattr(self, "_cluster", False):
            self._left[group] = time.monotonic()
        return True

    def _leave_presence_on_close(self) -> None:
        """A closing store takes its entries out (best effort: the TTL does it otherwise)."""
        fields, self._fields = self._fields, {}
        moves, self._moves = self._moves, {}
        if not fields or self._publisher is None or getcurrent() is get_hub():
            return
        present, self._present = self._present, {}
        try:
            for (group, channel), field in fields.items():
                entry = present.get(group, {}).get(channel)
                if entry is not None:
                    self._unregister(group, field, entry, moves.get((group, channel), ""))
        finally:
            self._pending_leaves = []

    # -- the refresh: heartbeat, reaping, re-registering -----------------------------

    def _start_refresher(self) -> None:
        if self._refresher is None and not self._closed:
            self._refresher = gevent.spawn(self._refresh_loop)

    def _refresh_loop(self) -> None:
        """One refresh per ``presence_ttl / 3``: this process's heartbeat, and the reaping."""
        pid = os.getpid()
        while not self._closed and os.getpid() == pid:  # a forked child runs its own
            gevent.sleep(self.presence_ttl / 3)
            try:
                self._refresh()
            except Exception:  # the loop must outlive a surprise, or ghosts would stay
                log.exception("presence refresh failed")

    def _refresh_soon(self) -> None:
        if not self._closed:
            gevent.spawn(self._refresh)

    def _refresh(self) -> None:
        """One refresh at a time; one asked for while it runs runs once more after it."""
        if not self._refreshing.acquire(blocking=False):
            self._refresh_again = True
            return
        try:
            for _ in range(3):  # bounded: a refresh that keeps being asked for waits for the loop
                self._refresh_again = False
                self._refresh_once()
                if not self._refresh_again:
                    break
        finally:
            self._refreshing.release()

    def _refresh_once(self) -> None:
        """Push our heartbeat, reap dead processes, retry leaves, re-register what Redis lacks."""
        if self._publisher is None or self._closed:
            return
        me = self._proc
        # With nothing in Redis we let our heartbeat expire (a reaper, maybe
        # ourselves, takes it out): no key outlives what it stands for.
        busy = bool(self._fields or self._pending_leaves)
        self._idle = not busy
        try:
            reply = self._run(
                REFRESH_LUA, 2, self._procs_key, self._reapings_key, me, self._ttl_arg,
                1 if self._heartbeat_sent and busy else 0,
                REAP_BATCH if time.monotonic() >= self._reap_from else 0,
                self._ttl_arg, self._entries_prefix, self._reaping_prefix, self._refreshed_at,
            )
        except self._presence_errors as exc:
            log.debug("presence refresh failed: %s", self._scrub(exc))
            return
        self._refreshed_at = reply[1]
        if reply[2]:
            self._reap_from = time.monotonic() + self.presence_ttl
        if reply[0] and me == self._proc:
            self._lost()
        for i in range(3, len(reply), 2):
            self._reap(reply[i].decode(), reply[i + 1])
        if getattr(self, "_cluster", False):
            self._look_at_owners()
        try:
            pending, self._pending_leaves = self._pending_leaves, []
            for n, (group, field, entry, old) in enumerate(pending):
                if not self._unregister(group, field, entry, old):
                    self._pending_leaves += pending[n + 1:]
                    break
            if self._presence_dirty:
                self._reregister()
        except self._presence_errors as exc:
            log.debug("presence refresh failed: %s", self._scrub(exc))

    def _look_at_owners(self) -> None:
        """A master that changed (a failover) may have lost our latest writes there:
        re-register everything, and prune the groups that moved (presence.py)."""
        now = time.monotonic()
        for group, at in list(self._left.items()):
            if now - at > self.presence_ttl:
                del self._left[group]
        keys: Dict[Optional[str], bytes] = {group: self._presence_keys(group)[0] for group, _ in self._fields}
        keys.update((group, self._presence_keys(group)[0]) for group in self._left)
        keys[None] = self._procs_key
        owners = {group: self._owner(key) for group, key in keys.items()}
        owners = {group: node for group, node in owners.items() if node is not None}
        moved = {group for group, node in owners.items() if self._owners.get(group, node) != node}
        self._owners = owners
        if moved:
            log.info("presence: the master of %d of this process's slots changed; registering again",
                     len(moved))
            self._presence_dirty = True
            self._prune.update(group for group in moved if group is not None)

    def _owner(self, key: bytes) -> Optional[Tuple[str, int]]:
        """On a cluster, the master of ``key``'s slot as the client knows it (no round trip)."""
        if not getattr(self, "_cluster", False):
            return None
        try:
            node = self._publisher.get_node_from_key(key)
        except self._presence_errors:  # a slot no master covers now: the next look
            return None
        return (node.host, node.port)

    def _each_group(self, by_group: Dict[str, List[Any]], step: Any) -> List[str]:
        """``step(group, items)`` for every group, ``_PARALLEL`` at a time (a group's
        slot may be on any shard); the errors of those that failed."""
        failed: List[str] = []

        def run(group: str, items: List[Any]) -> None:
            try:
                step(group, items)
            except self._presence_errors as exc:
                failed.append(self._scrub(exc))

        pool = gevent.pool.Pool(_PARALLEL)
        for group, items in by_group.items():
            pool.spawn(run, group, items)
        pool.join()
        return failed

    def _reap(self, proc: str, flat: List[bytes]) -> None:
        """Take a dead process's entries out of each of its groups, then forget them.

        A failure leaves the rest to whoever takes the reaping when its lease
        runs out: every step can run twice.
        """
        by_group: Dict[str, List[Any]] = {}
        for i in range(0, len(flat), 2):
            group, key = json.loads(flat[i + 1])
            by_group.setdefault(group, []).extend((flat[i], key))
        reaped = [0]

        def leave(group: str, pairs: List[Any]) -> None:
            entries, counts = self._presence_keys(group)
            head = event_head(group)
            for chunk in _chunks(pairs, 2 * CHUNK):
                reaped[0] += self._run(LEAVE_LUA, 2, entries, counts, self._events_key, head, *chunk)

        failed = self._each_group(by_group, leave)
        reaping = (self._reaping_prefix + proc).encode()
        try:
            for chunk in () if failed else _chunks(flat[::2], CHUNK):
                self._run(REAPED_LUA, 2, self._reapings_key, reaping, proc, *chunk)
        except self._presence_errors as exc:
            failed.append(self._scrub(exc))
        if failed:
            log.debug("presence: reaping process %s incomplete (retried when its lease ends): %s",
                      proc, failed[0])
            return
        log.info("presence: reaped process %s (no heartbeat): %d channel(s) in %d group(s)",
                 proc, reaped[0], len(by_group))

    def _reregister(self) -> None:
        """Every live entry again (moved from its field under a lost id, if it has one),
        then the groups to prune."""
        self._presence_dirty = False
        me, drawn, prune, self._prune = self._proc, self._drawn, self._prune, set()
        snapshot = [
            (group, channel, field, self._moves.get((group, channel), ""), self._present[group][channel])
            for (group, channel), field in list(self._fields.items())
            if channel in self._present.get(group, ())
        ]
        try:
            for chunk in _chunks(snapshot, CHUNK):
                if not self._proc_step([(f, g, e.key) for g, _, f, _, e in chunk], ()):
                    self._prune |= prune
                    return  # lost once more: _lost asked for another round
        except BaseException:
            self._presence_dirty = True
            self._prune |= prune
            raise
        by_group: Dict[str, List[Tuple[str, Channel, str, str, PresenceEntry]]] = {}
        for item in snapshot:
            by_group.setdefault(item[0], []).append(item)

        def join(group: str, items: List[Tuple[str, Channel, str, str, PresenceEntry]]) -> None:
            entries, counts = self._presence_keys(group)
            head = event_head(group)
            for chunk in _chunks(items, CHUNK):
                args: List[Any] = []
                for _, _, field, old, entry in chunk:
                    args += (field, old, entry.key, entry.value)
                self._run(JOIN_LUA, 2, entries, counts, self._events_key, head, *args)
                for _, channel, field, old, entry in chunk:
                    self._written(group, channel, field, old, entry)

        def prune_one(group: str, fields: List[str]) -> None:
            entries, counts = self._presence_keys(group)
            self._run(PRUNE_LUA, 2, entries, counts, self._events_key, event_head(group),
                      me + ":", drawn, *fields)

        failed = self._each_group(by_group, join)
        if not failed and prune:
            failed = self._each_group({g: [i[2] for i in by_group.get(g, ())] for g in prune}, prune_one)
        if failed:
            self._presence_dirty = True
            self._prune |= prune
            log.debug("presence re-registration incomplete (the next refresh retries): %s", failed[0])

    # -- events --------------------------------------------------------------------

    def _on_presence_event(self, payload: bytes) -> None:
        try:
            group, key, meta, joined = decode_event(payload)
        except Exception:
            log.exception("undecodable presence event dropped")
            return
        self._seen_version += 1
        self._note_presence(group, key, meta, joined)

    def _note_presence(self, group: str, key: str, meta: Any, joined: bool) -> None:
        """Report an event unless this process already did (its view: ``_seen``)."""
        if joined:
            seen = self._seen.setdefault(group, {})
            if key in seen:
                return  # a re-registration after a Redis restart: not a new join
            seen[key] = meta
        else:
            known = self._seen.get(group)
            if known is not None:
                if key not in known:
                    return  # reported already (by a reconciliation)
                del known[key]
                if not known:
                    del self._seen[group]
        self._emit_presence(group, key, meta, joined)

    def _reconcile(self) -> None:
        """After the subscriber was away: report the joins and leaves it missed.

        Runs ``presence_ttl / 2`` after the reconnection, so that after a
        Redis restart every live process has re-registered first (each within
        one refresh, ``presence_ttl / 3``). Only groups this process has heard
        of; a group that got an event while being read is left as it is (the
        event is newer than the read).
        """
        if self._closed or not self._up:
            return
        for group in list(self._seen):
            version = self._seen_version
            try:
                present = merge(self._publisher.hvals(self._presence_keys(group)[0]))
            except (*self._presence_errors, AttributeError) as exc:
                log.debug("presence reconciliation of %r failed: %s", group, exc)
                return
            if version != self._seen_version:
                continue
            seen = dict(self._seen.get(group, {}))
            for key, meta in seen.items():
                if key not in present:
                    self._note_presence(group, key, meta, False)
            for key, metas in present.items():
                if key not in seen:
                    self._note_presence(group, key, metas[0], True)
