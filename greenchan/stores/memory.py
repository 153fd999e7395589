"""``MemoryChannelStore``: groups and broadcast within one process."""
from __future__ import annotations

from typing import Any

from ..channel import check_message
from .groups import _Groups


class MemoryChannelStore(_Groups):
    """Groups and broadcast within one process.

    ``render=fn(channel, attachment, data)``, if given, makes each member's
    message from the broadcast data; returning ``None`` skips that member.
    Works with or without gevent monkey-patching.
    """

    def broadcast(self, group: str, message: Any) -> int:
        """Send ``message`` to every member of ``group``; return how many it reached.

        ``message`` is a ``str``, ``bytes``, response ``dict`` or ``Event``, or a
        function ``fn(channel, attachment)`` returning one per member (``None``
        skips the member; ``render`` is not applied then). The count is the
        number of members whose ``send`` took the message (a closed or cut-off
        member does not count). It never blocks.
        """
        if callable(message):
            return self._deliver(group, None, message)
        if self.render is None:
            check_message(message)
        return self._deliver(group, message)

