"""Channel guarantees: order, late callbacks, one delivery at a time, close once."""
import gevent
import pytest
import websocket

from conftest import wait_for
from greenchan import ChannelClosed, CloseStatus, Event, with_channel


def ws(server, path="/"):
    return websocket.create_connection(f"ws://127.0.0.1:{server.port}{path}", timeout=5)


def test_messages_before_late_on_receive_are_kept_in_order(serve):
    got = []
    closes = []

    @with_channel
    def app(channel):
        channel.accept()
        gevent.sleep(0.1)  # messages arrive while no callback is set
        channel.on_receive(got.append)
        channel.on_close(lambda status: closes.append((status, list(got))))

    server = serve(app)
    client = ws(server)
    for i in range(10):
        client.send(str(i))
    client.close()
    wait_for(lambda: closes)
    assert got == [str(i) for i in range(10)]
    # on_close came after the last on_receive
    assert closes == [(CloseStatus.NORMAL, [str(i) for i in range(10)])]


def test_on_receive_calls_never_overlap(serve):
    active = []
    overlaps = []
    order = []

    @with_channel
    def app(channel):
        def slow(message):
            if active:
                overlaps.append(message)
            active.append(message)
            gevent.sleep(0.01)
            order.append(message)
            active.remove(message)

        channel.on_receive(slow)

    server = serve(app)
    client = ws(server)
    for i in range(20):
        client.send(str(i))
    wait_for(lambda: len(order) == 20)
    assert overlaps == []
    assert order == [str(i) for i in range(20)]


def test_full_inbound_queue_pauses_reading_without_losing_messages(serve):
    got = []

    @with_channel
    def app(channel):
        channel.accept()
        gevent.sleep(0.2)  # far more than max_queue messages arrive meanwhile
        for message in channel:
            got.append(message)

    server = serve(app, max_queue=4)
    client = ws(server)
    for i in range(100):
        client.send(str(i))
    client.close()
    wait_for(lambda: len(got) == 100)
    assert got == [str(i) for i in range(100)]


def test_on_close_runs_exactly_once_on_every_path(serve):
    calls = []

    @with_channel
    def app(channel):
        channel.on_close(lambda s: calls.append(s))
        path = channel.environ["PATH_INFO"]
        if path == "/server":
            channel.close()
            channel.close()
        elif path == "/error":
            raise RuntimeError("handler bug")

    server = serve(app)
    for path in ("/server", "/error"):
        try:
            client = ws(server, path)
            client.recv()
        except Exception:
            pass
    client = ws(server, "/client")
    client.close()
    wait_for(lambda: len(calls) == 3)
    gevent.sleep(0.1)
    assert sorted(calls) == sorted([CloseStatus.SERVER_CLOSE, CloseStatus.INTERNAL_ERROR, CloseStatus.NORMAL])


def test_on_close_registered_after_close_runs_at_once(serve):
    late = []

    @with_channel
    def app(channel):
        channel.close()
        channel.on_close(late.append)

    server = serve(app)
    client = ws(server)
    client.recv()
    wait_for(lambda: late == [CloseStatus.SERVER_CLOSE])


def test_callbacks_work_as_decorators_and_replace(serve):
    got = []

    @with_channel
    def app(channel):
        @channel.on_receive
        def first(message):
            got.append("first")

        @channel.on_receive
        def second(message):
            got.append("second:" + message)
            channel.send("ok")

        assert second.__name__ == "second"

    server = serve(app)
    client = ws(server)
    client.send("x")
    assert client.recv() == "ok"
    assert got == ["second:x"]


def test_concurrent_sends_never_interleave(serve):
    @with_channel
    def app(channel):
        def sender(tag):
            for _ in range(50):
                channel.send(tag * 20000)

        gevent.joinall([gevent.spawn(sender, t) for t in "abcd"])
        channel.close()

    server = serve(app)
    client = ws(server)
    counts = {}
    for _ in range(200):
        message = client.recv()
        assert len(set(message)) == 1 and len(message) == 20000
        counts[message[0]] = counts.get(message[0], 0) + 1
    assert counts == {t: 50 for t in "abcd"}


def test_send_on_closed_channel_returns_false(serve):
    kept = []

    @with_channel
    def app(channel):
        kept.append(channel)

    server = serve(app)
    client = ws(server)
    wait_for(lambda: kept)
    client.close()
    wait_for(lambda: not kept[0].is_open)
    assert kept[0].send("late") is False
    assert kept[0].send(Event("late")) is False
    assert kept[0].ping() is False
    with pytest.raises(ChannelClosed):
        kept[0].receive()


