"""Sessions: the latency a forwarded request adds, and the memory of a detached session.

    python bench/sessions.py            # needs redis-server on PATH (a private one is started)

Forwarding: two greenchan processes share a private redis-server; a session is
held by process A; a client POSTs numbered messages to A (local) and to B
(forwarded to A over Redis and answered back), one at a time, and times each
round trip. Memory: in this process, N greenchan.js sessions open with one
long-poll each and are left detached; RSS before and after, divided by N.
"""
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import requests  # noqa: E402

APP = r'''
import sys
from gevent import monkey; monkey.patch_all()
from greenchan import RedisChannelStore, Server, with_channel

@with_channel
def app(channel):
    channel.on_receive(lambda message: None)

server = Server(app, port=0, store=RedisChannelStore(sys.argv[1])).start()
print(server.port, flush=True)
server.serve_forever()
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def forwarding(rounds=300):
    port = free_port()
    redis = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    url = f"redis://127.0.0.1:{port}/0"
    script = os.path.join(tempfile.mkdtemp(), "app.py")
    with open(script, "w") as f:
        f.write(APP)
    procs = [subprocess.Popen([sys.executable, script, url], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        a, b = (int(p.stdout.readline()) for p in procs)
        session = requests.Session()
        cid = os.urandom(16).hex()
        params = {"gc_cid": cid, "gc_transport": "longpoll"}
        sid = session.get(f"http://127.0.0.1:{a}/", params=dict(params, gc_open=1), timeout=10).json()["hello"]["sid"]
        times = {a: [], b: []}
        seq = 0
        for i in range(rounds * 2):
            port_ = a if i % 2 == 0 else b
            seq += 1
            started = time.perf_counter()
            r = session.post(f"http://127.0.0.1:{port_}/", params=dict(params, gc_seq=seq, gc_sid=sid), data="x",
                             headers={"Content-Type": "text/plain"}, timeout=10)
            times[port_].append(time.perf_counter() - started)
            assert r.json()["in"] == seq
        local, forwarded = statistics.median(times[a]) * 1000, statistics.median(times[b]) * 1000
        p99 = sorted(times[b])[int(len(times[b]) * 0.99)] * 1000
        print(f"POST round trip, median of {rounds}: local {local:.2f} ms, forwarded {forwarded:.2f} ms "
              f"(+{forwarded - local:.2f} ms; forwarded p99 {p99:.2f} ms)")
    finally:
        for p in procs:
            p.kill()
        redis.kill()


def memory(count=2000):
    from greenchan import Server, with_channel

    @with_channel
    def app(channel):
        channel.send("welcome")

    server = Server(app, port=0, session_grace=600).start()
    session = requests.Session()
    for i in range(50):  # warm up
        session.get(f"http://127.0.0.1:{server.port}/", params={"gc_cid": os.urandom(16).hex(), "gc_open": 1}, timeout=10)
    before = rss_kib()
    for i in range(count):
        session.get(f"http://127.0.0.1:{server.port}/", params={"gc_cid": os.urandom(16).hex(), "gc_open": 1}, timeout=10)
    after = rss_kib()
    detached = sum(1 for s in server.sessions.values() if s.state == "detached")
    print(f"memory per detached session: {(after - before) / count:.1f} KiB ({detached} detached, RSS {before} -> {after} KiB)")
    server.stop(timeout=1)


if __name__ == "__main__":
    forwarding()
    memory()
