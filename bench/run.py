"""greenchan side by side with its peers, in one run on this machine.

    python bench/run.py                      # everything, about 10 minutes
    python bench/run.py --quick              # short windows, about 3 minutes
    python bench/run.py -w echo-64 -w fanout-1000 -s greenchan -s aiohttp
    python bench/run.py --list

Each (workload, server) pair gets a fresh server process pinned to core 0 and a Node
client pinned to core 1 (bench/node/client.js). Writes bench/results.md and
bench/results.json, with the versions of everything that ran. Absolute figures on a
shared 2-core machine are noise; the ratios between servers in one run are the point.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import (BENCH, NICE, BenchError, Redis, Server, ServerGroup, check_node, run_client, use_bench_venv,
                     versions, wait_quiet)


@dataclass
class Peer:
    """A server under test: its file in servers/ and what it can be asked to do."""

    name: str
    script: str
    kind: str   # "ws": WebSocket echo and broadcast; "tcp": raw echo; "http": HTTP only
    http: bool = False   # serves /poll, /stream, /idle and /sse
    env: dict = field(default_factory=dict)   # extra environment for the server process
    default: bool = True   # run when no -s is given (variants for experiments are not)


SERVERS = [
    Peer("greenchan", "greenchan_server.py", "ws", http=True),
    Peer("gevent-websocket", "gevent_websocket_server.py", "ws"),
    Peer("flask-sock", "flask_sock_server.py", "ws"),
    Peer("websockets", "websockets_server.py", "ws"),
    Peer("aiohttp", "aiohttp_server.py", "ws"),
    Peer("raw-gevent-tcp", "raw_gevent_tcp.py", "tcp"),
    Peer("raw-asyncio-tcp", "raw_asyncio_tcp.py", "tcp"),
    Peer("pywsgi", "pywsgi_server.py", "http", http=True),
    Peer("floor", "floor_server.py", "floor"),
    # Across processes over Redis (the cluster workload only).
    Peer("python-socketio", "socketio_server.py", "cluster"),
    Peer("greenchan-history", "greenchan_server.py", "cluster", env={"BENCH_HISTORY": "100"}),
    # greenchan with the garbage collector tuned (bench/servers/greenchan_server.py reads
    # BENCH_GC): experiments for where the tail comes from, not run unless named.
    Peer("greenchan-freeze", "greenchan_server.py", "ws", env={"BENCH_GC": "freeze"}, default=False),
    Peer("greenchan-gen0", "greenchan_server.py", "ws", env={"BENCH_GC": "gen0=50000"}, default=False),
    Peer("greenchan-gcfg", "greenchan_server.py", "ws", env={"BENCH_GC": "freeze,gen0=50000"}, default=False),
    Peer("greenchan-nogc", "greenchan_server.py", "ws", env={"BENCH_GC": "off"}, default=False),
    # greenchan with the changes proposed in results.md applied at start-up (BENCH_PATCH).
    Peer("greenchan-deliver", "greenchan_server.py", "ws", env={"BENCH_PATCH": "deliver"}, default=False),
    Peer("greenchan-park", "greenchan_server.py", "ws", env={"BENCH_PATCH": "park"}, default=False),
    Peer("greenchan-write", "greenchan_server.py", "ws", env={"BENCH_PATCH": "write"}, default=False),
    Peer("greenchan-fixed", "greenchan_server.py", "ws", env={"BENCH_PATCH": "deliver,park,write"}, default=False),
]
BY_NAME = {p.name: p for p in SERVERS}
# The real peers ("best peer" in the targets): not the floors, not greenchan's variants.
PEERS = ("gevent-websocket", "flask-sock", "websockets", "aiohttp", "python-socketio")


@dataclass
class Workload:
    name: str
    title: str
    unit: str
    higher_is_better: bool
    applies: callable
    run: callable
    target: str = ""
    rows: list = field(default_factory=list)   # extra (key, title, unit, higher) rows
    own_servers: bool = False   # run() starts its own servers (run(peer, None, o))


def _echo(conns: int, size: int, binary: bool = False):
    def run(peer: Peer, srv: Server, o) -> dict:
        params = dict(conns=conns, size=size, duration=o.duration, warmup=o.warmup)
        if peer.kind == "tcp":
            return run_client(srv, "tcp-echo", o.duration + o.warmup + 30, port=srv.port, **params)
        if o.ws_lib:
            return run_client(srv, "ws-echo", o.duration + o.warmup + 30,
                              url=f"ws://127.0.0.1:{srv.port}/echo", binary=binary,
                              zero_mask=binary, **params)
        return run_client(srv, "ws-echo-raw", o.duration + o.warmup + 30,
                          url=f"ws://127.0.0.1:{srv.port}/echo", binary=binary, **params)
    return run


def _echo_open(rate: int):
    def run(peer: Peer, srv: Server, o) -> dict:
        r = run_client(srv, "ws-echo-open", o.duration + o.warmup + 40,
                       url=f"ws://127.0.0.1:{srv.port}/echo", conns=512, size=32, rate=rate,
                       duration=o.duration, warmup=o.warmup, drain=2)
        cpu = r.get("server_cpu_s")
        r["us_per_msg"] = 1e6 * cpu / r["messages"] if cpu and r.get("messages") else None
        if r.get("saturated"):
            r["note"] = (f"saturated: {r['rate']:,.0f} of {rate:,} msg/s echoed, "
                         f"{r['late']} replies late or missing")
        return r
    return run


def _echo_value(r: dict, binary: bool) -> float:
    return r["mb_per_s"] if binary else r["rate"]


def _idle(path: str, http: bool, sse: bool = False):
    def run(peer: Peer, srv: Server, o) -> dict:
        if http:
            r = run_client(srv, "http-idle", 120, port=srv.port, path=path, warm=100,
                           conns=o.idle_conns, hold=60,
                           accept="text/event-stream" if sse else None, first=sse)
        else:
            r = run_client(srv, "ws-idle", 120, url=f"ws://127.0.0.1:{srv.port}{path}",
                           warm=100, conns=o.idle_conns, hold=60)
        if r.get("failed"):
            raise BenchError(f"{r['failed']} idle connections failed to open")
        r["kib_per_conn"] = (r["rss1_kib"] - r["rss0_kib"]) / r["opened"]
        return r
    return run


def _fanout(subs: int):
    def run(peer: Peer, srv: Server, o) -> dict:
        return run_client(srv, "ws-fanout", o.fanout_budget + 90, url=f"ws://127.0.0.1:{srv.port}",
                          subs=subs, rounds=o.fanout_rounds, duration=o.fanout_budget)
    return run


CLUSTER_SUBS = 1000


def _cluster(peer: Peer, _srv, o) -> dict:
    """Two server processes (both on core 0) on one private redis-server (core 1, with
    the client), 1,000 subscribers spread over both, one publisher on the first."""
    proto = "sio" if peer.script == "socketio_server.py" else "gc"
    with Redis(core="1") as redis:
        with Server(peer.script, redis.url, env=peer.env) as a, Server(peer.script, redis.url, env=peer.env) as b:
            group = ServerGroup([a, b])
            r = run_client(group, "cluster-fanout", o.fanout_budget + o.duration + 120,
                           urls=f"ws://127.0.0.1:{a.port},ws://127.0.0.1:{b.port}", proto=proto,
                           subs=CLUSTER_SUBS, rounds=o.fanout_rounds, duration=o.fanout_budget,
                           window=32, rate_duration=o.duration)
    if r.get("published"):
        r["cpu_ms_per_publish"] = 1000 * r["server_cpu_s"] / r["published"] if r.get("server_cpu_s") else None
    r["note"] = (f"{r['rounds']} rounds, {r['lost']} lost; {r['published']} broadcasts in "
                 f"{r['elapsed_s']:.1f} s with {r['window']} in flight, {r['rate_lost']} lost")
    return r


def _http(path: str):
    def run(peer: Peer, srv: Server, o) -> dict:
        r = run_client(srv, "http", o.duration + o.warmup + 30, port=srv.port, path=path,
                       conns=64, duration=o.duration, warmup=o.warmup)
        if r.get("non_200") or r.get("errors"):
            r["note"] = f"{r.get('non_200')} non-200, {r.get('errors')} errors"
        return r
    return run


def is_ws_or_tcp(p: Peer) -> bool:
    return p.kind in ("ws", "tcp")


WORKLOADS = [
    Workload("echo-1", "echo 32 B text, 1 conn", "msg/s", True, is_ws_or_tcp, _echo(1, 32),
             target="≥ 1.0x fastest peer"),
    Workload("echo-64", "echo 32 B text, 64 conns", "msg/s", True, is_ws_or_tcp, _echo(64, 32),
             target="≥ 1.4x fastest peer"),
    Workload("echo-512", "echo 32 B text, 512 conns", "msg/s", True, is_ws_or_tcp, _echo(512, 32),
             target="≥ 1.4x fastest peer"),
    Workload("echo-256k", "echo 256 KiB binary, 16 conns", "MB/s", True, is_ws_or_tcp,
             _echo(16, 256 * 1024, binary=True), target="≥ 1.3x fastest peer"),
    Workload("echo-open-5k", "open-loop echo, 512 conns, 5k msg/s offered", "µs CPU/msg", False,
             lambda p: p.kind == "ws", _echo_open(5000),
             target="≥ 1.4x lowest peer; p99 ≤ every peer"),
    Workload("echo-open-20k", "open-loop echo, 512 conns, 20k msg/s offered", "µs CPU/msg", False,
             lambda p: p.kind == "ws", _echo_open(20000),
             target="≥ 1.4x lowest peer; p99 ≤ every peer"),
    Workload("echo-open-40k", "open-loop echo, 512 conns, 40k msg/s offered", "µs CPU/msg", False,
             lambda p: p.kind == "ws", _echo_open(40000),
             target="≥ 1.4x lowest peer; p99 ≤ every peer"),
    Workload("idle-ws", "idle memory per WebSocket", "KiB", False, lambda p: p.kind == "ws",
             _idle("/echo", http=False), target="< 10 KiB"),
    Workload("idle-poll", "idle memory per long-poll", "KiB", False, lambda p: p.http,
             _idle("/idle", http=True), target="≤ pywsgi"),
    Workload("idle-sse", "idle memory per SSE stream", "KiB", False, lambda p: p.http,
             _idle("/sse", http=True, sse=True), target="≤ pywsgi"),
    Workload("fanout-1000", "broadcast to 1,000 subscribers", "ms", False, lambda p: p.kind in ("ws", "floor"),
             _fanout(1000), target="≤ 1.1x floor; p99 ≤ every peer"),
    Workload("fanout-5000", "broadcast to 5,000 subscribers", "ms", False, lambda p: p.kind in ("ws", "floor"),
             _fanout(5000), target="≤ 1.1x floor; p99 ≤ every peer"),
    Workload("cluster", "2 processes on Redis, 1,000 subscribers", "ms", False,
             lambda p: p.name == "greenchan" or p.kind == "cluster", _cluster,
             target="ahead of python-socketio on median, p99 and msg/s", own_servers=True),
    Workload("poll", "long-poll requests, 64 conns", "req/s", True, lambda p: p.http, _http("/poll"),
             target="≥ 0.9x pywsgi"),
    Workload("stream", "streamed responses (3 chunks), 64 conns", "req/s", True, lambda p: p.http,
             _http("/stream")),
]
BY_WORKLOAD = {w.name: w for w in WORKLOADS}
# Names for several workloads at once (-w fanout, -w echo-open).
GROUPS = {"fanout": ["fanout-1000", "fanout-5000"], "idle": ["idle-ws", "idle-poll", "idle-sse"],
          "echo-open": ["echo-open-5k", "echo-open-20k", "echo-open-40k"],
          "echo": ["echo-1", "echo-64", "echo-512", "echo-256k"]}


def value_of(w: Workload, r: dict) -> float | None:
    """The workload's headline figure from one result."""
    if w.name.startswith("echo-open"):
        return r.get("us_per_msg")
    if w.name.startswith("echo"):
        return _echo_value(r, w.name == "echo-256k")
    if w.name.startswith("idle"):
        return r["kib_per_conn"]
    if w.name.startswith("fanout") or w.name == "cluster":
        return r["p50_ms"]
    return r["rate"]


