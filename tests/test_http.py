"""The HTTP transport: long-polling, streaming, SSE, bodies, keep-alive, hang-ups."""
import socket

import gevent
import pytest
import requests

from conftest import wait_for
from greenchan import ChannelClosed, CloseStatus, Event, with_channel


def url(server, path="/"):
    return f"http://127.0.0.1:{server.port}{path}"


def raw_request(port, request: bytes) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(request)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_long_poll_is_a_complete_response(serve):
    waiting = []

    @with_channel
    def app(channel):
        waiting.append(channel)

    server = serve(app)
    result = []
    getter = gevent.spawn(lambda: result.append(requests.get(url(server), timeout=5)))
    wait_for(lambda: waiting)
    channel = waiting[0]
    assert channel.is_open and not channel.is_websocket
    assert channel.send("news") is True
    getter.join(5)
    response = result[0]
    assert response.text == "news"
    assert response.headers["Content-Length"] == "4"
    assert not channel.is_open
    assert channel.close_status is CloseStatus.SERVER_CLOSE
    assert channel.send("more") is False


def test_response_dict_sets_status_and_headers(serve):
    server = serve(with_channel(lambda ch: ch.send({"status": 202, "headers": {"X-Kind": "poll"}, "body": b"{}"})))
    response = requests.get(url(server), timeout=5)
    assert response.status_code == 202
    assert response.headers["X-Kind"] == "poll"
    assert response.content == b"{}"


def test_unknown_response_key_is_type_error(serve):
    errors = []

    @with_channel
    def app(channel):
        try:
            channel.send({"code": 200})
        except TypeError as exc:
            errors.append(str(exc))
        channel.send("ok")

    server = serve(app)
    assert requests.get(url(server), timeout=5).text == "ok"
    assert "code" in errors[0]


def test_close_before_send_is_204(serve):
    server = serve(with_channel(lambda ch: ch.close()))
    response = requests.get(url(server), timeout=5)
    assert response.status_code == 204


def test_streaming_is_chunked_and_flushed_per_send(serve):
    gates = []

    @with_channel
    def app(channel):
        channel.send("one ", close=False)
        gate = gevent.event.Event()
        gates.append(gate)
        gate.wait(5)
        channel.send("two", close=True)

    import gevent.event

    server = serve(app)
    response = requests.get(url(server), stream=True, timeout=5)
    assert response.headers["Transfer-Encoding"] == "chunked"
    chunks = response.iter_content(chunk_size=None)
    assert next(chunks) == b"one "  # arrived before the handler went on
    wait_for(lambda: gates)
    gates[0].set()
    assert b"".join(chunks) == b"two"


def test_streaming_on_http10_is_close_delimited(serve):
    @with_channel
    def app(channel):
        channel.send("a", close=False)
        channel.send("b")
        channel.close()

    server = serve(app)
    data = raw_request(server.port, b"GET / HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"chunked" not in head.lower()
    assert body == b"ab"


def test_server_sent_events(serve):
    @with_channel
    def app(channel):
        channel.send(Event("hello"))
        channel.send(Event("two\nlines", event="update", id="7", retry=1000))
        channel.close()

    server = serve(app)
    response = requests.get(url(server), timeout=5)
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.text == "data: hello\n\nevent: update\nid: 7\nretry: 1000\ndata: two\ndata: lines\n\n"


def test_request_body_is_one_message(serve):
    got = []

    @with_channel
    def app(channel):
        message = channel.receive(timeout=5)
        got.append(message)
        channel.send("thanks")

    server = serve(app)
    assert requests.post(url(server), data="hi", headers={"Content-Type": "text/plain"}, timeout=5).text == "thanks"
    assert requests.post(url(server), json={"a": 1}, timeout=5).text == "thanks"
    assert requests.post(url(server), data=b"\x00\x01", timeout=5).text == "thanks"
    assert got == ["hi", '{"a": 1}', b"\x00\x01"]


def test_body_also_readable_from_wsgi_input(serve):
    @with_channel
    def app(channel):
        channel.send(channel.environ["wsgi.input"].read())

    server = serve(app)
    assert requests.post(url(server), data=b"raw", timeout=5).content == b"raw"


def test_body_arrives_through_late_on_receive(serve):
    got = []

    @with_channel
    def app(channel):
        gevent.sleep(0.05)
        channel.on_receive(lambda m: (got.append(m), channel.send("ok")))

    server = serve(app)
    assert requests.post(url(server), data="late", headers={"Content-Type": "text/plain"}, timeout=5).text == "ok"
    assert got == ["late"]


def test_body_over_max_body_is_413(serve):
    calls = []
    server = serve(with_channel(lambda ch: (calls.append(ch), ch.send("ok"))), max_body=100)
    response = requests.post(url(server), data=b"x" * 101, timeout=5)
    assert response.status_code == 413
    chunked = requests.post(url(server), data=iter([b"x" * 60, b"x" * 60]), timeout=5)
    assert chunked.status_code == 413
    assert calls == []
    assert requests.post(url(server), data=b"x" * 100, timeout=5).text == "ok"
    assert len(calls) == 1


def test_keep_alive_reuses_connection_after_long_poll(serve):
    server = serve(with_channel(lambda ch: ch.send(ch.environ["PATH_INFO"])))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b"/one"):
        first += sock.recv(1024)
    sock.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")
    second = b""
    while not second.endswith(b"/two"):
        second += sock.recv(1024)
    assert second.startswith(b"HTTP/1.1 200")


