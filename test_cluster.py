"""Tests of rally.py across processes (docs/scaling.md, "Scaling out"): three server processes
share one real redis-server, which a fixture starts on a free loopback port
(Debian's redis-server) and a test kills and starts again. Rules as in
test_rally.py: loopback only, a bound on every wait, no sleep standing in for
synchronisation (a wait polls the condition it asserts, with a bound). That
nothing more reached a connection is shown by a marker broadcast from the same
origin afterwards arriving as its next frame: one origin's messages reach
every process in the order they were published. Presence tests read raw
WebSocket frames (the ``websockets`` library) to see each diff and ``self``
flag as the server wrote it. Without redis-server or the redis package the
module is skipped with the reason; CI installs both.
"""

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import websockets

import rally

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
if not os.path.exists(REDIS_SERVER):
    pytest.skip("cluster tests need Debian's redis-server (apt-get install -y redis-server)", allow_module_level=True)
try:
    import redis.asyncio as aioredis
except ImportError:
    pytest.skip("cluster tests need the redis package (pip install -e '.[redis]')", allow_module_level=True)

WAIT = 10.0  # seconds: the bound on any single wait in these tests
SECRET = "one secret for every process of the cluster"


# ==== The app every process serves ===========================================

APP_MODULE = textwrap.dedent(
    """
    import os
    import time
    from dataclasses import dataclass

    import rally


    @dataclass
    class Say:
        scope: str
        text: str
        topic: str = ""


    @dataclass
    class Join:
        topic: str


    @dataclass
    class Heard:
        text: str


    @dataclass
    class Shout:
        scope: str
        target: str
        text: str
        busy: float = 0.0  # seconds this process's loop stays busy after the broadcast


    @dataclass
    class Logout: ...


    @dataclass
    class Mood:
        mood: str


    @dataclass
    class Here:
        mood: str


    @dataclass
    class Who:
        path: str  # "" for the caller's page


    @dataclass
    class Seen:
        id: int
        tag: str
        mood: str


    # A heartbeat a minute unless a test asks for another: the only PUBLISHes
    # during a test are then its broadcasts and presence changes.
    broker = rally.RedisBroker(
        os.environ["CLUSTER_BROKER"], heartbeat_interval=float(os.environ["CLUSTER_HEARTBEAT"]), max_backoff=0.5
    )
    app = rally.App(broker=broker, secret=os.environ["CLUSTER_SECRET"])
    EFFECTS = {
        "client": rally.effect.send_to_client,
        "session": rally.effect.broadcast_to_session,
        "page": rally.effect.broadcast_to_page,
        "app": rally.effect.broadcast_to_app,
    }


    class Room:
        html = "<p>room</p>"

        def server_init(name: str) -> tuple[None, rally.Effect[Heard]]:
            return None, rally.effect.none()

        def server_update(model: None, msg: Say | Join) -> tuple[None, rally.Effect[Heard]]:
            if isinstance(msg, Join):
                return None, rally.effect.subscribe(msg.topic)
            if msg.scope == "topic":
                return None, rally.effect.broadcast_to_topic(msg.topic, Heard(msg.text))
            return None, EFFECTS[msg.scope](Heard(msg.text))


    app.page("/room/{name}", Room)


    class Lobby:
        html = "<p>lobby</p>"

        def server_init(name: str) -> tuple[Here, rally.Effect[Heard]]:
            return Here("here"), rally.effect.none()

        def server_update(model: Here, msg: Mood) -> tuple[Here, rally.Effect[Heard]]:
            return Here(msg.mood), rally.effect.none()

        def server_presence(model: Here) -> Here:
            return model


    app.page("/lobby/{name}", Lobby)


    @app.rpc
    def server_who(msg: Who, server_context: rally.ServerContext) -> list[Seen]:
        entries = app.presence(msg.path) if msg.path else server_context.presence()
        return [Seen(p.id, p.tag, p.meta.mood) for p in entries]


    @app.rpc
    async def server_shout(msg: Shout) -> int:
        if msg.scope == "app":
            reached = await app.broadcast_to_app(Heard(msg.text))
            time.sleep(msg.busy)  # as a long local fan-out would, in the broadcast's turn of the loop
            return reached
        if msg.scope == "page":
            return await app.broadcast_to_page(msg.target, Heard(msg.text))
        if msg.scope == "session":
            return await app.broadcast_to_session(msg.target, Heard(msg.text))
        return await app.broadcast_to_topic(msg.target, Heard(msg.text))


    @app.rpc
    async def server_logout(msg: Logout, server_context: rally.ServerContext) -> int:
        return await app.close_session(server_context.session_id)


    @dataclass
    class Renamed:
        name: str


    class Watch:
        html = "<p>watch</p>"

        def server_init(name: str) -> tuple[str, rally.Effect[Heard]]:
            return "", rally.effect.watch_presence("/lobby/{name}")

        def server_event(model: str, msg: Renamed | rally.PresenceChanged) -> tuple[str, rally.Effect[Heard]]:
            if isinstance(msg, Renamed):
                return msg.name, rally.effect.send_to_client(Heard(f"renamed {msg.name}"))
            lines = [f"{msg.page} join {p.meta.mood} {bool(p.session_id)}" for p in msg.joins]
            lines += [f"{msg.page} leave {p.id}" for p in msg.leaves]
            return model, rally.effect.batch(*(rally.effect.send_to_client(Heard(line)) for line in lines))


    app.page("/watch/{name}", Watch)


    @dataclass
    class Rename:
        path: str
        name: str


    @app.rpc
    async def server_rename(msg: Rename) -> int:
        return await app.broadcast_to_page(msg.path, Renamed(msg.name))


    @dataclass
    class Kick:
        id: int
        reason: str


    @app.rpc
    async def server_kick(msg: Kick) -> int:
        return await app.close_connection(msg.id, msg.reason)


    @dataclass
    class Ban:
        session: str
        reason: str


    @app.rpc
    async def server_ban(msg: Ban) -> int:
        return await app.close_session(msg.session, msg.reason)
    """
)


@dataclass
class Rename:
    path: str
    name: str


@dataclass
class Kick:
    id: int
    reason: str


@dataclass
class Ban:
    session: str
    reason: str


@dataclass
class Say:
    scope: str
    text: str
    topic: str = ""


@dataclass
class Join:
    topic: str


@dataclass
class Shout:
    scope: str
    target: str
    text: str
    busy: float = 0.0


@dataclass
class Logout: ...


@dataclass
class Who:
    path: str


def heard(text: str) -> dict[str, Any]:
    """A push of the app's one push type as a Client without the app sees it."""
    return {"type": "Heard", "fields": {"text": text}}


# ==== Fixtures: redis-server and rally processes =============================


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server on a loopback port that a test may kill and start again on that port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = b""
        while b"Ready to accept connections" not in line:
            line = await asyncio.wait_for(self.proc.stdout.readline(), WAIT)
            assert line, "redis-server exited before it was ready"
        self._drain = asyncio.ensure_future(self.proc.stdout.read())

    async def kill(self) -> None:
        assert self.proc is not None and self._drain is not None
        self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), WAIT)
        await asyncio.wait_for(self._drain, WAIT)

    async def publishes(self) -> int:
        """PUBLISH commands this redis-server has run (INFO commandstats)."""
        client = aioredis.Redis(host="127.0.0.1", port=self.port)
        try:
            stats = await asyncio.wait_for(client.info("commandstats"), WAIT)
        finally:
            await client.aclose()
        return int(stats.get("cmdstat_publish", {}).get("calls", 0))


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer(free_port())
    await server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.returncode is None:
            await server.kill()


class Node:
    """One rally server process (``python rally.py cluster_app:app``); its log
    lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.url = ""
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    async def wait_line(self, text: str, nth: int = 1) -> str:
        """The ``nth`` line that contains ``text``, once it has come."""

        async def find() -> str:
            while True:
                found = [line for line in self.lines if text in line]
                if len(found) >= nth:
                    return found[nth - 1]
                assert self.proc.returncode is None, "\n".join(self.lines)
                self._new_line.clear()
                await self._new_line.wait()

        return await asyncio.wait_for(find(), WAIT)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    async def health(self) -> dict[str, Any]:
        async with rally.Client(self.url) as client:
            status, headers, body = await client.request("GET", "/_rally/health")
        assert status == 200 and headers["content-type"] == "application/json"
        return json.loads(body)  # type: ignore[no-any-return]

    async def stop(self) -> None:
        """SIGTERM, as an orchestrator stops a process: it exits 0 without a traceback."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(self.proc.wait(), WAIT) == 0
        await asyncio.wait_for(self._reader, WAIT)
        log = "\n".join(self.lines)
        assert "Traceback" not in log and " ERROR " not in log, log