def per_cpu_of(w: Workload, r: dict) -> float | None:
    """The headline figure per second of server CPU: robust when other work on the
    machine takes part of the server's core (the wall-clock figure drops, this does not).
    For fan-out it is the server CPU spent per broadcast, in ms (lower is better)."""
    cpu = r.get("server_cpu_s")
    if not cpu:
        return None
    if w.name.startswith("fanout"):
        n = (r.get("rounds") or 0) + (r.get("lost") or 0)
        return 1000 * cpu / n if n else None
    if w.name == "cluster":
        return r.get("cpu_ms_per_publish")
    if w.name.startswith("echo-open"):
        return r.get("us_per_msg")   # already per CPU
    if w.name == "echo-256k":
        return r["mb_per_s"] * r["elapsed_s"] / cpu
    if w.name.startswith("echo") or w.name in ("poll", "stream"):
        return r["messages"] / cpu
    return None


PER_CPU_UNIT = {"msg/s": "msg/CPU-s", "MB/s": "MB/CPU-s", "req/s": "req/CPU-s", "ms": "CPU-ms/broadcast",
                "µs CPU/msg": "µs CPU/msg"}


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    if unit in ("msg/s", "req/s"):
        return f"{v:,.0f}"
    if unit == "MB/s":
        return f"{v:,.0f}"
    if unit == "ms":
        return f"{v:.2f}"
    return f"{v:.1f}"


