"""Run the Autobahn|Testsuite fuzzing client against a greenchan echo server.

    python conformance/autobahn.py [--cases 1-7,9,10] [--compression] [--out DIR]

1. installs wstest into /tmp/wstest if it is missing (Python 2.7 from pyenv,
   the commands of DESIGN.md, "How it will be measured");
2. starts conformance/echo_server.py as a subprocess on a free port
   (permessage-deflate offered with --compression);
3. writes DIR/spec.json and runs ``wstest -m fuzzingclient -s DIR/spec.json``;
4. reads DIR/index.json and prints, per case group (1.*, 2.*, ... 13.*), how
   many cases ended with each ``behavior`` and each ``behaviorClose``, then
   every case that is not OK/NON-STRICT/INFORMATIONAL with its result;
5. writes the same as markdown into conformance/RESULTS.md (one section per
   cases/compression combination, replaced on each run);
6. exits 1 if any case is FAILED or UNIMPLEMENTED (behavior or behaviorClose).

``--cases`` takes comma-separated items: ``N`` (group N), ``N-M`` (groups N to
M) or a literal Autobahn pattern such as ``12.1.*`` or ``13.7.5``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WSTEST_ENV = Path("/tmp/wstest")
WSTEST = WSTEST_ENV / "bin" / "wstest"
AGENT = "greenchan"
BEHAVIORS = ["OK", "NON-STRICT", "INFORMATIONAL", "FAILED", "UNIMPLEMENTED"]
CLOSE_BEHAVIORS = ["OK", "INFORMATIONAL", "WRONG CODE", "UNCLEAN", "FAILED"]
BAD = {"FAILED", "UNIMPLEMENTED"}


# -- wstest ------------------------------------------------------------------


def ensure_wstest() -> Path:
    """Install the fuzzing client as DESIGN.md does, unless it is already there."""
    if WSTEST.exists():
        return WSTEST
    root = subprocess.run(["pyenv", "root"], check=True, capture_output=True, text=True).stdout.strip()
    py27 = os.path.join(root, "versions", "2.7.18", "bin", "python")
    print(f"installing wstest into {WSTEST_ENV} with {py27}", flush=True)
    subprocess.run([py27, "-m", "pip", "install", "--user", "virtualenv==20.15.1"], check=True)
    subprocess.run([py27, "-m", "virtualenv", str(WSTEST_ENV)], check=True)
    subprocess.run([str(WSTEST_ENV / "bin" / "pip"), "install", "autobahntestsuite"], check=True)
    if not WSTEST.exists():
        sys.exit(f"wstest is still missing at {WSTEST}")
    return WSTEST


# -- cases -------------------------------------------------------------------


def parse_cases(text: str) -> list:
    """'1-7,9,12.1.*' -> ['1.*', ..., '7.*', '9.*', '12.1.*']."""
    cases = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if re.fullmatch(r"\d+-\d+", item):
            first, last = map(int, item.split("-"))
            cases += [f"{n}.*" for n in range(first, last + 1)]
        elif re.fullmatch(r"\d+", item):
            cases.append(f"{item}.*")
        else:
            cases.append(item)
    return cases


def case_key(case_id: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in case_id.split("."))


# -- server ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, compression: bool, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE / "echo_server.py"), "--host", "127.0.0.1", "--port", str(port)]
    if compression:
        cmd.append("--compression")
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the echo server exited with {proc.returncode}; see {log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"the echo server did not listen on port {port} within 15 s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- report ------------------------------------------------------------------


def summarize(index: dict) -> tuple:
    """Rows per group, totals and the list of cases that are not clean."""
    groups = collections.OrderedDict()
    problems = []
    for case_id in sorted(index, key=case_key):
        entry = index[case_id]
        group = case_id.split(".")[0]
        row = groups.setdefault(group, {"cases": 0, "behavior": collections.Counter(),
                                        "close": collections.Counter(), "ms": 0})
        row["cases"] += 1
        row["behavior"][entry.get("behavior")] += 1
        row["close"][entry.get("behaviorClose")] += 1
        row["ms"] += entry.get("duration") or 0
        if entry.get("behavior") in BAD or entry.get("behaviorClose") in BAD:
            problems.append((case_id, entry))
    return groups, problems


def table(groups: dict) -> list:
    """The summary as markdown table lines (also readable on a terminal)."""
    extra_close = sorted({k for r in groups.values() for k in r["close"] if k not in CLOSE_BEHAVIORS}, key=str)
    close_cols = CLOSE_BEHAVIORS + extra_close
    head = ["group", "cases"] + BEHAVIORS + [f"close {c}" for c in close_cols] + ["case time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    total = {"cases": 0, "behavior": collections.Counter(), "close": collections.Counter(), "ms": 0}
    for group, row in list(groups.items()) + [("total", total)]:
        if group != "total":
            total["cases"] += row["cases"]
            total["behavior"].update(row["behavior"])
            total["close"].update(row["close"])
            total["ms"] += row["ms"]
        name = f"{group}.*" if group != "total" else "**total**"
        cells = [name, str(row["cases"])]
        cells += [str(row["behavior"].get(b, 0)) for b in BEHAVIORS]
        cells += [str(row["close"].get(c, 0)) for c in close_cols]
        cells.append(f"{row['ms'] / 1000:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def greenchan_revision() -> str:
    """The commit under test, with ``+dirty`` when greenchan/ has local edits."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "greenchan"], cwd=HERE.parent,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def case_result(outdir: Path, entry: dict) -> str:
    report = entry.get("reportfile")
    if not report or not (outdir / report).exists():
        return ""
    try:
        data = json.loads((outdir / report).read_text())
    except (OSError, ValueError):
        return ""
    return f"{data.get('result', '')} / close: {data.get('resultClose', '')}"


