"""Typed browser code: the TypeScript declarations of ``/_rally/types.d.ts``
checked by the real TypeScript compiler, and the ``/_rally/docs`` page.

The declaration tests run ``tsc`` (npm's ``typescript``: ``npm install
typescript`` in this directory or a parent, found as ``node_modules/.bin/tsc``,
or ``npm install -g typescript``, found on PATH) on plain JavaScript files
under ``// @ts-check``: one of correct calls must pass, each file with one
mistake must fail with the expected diagnostic. The docs page test drives Debian's chromium with
Playwright, like test_browser.py. Without tsc, or chromium and Playwright,
those tests are skipped with the reason (``pytest -rs`` prints it); CI
installs all of them. Loopback only, port 0, a time bound on every wait.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import html
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

import demo
import rally
from test_rally import article_app

WAIT = 5.0  # seconds: the bound on any single wait in these tests


def find_tsc(start: Path, path: str | None = None) -> str | None:
    """The TypeScript compiler: ``node_modules/.bin/tsc`` in ``start`` or
    the nearest of its parents that has one (``npm install typescript``
    there), else ``tsc`` on ``path`` (the PATH by default)."""
    for directory in (start, *start.parents):
        local = directory / "node_modules" / ".bin" / "tsc"
        if local.is_file() and os.access(local, os.X_OK):
            return str(local)
    return shutil.which("tsc", path=path)


TSC = find_tsc(Path(__file__).resolve().parent)
needs_tsc = pytest.mark.skipif(
    TSC is None,
    reason="declaration tests need tsc, the TypeScript compiler, and found none: no node_modules/.bin/tsc in "
    f"{Path(__file__).resolve().parent} or its parents, and no tsc on PATH (npm install typescript, or -g)",
)
TSC_ARGS = ["--noEmit", "--checkJs", "--strict", "--target", "es2020", "--pretty", "false"]


def fake_tsc(directory: Path) -> Path:
    """An executable named tsc in ``directory`` that prints a version, as tsc -v does."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "tsc"
    script.write_text(f"#!{sys.executable}\nprint('Version 0.0.0-fake')\n")
    script.chmod(0o755)
    return script


def test_tsc_is_found_in_node_modules_of_the_project_or_a_parent_before_path(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "sub" / "dir").mkdir(parents=True)
    on_path = fake_tsc(tmp_path / "bin")
    assert find_tsc(project / "sub" / "dir", path=str(tmp_path / "bin")) == str(on_path)
    assert find_tsc(project / "sub" / "dir", path=str(tmp_path / "empty")) is None
    in_parent = fake_tsc(project / "node_modules" / ".bin")
    assert find_tsc(project / "sub" / "dir", path=str(tmp_path / "bin")) == str(in_parent)
    nearest = fake_tsc(project / "sub" / "node_modules" / ".bin")
    assert find_tsc(project / "sub" / "dir", path=str(tmp_path / "bin")) == str(nearest)
    assert find_tsc(project, path=str(tmp_path / "bin")) == str(in_parent)
    nearest.chmod(0o644)  # not executable: passed over
    assert find_tsc(project / "sub" / "dir", path=str(tmp_path / "empty")) == str(in_parent)
    found = find_tsc(project / "sub" / "dir")
    assert found is not None
    run = subprocess.run([found, "-v"], capture_output=True, text=True, timeout=WAIT)
    assert run.stdout == "Version 0.0.0-fake\n"


def fetch(server: rally.Server, path: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: its status, headers (lowercase names) and body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# ==== The test app: every kind of type, RPCs, a page with presence ==========


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.Enum):
    LOW = 1
    HIGH = 2


@dataclass
class Point:
    x: int
    y: float = 0.0


@dataclass
class Circle:
    center: Point
    radius: float


@dataclass
class Square:
    corner: Point
    side: float


HOSTILE = "</textarea></code><script>alert(1)</script> */ & \u2028"


