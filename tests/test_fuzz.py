"""Property-based tests: random frame sequences against a live echo server.

Hypothesis builds sequences of WebSocket frames (valid text and binary messages,
fragments, pings in between, invalid opcodes, reserved bits, unmasked frames,
oversized frames, close frames, random bytes), sends them on a raw socket, and a
small reference model of RFC 6455 (as greenchan and websockets apply it) says what
must come back: the echoes in order and every pong for a valid sequence; the right
close code (1002, 1007, 1009) for an invalid one. After each example a new client
must still be served.
"""
import codecs
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenchan import Server, with_channel
from wsraw import close_payload, frame, handshake, read_frame

MAX = 1000  # the server's max_message_size: small, so that 1009 is reachable
EXTERNAL_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


@pytest.fixture(scope="module")
def server():
    @with_channel
    def echo(channel):
        channel.on_receive(channel.send)

    server = Server(echo, port=0, max_message_size=MAX, ping_interval=None, close_timeout=1).start()
    yield server
    server.stop(timeout=1)


# -- the reference model ----------------------------------------------------------


def model(stream):
    """What the server must answer to ``stream``.

    Returns ``(outcome, detail, echoes, pongs)``: ``outcome`` is "error" (detail:
    the close code), "close" (the client closed; detail: the close payload the
    server echoes), "open" (no error; detail: "frame" if the stream ends inside a
    frame, "message" inside a fragmented message, else None). ``echoes`` are the (opcode, payload) of the complete messages before
    the end, ``pongs`` the payloads of the pings before it.
    """
    pos, echoes, pongs = 0, [], []
    message = None  # (opcode, bytearray, utf-8 decoder or None) while fragmented

    def result(outcome, detail):
        return outcome, detail, echoes, pongs

    while True:
        if len(stream) - pos < 2:
            return result("open", "frame" if len(stream) > pos else "message" if message else None)
        b1, b2 = stream[pos], stream[pos + 1]
        opcode, fin, rsv = b1 & 0x0F, bool(b1 & 0x80), b1 & 0x70
        if opcode not in (0, 1, 2, 8, 9, 10):
            return result("error", 1002)
        if not b2 & 0x80:
            return result("error", 1002)  # a client frame must be masked
        length, head = b2 & 0x7F, 2
        if length == 126:
            if len(stream) - pos < 4:
                return result("open", "frame")
            length, head = struct.unpack("!H", stream[pos + 2:pos + 4])[0], 4
        elif length == 127:
            if len(stream) - pos < 10:
                return result("open", "frame")
            length, head = struct.unpack("!Q", stream[pos + 2:pos + 10])[0], 10
            if length >> 63:
                return result("error", 1002)  # RFC 6455 5.2: the top bit must be 0
        if length > MAX - (len(message[1]) if message else 0):
            return result("error", 1009)  # checked on the header, before the payload
        if len(stream) - pos < head + 4 + length:
            return result("open", "frame")
        key = stream[pos + head:pos + head + 4]
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(stream[pos + head + 4:pos + head + 4 + length]))
        pos += head + 4 + length
        if rsv:
            return result("error", 1002)
        if opcode >= 8:
            if length > 125 or not fin:
                return result("error", 1002)
            if opcode == 9:
                pongs.append(payload)
            elif opcode == 8:
                if len(payload) == 1:
                    return result("error", 1002)
                if len(payload) >= 2:
                    code = struct.unpack("!H", payload[:2])[0]
                    try:
                        payload[2:].decode()
                    except UnicodeDecodeError:
                        return result("error", 1007)
                    if not (code in EXTERNAL_CLOSE_CODES or 3000 <= code < 5000):
                        return result("error", 1002)
                return result("close", payload)  # inside a fragmented message too (RFC 6455 5.4)
            continue
        if opcode == 0:
            if message is None:
                return result("error", 1002)  # a continuation with nothing to continue
            first, buf, decoder = message
        else:
            if message is not None:
                return result("error", 1002)  # a new message inside a fragmented one
            first, buf = opcode, bytearray()
            decoder = codecs.getincrementaldecoder("utf-8")() if opcode == 1 else None
        buf += payload
        if decoder is not None:
            try:
                decoder.decode(payload, fin)
            except UnicodeDecodeError:
                # Fail fast, fragment by fragment, before any later frame
                # (greenchan parses frame by frame, whatever the reads).
                return result("error", 1007)
        if fin:
            echoes.append((first, bytes(buf)))
            message = None
        else:
            message = (first, buf, decoder)


# -- what hypothesis generates ------------------------------------------------------


def _frame(opcode, payload, fin=True, rsv=0, mask=True):
    return frame(opcode, payload, fin=fin, mask=mask, rsv=rsv)


