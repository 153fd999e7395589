"""Presence on Redis: the part of ``RedisChannelStore`` that keeps who is in a group.

The data layout and the scripts are in presence.py; this mixin runs them. It
relies on the store for the connection (``_publisher``, ``_eval_n``), the
subscriber (``_watch_events``) and the error text (``_scrub``).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import gevent
import gevent.event
from gevent.hub import get_hub, getcurrent

from ..channel import Channel
from .presence import (
    JOIN_LUA,
    LEAVE_LUA,
    REAP_BATCH,
    REFRESH_LUA,
    PresenceEntry,
    decode_event,
    event_payload,
    merge,
)

log = logging.getLogger("greenchan.stores")

# EVALSHA names a script by its SHA-1 (the re-registration pipelines the join script).
_JOIN_SHA = hashlib.sha1(JOIN_LUA.encode()).hexdigest()


class RedisPresence:
    """Mixin of ``RedisChannelStore``: presence entries, heartbeats, reaping, events."""

    def _init_presence(self, prefix: str, presence_ttl: float) -> None:
        if not isinstance(presence_ttl, (int, float)) or presence_ttl <= 0:
            raise ValueError(f"presence_ttl is a number of seconds > 0, not {presence_ttl!r}")
        self.presence_ttl = presence_ttl
        self._procs_key = (prefix + "presence:procs").encode()
        self._events_key = (prefix + "presence:events").encode()
        self._proc = ""  # this process's id in Redis: drawn in _start, per process
        self._field_seq = itertools.count(1)
        # (group, channel) -> its field in the group's entries hash
        self._fields: Dict[Tuple[str, Channel], str] = {}
        # group -> keys whose join this process has reported: a re-registration
        # (after a Redis restart) does not report them again.
        self._seen: Dict[str, Dict[str, Any]] = {}  # group -> {key: its meta when reported}
        self._seen_version = 0  # events heard: a reconciliation yields to newer news
        # Leaves Redis did not take (an outage): retried by the refresh.
        self._pending_leaves: List[Tuple[str, str, PresenceEntry]] = []
        # True when Redis may lack some of our entries: the refresh re-registers.
        self._presence_dirty = False
        self._heartbeat_sent = False
        self._refresher: Optional[gevent.Greenlet] = None

    def presence(self, group: str) -> Dict[str, List[Any]]:
        """``{key: [meta, ...]}`` of ``group`` in every process: one ``HVALS``.

        Raises ``redis.exceptions.ConnectionError`` while Redis cannot be reached.
        """
        self._check_group(group)
        self._start()
        exceptions = self._redis.exceptions
        try:
            values = self._publisher.hvals(self._presence_keys(group)[0])
        except exceptions.AuthenticationError as exc:
            raise exceptions.AuthenticationError(self._scrub(exc)) from None
        except (exceptions.ConnectionError, exceptions.TimeoutError, OSError) as exc:
            raise exceptions.ConnectionError(
                f"reading the presence of {group!r} from {self.url} failed: {self._scrub(exc)}"
            ) from None
        return merge(values)

    def _presence_keys(self, group: str) -> Tuple[bytes, bytes, bytes]:
        """The group's entries and counts hashes, and this process's set of groups."""
        base = f"{self.prefix}{{{group}}}:presence"
        return base.encode(), (base + ":keys").encode(), f"{self.prefix}presence:proc:{self._proc}".encode()

    def _join_args(self, group: str, field: str, entry: PresenceEntry) -> Tuple[Any, ...]:
        entries, counts, mine = self._presence_keys(group)
        return (entries, counts, self._procs_key, mine, field, entry.key, entry.value, group,
                self._events_key, event_payload(group, entry.value, True), self._proc,
                int(self.presence_ttl * 1000))

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
        self._fields.clear()
        self._refresher = None
        if self._presence_fns:
            self._start_refresher()

    def _presence_joined(self, group: str, channel: Channel, entry: PresenceEntry) -> None:
        field = f"{self._proc}:{next(self._field_seq)}"
        self._fields[(group, channel)] = field
        self._start_refresher()
        if getcurrent() is get_hub():
            gevent.spawn(self._register, group, field, entry)
        else:
            self._register(group, field, entry)

    def _register(self, group: str, field: str, entry: PresenceEntry) -> None:
        if self._publisher is None:
            return
        try:
            _added, missing = self._eval_n(JOIN_LUA, 4, self._join_args(group, field, entry))
        except (self._redis.exceptions.RedisError, OSError) as exc:
            log.debug("presence join in %r not registered (the refresh will): %s", group, self._scrub(exc))
            self._presence_dirty = True
            return
        if missing and self._heartbeat_sent:
            # Our heartbeat was gone (Redis restarted, or we were reaped): our
            # other entries may be gone too.
            self._presence_dirty = True
            gevent.spawn(self._refresh)
        self._heartbeat_sent = True

    def _presence_left(self, group: str, channel: Channel, entry: PresenceEntry) -> None:
        field = self._fields.pop((group, channel), None)
        if field is None:
            return
        if getcurrent() is get_hub():  # a close hook: no I/O in the hub
            gevent.spawn(self._unregister, group, field, entry)
        else:
            self._unregister(group, field, entry)

    def _unregister(self, group: str, field: str, entry: PresenceEntry) -> bool:
        if self._publisher is None:
            return False  # closed: the TTL takes the entry out
        entries, counts, mine = self._presence_keys(group)
        last_here = "0" if group in self._present else "1"
        nothing_here = "0" if self._present else "1"
        args = (entries, counts, mine, self._procs_key, field, entry.key, group, self._events_key,
                event_payload(group, entry.value, False), last_here, self._proc, nothing_here)
        try:
            self._eval_n(LEAVE_LUA, 4, args)
        except (self._redis.exceptions.RedisError, OSError) as exc:
            log.debug("presence leave in %r not registered (the refresh will retry): %s", group, self._scrub(exc))
            self._pending_leaves.append((group, field, entry))
            return False
        if nothing_here == "1":
            self._heartbeat_sent = False  # we took our heartbeat out: the next join puts it back
        return True

    def _leave_presence_on_close(self) -> None:
        """A closing store takes its entries out (best effort: the TTL does it otherwise)."""
        fields, self._fields = self._fields, {}
        if not fields or self._publisher is None or getcurrent() is get_hub():
            return
        present, self._present = self._present, {}
        try:
            for (group, channel), field in fields.items():
                entry = present.get(group, {}).get(channel)
                if entry is not None:
                    self._unregister(group, field, entry)
        finally:
            self._pending_leaves = []

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

    def _refresh(self) -> None:
        """Push our heartbeat, reap dead processes, re-register or retry what Redis lacks."""
        if self._publisher is None:
            return
        try:
            present = "1" if self._present else "0"
            missing, _reaped = self._eval_n(REFRESH_LUA, 1, (
                self._procs_key, self._proc, int(self.presence_ttl * 1000), self.prefix,
                self._events_key, REAP_BATCH, present,
            ))
            pending, self._pending_leaves = self._pending_leaves, []
            for group, field, entry in pending:
                if not self._unregister(group, field, entry):
                    break
            if present == "1" and (missing and self._heartbeat_sent or self._presence_dirty):
                self._reregister()
        except (self._redis.exceptions.RedisError, OSError) as exc:
            log.debug("presence refresh failed: %s", self._scrub(exc))

    def _reregister(self) -> None:
        """Every live entry of this process again, in one pipelined round trip."""
        self._presence_dirty = False
        snapshot = [
            (group, field, self._present[group][channel])
            for (group, channel), field in list(self._fields.items())
            if channel in self._present.get(group, ())
        ]
        pipe = self._publisher.pipeline(transaction=False)
        pipe.execute_command("SCRIPT LOAD", JOIN_LUA)  # gone after a restart
        for group, field, entry in snapshot:
            pipe.execute_command("EVALSHA", _JOIN_SHA, 4, *self._join_args(group, field, entry))
        try:
            results = pipe.execute(raise_on_error=False)
        except Exception:
            self._presence_dirty = True
            raise
        if any(isinstance(r, Exception) for r in results):
            self._presence_dirty = True
        self._heartbeat_sent = True
        # A channel that left while the pipeline was on its way: its leave may
        # have run first; remove what we may have put back.
        live = set(self._fields.values())
        for group, field, entry in snapshot:
            if field not in live:
                self._unregister(group, field, entry)

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
            except (self._redis.exceptions.RedisError, OSError, AttributeError) as exc:
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