@dataclass
class Draw:
    shape: Circle | Square
    color: Color
    mode: Literal["fill", "stroke"] = "fill"
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    span: tuple[int, str] = (0, "a")
    path: tuple[Point, ...] = ()
    note: str | None = None
    level: Level = Level.LOW
    when: datetime.date | None = None
    blob: bytes = b""
    label: str = HOSTILE
    odd: Literal["a | b", "*/", 3, True, None] = None


@dataclass
class Drawn:
    id: int
    shapes: list[Circle | Square | None]


@dataclass
class Ping: ...


@dataclass
class Node:
    name: str
    children: list[Node]


@dataclass
class Say:
    text: str


@dataclass
class Leave: ...


@dataclass
class Said:
    who: str
    text: str


@dataclass
class Left:
    who: str


@dataclass
class Who:
    name: str
    typing: bool = False


@dataclass
class Model:
    name: str


class Room:
    html = "<!doctype html><title>room</title><h1>room</h1>"

    def server_init(name: str) -> tuple[Model, rally.Effect[Said | Left]]:
        return Model(name), rally.effect.none()

    def server_update(model: Model, msg: Say | Leave) -> tuple[Model, rally.Effect[Said | Left]]:
        return model, rally.effect.none()

    def server_presence(model: Model) -> Who:
        return Who(model.name)


class Item:
    def view(id: int) -> str:
        return f"<!doctype html><title>item {id}</title>"


def make_app(**options: Any) -> rally.App:
    app = rally.App(**options)

    @app.rpc
    def server_draw(msg: Draw) -> rally.Result[Drawn, list[str]]:
        if msg.tags == ["fail"]:
            return rally.Error(["asked to fail"])
        return rally.Ok(Drawn(len(msg.tags), [msg.shape, None]))

    @app.rpc
    def server_ping(msg: Ping) -> None:
        return None

    @app.rpc
    def server_tree(msg: Node) -> Node:
        return msg

    app.page("/rooms/{name}", Room)
    app.page("/items/{id}", Item)
    return app


app = make_app()  # for the command line: python rally.py test_types:app --types FILE


# ==== Declarations: the generator's pieces ==================================


