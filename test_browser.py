"""Browser tests of the demo in real headless Chromium (Debian's chromium,
driven by Python Playwright). Loopback only; every wait is Playwright's
auto-waiting ``expect`` with a bound. Without chromium or Playwright the
module is skipped with the reason; CI installs both.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import demo
import rally

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("browser tests need Debian's chromium (apt-get install -y chromium)", allow_module_level=True)
try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError:
    pytest.skip("browser tests need Playwright (pip install playwright)", allow_module_level=True)

ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BOUND_MS = 10_000
expect.set_options(timeout=BOUND_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


class Tabs:
    """Browser contexts (sessions) and their pages; collects JavaScript errors."""

    def __init__(self, browser: Browser, base: str) -> None:
        self.browser = browser
        self.base = base
        self.contexts: list[BrowserContext] = []
        self.pages: list[Page] = []
        self.errors: list[str] = []
        self.allowed_console: tuple[str, ...] = ()

    def session(self) -> BrowserContext:
        context = self.browser.new_context()
        self.contexts.append(context)
        return context

    def open(self, context: BrowserContext, path: str) -> Page:
        page = context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(f"{path}: {exc}"))
        page.on("console", lambda msg: self._console(path, msg))
        page.goto(self.base + path)
        expect(page.locator("#status")).to_have_text("open")
        self.pages.append(page)
        return page

    def _console(self, path: str, msg: Any) -> None:
        if msg.type == "error" and not any(a in msg.text for a in self.allowed_console):
            self.errors.append(f"{path}: console: {msg.text}")


@contextlib.contextmanager
def tabs(browser: Browser, base: str, tmp_path: Path) -> Iterator[Tabs]:
    """Tabs for one test: screenshots of every page if it fails, and no JavaScript errors."""
    t = Tabs(browser, base)
    try:
        yield t
    except BaseException:
        for i, page in enumerate(t.pages):
            with contextlib.suppress(Exception):
                page.screenshot(path=str(tmp_path / f"failure-{i}.png"), full_page=True)
        print(f"screenshots of the failure in {tmp_path}")
        raise
    finally:
        for context in t.contexts:
            context.close()
    assert t.errors == []


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[rally.App, str]]:
    app = demo.make_app(str(tmp_path / "demo.sqlite3"), clock=False)  # the tests push Tick themselves
    with app.run_in_thread(access_log=False) as server:
        yield app, server.url


def comment(page: Page, author: str, body: str) -> None:
    page.fill("input[name=author]", author)
    page.fill("textarea[name=body]", body)
    page.click("#comment-form button")


def test_comment_reaches_every_viewer_of_that_article_and_no_other(
    browser: Browser, served: tuple[rally.App, str], tmp_path: Path
) -> None:
    _, url = served
    with tabs(browser, url, tmp_path) as t:
        alice, bob = t.session(), t.session()
        a1 = t.open(alice, "/articles/1")
        b1 = t.open(bob, "/articles/1")
        b1_again = t.open(bob, "/articles/1")
        b2 = t.open(bob, "/articles/2")
        expect(a1.locator("#title")).to_have_text("Typed RPC without a schema")
        comment(a1, "Alice", "Hello from Alice")
        for page in (a1, b1, b1_again):
            expect(page.locator("#comments li")).to_have_text(["AliceHello from Alice"])
        # Later pushes to b2 arrive after anything wrongly sent to it before.
        comment(b2, "Bob", "Only on two")
        expect(b2.locator("#comments li")).to_have_text(["BobOnly on two"])
        expect(a1.locator("#comments li")).to_have_count(1)


def test_session_notice_reaches_only_that_sessions_tabs(
    browser: Browser, served: tuple[rally.App, str], tmp_path: Path
) -> None:
    _, url = served
    with tabs(browser, url, tmp_path) as t:
        alice, bob = t.session(), t.session()
        a1 = t.open(alice, "/articles/1")
        a2 = t.open(alice, "/articles/3")
        b1 = t.open(bob, "/articles/1")
        a1.click("#fav")
        for page in (a1, a2):
            expect(page.locator("#notices")).to_contain_text("You favourited “Typed RPC without a schema”.")
        expect(a1.locator("#fav")).to_have_text("★ Favourite")
        # The page-wide count is sent after the session notice: once bob sees
        # it, a notice wrongly sent to him would already be there.
        expect(b1.locator("#favorites")).to_have_text("1")
        assert b1.locator("#notices").inner_text() == ""  # now, not eventually: notices fade
        expect(b1.locator("#fav")).to_have_text("☆ Favourite")


def test_app_wide_announcement_and_outside_push_reach_everyone(
    browser: Browser, served: tuple[rally.App, str], tmp_path: Path
) -> None:
    app, url = served
    with tabs(browser, url, tmp_path) as t:
        alice, bob = t.session(), t.session()
        pages = [t.open(alice, "/articles/1"), t.open(bob, "/articles/2"), t.open(bob, "/")]
        pages[0].fill("#announce input", "Tea in five minutes")
        pages[0].click("#announce button")
        for page in pages:
            expect(page.locator("#announcements li")).to_have_text(["Tea in five minutes"])
        assert app.broadcast_to_app_threadsafe(demo.Tick("12:34:56")).result(5) == 3
        for page in pages:
            expect(page.locator("#clock")).to_have_text("12:34:56")
        # A push type a page does not declare (FavoriteCount on the home page)
        # is not sent to it: the count is the two article pages.
        assert app.broadcast_to_app_threadsafe(demo.FavoriteCount(7)).result(5) == 2
        expect(pages[0].locator("#favorites")).to_have_text("7")


def test_comment_form_shows_the_servers_validation_errors(
    browser: Browser, served: tuple[rally.App, str], tmp_path: Path
) -> None:
    _, url = served
    with tabs(browser, url, tmp_path) as t:
        page = t.open(t.session(), "/articles/2")
        comment(page, "", "x")
        expect(page.locator("#author-error")).to_have_text("Please give a name.")
        expect(page.locator("#body-error")).to_have_text("Say a little more (3 characters at least).")
        comment(page, "Carol", "Now it is long enough")
        expect(page.locator("#comments li")).to_have_text(["CarolNow it is long enough"])
        expect(page.locator("#author-error")).to_have_text("")


def test_readers_are_grouped_by_person_and_the_home_page_counts_them_live(
    browser: Browser, served: tuple[rally.App, str], tmp_path: Path
) -> None:
    app, url = served
    with tabs(browser, url, tmp_path) as t:
        alice, bob = t.session(), t.session()
        home = t.open(bob, "/")
        expect(home.locator("#stats-1")).to_have_text("★ 0 · 0 reading now")
        a1 = t.open(alice, "/articles/1")
        expect(home.locator("#stats-1")).to_have_text("★ 0 · 1 reading now")  # a PresenceChanged, watched
        a1.fill("#name-form input", "Alice")
        a1.press("#name-form input", "Enter")
        a2 = t.open(alice, "/articles/1")  # her name comes from the database
        b1 = t.open(bob, "/articles/1")
        expect(b1.locator("#readers li")).to_have_text(["Alice (2 tabs)", "Someone · you"])
        expect(a1.locator("#readers li")).to_have_text(["Alice (2 tabs) · you", "Someone"])
        expect(home.locator("#stats-1")).to_have_text("★ 0 · 2 reading now")  # people: Alice's tabs count once
        b1.click("#fav")
        expect(home.locator("#stats-1")).to_have_text("★ 1 · 2 reading now")  # the home topic
        expect(a1.locator("#favorites-word")).to_have_text("favourite")
        a2.close()  # Alice still reads in a1
        expect(b1.locator("#readers li")).to_have_text(["Alice", "Someone · you"])
        assert [p.meta for p in app.presence("/articles/1")] == [demo.Reader("Alice"), demo.Reader("")]
        b1.close()
        expect(home.locator("#stats-1")).to_have_text("★ 1 · 1 reading now")
        expect(a1.locator("#readers li")).to_have_text(["Alice · you"])
        # A home page opened now starts from who is there, and follows them.
        late = t.open(t.session(), "/")
        expect(late.locator("#stats-1")).to_have_text("★ 1 · 1 reading now")
        a1.close()
        for page in (home, late):
            expect(page.locator("#stats-1")).to_have_text("★ 1 · 0 reading now")


def test_a_rename_in_one_tab_shows_in_every_tab_of_the_session_without_reload(
    browser: Browser, served: tuple[rally.App, str], tmp_path: Path
) -> None:
    app, url = served
    with tabs(browser, url, tmp_path) as t:
        alice, bob = t.session(), t.session()
        a1, a2 = t.open(alice, "/articles/1"), t.open(alice, "/articles/1")
        a3 = t.open(alice, "/articles/2")
        b1 = t.open(bob, "/articles/1")
        expect(b1.locator("#readers li")).to_have_text(["Someone (2 tabs)", "Someone · you"])
        a2.fill("#name-form input", "Alice")
        a2.press("#name-form input", "Enter")
        for page in (a1, a3):  # broadcast_to_session(Renamed) → each tab's server_event → YourName
            expect(page.locator("#name-form input")).to_have_value("Alice")
        # Bob's chip takes the name of Alice's first tab: a1's presence meta changed too.
        expect(b1.locator("#readers li")).to_have_text(["Alice (2 tabs)", "Someone · you"])
        a3.fill("#name-form input", "Alicia")  # from a tab on another article
        a3.press("#name-form input", "Enter")
        for page in (a1, a2):
            expect(page.locator("#name-form input")).to_have_value("Alicia")
        expect(b1.locator("#readers li")).to_have_text(["Alicia (2 tabs)", "Someone · you"])
        expect(b1.locator("#name-form input")).to_have_value("")  # another browser keeps its own name
        assert sorted(p.meta.name for p in app.presence("/articles/1")) == ["", "Alicia", "Alicia"]
        assert [p.meta for p in app.presence("/articles/2")] == [demo.Reader("Alicia")]


def test_reading_now_goes_up_when_a_reader_opens_the_article_and_down_when_they_leave(
    browser: Browser, served: tuple[rally.App, str], tmp_path: Path
) -> None:
    _, url = served
    with tabs(browser, url, tmp_path) as t:
        alice = t.session()
        a1 = t.open(alice, "/articles/3")
        expect(a1.locator("#reading")).to_have_text("1")
        b1 = t.open(t.session(), "/articles/3")
        for page in (a1, b1):
            expect(page.locator("#reading")).to_have_text("2")
        a2 = t.open(alice, "/articles/3")  # one more tab of a reader: one more chip tab, not one more reader
        expect(b1.locator("#readers li")).to_have_text(["Someone (2 tabs)", "Someone · you"])
        expect(b1.locator("#reading")).to_have_text("2")
        b1.close()
        for page in (a1, a2):
            expect(page.locator("#reading")).to_have_text("1")
            expect(page.locator("#readers li")).to_have_text(["Someone (2 tabs) · you"])


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A redis-server of its own on a free loopback port, for two demo servers to share."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("the two-server demo test needs redis-server (apt-get install -y redis-server)")
    pytest.importorskip("redis", reason="the two-server demo test needs the redis package")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        bound = threading.Timer(BOUND_MS / 1000, proc.kill)  # a redis-server that never says it is ready
        bound.start()
        try:
            assert proc.stdout is not None
            while b"Ready to accept connections" not in (line := proc.stdout.readline()):
                assert line, "redis-server exited before it was ready"
            bound.cancel()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            bound.cancel()
            proc.kill()


def test_counts_and_renames_cross_two_servers_sharing_a_broker(
    browser: Browser, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two servers, as two processes behind a load balancer would be: one
    # database, one Redis, one secret, so one session cookie is good on both.
    monkeypatch.setenv("RALLY_BROKER", redis_url)
    monkeypatch.setenv("RALLY_SECRET", "demo test secret")
    db = str(tmp_path / "demo.sqlite3")
    with contextlib.ExitStack() as stack:
        one, two = (stack.enter_context(demo.make_app(db, clock=False).run_in_thread(access_log=False)) for _ in "12")
        with tabs(browser, one.url, tmp_path) as t:
            alice, bob = t.session(), t.session()
            home = t.open(bob, "/")  # on the first server
            expect(home.locator("#stats-1")).to_have_text("★ 0 · 0 reading now")
            t.base = two.url
            a_two = t.open(alice, "/articles/1")  # on the second
            expect(home.locator("#stats-1")).to_have_text("★ 0 · 1 reading now")
            t.base = one.url
            b_one = t.open(bob, "/articles/1")
            for page in (a_two, b_one):
                expect(page.locator("#reading")).to_have_text("2")
            expect(home.locator("#stats-1")).to_have_text("★ 0 · 2 reading now")
            a_one = t.open(alice, "/articles/1")  # Alice's second tab, on the other server
            expect(b_one.locator("#readers li")).to_have_text(["Someone (2 tabs)", "Someone · you"])
            a_two.fill("#name-form input", "Alice")
            a_two.press("#name-form input", "Enter")
            expect(a_one.locator("#name-form input")).to_have_value("Alice")
            expect(b_one.locator("#readers li")).to_have_text(["Alice (2 tabs)", "Someone · you"])
            a_two.close()
            a_one.close()
            expect(home.locator("#stats-1")).to_have_text("★ 0 · 1 reading now")
            expect(b_one.locator("#reading")).to_have_text("1")


def test_a_missing_article_is_a_404_page_without_a_connection(
    browser: Browser, served: tuple[rally.App, str], tmp_path: Path
) -> None:
    _, url = served
    with tabs(browser, url, tmp_path) as t:
        t.allowed_console = ("404 (Not Found)",)
        page = t.session().new_page()
        page.on("pageerror", lambda exc: t.errors.append(str(exc)))
        response = page.goto(url + "/articles/99")
        assert response is not None and response.status == 404
        expect(page.locator("h1")).to_have_text("Not found")
        assert page.evaluate("typeof window.rally") == "undefined"  # no boot data, no client, no WebSocket


def test_the_lifespan_runs_the_clock(browser: Browser, tmp_path: Path) -> None:
    with demo.make_app(str(tmp_path / "demo.sqlite3")).run_in_thread(access_log=False) as server:
        with tabs(browser, server.url, tmp_path) as t:
            page = t.open(t.session(), "/")
            expect(page.locator("#clock")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))


@contextlib.contextmanager
def page_whose_server_stopped(
    browser: Browser, tmp_path: Path, allowed_console: tuple[str, ...] = ()
) -> Iterator[tuple[Page, int, str, rally.App]]:
    """An article page whose server has just stopped: the page is reconnecting.
    Yields the page, the port and database to restart on, and the old app."""
    db = str(tmp_path / "demo.sqlite3")
    app = demo.make_app(db)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(app.run_in_thread(access_log=False))
        with tabs(browser, server.url, tmp_path) as t:
            # Chromium logs the refused reconnection attempts as console errors.
            t.allowed_console = ("WebSocket connection to", *allowed_console)
            page = t.open(t.session(), "/articles/1")
            expect(page.locator("#connections")).to_have_text("1")
            stack.close()  # the server stops: the page sees 1001 and starts reconnecting
            expect(page.locator("#status")).not_to_have_text("open")
            yield page, server.port, db, app


def test_page_reconnects_after_restart_and_delivers_what_was_sent_meanwhile(browser: Browser, tmp_path: Path) -> None:
    with page_whose_server_stopped(browser, tmp_path) as (page, port, db, _):
        page.click("#fav")  # queued while disconnected
        with demo.make_app(db).run_in_thread(port=port, access_log=False):
            expect(page.locator("#status")).to_have_text("open", timeout=20_000)
            expect(page.locator("#connections")).to_have_text("2")  # server_init ran again
            expect(page.locator("#favorites")).to_have_text("1")
            expect(page.locator("#fav")).to_have_text("★ Favourite")


def test_stale_contract_reloads_the_page_once(browser: Browser, tmp_path: Path) -> None:
    with page_whose_server_stopped(browser, tmp_path) as (page, port, db, old):
        loads: list[str] = []
        page.on("load", lambda p: loads.append(p.url))
        redeployed = demo.make_app(db)

        @redeployed.rpc
        def server_version(msg: Version) -> str:  # a new message type: another contract
            return "2"

        assert redeployed.contract["hash"] != old.contract["hash"]
        with redeployed.run_in_thread(port=port, access_log=False):
            # The old page is refused with stale_contract and reloads into the new one.
            expect(page.locator("#status")).to_have_text("open", timeout=20_000)
            assert loads == [page.url]
            assert page.evaluate("rally.rpc('Version', {})") == {"ok": True, "value": "2"}


def test_stale_page_that_reloaded_a_moment_ago_closes_for_good(browser: Browser, tmp_path: Path) -> None:
    refused = ("rally: the server's contract differs from this page's; not reloading again",)
    with page_whose_server_stopped(browser, tmp_path, refused) as (page, port, db, _):
        loads: list[str] = []
        page.on("load", lambda p: loads.append(p.url))
        page.evaluate("""() => {
          sessionStorage.setItem('rally-reloaded-at', String(Date.now()));  // so it does not reload again
          const shown = (name) => [(v) => { document.body.dataset[name] = 'ok ' + JSON.stringify(v); },
                                   (e) => { document.body.dataset[name] = 'rejected ' + e.code; }];
          window.shown = shown;
          rally.onStatus((s, info) => { if (s === 'closed') document.body.dataset.closed = JSON.stringify(info); });
          rally.send('ToggleFavorite', {}).then(...shown('queued'));  // queued while disconnected
        }""")
        redeployed = demo.make_app(db)

        @redeployed.rpc
        def server_version(msg: Version) -> str:  # a new message type: another contract
            return "2"

        with redeployed.run_in_thread(port=port, access_log=False):
            expect(page.locator("#status")).to_have_text("closed", timeout=20_000)
            expect(page.locator("body")).to_have_attribute("data-closed", '{"code":4000,"reason":"stale_contract"}')
            expect(page.locator("body")).to_have_attribute("data-queued", "rejected closed")
            page.evaluate("rally.rpc('CheckComment', {author: 'a', body: 'abc'}).then(...shown('rpc'))")
            page.evaluate("rally.send('ToggleFavorite', {}).then(...shown('send'))")
            expect(page.locator("body")).to_have_attribute("data-rpc", "rejected closed")
            expect(page.locator("body")).to_have_attribute("data-send", "rejected closed")
            assert loads == []


def test_pages_load_again_after_a_fresh_reconnect_and_show_each_item_once(browser: Browser, tmp_path: Path) -> None:
    db = str(tmp_path / "demo.sqlite3")
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(demo.make_app(db, clock=False).run_in_thread(access_log=False))
        with tabs(browser, server.url, tmp_path) as t:
            t.allowed_console = ("WebSocket connection to",)  # the refused reconnections
            session = t.session()
            page, home = t.open(session, "/articles/1"), t.open(session, "/")
            comment(page, "Ann", "Before the restart")
            expect(page.locator("#comments li")).to_have_text(["AnnBefore the restart"])
            stack.close()  # the server stops: the new one will not know these pages
            expect(page.locator("#status")).not_to_have_text("open")
            expect(home.locator("#status")).not_to_have_text("open")
            with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:  # written while away
                other.execute("insert into comment (article_id, author, body) values (1, 'Bob', 'While away')")
                other.execute("insert into announcement (text) values ('Lunch is ready')")
                other.execute("insert into favorite values (2, 'someone else')")
            page.fill("#announce input", "Back soon")
            page.click("#announce button")  # waits for a connection; the text stays until it is applied
            assert page.locator("#announce input").input_value() == "Back soon"  # now, not eventually
            with demo.make_app(db, clock=False).run_in_thread(port=server.port, access_log=False):
                expect(page.locator("#status")).to_have_text("open", timeout=20_000)
                expect(page.locator("#connections")).to_have_text("2")  # a fresh server_init: not resumed
                expect(page.locator("#comments li")).to_have_text(["AnnBefore the restart", "BobWhile away"])
                expect(page.locator("#announce input")).to_have_value("")
                for p in (page, home):
                    expect(p.locator("#announcements li")).to_have_text(["Back soon", "Lunch is ready"])
                expect(home.locator("#stats-2")).to_have_text("★ 1 · 0 reading now")  # server_init's, again
                comment(page, "Ann", "After")  # a push after the load is shown once too
                expect(page.locator("#comments li")).to_have_text(
                    ["AnnBefore the restart", "BobWhile away", "AnnAfter"]
                )


def session_id(context: BrowserContext) -> str:
    [cookie] = [c for c in context.cookies() if c["name"] == rally._SESSION_COOKIE]
    return cookie["value"].split(".")[0]


def test_a_form_whose_send_fails_keeps_the_text_and_says_why(
    browser: Browser, served: tuple[rally.App, str], tmp_path: Path
) -> None:
    app, url = served
    with tabs(browser, url, tmp_path) as t:
        session = t.session()
        page = t.open(session, "/articles/1")
        page.fill("#announce input", "Hello")
        page.click("#announce button")
        expect(page.locator("#announcements li")).to_have_text(["Hello"])
        expect(page.locator("#announce input")).to_have_value("")  # cleared once it was applied
        assert app.close_session_threadsafe(session_id(session)).result(5) == 1  # logged out: sends fail now
        expect(page.locator("#status")).to_have_text("closed")
        page.fill("#announce input", "Are you there?")
        page.click("#announce button")
        expect(page.locator("#announce-error")).to_have_text(re.compile(r"^Not sent: the page was closed \(4001"))
        expect(page.locator("#announce input")).to_have_value("Are you there?")
        comment(page, "Ann", "Typed with care")
        expect(page.locator("#comment-form-error")).to_have_text(re.compile(r"^Not sent: the page was closed"))
        expect(page.locator("#comment-form textarea")).to_have_value("Typed with care")
        page.fill("#name-form input", "Ann")
        page.press("#name-form input", "Enter")
        expect(page.locator("#name-form-error")).to_have_text(re.compile(r"^Not sent: the page was closed"))
        expect(page.locator("#name-form input")).to_have_value("Ann")


@dataclasses.dataclass
class Version:
    pass


# ==== The browser client on a small page of its own =========================


@dataclasses.dataclass
class Rename:
    name: str


@dataclasses.dataclass
class Renamed:
    name: str


@dataclasses.dataclass
class Who:
    name: str


@dataclasses.dataclass
class LobbyModel:
    name: str


LOBBY_HTML = """<link rel="icon" href="data:,"><p id="status"></p><p id="who"></p><p id="tags"></p>
<script>
window.pushes = []; window.errors = []; window.statuses = [];
rally.onStatus((s) => { document.getElementById('status').textContent = s; statuses.push(s); });
rally.on('Renamed', (m) => pushes.push(m.name));
rally.onError((e) => errors.push(e.code));
rally.onPresence((list) => {
  document.getElementById('who').textContent = list.map((e) => e.meta.name + (e.self ? '*' : '')).sort().join(',');
  document.getElementById('tags').textContent = String(new Set(list.map((e) => e.tag)).size);
});
</script>"""


class Lobby:
    @staticmethod
    def view() -> str:
        return LOBBY_HTML

    @staticmethod
    def server_init() -> tuple[LobbyModel, rally.Effect[Renamed]]:
        return LobbyModel("anon"), rally.effect.none()

    @staticmethod
    def server_update(model: LobbyModel, msg: Rename) -> tuple[LobbyModel, rally.Effect[Renamed]]:
        return LobbyModel(msg.name), rally.effect.send_to_client(Renamed(msg.name))

    @staticmethod
    def server_presence(model: LobbyModel) -> Who:
        return Who(model.name)


@pytest.fixture
def lobby() -> Iterator[str]:
    app = rally.App()
    app.page("/lobby", Lobby)
    with app.run_in_thread(access_log=False) as server:
        yield server.url


def test_on_presence_shows_joins_renames_and_leaves_across_browsers(
    browser: Browser, lobby: str, tmp_path: Path
) -> None:
    with tabs(browser, lobby, tmp_path) as t:
        alice, bob = t.session(), t.session()
        a = t.open(alice, "/lobby")
        expect(a.locator("#who")).to_have_text("anon*")
        b = t.open(bob, "/lobby")
        expect(b.locator("#who")).to_have_text("anon,anon*")
        expect(a.locator("#who")).to_have_text("anon,anon*")
        a.evaluate("rally.send('Rename', {name: 'alice'})")
        expect(b.locator("#who")).to_have_text("alice,anon*")
        expect(a.locator("#who")).to_have_text("alice*,anon")
        # A second tab of alice's: three entries, two tags (one per browser session).
        a2 = t.open(alice, "/lobby")
        expect(b.locator("#who")).to_have_text("alice,anon,anon*")
        expect(b.locator("#tags")).to_have_text("2")
        a2.close()
        b.close()
        expect(a.locator("#who")).to_have_text("alice*")
        expect(a.locator("#tags")).to_have_text("1")


def test_send_promise_resolves_after_the_update_and_rejects_when_refused(
    browser: Browser, lobby: str, tmp_path: Path
) -> None:
    with tabs(browser, lobby, tmp_path) as t:
        page = t.open(t.session(), "/lobby")
        # Resolved by the ack, which follows the update's push.
        assert page.evaluate("rally.send('Rename', {name: 'ann'}).then(() => pushes.slice())") == ["ann"]
        refused = "rally.send('Rename', {name: 5}).then(() => 'applied', (e) => [e.code, e.errors[0].path])"
        assert page.evaluate(refused) == ["invalid", "msg.fields.name"]
        unknown = "rally.send('Nope', {}).then(() => 'applied', (e) => e.code)"
        assert page.evaluate(unknown) == "unknown_type"
        # Refusals went to their Promises, not to onError; the model is unchanged.
        assert page.evaluate("window.errors") == []
        expect(page.locator("#who")).to_have_text("ann*")


class Broken:
    inits: list[float] = []
    fifth = threading.Event()

    @staticmethod
    def view() -> str:
        return LOBBY_HTML

    @staticmethod
    def server_init() -> tuple[LobbyModel, rally.Effect[Renamed]]:
        Broken.inits.append(time.monotonic())
        if len(Broken.inits) == 5:
            Broken.fifth.set()
        raise RuntimeError("the database is down")

    @staticmethod
    def server_update(model: LobbyModel, msg: Rename) -> tuple[LobbyModel, rally.Effect[Renamed]]:
        return model, rally.effect.none()


def test_failing_server_init_is_reported_and_backs_off(
    browser: Browser, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = rally.App()
    app.page("/broken", Broken)
    Broken.inits.clear()
    Broken.fifth.clear()
    with app.run_in_thread(access_log=False) as server, tabs(browser, server.url, tmp_path) as t:
        t.allowed_console = ("rally: internal",)
        page = t.session().new_page()
        page.on("pageerror", lambda exc: t.errors.append(str(exc)))
        page.goto(server.url + "/broken")
        assert Broken.fifth.wait(30), f"only {len(Broken.inits)} handshakes in 30 s"
        # Each retry waits at least half the doubled delay (250 ms, then 500,
        # 1000, 2000): four waits of at least 125 + 250 + 500 + 1000 ms. A
        # client that reset its backoff on every open would take about 0.5 s.
        assert Broken.inits[4] - Broken.inits[0] >= 1.875
        expect(page.locator("#status")).to_have_text("reconnecting")
        assert "closed" not in page.evaluate("window.statuses")
        assert "internal" in page.evaluate("window.errors")  # onError took the error no Promise took
    assert "server_init of page Broken raised" in caplog.text


def test_readme_example_page_comes_alive(browser: Browser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).parent / "README.md").read_text(encoding="utf-8")
    [code] = re.findall(r"<!-- runnable: example\.py -->\n```python\n(.*?)```", readme, re.S)
    (tmp_path / "readme_example.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    import readme_example

    with contextlib.ExitStack() as running:
        server = running.enter_context(readme_example.app.run_in_thread(access_log=False))
        with tabs(browser, server.url, tmp_path) as t:
            t.allowed_console = ("WebSocket connection to",)  # the refused reconnections
            session = t.session()
            first, second = (session.new_page() for _ in range(2))
            for page in (first, second):
                page.on("pageerror", lambda exc: t.errors.append(str(exc)))
                page.goto(server.url + "/articles/hello")
                page.evaluate("() => { rally.onStatus((s) => { document.body.dataset.status = s; }); }")
            expect(first.locator("#title")).to_have_text("Article: hello")  # rally.rpc
            first.fill("#say input", "hi there")
            first.press("#say input", "Enter")
            expect(second.locator("#comments li")).to_have_text(["hi there"])  # broadcast_to_page
            expect(first.locator("#say input")).to_have_value("")  # cleared once it was applied
            first.click("#fav")
            expect(first.locator("#fav")).to_have_text("Favourited 5")  # send_to_client
            assert second.locator("#fav").inner_text() == "Favourite"

            # The server restarts and forgets the pages: they open afresh and load the comments again.
            running.close()
            for page in (first, second):
                expect(page.locator("body")).to_have_attribute("data-status", "reconnecting")
            readme_example.comments["hello"].append("while away")  # written while the pages were away
            with readme_example.app.run_in_thread(port=server.port, access_log=False):
                for page in (first, second):
                    expect(page.locator("body")).to_have_attribute("data-status", "open", timeout=20_000)
                    expect(page.locator("#comments li")).to_have_text(["hi there", "while away"])
                second.fill("#say input", "back")
                second.press("#say input", "Enter")
                for page in (first, second):
                    expect(page.locator("#comments li")).to_have_text(["hi there", "while away", "back"])


# ==== Delivery across a lost network =========================================


class CuttingProxy:
    """A TCP proxy on loopback that loses the network the way a pulled cable
    does, never with a WebSocket close frame. ``silence()``: every byte in
    both directions is dropped (and kept in ``dropped``), the sockets stay
    up and nobody is told. ``cut()``: silence, then both sides of every pipe
    are reset (RST). While down a new connection is reset at once, or with
    ``hold`` waits, as a retried SYN does, until ``restore()``."""

    def __init__(self, target_port: int, hold: bool = False) -> None:
        self.target_port = target_port
        self.hold = hold
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cutting-proxy", daemon=True)
        self.pipes: list[_Pipe] = []
        self.tasks: set[asyncio.Task[None]] = set()  # one per connection, until both sides are closed
        self.down = False
        self.restored: asyncio.Event | None = None
        self.changed = threading.Condition()
        self.dropped = {"up": bytearray(), "down": bytearray()}  # to the server, to the browser
        self.turned_away = 0  # connections reset or held while down
        self.server: asyncio.Server | None = None
        self.url = ""

    def __enter__(self) -> "CuttingProxy":
        self.thread.start()

        async def start() -> asyncio.Server:
            self.restored = asyncio.Event()
            return await asyncio.start_server(self._serve, "127.0.0.1", 0)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self.server is not None and self.restored is not None
            self.server.close()
            self.down, self.hold = True, False
            self.restored.set()
            for pipe in list(self.pipes):
                pipe.reset()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def _call(self, fn: Callable[[], None]) -> None:
        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def silence(self) -> None:
        def go() -> None:
            assert self.restored is not None
            self.down = True
            self.restored.clear()
            for pipe in self.pipes:
                pipe.silent = True

        self._call(go)

    def cut(self) -> None:
        def go() -> None:
            for pipe in list(self.pipes):
                pipe.reset()

        self.silence()
        self._call(go)

    def restore(self) -> None:
        def go() -> None:
            assert self.restored is not None
            self.down = False
            self.restored.set()

        self._call(go)

    def wait(self, predicate: Callable[["CuttingProxy"], bool], what: str, timeout: float = BOUND_MS / 1000) -> None:
        """Wait until ``predicate(self)`` holds (checked whenever bytes are
        dropped or a connection is turned away)."""
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self), timeout), f"no {what} in {timeout} s"

    def _drop(self, direction: str, data: bytes) -> None:
        with self.changed:
            self.dropped[direction] += data
            self.changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.restored is not None
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if self.down:
            with self.changed:
                self.turned_away += 1
                self.changed.notify_all()
            if self.hold:
                await self.restored.wait()
            if self.down:  # refused, or the proxy is closing
                _rst(writer)
                return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _rst(writer)
            return
        pipe = _Pipe(writer, up_writer)
        self.pipes.append(pipe)
        try:
            await asyncio.gather(
                self._copy(reader, up_writer, pipe, "up"),
                self._copy(up_reader, writer, pipe, "down"),
                return_exceptions=True,
            )
        finally:
            self.pipes.remove(pipe)
            for w in (writer, up_writer):
                w.close()

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pipe: "_Pipe", way: str) -> None:
        while data := await reader.read(65536):
            if pipe.silent:
                self._drop(way, data)
                continue
            writer.write(data)
            await writer.drain()
        if not pipe.silent and writer.can_write_eof():
            writer.write_eof()  # a FIN passes through; a reset does not


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0): no FIN, no close frame."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Pipe:
    def __init__(self, browser_side: asyncio.StreamWriter, server_side: asyncio.StreamWriter) -> None:
        self.sides = (browser_side, server_side)
        self.silent = False

    def reset(self) -> None:
        self.silent = True
        for writer in self.sides:
            _rst(writer)


@dataclasses.dataclass
class Typed:
    text: str


@dataclasses.dataclass
class Note:
    text: str


@dataclasses.dataclass
class Slow:
    n: int


@dataclasses.dataclass
class PadModel:
    lines: list[str]


@dataclasses.dataclass
class Journal:
    """What the server did, for the test to read (``server_context.state``)."""

    inits: list[int | None] = dataclasses.field(default_factory=list)  # connection ids
    applied: list[str] = dataclasses.field(default_factory=list)  # every Typed, in the order server_update ran
    model: PadModel | None = None  # the latest model
    calls: list[int] = dataclasses.field(default_factory=list)  # Slow RPCs run
    called: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)


PAD_HTML = """<link rel="icon" href="data:,"><p id="status"></p><p id="acked">0</p><p id="answer"></p>
<ol id="notes"></ol>
<script>
window.statuses = []; window.acked = 0;
rally.onStatus((s, info) => {
  document.getElementById('status').textContent = s;
  statuses.push([s, info ? info.resumed : null]);
});
rally.on('Note', (m) => {
  const li = document.createElement('li'); li.textContent = m.text; document.getElementById('notes').append(li);
});
window.type = (text) => rally.send('Typed', {text}).then(() => {
  document.getElementById('acked').textContent = String(++acked);
});
</script>"""


class Pad:
    @staticmethod
    def view() -> str:
        return PAD_HTML

    @staticmethod
    def server_init(server_context: rally.ServerContext) -> tuple[PadModel, rally.Effect[Note]]:
        server_context.state.inits.append(server_context.connection_id)
        return PadModel([]), rally.effect.none()

    @staticmethod
    def server_update(
        model: PadModel, msg: Typed, server_context: rally.ServerContext
    ) -> tuple[PadModel, rally.Effect[Note]]:
        journal = server_context.state
        journal.applied.append(msg.text)
        journal.model = PadModel([*model.lines, msg.text])
        return journal.model, rally.effect.none()

    @staticmethod
    async def server_slow(msg: Slow, server_context: rally.ServerContext) -> str:
        journal = server_context.state
        journal.calls.append(msg.n)
        journal.called.set()
        await asyncio.to_thread(journal.release.wait, 30)
        return f"answer {msg.n}"


@contextlib.contextmanager
def pad_behind_proxy(hold: bool = False) -> Iterator[tuple[rally.App, Journal, CuttingProxy]]:
    journal = Journal()
    app = rally.App(state=journal)
    app.page("/pad", Pad)
    with app.run_in_thread(access_log=False) as server, CuttingProxy(server.port, hold) as proxy:
        try:
            yield app, journal, proxy
        finally:
            journal.release.set()  # a handler still waiting lets the server stop


def send_frame_size(seq: int, text: str) -> int:
    """Bytes of the browser's masked frame for ``rally.send('Typed', {text})``."""
    envelope = {"kind": "send", "seq": seq, "msg": {"type": "Typed", "fields": {"text": text}}}
    n = len(json.dumps(envelope, separators=(",", ":")).encode())  # JSON.stringify's text
    return n + 6 if n < 126 else n + 8


