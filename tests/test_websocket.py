"""The WebSocket transport, over real sockets: websocket-client and raw frames."""
import json
import socket
import struct

import gevent
import pytest
import requests
import websocket

from conftest import wait_for
from greenchan import CloseStatus, Event, with_channel
from wsraw import close_payload, frame, handshake, read_close, read_frame


def echo_app(record=None):
    @with_channel
    def app(channel):
        channel.on_receive(channel.send)
        if record is not None:
            record.append(channel)
    return app


def closing_app(seen, **route_options):
    """Echo, and record each close status."""
    @with_channel(**route_options)
    def app(channel):
        channel.on_receive(channel.send)
        channel.on_close(seen.append)
    return app


def ws_url(server, path="/"):
    return f"ws://127.0.0.1:{server.port}{path}"


def still_serves(server):
    ws = websocket.create_connection(ws_url(server), timeout=5)
    ws.send("still here")
    assert ws.recv() == "still here"
    ws.close()


def test_text_and_binary_echo(serve):
    server = serve(echo_app())
    ws = websocket.create_connection(ws_url(server), timeout=5)
    ws.send("héllo")
    assert ws.recv() == "héllo"
    ws.send_binary(b"\x00\xff")
    assert ws.recv() == b"\x00\xff"
    ws.close()


def test_handler_runs_before_handshake_and_reject_answers_http(serve):
    @with_channel
    def app(channel):
        if channel.environ["PATH_INFO"] == "/private":
            channel.reject(401, "who are you?", {"WWW-Authenticate": "Basic"})
            return
        channel.send("welcome")

    server = serve(app)
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(ws_url(server, "/private"), timeout=5)
    assert info.value.status_code == 401
    ws = websocket.create_connection(ws_url(server), timeout=5)
    assert ws.recv() == "welcome"


def test_accept_with_headers_and_subprotocol_in_server_order(serve):
    seen = []

    @with_channel(subprotocols=["chat.v2", "chat.v1"])
    def app(channel):
        channel.accept(headers={"X-Hello": "yes"})
        seen.append(channel.subprotocol)

    server = serve(app)
    ws = websocket.create_connection(ws_url(server), subprotocols=["chat.v1", "chat.v2"], timeout=5)
    assert ws.getsubprotocol() == "chat.v2"
    assert ws.getheaders()["x-hello"] == "yes"
    assert seen == ["chat.v2"]


def test_bad_upgrade_is_400_and_never_reaches_handler(serve):
    calls = []

    @with_channel
    def app(channel):
        calls.append(channel)

    server = serve(app)
    sock, head = handshake(server.port, key="not-base64")
    assert head.startswith(b"HTTP/1.1 400")
    rest = b""
    for _ in range(100):  # the body of the 400, then the end: closed, not upgraded
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    else:
        raise AssertionError("the connection stayed open after the 400")
    assert b"Failed to open a WebSocket connection" in rest
    sock, head = handshake(server.port, extra="Sec-WebSocket-Version: 8\r\n")
    assert b" 101 " not in head.split(b"\r\n")[0]
    assert calls == []


def test_origin_policy(serve):
    server = serve(echo_app())
    host = f"127.0.0.1:{server.port}"
    ok = websocket.create_connection(ws_url(server), origin=f"http://{host}", timeout=5)
    ok.close()
    no_origin = websocket.create_connection(ws_url(server), suppress_origin=True, timeout=5)
    no_origin.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(ws_url(server), origin="http://evil.example", timeout=5)
    assert info.value.status_code == 403
    still_serves(server)


def test_explicit_origins_and_wildcard(serve):
    only = serve(with_channel(origins=["https://app.example"])(lambda ch: ch.on_receive(ch.send)))
    websocket.create_connection(ws_url(only), origin="https://app.example", timeout=5).close()
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(ws_url(only), origin=f"http://127.0.0.1:{only.port}", timeout=5)
    anyone = serve(echo_app(), origins=["*"])
    websocket.create_connection(ws_url(anyone), origin="http://anything.example", timeout=5).close()


def test_fragmented_message_is_reassembled(serve):
    server = serve(echo_app())
    sock, head = handshake(server.port)
    assert b" 101 " in head
    sock.sendall(frame(1, "frag".encode(), fin=False) + frame(9, b"mid-ping") + frame(0, "mented".encode()))
    assert read_frame(sock) == (10, b"mid-ping")  # the pong comes first, as the ping did
    assert read_frame(sock) == (1, b"fragmented")


