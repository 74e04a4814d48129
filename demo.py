"""rally.py demo: articles with live favourites, comments, readers and a clock.

Run ``python demo.py`` and open http://127.0.0.1:8000 in two browsers, or
``python rally.py demo:app``. Data lives in SQLite (``--db``, default
``demo.sqlite3``, or ``RALLY_DEMO_DB``), created on first run.

Every part of rally.py is in use, and the page says which part each action
shows: RPC (``LoadArticle``, ``CheckComment`` with field errors), stateful
pages (``server_init`` keeps the article in the model), the four delivery
scopes, a custom topic (the home page's favourite counts), presence (who is
reading an article, one person's tabs grouped), server events (a rename
reaches the model of every tab of the session; the home page counts the
readers of every article from ``rally.PresenceChanged``), a lifespan (the
database and the clock), and ``rally.Response`` (a missing article is a 404).

The pages load what they show (the article and its comments, the latest
announcements) on every connection that did not resume, and show
each item once by its id, however it arrived; a form keeps what the user
typed until its send was applied, and says why when it was not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass

import rally

SCHEMA = """
create table if not exists article (id integer primary key, title text not null, body text not null);
create table if not exists comment (id integer primary key, article_id integer not null,
                                    author text not null, body text not null);
create table if not exists favorite (article_id integer not null, session_id text not null,
                                     primary key (article_id, session_id));
