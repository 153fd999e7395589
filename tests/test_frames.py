"""The fast path of frames.py against websockets' engine: same bytes, same result."""
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from greenchan import frames


def client_frame(opcode, payload, fin=True, mask=True, rsv=0, key=b"\x01\x02\x03\x04"):
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if not mask:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def engine(max_size):
    protocol = ServerProtocol(max_size=max_size)
    protocol.state = State.OPEN
    protocol.parser = protocol.parse()
    next(protocol.parser)
    return protocol


one_frame = st.builds(
    client_frame,
    opcode=st.sampled_from([0, 1, 2, 3, 8, 9, 10]),
    payload=st.binary(max_size=300),
    fin=st.booleans(),
    mask=st.sampled_from([True, True, True, False]),
    rsv=st.sampled_from([0, 0, 0, 1, 4]),
    key=st.binary(min_size=4, max_size=4),
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(one_frame, max_size=6),
    st.integers(min_value=0, max_value=40),
    st.sampled_from([None, 200, 1 << 20]),
    st.integers(min_value=1, max_value=8),
)
def test_fast_path_agrees_with_the_engine(chunks, cut, max_size, limit):
    data = b"".join(chunks)
    data = data[: len(data) - cut] if cut < len(data) else data  # a split frame at the end
    fast, used, need = frames.parse_complete(data, 0, max_size, limit)
    assert len(fast) <= limit
    assert need == 0 or used + need > len(data)  # an incomplete frame needs more than is there
    protocol = engine(max_size)
    protocol.receive_data(data[:used])
    events = protocol.events_received()
    assert protocol.parser_exc is None
    assert [(e.opcode is Opcode.TEXT, bytes(e.data)) for e in events] == fast
    assert all(e.fin for e in events)
    # What the fast path leaves is exactly what the engine would see next.
    rest = engine(max_size)
    rest.receive_data(data)
    assert [(e.opcode, bytes(e.data)) for e in rest.events_received()][: len(fast)] == [
        (Opcode.TEXT if t else Opcode.BINARY, p) for t, p in fast
    ]


def read_all(reader, protocol, pieces, room=1 << 30):
    """Drive a FrameReader as the transport does; what came out, in order."""
    got = []
    for piece in pieces:
        if not piece:
            continue
        reader.feed(piece)
        while protocol.state is State.OPEN and protocol.parser_exc is None:
            kind, value = reader.next(room)
            if kind == frames.MORE:
                break
            if kind in (frames.MESSAGES, frames.MESSAGES_LAST):
                got.extend((Opcode.TEXT if t else Opcode.BINARY, p) for t, p in value)
            elif kind == frames.TOO_LONG:
                return got, "too long"
            else:
                protocol.receive_data(value)
                got.extend((e.opcode, bytes(e.data)) for e in protocol.events_received())
                if kind in (frames.ENGINE_END, frames.ENGINE_LAST) and protocol.parser_exc is None:
                    # The invariant the fast path relies on: the engine idles
                    # at a boundary after each frame it was given.
                    assert not reader.left
                    assert protocol.reader.buffer == b""
        else:
            protocol.receive_data(reader.rest())
            got.extend((e.opcode, bytes(e.data)) for e in protocol.events_received())
    return got, protocol.parser_exc is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(one_frame, max_size=6),
    st.lists(st.integers(min_value=1, max_value=400), max_size=8),
    st.sampled_from([None, 200, 1 << 20]),
    st.integers(min_value=1, max_value=3),
)
def test_frame_reader_over_any_chunking_agrees_with_the_engine(chunks, cuts, max_size, room):
    """Feed the stream in arbitrary pieces: the reader's fast messages plus the
    engine's events on the frames it is given are the engine's own result on
    the whole stream, whatever the room per step."""
    data = b"".join(chunks)
    pieces = []
    pos = 0
    for cut in cuts:
        pieces.append(data[pos:pos + cut])
        pos += cut
    pieces.append(data[pos:])
    got, ok = read_all(frames.FrameReader(max_size), engine(max_size), pieces, room)
    whole = engine(max_size)
    whole.receive_data(data)
    expected = [(e.opcode, bytes(e.data)) for e in whole.events_received()]
    assert got == expected
    if ok != "too long":
        assert ok == (whole.parser_exc is None)


def test_a_large_frame_in_many_reads_takes_the_fast_path():
    payload = bytes(range(256)) * 1024  # 256 KiB
    data = client_frame(2, payload)
    reader = frames.FrameReader(1 << 20)
    out = []
    for i in range(0, len(data), 65536):
        reader.feed(data[i:i + 65536])
        kind, value = reader.next(16)
        if kind in (frames.MESSAGES, frames.MESSAGES_LAST):
            out.extend(value)
        else:
            assert kind == frames.MORE
    assert out == [(False, payload)]
    assert reader.unparsed == 0


def test_a_large_engine_frame_is_passed_on_as_it_arrives():
    """A fragment is the engine's, in parts, without being collected here first."""
    payload = b"x" * 200000
    data = client_frame(2, payload, fin=False) + client_frame(0, b"end")
    reader = frames.FrameReader(1 << 20)
    kinds = []
    for i in range(0, len(data), 65536):
        reader.feed(data[i:i + 65536])
        while True:
            kind, value = reader.next(16)
            if kind == frames.MORE:
                break
            kinds.append((kind, len(value)))
            assert reader.unparsed < 65536
    first = 10 + 4 + len(payload)
    assert kinds == [(frames.ENGINE, 65536)] * 3 + [(frames.ENGINE_END, first - 3 * 65536), (frames.ENGINE_LAST, 9)]


@given(st.binary(max_size=70000), st.sampled_from([1, 2, 9]))
@settings(max_examples=50, deadline=None)
def test_encode_matches_the_engine(payload, opcode):
    from websockets.frames import Frame

    expected = Frame(Opcode(opcode), payload).serialize(mask=False, extensions=[])
    assert frames.encode(opcode, payload) == expected


def test_random_bytes_never_crash_the_fast_path():
    for _ in range(200):
        frames.parse_complete(os.urandom(64), 0, 1 << 20, 16)
        reader = frames.FrameReader(1 << 20)
        reader.feed(os.urandom(64))
        for _ in range(100):
            if reader.next(16)[0] in (frames.MORE, frames.TOO_LONG):
                break


def test_encode_message_caches_only_immutable_messages():
    text = "same object for every member"
    assert frames.encode_message(text) is frames.encode_message(text)
    buffer = bytearray(b"abc")
    first = frames.encode_message(buffer)
    buffer[0:1] = b"x"
    assert frames.encode_message(buffer) == frames.encode(2, b"xbc") != first