async def eventually(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it holds, for at most WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not await check():
        assert time.monotonic() < deadline, f"not within {WAIT} s: {what}"
        await asyncio.sleep(0.02)


class Cluster:
    """rally processes serving the app, each on its own port, with one broker
    URL, one secret and one heartbeat interval (seconds)."""

    def __init__(self, redis_server: RedisServer, tmp_path: Any, heartbeat: float) -> None:
        (tmp_path / "cluster_app.py").write_text(APP_MODULE)
        self.cwd = tmp_path
        self.heartbeat = heartbeat
        self.env = dict(
            os.environ,
            PYTHONPATH=os.path.dirname(os.path.abspath(rally.__file__)),
            CLUSTER_BROKER=redis_server.url,
            CLUSTER_SECRET=SECRET,
            CLUSTER_HEARTBEAT=str(heartbeat),
        )
        self.env.pop("RALLY_BROKER", None)
        self.nodes: list[Node] = []

    async def start(self) -> Node:
        """One more process, once it serves and sees every live one (itself included)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(rally.__file__), "cluster_app:app", "--port", "0", "--no-access-log",
            cwd=self.cwd, env=self.env, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        node = Node(proc)
        self.nodes.append(node)
        node.url = (await node.wait_line("serving on ")).split("serving on ")[1].split()[0]
        live = [n for n in self.nodes if n.proc.returncode is None]
        for n in live:
            await eventually(f"{n.url} sees {len(live)} processes", lambda n=n: sees(n, len(live)))
        return node

    async def kill_all(self) -> None:
        for node in self.nodes:
            if node.proc.returncode is None:
                node.proc.kill()
                await node.proc.wait()


@contextlib.asynccontextmanager
async def running_cluster(
    redis_server: RedisServer, tmp_path: Any, processes: int = 3, heartbeat: float = 60.0
) -> AsyncIterator[Cluster]:
    cluster = Cluster(redis_server, tmp_path, heartbeat)
    try:
        for _ in range(processes):
            await cluster.start()
        yield cluster
    finally:
        await cluster.kill_all()


@pytest.fixture
async def cluster(redis_server: RedisServer, tmp_path: Any) -> AsyncIterator[list[Node]]:
    """Three rally processes on their own ports, one broker URL and one secret,
    each seeing all three on the channel."""
    async with running_cluster(redis_server, tmp_path) as running:
        yield running.nodes


async def sees(node: Node, processes: int) -> bool:
    broker = (await node.health())["broker"]
    return bool(broker["state"] == "up" and len(broker["processes"]) == processes)


@contextlib.asynccontextmanager
async def pages(specs: dict[str, tuple[Node, rally.Client, str]]) -> AsyncIterator[dict[str, rally.PageConnection]]:
    """Open a page connection per name: ``name -> (node, client of a session, path)``."""
    async with contextlib.AsyncExitStack() as stack:
        conns: dict[str, rally.PageConnection] = {}
        for name, (_, client, path) in specs.items():
            conns[name] = await stack.enter_async_context(client.page(path))
        yield conns


def session(node: Node, cookie: str | None = None) -> rally.Client:
    return rally.Client(node.url, session=cookie, timeout=WAIT)


async def next_frames(conns: dict[str, rally.PageConnection], expected: dict[str, list[str]]) -> None:
    """Each connection's next frames are exactly ``expected[name]``, in order."""
    for name, texts in expected.items():
        got = [await conns[name].receive(timeout=WAIT) for _ in texts]
        assert got == [heard(t) for t in texts], name


# ==== Every scope across processes ===========================================


async def test_every_scope_reaches_the_right_connections_in_every_process_once(
    redis_server: RedisServer, cluster: list[Node]
) -> None:
    n1, n2, n3 = cluster
    s1 = session(n1)
    async with s1, s1.page("/room/a") as first:  # takes session S's cookie from n1
        assert s1.session_cookie is not None
        t1 = session(n1)
        async with t1, t1.page("/room/b") as t_first:
            assert t1.session_cookie is not None
            s_cookie, t_cookie = s1.session_cookie, t1.session_cookie
            clients = [session(n, c) for n in (n2, n3) for c in (s_cookie, t_cookie)]
            s2, t2, s3, t3 = clients
            async with contextlib.AsyncExitStack() as stack:
                for c in clients:
                    await stack.enter_async_context(c)
                conns = {
                    "S1a": first,
                    "T1b": t_first,
                    "S2b": await stack.enter_async_context(s2.page("/room/b")),
                    "T2a": await stack.enter_async_context(t2.page("/room/a")),
                    "S3a": await stack.enter_async_context(s3.page("/room/a")),
                    "T3b": await stack.enter_async_context(t3.page("/room/b")),
                }
                everyone = list(conns)
                await check_effect_scopes(redis_server, conns, everyone)
                await check_app_broadcasts(redis_server, cluster, conns, everyone, t1.session_id)
                # close_session in n2 closes session S's connections in all three.
                before = await redis_server.publishes()
                async with session(n2, s_cookie) as logout:
                    assert await logout.rpc(Logout()) == rally.Ok(1)  # S2b is n2's
                for name in ("S1a", "S2b", "S3a"):
                    with pytest.raises(rally.ConnectionClosed) as info:
                        await conns[name].receive(timeout=WAIT)
                    assert info.value.code == rally.CLOSE_SESSION_CLOSED, name
                async with session(n2) as other:
                    assert await other.rpc(Shout("app", "", "after logout")) == rally.Ok(1)  # T2a
                await next_frames(conns, {n: ["after logout"] for n in ("T1b", "T2a", "T3b")})
                assert await redis_server.publishes() == before + 2
    for node in cluster:
        health = await node.health()
        assert health["status"] == "ok"
        broker = health["broker"]
        assert broker["state"] == "up" and broker["dropped"] == 0
        assert broker["process"] in broker["processes"] and len(broker["processes"]) == 3
    assert len({tuple((await node.health())["broker"]["processes"]) for node in cluster}) == 1
    for node in cluster:
        await node.stop()


async def check_effect_scopes(
    redis_server: RedisServer, conns: dict[str, rally.PageConnection], everyone: list[str]
) -> None:
    """Effects of ``server_update``: each reaches exactly its connections, once,
    with one PUBLISH (none for ``send_to_client``)."""
    # Session S's /room/b on n2 and T's /room/b on n3 join the topic "blue"; a
    # send_to_client after the join shows that it has been applied.
    for name in ("S2b", "T3b"):
        await conns[name].send(Join("blue"))
        await conns[name].send(Say("client", "joined"))
        await next_frames(conns, {name: ["joined"]})
    steps = [
        ("S1a", Say("client", "to me"), ["S1a"]),
        ("S1a", Say("session", "to S"), ["S1a", "S2b", "S3a"]),
        ("T2a", Say("page", "to /room/a"), ["S1a", "T2a", "S3a"]),
        ("T3b", Say("app", "to all"), everyone),
        ("S1a", Say("topic", "to blue", "blue"), ["S2b", "T3b"]),
    ]
    for sender, say, reached in steps:
        before = await redis_server.publishes()
        marker = f"after {say.text}"
        await conns[sender].send(say)
        await conns[sender].send(Say("app", marker))
        await next_frames(conns, {n: ([say.text] if n in reached else []) + [marker] for n in everyone})
        assert await redis_server.publishes() == before + (1 if say.scope != "client" else 0) + 1, say


async def check_app_broadcasts(
    redis_server: RedisServer,
    cluster: list[Node],
    conns: dict[str, rally.PageConnection],
    everyone: list[str],
    t_session: str | None,
) -> None:
    """``app.broadcast_*`` from an RPC in one process: every process's
    connections get it once; it returns the count in its own process."""
    n1, n2, n3 = cluster
    assert t_session is not None
    steps = [
        (n2, Shout("app", "", "app from n2"), 2, everyone),
        (n3, Shout("page", "/room/b", "page from n3"), 1, ["T1b", "S2b", "T3b"]),
        (n1, Shout("session", t_session, "session from n1"), 1, ["T1b", "T2a", "T3b"]),
        (n1, Shout("topic", "blue", "topic from n1"), 0, ["S2b", "T3b"]),
    ]
    for node, shout, local, reached in steps:
        before = await redis_server.publishes()
        async with session(node) as caller:
            assert await caller.rpc(shout) == rally.Ok(local), shout
            marker = f"after {shout.text}"
            await caller.rpc(Shout("app", "", marker))
        await next_frames(conns, {n: ([shout.text] if n in reached else []) + [marker] for n in everyone})
        assert await redis_server.publishes() == before + 2, shout


# ==== Redis down and back =====================================================


async def test_redis_down_keeps_local_delivery_and_counts_drops_then_resumes(
    redis_server: RedisServer, cluster: list[Node]
) -> None:
    n1, n2, n3 = cluster
    async with contextlib.AsyncExitStack() as stack:
        conns: dict[str, rally.PageConnection] = {}
        for name, node in (("A1", n1), ("B1", n1), ("A2", n2), ("A3", n3)):
            client = await stack.enter_async_context(session(node))
            conns[name] = await stack.enter_async_context(client.page("/room/a"))
        everyone = list(conns)
        await conns["A1"].send(Say("app", "before"))
        await next_frames(conns, {n: ["before"] for n in everyone})

        await redis_server.kill()
        for node in cluster:
            await eventually("broker down", lambda n=node: state_is(n, "down"))
        dropped = (await n1.health())["broker"]["dropped"]
        await conns["A1"].send(Say("app", "n1 only"))
        await next_frames(conns, {"A1": ["n1 only"], "B1": ["n1 only"]})  # local delivery goes on
        assert (await n1.health())["broker"]["dropped"] == dropped + 1
        for name in ("A2", "A3"):  # their own process's broadcast is their next frame
            await conns[name].send(Say("app", f"{name} alone"))
            await next_frames(conns, {name: [f"{name} alone"]})
        for node in cluster:
            assert node.count("WARNING broker down: redis at " + redis_server.url) == 1, node.lines
            assert node.count("broker back up") == 0

        await redis_server.start()
        for node in cluster:
            await eventually("broker back with three processes", lambda n=node: sees(n, 3))
        await conns["A2"].send(Say("app", "back"))
        await next_frames(conns, {n: ["back"] for n in everyone})
        for node in cluster:
            assert node.count("INFO broker back up: redis at " + redis_server.url) == 1, node.lines
            assert node.count("broker down") == 1
    for node in cluster:
        await node.stop()


async def test_a_broadcast_leaves_for_the_other_processes_within_the_turn_that_makes_it(
    cluster: list[Node],
) -> None:
    """The PUBLISH is written in the turn of the event loop that makes the
    broadcast, not left for a later one: a producer whose loop stays busy
    for 5 s after broadcasting (as a long local fan-out would) has the push
    reach another process's connection before it answers the call."""
    n1, n2, _ = cluster
    async with contextlib.AsyncExitStack() as stack:
        there = await stack.enter_async_context(session(n2))
        theirs = await stack.enter_async_context(there.page("/room/a"))
        shouter = await stack.enter_async_context(session(n1))
        answer = asyncio.ensure_future(shouter.rpc(Shout("app", "", "while busy", busy=WAIT / 2)))
        try:
            assert await theirs.receive(timeout=WAIT) == heard("while busy")
            assert not answer.done()  # n1's loop is still in the broadcast's turn
        finally:
            assert await asyncio.wait_for(answer, WAIT) == rally.Ok(0)  # no connection on n1


async def test_max_queued_publishes_wait_for_a_stalled_redis_then_broadcasts_are_dropped(
    redis_server: RedisServer,
) -> None:
    """``max_queued`` PUBLISHes may wait for Redis's reply: with redis-server
    stopped (SIGSTOP), broadcasts 1 to 3 wait and the 4th is dropped and
    counted; once it runs again the three are answered and published."""
    app = rally.App(broker=rally.RedisBroker(redis_server.url, max_queued=3, heartbeat_interval=60, timeout=WAIT))
    app.page("/", Quiet)
    server = await app.start(access_log=False)
    try:
        async with rally.Client(server.url) as client:

            async def report() -> dict[str, Any]:
                return await broker_report(client)

            async def settled(published: int) -> bool:
                broker = await report()
                return bool(broker["waiting"] == 0 and broker["published"] == published and await hears_itself(report))

            await eventually("its own hello came back and was answered", lambda: settled(0))
            before = await redis_server.publishes()
            assert redis_server.proc is not None
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                for i in range(3):
                    await app.broadcast_to_app(Heard(f"{i}"))
                broker = await report()
                assert (broker["waiting"], broker["published"], broker["dropped"]) == (3, 0, 0)
                await app.broadcast_to_app(Heard("one too many"))
                broker = await report()
                assert (broker["waiting"], broker["published"], broker["dropped"]) == (3, 0, 1)
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            await eventually("the three waiting are answered", lambda: settled(3))
            assert await redis_server.publishes() == before + 3
            assert (await report())["state"] == "up"
    finally:
        await asyncio.wait_for(server.close(), WAIT)


async def test_a_publish_whose_reply_timed_out_is_unconfirmed_not_dropped(redis_server: RedisServer) -> None:
    """Two broadcasts are written to a redis-server that is stopped
    (SIGSTOP); their replies time out and the broker reconnects. They are
    counted ``unconfirmed``, not ``dropped``: once it runs again, Redis
    delivers both to a subscriber on the channel."""
    app = rally.App(broker=rally.RedisBroker(redis_server.url, heartbeat_interval=60, timeout=1.0, max_backoff=0.5))
    app.page("/", Quiet)
    listener = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    pubsub = listener.pubsub()
    server = await app.start(access_log=False)
    try:
        async with rally.Client(server.url) as client:

            async def report() -> dict[str, Any]:
                return await broker_report(client)

            async def settled() -> bool:
                broker = await report()
                return bool(broker["waiting"] == 0 and await hears_itself(report))

            await eventually("its own hello came back and was answered", settled)
            await pubsub.subscribe("rally:broadcast")
            assert (await pubsub.get_message(timeout=WAIT))["type"] == "subscribe"
            assert redis_server.proc is not None
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                for text in ("sent 1", "sent 2"):
                    await app.broadcast_to_app(Heard(text))
                assert (await report())["waiting"] == 2
                await eventually("the replies timed out", lambda: state_is_here(report, "down"))
                broker = await report()
                assert (broker["dropped"], broker["waiting"]) == (0, 0)  # Redis may have them, and has here
                assert broker["unconfirmed"] == 2
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            delivered = []
            while len(delivered) < 2:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=WAIT)
                assert message is not None, delivered
                delivered += [
                    text for text in ("sent 1", "sent 2") if b'"text":"%s"' % text.encode() in message["data"]
                ]
            assert delivered == ["sent 1", "sent 2"]
            await eventually("back up", lambda: state_is_here(report, "up"))
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await asyncio.wait_for(server.close(), WAIT)


