"""Sessions across processes (forwarding.py): no sticky routing, the handler runs once."""
import json
import os
import signal
import subprocess
import sys
from urllib.parse import urlencode

import gevent
import pytest
import requests
import websocket

from redis_server import REDIS_SERVER, redis_server  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(not REDIS_SERVER, reason="redis-server is not installed")

APP = r'''
import os, sys
from gevent import monkey; monkey.patch_all()
from greenchan import RedisChannelStore, Server, with_channel

import redis
store = RedisChannelStore(sys.argv[1])
if "+cluster://" in sys.argv[1]:
    log = redis.cluster.RedisCluster.from_url(sys.argv[1].replace("+cluster", ""))
else:
    log = redis.Redis.from_url(sys.argv[1])

@with_channel
def app(channel):
    pid = os.getpid()
    count = [0]
    channel.send(f"welcome from {pid}")
    def on_receive(message):
        count[0] += 1
        channel.send(f"{count[0]}:{message}:{pid}")
    channel.on_receive(on_receive)
    channel.on_close(lambda status: log.rpush("closed", f"{pid}:{status}"))

server = Server(app, port=0, store=store, session_grace=30).start()
print(server.port, flush=True)
server.serve_forever()
'''


@pytest.fixture
def two_processes(tmp_path, redis_server):
    yield from start_two(tmp_path, redis_server.url)


def start_two(tmp_path, url):
    """The app above in two processes on the Redis at ``url``: (ports, processes)."""
    script = tmp_path / "fwd_app.py"
    script.write_text(APP)
    procs = [subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    ports = []
    for proc in procs:
        with gevent.Timeout(20, AssertionError("the app process did not start")):
            ports.append(int(proc.stdout.readline()))
    yield ports, procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def params(cid, transport, **extra):
    out = {"gc_cid": cid, "gc_transport": transport}
    out.update({k: str(v) for k, v in extra.items()})
    return out


def test_requests_of_one_session_on_two_processes(two_processes, redis_server):
    one_session_on_two_processes(*two_processes[0], redis_server.client())


def one_session_on_two_processes(a, b, client):
    """A session started on ``a`` is served from ``b`` too; its handler runs once, on ``a``."""
    cid = os.urandom(16).hex()
    url = lambda port: f"http://127.0.0.1:{port}/"  # noqa: E731
    first = requests.get(url(a), params=params(cid, "longpoll", gc_open=1), timeout=10).json()
    sid = first["hello"]["sid"]
    holder = first["f"][0].rsplit(" ", 1)[1]
    assert first["f"] == [f"welcome from {holder}"]
    # a POST on the other process reaches the same handler, once
    for seq in (1, 1):  # the second is a retry
        answer = requests.post(url(b), params=params(cid, "longpoll", gc_seq=seq, gc_sid=sid), data="x",
                               headers={"Content-Type": "text/plain"}, timeout=10)
        assert answer.status_code == 200 and answer.json()["in"] == 1
    poll = requests.get(url(b), params=params(cid, "longpoll", gc_ack=1, gc_sid=sid), timeout=10).json()
    assert poll["f"] == [f"1:x:{holder}"]
    # a WebSocket on the other process carries the same session both ways
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{b}/?" + urlencode(params(cid, "websocket", gc_ack=2, gc_sid=sid, gc_next=2)), timeout=10)
    hello = json.loads(ws.recv()[1:])["hello"]
    assert hello == {"sid": sid, "new": False, "in": 1}
    ws.send("y")
    assert ws.recv() == f"2:y:{holder}"
    ws.send("\x00" + json.dumps({"ack": 3}))
    ws.close()  # 1000: the client closed the session
    for _ in range(200):  # bounded
        if client.llen("closed"):
            break
        gevent.sleep(0.05)
    assert client.lrange("closed", 0, -1) == [f"{holder}:normal".encode()]


def test_a_dead_holder_means_a_new_session(two_processes):
    (a, b), procs = two_processes
    cid = os.urandom(16).hex()
    first = requests.get(f"http://127.0.0.1:{a}/", params=params(cid, "longpoll", gc_open=1), timeout=10).json()
    holder_pid = int(first["f"][0].rsplit(" ", 1)[1])
    holder = procs[0] if procs[0].pid == holder_pid else procs[1]
    other = b if holder is procs[0] else a
    holder.kill()
    holder.wait(timeout=10)
    again = requests.get(f"http://127.0.0.1:{other}/",
                         params=params(cid, "longpoll", gc_open=1, gc_sid=first["hello"]["sid"]), timeout=15).json()
    assert again["hello"]["new"] is True
    assert again["f"][0] != first["f"][0]