def test_page_resumes_after_a_network_loss_without_losing_or_repeating_anything(
    browser: Browser, tmp_path: Path
) -> None:
    with pad_behind_proxy() as (app, journal, proxy), tabs(browser, proxy.url, tmp_path) as t:
        t.allowed_console = ("WebSocket connection to",)  # Chromium logs the refused reconnections
        page = t.open(t.session(), "/pad")
        loads: list[str] = []
        page.on("load", lambda p: loads.append(p.url))
        before = ["a", "b", "c"]
        page.evaluate("(texts) => Promise.all(texts.map(type))", before)
        expect(page.locator("#acked")).to_have_text("3")
        assert app.broadcast_to_page_threadsafe("/pad", Note("n0")).result(5) == 1
        expect(page.locator("#notes li")).to_have_text(["n0"])

        # The network goes silent: what either side writes now is lost on the way.
        proxy.silence()
        during = [f"while down {i}" for i in range(1, 6)]
        page.evaluate("(texts) => { texts.forEach((x) => type(x)); }", during)  # not awaited
        for i in (1, 2, 3):
            assert app.broadcast_to_page_threadsafe("/pad", Note(f"n{i}")).result(5) == 1
        lost_sends = sum(send_frame_size(seq, x) for seq, x in enumerate(during, start=4))
        proxy.wait(lambda p: len(p.dropped["up"]) >= lost_sends, "five sends lost on the way up")
        proxy.wait(lambda p: all(b'"n%d"' % i in p.dropped["down"] for i in (1, 2, 3)), "three pushes lost")
        proxy.cut()  # then both sides are reset, without a close frame
        expect(page.locator("#status")).to_have_text("reconnecting")
        proxy.wait(lambda p: p.turned_away >= 1, "reconnection refused while down")
        assert page.locator("#notes li").all_inner_texts() == ["n0"]  # now, not eventually
        assert page.locator("#acked").inner_text() == "3"

        proxy.restore()
        expect(page.locator("#status")).to_have_text("open", timeout=20_000)
        expect(page.locator("#notes li")).to_have_text(["n0", "n1", "n2", "n3"])  # replayed in order, once
        expect(page.locator("#acked")).to_have_text("8")  # every send confirmed
        assert journal.applied == before + during  # each send applied once, in order
        assert journal.model == PadModel(before + during)
        assert len(journal.inits) == 1  # resumed: no second server_init
        assert [s for s in page.evaluate("window.statuses") if s[0] == "open"] == [["open", False], ["open", True]]
        assert loads == []  # the page never reloaded
        assert app.broadcast_to_page_threadsafe("/pad", Note("n4")).result(5) == 1  # one page, still subscribed
        expect(page.locator("#notes li")).to_have_text(["n0", "n1", "n2", "n3", "n4"])