@pytest.mark.parametrize(
    ("name", "typescript"),
    [
        ("str", "string"),
        ("int", "number"),
        ("None", "null"),
        ("bytes", "string"),
        ("datetime | None", "string | null"),
        ("list[int]", "number[]"),
        ("list[Point | None]", "(Point | null)[]"),
        ("tuple[int, ...]", "number[]"),
        ("tuple[int, str, list[bool]]", "[number, string, boolean[]]"),
        ("dict[str, list[Point]]", "{ [key: string]: Point[] }"),
        ('Literal["a | b", 3, true, null]', '"a | b" | 3 | true | null'),
        ('list[Literal["x, y", "]"]]', '("x, y" | "]")[]'),
        ("Circle | Square", '{ type: "Circle"; fields: Circle } | { type: "Square"; fields: Square }'),
        (
            "list[Circle | Square | None] | None",
            '({ type: "Circle"; fields: Circle } | { type: "Square"; fields: Square } | null)[] | null',
        ),
        ("Point | None", "Point | null"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_contract_type_names_become_typescript(name: str, typescript: str) -> None:
    assert rally._ts(rally._parse_type(name), "") == typescript


@pytest.mark.parametrize("name", ["list[int", "list[int]]", "Literal[nope]", "int |"])
def test_a_malformed_type_name_is_a_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        rally._parse_type(name)


def test_declarations_are_made_from_the_contract_document() -> None:
    text = rally._typescript(app.contract)
    assert f"contract {app.contract['hash']}" in text
    assert "    /** default: " + json.dumps(HOSTILE).replace("*/", "*\\/") + " */" in text
    assert "    label?: string;" in text  # a field with a default may be left out
    assert "      params: { name: string };" in text
    assert "  const params: { readonly name: string; readonly id: number };" in text


# ==== Declarations checked by tsc ===========================================


def tsc(tmp_path: Path, declarations: str, scripts: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """Run tsc on the declarations and the scripts (name -> JavaScript, each
    checked with // @ts-check); returns each script's (code, message) list."""
    (tmp_path / "rally.d.ts").write_text(declarations)
    for name, source in scripts.items():
        (tmp_path / name).write_text("// @ts-check\n" + source)
    assert TSC is not None
    run = subprocess.run(
        [TSC, *TSC_ARGS, "rally.d.ts", *scripts], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    found: dict[str, list[tuple[str, str]]] = {name: [] for name in scripts}
    for m in re.finditer(r"^(\S+?)\(\d+,\d+\): error (TS\d+): (.*(?:\n[ \t]+.*)*)", run.stdout, re.M):
        found[m.group(1)].append((m.group(2), m.group(3)))
    assert sum(map(len, found.values())) == run.stdout.count(": error TS"), run.stdout + run.stderr
    assert (run.returncode == 0) == (not any(found.values())), run.stdout + run.stderr
    return found


CORRECT_CALLS = """
(async () => {
  const r = await rally.rpc("Draw", {
    shape: { type: "Circle", fields: { center: { x: 1 }, radius: 2 } }, color: "red",
  });
  if (r.ok) {
    r.value.shapes.forEach((s) => { if (s && s.type === "Square") console.log(s.fields.side * 2); });
    console.log(r.value.id + 1);
  } else {
    console.log(r.error.join(", "));
  }
  await rally.rpc("Draw", {
    shape: { type: "Square", fields: { corner: { x: 1, y: 2.5 }, side: 2 } }, color: "green", mode: "stroke",
    tags: ["a"], weights: { a: 1.5 }, span: [1, "b"], path: [{ x: 1 }], note: null, level: 2, when: "2026-01-01",
    blob: "AA==", label: "", odd: "a | b",
  });
  const p = await rally.rpc("Ping");
  if (p.ok) console.log(p.value === null, await rally.rpc("Ping", {}));
  const t = await rally.rpc("Node", { name: "a", children: [{ name: "b", children: [] }] });
  if (t.ok) console.log(t.value.children[0].name);
  await rally.send("Say", { text: "hi" });
  await rally.send("Leave");
  const off = rally.on("Said", (m, type) => { console.log(m.who, m.text.length, type === "Said"); });
  off();
  rally.on("Left", (m) => console.log(m.who));
  rally.onPresence((entries) => {
    entries.forEach((e) => console.log(e.id + 1, e.tag, e.self, e.meta.name, e.meta.typing));
  });
  rally.onStatus((status, info) => {
    if (status === "reconnecting" || (status === "open" && info && info.resumed)) console.log(status);
  });
  rally.onStatus((status, info) => { if (status === "closed") console.log(info.code === 4001, info.reason.length); });
  rally.onStatus((status) => console.log(status));
  rally.onError((e) => console.log(e.code, e.message, e.errors.map((x) => x.path + x.message)));
  console.log(rally.page, rally.params.id + 1, window.rally.params.name.length);
  /** @type {Rally.Point} */
  const point = { x: 1 };
  /** @type {rally.Pages["/rooms/{name}"]["toServer"]} */
  const msg = { type: "Say", fields: { text: "x" } };
  console.log(point, msg);
})();
"""

DRAW = '{ shape: { type: "Circle", fields: { center: { x: 1 }, radius: 2 } }, color: "red" }'
MISTAKES = {
    "wrong_rpc_type_name": (
        f'rally.rpc("Drow", {DRAW});',
        "TS2345",
        "Argument of type '\"Drow\"' is not assignable to parameter of type 'keyof Rpc'.",
    ),
    "wrong_send_type_name": (
        'rally.send("Said", { who: "a", text: "b" });',
        "TS2345",
        "Argument of type '\"Said\"' is not assignable to parameter of type 'keyof Send'.",
    ),
    "wrong_push_type_name": (
        'rally.on("Say", () => {});',
        "TS2345",
        "Argument of type '\"Say\"' is not assignable to parameter of type 'keyof Push'.",
    ),
    "missing_field": (
        'rally.rpc("Draw", { shape: { type: "Circle", fields: { center: { x: 1 }, radius: 2 } } });',
        "TS2741",
        "Property 'color' is missing in type",
    ),
    "missing_fields_argument": ('rally.send("Say");', "TS2554", "Expected 2 arguments, but got 1."),
    "wrong_field_type": (
        'rally.rpc("Draw", { shape: { type: "Circle", fields: { center: { x: "1" }, radius: 2 } }, color: "red" });',
        "TS2322",
        "Type 'string' is not assignable to type 'number'.",
    ),
    "unknown_field": (
        'rally.send("Say", { text: "x", txet: "y" });',
        "TS2353",
        "Object literal may only specify known properties, and 'txet' does not exist in type 'Say'.",
    ),
    "field_of_a_message_without_fields": ('rally.send("Leave", { x: 1 });', "TS2322", "not assignable to type 'never'"),
    "wrong_literal": (
        f'rally.rpc("Draw", {{ ...{DRAW}, mode: "both" }});',
        "TS2322",
        'Type \'"both"\' is not assignable to type \'"fill" | "stroke" | undefined\'.',
    ),
    "wrong_enum_value": (
        'rally.rpc("Draw", { shape: { type: "Circle", fields: { center: { x: 1 }, radius: 2 } }, color: "blue" });',
        "TS2322",
        "Type '\"blue\"' is not assignable to type 'Color'.",
    ),
    "wrong_union_member": (
        'rally.rpc("Draw", { shape: { type: "Oval", fields: { center: { x: 1 }, radius: 2 } }, color: "red" });',
        "TS2322",
        'Type \'"Oval"\' is not assignable to type \'"Circle" | "Square"\'.',
    ),
    "wrong_tuple": (f'rally.rpc("Draw", {{ ...{DRAW}, span: [1, 2] }});', "TS2322", "not assignable to type 'string'"),
    "unknown_push_field": (
        'rally.on("Said", (m) => console.log(m.author));',
        "TS2339",
        "Property 'author' does not exist on type 'Said'.",
    ),
    "unknown_result_field": (
        f'rally.rpc("Draw", {DRAW}).then((r) => {{ if (r.ok) console.log(r.value.shape); }});',
        "TS2551",
        "Property 'shape' does not exist on type 'Drawn'. Did you mean 'shapes'?",
    ),
    "result_read_without_checking_ok": (
        f'rally.rpc("Draw", {DRAW}).then((r) => console.log(r.value));',
        "TS2339",
        "Property 'value' does not exist on type",
    ),
    "error_of_an_rpc_that_cannot_fail": (
        'rally.rpc("Ping").then((r) => { if (!r.ok) console.log(r.error.length); });',
        "TS2339",
        "Property 'length' does not exist on type 'never'.",
    ),
    "unknown_presence_field": (
        "rally.onPresence((entries) => console.log(entries[0].meta.nmae));",
        "TS2339",
        "Property 'nmae' does not exist on type 'Who'.",
    ),
    "unknown_status": (
        'rally.onStatus((s) => { if (s === "opened") {} });',
        "TS2367",
        "This comparison appears to be unintentional",
    ),
    "closed_info_read_as_open": (
        'rally.onStatus((s, info) => { if (s === "closed") console.log(info.resumed); });',
        "TS2339",
        "Property 'resumed' does not exist on type '{ code: number; reason: string; }'.",
    ),
    "unknown_route_parameter": ("console.log(rally.params.slug);", "TS2339", "Property 'slug' does not exist"),
}


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, str]]]:
    """tsc's diagnostics for the correct calls and for each mistake, in one run."""
    scripts = {"correct.js": CORRECT_CALLS}
    scripts.update({f"{name}.js": f"(async () => {{ {code} }})();\n" for name, (code, _, _) in MISTAKES.items()})
    return tsc(tmp_path_factory.mktemp("tsc"), rally._typescript(app.contract), scripts)


@needs_tsc
def test_correct_calls_pass_tsc(checked: dict[str, list[tuple[str, str]]]) -> None:
    assert checked["correct.js"] == []


@needs_tsc
@pytest.mark.parametrize("name", list(MISTAKES))
def test_one_mistake_fails_tsc(checked: dict[str, list[tuple[str, str]]], name: str) -> None:
    _, code, message = MISTAKES[name]
    assert len(checked[f"{name}.js"]) == 1, checked[f"{name}.js"]
    assert checked[f"{name}.js"][0][0] == code
    assert message in checked[f"{name}.js"][0][1]


# The demo's inline JavaScript, checked against the demo's declarations with
# tsc --strict and nothing filtered: its element lookups are typed `any` in
# JSDoc, so what tsc checks is every call of rally.
def demo_declarations_and_scripts(tmp_path: Path) -> tuple[str, str]:
    """The demo's declarations, and every inline script of the pages it serves."""
    app = demo.make_app(str(tmp_path / "demo.sqlite3"))
    scripts: dict[str, None] = {}
    with app.run_in_thread(access_log=False) as server:
        for path in ("/", "/articles/1"):
            status, _, body = fetch(server, path)
            assert status == 200
            scripts.update(dict.fromkeys(re.findall(r"<script>(.*?)</script>", body.decode(), re.S)))
    return rally._typescript(app.contract), "\n".join(scripts)


def tsc_demo(tmp_path: Path, declarations: str, source: str) -> list[str]:
    """tsc's diagnostics of the demo's JavaScript against its declarations."""
    assert TSC is not None
    (tmp_path / "rally.d.ts").write_text(declarations)
    (tmp_path / "demo.js").write_text("// @ts-check\n" + source)
    run = subprocess.run(
        [TSC, *TSC_ARGS, "rally.d.ts", "demo.js"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    return run.stdout.splitlines()


@needs_tsc
def test_the_demos_javascript_passes_tsc_against_its_declarations(tmp_path: Path) -> None:
    declarations, source = demo_declarations_and_scripts(tmp_path)
    assert "rally.on('Tick'" in source and "rally.rpc('LoadArticle', {id: rally.params.id})" in source
    assert tsc_demo(tmp_path, declarations, source) == []
    # The same check finds a mistake in a rally call of the demo.
    broken = source.replace("{id: rally.params.id}", "{id: String(rally.params.id)}")
    assert [d.split(": error ")[1][:6] for d in tsc_demo(tmp_path, declarations, broken)] == ["TS2322"]


# The typed example of docs/contract.md, against the Article app of test_rally.py.


@needs_tsc
def test_readmes_example_passes_but_for_the_two_mistakes_it_shows(tmp_path: Path) -> None:
    contract_doc = (Path(__file__).parent / "docs" / "contract.md").read_text()
    example = re.search(r"## Typed browser code.*?```js\n// @ts-check\n.*?\n(.*?)```", contract_doc, re.S)
    assert example is not None
    article = article_app()
    lines = example.group(1).splitlines()
    marked = [line for line in lines if "// error" in line]
    found = tsc(
        tmp_path,
        rally._typescript(article.contract),
        {"right.js": "\n".join(line for line in lines if line not in marked), "mistakes.js": "\n".join(marked)},
    )
    assert found["right.js"] == []
    assert [code for code, _ in found["mistakes.js"]] == [re.findall(r"TS\d+", line)[0] for line in marked]


# ==== HTTP: /_rally/types.d.ts, /_rally/docs, the option, the CLI ===========


@pytest.fixture
def served() -> Iterator[rally.Server]:
    with app.run_in_thread(access_log=False) as server:
        yield server


def test_types_endpoint_serves_the_declarations_with_etag(served: rally.Server) -> None:
    status, headers, body = fetch(served, "/_rally/types.d.ts")
    assert (status, headers["content-type"]) == (200, "application/typescript; charset=utf-8")
    assert body.decode() == rally._typescript(app.contract)
    assert headers["cache-control"] == "no-cache"
    status, again, body = fetch(served, "/_rally/types.d.ts", **{"If-None-Match": headers["etag"]})
    assert (status, body, again["etag"]) == (304, b"", headers["etag"])
    assert fetch(served, "/_rally/types.d.ts", "HEAD")[0] == 200
    status, headers, _ = fetch(served, "/_rally/types.d.ts", "POST")
    assert (status, headers["allow"]) == (405, "GET, HEAD")


def test_docs_page_is_escaped_self_contained_and_cached(served: rally.Server) -> None:
    status, headers, body = fetch(served, "/_rally/docs")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    text = body.decode()
    assert HOSTILE not in text and "<script>alert(1)" not in text
    assert html.escape(json.dumps(HOSTILE)) in text  # the default in the table
    assert text.count("<script>") == 1 and not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    for name in app.contract["rpc"]:
        assert f'<form data-rpc="{name}">' in text
    assert "script-src 'sha256-" in headers["content-security-policy"]
    status, _, body = fetch(served, "/_rally/docs", **{"If-None-Match": headers["etag"]})
    assert (status, body) == (304, b"")


def test_docs_false_turns_the_page_off() -> None:
    with make_app(docs=False).run_in_thread(access_log=False) as server:
        assert fetch(server, "/_rally/docs")[0] == 404
        assert fetch(server, "/_rally/types.d.ts")[0] == 200


@pytest.mark.parametrize("value", [0, "no", None])
def test_docs_option_must_be_a_bool(value: object) -> None:
    with pytest.raises(rally.RegistrationError, match=r"App\(docs=.*\): expected True or False"):
        rally.App(docs=value)  # type: ignore[arg-type]


def test_command_line_writes_the_declarations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rally.d.ts"
    rally.main(["test_types:app", "--types", str(out)])
    assert out.read_text() == rally._typescript(app.contract)
    rally.main(["test_types:app", "--types", "-"])
    assert capsys.readouterr().out == out.read_text()


def test_declarations_change_with_the_contract() -> None:
    other = make_app()

    @other.rpc
    def server_version(msg: Version) -> str:
        return "2"

    text = rally._typescript(other.contract)
    assert "    Version: { fields: Rally.Version; result: { ok: true; value: string }" in text
    assert other.contract["hash"] in text and app.contract["hash"] not in text


@dataclasses.dataclass
class Version:
    pass


# ==== The docs page in Chromium =============================================

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_docs_page_lists_every_rpc_and_calls_one(served: rally.Server) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip("the docs page test needs Debian's chromium (apt-get install -y chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("the docs page test needs Playwright (pip install playwright)")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.goto(served.url + "/_rally/docs")
            expect(page.locator("section[id^=rpc-] h3")).to_have_text(list(app.contract["rpc"]), timeout=WAIT * 1000)
            draw = page.locator("#rpc-Draw")
            fields = json.loads(draw.locator("textarea").input_value())
            assert fields["label"] == HOSTILE and fields["shape"]["type"] == "Circle"
            draw.locator("button").click()
            expect(draw.locator("output")).to_have_class("ok", timeout=WAIT * 1000)
            assert json.loads(draw.locator("output").inner_text()) == {
                "kind": "ok",
                "id": 1,
                "value": {"id": 0, "shapes": [fields["shape"], None]},
            }
            draw.locator("textarea").fill(json.dumps({**fields, "tags": ["fail"]}))
            draw.locator("button").click()
            expect(draw.locator("output")).to_have_class("err", timeout=WAIT * 1000)
            expect(draw.locator("output")).to_contain_text("asked to fail")
        finally:
            browser.close()
    assert errors == []
