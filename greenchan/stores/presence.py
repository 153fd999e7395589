"""Presence: who is in a group, in one process or across every process sharing a Redis.

The data layout in Redis (``P`` is the store's ``prefix``, default ``greenchan:``)
---------------------------------------------------------------------------------

Every script touches the keys of one hash slot, so that the same layout and the
same scripts serve a single Redis and a Redis Cluster. There are two kinds of
slots: a group's (its name in braces) and the processes' (``{presence}``).

A group's keys, in the group's slot (with its history, ``P{group}:...``):

``P{group}:presence``  hash, one field per present channel
    field ``<process id>:<channel number>``, value the JSON ``[key, meta]``.
    ``presence(group)`` is one ``HVALS`` of it.
``P{group}:presence:keys``  hash, one field per present key
    field the key, value how many channels it has (all processes): the join
    and leave scripts decide "first channel" / "last channel" from it in O(1),
    and publish the event then, in the same script, so once.

The processes' keys, all in the one slot of the ``{presence}`` tag:

``P{presence}:procs``  sorted set, the heartbeats
    member a process id (a random hex token per store and process, and a new
    one whenever it finds its heartbeat gone), score the Redis ``TIME`` in ms
    until which that process counts as alive. Each join and each refresh (one
    per process every ``presence_ttl / 3`` s, whatever the number of groups and
    channels) push it to ``now + presence_ttl``.
``P{presence}:proc:<process id>``  hash, the process's entries
    field an entry's field, value the JSON ``[group, key]``: what a reaper needs
    to take a dead process's entries out of each group without scanning Redis
    or reading the groups' entries.
``P{presence}:reaping``  sorted set, dead processes being reaped
    member a process id, score until when its reaper holds it (a lease): a
    reaper that dies midway leaves it to the next refresh anywhere.
``P{presence}:reaping:<process id>``  hash, a dead process's entries, moved
    aside (``RENAME``) from its ``proc:`` hash when it was taken out of the
    heartbeats.

These cannot meet a group's keys even for a group named ``presence``: a
group's keys end in ``:presence``, ``:presence:keys``, ``:history`` or ``:meta``.

``Ppresence:events``  pub/sub channel of the join and leave events
    payload ``b"p" + JSON [group, [key, meta], joined]``, published with classic
    ``PUBLISH`` (on a cluster it reaches every node): every process that has an
    ``on_presence`` function subscribes to it, so every process hears every
    group's events, not only the groups it has members of.

The steps
---------

A join is two scripts: ``PROC_LUA`` in the processes' slot (push the
heartbeat, note the entry in ``proc:<id>``), then ``JOIN_LUA`` in the group's
(``HSETNX`` the entry, count the key, publish the join when it is the key's
first channel). A leave is the other way round: ``LEAVE_LUA`` in the group's
slot, then ``PROC_LUA`` forgets the entry. In that order a process's ``proc:``
hash names every entry it has in any group, whenever it may die.

Only a reaper takes a heartbeat out. A process with nothing left in Redis
stops pushing its heartbeat and lets it expire, to be reaped (with nothing to
do) like a dead one's; its next join finds it gone and takes a new id, as a
paused process does (below). So a heartbeat found gone always means a
reaper or a loss, never a step of our own racing another. (The price: after
its last leave, a process's heartbeat stays up to ``presence_ttl`` and one
refresh more.)

The refresh (``REFRESH_LUA``, processes' slot) pushes the caller's heartbeat,
then takes up to ``REAP_BATCH`` processes whose deadline is past OUT of the
heartbeats, renames each one's ``proc:`` hash to ``reaping:<id>`` and leases
it, along with reapings whose lease ran out; it returns their entries. The
reaper then runs ``LEAVE_LUA`` per group with that process's fields (the
same script as a leave: each field deleted if still there, its key's count
decremented, the leave published when the count reaches zero), and
``REAPED_LUA`` forgets the fields done and, when none is left, the reaping.
Every step is idempotent: two reapers (one whose lease ran out, and the
next) or a reaper and the process itself publish each leave once, because
only the script that deletes an entry can publish its leave.

A process whose refresh missed its turn (Redis or the processes' shard away,
a failover, or the process paused) reaps nobody for one TTL after it gets
through again: the others were cut off too, and get that long to push their
heartbeats, or an outage longer than the TTL would reap every process. The
script itself judges it, from the Redis time of the caller's previous
refresh, so that a call that waited out the outage in the client's retries
reaps nobody either; a process's first refresh counts as one after a gap (it
may have started during the outage).

A process that was paused past its TTL and reaped
-------------------------------------------------

It learns it from its next ``PROC_LUA`` or refresh: the script finds its
heartbeat gone and writes nothing (``proc:<id>`` is not brought back while a
reaper may be reading ``reaping:<id>``). The process then takes a NEW id and
re-registers every live channel under new field names (``<new id>:<n>``),
each with its old field name: ``JOIN_LUA`` moves the old entry to the new
field when it is still there (the key stays counted: no event), or adds the
new one (a join event if the key had gone). A reaper still deleting the old
process's fields in some group deletes only fields it read from
``reaping:<old id>``, never a new one, and the two meet in one script per
group, in either order:

- the reaper first: the leave is published (the process was dead for all to
  see), then the re-registration publishes the join;
- the move first: the reaper finds nothing of the old process there: no event.

Either way each process reports each change once (``_seen`` in the store
drops a join of a key it already reported present). The same path serves a
Redis that lost its data (a restart, or a cluster's failover that lost the
latest writes of the processes' slot): old entries still in a group's slot are
moved rather than left as ghosts.

A master that changes
---------------------

Redis replicates asynchronously: a master killed (not a ``CLUSTER FAILOVER``)
can take its last few milliseconds of writes with it. On a cluster, each
refresh looks (in the client's slot map, no round trip) at which master owns
the processes' slot and each group where this process has, or just had,
entries; when one changed, the process notes all its entries again and puts
them in their groups again (``PROC_LUA``, ``JOIN_LUA``: nothing counted
twice), and in each group that moved ``PRUNE_LUA`` takes out its entries that
are not live (a leave lost). What stays out of reach: a dead process's note
lost with a killed master of the processes' slot (that entry has no reaper),
which needs the process to die right after a master did.
"""
from __future__ import annotations

