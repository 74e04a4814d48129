"""Benchmark rally.py against its peers, every server speaking the same protocol.

    python bench/run.py            # everything, about 6 minutes (with bench/fanout.py and bench/presence.py)
    python bench/run.py --quick    # shorter runs, under 2 minutes
    python bench/run.py --only rally,websockets

Each server runs in its own process pinned to CPU 0; the load generator
(bench/loadgen.c, compiled here with gcc -O2 into a cache directory outside
the repository) is pinned to CPU 1 and reports its own CPU share beside the
server's: a load generator near 100% while the server is not means the
number is a floor for that server, not its limit. Ratios are to uvicorn
(h11 + wsproto) + Starlette, measured in the same run. The full run ends
with bench/fanout.py (S3 from 1 000 to 50 000 connections) and
bench/presence.py.

rally.py's WebSocket measures are taken twice, each on a fresh server: plain,
and with the resume protocol on (docs/delivery.md "Delivery across reconnects": ``&last=0`` on every page
connection, the load generator acknowledging pushes as the browser client
does); the table "Resume protocol on/off" gives their ratio.
"""

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
TARGETS = ["uvicorn", "websockets", "aiohttp", "raw", "rally"]
LABELS = {
    "uvicorn": "uvicorn h11+wsproto + Starlette",
    "websockets": "websockets",
    "aiohttp": "aiohttp",
    "raw": "raw asyncio ceiling",
    "rally": "rally.py",
}
HTTP_TARGETS = {"uvicorn", "aiohttp", "raw", "rally"}
IMPORTS = {
    "uvicorn": "import uvicorn, starlette.applications",
    "websockets": "import websockets.asyncio.server",
    "aiohttp": "import aiohttp.web",
    "raw": "import asyncio",
    "rally": "import rally",
}


CFLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra"]


