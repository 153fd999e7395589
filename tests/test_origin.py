"""The Origin rule on every transport, and the CORS answers for listed origins."""
import gevent
import pytest
import requests
import websocket
from gevent import pywsgi

from greenchan import Event, with_channel

EVIL = "http://evil.example"


def make_app(reached):
    @with_channel
    def app(channel):
        reached.append(channel.environ["REQUEST_METHOD"])
        if channel.environ.get("HTTP_ACCEPT") == "text/event-stream":
            channel.send(Event("hi"))
            channel.close()
            return
        message = channel.receive(timeout=5) if channel.environ["REQUEST_METHOD"] == "POST" else "got"
        channel.send(f"echo:{message.decode() if isinstance(message, bytes) else message}")

    return app


def url(port):
    return f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize(
    "method, headers",
    [
        ("POST", {"Origin": EVIL, "Content-Type": "text/plain"}),  # no preflight in a browser
        ("GET", {"Origin": EVIL, "Accept": "text/event-stream"}),  # a cross-site EventSource
        ("GET", {"Origin": EVIL}),  # a cross-site long-poll
        ("GET", {"Sec-Fetch-Site": "cross-site"}),  # a browser's cross-site GET without Origin
        ("POST", {"Origin": "null", "Content-Type": "text/plain"}),  # a sandboxed frame
    ],
)
def test_cross_site_http_requests_never_reach_the_handler(serve, method, headers):
    reached = []
    server = serve(make_app(reached))
    response = requests.request(method, url(server.port), data="steal", headers=headers, timeout=5)
    assert response.status_code == 403
    assert "Access-Control-Allow-Origin" not in response.headers
    assert reached == []
    # the server still serves a good client
    assert requests.post(url(server.port), data="ok", timeout=5).text == "echo:ok"


def test_same_origin_and_originless_requests_pass(serve):
    reached = []
    server = serve(make_app(reached))
    same = f"http://127.0.0.1:{server.port}"
    assert requests.post(url(server.port), data="a", headers={"Origin": same, "Sec-Fetch-Site": "same-origin"}, timeout=5).text == "echo:a"
    assert requests.post(url(server.port), data="b", timeout=5).text == "echo:b"  # curl, server to server
    response = requests.get(url(server.port), headers={"Origin": same, "Accept": "text/event-stream"}, timeout=5)
    assert response.text == "data: hi\n\n"
    assert "Access-Control-Allow-Origin" not in response.headers  # same origin needs no CORS
    assert reached == ["POST", "POST", "GET"]


def test_listed_origin_gets_cors_answers(serve):
    reached = []
    app_origin = "https://app.example"
    server = serve(make_app(reached), origins=[app_origin])
    preflight = requests.options(
        url(server.port),
        headers={"Origin": app_origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"},
        timeout=5,
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == app_origin
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == "content-type"
    assert "Content-Length" not in preflight.headers
    assert reached == []  # a preflight is answered by greenchan
    response = requests.post(url(server.port), data="x", headers={"Origin": app_origin}, timeout=5)
    assert response.text == "echo:x"
    assert response.headers["Access-Control-Allow-Origin"] == app_origin
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Greenchan-Event-Id" in response.headers["Access-Control-Expose-Headers"]
    assert "Origin" in response.headers["Vary"]
    refused = requests.options(
        url(server.port), headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"}, timeout=5
    )
    assert refused.status_code == 403


def test_cors_headers_on_a_204_and_a_stream(serve):
    @with_channel
    def app(channel):
        if channel.environ["PATH_INFO"] == "/empty":
            channel.close()
        else:
            channel.send(Event("a"))
            channel.close()

    server = serve(app, origins=["https://app.example"])
    headers = {"Origin": "https://app.example"}
    empty = requests.get(url(server.port) + "empty", headers=headers, timeout=5)
    assert empty.status_code == 204
    assert empty.headers["Access-Control-Allow-Origin"] == "https://app.example"
    stream = requests.get(url(server.port), headers=headers, timeout=5)
    assert stream.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_wildcard_allows_anyone_without_credentials(serve):
    reached = []
    server = serve(make_app(reached), origins=["*"])
    response = requests.post(url(server.port), data="w", headers={"Origin": EVIL}, timeout=5)
    assert response.text == "echo:w"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in response.headers


def test_route_option_overrides_the_server(serve):
    reached = []

    @with_channel(origins=["https://a.example"])
    def app(channel):
        reached.append(1)
        channel.send("ok")

    server = serve(app)
    assert requests.get(url(server.port), headers={"Origin": "https://a.example"}, timeout=5).text == "ok"
    assert requests.get(url(server.port), headers={"Origin": "https://b.example"}, timeout=5).status_code == 403
    assert reached == [1]


def test_websocket_keeps_the_same_rule(serve):
    server = serve(make_app([]))
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"ws://127.0.0.1:{server.port}/", origin=EVIL, timeout=5)
    assert info.value.status_code == 403


def test_foreign_server_refuses_cross_site_posts():
    # Under a server that is not greenchan's (plain gevent.pywsgi), the HTTP
    # transport applies the same rule.
    reached = []
    server = pywsgi.WSGIServer(("127.0.0.1", 0), make_app(reached), log=None)
    server.start()
    try:
        port = server.server_port
        refused = requests.post(url(port), data="x", headers={"Origin": EVIL, "Content-Type": "text/plain"}, timeout=5)
        assert refused.status_code == 403
        assert reached == []
        ok = requests.post(url(port), data="y", headers={"Origin": f"http://127.0.0.1:{port}"}, timeout=5)
        assert ok.text == "echo:y"
    finally:
        server.stop(timeout=1)
        gevent.sleep(0)
