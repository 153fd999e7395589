"""Presence cost in RedisChannelStore (issues 13, 14): round trips, time, Redis memory.

    python bench/presence.py                 # 3 rounds, about 15 seconds
    python bench/presence.py --rounds 1

Each round starts its own redis-server on a free port (nothing on disk), then:

1. Redis round trips per join and per leave: requests the store's publishing
   connection makes, counted in this process over 1,000 joins and 1,000 leaves
   after a warm-up join and leave (which load the scripts and push the heartbeat).
   A join is two scripts (the processes' slot, then the group's), a leave the
   same two the other way round (greenchan/stores/presence.py).
2. Time per join and per leave (median and p99 of 1,000, the whole
   ``add_to_group(..., presence=...)`` / ``remove_from_group`` call, the
   group already subscribed), on this shared 2-core machine, Redis on the same host.
3. Redis memory per present channel: ``MEMORY USAGE ... SAMPLES 0`` over the
   number of channels, of the group's entries hash and key counts (the group's
   slot) and of the process's entries hash ``{presence}:proc:<id>`` (the
   processes' slot): 1,000 channels of 1,000 distinct keys, and 1,000 channels
   of 10 keys (100 tabs each), metas of about 20 bytes.
4. The presence keys left in Redis right after every channel left: the
   process's heartbeat (``{presence}:procs``) stays until it expires and is
   reaped. Then a second store (``presence_ttl=1``, its own prefix) joins one
   channel, waits past its first refresh and one TTL (a process reaps nobody
   for one TTL after its first refresh), leaves, and is timed from that leave
   until none of its keys is left: up to one TTL and one refresh (4/3 s).

The channels are stand-ins (no socket): the store only asks them whether they
are open and for a close hook, and a join's cost is the store's and Redis's.
Prints each round, then a markdown table of the medians over the rounds.
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Dict, List  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from redis_server import RedisServer  # noqa: E402

from greenchan import RedisChannelStore  # noqa: E402

N = 1000
PREFIX = "greenchan:"

#: The short TTL of the expiry figure, and how long to wait for it at most.
EXPIRY_TTL = 1.0
EXPIRY_WAIT = 10.0


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


def median_p99(values: List[float]) -> List[float]:
    values = sorted(values)
    return [statistics.median(values) * 1000, values[int(len(values) * 0.99)] * 1000]


def memory(r: Any, store: RedisChannelStore, group: str) -> List[float]:
    """Bytes per present channel: [the group's slot, the processes' slot]."""
    group_keys = store._presence_keys(group)
    proc_key = (store._entries_prefix + store._proc).encode()
    group_bytes = sum(r.memory_usage(k, samples=0) or 0 for k in group_keys)
    proc_bytes = r.memory_usage(proc_key, samples=0) or 0
    return [group_bytes / (N + 1), proc_bytes / (N + 1)]


def presence_keys(r: Any, prefix: str) -> List[bytes]:
    return sorted(k for k in r.scan_iter(match=prefix + "*", count=1000) if b"presence" in k)


def expiry(server: RedisServer) -> float:
    """Seconds from a process's last leave until its presence keys are all gone."""
    prefix = "expiry:"
    r = server.client()
    store = RedisChannelStore(server.url, prefix=prefix, presence_ttl=EXPIRY_TTL)
    try:
        channel = StandIn()
        store.add_to_group("room", channel, presence="ann")
        time.sleep(EXPIRY_TTL * 1.5)  # past its first refresh and one TTL: reaping allowed
        store.remove_from_group("room", channel)
        left_at = time.monotonic()
        while presence_keys(r, prefix):  # bounded: EXPIRY_WAIT
            if time.monotonic() - left_at > EXPIRY_WAIT:
                return float("nan")
            time.sleep(0.02)
        return time.monotonic() - left_at
    finally:
        store.close()


def one_round() -> Dict[str, Any]:
    server = RedisServer().start()
    try:
        r = server.client()
        store = RedisChannelStore(server.url, prefix=PREFIX)
        first, warm = StandIn(), StandIn()
        store.add_to_group("room", first, presence="warm-up")
        store.add_to_group("room", warm, presence="warm-up")
        store.remove_from_group("room", warm)
        count = counting(store)
        channels = [StandIn() for _ in range(N)]
        joins, leaves = [], []
        before = count[0]
        for i, channel in enumerate(channels):
            started = time.perf_counter()
            store.add_to_group("room", channel, presence=(f"user{i}", {"device": "phone", "n": i}))
            joins.append(time.perf_counter() - started)
        join_trips = (count[0] - before) / N
        distinct = memory(r, store, "room")
        before = count[0]
        for channel in channels:
            started = time.perf_counter()
            store.remove_from_group("room", channel)
            leaves.append(time.perf_counter() - started)
        leave_trips = (count[0] - before) / N
        for i, channel in enumerate(channels):
            store.add_to_group("room", channel, presence=(f"user{i % 10}", {"device": "phone", "n": i}))
        tabs = memory(r, store, "room")
        for channel in channels + [first]:
            store.remove_from_group("room", channel)
        left = presence_keys(r, PREFIX)
        store.close()
        expired = expiry(server)
    finally:
        server.kill()
    return {
        "join_trips": join_trips, "leave_trips": leave_trips,
        "join_ms": median_p99(joins), "leave_ms": median_p99(leaves),
        "distinct": distinct, "tabs": tabs,
        "left": len(left), "left_keys": [k.decode() for k in left], "expired_s": expired,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    o = ap.parse_args()
    rounds = []
    for n in range(o.rounds):
        rounds.append(one_round())
        shown = {k: [round(x, 3) for x in v] if isinstance(v, list) and k != "left_keys" else
                 round(v, 3) if isinstance(v, float) else v for k, v in rounds[-1].items()}
        print(f"round {n + 1}: {shown}", flush=True)

    def med(key: str, i: int = -1) -> float:
        return statistics.median(r[key] if i < 0 else r[key][i] for r in rounds)

    def mem(key: str) -> str:
        return f"{med(key, 0) + med(key, 1):.0f} ({med(key, 0):.0f} + {med(key, 1):.0f})"

    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| Redis round trips per join | {med('join_trips'):.2f} |")
    print(f"| Redis round trips per leave | {med('leave_trips'):.2f} |")
    print(f"| time per join, median / p99 (ms) | {med('join_ms', 0):.3f} / {med('join_ms', 1):.3f} |")
    print(f"| time per leave, median / p99 (ms) | {med('leave_ms', 0):.3f} / {med('leave_ms', 1):.3f} |")
    print(f"| Redis memory per present channel, 1,000 distinct keys (bytes): all (group's slot + "
          f"processes' slot) | {mem('distinct')} |")
    print(f"| Redis memory per present channel, 10 keys x 100 tabs (bytes): all (group's slot + "
          f"processes' slot) | {mem('tabs')} |")
    names = ", ".join(f"`{k.replace(PREFIX, 'P', 1)}`" for k in rounds[-1]["left_keys"])
    print(f"| presence keys left in Redis right after every leave | {med('left'):.0f} ({names}) |")
    print(f"| seconds from a process's last leave until none of its keys is left "
          f"(`presence_ttl={EXPIRY_TTL:g}`) | {med('expired_s'):.2f} |")
    print(f"\n`python bench/presence.py --rounds {o.rounds}`, {time.strftime('%Y-%m-%d')}, "
          f"N = {N}, median of {o.rounds} rounds")


if __name__ == "__main__":
    main()
