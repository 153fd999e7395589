"""Broadcast cost with history on and off, in both stores (issue 12).

    python bench/history.py                  # everything, about 5 minutes
    python bench/history.py --quick          # shorter windows, about 2 minutes
    python bench/history.py --store redis --subs 1000

1. Through one process (Node client `cluster-fanout`, as bench/run.py's cluster
   figure): a fresh server (this file, run as `history.py PORT STORE HISTORY
   [REDIS_URL]`, on core 0) with N WebSocket subscribers on /sub and one
   publisher on /pub, the Node client on core 1 (Redis on core 1 too).
   *latency*: one broadcast to the last of N subscribers (median, p99);
   *rate*: broadcasts per second, each reaching every subscriber, 32 in flight;
   *CPU*: server CPU ms per broadcast in the rate window. N = 1 (messages/s
   through one process) and N = 1,000 (fan-out); `history=0` against
   `history=1000`; the ratio on/off is the cost of history.
2. Redis round trips per broadcast: requests the publishing connection makes,
   counted in this process over 2,000 broadcasts after the first (which loads
   the script).
3. Redis memory per kept message: `MEMORY USAGE` of a group's stream (exact,
   `SAMPLES 0`) over its length, 10,000 kept messages of 32 and 256 bytes; and
   of the group's meta key.

Figures on this shared 2-core machine are noisy; the ratio of two runs made
seconds apart by the same client is the figure to read. Prints markdown tables
and the command that made them.
"""
from __future__ import annotations

import sys

HISTORY = 1000  # messages kept per group when history is on


def serve(port: int, store_kind: str, history: int, redis_url: str = "") -> None:
    """The server: /sub joins the group "all", /pub broadcasts what it receives."""
    if store_kind == "redis":
        from gevent import monkey

        monkey.patch_all()
    from greenchan import MemoryChannelStore, RedisChannelStore, Server, with_channel

    if store_kind == "redis":
        store = RedisChannelStore(redis_url, history=history)
    else:
        store = MemoryChannelStore(history=history)

    @with_channel
    def sub(channel):
        store.add_to_group("all", channel)

    @with_channel
    def pub(channel):
        channel.on_receive(lambda message: store.broadcast("all", message))

    routes = {"/sub": sub, "/pub": pub}

    def app(environ, start_response):
        route = routes.get(environ.get("PATH_INFO", "/"))
        if route is None:
            start_response("404 Not Found", [("Content-Length", "0")])
            return [b""]
        return route(environ, start_response)

    server = Server(app, host="127.0.0.1", port=port, compression=None, ping_interval=None).start()
    print(f"READY {server.port}", flush=True)
    server.serve_forever()


def through_one_process(store: str, subs: int, history: int, o, redis_url: str) -> dict:
    from harness import Server, run_client, wait_quiet

    args = [store, str(history)] + ([redis_url] if store == "redis" else [])
    wait_quiet(20)
    srv = Server("history-server", *args)
    srv.cmd[4] = __file__  # this file is the server (harness starts bench/servers/ scripts)
    with srv:
        r = run_client(srv, "cluster-fanout", o.budget + o.rate + 120, urls=f"ws://127.0.0.1:{srv.port}",
                       subs=subs, rounds=o.rounds, duration=o.budget, window=32, rate_duration=o.rate)
    if r.get("published") and r.get("server_cpu_s"):
        r["cpu_ms_per_broadcast"] = 1000 * r["server_cpu_s"] / r["published"]
    return r


def round_trips(redis_url: str) -> dict:
    """Requests of the publishing connection per broadcast, history off and on."""
    from greenchan import RedisChannelStore

    found = {}
    for history in (0, HISTORY):
        store = RedisChannelStore(redis_url, history=history, prefix=f"rt{history}:")
        try:
            store.broadcast("room", "warm up")  # connects, loads the script
            calls = [0]
            execute = store._publisher.execute_command

            def counting(*args, **kwargs):
                calls[0] += 1
                return execute(*args, **kwargs)

            store._publisher.execute_command = counting
            n = 2000
            for i in range(n):
                store.broadcast("room", f"message {i}")
            found[history] = calls[0] / n
        finally:
            store.close()
    return found


def memory_per_message(redis_url: str) -> dict:
    """Bytes of Redis memory per kept message (the stream over its length)."""
    import redis

    from greenchan import RedisChannelStore

    r = redis.Redis.from_url(redis_url)
    found = {}
    for size in (32, 256):
        kept = 10000
        store = RedisChannelStore(redis_url, history=kept, prefix=f"mem{size}:")
        try:
            payload = "x" * (size - 1)  # plus the one tag byte: `size` bytes published
            for _ in range(kept):
                store.broadcast("room", payload)
            stream, meta = store._history_keys("room")
            length = r.xlen(stream)
            usage = r.memory_usage(stream, samples=0)
            found[size] = {"kept": length, "bytes": usage, "per_message": usage / length,
                           "meta_bytes": r.memory_usage(meta, samples=0)}
        finally:
            store.close()
    return found


