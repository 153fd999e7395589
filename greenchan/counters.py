"""What greenchan counts as it runs: plain integers, read by ``greenchan.metrics``.

Counting happens where the event happens (a channel opens, a message arrives, a
broadcast ends), as an integer increment: no lock, no import of
prometheus_client, nothing to configure. ``greenchan.metrics`` (the
``greenchan[metrics]`` extra) reads these at scrape time. A process that never
imports it pays a few integer additions per message, nothing more.
"""
from __future__ import annotations

import bisect
import weakref
from typing import Any, Dict, List, Tuple

TRANSPORTS = ("websocket", "sse", "longpoll", "stream")


class Traffic:
    """The counters of one transport."""

    __slots__ = ("opened", "open", "messages_in", "bytes_in", "messages_out", "bytes_out")

    def __init__(self) -> None:
        self.opened = 0
        self.open = 0
        self.messages_in = 0
        self.bytes_in = 0
        self.messages_out = 0
        self.bytes_out = 0


#: transport -> its counters.
traffic: Dict[str, Traffic] = {name: Traffic() for name in TRANSPORTS}
#: (transport, CloseStatus value) -> channels closed.
closed: Dict[Tuple[str, str], int] = {}
#: reason -> requests refused before they reached a handler.
rejected: Dict[str, int] = {}
#: recovered ("true" / "false") -> resumes with ``since``.
resumes: Dict[str, int] = {"true": 0, "false": 0}

# Broadcast durations per store class, as histogram buckets (seconds): a
# broadcast to thousands of members takes milliseconds, one to a few microseconds.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Durations:
    """A histogram kept as integers: counts per bucket (the last one is +Inf), sum, count."""

    __slots__ = ("buckets", "sum", "count")

    def __init__(self) -> None:
        self.buckets: List[int] = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1


#: store class name -> broadcast durations.
broadcasts: Dict[str, Durations] = {}

#: Set once a server of this process begins to stop: the health check answers 503.
stopping = False

#: The Redis stores of this process (``greenchan_store_up``, the health check).
stores: "weakref.WeakSet[Any]" = weakref.WeakSet()


def reject(reason: str) -> None:
    """A request refused before it reached a handler (``greenchan_rejected_total``)."""
    rejected[reason] = rejected.get(reason, 0) + 1


def resumed(recovered: bool) -> None:
    """A join with ``since``: replayed without a gap, or continuity lost."""
    resumes["true" if recovered else "false"] += 1


def broadcast(store: str, seconds: float) -> None:
    """One broadcast by a store of class ``store`` took ``seconds``."""
    durations = broadcasts.get(store)
    if durations is None:
        durations = broadcasts[store] = Durations()
    durations.observe(seconds)
