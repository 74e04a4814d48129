"""Tests of rally.py across processes (SPEC section 8): three server processes
share one real redis-server, which a fixture starts on a free loopback port
(Debian's redis-server) and a test kills and starts again. Rules as in
test_rally.py: loopback only, a bound on every wait, no sleep standing in for
synchronisation (a wait polls the condition it asserts, with a bound). That
nothing more reached a connection is shown by a marker broadcast from the same
origin afterwards arriving as its next frame: one origin's messages reach
every process in the order they were published. Without redis-server or the
redis package the module is skipped with the reason; CI installs both.
"""

import asyncio
import contextlib
import json
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


    @dataclass
    class Logout: ...


    # A heartbeat a minute: the only PUBLISHes during a test are its broadcasts.
    broker = rally.RedisBroker(os.environ["CLUSTER_BROKER"], heartbeat_interval=60, max_backoff=0.5)
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


    @app.rpc
    async def server_shout(msg: Shout) -> int:
        if msg.scope == "app":
            return await app.broadcast_to_app(Heard(msg.text))
        if msg.scope == "page":
            return await app.broadcast_to_page(msg.target, Heard(msg.text))
        if msg.scope == "session":
            return await app.broadcast_to_session(msg.target, Heard(msg.text))
        return await app.broadcast_to_topic(msg.target, Heard(msg.text))


    @app.rpc
    async def server_logout(msg: Logout, server_context: rally.ServerContext) -> int:
        return await app.close_session(server_context.session_id)
    """
)


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


@dataclass
class Logout: ...


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


@pytest.fixture
async def cluster(redis_server: RedisServer, tmp_path: Any) -> AsyncIterator[list[Node]]:
    """Three rally processes on their own ports, one broker URL and one secret,
    each seeing all three on the channel."""
    (tmp_path / "cluster_app.py").write_text(APP_MODULE)
    env = dict(
        os.environ,
        PYTHONPATH=os.path.dirname(os.path.abspath(rally.__file__)),
        CLUSTER_BROKER=redis_server.url,
        CLUSTER_SECRET=SECRET,
    )
    env.pop("RALLY_BROKER", None)
    nodes: list[Node] = []
    try:
        for _ in range(3):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, os.path.abspath(rally.__file__), "cluster_app:app", "--port", "0", "--no-access-log",
                cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            node = Node(proc)
            nodes.append(node)
            node.url = (await node.wait_line("serving on ")).split("serving on ")[1].split()[0]
        for node in nodes:
            await eventually(f"{node.url} sees three processes", lambda n=node: sees(n, 3))
        yield nodes
    finally:
        for node in nodes:
            if node.proc.returncode is None:
                node.proc.kill()
                await node.proc.wait()


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


async def state_is(node: Node, state: str) -> bool:
    return bool((await node.health())["broker"]["state"] == state)


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
                _, _, body = await client.request("GET", "/_rally/health")
                return json.loads(body)["broker"]  # type: ignore[no-any-return]

            await eventually("its own hello came back", lambda: hears_itself(report))
            broker = await report()
        assert broker["state"] == "up" and broker["processes"] == [broker["process"]]
        assert broker["process"].startswith(f"{os.getpid()}.")
    finally:
        await asyncio.wait_for(server.close(), WAIT)
    assert not app.broker.up


async def hears_itself(report: Callable[[], Awaitable[dict[str, Any]]]) -> bool:
    broker = await report()
    return bool(broker["processes"] == [broker["process"]])


# ==== Workers: one port, several processes ====================================

WORKERS_APP = textwrap.dedent(
    """
    import os
    import sys
    import time
    from dataclasses import dataclass

    import rally


    @dataclass
    class Where:
        block: float


    # No secret: the workers share the parent's random one.
    app = rally.App(broker=os.environ["CLUSTER_BROKER"])


    @app.rpc
    def server_where(msg: Where, server_context: rally.ServerContext) -> list[str]:
        if msg.block:
            print(f"worker {os.getpid()} blocking", file=sys.stderr, flush=True)
            time.sleep(msg.block)  # holds this worker's loop: the next connection goes to another
        return [str(os.getpid()), server_context.session_id]


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


async def test_workers_share_one_port_and_the_session_secret_and_replace_a_killed_one(
    redis_server: RedisServer, tmp_path: Any
) -> None:
    (tmp_path / "workers_app.py").write_text(WORKERS_APP)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(rally.__file__)), CLUSTER_BROKER=redis_server.url)
    env.pop("RALLY_BROKER", None)
    env.pop("RALLY_SECRET", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(rally.__file__), "workers_app:app", "--port", "0", "--workers", "2",
        "--no-access-log", cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    node = Node(proc)
    try:
        line = await node.wait_line("serving on ")
        assert "with 2 workers" in line
        node.url = line.split("serving on ")[1].split()[0]
        async with rally.Client(node.url, timeout=WAIT) as browser:
            status, _, _ = await browser.request("GET", "/")
            assert status == 200 and browser.session_cookie is not None
            cookie, session_id = browser.session_cookie, browser.session_id
        first, second = await two_workers(node, cookie)
        assert proc.pid not in (first, second)
        assert (await where(node.url, cookie))[1] == session_id  # a cookie one signed is valid in the other

        os.kill(first, signal.SIGKILL)
        await node.wait_line(f"worker {first} was killed by SIGKILL")
        await node.wait_line("INFO rally.py serving on", 3)  # its replacement serves
        replaced = set(await two_workers(node, cookie))
        assert first not in replaced and second in replaced and len(replaced) == 2

        async with rally.Client(node.url, timeout=WAIT) as client, client.page("/") as page:
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(rally.ConnectionClosed) as info:
                await page.receive(timeout=WAIT)
            assert info.value.code == 1001
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        for pid in replaced | {first}:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        await asyncio.wait_for(node._reader, WAIT)
        log = "\n".join(node.lines)
        assert "Traceback" not in log and log.count(" ERROR ") == 1, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
