"""Server life cycle: start, port, status, stop with 1001, signals, limits."""
import signal
import socket
import subprocess
import sys
import textwrap

import gevent
import requests
import websocket

from conftest import wait_for
from greenchan import CloseStatus, Event, Server, run_server, with_channel
from wsraw import handshake, read_close


def test_start_port_status_and_context_manager():
    app = with_channel(lambda ch: ch.send("hi"))
    server = Server(app, port=0)
    assert server.status == "stopped"
    with server:
        assert server.status == "running"
        assert server.port != 0
        assert requests.get(f"http://127.0.0.1:{server.port}/", timeout=5).text == "hi"
    assert server.status == "stopped"
    server.stop()  # idempotent


def test_run_server_returns_a_running_server():
    server = run_server(with_channel(lambda ch: ch.send("ok")), port=0)
    try:
        assert server.status == "running"
        assert requests.get(f"http://127.0.0.1:{server.port}/", timeout=5).text == "ok"
    finally:
        server.stop()


def test_stop_closes_every_channel_and_runs_every_on_close():
    closes = []

    @with_channel
    def app(channel):
        channel.on_close(lambda status: closes.append((channel.is_websocket, status)))
        if channel.environ["PATH_INFO"] == "/stream":
            channel.send(Event("first"))

    server = Server(app, port=0).start()
    base = f"127.0.0.1:{server.port}"
    clients = [websocket.create_connection(f"ws://{base}/", timeout=5) for _ in range(3)]
    polls = [gevent.spawn(requests.get, f"http://{base}/poll", timeout=5) for _ in range(2)]
    stream = requests.get(f"http://{base}/stream", stream=True, timeout=5)
    wait_for(lambda: len(server._channels) == 6)

    def answer_close(ws):
        opcode, payload = ws.recv_data(control_frame=True)
        return opcode, payload[:2]

    answers = [gevent.spawn(answer_close, ws) for ws in clients]
    server.stop(timeout=2)
    assert server.status == "stopped"
    for answer in answers:
        assert answer.get(timeout=5) == (websocket.ABNF.OPCODE_CLOSE, (1001).to_bytes(2, "big"))
    for poll in polls:
        assert poll.get(timeout=5).status_code == 204
    assert b"".join(stream.iter_content(None)) == b"data: first\n\n"
    wait_for(lambda: len(closes) == 6)
    assert all(status is CloseStatus.SERVER_CLOSE for _, status in closes)


def test_stop_cuts_clients_that_do_not_answer():
    closes = []
    server = Server(with_channel(lambda ch: ch.on_close(closes.append)), port=0).start()
    sock, _ = handshake(server.port)  # never answers the close frame
    wait_for(lambda: server._channels)
    server.stop(timeout=0.2)
    assert read_close(sock)[0] == 1001
    assert closes == [CloseStatus.SERVER_CLOSE]
    assert not server._channels


def test_sigterm_under_serve_forever_exits_zero(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(
        """
        from gevent import monkey; monkey.patch_all()
        import sys
        from greenchan import Server, with_channel
        @with_channel
        def app(channel):
            channel.on_close(lambda s: print("closed", s, flush=True))
        server = Server(app, port=0).start()
        print("port", server.port, flush=True)
        server.serve_forever()
        print("bye", flush=True)
        """
    ))
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline().split()[1])
            ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=5)
            proc.send_signal(sig)
            opcode, payload = ws.recv_data(control_frame=True)
            assert payload[:2] == (1001).to_bytes(2, "big")
            ws.close()
            assert proc.wait(timeout=10) == 0
            assert proc.stdout.read().split() == ["closed", "server-close", "bye"]
        finally:
            proc.kill()
            proc.wait()


def test_max_connections_answers_503_and_recovers(serve):
    server = serve(with_channel(lambda ch: ch.on_receive(ch.send)), max_connections=2)
    first = websocket.create_connection(f"ws://127.0.0.1:{server.port}/", timeout=5)
    second = websocket.create_connection(f"ws://127.0.0.1:{server.port}/", timeout=5)
    response = requests.get(f"http://127.0.0.1:{server.port}/", timeout=5)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    first.close()
    wait_for(lambda: server._connections < 2)
    third = websocket.create_connection(f"ws://127.0.0.1:{server.port}/", timeout=5)
    third.send("back")
    assert third.recv() == "back"
    second.close()


