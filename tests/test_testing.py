"""greenchan.testing: the test client, over every transport, session and plain."""
import subprocess
import sys
import textwrap

import pytest

from greenchan import ChannelClosed, CloseStatus, Event, MemoryChannelStore, Server, with_channel
from greenchan.testing import Rejected, TestClient, wait_for

SESSION_TRANSPORTS = ["websocket", "sse", "longpoll"]


class Echo:
    """Greets once per channel, numbers and echoes messages, records what the server saw."""

    def __init__(self):
        self.channels = []
        self.closed = []

    def app(self):
        @with_channel
        def handler(channel):
            self.channels.append(channel)
            count = [0]
            channel.send("welcome")

            def on_receive(message):
                count[0] += 1
                channel.send(f"{count[0]}:{message}" if isinstance(message, str) else message)

            channel.on_receive(on_receive)
            channel.on_close(self.closed.append)

        return handler


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_session_echo_over_each_transport(transport):
    echo = Echo()
    with TestClient(echo.app(), transport=transport) as client:
        assert client.receive(timeout=5) == "welcome"
        client.send("hi")
        assert client.receive(timeout=5) == "1:hi"
        client.send(b"\x00\xffbinary")
        assert client.receive(timeout=5) == b"\x00\xffbinary"
        assert client.channel is echo.channels[0]
        assert client.channel.session == client.session
        assert client.channel.transport == transport
    assert client.close_status is CloseStatus.NORMAL and client.close_code == 1000
    assert echo.closed == [CloseStatus.NORMAL]
    assert len(echo.channels) == 1  # one session: the handler ran once


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_session_carries_every_message_exactly(transport):
    got = []

    @with_channel
    def app(channel):
        channel.on_receive(got.append)
        for message in ("\x00not a control", "cr\rlf\n", "é \u2028 end", b"", b"\x00\x01", "x" * 100_000):
            channel.send(message)

    with TestClient(app, transport=transport) as client:
        assert [client.receive(timeout=5) for _ in range(6)] == [
            "\x00not a control", "cr\rlf\n", "é \u2028 end", b"", b"\x00\x01", "x" * 100_000]
        for message in ("\x00\x00twice", "plain", b"\x00"):
            client.send(message)
        wait_for(lambda: len(got) == 3)
    assert got == ["\x00\x00twice", "plain", b"\x00"]


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_many_messages_both_ways_are_acknowledged(serve, transport):
    """More frames than one acknowledgement covers: the server keeps only what is unacknowledged."""
    echo = Echo()
    server = serve(echo.app())
    with TestClient(server, transport=transport) as client:
        assert client.receive(timeout=5) == "welcome"
        for i in range(40):
            client.send(str(i))
        assert [client.receive(timeout=5) for _ in range(40)] == [f"{i + 1}:{i}" for i in range(40)]
        if transport != "longpoll":  # a long-poll acknowledges with its next poll
            wait_for(lambda: client.channel._transport._base == 41)
        assert client.hello["sid"] == client.channel._transport.sid


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_sends_from_several_greenlets_arrive_once_each(serve, transport):
    import gevent

    got = []

    @with_channel
    def app(channel):
        channel.on_receive(got.append)

    server = serve(app)
    with TestClient(server, transport=transport) as client:
        senders = [gevent.spawn(client.send, f"{g}.{i}") for g in range(4) for i in range(5)]
        gevent.joinall(senders, timeout=10, raise_error=True)
        wait_for(lambda: len(got) == 20)
    assert sorted(got) == sorted(f"{g}.{i}" for g in range(4) for i in range(5))