def test_idle_client_going_away_is_client_close(serve):
    seen = []

    @with_channel
    def app(channel):
        channel.on_close(seen.append)

    server = serve(app)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: server._channels)
    sock.close()
    wait_for(lambda: seen == [CloseStatus.CLIENT_CLOSE])
    assert not server._channels


def test_stream_client_going_away_is_client_close(serve):
    seen = []

    @with_channel
    def app(channel):
        channel.on_close(seen.append)
        channel.send(Event("first"))

    server = serve(app)
    response = requests.get(url(server), stream=True, timeout=5)
    next(response.iter_lines())
    response.close()
    wait_for(lambda: seen == [CloseStatus.CLIENT_CLOSE])


def test_handler_exception_before_response_is_500(serve):
    seen = []

    @with_channel
    def app(channel):
        channel.on_close(seen.append)
        raise ValueError("bug")

    server = serve(app)
    assert requests.get(url(server), timeout=5).status_code == 500
    wait_for(lambda: seen == [CloseStatus.INTERNAL_ERROR])


def test_receive_on_http_without_body_raises_once_closed(serve):
    results = []

    @with_channel
    def app(channel):
        gevent.spawn_later(0.05, channel.send, "done")
        try:
            channel.receive(timeout=5)
        except ChannelClosed as exc:
            results.append(exc.status)

    server = serve(app)
    assert requests.get(url(server), timeout=5).text == "done"
    assert results == [CloseStatus.SERVER_CLOSE]


def test_reject_on_http(serve):
    server = serve(with_channel(lambda ch: ch.reject(429, "slow down", {"Retry-After": "3"})))
    response = requests.get(url(server), timeout=5)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "3"
    assert response.text == "slow down"


def test_body_that_trickles_in_is_408(serve):
    calls = []
    server = serve(with_channel(lambda ch: (calls.append(ch), ch.send("ok"))), handshake_timeout=0.3)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    response = sock.recv(1000)
    assert response.startswith(b"HTTP/1.1 408")
    assert calls == []
    assert requests.post(url(server), data=b"x", timeout=5).text == "ok"


# -- bytes after a request do not hide a hang-up (issue 10, defect 4) -----------------


def _waiting_app(store, seen):
    """A long-poll (``/poll``) or SSE (``/sse``) channel that joins a group and waits."""

    @with_channel
    def app(channel):
        channel.on_close(seen.append)
        store.add_to_group("room", channel)
        if channel.environ["PATH_INFO"] == "/sse":
            channel.send(Event("joined"))

    return app


@pytest.mark.parametrize("path", ["/poll", "/sse"])
@pytest.mark.parametrize("extra", [b"\r\n", b"G", b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"])
def test_extra_bytes_then_hangup_is_client_close(serve, path, extra):
    from greenchan import MemoryChannelStore

    store, seen = MemoryChannelStore(), []
    server = serve(_waiting_app(store, seen))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: store.members("room"))
    sock.sendall(extra)  # read by the hang-up watch, not by the request parser
    gevent.sleep(0.05)
    sock.close()
    wait_for(lambda: seen == [CloseStatus.CLIENT_CLOSE])
    assert not store.members("room")
    assert not server._channels
    wait_for(lambda: server._connections == 0)


def test_reset_after_extra_bytes_is_client_close(serve):
    from greenchan import MemoryChannelStore

    store, seen = MemoryChannelStore(), []
    server = serve(_waiting_app(store, seen))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /poll HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: store.members("room"))
    sock.sendall(b"\r\n")
    gevent.sleep(0.05)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # linger 0: a reset
    wait_for(lambda: seen == [CloseStatus.CLIENT_CLOSE])
    assert not store.members("room")


def test_vanished_clients_with_extra_bytes_free_their_connection_slots(serve):
    from greenchan import MemoryChannelStore

    store, seen = MemoryChannelStore(), []
    limit = 5
    server = serve(_waiting_app(store, seen), max_connections=limit)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(limit)]
    for sock in socks:
        sock.sendall(b"GET /poll HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: len(store.members("room")) == limit)
    for sock in socks:
        sock.sendall(b"\r\n")
    gevent.sleep(0.05)
    for sock in socks:
        sock.close()
    wait_for(lambda: len(seen) == limit)
    wait_for(lambda: server._connections == 0)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /sse HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    sock.close()


@pytest.mark.parametrize("together", [False, True], ids=["after", "with-the-first"])
def test_pipelined_request_on_a_long_poll_is_answered_after_it(serve, together):
    waiting = []

    @with_channel
    def app(channel):
        if channel.environ["PATH_INFO"] == "/wait":
            waiting.append(channel)
        else:
            channel.send("second " + channel.environ["PATH_INFO"])

    server = serve(app)
    first = b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    if together:
        sock.sendall(first + second)
        wait_for(lambda: waiting)
    else:
        sock.sendall(first)
        wait_for(lambda: waiting)
        for i in range(0, len(second), 7):  # in pieces, all while the first waits
            sock.sendall(second[i:i + 7])
            gevent.sleep(0.001)
    gevent.sleep(0.05)
    assert waiting[0].is_open
    waiting[0].send("first")
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    bodies = [part.rsplit(b"\r\n\r\n", 1)[-1] for part in data.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"first", b"second /b", b"second /c"]


def test_too_much_input_while_a_response_is_pending_closes(serve):
    """Past max_header_size of pipelined input the client is cut (documented policy)."""
    seen = []
    server = serve(with_channel(lambda ch: ch.on_close(seen.append)), max_header_size=1024)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: server._channels)
    try:
        sock.sendall(b"x" * 4096)
    except OSError:
        pass
    wait_for(lambda: seen == [CloseStatus.PROTOCOL_ERROR])
    wait_for(lambda: server._connections == 0)
