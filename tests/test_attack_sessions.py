"""Attacks on sessions over the wire (docs/sessions.md), as an outside tester.

The defects found (each fixed, each test failed before) come first; the others guard behaviour that held up.
"""
import json
import os
import socket
from typing import Any, Dict, List
from urllib.parse import urlencode

import gevent
import pytest
import requests
import websocket

from conftest import wait_for
from greenchan import CloseStatus, with_channel


def cid() -> str:
    return os.urandom(16).hex()


class Recorder:
    """Greets once, records starts, messages and closes, echoes with a count."""

    def __init__(self) -> None:
        self.started: List[Any] = []
        self.closed: List[CloseStatus] = []
        self.got: List[Any] = []
        self.channels: List[Any] = []

    def app(self) -> Any:
        @with_channel
        def handler(channel: Any) -> None:
            self.started.append(channel.session)
            self.channels.append(channel)
            channel.send("welcome")

            def on_receive(message: Any) -> None:
                self.got.append(message)
                channel.send(f"{len(self.got)}:{message}")

            channel.on_receive(on_receive)
            channel.on_close(self.closed.append)

        return handler


def base(server: Any) -> str:
    return f"http://127.0.0.1:{server.port}/"


def q(client: str, transport: str, **extra: Any) -> Dict[str, str]:
    params = {"gc_cid": client, "gc_transport": transport}
    params.update({k: str(v) for k, v in extra.items()})
    return params


def ws_url(server: Any, client: str, **extra: Any) -> str:
    return f"ws://127.0.0.1:{server.port}/?" + urlencode(q(client, "websocket", **extra))


def control(frame: str) -> Any:
    assert frame.startswith("\x00") and not frame.startswith("\x00\x00"), frame
    return json.loads(frame[1:])