def test_client_ping_gets_pong_and_on_ping(serve):
    pings = []

    @with_channel
    def app(channel):
        channel.on_ping(pings.append)

    server = serve(app)
    ws = websocket.create_connection(ws_url(server), timeout=5)
    ws.ping("abc")
    opcode, data = ws.recv_data_frame(True)[0], None
    assert opcode == websocket.ABNF.OPCODE_PONG
    wait_for(lambda: pings == [b"abc"])


def test_keepalive_closes_unresponsive_client_with_timeout(serve):
    statuses = []

    @with_channel(ping_interval=0.1, ping_timeout=0.2)
    def app(channel):
        channel.on_close(statuses.append)
        channel.on_receive(channel.send)

    server = serve(app)
    sock, head = handshake(server.port)
    assert b" 101 " in head
    opcode, _ = read_frame(sock)  # the server's keepalive ping, never answered
    assert opcode == 9
    wait_for(lambda: statuses == [CloseStatus.TIMEOUT])
    still_serves(server)


def test_keepalive_pong_keeps_connection_open(serve):
    statuses = []

    @with_channel(ping_interval=0.05, ping_timeout=0.5)
    def app(channel):
        channel.on_close(statuses.append)
        channel.on_receive(channel.send)

    server = serve(app)
    sock, _ = handshake(server.port)
    for _ in range(5):
        opcode, payload = read_frame(sock)
        assert opcode == 9
        sock.sendall(frame(10, payload))
    assert statuses == []
    sock.sendall(frame(1, b"ok"))
    for _ in range(20):
        opcode, payload = read_frame(sock)
        if opcode == 1:
            break
        sock.sendall(frame(10, payload))
    assert payload == b"ok"


@pytest.mark.parametrize(
    "code, status",
    [(1000, CloseStatus.NORMAL), (1001, CloseStatus.GOING_AWAY), (1003, CloseStatus.UNSUPPORTED), (4000, CloseStatus.UNKNOWN)],
)
def test_client_close_codes(serve, code, status):
    seen = []

    @with_channel
    def app(channel):
        channel.on_close(lambda s: seen.append((s, channel.close_code, channel.close_reason)))

    server = serve(app)
    sock, _ = handshake(server.port)
    sock.sendall(frame(8, close_payload(code, b"bye")))
    assert read_close(sock) == (code, b"bye")
    assert sock.recv(10) == b""  # the server closes the TCP connection
    wait_for(lambda: seen == [(status, code, "bye")])


def test_close_without_status_is_no_status(serve):
    seen = []
    server = serve(with_channel(lambda ch: ch.on_close(seen.append)))
    sock, _ = handshake(server.port)
    sock.sendall(frame(8))
    read_close(sock)
    wait_for(lambda: seen == [CloseStatus.NO_STATUS])


def test_server_close_handshake_with_code_and_reason(serve):
    seen = []

    @with_channel
    def app(channel):
        channel.on_close(seen.append)
        channel.send("bye soon")
        assert channel.close(4001, "done") is True
        assert channel.close() is False
        assert channel.send("too late") is False

    server = serve(app)
    ws = websocket.create_connection(ws_url(server), timeout=5)
    assert ws.recv() == "bye soon"
    opcode, payload = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert payload == struct.pack("!H", 4001) + b"done"
    wait_for(lambda: seen == [CloseStatus.SERVER_CLOSE])


def test_server_close_frame_on_the_wire(serve):
    server = serve(with_channel(lambda ch: ch.close(4001, "done")))
    sock, _ = handshake(server.port)
    assert read_close(sock) == (4001, b"done")


def test_tcp_drop_without_close_frame_is_going_away(serve):
    seen = []
    server = serve(with_channel(lambda ch: ch.on_close(lambda s: seen.append((s, ch.close_code)))))
    sock, _ = handshake(server.port)
    sock.close()
    wait_for(lambda: seen == [(CloseStatus.GOING_AWAY, 1006)])


def test_message_too_big_is_1009(serve):
    seen = []

    @with_channel(max_message_size=1000)
    def app(channel):
        channel.on_receive(channel.send)
        channel.on_close(seen.append)

    server = serve(app)
    sock, _ = handshake(server.port)
    sock.sendall(frame(2, b"x" * 1001))
    assert read_close(sock)[0] == 1009
    wait_for(lambda: seen == [CloseStatus.MESSAGE_TOO_BIG])
    # the limit holds across fragments too
    sock, _ = handshake(server.port)
    sock.sendall(frame(2, b"x" * 600, fin=False) + frame(0, b"x" * 600))
    assert read_close(sock)[0] == 1009
    still_serves(server)


