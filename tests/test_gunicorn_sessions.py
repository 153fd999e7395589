"""gunicorn -w 2 with Redis: one session across both workers, and metrics that add up."""
import json
import os
import subprocess
import sys
from urllib.parse import urlencode

import pytest
import requests
import websocket

from redis_server import REDIS_SERVER, redis_server  # noqa: F401  (a fixture)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
from deploy_client import free_port, kill, wait_until  # noqa: E402

pytest.importorskip("prometheus_client")
pytestmark = pytest.mark.skipif(not REDIS_SERVER, reason="redis-server is not installed")
GUNICORN = os.path.join(os.path.dirname(sys.executable), "gunicorn")

APP = r'''
import logging, os
from greenchan import with_channel
from greenchan.metrics import wsgi_app as metrics

access = logging.getLogger("greenchan.access")
handler = logging.FileHandler(os.environ["ACCESS_LOG"])
handler.setFormatter(logging.Formatter("%(process)d %(message)s"))
access.addHandler(handler)

@with_channel
def room(channel):
    count = [0]
    channel.send(f"welcome {os.getpid()}")
    def on_receive(message):
        count[0] += 1
        channel.send(f"{count[0]}:{message}")
    channel.on_receive(on_receive)

def app(environ, start_response):
    if environ["PATH_INFO"] == "/metrics":
        return metrics(environ, start_response)
    if environ["PATH_INFO"] == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    return room(environ, start_response)
'''


@pytest.fixture
def workers(tmp_path, redis_server):
    (tmp_path / "sess_app.py").write_text(APP)
    (tmp_path / "prom").mkdir()
    port = free_port()
    env = dict(os.environ, GREENCHAN_REDIS_URL=redis_server.url, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"),
               ACCESS_LOG=str(tmp_path / "access.log"))
    proc = subprocess.Popen([GUNICORN, "-k", "greenchan.gunicorn.Worker", "-w", "2", "-b", f"127.0.0.1:{port}",
                             "--chdir", str(tmp_path), "sess_app:app"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def pids():
        try:
            return {requests.get(f"http://127.0.0.1:{port}/pid", headers={"Connection": "close"}, timeout=2).text
                    for _ in range(20)}
        except requests.RequestException:
            return set()

    wait_until(lambda: len(pids()) == 2, timeout=30, what="both workers answering")
    yield port, tmp_path / "access.log"
    kill(proc)


def _get(port, **params):
    return requests.get(f"http://127.0.0.1:{port}/", params=params, headers={"Connection": "close"}, timeout=15)


def test_one_session_across_two_workers(workers):
    port, access_log = workers
    cid = os.urandom(16).hex()
    base = {"gc_cid": cid, "gc_transport": "longpoll"}
    first = _get(port, gc_open=1, **base).json()
    sid = first["hello"]["sid"]
    assert first["f"][0].startswith("welcome ")
    received = 1
    for seq in range(1, 21):  # a new connection each time: the kernel picks the worker
        answer = requests.post(f"http://127.0.0.1:{port}/", params=dict(base, gc_seq=seq, gc_sid=sid),
                               data=f"m{seq}", headers={"Content-Type": "text/plain", "Connection": "close"}, timeout=15)
        assert answer.json()["in"] == seq
        poll = _get(port, gc_ack=received, gc_sid=sid, **base).json()
        assert poll["f"] == [f"{seq}:m{seq}"]  # the same handler counted every message, once
        received += 1
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/?" + urlencode(
        dict(base, gc_transport="websocket", gc_sid=sid, gc_ack=received, gc_next=21)), timeout=15)
    assert json.loads(ws.recv()[1:])["hello"] == {"sid": sid, "new": False, "in": 20}
    ws.send("last")
    assert ws.recv() == "21:last"
    ws.close()
    served_by = {line.split()[0] for line in open(access_log) if "transport=" in line}
    assert len(served_by) == 2, "every request landed on one worker; the test proves nothing"


def test_metrics_add_up_across_workers(workers):
    port, _ = workers
    for _ in range(10):
        assert _get(port).text.startswith("welcome ")  # a plain long-poll each
    from prometheus_client.parser import text_string_to_metric_families

    def opened():
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "greenchan_channels_opened_total" and sample.labels == {"transport": "longpoll"}:
                    return sample.value
        return 0

    # every worker writes its figures once a second; the scrape sums them
    wait_until(lambda: opened() >= 10, timeout=20, what="both workers' long-polls in the sum")
