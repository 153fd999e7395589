"""History on Redis: the part of ``RedisChannelStore`` that gives members what they missed.

The ids, the scripts and the exactly-once join are in history.py; this mixin runs
them: the join's replay (``_resume``), the live delivery that keeps each member's
place (``_deliver_live``), and the catch-up after a subscription was away or missed
a message (``_catch_up``, ``_fill_gap``). It relies on the store for Redis
(``_publisher``, ``_errors``, ``_scrub``), its groups and its cursors.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import gevent

from ..channel import Channel
from .codec import decode
from .history import (
    PUBLISH_LUA,
    READ_LUA,
    Cursor,
    Entries,
    Entry,
    Snapshot,
    components,
    make_id,
    new_epoch,
    parse_sid,
    replay_to,
    send_tagged,
    tell_position,
    tell_resumed,
)

log = logging.getLogger("greenchan.stores")

# The SHA-1 that EVALSHA names each script by.
SHAS = {script: hashlib.sha1(script.encode()).hexdigest() for script in (PUBLISH_LUA, READ_LUA)}


class RedisHistory:
    """Mixin of ``RedisChannelStore``: the history's join, live delivery and catch-up."""

    def _eval(self, script: str, keys_and_args: Tuple[Any, ...]) -> Any:
        """Run one of history.py's scripts (two keys each): EVALSHA, one round trip.

        The script is loaded on first use, and again after Redis lost it (a
        restart). redis-py's Script object costs more per call than the call.
        """
        sha = SHAS[script]
        try:
            return self._publisher.execute_command("EVALSHA", sha, 2, *keys_and_args)
        except self._redis.exceptions.NoScriptError:
            self._publisher.execute_command("SCRIPT LOAD", script)
            return self._publisher.execute_command("EVALSHA", sha, 2, *keys_and_args)

    def _history_keys(self, group: str) -> List[bytes]:
        """The group's stream and meta hash; the group in braces, one hash slot (Cluster)."""
        base = f"{self.prefix}{{{group}}}:"
        return [(base + "history").encode(), (base + "meta").encode()]

    def _snapshot(
        self, group: str, since: Optional[str], *, create: bool, latest: bool = False, count: int = 0
    ) -> Tuple[Optional[Snapshot], Optional[Entries]]:
        """One atomic look at ``group``'s history: (snapshot, kept entries after ``since``).

        The entries are None when ``since`` cannot be continued (at most
        ``count`` of them, 0: all); with no ``since``, the newest kept ones if
        ``latest``. (None, None) when the group has no history and ``create`` is
        False. One round trip (more only if two groups' tags collide in a
        composite ``since``).
        """
        keys = self._history_keys(group)
        token = new_epoch() if create else ""
        candidates = [] if since is None else [(e, p) for e, p in components(since, group) if parse_sid(p)]
        if not candidates:
            newest = self.history_size if latest and since is None else 0
            args = [token, self._retention_ms, "", "", newest, 0]
            reply = self._eval(READ_LUA, (*keys, *args))
            if not reply:
                return None, None
            snap = Snapshot(reply, newest_first=True)
            return snap, (snap.kept(self._ttl_ms) if since is None else None)
        for i, (epoch, position) in enumerate(candidates):
            # One more than asked: XRANGE starts at since itself when it is kept.
            args = [token, self._retention_ms, epoch, position, 0, count + 1 if count else 0]
            reply = self._eval(READ_LUA, (*keys, *args))
            if not reply:
                return None, None
            snap = Snapshot(reply)
            if snap.epoch == epoch or i == len(candidates) - 1:
                return snap, snap.after(epoch, position, self._ttl_ms)
        raise AssertionError("unreachable")  # pragma: no cover

    #: Kept messages read with the join's snapshot; more are read a page at a
    #: time while the replay goes on. A long-poll member takes one message per
    #: request: reading everything after its ``since`` on every poll would cost
    #: each poll as much as it is behind.
    FIRST_PAGE = 100
    PAGE = 1000

    def _resume(self, group: str, channel: Channel, attachment: Any, cursor: Cursor, since: Optional[str]) -> bool:
        """Bring a joining member from ``since`` to live; True if nothing was missed."""
        snap: Optional[Snapshot] = None
        entries: Optional[Entries] = None
        recovered = since is None
        errors = self._errors
        if self._wait_subscribed(group):
            try:
                snap, entries = self._snapshot(group, since, create=True, count=self.FIRST_PAGE)
                if since is not None and snap is not None and entries is not None:
                    recovered = self._replay_pages(group, channel, attachment, cursor, snap, entries)
            except errors as exc:
                log.debug("reading the history of %r failed: %s", group, self._scrub(exc))
                recovered = since is None
        # From here to the end, no yield: the reader cannot slip a message between.
        if self._cursors.get(group, {}).get(channel) is not cursor:
            # It left: closed while we waited, or by its replay (a long-poll).
            return recovered and snap is not None
        if snap is None:  # Redis unreachable: live, and a since cannot be vouched for
            self._flush(group, channel, attachment, cursor, force=True)
            return since is None
        if cursor.epoch != snap.epoch or cursor.seq < snap.last_seq:
            cursor.moved(snap.epoch, snap.last_sid, snap.last_seq, snap.now_ms)
        cursor.ms = max(cursor.ms, snap.now_ms)
        flushed = self._flush(group, channel, attachment, cursor)
        if channel.is_open:
            tell_position(channel, group, make_id(group, snap.epoch if cursor.epoch is None else cursor.epoch, cursor.sid))
        if flushed:
            self._settle(group, channel, cursor)
        else:
            gevent.spawn(self._fill_gap, group, [(channel, cursor)])
        return recovered

    def _replay_pages(
        self, group: str, channel: Channel, attachment: Any, cursor: Cursor, snap: Snapshot, entries: Entries
    ) -> bool:
        """Replay up to the snapshot's newest message, a page at a time; False if cut short.

        The cursor buffers live messages all along, so reading the next page
        may yield. A page that does not continue the last one (trimmed while the
        replay went on, the client being nearly ``history`` messages behind a
        busy group) ends the replay: False, after what could be replayed.
        """
        render = self.render
        prefix = make_id(group, snap.epoch, "")
        page: Optional[Entries] = entries
        while True:
            for entry in page or ():
                if entry.seq > snap.last_seq:
                    break  # after the snapshot: the buffer has it
                cursor.moved(snap.epoch, entry.sid, entry.seq, entry.ms)
                try:
                    data = decode(entry.payload)
                    message = data if render is None else render(channel, attachment, data)
                    if message is not None and not send_tagged(channel, message, group, prefix + entry.sid):
                        return True  # closed: a long-poll took one and left
                except Exception:
                    log.exception("replay to %r in group %r failed", channel, group)
            if cursor.seq >= snap.last_seq or not channel.is_open:
                return True
            since = prefix + cursor.sid
            latest, page = self._snapshot(group, since, create=False, count=self.PAGE)
            if latest is None or page is None or latest.epoch != snap.epoch:
                return False

    def _flush(self, group: str, channel: Channel, attachment: Any, cursor: Cursor, force: bool = False) -> bool:
        """Deliver what the cursor buffered (what it has not had yet) and make it live.

        False if the buffer skips a message after the cursor's position (one the
        subscription missed): the member keeps buffering from there, for ``_fill``
        to bring the rest from the history. ``force``: deliver anyway (the history
        cannot be read).
        """
        buffered, cursor.buffer = cursor.buffer or [], None
        for i, (epoch, sid, seq, ms, data) in enumerate(buffered):
            if cursor.wants(epoch, seq, ms):
                if not force and epoch == cursor.epoch and seq > cursor.seq + 1:
                    cursor.buffer = buffered[i:]
                    return False
                cursor.moved(epoch, sid, seq, ms)
                replay_to(self.render, group, channel, attachment, [(make_id(group, epoch, sid), data)])
        return True

    def _with_ids(self, group: str, epoch: str, entries: Iterable[Entry]) -> Iterator[Tuple[str, Any]]:
        """(id, message) of each entry, decoded as the replay takes them."""
        prefix = make_id(group, epoch, "")
        return ((prefix + e.sid, decode(e.payload)) for e in entries)

    def _forget_cursor(self, group: str, channel: Channel) -> None:
        cursors = self._cursors.get(group)
        if cursors is not None:
            cursors.pop(channel, None)
            if not cursors:
                del self._cursors[group]

    def _leave(self, group: str, channel: Channel) -> None:
        self._forget_cursor(group, channel)
        super()._leave(group, channel)
        if group not in self._groups:
            self._live.pop(group, None)

    def _deliver_live(self, group: str, epoch: str, sid: str, seq: int, ms: int, data: Any) -> int:
        """A message of a group with history, from the subscription: once per member.

        Members in step with the group (the common case) need no check: the
        message is the next one for each. Only members with a cursor of their
        own (joining, catching up, or ahead of what this reader has read) are
        checked, and each leaves that state at its first new live message.
        """
        members = self._groups.get(group)
        if not members:
            return 0
        live = self._live.get(group)
        if live is None:
            live = self._live[group] = Cursor()
            live.buffer = None
        # A message skipped (lost between two subscriptions, as when a cluster's
        # master hands over its shard): the members wait for it from the history.
        gap = live.epoch == epoch and seq > live.seq + 1
        held = self._hold(group) if gap else None
        live.moved(epoch, sid, seq, ms)
        cursors = self._cursors.get(group)
        render = self.render
        msg_id = make_id(group, epoch, sid)
        sent = 0
        for channel, attachment in list(members.items()):
            if cursors:
                cursor = cursors.get(channel)
                if cursor is not None:
                    if cursor.buffer is not None:  # joining: after its replay
                        cursor.buffer.append((epoch, sid, seq, ms, data))
                        continue
                    if not cursor.wants(epoch, seq, ms):
                        continue  # already in its replay
                    if epoch == cursor.epoch and seq > cursor.seq + 1:  # it missed one
                        cursor.buffer = [(epoch, sid, seq, ms, data)]
                        held = (held or []) + [(channel, cursor)]
                        continue
                    del cursors[channel]  # in step with the group from now on
            try:
                message = data if render is None else render(channel, attachment, data)
                if message is not None:
                    tagged = getattr(channel, "_send_tagged", None)
                    if tagged(message, group, msg_id) if tagged else channel.send(message, wait=False):
                        sent += 1
            except Exception:
                log.exception("broadcast to %r in group %r failed", channel, group)
        if cursors is not None and not cursors:
            del self._cursors[group]
        if held:
            gevent.spawn(self._fill_gap, group, held)
        return sent

    def _fill_gap(self, group: str, held: List[Tuple[Channel, Cursor]]) -> None:
        with self._catch_up_lock:
            lost: Dict[str, int] = {}
            try:
                self._fill(group, held, lost)
            except Exception:
                log.exception("filling a gap in group %r from the history failed", group)
            if lost:
                log.warning("%d member(s) of group %r missed messages the history no longer has", lost[group], group)

    def _settle(self, group: str, channel: Channel, cursor: Cursor) -> None:
        """A live member whose position is the group's, as read here: in step, no cursor."""
        live = self._live.get(group)
        if live is not None and live.epoch == cursor.epoch and live.seq == cursor.seq:
            self._forget_cursor(group, channel)

    def _catch_up(self, groups: List[str]) -> None:
        """After a reconnection: give ``groups``' members what was published while we were away.

        The same steps as a join, for all members of each group at once: their
        cursors buffer, one snapshot per group, a replay after each member's own
        position, the buffer, live. Members whose messages are gone (trimmed,
        expired, or Redis lost the epoch) get what is kept, are told
        (``_resumed(group, False)``) and are counted in a WARNING.
        """
        with self._catch_up_lock:
            lost: Dict[str, int] = {}
            for group in groups:
                if group not in self._groups:
                    continue
                try:
                    self._catch_up_group(group, lost)
                except Exception:
                    log.exception("catching up group %r after a reconnection failed", group)
            if lost:
                log.warning(
                    "after reconnecting to Redis at %s, %d member(s) of %d group(s) could not be "
                    "given everything published while the subscriber was disconnected (no longer "
                    "in the history): they go on live, and were told they did not resume (%s)",
                    self.url, sum(lost.values()), len(lost), ", ".join(sorted(lost)[:10]),
                )

    def _catch_up_group(self, group: str, lost: Dict[str, int]) -> None:
        """One group's catch-up: buffer, one snapshot, each member from its own position."""
        self._fill(group, self._hold(group), lost)

    def _hold(self, group: str) -> List[Tuple[Channel, Cursor]]:
        """Every member of ``group`` buffers from its position; no yield. The cursors."""
        members = self._groups.get(group, {})
        own = self._cursors.setdefault(group, {})
        live = self._live.get(group)
        if live is not None:  # members in step get a cursor at the group's position
            # (no yield between here and the buffers below: the reader cannot move them)
            for channel in members:
                if channel not in own:
                    cursor = own[channel] = Cursor()
                    cursor.moved(live.epoch or "", live.sid, live.seq, live.ms)
                    cursor.buffer = None
        # Members still joining are left to their join, which buffers already.
        cursors = [(ch, c) for ch, c in own.items() if c.buffer is None]
        for _, cursor in cursors:
            cursor.buffer = []
        return cursors

    def _fill(self, group: str, cursors: List[Tuple[Channel, Cursor]], lost: Dict[str, int]) -> None:
        """Replay to the held members what they missed, then their buffers: live again."""
        members = self._groups.get(group, {})
        try:
            snap: Optional[Snapshot] = None
            entries: Iterable[Entry] = ()
            behind = [c for _, c in cursors if c.epoch is not None]
            if behind:
                oldest = min(behind, key=lambda c: c.seq)
                since = make_id(group, oldest.epoch or "", oldest.sid or "0-0")
                try:
                    snap, _ = self._snapshot(group, since, create=True)
                except self._errors as exc:
                    log.debug("catching up group %r failed: %s", group, self._scrub(exc))
                if snap is not None and snap.epoch == oldest.epoch:
                    entries = list(snap.kept(self._ttl_ms))
            # No yield from here to the end of the group.
            for channel, cursor in cursors:
                if self._cursors.get(group, {}).get(channel) is not cursor or snap is None:
                    continue  # it left meanwhile; or Redis is gone again (the next catch-up)
                if cursor.epoch is None:
                    continue
                if cursor.epoch != snap.epoch:
                    # Redis lost the group's history: what was published before we
                    # resubscribed is gone; what came after is in the buffer.
                    lost[group] = lost.get(group, 0) + 1
                    tell_resumed(channel, group, False)
                elif cursor.seq < snap.last_seq or snap.last_ms > cursor.ms:
                    # Published later, by number or, after a failover that lost a
                    # tail of the numbers, by Redis time (see Cursor.wants).
                    missed = [e for e in entries if e.seq > cursor.seq or e.ms > cursor.ms]
                    if not missed or missed[0].seq > cursor.seq + 1:
                        lost[group] = lost.get(group, 0) + 1
                        tell_resumed(channel, group, False)
                    # What is kept, even after a gap: the newest is what matters.
                    replay_to(self.render, group, channel, members.get(channel),
                              self._with_ids(group, snap.epoch, missed))
                    cursor.moved(snap.epoch, snap.last_sid, snap.last_seq, snap.now_ms)
        finally:  # whatever happened, no member stays buffering (it would hear nothing)
            again = []
            for channel, cursor in cursors:
                if cursor.buffer is not None and self._cursors.get(group, {}).get(channel) is cursor:
                    if self._flush(group, channel, members.get(channel), cursor, force=snap is None):
                        self._settle(group, channel, cursor)
                    else:  # it missed more meanwhile: another look at the history
                        again.append((channel, cursor))
            if again:
                gevent.spawn(self._fill_gap, group, again)