def test_one_session_across_transports_and_drops(serve):
    """What test_sessions.py spells out with raw requests, in a few lines."""
    echo = Echo()
    server = serve(echo.app(), session_grace=10)
    with TestClient(server, transport="longpoll") as client:
        assert client.receive(timeout=5) == "welcome"
        client.send("lp")
        assert client.receive(timeout=5) == "1:lp"
        client.reconnect("websocket")
        client.send("ws")
        assert client.receive(timeout=5) == "2:ws"
        client.reconnect("sse")
        echo.channels[0].send("while switching")
        assert client.receive(timeout=5) == "while switching"
        assert client.channel.transport == "sse"
        assert client.hello["new"] is False
    assert len(echo.channels) == 1 and echo.closed == [CloseStatus.NORMAL]


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_session_resumes_what_was_sent_while_away(serve, transport):
    echo = Echo()
    server = serve(echo.app(), session_grace=10)
    with TestClient(server, transport=transport) as client:
        assert client.receive(timeout=5) == "welcome"
        client.drop()  # the network fails: no close frame, no gc_close
        channel = echo.channels[0]
        wait_for(lambda: channel._transport.state == "detached")
        with pytest.raises(ChannelClosed):
            client.receive(timeout=5)
        assert client.dropped and channel.is_open
        assert channel.send("away 1") and channel.send("away 2")
        client.reconnect()
        assert [client.receive(timeout=5), client.receive(timeout=5)] == ["away 1", "away 2"]
    assert len(echo.channels) == 1


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_session_closed_by_the_server(transport):
    @with_channel
    def app(channel):
        channel.send("bye soon")
        channel.on_receive(lambda message: channel.close(4000, "bye"))

    with TestClient(app, transport=transport) as client:
        assert client.receive(timeout=5) == "bye soon"
        client.send("go")
        with pytest.raises(ChannelClosed) as closed:
            client.receive(timeout=5)
        assert closed.value.status is CloseStatus.SERVER_CLOSE
        assert (client.close_code, client.close_reason) == (4000, "bye")
        assert not client.is_open
        with pytest.raises(ChannelClosed):
            client.send("too late")


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_handler_error_is_internal_error(transport):
    @with_channel
    def app(channel):
        channel.send("before")
        channel.on_receive(lambda message: 1 / 0)

    with TestClient(app, transport=transport) as client:
        assert client.receive(timeout=5) == "before"
        client.send("boom")
        with pytest.raises(ChannelClosed):
            client.receive(timeout=5)
        assert client.close_status is CloseStatus.INTERNAL_ERROR and client.close_code == 1011


@pytest.mark.parametrize("transport, session", [(t, True) for t in SESSION_TRANSPORTS] + [(t, False) for t in SESSION_TRANSPORTS + ["http"]])
def test_rejected_with_403(transport, session):
    @with_channel
    def app(channel):
        channel.reject(403, "members only")

    opens_at_once = transport == "websocket" or session  # it waits for the opening answer
    with pytest.raises(Rejected) as refused:
        with TestClient(app, transport=transport, session=session) as client:
            assert not opens_at_once
            client.receive(timeout=5)
    assert refused.value.status == 403 and refused.value.body == b"members only"


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_origin_refused_before_the_handler(transport):
    echo = Echo()
    with pytest.raises(Rejected) as refused:
        TestClient(echo.app(), transport=transport, headers={"Origin": "https://evil.example"})
    assert refused.value.status == 403 and echo.channels == []


def test_handler_that_raises_before_answering_is_a_500():
    @with_channel
    def app(channel):
        raise RuntimeError("broken")

    with pytest.raises(Rejected) as refused:
        TestClient(app, transport="sse")
    assert refused.value.status == 500


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS + ["http"])
def test_receive_times_out(transport):
    @with_channel
    def app(channel):
        if channel.session or channel.is_websocket:
            channel.send("only one")
        # a plain HTTP request waits: nothing is ever sent

    with TestClient(app, transport=transport) as client:
        if transport != "http":
            assert client.receive(timeout=5) == "only one"
        with pytest.raises(TimeoutError):
            client.receive(timeout=0.2)
        assert client.is_open


def test_plain_websocket():
    echo = Echo()
    with TestClient(echo.app(), transport="websocket", session=False) as client:
        assert client.receive(timeout=5) == "welcome"
        client.send("\x00raw")  # no session: nothing is escaped
        assert client.receive(timeout=5) == "1:\x00raw"
        client.send(b"\x01\x02")
        assert client.receive(timeout=5) == b"\x01\x02"
        assert client.channel.session is None and client.channel.is_websocket
        client.close(4001, "done")
    assert echo.closed == [CloseStatus.UNKNOWN] and client.close_code == 4001
    assert echo.channels[0].close_code == 4001


def test_plain_websocket_subprotocol_and_server_close():
    @with_channel(subprotocols=["chat.v2", "chat.v1"])
    def app(channel):
        channel.accept()  # negotiated by the handshake, which a send would start too
        channel.send(channel.subprotocol or "none")
        channel.close(4002, "enough")

    with TestClient(app, transport="websocket", session=False, subprotocols=["chat.v1"]) as client:
        assert client.subprotocol == "chat.v1" and client.status == 101
        assert list(client) == ["chat.v1"]
        assert (client.close_code, client.close_reason, client.close_status) == (4002, "enough", CloseStatus.SERVER_CLOSE)