def test_handlers_that_throw_are_reported_and_the_page_goes_on(browser: Browser, tmp_path: Path) -> None:
    """A push, status or presence handler that throws is reported, as the
    DOM reports a listener's error; the handlers after it still run, and the
    client still acknowledges and reconnects."""
    with pad_behind_proxy() as (app, _, proxy), tabs(browser, proxy.url, tmp_path) as t:
        t.allowed_console = ("WebSocket connection to", "on purpose")
        page = t.open(t.session(), "/pad")
        page.evaluate("""() => {
          window.after = [];
          rally.onStatus((s) => { if (s !== 'open') throw new Error('status handler fails on purpose'); });
          rally.on('Note', () => { throw new Error('push handler fails on purpose'); });
          rally.on('Note', (m) => { after.push(m.text); });
        }""")
        assert app.broadcast_to_page_threadsafe("/pad", Note("n0")).result(5) == 1
        expect(page.locator("#notes li")).to_have_text(["n0"])
        page.wait_for_function("window.after.length === 1")
        proxy.cut()  # "reconnecting": the throwing status handler must not stop the reconnect
        expect(page.locator("#status")).to_have_text("reconnecting")
        proxy.restore()
        expect(page.locator("#status")).to_have_text("open", timeout=20_000)
        assert app.broadcast_to_page_threadsafe("/pad", Note("n1")).result(5) == 1
        expect(page.locator("#notes li")).to_have_text(["n0", "n1"])
        page.wait_for_function("window.after.length === 2")
        reported = [e for e in t.errors if "on purpose" in e]
        assert any("push handler fails on purpose" in e for e in reported)
        assert any("status handler fails on purpose" in e for e in reported)
        t.errors[:] = [e for e in t.errors if e not in reported]


