"""Helpers for the deployment tests: free ports, bounded waits, the close log, close codes."""
import os
import socket
import struct
import time

import requests
import websocket

APPS = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=20.0, what="condition"):
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout} s")


def wait_serving(port, proc, timeout=20.0):
    def up():
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {read_output(proc)}")
        try:
            return requests.get(f"http://127.0.0.1:{port}/pid", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_until(up, timeout, "server answering")


def read_output(proc):
    try:
        out, err = proc.communicate(timeout=5)
    except Exception:
        return ""
    return (out or b"").decode(errors="replace") + (err or b"").decode(errors="replace")


def log_lines(path, kind):
    try:
        with open(path) as f:
            return [line.split() for line in f if line.startswith(kind + " ")]
    except FileNotFoundError:
        return []


def wait_opened(path, count, timeout=20.0):
    """Wait until ``count`` handlers have logged ``open`` (the server holds their channels)."""
    return wait_until(lambda: len(log_lines(path, "open")) >= count and log_lines(path, "open"), timeout, f"{count} open channels")


def connect(port, path="/echo"):
    return websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=20)


def close_code(ws):
    """Read until the server's close frame; return its code (None if the TCP connection just ended)."""
    while True:
        try:
            opcode, frame = ws.recv_data_frame(True)
        except websocket.WebSocketConnectionClosedException:
            return None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", frame.data[:2])[0] if len(frame.data) >= 2 else 1005


def kill(proc):
    if proc is not None and proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=10)
        except Exception:
            pass
