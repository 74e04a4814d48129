"""One Redis channel per app against one channel per topic: three rally.py
processes sharing one redis-server, many pages.

    python bench/channels.py                          # about 2 minutes on a quiet 2-CPU machine
    python bench/channels.py --pages 2000 --per-page 2 --broadcasts 9000

rally.py's broker PUBLISHes every broadcast of an app on one channel that
every process of the app subscribes to; each process drops what none of its
connections wants (docs/scaling.md, "Scaling out"). The other design is a channel per
topic: a process SUBSCRIBEs to ``<prefix>:t:<topic>`` while the topic has a
member there (and UNSUBSCRIBEs when its last member leaves), and a broadcast
goes to its topic's channel, so Redis sends it only to the processes that
want it. ``TopicBroker`` below builds that design on ``rally.RedisBroker``
(presence, heartbeats and snapshots stay on the app channel; only pushes and
session closes move), and this script measures both in one run.

Each design gets three server processes (six in all, up at once, two
channel prefixes on one redis-server) and its own load generator holding
``pages × per-page`` raw WebSockets, each its own session, on pages
``/room/0`` to ``/room/<pages-1>``. Two placements of a page's connections:

- grouped: all of a page's connections on one process (routing by room);
- spread: a page's connections dealt round the three processes (no affinity).

For each placement, for each design:

- open: every connection opened; the CPU each party spent per 1 000
  connections (including the SUBSCRIBEs of the topic design), the channels
  and subscriptions Redis then holds and its memory;
- flood (``--rounds`` times, the designs taking turns, a different one first
  each time): ``--broadcasts`` ``broadcast_to_page`` to pages drawn at
  random, a third produced by each process, all three at once (each yields
  every 64 so its broker sends and reads meanwhile); the time until the load
  generator holds every push, the CPU per broadcast of the three servers and
  redis-server, and how many of the broadcasts each process received from
  Redis (the broker's ``received``);
- close: every connection closed; the CPU per 1 000 connections, until
  every process has dropped every topic (and, for the topic design, Redis
  has seen every UNSUBSCRIBE).

CPU: the servers on the first CPU, the load generators and redis-server on
the last; the script itself on the last. Wall times on two CPUs shared by
three servers are a contended figure; the CPU per broadcast is the one that
says which design a busy cluster can afford.
"""

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import cluster  # noqa: E402  (the helpers of bench/cluster.py: processes, Redis, CPU, frames)
from cluster import PY, ROOT, WAIT, Cluster, Redis, cpu_of, http_json, markdown, wait_until  # noqa: E402

PROCESSES = 3
DESIGNS = {"app": "one channel per app (rally.py)", "topic": "one channel per topic"}


# ==== The channel-per-topic broker ===========================================


def topic_broker(rally: Any, url: str, **options: Any) -> Any:
    """A ``rally.RedisBroker`` whose pushes and session closes go to one
    channel per topic, subscribed while the topic has a member here."""

    class Topics(rally._Topics):  # type: ignore[name-defined,misc]
        """The app's topics, telling the broker when one gains its first
        member here or loses its last."""

        __slots__ = ()

        def join(self, session: Any, topics: Any) -> None:
            topics = tuple(topics)
            fresh = [t for t in topics if t not in self.members]
            super().join(session, topics)
            self.broker._watch(fresh, True)

        def leave(self, session: Any, topics: Any) -> None:
            topics = tuple(topics)
            super().leave(session, topics)
            self.broker._watch([t for t in topics if t not in self.members], False)

    class TopicBroker(rally.RedisBroker):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__(url, **options)
            self.prefix = self.channel.rpartition(":")[0]
            self.changes: dict[str, bool] = {}  # channel -> subscribe (True) or unsubscribe (False)
            self.changed: asyncio.Event | None = None

        def bind(self, app: Any) -> None:
            super().bind(app)
            app._registry.topics.__class__ = Topics  # same slots: the App's own instance, now watched

        def _of(self, topic: str) -> str:
            return f"{self.prefix}:t:{topic}"

        def _watch(self, topics: list[str], on: bool) -> None:
            if topics and self.changed is not None:
                for t in topics:
                    self.changes[self._of(t)] = on
                self.changed.set()

        def publish(self, topic: str, frame: bytes, msg_type: type) -> None:
            header = {"o": self.process_id, "k": "push", "t": topic, "m": msg_type.__name__}
            self._to(topic, rally._dumps(header) + b"\n" + frame)

        def close(self, topic: str) -> None:
            self._to(topic, rally._dumps({"o": self.process_id, "k": "close", "t": topic}) + b"\n")

        def _to(self, topic: str, message: bytes) -> None:
            """The base class's PUBLISH of a broadcast, to the topic's channel."""
            channel = self._of(topic).encode()
            head, self._head = self._head, b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(channel), channel)
            try:
                self._enqueue(message, True)
            finally:
                self._head = head

        async def _listen(self, pubsub: Any) -> None:
            """Listen as the base class does, and keep the subscriptions in
            step with the topics meanwhile: all of them again on every new
            connection to Redis, then each change, batched."""
            self.changed = asyncio.Event()
            self.changes = {self._of(t): True for t in self._topics.members}
            self.changed.set()
            loop = asyncio.get_running_loop()
            tasks = [loop.create_task(super()._listen(pubsub)), loop.create_task(self._sync(pubsub))]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)

        async def _sync(self, pubsub: Any) -> None:
            assert self.changed is not None
            while True:
                await self.changed.wait()
                self.changed.clear()
                changes, self.changes = self.changes, {}
                on = [c for c, subscribe in changes.items() if subscribe]
                off = [c for c, subscribe in changes.items() if not subscribe]
                for i in range(0, len(on), 1000):
                    await pubsub.subscribe(*on[i : i + 1000])
                for i in range(0, len(off), 1000):
                    await pubsub.unsubscribe(*off[i : i + 1000])

    return TopicBroker()


