"""Broadcast fan-out to 10 000 WebSocket connections: one rally.py process, a
rally.py cluster on Redis, and a python-socketio cluster on the same Redis.

    python bench/cluster.py                  # about 2 minutes on a quiet 2-CPU machine
    python bench/cluster.py --only a,b       # a subset: a, b, c, flood
    python bench/cluster.py --spread         # the two servers of (b) and (c) on two CPUs

Three setups, each with its own server processes and load generator, all
up at once (the two clusters share one redis-server, on separate channels):

(a) rally.py, one process holding every connection, no broker;
(b) rally.py, two processes (two ports) sharing a real redis-server through
    ``rally.App(broker=...)``, half of the connections each; the broadcast is
    produced in the first process (a page ``send`` whose ``server_update``
    returns ``broadcast_to_app``, as in bench/run.py's S3), which PUBLISHes
    once and then delivers to its own members; the second gets it from Redis;
(c) python-socketio: ``socketio.AsyncServer`` on aiohttp with
    ``socketio.AsyncRedisManager`` on the same Redis, two processes, half of
    the clients each; a client emits ``shout`` and the handler does
    ``await sio.emit("shouted", data)`` to everyone. The load generator
    speaks Engine.IO 4 / Socket.IO 5 in raw WebSocket frames (open packet
    ``0{...}``, connect ``40``, events ``42[...]``, ping ``2`` answered
    ``3``). Skipped, loudly, when python-socketio is not installed.

A round: one connection sends the trigger frame, then the load generator
waits (bounded) until every connection has received its push; "all received"
is the time from the trigger to the last push. The setups take turns, one
round each, a different one first every time, so that whatever else the
machine does at some moment is spread over all three rather than landing on
one; the others' connections sit idle meanwhile (both servers' ping
intervals are set to 600 s, beyond the run, so that idle setups cost
nothing). Warm-up rounds are left out. deliveries/s is connections / p50.
Also kept, for each server process (the producing one, the other): when the
first and the last of its connections got the push; and for (b) and (c) the
PUBLISH calls per broadcast from Redis ``INFO commandstats``. rally.py's
broker heartbeat is set to 600 s (the default is 5 s) so that the only
PUBLISHes during the rounds are broadcasts.

"Broker alone" (before (b)'s connections open, on the same two processes):
the first process broadcasts N times to a topic nobody joined, without
yielding (the broker's ``max_queued`` raised so that nothing is dropped),
and we time until Redis has answered every PUBLISH (written together at the
end of the loop's turn, since none yields) and until the other process has received them all; five times,
for a median and a best. Meanwhile the other process runs on the load
generator's CPU, so the producer has a CPU to itself. The CPU per broadcast
of each party (redis-server's from its own ``INFO cpu``) says which one
saturates first, and at what rate.

CPU: the servers are pinned to the first CPU, the load generator and
redis-server to the last (``--spread``: the two servers of (b) and (c) on
different CPUs, the load generator and Redis unpinned). The table gives CPU
milliseconds per broadcast of each party during that setup's rounds, and of
the rest of the machine (every process this benchmark did not start, kernel
threads included, from /proc/stat): a load generator whose CPU per broadcast
nears the all-received time was the limit, not the server; a large "rest of
machine" means something else was using the CPUs, and a warning says so. The
load generator is one process reading every socket with a bare epoll loop
(no asyncio: 5 to 8 µs of CPU per push), since on two CPUs a second load
process would only take CPU from the servers.
"""

import argparse
import contextlib
import http.client
import importlib.metadata
import importlib.util
import json
import os
import resource
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
TICKS = os.sysconf("SC_CLK_TCK")
WAIT = 30.0  # seconds: the bound on any single wait
HEARTBEAT_S = 600.0  # rally.py's broker heartbeat: none during a run, so Redis counts only broadcasts
PING_S = 600.0  # WebSocket / Engine.IO ping interval: none during a run, so the idle setups stay idle
RALLY_CHANNEL = "rally:broadcast"
SIO_CHANNEL = "socketio"

# ==== Wire bytes =============================================================

RALLY_UPGRADE = (
    b"GET /_rally/ws?page=/ HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
)
SIO_UPGRADE = (
    b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\n"
    b"connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
)
RALLY_PUSH = b'{"kind":"push","msg":{"type":"Shouted","fields":{"text":"x"}}}'
SIO_PUSH = b'42["shouted","x"]'


def masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """One masked client frame (payload under 126 bytes)."""
    mask = os.urandom(4)
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big") if n else b""
    return bytes((0x80 | opcode, 0x80 | n)) + mask + body


def unmasked(payload: bytes) -> bytes:
    return bytes((0x81, len(payload))) + payload


PROTOCOLS = {  # kind: (upgrade request, trigger frame, the push every connection gets)
    "rally": (RALLY_UPGRADE, b'{"kind":"send","msg":{"type":"Shout","fields":{"text":"x"}}}', RALLY_PUSH),
    "sio": (SIO_UPGRADE, b'42["shout","x"]', SIO_PUSH),
}


# ==== Servers ================================================================


def serve_rally(port: int, broker_url: str) -> None:
    import asyncio
    from dataclasses import dataclass

    sys.path.insert(0, ROOT)
    import rally

    @dataclass
    class Shout:
        text: str

    @dataclass
    class Shouted:
        text: str

    @dataclass
    class Flood:
        n: int
        topic: str

    @dataclass
    class Flooded:
        seconds: float  # until the broker had PUBLISHed (or dropped) all n
        enqueue_seconds: float  # of which: the n broadcasts themselves (encode, local delivery, queue)
        published: int
        dropped: int

    broker = None
    if broker_url:  # max_queued: the flood below queues all its broadcasts at once
        broker = rally.RedisBroker(broker_url, heartbeat_interval=HEARTBEAT_S, max_queued=10_000_000)
    app = rally.App(broker=broker, max_connections=15_000, secret="one secret for every process", ping_interval=PING_S)

    class Root:
        html = "<p>bench</p>"

        def server_init() -> tuple[None, rally.Effect[Shouted]]:
            return None, rally.effect.none()

        def server_update(model: None, msg: Shout) -> tuple[None, rally.Effect[Shouted]]:
            return None, rally.effect.broadcast_to_app(Shouted(msg.text))

    app.page("/", Root)

    @app.rpc
    async def server_flood(msg: Flood) -> Flooded:
        assert broker is not None
        p0, d0 = broker.published, broker.dropped
        t0 = time.perf_counter()
        for _ in range(msg.n):
            await app.broadcast_to_topic(msg.topic, Shouted("x"))
        t1 = time.perf_counter()
        while broker.published + broker.dropped - p0 - d0 < msg.n and time.perf_counter() - t0 < WAIT:
            await asyncio.sleep(0.002)  # polls the broker's count, bounded
        return Flooded(time.perf_counter() - t0, t1 - t0, broker.published - p0, broker.dropped - d0)

    app.run("127.0.0.1", port, access_log=False)


def serve_sio(port: int, broker_url: str) -> None:
    import socketio
    from aiohttp import web

    manager = socketio.AsyncRedisManager(broker_url)
    sio = socketio.AsyncServer(
        async_mode="aiohttp", client_manager=manager, transports=["websocket"], ping_interval=PING_S
    )

    @sio.on("shout")  # type: ignore[misc]
    async def shout(sid: str, data: str) -> None:
        await sio.emit("shouted", data)

    app = web.Application()
    sio.attach(app)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=8192)


# ==== Load generator =========================================================