create table if not exists reader (session_id text primary key, name text not null);
create table if not exists announcement (id integer primary key, text text not null);
"""
SEED = [
    ("Typed RPC without a schema", "The type hints of a Python function are the whole contract."),
    ("One socket, four audiences", "A push reaches this tab, this browser, this page, or everyone."),
    ("Slow readers are not your problem", "Each connection has a bounded buffer; laggards are dropped."),
]
ARTICLE_ROUTE = "/articles/{id}"
HOME_TOPIC = "home"  # the home page's favourite counts: a custom topic
ANNOUNCEMENTS_SHOWN = 20  # the latest announcements a page loads


def open_db(path: str) -> sqlite3.Connection:
    # One event-loop thread uses it at a time; it may be made on another (tests).
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.executescript(SCHEMA)
    if db.execute("select count(*) from article").fetchone()[0] == 0:
        db.executemany("insert into article (title, body) values (?, ?)", SEED)
    return db


# -- messages ----------------------------------------------------------------


@dataclass
class LoadArticle:
    id: int


@dataclass
class Comment:
    id: int  # the page shows each comment once, by id, in id order
    author: str
    body: str


@dataclass
class ArticleView:
    id: int
    title: str
    body: str
    comments: list[Comment]


@dataclass
class CheckComment:
    author: str
    body: str


@dataclass
class ToggleFavorite: ...


@dataclass
class AddComment:
    author: str
    body: str


@dataclass
class SetName:
    name: str


@dataclass
class Announce:
    text: str


@dataclass
class LoadAnnouncements: ...


@dataclass
class Joined:  # to the new connection, from server_init
    favorites: int
    mine: bool
    name: str


@dataclass
class FavoriteCount:  # to everyone on the article
    favorites: int


@dataclass
class FavoriteState:  # only to the visitor who clicked
    mine: bool


@dataclass
class CommentAdded:  # to everyone on the article
    comment: Comment


@dataclass
class Notice:  # to every tab of the visitor's browser
    text: str


@dataclass
class Announcement:  # to every connection of the app
    id: int
    text: str


@dataclass
class Tick:  # from the clock task, to everyone
    time: str


@dataclass
class Favorites:  # to the home pages, through the "home" topic
    article_id: int
    count: int


@dataclass
class Readers:  # to a home page, from its server_event: how many people have the article open
    article_id: int
    count: int


@dataclass
class Renamed:  # a server event, to every tab of a session: never sent by a browser
    name: str


@dataclass
class YourName:  # to one tab, from its server_event
    name: str


@dataclass
class Reader:  # presence: what the others see of a reader
    name: str


@dataclass
class ArticleModel:
    article_id: int
    title: str
    name: str


ArticleToServer = ToggleFavorite | AddComment | SetName | Announce
# Favorites is published to the home topic: a page declares every type its handlers push.
ArticleToClient = (
    Joined | YourName | FavoriteCount | FavoriteState | CommentAdded | Notice | Announcement | Tick | Favorites
)
HomeToClient = Favorites | Readers | Announcement | Tick
# The home page's model: for each article, who has it open (connection id -> the session's tag).
HomeModel = dict[int, dict[int, str]]


def comment_errors(author: str, body: str) -> dict[str, str]:
    errors = {}
    if not author.strip():
        errors["author"] = "Please give a name."
    elif len(author) > 40:
        errors["author"] = "At most 40 characters."
    if len(body.strip()) < 3:
        errors["body"] = "Say a little more (3 characters at least)."
    elif len(body) > 1000:
        errors["body"] = "At most 1000 characters."
    return errors


# -- pages -------------------------------------------------------------------


class Home:
    def view(server_context: rally.ServerContext) -> str:
        db: sqlite3.Connection = server_context.state
        items = "".join(
            f'<li><a href="/articles/{id}">{escape(title)}</a> <span class="stats" id="stats-{id}">'
            f'★ <span id="favorites-{id}">{favorites(db, id, "")[0]}</span> · '
            f'<span id="readers-{id}">{people(readers_of(server_context, id))}</span> reading now</span></li>'
            for id, title in db.execute("select id, title from article order by id")
        )
        body = (
            f"<section class='box'><h1>Articles</h1><ul class='articles'>{items}</ul>"
            "<p class='how'>Counts change live. Favourites: article pages publish to the <b>home</b> topic "
            "(broadcast_to_topic). Readers: this page <b>watches the presence</b> of every article "
            "(watch_presence) and counts them in its model from each <b>PresenceChanged</b> "
            "(server_event).</p></section>"
        )
        return layout("Articles", body, HOME_JS)

    def server_load_announcements(msg: LoadAnnouncements, server_context: rally.ServerContext) -> list[Announcement]:
        """The latest announcements, oldest first (every page shows them)."""
        db: sqlite3.Connection = server_context.state
        rows = db.execute("select id, text from announcement order by id desc limit ?", (ANNOUNCEMENTS_SHOWN,))
        return [Announcement(id, text) for id, text in reversed(rows.fetchall())]

    def server_init(server_context: rally.ServerContext) -> tuple[HomeModel, rally.Effect[HomeToClient]]:
        # Who is on each article now, in every process; from here on, each change
        # comes as a PresenceChanged. Keeping who (not how many) makes a change
        # that is already in this list harmless when it arrives.
        db: sqlite3.Connection = server_context.state
        model = {id: readers_of(server_context, id) for (id,) in db.execute("select id from article")}
        return model, rally.effect.batch(
            rally.effect.subscribe(HOME_TOPIC),
            rally.effect.watch_presence(ARTICLE_ROUTE),
            *(rally.effect.send_to_client(Favorites(id, favorites(db, id, "")[0])) for id in model),
            *(rally.effect.send_to_client(Readers(id, people(readers))) for id, readers in model.items()),
        )

    def server_event(model: HomeModel, msg: rally.PresenceChanged) -> tuple[HomeModel, rally.Effect[HomeToClient]]:
        article_id = int(msg.page.rsplit("/", 1)[1])
        readers = model.get(article_id)
        if readers is None or msg.page != f"/articles/{article_id}":  # not listed here: /articles/99, /articles/01
            return model, rally.effect.none()
        readers.update((p.id, p.tag) for p in msg.joins)
        for p in msg.leaves:
            readers.pop(p.id, None)
        return model, rally.effect.send_to_client(Readers(article_id, people(readers)))

    def server_update(
        model: HomeModel, msg: Announce, server_context: rally.ServerContext
    ) -> tuple[HomeModel, rally.Effect[HomeToClient]]:
        return model, rally.effect.broadcast_to_app(announcement(server_context.state, msg.text))


class ArticlePage:
    def view(id: int, server_context: rally.ServerContext) -> str | rally.Response:
        db: sqlite3.Connection = server_context.state
        if db.execute("select 1 from article where id = ?", (id,)).fetchone() is None:
            body = f"<section class='box'><h1>Not found</h1><p>There is no article {id}.</p></section>"
            return rally.Response(layout("Not found", body, live=False), status=404)
        return layout("Article", ARTICLE_HTML, ARTICLE_JS)

    def server_load_article(msg: LoadArticle, server_context: rally.ServerContext) -> rally.Result[ArticleView, str]:
        db: sqlite3.Connection = server_context.state
        row = db.execute("select id, title, body from article where id = ?", (msg.id,)).fetchone()
        if row is None:
            return rally.Error(f"There is no article {msg.id}.")
        comments = [
            Comment(*c)
            for c in db.execute("select id, author, body from comment where article_id = ? order by id", (msg.id,))
        ]
        return rally.Ok(ArticleView(row[0], row[1], row[2], comments))

    def server_check_comment(msg: CheckComment) -> rally.Result[None, dict[str, str]]:
        errors = comment_errors(msg.author, msg.body)
        return rally.Error(errors) if errors else rally.Ok(None)

    def server_init(id: int, server_context: rally.ServerContext) -> tuple[ArticleModel, rally.Effect[ArticleToClient]]:
        db: sqlite3.Connection = server_context.state
        session = server_context.session_id
        row = db.execute("select title from article where id = ?", (id,)).fetchone()
        name_row = db.execute("select name from reader where session_id = ?", (session,)).fetchone()
        model = ArticleModel(id, row[0] if row else "", name_row[0] if name_row else "")
        count, mine = favorites(db, id, session)
        return model, rally.effect.send_to_client(Joined(count, mine, model.name))

    def server_update(
        model: ArticleModel, msg: ArticleToServer, server_context: rally.ServerContext
    ) -> tuple[ArticleModel, rally.Effect[ArticleToClient]]:
        db: sqlite3.Connection = server_context.state
        session = server_context.session_id
        if not model.title and not isinstance(msg, Announce):  # no such article: nothing is saved for it
            return model, rally.effect.send_to_client(Notice("There is no such article."))
        match msg:
            case ToggleFavorite():
                key = (model.article_id, session)
                if db.execute("delete from favorite where article_id = ? and session_id = ?", key).rowcount == 0:
                    db.execute("insert into favorite values (?, ?)", key)
                count, mine = favorites(db, model.article_id, session)
                verb = "favourited" if mine else "unfavourited"
                return model, rally.effect.batch(
                    rally.effect.broadcast_to_session(Notice(f"You {verb} “{model.title}”.")),
                    rally.effect.send_to_client(FavoriteState(mine)),
                    rally.effect.broadcast_to_page(FavoriteCount(count)),
                    rally.effect.broadcast_to_topic(HOME_TOPIC, Favorites(model.article_id, count)),
                )
            case AddComment(author, body):
                if comment_errors(author, body):  # the client checked; the server decides
                    return model, rally.effect.send_to_client(Notice("That comment was not saved."))
                row = db.execute("insert into comment (article_id, author, body) values (?, ?, ?)",
                                 (model.article_id, author.strip(), body.strip()))  # fmt: skip
                comment = Comment(row.lastrowid or 0, author.strip(), body.strip())
                return model, rally.effect.broadcast_to_page(CommentAdded(comment))
            case SetName(name):
                name = name.strip()[:40]
                db.execute("insert or replace into reader values (?, ?)", (session, name))
                # Every tab of this browser takes the new name into its model (server_event).
                return model, rally.effect.broadcast_to_session(Renamed(name))
            case Announce(text):
                return model, rally.effect.broadcast_to_app(announcement(db, text))

    def server_event(model: ArticleModel, msg: Renamed) -> tuple[ArticleModel, rally.Effect[ArticleToClient]]:
        # The new model's server_presence is what the other readers see now.
        return ArticleModel(model.article_id, model.title, msg.name), rally.effect.send_to_client(YourName(msg.name))

    def server_presence(model: ArticleModel) -> Reader:
        return Reader(model.name)


def announcement(db: sqlite3.Connection, text: str) -> Announcement:
    """A new announcement, kept: a page that was away when it was pushed loads it."""
    text = text[:200]
    row = db.execute("insert into announcement (text) values (?)", (text,))
    return Announcement(row.lastrowid or 0, text)


def readers_of(server_context: rally.ServerContext, article_id: int) -> dict[int, str]:
    """Who has the article open now, in every process: connection id -> the session's tag."""
    return {p.id: p.tag for p in server_context.presence(f"/articles/{article_id}")}


