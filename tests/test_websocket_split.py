"""A WebSocket stream means the same however TCP splits it (issue 10, defects 2, 6, 10).

Every frame sequence (text, binary, pings, pongs, closes, fragmented messages with
control frames between the fragments, compressed messages when permessage-deflate
is negotiated, oversized and invalid frames) is fed to the transport's ``_on_data``,
the function the server calls with each read, under every split of its bytes: at
every single offset, one byte per read, and at random cuts. What comes out (the
messages delivered to the channel, the bytes written back, the close code) must be
what websockets' engine alone makes of the whole stream in one piece, plus what
greenchan adds on top of it (UTF-8 checks, reassembly, 1002 for a 64-bit length
with its top bit set). A small ``max_queue`` and a handler that takes messages
only when reading has paused check the inbound limit on the way: the queue never
holds more than ``max_queue`` messages, and none is lost or reordered.
"""
from __future__ import annotations

import codecs
import re
import socket
import struct
from typing import Any, List, Optional, Tuple

import gevent
import gevent.event
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.exceptions import PayloadTooBig
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from conftest import wait_for
from greenchan import with_channel
from greenchan.channel import Channel
from greenchan.options import Options
from greenchan.server import UPGRADE_KEY
from greenchan.websocket import WebSocketTransport
from wsraw import handshake, read_frame

KEY = b"\x37\xfa\x21\x3d"
# Masks that read as a fast-path frame header (a binary frame of 4 bytes, a text
# frame of 4096, of 0): the bytes that fooled the old boundary check.
TRICKY_KEYS = [b"\x82\x84\x00\x00", b"\x81\xfe\x10\x00", b"\x81\x80\x00\x00", b"\x82\xff\x00\x00"]


# -- the transport without a socket ----------------------------------------------------


class FakeConnection:
    """What the transport needs of connection.Connection, recorded."""

    def __init__(self) -> None:
        self.out: List[bytes] = []
        self.paused = False
        self.closed = False
        self.lingered = False

    def write(self, data: Any, wait: bool = True, tail: Any = None) -> bool:
        self.out.append(bytes(data) + (bytes(tail) if tail is not None else b""))
        return True

    def linger_close(self, timeout: float) -> None:
        self.lingered = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.closed = True


class RecordingChannel(Channel):
    """A channel that remembers the longest its inbound queue ever got."""

    def _deliver(self, message: Any) -> bool:
        full = super()._deliver(message)
        self.longest = max(getattr(self, "longest", 0), len(self._queue))
        return full


class Config:
    """One server configuration and a client that negotiated with it."""

    def __init__(self, max_size: int, max_queue: int, compression: bool) -> None:
        self.options = Options(
            max_message_size=max_size, max_queue=max_queue, ping_interval=None,
            compression="deflate" if compression else None,
        )
        client = ClientProtocol(
            parse_uri("ws://test/"), extensions=[ClientPerMessageDeflateFactory()] if compression else None
        )
        request = client.connect()
        self.environ = {"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1", "PATH_INFO": "/"}
        for name, value in request.headers.raw_items():
            if name.lower() == "upgrade":
                self.environ[UPGRADE_KEY] = value
            else:
                self.environ["HTTP_" + name.upper().replace("-", "_")] = value
        transport, _, response = self.open()
        client.send_request(request)
        client.receive_data(response)
        assert client.handshake_exc is None
        self.extensions = client.extensions  # the client's side of permessage-deflate
        assert bool(self.extensions) == compression

    def open(self) -> Tuple[WebSocketTransport, FakeConnection, bytes]:
        """A transport past its handshake, as accept_now leaves it, on a fake socket."""
        transport = WebSocketTransport(dict(self.environ), None, None, self.options)
        assert transport.valid
        channel = RecordingChannel(dict(self.environ), transport, True, self.options.max_queue)
        transport.channel = channel
        response = transport._start_engine()
        transport.started = True
        transport.conn = conn = FakeConnection()
        channel._opened()
        return transport, conn, response

    def engine(self) -> Any:
        """websockets' engine alone, configured as the transport's (the reference)."""
        transport = WebSocketTransport(dict(self.environ), None, None, self.options)
        protocol = transport.protocol
        protocol.send_response(transport.response)
        protocol.parser = protocol.parse()
        next(protocol.parser)
        protocol.data_to_send()
        return protocol


# -- frames as a client writes them ----------------------------------------------------


