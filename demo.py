"""rally.py demo: articles with live favourites, comments and a clock.

Run ``python demo.py`` and open http://127.0.0.1:8000 in two browsers. Data
lives in SQLite (``--db``, default ``demo.sqlite3``), created on first run.

Every part of rally.py is in use: RPC (``LoadArticle``, ``CheckComment``
with field errors), stateful pages (``server_init`` keeps the article id in
the model), the four delivery scopes, and a push from outside any handler
(the clock).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import signal
import sqlite3
from dataclasses import dataclass

import rally

SCHEMA = """
create table if not exists article (id integer primary key, title text not null, body text not null);
create table if not exists comment (id integer primary key, article_id integer not null,
                                    author text not null, body text not null);
create table if not exists favorite (article_id integer not null, session_id text not null,
                                     primary key (article_id, session_id));
"""
SEED = [
    ("Typed RPC without a schema", "The type hints of a Python function are the whole contract."),
    ("One socket, four audiences", "A push reaches this tab, this browser, this page, or everyone."),
    ("Slow readers are not your problem", "Each connection has a bounded buffer; laggards are dropped."),
]


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
class Announce:
    text: str


@dataclass
class Joined:  # to the new connection, from server_init
    favorites: int
    mine: bool


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
    text: str


@dataclass
class Tick:  # from the clock task, to everyone
    time: str


@dataclass
class ArticleModel:
    article_id: int
    title: str


ArticleToServer = ToggleFavorite | AddComment | Announce
ArticleToClient = Joined | FavoriteCount | FavoriteState | CommentAdded | Notice | Announcement | Tick


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
            f'<li><a href="/articles/{id}">{escape(title)}</a></li>'
            for id, title in db.execute("select id, title from article order by id")
        )
        return layout("Articles", f"<h1>Articles</h1><ul class='articles'>{items}</ul>")

    def server_init(server_context: rally.ServerContext) -> tuple[None, rally.Effect[Announcement | Tick]]:
        return None, rally.effect.none()

    def server_update(model: None, msg: Announce) -> tuple[None, rally.Effect[Announcement | Tick]]:
        return model, rally.effect.broadcast_to_app(Announcement(msg.text[:200]))


class ArticlePage:
    def view(id: int) -> str:
        return layout("Article", ARTICLE_HTML)

    def server_load_article(msg: LoadArticle, server_context: rally.ServerContext) -> rally.Result[ArticleView, str]:
        db: sqlite3.Connection = server_context.state
        row = db.execute("select id, title, body from article where id = ?", (msg.id,)).fetchone()
        if row is None:
            return rally.Error(f"There is no article {msg.id}.")
        comments = [
            Comment(a, b)
            for a, b in db.execute("select author, body from comment where article_id = ? order by id", (msg.id,))
        ]
        return rally.Ok(ArticleView(row[0], row[1], row[2], comments))

    def server_check_comment(msg: CheckComment) -> rally.Result[None, dict[str, str]]:
        errors = comment_errors(msg.author, msg.body)
        return rally.Error(errors) if errors else rally.Ok(None)

    def server_init(id: int, server_context: rally.ServerContext) -> tuple[ArticleModel, rally.Effect[ArticleToClient]]:
        db: sqlite3.Connection = server_context.state
        row = db.execute("select title from article where id = ?", (id,)).fetchone()
        title = row[0] if row else "(missing)"
        return ArticleModel(id, title), rally.effect.send_to_client(
            Joined(*favorites(db, id, server_context.session_id))
        )

    def server_update(
        model: ArticleModel, msg: ArticleToServer, server_context: rally.ServerContext
    ) -> tuple[ArticleModel, rally.Effect[ArticleToClient]]:
        db: sqlite3.Connection = server_context.state
        session = server_context.session_id
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
                )
            case AddComment(author, body):
                if comment_errors(author, body):  # the client checked; the server decides
                    return model, rally.effect.send_to_client(Notice("That comment was not saved."))
                db.execute("insert into comment (article_id, author, body) values (?, ?, ?)",
                           (model.article_id, author.strip(), body.strip()))  # fmt: skip
                return model, rally.effect.broadcast_to_page(CommentAdded(Comment(author.strip(), body.strip())))
            case Announce(text):
                return model, rally.effect.broadcast_to_app(Announcement(text[:200]))


def favorites(db: sqlite3.Connection, article_id: int, session_id: str) -> tuple[int, bool]:
    count = db.execute("select count(*) from favorite where article_id = ?", (article_id,)).fetchone()[0]
    mine = db.execute("select 1 from favorite where article_id = ? and session_id = ?", (article_id, session_id))
    return count, mine.fetchone() is not None


def make_app(db_path: str) -> rally.App:
    app = rally.App(state=open_db(db_path))
    app.page("/", Home)
    app.page("/articles/{id}", ArticlePage)
    return app


async def clock(app: rally.App) -> None:
    """A push from outside any handler: the time, to every open page."""
    while True:
        await app.broadcast_to_app(Tick(datetime.datetime.now().strftime("%H:%M:%S")))
        await asyncio.sleep(1)


async def main(host: str, port: int, db_path: str) -> None:
    app = make_app(db_path)
    server = await app.start(host, port)
    print(f"rally.py demo on {server.url} (data in {db_path}; Ctrl-C stops)", flush=True)
    ticking = asyncio.create_task(clock(app))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    ticking.cancel()
    await server.close()  # pages get 1001 and reconnect to the next server


# -- HTML --------------------------------------------------------------------


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def layout(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<link rel="icon" href="data:,">
<title>{escape(title)} · rally.py demo</title><style>{CSS}</style></head>
<body><header><a href="/">rally.py demo</a><span id="status">connecting</span><span id="clock"></span></header>
<main>{body}
<section class="box"><h2>Announce to everyone</h2>
<form id="announce"><input name="text" maxlength="200" placeholder="Hello, everyone" required>
<button>Announce</button></form><ul id="announcements"></ul></section></main>
<div id="notices"></div>
<script>{COMMON_JS}</script></body></html>"""


