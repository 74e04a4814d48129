"""Tests of ``rally.TestClient``: the Client API against an app served in
memory, with no socket. Same rules as test_rally.py: a time bound on every
wait, no sleeps standing in for synchronisation."""

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

import rally

WAIT = 5.0  # seconds: the bound on any single wait in these tests


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


# ==== Lifespan, errors, shutdown ==============================================


async def test_testclient_lifespan_is_entered_and_exited_and_pages_get_1001() -> None:
    events: list[str] = []
    app = room_app(events)
    client = rally.TestClient(app, timeout=WAIT)
    with pytest.raises(rally.UsageError, match="async with rally.TestClient"):
        await client.rpc(Double(1))
    async with client:
        assert events == ["enter"]
        page = await client.page("/room").__aenter__()
        await page.next_presence()
        server = client.server
        assert server is not None and app.connections("/room") == 1
    assert events == ["enter", "exit"]
    with pytest.raises(rally.ConnectionClosed) as closed:
        await page.receive()
    assert closed.value.code == 1001
    assert app.connections() == 0
    with pytest.raises(ConnectionRefusedError):
        await client.rpc(Double(1))


async def test_testclient_errors_surface_as_with_client() -> None:
    app = room_app()
    async with rally.TestClient(app, timeout=WAIT) as client:
        with pytest.raises(rally.RemoteError) as refused:
            await client.page("/nowhere").connect()
        assert refused.value.status == 404
        async with client.page("/room") as page:
            with pytest.raises(rally.RemoteError) as failed:
                await page.send(Fail())
            assert failed.value.code == "internal"
            await page.send(Say("still here"))  # the page goes on, as over a socket
            assert await page.receive() == Said("still here", page.connection_id)
        async with client.page("/room") as page:
            await page.next_presence()
            assert client.session_id is not None
            assert await app.close_session(client.session_id) == 1
            with pytest.raises(rally.ConnectionClosed) as closed:
                await page.receive()
            assert closed.value.code == rally.CLOSE_SESSION_CLOSED
            with pytest.raises(rally.ConnectionClosed):
                await page.send(Say("too late"))


# ==== The in-memory transport ===================================================


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.calls: list[str] = []
        self.lost: list[Exception | None] = []

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.calls.append("eof")
        return True

    def pause_writing(self) -> None:
        self.calls.append("pause_writing")

    def resume_writing(self) -> None:
        self.calls.append("resume_writing")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


async def settle(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("not reached")


async def test_memory_transport_flow_control_eof_and_reset() -> None:
    loop = asyncio.get_running_loop()
    a, b = rally._MemoryTransport.pair(loop, ("127.0.0.1", 5000), ("127.0.0.1", 80))
    pa, pb = Recorder(), Recorder()
    a.set_protocol(pa)
    b.set_protocol(pb)
    assert b.get_extra_info("peername") == ("127.0.0.1", 5000) and b.get_protocol() is pb
    a.set_write_buffer_limits(high=1000)
    b.pause_reading()
    a.write(b"x" * 600)
    a.writelines([b"y" * 300, b"z" * 200])
    assert a.get_write_buffer_size() == 1100 and pa.calls == ["pause_writing"]
    await asyncio.sleep(0)
    assert pb.data == b""  # a paused reader gets nothing: the bytes wait in the writer's buffer
    b.resume_reading()
    await settle(lambda: len(pb.data) == 1100)
    assert pb.data == b"x" * 600 + b"y" * 300 + b"z" * 200
    assert a.get_write_buffer_size() == 0 and pa.calls == ["pause_writing", "resume_writing"]
    # close: the rest, then the end of file, then connection_lost on the closing end
    a.write(b"last")
    a.close()
    assert a.is_closing()
    await settle(lambda: pa.lost and "eof" in pb.calls)
    assert pb.data.endswith(b"last") and pa.lost == [None] and pb.lost == []
    b.write(b"dropped")  # the other end is gone: nothing arrives, nothing piles up
    await asyncio.sleep(0)
    assert b.get_write_buffer_size() == 0
    b.close()
    await settle(lambda: pb.lost)
    # abort: the buffer is dropped and the peer sees a reset
    c, d = rally._MemoryTransport.pair(loop, ("127.0.0.1", 5001), ("127.0.0.1", 80))
    pc, pd = Recorder(), Recorder()
    c.set_protocol(pc)
    d.set_protocol(pd)
    d.pause_reading()
    c.write(b"never read")
    c.abort()
    await settle(lambda: pc.lost and pd.lost)
    assert pc.lost == [None] and isinstance(pd.lost[0], ConnectionResetError) and pd.data == b""
