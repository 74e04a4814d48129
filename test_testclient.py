"""Tests of ``rally.TestClient``: the Client API against an app served in
memory, with no socket. Same rules as test_rally.py: a time bound on every
wait, no sleeps standing in for synchronisation."""

import asyncio
import contextlib
import gc
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

import rally

WAIT = 5.0  # seconds: the bound on any single wait in these tests
#: TestClient's conversation against the same over a socket: measured at
#: 1.5 to 1.7 (the h11, wsproto and JSON work of both ends is the same in
#: both; what memory saves is the sockets, syscalls and polling), asserted
#: with a margin for a loaded machine.
MIN_SPEEDUP = 1.25


# ==== A room: pushes, presence, RPCs over the page and over HTTP =============


@dataclass
class Say:
    text: str


@dataclass
class Fail: ...


@dataclass
class Said:
    text: str
    by: int


@dataclass
class Here:
    name: str


@dataclass
class Count: ...


@dataclass
class Double:
    n: int


class Room:
    def server_init(server_context: rally.ServerContext) -> tuple[Here, rally.Effect[Said]]:
        return Here(server_context.headers.get("x-name", "guest")), rally.effect.none()

    def server_update(
        model: Here, msg: Say | Fail, server_context: rally.ServerContext
    ) -> tuple[Here, rally.Effect[Said]]:
        if isinstance(msg, Fail):
            raise RuntimeError("the room failed on purpose")
        return Here(msg.text), rally.effect.broadcast_to_page(Said(msg.text, server_context.connection_id))

    def server_presence(model: Here) -> Here:
        return model

    def server_count(msg: Count, server_context: rally.ServerContext) -> int:
        return len(server_context.presence())


def room_app(events: list[str] | None = None) -> rally.App:
    log = events if events is not None else []

    @contextlib.asynccontextmanager
    async def lifespan(app: rally.App) -> AsyncIterator[None]:
        log.append("enter")
        yield
        log.append("exit")

    app = rally.App(lifespan=lifespan)
    app.page("/room", Room)

    @app.rpc
    def double(msg: Double) -> rally.Result[int, str]:
        return rally.Ok(2 * msg.n) if msg.n >= 0 else rally.Error("negative")

    return app


async def conversation(client: rally.Client) -> None:
    """One page conversation, the same over a socket and in memory."""
    async with client.page("/room") as ann:
        assert [p.meta for p in await ann.next_presence()] == [Here("guest")]
        bob = rally.PageConnection(client, "/room", headers=[("x-name", "bob")])
        async with bob:
            await bob.next_presence()
            assert sorted(p.meta.name for p in await ann.next_presence()) == ["bob", "guest"]
            await ann.send(Say("hello"))
            assert await ann.receive() == Said("hello", ann.connection_id)
            assert sorted(p.meta.name for p in await ann.next_presence()) == ["bob", "hello"]
            assert await asyncio.wait_for(bob.receive(), WAIT) == Said("hello", ann.connection_id)
            assert (await bob.rpc(Count())).unwrap() == 2
        assert [p.meta for p in await ann.next_presence()] == [Here("hello")]
        assert (await client.rpc(Double(21))).unwrap() == 42
        assert (await client.rpc(Double(-1))).unwrap_error() == "negative"
        # A lost connection, then a resume: the page goes on where it was.
        assert ann._writer is not None
        ann._writer.transport.abort()
        await asyncio.wait_for(ann.wait_closed(), WAIT)
        assert ann.close_code == 1006
        assert await ann.reconnect() is True
        await ann.send(Say("again"))
        assert await ann.receive() == Said("again", ann.connection_id)


@pytest.fixture
async def no_sockets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every way of opening a socket raise (and record the attempt)."""
    attempts: list[str] = []

    def refuse(name: str) -> Any:
        def refused(*args: Any, **kwargs: Any) -> Any:
            attempts.append(name)
            raise AssertionError(f"{name} called: a TestClient must not open a socket")

        return refused

    loop = asyncio.get_running_loop()
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse(f"socket.{name}"))
    for name in ("create_connection", "create_server", "create_unix_connection", "create_unix_server", "getaddrinfo"):
        monkeypatch.setattr(loop, name, refuse(f"loop.{name}"))
    return attempts


async def test_no_sockets_fixture_does_refuse_a_socket(no_sockets: list[str]) -> None:
    """The guard of the next test works: a real Client and a real server fail under it."""
    with pytest.raises(AssertionError, match="must not open a socket"):
        await asyncio.open_connection("127.0.0.1", 80)
    with pytest.raises(AssertionError, match="must not open a socket"):
        socket.socket()
    with pytest.raises(AssertionError, match="must not open a socket"):
        await room_app().start(port=0, access_log=False)
    assert no_sockets


async def test_testclient_page_conversation_opens_no_socket(no_sockets: list[str]) -> None:
    events: list[str] = []
    app = room_app(events)
    async with rally.TestClient(app, timeout=WAIT) as client:
        assert events == ["enter"]
        await conversation(client)
        # A second browser: a session of its own, the same server.
        async with client.client() as other, other.page("/room") as page:
            assert other.session_id is not None and other.session_id != client.session_id
            await page.next_presence()
            assert app.connections("/room") == 1
        status, headers, body = await client.request("GET", "/_rally/health")
        assert status == 200 and b'"status":"ok"' in body.replace(b" ", b"")
    assert events == ["enter", "exit"]
    assert no_sockets == []


# ==== Speed ===================================================================


async def test_testclient_runs_the_conversation_faster_than_a_socket() -> None:
    """The same conversation, N times over a real port (a server started and
    closed each time, as a test would) and N times with TestClient; the best
    of several batches each, so that a slow moment of the machine does not
    decide."""
    app = room_app()
    n, batches = 15, 5

    async def over_a_socket() -> None:
        server = await app.start("127.0.0.1", 0, access_log=False)
        try:
            async with rally.Client(server.url, app, timeout=WAIT) as client:
                await conversation(client)
        finally:
            await asyncio.wait_for(server.close(), WAIT)

    async def in_memory() -> None:
        async with rally.TestClient(app, timeout=WAIT) as client:
            await conversation(client)

    async def best(run: Any) -> float:
        # The collector's pauses depend on the whole test process's heap and
        # land on whichever batch they fall on: each batch runs without it.
        times = []
        for _ in range(batches):
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                for _ in range(n):
                    await run()
                times.append(time.perf_counter() - start)
            finally:
                gc.enable()
        return min(times)

    await in_memory()  # warm up both paths (imports, codecs)
    await over_a_socket()
    socket_s, memory_s = await best(over_a_socket), await best(in_memory)
    ratio = socket_s / memory_s
    print(f"conversation x{n}: socket {socket_s * 1e3:.1f} ms, in memory {memory_s * 1e3:.1f} ms, ratio {ratio:.2f}")
    assert ratio >= MIN_SPEEDUP, f"TestClient only {ratio:.2f}x faster than a socket"