def test_rpc_whose_answer_was_lost_is_retried_and_runs_once(browser: Browser, tmp_path: Path) -> None:
    with pad_behind_proxy(hold=True) as (_, journal, proxy), tabs(browser, proxy.url, tmp_path) as t:
        page = t.open(t.session(), "/pad")
        page.evaluate("""() => { rally.rpc('Slow', {n: 1}).then(
          (r) => { document.getElementById('answer').textContent = JSON.stringify(r); },
          (e) => { document.getElementById('answer').textContent = 'rejected: ' + e.message; }); }""")
        assert journal.called.wait(BOUND_MS / 1000), "the RPC did not reach its handler"
        proxy.cut()  # the call's WebSocket is gone: its answer cannot come back on it
        expect(page.locator("#status")).to_have_text("reconnecting")  # the call waits for the next connection
        proxy.wait(lambda p: p.turned_away >= 1, "a connection attempt while down")
        proxy.restore()
        journal.release.set()
        expect(page.locator("#answer")).to_have_text('{"ok":true,"value":"answer 1"}')
        assert journal.calls == [1]  # the retry got the first call's answer
        expect(page.locator("#status")).to_have_text("open", timeout=20_000)
        assert len(journal.inits) == 1


def test_rpc_in_flight_survives_a_network_loss_that_refuses_connections(browser: Browser, tmp_path: Path) -> None:
    with pad_behind_proxy() as (_, journal, proxy), tabs(browser, proxy.url, tmp_path) as t:
        t.allowed_console = ("WebSocket connection to", "net::ERR_")
        page = t.open(t.session(), "/pad")
        page.evaluate("""() => { rally.rpc('Slow', {n: 1}).then(
          (r) => { document.getElementById('answer').textContent = JSON.stringify(r); },
          (e) => { document.getElementById('answer').textContent = 'rejected: ' + e.message; }); }""")
        assert journal.called.wait(BOUND_MS / 1000), "the RPC did not reach its handler"
        proxy.cut()
        expect(page.locator("#status")).to_have_text("reconnecting")
        proxy.wait(lambda p: p.turned_away >= 2, "two reconnections refused while down")
        proxy.restore()
        journal.release.set()
        expect(page.locator("#answer")).not_to_be_empty()
        assert page.locator("#answer").inner_text() == '{"ok":true,"value":"answer 1"}'
        assert journal.calls == [1]