def wire(frame: Frame, width: int = 0, key: bytes = KEY) -> bytes:
    """A masked client frame; ``width`` 16 or 64 forces a longer length encoding
    than needed (legal, and a different header size for the splitter)."""
    first = (0x80 if frame.fin else 0) | (0x40 if frame.rsv1 else 0) | (0x20 if frame.rsv2 else 0)
    first |= (0x10 if frame.rsv3 else 0) | frame.opcode.value
    payload = bytes(frame.data)
    n = len(payload)
    if n < 126 and width == 0:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536 and width in (0, 16):
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def raw(first: int, payload: bytes, mask: bool = True) -> bytes:
    """A frame with any first byte (opcode, FIN, RSV bits), masked or not."""
    head = struct.pack("!BB", first, (0x80 if mask else 0) | len(payload))
    if not mask:
        return head + payload
    return head + KEY + bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))


def top_bit(first: int = 0x82) -> bytes:
    """A 64-bit length with its most significant bit set (RFC 6455 5.2: invalid)."""
    return struct.pack("!BBQ", first, 0xFF, (1 << 63) | 5) + KEY + b"abcde"


def build(items: list, config: Config, keys: List[bytes] = (KEY,)) -> bytes:
    """The bytes of a list of items (see ``items`` below), compressed where
    negotiated, the frames masked with ``keys`` in turn."""
    ext = config.extensions[0] if config.extensions else None
    out: List[bytes] = []
    turn = iter(range(1 << 30))

    def masked(frame: Frame, width: int) -> bytes:
        return wire(frame, width, keys[next(turn) % len(keys)])

    for item in items:
        kind = item[0]
        if kind == "message":
            _, opcode, payload, cuts, between, width, compress = item
            bounds = [0] + sorted(c % (len(payload) + 1) for c in cuts) + [len(payload)]
            pieces = [payload[a:b] for a, b in zip(bounds, bounds[1:])]
            for i, piece in enumerate(pieces):
                frame = Frame(Opcode(opcode if i == 0 else 0), piece, fin=i == len(pieces) - 1)
                if ext is not None and compress:
                    frame = ext.encode(frame)
                out.append(masked(frame, width))
                if i < len(pieces) - 1 and i < len(between):
                    out.append(masked(Frame(Opcode(between[i][0]), between[i][1]), width))
        elif kind == "control":
            _, opcode, payload, width = item
            out.append(masked(Frame(Opcode(opcode), payload), width))
        else:  # "raw": bytes a client library would never write
            out.append(item[1])
    return b"".join(out)


text = st.text(max_size=40).map(str.encode)
maybe_text = st.one_of(text, st.binary(max_size=12))  # not always UTF-8
control = st.tuples(st.sampled_from([9, 10]), st.binary(max_size=12))
width = st.sampled_from([0, 0, 0, 16, 64])
message = st.tuples(
    st.just("message"),
    st.sampled_from([1, 2]),
    st.one_of(maybe_text, st.binary(max_size=40), st.integers(60, 140).map(lambda n: b"z" * n)),
    st.lists(st.integers(0, 200), max_size=3),  # where it is fragmented
    st.lists(control, max_size=3),  # control frames between the fragments
    width,
    st.sampled_from([True, True, False]),  # compressed, when negotiated
)
close_payload = st.one_of(
    st.builds(lambda c, r: struct.pack("!H", c) + r, st.sampled_from([1000, 1001, 3000, 4999, 1005, 999]),
              st.sampled_from([b"", b"bye", b"\xff"])),
    st.binary(max_size=1),
)
invalid = st.one_of(
    st.builds(raw, st.sampled_from([0x83, 0x87, 0x8B, 0x8F]), st.binary(max_size=6)),  # reserved opcodes
    st.builds(raw, st.sampled_from([0x91, 0xA2, 0xC1, 0xC0]), st.binary(max_size=6)),  # reserved bits
    st.builds(raw, st.sampled_from([0x81, 0x82, 0x89]), st.binary(max_size=6), mask=st.just(False)),
    st.builds(raw, st.just(0x09), st.binary(max_size=6)),  # a fragmented ping
    st.builds(raw, st.sampled_from([0x80, 0x00]), st.binary(max_size=6)),  # a continuation of nothing
    st.builds(lambda p: wire(Frame(Opcode.PING, p)), st.binary(min_size=126, max_size=130)),  # too long
    st.builds(top_bit, st.sampled_from([0x82, 0x81, 0x89, 0x80])),
    st.just(struct.pack("!BBQ", 0x82, 0xFF, 1 << 40) + KEY),  # far over max_size: 1009 at the header
    st.binary(min_size=1, max_size=12),  # noise
)
item = st.one_of(
    message, message, message,
    st.builds(lambda f, w: ("control", f[0], f[1], w), control, width),
    st.builds(lambda p: ("control", 8, p, 0), close_payload),
    st.builds(lambda b: ("raw", b), invalid),
)
items = st.lists(item, min_size=1, max_size=6)


