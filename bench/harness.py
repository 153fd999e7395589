"""What run.py and fanout.py share: start a pinned server, run the pinned Node client.

The server runs on core 0 (`taskset -c 0`), the client on core 1, each in its own
process group so that nothing outlives a run. The server's CPU time comes from
/proc/<pid>/stat and its memory from /proc/<pid>/status; the client reports its own.
"""

from __future__ import annotations

import json
import os
import platform
import selectors
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SERVERS_DIR = BENCH / "servers"
NODE_DIR = BENCH / "node"
CLIENT = NODE_DIR / "client.js"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CORE = "0"
CLIENT_CORE = "1"
# `nice` for the server, the client and Redis (run.py --nice): on a machine that
# others load heavily, a negative value lets the measured processes run when they
# are ready instead of waiting behind a dozen others. Off (None) by default.
NICE: list = [None]


def _pin(core: str) -> list:
    nice = NICE[0]
    return (["nice", "-n", str(nice)] if nice is not None else []) + ["taskset", "-c", core]


def _renice_group(pid: int) -> None:
    """Give a new session's autogroup the NICE value too: with the kernel's autogroup
    scheduling, each session (every server and client here has its own) gets a fair
    share against other sessions whatever its processes' nice, unless the autogroup
    itself is niced (/proc/<pid>/autogroup, sched(7))."""
    if NICE[0] is None:
        return
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(NICE[0]))
    except OSError:
        pass


class BenchError(RuntimeError):
    """A run that could not produce a figure; the message says why."""


def proc_cpu_s(pid: int) -> float:
    """CPU seconds a process has run, all its threads.

    From /proc/<pid>/task/*/schedstat (nanoseconds) when the kernel has it: the
    utime + stime of /proc/<pid>/stat count in 10 ms ticks, too coarse for the CPU
    of one broadcast. Falls back to /proc/<pid>/stat.
    """
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):   # a thread that just ended
                pass
        if total:
            return total / 1e9
    except OSError:
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the ")" of comm, field 3 (state) is index 0, so utime (14) is index 11.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def machine_busy_s() -> float:
    """CPU seconds all cores have spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / CLK_TCK


def wait_quiet(max_wait: float = 30.0, busy_limit: float = 0.25) -> float:
    """Wait (at most max_wait s) until other work uses under busy_limit of a core.

    This machine is shared: a test suite running beside a benchmark takes a core
    from it. Returns the busy fraction of the last half-second sample.
    """
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = machine_busy_s(), time.monotonic()
        time.sleep(0.5)
        busy = (machine_busy_s() - b0) / (time.monotonic() - t0)
        if busy < busy_limit or time.monotonic() >= deadline:
            return busy


def _kill_group(p: subprocess.Popen) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=3)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=5)


class Server:
    """One server process, pinned to core 0; use as a context manager."""

    def __init__(self, script: str, *args: str, python: str = sys.executable, timeout: float = 20,
                 env: dict | None = None, core: str = SERVER_CORE):
        self.cmd = [*_pin(core), python, str(SERVERS_DIR / script), "0", *args]
        self.env = {**os.environ, **env} if env else None
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.note = ""   # what the server says it could not do as asked
        self.stderr_path = Path(f"/tmp/greenchan-bench-{os.getpid()}-{id(self)}-{script}.err")

    def __enter__(self) -> "Server":
        err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=err, env=self.env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        _renice_group(self.proc.pid)
        err.close()
        try:
            line = _readline(self.proc, self.timeout)
            if not line or not line.startswith("READY "):
                raise BenchError(f"server did not start: {line!r}; stderr: {self.stderr_tail()}")
            self.port = int(line.split()[1])
            self.note = line.split("note=", 1)[1] if "note=" in line else ""
        except BaseException:
            self.__exit__(None, None, None)
            raise
        time.sleep(0.2)   # let the import-time garbage settle before any baseline
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            if self.proc.stdout:
                self.proc.stdout.close()
        try:
            self.stderr_path.unlink()
        except OSError:
            pass

    @property
    def pid(self) -> int:
        # taskset execs the interpreter, so the child's pid is the server's pid.
        assert self.proc is not None
        return self.proc.pid

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def rss_kib(self) -> int:
        return proc_rss_kib(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self, n: int = 1500) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class ServerGroup:
    """Several server processes seen as one by run_client: CPU is their sum."""

    def __init__(self, servers: list):
        self.servers = servers

    def cpu_s(self) -> float:
        return sum(s.cpu_s() for s in self.servers)

    def rss_kib(self) -> int:
        return sum(s.rss_kib() for s in self.servers)

    def alive(self) -> bool:
        return all(s.alive() for s in self.servers)

    def stderr_tail(self, n: int = 1500) -> str:
        return " | ".join(s.stderr_tail(n // len(self.servers)) for s in self.servers)


def _readline(p: subprocess.Popen, timeout: float) -> str:
    """One line of p's stdout within `timeout` seconds, or "" at EOF / timeout."""
    assert p.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + timeout
        buf = b""
        fd = p.stdout.fileno()
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            ch = os.read(fd, 1)   # byte at a time: lines are few and short
            if not ch:
                break
            if ch == b"\n":
                return buf.decode()
            buf += ch
        return buf.decode() if buf else ""
    finally:
        sel.close()