ANSWER_JS = """(n) => { rally.rpc('Slow', {n}).then(
  (r) => { document.getElementById('answer').textContent = JSON.stringify(r); },
  (e) => { document.getElementById('answer').textContent = 'rejected ' + e.code; }); }"""


def test_rpc_made_while_disconnected_waits_for_the_reconnect_and_runs_once(browser: Browser, tmp_path: Path) -> None:
    with pad_behind_proxy() as (_, journal, proxy), tabs(browser, proxy.url, tmp_path) as t:
        t.allowed_console = ("WebSocket connection to", "net::ERR_")
        page = t.open(t.session(), "/pad")
        proxy.cut()
        expect(page.locator("#status")).to_have_text("reconnecting")
        page.evaluate(ANSWER_JS, 2)  # made while down: no HTTP request that would fail now
        proxy.wait(lambda p: p.turned_away >= 1, "a connection refused while down")
        proxy.restore()
        # Asked over the new WebSocket; then that one is lost too while the handler runs.
        assert journal.called.wait(BOUND_MS / 1000), "the RPC did not reach its handler after the reconnect"
        proxy.cut()
        expect(page.locator("#status")).to_have_text("reconnecting")
        proxy.restore()
        expect(page.locator("#status")).to_have_text("open", timeout=20_000)  # asked again, with the same key
        journal.release.set()
        expect(page.locator("#answer")).to_have_text('{"ok":true,"value":"answer 2"}')
        assert journal.calls == [2]  # the handler ran once
        assert len(journal.inits) == 1  # both reconnections resumed the page