def read_head(sock: socket.socket) -> bytes:
    """Read an HTTP response head; returns what came after it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {buf[:200]!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"upgrade refused: {head[:200]!r}")
    return rest


def read_frame(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """One small unmasked text frame from ``buf`` and the socket: (payload, the rest)."""
    while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed during the handshake: {buf[:200]!r}")
        buf += chunk
    n = buf[1] & 0x7F
    if n >= 126:
        n = int.from_bytes(buf[2:4], "big")
        while len(buf) < 4 + n:
            buf += sock.recv(65536)
        return buf[4 : 4 + n], buf[4 + n :]
    return buf[2 : 2 + n], buf[2 + n :]


def open_many(kind: str, port: int, n: int, batch: int = 100) -> list[socket.socket]:
    """n WebSocket connections (Socket.IO: connected to namespace /), opened
    ``batch`` at a time (rally.py listens with asyncio's backlog of 100)."""
    upgrade = PROTOCOLS[kind][0]
    socks: list[socket.socket] = []
    for start in range(0, n, batch):
        group = []
        for _ in range(min(batch, n - start)):
            s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(upgrade)
            group.append(s)
        rests = [read_head(s) for s in group]
        if kind == "sio":  # open packet 0{...}, then connect to "/" and wait for 40{"sid":...}
            for i, s in enumerate(group):
                payload, rests[i] = read_frame(s, rests[i])
                assert payload.startswith(b"0{"), payload
                s.sendall(masked(b"40"))
            for i, s in enumerate(group):
                payload, rests[i] = read_frame(s, rests[i])
                assert payload.startswith(b"40"), payload
        if any(rests):
            raise ConnectionError(f"unexpected bytes after the handshake: {next(r for r in rests if r)[:100]!r}")
        for s in group:
            s.setblocking(False)
        socks += group
    return socks


class Reader:
    """Reads every socket with one epoll loop and counts pushes per server."""

    def __init__(self, kind: str, groups: list[list[socket.socket]]) -> None:
        self.kind = kind
        self.push = unmasked(PROTOCOLS[kind][2])
        self.socks = [s for g in groups for s in g]
        self.goal = [len(g) for g in groups]
        top = max(s.fileno() for s in self.socks) + 1
        self.owner = [0] * top
        for i, g in enumerate(groups):
            for s in g:
                self.owner[s.fileno()] = i
        self.partial: dict[int, bytes] = {}
        self.epoll = select.epoll(len(self.socks))
        for s in self.socks:
            self.epoll.register(s.fileno(), select.EPOLLIN)
        self.pongs = 0
        self.stray = 0  # pushes that arrived outside a round (there should be none)

    def idle(self) -> None:
        """Between rounds: answer pings, count stray pushes."""
        for fd, _ in self.epoll.poll(0, len(self.socks)):
            self.stray += self.parse(fd, os.read(fd, 65536))

    def round(self, trigger: socket.socket, frame: bytes) -> tuple[float, list[float]]:
        """Send one trigger, wait for every push: (all received, [first push of each server's
        connections, ..., last push of each server's connections, ...]), in seconds."""
        counts = [0] * len(self.goal)
        first_at = [0.0] * len(self.goal)
        done_at = [0.0] * len(self.goal)
        left = len(self.socks)
        owner, goal, push, partial, fds = self.owner, self.goal, self.push, self.partial, len(self.socks)
        now = time.perf_counter
        t0 = now()
        trigger.send(frame)
        deadline = t0 + WAIT
        while left:
            events = self.epoll.poll(1.0, 4096)
            if not events and now() > deadline:
                raise TimeoutError(f"{left} of {fds} pushes missing after {WAIT:g} s")
            for fd, _ in events:
                data = os.read(fd, 65536)
                if data == push and not partial:  # the common case: exactly one push
                    got = 1
                else:
                    got = self.parse(fd, data)
                if got:
                    o = owner[fd]
                    counts[o] += got
                    left -= got
                    if counts[o] == got:
                        first_at[o] = now() - t0
                    if counts[o] == goal[o]:
                        done_at[o] = now() - t0
        return now() - t0, first_at + done_at

    def parse(self, fd: int, data: bytes) -> int:
        """Frames other than one whole push: several, partial, pings, a close."""
        if not data:
            raise ConnectionError(f"a server closed connection fd {fd}")
        if fd in self.partial:
            data = self.partial.pop(fd) + data
        got, at, n = 0, 0, len(data)
        while n - at >= 2:
            op, size, head = data[at] & 0x0F, data[at + 1] & 0x7F, 2
            if size == 126:
                if n - at < 4:
                    break
                size, head = int.from_bytes(data[at + 2 : at + 4], "big"), 4
            if n - at < head + size:
                break
            payload = data[at + head : at + head + size]
            at += head + size
            if op == 0x9:  # a WebSocket ping (rally.py): pong with its payload
                os.write(fd, masked(payload, 0xA))
                self.pongs += 1
            elif op == 0x8:
                code = int.from_bytes(payload[:2], "big") if payload else 1005
                raise ConnectionError(f"a server closed fd {fd} with {code} {payload[2:]!r}")
            elif self.kind == "sio" and payload == b"2":  # an Engine.IO ping: pong
                os.write(fd, masked(b"3"))
                self.pongs += 1
            elif op == 0x1:
                got += 1
        if at < n:
            self.partial[fd] = data[at:]
        return got


def loadgen(kind: str, targets: list[tuple[int, int]]) -> None:
    """Open the connections and say "open"; then for each "round" on stdin run
    one round and print its times as a JSON line, answering pings between
    rounds; stop at "quit" or the end of stdin."""
    groups = [open_many(kind, port, n) for port, n in targets]
    reader = Reader(kind, groups)
    trigger, frame = groups[0][0], masked(PROTOCOLS[kind][1])
    print("open", flush=True)
    pending = b""
    watch = select.poll()  # stdin and the sockets' epoll (select() stops at descriptor 1023)
    watch.register(0, select.POLLIN)
    watch.register(reader.epoll.fileno(), select.POLLIN)
    while True:
        ready = {fd for fd, _ in watch.poll(1000)}
        if reader.epoll.fileno() in ready:
            reader.idle()
        if 0 not in ready:
            continue
        chunk = os.read(0, 4096)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, _, pending = pending.partition(b"\n")
            if line != b"round":
                return
            total, at = reader.round(trigger, frame)
            print(json.dumps({"all": total, "at": at, "pongs": reader.pongs, "stray": reader.stray}), flush=True)


# ==== Orchestration ==========================================================


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


def wait_until(what: str, check: Callable[[], bool], bound: float = WAIT) -> None:
    """Poll ``check`` until it holds, at most ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {bound:g} s")
        time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def cpu_of(pids: list[int], redis: "Redis | None") -> list[float]:
    """CPU seconds of each process, then of redis-server if any."""
    return [cpu_seconds(p) for p in pids] + ([redis.cpu()] if redis else [])


OURS: list[int] = []  # the pids of every process this benchmark started


def outside() -> float:
    """CPU seconds spent so far by every process of the machine but this
    benchmark's (user, nice and system time in /proc/stat), for a noise figure."""
    fields = open("/proc/stat").readline().split()
    ours = 0.0
    for pid in OURS:
        with contextlib.suppress(OSError, IndexError, ValueError):
            ours += cpu_seconds(pid)
    t = os.times()
    return sum(int(f) for f in fields[1:4]) / TICKS - ours - t.user - t.system


def connects(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Cluster:
    """The processes of one measurement; stops them all on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[tuple[str, tempfile._TemporaryFileWrapper[bytes]]] = []

    def spawn(self, name: str, args: list[str], cpus: set[int] | None) -> subprocess.Popen[bytes]:
        log = tempfile.NamedTemporaryFile(prefix=f"cluster-{name}-", suffix=".log")
        proc = subprocess.Popen(args, preexec_fn=pinned(cpus), stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
        self.procs.append(proc)
        OURS.append(proc.pid)
        self.logs.append((name, log))
        return proc

    def server(self, kind: str, broker_url: str, cpus: set[int] | None) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        proc = self.spawn(f"{kind}-{port}", [PY, __file__, "_serve", kind, str(port), broker_url], cpus)
        wait_until(f"{kind} server on port {port} accepting", lambda: proc.poll() is None and connects(port))
        if kind == "rally" and broker_url:
            wait_until(f"rally on port {port}: broker up", lambda: health(port)["broker"]["state"] == "up")
        return proc, port

    def tail(self) -> str:
        out = []
        for name, log in self.logs:
            log.flush()
            text = open(log.name, "rb").read().decode(errors="replace").strip()
            if text:
                out.append(f"--- {name} stderr (last lines) ---\n" + "\n".join(text.splitlines()[-15:]))
        return "\n".join(out)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            print(self.tail(), file=sys.stderr)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for _, log in self.logs:
            log.close()


def http_json(port: int, method: str, path: str, body: object = None, timeout: float = WAIT) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"host": "localhost", "content-type": "application/json"}
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        reply = conn.getresponse()
        data = json.loads(reply.read())
        if reply.status != 200:
            raise RuntimeError(f"{method} {path}: {reply.status} {data}")
        return data  # type: ignore[no-any-return]
    finally:
        conn.close()


def health(port: int) -> dict[str, Any]:
    try:
        return http_json(port, "GET", "/_rally/health", timeout=2)
    except (OSError, ValueError):
        return {"broker": {"state": "unreachable"}}


class Redis:
    """A throw-away redis-server on a free port."""

    def __init__(self, cluster: Cluster, cpus: set[int] | None) -> None:
        import redis

        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = cluster.spawn("redis", args, cpus)
        self.client = redis.Redis(port=self.port, socket_timeout=5)

        def pong() -> bool:
            with contextlib.suppress(redis.RedisError):
                return bool(self.client.ping())
            return False

        wait_until("redis-server answering PING", pong)

    def publishes(self) -> int:
        stats = self.client.info("commandstats")
        return int(stats.get("cmdstat_publish", {}).get("calls", 0))

    def cpu(self) -> float:
        """redis-server's CPU seconds, to the microsecond (INFO cpu)."""
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def subscribers(self, channel: str) -> int:
        return int(self.client.pubsub_numsub(channel)[0][1])


class Setup:
    """One measured setup: its servers, its load generator and, in a cluster, Redis."""

    def __init__(
        self, tag: str, label: str, kind: str, servers: list[tuple[subprocess.Popen[bytes], int]], n: int,
        cpus: set[int] | None, redis: Redis | None, channel: str,
    ) -> None:  # fmt: skip
        self.tag, self.label, self.n, self.redis = tag, label, n, redis
        self.ports, self.pids = [p for _, p in servers], [s.pid for s, _ in servers]
        share = [n // len(self.ports) + (i < n % len(self.ports)) for i in range(len(self.ports))]
        targets = ",".join(f"{p}:{k}" for p, k in zip(self.ports, share, strict=True))
        t0 = time.monotonic()
        self.load = subprocess.Popen(
            [PY, __file__, "_load", kind, targets],
            preexec_fn=pinned(cpus),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        OURS.append(self.load.pid)
        self.expect("open")
        self.open_s = time.monotonic() - t0
        if redis is not None:
            count = len(self.ports)
            wait_until(f"{count} subscribers on {channel}", lambda: redis.subscribers(channel) == count)
        self.times: list[dict[str, Any]] = []
        self.cpu = [0.0] * (len(self.pids) + 1 + (redis is not None))  # servers, load generator, redis-server
        self.others = self.wall = 0.0
        self.publishes = 0

    def expect(self, what: str) -> str:
        assert self.load.stdout is not None
        got = self.load.stdout.readline().strip()  # the load generator bounds each of its waits
        if what and got != what:
            raise RuntimeError(f"{self.tag} load generator: expected {what!r}, got {got!r} (exit {self.load.poll()})")
        return got

    def round(self, measured: bool) -> None:
        assert self.load.stdin is not None
        pids = [*self.pids, self.load.pid]
        cpu0, busy0 = cpu_of(pids, self.redis), outside()
        pub0 = self.redis.publishes() if self.redis else 0
        w0 = time.perf_counter()
        self.load.stdin.write("round\n")
        self.load.stdin.flush()
        out = json.loads(self.expect(""))
        wall = time.perf_counter() - w0
        cpu1, busy1 = cpu_of(pids, self.redis), outside()
        pub1 = self.redis.publishes() if self.redis else 0
        if not measured:
            return
        used = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
        self.cpu = [c + u for c, u in zip(self.cpu, used, strict=True)]
        self.others += max(0.0, busy1 - busy0)
        self.wall += wall
        self.publishes += pub1 - pub0
        self.times.append(out)

    def close(self) -> None:
        if self.load.poll() is None:
            assert self.load.stdin is not None
            self.load.stdin.close()
            try:
                self.load.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.load.kill()
                self.load.wait()

    def result(self) -> dict[str, Any]:
        rounds = len(self.times)
        times = sorted(t["all"] for t in self.times)
        per_server = [statistics.median(at) * 1000 for at in zip(*(t["at"] for t in self.times), strict=True)]
        k = len(self.ports)
        per_ms = [c * 1000 / rounds for c in self.cpu]  # CPU ms per broadcast
        return {
            "n": self.n,
            "rounds": rounds,
            "open_s": self.open_s,
            "p50_ms": statistics.median(times) * 1000,
            "p90_ms": times[min(rounds - 1, int(rounds * 0.9))] * 1000,
            "min_ms": times[0] * 1000,
            "max_ms": times[-1] * 1000,
            "first_p50_ms": per_server[:k],  # the first push to a connection of each server process
            "last_p50_ms": per_server[k:],  # the last
            "deliveries_per_s": self.n / statistics.median(times),
            "publish_per_broadcast": self.publishes / rounds if self.redis else None,
            "cpu_ms_servers": per_ms[: len(self.pids)],
            "cpu_ms_loadgen": per_ms[len(self.pids)],
            "cpu_ms_redis": per_ms[len(self.pids) + 1] if self.redis else None,
            "cpu_ms_others": self.others * 1000 / rounds,
            "wall_s": self.wall,
            "pongs": self.times[-1]["pongs"],
            "stray": self.times[-1]["stray"],
        }


def flood(
    ports: list[int], pids: list[int], redis: Redis, n: int, repeats: int, receiver_cpus: set[int] | None
) -> dict[str, Any]:
    """rally.py's broker alone: ``repeats`` times n broadcasts to a topic with no
    members, from the first process; the second receives each and finds no
    member. With ``receiver_cpus`` the second process moves there meanwhile,
    so that the producer has its CPU to itself."""
    was = os.sched_getaffinity(pids[1])
    if receiver_cpus is not None:
        os.sched_setaffinity(pids[1], receiver_cpus)
    try:
        runs = [flood_once(ports, pids, redis, n) for _ in range(repeats)]
    finally:
        os.sched_setaffinity(pids[1], was)
    total = {k: sum(r[k] for r in runs) for k in runs[0] if k != "cpu"}
    cpu = [sum(c) for c in zip(*(r["cpu"] for r in runs), strict=True)]  # producer, receiver, redis, the rest
    publishes = max(1, total["redis_publishes"])
    return {
        **total,
        "repeats": repeats,
        "publish_per_s": sorted(r["published"] / r["seconds"] for r in runs),
        "received_per_s": sorted(r["published"] / r["received_seconds"] for r in runs),
        "enqueue_share": total["enqueue_seconds"] / total["seconds"],
        "us_per_publish": [c * 1e6 / publishes for c in cpu[:3]],
        "cpu_share": [c / total["received_seconds"] for c in cpu],
    }


def flood_once(ports: list[int], pids: list[int], redis: Redis, n: int) -> dict[str, Any]:
    received0 = health(ports[1])["broker"]["received"]
    pub0, cpu0, busy0, t0 = redis.publishes(), cpu_of(pids, redis), outside(), time.perf_counter()
    msg = {"kind": "rpc", "id": 1, "msg": {"type": "Flood", "fields": {"n": n, "topic": "nobody"}}}
    answer = http_json(ports[0], "POST", "/_rally/rpc", msg, timeout=WAIT + 10)
    if answer.get("kind") != "ok":
        raise RuntimeError(f"Flood: {answer}")
    r = answer["value"]
    wait_until(
        f"the second process receiving {n} broadcasts",
        lambda: health(ports[1])["broker"]["received"] - received0 >= r["published"],
    )
    received_s = time.perf_counter() - t0
    cpu1, busy1 = cpu_of(pids, redis), outside()
    pub1 = redis.publishes()
    return {
        "published": r["published"],
        "dropped": r["dropped"],
        "redis_publishes": pub1 - pub0,
        "seconds": r["seconds"],
        "enqueue_seconds": r["enqueue_seconds"],
        "received_seconds": received_s,
        "cpu": [b - a for a, b in zip(cpu0, cpu1, strict=True)] + [max(0.0, busy1 - busy0)],
    }


# ==== Report =================================================================


def row(label: str, r: dict[str, Any]) -> list[str]:
    first = " / ".join(f"{x:.0f}" for x in r["first_p50_ms"])
    last = " / ".join(f"{x:.0f}" for x in r["last_p50_ms"])
    pub = "—" if r["publish_per_broadcast"] is None else f"{r['publish_per_broadcast']:.2f}"
    servers = " + ".join(f"{c:.0f}" for c in r["cpu_ms_servers"])
    redis_ms = "—" if r["cpu_ms_redis"] is None else f"{r['cpu_ms_redis']:.1f}"
    others = f"{r['cpu_ms_others']:.0f}"
    return [
        label,
        f"{r['p50_ms']:.0f}",
        f"{r['p90_ms']:.0f}",
        f"{r['min_ms']:.0f}–{r['max_ms']:.0f}",
        f"{r['deliveries_per_s']:,.0f}",
        first,
        last,
        pub,
        f"{servers} / {r['cpu_ms_loadgen']:.0f} / {redis_ms} / {others}",
        f"{r['open_s']:.1f}",
    ]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def busy_note(tag: str, r: dict[str, Any]) -> list[str]:
    """Pongs sent, and a warning when other work shared the machine during the rounds."""
    notes = [f"{tag} pongs sent by the load generator: {r['pongs']:,}"]
    if r["stray"]:
        notes.append(f"**{tag}: {r['stray']} pushes arrived outside a round**")
    share = r["cpu_ms_others"] * r["rounds"] / 1000 / r["wall_s"]
    if share > 0.1:
        notes.append(
            f"**{tag} WARNING: processes outside this benchmark (kernel threads included) used {share * 100:.0f}% "
            "of a CPU during its rounds; its times may be inflated: run again on a quiet machine**"
        )
    return notes


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    t0 = time.monotonic()
    print(f"{what} ...", file=sys.stderr, flush=True)
    yield
    print(f"{what}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000, help="WebSocket connections in each setup")
    parser.add_argument("--rounds", type=int, default=20, help="measured broadcasts per setup (at least 10)")
    parser.add_argument("--warmup", type=int, default=3, help="broadcasts left out before the rounds")
    parser.add_argument("--flood", type=int, default=20_000, help="broadcasts of one broker-alone measure")
    parser.add_argument("--flood-repeats", type=int, default=5, help="broker-alone measures (median and best)")
    parser.add_argument("--only", default="a,b,c,flood", help="comma-separated: a, b, c, flood")
    parser.add_argument("--spread", action="store_true", help="the two servers on two CPUs, the rest unpinned")
    args = parser.parse_args()
    if args.rounds < 10:
        parser.error("--rounds: at least 10")
    only = set(args.only.split(","))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard < args.connections + 100:
        sys.exit(f"RLIMIT_NOFILE's hard limit is {hard}: {args.connections} connections need more (ulimit -Hn)")
    if only & {"b", "c", "flood"}:
        if not os.path.exists(REDIS_SERVER):
            sys.exit("(b), (c) and the broker measure need redis-server: apt-get install -y redis-server")
        if importlib.util.find_spec("redis") is None:
            sys.exit("(b), (c) and the broker measure need the redis package: pip install -r bench/requirements.txt")
    all_cpus = sorted(os.sched_getaffinity(0))
    first, last = {all_cpus[0]}, {all_cpus[-1]}
    os.sched_setaffinity(0, last)  # this process waits most of the time; keep it off the servers' CPU

    def server_cpus(i: int) -> set[int] | None:
        return {all_cpus[i % len(all_cpus)]} if args.spread else first

    side = None if args.spread else last  # the load generator's and redis-server's CPUs
    try:
        import socketio  # noqa: F401

        sio_missing, versions = "", f"python-socketio {importlib.metadata.version('python-socketio')}"
    except ImportError as exc:
        sio_missing = f"python-socketio is not installed ({exc}): pip install -r bench/requirements.txt"
        versions = "no python-socketio"
    hiredis = "hiredis" if importlib.util.find_spec("hiredis") else "no hiredis (redis-py parses RESP in Python)"
    versions += f", redis-py {importlib.metadata.version('redis')} with {hiredis}"
    load_before = os.getloadavg()[0]
    begun = time.monotonic()
    n, rounds, warmup = args.connections, args.rounds, args.warmup
    results: list[list[str]] = []
    skipped: list[list[str]] = []
    flooded = None
    notes: list[str] = []

    with Cluster() as c:
        redis = Redis(c, side) if only & {"b", "c", "flood"} else None
        setups: list[Setup] = []
        try:
            if "a" in only:
                with step("(a) rally.py, one process: starting, opening the connections"):
                    servers = [c.server("rally", "", first)]
                    label = "(a) rally.py, 1 process, no broker"
                    setups.append(Setup("(a)", label, "rally", servers, n, side, None, ""))
            if "b" in only or "flood" in only:
                assert redis is not None
                with step("(b) rally.py, two processes and redis: starting"):
                    servers = [c.server("rally", redis.url, server_cpus(i)) for i in range(2)]
                if "flood" in only:  # first, while the servers have no connections
                    with step("rally.py's broker alone"):
                        pids = [s.pid for s, _ in servers]
                        ports = [p for _, p in servers]
                        flooded = flood(
                            ports, pids, redis, args.flood, args.flood_repeats, None if args.spread else last
                        )
                if "b" in only:
                    with step("(b): opening the connections"):
                        label = "(b) rally.py, 2 processes + Redis broker"
                        setups.append(Setup("(b)", label, "rally", servers, n, side, redis, RALLY_CHANNEL))
            if "c" in only and sio_missing:
                skipped.append(["(c) python-socketio: SKIPPED", *["—"] * 9])
                notes.append(f"**(c) SKIPPED: {sio_missing}**")
                print(f"(c) SKIPPED: {sio_missing}", file=sys.stderr, flush=True)
            elif "c" in only:
                assert redis is not None
                with step("(c) python-socketio, two processes and redis: starting, opening the connections"):
                    servers = [c.server("sio", redis.url, server_cpus(i)) for i in range(2)]
                    label = "(c) python-socketio, 2 processes + AsyncRedisManager"
                    setups.append(Setup("(c)", label, "sio", servers, n, side, redis, SIO_CHANNEL))
            with step(f"{warmup} warm-up and {rounds} measured rounds, the setups taking turns"):
                for i in range(warmup + rounds):
                    turn = i % len(setups) if setups else 0
                    for setup in setups[turn:] + setups[:turn]:  # a different one goes first each round
                        setup.round(measured=i >= warmup)
        finally:
            for setup in setups:
                setup.close()
    for setup in setups:
        r = setup.result()
        results.append(row(setup.label, r))
        notes += busy_note(setup.tag, r)
    results += skipped

    layout = (
        "servers on CPUs " + ",".join(map(str, all_cpus[:2])) + ", load generator and redis-server unpinned"
        if args.spread
        else f"servers on CPU {all_cpus[0]}, load generator and redis-server on CPU {all_cpus[-1]}"
    )
    print(
        f"Broadcast fan-out to {n:,} WebSocket connections, {rounds} rounds after {warmup} warm-up, "
        f"{time.strftime('%Y-%m-%d')}, Python {sys.version.split()[0]}, {versions}, {len(all_cpus)} CPUs; {layout}.\n"
    )
    header = [
        "setup",
        "all received p50 ms",
        "p90 ms",
        "min–max ms",
        "deliveries/s (p50)",
        "first push p50 ms (producing / other process)",
        "last push p50 ms (producing / other process)",
        "PUBLISH per broadcast",
        "CPU ms per broadcast: server(s) / loadgen / redis / rest of machine",
        "open s",
    ]
    if results:
        print(markdown(header, results))
    if flooded is not None:
        f = flooded
        share = " / ".join(f"{x * 100:.0f}%" for x in f["cpu_share"])
        us = f["us_per_publish"]
        pub, rec = f["publish_per_s"], f["received_per_s"]
        where = "--spread layout" if args.spread else "the producer alone on the servers' CPU, the other beside Redis"
        print(
            f"\n### rally.py's broker alone ({where})\n\n"
            f"{f['repeats']} times {args.flood:,} broadcasts to a topic nobody joined, made by one process without "
            f"yielding ({f['dropped']} dropped; Redis counted {f['redis_publishes']:,} PUBLISH for "
            f"{f['published']:,} broadcasts). PUBLISH/s from the producing process: **{statistics.median(pub):,.0f}** "
            f"median, {pub[-1]:,.0f} best; through to the other process: **{statistics.median(rec):,.0f}** median, "
            f"{rec[-1]:,.0f} best. The producer spent {f['enqueue_share'] * 100:.0f}% of its time making the "
            "broadcasts (encode, write), the rest in redis-py: reading Redis's replies and its own messages back "
            "from the subscription.\n\n"
            f"CPU per broadcast: producer {us[0]:.0f} µs, other process {us[1]:.0f} µs, redis-server {us[2]:.1f} µs "
            f"(CPU share over the time, producer / other / redis-server / rest of the machine: {share}). So one "
            f"Redis core (2 subscribers) would saturate near {1e6 / us[2]:,.0f} broadcasts/s, "
            f"{1e6 / us[2] / pub[-1]:.0f}× what one rally.py process can publish. Long before that, the limit is "
            f"the subscribers: every process receives every broadcast of the cluster and spends ~{us[1]:.0f} µs of "
            f"its CPU on each even with no member for it, so the whole cluster tops out near "
            f"{1e6 / us[1]:,.0f} broadcasts/s (all producers together), the receiving cost growing with that rate "
            "in every process."
        )
        if f["cpu_share"][3] > 0.1:
            notes.append(
                f"**broker alone: WARNING: processes outside this benchmark used {f['cpu_share'][3] * 100:.0f}% of "
                "a CPU meanwhile: its rates may be low (the CPU per broadcast is not affected)**"
            )
    notes.append(f"load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print("\n" + "\n".join(f"- {note}." for note in notes) + f"\n\n(took {time.monotonic() - begun:.0f} s)")


if __name__ == "__main__":
    hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard_limit, hard_limit))
    if sys.argv[1:2] == ["_serve"]:
        kind, port, url = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        (serve_rally if kind == "rally" else serve_sio)(port, url)
    elif sys.argv[1:2] == ["_load"]:
        pairs = [tuple(map(int, t.split(":"))) for t in sys.argv[3].split(",")]
        loadgen(sys.argv[2], [(p, k) for p, k in pairs])
    else:
        main()
