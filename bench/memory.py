"""Where the memory of an idle page WebSocket goes, byte by byte.

    python bench/memory.py              # 5 000 connections, plain and with &last=0
    python bench/memory.py -n 2000 --only resume

For each protocol (plain, and the resume protocol of docs/delivery.md
"Delivery across reconnects", ``&last=0``, which every browser page uses) it
opens N idle page connections with bench/loadgen.c's ``idle`` mode to the
server bench/run.py measures (bench/servers.py's rally app), twice:

- on a fresh server, with bench/run.py's own function, for the server's RSS
  growth per connection (pymalloc's and malloc's overheads and fragmentation
  included; bench/run.py measures it on a server that has just served its
  RPC loads, whose freed memory the new connections partly reuse, so its
  figures move by a few hundred bytes from these). Both fill the bytecode
  cache first: a server that compiles rally.py starts with memory to spare
  and would read about 1.5 KiB lower;
- on a fresh server that runs under ``tracemalloc``, for the bytes still
  allocated per connection once they are all open, by where they were
  allocated: exact, and the guide to what the RSS figure is made of.

It prints markdown: the bytes per connection by part (transport and socket,
h11, wsproto, the handshake headers, ``_WsConn``, ``_PageSession``, the
resume token, the replay, topics, timers, ...), then the allocation sites
that hold the most. A part's bytes are what its allocations still hold, so a
part that should be gone after the upgrade (h11, ``_HttpConn``) shows here
if something keeps it. Python's own bookkeeping beside the objects (pymalloc
rounding, malloc headers) is in the RSS figure only. A block that CPython
takes from one of its free lists keeps the site of its first allocation:
the "h11" row's 120-byte block at ``_HttpReader.__init__`` is a small
dict's keys, made for that call's keyword argument, freed to the free list
and taken from it by a dict that lives with the connection (pass the
argument by position and the block moves to ``asyncio.Future(loop=...)``'s
line, the next call with one).
"""

import argparse
import ast
import gc
import json
import linecache
import os
import re
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (bench/run.py: the same server, load generator and RSS measure)

RALLY = os.path.join(os.path.dirname(HERE), "rally.py")
FRAMES = 30  # deep enough to reach rally.py from inside asyncio, h11 and wsproto

#: (part, test on the qualified name of the innermost rally.py function) in order: the first that
#: matches names the part of an allocation made in rally.py or in what it called.
RALLY_PARTS = [
    ("ServerContext", lambda q: q.startswith("ServerContext")),
    ("handshake headers", lambda q: q.startswith(("_HttpReader._head", "_pack_headers"))),
    ("h11 (HTTP parser)", lambda q: q.startswith("_HttpReader")),
    ("_HttpConn", lambda q: q.startswith("_HttpConn")),
    ("session id, cookie, presence tag", lambda q: q in ("_Router._session", "_new_session_id")),
    ("route and upgrade", lambda q: q.startswith(("_Router", "_Registry.match", "_Route."))),
    ("_Replay", lambda q: q.startswith("_Replay")),
    ("held pages (token index)", lambda q: q.startswith("_HeldPages")),
    ("topics", lambda q: q.startswith("_Topics")),
    ("presence", lambda q: q.startswith("_PresenceTable")),
    ("_PageSession", lambda q: q.startswith("_PageSession")),
    ("_WsReader", lambda q: q.startswith(("_WsReader", "_FrameTracker"))),
    ("_WsConn", lambda q: q.startswith(("_WsConn", "_Conn"))),
    ("keepalive (pings)", lambda q: q.startswith("_Keepalive")),
    ("server tables", lambda q: q.startswith("Server")),
]