text = st.text(max_size=60).map(str.encode)
blob = st.binary(max_size=200)
valid_frames = st.one_of(
    st.builds(_frame, st.just(1), text),
    st.builds(_frame, st.just(2), blob),
    st.builds(_frame, st.sampled_from([1, 2]), st.one_of(text, blob), fin=st.just(False)),
    st.builds(_frame, st.just(0), st.one_of(text, blob), fin=st.booleans()),
    st.builds(_frame, st.just(9), st.binary(max_size=125)),
    st.builds(_frame, st.just(10), st.binary(max_size=20)),
)
invalid_frames = st.one_of(
    st.builds(_frame, st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), st.binary(max_size=10)),
    st.builds(_frame, st.sampled_from([0, 1, 2, 9]), st.binary(max_size=10), rsv=st.integers(1, 7)),
    st.builds(_frame, st.sampled_from([1, 2, 9]), st.binary(max_size=10), mask=st.just(False)),
    st.builds(_frame, st.just(9), st.binary(min_size=126, max_size=130)),
    st.builds(_frame, st.just(9), st.binary(max_size=10), fin=st.just(False)),
    st.builds(_frame, st.just(1), st.binary(max_size=20)),  # text that may not be UTF-8
    st.builds(_frame, st.sampled_from([1, 2, 0]), st.integers(900, 1100).map(lambda n: b"x" * n), fin=st.booleans()),
    st.builds(
        _frame, st.just(8),
        st.one_of(
            st.builds(close_payload, st.sampled_from([1000, 1001, 1004, 1005, 1015, 999, 2999, 3000, 4999, 5000]),
                      st.sampled_from([b"", b"bye", b"\xff"])),
            st.binary(max_size=1),
        ),
    ),
    st.builds(lambda first: struct.pack("!BBQ", first, 0xFF, (1 << 63) | 3) + b"mask" + b"abc",
              st.sampled_from([0x81, 0x82, 0x89, 0x01, 0x80])),  # a 64-bit length with its top bit set
    st.binary(min_size=1, max_size=24),  # random bytes
)
sequences = st.lists(st.one_of(valid_frames, valid_frames, invalid_frames), min_size=1, max_size=10)


# -- the property ---------------------------------------------------------------------


def _read(sock):
    try:
        return read_frame(sock)
    except (EOFError, ConnectionResetError):
        return None


def _check_served(port):
    sock, head = handshake(port)
    try:
        assert head.startswith(b"HTTP/1.1 101")
        sock.sendall(frame(1, b"still serving"))
        assert read_frame(sock) == (1, b"still serving")
    finally:
        sock.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=sequences)
def test_frame_sequences_match_the_model(server, frames):
    stream = b"".join(frames)
    outcome, detail, echoes, pongs = model(stream)
    sock, head = handshake(server.port)
    assert head.startswith(b"HTTP/1.1 101")
    try:
        sock.sendall(stream)
        got_echoes, got_pongs = [], []
        if outcome == "open":
            # every message echoed and every ping answered, echoes in order
            while len(got_echoes) < len(echoes) or len(got_pongs) < len(pongs):
                received = _read(sock)
                assert received is not None, (got_echoes, got_pongs)
                opcode, payload = received
                (got_pongs if opcode == 10 else got_echoes).append(payload if opcode == 10 else received)
            assert got_echoes == echoes
            assert got_pongs == pongs
            if detail == "frame":  # the client leaves inside a frame, without a close
                sock.shutdown(socket.SHUT_WR)
                assert _read(sock) is None
            else:  # the close is echoed, inside a fragmented message too
                sock.sendall(frame(8, close_payload(1000)))
                expected = close_payload(1000)
                received = _read(sock)
                assert received is not None and received[0] == 8 and received[1][:2] == expected
                assert _read(sock) is None
            return
        # an error, or the client's own close: pongs, some echoes, then one close frame
        while True:
            received = _read(sock)
            assert received is not None, (outcome, detail, got_echoes, got_pongs)
            opcode, payload = received
            if opcode == 8:
                break
            (got_pongs if opcode == 10 else got_echoes).append(payload if opcode == 10 else received)
        assert got_echoes == echoes[:len(got_echoes)]  # the channel closed: later ones may be dropped
        assert got_pongs == pongs  # every ping before the end answered, none after it
        if outcome == "error":
            assert struct.unpack("!H", payload[:2])[0] == detail
        else:
            assert payload == detail
        assert _read(sock) is None  # and the connection ends
    finally:
        sock.close()
        _check_served(server.port)


def test_model_sanity():
    """The model itself, on hand-made cases."""
    assert model(frame(1, b"hi"))[:3] == ("open", None, [(1, b"hi")])
    assert model(frame(1, b"h", fin=False))[:2] == ("open", "message")
    assert model(frame(1, b"h", fin=False) + frame(8, close_payload(1000)))[:2] == ("close", close_payload(1000))
    assert model(frame(1, b"h", fin=False) + frame(9, b"p") + frame(0, b"i"))[2:] == ([(1, b"hi")], [b"p"])
    assert model(frame(1, b"\xff"))[:2] == ("error", 1007)
    assert model(frame(2, b"x" * 600, fin=False) + frame(0, b"x" * 401))[:2] == ("error", 1009)
    assert model(frame(3, b""))[:2] == ("error", 1002)
    assert model(frame(1, b"x", mask=False))[:2] == ("error", 1002)
    assert model(frame(8, close_payload(1000)))[:2] == ("close", close_payload(1000))
    assert model(frame(1, b"abc")[:-1])[:2] == ("open", "frame")
    assert model(frame(1, b"\xff") + frame(9, b"late") + frame(3, b""))[:2] == ("error", 1007)
    assert model(struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + b"mask")[:2] == ("error", 1002)
