"""Every limit, hit over a real socket: what the client saw, what the application
saw, that nothing was logged at ERROR, and that the server still serves afterwards.

Limits already covered elsewhere (1009, 1007, 1002, keepalive, slowloris, 414, 413,
max_connections with one transport) are extended here, not repeated.
"""
import gc
import logging
import signal
import socket
import subprocess
import sys
import tracemalloc
import zlib

import gevent
import pytest
import requests
import websocket
from gevent.pool import Pool

from conftest import greenlet_count, rss_kib, wait_for
from greenchan import CloseStatus, with_channel
from wsraw import close_payload, frame, handshake, read_close, read_frame


# -- helpers -------------------------------------------------------------------


def recording_app(opened, closed, **route_options):
    """Echo; record each channel the handler got and each on_close status.
    ``/hold`` answers nothing (a long-poll that waits); others long-poll "ok"."""

    @with_channel(**route_options)
    def app(channel):
        opened.append(channel)
        channel.on_close(closed.append)
        if channel.is_websocket:
            channel.on_receive(channel.send)
        elif channel.environ["PATH_INFO"] != "/hold":
            channel.send("ok")

    return app


def still_serves(server):
    """A new WebSocket and a new HTTP request both work."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/", timeout=5)
    ws.send("still here")
    assert ws.recv() == "still here"
    ws.close()
    assert requests.get(f"http://127.0.0.1:{server.port}/", timeout=5).status_code == 200


def assert_no_errors(caplog, capfd):
    """Nothing at ERROR from greenchan or gevent, and no traceback on stderr."""
    errors = [
        r for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.split(".")[0] in ("greenchan", "gevent")
    ]
    assert errors == [], [r.getMessage() for r in errors]
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out


def raw_request(port, data, read_all=True):
    """Send raw bytes; return everything the server answered until it closed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(data)
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
            if not read_all and b"\r\n\r\n" in answer:
                break
        return answer
    finally:
        sock.close()


def status_of(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None




def tiny_frames(opcode, count, payload=b""):
    """``count`` masked frames with an all-zero mask (so the payload is as is):
    the first with ``opcode``, the rest continuations, none final."""
    head = bytes([opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload
    cont = bytes([0x00, 0x80 | len(payload)]) + b"\0\0\0\0" + payload
    return head + cont * (count - 1)


def deflate(data):
    """A permessage-deflate payload (RFC 7692: raw deflate, sync flush, tail removed)."""
    compressor = zlib.compressobj(wbits=-15)
    out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


# -- size limits -----------------------------------------------------------------


def test_header_block_too_large_is_431(serve, caplog, capfd):
    opened, closed = [], []
    server = serve(recording_app(opened, closed))
    port = server.port
    request = b"GET / HTTP/1.1\r\nHost: x\r\n"
    too_many = request + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n"
    one_long = request + b"X-Long: " + b"a" * (70 << 10) + b"\r\n\r\n"
    many_long = request + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1400) for i in range(50)) + b"\r\n"
    upgrade = (
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Cookie: " + b"c" * (65 << 10) + b"\r\n\r\n"
    )
    for data in (too_many, one_long, many_long, upgrade):
        answer = raw_request(port, data)
        assert status_of(answer) == 431, answer[:100]
        assert b"Connection: close" in answer
    assert opened == []
    # just under the limits: served
    under = request + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 1000) for i in range(60)) + b"\r\n"
    assert status_of(raw_request(port, under, read_all=False)) == 200
    assert status_of(raw_request(port, request + b"X-A: 1\r\n" * 98 + b"\r\n", read_all=False)) == 200
    wait_for(lambda: len(closed) == 2)
    still_serves(server)
    assert_no_errors(caplog, capfd)


def test_max_header_size_option(serve, caplog, capfd):
    opened, closed = [], []
    server = serve(recording_app(opened, closed), max_header_size=1024)
    answer = raw_request(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 1024 + b"\r\n\r\n")
    assert status_of(answer) == 431
    assert opened == []
    still_serves(server)
    assert_no_errors(caplog, capfd)


def test_fragment_flood_is_bounded_by_max_message_size(serve, caplog, capfd):
    opened, closed = [], []
    server = serve(recording_app(opened, closed, max_message_size=1000))
    sock, _ = handshake(server.port)
    sock.sendall(tiny_frames(2, 2000, b"x"))  # 2000 one-byte fragments, never final
    assert read_close(sock)[0] == 1009
    sock.close()
    wait_for(lambda: closed == [CloseStatus.MESSAGE_TOO_BIG])
    assert opened[0].close_code == 1009
    still_serves(server)
    assert_no_errors(caplog, capfd)


