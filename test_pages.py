"""Tests of rally.py's page layer without sockets.

A ``PagePair`` wires a ``_PageSession`` to a ``FakePeer`` in memory (as h11's
``ConnectionPair`` does for HTTP): what the session writes is decoded into
frames a test reads, and a cut, a close or a slow consumer is what the
transport would do, on the same loop steps. The pure parts (``_Replay``,
``_PresenceTable``, ``_HeldPages``) are tested on their own, then a
property test drives many page sessions through random interleavings of
sends, pushes, broadcasts, acks, cuts, resumes, close_session, slow
consumers, failing ``server_init`` and shutdown, and checks the invariants
of docs/delivery.md "Delivery across reconnects" after every step.
"""

import asyncio
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import rally

# ==== A page in memory ======================================================


def unframe(frame: bytes) -> Any:
    """The JSON of one server WebSocket frame (unmasked, FIN, text)."""
    assert frame[0] == 0x81
    n, at = frame[1] & 0x7F, 2
    if n == 126:
        n, at = int.from_bytes(frame[2:4], "big"), 4
    elif n == 127:
        n, at = int.from_bytes(frame[2:10], "big"), 10
    assert len(frame) == at + n, "one whole frame"
    return json.loads(frame[at:])


class FakePeer:
    """A page session's connection in memory. ``write_frame`` keeps what
    the session writes; ``close`` ends the session as ``_WsConn.close``
    does; a ``slow`` peer is dropped at its next write and the session ends
    on the loop's next step, as after ``transport.abort()``."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.wire_bytes: list[int] = []
        self.session: rally._PageSession | None = None
        self.closed: tuple[int, str] | None = None
        self.dead = False  # cut, dropped or abandoned: nothing more arrives
        self.slow = False

    def write_frame(self, frame: bytes) -> None:
        if self.dead or self.closed is not None:
            return
        if self.slow:
            self.dead = True
            assert self.session is not None
            asyncio.get_running_loop().call_soon(self.session.end, 1006, "slow consumer")
            return
        self.frames.append(unframe(frame))
        self.wire_bytes.append(len(frame))

    def close(self, code: int, reason: str) -> None:
        if self.dead or self.closed is not None:
            return
        self.closed = (code, reason)
        assert self.session is not None
        self.session.end(code, reason)

    def cut(self) -> None:
        """The network is gone: the session is told as by ``connection_lost``."""
        if not self.dead and self.closed is None:
            self.dead = True
            assert self.session is not None
            self.session.end(1006, "connection lost", lost=True)

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    async def writable(self) -> None:
        pass

    def abandon(self) -> None:
        self.dead = True


@dataclass
class Note:
    n: int


@dataclass
class Noted:
    n: int


@dataclass
class Here:
    notes: int


class Board:
    """The page every test here runs: each send is applied to the model and
    pushed to the whole page; presence counts the notes."""

    @staticmethod
    def server_init(server_context: rally.ServerContext) -> tuple[dict[str, Any], rally.Effect[Noted]]:
        world: World = server_context.state
        if world.fail_init:
            raise RuntimeError("server_init fails on purpose")
        model = {"id": next(world.ids), "notes": []}
        world.models.append(model["id"])
        return model, rally.effect.subscribe("room")

    @staticmethod
    def server_update(
        model: dict[str, Any], msg: Note, server_context: rally.ServerContext
    ) -> tuple[dict[str, Any], rally.Effect[Noted]]:
        world: World = server_context.state
        world.applied.append((model["id"], msg.n))
        world.expect(Noted(msg.n))
        return {**model, "notes": [*model["notes"], msg.n]}, rally.effect.broadcast_to_page(Noted(msg.n))

    @staticmethod
    def server_presence(model: dict[str, Any]) -> Here:
        return Here(len(model["notes"]))

    @staticmethod
    def server_terminate(model: dict[str, Any], server_context: rally.ServerContext) -> rally.Effect[Noted]:
        server_context.state.terminated.append(model["id"])
        return rally.effect.none()


class World:
    """What the app did, for the checks: models made, sends applied, models
    terminated, and the pushes each session should have got."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.models: list[int] = []
        self.applied: list[tuple[int, int]] = []
        self.terminated: list[int] = []
        self.fail_init = False
        self.expected: dict[rally._PageSession, list[int]] = {}
        self.reg: rally._Registry | None = None

    def expect(self, push: Noted) -> None:
        """``push`` goes to the page: every session in the page's topic now gets it."""
        assert self.reg is not None
        for session in self.reg.topics.members.get("page:/board", ()):
            self.expected.setdefault(session, []).append(push.n)