# -- the reference: websockets' engine on the whole stream ---------------------------


class Outcome:
    """What a stream made: messages delivered, bytes written, how the channel closed."""

    def __init__(self, messages: list, pongs: list, close: Optional[int], written: Optional[bytes],
                 code: Optional[int], lingered: bool) -> None:
        self.messages = messages
        self.pongs = pongs
        self.close = close  # the code of the close frame written, if any
        self.written = written  # every byte written (None: only pongs and close compared)
        self.code = code  # the channel's close_code
        self.lingered = lingered

    def __repr__(self) -> str:
        return repr(self.__dict__)


def server_frames(data: bytes) -> List[Tuple[int, bytes]]:
    frames, pos = [], 0
    while pos < len(data):
        first, second = data[pos], data[pos + 1]
        length, pos = second & 0x7F, pos + 2
        if length == 126:
            (length,), pos = struct.unpack_from("!H", data, pos), pos + 2
        elif length == 127:
            (length,), pos = struct.unpack_from("!Q", data, pos), pos + 8
        frames.append((first & 0x0F, data[pos:pos + length]))
        pos += length
    return frames


def reference(stream: bytes, config: Config, eof: bool) -> Outcome:
    protocol = config.engine()
    protocol.receive_data(stream)
    if eof:
        protocol.receive_eof()
    messages: list = []
    pongs: list = []
    parts, decoder, failed = None, None, None
    for event in protocol.events_received():
        opcode = event.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            parts = bytearray()
            decoder = codecs.getincrementaldecoder("utf-8")() if opcode is Opcode.TEXT else None
        if opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            parts += event.data
            if decoder is not None:
                try:  # greenchan fails fast, fragment by fragment
                    decoder.decode(event.data, event.fin)
                except UnicodeDecodeError:
                    failed = 1007
                    break
            if event.fin:
                messages.append(bytes(parts).decode() if decoder is not None else bytes(parts))
        elif opcode is Opcode.PING:
            pongs.append(bytes(event.data))
    sent = protocol.data_to_send()
    exc = protocol.parser_exc
    if failed is None and isinstance(exc, PayloadTooBig) and any(int(n) >> 63 for n in re.findall(r"\d+", str(exc))):
        failed = 1002  # where websockets says 1009, RFC 6455 5.2 says protocol error
    if failed is not None:
        return Outcome(messages, pongs, failed, None, failed, True)
    if protocol.close_rcvd is not None:
        code = protocol.close_rcvd.code
    elif exc is not None:
        code = protocol.close_sent.code if protocol.close_sent is not None else 1006
    else:
        code = None
    written = b"".join(sent)
    closes = [p for op, p in server_frames(written) if op == 8]
    close = struct.unpack("!H", closes[0][:2])[0] if closes and len(closes[0]) >= 2 else None
    return Outcome(messages, pongs, close, written, code, b"" in sent)


def run(stream: bytes, pieces: List[bytes], config: Config, eof: bool) -> Outcome:
    """Feed ``pieces`` to a fresh transport as reads; a handler that takes messages
    only when the transport paused reading (the slowest handler that ever reads)."""
    transport, conn, _ = config.open()
    channel = transport.channel
    got: list = []

    def take_all() -> None:
        while channel._queue:
            got.append(channel.receive())

    def drain() -> None:
        for _ in range(len(stream) + 10):
            if not conn.paused:
                return
            take_all()
            gevent.sleep(0)  # the hub runs the transport's resume callback
        raise AssertionError("reading stayed paused with nothing left to take")

    for piece in pieces:
        drain()
        before = transport._reader.unparsed
        transport._on_data(piece)
        assert channel.__dict__.get("longest", 0) <= config.options.max_queue
        # What is kept is at most this read beyond what was kept before it.
        assert transport._reader.unparsed <= before + len(piece)
        if transport._reader.unparsed and not transport._reader.left:
            assert transport.protocol.reader.buffer == b""  # the engine idles at a boundary
    drain()
    take_all()
    if eof:
        transport._on_data(b"")
    frames = server_frames(b"".join(conn.out))
    written = b"".join(conn.out)
    assert {op for op, _ in frames} <= {8, 10}
    closes = [p for op, p in frames if op == 8]
    assert len(closes) <= 1 and (not closes or frames[-1][0] == 8)
    close = struct.unpack("!H", closes[0][:2])[0] if closes and len(closes[0]) >= 2 else None
    pongs = [p for op, p in frames if op == 10]
    return Outcome(got, pongs, close, written, channel.close_code, conn.lingered)


