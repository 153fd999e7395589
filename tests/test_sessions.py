"""Sessions (docs/sessions.md): one channel per client id, across requests and transports."""
import json
import os
import socket

import gevent
import pytest
import requests
import websocket

from conftest import wait_for
from greenchan import CloseStatus, with_channel


def cid():
    return os.urandom(16).hex()


class Counter:
    """The issue's handler: greets once, counts messages per session, echoes."""

    def __init__(self):
        self.started = []
        self.closed = []
        self.channels = []

    def app(self):
        @with_channel
        def handler(channel):
            self.started.append(channel.session)
            self.channels.append(channel)
            count = [0]
            channel.send("welcome")

            def on_receive(message):
                count[0] += 1
                channel.send(f"{count[0]}:{message}")

            channel.on_receive(on_receive)
            channel.on_close(lambda status: self.closed.append(status))

        return handler


def base(server):
    return f"http://127.0.0.1:{server.port}/"


def q(client, transport, **extra):
    params = {"gc_cid": client, "gc_transport": transport}
    params.update({k: str(v) for k, v in extra.items()})
    return params


def ws_url(server, client, **extra):
    from urllib.parse import urlencode

    return f"ws://127.0.0.1:{server.port}/?" + urlencode(q(client, "websocket", **extra))


def control(frame):
    assert frame.startswith("\x00") and not frame.startswith("\x00\x00"), frame
    return json.loads(frame[1:])


def test_long_poll_session_runs_the_handler_once(serve):
    counter = Counter()
    server = serve(counter.app())
    client = cid()
    first = requests.get(base(server), params=q(client, "longpoll", gc_open=1), timeout=5).json()
    assert first["hello"]["new"] is True
    sid = first["hello"]["sid"]
    assert first["from"] == 0 and first["f"] == ["welcome"]
    for seq, text in enumerate(["a", "b", "c"], start=1):
        answer = requests.post(base(server), params=q(client, "longpoll", gc_seq=seq, gc_sid=sid), data=text,
                               headers={"Content-Type": "text/plain;charset=UTF-8"}, timeout=5)
        assert answer.json()["in"] == seq
    # a retried POST is not delivered twice
    requests.post(base(server), params=q(client, "longpoll", gc_seq=3, gc_sid=sid), data="c",
                  headers={"Content-Type": "text/plain"}, timeout=5)
    poll = requests.get(base(server), params=q(client, "longpoll", gc_ack=1, gc_sid=sid), timeout=5).json()
    assert poll["from"] == 1 and poll["f"] == ["1:a", "2:b", "3:c"]
    assert counter.started == [client]
    # a poll that acknowledges everything waits for the next frame
    result = []
    waiter = gevent.spawn(lambda: result.append(requests.get(base(server), params=q(client, "longpoll", gc_ack=4, gc_sid=sid), timeout=5).json()))
    gevent.sleep(0.2)
    assert not result
    counter.channels[0].send("news")
    waiter.join(5)
    assert result[0]["f"] == ["news"] and result[0]["from"] == 4
    assert counter.started == [client] and counter.closed == []


def test_websocket_session_resumes_after_a_drop(serve):
    counter = Counter()
    server = serve(counter.app(), session_grace=10)
    client = cid()
    ws = websocket.create_connection(ws_url(server, client), timeout=5)
    hello = control(ws.recv())["hello"]
    assert hello["new"] is True and hello["in"] == 0
    assert ws.recv() == "welcome"
    ws.send("x")
    assert ws.recv() == "1:x"
    received = 2
    ws.sock.shutdown(socket.SHUT_RDWR)  # the network drops: no close frame
    ws.sock.close()
    channel = counter.channels[0]
    wait_for(lambda: channel.session and counter.channels[0]._transport.state == "detached")
    channel.send("while away 1")
    channel.send("while away 2")
    ws = websocket.create_connection(ws_url(server, client, gc_sid=hello["sid"], gc_ack=received, gc_next=2), timeout=5)
    hello2 = control(ws.recv())["hello"]
    assert hello2 == {"sid": hello["sid"], "new": False, "in": 1}
    assert [ws.recv(), ws.recv()] == ["while away 1", "while away 2"]
    ws.send("y")
    assert ws.recv() == "2:y"
    assert counter.started == [client] and counter.closed == []
    ws.close()  # code 1000 from the client: the session ends at once
    wait_for(lambda: counter.closed)
    assert counter.closed == [CloseStatus.NORMAL]