def qualnames(path: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every class and function in a file."""
    out: list[tuple[int, int, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((child.lineno, child.end_lineno or child.lineno, prefix + child.name))
                visit(child, prefix + child.name + ".")

    try:
        with open(path) as f:
            visit(ast.parse(f.read()), "")
    except (OSError, SyntaxError, ValueError):
        pass
    return out


def short(filename: str) -> str:
    """A frame's file from its package down: ``asyncio/events.py``, ``h11/_headers.py``, ``rally.py``."""
    parts = filename.split(os.sep)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("site-packages", "dist-packages") or re.fullmatch(r"python3\.\d+", parts[i]):
            return "/".join(parts[i + 1 :])
    return parts[-1]


class Classifier:
    """Names the part of the server an allocation belongs to, from its traceback."""

    def __init__(self) -> None:
        self.functions: dict[str, list[tuple[int, int, str]]] = {}
        with open(RALLY) as f:
            tree = ast.parse(f.read())
        self.classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}

    def function(self, frame: tracemalloc.Frame) -> str:
        """The qualified name of the innermost class or function around a frame's line."""
        functions = self.functions.get(frame.filename)
        if functions is None:
            functions = self.functions[frame.filename] = qualnames(frame.filename)
        best = (0, "")
        for first, last, name in functions:
            if first <= frame.lineno <= last and first >= best[0]:
                best = (first, name)
        return best[1]

    def constructed(self, line: int) -> str:
        """The rally.py class a line of rally.py constructs, if any."""
        for name in re.findall(r"\b([A-Za-z_]\w*)\(", linecache.getline(RALLY, line)):
            if name in self.classes:
                return name
        return ""

    def site(self, frames: list[tracemalloc.Frame]) -> tuple[str, str]:
        """(part, site) of an allocation whose frames are given oldest first."""
        inner = short(frames[-1].filename)
        mine = [f for f in frames if f.filename == RALLY]
        q = self.function(mine[-1]) if mine else ""
        where = f"rally.py:{mine[-1].lineno} {q}" if mine else ""
        if inner == "rally.py":  # an object made on this line belongs to its class
            made = self.constructed(mine[-1].lineno)
            if made:
                q = made + ".__init__"
                where += f" → {made}()"
        if inner != "rally.py":
            at = f"{inner}:{frames[-1].lineno} {self.function(frames[-1])}".rstrip()
            where = f"{where} → {at}" if where else at
        below = frames[frames.index(mine[-1]) + 1 :] if mine else frames
        files = {short(f.filename).split("/")[0] for f in below}
        called = {self.function(f) for f in below}
        if "h11" in files and q.startswith(("_HttpReader._head", "_HttpReader.next_event")):
            return "handshake headers", where  # what h11 made of the request: kept only if the headers are
        if "h11" in files:
            return "h11 (HTTP parser)", where
        if "wsproto" in files:
            return "wsproto", where
        if q == "_PageSession.__init__" and files & {"secrets.py", "base64.py"}:
            return "resume token", where
        if called & {"BaseEventLoop.call_at", "BaseEventLoop.call_later"}:
            return "timers", where
        if q.startswith(("Server._accept", "Server._connect", "App.run")) and files & {"asyncio", "socket.py"}:
            return "transport and socket (asyncio)", where
        for part, test in RALLY_PARTS:
            if q and test(q):
                return part, where
        if files & {"asyncio", "socket.py", "selectors.py"}:
            return "transport and socket (asyncio)", where
        return "other", where


def control(classifier: Classifier) -> None:
    """The traced server's side: ``mark`` starts tracing, ``report N``
    prints the parts and sites of what is still allocated, per connection,
    as JSON. Tracing starts at the mark, so the snapshot holds only what was
    allocated since; a container that existed before and grew since counts
    at its new size, not by its growth (a few bytes per connection at N =
    5 000)."""
    ignore = [
        tracemalloc.Filter(False, threading.__file__, all_frames=True),  # this thread's own
        tracemalloc.Filter(False, tracemalloc.__file__, all_frames=True),
    ]
    for line in sys.stdin:
        command = line.split()
        gc.collect()
        if command[0] == "mark":
            tracemalloc.start(FRAMES)
            print("ok", flush=True)
            continue
        n = int(command[1])
        snapshot = tracemalloc.take_snapshot().filter_traces(ignore)
        tracemalloc.stop()
        parts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        sites: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for stat in snapshot.statistics("traceback"):
            part, where = classifier.site(list(stat.traceback))
            for table, key in ((parts, part), (sites, (part, where))):
                table[key][0] += stat.size
                table[key][1] += stat.count
        out = {
            "parts": {k: [v[0] / n, v[1] / n] for k, v in parts.items()},
            "sites": [[k[0], k[1], v[0] / n, v[1] / n] for k, v in sites.items()],
        }
        print(json.dumps(out), flush=True)