def check(stream: bytes, pieces: List[bytes], config: Config, eof: bool, expected: Outcome) -> None:
    got = run(stream, pieces, config, eof)
    where = (stream, [len(p) for p in pieces])
    assert got.messages == expected.messages, where
    assert got.pongs == expected.pongs, where
    assert got.close == expected.close, where
    assert got.code == expected.code, where
    assert got.lingered == expected.lingered, where
    if expected.written is not None:
        assert got.written == expected.written, where


def every_split(stream: bytes, config: Config, eof: bool, cuts: List[int] = ()) -> None:
    """Whole, one byte per read, cut once at every offset, and cut at ``cuts``."""
    expected = reference(stream, config, eof)
    check(stream, [stream], config, eof, expected)
    check(stream, [stream[i:i + 1] for i in range(len(stream))], config, eof, expected)
    for i in range(1, len(stream)):
        check(stream, [stream[:i], stream[i:]], config, eof, expected)
    if cuts:
        bounds = sorted({0, len(stream)} | {c % (len(stream) + 1) for c in cuts})
        check(stream, [stream[a:b] for a, b in zip(bounds, bounds[1:])], config, eof, expected)


CONFIGS = {
    (max_size, max_queue, compression): Config(max_size, max_queue, compression)
    for max_size in (100, 1 << 20)
    for max_queue in (1, 3, 1000)
    for compression in (False, True)
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=items,
    config=st.sampled_from(sorted(CONFIGS)),
    eof=st.booleans(),
    cuts=st.lists(st.integers(0, 2000), max_size=12),
    keys=st.lists(st.sampled_from([KEY] + TRICKY_KEYS), min_size=1, max_size=3),
)
def test_every_split_of_every_sequence_matches_the_engine(items, config, eof, cuts, keys):
    config = CONFIGS[config]
    stream = build(items, config, keys)
    every_split(stream, config, eof, cuts)


# -- the cases the issue names, and the ones found while attacking the fix ----------------


def test_a_ping_split_after_its_header_gets_its_own_pong():
    """Issue 10: the engine took the header, then the fast path read the mask and
    payload as a new frame: a corrupted pong and a binary message never sent."""
    config = CONFIGS[(1 << 20, 1000, False)]
    for key in TRICKY_KEYS:
        ping = wire(Frame(Opcode.PING, b"are you there?"), key=key)
        transport, conn, _ = config.open()
        transport._on_data(ping[:2])
        transport._on_data(ping[2:])
        assert server_frames(b"".join(conn.out)) == [(10, b"are you there?")]
        assert not transport.channel._queue
        every_split(ping + wire(Frame(Opcode.TEXT, b"after"), key=key), config, eof=False)


def test_fragmented_messages_written_header_then_payload_never_hang():
    """Issue 10: 500 fragmented messages, each frame's header in one read and the
    rest in the next; every message arrives."""
    config = CONFIGS[(1 << 20, 1000, False)]
    transport, conn, _ = config.open()
    got = []
    for i in range(500):
        for frame in (Frame(Opcode.TEXT, b"part-", fin=False), Frame(Opcode.CONT, str(i).encode())):
            data = wire(frame, key=TRICKY_KEYS[i % len(TRICKY_KEYS)])
            transport._on_data(data[:2])
            transport._on_data(data[2:])
        while transport.channel._queue:
            got.append(transport.channel.receive())
    assert got == [f"part-{i}" for i in range(500)]
    assert transport.channel.is_open