def advantage(w: Workload, gc: float | None, peer: float | None) -> float | None:
    """How many times better greenchan is than the peer (> 1: greenchan is better)."""
    if not gc or not peer:
        return None
    return gc / peer if w.higher_is_better else peer / gc


def one_run(w: Workload, peer: Peer, o) -> dict:
    """One figure (the best of --repeat tries) from a fresh server."""
    best = None
    for attempt in range(o.repeat):
        busy_before = wait_quiet(o.quiet_wait)
        try:
            if w.own_servers:
                r = w.run(peer, None, o)
            else:
                with Server(peer.script, env=peer.env) as srv:
                    r = w.run(peer, srv, o)
                    if srv.note and w.name.startswith("fanout"):
                        r["note"] = srv.note
            r["value"] = value_of(w, r)
            r["per_cpu"] = per_cpu_of(w, r)
            r["client_bound"] = (r.get("client_cpu_pct") or 0) >= 90
            r["busy_before"] = busy_before
        except BenchError as exc:
            r = {"error": str(exc)[:2000]}
        except Exception as exc:   # one broken server must not stop the suite
            r = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        # Best of the repeats: noise on a shared machine only ever makes a
        # figure worse.
        if best is None or "error" in best or (
                "value" in r and r["value"] is not None and best.get("value") is not None
                and (r["value"] > best["value"]) == w.higher_is_better):
            best = r
        if "error" in r:
            break
    return best


