"""examples/feed.py runs with one command and streams events."""
import os
import signal
import socket
import subprocess
import sys

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_feed_streams_ticks_and_stops_cleanly():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "examples", "feed.py"), "--port", str(port), "--interval", "0.05"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "feed on" in proc.stdout.readline()
        assert "EventSource" in requests.get(f"http://127.0.0.1:{port}/", timeout=5).text
        response = requests.get(f"http://127.0.0.1:{port}/events", stream=True, timeout=5)
        assert response.headers["Content-Type"] == "text/event-stream"
        lines = response.iter_lines(decode_unicode=True)
        seen = [next(lines) for _ in range(6)]
        assert seen[:2] == ["event: hello", "data: connected"]
        assert "event: tick" in seen
        response.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