class PagePair:
    """An app with the Board page and the page sessions of it, each on a
    ``FakePeer``, driven on one event loop without sockets."""

    def __init__(self, **options: Any) -> None:
        self.world = World()
        self.app = rally.App(state=self.world, **options)
        self.app.page("/board", Board)
        self.reg = self.app._registry
        self.world.reg = self.reg
        self.loop = asyncio.new_event_loop()
        self.ids = itertools.count(1)
        self.pushes = itertools.count(1_000_000)

    def close(self) -> None:
        self.loop.close()

    def run(self, step: Callable[[], Any]) -> Any:
        """Run ``step`` in the loop, then let what it scheduled for the next steps run."""

        async def go() -> Any:
            result = step()
            for _ in range(3):
                await asyncio.sleep(0)
            return result

        return self.loop.run_until_complete(go())

    def open(self, session_id: str = "s1", resumable: bool = True) -> tuple[rally._PageSession, FakePeer]:
        peer = FakePeer()
        page, params = self.reg.match_page("/board")  # type: ignore[misc]
        ctx = rally.ServerContext(session_id, "/board", params, [], None, next(self.ids), self.reg)
        session = rally._PageSession(self.reg, page, ctx, peer, self.loop.create_task, "tag-" + session_id, resumable)
        peer.session = session
        self.run(session.start)
        return session, peer

    def resume(self, token: str, session_id: str, last: int) -> tuple[rally._PageSession | None, FakePeer]:
        """What the router and a new connection do with ``&resume=token&last=last``."""
        peer = FakePeer()
        held = self.run(lambda: self.reg.held.take(token, session_id, "/board", last))
        if held is None or not self.run(lambda: held.attach(peer, last)):
            return None, peer
        peer.session = held
        return held, peer

    def send(self, session: rally._PageSession, seq: int, n: int) -> None:
        self.run(
            lambda: session.receive(
                json.dumps({"kind": "send", "seq": seq, "msg": {"type": "Note", "fields": {"n": n}}})
            )
        )

    def broadcast(self) -> int:
        """``app.broadcast_to_page`` of a new push; returns its number."""
        n = next(self.pushes)
        self.world.expect(Noted(n))
        self.run(lambda: self.reg.topics.broadcast("page:/board", self.reg.push_payload(Noted(n)), Noted))
        return n

    def leftovers(self) -> dict[str, Any]:
        """Everything the page layer still holds; empty once every page ended."""
        held = self.reg.held
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        return {
            k: v
            for k, v in {
                "presence": self.reg.presence.pages,
                "topics": self.reg.topics.members,
                "joining": self.reg.topics.joining,
                "tokens": held.tokens,
                "timers": held.timers,
                "held bytes": held.size,
                "tasks": tasks,
            }.items()
            if v
        }


def pushes(peer: FakePeer) -> list[int]:
    return [f["msg"]["fields"]["n"] for f in peer.frames if f.get("kind") == "push"]


@pytest.fixture
def pair() -> Any:
    p = PagePair()
    yield p
    p.close()


# ==== The pure parts ========================================================


def test_replay_counts_each_held_frame_in_the_bytes_it_takes_on_the_wire() -> None:
    replay = rally._Replay()
    for size in (10, 120, 200, 70_000):  # short, 16-bit and 64-bit frame lengths
        payload = b'{"kind":"push","msg":"' + b"x" * size + b'"}'
        frame = replay.push(payload, payload[1:])
        assert frame == rally._seq_frame(replay.out_seq, payload[1:])
        assert replay.frames[-1][3] == len(frame)
    presence = b'{"kind":"presence","state":[]}'
    assert unframe(replay.number(presence))["seq"] == 5 and len(replay.frames) == 4  # numbered, not held
    refusal = b'{"kind":"error","seq":3,"code":"invalid","errors":[]}'
    assert replay.refuse(refusal) == rally._ws_frame(refusal) and replay.frames[-1][:3] == (5, refusal, False)
    assert replay.size == sum(cost for *_, cost in replay.frames)