def _median(xs: list) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def combine(w: Workload, runs: list) -> dict:
    """The median of several rounds: each figure (headline, p50, p99, per CPU) is the
    median of its own values; the rounds' values are kept beside it."""
    good = [r for r in runs if "error" not in r and r.get("value") is not None]
    if not good:
        return runs[0] if runs else {"error": "no run"}
    if len(good) == 1 and len(runs) == 1:
        return good[0]
    good.sort(key=lambda r: r["value"])
    out = dict(good[(len(good) - 1) // 2])
    for k in ("value", "p50_ms", "p99_ms", "per_cpu", "server_cpu_pct", "client_cpu_pct",
              "other_cpu_pct", "us_per_msg", "rate", "cpu_ms_per_publish"):
        if any(k in r for r in good):
            out[k] = _median([r.get(k) for r in good])
    out["runs"] = [{"value": r.get("value"), "p99_ms": r.get("p99_ms"), "per_cpu": r.get("per_cpu"),
                    "max_ms": r.get("max_ms"), "saturated": r.get("saturated"),
                    "other_cpu_pct": r.get("other_cpu_pct")} for r in runs if "error" not in r]
    out["saturated"] = any(r.get("saturated") for r in good)
    errors = [r["error"] for r in runs if "error" in r]
    notes = [out.get("note", "")] if out.get("note") else []
    vals = ", ".join(f"{r['value']:.3g}" for r in good)
    p99s = ", ".join(f"{r['p99_ms']:.3g}" for r in good if r.get("p99_ms") is not None)
    notes.append(f"median of {len(good)} rounds: {vals}" + (f" (p99 {p99s})" if p99s else ""))
    if errors:
        notes.append(f"{len(errors)} rounds failed: {errors[0][:200]}")
    if out["saturated"]:
        notes.append(f"{sum(1 for r in good if r.get('saturated'))} rounds saturated")
    out["note"] = "; ".join(notes)
    return out


def run_all(o) -> dict:
    """Each workload: --median rounds, every server once per round, side by side (so a
    noisy minute falls on all of them), then the median of the rounds per server."""
    results: dict = {}
    t_start = time.monotonic()
    for w in [BY_WORKLOAD[n] for n in o.workloads]:
        peers = [BY_NAME[n] for n in o.servers if w.applies(BY_NAME[n])]
        runs: dict = {p.name: [] for p in peers}
        t0 = time.monotonic()
        for rnd in range(o.median):
            for peer in peers:
                t1 = time.monotonic()
                r = one_run(w, peer, o)
                r["seconds"] = round(time.monotonic() - t1, 1)
                runs[peer.name].append(r)
                key = f"{w.name} / {peer.name}" + (f" #{rnd + 1}" if o.median > 1 else "")
                shown = fmt(r.get("value"), w.unit) + " " + w.unit if "value" in r else "ERROR " + r["error"][:300]
                extra = ""
                if r.get("p99_ms") is not None:
                    extra += f"  p99 {r['p99_ms']:.2f} ms"
                if r.get("per_cpu") is not None and w.name.startswith("fanout"):
                    extra += f"  {r['per_cpu']:.2f} CPU-ms/bc"
                if r.get("saturated"):
                    extra += "  SATURATED"
                if "server_cpu_pct" in r:
                    extra += (f"  (server {r['server_cpu_pct']:.0f}% cpu, client {r.get('client_cpu_pct', 0):.0f}%,"
                              f" other {r.get('other_cpu_pct') or 0:.0f}%)")
                print(f"{key:45s} {shown}{extra}  [{r['seconds']}s]", flush=True)
        for peer in peers:
            r = combine(w, runs[peer.name])
            r["seconds"] = round(time.monotonic() - t0, 1)
            results.setdefault(w.name, {})[peer.name] = r
    print(f"total {time.monotonic() - t_start:.0f}s", flush=True)
    return results


def markdown(results: dict, o, info: dict) -> str:
    shown = {n for row in results.values() for n in row}
    cols = [n for n in o.servers if n in shown]
    peers = [n for n in cols if n != "greenchan"]
    ws = [BY_WORKLOAD[n] for n in o.workloads if n in results]
    out = ["# greenchan benchmarks, side by side", ""]
    out.append(f"Run {info['date']} with `{info['command']}` "
               f"({'quick' if o.quick else 'full'} mode, {info['seconds']:.0f} s in all). "
               "Each server on core 0, the Node `ws` client on core 1, one fresh server per "
               "figure. Absolute figures on a shared 2-core machine are noise: read the ratios."
               + (f" Servers, client and Redis ran at nice {o.nice}, ahead of the other work on the "
                  "machine." if getattr(o, "nice", None) is not None else "")
               + (f" Each figure is the median of {o.median} rounds, every server once per round."
                  if getattr(o, "median", 1) > 1 else ""))
    out.append("")
    out.append("## Figures")
    out.append("")
    out.append("| workload | unit | " + " | ".join(cols) + " |")
    out.append("|---|---|" + "---:|" * len(cols))

    def cell(w, name, key="value"):
        r = results.get(w.name, {}).get(name)
        if r is None:
            return ""
        if "error" in r:
            return "error"
        v = r.get(key)
        s = fmt(v, "ms" if key == "p99_ms" else w.unit)
        if r.get("client_bound") and w.higher_is_better:
            s += " †"
        if r.get("saturated"):
            s += " ‡"
        return s

    for w in ws:
        label = w.title + (" (median)" if w.name.startswith("fanout") else "")
        out.append(f"| {label} | {w.unit} | " + " | ".join(cell(w, n) for n in cols) + " |")
        if w.name.startswith("fanout") or w.name.startswith("echo-open") or w.name == "cluster":
            out.append(f"| {w.title} (p99) | ms | " + " | ".join(cell(w, n, "p99_ms") for n in cols) + " |")
        if w.name == "cluster":
            out.append(f"| {w.title}: broadcasts sustained | msg/s | "
                       + " | ".join(fmt(results[w.name].get(n, {}).get("rate"), "msg/s")
                                    if n in results[w.name] else "" for n in cols) + " |")
        if w.name in ("echo-64", "echo-512"):
            out.append(f"| {w.title}: p99 round trip | ms | "
                       + " | ".join(fmt(results[w.name].get(n, {}).get("p99_ms"), "ms")
                                    if n in results[w.name] else "" for n in cols) + " |")
    out.append("")
    out.append("† the client used ≥ 90% of its core: a client-bound figure, a floor for the server.")
    out.append("‡ saturated (open-loop): in at least one round the server echoed under 97% of the offered "
               "rate or more than 0.1% of replies were late; a p99 shown as – had more than 1% late.")
    out.append("")
    out.append("## greenchan against each peer")
    out.append("")
    out.append("Times better (> 1: greenchan is better; for memory and latency this is peer / greenchan).")
    out.append("")
    out.append("| workload | target | " + " | ".join(peers) + " | met? |")
    out.append("|---|---|" + "---:|" * len(peers) + "---|")
    for w in ws:
        row = results[w.name]
        gc = row.get("greenchan", {}).get("value")
        cells, best = [], None
        for n in peers:
            a = advantage(w, gc, row.get(n, {}).get("value"))
            cells.append("" if n not in row else (f"{a:.2f}x" if a else "–"))
            # "fastest peer" means the fastest real peer, not the floors.
            if a and n in PEERS:
                best = a if best is None else min(best, a)
        out.append(f"| {w.title} | {w.target} | " + " | ".join(cells) + f" | {verdict(w, gc, best, results)} |")
    tails = [w for w in ws if w.name.startswith("fanout") or w.name.startswith("echo-open") or w.name == "cluster"]
    if tails:
        out.append("")
        out.append("### p99 against each peer")
        out.append("")
        out.append("Peer's p99 / greenchan's p99 (> 1: greenchan's tail is shorter).")
        out.append("")
        out.append("| workload | " + " | ".join(peers) + " |")
        out.append("|---|" + "---:|" * len(peers))
        for w in tails:
            row = results[w.name]
            gp = row.get("greenchan", {}).get("p99_ms")
            cells = []
            for n in peers:
                pp = row.get(n, {}).get("p99_ms")
                cells.append("" if n not in row else (f"{pp / gp:.2f}x" if gp and pp else "–"))
            out.append(f"| {w.title} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("## The same, per second of server CPU")
    out.append("")
    out.append("Throughput divided by the server's CPU seconds (fan-out: server CPU ms per broadcast). "
               "When other work on this shared machine takes part of the server's core, the figures "
               "above drop and these do not: if the *other CPU %* column below is high, trust these.")
    out.append("")
    out.append("| workload | unit | " + " | ".join(cols) + " |")
    out.append("|---|---|" + "---:|" * len(cols))
    for w in ws:
        if w.name.startswith("idle"):
            continue
        unit = PER_CPU_UNIT.get(w.unit, "")
        vals = []
        for n in cols:
            r = results[w.name].get(n)
            v = r.get("per_cpu") if r else None
            vals.append("" if r is None else ("error" if "error" in r else fmt(v, "ms" if w.unit == "ms" else
                                                                                ("x" if w.name.startswith("echo-open") else "msg/s"))))
        out.append(f"| {w.title} | {unit} | " + " | ".join(vals) + " |")
    out.append("")
    out.append("| workload (per CPU) | " + " | ".join(peers) + " |")
    out.append("|---|" + "---:|" * len(peers))
    for w in ws:
        if w.name.startswith("idle"):
            continue
        row = results[w.name]
        gc = row.get("greenchan", {}).get("per_cpu")
        cells = []
        for n in peers:
            a = advantage(w, gc, row.get(n, {}).get("per_cpu"))
            cells.append("" if n not in row else (f"{a:.2f}x" if a else "–"))
        out.append(f"| {w.title} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("## Every run")
    out.append("")
    out.append("CPU in % of one core over the measured window; *other* is what the rest of the "
               "machine used meanwhile (high means a noisy figure).")
    out.append("")
    out.append("| workload | server | figure | per CPU | p50 ms | p99 ms | server CPU % | client CPU % | other CPU % | note |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for w in ws:
        for n in cols:
            r = results[w.name].get(n)
            if r is None:
                continue
            if "error" in r:
                err = r["error"].replace("|", "/").replace("\n", " ")[:300]
                out.append(f"| {w.name} | {n} | error | | | | | | | {err} |")
                continue
            note = r.get("note", "")
            if w.name.startswith("idle"):
                note = f"{r['opened']} conns, RSS {r['rss0_kib']} → {r['rss1_kib']} KiB" + (
                    f"; {r['note']}" if r.get("note") else "")
            if w.name.startswith("fanout"):
                note = f"{r['rounds']} rounds, {r['lost']} lost" + (f"; {r['note']}" if r.get("note") else "")
            if w.name == "cluster" and r.get("rate"):
                note = f"{r['rate']:,.0f} broadcasts/s sustained; " + note
            pct = lambda k: f"{r[k]:.0f}" if r.get(k) is not None else ""  # noqa: E731
            pc = r.get("per_cpu")
            pcs = (f"{fmt(pc, 'ms' if w.unit == 'ms' else ('x' if w.name.startswith('echo-open') else 'msg/s'))} "
                   f"{PER_CPU_UNIT.get(w.unit, '')}" if pc else "")
            out.append(f"| {w.name} | {n} | {fmt(r.get('value'), w.unit)} {w.unit} | {pcs} | "
                       f"{fmt(r.get('p50_ms'), 'ms')} | {fmt(r.get('p99_ms'), 'ms')} | "
                       f"{pct('server_cpu_pct')} | {pct('client_cpu_pct')} | {pct('other_cpu_pct')} | {note} |")
    out.append("")
    findings = BENCH / "findings.md"
    if findings.exists():
        # Hand-written: what the figures above were used to find (kept across runs).
        out.append(findings.read_text().rstrip())
        out.append("")
    out.append("## Versions")
    out.append("")
    out.append("| | |")
    out.append("|---|---|")
    for k, v in info["versions"].items():
        out.append(f"| {k} | {v} |")
    out.append("")
    return "\n".join(out)


def verdict(w: Workload, gc, best, results) -> str:
    if gc is None:
        return "no figure"
    if w.name in ("echo-1",):
        return "yes" if best and best >= 1.0 else "no"
    if w.name in ("echo-64", "echo-512"):
        return "yes" if best and best >= 1.4 else "no"
    if w.name == "echo-256k":
        return "yes" if best and best >= 1.3 else "no"
    if w.name == "idle-ws":
        return "yes" if gc < 10 else "no"
    row = results.get(w.name, {})
    real = {n: r for n, r in row.items() if n in PEERS and "error" not in r}
    g = row.get("greenchan", {})
    if w.name.startswith("fanout"):
        parts = []
        floor = row.get("floor", {}).get("value")
        if floor:
            parts.append(f"{gc / floor:.2f}x floor ({'yes' if gc / floor <= 1.1 else 'no'})")
        p99s = [r.get("p99_ms") for r in real.values() if r.get("p99_ms")]
        if p99s and g.get("p99_ms"):
            parts.append(f"p99 {'yes' if g['p99_ms'] <= min(p99s) else 'no'} ({min(p99s) / g['p99_ms']:.2f}x best peer)")
        cpus = [r.get("per_cpu") for r in real.values() if r.get("per_cpu")]
        if cpus and g.get("per_cpu"):
            parts.append(f"CPU {'lowest' if g['per_cpu'] <= min(cpus) else 'not lowest'} "
                         f"({min(cpus) / g['per_cpu']:.2f}x best peer)")
        return "; ".join(parts)
    if w.name == "cluster":
        peer = row.get("python-socketio", {})
        if not peer.get("value"):
            return "no python-socketio figure"
        m, p, q = peer["value"] / gc, (peer.get("p99_ms") or 0) / (g.get("p99_ms") or 1e9), \
            (g.get("rate") or 0) / (peer.get("rate") or 1e-9)
        ok = m >= 1 and p >= 1 and q >= 1
        return f"median {m:.2f}x, p99 {p:.2f}x, msg/s {q:.2f}x ({'yes' if ok else 'no'})"
    if w.name.startswith("echo-open"):
        parts = []
        if best:
            parts.append(f"CPU {best:.2f}x best peer ({'yes' if best >= 1.4 else 'no'})")
        p99s = [r.get("p99_ms") for r in real.values() if r.get("p99_ms")]
        if p99s and g.get("p99_ms"):
            parts.append(f"p99 {'yes' if g['p99_ms'] <= min(p99s) else 'no'} ({min(p99s) / g['p99_ms']:.2f}x best peer)")
        if g.get("saturated"):
            parts.append("greenchan saturated")
        return "; ".join(parts)
    if w.name == "poll":
        base = results[w.name].get("pywsgi", {}).get("value")
        if base:
            return "yes" if gc / base >= 0.9 else "no"
    if w.name in ("idle-poll", "idle-sse"):
        base = results[w.name].get("pywsgi", {}).get("value")
        if base:
            return f"{'yes' if gc <= base else 'no'} ({base / gc:.2f}x)"
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workload", dest="workloads", action="append",
                    choices=list(BY_WORKLOAD) + list(GROUPS),
                    help="run only these workloads (repeatable)")
    ap.add_argument("-s", "--server", dest="servers", action="append", choices=list(BY_NAME),
                    help="run only these servers (repeatable)")
    ap.add_argument("--quick", action="store_true", help="short windows and fewer rounds")
    ap.add_argument("--duration", type=float, help="seconds measured per throughput figure")
    ap.add_argument("--idle-conns", type=int, help="idle connections for the memory figures")
    ap.add_argument("--repeat", type=int, default=1, help="run each figure N times, keep the best")
    ap.add_argument("--median", type=int, default=1,
                    help="N rounds of every server side by side; each figure is the median of its rounds")
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="seconds to wait before each run for other work on the machine to stop")
    ap.add_argument("--ws-lib", action="store_true",
                    help="drive WebSocket echo with the ws library instead of the lean raw-frame client")
    ap.add_argument("--nice", type=int, help="run servers, client and Redis at this nice value "
                    "(negative: ahead of other work on a busy machine; needs root)")
    ap.add_argument("--out", default=str(BENCH), help="where results.md and results.json go")
    ap.add_argument("--list", action="store_true", help="list workloads and servers, then exit")
    ap.add_argument("--merge", action="store_true",
                    help="update the figures measured now in the existing results.json, keep the others")
    ap.add_argument("--render", metavar="JSON", help="only rewrite results.md from a results.json")
    o = ap.parse_args(argv)
    if o.render:
        data = json.loads(Path(o.render).read_text())
        opts = argparse.Namespace(**data["options"])
        for name, row in data["results"].items():
            for r in row.values():
                if "error" not in r and r.get("per_cpu") is None:
                    r["per_cpu"] = per_cpu_of(BY_WORKLOAD[name], r)
        (Path(o.out) / "results.md").write_text(markdown(data["results"], opts, data["info"]))
        print(f"wrote {Path(o.out) / 'results.md'}")
        return 0
    if o.list:
        for w in WORKLOADS:
            print(f"workload {w.name:12s} {w.title} ({w.unit})")
        for p in SERVERS:
            print(f"server   {p.name:18s} servers/{p.script}")
        return 0
    check_node()
    NICE[0] = o.nice
    o.workloads = o.workloads or [w.name for w in WORKLOADS]
    o.servers = o.servers or [p.name for p in SERVERS if p.default]
    o.workloads = [x for n in o.workloads for x in GROUPS.get(n, [n])]
    o.duration = o.duration or (1.5 if o.quick else 4.0)
    o.warmup = 0.5 if o.quick else 1.0
    o.idle_conns = o.idle_conns or 5000
    o.fanout_rounds = 10 if o.quick else 40
    o.fanout_budget = 5 if o.quick else 15

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "versions": versions()}
    print(f"greenchan: {info['versions'].get('greenchan')} ({info['versions'].get('greenchan_import')})")
    t0 = time.monotonic()
    results = run_all(o)
    info["seconds"] = time.monotonic() - t0
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    if o.merge and (out / "results.json").exists():
        # Re-measure some figures (a noisy one, say) and keep the rest of the last run.
        old = json.loads((out / "results.json").read_text())
        merged = old["results"]
        for name, row in results.items():
            merged.setdefault(name, {}).update(row)
        results = {n: merged[n] for n in BY_WORKLOAD if n in merged}
        prev = old["options"]
        o.workloads = [n for n in BY_WORKLOAD if n in results]
        o.servers = [p.name for p in SERVERS if p.name in set(prev["servers"]) | set(o.servers)]
        info["command"] = f"{old['info']['command']}, then {info['command']}"
        info["seconds"] += old["info"].get("seconds", 0)
    (out / "results.json").write_text(json.dumps(
        {"info": info, "options": {k: v for k, v in vars(o).items()}, "results": results},
        indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(results, o, info))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


def _stop(signum, frame):
    # Unwind through the try/finally blocks that kill every server and client.
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    use_bench_venv()
    import signal
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sys.exit(main())
