"""Fan-out through greenchan's stores: one broadcast to the last of N WebSocket subscribers.

    python bench/fanout.py                    # 1,000 and 5,000 subscribers, both stores
    python bench/fanout.py --subs 1000 --store memory --rounds 20

For each store (MemoryChannelStore; RedisChannelStore on a redis-server this script
starts on a free port and stops) and each N, a fresh greenchan server (core 0) gets N
subscribers on /sub and one publisher on /pub from the Node client (core 1). Each
round the publisher sends a message, the server broadcasts it to the group, and the
round's time runs from the publisher's send to the moment the last subscriber has it.
Prints a table of median and p99 over the rounds, and the command that made it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from harness import BenchError, Redis, Server, check_node, run_client, use_bench_venv, versions, wait_quiet


def one(store: str, subs: int, rounds: int, budget: float, redis_url: str | None) -> dict:
    args = [redis_url] if store == "redis" else []
    wait_quiet(20)
    with Server("greenchan_server.py", *args) as srv:
        r = run_client(srv, "ws-fanout", budget + 90, url=f"ws://127.0.0.1:{srv.port}",
                       subs=subs, rounds=rounds, duration=budget)
        if srv.note:
            r["note"] = srv.note
        return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subs", type=int, action="append", help="subscriber counts (default 1000 and 5000)")
    ap.add_argument("--store", choices=["memory", "redis"], action="append", help="default: both")
    ap.add_argument("--rounds", type=int, default=40, help="broadcasts measured per figure")
    ap.add_argument("--budget", type=float, default=15, help="seconds at most per figure")
    ap.add_argument("--json", help="also write the results to this file")
    o = ap.parse_args(argv)
    check_node()
    subs_list = o.subs or [1000, 5000]
    stores = o.store or ["memory", "redis"]
    command = "python bench/fanout.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict = {}
    redis = Redis().__enter__() if "redis" in stores else None
    try:
        for store in stores:
            for n in subs_list:
                try:
                    r = one(store, n, o.rounds, o.budget, redis.url if redis else None)
                except BenchError as exc:
                    r = {"error": str(exc)[:1000]}
                if store == "redis" and "error" in r and "warm-up" in r["error"]:
                    # redis-py 8 speaks RESP3 by default, and a RESP3 connection hands
                    # pub/sub messages to its push handler instead of read_response():
                    # a store that reads them with read_response() never sees one.
                    # Measure what the store would do on RESP2, and say so.
                    results[f"{store}/{n}"] = r
                    print(f"{store:7s} {n:6d} subscribers  ERROR {r['error'][:200]}", flush=True)
                    store_label = "redis-resp2"
                    try:
                        r = one(store, n, o.rounds, o.budget, redis.url + "?protocol=2")
                        r["note"] = ("the URL forces RESP2 (?protocol=2): with redis-py's default "
                                     "no subscriber gets a broadcast")
                    except BenchError as exc:
                        r = {"error": str(exc)[:1000]}
                    results[f"{store_label}/{n}"] = r
                else:
                    store_label = store
                    results[f"{store}/{n}"] = r
                shown = (f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms" if "p50_ms" in r
                         else "ERROR " + r["error"][:300])
                print(f"{store_label:11s} {n:6d} subscribers  {shown}", flush=True)
    finally:
        if redis:
            redis.__exit__()
    v = versions()
    print()
    print(f"`{command}`  (greenchan {v.get('greenchan')}, {v.get('greenchan_commit')}; "
          f"{v.get('redis-server', '')[:40]}; node {v.get('node')}, ws {v.get('ws')})")
    print()
    print("| store | subscribers | median ms | p99 ms | min ms | rounds | server CPU % | client CPU % | note |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for key, r in results.items():
        store, n = key.split("/")
        if "error" in r and "warm-up" in r["error"]:
            r["error"] = r["error"].split("; server stderr")[0]
        if "error" in r:
            err = r["error"].replace("|", "/").replace("\n", " ")[:300]
            print(f"| {store} | {n} | error | | | | | | {err} |")
            continue
        print(f"| {store} | {int(n):,} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['min_ms']:.2f} | "
              f"{r['rounds']} | {r.get('server_cpu_pct', 0):.0f} | {r.get('client_cpu_pct', 0):.0f} | "
              f"{r.get('note', '')} |")
    if o.json:
        with open(o.json, "w") as f:
            json.dump({"command": command, "versions": v, "results": results}, f, indent=1)
    return 0


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")   # unwind through the cleanups


if __name__ == "__main__":
    use_bench_venv()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sys.exit(main())