def test_plain_sse_stream_and_post(serve):
    store = MemoryChannelStore()

    @with_channel
    def app(channel):
        if channel.environ["REQUEST_METHOD"] == "POST":
            store.broadcast("feed", Event(channel.receive(timeout=5), event="said"))
            channel.send("posted")
        else:
            channel.send(Event("hello", id="1"))
            store.add_to_group("feed", channel)

    server = serve(app)
    with TestClient(server, transport="sse", session=False) as client:
        assert client.receive(timeout=5) == "hello"
        assert client.last_event.id == "1" and client.last_event_id == "1"
        answer = client.send("hi there")
        assert answer.status == 200 and answer.body == b"posted"
        assert client.receive(timeout=5) == "hi there" and client.last_event.event == "said"
        assert client.channel.transport == "sse" and client.headers["Content-Type"] == "text/event-stream"
    assert client.close_status is CloseStatus.CLIENT_CLOSE


def test_plain_long_poll_polls_again(serve):
    """An http-kit style long-poll: each GET is a channel that a broadcast answers."""
    store = MemoryChannelStore()

    @with_channel
    def app(channel):
        store.add_to_group("news", channel)

    server = serve(app)
    with TestClient(server, transport="longpoll", session=False) as client:
        for message in ("first", "second", b"\x00bytes"):
            # what is sent between two polls is lost (no history): wait for the next one
            wait_for(lambda: client.channel in store.members("news"))
            store.broadcast("news", message)
            assert client.receive(timeout=5) == message


def test_plain_long_poll_resumes_with_history(serve):
    """A plain long-poll client sends Last-Event-ID: with history, nothing is lost between polls."""
    store = MemoryChannelStore(history=100)

    @with_channel
    def app(channel):
        store.add_to_group("news", channel, since=channel.last_event_id)

    server = serve(app)
    store.broadcast("news", "before")
    _, first_id = store.history("news")[0]
    with TestClient(server, transport="longpoll", session=False, last_event_id=first_id) as client:
        wait_for(lambda: client.channel in store.members("news"))
        for text in ("one", "two", "three"):  # sent faster than the client polls
            store.broadcast("news", text)
        assert [client.receive(timeout=5) for _ in range(3)] == ["one", "two", "three"]
        assert client.last_event_id == store.history("news")[-1][0]


def test_plain_sse_resumes_like_event_source(serve):
    """A plain EventSource-style client: the ids of a group with history, and
    Last-Event-ID on reconnect, so that what was sent meanwhile arrives."""
    store = MemoryChannelStore(history=100)

    @with_channel
    def app(channel):
        store.add_to_group("feed", channel, since=channel.last_event_id)
        channel.send(Event("", event="open"))  # starts the stream

    server = serve(app)
    with TestClient(server, transport="sse", session=False) as client:
        assert client.receive(timeout=5) == "" and client.last_event.event == "open"  # every event, named or not
        store.broadcast("feed", "one")
        assert client.receive(timeout=5) == "one"
        assert client.last_event_id == store.history("feed")[-1][0]
        client.drop()
        wait_for(lambda: not store.members("feed"))
        store.broadcast("feed", "two")
        store.broadcast("feed", "three")
        client.reconnect()
        assert [client.receive(timeout=5) for _ in range(3)] == ["two", "three", ""]  # replayed as it joins


def test_http_one_request():
    @with_channel
    def app(channel):
        path = channel.environ["PATH_INFO"]
        if path == "/whole":
            channel.send({"status": 201, "headers": {"X-Kind": "whole"}, "body": "all at once"})
        elif path == "/stream":
            for part in ("a", "b", "c"):
                channel.send(part, close=False)
            channel.close()
        elif path == "/echo":
            channel.send(b"got " + channel.receive(timeout=5))
        elif path == "/empty":
            channel.close()

    with Server(app, port=0) as server:
        whole = TestClient(server, "/whole", transport="http")
        assert list(whole) == ["all at once"] and whole.status == 201 and whole.headers["X-Kind"] == "whole"
        assert whole.close_status is CloseStatus.SERVER_CLOSE
        assert list(TestClient(server, "/stream", transport="http")) == ["a", "b", "c"]
        echo = TestClient(server, "/echo", transport="http", body=b"\x00\x01")
        assert echo.receive(timeout=5) == b"got \x00\x01"
        empty = TestClient(server, "/empty", transport="http")
        assert list(empty) == [] and empty.status == 204
        with pytest.raises(TypeError):
            echo.send("no second request")


