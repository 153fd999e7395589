"""HTTP request smuggling: every known vector gets one exact answer, whatever the TCP split.

The vectors are RFC 9112's (sections 2.2, 3, 5, 6, 7) and the published ones
(PortSwigger's CL.TE, TE.CL and TE.TE obfuscations, chunk-extension and
chunk-size tricks, bare CR / LF line endings, obs-fold, duplicate framing
headers). Each is sent over a raw socket followed by an innocent request
(``TAIL``): a server that frames the vector differently from the table answers
an extra (smuggled) response, or answers the tail when it should have closed.
The policy the table encodes is written at the top of greenchan/request.py.
"""
import socket

import gevent
import pytest

from greenchan import with_channel

TAIL = b"GET /tail HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
OK_TAIL = (200, b"GET /tail 0:")


def echo_app(environ, start_response):
    """Plain WSGI: answers what it parsed, so a misframed body shows in the answer."""
    body = environ["wsgi.input"].read()
    text = f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} {len(body)}:".encode() + body
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [text]


@pytest.fixture
def port(serve):
    return serve(echo_app, handshake_timeout=2).port


def post(headers: bytes, body: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST / " + version + b"\r\nHost: x\r\n" + headers + b"\r\n" + body


def chunked(body: bytes, extra: bytes = b"") -> bytes:
    return post(b"Transfer-Encoding: chunked\r\n" + extra, body)


def line(request_line: bytes, headers: bytes = b"Host: x\r\n") -> bytes:
    return request_line + b"\r\n" + headers + b"\r\n"


# (id, bytes sent before TAIL, status of the single answer; the connection then closes)
REFUSED = [
    # -- CL.TE / TE.CL (PortSwigger): both framing headers -----------------------
    ("cl-te", post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nG"), 400),
    ("te-cl", post(b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"8\r\nSMUGGLED\r\n0\r\n\r\n"), 400),
    ("cl-te-tab", post(b"Content-Length: 4\r\nTransfer-Encoding:\tchunked\r\n", b"0\r\n\r\n"), 400),
    ("cl-te-upper", post(b"Content-Length: 4\r\nTRANSFER-ENCODING: CHUNKED\r\n", b"0\r\n\r\n"), 400),
    # -- TE.TE: an obfuscated Transfer-Encoding one parser ignores ---------------
    ("te-identity", post(b"Transfer-Encoding: identity\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 400),
    ("te-chunked-identity", chunked(b"0\r\n\r\n").replace(b"chunked", b"chunked, identity"), 400),
    ("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), 400),
    ("te-chunked-x-two-fields", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n", b"0\r\n\r\n"), 400),
    ("te-chunked-twice", post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-chunked-two-fields", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-gzip-chunked", post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), 501),
    ("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-obs-fold-value", post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-obs-fold-line", post(b"X: y\r\n Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-lf-before-colon", post(b"Transfer-Encoding\n: chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-vertical-tab", post(b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n"), 400),
    ("te-nul", post(b"Transfer-Encoding: chunked\x00\r\n", b"0\r\n\r\n"), 400),
    ("te-quoted", post(b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n"), 400),
    ("te-empty", post(b"Transfer-Encoding: \r\n", b"0\r\n\r\n"), 400),
    ("te-empty-element", post(b"Transfer-Encoding: ,chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-parameter", post(b"Transfer-Encoding: chunked;q=1\r\n", b"0\r\n\r\n"), 400),
    ("te-http10", post(b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", b"HTTP/1.0"), 400),
    # -- Content-Length -------------------------------------------------------
    ("cl-plus", post(b"Content-Length: +5\r\n", b"hello"), 400),
    ("cl-underscore", post(b"Content-Length: 0_5\r\n", b"hello"), 400),
    ("cl-hex", post(b"Content-Length: 0x5\r\n", b"hello"), 400),
    ("cl-negative", post(b"Content-Length: -1\r\n", b""), 400),
    ("cl-decimal", post(b"Content-Length: 5.0\r\n", b"hello"), 400),
    ("cl-two-different", post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), 400),
    ("cl-list-different", post(b"Content-Length: 5, 6\r\n", b"hello!"), 400),
    ("cl-empty", post(b"Content-Length: \r\n", b""), 400),
    ("cl-space-inside", post(b"Content-Length: 5 5\r\n", b"hello"), 400),
    ("cl-overflow", post(b"Content-Length: " + b"9" * 30 + b"\r\n", b""), 413),
    ("cl-unicode-digit", post(b"Content-Length: \xd9\xa5\r\n", b"hello"), 400),
    ("cl-space-before-colon", post(b"Content-Length : 5\r\n", b"hello"), 400),
    # -- header lines -----------------------------------------------------------
    ("bare-cr-makes-header", post(b"X: a\rTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("line-without-colon", post(b"Foo\r\nContent-Length: 5\r\n", b"hello"), 400),
    ("obs-fold", line(b"GET / HTTP/1.1", b"Host: x\r\nX: a\r\n b\r\n"), 400),
    ("nul-in-value", line(b"GET / HTTP/1.1", b"Host: x\r\nX: a\x00b\r\n"), 400),
    ("del-in-value", line(b"GET / HTTP/1.1", b"Host: x\r\nX: a\x7fb\r\n"), 400),
    ("ctl-in-value", line(b"GET / HTTP/1.1", b"Host: x\r\nX: a\x01b\r\n"), 400),
    ("empty-name", line(b"GET / HTTP/1.1", b"Host: x\r\n: b\r\n"), 400),
    ("bad-name", line(b"GET / HTTP/1.1", b"Host: x\r\nX[1]: b\r\n"), 400),
    ("lf-line-ends", b"GET / HTTP/1.1\nHost: x\n\n", 400),
    ("lf-header-line", b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400),
    ("lf-end-of-head", b"GET / HTTP/1.1\r\nHost: x\r\n\n", 400),
    ("cr-cr-lf", b"GET / HTTP/1.1\r\nHost: x\r\r\n\r\n", 400),
    # -- Host -------------------------------------------------------------------
    ("no-host", line(b"GET / HTTP/1.1", b""), 400),
    ("two-hosts", line(b"GET / HTTP/1.1", b"Host: a\r\nHost: b\r\n"), 400),
    ("two-same-hosts", line(b"GET / HTTP/1.1", b"Host: a\r\nHost: a\r\n"), 400),
    ("two-hosts-http10", line(b"GET / HTTP/1.0", b"Host: a\r\nHost: b\r\n"), 400),
    ("host-space", line(b"GET / HTTP/1.1", b"Host: a b\r\n"), 400),
    ("host-slash", line(b"GET / HTTP/1.1", b"Host: a/b\r\n"), 400),
    ("host-userinfo", line(b"GET / HTTP/1.1", b"Host: u@a\r\n"), 400),
    # -- request line -----------------------------------------------------------
    ("double-space", line(b"GET  / HTTP/1.1"), 400),
    ("trailing-space", line(b"GET / HTTP/1.1 "), 400),
    ("leading-space", line(b" GET / HTTP/1.1"), 400),
    ("tab-separator", line(b"GET\t/ HTTP/1.1"), 400),
    ("bad-method", line(b"G@T / HTTP/1.1"), 400),
    ("space-in-target", line(b"GET /a b HTTP/1.1"), 400),
    ("ctl-in-target", line(b"GET /\x01 HTTP/1.1"), 400),
    ("obs-text-in-target", line(b"GET /\xff HTTP/1.1"), 400),
    ("relative-target", line(b"GET a HTTP/1.1"), 400),
    ("asterisk-with-get", line(b"GET * HTTP/1.1"), 400),
    ("authority-with-get", line(b"GET x:80 HTTP/1.1"), 400),
    ("lowercase-version", line(b"GET / http/1.1"), 400),
    ("version-no-minor", line(b"GET / HTTP/1"), 400),
    ("version-two-digits", line(b"GET / HTTP/1.10"), 400),
    ("http2", line(b"GET / HTTP/2.0"), 505),
    ("http09-version", line(b"GET / HTTP/0.9"), 505),
    ("http09-request", b"GET /\r\n\r\n", 400),
    ("cr-in-request-line", line(b"GET /\r HTTP/1.1"), 400),
    ("two-empty-lines-first", b"\r\n\r\n" + line(b"GET / HTTP/1.1"), 400),
    # -- chunk sizes and extensions ----------------------------------------------
    ("chunk-plus", chunked(b"+5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-0x", chunked(b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-negative", chunked(b"-5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-trailing-space", chunked(b"5 \r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-junk-after-size", chunked(b"5 x\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-nul-after-size", chunked(b"5\x00\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-empty-size", chunked(b"\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-overflow", chunked(b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-lf-size-line", chunked(b"5\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-data-no-crlf", chunked(b"5\r\nhelloX0\r\n\r\n"), 400),
    ("chunk-data-lf-only", chunked(b"5\r\nhello\n0\r\n\r\n"), 400),
    ("chunk-data-longer", chunked(b"3\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-empty", chunked(b"5;\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-bare-lf", chunked(b"5;a\nx\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-bare-cr", chunked(b"5;a\rx\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-open-quote", chunked(b'5;a="b\r\nhello\r\n0\r\n\r\n'), 400),
    ("chunk-ext-bad-name", chunked(b"5;a b\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-too-long", chunked(b"5;a=" + b"b" * 5000 + b"\r\nhello\r\n0\r\n\r\n"), 400),
    ("last-chunk-ext-lf", chunked(b"0;a\n\r\n\r\n"), 400),
    ("trailer-bad-line", chunked(b"0\r\nX y\r\n\r\n"), 400),
    ("trailer-obs-fold", chunked(b"0\r\nX: y\r\n z\r\n\r\n"), 400),
    ("trailer-bare-cr", chunked(b"0\r\nX: a\rb\r\n\r\n"), 400),
    ("missing-last-crlf", chunked(b"0\r\n"), 400),  # TAIL's request line is then a bad trailer
]

# (id, bytes sent before TAIL, answers expected, TAIL's included when it is answered)
ACCEPTED = [
    ("chunked-post", chunked(b"5\r\nhello\r\n0\r\n\r\n"), [(200, b"POST / 5:hello"), OK_TAIL]),
    ("chunked-two-chunks", chunked(b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"), [(200, b"POST / 5:hello"), OK_TAIL]),
    ("chunked-upper-case", post(b"Transfer-Encoding: CHUNKED\r\n", b"5\r\nhello\r\n0\r\n\r\n"), [(200, b"POST / 5:hello"), OK_TAIL]),
    ("chunked-hex-size", chunked(b"A\r\nhellohello\r\n0\r\n\r\n"), [(200, b"POST / 10:hellohello"), OK_TAIL]),
    ("chunked-leading-zeros", chunked(b"0005\r\nhello\r\n000\r\n\r\n"), [(200, b"POST / 5:hello"), OK_TAIL]),
    ("chunk-extensions", chunked(b'5;a=b;c="d\\"e" ; f\r\nhello\r\n0;g\r\n\r\n'), [(200, b"POST / 5:hello"), OK_TAIL]),
    ("chunked-trailers", chunked(b"5\r\nhello\r\n0\r\nX: y\r\nZ:\r\n\r\n"), [(200, b"POST / 5:hello"), OK_TAIL]),
    ("cl-post", post(b"Content-Length: 5\r\n", b"hello"), [(200, b"POST / 5:hello"), OK_TAIL]),
    ("cl-same-twice", post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), [(200, b"POST / 5:hello"), OK_TAIL]),
    ("cl-list-same", post(b"Content-Length: 5, 5\r\n", b"hello"), [(200, b"POST / 5:hello"), OK_TAIL]),
    ("cl-ows", post(b"Content-Length: \t5 \r\n", b"hello"), [(200, b"POST / 5:hello"), OK_TAIL]),
    ("cl-one-byte-more-crlf", post(b"Content-Length: 5\r\n", b"hello\r\n"), [(200, b"POST / 5:hello"), OK_TAIL]),
    ("empty-line-before-request", b"\r\n" + line(b"GET /a HTTP/1.1"), [(200, b"GET /a 0:"), OK_TAIL]),
    ("pipelined-gets", line(b"GET /a HTTP/1.1") + line(b"GET /b HTTP/1.1"), [(200, b"GET /a 0:"), (200, b"GET /b 0:"), OK_TAIL]),
    ("http10-without-host", line(b"GET /a HTTP/1.0", b""), [(200, b"GET /a 0:")]),
    ("http10-keep-alive", line(b"GET /a HTTP/1.0", b"Connection: keep-alive\r\n"), [(200, b"GET /a 0:"), OK_TAIL]),
    ("http11-minor-2", line(b"GET /a HTTP/1.2"), [(200, b"GET /a 0:"), OK_TAIL]),
    ("absolute-form", line(b"GET http://x/a?q=1 HTTP/1.1"), [(200, b"GET /a 0:"), OK_TAIL]),
    ("asterisk-options", line(b"OPTIONS * HTTP/1.1"), [(200, b"OPTIONS * 0:"), OK_TAIL]),
    ("host-with-port", line(b"GET /a HTTP/1.1", b"Host: [::1]:8080\r\n"), [(200, b"GET /a 0:"), OK_TAIL]),
    ("obs-text-value", line(b"GET /a HTTP/1.1", b"Host: x\r\nX: caf\xe9\r\n"), [(200, b"GET /a 0:"), OK_TAIL]),
    ("connection-close", line(b"GET /a HTTP/1.1", b"Host: x\r\nConnection: close\r\n"), [(200, b"GET /a 0:")]),
]


def exchange(port, parts, timeout=5.0):
    """Send ``parts`` (pausing between them so the server reads them apart), read
    to the end; return the answers and whether the server closed the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = b""
    closed = "open"
    try:
        for i, part in enumerate(parts):
            if i:
                gevent.sleep(0.002)
            try:
                sock.sendall(part)
            except OSError:  # the server answered and closed before the rest
                break
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                closed = "closed"
                break
            data += chunk
    except socket.timeout:
        closed = "open"
    except ConnectionResetError:
        closed = "reset"
    finally:
        sock.close()
    return parse_responses(data), closed


def parse_responses(data):
    """[(status, body)] of complete responses in ``data`` (Content-Length framed)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            out.append(("partial", data))
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for field in lines[1:]:
            name, _, value = field.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if 100 <= status < 200:
            data = rest
            continue
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


def outcome(port, parts):
    answers, closed = exchange(port, parts)
    # Error bodies are the server's text; only the status matters for them.
    return [(s, b if s == 200 else None) for s, b in answers], closed


@pytest.mark.parametrize("vector,status", [(v, s) for _, v, s in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_refused_and_closed(port, vector, status):
    assert outcome(port, [vector + TAIL]) == ([(status, None)], "closed")
    # The server goes on serving.
    assert outcome(port, [TAIL]) == ([OK_TAIL], "closed")


@pytest.mark.parametrize("vector,answers", [(v, a) for _, v, a in ACCEPTED], ids=[i for i, _, _ in ACCEPTED])
def test_valid_forms_still_work(port, vector, answers):
    assert outcome(port, [vector + TAIL]) == (answers, "closed")


# Every split of these: one answer, whatever TCP does to the bytes.
SPLIT = ["cl-te", "te-cl", "te-chunked-identity", "cl-two-different", "bare-cr-makes-header",
         "line-without-colon", "lf-end-of-head", "chunk-ext-bare-lf", "chunk-data-no-crlf",
         "trailer-bad-line", "missing-last-crlf", "http09-request"]
SPLIT_OK = ["chunked-post", "chunk-extensions", "chunked-trailers", "cl-one-byte-more-crlf",
            "empty-line-before-request", "pipelined-gets"]


@pytest.mark.parametrize("name", SPLIT + SPLIT_OK)
def test_same_answer_at_every_split(port, name):
    table = {i: (v, [(s, None)], "closed") for i, v, s in REFUSED}
    table.update({i: (v, a, "closed") for i, v, a in ACCEPTED})
    vector, answers, closed = table[name]
    data = vector + TAIL
    expected = (answers, closed)
    for offset in range(1, len(data)):
        assert outcome(port, [data[:offset], data[offset:]]) == expected, f"split at {offset}: {data[:offset]!r}"
    # And one byte per read.
    assert outcome(port, [data[i:i + 1] for i in range(len(data))]) == expected


def test_oversized_chunk_line_answer_survives_a_client_still_sending(port):
    """The 400 reaches a client that is still sending: FIN after it, input drained."""
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;a="
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sender = gevent.spawn(_send_quietly, sock, head + b"b" * (512 << 10))
    received = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    finally:
        sender.kill()
        sock.close()
    assert received.startswith(b"HTTP/1.1 400 ")


def _send_quietly(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_chunked_post_reaches_a_channel(serve):
    got = []

    @with_channel
    def app(channel):
        if channel.environ["REQUEST_METHOD"] == "POST":
            got.append(channel.receive(timeout=5))
        channel.send("ok")

    server = serve(app)
    vector = chunked(b"3\r\nhel\r\n2\r\n\xc3\xa9\r\n0\r\n\r\n", b"Content-Type: text/plain\r\n")
    answers, closed = exchange(server.port, [vector + TAIL])
    assert answers == [(200, b"ok"), (200, b"ok")]
    assert closed == "closed"
    assert got == ["hel\u00e9"]


def test_a_body_the_application_left_unread_does_not_become_a_request(serve):
    """The rest of an unread body is skipped, never parsed as the next request."""

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["PATH_INFO"].encode()]

    server = serve(app)
    smuggled = line(b"GET /smuggled HTTP/1.1")
    for vector in (
        post(b"Content-Length: %d\r\n" % len(smuggled), smuggled),
        chunked(b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)),
    ):
        answers, closed = exchange(server.port, [vector + TAIL])
        assert answers == [(200, b"/"), (200, b"/tail")]
        assert closed == "closed"


def test_a_huge_content_length_is_read_as_it_comes(port):
    """A claimed length is not allocated up front: the body ends early, 400."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(post(b"Content-Length: %d\r\n" % 10**15, b"hello"))
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    assert data.startswith(b"HTTP/1.1 400 ")
