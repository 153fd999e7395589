"""History and resuming: message ids, each group's kept messages, the exactly-once join.

Design (docs/history.md says the same for users)
=================================================

Off by default (``history=0``): no id, no history, delivery exactly as before
(``channel.send(message, wait=False)``, the same bytes at the same speed).

**Ids.** ``"<tag>:<epoch>:<position>"``, a ``str`` of ``[0-9a-f:-]``, safe in an
SSE ``id:`` line, an HTTP header and a query parameter:

- ``tag``: the first 6 hex digits of SHA-1 of the group name. A client in several
  groups sends one string, its ids separated by spaces (greenchan.js's
  ``gc_last``); the store takes the component whose tag is its group's.
- ``epoch``: 8 random hex digits naming one life of the group's history. The
  memory store draws it when it first keeps anything for the group (so a new
  store, a restarted process, has new epochs); Redis keeps it in the group's
  meta key, created atomically by the first script that needs it, so a Redis
  that was flushed or restarted empty gives the group a new epoch. An id of
  another epoch is never taken for a position: it is answered ``False``/``None``.
- ``position``: the memory store's message number (``1, 2, ...``), Redis's stream
  entry id ``<ms>-<n>`` (Redis time in ms, made non-decreasing, and the message
  number). Message numbers are dense within an epoch, so continuity is a check of
  numbers: ``since`` can be continued iff the first kept message after it has
  number ``n + 1`` (nothing between was trimmed or expired), or ``since`` is the
  newest message. Position ``0`` (``0-0``) is "the start of this epoch": what a
  joining channel is told when the group has no message yet.

**What ``since`` may be.** ``None``: join live, ``True``. A string with a
component for this group: resume from it (``True`` and a replay, or ``False``
and nothing replayed when it cannot be continued). A string with no component
for this group: ``False``. The client has a position somewhere but not here:
either it never joined this group (then ``False`` costs nothing: the
application sends the fresh state it would send any new member) or it lost
this group's position (a plain ``EventSource`` in two groups keeps only the
last event's id): answering ``True`` there would hide a loss.

**Exactly once across the join, one process** (``MemoryChannelStore``): the
replay, the membership and the position are done in one greenlet without
yielding (sends never block), so a broadcast from any other greenlet comes
wholly before (it is in the replay) or wholly after (it is live).

**Exactly once across the join, every process** (``RedisChannelStore``). One
Lua script per broadcast numbers the message, appends it to the group's stream
(``XADD ... MAXLEN ~ N``, trimmed by age with ``XTRIM MINID``), and publishes
it with its epoch and position: id, history and publish never disagree, in one
round trip. The joining channel gets a cursor in *buffering* state, then the
store (1) subscribes to the group and waits for Redis's confirmation, so every
message published from then on reaches this process; (2) reads, in one atomic
script, the epoch, the newest position ``L`` and the stream after ``since``;
(3) without yielding: replays the kept messages after ``since`` (up to ``L``),
then the live messages the cursor buffered meanwhile whose number is above
``L``, then the cursor goes live. Every live message of a group carries its
number, and each member's cursor keeps the last number it delivered, so a
message that the reader greenlet had not yet read when the script ran (number
``<= L``, already replayed) is dropped, and one published after (number
``> L``) is delivered once. Messages of another epoch than the cursor's (Redis
lost its data meanwhile) are delivered when published after the snapshot (by
Redis time) and the cursor moves to that epoch.

**After a lost subscriber connection** (a Redis restart, a network cut, Redis
cutting a slow subscriber), the store replays to every member, from the
stream, what was published while it was disconnected: the same script and the
same cursors as a join, for all members at once. Members whose messages were
trimmed or lost with the epoch are reported in a WARNING.

**Delivery with ids** goes through ``channel._send_tagged(message, group, id)``
(the channel decides the wire form); the position through
``channel._position(group, id)``; the outcome of a resume through
``channel._resumed(group, recovered)``. Each has a fallback while a channel
type lacks it.

**Time to live.** ``history_ttl``: a kept message older than that is not
replayed (memory: dropped when seen; Redis: ``XTRIM MINID`` on publish and a
check on read, and the stream key expires). A client whose ``since`` has
expired but whose next message has not resumes; one that missed an expired
message gets ``False``. A group's epoch and position outlive its messages by
``EPOCH_RETENTION`` (a day, or ``history_ttl`` if longer) of silence, so that a
client that missed nothing resumes after a quiet night; then the group is
forgotten (its Redis meta key expires; the memory store drops it) and a
``since`` from before gets ``False``. Without ``history_ttl`` nothing expires:
each group that ever had a message keeps its newest ``N``.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import random
import re
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

from .. import counters
from ..channel import Channel

log = logging.getLogger("greenchan.stores")

#: Seconds a silent group's epoch and position are kept after its last message
#: (with ``history_ttl``; at least ``history_ttl``): long enough that a client
#: that missed nothing overnight still resumes, short enough that groups that
#: are gone do not pile up (memory, Redis keys).
EPOCH_RETENTION = 86400

#: How many hex digits of SHA-1(group) tag an id: a client in several groups
#: sends one string of ids, and the tag picks this group's.
TAG_DIGITS = 6

Kept = List[Tuple[str, Any]]  # [(id, message), ...] oldest first


@functools.lru_cache(maxsize=65536)
def group_tag(group: str) -> str:
    """The tag of ``group``'s ids (cached: computed once per group, not per message)."""
    return hashlib.sha1(group.encode()).hexdigest()[:TAG_DIGITS]