def test_broadcast_reaches_every_kind_of_client(serve):
    store = MemoryChannelStore()

    @with_channel
    def app(channel):
        store.add_to_group("room", channel)
        channel.on_receive(lambda message: store.broadcast("room", message))

    server = serve(app)
    clients = [TestClient(server, transport=transport) for transport in SESSION_TRANSPORTS]
    clients.append(TestClient(server, transport="websocket", session=False))
    try:
        assert set(store.members("room")) == {client.channel for client in clients}
        store.broadcast("room", "to all")
        store.broadcast("room", b"\x00\x01")
        clients[1].send("from the sse client")
        for client in clients:
            assert [client.receive(timeout=5) for _ in range(3)] == ["to all", b"\x00\x01", "from the sse client"]
            with pytest.raises(TimeoutError):
                client.receive(timeout=0.1)  # once each, no more
        clients[0].close()
        assert clients[0].channel not in store.members("room")
    finally:
        for client in clients:
            client.close()
    assert store.members("room") == {}


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_server_stop_ends_clients(transport):
    echo = Echo()
    server = Server(echo.app(), port=0).start()
    with TestClient(server, transport=transport) as client:
        assert client.receive(timeout=5) == "welcome"
        server.stop(timeout=2)
        with pytest.raises(ChannelClosed):
            client.receive(timeout=5)
        assert client.channel.close_status is CloseStatus.SERVER_CLOSE
    assert echo.closed == [CloseStatus.SERVER_CLOSE]


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_server_stop_drops_every_session_client(transport):
    """A stopping server ends sessions with no close frame (docs/sessions.md), so
    that greenchan.js reconnects to the server that comes back: every client is
    dropped, never closed, whichever order stop() visits the channels in."""
    for _ in range(5):
        server = Server(Echo().app(), port=0).start()
        with TestClient(server, transport=transport) as client:
            assert client.receive(timeout=5) == "welcome"
            wait_for(lambda server=server: len(server._channels) == 2)  # the session and its carrier
            server.stop(timeout=2)
            with pytest.raises(ChannelClosed):
                client.receive(timeout=5)
            assert client.dropped
            if transport == "websocket":
                assert (client.close_code, client.close_reason) == (1001, "server shutting down")


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_server_elsewhere_by_url(serve, transport):
    """Given a URL the client has no channel handle; the close status comes from the wire."""
    @with_channel
    def app(channel):
        channel.send("hi")
        channel.on_receive(lambda message: channel.close(4000, "bye") if message == "quit" else channel.send(message))

    server = serve(app)
    with TestClient(f"ws://127.0.0.1:{server.port}/", transport=transport) as client:
        assert client.receive(timeout=5) == "hi" and client.channel is None
        client.send("quit")
        with pytest.raises(ChannelClosed):
            client.receive(timeout=5)
        assert client.close_status is CloseStatus.SERVER_CLOSE and client.close_code == 4000


def test_flask_route_with_a_path():
    flask = pytest.importorskip("flask")
    app = flask.Flask(__name__)

    @app.route("/rooms/<name>", methods=["GET", "POST"])
    @with_channel
    def room(channel, name):
        channel.send(f"welcome to {name}, {flask.request.args['user']}")

    for transport in SESSION_TRANSPORTS:
        with TestClient(app, "/rooms/lobby?user=ann", transport=transport) as client:
            assert client.receive(timeout=5) == "welcome to lobby, ann"


def test_wrong_use_is_told():
    echo = Echo()
    with pytest.raises(ValueError):
        TestClient(echo.app(), transport="carrier-pigeon")
    with pytest.raises(ValueError):
        TestClient(echo.app(), transport="http", session=True)
    with pytest.raises(ValueError):
        TestClient(echo.app(), transport="websocket", body="only for http")
    with pytest.raises(ValueError):
        TestClient(Server(echo.app(), port=0))  # not started
    with pytest.raises(TypeError):
        TestClient(42)
    with TestClient(echo.app()) as client:
        with pytest.raises(TypeError):
            client.send({"not": "a message"})


