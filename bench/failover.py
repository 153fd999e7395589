"""What a Redis Cluster failover costs greenchan's clients.

    python bench/failover.py [--rounds 3] [--pace 0.005]

A local cluster of 3 masters with a replica each (tests/redis_cluster.py), two
greenchan processes with ``RedisChannelStore("redis+cluster://...", history=1000)``
(the app of tests/test_redis_cluster.py), a WebSocket client on each joined to a
group on the first master. One broadcast every ``pace`` seconds through the second
process, numbered. Then the master is disrupted three ways, one per round:

- ``kill``: SIGKILL, and the cluster promotes its replica;
- ``manual``: ``CLUSTER FAILOVER`` on the replica (a planned switch);
- ``reshard``: the group's slot migrated to another master.

For each: how long broadcasts were refused (the first refused to the next
accepted), how many, and for the clients the longest silence between two
consecutive numbers (what a user notices), and whether every accepted number
arrived once, in order (lost / twice).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List

from gevent import monkey

monkey.patch_all()

import gevent  # noqa: E402
import requests  # noqa: E402
import websocket  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from redis_cluster import RedisCluster, group_on, key_slot  # noqa: E402
from test_redis_cluster import APP  # noqa: E402


def start_app(script: str, url: str) -> Any:
    import subprocess

    proc = subprocess.Popen([sys.executable, script, url], stdout=subprocess.PIPE, text=True)
    with gevent.Timeout(20):
        port = int(proc.stdout.readline())
    return proc, port


def one_round(how: str, pace: float, script: str) -> Dict[str, Any]:
    cluster = RedisCluster(3, 1).start()
    procs = []
    try:
        (pa, a), (pb, b) = start_app(script, cluster.url), start_app(script, cluster.url)
        procs = [pa, pb]
        master = cluster.masters()[0]
        group = group_on(cluster, master)
        clients = []
        for port in (a, b):
            client = websocket.create_connection(f"ws://127.0.0.1:{port}/join/{group}", timeout=30)
            assert client.recv() == "joined"
            clients.append(client)
        received: List[List[tuple]] = [[] for _ in clients]

        def read(i: int, client: Any) -> None:
            while True:
                try:
                    text = client.recv()
                except Exception:
                    return
                if not text:
                    return  # closed
                received[i].append((time.monotonic(), int(text.partition("/")[2])))

        readers = [gevent.spawn(read, i, c) for i, c in enumerate(clients)]
        accepted: List[int] = []
        refused: List[float] = []
        stop = [False]
        session = requests.Session()

        def publish() -> None:
            for n in range(1_000_000):
                if stop[0]:
                    return
                try:
                    r = session.post(f"http://127.0.0.1:{b}/broadcast/{group}", data=f"{group}/{n}".encode(),
                                     headers={"Content-Type": "text/plain"}, timeout=30)
                    ok = r.status_code == 200
                except requests.RequestException:
                    ok = False
                if ok:
                    accepted.append(n)
                else:
                    refused.append(time.monotonic())
                gevent.sleep(pace)

        publisher = gevent.spawn(publish)
        gevent.sleep(1.0)
        t0 = time.monotonic()
        if how == "kill":
            cluster.kill(master)
            cluster.failover(master)
        elif how == "manual":
            cluster.manual_failover(cluster.replicas_of(master)[0])
        else:
            to = cluster.masters()[1]
            cluster.migrate_slot(key_slot("t:{%s}" % group), to)
        disrupted = time.monotonic() - t0
        gevent.sleep(8.0)  # past the store's 5 s look at the slots
        stop[0] = True
        publisher.join(30)
        last = accepted[-1]
        with gevent.Timeout(30):
            while any(not r or r[-1][1] != last for r in received):
                gevent.sleep(0.05)
        for client in clients:
            client.close()
        gevent.joinall(readers, timeout=5)
        silences, lost, twice = [], 0, 0
        for r in received:
            numbers = [n for _, n in r]
            lost += len(set(accepted) - set(numbers))
            twice += len(numbers) - len(set(numbers))
            times = [t for t, _ in r]
            silences.append(max(b - a for a, b in zip(times, times[1:])))
        return {
            "how": how, "disrupted_s": disrupted, "refused": len(refused),
            "refused_s": (refused[-1] - refused[0]) if refused else 0.0,
            "silence_s": max(silences), "accepted": len(accepted), "lost": lost, "twice": twice,
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pace", type=float, default=0.005)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "app.py")
        with open(script, "w") as f:
            f.write(APP)
        print("| disruption | broadcasts refused (count, over s) | longest client silence s | lost | twice |")
        print("|---|---|---|---|---|")
        for how in ("kill", "manual", "reshard"):
            rounds = [one_round(how, args.pace, script) for _ in range(args.rounds)]
            med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
            print(f"| {how} | {med('refused'):.0f}, {med('refused_s'):.2f} | {med('silence_s'):.2f} "
                  f"| {sum(r['lost'] for r in rounds)} | {sum(r['twice'] for r in rounds)} |", flush=True)


if __name__ == "__main__":
    main()