def _traced_peak(run):
    """Peak of Python-allocated memory (the in-process server's too) while ``run()`` runs."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = run()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, result


def test_fragment_floods_do_not_grow_memory(serve, caplog, capfd):
    """Tiny fragments are reassembled in one buffer: memory follows the bytes of the
    message, not the number of fragments, and empty fragments cost nothing."""
    server = serve(recording_app([], [], max_message_size=1 << 20), ping_interval=None)
    count = 64 << 10
    ones = tiny_frames(2, count, b"x") + frame(0, b"end")
    # As many empty fragments as one-byte ones: enough to show they cost no memory
    # (4x as many took over a minute under tracemalloc once every frame's header
    # is parsed by the reader before the engine, issue 10 #2).
    empties = tiny_frames(2, count) + frame(0, b"end")

    def echo(data):
        sock, _ = handshake(server.port)
        sock.settimeout(60)  # parsing frames one by one under tracemalloc is slow
        try:
            sender = gevent.spawn(sock.sendall, data)
            reply = read_frame(sock)
            sender.get(timeout=60)
            return reply
        finally:
            sock.close()

    peak, reply = _traced_peak(lambda: echo(ones))
    print(f"\n{count} one-byte fragments: echo of {len(reply[1])} bytes, traced peak {peak >> 10} KiB")
    assert reply == (2, b"x" * count + b"end")
    # Kept as a list of fragments, the same message peaked at 8 MiB.
    assert peak < 4 << 20
    peak, reply = _traced_peak(lambda: echo(empties))
    print(f"{count} empty fragments: traced peak {peak >> 10} KiB")
    assert reply == (2, b"end")
    assert peak < 4 << 20
    still_serves(server)
    assert_no_errors(caplog, capfd)


def _peak_rss_reset():
    """Reset VmHWM (Linux: clear_refs 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragmented"])
def test_deflate_bomb_is_1009_without_inflating_it(serve, caplog, capfd, fragmented):
    opened, closed = [], []
    server = serve(recording_app(opened, closed), compression="deflate", max_message_size=1 << 20)
    bomb = deflate(b"\0" * (10 << 20))
    assert len(bomb) < 20 << 10  # 10 MiB of zeros in about 10 KiB
    if fragmented:
        pieces = [bomb[i:i + 1024] for i in range(0, len(bomb), 1024)]
        data = frame(2, pieces[0], fin=False, rsv=4)
        data += b"".join(frame(0, p, fin=False) for p in pieces[1:-1]) + frame(0, pieces[-1])
    else:
        data = frame(2, bomb, rsv=4)
    sock, head = handshake(server.port, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n")
    assert b"permessage-deflate" in head
    gc.collect()
    rss_before = rss_kib()
    hwm_reset = _peak_rss_reset()
    hwm_before = _hwm_kib()

    def bomb_it():
        sock.sendall(data)
        return read_close(sock)

    peak, (code, _) = _traced_peak(bomb_it)
    hwm_after, rss_after = _hwm_kib(), rss_kib()
    sock.close()
    print(f"\nbomb of {len(bomb)} bytes (10 MiB inflated): traced peak {peak >> 10} KiB, "
          f"RSS {rss_before} -> {rss_after} KiB, peak RSS {hwm_before} -> {hwm_after} KiB (reset: {hwm_reset})")
    assert code == 1009
    wait_for(lambda: closed == [CloseStatus.MESSAGE_TOO_BIG])
    assert peak < 4 << 20  # at most max_message_size is ever inflated
    assert rss_after - rss_before < 8 << 10
    if hwm_reset:
        assert hwm_after - hwm_before < 8 << 10
    # a compressed message under the limit still goes through
    import websockets.sync.client as sync_client

    with sync_client.connect(f"ws://127.0.0.1:{server.port}/", compression="deflate") as ws:
        ws.send("zip " * 1000)
        assert ws.recv(timeout=5) == "zip " * 1000
    assert_no_errors(caplog, capfd)


# -- connection limits ---------------------------------------------------------------


def test_max_connections_counts_http_and_websocket_together(serve, caplog, capfd):
    opened, closed = [], []
    server = serve(recording_app(opened, closed), max_connections=3)
    port = server.port
    first = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=5)
    second = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=5)
    hold = socket.create_connection(("127.0.0.1", port), timeout=5)
    hold.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: len(opened) == 3)
    response = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    sock, head = handshake(port)
    assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head
    sock.close()
    assert len(opened) == 3  # the refused ones never reached the handler
    hold.close()  # a long-poll leaving frees a place for a WebSocket
    wait_for(lambda: server._connections < 3)
    third = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=5)
    third.send("in")
    assert third.recv() == "in"
    first.close()  # and a WebSocket leaving frees one for HTTP
    wait_for(lambda: server._connections < 3)
    assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "ok"
    second.close()
    third.close()
    wait_for(lambda: server._connections == 0 and not server._channels)
    wait_for(lambda: len(closed) == len(opened) == 5)
    assert_no_errors(caplog, capfd)


