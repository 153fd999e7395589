"""greenchan: echo, broadcast, long-poll, streaming and idle routes on one Server.

    python greenchan_server.py PORT [REDIS_URL]

With REDIS_URL the group lives in a RedisChannelStore (and the process is
monkey-patched, as that store needs); without, in a MemoryChannelStore.

Routes (one handler each, plain WSGI dispatch on PATH_INFO):
  /echo    WebSocket echo
  /sub     joins the group "all" (WebSocket subscriber; stays idle)
  /pub     each message received is broadcast to the group "all"
  /poll    long-poll answered at once with a fixed body (complete response)
  /stream  a streamed response of three chunks, then the end of the stream
  /idle    a channel that the handler keeps and never answers (idle long-poll)
"""

import sys

if len(sys.argv) > 2:
    # redis-py uses blocking sockets; RedisChannelStore needs them patched.
    from gevent import monkey

    monkey.patch_all()

from greenchan import Server, with_channel  # noqa: E402

NOTE = ""
try:
    from greenchan import MemoryChannelStore, RedisChannelStore
except ImportError:   # the stores may not have landed yet: a set and a loop stand in
    NOTE = "no MemoryChannelStore in greenchan: a set-and-loop stand-in broadcast"

    class MemoryChannelStore:
        def __init__(self):
            self.groups = {}

        def add_to_group(self, group, ch):
            self.groups.setdefault(group, set()).add(ch)
            ch.on_close(lambda status: self.groups[group].discard(ch))

        def broadcast(self, group, message):
            for ch in list(self.groups.get(group, ())):
                ch.send(message)

    RedisChannelStore = None

if len(sys.argv) > 2:
    if RedisChannelStore is None:
        sys.exit("greenchan has no RedisChannelStore yet")
    import os

    # BENCH_HISTORY=N: the store keeps the last N messages of each group (replay on
    # reconnect), so each broadcast is also numbered and kept in Redis.
    history = int(os.environ.get("BENCH_HISTORY", "0"))
    store = RedisChannelStore(sys.argv[2], history=history) if history else RedisChannelStore(sys.argv[2])
else:
    store = MemoryChannelStore()
held = set()


@with_channel
def echo(ch):
    ch.on_receive(ch.send)


@with_channel
def sub(ch):
    store.add_to_group("all", ch)


@with_channel
def pub(ch):
    ch.on_receive(lambda message: store.broadcast("all", message))


@with_channel
def poll(ch):
    ch.send("hello, world")


@with_channel
def stream(ch):
    ch.send("chunk 1\n", close=False)
    ch.send("chunk 2\n")
    ch.send("chunk 3\n")
    ch.close()


@with_channel
def idle(ch):
    held.add(ch)
    ch.on_close(lambda status: held.discard(ch))


ROUTES = {"/echo": echo, "/sub": sub, "/pub": pub, "/poll": poll, "/stream": stream, "/idle": idle}


def app(environ, start_response):
    route = ROUTES.get(environ.get("PATH_INFO", "/"))
    if route is None:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    return route(environ, start_response)


def tune_gc(spec: str) -> None:
    """BENCH_GC: experiments on where the latency tail comes from, comma-separated:
    `freeze` (gc.freeze() after start-up: the import-time objects leave the collected
    generations), `gen0=N` (first-generation threshold), `off` (no collection)."""
    import gc

    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "freeze":
            gc.collect()
            gc.freeze()
        elif part.startswith("gen0="):
            t = gc.get_threshold()
            gc.set_threshold(int(part[5:]), *t[1:])
        elif part == "off":
            gc.disable()
        else:
            sys.exit(f"BENCH_GC: unknown {part!r}")


def log_gc(path: str) -> None:
    """BENCH_GC_LOG: write each collection's generation and pause (ms) to `path`, one
    line each, so a run's tail can be laid beside its collections."""
    import gc
    import time

    out = open(path, "w", buffering=1)
    start = [0.0]

    def cb(phase, info):
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            out.write(f"{time.time():.6f} {info['generation']} {1000 * (time.perf_counter() - start[0]):.3f} "
                      f"{info['collected']}\n")

    gc.callbacks.append(cb)


if __name__ == "__main__":
    import os

    server = Server(app, host="127.0.0.1", port=int(sys.argv[1]), compression=None).start()
    if os.environ.get("BENCH_GC_LOG"):
        log_gc(os.environ["BENCH_GC_LOG"])
    tune_gc(os.environ.get("BENCH_GC", ""))
    print(f"READY {server.port}" + (f" note={NOTE}" if NOTE else ""), flush=True)
    server.serve_forever()