import hashlib
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


def event_head(group: str) -> bytes:
    """What the scripts put before an entry's JSON to make ``group``'s event."""
    return b"p[" + _JSON.encode(group).encode() + b","


def decode_event(payload: bytes) -> Tuple[str, str, Any, bool]:
    """(group, key, meta, joined) from an event: ``event_head(group)``, ``[key, meta]``, joined."""
    group, (key, meta), joined = json.loads(payload[1:])
    return group, key, meta, bool(joined)


#: Dead processes taken per refresh at most (the rest at the next one).
REAP_BATCH = 16

#: Entries per script call at most: a script's arguments are unpacked onto Lua's
#: C stack (about 8000 slots), and one call should not hold Redis for long.
CHUNK = 200

# The processes' slot: one process's heartbeat and its entries.
# KEYS: heartbeats, my entries (proc:<id>)
# ARGV: me, ttl ms, whether I have a heartbeat (1/0), n, n pairs (field, JSON
#       [group, key]) added, then the fields removed
# -> 1 when my heartbeat was missing (then nothing is written), else 0
PROC_LUA = """
if ARGV[3] == '1' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 1
end
local n = tonumber(ARGV[4])
if n > 0 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 5, 4 + 2 * n))
end
if #ARGV > 4 + 2 * n then
  redis.call('HDEL', KEYS[2], unpack(ARGV, 5 + 2 * n))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 0
"""

# A group's slot: entries join. Each with its field before an id change (or
# ''): moved to the new field if still there (still counted: no event).
# KEYS: the group's entries, its keys' counts
# ARGV: events channel, event head (b'p[<group>,'), then (field, old field, key,
#       value) per entry
# -> entries added
JOIN_LUA = """
local added = 0
for i = 3, #ARGV, 4 do
  local field, old, key, value = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if old ~= '' and redis.call('HDEL', KEYS[1], old) == 1 then
    if redis.call('HSETNX', KEYS[1], field, value) == 0 then
      redis.call('HINCRBY', KEYS[2], key, -1)  -- both were counted
    end
  elseif redis.call('HSETNX', KEYS[1], field, value) == 1 then
    added = added + 1
    if redis.call('HINCRBY', KEYS[2], key, 1) == 1 then
      redis.call('PUBLISH', ARGV[1], ARGV[2] .. value .. ',true]')
    end
  end
end
return added
"""