EMFILE_SERVER = """
import logging, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from gevent import monkey; monkey.patch_all()
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                    format="%(levelname)s %(name)s %(message)s")
from greenchan import Server, with_channel

@with_channel
def app(channel):
    if channel.environ["PATH_INFO"] != "/hold":
        channel.send("ok")

server = Server(app, port=0, handshake_timeout=30).start()
print("port", server.port, flush=True)
server.serve_forever()
"""


def test_emfile_does_not_kill_the_accept_loop(tmp_path):
    script = tmp_path / "emfile_server.py"
    script.write_text(EMFILE_SERVER)
    log_path = tmp_path / "stderr.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=log_file, text=True)
    socks = []
    try:
        port = int(proc.stdout.readline().split()[1])
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "ok"
        for _ in range(100):  # more than 64 descriptors: accept() fails with EMFILE
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)
        wait_for(lambda: "cannot accept connections" in log_path.read_text(), timeout=10)
        for sock in socks:
            sock.close()
        socks = []
        # the accept loop is alive: a new client is served once descriptors are free
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).text == "ok"
        wait_for(lambda: "accepting connections again" in log_path.read_text(), timeout=10)
        for _ in range(20):
            assert requests.get(f"http://127.0.0.1:{port}/", timeout=10).text == "ok"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        for sock in socks:
            sock.close()
        proc.kill()
        proc.wait()
        proc.stdout.close()
    log = log_path.read_text()
    print("\n" + "\n".join(line for line in log.splitlines() if "accept" in line))
    assert "Traceback" not in log
    assert not [line for line in log.splitlines() if line.startswith(("ERROR", "CRITICAL"))]


# -- floods ----------------------------------------------------------------------------


def test_ping_flood_every_ping_answered_in_order(serve, caplog, capfd):
    opened, closed = [], []
    server = serve(recording_app(opened, closed))
    sock, _ = handshake(server.port)
    count = 5000
    pings = b"".join(frame(9, b"%d" % i) for i in range(count))
    sender = gevent.spawn(sock.sendall, pings + frame(1, b"after the pings"))
    pongs = [read_frame(sock) for _ in range(count)]
    assert pongs == [(10, b"%d" % i) for i in range(count)]
    assert read_frame(sock) == (1, b"after the pings")
    sender.get(timeout=10)
    assert opened[0].is_open and closed == []
    sock.sendall(frame(8, close_payload(1000)))
    assert read_close(sock)[0] == 1000
    sock.close()
    wait_for(lambda: closed == [CloseStatus.NORMAL])
    assert_no_errors(caplog, capfd)


def test_ping_flood_without_reading_pongs_is_cut_as_slow_consumer(serve, caplog, capfd):
    opened, closed = [], []
    server = serve(recording_app(opened, closed), send_buffer=64 << 10, send_timeout=60)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a client that reads nothing
    sock.settimeout(5)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    batch = frame(9, b"p" * 125) * 1000
    sent = 0
    for _ in range(400):  # at most 50 MiB of pings
        if closed:
            break
        try:
            sock.sendall(batch)
        except OSError:
            break
        sent += len(batch)
    sock.close()
    wait_for(lambda: closed == [CloseStatus.SLOW_CONSUMER])
    print(f"\ncut after {sent >> 10} KiB of pings")
    assert opened[0].close_code == 1013
    still_serves(server)
    assert_no_errors(caplog, capfd)


def test_close_flood_gets_one_close_then_the_end(serve, caplog, capfd):
    opened, closed = [], []
    server = serve(recording_app(opened, closed))
    sock, _ = handshake(server.port)
    flood = frame(8, close_payload(1000, b"bye")) + frame(8, close_payload(1001)) * 2000
    sock.sendall(flood + frame(1, b"too late") * 100)
    frames = []
    while True:
        try:
            frames.append(read_frame(sock))
        except (EOFError, ConnectionResetError):
            break
    sock.close()
    assert frames == [(8, close_payload(1000, b"bye"))]
    wait_for(lambda: closed == [CloseStatus.NORMAL])
    assert (opened[0].close_code, opened[0].close_reason) == (1000, "bye")
    still_serves(server)
    assert_no_errors(caplog, capfd)