def people(readers: dict[int, str]) -> int:
    return len(set(readers.values()))  # one person's tabs share a tag


def favorites(db: sqlite3.Connection, article_id: int, session_id: str) -> tuple[int, bool]:
    count = db.execute("select count(*) from favorite where article_id = ?", (article_id,)).fetchone()[0]
    mine = db.execute("select 1 from favorite where article_id = ? and session_id = ?", (article_id, session_id))
    return count, mine.fetchone() is not None


def make_app(db_path: str, *, clock: bool = True) -> rally.App:
    """The demo app; its lifespan opens the database and runs the clock."""

    @contextlib.asynccontextmanager
    async def lifespan(app: rally.App) -> AsyncIterator[None]:
        app.state = open_db(db_path)
        ticking = asyncio.create_task(tick(app)) if clock else None
        try:
            yield
        finally:
            if ticking is not None:
                ticking.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticking
            app.state.close()

    app = rally.App(lifespan=lifespan)
    app.page("/", Home)
    app.page(ARTICLE_ROUTE, ArticlePage)
    return app


async def tick(app: rally.App) -> None:
    """A push from outside any handler: the time, to every open page."""
    while True:
        await app.broadcast_to_app(Tick(datetime.datetime.now().strftime("%H:%M:%S")))
        await asyncio.sleep(1)