# A group's slot: entries leave (a leave, or a reaper's). Only the call that
# deletes an entry counts it down: a leave is published once, whoever calls.
# KEYS: the group's entries, its keys' counts
# ARGV: events channel, event head, then (field, key) per entry
# -> entries removed
LEAVE_LUA = """
local removed = 0
for i = 3, #ARGV, 2 do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  if value then
    redis.call('HDEL', KEYS[1], ARGV[i])
    removed = removed + 1
    if redis.call('HINCRBY', KEYS[2], ARGV[i + 1], -1) <= 0 then
      redis.call('HDEL', KEYS[2], ARGV[i + 1])
      redis.call('PUBLISH', ARGV[1], ARGV[2] .. value .. ',false]')
    end
  end
end
return removed
"""

# The processes' slot: my heartbeat, and dead processes handed to me to reap.
# KEYS: heartbeats, reapings
# ARGV: me, ttl ms, whether I have a heartbeat to push (1/0), batch, lease ms,
#       the entries hashes' prefix (P{presence}:proc:), the reaping ones', the
#       Redis time of my previous refresh (0: none yet)
# -> {my heartbeat was missing (0/1), the Redis time now, whether I was cut
#     off (no refresh for 2/3 of the TTL, or none yet: nobody reaped), then per
#     process to reap: its id, its entries as a flat [field, JSON [group, key], ...]}
REFRESH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {0, now, 0}
if ARGV[3] == '1' then
  if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  else
    out[1] = 1
  end
end
local batch = tonumber(ARGV[4])
local before = tonumber(ARGV[8])
if now - before > tonumber(ARGV[2]) * 2 / 3 then
  out[3] = 1  -- we could not refresh for a while: nor could the others, maybe
  batch = 0
end
local lease = now + tonumber(ARGV[5])
-- Reapings whose reaper went quiet past its lease, then newly dead processes.
local taken = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, batch)
if #taken < batch then
  local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, batch - #taken)
  for _, proc in ipairs(dead) do
    redis.call('ZREM', KEYS[1], proc)
    local from, to = ARGV[6] .. proc, ARGV[7] .. proc
    if redis.call('EXISTS', from) == 1 then
      if redis.call('EXISTS', to) == 0 then
        redis.call('RENAME', from, to)
      else  -- an unfinished reaping of the same id: add to it
        local all = redis.call('HGETALL', from)
        for i = 1, #all, 2 do
          redis.call('HSET', to, all[i], all[i + 1])
        end
        redis.call('DEL', from)
      end
    end
    taken[#taken + 1] = proc
  end
end
for _, proc in ipairs(taken) do
  local entries = redis.call('HGETALL', ARGV[7] .. proc)
  if #entries == 0 then
    redis.call('ZREM', KEYS[2], proc)
  else
    redis.call('ZADD', KEYS[2], lease, proc)
    out[#out + 1] = proc
    out[#out + 1] = entries
  end
end
return out
"""

# The processes' slot: a reaper is done with these fields of a dead process.
# KEYS: reapings, the process's reaping hash
# ARGV: its id, the fields done
REAPED_LUA = """
if #ARGV > 1 then
  redis.call('HDEL', KEYS[2], unpack(ARGV, 2))
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

# A group's slot, after its master changed (a failover): take out my entries
# there that are not live, a leave the old master took with it. Only fields
# numbered up to what I had drawn when I looked: a newer one is a join on its way.
# KEYS: the group's entries, its keys' counts
# ARGV: events channel, event head, my fields' prefix ('<id>:'), the highest
#       channel number drawn, then my live fields in the group
# -> entries taken out
PRUNE_LUA = """
local live = {}
for i = 5, #ARGV do
  live[ARGV[i]] = true
end
local mine, upto, pruned = ARGV[3], tonumber(ARGV[4]), 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local field = all[i]
  if string.sub(field, 1, #mine) == mine and not live[field]
      and (tonumber(string.sub(field, #mine + 1)) or upto + 1) <= upto then
    redis.call('HDEL', KEYS[1], field)
    pruned = pruned + 1
    local ok, entry = pcall(cjson.decode, all[i + 1])
    if ok and type(entry) == 'table' and type(entry[1]) == 'string' then
      if redis.call('HINCRBY', KEYS[2], entry[1], -1) <= 0 then
        redis.call('HDEL', KEYS[2], entry[1])
        redis.call('PUBLISH', ARGV[1], ARGV[2] .. all[i + 1] .. ',false]')
      end
    end
  end
end
return pruned
"""

SCRIPTS = (PROC_LUA, JOIN_LUA, LEAVE_LUA, REFRESH_LUA, REAPED_LUA, PRUNE_LUA)

#: The SHA-1 that EVALSHA names each script by.
SHAS = {script: hashlib.sha1(script.encode()).hexdigest() for script in SCRIPTS}


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


