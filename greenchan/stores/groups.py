"""What both stores share: the ``ChannelStore`` protocol and this process's membership.

Membership is always local to the process: a store holds this process's
channels, and a channel leaves every group by itself when it closes (a close
hook, which runs before the user's ``on_close`` and does not replace it). A
group with no members is forgotten, so nothing is left behind.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, runtime_checkable

from .. import counters
from ..channel import Channel
from .presence import PresenceEntry, PresenceFn, call_all

log = logging.getLogger("greenchan.stores")

Render = Callable[[Channel, Any, Any], Any]


@runtime_checkable
class ChannelStore(Protocol):
    """What the stores share: groups of channels, each with an attachment."""

    def add_to_group(
        self, group: str, channel: Channel, attachment: Any = None, *, since: Optional[str] = None,
        presence: Any = None,
    ) -> bool:
        """Put ``channel`` in ``group`` (again: replace its attachment).

        With ``since`` (an id the client last received), first replay what the
        group's history kept after it; False when that cannot be done. With
        ``presence`` (a key, or ``(key, meta)``), the channel is present in the
        group under that key while it is a member.
        """

    def remove_from_group(self, group: str, channel: Channel) -> None:
        """Take ``channel`` out of ``group``; nothing happens if it is not in it."""

    def broadcast(self, group: str, message: Any) -> int:
        """Send ``message`` to every member of ``group``."""

    def members(self, group: str) -> Dict[Channel, Any]:
        """A copy of ``{channel: attachment}`` for this process's members."""