# Epochs come from a generator seeded from os.urandom, not from os.urandom itself:
# one is drawn per Redis broadcast (used only if the group has lost its epoch), and
# a system call per broadcast is not free. Reseeded in a forked child, so that two
# workers never draw the same sequence.
_epochs = random.Random()
os.register_at_fork(after_in_child=_epochs.seed)


def new_epoch() -> str:
    """A fresh epoch: 32 random bits, so a lost history's ids are never mistaken."""
    return f"{_epochs.getrandbits(32):08x}"


def make_id(group: str, epoch: str, position: str) -> str:
    return f"{group_tag(group)}:{epoch}:{position}"


def components(since: str, group: str) -> List[Tuple[str, str]]:
    """The ``(epoch, position)`` of each id in ``since`` tagged for ``group``.

    Usually one; none when ``since`` has no id for this group; more than one
    only if two groups' tags collide, and then the epoch tells them apart.
    """
    tag = group_tag(group)
    found = []
    for part in since.split():
        fields = part.split(":")
        if len(fields) == 3 and fields[0] == tag and fields[1] and fields[2]:
            found.append((fields[1], fields[2]))
    return found


# -- the channel's side, with fallbacks for a channel type that lacks it ----------


def send_tagged(channel: Channel, message: Any, group: str, msg_id: str) -> bool:
    """Send a message of a group with history: the channel puts the id on the wire."""
    tagged = getattr(channel, "_send_tagged", None)
    if tagged is None:
        return channel.send(message, wait=False)
    return tagged(message, group, msg_id)


def tell_position(channel: Channel, group: str, msg_id: str) -> None:
    """Tell the client where ``group`` stands, so it can resume having received nothing."""
    position = getattr(channel, "_position", None)
    if position is not None:
        position(group, msg_id)


def tell_resumed(channel: Channel, group: str, recovered: bool) -> None:
    """Tell the client whether ``group`` resumed without a gap (greenchan.js's ``onresume``)."""
    resumed = getattr(channel, "_resumed", None)
    if resumed is not None:
        resumed(group, recovered)


def replay_to(
    render: Optional[Callable[[Channel, Any, Any], Any]],
    group: str,
    channel: Channel,
    attachment: Any,
    replay: Iterable[Tuple[str, Any]],
) -> None:
    """Send the kept messages ``replay`` to one joining member, in order."""
    for msg_id, data in replay:
        try:
            message = data if render is None else render(channel, attachment, data)
            if message is not None and not send_tagged(channel, message, group, msg_id):
                return  # closed: a long-poll took one and left, or the client is gone
        except Exception:
            log.exception("replay to %r in group %r failed", channel, group)