# ==== Servers ================================================================


def serve(port: int, url: str, design: str) -> None:
    from dataclasses import dataclass

    sys.path.insert(0, ROOT)
    import rally

    @dataclass
    class Shout:
        text: str

    @dataclass
    class Said:
        text: str

    @dataclass
    class Flood:
        n: int
        pages: int
        seed: int

    @dataclass
    class Flooded:
        seconds: float  # until Redis had answered all n PUBLISHes
        published: int
        dropped: int

    @dataclass
    class Count: ...

    options: dict[str, Any] = {"prefix": design, "heartbeat_interval": 600.0, "max_queued": 10_000_000}
    if design == "topic":
        broker = topic_broker(rally, url, **options)
    else:
        broker = rally.RedisBroker(url, **options)
    app = rally.App(broker=broker, max_connections=20_000, secret="one secret for every process", ping_interval=600)

    class Room:
        html = "<p>room</p>"

        def server_init(id: int) -> tuple[None, rally.Effect[Said]]:
            return None, rally.effect.none()

        def server_update(model: None, msg: Shout) -> tuple[None, rally.Effect[Said]]:
            return None, rally.effect.none()

    app.page("/room/{id}", Room)

    @app.rpc
    async def server_flood(msg: Flood) -> Flooded:
        rng = random.Random(msg.seed)
        p0, d0 = broker.published, broker.dropped
        t0 = time.perf_counter()
        said = Said("x")
        for i in range(msg.n):
            await app.broadcast_to_page(f"/room/{rng.randrange(msg.pages)}", said)
            if i % 64 == 63:
                await asyncio.sleep(0)  # the broker sends and reads meanwhile
        while broker.published + broker.dropped - p0 - d0 < msg.n and time.perf_counter() - t0 < WAIT:
            await asyncio.sleep(0.002)  # polls the broker's count, bounded
        return Flooded(time.perf_counter() - t0, broker.published - p0, broker.dropped - d0)

    @app.rpc
    async def server_topics(msg: Count) -> int:
        """How many topics have members in this process."""
        return len(app._registry.topics.members)

    app.run("127.0.0.1", port, access_log=False)


# ==== Load generator =========================================================


def where(placement: str, page: int, j: int, per_page: int) -> int:
    """The process (0, 1, 2) of connection ``j`` of ``page``."""
    return page % PROCESSES if placement == "grouped" else (page * per_page + j) % PROCESSES


