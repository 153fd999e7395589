"""Long-poll requests/s with each request parser greenchan could use.

    python bench/parser.py                       # every parser, 3 rounds of 4 s
    python bench/parser.py -p strict -p pywsgi --duration 8 --rounds 5
    python bench/parser.py --commit 3907213      # also greenchan as of that commit

One server process per figure (pinned to core 0 when ``taskset`` exists) runs
greenchan's ``Server`` with a ``with_channel`` handler that answers every request
with ``channel.send("x")`` (a long-poll answered at once). The client (pinned to
core 1) keeps ``--conns`` keep-alive connections, each a closed loop alternating
``GET /poll`` and ``POST /poll`` with a 5-byte body, and counts complete answers.
Rounds go round-robin over the parsers, so drift on this shared machine hits all
of them alike; the best round of each is reported, with the median beside it.

Parsers (only the request head differs; bodies here are 5 bytes of
``Content-Length``, read the same way in all):
  pywsgi     what greenchan 0.1.0 ran: pywsgi's lax ``read_request`` with
             ``email.parser`` headers and pywsgi's ``Input`` (not strict)
  strict     greenchan's own strict parser (greenchan/request.py), what ships
  h11        the head parsed by ``h11`` (pure Python, strict)
  httptools  the head parsed by ``httptools`` (llhttp, C, strict)
  commit:REV greenchan's tree at git revision REV, end to end (``--commit``)

Beside req/s (which other work on a shared machine moves) the table gives the
server's CPU time per answer, and the time to parse one request head alone
(``timeit`` in this process, the same bytes through each parser).
"""
from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARSERS = ["pywsgi", "strict", "h11", "httptools"]
GET = b"GET /poll HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
POST = (
    b"POST /poll HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
)


# -- the server side -----------------------------------------------------------------


def serve(parser: str) -> None:
    """Run a server with ``parser`` until killed; print READY <port>."""
    from greenchan import Server, with_channel
    from greenchan import server as gserver

    @with_channel
    def app(channel):
        channel.send("x")

    server = Server(app, port=0)
    if parser not in ("strict",) and not parser.startswith("commit:"):
        handler = _handler_for(parser, gserver)
        original = server.start

        def start():
            original()
            server._wsgi.handler_class = handler
            return server

        server.start = start  # type: ignore[method-assign]
    server.start()
    print(f"READY {server.port}", flush=True)
    server.serve_forever()


def _handler_for(parser: str, gserver):  # noqa: C901 - one adapter per candidate
    from gevent import pywsgi

    from greenchan.request import BadRequest, Headers

    base = gserver.Handler

    def framing(headers, version):
        length = headers.get("content-length")
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        keep = headers.get("connection", "").lower()
        keep_alive = keep != "close" if version == "HTTP/1.1" else keep == "keep-alive"
        return (int(length) if length is not None else None), chunked, keep_alive

    def head_bytes(handler) -> bytes:
        lines = []
        readline = handler.rfile.readline
        while True:
            line = readline(65537)
            lines.append(line)
            if line in (b"\r\n", b"\n", b""):
                return b"".join(lines)

    if parser == "pywsgi":
        import email.parser

        class Lax(base):
            """greenchan 0.1.0's request reading: pywsgi's, headers through email.parser."""

            def read_requestline(self):
                return pywsgi.WSGIHandler.read_requestline(self)

            def read_request(self, raw):
                self._body = None
                return pywsgi.WSGIHandler.read_request(self, raw)

            def MessageClass(self, fp, *args):
                lines = []
                while True:
                    line = fp.readline(65537)
                    if line in (b"\r\n", b"\n", b""):
                        break
                    lines.append(line)
                return email.parser.Parser(_class=pywsgi.OldMessage).parsestr(b"".join(lines).decode("iso-8859-1"))

            def _headers(self):
                return pywsgi.WSGIHandler._headers(self)

            def get_environ(self):
                self._cancel_deadline()
                env = pywsgi.WSGIHandler.get_environ(self)
                env[gserver.SERVER_KEY] = self.server.greenchan
                env[gserver.HANDLER_KEY] = self
                return env

        return Lax

    if parser == "h11":
        import h11

        class H11(base):
            def read_request(self, raw):
                self._body = None
                self.requestline = raw.rstrip("\r\n")
                conn = h11.Connection(h11.SERVER)
                conn.receive_data(raw.encode("latin-1") + head_bytes(self))
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise BadRequest(str(exc)) from None
                if not isinstance(event, h11.Request):
                    raise BadRequest("incomplete request head")
                self.command = event.method.decode()
                self.path = event.target.decode("latin-1")
                self.request_version = "HTTP/" + event.http_version.decode()
                items = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()]
                first: dict = {}
                for name, value in items:
                    first.setdefault(name.lower(), value)
                self.headers = Headers(items, first)
                self.content_length, self._chunked, keep = framing(self.headers, self.request_version)
                self.close_connection = not keep
                return True

        return H11

    if parser == "httptools":
        import httptools

        class _Collect:
            __slots__ = ("url", "items", "done")

            def __init__(self):
                self.url = b""
                self.items = []
                self.done = False

            def on_url(self, url):
                self.url += url

            def on_header(self, name, value):
                self.items.append((name.decode("latin-1"), value.decode("latin-1")))

            def on_headers_complete(self):
                self.done = True

        class HttpTools(base):
            def read_request(self, raw):
                self._body = None
                self.requestline = raw.rstrip("\r\n")
                collect = _Collect()
                parser = httptools.HttpRequestParser(collect)
                try:
                    parser.feed_data(raw.encode("latin-1") + head_bytes(self))
                except httptools.HttpParserError as exc:
                    raise BadRequest(str(exc)) from None
                if not collect.done:
                    raise BadRequest("incomplete request head")
                self.command = parser.get_method().decode()
                self.path = collect.url.decode("latin-1")
                self.request_version = "HTTP/" + parser.get_http_version()
                first: dict = {}
                for name, value in collect.items:
                    first.setdefault(name.lower(), value)
                self.headers = Headers(collect.items, first)
                self.content_length, self._chunked, _ = framing(self.headers, self.request_version)
                self.close_connection = not parser.should_keep_alive()
                return True

        return HttpTools

    raise SystemExit(f"unknown parser {parser!r}; one of {PARSERS}")


