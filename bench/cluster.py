"""Broadcast throughput through one Redis and through a 3-master Redis Cluster (issue 14).

    .venv/bin/python bench/cluster.py --nice -15          # both parts, 3 rounds, about 15 minutes
    .venv/bin/python bench/cluster.py --part store --rounds 1 --duration 5 --row single

Four rows, each on a fresh Redis (tests/redis_cluster.py starts the cluster):

``single``   one redis-server, classic PUBLISH/SUBSCRIBE.
``sharded``  3 masters, sharded pub/sub: SPUBLISH to the master owning the channel's
             slot, SSUBSCRIBE there (a subscriber has a connection per master).
``sharded-replicas``  the same with a replica per master (6 nodes): Redis copies each
             SPUBLISH to the replicas of its shard, over the cluster bus.
``classic``  the same 3 masters with classic PUBLISH/SUBSCRIBE, which the cluster
             copies over its bus to every node whoever subscribed where; a subscriber
             holds one connection, to any node (the first process on the first
             master, the second on the second). Redis's own ``commandstats`` (in the
             notes) show which command each node ran.

Part ``store``: greenchan end to end. Two worker processes (this file with
``--worker``), each a ``RedisChannelStore`` (``redis://`` for single and classic,
the cluster store on ``redis+cluster://`` for the sharded rows) with ``--subs`` members in each
of ``--groups`` groups, both subscribed to every group; each runs ``--publishers``
greenlets that broadcast 64-byte messages round-robin over the groups, one in flight
each, for ``--warmup`` + ``--duration`` seconds. A member is a stand-in for a channel
(what the store asks of one: open, close hooks, ``send``), so what is measured is the
Redis path (publish, Redis, the subscriber's read, the local fan-out) and not
WebSocket framing. Each message is delivered ``2 x subs`` times. Figures: delivered
messages/s and published/s; Redis CPU per published message (all nodes, and each
node); the workers' CPU per delivery; lost = deliveries short of 2 x subs x published
once the publishers stopped and the subscribers drained (exactly once: 0).

Part ``redis``: how far Redis itself goes, which the store part cannot show on a
2-core machine (there, the Python workers are the limit and each Redis node idles).
One load process (this file with ``--load``) publishes 64-byte messages at a fixed
rate (each of ``--rates`` in turn, publishes/s in all) over 3 channels, each on its own
master (on the one Redis for single), pipelined, every millisecond what the clock says
is due; and holds the subscribers of every channel as the two greenchan processes would
(2 per channel), counting what they receive by bytes, parsing nothing. Figures:
messages/s delivered (2 per publish; short of 97% of that: ‡, Redis or the machine is
full, and the figure is then the most it delivered), the CPU of each Redis node, and
the load's. On 2 cores the cluster's ceiling is the machine's, not Redis's: 3 nodes
and the load share them; read the CPU columns.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

if "--worker" in sys.argv:  # redis-py's blocking sockets: the store needs them patched, first
    from gevent import monkey

    monkey.patch_all()

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from harness import Redis, machine_busy_s, proc_cpu_s, wait_quiet  # noqa: E402

ROWS = ("single", "sharded", "sharded-replicas", "classic")
PAYLOAD = "x" * 64


# -- the worker: one greenchan process ---------------------------------------------


class Member:
    """What a store asks of a channel, without a socket: counts what it is sent."""

    is_open = True
    received = 0

    def _add_close_hook(self, fn: Callable[[Any], None]) -> None:
        pass

    def _remove_close_hook(self, fn: Callable[[Any], None]) -> None:
        pass

    def send(self, message: Any, wait: bool = True) -> bool:
        Member.received += 1
        return True


def worker(url: str, groups: int, subs: int, publishers: int) -> None:
    """Join every group, say READY; on ``GO start end`` publish until ``end`` (wall
    clock) and count deliveries in [start, end]; then drain and print the totals."""
    import gevent

    from greenchan import RedisChannelStore

    store = RedisChannelStore(url)
    names = [f"bench:{i}" for i in range(groups)]
    members = [Member() for _ in range(subs)]
    for name in names:
        for member in members:
            store.add_to_group(name, member)
    print("READY", flush=True)
    start, end = (float(x) for x in sys.stdin.readline().split()[1:3])
    published, errors, marks = [0], [0], {}

    def publish(offset: int) -> None:
        i = offset
        while time.time() < end:
            try:
                store.broadcast(names[i % groups], PAYLOAD)
                published[0] += 1
            except Exception:
                errors[0] += 1
                gevent.sleep(0.01)
            i += 1

    def mark() -> None:
        for name, at in (("start", start), ("end", end)):
            gevent.sleep(max(0.0, at - time.time()))
            marks[name] = (Member.received, published[0], proc_cpu_s(os.getpid()))

    greenlets = [gevent.spawn(publish, k * 7) for k in range(publishers)] + [gevent.spawn(mark)]
    gevent.joinall(greenlets)
    # Drain: what the others published reaches this process a little after `end`.
    last = -1
    for _ in range(50):  # bounded: at most 5 s
        if Member.received == last:
            break
        last = Member.received
        gevent.sleep(0.1)
    print(json.dumps({
        "received_window": marks["end"][0] - marks["start"][0],
        "published_window": marks["end"][1] - marks["start"][1],
        "cpu_window_s": marks["end"][2] - marks["start"][2],
        "received": Member.received, "published": published[0], "errors": errors[0],
    }), flush=True)
    store.close()


# -- the driver --------------------------------------------------------------------


class Topology:
    """The Redis side of a row: its URLs for the two workers and its processes."""

    def __init__(self, row: str) -> None:
        self.row = row
        self.sharded = row.startswith("sharded")
        self.single: Optional[Redis] = None
        self.cluster: Any = None

    def __enter__(self) -> "Topology":
        if self.row == "single":
            self.single = Redis().__enter__()
        else:
            from redis_cluster import RedisCluster

            self.cluster = RedisCluster(3, 1 if self.row == "sharded-replicas" else 0).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.single is not None:
            self.single.__exit__()
        if self.cluster is not None:
            self.cluster.stop()

    def urls(self) -> List[str]:
        if self.single is not None:
            return [self.single.url] * 2
        if self.sharded:
            return [self.cluster.url] * 2
        first, second = self.cluster.masters()[:2]
        return [f"redis://127.0.0.1:{first}/0", f"redis://127.0.0.1:{second}/0"]

    def pids(self) -> Dict[int, int]:
        """port -> pid of every redis-server."""
        if self.single is not None:
            return {self.single.port: self.single.proc.pid}
        return {port: self.cluster._procs[port].pid for port in self.cluster.running()}

    def channels(self) -> List[Tuple[int, str]]:
        """(port, channel) of the redis part's three publishers: one channel per master,
        names of one length (see ``load``)."""
        if self.single is not None:
            return [(self.single.port, "greenchan:{bench:%d}" % n) for n in range(10000, 10003)]
        from redis_cluster import key_slot

        out = []
        for port in self.cluster.masters():
            n = next(n for n in range(10000, 100000)
                     if self.cluster.master_of(key_slot("bench:%d" % n)) == port)
            out.append((port, "greenchan:{bench:%d}" % n))
        return out

    def wait_subscribed(self, count: int) -> None:
        """Until Redis counts ``count`` subscriptions to the channels (bounded)."""
        import redis

        sub = "SHARDNUMSUB" if self.sharded else "NUMSUB"
        names = [ch for _, ch in self.channels()]
        for _ in range(500):  # at most 5 s
            total = 0
            for port in self.pids():
                reply = redis.Redis(port=port, protocol=2).execute_command("PUBSUB", sub, *names)
                total += sum(reply[1::2])
            if total >= count:
                return
            time.sleep(0.01)
        raise RuntimeError(f"{self.row}: {total} of {count} subscriptions after 5 s")

    def subscriptions(self) -> List[List[Tuple[int, str, List[str]]]]:
        """For each of the two subscribing processes, its connections: (port, command,
        channels), as the store holds them."""
        chans = self.channels()
        every = [c for _, c in chans]
        if self.sharded:
            return [[(port, "SSUBSCRIBE", [c]) for port, c in chans] for _ in range(2)]
        return [[(chans[k][0] if self.cluster else chans[0][0], "SUBSCRIBE", every)] for k in range(2)]

    def spread(self, groups: int) -> List[int]:
        """How many of the groups each master owns (a cluster's), most first."""
        if self.cluster is None:
            return [groups]
        owners = [self.cluster.master_of("{bench:%d}" % i) for i in range(groups)]
        return sorted((owners.count(port) for port in set(owners)), reverse=True)

    def commandstats(self) -> Dict[int, Dict[str, int]]:
        """port -> {command: calls} for the pub/sub commands and EVALSHA."""
        import redis

        out = {}
        for port in self.pids():
            info = redis.Redis(port=port, protocol=2).info("commandstats")
            out[port] = {k[8:]: v["calls"] for k, v in info.items()
                         if k[8:] in ("publish", "spublish", "subscribe", "ssubscribe", "evalsha")}
        return out


def store_round(row: str, o: argparse.Namespace) -> Dict[str, Any]:
    wait_quiet(20)
    with Topology(row) as topo:
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--worker", url, "--groups", str(o.groups), "--subs", str(o.subs),
             "--publishers", str(o.publishers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for url in topo.urls()]
        try:
            for p in procs:
                line = p.stdout.readline().strip()
                if line != "READY":
                    raise RuntimeError(f"a {row} worker did not start: {line!r}")
            start = time.time() + o.warmup
            end = start + o.duration
            for p in procs:
                p.stdin.write(f"GO {start} {end}\n")
                p.stdin.flush()
            pids = topo.pids()
            time.sleep(max(0.0, start - time.time()))
            redis0 = {port: proc_cpu_s(pid) for port, pid in pids.items()}
            busy0, t0 = machine_busy_s(), time.monotonic()
            time.sleep(max(0.0, end - time.time()))
            redis1 = {port: proc_cpu_s(pid) for port, pid in pids.items()}
            busy1, t1 = machine_busy_s(), time.monotonic()
            results = [json.loads(p.stdout.readline()) for p in procs]
            stats = topo.commandstats()
            spread = topo.spread(o.groups)
        finally:
            for p in procs:
                p.kill()
                p.wait(timeout=10)
    wall = t1 - t0
    published = sum(r["published_window"] for r in results)
    delivered = sum(r["received_window"] for r in results)
    redis_cpu = {port: redis1[port] - redis0[port] for port in redis0}
    workers_cpu = sum(r["cpu_window_s"] for r in results)
    expected = 2 * o.subs * sum(r["published"] for r in results)
    other = busy1 - busy0 - sum(redis_cpu.values()) - workers_cpu
    return {
        "delivered_per_s": delivered / wall,
        "published_per_s": published / wall,
        "redis_us_per_msg": 1e6 * sum(redis_cpu.values()) / published,
        "busiest_us_per_msg": 1e6 * max(redis_cpu.values()) / published,
        "redis_cpu_pct": {port: round(100 * cpu / wall) for port, cpu in redis_cpu.items()},
        "node_us_per_msg": sorted((1e6 * cpu / published for cpu in redis_cpu.values()), reverse=True),
        "workers_us_per_delivery": 1e6 * workers_cpu / delivered,
        "lost": expected - sum(r["received"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "other_cpu_pct": max(0.0, 100 * other / wall),
        "commandstats": stats,
        "groups_per_master": spread,
        "groups": o.groups, "subs": o.subs, "publishers": o.publishers,
    }


def resp(*args: str) -> bytes:
    """A command as Redis reads it."""
    return b"".join([b"*%d\r\n" % len(args)] + [b"$%d\r\n%s\r\n" % (len(x), x.encode()) for x in args])


def load(spec: Dict[str, Any]) -> None:
    """The redis part's load, one process: publishers at a fixed rate, and subscribers
    counted by bytes. ``spec``: ``publish`` [port, command, channel] per publisher,
    ``subscribe`` [port, command, [channels]] per subscriber connection, ``rate``
    publishes/s in all. Each publisher sends, every millisecond or so, the commands due by
    the clock (pipelined: replies are read and dropped); every channel name has the same
    length, so that a subscriber's bytes over one message's size is its message count."""
    pubs = []
    for port, command, channel in spec["publish"]:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        cmd = resp(command, channel, PAYLOAD)
        # The same command 4,096 times: what is due is sent from here, cycling, no copy.
        pubs.append((sock, memoryview(cmd * 4096), len(cmd)))
    subs, frame = [], 0
    for port, command, channels in spec["subscribe"]:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(resp(command, *channels))
        sock.setblocking(False)
        subs.append(sock)
        frame = len(resp("smessage" if command == "SSUBSCRIBE" else "message", channels[0], PAYLOAD))
    print("READY", flush=True)
    start, end = (float(x) for x in sys.stdin.readline().split()[1:3])
    per_pub = spec["rate"] / len(pubs)
    sel = selectors.DefaultSelector()
    for sock in subs:
        sel.register(sock, selectors.EVENT_READ, True)
    for sock, _, _ in pubs:
        sel.register(sock, selectors.EVENT_READ, False)  # replies: read and dropped
    buf = bytearray(1 << 20)
    got, cut, due_total = 0, 0, [0] * len(pubs)
    owed, pos = [0] * len(pubs), [0] * len(pubs)  # bytes due not yet sent; where in the blob
    marks: Dict[str, int] = {}
    begun = time.time()
    while True:  # bounded: until `end`
        now = time.time()
        if now >= end:
            marks.setdefault("end", got)
            break
        if now >= start:
            marks.setdefault("start", got)
        for i, (sock, blob, size) in enumerate(pubs):
            due = int(per_pub * (now - begun)) - due_total[i]
            due_total[i] += due
            owed[i] += due * size
            while owed[i]:
                chunk = blob[pos[i]:pos[i] + owed[i]]
                try:
                    n = sock.send(chunk)
                except BlockingIOError:
                    break
                owed[i] -= n
                pos[i] = (pos[i] + n) % len(blob)
                if n < len(chunk):
                    break
        for key, _ in sel.select(0.001):
            n = key.fileobj.recv_into(buf)
            if not n:  # Redis closed it: a subscriber over its output buffer limit
                sel.unregister(key.fileobj)
                cut += 1
            elif key.data:
                got += n
    backlog = sum(owed[i] // pubs[i][2] for i in range(len(pubs)))
    result = {"bytes": marks["end"] - marks["start"], "frame": frame, "backlog": backlog, "cut": cut}
    print(json.dumps(result), flush=True)


def redis_round(row: str, rate: int, o: argparse.Namespace) -> Dict[str, Any]:
    wait_quiet(20)
    with Topology(row) as topo:
        command = "SPUBLISH" if topo.sharded else "PUBLISH"
        spec = {"rate": rate, "publish": [(port, command, ch) for port, ch in topo.channels()],
                "subscribe": [c for proc in topo.subscriptions() for c in proc]}
        proc = subprocess.Popen([sys.executable, __file__, "--load", json.dumps(spec)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError(f"the {row} load did not start")
            topo.wait_subscribed(sum(len(chs) for _, _, chs in spec["subscribe"]))
            start = time.time() + o.warmup
            end = start + o.duration
            proc.stdin.write(f"GO {start} {end}\n")
            proc.stdin.flush()
            pids = topo.pids()
            time.sleep(max(0.0, start - time.time()))
            redis0, load0 = {port: proc_cpu_s(pid) for port, pid in pids.items()}, proc_cpu_s(proc.pid)
            busy0, t0 = machine_busy_s(), time.monotonic()
            time.sleep(max(0.0, end - time.time()))
            redis1, load1 = {port: proc_cpu_s(pid) for port, pid in pids.items()}, proc_cpu_s(proc.pid)
            busy1, t1 = machine_busy_s(), time.monotonic()
            result = json.loads(proc.stdout.readline())
            stats = topo.commandstats()
        finally:
            proc.kill()
            proc.wait(timeout=10)
    wall = t1 - t0
    redis_cpu = {port: redis1[port] - redis0[port] for port in redis0}
    other = busy1 - busy0 - sum(redis_cpu.values()) - (load1 - load0)
    delivered = result["bytes"] / result["frame"] / wall
    return {
        "rate": rate,
        "delivered_per_s": delivered,
        # Under 97% of the two deliveries per publish offered: Redis (or this machine) is full.
        "saturated": delivered < 0.97 * 2 * rate,
        "backlog": result["backlog"],
        "connections_cut": result["cut"],
        "redis_cpu_pct": 100 * sum(redis_cpu.values()) / wall,
        "node_cpu_pct": sorted((100 * cpu / wall for cpu in redis_cpu.values()), reverse=True),
        "load_cpu_pct": 100 * (load1 - load0) / wall,
        "other_cpu_pct": max(0.0, 100 * other / wall),
        "commandstats": stats,
    }


def median_of(runs: List[Dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("store", "redis"), action="append", help="default: both")
    ap.add_argument("--row", choices=ROWS, action="append", help="default: all three")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--subs", type=int, default=4, help="members per group per process")
    ap.add_argument("--publishers", type=int, default=16, help="publishing greenlets per process")
    ap.add_argument("--nice", type=int, help="run Redis and the workers at this nice (and autogroup) value")
    ap.add_argument("--json", help="also write every run to this file")
    ap.add_argument("--rates", default="100000,1000000,4000000",
                    help="redis part: publishes/s offered, comma-separated")
    ap.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--load", metavar="JSON", help=argparse.SUPPRESS)
    o = ap.parse_args(argv)
    if o.worker:
        worker(o.worker, o.groups, o.subs, o.publishers)
        return 0
    if o.load:
        load(json.loads(o.load))
        return 0
    rows, parts = o.row or list(ROWS), o.part or ["store", "redis"]
    if o.nice is not None:
        # Inherited by every redis-server and worker started from here. With autogroup
        # scheduling, a session competes as one whatever its processes' nice, unless
        # the autogroup itself is niced (sched(7)).
        os.setpriority(os.PRIO_PROCESS, 0, o.nice)
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(o.nice))
        except OSError:
            pass
    command = "python bench/cluster.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rates = [int(x) for x in o.rates.split(",")]
    # part -> row (and rate, for the redis part) -> the runs
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {part: {} for part in parts}
    for n in range(o.rounds):
        for part in parts:
            for row in rows:
                for rate in rates if part == "redis" else [0]:
                    r = redis_round(row, rate, o) if part == "redis" else store_round(row, o)
                    runs[part].setdefault(f"{row} {rate}" if rate else row, []).append(r)
                    shown = {k: v for k, v in r.items() if k != "commandstats"}
                    print(f"round {n + 1} {part} {row}: {json.dumps(shown)}", flush=True)
    print()
    print(header(o, command))
    if "store" in runs:
        report_store(runs["store"])
    if "redis" in runs:
        report_redis(runs["redis"])
    if o.json:
        with open(o.json, "w") as f:
            json.dump({"command": command, "runs": runs}, f, indent=1)
    return 0


def header(o: argparse.Namespace, command: str) -> str:
    import redis

    import greenchan

    commit = subprocess.run(["git", "-C", str(BENCH.parent), "log", "-1", "--format=%h"],
                            capture_output=True, text=True).stdout.strip()
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    # PYTHONPATH may name a snapshot of the package (git archive), away from edits in progress.
    where = os.path.dirname(os.path.dirname(greenchan.__file__))
    source = commit if Path(where) == BENCH.parent else f"from {where}"
    return (f"`{command}` on {time.strftime('%Y-%m-%d')}, {platform.node()} ({os.cpu_count()} cores), "
            f"greenchan {greenchan.__version__} ({source}), redis-py {redis.__version__}, "
            f"redis-server {server[2][2:] if len(server) > 2 else '?'}; {o.duration:g} s measured after "
            f"{o.warmup:g} s, median of {o.rounds} rounds")


def each(rs: List[Dict[str, Any]], key: str) -> str:
    """The median of each position of a per-node list, busiest first."""
    return " / ".join(f"{statistics.median(r[key][i] for r in rs):.1f}" for i in range(len(rs[0][key])))


def report_store(runs: Dict[str, List[Dict[str, Any]]]) -> None:
    base = runs.get("single")
    r0 = next(iter(runs.values()))[0]
    print()
    print(f"greenchan end to end: 2 processes, {r0['groups']} groups, {r0['subs']} members per group "
          f"in each, {r0['publishers']} publishers per process")
    print()
    print("| row | delivered msg/s | vs single | published/s | Redis µs CPU/msg, all nodes | "
          "each node µs/msg | workers µs CPU/delivery | lost | other CPU % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, rs in runs.items():
        d = median_of(rs, "delivered_per_s")
        vs = f"{d / median_of(base, 'delivered_per_s'):.2f}x" if base else ""
        print(f"| {row} | {d:,.0f} | {vs} | {median_of(rs, 'published_per_s'):,.0f} | "
              f"{median_of(rs, 'redis_us_per_msg'):.1f} | {each(rs, 'node_us_per_msg')} | "
              f"{median_of(rs, 'workers_us_per_delivery'):.2f} | {max(r['lost'] for r in rs)} | "
              f"{median_of(rs, 'other_cpu_pct'):.0f} |")
    print()
    for row, rs in runs.items():
        print(f"- {row}: groups per master {rs[-1]['groups_per_master']}; Redis commands in the last "
              f"round (port: calls) {rs[-1]['commandstats']}")


def report_redis(runs: Dict[str, List[Dict[str, Any]]]) -> None:
    print()
    print("Redis alone: publishes at a fixed rate over 3 channels (one per master), pipelined; "
          "2 subscribers of every channel")
    print()
    print("| row | offered publishes/s | delivered msg/s | vs single | Redis CPU %, all nodes | "
          "each node CPU % | load CPU % | other CPU % | subscribers cut |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, rs in runs.items():
        row, rate = key.split()
        base = runs.get(f"single {rate}")
        d = median_of(rs, "delivered_per_s")
        vs = f"{d / median_of(base, 'delivered_per_s'):.2f}x" if base else ""
        mark = " ‡" if any(r["saturated"] for r in rs) else ""
        print(f"| {row} | {int(rate):,} | {d:,.0f}{mark} | {vs} | {median_of(rs, 'redis_cpu_pct'):.0f} | "
              f"{each(rs, 'node_cpu_pct')} | {median_of(rs, 'load_cpu_pct'):.0f} | "
              f"{median_of(rs, 'other_cpu_pct'):.0f} | {sum(r['connections_cut'] for r in rs)} |")
    print()
    print("‡ in at least one round, under 97% of the messages offered were delivered (Redis or the "
          "machine was full): the figure is the most it delivered")
    for key, rs in runs.items():
        print(f"- {key}: Redis commands in the last round (port: calls) {rs[-1]['commandstats']}")

def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwind through the cleanups: no Redis left behind


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    sys.exit(main())
