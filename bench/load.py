"""The load generator of bench/run.py: raw asyncio protocols, pre-built bytes.

``python bench/load.py MODE PORT CONNECTIONS SECONDS SERVER_PID`` prints one
JSON line, with the CPU share of the load generator and of the server.
MODE: http (one request in flight per connection), ws (a window of 32
round trips in flight per connection), broadcast (SECONDS is the number of
rounds), idle (opens the connections, says "open", waits for stdin to close).
With ``--resume`` after SERVER_PID, every connection opens with ``&last=0``
(docs/delivery.md "Delivery across reconnects") and, like the browser client, reads the hello first and
acknowledges numbered pushes every 32 frames or 5 s after the first it has
not acknowledged.
"""

import asyncio
import json
import os
import resource
import sys
import time

BODY = json.dumps({"kind": "rpc", "id": 1, "msg": {"type": "Echo", "fields": {"text": "hello"}}}).encode()
HTTP = (
    b"POST /_rally/rpc HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
UPGRADE = (
    b"GET /_rally/ws?page=/%s HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
)
WINDOW = 32
ACK_EVERY, ACK_AFTER_S = 32, 5.0  # the browser client's

# asyncio reads with sock.recv(256 KiB). Until glibc has freed one mmapped block
# that large, each such buffer is mmapped, shrunk and unmapped: a read costs
# ~30 µs instead of ~5, and the load generator's cost would depend on its
# allocation history. Freeing 1 MiB once raises glibc's mmap threshold for good.
bytes(1 << 20)  # made and freed at once


def masked(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (
        bytes((0x81, 0x80 | n))
        + mask
        + (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    )


RPC_FRAME = masked(BODY)
SHOUT_FRAME = masked(b'{"kind":"send","msg":{"type":"Shout","fields":{"text":"x"}}}')
PUSH_SIZE = 2 + len(b'{"kind":"push","msg":{"type":"Shouted","fields":{"text":"x"}}}')


class Counter:
    done = 0
    pushes = 0
    acks = 0
    waiter: "asyncio.Future[None] | None" = None
    target = 0


class HttpClient(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.t.write(HTTP)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            at = self.buf.lower().find(b"content-length:", 0, end)
            length = int(self.buf[at + 15 : self.buf.find(b"\r\n", at)])
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            Counter.done += 1
            self.t.write(HTTP)


class WsClient(asyncio.Protocol):
    def __init__(self, rpc: bool, resume: bool) -> None:
        self.rpc = rpc
        self.resume = resume
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.seq = self.acked = 0  # resume: the last seq received, and acknowledged
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.open = False
        self.t.write(UPGRADE % (b"&last=0" if self.resume else b""))

    def data_received(self, data: bytes) -> None:
        if not self.open:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if self.resume:  # the hello comes first (always under 126 bytes)
                hello = end + 4
                if len(self.buf) < hello + 2 or len(self.buf) < hello + 2 + (self.buf[hello + 1] & 0x7F):
                    return
                if not self.buf.startswith(b'{"kind":"hello"', hello + 2):
                    self.opened.set_exception(RuntimeError(f"no hello: {self.buf[hello : hello + 80]!r}"))
                    return
                end += 2 + (self.buf[hello + 1] & 0x7F)
            self.open = True
            data, self.buf = self.buf[end + 4 :], b""
            self.opened.set_result(None)
            if self.rpc:
                self.t.write(RPC_FRAME * WINDOW)
        if self.rpc:
            buf = self.buf + data if self.buf else data
            at, replies, n = 0, 0, len(buf)
            while n - at >= 2 and n - at >= 2 + (buf[at + 1] & 0x7F):
                at += 2 + (buf[at + 1] & 0x7F)
                replies += 1
            self.buf = buf[at:]
            if replies:
                Counter.done += replies
                self.t.write(RPC_FRAME * replies)
        elif self.resume:  # broadcast, numbered: {"seq":n,"kind":"push",...}, n of varying length
            buf = self.buf + data if self.buf else data
            at, last, n = 0, -1, len(buf)
            while n - at >= 2 and n - at >= 2 + (buf[at + 1] & 0x7F):
                if buf[at] == 0x81:  # text, not the server's ping
                    last = at
                    Counter.pushes += 1
                at += 2 + (buf[at + 1] & 0x7F)
            self.buf = buf[at:]
            if last >= 0:
                self.seq = int(buf[last + 9 : buf.index(b",", last)])  # after 2 bytes of header and {"seq":
                if self.seq - self.acked >= ACK_EVERY:
                    self.ack()
                elif self.timer is None:
                    self.timer = asyncio.get_running_loop().call_later(ACK_AFTER_S, self.ack)
            if Counter.waiter is not None and Counter.pushes >= Counter.target and not Counter.waiter.done():
                Counter.waiter.set_result(None)
        else:  # broadcast: every push has the same size
            self.buf += data
            n = len(self.buf) // PUSH_SIZE
            self.buf = self.buf[n * PUSH_SIZE :]
            Counter.pushes += n
            if Counter.waiter is not None and Counter.pushes >= Counter.target and not Counter.waiter.done():
                Counter.waiter.set_result(None)

    def ack(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.seq > self.acked:
            self.acked = self.seq
            self.t.write(masked(b'{"kind":"ack","seq":%d}' % self.seq))
            Counter.acks += 1


async def open_many(port: int, n: int, rpc: bool, resume: bool) -> list[WsClient]:
    loop = asyncio.get_running_loop()
    clients: list[WsClient] = []
    for start in range(0, n, 250):
        batch = [
            loop.create_connection(lambda: WsClient(rpc, resume), "127.0.0.1", port) for _ in range(min(250, n - start))
        ]
        for _, proto in await asyncio.gather(*batch):
            clients.append(proto)  # type: ignore[arg-type]
        await asyncio.gather(*(c.opened for c in clients[start:]))
    return clients


SERVER_PID = 0
TICKS = os.sysconf("SC_CLK_TCK")


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def server_cpu() -> float:
    fields = open(f"/proc/{SERVER_PID}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def rate(seconds: float) -> dict[str, float]:
    await asyncio.sleep(1.0)  # warm-up
    d0, c0, s0, t0 = Counter.done, cpu(), server_cpu(), time.perf_counter()
    await asyncio.sleep(seconds)
    d1, c1, s1, t1 = Counter.done, cpu(), server_cpu(), time.perf_counter()
    wall = t1 - t0
    return {"rate": (d1 - d0) / wall, "loadgen_cpu": (c1 - c0) / wall, "server_cpu": (s1 - s0) / wall}


async def main(mode: str, port: int, n: int, seconds: float, resume: bool) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    if mode == "http":
        for _ in range(n):
            await loop.create_connection(HttpClient, "127.0.0.1", port)
        return await rate(seconds)
    if mode == "ws":
        await open_many(port, n, rpc=True, resume=resume)
        return await rate(seconds)
    clients = await open_many(port, n, rpc=False, resume=resume)
    if mode == "idle":
        print("open", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        return {"open": len(clients)}
    latencies = []
    c0, s0, w0 = cpu(), server_cpu(), time.perf_counter()
    for _ in range(int(seconds)):
        Counter.target = Counter.pushes + n
        Counter.waiter = loop.create_future()
        t0 = time.perf_counter()
        clients[0].t.write(SHOUT_FRAME)
        await asyncio.wait_for(Counter.waiter, 30)
        latencies.append(time.perf_counter() - t0)
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - w0
    latencies.sort()
    return {
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p90_ms": latencies[int(len(latencies) * 0.9)] * 1000,
        "deliveries_per_s": n / latencies[len(latencies) // 2],
        "loadgen_cpu": (cpu() - c0) / wall,
        "server_cpu": (server_cpu() - s0) / wall,
        "acks": Counter.acks,
    }


if __name__ == "__main__":
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    mode, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    SERVER_PID = int(sys.argv[5])
    resume = sys.argv[6:] == ["--resume"]
    print(json.dumps(asyncio.run(main(mode, port, n, seconds, resume))), flush=True)