CSS = """
body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2230; }
header { display: flex; gap: 1rem; align-items: center; padding: .6rem 1.5rem; background: #1d2230; color: #fff; }
header a { color: #fff; font-weight: 600; text-decoration: none; margin-right: auto; }
#status { font-size: .8rem; padding: .1rem .5rem; border-radius: 1rem; background: #b23; }
#status.open { background: #2a7; }
#clock { font-variant-numeric: tabular-nums; opacity: .8; }
main { max-width: 42rem; margin: 1.5rem auto; padding: 0 1rem; }
.box { background: #fff; border: 1px solid #dde1e8; border-radius: .5rem; padding: 1rem 1.25rem; margin: 1rem 0; }
h1 { margin: .2rem 0 .8rem; } h2 { font-size: 1rem; margin: 0 0 .6rem; }
.articles li { margin: .3rem 0; }
input, textarea { font: inherit; width: 100%; box-sizing: border-box; padding: .4rem; border: 1px solid #c5cad3;
  border-radius: .3rem; }
textarea { min-height: 4rem; }
button { font: inherit; padding: .35rem .9rem; border: 0; border-radius: .3rem; background: #2457c5; color: #fff;
  cursor: pointer; margin-top: .4rem; }
.fav.mine { background: #c52457; }
.error { color: #b23; font-size: .85rem; min-height: 1.2em; }
.comments li { margin: .5rem 0; } .comments b { margin-right: .4rem; }
#notices { position: fixed; right: 1rem; bottom: 1rem; display: grid; gap: .5rem; }
.notice { background: #1d2230; color: #fff; padding: .5rem .9rem; border-radius: .4rem; }
"""

COMMON_JS = """
const $ = (s) => document.querySelector(s);
rally.onStatus((s) => { $('#status').textContent = s; $('#status').className = s; });
rally.on('Tick', (m) => { $('#clock').textContent = m.time; });
rally.on('Announcement', (m) => {
  const li = document.createElement('li'); li.textContent = m.text; $('#announcements').prepend(li);
});
rally.on('Notice', (m) => {
  const div = document.createElement('div'); div.className = 'notice'; div.textContent = m.text;
  $('#notices').append(div); setTimeout(() => div.remove(), 4000);
});
$('#announce').addEventListener('submit', (e) => {
  e.preventDefault(); const input = e.target.elements.text;
  rally.send('Announce', {text: input.value}); input.value = '';
});
"""

ARTICLE_HTML = """
<article class="box"><h1 id="title">Loading…</h1><p id="body"></p>
<button class="fav" id="fav">☆ Favourite</button> <span id="favorites">0</span> favourites
· connected <span id="connections">0</span>×</article>
<section class="box"><h2>Comments</h2><ul class="comments" id="comments"></ul>
<form id="comment-form" novalidate>
<input name="author" placeholder="Your name"><div class="error" id="author-error"></div>
<textarea name="body" placeholder="Your comment"></textarea><div class="error" id="body-error"></div>
<button>Add comment</button></form></section>
<script>
const show = (c) => { const li = document.createElement('li'); const b = document.createElement('b');
  b.textContent = c.author; li.append(b, c.body); document.getElementById('comments').append(li); };
rally.rpc('LoadArticle', {id: rally.params.id}).then((r) => {
  if (!r.ok) { document.getElementById('title').textContent = r.error; return; }
  document.getElementById('title').textContent = r.value.title;
  document.getElementById('body').textContent = r.value.body;
  r.value.comments.forEach(show);
});
let connections = 0;
const mine = (m) => { const b = document.getElementById('fav');
  b.classList.toggle('mine', m); b.textContent = m ? '★ Favourite' : '☆ Favourite'; };
rally.on('Joined', (m) => { document.getElementById('connections').textContent = ++connections;
  document.getElementById('favorites').textContent = m.favorites; mine(m.mine); });
rally.on('FavoriteCount', (m) => { document.getElementById('favorites').textContent = m.favorites; });
rally.on('FavoriteState', (m) => mine(m.mine));
rally.on('CommentAdded', (m) => show(m.comment));
document.getElementById('fav').addEventListener('click', () => rally.send('ToggleFavorite', {}));
document.getElementById('comment-form').addEventListener('submit', async (e) => {
  e.preventDefault(); const f = e.target.elements;
  const fields = {author: f.author.value, body: f.body.value};
  const r = await rally.rpc('CheckComment', fields);
  document.getElementById('author-error').textContent = r.ok ? '' : (r.error.author || '');
  document.getElementById('body-error').textContent = r.ok ? '' : (r.error.body || '');
  if (r.ok) { rally.send('AddComment', fields); f.body.value = ''; }
});
</script>
"""


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="rally.py demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--db", default=os.environ.get("RALLY_DEMO_DB", "demo.sqlite3"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main(args.host, args.port, args.db))