class _Groups:
    """Local membership, shared by both stores: groups, attachments, close hooks."""

    def __init__(self, render: Optional[Render] = None) -> None:
        if render is not None and not callable(render):
            raise TypeError("render must be a function render(channel, attachment, data)")
        self.render = render
        # group -> {channel: attachment}; a group exists only while it has members.
        self._groups: Dict[str, Dict[Channel, Any]] = {}
        # channel -> the groups it is in, so closing leaves them all in one step.
        self._memberships: Dict[Channel, Set[str]] = {}
        # group -> {channel: its presence PresenceEntry}: this process's present channels.
        self._present: Dict[str, Dict[Channel, PresenceEntry]] = {}
        self._presence_fns: List[PresenceFn] = []

    # -- presence (presence.py) ----------------------------------------------------

    def on_presence(self, fn: PresenceFn) -> PresenceFn:
        """Run ``fn(group, key, meta, joined)`` on a key's first join and last leave.

        Returns ``fn``, so it serves as a decorator.
        """
        if not callable(fn):
            raise TypeError("on_presence takes a function fn(group, key, meta, joined)")
        self._presence_fns.append(fn)
        self._presence_watch()
        return fn

    def _emit_presence(self, group: str, key: str, meta: Any, joined: bool) -> None:
        call_all(self._presence_fns, log, group, key, meta, joined)

    def _set_presence(self, group: str, channel: Channel, entry: PresenceEntry) -> None:
        """Make ``entry`` the presence of ``channel``, a member of ``group``."""
        entries = self._present.setdefault(group, {})
        old = entries.get(channel)
        if old is not None:
            if old.value == entry.value:
                return
            del entries[channel]
            self._presence_left(group, channel, old)
        entries[channel] = entry
        self._presence_joined(group, channel, entry)

    def _presence_watch(self) -> None:
        """An ``on_presence`` function was registered."""

    def _presence_joined(self, group: str, channel: Channel, entry: PresenceEntry) -> None:
        """``channel`` is present in ``group`` with ``entry``."""

    def _presence_left(self, group: str, channel: Channel, entry: PresenceEntry) -> None:
        """``channel`` (with ``entry``) is no longer present in ``group``."""

    def _join(self, group: str, channel: Channel, attachment: Any = None) -> bool:
        """Put ``channel`` in ``group`` with ``attachment``; it leaves when it closes.

        Adding a channel that is already a member replaces its attachment.
        Adding a closed channel does nothing and returns False.
        """
        if not channel.is_open:
            return False
        created = group not in self._groups
        members = self._groups.setdefault(group, {})
        members[channel] = attachment
        groups = self._memberships.get(channel)
        if groups is None:
            groups = self._memberships[channel] = set()
            # One hook per channel and store, whatever the number of groups.
            channel._add_close_hook(self._channel_closed)
        groups.add(group)
        if created:
            self._group_created(group)
        return True

    @staticmethod
    def _check_group(group: Any) -> None:
        if not isinstance(group, str):
            raise TypeError(f"a group name is a str, not {type(group).__name__}")

    def _is_member(self, group: str, channel: Channel) -> bool:
        return channel in self._groups.get(group, ())

    def remove_from_group(self, group: str, channel: Channel) -> None:
        """Take ``channel`` out of ``group``; nothing happens if it is not in it."""
        groups = self._memberships.get(channel)
        if groups is None or group not in groups:
            return
        groups.discard(group)
        if not groups:
            del self._memberships[channel]
            channel._remove_close_hook(self._channel_closed)
        self._leave(group, channel)

    def members(self, group: str) -> Dict[Channel, Any]:
        """A copy of ``{channel: attachment}``: the members in this process."""
        return dict(self._groups.get(group, ()))

    def _channel_closed(self, channel: Channel) -> None:
        for group in self._memberships.pop(channel, ()):
            self._leave(group, channel)

    def _leave(self, group: str, channel: Channel) -> None:
        members = self._groups.get(group)
        if members is None:
            return
        members.pop(channel, None)
        entries = self._present.get(group)
        if entries is not None:
            entry = entries.pop(channel, None)
            if not entries:
                del self._present[group]
            if entry is not None:
                self._presence_left(group, channel, entry)
        if not members:
            del self._groups[group]
            self._group_removed(group)

    def _group_created(self, group: str) -> None:
        """The first local member joined ``group``."""

    def _group_removed(self, group: str) -> None:
        """The last local member left ``group``."""

    def _deliver(self, group: str, data: Any, fn: Optional[Callable[[Channel, Any], Any]] = None) -> int:
        """Send to each local member of ``group``; the number of sends that went out."""
        members = self._groups.get(group)
        if not members:
            return 0
        started = time.perf_counter()
        render = self.render
        sent = 0
        # A snapshot: a send can close a member (long-polling) and so change the group.
        # Two lists, zipped: zip reuses its tuple, where items() made one per member
        # that lived through the loop and brought on a full collection at 5,000
        # members (bench/findings.md: fan-out p99 270 -> 120 ms).
        for channel, attachment in zip(list(members), list(members.values())):
            try:
                if fn is not None:
                    message = fn(channel, attachment)
                elif render is not None:
                    message = render(channel, attachment, data)
                else:
                    message = data
                if message is not None and channel.send(message, wait=False):
                    sent += 1
            except Exception:
                log.exception("broadcast to %r in group %r failed", channel, group)
        counters.broadcast(type(self).__name__, time.perf_counter() - started)
        return sent

    def _deliver_tagged(self, group: str, data: Any, msg_id: str) -> int:
        """As ``_deliver`` for a group with history: each send carries ``msg_id``."""
        members = self._groups.get(group)
        if not members:
            return 0
        started = time.perf_counter()
        render = self.render
        sent = 0
        for channel, attachment in zip(list(members), list(members.values())):
            try:
                message = data if render is None else render(channel, attachment, data)
                if message is not None:
                    # history.send_tagged, inline: this loop runs once per member.
                    tagged = getattr(channel, "_send_tagged", None)
                    if tagged(message, group, msg_id) if tagged else channel.send(message, wait=False):
                        sent += 1
            except Exception:
                log.exception("broadcast to %r in group %r failed", channel, group)
        counters.broadcast(type(self).__name__, time.perf_counter() - started)
        return sent