def test_rpc_made_while_disconnected_rejects_only_at_its_time_out(browser: Browser, tmp_path: Path) -> None:
    with pad_behind_proxy() as (_, journal, proxy), tabs(browser, proxy.url, tmp_path) as t:
        t.allowed_console = ("WebSocket connection to", "net::ERR_")
        context = t.session()
        context.clock.install()  # the page's timers: the backoff and the RPC's 30 s time-out
        page = t.open(context, "/pad")
        proxy.cut()
        expect(page.locator("#status")).to_have_text("reconnecting")
        page.evaluate(ANSWER_JS, 3)
        page.clock.run_for(29_000)  # reconnection attempts come and are refused
        proxy.wait(lambda p: p.turned_away >= 1, "a connection refused while down")
        expect(page.locator("#status")).to_have_text("reconnecting")
        assert page.locator("#answer").inner_text() == ""  # still waiting, now, not eventually
        page.clock.run_for(2_000)
        expect(page.locator("#answer")).to_have_text("rejected timeout")
        assert journal.calls == []


# ==== A page closed for good ================================================


@dataclasses.dataclass
class Knock:
    text: str
    wait: bool = False  # server_update waits for the test's release


@dataclasses.dataclass
class Hold:
    n: int


@dataclasses.dataclass
class Doorman:
    """What the door's server did, for the test to read (``server_context.state``)."""

    sessions: list[str] = dataclasses.field(default_factory=list)  # one per server_init
    knocks: list[str] = dataclasses.field(default_factory=list)  # every Knock server_update took
    calls: list[int] = dataclasses.field(default_factory=list)  # every Hold RPC run
    updating: threading.Event = dataclasses.field(default_factory=threading.Event)
    called: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)


DOOR_HTML = """<link rel="icon" href="data:,"><p id="status"></p><p id="info"></p><ul id="outcomes"></ul>
<script>
rally.onStatus((s, info) => {
  document.getElementById('status').textContent = s;
  document.getElementById('info').textContent = JSON.stringify(info === undefined ? null : info);
});
// How a Promise settled, in <li id=name>: "pending", "ok <value>" or "rejected <code>".
window.track = (name, promise) => {
  const li = document.createElement('li'); li.id = name; li.textContent = 'pending';
  document.getElementById('outcomes').append(li);
  promise.then((v) => { li.textContent = 'ok ' + JSON.stringify(v); },
               (e) => { li.textContent = 'rejected ' + e.code; });
};
</script>"""


class Door:
    @staticmethod
    def view() -> str:
        return DOOR_HTML

    @staticmethod
    def server_init(server_context: rally.ServerContext) -> tuple[PadModel, rally.Effect[Note]]:
        server_context.state.sessions.append(server_context.session_id)
        return PadModel([]), rally.effect.none()

    @staticmethod
    async def server_update(
        model: PadModel, msg: Knock, server_context: rally.ServerContext
    ) -> tuple[PadModel, rally.Effect[Note]]:
        doorman = server_context.state
        doorman.knocks.append(msg.text)
        if msg.wait:
            doorman.updating.set()
            await asyncio.to_thread(doorman.release.wait, 30)
        return PadModel([*model.lines, msg.text]), rally.effect.none()

    @staticmethod
    async def server_hold(msg: Hold, server_context: rally.ServerContext) -> str:
        doorman = server_context.state
        doorman.calls.append(msg.n)
        doorman.called.set()
        await asyncio.to_thread(doorman.release.wait, 30)
        return f"held {msg.n}"


@contextlib.contextmanager
def door() -> Iterator[tuple[rally.App, Doorman, str]]:
    doorman = Doorman()
    app = rally.App(state=doorman)
    app.page("/door", Door)
    with app.run_in_thread(access_log=False) as server:
        try:
            yield app, doorman, server.url
        finally:
            doorman.release.set()  # a handler still waiting lets the server stop


def close_session_of(app: rally.App, doorman: Doorman, page: Page) -> None:
    """Log the page's session out (close code 4001) and wait until the page says closed."""
    [session_id] = doorman.sessions
    assert app.close_session_threadsafe(session_id).result(5) == 1
    expect(page.locator("#status")).to_have_text("closed")


def test_send_and_rpc_after_the_session_closed_reject_at_once(browser: Browser, tmp_path: Path) -> None:
    with door() as (app, doorman, url), tabs(browser, url, tmp_path) as t:
        page = t.open(t.session(), "/door")
        close_session_of(app, doorman, page)
        page.evaluate("track('send', rally.send('Knock', {text: 'after'}))")
        page.evaluate("track('rpc', rally.rpc('Hold', {n: 1}))")
        # Far sooner than the RPC's 30 s time-out; a send used to wait forever.
        expect(page.locator("#send")).to_have_text("rejected closed")
        expect(page.locator("#rpc")).to_have_text("rejected closed")
        assert doorman.knocks == [] and doorman.calls == []  # neither went to the server, over any transport
        expect(page.locator("#status")).to_have_text("closed")  # and no reconnection


def test_sends_and_rpcs_in_flight_when_the_session_closes_are_rejected(browser: Browser, tmp_path: Path) -> None:
    with door() as (app, doorman, url), tabs(browser, url, tmp_path) as t:
        page = t.open(t.session(), "/door")
        page.evaluate("track('rpc', rally.rpc('Hold', {n: 1}))")
        assert doorman.called.wait(BOUND_MS / 1000), "the RPC did not reach its handler"
        page.evaluate("track('slow', rally.send('Knock', {text: 'slow', wait: true}))")
        assert doorman.updating.wait(BOUND_MS / 1000), "the send did not reach server_update"
        page.evaluate("track('next', rally.send('Knock', {text: 'next'}))")  # written, not yet taken
        for name in ("rpc", "slow", "next"):
            expect(page.locator(f"#{name}")).to_have_text("pending")
        close_session_of(app, doorman, page)
        for name in ("rpc", "slow", "next"):
            expect(page.locator(f"#{name}")).to_have_text("rejected closed")


