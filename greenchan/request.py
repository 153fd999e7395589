"""Strict HTTP/1.1 request parsing (RFC 9112), so that no request can be read two ways.

Request smuggling lives in the gap between two parsers that frame the same bytes
differently: a proxy in front and this server behind it. The gap closes when the
server accepts only what RFC 9112 allows and refuses the rest before anything
reaches the application. The policy, chosen where the RFC leaves a choice:

- Lines end with CRLF. A bare LF (RFC 9112 2.2 "MAY" accept it) or a bare CR
  anywhere is 400: a proxy that splits lines differently is the classic gap.
- One empty line before a request line is skipped (RFC 9112 2.2: a stray CRLF
  after a request body is common); a second one is 400.
- Request line: ``token SP target SP HTTP/d.d`` with single spaces; the target is
  visible ASCII in origin-, absolute-, authority- (CONNECT only) or asterisk-form
  (OPTIONS only). HTTP/1.0 and HTTP/1.1 are served, a later HTTP/1.x is served
  as HTTP/1.1 (RFC 9110 2.5), any other version is 505.
- Header lines: ``token ":" OWS value OWS``. Whitespace before the colon, a line
  without a colon, obs-fold (a line starting with SP or HTAB), and control
  characters in a value (NUL, CR, DEL...) are 400.
- HTTP/1.1 needs exactly one ``Host``; no request may have two.
- ``Content-Length`` is digits only (no ``+5``, ``0_5``, ``0x5``); several values
  are accepted only when all are the same (RFC 9112 6.3); more than 18 digits
  is 413.
- ``Transfer-Encoding`` must end in ``chunked`` (else 400, RFC 9112 6.3); another
  coding before it is 501 (none is implemented); ``chunked`` twice is 400; on
  HTTP/1.0 it is 400. With ``Content-Length`` beside it the request is refused
  with 400 (RFC 9112 6.1 allows that or chunked-then-close; refusing is simpler
  to reason about and no legitimate client sends both).
- Chunked bodies: ``1*16HEXDIG`` sizes, chunk extensions that follow the grammar,
  CRLF after every chunk, trailer lines that follow the header grammar. Any
  error is 400 and the connection closes.

Every error closes the connection: once framing is in doubt, nothing after it on
the same connection can be trusted.
"""
from __future__ import annotations

import re
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["BadRequest", "Body", "Headers", "Request", "parse_headers", "parse_request", "parse_request_line"]

# tchar (RFC 9110 5.6.2)
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# A field value: field-vchar, SP, HTAB; obs-text allowed as RFC 9110 5.5 does.
_VALUE = r"[\t\x20-\x7e\x80-\xff]*"

_REQUEST_LINE = re.compile(r"(" + _TOKEN + r") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])\r\n")
# All header lines of a request at once, each ending in CRLF: one C call.
_FIELD_LINES = re.compile(r"(?:" + _TOKEN + r":" + _VALUE + r"\r\n)*")
# Header fields whose duplicates matter for framing and routing.
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_FIELD_LINE_BYTES = re.compile((_TOKEN + r":" + _VALUE + r"\r\n").encode("latin-1"))
_DIGITS = re.compile(r"[0-9]{1,18}")
_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# uri-host [ ":" port ] (RFC 3986): an IP literal or a reg-name, no userinfo.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")

_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_TOKEN_B = _TOKEN.encode()
# chunk = chunk-size [ chunk-ext ] CRLF (RFC 9112 7.1, 7.1.1), with BWS as written.
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*" + _TOKEN_B
    + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN_B + rb"|" + _QUOTED + rb"))?)*\r\n"
)

#: How many empty lines may come before a request line: RFC 9112 2.2 says to
#: ignore "at least one" (the CRLF some clients send after a body); more is junk.
MAX_EMPTY_LINES = 1
#: The longest chunk-size line, extensions included. Nothing needs more; a
#: server "ought to limit the total length of chunk extensions" (RFC 9112 7.1.1).
MAX_CHUNK_LINE = 4096
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Large reads go in pieces of this size (see _read).
_READ_PIECE = 1 << 20