def _observe_resume(recovered: bool) -> None:
    """A join with ``since`` that did (``True``) or did not recover
    (``greenchan_resumes_total{recovered}``)."""
    counters.resumed(recovered)


def check_options(history: int, history_ttl: Optional[float]) -> None:
    if not isinstance(history, int) or isinstance(history, bool) or history < 0:
        raise ValueError(f"history is a number of messages kept per group (0: none), not {history!r}")
    if history_ttl is not None and not history_ttl > 0:
        raise ValueError(f"history_ttl is a number of seconds > 0, or None, not {history_ttl!r}")
    if history_ttl is not None and not history:
        raise ValueError("history_ttl needs history=N (how many messages to keep per group)")


class Cursor:
    """Where one member of a group with history is in that group's sequence.

    ``buffer`` is a list while the member joins (live messages wait there until
    the replay is done), ``None`` once it is live. ``epoch``/``seq`` are the
    last message delivered to it (or the position it joined at), ``ms`` the Redis
    time of that point, used only to order messages of two epochs.
    """

    __slots__ = ("epoch", "seq", "ms", "sid", "buffer")

    def __init__(self) -> None:
        self.epoch: Optional[str] = None
        self.seq = 0
        self.ms = 0
        self.sid = ""
        self.buffer: Optional[List[Tuple[str, str, int, int, Any]]] = []

    def wants(self, epoch: str, seq: int, ms: int) -> bool:
        """True if a live message (``epoch``, ``seq``, ``ms``) is new to this member."""
        if epoch == self.epoch:
            # A later Redis time with a number already seen: a failover lost the
            # tail of the group's numbers (asynchronous replication) and the new
            # master numbers from its last replicated one. New all the same.
            return seq > self.seq or ms > self.ms
        # Another epoch: Redis lost the group's history. A message published
        # after our point (by Redis time) is new; an older one is still arriving
        # from before the point this member joined at.
        return self.epoch is None or ms >= self.ms

    def moved(self, epoch: str, sid: str, seq: int, ms: int) -> None:
        self.epoch, self.sid, self.seq, self.ms = epoch, sid, seq, ms


# -- the memory store's history -----------------------------------------------------


class _Group:
    """One group's kept messages in this process."""

    __slots__ = ("epoch", "prefix", "seq", "entries", "touched")

    def __init__(self, group: str, size: int, now: float) -> None:
        self.epoch = new_epoch()
        self.prefix = make_id(group, self.epoch, "")  # an id is this and a number
        self.seq = 0  # the number of the newest message (0: none yet)
        # (number, time kept, data), oldest first; numbers are consecutive.
        self.entries: Deque[Tuple[int, float, Any]] = deque(maxlen=size)
        self.touched = now  # the last append (or creation): for dropping idle groups