@pytest.mark.parametrize("compression", [False, True])
def test_attacks_under_every_split(compression):
    """Hand-made streams: pipelined frames after a close, a ping inside a fragmented
    message, control frames between fragments, lengths in every encoding."""
    config = CONFIGS[(100, 3, compression)]
    ext = config.extensions[0] if config.extensions else None

    def f(opcode, payload, fin=True, width=0):
        frame = Frame(Opcode(opcode), payload, fin=fin)
        if ext is not None and opcode in (0, 1, 2):
            frame = ext.encode(frame)
        return wire(frame, width)

    close = f(8, struct.pack("!H", 1000) + b"bye")
    streams = [
        f(1, b"one") + close + f(1, b"after close") + f(9, b"no pong"),
        f(1, b"fr", fin=False) + f(9, b"mid", width=64) + f(0, b"ag", fin=False) + f(10, b"") + f(0, b"ment"),
        f(2, b"x" * 60, fin=False, width=16) + f(0, b"y" * 50),  # 110 > max_size: 1009
        f(1, b"a") + f(1, b"b") + f(1, b"c") + f(1, b"d") + f(1, b"e", width=64) + f(9, b"p"),
        f(1, b"bad \xff utf-8") + f(9, b"not answered") + f(1, b"dropped"),
        f(1, b"ok", fin=False) + f(9, b"answered") + f(0, b"\xc3", fin=False) + f(0, b"\x28"),
        f(1, b"then") + top_bit(),
        f(1, b"frag", fin=False) + top_bit(0x80),
        f(2, b"") + f(1, b"", fin=False) + f(0, b"") + f(9, b"") + close,
    ]
    for stream in streams:
        for eof in (False, True):
            every_split(stream, config, eof)
    # Every pair of cuts of a short stream with a ping in a fragmented message.
    stream = streams[1]
    expected = reference(stream, config, False)
    for i in range(1, len(stream)):
        for j in range(i + 1, len(stream)):
            check(stream, [stream[:i], stream[i:j], stream[j:]], config, False, expected)


def test_a_64_bit_length_with_its_top_bit_set_is_a_protocol_error():
    """1002, not 1009, on the fast path, inside a fragmented message, with
    compression, and with no size limit (where websockets would wait for 2**63 bytes)."""
    for max_size in (100, None):
        for compression in (False, True):
            config = Config(max_size or 1 << 20, 16, compression)
            if max_size is None:
                config.options = config.options.replace(max_message_size=None)
            for stream in (top_bit(), wire(Frame(Opcode.TEXT, b"a", fin=False)) + top_bit(0x80), top_bit(0x89)):
                for pieces in ([stream], [stream[i:i + 1] for i in range(len(stream))]):
                    transport, conn, _ = config.open()
                    for piece in pieces:
                        transport._on_data(piece)
                    assert transport.channel.close_code == 1002, (stream, max_size, compression)
                    assert server_frames(b"".join(conn.out))[-1][1][:2] == struct.pack("!H", 1002)
                    assert conn.lingered


def test_max_queue_holds_within_one_read():
    """Issue 10: 8,192 messages in one read queued 8,192 with max_queue=16."""
    config = CONFIGS[(1 << 20, 3, False)]
    transport, conn, _ = config.open()
    stream = b"".join(wire(Frame(Opcode.BINARY, i.to_bytes(2, "big"))) for i in range(8192))
    assert len(stream) == 65536
    transport._on_data(stream)
    assert len(transport.channel._queue) == 3 and conn.paused
    assert transport._reader.unparsed == len(stream) - 3 * 8
    got = []
    for _ in range(10000):
        while transport.channel._queue:
            got.append(transport.channel.receive())
        gevent.sleep(0)
        assert transport.channel.longest <= 3
        if not conn.paused:
            break
    while transport.channel._queue:
        got.append(transport.channel.receive())
    assert got == [i.to_bytes(2, "big") for i in range(8192)]


def test_a_server_close_while_reading_is_paused_still_sees_the_clients_close():
    """The queue is full and the client's close is among the held bytes: the
    server's close must not wait for the handler (close_timeout) to find it."""
    config = CONFIGS[(1 << 20, 1, False)]
    transport, conn, _ = config.open()
    client_close = wire(Frame(Opcode.CLOSE, struct.pack("!H", 1000)))
    transport._on_data(b"".join(wire(Frame(Opcode.TEXT, b"m%d" % i)) for i in range(3)) + client_close)
    assert conn.paused and len(transport.channel._queue) == 1
    transport.close(4000, "server done")
    for _ in range(10):
        gevent.sleep(0)
    assert transport.protocol.close_rcvd is not None and transport.protocol.close_rcvd.code == 1000
    assert conn.lingered and not conn.paused
    assert transport._reader.unparsed == 0
    assert server_frames(b"".join(conn.out)) == [(8, struct.pack("!H", 4000) + b"server done")]
    transport._close_timer.stop()


