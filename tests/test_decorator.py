"""with_channel as a plain WSGI app, a Flask view and a Bottle route."""
import bottle
import flask
import pytest
import requests
import websocket

from greenchan import with_channel


def test_bare_and_configured_forms():
    def handler(channel):
        pass

    app = with_channel(handler)
    assert app.__name__ == "handler"
    assert with_channel(subprotocols=["x"])(handler).__name__ == "handler"


def test_unknown_route_option_is_type_error():
    with pytest.raises(TypeError, match="max_queue"):
        with_channel(max_queue=3)


def test_unknown_server_option_is_type_error():
    from greenchan import Server

    with pytest.raises(TypeError, match="bogus"):
        Server(lambda e, s: [], bogus=1)


def test_outside_greenchan_server_says_what_to_use():
    from wsgiref.util import setup_testing_defaults

    environ = {"HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade"}
    setup_testing_defaults(environ)
    statuses = []
    body = with_channel(lambda ch: None)(environ, lambda status, headers: statuses.append(status))
    assert statuses[0].startswith("500")
    assert b"greenchan.gunicorn.Worker" in b"".join(body)


def flask_app():
    app = flask.Flask(__name__)

    @app.route("/rooms/<name>")
    @with_channel
    def room(channel, name):
        who = flask.request.args.get("who", "anon")
        if channel.is_websocket:
            channel.send(f"{who} joined {name} over websocket")
        else:
            channel.send(f"{who} polled {name}")

    @app.route("/plain")
    def plain():
        return "plain flask"

    return app


def test_flask_one_route_serves_websocket_and_http(serve):
    server = serve(flask_app())
    base = f"127.0.0.1:{server.port}"
    ws = websocket.create_connection(f"ws://{base}/rooms/lobby?who=ann", timeout=5)
    assert ws.recv() == "ann joined lobby over websocket"
    response = requests.get(f"http://{base}/rooms/lobby?who=bob", timeout=5)
    assert response.text == "bob polled lobby"
    assert requests.get(f"http://{base}/plain", timeout=5).text == "plain flask"
    # the connection serves a plain Flask response after a channel's (keep-alive)
    with requests.Session() as session:
        assert session.get(f"http://{base}/rooms/a", timeout=5).text == "anon polled a"
        assert session.get(f"http://{base}/plain", timeout=5).text == "plain flask"


def test_bottle_route_with_arguments(serve):
    app = bottle.Bottle()

    @app.route("/echo/<prefix>")
    @with_channel
    def echo(channel, prefix):
        agent = bottle.request.headers.get("User-Agent", "")
        channel.on_receive(lambda message: channel.send(f"{prefix}:{message}"))
        if not channel.is_websocket:
            channel.send(f"{prefix}:{agent}")

    server = serve(app)
    base = f"127.0.0.1:{server.port}"
    ws = websocket.create_connection(f"ws://{base}/echo/p", timeout=5)
    ws.send("x")
    assert ws.recv() == "p:x"
    assert requests.get(f"http://{base}/echo/q", headers={"User-Agent": "ua"}, timeout=5).text == "q:ua"


def test_route_options_override_server(serve):
    seen = []

    @with_channel(max_message_size=10)
    def small(channel):
        channel.on_close(seen.append)
        channel.on_receive(channel.send)

    server = serve(small, max_message_size=1000)
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/", timeout=5)
    ws.send("x" * 11)
    opcode, payload = ws.recv_data(control_frame=True)
    assert payload[:2] == (1009).to_bytes(2, "big")