def loadgen() -> str:
    """bench/loadgen.c compiled, once per version of its source, under ~/.cache/rally-bench."""
    source = os.path.join(HERE, "loadgen.c")
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rally-bench")
    binary = os.path.join(cache, f"loadgen-{digest}")
    if os.path.exists(binary):
        return binary
    gcc = shutil.which("gcc")
    if gcc is None:
        sys.exit(
            "\n*** bench/run.py: gcc not found. The load generator is bench/loadgen.c and must be compiled;\n"
            "*** install gcc (Debian/Ubuntu: apt-get install gcc) and run again. Nothing was measured.\n"
        )
    os.makedirs(cache, exist_ok=True)
    partial = f"{binary}.{os.getpid()}"
    subprocess.run([gcc, *CFLAGS, "-o", partial, source], check=True)
    os.replace(partial, binary)  # another run compiling the same source at once gets the same file
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(target: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [PY, os.path.join(HERE, "servers.py"), target, str(port)],
        preexec_fn=lambda: os.sched_setaffinity(0, {0}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{target} did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_args(mode: str, port: int, n: int, seconds: float, pid: int, resume: bool) -> list[str]:
    args = [loadgen(), mode, str(port), str(n), str(seconds), str(pid)]
    return args + ["--resume"] if resume else args


def load(mode: str, port: int, n: int, seconds: float, pid: int, resume: bool = False) -> dict[str, float]:
    out = subprocess.run(
        load_args(mode, port, n, seconds, pid, resume),
        preexec_fn=lambda: os.sched_setaffinity(0, {1}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode:
        raise RuntimeError(f"load generator: {mode} {n}: {out.stderr.strip() or out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_idle(port: int, pid: int, n: int, resume: bool = False) -> subprocess.Popen[str]:
    """The load generator with ``n`` idle page connections open (closing its stdin closes them),
    a second after the last handshake, so that the server has finished allocating."""
    proc = subprocess.Popen(
        load_args("idle", port, n, 0, pid, resume),
        preexec_fn=lambda: os.sched_setaffinity(0, {1}),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "open":
        raise RuntimeError("idle connections did not open")
    time.sleep(1.0)
    return proc


def idle_memory(port: int, pid: int, n: int, resume: bool = False) -> float:
    before = rss_kib(pid)
    proc = open_idle(port, pid, n, resume)
    assert proc.stdin is not None
    after = rss_kib(pid)
    proc.stdin.close()
    proc.wait(60)
    return (after - before) / n


def bytecode_env() -> dict[str, str]:
    """The environment with bytecode caching on, as for any user."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def fill_bytecode_cache(statement: str) -> None:
    """Import once with bytecode caching on. A server that has to compile
    rally.py (stale or no .pyc, and PYTHONDONTWRITEBYTECODE set) starts with
    about 23 MiB more RSS, mostly freed memory that its first connections
    then reuse: its memory per connection would read lower than a server
    started from cached bytecode."""
    subprocess.run([PY, "-c", statement], check=True, cwd=os.path.dirname(HERE), env=bytecode_env())


def import_ms(statement: str, runs: int) -> float:
    env = bytecode_env()
    fill_bytecode_cache(statement)

    def best(code: str) -> float:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([PY, "-c", code], check=True, cwd=os.path.dirname(HERE), env=env)
            times.append(time.perf_counter() - t0)
        return min(times)

    return (best(statement) - best("pass")) * 1000


def presence() -> str:
    """bench/presence.py's table: presence diffs on a page of 2 000 connections (rally.py only)."""
    print("measuring presence (bench/presence.py)", file=sys.stderr, flush=True)
    path = os.path.join(HERE, "presence.py")
    out = subprocess.run([PY, path], capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.rstrip()


def fanout(targets: list[str]) -> str:
    """bench/fanout.py's table: S3 from 1 000 to 50 000 connections (rally.py and aiohttp)."""
    print("measuring the fan-out curve (bench/fanout.py)", file=sys.stderr, flush=True)
    path = os.path.join(HERE, "fanout.py")
    only = ",".join(t for t in targets if t in ("rally", "aiohttp"))
    out = subprocess.run([PY, path, "--only", only], stdout=subprocess.PIPE, text=True, timeout=1800, check=True)
    return out.stdout.rstrip()


def table(title: str, rows: list[tuple[str, list[str]]], header: list[str]) -> str:
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join([name, *cells]) + " |" for name, cells in rows]
    return "\n".join(lines)


def ratio(value: float, base: float | None, higher_is_better: bool = True) -> str:
    if not base or not value:
        return "—"
    return f"{(value / base) if higher_is_better else (base / value):.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (under 2 minutes)")
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    args = parser.parse_args()
    loadgen()  # compiled first: without gcc, nothing is measured
    targets = [t for t in TARGETS if t in args.only.split(",")]
    seconds, rounds, idle_n = (2.0, 5, 5000) if args.quick else (5.0, 20, 5000)
    results: dict[str, dict[str, dict[str, float]]] = {t: {} for t in targets}
    begun = time.monotonic()
    for target in targets:
        fill_bytecode_cache(IMPORTS[target])
        proc, port = start(target)
        try:
            if target in HTTP_TARGETS:
                results[target]["http"] = load("http", port, 64, seconds, proc.pid)
            results[target]["ws"] = load("ws", port, 64, seconds, proc.pid)
            results[target]["memory"] = {"kib": idle_memory(port, proc.pid, idle_n)}
            results[target]["broadcast"] = load("broadcast", port, 5000, rounds, proc.pid)
        finally:
            stop(proc)
        results[target]["import"] = {"ms": import_ms(IMPORTS[target], 5 if args.quick else 10)}
        print(f"measured {target} ({time.monotonic() - begun:.0f} s)", file=sys.stderr, flush=True)
    resumed: dict[str, dict[str, float]] = {}  # rally.py's ws, memory and broadcast with &last=0
    if "rally" in targets:
        proc, port = start("rally")
        try:
            resumed["ws"] = load("ws", port, 64, seconds, proc.pid, resume=True)
            resumed["memory"] = {"kib": idle_memory(port, proc.pid, idle_n, resume=True)}
            resumed["broadcast"] = load("broadcast", port, 5000, rounds, proc.pid, resume=True)
        finally:
            stop(proc)
        print(f"measured rally with resume ({time.monotonic() - begun:.0f} s)", file=sys.stderr, flush=True)

    base = results.get("uvicorn", {})
    out = [f"rally.py benchmark, {time.strftime('%Y-%m-%d')}, {'quick' if args.quick else 'full'} run, "
           f"Python {sys.version.split()[0]}; server on CPU 0, load generator on CPU 1."]  # fmt: skip

    def cpu(r: dict[str, float]) -> str:
        return f"{r['server_cpu'] * 100:.0f}% / {r['loadgen_cpu'] * 100:.0f}%"

    rows = []
    for t in targets:
        r = results[t].get("http")
        if r:
            rows.append((LABELS[t], [f"{r['rate']:,.0f}", ratio(r["rate"], base.get("http", {}).get("rate")), cpu(r)]))
        else:
            rows.append((LABELS[t], ["—", "—", "—"]))
    out.append(
        table(
            "HTTP RPC, 64 keep-alive connections (requests/s)",
            rows,
            ["server", "req/s", "vs uvicorn", "CPU server / loadgen"],
        )
    )
    rows = []
    for t in targets:
        r = results[t]["ws"]
        rows.append((LABELS[t], [f"{r['rate']:,.0f}", ratio(r["rate"], base.get("ws", {}).get("rate")), cpu(r)]))
    out.append(
        table(
            "WebSocket RPC round trips, 64 connections, 32 in flight each",
            rows,
            ["server", "round trips/s", "vs uvicorn", "CPU server / loadgen"],
        )
    )
    rows = []
    for t in targets:
        r = results[t]["broadcast"]
        b = base.get("broadcast", {})
        rows.append((LABELS[t], [f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['deliveries_per_s']:,.0f}",
                                 ratio(r["p50_ms"], b.get("p50_ms"), higher_is_better=False), cpu(r)]))  # fmt: skip
    out.append(
        table(
            f"Broadcast to 5 000 connections, {rounds} rounds (ms until all received)",
            rows,
            ["server", "p50 ms", "p90 ms", "deliveries/s", "p50 vs uvicorn", "CPU server / loadgen"],
        )
    )
    rows = []
    for t in targets:
        r = results[t]["memory"]
        rows.append(
            (LABELS[t], [f"{r['kib']:.1f}", ratio(r["kib"], base.get("memory", {}).get("kib"), higher_is_better=False)])
        )
    out.append(
        table(
            f"Memory per idle WebSocket ({idle_n} open, server RSS growth)",
            rows,
            ["server", "KiB", "vs uvicorn (less is better)"],
        )
    )
    rows = []
    for t in targets:
        r = results[t]["import"]
        rows.append((LABELS[t], [f"{r['ms']:.0f}", IMPORTS[t]]))
    out.append(table("Import time, net of the interpreter (best of several)", rows, ["server", "ms", "statement"]))
    if resumed:
        off = results["rally"]
        measures = [
            ("S2 round trips/s", "ws", "rate", "{:,.0f}"),
            ("S3 p50 ms", "broadcast", "p50_ms", "{:.1f}"),
            ("S3 deliveries/s", "broadcast", "deliveries_per_s", "{:,.0f}"),
            ("memory KiB per idle WebSocket", "memory", "kib", "{:.1f}"),
        ]
        rows = []
        for name, k, f, fmt in measures:
            was, now = off[k][f], resumed[k][f]
            rows.append((name, [fmt.format(was), fmt.format(now), f"{now / was:.2f}" if was else "—"]))
        out.append(table("Resume protocol on/off (rally.py)", rows, ["measure", "off", "on (&last=0)", "on / off"]))
        out.append(
            f"\nWith resume on, the load generator sent {resumed['broadcast']['acks']:,.0f} acks during S3; "
            f"CPU server / loadgen: S2 {cpu(off['ws'])} off, {cpu(resumed['ws'])} on; "
            f"S3 {cpu(off['broadcast'])} off, {cpu(resumed['broadcast'])} on."
        )
    if not args.quick and ("rally" in targets or "aiohttp" in targets):
        out.append(fanout(targets))
    if "rally" in targets and not args.quick:
        out.append(presence())
    print("\n".join(out))
    print(f"\n(took {time.monotonic() - begun:.0f} s)")


if __name__ == "__main__":
    main()