def test_held_bytes_are_parsed_before_anything_read_later():
    """Between the handler taking a message and the resume callback, nothing new
    is read: the held bytes come first (the watcher restarts only after them)."""
    config = CONFIGS[(1 << 20, 3, False)]
    transport, conn, _ = config.open()
    transport._on_data(b"".join(wire(Frame(Opcode.BINARY, bytes([i]))) for i in range(10)))
    got = []
    for _ in range(20):
        assert conn.paused
        got.append(transport.channel.receive())
        assert conn.paused  # still paused until the callback has parsed the held bytes
        gevent.sleep(0)
        if not conn.paused:
            break
    while transport.channel._queue:
        got.append(transport.channel.receive())
    assert got == [bytes([i]) for i in range(10)]


# -- over real sockets ------------------------------------------------------------------


def _recording_app(messages):
    @with_channel(ping_interval=None)
    def app(channel):
        channel.on_receive(messages.append)
    return app


def test_a_ping_header_sent_alone_on_a_real_socket(serve):
    messages = []
    server = serve(_recording_app(messages))
    sock, head = handshake(server.port)
    assert head.startswith(b"HTTP/1.1 101")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(5):
        ping = wire(Frame(Opcode.PING, b"ping-%d" % i), key=b"\x81\x85\x00\x00")
        sock.sendall(ping[:2])
        gevent.sleep(0.02)  # most likely its own read; the test holds either way
        sock.sendall(ping[2:])
        assert read_frame(sock) == (10, b"ping-%d" % i)
    sock.sendall(wire(Frame(Opcode.TEXT, b"end")))
    wait_for(lambda: messages)
    assert messages == ["end"]


@pytest.mark.parametrize("style", ["receive", "on_receive"])
def test_max_queue_on_a_real_socket(serve, monkeypatch, style):
    """A handler that does not read, a client that writes 20,000 tiny messages:
    the queue never passes max_queue, and once the handler reads, all arrive in order."""
    longest = []
    original = Channel._deliver

    def deliver(self, message):
        full = original(self, message)
        if self.is_websocket:
            longest.append(len(self._queue))
        return full

    monkeypatch.setattr(Channel, "_deliver", deliver)
    go = gevent.event.Event()
    received = []

    @with_channel(ping_interval=None)
    def app(channel):
        channel.accept()
        if style == "on_receive":  # the first callback blocks the dispatcher
            def on_receive(message):
                go.wait(10)
                received.append(message)
            channel.on_receive(on_receive)
            return
        go.wait(10)
        for message in channel:
            received.append(message)

    server = serve(app, max_queue=16)
    sock, head = handshake(server.port)
    assert head.startswith(b"HTTP/1.1 101")
    stream = b"".join(wire(Frame(Opcode.BINARY, (i % 65536).to_bytes(2, "big"))) for i in range(20000))
    writer = gevent.spawn(sock.sendall, stream)
    wait_for(lambda: len(longest) >= 16)
    gevent.sleep(0.2)  # the server has read what TCP let through
    assert max(longest) <= 16
    go.set()
    writer.join(10)
    wait_for(lambda: len(received) == 20000, timeout=20)
    assert received == [(i % 65536).to_bytes(2, "big") for i in range(20000)]
    assert max(longest) <= 16


@pytest.mark.parametrize(
    "request_line, status",
    [("POST / HTTP/1.1", b"405"), ("PUT / HTTP/1.1", b"405"), ("GET / HTTP/1.0", b"505")],
)
def test_upgrade_needs_get_over_http_1_1(serve, request_line, status):
    calls = []
    server = serve(with_channel(calls.append))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(
        f"{request_line}\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n".encode()
    )
    response = b""
    for _ in range(100):
        chunk = sock.recv(65536)
        if not chunk:
            break
        response += chunk
    assert response.split(b"\r\n")[0].split(b" ")[1] == status, response
    if status == b"405":
        assert b"\r\nAllow: GET\r\n" in response
    assert calls == []