def _churn_one(port, kind):
    """One short-lived client of a given kind; returns True if it opened a channel."""
    if kind == 0:  # WebSocket, clean close handshake
        sock, head = handshake(port)
        sock.sendall(frame(1, b"hi"))
        assert read_frame(sock) == (1, b"hi")
        sock.sendall(frame(8, close_payload(1000)))
        assert read_close(sock)[0] == 1000
    elif kind == 1:  # WebSocket dropped without a close frame
        sock, head = handshake(port)
    elif kind == 2:  # a long-poll that waits, then the client goes away
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        gevent.sleep(0.001)
    elif kind == 3:  # a long-poll answered at once
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    elif kind == 4:  # connect and leave without a word
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    else:  # half a request line
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /ha")
    sock.close()
    return kind <= 3


def test_thousands_of_connects_and_disconnects(serve, caplog, capfd):
    opened, closed = [], []
    server = serve(recording_app(opened, closed))
    port = server.port
    still_serves(server)
    wait_for(lambda: server._connections == 0 and not server._channels)
    gc.collect()
    greenlets_before, rss_before = greenlet_count(), rss_kib()
    total = 2000
    pool = Pool(50)
    results = [pool.spawn(_churn_one, port, i % 6) for i in range(total)]
    pool.join(timeout=120, raise_error=True)
    assert all(r.successful() for r in results)
    expected = sum(1 for i in range(total) if i % 6 <= 3) + 2  # and still_serves: two
    wait_for(lambda: server._connections == 0 and not server._channels, timeout=10)
    wait_for(lambda: len(closed) == expected, timeout=10)
    assert len(opened) == expected
    assert all(not ch.is_open for ch in opened)
    # The test's own references (channels, the client greenlets) are not leaks.
    del results, pool, opened[:]
    gevent.sleep(0.5)  # let the last on_close and linger greenlets finish
    greenlets_after, rss_after = greenlet_count(), rss_kib()
    print(f"\n{total} connects: greenlets {greenlets_before} -> {greenlets_after}, "
          f"RSS {rss_before} -> {rss_after} KiB")
    assert greenlets_after <= greenlets_before + 5
    still_serves(server)
    assert_no_errors(caplog, capfd)


# -- bad input ---------------------------------------------------------------------------

UPGRADE = (
    "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Version: 13\r\n"
)
KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


@pytest.mark.parametrize(
    "data, status",
    [
        ((UPGRADE + "\r\n").encode(), 400),  # missing key
        ((UPGRADE + "Sec-WebSocket-Key: short\r\n\r\n").encode(), 400),
        ((UPGRADE.replace("Version: 13", "Version: 8") + KEY + "\r\n").encode(), 400),
        ((UPGRADE.replace("Upgrade: websocket\r\n", "Upgrade: h2c\r\n") + KEY + "\r\n").encode(), 200),
        (b"HELLO\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET / FTP/1.0\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /\r\n", 400),  # HTTP/0.9 as its clients send it: no headers follow
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n", 400),  # TLS
        (bytes(range(256)) * 4, 400),
        (b"\r\n\r\n\r\n", 400),  # blank lines
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\nx", 413),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcdefgh\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", 400),
    ],
    ids=[
        "ws-no-key", "ws-bad-key", "ws-version-8", "upgrade-h2c", "garbage-line", "four-words",
        "http2", "ftp", "http09-blank", "http09", "tls-hello", "binary-junk", "blank-lines",
        "huge-content-length", "negative-content-length", "text-content-length", "chunk-size-not-hex",
        "chunk-longer-than-size", "negative-chunk-size", "header-without-colon",
    ],
)
def test_malformed_requests_get_4xx_and_no_error_log(serve, caplog, capfd, data, status):
    opened, closed = [], []
    server = serve(recording_app(opened, closed), max_body=1 << 20, handshake_timeout=2)
    answer = raw_request(server.port, data, read_all=status != 200)
    assert status_of(answer) == status, answer[:200]
    if status != 200:
        assert all(not ch.is_websocket for ch in opened)
        assert not [ch for ch in opened if ch.environ.get("REQUEST_METHOD") == "POST"]
    still_serves(server)
    wait_for(lambda: server._connections == 0 and not server._channels)
    assert_no_errors(caplog, capfd)