def _settled_rss(server) -> int:
    """The server's RSS once it stops growing: the client's OPEN means every request
    was written, not that the server has read them all (10,000 long-polls take it a
    few seconds on a busy machine). At least 1.5 s, then until two readings half a
    second apart differ by under 0.2%, at most 15 s."""
    time.sleep(1.5)
    rss = server.rss_kib()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = server.rss_kib()
        if abs(now - rss) < 0.002 * rss:
            return now
        rss = now
    return rss


def run_client(server: Server, mode: str, timeout: float, **params) -> dict:
    """Run the Node client in `mode` against `server`; return its JSON result.

    The server's CPU seconds are sampled at the client's START line and at its result,
    so both CPU figures cover the same measured window.
    """
    args = [f"--{k.replace('_', '-')}={v}" if v is not True else f"--{k}"
            for k, v in params.items() if v is not None and v is not False]
    cmd = [*_pin(CLIENT_CORE), "node", str(CLIENT), f"--mode={mode}",
           f"--timeout={int(timeout)}", *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True, cwd=NODE_DIR)
    _renice_group(p.pid)
    deadline = time.monotonic() + timeout + 5
    marks: dict[str, float] = {}
    load = os.getloadavg()[0]   # other work on this shared machine shows up here
    result: dict | None = None
    try:
        while time.monotonic() < deadline:
            line = _readline(p, deadline - time.monotonic())
            if not line:
                break
            if line == "START":
                marks["cpu0"], marks["t0"] = server.cpu_s(), time.monotonic()
                marks["busy0"] = machine_busy_s()
            elif line == "STOP":
                # The window ends before the client's own wind-down (open-loop echo
                # waits for late replies): CPU is sampled here, not at the result.
                marks["cpu1"], marks["t1"] = server.cpu_s(), time.monotonic()
                marks["busy1"] = machine_busy_s()
            elif line.startswith("WARM "):
                time.sleep(1.0)
                marks["rss0"] = server.rss_kib()
                assert p.stdin is not None
                p.stdin.write(b"go\n")
                p.stdin.flush()
            elif line.startswith("OPEN "):
                marks["rss1"] = _settled_rss(server)
            elif line.startswith("{"):
                result = json.loads(line)
                if "cpu0" in marks and server.alive():
                    if "cpu1" not in marks:
                        marks["cpu1"], marks["t1"] = server.cpu_s(), time.monotonic()
                        marks["busy1"] = machine_busy_s()
                    cpu = marks["cpu1"] - marks["cpu0"]
                    wall = marks["t1"] - marks["t0"]
                    result["server_cpu_s"] = cpu
                    result["server_cpu_pct"] = 100 * cpu / wall if wall > 0 else None
                    # What neither the server nor the client used: other work on the
                    # machine during the window, in % of one core. High means noise.
                    other = marks["busy1"] - marks["busy0"] - cpu - result.get("client_cpu_s", 0)
                    result["other_cpu_pct"] = max(0.0, 100 * other / wall) if wall > 0 else None
                result["loadavg_1m"] = load
                if "rss1" in marks:
                    result["rss0_kib"], result["rss1_kib"] = marks["rss0"], marks["rss1"]
                break
    finally:
        _kill_group(p)
        err = p.stderr.read().decode(errors="replace")[-1500:] if p.stderr else ""
        for f in (p.stdout, p.stdin, p.stderr):
            if f:
                f.close()
    if result is None:
        raise BenchError(f"client gave no result ({mode}); stderr: {err.strip()}; "
                         f"server alive: {server.alive()}; server stderr: {server.stderr_tail()}")
    if "error" in result:
        raise BenchError(f"client: {result['error']}; server stderr: {server.stderr_tail()}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A throwaway redis-server: no persistence, its own port, stopped on exit."""

    def __init__(self, core: str | None = None):
        self.core = core   # pinned to this core when given

    def __enter__(self) -> "Redis":
        self.port = free_port()
        pin = _pin(self.core) if self.core else []
        self.proc = subprocess.Popen(
            [*pin, "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _renice_group(self.proc.pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise BenchError("redis-server did not start")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"



def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cmd_version(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def versions() -> dict:
    """Everything a figure depends on, to be written beside it."""
    v: dict = {"python": platform.python_version(), "python_executable": sys.executable}
    for dist in ("greenchan", "gevent", "greenlet", "gevent-websocket", "Flask", "flask-sock",
                 "simple-websocket", "Werkzeug", "websockets", "aiohttp", "redis", "python-socketio",
                 "python-engineio"):
        v[dist] = _dist_version(dist)
    try:
        import greenchan  # noqa: F401
        v["greenchan_import"] = "ok"
    except Exception as exc:   # the package may be mid-rewrite; record why
        v["greenchan_import"] = f"{type(exc).__name__}: {exc}"
    v["node"] = _cmd_version(["node", "--version"])
    for pkg in ("ws", "bufferutil"):
        try:
            v[pkg] = json.loads((NODE_DIR / "node_modules" / pkg / "package.json").read_text())["version"]
        except OSError:
            v[pkg] = None
    v["redis-server"] = _cmd_version(["redis-server", "--version"])
    v["kernel"] = platform.release()
    v["cpus"] = os.cpu_count()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                v["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        v["greenchan_commit"] = subprocess.run(
            ["git", "-C", str(BENCH.parent), "log", "-1", "--format=%h %s"],
            capture_output=True, text=True, timeout=10).stdout.strip()
        # The package may be edited while the suite runs: say so beside the figures.
        dirty = subprocess.run(["git", "-C", str(BENCH.parent), "status", "--short", "--", "greenchan"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        v["greenchan_uncommitted"] = ", ".join(x.split()[-1] for x in dirty if x.strip()) or "none"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return v


def check_node() -> None:
    if not (NODE_DIR / "node_modules" / "ws").exists():
        raise SystemExit(f"the Node client needs its packages: (cd {NODE_DIR} && npm ci)")


def use_bench_venv() -> None:
    """Re-run this script under the benchmark venv, where the peers are installed.

    `python bench/run.py` then works from any interpreter; BENCH_VENV names another venv.
    """
    venv = Path(os.environ.get("BENCH_VENV", "/work/benchvenv"))
    py = venv / "bin" / "python"
    if os.environ.get("GREENCHAN_BENCH_VENV_USED") or not py.exists():
        return
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    os.environ["GREENCHAN_BENCH_VENV_USED"] = "1"
    os.execv(str(py), [str(py), *sys.argv])
