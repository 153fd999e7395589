"""greenchan.gunicorn.Worker in real gunicorn processes, with real clients and real signals.

Also the plain gevent worker (``gunicorn -k gevent``), where greenchan falls back
to a WSGI response iterator for HTTP channels and refuses WebSocket upgrades with
a message naming the worker.
"""
import os
import signal
import subprocess
import sys

import gevent
import pytest
import requests

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
from deploy_client import (  # noqa: E402
    APPS, close_code, connect, free_port, kill, log_lines, read_output, wait_opened, wait_serving, wait_until,
)

GUNICORN = os.path.join(os.path.dirname(sys.executable), "gunicorn")


def _control_socket_flag():
    out = subprocess.run([GUNICORN, "--help"], capture_output=True, text=True, timeout=30).stdout
    return ["--no-control-socket"] if "--no-control-socket" in out else []


@pytest.fixture
def gunicorn(tmp_path):
    """``gunicorn(*args, worker=..., env=...)`` starts gunicorn on a free port; killed at teardown."""
    procs = []
    extra = _control_socket_flag()

    def start(*args, worker="greenchan.gunicorn.Worker", env=None):
        port = free_port()
        log = tmp_path / f"channels-{port}.log"
        cmd = [GUNICORN, "-k", worker, "-b", f"127.0.0.1:{port}", "--chdir", APPS, *extra, *args, "deploy_app:app"]
        environ = dict(os.environ, DEPLOY_LOG=str(log), **(env or {}))
        proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        wait_serving(port, proc)
        workers = int(args[args.index("-w") + 1]) if "-w" in args else 1
        wait_until(lambda: len(log_lines(str(log), "ready")) >= workers, what="every worker booted")
        return proc, port, str(log)

    yield start
    for proc in procs:
        kill(proc)


def _long_poll(port, path="/echo"):
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_closes_every_channel(gunicorn, sig):
    proc, port, log = gunicorn("-w", "2", "--graceful-timeout", "20")
    sockets = [connect(port) for _ in range(4)]
    for i, ws in enumerate(sockets):
        ws.send(f"m{i}")
        assert ws.recv() == f"m{i}"
    polls = [gevent.spawn(_long_poll, port) for _ in range(2)]
    stream = requests.get(f"http://127.0.0.1:{port}/stream", stream=True, timeout=30)
    chunks = stream.iter_content(None)
    assert next(chunks) == b"first\n"
    wait_opened(log, 7)

    proc.send_signal(sig)

    codes = [close_code(ws) for ws in sockets]
    assert codes == [1001] * 4
    for poll in polls:
        assert poll.get(timeout=30).status_code == 204
    assert b"".join(chunks) == b""  # the stream ended properly (a clean chunked end)
    assert proc.wait(timeout=30) == 0, read_output(proc)
    closes = log_lines(log, "close")
    assert len(closes) == len(log_lines(log, "open")) + 1  # + the /pid probe
    ws_closes = [c for c in closes if c[1] == "/echo" and c[3] == "1001"]
    assert len(ws_closes) == 4
    assert all(c[2] == "server-close" for c in closes)


def test_two_workers_serve(gunicorn):
    proc, port, log = gunicorn("-w", "2")
    ws = connect(port)
    ws.send_binary(b"\x00binary")
    assert ws.recv() == b"\x00binary"
    ws.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    err = read_output(proc)
    assert err.count("Booting worker") == 2


def test_max_requests_restart_closes_with_1001(gunicorn):
    proc, port, log = gunicorn("-w", "1", "--max-requests", "3")
    # wait_serving used request 1; the WebSocket is request 2; request 3 trips the restart.
    ws = connect(port)
    ws.send("hi")
    assert ws.recv() == "hi"
    first = requests.get(f"http://127.0.0.1:{port}/pid", timeout=10).text
    assert close_code(ws) == 1001
    wait_until(lambda: any(c[1] == "/echo" and c[3] == "1001" for c in log_lines(log, "close")), what="on_close ran")
    # A new worker takes over.
    wait_until(lambda: _pid_or_none(port) not in (None, first), what="a new worker")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def _pid_or_none(port):
    try:
        return requests.get(f"http://127.0.0.1:{port}/pid", timeout=5).text
    except requests.RequestException:
        return None


def test_options_from_environment(gunicorn):
    proc, port, log = gunicorn("-w", "1", env={"GREENCHAN_MAX_BODY": "10", "GREENCHAN_ORIGINS": "https://good.example"})
    assert requests.post(f"http://127.0.0.1:{port}/echo", data="x" * 11, timeout=10).status_code == 413
    assert requests.post(f"http://127.0.0.1:{port}/echo", data="x" * 10, timeout=10).text == "x" * 10
    import websocket

    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"ws://127.0.0.1:{port}/echo", origin="https://evil.example", timeout=10)
    assert info.value.status_code == 403
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/echo", origin="https://good.example", timeout=10)
    ws.send("ok")
    assert ws.recv() == "ok"
    ws.close()


def test_plain_gevent_worker_long_poll_and_refused_upgrade(gunicorn):
    proc, port, log = gunicorn("-w", "1", worker="gevent")
    assert requests.post(f"http://127.0.0.1:{port}/echo", data="polled", timeout=10).text == "polled"
    stream = requests.get(f"http://127.0.0.1:{port}/stream", stream=True, timeout=10)
    assert next(stream.iter_content(None)) == b"first\n"
    stream.close()
    wait_until(lambda: any(c[1] == "/stream" and c[2] == "client-close" for c in log_lines(log, "close")), what="client-close")
    import websocket

    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        connect(port)
    assert info.value.status_code == 500
    assert b"greenchan.gunicorn.Worker" in info.value.resp_body
