"""with_channel under gevent-websocket's WebSocketHandler, and under plain pywsgi (no greenchan server)."""
import gevent
import pytest
import requests
import websocket
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler

from conftest import wait_for
from greenchan import CloseStatus, with_channel
from greenchan.geventwebsocket import flask_compatible


@pytest.fixture
def foreign():
    """``foreign(app, websocket=True)`` serves ``app`` on pywsgi (with gevent-websocket's handler)."""
    servers = []

    def start(app, websocket=True):
        kwargs = {"handler_class": WebSocketHandler} if websocket else {}
        server = pywsgi.WSGIServer(("127.0.0.1", 0), app, log=None, **kwargs)
        server.start()
        servers.append(server)
        return server.server_port

    yield start
    for server in servers:
        server.stop(timeout=2)


def recording_app(events):
    @with_channel
    def app(channel):
        events.append(("open", channel.is_websocket, channel.is_open))

        @channel.on_receive
        def received(message):
            events.append(("message", message))
            if message == "close-me":
                channel.close(4001, "as asked")
                events.append(("send-after-close", channel.send("late")))
            else:
                channel.send(message)

        channel.on_close(lambda status: events.append(("close", status, channel.close_code)))

    return app


def test_echo_in_order_and_client_close(foreign):
    events = []
    port = foreign(recording_app(events))
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=10)
    for i in range(50):
        ws.send(f"m{i}")
    assert [ws.recv() for _ in range(50)] == [f"m{i}" for i in range(50)]
    ws.send_binary(b"\x00\xff")
    assert ws.recv() == b"\x00\xff"
    ws.close()
    wait_for(lambda: events and events[-1][0] == "close")
    assert events[0] == ("open", True, True)
    assert [e[1] for e in events if e[0] == "message"] == [f"m{i}" for i in range(50)] + [b"\x00\xff"]
    assert events[-1] == ("close", CloseStatus.NORMAL, 1000)
    assert sum(1 for e in events if e[0] == "close") == 1


def test_server_close_code_and_send_after_close(foreign):
    events = []
    port = foreign(recording_app(events))
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=10)
    ws.send("close-me")
    opcode, frame = ws.recv_data_frame(True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(frame.data[:2], "big") == 4001 and frame.data[2:] == b"as asked"
    wait_for(lambda: events and events[-1][0] == "close")
    assert ("send-after-close", False) in events
    assert events[-1] == ("close", CloseStatus.SERVER_CLOSE, 4001)


def test_client_vanishes(foreign):
    events = []
    port = foreign(recording_app(events))
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=10)
    ws.send("x")
    assert ws.recv() == "x"
    ws.sock.close()  # no close frame
    wait_for(lambda: events and events[-1][0] == "close")
    assert events[-1] == ("close", CloseStatus.GOING_AWAY, 1006)


def test_greenlet_style_handler_and_ping(foreign):
    pings = []

    @with_channel
    def app(channel):
        channel.on_ping(pings.append)
        for message in channel:
            channel.send(message.upper())

    port = foreign(app)
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=10)
    ws.ping(b"hey")
    ws.send("abc")
    assert ws.recv() == "ABC"
    wait_for(lambda: pings == [b"hey"])
    ws.close()


def test_origin_refused_with_1008(foreign):
    events = []
    port = foreign(recording_app(events))
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", origin="https://evil.example", timeout=10)
    opcode, frame = ws.recv_data_frame(True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(frame.data[:2], "big") == 1008
    assert events == []  # the handler never ran


def test_http_long_poll_and_stream_under_gevent_websocket(foreign):
    events = []

    @with_channel
    def app(channel):
        if channel.environ["PATH_INFO"] == "/stream":
            channel.send("one\n", close=False)
            gevent.spawn_later(0.01, lambda: (channel.send("two\n"), channel.close()))
        else:
            channel.on_receive(channel.send)
        channel.on_close(events.append)

    port = foreign(app)
    assert requests.post(f"http://127.0.0.1:{port}/poll", data="body", timeout=10).text == "body"
    response = requests.get(f"http://127.0.0.1:{port}/stream", timeout=10)
    assert response.text == "one\ntwo\n"
    assert "Content-Length" not in response.headers
    wait_for(lambda: len(events) == 2)
    assert events == [CloseStatus.SERVER_CLOSE, CloseStatus.SERVER_CLOSE]


def test_http_long_poll_client_goes_away(foreign):
    events = []

    opened = []

    @with_channel
    def app(channel):
        channel.on_close(events.append)
        opened.append(channel)

    port = foreign(app, websocket=False)
    import socket

    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: opened)
    client.close()
    wait_for(lambda: events == [CloseStatus.CLIENT_CLOSE])


def test_upgrade_without_gevent_websocket_names_the_worker(foreign):
    seen = []
    port = foreign(with_channel(seen.append), websocket=False)
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=10)
    assert info.value.status_code == 500
    assert b"greenchan.gunicorn.Worker" in info.value.resp_body
    assert seen == []


def test_flask_view_under_gevent_websocket(foreign):
    flask = pytest.importorskip("flask")
    app = flask.Flask(__name__)

    @app.route("/chat/<room>", methods=["GET", "POST"])
    @with_channel
    def chat(channel, room):
        channel.on_receive(lambda m: channel.send(f"{room}:{m}"))

    app.wsgi_app = flask_compatible(app.wsgi_app)
    port = foreign(app)
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/chat/lobby", timeout=10)
    ws.send("hi")
    assert ws.recv() == "lobby:hi"
    ws.close()
    assert requests.post(f"http://127.0.0.1:{port}/chat/lobby", data="yo", headers={"Content-Type": "text/plain"}, timeout=10).text == "lobby:yo"