def serve(port: int) -> None:
    """A traced server: bench/servers.py's rally app, with a control thread
    on stdin. It pings once an hour: traced, opening N connections takes
    longer than the 20 s after which the first idle ones, which answer no
    ping, would be closed."""
    threading.Thread(target=control, args=(Classifier(),), daemon=True).start()
    import servers

    servers.run_rally(port, ping_interval=3600.0)


def traced(n: int, resume: bool) -> dict[str, object]:
    """Open ``n`` idle connections to a traced server: its parts and sites per connection."""
    port = run.free_port()
    proc = subprocess.Popen(
        [run.PY, os.path.abspath(__file__), "--serve", str(port)],
        preexec_fn=lambda: os.sched_setaffinity(0, {0}),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        deadline = time.monotonic() + 30
        while not connectable(port):
            if time.monotonic() > deadline:
                raise RuntimeError("the traced server did not start")
            time.sleep(0.05)
        proc.stdin.write("mark\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"
        load = run.open_idle(port, proc.pid, n, resume)
        assert load.stdin is not None
        proc.stdin.write(f"report {n}\n")
        proc.stdin.flush()
        result: dict[str, object] = json.loads(proc.stdout.readline())
        load.stdin.close()
        load.wait(120)
        return result
    finally:
        run.stop(proc)


def connectable(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def rss(n: int, resume: bool) -> float:
    """KiB of server RSS growth per idle connection, exactly as bench/run.py measures it."""
    proc, port = run.start("rally")
    try:
        return run.idle_memory(port, proc.pid, n, resume)
    finally:
        run.stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="idle connections (5 000, as bench/run.py)")
    parser.add_argument("--only", choices=["plain", "resume"], help="one protocol only")
    parser.add_argument("--sites", type=int, default=25, help="allocation sites to list")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    protocols = [("plain", False), ("resume", True)]
    protocols = [p for p in protocols if args.only in (None, p[0])]
    run.fill_bytecode_cache("import rally")
    results = {}
    for name, resume in protocols:
        print(f"measuring {name}: RSS", file=sys.stderr, flush=True)
        kib = rss(args.n, resume)
        print(f"measuring {name}: tracemalloc", file=sys.stderr, flush=True)
        results[name] = (kib, traced(args.n, resume))
    labels = {"plain": "plain", "resume": "&last=0"}
    parts: set[str] = set()
    for _, t in results.values():
        parts.update(t["parts"])  # type: ignore[call-overload]

    def size(name: str, part: str) -> float:
        return float(results[name][1]["parts"].get(part, [0, 0])[0])  # type: ignore[index]

    def blocks(name: str, part: str) -> float:
        return float(results[name][1]["parts"].get(part, [0, 0])[1])  # type: ignore[index]

    order = sorted(parts, key=lambda p: -max(size(name, p) for name in results))
    order = [p for p in order if any(round(size(name, p)) or round(blocks(name, p), 1) for name in results)]
    print(f"\n### Where each byte of an idle page WebSocket goes ({args.n} open)\n")
    header = ["part"] + [f"{labels[name]}: bytes (blocks)" for name in results]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for part in order:
        cells = [f"{size(name, part):,.0f} ({blocks(name, part):.1f})" for name in results]
        print(f"| {part} | " + " | ".join(cells) + " |")
    totals = [
        f"**{sum(size(name, p) for p in parts):,.0f}** ({sum(blocks(name, p) for p in parts):.1f})" for name in results
    ]
    print("| **tracemalloc, all parts** | " + " | ".join(totals) + " |")
    rss_cells = [f"**{results[name][0] * 1024:,.0f}** ({results[name][0]:.1f} KiB)" for name in results]
    print("| **RSS growth, bytes (bench/run.py's measure)** | " + " | ".join(rss_cells) + " |")
    for name in results:
        sites = sorted(results[name][1]["sites"], key=lambda s: -s[2])  # type: ignore[call-overload]
        print(f"\n#### {labels[name]}: the {args.sites} sites that hold the most (bytes per connection)\n")
        print("| part | site (innermost rally.py frame → innermost frame) | bytes | blocks |")
        print("| --- | --- | --- | --- |")
        for part, where, nbytes, nblocks in sites[: args.sites]:
            print(f"| {part} | `{where}` | {nbytes:,.0f} | {nblocks:.2f} |")


if __name__ == "__main__":
    main()