class MemoryHistory:
    """Each group's newest ``size`` messages, kept ``ttl`` seconds, in this process."""

    #: With a ttl, every this many appends, groups silent for ``EPOCH_RETENTION``
    #: (and without members) are forgotten, so short-lived groups do not pile up.
    SWEEP_EVERY = 1024

    def __init__(
        self,
        size: int,
        ttl: Optional[float],
        in_use: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        self.ttl = ttl
        self._in_use = in_use
        self._clock = clock
        self._groups: Dict[str, _Group] = {}
        self._appends = 0

    def group(self, group: str) -> _Group:
        """``group``'s history, begun (a new epoch) if it has none."""
        kept = self._groups.get(group)
        if kept is None:
            kept = self._groups[group] = _Group(group, self.size, self._clock())
        return kept

    def append(self, group: str, data: Any) -> str:
        """Keep ``data`` as ``group``'s next message; its id. (On every broadcast: lean.)"""
        kept = self._groups.get(group) or self.group(group)
        seq = kept.seq = kept.seq + 1
        if self.ttl is None:  # no clock needed: nothing expires
            kept.entries.append((seq, 0.0, data))
        else:
            now = kept.touched = self._clock()
            kept.entries.append((seq, now, data))
            self._appends += 1
            if self._appends % self.SWEEP_EVERY == 0:
                self._sweep(now)
        return kept.prefix + str(seq)

    def position(self, group: str) -> str:
        """The id of ``group``'s newest message (``...:0`` when it has none yet)."""
        kept = self.group(group)
        return kept.prefix + str(kept.seq)

    def after(self, group: str, since: str) -> Optional[Kept]:
        """The kept messages after ``since``; None if ``since`` cannot be continued."""
        kept = self._groups.get(group)
        if kept is None:
            return None
        for epoch, position in components(since, group):
            if epoch != kept.epoch:
                continue
            try:
                n = int(position)
            except ValueError:
                return None
            self._expire(kept)
            if not 0 <= n <= kept.seq:
                return None
            first = kept.entries[0][0] if kept.entries else kept.seq + 1
            if first > n + 1:
                return None  # what came right after since was trimmed or expired
            return self._ids(group, kept, itertools.islice(kept.entries, n + 1 - first, None))
        return None

    def latest(self, group: str) -> Kept:
        """Every kept message of ``group``, oldest first."""
        kept = self._groups.get(group)
        if kept is None:
            return []
        self._expire(kept)
        return self._ids(group, kept, kept.entries)

    def _ids(self, group: str, kept: _Group, entries: Any) -> Kept:
        prefix = kept.prefix
        return [(prefix + str(seq), data) for seq, _, data in entries]

    def _expire(self, kept: _Group) -> None:
        if self.ttl is None:
            return
        oldest = self._clock() - self.ttl
        entries = kept.entries
        while entries and entries[0][1] <= oldest:
            entries.popleft()

    def _sweep(self, now: float) -> None:
        idle = now - max(self.ttl or 0.0, EPOCH_RETENTION)
        for name in [g for g, kept in self._groups.items() if kept.touched <= idle]:
            if not self._in_use(name):
                del self._groups[name]


# -- the Redis store's history: one stream and one meta hash per group ----------------

# One broadcast, atomically: number the message, keep it, publish it with its id.
# KEYS: the group's stream, its meta hash (e: epoch, m-n: its newest message).
# ARGV: the pub/sub channel, the payload, history size, ttl in ms (0: none), an
# epoch to begin if the group has none (Redis lost it, or never had it), how long
# in ms the meta outlives the last message (with a ttl), and how to publish
# (PUBLISH, or SPUBLISH on a cluster: the channel shares the keys' hash slot).
PUBLISH_LUA = """
local meta = redis.call('HMGET', KEYS[2], 'e', 'm', 'n')
local epoch, ms, n = meta[1], tonumber(meta[2]) or 0, tonumber(meta[3]) or 0
if not epoch then
  epoch, ms, n = ARGV[5], 0, 0
  redis.call('DEL', KEYS[1])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < ms then now = ms end
n = n + 1
local sid = string.format('%.0f-%.0f', now, n)
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], sid, 'd', ARGV[2])
redis.call('HSET', KEYS[2], 'e', epoch, 'm', string.format('%.0f', now), 'n', string.format('%.0f', n))
if ARGV[4] ~= '0' then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', now - tonumber(ARGV[4])))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
return redis.call(ARGV[7], ARGV[1], 'h' .. epoch .. ':' .. sid .. ' ' .. ARGV[2])
"""

# A consistent look at a group's history: its epoch (begun if asked and there is
# none), its newest message, Redis's time, and the entries after a position (from
# it, inclusive) or the newest ones.
# ARGV: an epoch to begin ('' : do not), the meta's retention in ms (0: none), the
# epoch of `since`, its stream id ('' : none), how many of the newest to return
# when there is no since, at most how many after since (0: all).
READ_LUA = """
local meta = redis.call('HMGET', KEYS[2], 'e', 'm', 'n')
local epoch = meta[1]
if not epoch then
  if ARGV[1] == '' then return {} end
  epoch = ARGV[1]
  meta = {epoch, '0', '0'}
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 'm', '0', 'n', '0')
  if ARGV[2] ~= '0' then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
end
local t = redis.call('TIME')
local entries = {}
if ARGV[4] ~= '' then
  if ARGV[3] == epoch then
    if ARGV[6] == '0' then
      entries = redis.call('XRANGE', KEYS[1], ARGV[4], '+')
    else
      entries = redis.call('XRANGE', KEYS[1], ARGV[4], '+', 'COUNT', ARGV[6])
    end
  end
elseif ARGV[5] ~= '0' then
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[5])
end
return {epoch, meta[2], meta[3], t[1], t[2], entries}
"""

_SID = re.compile(r"(\d{1,20})-(\d{1,20})\Z")


def parse_sid(sid: str) -> Optional[Tuple[int, int]]:
    """``(ms, n)`` of a stream id ``"<ms>-<n>"``; None if it is not one."""
    match = _SID.match(sid)
    return (int(match.group(1)), int(match.group(2))) if match else None


class Entry:
    """One kept message as Redis returned it."""

    __slots__ = ("sid", "ms", "seq", "payload")

    def __init__(self, item: Any) -> None:
        sid, fields = item
        self.sid = sid.decode() if isinstance(sid, bytes) else sid
        ms, _, seq = self.sid.partition("-")
        self.ms, self.seq = int(ms), int(seq)
        self.payload = fields[1] if len(fields) > 1 else b""


class Entries:
    """Kept messages from ``start`` on, parsed one at a time as they are used.

    A replay to a long-poll member stops after one message: the rest of what
    ``XRANGE`` returned is never parsed.
    """

    __slots__ = ("_raw", "_start")

    def __init__(self, raw: List[Any], start: int = 0) -> None:
        self._raw, self._start = raw, start

    def __len__(self) -> int:
        return max(len(self._raw) - self._start, 0)

    def __iter__(self) -> Iterator[Entry]:
        return map(Entry, itertools.islice(self._raw, self._start, None))

    def first(self) -> Entry:
        return Entry(self._raw[self._start])


class Snapshot:
    """What ``READ_LUA`` saw, atomically: the epoch, the newest message, Redis's time."""

    __slots__ = ("epoch", "last_ms", "last_seq", "now_ms", "_raw")

    def __init__(self, reply: List[Any], newest_first: bool = False) -> None:
        text = [v.decode() if isinstance(v, bytes) else str(v) for v in reply[:5]]
        self.epoch = text[0]
        self.last_ms, self.last_seq = int(text[1]), int(text[2])
        self.now_ms = int(text[3]) * 1000 + int(text[4]) // 1000
        self._raw: List[Any] = reply[5][::-1] if newest_first else reply[5]

    @property
    def last_sid(self) -> str:
        return f"{self.last_ms}-{self.last_seq}"

    def kept(self, ttl_ms: int, start: int = 0) -> Entries:
        """The entries from ``start`` that are not older than ``ttl_ms`` (0: no limit)."""
        raw = self._raw
        if ttl_ms:
            oldest = self.now_ms - ttl_ms
            while start < len(raw) and Entry(raw[start]).ms <= oldest:
                start += 1  # oldest first: the expired ones are a prefix
        return Entries(raw, start)

    def after(self, since_epoch: str, since_sid: str, ttl_ms: int) -> Optional[Entries]:
        """The entries after ``since``, or None if something after it is gone."""
        parsed = parse_sid(since_sid)
        if since_epoch != self.epoch or parsed is None:
            return None
        ms, seq = parsed
        if seq > self.last_seq:
            return None  # not an id of this epoch
        if seq == self.last_seq:
            return Entries([]) if seq == 0 or ms == self.last_ms else None
        raw = self._raw
        # XRANGE began at since itself, if it is still kept. Only that one is
        # skipped: an entry numbered no later but published later is one that
        # came after a failover lost a tail of the numbers, and new.
        start = 1 if raw and Entry(raw[0]).sid == since_sid else 0
        entries = self.kept(ttl_ms, start)
        if not entries or entries.first().seq != seq + 1:
            return None  # trimmed or expired between since and what is kept
        return entries