def loadgen(ports: list[int], placement: str, pages: int, per_page: int) -> None:
    """Open every connection and say "open"; then "expect N" waits for N
    pushes and prints the seconds, "close" closes them all. (The servers
    ping every 600 s, beyond a run: nothing needs reading between commands.)"""
    socks = []
    pending: list[socket.socket] = []
    for page in range(pages):
        for j in range(per_page):
            s = socket.create_connection(("127.0.0.1", ports[where(placement, page, j, per_page)]), timeout=WAIT)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upgrade = cluster.RALLY_UPGRADE.replace(b"page=/ ", f"page=/room/{page} ".encode())
            s.sendall(upgrade)
            pending.append(s)
            if len(pending) == 100:  # asyncio's listen backlog is 100
                socks += [finish(s) for s in pending]
                pending = []
    socks += [finish(s) for s in pending]
    reader = cluster.Reader("rally", [socks])
    print("open", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "expect":
            goal, got, t0 = int(command[1]), 0, time.perf_counter()
            print("ready", flush=True)
            while got < goal:
                events = reader.epoll.poll(WAIT, 4096)
                if not events:
                    raise TimeoutError(f"{goal - got} of {goal} pushes missing after {WAIT:g} s")
                for fd, _ in events:
                    got += reader.parse(fd, os.read(fd, 65536))
            print(json.dumps({"seconds": time.perf_counter() - t0, "extra": extra(reader)}), flush=True)
        elif command[0] == "close":
            for s in socks:
                s.close()
            print("closed", flush=True)
            return


def finish(s: socket.socket) -> socket.socket:
    rest = cluster.read_head(s)
    if rest:
        raise ConnectionError(f"unexpected bytes after the handshake: {rest[:100]!r}")
    s.setblocking(False)
    return s


def extra(reader: Any) -> int:
    """Pushes that came after the goal was reached (there should be none)."""
    time.sleep(0.05)  # a short look for surplus pushes, not synchronisation
    return sum(reader.parse(fd, os.read(fd, 65536)) for fd, _ in reader.epoll.poll(0, 4096))


# ==== Orchestration ==========================================================


class Design:
    """One design's three servers; per placement, its load generator."""

    def __init__(self, c: Cluster, redis: Redis, design: str, cpus: set[int]) -> None:
        self.c, self.redis, self.design = c, redis, design
        self.ports: list[int] = []
        self.pids: list[int] = []
        for _ in range(PROCESSES):
            self.start(cpus)
        self.load: subprocess.Popen[str] | None = None
        self.floods: list[dict[str, Any]] = []

    def start(self, cpus: set[int]) -> None:
        port = cluster.free_port()
        proc = self.c.spawn(
            f"{self.design}-{port}", [PY, __file__, "_serve", str(port), self.redis.url, self.design], cpus
        )
        wait_until(f"{self.design} server on {port}", lambda: proc.poll() is None and cluster.connects(port))
        wait_until(f"{self.design} on {port}: broker up", lambda: cluster.health(port)["broker"]["state"] == "up")
        self.ports.append(port)
        self.pids.append(proc.pid)

    def cpu(self) -> list[float]:
        return cpu_of(self.pids, self.redis)  # three servers, then redis-server

    def topics(self) -> list[int]:
        msg = {"kind": "rpc", "id": 1, "msg": {"type": "Count", "fields": {}}}
        return [http_json(p, "POST", "/_rally/rpc", msg)["value"] for p in self.ports]

    def subscriptions(self) -> tuple[int, int]:
        """Channels of this design in Redis, and subscriptions to them."""
        channels = self.redis.client.pubsub_channels(f"{self.design}:*")
        if not channels:
            return 0, 0
        counts = self.redis.client.pubsub_numsub(*channels)
        return len(channels), sum(n for _, n in counts)

    def settled(self, want_topics: list[int]) -> bool:
        if self.topics() != want_topics:
            return False
        if self.design != "topic":
            return True
        return self.subscriptions()[1] == sum(want_topics) + PROCESSES  # each topic here, and the app channel

    def open(self, placement: str, pages: int, per_page: int, cpus: set[int]) -> dict[str, Any]:
        sessions = [0] * PROCESSES
        hosted: list[set[int]] = [set() for _ in range(PROCESSES)]
        for page in range(pages):
            for j in range(per_page):
                k = where(placement, page, j, per_page)
                sessions[k] += 1
                hosted[k].add(page)
        want = [s + len(h) + 1 for s, h in zip(sessions, hosted, strict=True)]  # sessions, pages, "app"
        mem0, cpu0, t0 = self.memory(), self.cpu(), time.perf_counter()
        args = [PY, __file__, "_load", ",".join(map(str, self.ports)), placement, str(pages), str(per_page)]
        self.load = subprocess.Popen(
            args, preexec_fn=cluster.pinned(cpus), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        cluster.OURS.append(self.load.pid)
        self.expect("open")
        wait_until(f"{self.design}: every topic joined and subscribed", lambda: self.settled(want))
        seconds, cpu1 = time.perf_counter() - t0, self.cpu()
        channels, subs = self.subscriptions()
        n = pages * per_page
        return {
            "seconds": seconds,
            "cpu_ms_per_1000": [(b - a) * 1e6 / n for a, b in zip(cpu0, cpu1, strict=True)],
            "channels": channels,
            "subscriptions": subs,
            "memory_kib": (self.memory() - mem0) / 1024,
        }

    def memory(self) -> int:
        return int(self.redis.client.info("memory")["used_memory"])

    def expect(self, what: str) -> str:
        assert self.load is not None and self.load.stdout is not None
        got = self.load.stdout.readline().strip()  # the load generator bounds each of its waits
        if what and got != what:
            raise RuntimeError(f"{self.design} load generator: expected {what!r}, got {got!r}")
        return got

    def flood(self, broadcasts: int, pages: int, per_page: int, seed: int) -> dict[str, Any]:
        assert self.load is not None and self.load.stdin is not None
        shares = [broadcasts // PROCESSES + (i < broadcasts % PROCESSES) for i in range(PROCESSES)]
        received0 = [cluster.health(p)["broker"]["received"] for p in self.ports]
        pub0, cpu0 = self.redis.publishes(), self.cpu()
        self.load.stdin.write(f"expect {broadcasts * per_page}\n")
        self.load.stdin.flush()
        self.expect("ready")
        answers: list[Any] = [None] * PROCESSES

        def produce(i: int) -> None:
            fields = {"n": shares[i], "pages": pages, "seed": seed * 10 + i}
            msg = {"kind": "rpc", "id": 1, "msg": {"type": "Flood", "fields": fields}}
            answers[i] = http_json(self.ports[i], "POST", "/_rally/rpc", msg, timeout=WAIT + 10)

        threads = [threading.Thread(target=produce, args=(i,)) for i in range(PROCESSES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out = json.loads(self.expect(""))
        cpu1, pub1 = self.cpu(), self.redis.publishes()
        if any(a.get("kind") != "ok" or a["value"]["dropped"] for a in answers):
            raise RuntimeError(f"{self.design}: a flood failed or dropped: {answers}")
        received = [cluster.health(p)["broker"]["received"] - r for p, r in zip(self.ports, received0, strict=True)]
        r = {
            "seconds": out["seconds"],
            "extra": out["extra"],
            "us_per_broadcast": [(b - a) * 1e6 / broadcasts for a, b in zip(cpu0, cpu1, strict=True)],
            "received_share": [x / broadcasts for x in received],
            "publishes": pub1 - pub0,
        }
        self.floods.append(r)
        return r

    def close(self) -> dict[str, Any]:
        assert self.load is not None and self.load.stdin is not None
        cpu0, t0 = self.cpu(), time.perf_counter()
        self.load.stdin.write("close\n")
        self.load.stdin.flush()
        self.expect("closed")
        self.load.wait(WAIT)
        self.load = None
        wait_until(f"{self.design}: every topic left", lambda: self.settled([0] * PROCESSES))
        return {"seconds": time.perf_counter() - t0, "cpu": [b - a for a, b in zip(cpu0, self.cpu(), strict=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=1000, help="pages (rooms) of each design's connections")
    parser.add_argument("--per-page", type=int, default=3, help="connections on each page")
    parser.add_argument("--broadcasts", type=int, default=6000, help="broadcasts of one flood, all processes together")
    parser.add_argument("--rounds", type=int, default=9, help="floods per design and placement")
    parser.add_argument("--only", default="grouped,spread", help="placements: grouped, spread")
    args = parser.parse_args()
    if not os.path.exists(cluster.REDIS_SERVER):
        sys.exit("this benchmark needs redis-server: apt-get install -y redis-server")
    cpus = sorted(os.sched_getaffinity(0))
    servers, side = {cpus[0]}, {cpus[-1]}
    os.sched_setaffinity(0, side)
    begun, load_before = time.monotonic(), os.getloadavg()[0]
    n = args.pages * args.per_page
    report: dict[str, dict[str, dict[str, Any]]] = {}
    with Cluster() as c:
        redis = Redis(c, side)
        designs = [Design(c, redis, d, servers) for d in DESIGNS]
        for placement in args.only.split(","):
            report[placement] = {}
            for d in designs:
                print(f"{placement}, {d.design}: opening {n:,} connections ...", file=sys.stderr, flush=True)
                report[placement][d.design] = {"open": d.open(placement, args.pages, args.per_page, side)}
                d.floods = []
            for i in range(1 + args.rounds):  # the first flood of each design warms up
                turn = designs[i % 2 :] + designs[: i % 2]
                for d in turn:
                    d.flood(args.broadcasts, args.pages, args.per_page, seed=i)
            for d in designs:
                d.floods = d.floods[1:]
                report[placement][d.design]["floods"] = d.floods
                report[placement][d.design]["close"] = d.close()
            print(f"{placement}: done", file=sys.stderr, flush=True)
    print_report(report, args, n, load_before, time.monotonic() - begun)


def print_report(report: dict[str, Any], args: argparse.Namespace, n: int, load_before: float, took: float) -> None:
    import importlib.metadata

    print(
        f"{PROCESSES} rally.py processes per design, {args.pages:,} pages × {args.per_page} connections = {n:,} "
        f"WebSockets (each its own session), floods of {args.broadcasts:,} broadcast_to_page to random pages, "
        f"{args.rounds} per design and placement after a warm-up; {time.strftime('%Y-%m-%d')}, Python "
        f"{sys.version.split()[0]}, redis-py {importlib.metadata.version('redis')}, {os.cpu_count()} CPUs (servers "
        "on the first, load generators and redis-server on the last).\n"
    )
    header = [
        "placement, design",
        "flood: broadcasts/s (median)",
        "CPU µs per broadcast: 3 servers (sum of medians; min–max of the sum) / redis",
        "share of broadcasts each process received from Redis",
        "PUBLISH per broadcast",
        "open: CPU ms per 1 000 connections, servers / redis",
        "channels / subscriptions, Redis memory for them",
        "close: CPU ms per 1 000, servers / redis",
    ]
    rows = []
    for placement, designs in report.items():
        for design, r in designs.items():
            floods = r["floods"]
            rate = statistics.median(args.broadcasts / f["seconds"] for f in floods)
            us = [statistics.median(f["us_per_broadcast"][i] for f in floods) for i in range(PROCESSES + 1)]
            totals = sorted(sum(f["us_per_broadcast"][:PROCESSES]) for f in floods)
            share = [statistics.median(f["received_share"][i] for f in floods) for i in range(PROCESSES)]
            publishes = statistics.median(f["publishes"] for f in floods) / args.broadcasts
            extra = sum(f["extra"] for f in floods)
            o, cl = r["open"], r["close"]
            rows.append([
                f"{placement}, {DESIGNS[design]}",
                f"{rate:,.0f}" + (f" (**{extra} extra pushes**)" if extra else ""),
                f"{sum(us[:PROCESSES]):.0f} ({' + '.join(f'{u:.0f}' for u in us[:PROCESSES])}; "
                f"{totals[0]:.0f}–{totals[-1]:.0f}) / {us[PROCESSES]:.1f}",
                " / ".join(f"{s:.2f}" for s in share),
                f"{publishes:.2f}",
                f"{sum(o['cpu_ms_per_1000'][:PROCESSES]):.0f} / {o['cpu_ms_per_1000'][PROCESSES]:.1f}",
                f"{o['channels']:,} / {o['subscriptions']:,}, {o['memory_kib']:,.0f} KiB",
                f"{sum(cl['cpu'][:PROCESSES]) * 1e6 / n:.0f} / {cl['cpu'][PROCESSES] * 1e6 / n:.1f}",
            ])  # fmt: skip
    print(markdown(header, rows))
    print(
        "\n- Redis memory: `used_memory` after the opening minus before; client buffers move it by some tens of KiB "
        "either way, so a design that adds no channel reads near zero, sometimes below.\n"
        f"- load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n"
        f"\n(took {took:.0f} s)"
    )


if __name__ == "__main__":
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if sys.argv[1:2] == ["_serve"]:
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif sys.argv[1:2] == ["_load"]:
        loadgen([int(p) for p in sys.argv[2].split(",")], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
