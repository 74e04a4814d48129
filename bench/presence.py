"""Presence on one page of N WebSockets: what a join, an update and a leave cost.

    python bench/presence.py                      # N = 2000, 20 rounds, about 40 s
    python bench/presence.py --connections 1000 --rounds 50

The server (rally.py, a stateful page with ``server_presence``) runs in its
own process pinned to CPU 0; the clients (raw asyncio protocols that read
every frame) run in this process, pinned to CPU 1. The page is filled to
N / 10 connections, measured, then filled to N and measured again. Each
round has three events, each timed from the client's first byte until the
last expected frame has arrived, waited on with a bound (no sleeps):

- update: connection 1 sends ``Typing``, which flips its presence meta; all
  N connections get an ``updates`` diff (N - 1 the shared one, the sender
  its own copy with ``"self": true``);
- join: a new connection opens (TCP connect, handshake, ``server_init``);
  the N others get a ``joins`` diff and the joiner the whole list once;
- leave: that connection sends a close frame; the N others get ``leaves``.

Filling the page opens connections 250 at a time. The joins that end in
one turn of the server's event loop reach the connections already listed
as one diff, and each joiner gets the whole list (growing with the page:
the lists alone are quadratic in N, about 240 MB of JSON to reach 2000).

Frame sizes are on the wire (WebSocket header included). "Distinct
payloads" counts the different byte strings the recipients of one event got,
and "server encodes" counts the presence frames the server JSON-encoded for
it (counted by wrapping ``rally._dumps`` in the server process): both stay
the same from N / 10 to N when a diff is encoded once and shared.
"""

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 30.0  # bound on every wait
UPGRADE = (
    b"GET /_rally/ws?page=/ HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
)


# -- the server ----------------------------------------------------------------------


def serve(port: int) -> None:
    sys.path.insert(0, os.path.dirname(HERE))
    import rally

    @dataclass
    class Meta:
        name: str
        typing: bool

    @dataclass
    class Typing:
        on: bool

    @dataclass
    class Encodes:
        pass

    @dataclass
    class Counts:
        encodes: int

    counts = Counts(0)
    dumps = rally._dumps

    def counting_dumps(value: object) -> bytes:
        if type(value) is dict and value.get("kind") == "presence":
            counts.encodes += 1
        return dumps(value)

    rally._dumps = counting_dumps  # looked up at call time by _presence and _presence_frame

    app = rally.App(max_connections=20_000, max_presence_entries=20_000)  # the page holds every connection

    @app.rpc
    def server_encodes(msg: Encodes) -> Counts:
        return Counts(counts.encodes)

    class Room:
        html = "<p>presence bench</p>"

        def server_init(server_context: rally.ServerContext) -> tuple[Meta, rally.Effect]:
            # A fixed-width name, so that entries differ only by their connection id.
            return Meta(f"guest-{server_context.connection_id:06d}", False), rally.effect.none()

        def server_update(model: Meta, msg: Typing) -> tuple[Meta, rally.Effect]:
            return Meta(model.name, msg.on), rally.effect.none()

        def server_presence(model: Meta, server_context: rally.ServerContext) -> Meta:
            return model

    app.page("/", Room)
    app.run("127.0.0.1", port, access_log=False)


# -- the clients ---------------------------------------------------------------------


