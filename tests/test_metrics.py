"""Metrics: what a scrape reports matches the traffic a test made; the health check."""
import gevent
import pytest
import requests
import websocket

from conftest import wait_for
from greenchan import CloseStatus, Event, MemoryChannelStore, with_channel
from redis_server import redis_server  # noqa: F401  (a fixture)

metrics = pytest.importorskip("greenchan.metrics")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def scrape(server):
    text = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("greenchan_"):
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def delta(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def test_counts_match_the_traffic(serve):
    store = MemoryChannelStore()
    closes = []

    @with_channel
    def app(channel):
        path = channel.environ["PATH_INFO"]
        if path == "/metrics":
            channel.reject(404)
            return
        channel.on_close(closes.append)
        if path == "/sse":
            channel.send(Event("one"))
            channel.send(Event("two"))
            channel.close()
        elif path == "/poll":
            channel.send("answer")
        else:
            store.add_to_group("room", channel)
            channel.on_receive(lambda message: store.broadcast("room", message))

    def root(environ, start_response):
        if environ["PATH_INFO"] == "/metrics":
            return metrics.wsgi_app(environ, start_response)
        return app(environ, start_response)

    server = serve(root)
    before = scrape(server)
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws", timeout=5)
    ws.send("hello")  # 5 bytes in, broadcast back: 5 bytes out
    assert ws.recv() == "hello"
    assert requests.get(f"http://127.0.0.1:{server.port}/sse", headers={"Accept": "text/event-stream"}, timeout=5).ok
    assert requests.get(f"http://127.0.0.1:{server.port}/poll", timeout=5).text == "answer"
    refused = requests.post(f"http://127.0.0.1:{server.port}/poll", data="x", headers={"Origin": "http://evil.example"}, timeout=5)
    assert refused.status_code == 403
    wait_for(lambda: len(closes) == 2)
    during = scrape(server)
    assert delta(before, during, "greenchan_channels_open", transport="websocket") == 1
    ws.close()
    wait_for(lambda: len(closes) == 3)
    after = scrape(server)
    assert delta(before, after, "greenchan_channels_opened_total", transport="websocket") == 1
    assert delta(before, after, "greenchan_channels_opened_total", transport="sse") == 1
    assert delta(before, after, "greenchan_channels_opened_total", transport="longpoll") == 1
    assert delta(before, after, "greenchan_channels_open", transport="websocket") == 0
    assert delta(before, after, "greenchan_channels_closed_total", transport="websocket", status="normal") == 1
    assert delta(before, after, "greenchan_channels_closed_total", transport="sse", status="server-close") == 1
    assert delta(before, after, "greenchan_messages_received_total", transport="websocket") == 1
    assert delta(before, after, "greenchan_bytes_received_total", transport="websocket") == 5
    assert delta(before, after, "greenchan_messages_sent_total", transport="websocket") == 1
    assert delta(before, after, "greenchan_messages_sent_total", transport="sse") == 2
    assert delta(before, after, "greenchan_bytes_sent_total", transport="longpoll") == len("answer")
    assert delta(before, after, "greenchan_rejected_total", reason="origin") == 1
    assert delta(before, after, "greenchan_broadcasts_total", store="MemoryChannelStore") == 1
    assert delta(before, after, "greenchan_broadcast_seconds_count", store="MemoryChannelStore") == 1


def test_slow_consumer_is_counted(serve):
    from wsraw import handshake

    done = []

    @with_channel
    def app(channel):
        channel.on_close(done.append)
        for _ in range(200):
            if not channel.send("x" * 65536):
                break

    server = serve(app, send_buffer=64 * 1024, send_timeout=0.2)
    scraper = serve(metrics.wsgi_app)
    before = scrape(scraper)
    sock, _ = handshake(server.port, "/")  # never reads
    wait_for(lambda: done)
    assert done == [CloseStatus.SLOW_CONSUMER]
    after = scrape(scraper)
    assert delta(before, after, "greenchan_channels_closed_total", transport="websocket", status="slow-consumer") == 1
    sock.close()


def test_access_log_line(serve, caplog):
    import logging

    access = logging.getLogger("greenchan.access")
    handler = logging.Handler()
    lines = []
    handler.emit = lambda record: lines.append(record.getMessage())
    access.addHandler(handler)
    try:
        server = serve(with_channel(lambda channel: channel.send("hi there")))
        requests.get(f"http://127.0.0.1:{server.port}/some%20path?q=1", timeout=5)
        wait_for(lambda: lines)
    finally:
        access.removeHandler(handler)
    fields = dict(part.split("=", 1) for part in lines[0].split())
    assert fields["transport"] == "longpoll" and fields["status"] == "server-close"
    assert fields["path"] == "/some%20path" and fields["messages_out"] == "1" and fields["bytes_out"] == "8"
    assert fields["peer"].startswith("127.0.0.1:")


def test_health_flips_to_503_during_stop(serve):
    from greenchan import Server

    blocker = gevent.event.Event()

    @with_channel
    def app(channel):
        blocker.wait(5)  # a handler that keeps stop() waiting

    server = serve(app)
    health = serve(metrics.health_app)
    assert requests.get(f"http://127.0.0.1:{health.port}/", timeout=5).json()["status"] == "serving"
    gevent.spawn(lambda: requests.get(f"http://127.0.0.1:{server.port}/", timeout=10))
    gevent.sleep(0.2)
    stopper = gevent.spawn(server.stop, 5)
    gevent.sleep(0.2)
    response = requests.get(f"http://127.0.0.1:{health.port}/", timeout=5)
    assert response.status_code == 503 and response.json()["status"] == "stopping"
    blocker.set()
    stopper.join(10)
    assert isinstance(server, Server)


def test_resumes_and_store_up(serve, redis_server):  # noqa: F811
    from greenchan import RedisChannelStore

    store = MemoryChannelStore(history=10)
    joined = []

    @with_channel
    def app(channel):
        joined.append(store.add_to_group("g", channel, since=channel.environ.get("HTTP_X_SINCE")))
        channel.close()

    server = serve(app)
    scraper = serve(metrics.wsgi_app)
    redis_store = RedisChannelStore(redis_server.url)
    redis_store.broadcast("nobody", "x")  # connects
    store.broadcast("g", "one")
    first_id = store.history("g")[0][0]
    before = scrape(scraper)
    requests.get(f"http://127.0.0.1:{server.port}/", headers={"X-Since": first_id}, timeout=5)
    requests.get(f"http://127.0.0.1:{server.port}/", headers={"X-Since": "not-an-id"}, timeout=5)
    after = scrape(scraper)
    assert joined == [True, False]
    assert delta(before, after, "greenchan_resumes_total", recovered="true") == 1
    assert delta(before, after, "greenchan_resumes_total", recovered="false") == 1
    assert after[("greenchan_store_up", (("store", "RedisChannelStore"),))] == 1
    redis_store.close()