def write_results(path: Path, key: str, body: str) -> None:
    """Replace this run's section of RESULTS.md, keeping the other runs."""
    start, end = f"<!-- run: {key} -->", f"<!-- end: {key} -->"
    text = path.read_text() if path.exists() else (
        "# Autobahn|Testsuite results\n\n"
        "Written by `python conformance/autobahn.py`; one section per run configuration.\n\n"
    )
    section = f"{start}\n{body.rstrip()}\n{end}\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


# -- main --------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Autobahn|Testsuite against greenchan's echo server")
    parser.add_argument("--cases", default="1-7,9,10", help="e.g. 1-7,9,10 or 12,13 or 12.1.*,13.7.*")
    parser.add_argument("--compression", action="store_true", help="server offers permessage-deflate")
    parser.add_argument("--out", default=None, help="report directory (default: /tmp/greenchan-autobahn/<run>)")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file to update")
    args = parser.parse_args(argv)

    cases = parse_cases(args.cases)
    key = f"cases {args.cases}, compression {'on' if args.compression else 'off'}"
    slug = re.sub(r"[^0-9A-Za-z]+", "_", args.cases).strip("_") + ("_deflate" if args.compression else "")
    outdir = Path(args.out or f"/tmp/greenchan-autobahn/{slug}").resolve()
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)

    wstest = ensure_wstest()
    port = free_port()
    spec = {
        "options": {"failByDrop": False},
        "outdir": str(outdir),
        "servers": [{"agent": AGENT, "url": f"ws://127.0.0.1:{port}"}],
        "cases": cases,
        "exclude-cases": [],
        "exclude-agent-cases": {},
    }
    spec_path = outdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))

    revision = greenchan_revision()
    if os.environ.get("PYTHONPATH"):
        revision += f" (PYTHONPATH={os.environ['PYTHONPATH']})"
    server = start_server(port, args.compression, outdir / "server.log")
    print(f"echo server pid {server.pid} on port {port}, compression {'on' if args.compression else 'off'}; "
          f"cases {', '.join(cases)}; reports in {outdir}", flush=True)
    started = time.monotonic()
    try:
        with open(outdir / "wstest.log", "wb") as log:
            rc = subprocess.run([str(wstest), "-m", "fuzzingclient", "-s", str(spec_path)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=str(outdir)).returncode
    finally:
        elapsed = time.monotonic() - started
        stop_server(server)
    print(f"wstest exited {rc} after {elapsed:.1f} s (log: {outdir / 'wstest.log'})", flush=True)

    index_path = outdir / "index.json"
    if not index_path.exists():
        print(f"no {index_path}: wstest did not finish; see {outdir / 'wstest.log'}", file=sys.stderr)
        return 2
    index = json.loads(index_path.read_text()).get(AGENT, {})
    groups, problems = summarize(index)

    lines = [f"## {key}", "",
             f"`python conformance/autobahn.py --cases {args.cases}{' --compression' if args.compression else ''}`"
             f" — greenchan {revision}, wstest ran {elapsed:.0f} s on {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    lines += table(groups)
    lines.append("")
    if problems:
        lines.append(f"{len(problems)} case(s) FAILED or UNIMPLEMENTED:")
        lines.append("")
        for case_id, entry in problems:
            lines.append(f"- {case_id}: behavior {entry.get('behavior')}, close {entry.get('behaviorClose')}, "
                         f"remote close code {entry.get('remoteCloseCode')}: {case_result(outdir, entry)}")
    else:
        lines.append("No FAILED and no UNIMPLEMENTED case.")
    report = "\n".join(lines)
    print()
    print(report)
    write_results(Path(args.results), key, report)
    return 1 if problems or rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