def test_websocket_unacknowledged_frames_come_again(serve):
    counter = Counter()
    server = serve(counter.app())
    client = cid()
    ws = websocket.create_connection(ws_url(server, client), timeout=5)
    sid = control(ws.recv())["hello"]["sid"]
    assert ws.recv() == "welcome"
    counter.channels[0].send("second")
    assert ws.recv() == "second"
    ws.sock.close()
    # the client had read both, but acknowledged only the first
    ws = websocket.create_connection(ws_url(server, client, gc_sid=sid, gc_ack=1), timeout=5)
    control(ws.recv())
    assert ws.recv() == "second"
    ws.send("\x00" + json.dumps({"ack": 2}))
    wait_for(lambda: counter.channels[0]._transport._base == 2)
    ws.close()


def test_one_session_across_transports(serve):
    counter = Counter()
    server = serve(counter.app())
    client = cid()
    first = requests.get(base(server), params=q(client, "longpoll", gc_open=1), timeout=5).json()
    sid = first["hello"]["sid"]
    requests.post(base(server), params=q(client, "longpoll", gc_seq=1, gc_sid=sid), data="lp",
                  headers={"Content-Type": "text/plain"}, timeout=5)
    ws = websocket.create_connection(ws_url(server, client, gc_sid=sid, gc_ack=1, gc_next=2), timeout=5)
    assert control(ws.recv())["hello"]["in"] == 1
    assert ws.recv() == "1:lp"
    ws.send("ws")
    assert ws.recv() == "2:ws"
    ws.sock.close()
    wait_for(lambda: counter.channels[0]._transport.state == "detached")
    with requests.get(base(server), params=q(client, "sse", gc_sid=sid, gc_ack=3), stream=True,
                      headers={"Accept": "text/event-stream"}, timeout=5) as stream:
        lines = stream.iter_lines(decode_unicode=True)
        assert next(lines) == "event: gc"
        assert json.loads(next(lines)[len("data: "):])["hello"]["in"] == 2
        counter.channels[0].send("on sse")
        assert [next(lines), next(lines)] == ["", "data: on sse"]
        assert counter.channels[0].transport == "sse"
    assert counter.started == [client]


def test_binary_and_control_lookalikes_survive_every_transport(serve):
    got = []

    @with_channel
    def app(channel):
        channel.on_receive(got.append)
        channel.send(b"\x00\x01bin")
        channel.send("\x00not a control")
        channel.send("cr\rlf\n")

    server = serve(app)
    client = cid()
    first = requests.get(base(server), params=q(client, "longpoll", gc_open=1), timeout=5).json()
    assert first["f"] == [{"b": "AAFiaW4="}]  # the first send answers the opening poll
    sid = first["hello"]["sid"]
    second = requests.get(base(server), params=q(client, "longpoll", gc_ack=1, gc_sid=sid), timeout=5).json()
    assert second["f"] == ["\x00not a control", "cr\rlf\n"]
    ws = websocket.create_connection(ws_url(server, cid()), timeout=5)
    control(ws.recv())
    assert ws.recv() == b"\x00\x01bin"
    assert ws.recv() == "\x00\x00not a control"
    assert ws.recv() == "cr\rlf\n"
    ws.send("\x00\x00from client")
    wait_for(lambda: got)
    assert got == ["\x00from client"]


def test_grace_ends_a_session_once(serve):
    counter = Counter()
    server = serve(counter.app(), session_grace=0.3)
    client = cid()
    requests.get(base(server), params=q(client, "longpoll", gc_open=1), timeout=5)
    wait_for(lambda: counter.closed)
    gevent.sleep(0.4)
    assert counter.closed == [CloseStatus.GOING_AWAY]
    # the id comes back later: a new session, the handler runs again
    again = requests.get(base(server), params=q(client, "longpoll", gc_open=1), timeout=5).json()
    assert again["hello"]["new"] is True
    assert counter.started == [client, client]