def test_replay_ack_trim_and_forget_move_the_floor() -> None:
    replay = rally._Replay()
    for _ in range(5):
        replay.push(b'{"kind":"push"}', b'"kind":"push"}')
    each = replay.frames[0][3]
    assert replay.ack(2) == 2 * each and [p for p, *_ in replay.frames] == [3, 4, 5]
    assert replay.can_resume(2) and not replay.can_resume(1) and not replay.can_resume(6)
    assert replay.trim(2 * each) == each  # the oldest goes: no resume from before it
    assert [p for p, *_ in replay.frames] == [4, 5] and replay.floor == 3 and not replay.can_resume(2)
    assert replay.forget() == 2 * each and replay.size == 0 and not replay.can_resume(5)


def test_presence_table_refuses_the_entry_and_the_meta_past_their_bounds() -> None:
    table = rally._PresenceTable(max_entries=2, max_meta_bytes=10)
    meta = "x" * 8  # "xxxxxxxx": 10 bytes encoded, the bound
    assert table.refusal("/p", 1, meta) is None
    assert "max_presence_meta_bytes=10" in (table.refusal("/p", 1, meta + "x") or "")
    table.put("/p", 1, "t", meta, meta)
    assert table.refusal("/p", 2, meta) is None  # N entries: fits
    table.put("/p", 2, "t", meta, meta)
    assert "max_presence_entries=2" in (table.refusal("/p", 3, meta) or "")  # N + 1
    assert table.refusal("/p", 2, "y") is None  # an update of a listed entry
    assert table.drop("/p", 1) and table.drop("/p", 2) and table.pages == {}


def test_presence_table_merges_another_process_and_forgets_it() -> None:
    table = rally._PresenceTable(max_entries=10, max_meta_bytes=100)
    codec = rally._Codecs(rally._Limits()).get(str)
    table.put("/p", 1, "mine", "a", "a")
    frame = table.merge("p2", "/p", [[7, "theirs", "b"], [1, "forged", "c"]], [1], codec)
    assert frame is not None and json.loads(frame) == {
        "kind": "presence",
        "joins": [{"id": 7, "tag": "theirs", "self": False, "meta": "b"}],
        "updates": [],
        "leaves": [],
    }  # an entry of this process is never touched by another
    assert table.merge("p2", "/p", [[7, "theirs", "b"]], [], codec) is None  # again: nothing changed
    assert [json.loads(f) for _, f in table.replace("p2", {}, lambda path: codec)] == [
        {"kind": "presence", "joins": [], "updates": [], "leaves": [7]}
    ]
    assert [p.id for p in table.of("/p")] == [1]


def test_presence_table_states_mark_each_joiner_itself() -> None:
    table = rally._PresenceTable(max_entries=10, max_meta_bytes=100)
    for cid in (1, 2, 3):
        table.put("/p", cid, f"t{cid}", cid, cid)
    states = [json.loads(s)["state"] for s in table.states("/p", [3, 1])]
    assert [[e["id"] for e in s if e["self"]] for s in states] == [[3], [1]]
    assert all([e["id"] for e in s] == [1, 2, 3] for s in states)