def test_silent_and_slow_header_clients_are_dropped(serve):
    server = serve(with_channel(lambda ch: ch.send("ok")), handshake_timeout=0.2)
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    slow.sendall(b"GET / HTTP/1.1\r\n")
    for _ in range(3):
        gevent.sleep(0.1)
        try:
            slow.sendall(b"X-Drip: 1\r\n")
        except OSError:
            break
    assert silent.recv(100) == b""
    assert slow.recv(100) == b""
    assert requests.get(f"http://127.0.0.1:{server.port}/", timeout=5).text == "ok"


def test_oversized_request_line_and_headers(serve):
    server = serve(with_channel(lambda ch: ch.send("ok")))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 414")
    assert requests.get(f"http://127.0.0.1:{server.port}/", timeout=5).text == "ok"


# -- every error response is followed by a graceful close ---------------------------


def _answer_while_sending(port, data):
    """Send ``data`` from another greenlet while reading; return what arrived before EOF.

    A server that closes with unread input resets the connection, and the reset
    can destroy its answer before the client reads it.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def send():
        try:
            sock.sendall(data)
        except OSError:
            pass

    sender = gevent.spawn(send)
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    except ConnectionResetError:
        return received + b"<reset>"
    finally:
        sender.kill()
        sock.close()


BIG_BODY = b"x" * (768 << 10)


def test_503_reaches_a_client_still_sending(serve):
    server = serve(with_channel(lambda ch: None), max_connections=1)
    holder = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    holder.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: server._channels)
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(BIG_BODY)
    for _ in range(3):
        assert _answer_while_sending(server.port, request + BIG_BODY).startswith(b"HTTP/1.1 503 ")
    holder.close()


def test_413_reaches_a_client_still_sending(serve):
    server = serve(with_channel(lambda ch: ch.send("ok")), max_body=1024)
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(BIG_BODY)
    for _ in range(3):
        assert _answer_while_sending(server.port, request + BIG_BODY).startswith(b"HTTP/1.1 413 ")


def test_400_for_a_bad_request_reaches_a_client_still_sending(serve):
    server = serve(with_channel(lambda ch: ch.send("ok")))
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
    for _ in range(3):
        assert _answer_while_sending(server.port, request + BIG_BODY).startswith(b"HTTP/1.1 400 ")


def test_answer_and_close_from_an_application(serve):
    from greenchan.server import answer_and_close

    def app(environ, start_response):
        answer_and_close(environ, b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        start_response("200 OK", [])  # dropped: the answer is written
        return [b"not sent"]

    server = serve(app)
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(BIG_BODY)
    received = _answer_while_sending(server.port, request + BIG_BODY)
    assert received == b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def test_slowloris_headers_and_body_are_cut(serve):
    """A request that trickles in never reaches the application, and frees its slot."""
    seen = []
    server = serve(with_channel(lambda ch: seen.append(ch)), handshake_timeout=0.3, max_connections=2)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    for trickle in (head[:-2], head + b"abc"):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        for i in range(len(trickle)):
            try:
                sock.sendall(trickle[i:i + 1])
            except OSError:
                break
            gevent.sleep(0.001)
        data = b""
        while True:
            chunk = sock.recv(1024)
            if not chunk:
                break
            data += chunk
        assert data == b"" or data.startswith(b"HTTP/1.1 408 ")
        sock.close()
    assert not seen
    wait_for(lambda: server._connections == 0)


def test_error_answers_reach_an_http_client_that_sends_its_body_first(serve):
    """requests sends the whole body before it reads: a reset would lose the answer."""
    server = serve(with_channel(lambda ch: ch.send("ok")), max_body=1024)
    base = f"http://127.0.0.1:{server.port}/"
    assert requests.post(base, data=BIG_BODY, timeout=5).status_code == 413
    chunks = (BIG_BODY[i:i + 65536] for i in range(0, len(BIG_BODY), 65536))
    assert requests.post(base, data=chunks, timeout=5).status_code == 413  # chunked
    assert requests.get(base, timeout=5).text == "ok"