def test_client_close_over_http_ends_at_once(serve):
    counter = Counter()
    server = serve(counter.app(), session_grace=60)
    client = cid()
    requests.get(base(server), params=q(client, "longpoll", gc_open=1), timeout=5)
    requests.post(base(server), params=q(client, "longpoll", gc_close=1), timeout=5)
    wait_for(lambda: counter.closed)
    assert counter.closed == [CloseStatus.NORMAL]
    assert server.sessions == {}


def test_server_close_reaches_a_client_that_comes_back(serve):
    @with_channel
    def app(channel):
        channel.close(4000, "bye")

    server = serve(app)
    client = cid()
    first = requests.get(base(server), params=q(client, "longpoll", gc_open=1), timeout=5).json()
    assert first["f"] == [{"c": {"close": [4000, "bye"]}}]


def test_detached_buffer_is_bounded(serve):
    counter = Counter()
    server = serve(counter.app(), send_buffer=10_000)
    client = cid()
    requests.get(base(server), params=q(client, "longpoll", gc_open=1), timeout=5)
    channel = counter.channels[0]
    sent = [channel.send("x" * 1000) for _ in range(20)]
    assert sent[:9] == [True] * 9 and sent[-1] is False
    wait_for(lambda: counter.closed)
    assert counter.closed == [CloseStatus.SLOW_CONSUMER]
    # the server still serves others
    assert requests.get(base(server), params=q(cid(), "longpoll", gc_open=1), timeout=5).json()["f"] == ["welcome"]


def test_stolen_client_id_from_another_origin_is_refused(serve):
    counter = Counter()
    server = serve(counter.app(), origins=["https://app.example", "https://evil.example"])
    client = cid()
    requests.get(base(server), params=q(client, "longpoll", gc_open=1), headers={"Origin": "https://app.example"}, timeout=5)
    stolen = requests.post(base(server), params=q(client, "longpoll", gc_seq=1), data="hi",
                           headers={"Origin": "https://evil.example"}, timeout=5)
    assert stolen.status_code == 403
    read = requests.get(base(server), params=q(client, "longpoll", gc_open=1), headers={"Origin": "https://evil.example"}, timeout=5)
    assert read.status_code == 403
    assert counter.started == [client]


@pytest.mark.parametrize("bad", ["short", "x" * 31, "a" * 40 + "!", ""])
def test_weak_client_ids_are_refused(serve, bad):
    counter = Counter()
    server = serve(counter.app())
    response = requests.get(base(server), params={"gc_cid": bad, "gc_transport": "longpoll"}, timeout=5)
    assert response.status_code == 400
    assert counter.started == []


def test_plain_requests_are_untouched(serve):
    counter = Counter()
    server = serve(counter.app())
    assert requests.get(base(server), timeout=5).text == "welcome"
    assert requests.get(base(server), timeout=5).text == "welcome"
    assert counter.started == [None, None]


def test_stolen_client_id_refused_on_same_origin_gets(serve):
    """Browsers send no Origin on same-origin GETs (EventSource, a long-poll): the pin
    falls back on the host such a request was sent to (Sec-Fetch-Site: same-origin)."""
    counter = Counter()
    server = serve(counter.app(), origins=["http://app.example", "http://other.example"])
    client = cid()
    same = {"Sec-Fetch-Site": "same-origin"}
    owner = requests.get(base(server), params=q(client, "longpoll", gc_open=1),
                         headers=dict(same, Host="app.example"), timeout=5)
    assert owner.status_code == 200
    for transport, accept in (("longpoll", "application/json"), ("sse", "text/event-stream")):
        thief = requests.get(base(server), params=q(client, transport, gc_open=1), timeout=5,
                             headers=dict(same, Host="other.example", Accept=accept))
        assert thief.status_code == 403
    stolen = requests.post(base(server), params=q(client, "longpoll", gc_seq=1), data="hi", timeout=5,
                           headers={"Origin": "http://other.example", "Host": "app.example"})
    assert stolen.status_code == 403
    # the owner's own requests still pass: a POST carries its Origin, a GET its host
    mine = requests.post(base(server), params=q(client, "longpoll", gc_seq=1), data="hi", timeout=5,
                         headers={"Origin": "http://app.example", "Host": "app.example", "Content-Type": "text/plain"})
    assert mine.status_code == 200 and mine.json()["in"] == 1
    again = requests.get(base(server), params=q(client, "longpoll", gc_open=1, gc_sid=owner.json()["hello"]["sid"], gc_ack=1),
                         headers=dict(same, Host="app.example"), timeout=5)
    assert again.status_code == 200 and again.json()["f"] == ["1:hi"]
    assert counter.started == [client]


