"""TestClient against a real port: the same page conversation, timed.

    python bench/testclient.py

The conversation of test_testclient.py (two pages, presence, pushes, RPCs
over the page and over HTTP), N times over a real port (a server started and
closed each time, as a test would) and N times with ``rally.TestClient``; the
best of several alternating batches each, with the garbage collector off
during a batch. Prints both times and their ratio; then the same for the
smallest test there is, one RPC over HTTP, where starting the server and
connecting weigh most.
"""

import asyncio
import gc
import os
import sys
import time
from collections.abc import Awaitable, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rally  # noqa: E402
from test_testclient import WAIT, Double, conversation, room_app  # noqa: E402


async def one_rpc(client: rally.Client) -> None:
    assert (await client.rpc(Double(21))).unwrap() == 42


async def main(n: int = 10, batches: int = 8) -> None:
    await compare("conversation", conversation, n, batches)
    await compare("one RPC", one_rpc, 10 * n, batches)


async def compare(name: str, test: Callable[[rally.Client], Awaitable[None]], n: int, batches: int) -> None:
    app = room_app()

    async def over_a_socket() -> None:
        server = await app.start("127.0.0.1", 0, access_log=False)
        try:
            async with rally.Client(server.url, app, timeout=WAIT) as client:
                await test(client)
        finally:
            await asyncio.wait_for(server.close(), WAIT)

    async def in_memory() -> None:
        async with rally.TestClient(app, timeout=WAIT) as client:
            await test(client)

    async def batch(run: Callable[[], Awaitable[None]]) -> float:
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            for _ in range(n):
                await run()
            return time.perf_counter() - start
        finally:
            gc.enable()

    await in_memory()  # warm up both paths (imports, codecs)
    await over_a_socket()
    socket_s = memory_s = float("inf")
    for _ in range(batches):  # alternating: a busy moment of the machine slows both
        socket_s = min(socket_s, await batch(over_a_socket))
        memory_s = min(memory_s, await batch(in_memory))
    print(f"{name} x{n}: socket {socket_s * 1e3:.1f} ms, in memory {memory_s * 1e3:.1f} ms")
    print(f"{name}: TestClient / socket speed: {socket_s / memory_s:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