def masked(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame with an all-zero masking key (the payload goes as is)."""
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def typing_frame(on: bool) -> bytes:
    return masked(b'{"kind":"send","msg":{"type":"Typing","fields":{"on":%s}}}' % (b"true" if on else b"false"))


CLOSE_FRAME = masked((1000).to_bytes(2, "big"), opcode=0x8)


def wire_size(payload: bytes) -> int:
    n = len(payload)
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


EMPTY_LISTS = (("joins", b'"joins":[]'), ("updates", b'"updates":[]'), ("leaves", b'"leaves":[]'))


def kind_of(payload: bytes) -> str:
    """Which presence frame a payload is (a diff: by its non-empty list), whatever the order of its keys."""
    head = payload[:64]
    if b'"kind":"presence"' not in head:
        return "other"
    if b'"state":' in head:
        return "state"
    for kind, empty in EMPTY_LISTS:
        if empty not in payload:
            return kind
    return "empty"


class Tally:
    """Frames received by all clients, per kind; one event is awaited at a time."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.payloads: Counter[bytes] = Counter()  # of the awaited kind, while keep is set
        self.keep = False
        self.kind = ""
        self.target = 0
        self.done: asyncio.Future[None] | None = None
        self.done_at = 0.0

    def arm(self, kind: str, target: int, keep: bool = True) -> "asyncio.Future[None]":
        if self.counts[self.kind] != self.target:
            raise RuntimeError(f"{self.counts[self.kind]} {self.kind} frames where {self.target} were expected")
        self.counts.clear()
        self.payloads.clear()
        self.kind, self.target, self.keep = kind, target, keep
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def got(self, kind: str, payload: bytes) -> None:
        n = self.counts[kind] = self.counts[kind] + 1
        if kind == self.kind:
            if self.keep:
                self.payloads[payload] += 1
            if n == self.target and self.done is not None:
                self.done_at = time.perf_counter()
                self.done.set_result(None)


TALLY = Tally()


async def until(done: "asyncio.Future[None]", what: str, clients: list["Client"]) -> None:
    """Wait for the awaited event; fail once no awaited frame has come for TIMEOUT seconds."""
    seen = -1
    while TALLY.counts[TALLY.kind] != seen:
        seen = TALLY.counts[TALLY.kind]
        try:
            await asyncio.wait_for(asyncio.shield(done), TIMEOUT)
            return
        except asyncio.TimeoutError:
            pass
    lost = sum(c.closed.done() for c in clients)
    raise RuntimeError(
        f"{what}: {seen} of {TALLY.target} {TALLY.kind} frames, none more for {TIMEOUT:.0f} s; "
        f"{lost} of {len(clients)} connections closed"
    )


class Client(asyncio.Protocol):
    """One page connection: reads every frame, answers pings. A client that
    ``watch``es keeps its last presence payload, and its own id from ``state``."""

    def __init__(self, watch: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.listed: asyncio.Future[None] = loop.create_future()  # the presence state has arrived
        self.closed: asyncio.Future[None] = loop.create_future()
        self.watch = watch
        self.id = 0
        self.last = b""  # the last presence payload, if watching
        self.state_size = 0
        self.typing = False  # the presence meta's flag, as this client last set it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.open = False
        self.t.write(UPGRADE)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"handshake refused: {buf[:80]!r}")
            self.open, buf = True, buf[end + 4 :]
            self.opened.set_result(None)
        at, n = 0, len(buf)
        while n - at >= 2:
            length, head = buf[at + 1] & 0x7F, 2
            if length == 126:
                length, head = int.from_bytes(buf[at + 2 : at + 4], "big"), 4
            elif length == 127:
                length, head = int.from_bytes(buf[at + 2 : at + 10], "big"), 10
            end = at + head + length
            if n < end or n - at < head:
                break
            opcode = buf[at] & 0x0F
            if opcode == 0x1:
                self.frame(buf[at + head : end])
            elif opcode == 0x9:  # ping: answer with a pong
                self.t.write(bytes((0x8A, 0x80 | length)) + b"\0\0\0\0" + buf[at + head : end])
            elif opcode == 0x8:  # the server's close frame (an answer to ours, or its own)
                self.t.close()
            at = end
        self.buf = buf[at:]

    def frame(self, payload: bytes) -> None:
        kind = kind_of(payload)
        TALLY.got(kind, payload)
        if kind == "state":
            self.state_size = wire_size(payload)
            if self.watch:
                self.id = next(e["id"] for e in json.loads(payload)["state"] if e["self"])
            self.listed.set_result(None)
        if self.watch and kind != "other":
            self.last = payload


async def connect(port: int, watch: bool = False) -> Client:
    _, client = await asyncio.get_running_loop().create_connection(lambda: Client(watch), "127.0.0.1", port)
    return client


async def send(client: Client, frame: bytes) -> None:
    client.t.write(frame)


# -- measuring -----------------------------------------------------------------------

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_loop_cpu(pid: int) -> float:
    """CPU seconds of the server's main thread (its event loop), to the nanosecond."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Event:
    """One kind of event (update, join, leave) over the rounds at one N."""

    times: list[float] = field(default_factory=list)  # until the last recipient had it
    server_cpu: list[float] = field(default_factory=list)  # the server loop's CPU seconds
    sizes: set[int] = field(default_factory=set)  # wire sizes of the shared diff
    distinct: set[int] = field(default_factory=set)  # distinct payloads among one event's recipients
    encodes: set[int] = field(default_factory=set)  # presence frames the server encoded for one event


@dataclass
class Phase:
    """Everything measured with N connections on the page."""

    n: int
    fill_s: float
    events: dict[str, Event] = field(default_factory=lambda: {k: Event() for k in ("update", "join", "leave")})
    update_sizes: dict[bool, set[int]] = field(default_factory=lambda: {True: set(), False: set()})
    state_sizes: set[int] = field(default_factory=set)
    server_busy: float = 0.0  # CPU share over the rounds
    loadgen_busy: float = 0.0


class Bench:
    def __init__(self, port: int, server_pid: int) -> None:
        self.port = port
        self.pid = server_pid
        self.clients: list[Client] = []

    async def server_encodes(self) -> int:
        """Presence frames the server has JSON-encoded so far (an RPC over HTTP)."""
        body = b'{"kind":"rpc","id":1,"msg":{"type":"Encodes","fields":{}}}'
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), TIMEOUT)
        writer.write(
            b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        match = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
        assert match is not None, head
        reply = json.loads(await asyncio.wait_for(reader.readexactly(int(match[1])), TIMEOUT))
        writer.close()
        return int(reply["value"]["encodes"])

    async def fill(self, n: int) -> float:
        """Open connections, 250 at a time, until there are n; return once
        each has its whole list, with the seconds it took. (How many join
        diffs the others get depends on how the joins fall into the server's
        turns; the diffs before a connection's next frame all arrive first.)"""
        t0 = time.perf_counter()
        clients, have = self.clients, len(self.clients)
        joins = n - have
        done = TALLY.arm("state", joins, keep=False)
        for start in range(have, n, 250):
            batch = [connect(self.port, watch=i < 2) for i in range(start, min(start + 250, n))]
            clients += await asyncio.wait_for(asyncio.gather(*batch), TIMEOUT)
            await asyncio.wait_for(asyncio.gather(*(c.opened for c in clients[start:])), TIMEOUT)
        if joins:
            await until(done, f"filling to {n}", clients)
        await asyncio.wait_for(asyncio.gather(*(c.listed for c in clients[have:])), TIMEOUT)
        return time.perf_counter() - t0

    async def event(self, phase: Phase | None, name: str, kind: str, act: Awaitable[T]) -> tuple[bytes, T]:
        """Await ``act``, then wait until every connection on the page (but a
        joiner) has a ``kind`` diff; record it in ``phase`` (None: warm-up).
        Returns the shared diff as a bystander got it, and what ``act`` returned."""
        encodes = await self.server_encodes()
        done = TALLY.arm(kind, len(self.clients))
        cpu, t0 = server_loop_cpu(self.pid), time.perf_counter()
        result = await asyncio.wait_for(act, TIMEOUT)
        await until(done, name, self.clients)
        seconds, cpu = TALLY.done_at - t0, server_loop_cpu(self.pid) - cpu
        shared = self.clients[1].last
        if phase is not None:
            e = phase.events[name]
            e.times.append(seconds)
            e.server_cpu.append(cpu)
            e.sizes.add(wire_size(shared))
            e.distinct.add(len(TALLY.payloads))
            e.encodes.add(await self.server_encodes() - encodes)
        return shared, result

    async def rounds(self, n: int, count: int) -> Phase:
        """Fill the page to n, then ``count`` rounds of update, join and leave
        (after one warm-up round)."""
        phase = Phase(n, await self.fill(n))
        print(f"{n} connections open ({phase.fill_s:.1f} s); {count} rounds", file=sys.stderr, flush=True)
        updater = self.clients[0]
        c0, s0, w0 = own_cpu_seconds(), cpu_seconds(self.pid), time.perf_counter()
        for r in range(count + 1):
            record = phase if r else None

            # (a) update: connection 1 flips its typing flag; all n hear of it, itself included.
            updater.typing = not updater.typing
            diff, _ = await self.event(record, "update", "updates", send(updater, typing_frame(updater.typing)))
            entry = json.loads(diff)["updates"][0]
            assert entry["id"] == updater.id and entry["meta"]["typing"] is updater.typing and not entry["self"]
            if record:
                phase.update_sizes[updater.typing].add(wire_size(diff))

            # (b) join: a new connection; the n others get a join, it gets the whole list.
            diff, joiner = await self.event(record, "join", "joins", connect(self.port, watch=True))
            await asyncio.wait_for(joiner.listed, TIMEOUT)
            assert json.loads(diff)["joins"][0]["id"] == joiner.id
            assert len(json.loads(joiner.last)["state"]) == n + 1
            if record:
                phase.state_sizes.add(joiner.state_size)

            # (c) leave: the joiner sends a close frame; the n others get a leave.
            diff, _ = await self.event(record, "leave", "leaves", send(joiner, CLOSE_FRAME))
            assert json.loads(diff)["leaves"] == [joiner.id]
            await asyncio.wait_for(joiner.closed, TIMEOUT)

        wall = time.perf_counter() - w0
        phase.server_busy = (cpu_seconds(self.pid) - s0) / wall
        phase.loadgen_busy = (own_cpu_seconds() - c0) / wall
        return phase

    async def run(self, sizes: list[int], count: int) -> list[Phase]:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 20
        while True:  # until the server listens
            try:
                probe, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", self.port)
                probe.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        phases = [await self.rounds(n, count) for n in sizes]
        for c in self.clients:
            c.t.abort()
        return phases


# -- reporting -----------------------------------------------------------------------


def p50_p95(values: list[float]) -> str:
    p95 = statistics.quantiles(values, n=20, method="inclusive")[18]
    return f"{statistics.median(values) * 1000:.1f} / {p95 * 1000:.1f}"


def sizes(values: set[int]) -> str:
    return f"{min(values):,}" if len(values) == 1 else f"{min(values):,}–{max(values):,}"


def each(p: Phase, cell: Callable[[Event], str]) -> str:
    return " / ".join(cell(p.events[k]) for k in ("update", "join", "leave"))


def report(phases: list[Phase], count: int) -> str:
    rows: list[tuple[str, Callable[[Phase], str]]] = [
        ("update: ms until all N have the diff, p50 / p95", lambda p: p50_p95(p.events["update"].times)),
        ("update: deliveries/s (N / p50)", lambda p: f"{p.n / statistics.median(p.events['update'].times):,.0f}"),
        ("update: diff frame bytes, typing on / off",
         lambda p: f"{sizes(p.update_sizes[True])} / {sizes(p.update_sizes[False])}"),
        ("join: ms until the N others have the diff, p50 / p95", lambda p: p50_p95(p.events["join"].times)),
        ("join: diff frame bytes", lambda p: sizes(p.events["join"].sizes)),
        ("join: `state` frame bytes to the joiner (N + 1 entries)", lambda p: sizes(p.state_sizes)),
        ("leave: ms until the N others have the diff, p50 / p95", lambda p: p50_p95(p.events["leave"].times)),
        ("leave: diff frame bytes", lambda p: sizes(p.events["leave"].sizes)),
        ("server loop CPU ms per update / join / leave (mean)",
         lambda p: each(p, lambda e: f"{statistics.mean(e.server_cpu) * 1000:.1f}")),
        ("server loop CPU µs per delivery (the row above / N)",
         lambda p: each(p, lambda e: f"{statistics.mean(e.server_cpu) / p.n * 1e6:.1f}")),
        ("presence frames the server encoded per update / join / leave",
         lambda p: each(p, lambda e: sizes(e.encodes))),
        ("distinct payloads received per update / join / leave", lambda p: each(p, lambda e: sizes(e.distinct))),
        ("CPU busy over the rounds, server / clients",
         lambda p: f"{p.server_busy * 100:.0f}% / {p.loadgen_busy * 100:.0f}%"),
        ("seconds to fill the page to N (250 connecting at a time)", lambda p: f"{p.fill_s:.1f}"),
    ]  # fmt: skip
    lines = [
        f"\n### Presence on one page, {count} rounds (server on CPU 0, clients on CPU 1)\n",
        "| " + " | ".join(["", *(f"N = {p.n:,}" for p in phases)]) + " |",
        "|" + " --- |" * (len(phases) + 1),
    ]
    lines += ["| " + " | ".join([label, *(cell(p) for p in phases)]) + " |" for label, cell in rows]
    same = all(p.update_sizes == phases[0].update_sizes for p in phases)
    lines.append(
        f"\nThe update diff is {'the same size' if same else 'NOT the same size'} at every N (its one entry is "
        "connection 1's). An update reaches N - 1 connections as one shared diff and the sender as its own copy "
        '(`"self": true`): 2 distinct payloads; a join or a leave is one payload for all. Join and leave diffs '
        "carry the joiner's id, which can have one digit more at the larger N."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=2000, help="N, connections on the page (default 2000)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds at each N (default 20)")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.serve:
        serve(args.serve)
        return
    if args.connections < 20 or args.rounds < 2:
        parser.error("--connections must be at least 20 and --rounds at least 2")
    if args.connections + 100 > hard:
        parser.error(f"RLIMIT_NOFILE is {hard}; too low for {args.connections} connections")
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", str(port)],
            preexec_fn=lambda: os.sched_setaffinity(0, {0}),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            os.sched_setaffinity(0, {1})
            bench = Bench(port, server.pid)
            phases = asyncio.run(bench.run([args.connections // 10, args.connections], args.rounds))
        finally:
            server.kill()
            server.wait()
            log.seek(0)
            complaints = [line.strip() for line in log if re.search(r"WARNING|ERROR|dropping|Traceback", line)]
            for line in complaints[:5]:
                print(f"server: {line}", file=sys.stderr)
    print(report(phases, args.rounds))
    if complaints:
        print(f"\nThe server logged {len(complaints)} warnings or errors, the first: {complaints[0]}")


if __name__ == "__main__":
    main()
