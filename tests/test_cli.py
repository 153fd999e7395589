"""The command line, as a real process: ``greenchan MODULE:APP`` and ``python -m greenchan``."""
import os
import signal
import subprocess
import sys

import gevent
import pytest
import requests

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "apps"))
from deploy_client import (  # noqa: E402
    APPS, close_code, connect, free_port, kill, log_lines, read_output, wait_opened, wait_serving,
)

SCRIPT = os.path.join(os.path.dirname(sys.executable), "greenchan")
COMMANDS = {"script": [SCRIPT], "module": [sys.executable, "-m", "greenchan"]}


def run(*args, command="script"):
    return subprocess.run([*COMMANDS[command], *args], cwd=APPS, capture_output=True, text=True, timeout=60)


@pytest.fixture
def cli(tmp_path):
    procs = []

    def start(*args, command="script", env=None):
        port = free_port()
        log = str(tmp_path / f"channels-{port}.log")
        environ = dict(os.environ, DEPLOY_LOG=log, **(env or {}))
        proc = subprocess.Popen([*COMMANDS[command], *args, "--port", str(port)], cwd=APPS, env=environ,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        wait_serving(port, proc)
        return proc, port, log

    yield start
    for proc in procs:
        kill(proc)


@pytest.mark.parametrize("command", ["script", "module"])
def test_help(command):
    result = run("--help", command=command)
    assert result.returncode == 0
    for text in ("MODULE:APP", "--ping-interval", "--origins", "examples:", "GREENCHAN_", "greenchan.gunicorn.Worker"):
        assert text in result.stdout


@pytest.mark.parametrize("spec, message", [
    ("no_such_module:app", "no module named 'no_such_module'"),
    ("deploy_app:nope", "module 'deploy_app' has no attribute 'nope'"),
    ("deploy_app:not_callable", "not a WSGI application"),
    (":app", "names no module"),
])
def test_bad_app_is_one_line_exit_2(spec, message):
    result = run(spec)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("greenchan: error:") and message in lines[0], result.stderr


@pytest.mark.parametrize("flag", [["--ping-interval", "soon"], ["--max-body", "12 parsecs"], ["--compression", "zip"]])
def test_bad_option_is_one_line_exit_2(flag):
    result = run("deploy_app", *flag)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sig, command", [(signal.SIGTERM, "script"), (signal.SIGINT, "module")])
def test_signal_stops_gracefully(cli, sig, command):
    proc, port, log = cli("deploy_app:app", command=command)
    sockets = [connect(port) for _ in range(3)]
    for ws in sockets:
        ws.send("ping?")
        assert ws.recv() == "ping?"
    poll = gevent.spawn(requests.get, f"http://127.0.0.1:{port}/echo", timeout=30)
    wait_opened(log, 4)

    proc.send_signal(sig)

    assert [close_code(ws) for ws in sockets] == [1001] * 3
    assert poll.get(timeout=30).status_code == 204
    assert proc.wait(timeout=30) == 0, read_output(proc)
    closes = log_lines(log, "close")
    assert sum(1 for c in closes if c[1] == "/echo" and c[3] == "1001") == 3
    assert len(closes) == 5  # 3 WebSockets, the long-poll, the /pid probe


def test_module_alone_means_app_and_flags_apply(cli):
    proc, port, log = cli("deploy_app", "--max-body", "1KiB", "--origins", "https://a.example,https://b.example")
    assert requests.post(f"http://127.0.0.1:{port}/echo", data="x" * 1025, timeout=10).status_code == 413
    assert requests.post(f"http://127.0.0.1:{port}/echo", data="x" * 1024, timeout=10).status_code == 200
    import websocket

    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/echo", origin="https://b.example", timeout=10)
    ws.close()
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(f"ws://127.0.0.1:{port}/echo", origin="https://c.example", timeout=10)


def test_environment_sets_options_flags_win(cli):
    proc, port, log = cli("deploy_app:application", "--max-body", "20", env={"GREENCHAN_MAX_BODY": "5"})
    assert requests.post(f"http://127.0.0.1:{port}/echo", data="x" * 20, timeout=10).status_code == 200
    assert requests.post(f"http://127.0.0.1:{port}/echo", data="x" * 21, timeout=10).status_code == 413


def test_every_server_option_has_a_flag():
    from greenchan.options import Options
    import dataclasses

    result = run("--help", command="module")
    for field in dataclasses.fields(Options):
        flag = "--redis-url" if field.name == "store" else "--" + field.name.replace("_", "-")
        assert flag in result.stdout, field.name


def test_header_limit_flag_applies(cli):
    proc, port, log = cli("deploy_app", "--max-header-size", "2KiB", "--handshake-timeout", "5")
    response = requests.get(f"http://127.0.0.1:{port}/pid", headers={"X-Big": "x" * 3000}, timeout=10)
    assert response.status_code == 431
    assert requests.get(f"http://127.0.0.1:{port}/pid", timeout=10).status_code == 200


def _expected_default(value):
    """An option's default as the help should show it, computed here from Options itself."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size and value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def test_help_shows_every_default_from_options():
    from greenchan.options import Options
    import dataclasses
    import re

    text = run("--help", command="module").stdout
    # One block per flag: from "--flag" at the start of a help line to the next flag.
    blocks = dict(re.findall(r"^  (--[a-z-]+)(.*?)(?=^  --|^\S|\Z)", text, re.S | re.M))
    assert "defaults as in the API" not in text
    for field in dataclasses.fields(Options):
        if field.name == "store":  # an object: given as --redis-url
            assert "(default: none)" in " ".join(blocks["--redis-url"].split())
            continue
        flag = "--" + field.name.replace("_", "-")
        help = " ".join(blocks[flag].split())
        assert f"(default: {_expected_default(field.default)})" in help, (flag, help)
        # The description is the field's #: comment in options.py, not a copy.
        assert len(help) > len("(default: x)") + 20, (flag, help)
    assert "1009" in " ".join(blocks["--max-message-size"].split())


def test_describe_options_reads_the_field_comments():
    from greenchan.__main__ import describe_options
    from greenchan.options import Options
    import dataclasses
    import inspect

    source = inspect.getsource(Options)
    docs = {d.name: d for d in describe_options()}
    assert list(docs) == [f.name for f in dataclasses.fields(Options) if f.name != "store"]  # store: --redis-url
    for name, doc in docs.items():
        assert doc.description, name
        # Each description is text of options.py's comments (markup removed).
        first_words = " ".join(doc.description.split()[:3])
        assert first_words in " ".join(source.replace("#:", "").replace("``", "").split()), name
        assert doc.env == "GREENCHAN_" + name.upper() and doc.flag == "--" + name.replace("_", "-")
    assert docs["ping_timeout"].description == docs["ping_interval"].description
