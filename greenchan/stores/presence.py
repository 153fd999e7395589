"""Presence: who is in a group, in one process or across every process sharing a Redis.

The data layout in Redis (``P`` is the store's ``prefix``, default ``greenchan:``)
---------------------------------------------------------------------------------

``P{group}:presence``  hash, one field per present channel
    field ``<process id>:<channel number>``, value the JSON ``[key, meta]``.
    ``presence(group)`` is one ``HGETALL`` of it.
``P{group}:presence:keys``  hash, one field per present key
    field the key, value how many channels it has (all processes): the join
    and leave scripts decide "first channel" / "last channel" from it in O(1).
``Ppresence:procs``  sorted set, the heartbeats
    member a process id (a random hex token per store and process), score the
    Redis ``TIME`` in ms until which that process counts as alive. Each join
    and each refresh (one per process every ``presence_ttl / 3`` s, whatever
    the number of groups and channels) push it to ``now + presence_ttl``.
``Ppresence:proc:<process id>``  set of the groups where that process has entries
    so that a dead process's entries are found without scanning Redis.
``Ppresence:events``  pub/sub channel of the join and leave events
    payload ``b"p" + JSON [group, [key, meta], joined]``. Every process that
    has an ``on_presence`` function subscribes to it (on its one subscriber
    connection), so every process hears every group's events, not only the
    groups it has members of.

The group's keys carry the group in braces (one hash slot on a Redis Cluster).
The scripts that touch ``presence:procs`` still cross slots: presence is for a
single Redis server (or a primary with replicas) for now.

Dead processes
--------------

The refresh script first pushes the caller's own deadline, then takes up to
``REAP_BATCH`` processes whose deadline is past, and for each: every group in
its ``presence:proc:<id>`` set, every field of that group's entries hash that
starts with ``<id>:``: deleted, its key's count decremented, and a leave event
PUBLISHed when the count reaches zero; then the set and the heartbeat go. A
script runs alone in Redis, so a dead process is reaped by exactly one
process and each leave is published once.

A process whose heartbeat was gone (Redis restarted, or it was paused past
its TTL and reaped) learns it from the ``ZADD`` reply of its next join or
refresh, and re-registers every live channel in one pipelined round trip
(``HSETNX``: an entry already there is not counted twice).
"""
from __future__ import annotations

import json
from typing import Any, Callable, Dict, List, Tuple

#: ``fn(group, key, meta, joined)``
PresenceFn = Callable[[str, str, Any, bool], None]

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


class PresenceEntry(Tuple[str, Any, bytes]):
    """(key, meta, the JSON ``[key, meta]``): one channel's presence, checked once."""

    __slots__ = ()

    @property
    def key(self) -> str:
        return self[0]

    @property
    def meta(self) -> Any:
        return self[1]

    @property
    def value(self) -> bytes:
        return self[2]


def presence_entry(presence: Any) -> PresenceEntry:
    """Check ``presence`` (a key, or ``(key, meta)``) and encode it once.

    Raises ``TypeError`` or ``ValueError`` saying what is wrong, before the
    channel joins anything, because a meta that cannot cross processes would
    otherwise fail later, far from the call that made it.
    """
    if isinstance(presence, str):
        key, meta = presence, None
    elif isinstance(presence, (tuple, list)) and len(presence) == 2:
        key, meta = presence
        if not isinstance(key, str):
            raise TypeError(f"a presence key is a str (a user id), not {type(key).__name__}")
    else:
        raise TypeError(
            "presence is a str key or a (key, meta) pair with JSON-serializable meta, "
            f"not {type(presence).__name__}"
        )
    if not key:
        raise ValueError("a presence key is a non-empty str")
    try:
        value = _JSON.encode([key, meta]).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"presence meta must be JSON-serializable: {exc}") from None
    # What every process will see: the meta as JSON gives it back.
    return PresenceEntry((key, json.loads(value)[1], value))


def event_payload(group: str, value: bytes, joined: bool) -> bytes:
    """The event published for ``value`` (an entry's JSON) joining or leaving ``group``."""
    return b"p[" + _JSON.encode(group).encode() + b"," + value + (b",true]" if joined else b",false]")


def decode_event(payload: bytes) -> Tuple[str, str, Any, bool]:
    """(group, key, meta, joined) from ``event_payload``'s bytes."""
    group, (key, meta), joined = json.loads(payload[1:])
    return group, key, meta, bool(joined)


#: Dead processes reaped per refresh at most (the rest at the next one).
REAP_BATCH = 16

# KEYS: entries, counts, procs, my groups set
# ARGV: field, key, value, group, events channel, event, me, ttl ms
# -> {added (0/1), my heartbeat was missing (0/1)}
JOIN_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local missing = redis.call('ZADD', KEYS[3], now + tonumber(ARGV[8]), ARGV[7])
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3]) == 0 then
  return {0, missing}
end
redis.call('SADD', KEYS[4], ARGV[4])
if redis.call('HINCRBY', KEYS[2], ARGV[2], 1) == 1 then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return {1, missing}
"""

# KEYS: entries, counts, my groups set, procs
# ARGV: field, key, group, events channel, event, last of this process in the
#       group (1/0), me, nothing of this process left anywhere (1/0)
LEAVE_LUA = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
if ARGV[6] == '1' then
  redis.call('SREM', KEYS[3], ARGV[3])
end
if ARGV[8] == '1' then
  redis.call('ZREM', KEYS[4], ARGV[7])
end
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1
"""

# KEYS: procs
# ARGV: me, ttl ms, prefix, events channel, batch, whether I am present (1/0)
# -> {my heartbeat was missing (0/1), entries reaped}
REFRESH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local missing = 0
if ARGV[6] == '1' then
  missing = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
local reaped = 0
local prefix = ARGV[3]
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
for _, proc in ipairs(dead) do
  local groups_key = prefix .. 'presence:proc:' .. proc
  local mark = proc .. ':'
  for _, group in ipairs(redis.call('SMEMBERS', groups_key)) do
    local entries = prefix .. '{' .. group .. '}:presence'
    local counts = entries .. ':keys'
    local all = redis.call('HGETALL', entries)
    for i = 1, #all, 2 do
      local field = all[i]
      if string.sub(field, 1, #mark) == mark then
        local value = all[i + 1]
        local key = cjson.decode(value)[1]
        redis.call('HDEL', entries, field)
        reaped = reaped + 1
        if redis.call('HINCRBY', counts, key, -1) <= 0 then
          redis.call('HDEL', counts, key)
          redis.call('PUBLISH', ARGV[4], 'p[' .. cjson.encode(group) .. ',' .. value .. ',false]')
        end
      end
    end
  end
  redis.call('DEL', groups_key)
  redis.call('ZREM', KEYS[1], proc)
end
return {missing, reaped}
"""

SCRIPTS = (JOIN_LUA, LEAVE_LUA, REFRESH_LUA)


def merge(values: List[bytes]) -> Dict[str, List[Any]]:
    """``{key: [meta, ...]}`` from the JSON values of a group's entries."""
    present: Dict[str, List[Any]] = {}
    for value in values:
        key, meta = json.loads(value)
        present.setdefault(key, []).append(meta)
    return present


def call_all(fns: List[PresenceFn], log: Any, group: str, key: str, meta: Any, joined: bool) -> None:
    """Run every ``on_presence`` function; one that raises does not stop the others."""
    for fn in list(fns):
        try:
            fn(group, key, meta, joined)
        except Exception:
            log.exception("on_presence function %r failed for %r in group %r", fn, key, group)


