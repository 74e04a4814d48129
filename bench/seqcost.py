"""CPU of rally.py's fan-out path alone, with and without numbered frames.

    python bench/seqcost.py [N]

Publishes one push to N page sessions (5 000 by default) whose peer drops
what it is given, in this process: the cost of the path from
``_Topics.publish`` to the transport, without sockets or system calls, for
pages on the plain protocol and for pages that number frames (``&last=``).
The end-to-end figures (bench/run.py's "Resume protocol on/off") add the
kernel's work per recipient, the same in both, which this leaves out.
"""

import asyncio
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rally  # noqa: E402


@dataclass
class Shout:
    text: str


class Room:
    def server_init() -> tuple[None, rally.Effect[Shout]]:
        return None, rally.effect.none()


async def per_round(n: int, numbered: bool, rounds: int = 200) -> float:
    app = rally.App(max_connections=n + 10, max_held_bytes=2**30)  # 200 rounds unacknowledged: past the default
    app.page("/room", Room)
    reg = app._registry
    page = reg.pages[0]
    for i in range(n):
        ctx = rally.ServerContext(f"s{i}", "/room", {}, [], None, i + 1, reg)
        session = rally._PageSession(reg, page, ctx, rally._Detached(), asyncio.ensure_future, "", numbered)
        session.start()
        if numbered:
            reg.held.tokens.pop(session.token, None)
    payload = reg.push_payload(Shout("hello everyone, this is a broadcast"))
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(rounds):
            reg.topics.publish("page:/room", payload, Shout)
        best = min(best, (time.perf_counter() - t0) / rounds)
        for session in reg.topics.sessions("page:/room"):
            if session.replay is not None:  # as the pages' acks would
                reg.held.size -= session.replay.ack(session.replay.out_seq)
    return best


async def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    plain = await per_round(n, False)
    numbered = await per_round(n, True)
    print(f"fan-out path to {n} pages, best of 5 x 200 broadcasts:")
    print(f"  plain    {plain * 1e3:7.2f} ms per broadcast, {plain / n * 1e9:5.0f} ns per recipient")
    print(f"  numbered {numbered * 1e3:7.2f} ms per broadcast, {numbered / n * 1e9:5.0f} ns per recipient")
    print(f"  numbered / plain {numbered / plain:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
