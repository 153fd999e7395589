"""greenchan.gunicorn.Worker in real gunicorn processes, with real clients and real signals.

Also the plain gevent worker (``gunicorn -k gevent``), where greenchan falls back
to a WSGI response iterator for HTTP channels and refuses WebSocket upgrades with
a message naming the worker.
"""
import os
import re
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

    def start(*args, worker="greenchan.gunicorn.Worker", env=None, app="deploy_app:app", chdir=APPS):
        port = free_port()
        log = tmp_path / f"channels-{port}.log"
        cmd = [GUNICORN, "-k", worker, "-b", f"127.0.0.1:{port}", "--chdir", str(chdir), *extra, *args, app]
        # deploy_app importable from an application module in another folder too.
        environ = dict(os.environ, DEPLOY_LOG=str(log), PYTHONPATH=APPS, **(env or {}))
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


# gunicorn's error log format: "[2026-01-02 03:04:05 +0000] [pid] [LEVEL] message".
_GUNICORN_LINE = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[(\d+)\] \[([A-Z]+)\] (.*)")

# Applications that configure logging themselves when gunicorn imports them.
_APPS = {
    # logging.basicConfig() in the app: a root handler that must not print
    # greenchan's records a second time.
    "basic_config": "import logging\nlogging.basicConfig(level=logging.INFO)\nfrom deploy_app import app\n",
    # The app gives the greenchan logger a handler of its own: that one wins.
    "own_handler": (
        "import logging, os\n"
        "handler = logging.FileHandler(os.environ['OWN_LOG'])\n"
        "handler.setFormatter(logging.Formatter('own %(levelname)s %(message)s'))\n"
        "logging.getLogger('greenchan').addHandler(handler)\n"
        "logging.getLogger('greenchan').setLevel(logging.INFO)\n"
        "from deploy_app import app\n"
    ),
}


def _stop_and_read(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    return read_output(proc)


@pytest.mark.parametrize("app", ["deploy_app", "basic_config"])
def test_greenchan_logs_once_in_gunicorns_format(gunicorn, tmp_path, app):
    chdir = APPS
    if app in _APPS:
        (tmp_path / f"{app}.py").write_text(_APPS[app])
        chdir = tmp_path
    proc, port, log = gunicorn("-w", "1", "--log-level", "info", app=f"{app}:app", chdir=chdir)
    pid = requests.get(f"http://127.0.0.1:{port}/pid", timeout=10).text

    output = _stop_and_read(proc)

    # greenchan.server's INFO line when a worker stops: once, as gunicorn writes
    # its own lines (time, pid, level), from the worker's process.
    lines = [line for line in output.splitlines() if "stopping: closing" in line]
    assert len(lines) == 1, output
    match = _GUNICORN_LINE.fullmatch(lines[0])
    assert match, lines[0]
    assert match.group(1) == pid and match.group(2) == "INFO" and match.group(3).startswith(f"worker {pid} ")


def test_greenchan_logs_follow_gunicorns_log_level(gunicorn):
    proc, port, log = gunicorn("-w", "1", "--log-level", "warning")
    output = _stop_and_read(proc)
    assert "stopping: closing" not in output


def test_an_application_that_configures_the_greenchan_logger_keeps_it(gunicorn, tmp_path):
    (tmp_path / "own_handler.py").write_text(_APPS["own_handler"])
    own = tmp_path / "own.log"
    proc, port, log = gunicorn("-w", "1", "--log-level", "info", app="own_handler:app", chdir=tmp_path,
                               env={"OWN_LOG": str(own)})
    output = _stop_and_read(proc)
    assert "stopping: closing" not in output
    assert [line for line in own.read_text().splitlines() if "stopping: closing" in line][0].startswith("own INFO")