def test_send_rejects_unsupported_types(serve):
    errors = []

    @with_channel
    def app(channel):
        for bad in (42, None, ["list"], {"bogus": 1}):
            try:
                channel.send(bad)
            except TypeError as exc:
                errors.append(str(exc))
        channel.send("done")

    server = serve(app)
    assert ws(server).recv() == "done"
    assert len(errors) == 4


def test_channel_in_environ_and_attributes(serve):
    seen = {}

    @with_channel
    def app(channel):
        seen["same"] = channel.environ["greenchan.channel"] is channel
        seen["open"] = channel.is_open
        seen["status"] = channel.close_status
        channel.send("hi")

    server = serve(app)
    assert ws(server).recv() == "hi"
    assert seen == {"same": True, "open": True, "status": None}


def test_event_rejects_newline_in_fields():
    with pytest.raises(ValueError):
        Event("data", event="a\nb")


def test_close_status_values_are_http_kit_keywords():
    assert CloseStatus.SERVER_CLOSE == "server-close"
    assert CloseStatus.SLOW_CONSUMER.value == "slow-consumer"
    assert CloseStatus.from_code(1000) is CloseStatus.NORMAL
    assert CloseStatus.from_code(3000) is CloseStatus.UNKNOWN


def test_slow_consumer_websocket_is_closed_and_others_served(serve):
    seen = []

    @with_channel
    def app(channel):
        if channel.environ["PATH_INFO"] == "/flood":
            channel.on_close(seen.append)
            chunk = "x" * 65536
            for _ in range(200):
                if not channel.send(chunk):
                    break
        else:
            channel.on_receive(channel.send)

    server = serve(app, send_buffer=128 * 1024, send_timeout=0.2)
    from wsraw import handshake

    sock, _ = handshake(server.port, "/flood")  # never reads
    sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
    wait_for(lambda: seen == [CloseStatus.SLOW_CONSUMER])
    client = ws(server)
    client.send("alive")
    assert client.recv() == "alive"


def test_one_message_larger_than_the_send_buffer_is_sent_whole(serve):
    # The hard limit applies to the backlog, not to one legitimate message; and a
    # send that waits for the buffer to drain wakes up more than once.
    server = serve(with_channel(lambda ch: ch.on_receive(ch.send)), send_buffer=16 * 1024)
    client = ws(server)
    big = bytes(range(256)) * 4096  # 1 MiB
    for _ in range(3):
        client.send_binary(big)
        assert client.recv() == big


def _event_stream_data(text):
    """The data of each event, parsed as the HTML standard's EventSource does:
    lines end at CR, LF or CRLF only; data lines join with LF."""
    import re

    events, data = [], []
    for line in re.split(r"\r\n|\r|\n", text):
        if line == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    return events


@pytest.mark.parametrize(
    "text",
    ["a\u2028b", "a\u2029b", "a\x0cb", "a\x0bb", "a\x1cb\x1db\x1eb", "a\x85b", "line\n", "\n", "", "a\r\nb\rc\nd", "tab\there"],
)
def test_event_data_arrives_exactly_as_sent(serve, text):
    import requests

    @with_channel
    def app(channel):
        channel.send(Event(text))
        channel.close()

    server = serve(app)
    body = requests.get(f"http://127.0.0.1:{server.port}/", timeout=5).content.decode()
    expected = text.replace("\r\n", "\n").replace("\r", "\n")  # EventSource normalises these
    assert _event_stream_data(body) == [expected]


@pytest.mark.parametrize("transport", ["websocket", "stream"])
def test_concurrent_waiting_sends_reach_a_reading_client_whole(serve, transport):
    # 8 greenlets sending 300 KB each through a 1 MiB buffer: the senders wait
    # their turn; a client that reads at full speed is never cut as slow.
    closes = []

    @with_channel
    def app(channel):
        channel.on_close(closes.append)
        if not channel.is_websocket:
            channel.send({"headers": {"Content-Type": "application/octet-stream"}}, close=False)

        def sender(tag):
            for _ in range(20):
                assert channel.send(tag * 300_000)

        gevent.joinall([gevent.spawn(sender, t) for t in (b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h")], raise_error=True)
        channel.close()

    server = serve(app, send_buffer=1 << 20, send_timeout=10)
    total = 8 * 20 * 300_000
    if transport == "websocket":
        client = ws(server)
        got = b""
        for _ in range(160):
            got += client.recv()
    else:
        import requests

        got = requests.get(f"http://127.0.0.1:{server.port}/", timeout=30).content
    assert len(got) == total
    wait_for(lambda: closes)
    assert closes == [CloseStatus.SERVER_CLOSE]