def open_poll(server: Any, client: str, **headers: str) -> Dict[str, Any]:
    answer = requests.get(base(server), params=q(client, "longpoll", gc_open=1), headers=headers, timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()


def raw_poll_and_close(server: Any, client: str) -> bytes:
    """One long-poll on its own connection, read to EOF: the connection is gone
    when this returns, so only the detached session can still hold a slot."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"GET /?gc_cid={client}&gc_transport=longpoll&gc_open=1 HTTP/1.1\r\n"
                     "Host: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        for _ in range(100):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


# ---------------------------------------------------------------- defects


@pytest.mark.parametrize("transport", ["longpoll", "websocket"])
def test_unacknowledged_empty_frames_are_bounded(serve, transport):
    """A detached session (or a WebSocket client that reads but never acks) keeps
    every frame until acknowledged. Counting only payload bytes, 20 000 empty
    messages cost 0 of a 10 kB send_buffer: measured 300 000 of them held ~21 MB.
    Each frame should count at least some bytes, so the session ends as slow."""
    rec = Recorder()
    server = serve(rec.app(), send_buffer=10_000, session_grace=30)
    client = cid()
    if transport == "longpoll":
        open_poll(server, client)
    else:
        ws = websocket.create_connection(ws_url(server, client), timeout=5)
        control(ws.recv())
        gevent.spawn(lambda: [ws.recv() for _ in range(30_000)])  # reads, never acks
    channel = rec.channels[0]
    accepted = 0
    for i in range(20_000):
        if not channel.send(""):
            break
        accepted += 1
        if i % 500 == 0:
            gevent.sleep(0)
    assert accepted < 20_000
    wait_for(lambda: rec.closed)
    assert rec.closed == [CloseStatus.SLOW_CONSUMER]


def test_max_connections_slots_hold_that_many_detached_sessions(serve):
    """docs/sessions.md: a detached session holds one slot of max_connections. With
    3 slots and no connection open, 3 detached sessions fit; observed: the third is
    closed (GOING_AWAY) at once although its client got 200 and new: true."""
    rec = Recorder()
    server = serve(rec.app(), max_connections=3, session_grace=30)
    for _ in range(3):
        assert raw_poll_and_close(server, cid()).startswith(b"HTTP/1.1 200 ")
        gevent.sleep(0.1)  # let the session detach
    assert len(rec.started) == 3
    assert rec.closed == []


def test_new_session_over_max_connections_gets_503_before_the_handler(serve):
    """README: over max_connections the client sees 503 with Retry-After and the
    handler is not called. Fill the slots with detached sessions, then open one
    more: it runs the handler and is dropped as it detaches (logging 'answering
    503' while the client got 200); its greenchan.js client polls again, which
    starts yet another session: the handler runs once per poll."""
    rec = Recorder()
    server = serve(rec.app(), max_connections=2, session_grace=30)
    for _ in range(4):  # as many as fit (bounded)
        raw_poll_and_close(server, cid())
        gevent.sleep(0.1)
    held = len(server.sessions)
    assert 1 <= held <= 2
    started = len(rec.started)
    answer = raw_poll_and_close(server, cid())
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert b"Retry-After: 1" in answer
    assert len(rec.started) == started


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
def test_origin_pin_covers_browser_gets_without_origin(serve, site):
    """A page of another site (or a sibling subdomain) holding a stolen gc_cid
    cannot send a fetch/EventSource without Origin, but an <img>/<script> GET has
    none and says Sec-Fetch-Site. Such a request is certainly not from the pinned
    page (greenchan.js always sends Origin cross-origin), yet it is served: it
    becomes the carrier and ends the owner's waiting poll. Expected: 403."""
    rec = Recorder()
    server = serve(rec.app(), origins=["*"], session_grace=30)
    client = cid()
    owner = {"Origin": "https://app.example"}
    sid = open_poll(server, client, **owner)["hello"]["sid"]
    waiting: List[Any] = []
    poll = gevent.spawn(lambda: waiting.append(requests.get(
        base(server), params=q(client, "longpoll", gc_sid=sid, gc_ack=1), headers=owner, timeout=5)))
    wait_for(lambda: server.sessions[client]._carrier is not None)
    thief = requests.get(base(server), params=q(client, "longpoll", gc_open=1),
                         headers={"Sec-Fetch-Site": site}, timeout=5)
    assert thief.status_code == 403
    rec.channels[0].send("for the owner")
    poll.join(5)
    assert waiting[0].json()["f"] == ["for the owner"]


def rejected_origin() -> float:
    """greenchan_rejected_total{reason="origin"} as a scrape shows it (process-wide: compare deltas)."""
    import re

    from greenchan.metrics import wsgi_app

    status: List[str] = []
    text = b"".join(wsgi_app({"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": "",
                              "SERVER_NAME": "x", "SERVER_PORT": "80", "wsgi.url_scheme": "http"},
                             lambda s, h, e=None: status.append(s))).decode()
    found = re.search(r'greenchan_rejected_total\{reason="origin"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_origin_pin_refusals_are_counted(serve):
    pytest.importorskip("prometheus_client")
    rec = Recorder()
    server = serve(rec.app(), origins=["*"])
    client = cid()
    open_poll(server, client, Origin="https://app.example")
    before = rejected_origin()
    thief = requests.get(base(server), params=q(client, "longpoll", gc_open=1),
                         headers={"Origin": "https://evil.example"}, timeout=5)
    assert thief.status_code == 403
    assert rejected_origin() == before + 1


# ------------------------------------------------- guards (held up under attack)


@pytest.mark.parametrize("bogus", ['{"ack": -1}', '{"ack": 1e30}', '{"ack": "x"}', "not json", "", "[1]",
                                   '{"ack": 99999}', '{"ack": true}'])
def test_forged_websocket_control_frames_are_harmless(serve, bogus):
    rec = Recorder()
    server = serve(rec.app(), session_grace=30)
    client = cid()
    ws = websocket.create_connection(ws_url(server, client), timeout=5)
    sid = control(ws.recv())["hello"]["sid"]
    assert ws.recv() == "welcome"
    ws.send("\x00" + bogus)
    ws.send("m")
    assert ws.recv() == "1:m"
    ws.sock.close()
    wait_for(lambda: server.sessions[client]._carrier is None)
    rec.channels[0].send("while away")
    # the client acknowledged only "welcome": everything after it comes again, once
    ws = websocket.create_connection(ws_url(server, client, gc_sid=sid, gc_ack=1, gc_next=2), timeout=5)
    assert control(ws.recv())["hello"] == {"sid": sid, "new": False, "in": 1}
    assert [ws.recv(), ws.recv()] == ["1:m", "while away"]
    ws.close()
    wait_for(lambda: rec.closed)
    assert rec.started == [client] and rec.closed == [CloseStatus.NORMAL] and rec.got == ["m"]


def test_forged_acks_on_polls_are_clamped(serve):
    rec = Recorder()
    server = serve(rec.app())
    client = cid()
    sid = open_poll(server, client)["hello"]["sid"]
    for ack in ("-1", "abc", "1e30"):  # ignored: "welcome" comes again
        poll = requests.get(base(server), params=q(client, "longpoll", gc_sid=sid, gc_ack=ack, gc_open=1), timeout=5)
        assert poll.json()["f"] == ["welcome"]
    poll = requests.get(base(server), params=q(client, "longpoll", gc_sid=sid, gc_ack=10**30, gc_open=1), timeout=5)
    assert (poll.json()["from"], poll.json()["f"]) == (1, [])  # beyond what was sent: everything
    rec.channels[0].send("next")
    poll = requests.get(base(server), params=q(client, "longpoll", gc_sid=sid, gc_ack=1, gc_open=1), timeout=5)
    assert (poll.json()["from"], poll.json()["f"]) == (1, ["next"])


def test_forged_post_numbers_deliver_nothing_twice(serve):
    rec = Recorder()
    server = serve(rec.app())
    client = cid()
    sid = open_poll(server, client)["hello"]["sid"]
    text = {"Content-Type": "text/plain"}

    def post(seq: Any, body: str) -> Any:
        return requests.post(base(server), params=q(client, "longpoll", gc_seq=seq, gc_sid=sid),
                             data=body, headers=text, timeout=5)

    for seq in ("0", "-1", "abc", ""):
        assert post(seq, "junk").json()["in"] == 0
    assert post(2, "skips").status_code == 409
    assert post(10**30, "far").status_code == 409
    assert post(1, "one").json()["in"] == 1
    assert post(1, "one again").json()["in"] == 1
    # a repeated parameter: one value is used, the message is delivered once
    repeated = requests.post(base(server) + f"?gc_cid={client}&gc_transport=longpoll&gc_sid={sid}&gc_seq=2&gc_seq=2",
                             data="two", headers=text, timeout=5)
    assert repeated.json()["in"] == 2
    assert rec.got == ["one", "two"] and rec.started == [client]


def test_racing_first_requests_of_one_client_run_the_handler_once(serve):
    started: List[Any] = []

    @with_channel
    def slow(channel: Any) -> None:
        started.append(channel.session)
        gevent.sleep(0.2)  # a database lookup before the handler returns
        channel.send("welcome")

    server = serve(slow)
    client = cid()

    def one(i: int) -> Any:
        if i % 3 == 0:
            return requests.get(base(server), params=q(client, "longpoll", gc_open=1), timeout=5).status_code
        if i % 3 == 1:
            return requests.post(base(server), params=q(client, "longpoll", gc_seq=1), data="m",
                                 headers={"Content-Type": "text/plain"}, timeout=5).status_code
        ws = websocket.create_connection(ws_url(server, client), timeout=5)
        hello = control(ws.recv())["hello"]
        ws.sock.close()
        return 200 if hello else 0

    jobs = [gevent.spawn(one, i) for i in range(9)]
    gevent.joinall(jobs, timeout=10)
    assert [job.value for job in jobs] == [200] * 9
    assert started == [client]


@pytest.mark.parametrize("host,origin", [
    ("app.example", "null"), ("app.example.", "http://app.example"), ("app.example", "http://app.example."),
    ("app.example", "http://app.example.evil.example"), ("app.example", "http://evil@app.example"),
    ("app.example:8080", "http://app.example"), ("app.example", "http://app.example,http://evil.example"),
])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_lookalike_origins_are_refused(serve, host, origin, method):
    rec = Recorder()
    server = serve(rec.app())
    answer = requests.request(method, base(server), params=q(cid(), "longpoll", gc_open=1, gc_seq=1), data="x",
                              headers={"Host": host, "Origin": origin, "Content-Type": "text/plain"}, timeout=5)
    assert answer.status_code == 403
    assert rec.started == []


def test_slow_post_body_does_not_stall_its_session(serve):
    rec = Recorder()
    server = serve(rec.app(), handshake_timeout=1)
    client = cid()
    sid = open_poll(server, client)["hello"]["sid"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
        slow.sendall(f"POST /?gc_cid={client}&gc_transport=longpoll&gc_seq=1&gc_sid={sid} HTTP/1.1\r\nHost: x\r\n"
                     "Content-Type: text/plain\r\nContent-Length: 10\r\n\r\nab".encode())
        fast = requests.post(base(server), params=q(client, "longpoll", gc_seq=1, gc_sid=sid), data="fast",
                             headers={"Content-Type": "text/plain"}, timeout=5)
        assert fast.json()["in"] == 1
        assert slow.recv(100).startswith(b"HTTP/1.1 408 ")
    assert rec.got == ["fast"]
    assert requests.get(base(server), params=q(cid(), "longpoll", gc_open=1), timeout=5).json()["f"] == ["welcome"]