class BadRequest(ValueError):
    """A request this server refuses; ``status`` is the answer (400, 501 or 505)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


class Headers:
    """The request's header fields, as pywsgi's handler (and gunicorn's log) read them.

    Stands where pywsgi keeps an ``email.message.Message``: building one of those
    cost more than the whole strict parse.
    """

    __slots__ = ("_items", "_first")
    # pywsgi checks this after parsing; a parse error here raises instead.
    status = ""

    def __init__(self, items: List[Tuple[str, str]], first: dict) -> None:
        self._items = items
        self._first = first  # lower-case name -> first value

    def get(self, name: str, default: Any = None) -> Any:
        return self._first.get(name.lower(), default)

    getheader = get

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._first

    @property
    def typeheader(self) -> Optional[str]:
        return self._first.get("content-type")

    def items(self) -> List[Tuple[str, str]]:
        return list(self._items)

    def __iter__(self) -> Any:
        return iter(self._items)

    @property
    def headers(self) -> Any:
        for name, value in self._items:
            yield f"{name}: {value}\r\n"


class Request:
    """The parsed head of one request."""

    __slots__ = ("method", "target", "version", "headers", "content_length", "chunked", "keep_alive")

    def __init__(self, method: str, target: str, version: str, headers: Headers,
                 content_length: Optional[int], chunked: bool, keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive


def parse_request_line(line: str) -> Tuple[str, str, str]:
    """``(method, target, version)`` of a request line (latin-1 text ending in CRLF).

    The version is ``"HTTP/1.0"`` or ``"HTTP/1.1"``. Raises ``BadRequest``.
    """
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise BadRequest(f"bad request line {line[:100]!r}")
    method, target, major, minor = match.groups()
    if major != "1":
        raise BadRequest(f"HTTP version {major}.{minor} not supported", 505)
    version = "HTTP/1.0" if minor == "0" else "HTTP/1.1"
    if target[0] != "/":
        if target == "*":
            if method != "OPTIONS":
                raise BadRequest(f"asterisk-form target with {method}")
        elif method == "CONNECT":
            if _HOST.fullmatch(target) is None:
                raise BadRequest(f"bad CONNECT target {target[:100]!r}")
        elif _ABSOLUTE.match(target) is None:
            raise BadRequest(f"bad request target {target[:100]!r}")
    return method, target, version


def parse_request(line: str, block: str) -> Request:
    """Parse a request line and its header block (latin-1 text, CRLF line ends).

    ``line`` ends with CRLF; ``block`` is every header line with its CRLF, without
    the empty line that ends the head. Raises ``BadRequest``.
    """
    return parse_headers(*parse_request_line(line), block)


def parse_headers(method: str, target: str, version: str, block: str) -> Request:
    """The request, once its line is parsed, from its header block (see ``parse_request``)."""
    if _FIELD_LINES.fullmatch(block) is None:
        raise BadRequest(f"malformed header line in {_first_bad_line(block)!r}")
    # The block is valid: each line is "name:value" (measured faster than a
    # capturing regex). Framing headers are collected with their duplicates.
    items: List[Tuple[str, str]] = []
    first: dict = {}
    framing: dict = {}
    for field in block.split("\r\n")[:-1]:
        name, _, value = field.partition(":")
        value = value.strip(" \t")
        items.append((name, value))
        key = name.lower()
        if key not in first:
            first[key] = value
        if key in _FRAMING:
            if key in framing:
                framing[key].append(value)
            else:
                framing[key] = [value]

    hosts = framing.get("host", ())
    if len(hosts) > 1:
        raise BadRequest("more than one Host header")
    if hosts:
        if _HOST.fullmatch(hosts[0]) is None:
            raise BadRequest(f"bad Host {hosts[0][:100]!r}")
    elif version == "HTTP/1.1":
        raise BadRequest("HTTP/1.1 request without Host")
    content_length: Optional[int] = None
    lengths = framing.get("content-length")
    if lengths is not None:
        content_length = _content_length(lengths)
        first["content-length"] = str(content_length)
    chunked = False
    codings = framing.get("transfer-encoding")
    if codings is not None:
        if version == "HTTP/1.0":
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        if lengths is not None:
            raise BadRequest("both Content-Length and Transfer-Encoding")
        _check_codings(codings)
        chunked = True
    if content_length and method == "HEAD":
        raise BadRequest("HEAD request with a body")
    connection = framing.get("connection")
    if connection is None:
        keep_alive = version == "HTTP/1.1"
    else:
        tokens = {token.strip(" \t").lower() for value in connection for token in value.split(",")}
        keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
    return Request(method, target, version, Headers(items, first), content_length, chunked, keep_alive)


def _first_bad_line(block: str) -> str:
    for field in block.split("\n"):
        if _FIELD_LINES.fullmatch(field + "\n") is None:
            return field[:100]
    return block[:100]


def _content_length(values: List[str]) -> int:
    numbers = set()
    for value in values:
        for item in value.split(","):
            item = item.strip(" \t")
            if _DIGITS.fullmatch(item) is None:
                if item.isdigit() and item.isascii():  # valid, and larger than anything we take
                    raise BadRequest(f"Content-Length {item[:40]} too large", 413)
                raise BadRequest(f"bad Content-Length {value[:40]!r}")
            numbers.add(int(item))
    if len(numbers) != 1:
        raise BadRequest(f"conflicting Content-Length values {values[:4]!r}")
    return numbers.pop()


def _check_codings(values: List[str]) -> None:
    codings = []
    for value in values:
        for item in value.split(","):
            item = item.strip(" \t")
            if not item or re.fullmatch(_TOKEN, item) is None:
                raise BadRequest(f"bad Transfer-Encoding {value[:40]!r}")
            codings.append(item.lower())
    if codings[-1] != "chunked":
        raise BadRequest(f"Transfer-Encoding {','.join(codings)[:40]!r} does not end in chunked")
    if "chunked" in codings[:-1]:
        raise BadRequest("chunked applied twice")
    if len(codings) > 1:
        raise BadRequest(f"transfer coding {codings[0][:40]!r} not implemented", 501)


class Body:
    """A request body as ``wsgi.input``: ``Content-Length`` or chunked, read strictly.

    A framing error raises ``BadRequest`` and is kept in ``error``, so the server
    answers 400 and closes even when the application (or a framework around it)
    swallowed the exception.
    """

    __slots__ = ("_rfile", "_left", "_chunked", "_continue", "_trailer_limit", "done", "error")

    def __init__(self, rfile: Any, length: Optional[int], chunked: bool,
                 send_continue: Optional[Callable[[bytes], Any]] = None, trailer_limit: int = 65536) -> None:
        self._rfile = rfile
        self._chunked = chunked
        # Bytes left in the body, or in the current chunk (-1: read a size line next).
        self._left = -1 if chunked else (length or 0)
        self._continue = send_continue
        self._trailer_limit = trailer_limit
        self.done = not chunked and not length
        self.error: Optional[BadRequest] = None

    def read(self, size: Optional[int] = -1) -> bytes:
        return self._read(size, False)

    def readline(self, size: Optional[int] = -1) -> bytes:
        return self._read(size, True)

    def readlines(self, hint: Any = None) -> List[bytes]:
        return list(self)

    def __iter__(self) -> "Body":
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _read(self, size: Optional[int], line: bool) -> bytes:
        if self.error is not None:
            raise self.error
        if self.done or size == 0:
            return b""
        if self._continue is not None:
            send, self._continue = self._continue, None
            send(_CONTINUE)
        try:
            return self._read_chunked(size, line) if self._chunked else self._read_some(size, line)
        except BadRequest as exc:
            self.error = exc
            self.done = True
            raise

    def _read_some(self, size: Optional[int], line: bool) -> bytes:
        want = self._left if size is None or size < 0 else min(size, self._left)
        data = self._rfile.readline(want) if line else _read(self._rfile, want)
        if len(data) < want and not (line and data.endswith(b"\n")):
            raise BadRequest("request body ended early")
        self._left -= len(data)
        if self._left == 0:
            self.done = True
        return data

    def _read_chunked(self, size: Optional[int], line: bool) -> bytes:
        rfile = self._rfile
        out = []
        while not self.done and (size is None or size < 0 or size > 0):
            if self._left < 0:
                self._next_chunk()
                continue
            want = self._left if size is None or size < 0 else min(size, self._left)
            data = rfile.readline(want) if line else _read(rfile, want)
            if not data:
                raise BadRequest("request body ended early")
            out.append(data)
            self._left -= len(data)
            if size is not None and size > 0:
                size -= len(data)
            if self._left == 0:
                if rfile.read(2) != b"\r\n":
                    raise BadRequest("chunk data not followed by CRLF")
                self._left = -1
            if line and data.endswith(b"\n"):
                break
        return b"".join(out)

    def _next_chunk(self) -> None:
        text = self._rfile.readline(MAX_CHUNK_LINE + 1)
        match = _CHUNK_LINE.fullmatch(text)
        if match is None:
            if len(text) > MAX_CHUNK_LINE:
                raise BadRequest("chunk-size line too long")
            raise BadRequest(f"bad chunk-size line {text[:40]!r}")
        self._left = int(match.group(1), 16)
        if self._left == 0:
            self._read_trailers()
            self.done = True

    def _read_trailers(self) -> None:
        size = 0
        while True:
            text = self._rfile.readline(self._trailer_limit - size + 1)
            size += len(text)
            if size > self._trailer_limit:
                raise BadRequest("trailer section too large")
            if text == b"\r\n":
                return
            if _FIELD_LINE_BYTES.fullmatch(text) is None:
                raise BadRequest(f"bad trailer line {text[:40]!r}")


def _read(rfile: Any, size: int) -> bytes:
    """``rfile.read(size)`` without allocating ``size`` bytes up front.

    A buffered reader allocates the whole size before reading, so a claimed
    length of 10**15 would fail with MemoryError instead of reading what comes.
    """
    if size <= _READ_PIECE:
        return rfile.read(size)
    parts = []
    while size > 0:
        piece = rfile.read(min(size, _READ_PIECE))
        if not piece:
            break
        parts.append(piece)
        size -= len(piece)
    return b"".join(parts)