app = make_app(os.environ.get("RALLY_DEMO_DB", "demo.sqlite3"))  # for ``python rally.py demo:app``


# -- HTML --------------------------------------------------------------------


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def layout(title: str, body: str, script: str = "", *, live: bool = True) -> str:
    """The page around ``body``, then the common script and the page's
    ``script``; ``live=False`` for a page without the client (a 404)."""
    live_parts = f"{ANNOUNCE_HTML}</main><script>{COMMON_JS}</script>" if live else "</main>"
    if script:
        live_parts += f"<script>{script}</script>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<link rel="icon" href="data:,">
<title>{escape(title)} · rally.py demo</title><style>{CSS}</style></head>
<body><header><a href="/">rally.py demo</a><span id="status">{"connecting" if live else ""}</span>
<span id="clock" title="app.broadcast_to_app from a task of the lifespan"></span></header>
<main><div id="notices" aria-live="polite"></div>{body}
{live_parts}</body></html>"""


ANNOUNCE_HTML = """<section class="box"><h2>Announce to everyone</h2>
<form id="announce"><input name="text" maxlength="200" placeholder="Hello, everyone" required>
<button>Announce</button><div class="error" id="announce-error"></div></form>
<p class="how">send → server_update → <b>broadcast_to_app</b>: every tab of every browser, on every page.</p>
<ul id="announcements"></ul></section>"""


CSS = """
body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2230; }
header { display: flex; gap: 1rem; align-items: center; padding: .6rem 1.5rem; background: #1d2230; color: #fff; }
header a { color: #fff; font-weight: 600; text-decoration: none; margin-right: auto; }
#status:empty { display: none; }
#status { font-size: .8rem; padding: .1rem .5rem; border-radius: 1rem; background: #b23; }
#status.open { background: #2a7; } #status.connecting, #status.reconnecting { background: #b80; }
#clock { font-variant-numeric: tabular-nums; opacity: .8; }
main { max-width: 42rem; margin: 1.5rem auto; padding: 0 1rem; }
.box { background: #fff; border: 1px solid #dde1e8; border-radius: .5rem; padding: 1rem 1.25rem; margin: 1rem 0; }
h1 { margin: .2rem 0 .8rem; } h2 { font-size: 1rem; margin: 0 0 .6rem; }
.articles li { margin: .3rem 0; } .stats { color: #667; font-size: .9rem; margin-left: .4rem; }
input, textarea { font: inherit; width: 100%; box-sizing: border-box; padding: .4rem; border: 1px solid #c5cad3;
  border-radius: .3rem; }
textarea { min-height: 4rem; }
button { font: inherit; padding: .35rem .9rem; border: 0; border-radius: .3rem; background: #2457c5; color: #fff;
  cursor: pointer; margin-top: .4rem; }
.fav.mine { background: #c52457; }
.error { color: #b23; font-size: .85rem; min-height: 1.2em; }
.comments li { margin: .5rem 0; } .comments b { margin-right: .4rem; }
.readers { display: flex; flex-wrap: wrap; gap: .4rem; padding: 0; list-style: none; }
.readers li { background: #eef1f6; border-radius: 1rem; padding: .1rem .7rem; }
.readers li.me { background: #dfe9ff; }
.count { background: #2457c5; color: #fff; border-radius: 1rem; padding: 0 .55rem; font-size: .85rem; }
.count:empty { display: none; }
.row { display: flex; gap: .6rem; align-items: center; } .row label { white-space: nowrap; }
.row button { margin-top: 0; }
.how { color: #667; font-size: .8rem; margin: .4rem 0 0; } .how b { font-weight: 600; color: #445; }
#notices { display: grid; gap: .5rem; }
.notice { background: #1d2230; color: #fff; padding: .5rem .9rem; border-radius: .4rem; }
"""

COMMON_JS = """
// tsc checks these scripts against GET /_rally/types.d.ts (test_types.py).
/** An element of this page (any: these scripts check rally's calls, not the DOM's). @type {(s: string) => any} */
const $ = (s) => document.querySelector(s);
/** When the form is submitted, call fn with its elements, one call at a time. What the user typed
 * stays until fn's Promise resolved (fn clears it then); if it rejects, the text stays and the
 * error shows in the form's "#<id>-error" line. @type {(s: string, fn: (f: any) => Promise<void>) => void} */
const onSubmit = (s, fn) => $(s).addEventListener('submit', (/** @type {Event} */ e) => {
  e.preventDefault();
  const form = $(s), error = $(s + '-error');
  if (form.dataset.busy) return;  // the last submit is still on its way
  form.dataset.busy = 'yes'; error.textContent = '';
  fn(form.elements)
    .catch((/** @type {Error} */ err) => { error.textContent = 'Not sent: ' + err.message.replace(/^rally: /, ''); })
    .finally(() => { delete form.dataset.busy; });
});
/** Empty an input, unless the user typed on since its text was sent. @type {(input: any, sent: string) => void} */
const clear = (input, sent) => { if (input.value === sent) input.value = ''; };
/** A new element with text. @type {(tag: string, text: string) => HTMLElement} */
const element = (tag, text) => { const e = document.createElement(tag); e.textContent = text; return e; };
/** Run load now if the page is open, and after every connection that did not resume: the first
 * one, and one after the server forgot this page (a restart, a long outage, a sleeping tab). A
 * resumed connection got every push it missed, so nothing is loaded again then.
 * @type {(load: () => void) => void} */
const onFresh = (load) => rally.onStatus((...change) => { if (change[0] === 'open' && !change[1].resumed) load(); });
rally.onStatus((s) => { $('#status').textContent = s; $('#status').className = s; });
rally.on('Tick', (m) => { $('#clock').textContent = m.time; });
/** @type {Map<number, HTMLElement>} */
const announcements = new Map();  // by id: each one shown once, newest first, however it arrived
/** @type {(a: Rally.Announcement) => void} */
const announcement = (a) => {
  if (announcements.has(a.id)) return;
  announcements.set(a.id, element('li', a.text));
  $('#announcements').replaceChildren(...[...announcements].sort((x, y) => y[0] - x[0]).map((e) => e[1]));
};
rally.on('Announcement', announcement);
onFresh(() => rally.rpc('LoadAnnouncements').then((r) => { if (r.ok) r.value.forEach(announcement); }));
rally.on('Notice', (m) => {
  const div = element('div', m.text); div.className = 'notice';
  $('#notices').append(div); setTimeout(() => div.remove(), 4000);
});
onSubmit('#announce', async (f) => {
  const text = f.text.value;
  await rally.send('Announce', {text});
  clear(f.text, text);
});
"""

# The counts of the home page: server_init sends them all on every fresh
# connection, and each change after.
HOME_JS = """
rally.on('Favorites', (m) => { $('#favorites-' + m.article_id).textContent = m.count; });
rally.on('Readers', (m) => { $('#readers-' + m.article_id).textContent = m.count; });
"""

ARTICLE_HTML = """
<article class="box"><h1 id="title">Loading…</h1><p id="body"></p>
<button class="fav" id="fav">☆ Favourite</button> <span id="favorites">0</span>
<span id="favorites-word">favourites</span> · connected <span id="connections">0</span>×
<p class="how">Loaded by <b>RPC</b>. The button: send → server_update → <b>send_to_client</b> (its star),
<b>broadcast_to_session</b> (a notice in each of your tabs), <b>broadcast_to_page</b> (the count here) and
<b>broadcast_to_topic</b> (the home page).</p></article>
<section class="box"><h2>Reading now <span class="count" id="reading"></span></h2>
<ul class="readers" id="readers"></ul>
<form id="name-form"><div class="row"><label for="your-name">Your name</label>
<input id="your-name" name="name" maxlength="40" placeholder="as the others see it"><button>Rename</button></div>
<div class="error" id="name-form-error"></div></form>
<p class="how"><b>Presence</b>: server_presence(model) → Reader; one entry per tab, grouped by its session's tag.
Your name: send → server_update → <b>broadcast_to_session</b>(Renamed), a <b>server event</b>: each of your tabs
takes it into its model (server_event), shows it, and the others see its new Reader.</p></section>
<section class="box"><h2>Comments</h2><ul class="comments" id="comments"></ul>
<form id="comment-form" novalidate>
<input name="author" placeholder="Your name"><div class="error" id="author-error"></div>
<textarea name="body" placeholder="Your comment"></textarea><div class="error" id="body-error"></div>
<button>Add comment</button><div class="error" id="comment-form-error"></div></form>
<p class="how">Checked by <b>RPC</b> (field errors), then send → <b>broadcast_to_page</b>.</p></section>
"""

ARTICLE_JS = """
/** @type {Map<number, HTMLElement>} */
const comments = new Map();  // by id: each comment shown once, in id order, from the load or a push
/** @type {(c: Rally.Comment) => void} */
const show = (c) => {
  if (comments.has(c.id)) return;
  const li = element('li', c.body); li.prepend(element('b', c.author)); comments.set(c.id, li);
  $('#comments').replaceChildren(...[...comments].sort((x, y) => x[0] - y[0]).map((e) => e[1]));
};
// Loaded on the first connection and again after one that did not resume: the
// comments written while this page was away come with the answer, and those
// it has already are not shown twice.
onFresh(() => rally.rpc('LoadArticle', {id: rally.params.id}).then((r) => {
  if (!r.ok) { $('#title').textContent = r.error; return; }
  $('#title').textContent = r.value.title;
  $('#body').textContent = r.value.body;
  r.value.comments.forEach(show);
}));
let connections = 0;
/** @type {(n: number) => void} */
const count = (n) => {
  $('#favorites').textContent = n; $('#favorites-word').textContent = n === 1 ? 'favourite' : 'favourites';
};
/** @type {(m: boolean) => void} */
const mine = (m) => {
  $('#fav').classList.toggle('mine', m); $('#fav').textContent = m ? '★ Favourite' : '☆ Favourite';
};
const author = $('#comment-form [name=author]'), nameInput = $('#name-form [name=name]');
let myName = '';  // the name shown in the field, unless the user is editing it there
/** @type {(name: string) => void} */
const showName = (name) => {
  if (nameInput.value === myName) nameInput.value = name;
  myName = name; author.value = author.value || name;
};
// server_init runs on every fresh connection: Joined brings the count, the star and the name again.
rally.on('Joined', (m) => { $('#connections').textContent = ++connections; count(m.favorites); mine(m.mine);
  showName(m.name); });
rally.on('FavoriteCount', (m) => count(m.favorites));
rally.on('FavoriteState', (m) => mine(m.mine));
rally.on('CommentAdded', (m) => show(m.comment));
// A rename in any tab of this browser (this one too) comes to each of them.
rally.on('YourName', (m) => showName(m.name));
rally.onPresence((entries) => {
  /** @type {Map<string, {names: string[], tabs: number, me: boolean}>} */
  const people = new Map();  // one person's tabs share a tag
  entries.forEach((e) => { const p = people.get(e.tag) || {names: [], tabs: 0, me: false};
    p.tabs++; p.me = p.me || e.self; if (e.meta.name) p.names.push(e.meta.name); people.set(e.tag, p); });
  $('#reading').textContent = people.size;
  $('#readers').replaceChildren(...[...people.values()].map((p) => {
    const tabs = p.tabs > 1 ? ' (' + p.tabs + ' tabs)' : '';
    const li = element('li', (p.names[0] || 'Someone') + tabs + (p.me ? ' · you' : ''));
    li.className = p.me ? 'me' : ''; return li; }));
});
onSubmit('#name-form', (f) => rally.send('SetName', {name: f.name.value}));
$('#fav').addEventListener('click', () => rally.send('ToggleFavorite', {}));
onSubmit('#comment-form', async (f) => {
  const fields = {author: f.author.value, body: f.body.value};
  const r = await rally.rpc('CheckComment', fields);
  $('#author-error').textContent = r.ok ? '' : (r.error.author || '');
  $('#body-error').textContent = r.ok ? '' : (r.error.body || '');
  if (!r.ok) return;
  await rally.send('AddComment', fields);
  clear(f.body, fields.body);
});
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="rally.py demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", default=os.environ.get("RALLY_DEMO_DB", "demo.sqlite3"))
    args = parser.parse_args()
    make_app(args.db).run(args.host, args.port)
