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
  /sse     an SSE stream: one event, then the handler keeps it open (idle SSE stream)
"""

import sys

if len(sys.argv) > 2:
    # redis-py uses blocking sockets; RedisChannelStore needs them patched.
    from gevent import monkey

    monkey.patch_all()

from greenchan import Event, Server, with_channel  # noqa: E402

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


@with_channel
def sse(ch):
    ch.send(Event("open"))
    held.add(ch)
    ch.on_close(lambda status: held.discard(ch))


ROUTES = {"/echo": echo, "/sub": sub, "/pub": pub, "/poll": poll, "/stream": stream, "/idle": idle,
          "/sse": sse}


def app(environ, start_response):
    route = ROUTES.get(environ.get("PATH_INFO", "/"))
    if route is None:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    return route(environ, start_response)


def census(gc, path: str) -> None:
    """BENCH_GC=census=PATH: an experiment on what makes the collector run. No
    automatic collection; every 2 s a collection with DEBUG_SAVEALL writes to PATH how
    many objects had been allocated and were still tracked (gen0 count) and the types
    of the cyclic garbage it found: garbage in cycles is what only the collector frees."""
    import collections

    import gevent

    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    out = open(path, "w", buffering=1)

    def loop():
        while True:
            gevent.sleep(2)
            young = gc.get_count()[0]
            alive = collections.Counter(type(o).__name__ for o in gc.get_objects(0))
            gc.collect()
            kinds = collections.Counter(type(o).__name__ for o in gc.garbage)
            out.write(f"young {young} in gen0 {sum(alive.values())} {alive.most_common(8)}; "
                      f"garbage {len(gc.garbage)} {kinds.most_common(8)}\n")
            # Free the garbage for real (SAVEALL would find and keep it again).
            gc.set_debug(0)
            gc.garbage.clear()
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)

    gevent.spawn(loop)


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
        elif part.startswith("census="):
            census(gc, part[7:])
        else:
            sys.exit(f"BENCH_GC: unknown {part!r}")


def patch_deliver() -> None:
    """BENCH_PATCH=deliver: an experiment, the broadcast loops of greenchan's stores
    iterating `zip(list(members), list(members.values()))` instead of
    `list(members.items())`.

    The items list holds a (channel, attachment) tuple per member for the whole loop:
    thousands of tracked objects, so the young collections during the loop promote
    them, and the collector counts them towards its next full collection (of every
    object of every connection) though they die at the end of the loop. zip reuses
    its one result tuple once the loop has unpacked it: two lists, nothing per member.
    """
    import inspect
    import textwrap

    from greenchan.stores import groups as module

    for name in ("_deliver", "_deliver_tagged"):
        fn = getattr(module._Groups, name, None)
        if fn is None:
            continue
        src = textwrap.dedent(inspect.getsource(fn))
        if "zip(list(members), list(members.values()))" in src:
            continue   # the change has landed: nothing to apply
        assert "list(members.items())" in src, f"_Groups.{name} changed: the experiment is stale"
        src = src.replace("list(members.items())", "zip(list(members), list(members.values()))")
        scope: dict = {}
        exec(compile(src, module.__file__, "exec"), module.__dict__, scope)
        setattr(module._Groups, name, scope[name])


def patch_park() -> None:
    """BENCH_PATCH=park: an experiment, Channel._dispatch without the line that marks
    the channel not recent each time its dispatcher parks.

    The idle sweep (every second) releases the dispatcher of a parked channel that is
    not recent; the dispatcher clears the mark each time it parks, after every message,
    so the sweep releases the dispatcher of nearly every busy channel every second and
    the next message spawns a new greenlet (with gevent's spawn-tree frames): objects
    that live for up to a second, get promoted, and bring on full collections.
    """
    import inspect
    import textwrap

    from greenchan import channel as module

    src = textwrap.dedent(inspect.getsource(module.Channel._dispatch))
    line = "                self._recent = False\n"
    if line.replace(" " * 4, "", 1) not in src and "self._parked = waiter = Waiter()" in src:
        return   # the change has landed: nothing to apply
    src = src.replace(line.replace(" " * 4, "", 1), "")
    scope: dict = {}
    exec(compile(src, module.__file__, "exec"), module.__dict__, scope)
    module.Channel._dispatch = scope["_dispatch"]


def patch_write() -> None:
    """BENCH_PATCH=write: an experiment, Connection.write making one plain `send` of
    `data` when nothing is queued, and building the list of memoryviews only for what
    the kernel did not take (it builds one for every write, though nearly every write
    goes out whole)."""
    import inspect
    import textwrap

    from greenchan import connection as module

    src = textwrap.dedent(inspect.getsource(module.Connection.write))
    if "sendmsg((data, tail))" in src:
        return   # the change has landed: nothing to apply
    old = """\
    parts = [memoryview(data)] if tail is None else [memoryview(data), memoryview(tail)]
    out = self._out
    if not out:
        try:
            sent = self._raw.send(data) if tail is None else self._raw.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return False
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if not parts:
            return True
        parts[0] = parts[0][sent:]
        if out is None:
            out = self._out = collections.deque()
"""
    new = """\
    out = self._out
    if not out:
        try:
            sent = self._raw.send(data) if tail is None else self._raw.sendmsg((data, tail))
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return False
        if tail is None:
            if sent == len(data):
                return True
            parts = [memoryview(data)[sent:]]
        elif sent >= len(data):
            sent -= len(data)
            if sent == len(tail):
                return True
            parts = [memoryview(tail)[sent:]]
        else:
            parts = [memoryview(data)[sent:], memoryview(tail)]
        if out is None:
            out = self._out = collections.deque()
    else:
        parts = [memoryview(data)] if tail is None else [memoryview(data), memoryview(tail)]
"""
    assert old in src, "Connection.write changed: the experiment is stale"
    scope: dict = {}
    exec(compile(src.replace(old, new), module.__file__, "exec"), module.__dict__, scope)
    module.Connection.write = scope["write"]


def log_gc(path: str) -> None:
    """BENCH_GC_LOG: write each collection's time, generation, CPU ms, objects collected
    and (for a full collection) objects tracked after it to `path`, one line each, so
    a run's tail can be laid beside its collections."""
    import gc
    import time

    out = open(path, "w", buffering=1)
    start = [0.0]

    def cb(phase, info):
        # CPU time, not wall-clock: what the collection costs, whatever else the
        # machine runs meanwhile.
        if phase == "start":
            start[0] = time.thread_time()
        else:
            ms = 1000 * (time.thread_time() - start[0])
            n = len(gc.get_objects()) if info["generation"] == 2 else 0
            out.write(f"{time.time():.6f} {info['generation']} {ms:.3f} {info['collected']} {n}\n")

    gc.callbacks.append(cb)


if __name__ == "__main__":
    import os

    server = Server(app, host="127.0.0.1", port=int(sys.argv[1]), compression=None).start()
    if os.environ.get("BENCH_GC_LOG"):
        log_gc(os.environ["BENCH_GC_LOG"])
    tune_gc(os.environ.get("BENCH_GC", ""))
    for patch in filter(None, os.environ.get("BENCH_PATCH", "").split(",")):
        {"deliver": patch_deliver, "park": patch_park, "write": patch_write}[patch]()
    print(f"READY {server.port}" + (f" note={NOTE}" if NOTE else ""), flush=True)
    server.serve_forever()