def test_server_stop_lets_the_client_come_back(serve):
    """A stopping server ends the session without a close frame (which would end
    greenchan.js for good): the socket closes with 1001, a waiting poll gets no
    frame, on_close runs once, and the client comes back in a new session. (The
    session's shutdown is called directly, as Server.stop does, so that the order
    in which stop() visits the carrier and the session does not matter.)"""
    counter = Counter()
    server = serve(counter.app(), session_grace=60)
    client = cid()
    ws = websocket.create_connection(ws_url(server, client), timeout=5)
    control(ws.recv())
    assert ws.recv() == "welcome"
    counter.channels[0]._transport.shutdown()
    frame = ws.recv_data_frame(True)[1]
    assert frame.opcode == websocket.ABNF.OPCODE_CLOSE, frame.data
    assert int.from_bytes(frame.data[:2], "big") == 1001
    ws.shutdown()
    wait_for(lambda: counter.closed)
    assert counter.closed == [CloseStatus.SERVER_CLOSE]
    assert client not in server.sessions

    first = requests.get(base(server), params=q(client, "longpoll", gc_open=1), timeout=5).json()
    assert first["hello"]["new"] is True
    sid = first["hello"]["sid"]
    result = []
    waiter = gevent.spawn(lambda: result.append(requests.get(base(server), params=q(client, "longpoll", gc_ack=1, gc_sid=sid), timeout=5)))
    wait_for(lambda: server.sessions[client]._carrier is not None)
    counter.channels[1]._transport.shutdown()
    waiter.join(5)
    assert result[0].json()["f"] == []
    assert counter.closed == [CloseStatus.SERVER_CLOSE, CloseStatus.SERVER_CLOSE]
    assert client not in server.sessions


def test_server_stop_acknowledges_what_it_received(serve):
    """The client's messages are acknowledged up to 200 ms late; a stopping server
    says what it received before it ends the WebSocket, or the client would send
    those again to the new session, which would deliver them a second time."""
    counter = Counter()
    server = serve(counter.app())
    ws = websocket.create_connection(ws_url(server, cid()), timeout=5)
    control(ws.recv())
    assert ws.recv() == "welcome"
    ws.send("x")
    assert ws.recv() == "1:x"
    gevent.spawn(server.stop, 2)
    frames = []
    for _ in range(5):
        opcode, data = ws.recv_data(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        frames.append(data.decode())
    assert [control(f) for f in frames] == [{"ack": 1}]
    ws.shutdown()


def test_a_client_that_comes_back_learns_it_was_closed(serve):
    """Closed while its client was away (a kick during a drop): the client that comes
    back gets the close frame, not a new session in its place."""
    counter = Counter()
    server = serve(counter.app(), session_grace=60)
    client = cid()
    first = requests.get(base(server), params=q(client, "longpoll", gc_open=1), timeout=5).json()
    sid = first["hello"]["sid"]
    counter.channels[0].close(4000, "kicked")
    back = requests.get(base(server), params=q(client, "longpoll", gc_sid=sid, gc_ack=1), timeout=5).json()
    assert back["hello"]["new"] is False
    assert (back["from"], back["f"]) == (1, [{"c": {"close": [4000, "kicked"]}}])
    ws = websocket.create_connection(ws_url(server, client, gc_sid=sid, gc_ack=1), timeout=5)
    assert control(ws.recv())["hello"]["new"] is False
    assert control(ws.recv()) == {"close": [4000, "kicked"]}
    ws.close()
    assert counter.started == [client]
    # a client that got it all, or knows no instance, starts over
    again = requests.get(base(server), params=q(client, "longpoll", gc_sid=sid, gc_ack=2), timeout=5).json()
    assert again["hello"]["new"] is True and counter.started == [client, client]