def test_the_default_presence_bounds_keep_a_full_list_below_the_outgoing_bound() -> None:
    table = rally._PresenceTable(rally.DEFAULT_MAX_PRESENCE_ENTRIES, rally.DEFAULT_MAX_PRESENCE_META_BYTES)
    meta = "é" * ((rally.DEFAULT_MAX_PRESENCE_META_BYTES - 2) // 6)  # \u00e9: 6 bytes each, the worst case
    assert table.refusal("/p", 1, meta) is None
    for cid in range(rally._MAX_SAFE_INT - rally.DEFAULT_MAX_PRESENCE_ENTRIES, rally._MAX_SAFE_INT):
        table.put("/p", cid, "f" * 16, meta, meta)
    [state] = table.states("/p", [rally._MAX_SAFE_INT - 1])
    assert len(rally._ws_frame(state)) < rally.DEFAULT_MAX_OUTGOING_BYTES


# ==== Sessions in memory =====================================================


def test_only_a_page_that_numbers_frames_has_a_resume_token_and_a_replay(pair: PagePair) -> None:
    """A page on the plain protocol makes no resume token and no replay
    (docs/performance.md "Where each byte goes") and, lost, ends at once;
    a page that numbers frames is found by its token."""
    plain, plain_peer = pair.open("p", resumable=False)
    numbered, _ = pair.open("n")
    assert plain.token == "" and plain.replay is None and "" not in pair.reg.held.tokens
    assert numbered.token and numbered.replay is not None and pair.reg.held.get(numbered.token) is numbered
    pair.run(plain_peer.cut)
    assert plain.state is rally._PageState.ENDED and pair.reg.held.timers == {}


def test_an_idle_page_keeps_no_empty_queue_frame_list_or_set_of_its_own(pair: PagePair) -> None:
    """What an idle page does not need is not made (docs/performance.md
    "Where each byte goes"): its queue of sends and its list of held frames
    come with the first item and go with the last, and the topic of a
    browser session with one tab is a 1-tuple until a second tab joins."""
    session, peer = pair.open("alone")
    assert session.pending == () and session.replay is not None and session.replay.frames == ()
    assert pair.reg.topics.members["session:alone"] == (session,)
    pair.broadcast()
    assert len(session.replay.frames) == 1
    pair.run(lambda: session.receive(json.dumps({"kind": "ack", "seq": peer.frames[-1]["seq"]})))
    assert session.replay.frames == () and pair.reg.held.size == 0
    other, _ = pair.open("alone")
    assert pair.reg.topics.members["session:alone"] == {session, other}
    pair.run(lambda: other.close(1000, ""))
    assert pair.reg.topics.members["session:alone"] == {session}


def test_a_page_that_only_sends_holds_no_acks_and_can_always_resume(pair: PagePair) -> None:
    session, peer = pair.open()
    for seq in range(1, 2001):
        pair.send(session, seq, seq)
    assert [f for f in peer.frames if f.get("kind") == "ack"][-1] == {"kind": "ack", "seq": 2000}
    assert session.replay is not None
    last = max(f.get("seq", 0) for f in peer.frames if f.get("kind") == "push")
    assert session.replay.ack(last) > 0 and session.replay.size == 0  # only pushes were held
    pair.run(peer.cut)
    resumed, again = pair.resume(session.token, "s1", last)
    assert resumed is session and again.frames[0]["resumed"] is True and again.frames[0]["ack"] == 2000
    assert {"kind": "ack", "seq": 2000} in again.frames  # settles every send


def test_a_held_page_keeps_no_presence_frames_and_gets_a_fresh_list_on_resume(pair: PagePair) -> None:
    session, peer = pair.open("away")
    pair.run(peer.cut)
    assert session.state is rally._PageState.DETACHED
    last = max(f.get("seq", 0) for f in peer.frames)
    for i in range(50):  # others come and go while it is away
        other, other_peer = pair.open(f"s{i}")
        pair.run(lambda p=other_peer: p.close(1000, ""))
    assert session.replay is not None and not session.replay.frames and pair.reg.held.size == 0
    resumed, again = pair.resume(session.token, "away", last)
    assert resumed is session
    states = [f for f in again.frames if f.get("kind") == "presence"]
    assert [[e["self"] for e in f["state"]] for f in states] == [[True]]  # one fresh list: itself


@pytest.mark.parametrize("extra", [0, 1], ids=["N", "N+1"])
def test_held_bytes_are_bounded_across_pages_at_n_and_n_plus_one(extra: int) -> None:
    probe = PagePair()
    s, p = probe.open("probe")
    probe.run(p.cut)
    probe.broadcast()
    cost = probe.reg.held.size  # one push, as held by one page
    probe.close()
    pair = PagePair(max_held_bytes=2 * cost - 1 + extra)  # two pages holding one push each: N = 2 * cost
    try:
        first, first_peer = pair.open("a")
        second, second_peer = pair.open("b")
        pair.run(first_peer.cut)
        pair.run(second_peer.cut)
        lasts = [max(f.get("seq", 0) for f in peer.frames) for peer in (first_peer, second_peer)]
        pair.broadcast()
        if extra:
            assert pair.reg.held.size == 2 * cost
            assert [first.state, second.state] == [rally._PageState.DETACHED] * 2
            assert pair.resume(first.token, "a", lasts[0])[0] is first
        else:  # one byte short: the page held longest gives its frames up and ends
            assert pair.reg.held.size == cost
            assert first.state is rally._PageState.ENDED and second.state is rally._PageState.DETACHED
            assert pair.resume(first.token, "a", lasts[0])[0] is None
            assert pair.world.terminated == [1]
        assert pair.resume(second.token, "b", lasts[1])[0] is second
    finally:
        pair.close()


def test_a_slow_consumer_ends_after_its_effect_and_leaves_no_presence_or_topic(pair: PagePair) -> None:
    session, peer = pair.open("slow")
    watcher, watcher_peer = pair.open("watcher")
    peer.slow = True
    pair.send(session, 1, 1)  # its own push drops it, in the middle of its effect
    assert session.state is rally._PageState.ENDED
    assert [p.id for p in pair.reg.presence.of("/board")] == [watcher.cid]
    assert all(session not in m for m in pair.reg.topics.members.values())
    assert watcher_peer.frames[-1] == {
        "seq": watcher_peer.frames[-1]["seq"],
        "kind": "presence",
        "joins": [],
        "updates": [],
        "leaves": [session.cid],
    }
    pair.run(lambda: watcher_peer.close(1000, ""))
    assert pair.leftovers() == {}


def test_a_subscription_past_max_topics_per_connection_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    pair = PagePair(max_topics_per_connection=1)
    try:
        session, _ = pair.open()
        assert session.custom == {"room"}  # server_init subscribed: N
        ops = pair.reg.effect_ops(rally.effect.subscribe("second"), session.page, [])
        with caplog.at_level(logging.ERROR, "rally"):
            pair.run(lambda: session._deliver(ops))  # N + 1
        assert session.custom == {"room"} and "second" not in pair.reg.topics.members
        assert "max_topics_per_connection" in caplog.text
    finally:
        pair.close()


# ==== Random interleavings ===================================================


class Browser:
    """What a page's client knows: the last frame it received, the sends it
    has not seen settled, and the pushes and presence of its current model."""

    def __init__(self, name: str, session: rally._PageSession, peer: FakePeer) -> None:
        self.name = name
        self.session = session
        self.peer = peer
        self.read = 0  # frames of peer read
        self.last = 0
        self.unsettled: dict[int, int] = {}  # send seq -> n
        self.seqs = itertools.count(1)
        self.pushes: list[int] = []
        self.presence: dict[int, Any] = {}
        self.gone = False  # closed for good (4001), or never opened (server_init failed)

    def take(self, upto: int | None = None) -> None:
        frames = self.peer.frames[self.read : upto]
        self.read += len(frames)
        for f in frames:
            kind, seq = f.get("kind"), f.get("seq")
            if kind == "hello":
                if not f["resumed"]:
                    self.last, self.pushes, self.presence = 0, [], {}
                    self.unsettled.clear()  # written to a model that is gone: rejected, never applied twice
                continue
            if kind in ("push", "presence"):
                assert seq > self.last, f"{self.name}: frame {seq} after {self.last}"
                self.last = seq
            if kind == "push":
                self.pushes.append(f["msg"]["fields"]["n"])
            elif kind == "presence":
                if "state" in f:
                    self.presence = {e["id"]: e for e in f["state"]}
                for e in f.get("joins", []) + f.get("updates", []):
                    self.presence[e["id"]] = e
                for cid in f.get("leaves", []):
                    self.presence.pop(cid, None)
            elif kind == "ack":
                for s in [s for s in self.unsettled if s <= seq]:
                    del self.unsettled[s]
            elif kind == "error" and seq is not None:
                self.unsettled.pop(seq, None)

    @property
    def connected(self) -> bool:
        return not self.gone and not self.peer.dead and self.peer.closed is None


class PageLifecycle(RuleBasedStateMachine):
    """Pages of a few browser sessions through random steps; a browser reads
    what arrived only when told to, so a cut loses what it had not read."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = PagePair(max_outgoing_bytes=600)
        self.browsers: list[Browser] = []
        self.names = itertools.count()
        self.notes = itertools.count(1)

    def browser(self, i: int) -> Browser:
        return self.browsers[i % len(self.browsers)]

    def start(self, b: Browser) -> None:
        session, peer = self.pair.open(b.name)
        b.session, b.peer, b.read = session, peer, 0
        b.take()
        b.gone = peer.closed is not None  # server_init failed: 1011, the page stops

    @rule()
    def open_page(self) -> None:
        name = f"s{next(self.names) % 4}"  # a few browser sessions, several pages each
        session, peer = self.pair.open(name)
        b = Browser(name, session, peer)
        b.take()
        b.gone = peer.closed is not None
        self.browsers.append(b)

    @rule()
    def toggle_failing_init(self) -> None:
        self.pair.world.fail_init = not self.pair.world.fail_init

    @precondition(lambda self: self.browsers)
    @rule(i=st.integers(0, 50))
    def send(self, i: int) -> None:
        b = self.browser(i)
        if b.gone:
            return
        seq, n = next(b.seqs), next(self.notes)
        b.unsettled[seq] = n
        if b.connected:  # else it waits for the page to come back
            self.pair.run(lambda: b.session.receive(send_text(seq, n)))

    @rule()
    def broadcast(self) -> None:
        self.pair.broadcast()

    @precondition(lambda self: self.browsers)
    @rule(i=st.integers(0, 50))
    def read(self, i: int) -> None:
        b = self.browser(i)
        if b.connected:
            b.take()

    @precondition(lambda self: self.browsers)
    @rule(i=st.integers(0, 50))
    def ack(self, i: int) -> None:
        b = self.browser(i)
        if b.connected and b.last:
            self.pair.run(lambda: b.session.receive(f'{{"kind":"ack","seq":{b.last}}}'))

    @precondition(lambda self: self.browsers)
    @rule(i=st.integers(0, 50), lost=st.integers(0, 3))
    def cut(self, i: int, lost: int) -> None:
        """The network drops: up to ``lost`` of the frames not read yet never arrive."""
        b = self.browser(i)
        if b.connected:
            b.take(max(b.read, len(b.peer.frames) - lost))
            self.pair.run(b.peer.cut)

    @precondition(lambda self: self.browsers)
    @rule(i=st.integers(0, 50))
    def come_back(self, i: int) -> None:
        """The page reconnects with its token and last frame: resumed, or afresh."""
        b = self.browser(i)
        if b.gone or b.connected:
            return
        if b.peer.slow or b.peer.closed is not None:
            b.take()  # a dropped or closed connection delivered what it had written
        resumed, peer = self.pair.resume(b.session.token, b.name, b.last)
        if resumed is None:
            self.start(b)
        else:
            b.peer, b.read = peer, 0
            b.take()
        if b.gone:
            return
        for seq, n in sorted(b.unsettled.items()):
            if resumed is None or seq > peer.frames[0]["ack"]:
                self.pair.run(lambda s=seq, n=n: b.session.receive(send_text(s, n)))

    @precondition(lambda self: self.browsers)
    @rule(i=st.integers(0, 50))
    def close_session(self, i: int) -> None:
        name = self.browser(i).name
        self.pair.run(lambda: self.pair.reg.topics.close(f"session:{name}"))
        for b in self.browsers:
            if b.name == name and b.session.state is rally._PageState.ENDED:
                b.gone = True  # 4001: closed for good

    @precondition(lambda self: self.browsers)
    @rule(i=st.integers(0, 50))
    def slow_consumer(self, i: int) -> None:
        self.browser(i).peer.slow = True

    @rule()
    def window_passes(self) -> None:
        self.pair.run(lambda: self.pair.reg.held.end_all(1006, "resume window passed"))

    def caught_up(self, b: Browser) -> bool:
        return b.connected and b.read == len(b.peer.frames) and b.session.state is rally._PageState.LIVE

    @invariant()
    def pushes_once_in_order(self) -> None:
        for b in self.browsers:
            if b.gone or b.session.state is rally._PageState.ENDED:
                continue
            expected = self.pair.world.expected.get(b.session, [])
            assert b.pushes == expected[: len(b.pushes)], f"{b.name}: got {b.pushes}, was sent {expected}"
            if self.caught_up(b):
                assert b.pushes == expected, f"{b.name}: got {b.pushes}, was sent {expected}"

    @invariant()
    def sends_applied_at_most_once_and_settled(self) -> None:
        applied = self.pair.world.applied
        assert len(applied) == len(set(applied)), "a send was applied twice"
        for b in self.browsers:
            if self.caught_up(b):
                assert not b.unsettled, f"{b.name}: sends {sorted(b.unsettled)} were never settled"

    @invariant()
    def terminate_at_most_once(self) -> None:
        terminated = self.pair.world.terminated
        assert len(terminated) == len(set(terminated)), "server_terminate ran twice for a model"

    @invariant()
    def presence_as_the_server_lists_it(self) -> None:
        listed = self.pair.reg.presence.pages.get("/board", {})
        for b in self.browsers:
            if self.caught_up(b) and b.session.listed:
                assert set(b.presence) == set(listed), f"{b.name} sees {sorted(b.presence)}, listed {sorted(listed)}"
        for session in self.pair.world.expected:
            if session.state is rally._PageState.ENDED:
                assert session.cid not in listed, "an ended page is still listed"

    def teardown(self) -> None:
        pair = self.pair
        try:

            def shut_down() -> None:
                pair.reg.held.end_all(1001, "server shutting down")
                for b in self.browsers:
                    b.peer.close(1001, "server shutting down")

            pair.run(shut_down)
            world = pair.world
            assert sorted(world.terminated) == sorted(world.models), "each model terminated exactly once"
            assert pair.leftovers() == {}
        finally:
            pair.close()


def send_text(seq: int, n: int) -> str:
    return json.dumps({"kind": "send", "seq": seq, "msg": {"type": "Note", "fields": {"n": n}}})


TestPageLifecycle = PageLifecycle.TestCase
TestPageLifecycle.settings = settings(max_examples=1000, stateful_step_count=25, deadline=None)


def test_held_pages_take_only_a_page_that_can_go_on_and_end_a_stale_one_of_the_same_session(pair: PagePair) -> None:
    session, peer = pair.open("s1")
    pair.run(peer.cut)
    held = pair.reg.held
    assert list(held.timers) == [session] and held.get(session.token) is session
    assert pair.run(lambda: held.take(session.token, "another session", "/board", 0)) is None
    assert session.state is rally._PageState.DETACHED  # another session's page does not end it
    assert pair.run(lambda: held.take(session.token, "s1", "/elsewhere", 0)) is None
    assert session.state is rally._PageState.ENDED  # its own session came back elsewhere: it cannot go on
    assert held.tokens == {} and held.timers == {} and pair.world.terminated == [1]


@pytest.mark.parametrize("extra", [0, 1], ids=["N", "N+1"])
def test_held_pages_are_at_most_max_connections_at_n_and_n_plus_one(extra: int) -> None:
    pair = PagePair(max_connections=2)
    try:
        pages = [pair.open(f"s{i}") for i in range(2 + extra)]
        for _, peer in pages:
            pair.run(peer.cut)
        assert len(pair.reg.held.timers) == 2
        assert [s.state for s, _ in pages].count(rally._PageState.ENDED) == extra  # one more ends at once
        pair.run(lambda: pair.reg.held.end_all(1001, "server shutting down"))
        assert pair.leftovers() == {} and sorted(pair.world.terminated) == sorted(pair.world.models)
    finally:
        pair.close()