def main(argv=None) -> int:
    import argparse
    import json

    from harness import use_bench_venv

    use_bench_venv()
    from gevent import monkey

    monkey.patch_all()  # the Redis figures run a RedisChannelStore in this process
    from harness import BenchError, Redis, check_node, versions

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=["memory", "redis"], action="append", help="default: both")
    ap.add_argument("--subs", type=int, action="append", help="subscriber counts (default 1 and 1000)")
    ap.add_argument("--rounds", type=int, default=30, help="latency rounds per figure")
    ap.add_argument("--budget", type=float, default=8, help="seconds at most for the latency rounds")
    ap.add_argument("--rate", type=float, default=5, help="seconds of the rate window")
    ap.add_argument("--quick", action="store_true", help="--rounds 15 --budget 4 --rate 3")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each off/on pair N times, keep each figure's best (noisy machine)")
    ap.add_argument("--json", help="also write the results to this file")
    o = ap.parse_args(argv)
    if o.quick:
        o.rounds, o.budget, o.rate = 15, 4, 3
    check_node()
    stores = o.store or ["memory", "redis"]
    subs_list = o.subs or [1, 1000]
    command = "python bench/history.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict = {"through": {}}
    with Redis(core="1") as redis_srv:
        for store in stores:
            for subs in subs_list:
                pair: dict = {}
                for _ in range(o.repeat):
                    for history in (0, HISTORY):  # off, then on, seconds apart: a fair ratio
                        try:
                            r = through_one_process(store, subs, history, o, redis_srv.url)
                        except BenchError as exc:
                            r = {"error": str(exc)[:500]}
                        pair[history] = best(pair.get(history), r)
                results["through"][f"{store}/{subs}"] = pair
                print(f"{store:6s} {subs:5d} subs  " + "  ".join(
                    f"h={h}: " + (f"{r['rate']:.0f}/s p50 {r['p50_ms']:.2f} ms "
                                  f"cpu {r.get('cpu_ms_per_broadcast') or 0:.3f} ms"
                                  if "rate" in r else "ERROR " + r["error"][:200])
                    for h, r in pair.items()), flush=True)
        if "redis" in stores:
            results["round_trips"] = round_trips(redis_srv.url)
            results["memory"] = memory_per_message(redis_srv.url)
    results["versions"] = versions()
    results["command"] = command
    print()
    print(render(results))
    if o.json:
        with open(o.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def best(old, new: dict) -> dict:
    """The better of two runs of one figure: the higher rate, the lower CPU and latency."""
    if not old or "error" in old:
        return new
    if "error" in new:
        return old
    merged = dict(old)
    merged["rate"] = max(old["rate"], new["rate"])
    for key in ("p50_ms", "p99_ms", "cpu_ms_per_broadcast"):
        if new.get(key) is not None and (merged.get(key) is None or new[key] < merged[key]):
            merged[key] = new[key]
    merged["runs"] = old.get("runs", 1) + 1
    return merged


def render(results: dict) -> str:
    v = results["versions"]
    lines = [
        "# History on against off",
        "",
        f"`{results['command']}`  (greenchan {v.get('greenchan')}, {v.get('redis-server', '')})",
        "",
        "| store | subscribers | history | broadcasts/s | ratio off/on | p50 ms | p99 ms | server CPU ms per broadcast | CPU ratio on/off |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, pair in results["through"].items():
        store, subs = key.split("/")
        off = pair.get(0, {})
        for history, r in pair.items():
            if "error" in r:
                lines.append(f"| {store} | {subs} | {history} | error: {r['error'][:80]} | | | | | |")
                continue
            rate_ratio = off["rate"] / r["rate"] if history and "rate" in off and r["rate"] else None
            cpu_ratio = (r["cpu_ms_per_broadcast"] / off["cpu_ms_per_broadcast"]
                         if history and off.get("cpu_ms_per_broadcast") and r.get("cpu_ms_per_broadcast") else None)
            lines.append(
                f"| {store} | {int(subs):,} | {history} | {r['rate']:,.0f} | "
                f"{f'{rate_ratio:.2f}x' if rate_ratio else ''} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r.get('cpu_ms_per_broadcast') or 0:.3f} | {f'{cpu_ratio:.2f}x' if cpu_ratio else ''} |"
            )
    if "round_trips" in results:
        rt = results["round_trips"]
        lines += ["", "Redis round trips per broadcast (requests of the publishing connection): "
                  + ", ".join(f"history={h}: {n:.2f}" for h, n in rt.items())]
    if "memory" in results:
        lines += ["", "| message bytes | kept | stream bytes | bytes per kept message | meta key bytes |",
                  "|---:|---:|---:|---:|---:|"]
        for size, m in results["memory"].items():
            lines.append(f"| {size} | {m['kept']:,} | {m['bytes']:,} | {m['per_message']:.1f} | {m['meta_bytes']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1].isdigit():  # started by the harness as a server
        serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), *sys.argv[4:5])
    else:
        sys.exit(main())
