"""``MemoryChannelStore``: groups and broadcast within one process."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..channel import Channel, check_message
from .groups import Render, _Groups
from .presence import PresenceEntry, presence_entry
from .history import (
    MemoryHistory,
    _observe_resume,
    check_options,
    replay_to,
    tell_position,
    tell_resumed,
)


class MemoryChannelStore(_Groups):
    """Groups and broadcast within one process.

    ``render=fn(channel, attachment, data)``, if given, makes each member's
    message from the broadcast data; returning ``None`` skips that member.
    Works with or without gevent monkey-patching.

    ``history=N`` keeps each group's newest ``N`` broadcasts, ``history_ttl=S``
    for at most ``S`` seconds, so that ``add_to_group(..., since=id)`` can
    replay what a client missed (see greenchan/stores/history.py). The ids carry
    an epoch drawn per group by this store, so an id from another store (a
    restarted process) is answered ``False``. ``history=0`` (the default)
    keeps nothing and delivers exactly as a store without history.
    """

    def __init__(
        self,
        render: Optional[Render] = None,
        *,
        history: int = 0,
        history_ttl: Optional[float] = None,
    ) -> None:
        super().__init__(render)
        check_options(history, history_ttl)
        self.history_size = history
        self.history_ttl = history_ttl
        self._history = MemoryHistory(history, history_ttl, self._groups.__contains__) if history else None
        # group -> {key: its number of present channels}
        self._key_counts: Dict[str, Dict[str, int]] = {}

    def add_to_group(
        self, group: str, channel: Channel, attachment: Any = None, *, since: Optional[str] = None,
        presence: Any = None,
    ) -> bool:
        """Put ``channel`` in ``group``; with ``since``, replay what it missed first.

        See ``_add`` for what it returns. With ``presence`` (a key or
        ``(key, meta)``), the channel is present in the group under that key
        until it leaves or closes (checked first: ``TypeError`` or ``ValueError``).
        """
        entry = None if presence is None else presence_entry(presence)
        result = self._add(group, channel, attachment, since)
        if entry is not None and self._is_member(group, channel):
            self._set_presence(group, channel, entry)
        return result

    def presence(self, group: str) -> Dict[str, List[Any]]:
        """``{key: [meta, ...]}``: one meta per present channel of ``group``."""
        self._check_group(group)
        present: Dict[str, List[Any]] = {}
        for entry in self._present.get(group, {}).values():
            present.setdefault(entry.key, []).append(entry.meta)
        return present

    def _presence_joined(self, group: str, channel: Channel, entry: PresenceEntry) -> None:
        counts = self._key_counts.setdefault(group, {})
        counts[entry.key] = counts.get(entry.key, 0) + 1
        if counts[entry.key] == 1:
            self._emit_presence(group, entry.key, entry.meta, True)

    def _presence_left(self, group: str, channel: Channel, entry: PresenceEntry) -> None:
        counts = self._key_counts.get(group, {})
        left = counts.get(entry.key, 0) - 1
        if left > 0:
            counts[entry.key] = left
            return
        counts.pop(entry.key, None)
        if not counts:
            self._key_counts.pop(group, None)
        self._emit_presence(group, entry.key, entry.meta, False)

    def _add(self, group: str, channel: Channel, attachment: Any, since: Optional[str]) -> bool:
        """Put ``channel`` in ``group``; with ``since``, replay what it missed first.

        Returns True when the channel joined live without ``since``, or with
        ``since`` after a replay without gap; False when ``since`` cannot be
        continued (unknown, trimmed, expired, another epoch, no id for this
        group, or ``history=0``: the channel joins live, nothing is replayed)
        or the channel is closed. A member already in the group keeps its place
        (its attachment is replaced) and gets True. Never yields: a broadcast
        from another greenlet is either in the replay or delivered live, once.
        """
        self._check_group(group)
        history = self._history
        if history is None:
            joined = self._join(group, channel, attachment)
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
        recovered = True
        if since is not None:
            replay = history.after(group, since)
            recovered = replay is not None
            if replay:
                self._replay(group, channel, attachment, replay)
        if self._join(group, channel, attachment):
            tell_position(channel, group, history.position(group))
        if since is not None:
            _observe_resume(recovered)
            if channel.is_open:
                tell_resumed(channel, group, recovered)
        return recovered

    def broadcast(self, group: str, message: Any) -> int:
        """Send ``message`` to every member of ``group``; return how many it reached.

        ``message`` is a ``str``, ``bytes``, response ``dict`` or ``Event``, or a
        function ``fn(channel, attachment)`` returning one per member (``None``
        skips the member; ``render`` is not applied then). The count is the
        number of members whose ``send`` took the message (a closed or cut-off
        member does not count). It never blocks. With history, the message is
        kept and gets an id (a function cannot be kept: use ``render``).
        """
        if callable(message):
            if self._history is not None:
                raise TypeError(
                    "with history, broadcast data, not a function (its per-member messages "
                    "cannot be kept for a replay): give the store render=fn(channel, attachment, data)"
                )
            return self._deliver(group, None, message)
        if self.render is None:
            check_message(message)
        if self._history is None:
            return self._deliver(group, message)
        self._check_group(group)
        return self._deliver_tagged(group, message, self._history.append(group, message))

    def history(self, group: str, since: Optional[str] = None) -> Optional[List[Tuple[str, Any]]]:
        """The kept messages of ``group`` after ``since`` (all if None), oldest first.

        ``[(id, message), ...]``; None when ``since`` cannot be continued (and
        always for a ``since`` when the store keeps no history).
        """
        if self._history is None:
            return [] if since is None else None
        if since is None:
            return self._history.latest(group)
        return self._history.after(group, since)

    def _replay(self, group: str, channel: Channel, attachment: Any, replay: List[Tuple[str, Any]]) -> None:
        replay_to(self.render, group, channel, attachment, replay)