# -- the client side -----------------------------------------------------------------


def load(port: int, conns: int, warmup: float, duration: float) -> dict:
    """Closed-loop keep-alive GET/POST on ``conns`` connections; answers per second."""
    sel = selectors.DefaultSelector()
    state = {}
    for i in range(conns):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        state[sock] = [bytearray(), i % 2]  # buffer, which request is in flight
        sock.send(GET if i % 2 == 0 else POST)
        sel.register(sock, selectors.EVENT_READ)
    count = 0
    errors = 0
    start = time.monotonic()
    t0 = None
    measured = 0
    end = start + warmup + duration
    while True:
        now = time.monotonic()
        if t0 is None and now >= start + warmup:
            t0, measured = now, count
        if now >= end:
            break
        for key, _ in sel.select(0.5):
            sock = key.fileobj
            buf, which = state[sock]
            data = sock.recv(65536)
            if not data:
                raise SystemExit("server closed a connection")
            buf += data
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                head = bytes(buf[:head_end + 2])
                i = head.find(b"Content-Length: ")
                length = int(head[i + 16:head.index(b"\r\n", i)]) if i >= 0 else 0
                total = head_end + 4 + length
                if len(buf) < total:
                    break
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                del buf[:total]
                count += 1
                which ^= 1
                sock.send(POST if which else GET)
            state[sock][1] = which
    elapsed = time.monotonic() - t0
    for sock in state:
        sock.close()
    return {"rps": (count - measured) / elapsed, "errors": errors, "total": count}


# -- the runner ----------------------------------------------------------------------


