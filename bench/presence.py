"""Presence cost in RedisChannelStore (issue 13): round trips, time, Redis memory.

    python bench/presence.py            # about 10 seconds

Starts its own redis-server on a free port (nothing on disk), then:

1. Redis round trips per join and per leave: requests the store's publishing
   connection makes, counted in this process over 1,000 joins and 1,000 leaves
   after a first join (which loads the script and pushes the heartbeat).
2. Time per join and per leave (median and p99 of 1,000, the whole
   ``add_to_group(..., presence=...)`` / ``remove_from_group`` call, the
   group already subscribed), on this shared 2-core machine, Redis on the same host.
3. Redis memory per present channel: ``MEMORY USAGE ... SAMPLES 0`` of the
   group's entries hash and key counts, over the number of channels:
   1,000 channels of 1,000 distinct keys, and 1,000 channels of 10 keys
   (100 tabs each), metas of about 20 bytes.

The channels are stand-ins (no socket): the store only asks them whether they
are open and for a close hook, and a join's cost is the store's and Redis's.
Prints a markdown table.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, List  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from redis_server import RedisServer  # noqa: E402

from greenchan import RedisChannelStore  # noqa: E402

N = 1000


class StandIn:
    """What a store asks of a channel, without a socket."""

    is_open = True

    def _add_close_hook(self, fn: Callable[[Any], None]) -> None:
        pass

    def _remove_close_hook(self, fn: Callable[[Any], None]) -> None:
        pass

    def send(self, message: Any, wait: bool = True) -> bool:
        return True


def counting(store: RedisChannelStore) -> List[int]:
    """Count the requests (round trips) the store's publishing client makes."""
    count = [0]
    real = store._publisher.execute_command

    def execute_command(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return real(*args, **kwargs)

    store._publisher.execute_command = execute_command
    return count


def ms(values: List[float]) -> str:
    values = sorted(values)
    return f"{statistics.median(values) * 1000:.3f} / {values[int(len(values) * 0.99)] * 1000:.3f}"


def main() -> None:
    server = RedisServer().start()
    try:
        r = server.client()
        store = RedisChannelStore(server.url)
        first = StandIn()
        store.add_to_group("room", first, presence="warm-up")
        count = counting(store)
        channels = [StandIn() for _ in range(N)]
        joins, leaves = [], []
        before = count[0]
        for i, channel in enumerate(channels):
            started = time.perf_counter()
            store.add_to_group("room", channel, presence=(f"user{i}", {"device": "phone", "n": i}))
            joins.append(time.perf_counter() - started)
        join_trips = (count[0] - before) / N
        entries, counts = store._presence_keys("room")[:2]
        usage = sum(r.memory_usage(k, samples=0) or 0 for k in (entries, counts))
        distinct = usage / (N + 1)
        before = count[0]
        for channel in channels:
            started = time.perf_counter()
            store.remove_from_group("room", channel)
            leaves.append(time.perf_counter() - started)
        leave_trips = (count[0] - before) / N
        for i, channel in enumerate(channels):
            store.add_to_group("room", channel, presence=(f"user{i % 10}", {"device": "phone", "n": i}))
        usage = sum(r.memory_usage(k, samples=0) or 0 for k in (entries, counts))
        tabs = usage / (N + 1)
        for channel in channels + [first]:
            store.remove_from_group("room", channel)
        left = [k for k in r.keys("*") if b"presence" in k]
        store.close()
    finally:
        server.kill()
    print("| figure | value |")
    print("|---|---|")
    print(f"| Redis round trips per join | {join_trips:.2f} |")
    print(f"| Redis round trips per leave | {leave_trips:.2f} |")
    print(f"| time per join, median / p99 (ms) | {ms(joins)} |")
    print(f"| time per leave, median / p99 (ms) | {ms(leaves)} |")
    print(f"| Redis memory per present channel, 1,000 distinct keys (bytes) | {distinct:.0f} |")
    print(f"| Redis memory per present channel, 10 keys x 100 tabs (bytes) | {tabs:.0f} |")
    print(f"| presence keys left in Redis after every leave | {len(left)} |")
    print(f"\n`python bench/presence.py`, {time.strftime('%Y-%m-%d')}, N = {N}")


if __name__ == "__main__":
    main()
