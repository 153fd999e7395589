"""Soak: thousands of WebSockets and long-polls opened, broadcast to and closed, in
batches; then memory, greenlets, channels and on_close calls must return to where
they started. Excluded from the default run: ``pytest -m soak tests/test_soak.py -s``.
"""
import gc
import resource
import socket
import time

import gevent
import pytest
from gevent.pool import Pool

from conftest import greenlet_count, rss_kib, wait_for
from greenchan import MemoryChannelStore, with_channel
from wsraw import close_payload, frame, handshake, read_frame

pytestmark = pytest.mark.soak

WEBSOCKETS, LONG_POLLS, BATCH = 5000, 1000, 500




def test_soak_websockets_and_long_polls(serve):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * BATCH + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * BATCH), hard))
    store = MemoryChannelStore()
    counts = {"opened": 0, "closed": 0}

    @with_channel
    def app(channel):
        counts["opened"] += 1
        channel.on_close(lambda status: counts.__setitem__("closed", counts["closed"] + 1))
        store.add_to_group("all", channel)
        if channel.is_websocket:
            channel.on_receive(channel.send)

    server = serve(app, ping_interval=None)
    port = server.port
    gc.collect()
    rss_before, greenlets_before = rss_kib(), greenlet_count()
    started = time.monotonic()

    def websocket_client(i):
        sock, head = handshake(port)
        try:
            assert head.startswith(b"HTTP/1.1 101")
            sock.sendall(frame(1, b"%d" % i))
            assert read_frame(sock) == (1, b"%d" % i)
            return sock
        except BaseException:
            sock.close()
            raise

    def long_poll_client():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /poll HTTP/1.1\r\nHost: x\r\n\r\n")
        return sock

    opened_ws = opened_polls = 0
    pool = Pool(100)
    while opened_ws < WEBSOCKETS:
        ws = pool.map(websocket_client, range(opened_ws, opened_ws + BATCH))
        opened_ws += BATCH
        polls = []
        if opened_polls < LONG_POLLS:
            polls = [long_poll_client() for _ in range(BATCH // 5)]
            opened_polls += len(polls)
        wait_for(lambda: len(store.members("all")) >= len(ws) + len(polls), timeout=30)
        # a broadcast: long-polls get a complete response and leave, WebSockets a message
        store.broadcast("all", "news")
        for sock in ws[: len(ws) // 2]:
            assert read_frame(sock) == (1, b"news")
        for sock in polls:
            sock.settimeout(10)
            data = b""
            while not data.endswith(b"news"):
                chunk = sock.recv(4096)
                assert chunk, data
                data += chunk
            sock.close()
        # churn: half leave with a close handshake, half just drop
        for n, sock in enumerate(ws):
            if n % 2 == 0:
                sock.sendall(frame(8, close_payload(1000)))
            sock.close()
        wait_for(lambda: not server._channels, timeout=60)
    wait_for(lambda: server._connections == 0 and not server._channels, timeout=60)
    wait_for(lambda: counts["closed"] == counts["opened"], timeout=30)
    duration = time.monotonic() - started
    gevent.sleep(1.5)  # idle sweeps (parked dispatchers) and lingering closes end
    gc.collect()
    rss_after, greenlets_after = rss_kib(), greenlet_count()
    print(
        f"\nsoak: {opened_ws} WebSockets + {opened_polls} long-polls in {duration:.1f} s; "
        f"on_close {counts['closed']} of {counts['opened']}; "
        f"RSS {rss_before >> 10} -> {rss_after >> 10} MiB; greenlets {greenlets_before} -> {greenlets_after}"
    )
    assert counts["opened"] == WEBSOCKETS + LONG_POLLS
    assert counts["closed"] == counts["opened"]
    assert not server._channels and server._connections == 0
    assert store.members("all") == {}
    assert greenlets_after <= greenlets_before + 5
    assert rss_after < rss_before + (50 << 10)