def _pinned(core: str) -> list:
    return ["taskset", "-c", core] if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1 else []


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def figure(parser: str, args, trees: dict) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import wait_quiet  # run.py's: wait (bounded) for the machine to go quiet

    wait_quiet(max_wait=args.quiet_wait)
    env = dict(os.environ)
    if parser.startswith("commit:"):
        env["PYTHONPATH"] = trees[parser]
        serve_as = "strict"  # that tree's own Handler, whatever it parses with
    else:
        env["PYTHONPATH"] = str(ROOT)
        serve_as = parser
    server = subprocess.Popen(
        _pinned("0") + [sys.executable, __file__, "--serve", serve_as],
        stdout=subprocess.PIPE, env=env, text=True,
    )
    try:
        line = server.stdout.readline()
        if not line.startswith("READY"):
            raise SystemExit(f"{parser}: server did not start ({line!r})")
        port = int(line.split()[1])
        cpu0 = _cpu_s(server.pid)
        client = subprocess.run(
            _pinned("1") + [sys.executable, __file__, "--client", str(port), "--conns", str(args.conns),
                            "--duration", str(args.duration)],
            capture_output=True, text=True, timeout=args.duration + 60,
        )
        cpu = _cpu_s(server.pid)
        if client.returncode:
            raise SystemExit(f"{parser}: client failed: {client.stderr[-500:]}")
        rps, errors, total = client.stdout.split()
        # Server CPU per answer: what the parser costs, little moved by other
        # work on the machine (which shows in req/s, not in CPU time).
        return {"rps": float(rps), "errors": int(errors), "us_per_req": 1e6 * (cpu - cpu0) / int(total)}
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--parser", action="append", choices=PARSERS, help="repeatable; default: all")
    parser.add_argument("--commit", action="append", default=[], help="also greenchan at this git revision")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--quiet-wait", type=float, default=10.0, help="max seconds to wait for a quiet machine")
    parser.add_argument("--no-micro", action="store_true", help="skip the head-parse microbenchmark")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    if args.client:
        result = load(args.client, args.conns, 1.0, args.duration)
        print(result["rps"], result["errors"], result["total"])
        return None

    names = list(args.parser or PARSERS)
    trees = {}
    tmp = tempfile.mkdtemp(prefix="greenchan-parser-bench-")
    try:
        for rev in args.commit:
            tree = os.path.join(tmp, rev)
            os.makedirs(tree)
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "greenchan"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
            trees[f"commit:{rev}"] = tree
            names.append(f"commit:{rev}")
        results: dict = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names:
                results[name].append(figure(name, args, trees))
                r = results[name][-1]
                print(f"round {round_ + 1} {name:>16}: {r['rps']:8.0f} req/s  {r['us_per_req']:6.0f} us CPU/req"
                      f"  errors {r['errors']}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nlong-poll keep-alive GET+POST, {args.conns} connections, {args.rounds} x {args.duration:g} s\n")
    print("| parser | best req/s | median req/s | server CPU us/req (best) | req/s vs pywsgi | head parse us (GET, POST) |")
    print("|---|---:|---:|---:|---:|---:|")
    base = max(r["rps"] for r in results["pywsgi"]) if "pywsgi" in results else None
    micro = micro_bench() if not args.no_micro else {}
    for name in names:
        rates = [r["rps"] for r in results[name]]
        cpu = min(r["us_per_req"] for r in results[name])
        ratio = f"{max(rates) / base:.2f}" if base else "-"
        parse = " / ".join(f"{t:.1f}" for t in micro[name]) if name in micro else "-"
        print(f"| {name} | {max(rates):.0f} | {statistics.median(rates):.0f} | {cpu:.0f} | {ratio} | {parse} |")


def micro_bench() -> dict:
    """Microseconds to parse one request head (line and headers) with each parser, best of 5."""
    import email.parser
    import timeit

    from gevent import pywsgi

    from greenchan.request import parse_request

    def split(raw):
        line, _, rest = raw.partition(b"\r\n")
        return line + b"\r\n", rest.split(b"\r\n\r\n")[0] + b"\r\n"

    def strict(raw):
        line, block = split(raw)
        parse_request(line.decode("latin-1"), block.decode("latin-1"))

    def lax(raw):
        line, block = split(raw)
        line.decode("latin-1").split()
        email.parser.Parser(_class=pywsgi.OldMessage).parsestr(block.decode("latin-1"))

    funcs = {"strict": strict, "pywsgi": lax}
    try:
        import h11

        def with_h11(raw):
            conn = h11.Connection(h11.SERVER)
            conn.receive_data(raw)
            conn.next_event()

        funcs["h11"] = with_h11
    except ImportError:
        pass
    try:
        import httptools

        class _Proto:
            def on_url(self, url):
                self.url = url

            def on_header(self, name, value):
                pass

        def with_httptools(raw):
            httptools.HttpRequestParser(_Proto()).feed_data(raw)

        funcs["httptools"] = with_httptools
    except ImportError:
        pass
    out = {}
    for name, fn in funcs.items():
        out[name] = [min(timeit.repeat(lambda r=raw, f=fn: f(r), number=2000, repeat=5)) / 2000 * 1e6 for raw in (GET, POST)]
    return out


if __name__ == "__main__":
    main()
