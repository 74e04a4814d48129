"""Soak: 2 000 WebSockets and continuous broadcasts; server memory must stay flat.

    python bench/soak.py [--seconds 60] [--connections 2000]

The server (rally.py, in its own process) broadcasts a push of about 550
bytes to every connection every 50 ms (40 000 deliveries a second); the
clients (raw asyncio protocols in this process) read everything. Every 5 s
the server's RSS is printed. The verdict is "flat" when no connection was
lost and the RSS of the second half of the run grows by less than 5% over
its start; the exit code is 1 otherwise.
"""

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = r"""
import asyncio, sys
from dataclasses import dataclass
sys.path.insert(0, sys.argv[2])
import rally

@dataclass
class Beat:
    n: int
    text: str

class Room:
    html = "<p>soak</p>"
    def server_init() -> tuple[None, rally.Effect[Beat]]:
        return None, rally.effect.none()

async def main() -> None:
    app = rally.App(max_connections=20_000)
    app.page("/", Room)
    await app.start("127.0.0.1", int(sys.argv[1]), access_log=False)
    n = 0
    while True:
        n += 1
        await app.broadcast_to_app(Beat(n, "x" * 512))
        await asyncio.sleep(0.05)

asyncio.run(main())
"""
UPGRADE = (
    b"GET /_rally/ws?page=/ HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
)
received = 0
lost = 0


class Reader(asyncio.Protocol):
    """Reads every frame and answers the server's pings, as a browser does."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.open = False
        self.transport.write(UPGRADE)

    def connection_lost(self, exc: Exception | None) -> None:
        global lost
        lost += 1

    def data_received(self, data: bytes) -> None:
        global received
        received += len(data)
        buf = self.buf + data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            self.open, buf = True, buf[end + 4 :]
        at = 0
        while len(buf) - at >= 2:
            length, head = buf[at + 1] & 0x7F, 2
            if length == 126:
                length, head = int.from_bytes(buf[at + 2 : at + 4], "big"), 4
            elif length == 127:
                length, head = int.from_bytes(buf[at + 2 : at + 10], "big"), 10
            if len(buf) - at < head + length:
                break
            if buf[at] & 0x0F == 0x9:  # ping: answer with a masked pong, zero key
                payload = buf[at + head : at + head + length]
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            at += head + length
        self.buf = buf[at:]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def main(seconds: float, connections: int) -> bool:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(HERE)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), root])
    try:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 20
        while True:
            try:
                await loop.create_connection(Reader, "127.0.0.1", port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        for start in range(1, connections, 200):
            count = min(200, connections - start)
            await asyncio.gather(*(loop.create_connection(Reader, "127.0.0.1", port) for _ in range(count)))
        print(f"{connections} connections open; sampling the server's RSS every 5 s for {seconds:.0f} s")
        samples = []
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            await asyncio.sleep(5)
            samples.append(rss_kib(server.pid))
            elapsed = time.monotonic() - started
            print(
                f"  {elapsed:5.1f} s  RSS {samples[-1] / 1024:6.1f} MiB"
                f"  received {received / 2**20:8.1f} MiB  connections lost {lost}"
            )
        half = samples[len(samples) // 2 :]
        growth = (half[-1] - half[0]) / half[0]
        flat = growth < 0.05 and lost == 0
        print(f"second-half growth {growth * 100:+.1f}%, {lost} connections lost: {'flat' if flat else 'NOT FLAT'}")
        return flat
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--connections", type=int, default=2000)
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.exit(0 if asyncio.run(main(args.seconds, args.connections)) else 1)