def test_closed_status_carries_the_servers_close_code_and_reason(browser: Browser, tmp_path: Path) -> None:
    with door() as (app, doorman, url), tabs(browser, url, tmp_path) as t:
        page = t.open(t.session(), "/door")
        expect(page.locator("#info")).to_have_text('{"resumed":false}')
        close_session_of(app, doorman, page)
        expect(page.locator("#info")).to_have_text('{"code":4001,"reason":"session closed"}')
        # A handler added afterwards is told the same at once.
        told = page.evaluate("new Promise((resolve) => rally.onStatus((s, info) => resolve([s, info])))")
        assert told == ["closed", {"code": 4001, "reason": "session closed"}]


def test_close_4003_refused_is_for_good(browser: Browser, tmp_path: Path) -> None:
    # A stand-in for a server_init that raises rally.Refuse("banned"): the
    # test closes the page's second connection with 4003 itself.
    with door() as (_, doorman, url), tabs(browser, url, tmp_path) as t:
        context = t.session()
        context.clock.install()  # the page's timers: its backoff, its RPC time-out
        routes: list[Any] = []

        def route(ws: Any) -> None:
            routes.append(ws)
            if len(routes) == 1:
                ws.connect_to_server()
            else:
                ws.close(code=4003, reason="banned")

        context.route_web_socket(re.compile(r"/_rally/ws\?"), route)
        page = t.open(context, "/door")
        routes[0].close(code=1012, reason="restart")  # a lost connection: the page reconnects
        expect(page.locator("#status")).to_have_text("reconnecting")
        page.evaluate("track('queued', rally.send('Knock', {text: 'queued'}))")
        page.evaluate("track('waiting', rally.rpc('Hold', {n: 1}))")
        page.clock.run_for(1_000)  # the first retry comes within 375 ms
        expect(page.locator("#status")).to_have_text("closed")
        expect(page.locator("#info")).to_have_text('{"code":4003,"reason":"banned"}')
        expect(page.locator("#queued")).to_have_text("rejected closed")
        expect(page.locator("#waiting")).to_have_text("rejected closed")
        page.evaluate("track('send', rally.send('Knock', {text: 'after'}))")
        page.evaluate("track('rpc', rally.rpc('Hold', {n: 2}))")
        expect(page.locator("#send")).to_have_text("rejected closed")
        expect(page.locator("#rpc")).to_have_text("rejected closed")
        page.clock.run_for(60_000)  # a reconnection loop would have tried again by now
        expect(page.locator("#status")).to_have_text("closed")
        assert len(routes) == 2
        assert doorman.knocks == [] and doorman.calls == []


def test_a_full_send_queue_drops_its_oldest_unwritten_send_never_one_the_server_may_have(
    browser: Browser, tmp_path: Path
) -> None:
    with door() as (_, doorman, url), tabs(browser, url, tmp_path) as t:
        context = t.session()
        routes: list[Any] = []

        def route(ws: Any) -> None:  # the first connection reaches the server; later ones are refused
            routes.append(ws)
            if len(routes) == 1:
                ws.connect_to_server()
            else:
                ws.close(code=1012, reason="restart")

        context.route_web_socket(re.compile(r"/_rally/ws\?"), route)
        page = t.open(context, "/door")
        page.evaluate("track('written', rally.send('Knock', {text: 'written', wait: true}))")
        assert doorman.updating.wait(10)  # the server has it, and has not answered yet
        routes[0].close(code=1012, reason="restart")
        expect(page.locator("#status")).to_have_text("reconnecting")
        page.evaluate("track('first', rally.send('Knock', {text: 'first queued'}))")
        page.evaluate("() => { for (let i = 0; i < 999; i++) rally.send('Knock', {text: 'q' + i}); }")  # 1 000 wait
        page.evaluate("track('last', rally.send('Knock', {text: 'one too many'}))")
        expect(page.locator("#first")).to_have_text("rejected queue_full")  # the oldest never written
        expect(page.locator("#written")).to_have_text("pending")  # may be applied: not given up as unsent
        expect(page.locator("#last")).to_have_text("pending")


class Bouncer:
    """The door, refusing every page: its server_init raises rally.Refuse."""

    @staticmethod
    def view() -> str:
        return DOOR_HTML

    @staticmethod
    def server_init(server_context: rally.ServerContext) -> tuple[PadModel, rally.Effect[Note]]:
        server_context.state.sessions.append(server_context.session_id)
        raise rally.Refuse("banned from this room")


def test_a_page_refused_by_server_init_stops_with_4003_and_its_reason(browser: Browser, tmp_path: Path) -> None:
    doorman = Doorman()
    app = rally.App(state=doorman)
    app.page("/bouncer", Bouncer)
    with app.run_in_thread(access_log=False) as server, tabs(browser, server.url, tmp_path) as t:
        t.allowed_console = ("WebSocket connection to",)
        context = t.session()
        context.clock.install()  # the page's timers: a reconnection loop would run on them
        page = context.new_page()
        page.on("pageerror", lambda exc: t.errors.append(f"/bouncer: {exc}"))
        page.goto(t.base + "/bouncer")
        t.pages.append(page)
        expect(page.locator("#status")).to_have_text("closed")
        expect(page.locator("#info")).to_have_text('{"code":4003,"reason":"banned from this room"}')
        page.evaluate("track('send', rally.send('Knock', {text: 'let me in'}))")
        expect(page.locator("#send")).to_have_text("rejected closed")
        page.clock.run_for(60_000)
        expect(page.locator("#status")).to_have_text("closed")
        assert len(doorman.sessions) == 1  # one server_init: no reconnect loop
        assert app.connections() == 0


# ==== Cross-origin RPC ========================================================


@dataclasses.dataclass
class WhoAmI:
    greeting: str


class Front:
    """The page of the other origin: it only calls the API's RPC with fetch."""

    html = "<html><head><title>front</title></head><body><p id='status'>static</p></body></html>"


CROSS_ORIGIN_FETCH = """async (url) => {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 10000);
  try {
    const response = await fetch(url + "/_rally/rpc", {
      method: "POST",
      credentials: "include",
      signal: controller.signal,
      headers: {"content-type": "application/json"},
      body: JSON.stringify({kind: "rpc", id: 1, msg: {type: "WhoAmI", fields: {greeting: "hi"}}}),
    });
    return {status: response.status, reply: await response.json()};
  } catch (error) {
    return {error: error.name + ": " + error.message};
  } finally {
    clearTimeout(timer);
  }
}"""