def test_invalid_utf8_is_1007(serve):
    seen = []
    server = serve(closing_app(seen))
    sock, _ = handshake(server.port)
    sock.sendall(frame(1, b"\xff\xfe"))
    assert read_close(sock)[0] == 1007
    wait_for(lambda: seen == [CloseStatus.INVALID_DATA])
    # fail fast: an invalid first fragment closes before the message ends
    sock, _ = handshake(server.port)
    sock.sendall(frame(1, b"ok\xff", fin=False))
    assert read_close(sock)[0] == 1007
    still_serves(server)


@pytest.mark.parametrize(
    "data",
    [
        frame(1, b"unmasked", mask=False),
        frame(1, b"rsv", rsv=4),
        frame(3, b"reserved opcode"),
        frame(0, b"continuation without start"),
        frame(9, b"x" * 126),  # control frame too long
        frame(9, b"fragmented ping", fin=False),
        # RFC 6455 5.2: a 64-bit length's most significant bit must be 0 (not 1009)
        struct.pack("!BBQ", 0x82, 0xFF, (1 << 63) | 5) + b"mask" + b"abcde",
        frame(1, b"frag", fin=False) + struct.pack("!BBQ", 0x80, 0xFF, 1 << 63) + b"mask",
    ],
)
@pytest.mark.parametrize("compression", [None, "deflate"])
def test_protocol_errors_are_1002(serve, data, compression):
    if compression and data[0] & 0x40:
        pytest.skip("RSV1 is the compressed-message bit under permessage-deflate")
    seen = []
    server = serve(closing_app(seen), compression=compression)
    extra = "Sec-WebSocket-Extensions: permessage-deflate\r\n" if compression else ""
    sock, head = handshake(server.port, extra=extra)
    assert (b"permessage-deflate" in head) == bool(compression)
    sock.sendall(data)
    assert read_close(sock)[0] == 1002
    wait_for(lambda: seen == [CloseStatus.PROTOCOL_ERROR])
    still_serves(server)


def test_handler_exception_after_upgrade_is_1011(serve):
    seen = []

    @with_channel
    def app(channel):
        if channel.environ["PATH_INFO"] == "/ok":
            return channel.on_receive(channel.send)
        channel.on_close(seen.append)
        channel.send("hi")
        raise RuntimeError("boom")

    server = serve(app)
    sock, _ = handshake(server.port)
    assert read_frame(sock) == (1, b"hi")
    assert read_close(sock)[0] == 1011
    wait_for(lambda: seen == [CloseStatus.INTERNAL_ERROR])
    ws = websocket.create_connection(ws_url(server, "/ok"), timeout=5)
    ws.send("fine")
    assert ws.recv() == "fine"


def test_handler_exception_before_upgrade_is_500(serve):
    server = serve(with_channel(lambda ch: 1 / 0))
    sock, head = handshake(server.port)
    assert head.startswith(b"HTTP/1.1 500")


def test_greenlet_style_receive_and_iteration(serve):
    @with_channel
    def app(channel):
        first = channel.receive(timeout=5)
        channel.send("first:" + first)
        for message in channel:
            channel.send("then:" + message)

    server = serve(app)
    ws = websocket.create_connection(ws_url(server), timeout=5)
    ws.send("a")
    ws.send("b")
    assert ws.recv() == "first:a"
    assert ws.recv() == "then:b"


def test_receive_timeout(serve):
    results = []

    @with_channel
    def app(channel):
        try:
            channel.receive(timeout=0.05)
        except TimeoutError:
            results.append("timeout")
        channel.send("done")

    server = serve(app)
    ws = websocket.create_connection(ws_url(server), timeout=5)
    assert ws.recv() == "done"
    assert results == ["timeout"]


def test_event_and_dict_on_websocket_send_text_body(serve):
    @with_channel
    def app(channel):
        channel.send(Event("evt", event="x"))
        channel.send({"status": 201, "body": "from dict"})

    server = serve(app)
    ws = websocket.create_connection(ws_url(server), timeout=5)
    assert ws.recv() == "evt"
    assert ws.recv() == "from dict"


def test_compression_negotiated_when_enabled(serve):
    server = serve(echo_app(), compression="deflate")
    sock, head = handshake(server.port, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n")
    assert b"permessage-deflate" in head.lower()
    plain = serve(echo_app())
    sock, head = handshake(plain.port, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n")
    assert b"permessage-deflate" not in head.lower()


def test_compressed_echo_roundtrip(serve):
    server = serve(echo_app(), compression="deflate")
    import websockets.sync.client as sync_client

    with sync_client.connect(ws_url(server), compression="deflate") as ws:
        ws.send("zip " * 1000)
        assert ws.recv(timeout=5) == "zip " * 1000


def test_data_right_after_handshake_is_not_lost(serve):
    server = serve(echo_app())
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        + frame(1, b"early")
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert read_frame(sock) == (1, b"early")