def test_works_without_monkey_patching(tmp_path):
    """The client uses gevent's sockets itself: an unpatched test process works too."""
    script = tmp_path / "unpatched.py"
    script.write_text(textwrap.dedent("""
        import socket
        from gevent import monkey
        from greenchan import with_channel
        from greenchan.testing import TestClient

        @with_channel
        def app(channel):
            channel.send("welcome")
            channel.on_receive(lambda message: channel.send("echo:" + message))

        for transport in ("websocket", "sse", "longpoll"):
            with TestClient(app, transport=transport) as client:
                assert client.receive(timeout=5) == "welcome"
                client.send("hi")
                assert client.receive(timeout=5) == "echo:hi"
        assert not monkey.is_module_patched("socket")
        print("ok")
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_new_session_resumes_its_groups_from_history(serve, transport):
    """The grace ran out while the client was away: a new session (the handler runs
    again) resumes the group from the ids the client sends (gc_last)."""
    store = MemoryChannelStore(history=100)
    started = []

    @with_channel
    def app(channel):
        started.append(channel)
        store.add_to_group("news", channel, since=channel.last_event_id)

    server = serve(app, session_grace=0.2)
    with TestClient(server, transport=transport) as client:
        store.broadcast("news", "one")
        assert client.receive(timeout=5) == "one"
        assert client.last_event_id == store.history("news")[-1][0]
        client.drop()
        wait_for(lambda: not started[0].is_open)  # the grace ran out: the session is gone
        store.broadcast("news", "two")
        store.broadcast("news", b"three")
        client.reconnect()
        assert client.hello["new"] is True and len(started) == 2
        assert [client.receive(timeout=5), client.receive(timeout=5)] == ["two", b"three"]


@pytest.mark.parametrize("transport", ["sse", "longpoll"])
def test_session_goes_on_after_a_body_too_large(serve, transport):
    """A message refused with 413 is not counted: the next one takes its number
    (as greenchan.js does), instead of skipping one and getting 409 forever."""
    got = []

    @with_channel
    def app(channel):
        channel.on_receive(got.append)

    server = serve(app, max_body=1000)
    with TestClient(server, transport=transport) as client:
        client.send("before")
        with pytest.raises(Rejected) as refused:
            client.send("x" * 2000)
        assert refused.value.status == 413
        client.send("after")
        wait_for(lambda: got == ["before", "after"])
        client.reconnect()  # nothing is sent twice
        client.send("last")
        wait_for(lambda: len(got) == 3)
    assert got == ["before", "after", "last"]


def test_session_goes_on_after_a_message_too_big(serve):
    """A WebSocket message over max_message_size closes the socket with 1009; the
    client drops it and numbers the next ones in its place (as greenchan.js does),
    so that reconnecting does not send it again and the session goes on."""
    got = []

    @with_channel
    def app(channel):
        channel.on_receive(got.append)

    server = serve(app, max_message_size=1000)
    with TestClient(server, transport="websocket") as client:
        client.send("before")
        client.send("x" * 2000)
        client.send("after")  # on the wire behind the big one: lost with the socket
        with pytest.raises(ChannelClosed):
            client.receive(timeout=5)
        assert client.dropped and client.close_code == 1009
        client.reconnect()
        client.send("last")
        wait_for(lambda: len(got) == 3)
        assert client.channel.is_open
    assert got == ["before", "after", "last"]


@pytest.mark.parametrize("transport", SESSION_TRANSPORTS)
def test_client_away_when_the_server_closed_learns_it(serve, transport):
    """The server closes a session while its client is between two requests (a
    long-poll between polls, any transport reconnecting): coming back, the client
    gets the close frame, and the handler does not run again."""
    echo = Echo()
    server = serve(echo.app(), session_grace=10)
    with TestClient(server, transport=transport) as client:
        assert client.receive(timeout=5) == "welcome"
        client.drop()
        channel = echo.channels[0]
        wait_for(lambda: channel._transport.state == "detached")
        channel.close(4000, "bye")
        client.reconnect()
        with pytest.raises(ChannelClosed):
            client.receive(timeout=5)
        assert (client.close_code, client.close_reason) == (4000, "bye")
    assert len(echo.channels) == 1