def test_a_page_of_an_allowed_origin_calls_rpc_with_credentials_and_others_are_blocked(
    browser: Browser, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A page on http://127.0.0.1:<front> calls the API app on
    http://127.0.0.1:<api> (another origin of the same site, so its
    SameSite=Lax session cookie goes along with credentials: "include");
    its JSON body makes Chromium send a preflight first. The same page
    reached as http://localhost:<front> is an origin the API does not list:
    the preflight is refused and fetch fails before the POST is sent."""
    caplog.set_level(logging.INFO, logger="rally.access")
    secret = "one secret for both apps, so the API reads the front's session cookie"
    front = rally.App(secret=secret)
    front.page("/", Front)
    with front.run_in_thread(access_log=False) as front_server:
        own = front_server.url  # http://127.0.0.1:<port>
        api = rally.App(secret=secret, allowed_origins=[own])

        @api.rpc
        def server_who_am_i(msg: WhoAmI, server_context: rally.ServerContext) -> str:
            return f"{msg.greeting} {server_context.session_id}"

        with api.run_in_thread() as api_server, tabs(browser, own, tmp_path) as t:
            t.allowed_console = ("CORS policy", "Failed to load resource")  # the blocked call's own report
            context = t.session()
            page = context.new_page()
            page.on("pageerror", lambda exc: t.errors.append(str(exc)))
            page.on("console", lambda msg: t._console("/", msg))
            page.goto(own + "/")
            [cookie] = [c for c in context.cookies() if c["name"] == "rally_session"]
            session_id = cookie["value"].split(".")[0]
            answer = page.evaluate(CROSS_ORIGIN_FETCH, api_server.url)
            assert answer == {"status": 200, "reply": {"kind": "ok", "id": 1, "value": f"hi {session_id}"}}

            foreign = own.replace("127.0.0.1", "localhost")
            page.goto(foreign + "/")
            blocked = page.evaluate(CROSS_ORIGIN_FETCH, api_server.url)
            assert blocked == {"error": "TypeError: Failed to fetch"}
    access = [r.getMessage() for r in caplog.records if r.name == "rally.access"]
    rpc_lines = [line.split('"')[1] + line.split('"')[2] for line in access if "/_rally/rpc" in line]
    # Allowed: a preflight, then the POST. Foreign: the preflight only, refused.
    assert rpc_lines == [
        "OPTIONS /_rally/rpc HTTP/1.1 204",
        "POST /_rally/rpc HTTP/1.1 200",
        "OPTIONS /_rally/rpc HTTP/1.1 403",
    ]
    assert f"Origin '{foreign}'" in caplog.text


# ==== The docs page: docstrings, type links, the live console ================


@dataclasses.dataclass
class Comment:
    """One comment on a board."""

    author: str
    body: str


@dataclasses.dataclass
class Post:
    """Adds a comment to the board."""

    comment: Comment


@dataclasses.dataclass
class Wipe:
    pass


@dataclasses.dataclass
class BoardShown:
    """The board as it is now: its comments, or None before the first."""

    comments: list[Comment] | None


@dataclasses.dataclass
class Pinned:
    """A server event: a moderator pinned a comment."""

    index: int


@dataclasses.dataclass
class Reader:
    name: str


@dataclasses.dataclass
class BoardTitle:
    board: str


class Board:
    """A message board: every reader of a board sees each comment as it is posted."""

    @staticmethod
    def server_init(name: str) -> tuple[list[Comment], rally.Effect[BoardShown]]:
        """Opens the board ``name``, empty."""
        return [], rally.effect.none()

    @staticmethod
    def server_update(model: list[Comment], msg: Post | Wipe) -> tuple[list[Comment], rally.Effect[BoardShown]]:
        comments = [*model, msg.comment] if isinstance(msg, Post) else []
        return comments, rally.effect.broadcast_to_page(BoardShown(comments or None))

    @staticmethod
    def server_event(model: list[Comment], msg: Pinned) -> tuple[list[Comment], rally.Effect[BoardShown]]:
        return model, rally.effect.none()

    @staticmethod
    def server_presence(model: list[Comment]) -> Reader:
        return Reader(f"{len(model)} comments")

    @staticmethod
    def server_board_title(msg: BoardTitle) -> str:
        """The title of a board, as its page shows it."""
        return "Board " + msg.board


def board_app(**options: Any) -> rally.App:
    app = rally.App(**options)
    app.page("/boards/{name}", Board)
    return app


@pytest.fixture
def docs_tab(browser: Browser, tmp_path: Path) -> Iterator[Page]:
    with board_app().run_in_thread(access_log=False) as server, tabs(browser, server.url, tmp_path) as t:
        page = t.session().new_page()
        page.on("pageerror", lambda exc: t.errors.append(f"docs: {exc}"))
        page.on("console", lambda msg: t._console("docs", msg))
        t.pages.append(page)
        page.goto(server.url + "/_rally/docs")
        yield page


def test_docs_page_shows_docstrings_and_links_every_type_name_to_its_definition(docs_tab: Page) -> None:
    page = docs_tab
    board = page.locator('[id="page-/boards/{name}"]')
    expect(board.locator(".doc").first).to_have_text(
        "A message board: every reader of a board sees each comment as it is posted."
    )
    expect(board.locator("dl.hooks")).to_contain_text("server_initOpens the board name, empty.")
    expect(board.locator("tr", has_text="server events")).to_have_text("server eventsPinned")
    expect(page.locator("#rpc-BoardTitle .doc")).to_have_text("The title of a board, as its page shows it.")
    expect(page.locator("#type-Comment .doc")).to_have_text("One comment on a board.")
    expect(page.locator("#type-Wipe .doc")).to_have_count(0)  # no docstring written: none made up
    # Every link to a type lands on that type's heading (or its section's).
    links = page.evaluate("""() => [...document.querySelectorAll('a[href^="#type-"]')].map((a) => {
      const target = document.getElementById(a.getAttribute("href").slice(1));
      const heading = target && (target.matches("h3") ? target : target.querySelector("h3"));
      return [a.textContent, heading ? heading.textContent : null];
    })""")
    assert len(links) > 10 and all(text == heading for text, heading in links), links
    field = page.locator("#type-BoardShown tr", has_text="comments")
    expect(field.locator("td").nth(1)).to_have_text("list[Comment] | None")
    field.locator('a[href="#type-Comment"]').click()
    expect(page).to_have_url(re.compile(r"#type-Comment$"))
    expect(page.locator("#type-Comment h3")).to_have_text("Comment")
    expect(page.locator("#type-Comment h3")).to_be_in_viewport()
    board.locator("tr", has_text="sends").locator('a[href="#type-Post"]').click()
    expect(page.locator("#type-Post h3")).to_be_in_viewport()


def test_docs_console_opens_a_page_sends_and_logs_pushes_presence_and_acks(docs_tab: Page) -> None:
    page = docs_tab
    console = page.locator('[id="page-/boards/{name}"] .console')
    log = console.locator("ol.log")
    send = console.locator("form.send button")
    expect(send).to_be_disabled()
    console.locator("input[name=param-name]").fill("lobby")
    console.locator("button.open").click()
    expect(console.locator(".state")).to_have_text("open")
    expect(log.locator("li.in[data-kind=hello]")).to_contain_text('"resumed":false')
    expect(log.locator("li.in[data-kind=presence]")).to_contain_text('"meta":{"name":"0 comments"}')
    expect(log.locator("li.out[data-kind=ack]")).to_have_text(['→{"kind":"ack","seq":1}'])  # the presence frame's
    # The type picker fills in each message's sample; Post's is edited and sent.
    console.locator("select[name=type]").select_option("Wipe")
    expect(console.locator("form.send textarea")).to_have_value("{}")
    console.locator("select[name=type]").select_option("Post")
    sample = json.loads(console.locator("form.send textarea").input_value())
    assert sample == {"comment": {"author": "", "body": ""}}
    console.locator("form.send textarea").fill(json.dumps({"comment": {"author": "Ann", "body": "hi there"}}))
    send.click()
    expect(log.locator("li.out[data-kind=send]")).to_contain_text('"seq":1,"msg":{"type":"Post"')
    pushed = '"msg":{"type":"BoardShown","fields":{"comments":[{"author":"Ann","body":"hi there"}]}}'
    expect(log.locator("li.in[data-kind=push]")).to_contain_text(pushed)
    expect(log.locator("li.in[data-kind=ack]")).to_have_text(['←{"kind":"ack","seq":1}'])  # the send's
    expect(log.locator("li.out[data-kind=ack]")).to_have_count(3)  # the push's and the presence update's
    kinds = log.locator("li").evaluate_all("(items) => items.map((li) => li.className + ' ' + li.dataset.kind)")
    assert kinds.index("in push") < kinds.index("in ack")  # the push came before the ack of its send
    # A value the contract refuses comes back as an error on the log; the socket stays open.
    console.locator("form.send textarea").fill(json.dumps({"comment": {"author": 1, "body": ""}}))
    send.click()
    expect(log.locator("li.in[data-kind=error]")).to_contain_text("expected str, got int")
    console.locator("button.close").click()
    expect(console.locator(".state")).to_have_text("closed 1000")
    expect(log.locator("li[data-kind=closed]")).to_have_text("•closed: 1000")
    expect(send).to_be_disabled()
    expect(console.locator("button.open")).to_be_enabled()


def test_docs_false_answers_404_and_the_pages_still_work(browser: Browser, tmp_path: Path) -> None:
    with board_app(docs=False).run_in_thread(access_log=False) as server, tabs(browser, server.url, tmp_path) as t:
        page = t.session().new_page()
        t.pages.append(page)
        response = page.goto(server.url + "/_rally/docs")
        assert response is not None and response.status == 404
        response = page.goto(server.url + "/boards/lobby")
        assert response is not None and response.status == 200
        # In a function that returns nothing: Playwright calls a function an expression
        # evaluates to, and the unsubscribe function onStatus returns would end the watch.
        page.evaluate("() => { rally.onStatus((status) => { document.title = status; }); }")
        expect(page).to_have_title("open")