async def test_a_push_over_max_message_bytes_stays_in_its_process(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The other processes would refuse a push over ``max_message_bytes``,
    so none is PUBLISHed: it is counted ``dropped`` and warned about once;
    one within the limit goes out."""
    app = rally.App(broker=rally.RedisBroker(redis_server.url, heartbeat_interval=60), max_message_bytes=1024)
    app.page("/", Quiet)
    server = await app.start(access_log=False)
    try:
        async with rally.Client(server.url) as client:

            async def report() -> dict[str, Any]:
                return await broker_report(client)

            async def settled(published: int) -> bool:
                broker = await report()
                return bool(broker["waiting"] == 0 and broker["published"] == published and await hears_itself(report))

            await eventually("its own hello came back and was answered", lambda: settled(0))
            before = await redis_server.publishes()
            for _ in range(2):
                await app.broadcast_to_app(Heard("x" * 1024))
            await app.broadcast_to_app(Heard("fits"))
            await eventually("the one that fits was published", lambda: settled(1))
            assert (await report())["dropped"] == 2
            assert await redis_server.publishes() == before + 1
        assert sum("is over max_message_bytes" in r.getMessage() for r in caplog.records) == 1
    finally:
        await asyncio.wait_for(server.close(), WAIT)


async def state_is_here(report: Callable[[], Awaitable[dict[str, Any]]], state: str) -> bool:
    return bool((await report())["state"] == state)


@dataclass
class Heard:
    text: str


class Quiet:
    html = "<p>quiet</p>"

    def server_init() -> tuple[None, rally.Effect[Heard]]:
        return None, rally.effect.none()

    def server_update(model: None, msg: Say) -> tuple[None, rally.Effect[Heard]]:
        return None, rally.effect.none()


async def state_is(node: Node, state: str) -> bool:
    return bool((await node.health())["broker"]["state"] == state)


# ==== Presence across processes ===============================================


async def cookie_of(node: Node) -> str:
    """A new session's cookie, signed by ``node`` (valid on every process: one secret)."""
    async with session(node) as client:
        status, _, _ = await client.request("GET", "/lobby/x")
        assert status == 200 and client.session_cookie is not None
        return client.session_cookie


@contextlib.asynccontextmanager
async def lobby(node: Node, cookie: str, name: str = "x") -> AsyncIterator[Any]:
    """A raw WebSocket on ``/lobby/<name>`` of ``node``, as session ``cookie``:
    the frames as the server wrote them (no ``&last=``, so no numbering)."""
    url = node.url.replace("http://", "ws://") + f"/_rally/ws?page=/lobby/{name}"
    headers = {"Cookie": f"rally_session={cookie}"}
    async with websockets.connect(url, additional_headers=headers, open_timeout=WAIT) as ws:
        yield ws


async def frame(ws: Any, timeout: float = WAIT) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def joined(ws: Any) -> dict[str, Any]:
    """The connection's own entry, as the others see it (``"self": False``),
    and under ``"state"`` the whole list it got on joining."""
    state = (await frame(ws))["state"]
    [me] = [e for e in state if e["self"]]
    return {**me, "self": False, "state": state}


def entry(me: dict[str, Any], mood: str = "here", self: bool = False) -> dict[str, Any]:
    """A presence entry on the wire: the connection ``me`` with ``mood``."""
    return {"id": me["id"], "tag": me["tag"], "self": self, "meta": {"mood": mood}}


def diff(joins: Any = (), updates: Any = (), leaves: Any = ()) -> dict[str, Any]:
    return {"kind": "presence", "joins": list(joins), "updates": list(updates), "leaves": list(leaves)}


async def listed(node: Node, path: str = "/lobby/x") -> list[tuple[int, str, str]]:
    """``app.presence(path)`` in ``node``, sorted."""
    async with session(node) as client:
        seen = (await client.rpc(Who(path))).unwrap()
    return sorted((e["id"], e["tag"], e["mood"]) for e in seen)


def rows(*entries: dict[str, Any], mood: dict[int, str] | None = None) -> list[tuple[int, str, str]]:
    """What ``listed`` returns for these connections (mood "here" unless ``mood`` says)."""
    return sorted((e["id"], e["tag"], (mood or {}).get(e["id"], "here")) for e in entries)


async def lists(node: Node, expected: list[tuple[int, str, str]]) -> None:
    """Wait until ``app.presence`` in ``node`` is ``expected`` (another process's change arrives through redis)."""

    async def check() -> bool:
        return await listed(node) == expected

    await eventually(f"{node.url} lists {expected}", check)


async def test_presence_spans_every_process_with_self_flags_tags_and_one_list(cluster: list[Node]) -> None:
    n1, n2, n3 = cluster
    s_cookie, t_cookie = await cookie_of(n1), await cookie_of(n3)
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(lobby(n1, s_cookie))
        me_a = await joined(a)
        assert me_a["state"] == [entry(me_a, self=True)]
        await lists(n2, rows(me_a))

        b = await stack.enter_async_context(lobby(n2, s_cookie))  # session S again, on another process
        me_b = await joined(b)
        assert me_b["state"] == [entry(me_a), entry(me_b, self=True)]  # the list of every process
        assert me_b["tag"] == me_a["tag"]  # one session, one tag, whichever process computed it
        assert await frame(a) == diff(joins=[entry(me_b)])
        await lists(n3, rows(me_a, me_b))

        c = await stack.enter_async_context(lobby(n3, t_cookie))  # session T
        me_c = await joined(c)
        assert me_c["state"] == [entry(me_a), entry(me_b), entry(me_c, self=True)]
        assert me_c["tag"] != me_a["tag"]
        for ws in (a, b):
            assert await frame(ws) == diff(joins=[entry(me_c)])
        elsewhere = await stack.enter_async_context(lobby(n2, t_cookie, "y"))  # another page: its own list
        me_y = await joined(elsewhere)
        assert me_y["state"] == [entry(me_y, self=True)]
        ids = [me["id"] for me in (me_a, me_b, me_c, me_y)]
        assert len(set(ids)) == 4 and all(type(i) is int and 0 < i < 2**53 for i in ids)

        await c.send(json.dumps({"kind": "send", "msg": {"type": "Mood", "fields": {"mood": "away"}}}))
        assert await frame(c) == diff(updates=[entry(me_c, "away", self=True)])
        for ws in (a, b):
            assert await frame(ws) == diff(updates=[entry(me_c, "away")])
        everyone = rows(me_a, me_b, me_c, mood={me_c["id"]: "away"})
        for node in cluster:
            await lists(node, everyone)  # app.presence
        await a.send(json.dumps({"kind": "rpc", "id": 1, "msg": {"type": "Who", "fields": {"path": ""}}}))
        reply = await frame(a)
        assert reply["kind"] == "ok" and reply["id"] == 1  # server_context.presence()
        assert sorted((e["id"], e["tag"], e["mood"]) for e in reply["value"]) == everyone

        await b.close()
        for ws in (a, c):
            assert await frame(ws) == diff(leaves=[me_b["id"]])
        await n3.stop()  # a clean stop: its connections leave at once, as its process closes them
        assert await frame(a) == diff(leaves=[me_c["id"]])
        for node in (n1, n2):
            await lists(node, rows(me_a))
        await elsewhere.send(json.dumps({"kind": "send", "msg": {"type": "Mood", "fields": {"mood": "done"}}}))
        assert await frame(elsewhere) == diff(updates=[entry(me_y, "done", self=True)])  # nothing from /lobby/x
    for node in (n1, n2):
        await node.stop()


async def test_a_page_back_through_another_process_leaves_the_first_at_once(cluster: list[Node]) -> None:
    """A page's connection to n1 is lost and it comes back through n2 (no
    sticky routing) with its resume token. n2 cannot resume it and starts it
    afresh; n1, told so, ends the page it was holding for the 30 s resume
    window now: a watcher on n3 sees the new entry join and the old one
    leave, well within the window."""
    n1, n2, n3 = cluster
    cookie, other = await cookie_of(n1), await cookie_of(n3)
    async with lobby(n3, other) as watcher:
        me = await joined(watcher)
        headers = {"Cookie": f"rally_session={cookie}"}
        first = n1.url.replace("http://", "ws://") + "/_rally/ws?page=/lobby/x&last=0"
        lost = await websockets.connect(first, additional_headers=headers, open_timeout=WAIT)
        hello = await frame(lost)
        old = next(e for e in (await frame(lost))["state"] if e["self"])
        assert (await frame(watcher))["joins"] == [{**old, "self": False}]
        lost.transport.abort()  # no close frame: n1 holds the page for its resume window
        again = f"{n2.url.replace('http://', 'ws://')}/_rally/ws?page=/lobby/x&last=1&resume={hello['resume']}"
        async with websockets.connect(again, additional_headers=headers, open_timeout=WAIT) as back:
            assert (await frame(back))["resumed"] is False
            new = next(e for e in (await frame(back))["state"] if e["self"])
            seen = [await frame(watcher) for _ in range(2)]  # n2's join and n1's leave: no order between them
            assert sorted(seen, key=lambda d: bool(d["leaves"])) == [
                diff(joins=[{**new, "self": False}]),
                diff(leaves=[old["id"]]),
            ]
            await lists(n1, rows(me, new))  # app.presence in n1: the page held there is gone


async def test_presence_of_a_killed_process_leaves_the_others_within_three_heartbeats(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    heartbeat = 1.0
    async with running_cluster(redis_server, tmp_path, heartbeat=heartbeat) as running:
        n1, n2, n3 = running.nodes
        async with contextlib.AsyncExitStack() as stack:
            conns, mes = [], []
            for node in running.nodes:
                ws = await stack.enter_async_context(lobby(node, await cookie_of(node)))
                conns.append(ws)
                mes.append(await joined(ws))
                for other in running.nodes:
                    await lists(other, rows(*mes))
            a, b, c = conns
            me_a, me_b, me_c = mes
            assert me_c["state"] == [entry(me_a), entry(me_b), entry(me_c, self=True)]
            for ws, joining in ((a, me_b), (a, me_c), (b, me_c)):
                assert await frame(ws) == diff(joins=[entry(joining)])

            n3.proc.kill()  # SIGKILL: no goodbye, no leave; only its heartbeats stop
            killed = time.monotonic()
            bound = 3 * heartbeat
            for ws in (a, b):  # the bound runs from the last message heard from it, at or before the kill
                assert await frame(ws, timeout=bound + 1.0) == diff(leaves=[me_c["id"]])
                assert time.monotonic() - killed <= bound + 0.5
            assert await listed(n1) == await listed(n2) == rows(me_a, me_b)
            await eventually("the killed process left the health report", lambda: sees(n1, 2))
        for node in (n1, n2):
            await node.stop()


async def test_a_process_started_later_lists_everyone_to_its_first_connection(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    async with running_cluster(redis_server, tmp_path) as running:
        async with contextlib.AsyncExitStack() as stack:
            conns, mes = [], []
            for node in running.nodes:
                ws = await stack.enter_async_context(lobby(node, await cookie_of(node)))
                conns.append(ws)
                mes.append(await joined(ws))
                for other in running.nodes:
                    await lists(other, rows(*mes))
            for ws, joining in ((conns[0], mes[1]), (conns[0], mes[2]), (conns[1], mes[2])):
                assert await frame(ws) == diff(joins=[entry(joining)])

            n4 = await running.start()  # it sees the three, and their presence came with them
            late = await stack.enter_async_context(lobby(n4, await cookie_of(n4)))
            me_late = await joined(late)
            assert sorted(me_late["state"], key=lambda e: e["id"]) == sorted(
                [*(entry(e) for e in mes), entry(me_late, self=True)], key=lambda e: e["id"]
            )
            for ws in conns:
                assert await frame(ws) == diff(joins=[entry(me_late)])
            for node in running.nodes:
                await lists(node, rows(*mes, me_late))
        for node in running.nodes:
            await node.stop()


async def test_presence_stays_local_while_redis_is_down_and_resyncs_when_it_is_back(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    heartbeat = 1.0
    async with running_cluster(redis_server, tmp_path, processes=2, heartbeat=heartbeat) as running:
        n1, n2 = running.nodes
        async with contextlib.AsyncExitStack() as stack:
            s_cookie, t_cookie = await cookie_of(n1), await cookie_of(n2)
            a = await stack.enter_async_context(lobby(n1, s_cookie))
            me_a = await joined(a)
            await lists(n2, rows(me_a))
            b = await stack.enter_async_context(lobby(n2, t_cookie))
            me_b = await joined(b)
            assert await frame(a) == diff(joins=[entry(me_b)])

            await redis_server.kill()
            # Unheard of for three heartbeats, the other process's entries leave.
            assert await frame(a, timeout=3 * heartbeat + 2.0) == diff(leaves=[me_b["id"]])
            assert await frame(b, timeout=3 * heartbeat + 2.0) == diff(leaves=[me_a["id"]])
            # Presence within each process goes on.
            a2 = await stack.enter_async_context(lobby(n1, s_cookie))
            me_a2 = await joined(a2)
            assert me_a2["state"] == [entry(me_a), entry(me_a2, self=True)]
            assert await frame(a) == diff(joins=[entry(me_a2)])
            async with lobby(n2, t_cookie) as gone:
                me_gone = await joined(gone)
                assert await frame(b) == diff(joins=[entry(me_gone)])
            assert await frame(b) == diff(leaves=[me_gone["id"]])

            await redis_server.start()  # each says hello with its list, and answers the other's
            for ws in (a, a2):
                assert await frame(ws) == diff(joins=[entry(me_b)])
            assert await frame(b) == diff(joins=[entry(me_a), entry(me_a2)])
            for node in running.nodes:
                await lists(node, rows(me_a, me_a2, me_b))
                await eventually("broker back with two processes", lambda n=node: sees(n, 2))
            await b.send(json.dumps({"kind": "send", "msg": {"type": "Mood", "fields": {"mood": "back"}}}))
            assert await frame(b) == diff(updates=[entry(me_b, "back", self=True)])  # nothing twice before it
            for ws in (a, a2):
                assert await frame(ws) == diff(updates=[entry(me_b, "back")])
        for node in running.nodes:
            await node.stop()


async def test_presence_messages_not_as_rally_sends_them_change_nothing(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    async with running_cluster(redis_server, tmp_path, processes=1) as running:
        [node] = running.nodes
        async with lobby(node, await cookie_of(node)) as a:
            me_a = await joined(a)
            await publish_on_channel(
                redis_server,
                *(
                    json.dumps(message).encode() + b"\n"
                    for message in (
                        {"o": "", "k": "bye"},  # "" would be this process's own entries
                        {"o": "other.1", "k": "presence", "t": "/lobby/x", "e": [[1, "t", {"mood": 1}]], "l": []},
                        {"o": "other.1", "k": "presence", "t": "/lobby/x", "e": [[3, "t", {"mood": 3}]], "l": []},
                        {"o": "other.2", "k": "presence", "t": "/lobby/x", "e": [[4, "t", {"mood": 4}]], "l": []},
                        {"o": "other.1", "k": "presence", "t": "/lobby/x", "e": ["junk", [0, "t", {}], [2, 3, {}]]},
                        {"o": "other.1", "k": "presence", "t": "/lobby/x", "e": [], "l": ["a", [1], me_a["id"]]},
                        {"o": "other.1", "k": "presence", "t": ["/lobby/x"], "e": [], "l": []},
                        {"o": "other.1", "k": "state", "p": {"/lobby/x": [[[1], "t", {}]], "/room/a": [[5, "t", {}]]}},
                        {"o": "other.1", "k": "state", "p": [["/lobby/x", [6, "t", {"mood": "m"}]]]},
                        {"o": "other.1", "k": "presence", "t": "/lobby/x", "e": [[7, "t7", {"mood": "ok"}]], "l": []},
                        {"o": "other.1", "k": "bye"},
                    )
                ),
            )
            # One publisher's messages arrive in order: the first frame is the valid join.
            assert await frame(a) == diff(joins=[{"id": 7, "tag": "t7", "self": False, "meta": {"mood": "ok"}}])
            assert await frame(a) == diff(leaves=[7])
            assert await listed(node) == rows(me_a)
        assert node.count("does not fit its type here") == 2  # once per process that sent one
        assert node.count("that rally.py did not send") == 1
        await node.stop()


# ==== Each process's page connections in the health report ===================


async def counts(node: Node, expected: dict[Node, int]) -> bool:
    """``node``'s health report gives each process's page connections as ``expected``."""
    health = await node.health()
    ids = {n: (await n.health())["broker"]["process"] for n in expected}
    own = health["broker"]["process"]
    want = {ids[n]: c for n, c in expected.items()}
    return bool(health["broker"]["connections"] == want and health["connections"] == want[own])


async def test_hello_and_state_carry_each_processs_connections_to_a_process_started_later(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    """With heartbeats a minute apart, only snapshots can carry the counts:
    the late process's ``hello`` is answered by every other's ``state``."""
    async with running_cluster(redis_server, tmp_path, processes=2) as running:
        n1, n2 = running.nodes
        async with session(n1) as c1, pages({"a": (n1, c1, "/room/a"), "b": (n1, c1, "/lobby/x")}):
            await eventually("n1 counts its pages", lambda: counts(n1, {n1: 2, n2: 0}))
            n3 = await running.start()
            await eventually("n3 heard every count", lambda: counts(n3, {n1: 2, n2: 0, n3: 0}))
            await n3.stop()  # its goodbye takes it out of the others' reports at once
            await eventually("n3 left n1's report", lambda: counts(n1, {n1: 2, n2: 0}))
        await eventually("n1's pages closed", lambda: counts(n1, {n1: 0, n2: 0}))
        for node in (n1, n2):
            await node.stop()


async def test_heartbeats_carry_each_processs_connections_as_they_change(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    async with running_cluster(redis_server, tmp_path, processes=2, heartbeat=0.5) as running:
        n1, n2 = running.nodes
        await eventually("n1 hears n2's count", lambda: counts(n1, {n1: 0, n2: 0}))
        async with session(n2) as c2, pages({"a": (n2, c2, "/room/a")}):
            await eventually("n1 hears n2's page by a heartbeat", lambda: counts(n1, {n1: 0, n2: 1}))
        await eventually("n1 hears n2's page closed by a heartbeat", lambda: counts(n1, {n1: 0, n2: 0}))
        for node in (n1, n2):
            await node.stop()


# ==== What the channel carries is checked ====================================


#: Numbers for the messages these tests publish as other processes would:
#: each above the last, as a process numbers its own.
_NUMBERS = itertools.count(1)


def signed(message: bytes, secret: str = SECRET, channel: str = "rally:broadcast") -> bytes:
    """``message`` numbered (a JSON header gets its ``q``) and after its MAC,
    as a process of the app with ``secret`` sends it."""
    if message.startswith(b"{"):
        message = b'{"q":%d,' % next(_NUMBERS) + message[1:]
    key = hmac.new(secret.encode(), b"rally broker\n" + channel.encode(), hashlib.sha256).digest()
    return hmac.digest(key, message, "sha256") + message


async def publish_on_channel(redis_server: RedisServer, *messages: bytes, sign: bool = True) -> None:
    """PUBLISH ``messages`` on the app's channel straight from a redis client
    (``signed`` with the app's secret unless ``sign`` is False), in order,
    each answered before the next leaves."""
    channel = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        for message in messages:
            await asyncio.wait_for(channel.publish("rally:broadcast", signed(message) if sign else message), WAIT)
    finally:
        await channel.aclose()


def push_message(frame: bytes, origin: str = "other.1", msg_type: str = "Heard", topic: str = "page:/room/a") -> bytes:
    """A push as a process sends it: a one-line header, then the frame."""
    return json.dumps({"o": origin, "k": "push", "t": topic, "m": msg_type}).encode() + b"\n" + frame


async def test_a_remote_push_frame_that_is_not_a_push_reaches_no_browser(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    """Before a push from the channel is written to any connection it must
    be at most max_message_bytes (1 MiB here) of UTF-8 JSON shaped as
    rally.py makes a push, of the type its header names: anything else is
    dropped, counted in ``rejected`` and warned about once."""
    async with running_cluster(redis_server, tmp_path, processes=2) as running:
        n1, n2 = running.nodes
        async with session(n1) as client, client.page("/room/a") as page:
            start = b'{"kind":"push","msg":{"type":"Heard","fields":{"text":'
            bad = [
                start + b'"\xff\xfe"}}}',  # not UTF-8
                b'{"kind":"ok","id":1,"value":null}',  # another envelope
                b'{"kind":"presence","joins":[],"updates":[],"leaves":[1]}',
                start + b'"x"}},"seq":5}',  # a key too many
                b'{"kind":"push","msg":{"type":"Shout","fields":{"text":"x"}}}',  # not the header's type
                start + b'"' + b"x" * (8 << 20) + b'"}}}',  # 8 MiB
                start + b"NaN}}}",
                start + b'"cut',
                b" " + start + b'"x"}}}',
                b"",
            ]
            await publish_on_channel(
                redis_server, push_message(start + b'"fits"}}}'), *(push_message(frame) for frame in bad)
            )
            async with session(n2) as other:
                assert await other.rpc(Shout("page", "/room/a", "marker")) == rally.Ok(0)
            assert await page.receive(timeout=WAIT) == heard("fits")
            assert await page.receive(timeout=WAIT) == heard("marker")  # nothing in between
            broker = (await n1.health())["broker"]
            assert broker["state"] == "up" and broker["rejected"] == len(bad)
        assert n1.count("that is not a push frame") == 1
        for node in running.nodes:
            await node.stop()


async def test_messages_without_the_apps_mac_reach_no_browser_and_change_nothing(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    """Whoever can PUBLISH on the channel but lacks the app's secret can
    neither push to a browser, nor close a session, nor change presence, nor
    say goodbye for a live process: such messages are dropped unread,
    counted in ``rejected`` and warned about once."""
    async with running_cluster(redis_server, tmp_path, processes=2) as running:
        n1, n2 = running.nodes
        cookie = await cookie_of(n1)
        async with session(n1, cookie) as client, client.page("/room/a") as page, lobby(n1, cookie) as a:
            me_a = await joined(a)
            assert client.session_id is not None
            n2_id = (await n2.health())["broker"]["process"]
            push = push_message(b'{"kind":"push","msg":{"type":"Heard","fields":{"text":"forged"}}}')
            close = json.dumps({"o": "other.1", "k": "close", "t": f"session:{client.session_id}"}).encode() + b"\n"
            presence = {"o": "other.1", "k": "presence", "t": "/lobby/x", "e": [[7, "t7", {"mood": "ok"}]], "l": []}
            join = json.dumps(presence).encode() + b"\n"
            bye = json.dumps({"o": n2_id, "k": "bye"}).encode() + b"\n"
            forged = [
                push,  # no MAC at all
                close,
                join,
                bye,
                signed(push, secret="another secret"),
                signed(close, channel="shop:broadcast"),  # the right secret, another app's channel
                signed(join)[:31] + join,  # a MAC cut short
                signed(bye)[:32] + bye[:-1] + b" \n",  # a MAC of other bytes
                signed(b"")[:31],
                b"",
            ]
            await publish_on_channel(redis_server, *forged, sign=False)
            async with session(n2) as other:
                assert await other.rpc(Shout("page", "/room/a", "marker")) == rally.Ok(0)
            assert await page.receive(timeout=WAIT) == heard("marker")  # nothing before it, and not closed
            assert await listed(n1) == rows(me_a)
            broker = (await n1.health())["broker"]
            assert broker["rejected"] == len(forged)
            assert broker["state"] == "up" and sorted(broker["processes"]) == sorted([broker["process"], n2_id])
        assert n1.count("without this app's MAC") == 1
        for node in running.nodes:
            await node.stop()


async def test_a_message_published_again_reaches_no_browser_and_closes_nothing(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    """Whoever can read the channel can publish a signed message again (a
    replay): each process takes a message of another once and in order, so
    a push published again reaches no browser a second time and a session
    close published again does not close the session's new connections;
    both are counted in ``rejected`` and warned about once."""
    listener = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    channel = listener.pubsub()
    await channel.subscribe("rally:broadcast")

    async def captured(part: bytes) -> bytes:
        """The next message on the channel that holds ``part``, as Redis delivered it."""
        while True:
            reply = await asyncio.wait_for(channel.get_message(ignore_subscribe_messages=True, timeout=WAIT), WAIT)
            if reply is not None and part in reply["data"]:
                return bytes(reply["data"])

    try:
        async with running_cluster(redis_server, tmp_path, processes=2) as running:
            n1, n2 = running.nodes
            cookie = await cookie_of(n1)
            session_id = cookie.split(".")[0]
            async with session(n1, cookie) as client, session(n2) as other:
                async with client.page("/room/a") as page:
                    assert await other.rpc(Shout("page", "/room/a", "once")) == rally.Ok(0)
                    push = await captured(b'"once"')
                    assert await page.receive(timeout=WAIT) == heard("once")
                    assert await other.rpc(Ban(session_id, "banned")) == rally.Ok(0)
                    close = await captured(b'"banned"')
                    await asyncio.wait_for(page.wait_closed(), WAIT)
                    assert (page.close_code, page.close_reason) == (4001, "banned")
                async with client.page("/room/a") as again:
                    await publish_on_channel(redis_server, push, close, sign=False)
                    assert await other.rpc(Shout("page", "/room/a", "marker")) == rally.Ok(0)
                    assert await again.receive(timeout=WAIT) == heard("marker")  # nothing before it
                    assert again.close_code is None
            broker = (await n1.health())["broker"]
            assert broker["rejected"] == 2 and broker["state"] == "up"
            assert n1.count("repeats one already received") == 1
            for node in running.nodes:
                await node.stop()
    finally:
        await channel.aclose()
        await listener.aclose()


# ==== One process: how a broker is named ======================================


async def test_broker_from_url_or_environment_and_health(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RALLY_BROKER", redis_server.url)
    from_env = rally.App()
    assert isinstance(from_env.broker, rally.RedisBroker) and from_env.broker.url == redis_server.url
    monkeypatch.delenv("RALLY_BROKER")
    assert rally.App().broker is None
    app = rally.App(broker=redis_server.url)
    assert isinstance(app.broker, rally.RedisBroker) and app.broker.channel == "rally:broadcast"
    with pytest.raises(rally.RegistrationError, match="another App"):
        rally.App(broker=app.broker)
    server = await app.start(access_log=False)
    try:
        async with rally.Client(server.url) as client:

            async def report() -> dict[str, Any]:
                return await broker_report(client)

            await eventually("its own hello came back", lambda: hears_itself(report))
            broker = await report()
        assert broker["state"] == "up" and broker["processes"] == [broker["process"]]
        assert broker["process"].startswith(f"{os.getpid()}.")
    finally:
        await asyncio.wait_for(server.close(), WAIT)
    assert not app.broker.up


async def broker_report(client: rally.Client) -> dict[str, Any]:
    """The broker part of ``GET /_rally/health``."""
    _, _, body = await client.request("GET", "/_rally/health")
    return json.loads(body)["broker"]  # type: ignore[no-any-return]


async def hears_itself(report: Callable[[], Awaitable[dict[str, Any]]]) -> bool:
    broker = await report()
    return bool(broker["processes"] == [broker["process"]])


# ==== One process: a connection that fails right after connecting ===========


async def test_a_broker_whose_publish_redis_refuses_backs_off_and_says_so_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis user without PUBLISH permission can SUBSCRIBE, then its
    broker's hello is refused: the connection fails each time right after
    connecting. It never counted as healthy, so the backoff keeps doubling
    (delays drawn from [0.05, 0.1], [0.1, 0.2], ... s: the 6th attempt comes
    at least 1.55 s after the 1st) and the cause is logged once."""
    admin = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        await admin.execute_command("ACL", "SETUSER", "nopub", "on", ">pw", "~*", "&*", "+@all", "-publish")

        async def refused(n: int) -> bool:
            return sum(e["count"] for e in await admin.acl_log() if e["object"] == "publish") >= n

        caplog.set_level(logging.INFO, logger="rally")
        url = f"redis://nopub:pw@127.0.0.1:{redis_server.port}/0"
        app = rally.App(broker=rally.RedisBroker(url, heartbeat_interval=60, max_backoff=30, timeout=WAIT))
        app.page("/", Quiet)
        server = await app.start(access_log=False)
        try:
            await eventually("a first PUBLISH refused", lambda: refused(1))
            first = time.monotonic()
            await eventually("a 6th PUBLISH refused", lambda: refused(6))
            assert time.monotonic() - first >= 1.4
        finally:
            await asyncio.wait_for(server.close(), WAIT)
    finally:
        await admin.aclose()
    said = [r.getMessage() for r in caplog.records if r.name == "rally" and r.getMessage().startswith("broker")]
    assert len(said) == 1 and said[0].startswith("broker down: redis at ") and "permission" in said[0], said
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ==== One process: a broker URL the broker cannot use =======================


@pytest.mark.parametrize("value", ["true", "True", "1", "yes", "y"])
def test_a_broker_url_asking_for_decoded_responses_is_refused(value: str) -> None:
    """The broker passes frames on as the bytes it receives; redis-py's
    ``decode_responses`` would hand it str and fail every message."""
    with pytest.raises(rally.RegistrationError, match="decode_responses is not supported"):
        rally.RedisBroker(f"redis://127.0.0.1:6379/0?decode_responses={value}")
    with pytest.raises(rally.RegistrationError, match="decode_responses"):
        rally.App(broker=f"redis://127.0.0.1:6379/0?socket_keepalive=1&decode_responses={value}")
    for off in ("false", "0", "no"):
        rally.RedisBroker(f"redis://127.0.0.1:6379/0?decode_responses={off}")


# ==== Workers: one port, several processes ====================================

WORKERS_APP = textwrap.dedent(
    """
    import contextlib
    import os
    import signal
    import sys
    import time
    from dataclasses import dataclass

    import rally


    @dataclass
    class Where:
        block: float


    @dataclass
    class IgnoreSigterm: ...


    @dataclass
    class FailTeardown: ...


    failing_teardown = False


    @contextlib.asynccontextmanager
    async def lifespan(app):
        sys.stderr.write(f"worker {os.getpid()} up\\n")  # one write: whole, between other processes' lines
        sys.stderr.flush()
        yield
        if failing_teardown:
            raise RuntimeError(f"worker {os.getpid()} teardown failed")


    # No secret: the workers share the parent's random one.
    app = rally.App(
        broker=os.environ["CLUSTER_BROKER"],
        lifespan=lifespan,
        shutdown_timeout=float(os.environ.get("WORKERS_SHUTDOWN_TIMEOUT", "10")),
        close_timeout=float(os.environ.get("WORKERS_CLOSE_TIMEOUT", "10")),
    )


    @app.rpc
    def server_where(msg: Where, server_context: rally.ServerContext) -> list[str]:
        if msg.block:
            print(f"worker {os.getpid()} blocking", file=sys.stderr, flush=True)
            time.sleep(msg.block)  # holds this worker's loop: the next connection goes to another
        return [str(os.getpid()), server_context.session_id]


    @app.rpc
    def server_ignore_sigterm(msg: IgnoreSigterm) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return os.getpid()


    @app.rpc
    def server_fail_teardown(msg: FailTeardown) -> int:
        global failing_teardown
        failing_teardown = True
        return os.getpid()


    class Home:
        html = "<p>home</p>"


    app.page("/", Home)
    """
)


@dataclass
class Where:
    block: float


async def where(url: str, cookie: str | None, block: float = 0.0) -> tuple[int, str]:
    """(pid, session id) of the worker that answers on a new connection."""
    async with rally.Client(url, session=cookie, timeout=WAIT) as client:
        pid, session_id = (await client.rpc(Where(block))).unwrap()
    return int(pid), session_id


async def two_workers(node: Node, cookie: str | None) -> tuple[int, int]:
    """The pids of two different workers: while one is held by a blocking
    call, the next connection can only be accepted by another."""
    seen = node.count(" blocking")
    held = asyncio.ensure_future(where(node.url, cookie, block=1.0))
    try:
        await node.wait_line(" blocking", seen + 1)
        other, other_session = await where(node.url, cookie)
        first, first_session = await asyncio.wait_for(held, WAIT)
    finally:
        held.cancel()
    assert first != other
    assert first_session == other_session
    return first, other


@dataclass
class IgnoreSigterm: ...


@dataclass
class FailTeardown: ...


def worker_pids(node: Node) -> set[int]:
    """Every worker the service has started (each says ``worker <pid> up``)."""
    return {int(line.split()[-2]) for line in node.lines if line.startswith("worker ") and line.endswith(" up")}


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended; a zombie not yet reaped by
    whichever process adopted it counts (seen in /proc where there is one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return os.path.isdir("/proc/self")  # ended since os.kill, if this system has /proc


@contextlib.asynccontextmanager
async def workers_service(
    redis_server: RedisServer, tmp_path: Any, preexec_fn: Callable[[], Any] | None = None, **env: str
) -> AsyncIterator[Node]:
    """``python rally.py workers_app:app --workers 2`` once the parent says it
    serves (``node.url`` set). Afterwards the parent and every worker it
    started are killed if still running, whatever the test did."""
    (tmp_path / "workers_app.py").write_text(WORKERS_APP)
    env = dict(
        os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(rally.__file__)), CLUSTER_BROKER=redis_server.url, **env
    )
    env.pop("RALLY_BROKER", None)
    env.pop("RALLY_SECRET", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(rally.__file__), "workers_app:app", "--port", "0", "--workers", "2",
        "--no-access-log", cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE, preexec_fn=preexec_fn,
    )  # fmt: skip
    node = Node(proc)
    try:
        line = await node.wait_line(" with 2 workers (Ctrl-C stops)")  # the parent's line; a worker's may come first
        node.url = line.split("serving on ")[1].split()[0]
        yield node
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        for pid in worker_pids(node):
            if not gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(node._reader, WAIT)


async def ended(node: Node) -> str:
    """The service's whole log once the parent has exited and every worker
    has too (the last one to go closes the parent's stderr pipe)."""
    await asyncio.wait_for(node.proc.wait(), WAIT)
    await asyncio.wait_for(node._reader, WAIT)
    return "\n".join(node.lines)


async def test_workers_share_one_port_and_the_session_secret_and_replace_a_killed_one(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    async with workers_service(redis_server, tmp_path) as node:
        async with rally.Client(node.url, timeout=WAIT) as browser:
            status, _, _ = await browser.request("GET", "/")
            assert status == 200 and browser.session_cookie is not None
            cookie, session_id = browser.session_cookie, browser.session_id
        first, second = await two_workers(node, cookie)
        assert node.proc.pid not in (first, second)
        assert (await where(node.url, cookie))[1] == session_id  # a cookie one signed is valid in the other

        os.kill(first, signal.SIGKILL)
        await node.wait_line(f"worker {first} was killed by SIGKILL")
        await node.wait_line("INFO rally.py serving on", 3)  # its replacement serves
        replaced = set(await two_workers(node, cookie))
        assert first not in replaced and second in replaced and len(replaced) == 2

        async with rally.Client(node.url, timeout=WAIT) as client, client.page("/") as page:
            node.proc.send_signal(signal.SIGTERM)
            with pytest.raises(rally.ConnectionClosed) as info:
                await page.receive(timeout=WAIT)
            assert info.value.code == 1001
        log = await ended(node)
        assert node.proc.returncode == 0
        for pid in replaced | {first}:
            assert gone(pid)
        assert "Traceback" not in log and log.count(" ERROR ") == 1, log


async def test_a_worker_that_ignores_sigterm_is_killed_and_the_parent_exits(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    # Stopping is bounded by shutdown_timeout + close_timeout + 5 s: 6 s here.
    limits = {"WORKERS_SHUTDOWN_TIMEOUT": "0.5", "WORKERS_CLOSE_TIMEOUT": "0.5"}
    async with workers_service(redis_server, tmp_path, **limits) as node:
        async with rally.Client(node.url, timeout=WAIT) as client:
            stubborn = (await client.rpc(IgnoreSigterm())).unwrap()
        node.proc.send_signal(signal.SIGTERM)
        log = await ended(node)
        assert node.proc.returncode == 0, log
        assert "1 workers did not stop in time; killing them" in log
        assert gone(stubborn)
        assert "Traceback" not in log, log


async def test_a_worker_whose_teardown_fails_after_serving_is_replaced_like_a_crash(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    async with workers_service(redis_server, tmp_path) as node:
        async with rally.Client(node.url, timeout=WAIT) as browser:
            status, _, _ = await browser.request("GET", "/")
            assert status == 200
            cookie = browser.session_cookie
            failing = (await browser.rpc(FailTeardown())).unwrap()
        os.kill(failing, signal.SIGTERM)  # it stops gracefully, then its lifespan's exit raises
        await node.wait_line(f"worker {failing} exited with code 1")
        await node.wait_line("INFO rally.py serving on", 3)  # its replacement serves
        assert failing not in await two_workers(node, cookie)

        node.proc.send_signal(signal.SIGTERM)
        log = await ended(node)
        assert node.proc.returncode == 0, log
        assert f"RuntimeError: worker {failing} teardown failed" in log
        assert "could not start serving" not in log, log


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
async def test_workers_stop_gracefully_when_the_parent_is_killed_or_hung_up(
    redis_server: RedisServer, tmp_path: Any, sig: signal.Signals
) -> None:
    async with workers_service(redis_server, tmp_path) as node:
        await node.wait_line("INFO rally.py serving on", 2)
        workers = worker_pids(node)
        assert len(workers) == 2, "\n".join(node.lines)
        port = int(node.url.rpartition(":")[2])
        async with rally.Client(node.url, timeout=WAIT) as client, client.page("/") as page:
            node.proc.send_signal(sig)
            with pytest.raises(rally.ConnectionClosed) as info:
                await page.receive(timeout=WAIT)
            assert info.value.code == 1001  # closed as on SIGTERM
        log = await ended(node)
        assert node.proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 0), log
        await eventually("the workers have exited", lambda: asyncio.sleep(0, all(gone(pid) for pid in workers)))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
        if sig == signal.SIGKILL:
            assert log.count(f"parent {node.proc.pid} is gone; shutting down") == 2, log
        else:
            assert "stopping 2 workers (SIGHUP)" in log, log
        assert "Traceback" not in log and " ERROR " not in log, log


async def test_workers_and_their_parent_started_with_sighup_ignored_keep_ignoring_it(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    def ignore_sighup() -> None:  # as nohup starts a command
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    async with workers_service(redis_server, tmp_path, preexec_fn=ignore_sighup) as node:
        await node.wait_line("INFO rally.py serving on", 2)
        node.proc.send_signal(signal.SIGHUP)
        node.proc.send_signal(signal.SIGTERM)  # arrives after SIGHUP: the log names the one that stopped it
        log = await ended(node)
        assert node.proc.returncode == 0, log
        assert "stopping 2 workers (SIGTERM)" in log, log
        assert "Traceback" not in log and " ERROR " not in log, log


# ==== Pages that react to the server, across processes ========================


async def watch(node: Node) -> AsyncIterator[Any]:
    url = node.url.replace("http://", "ws://") + "/_rally/ws?page=/watch/w"
    return websockets.connect(url, open_timeout=WAIT)


async def pushed(ws: Any) -> str:
    got = await frame(ws)
    assert got["kind"] == "push", got
    return str(got["msg"]["fields"]["text"])


async def test_server_events_and_presence_changes_cross_processes_and_a_killed_process_leaves(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    heartbeat = 1.0
    async with running_cluster(redis_server, tmp_path, heartbeat=heartbeat) as running:
        n1, n2, n3 = running.nodes
        async with contextlib.AsyncExitStack() as stack:
            watcher = await stack.enter_async_context(await watch(n1))
            far = await stack.enter_async_context(lobby(n3, await cookie_of(n3)))
            me = await joined(far)
            # The join of a connection of another process reaches the watcher's model, with its session id.
            assert await pushed(watcher) == "/lobby/x join here True"
            async with session(n2) as client:
                reply = await client.request(
                    "POST",
                    "/_rally/rpc",
                    json.dumps(
                        {
                            "kind": "rpc",
                            "id": 1,
                            "msg": {"type": "Rename", "fields": {"path": "/watch/w", "name": "Ann"}},
                        }
                    ).encode(),
                    headers=[("content-type", "application/json")],
                )
                assert reply[0] == 200
            assert await pushed(watcher) == "renamed Ann"  # a server event from another process, into the model
            n3.proc.kill()  # SIGKILL: only its heartbeats stop
            assert await pushed(watcher) == f"/lobby/x leave {me['id']}"  # within three heartbeats
        await n1.stop()
        await n2.stop()


async def test_close_connection_and_close_session_with_a_reason_cross_processes(cluster: list[Node]) -> None:
    n1, n2, _ = cluster
    cookie = await cookie_of(n2)
    async with lobby(n2, cookie) as kicked, lobby(n2, cookie, "y") as banned:
        me = await joined(kicked)
        await joined(banned)
        async with session(n1) as client:
            for msg in (
                {"type": "Kick", "fields": {"id": me["id"], "reason": "kicked by a moderator"}},
                {"type": "Ban", "fields": {"session": cookie.split(".")[0], "reason": "banned"}},
            ):
                status, _, body = await client.request(
                    "POST",
                    "/_rally/rpc",
                    json.dumps({"kind": "rpc", "id": 1, "msg": msg}).encode(),
                    headers=[("content-type", "application/json")],
                )
                assert (status, json.loads(body)["value"]) == (200, 0)  # none of them in n1
        for ws, reason in ((kicked, "kicked by a moderator"), (banned, "banned")):
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await frame(ws)
            assert (ws.close_code, ws.close_reason) == (4001, reason)
