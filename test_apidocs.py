"""API descriptions: the OpenAPI 3.1 document of ``/_rally/openapi.json`` and
the AsyncAPI 3.0 document of ``/_rally/asyncapi.json``, checked by the
official validators and against real requests, answers and frames.

``openapi_spec_validator.validate`` checks the OpenAPI documents; npm's
``@asyncapi/parser``, run by node, the AsyncAPI ones (``.ci/run`` installs it
with ``npm install --prefix .ci @asyncapi/parser``; a global install works
too). ``jsonschema`` checks every request body and answer of a running server
against the OpenAPI schemas, and every WebSocket frame against the AsyncAPI
messages. Without one of them the tests that need it are skipped with the
install command (``pytest -rs`` prints it); CI installs all of them.
Loopback only, port 0, a time bound on every wait.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import rally
from test_rally import EVERYTHING_JSON, Article, Everything, running
from test_types import make_app

WAIT = 5.0  # seconds: the bound on any single wait in these tests
NODE_WAIT = 60.0  # seconds: node loading the AsyncAPI parser and its rule sets
CI_DIR = Path(__file__).parent / ".ci"


@dataclass
class Fail: ...


@dataclass
class Later: ...


@dataclass
class Café:  # a type name outside [A-Za-z0-9_], which components keys may not hold
    crème: str


def rich_app(**options: Any) -> rally.App:
    """test_types.py's app (every kind of type, RPCs, a page with presence)
    with the README's article page (pushes) and a type whose name is not
    ASCII."""
    app = make_app(**options)
    app.page("/articles/{slug}", Article)

    @app.rpc
    def server_cafe(msg: Café) -> rally.Result[list[Café], Café]:
        return rally.Ok([msg]) if msg.crème else rally.Error(msg)

    @app.rpc
    def server_fail(msg: Fail) -> int:
        raise RuntimeError("asked to fail")

    return app


def everything_app() -> rally.App:
    """An RPC that echoes test_rally.py's ``Everything``: every supported
    annotation (its types share names with test_types.py's, so an app of
    its own)."""
    app = rally.App()

    @app.rpc
    def server_everything(msg: Everything) -> Everything:
        return msg

    return app


def bare_app() -> rally.App:
    """No RPC, no parameters, a page that is not stateful."""
    app = rally.App()

    class Home:
        def view() -> str:
            return "<!doctype html><title>home</title>"

    app.page("/", Home)
    return app


APPS = {"rich": rich_app, "everything": everything_app, "bare": bare_app}


def openapi_spec_validator() -> Any:
    try:
        import openapi_spec_validator
    except ImportError:
        pytest.skip(
            "the OpenAPI tests need openapi-spec-validator (pip install openapi-spec-validator, "
            "or pip install -e '.[test]')"
        )
    return openapi_spec_validator


def jsonschema() -> Any:
    try:
        import jsonschema
        import referencing  # noqa: F401 - jsonschema's, for the $refs into the documents
    except ImportError:
        pytest.skip("the schema tests need jsonschema (pip install jsonschema, or pip install -e '.[test]')")
    return jsonschema


def fetch(
    server: rally.Server, path: str, method: str = "GET", body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: its status, headers (lowercase names) and body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# ==== The official validators =================================================


@pytest.mark.parametrize("make", APPS.values(), ids=APPS.keys())
def test_openapi_document_passes_openapi_spec_validator(make: Any) -> None:
    validator = openapi_spec_validator()
    doc = json.loads(rally._openapi(make().contract))
    validator.validate(doc)
    assert doc["openapi"] == "3.1.0" and doc["info"]["version"] == make().contract["hash"]


def test_openapi_document_has_every_type_rpc_and_status() -> None:
    contract = rich_app().contract
    doc = json.loads(rally._openapi(contract))
    schemas = doc["components"]["schemas"]
    keys = {rally._component_key(n) for n in contract["types"]}
    assert keys <= set(schemas) and "Caf-e9-" in keys and "Café" not in schemas
    assert {f"rpc.{rally._component_key(n)}" for n in contract["rpc"]} <= set(schemas)
    operation = doc["paths"]["/_rally/rpc"]["post"]
    assert set(operation["responses"]) == {"200", "400", "403", "409", "413", "415", "422", "500", "503"}
    assert operation["x-rally-rpc"]["Draw"] == {
        "request": "#/components/schemas/rpc.Draw",
        "answer": "#/components/schemas/rpc.Draw.Answer",
    }
    draw = schemas["Draw"]
    assert draw["required"] == ["shape", "color"] and draw["additionalProperties"] is False
    assert draw["properties"]["shape"]["discriminator"]["mapping"] == {
        "Circle": "#/components/schemas/Circle.Message",
        "Square": "#/components/schemas/Square.Message",
    }
    assert draw["properties"]["span"] == {
        "type": "array",
        "prefixItems": [schemas["Point"]["properties"]["x"], {"type": "string"}],
        "items": False,
        "minItems": 2,
        "default": [0, "a"],
    }
    assert schemas["Level"] == {"type": "integer", "enum": [1, 2]}


def asyncapi_diagnostics(tmp_path: Path, docs: dict[str, str]) -> dict[str, list[str]]:
    """Each document parsed by @asyncapi/parser: its diagnostics of severity
    error or warning, as ``code path: message``."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("the AsyncAPI test needs node and @asyncapi/parser (apt-get install -y nodejs npm; "
                    "npm install --prefix .ci @asyncapi/parser)")  # fmt: skip
    for name, text in docs.items():
        (tmp_path / f"{name}.json").write_text(text, encoding="utf-8")
    script = tmp_path / "check.js"
    script.write_text(
        """
const fs = require("fs"), path = require("path");
let Parser;
try { ({ Parser } = require(path.join(process.argv[2], "node_modules", "@asyncapi", "parser"))); }
catch (e) { try { ({ Parser } = require("@asyncapi/parser")); } catch (e2) { process.exit(3); } }
(async () => {
  const out = {};
  for (const file of process.argv.slice(3)) {
    const { document, diagnostics } = await new Parser().parse(fs.readFileSync(file, "utf8"));
    out[path.basename(file, ".json")] = diagnostics
      .filter((d) => d.severity <= 1 || !document)
      .map((d) => `${d.code} ${d.path.join(".")}: ${d.message}`);
    const name = path.basename(file, ".json");
    if (!document && out[name].length === 0) out[name] = ["no document"];
  }
  console.log(JSON.stringify(out));
})();
"""
    )
    files = [str(tmp_path / f"{name}.json") for name in docs]
    proc = subprocess.run([node, str(script), str(CI_DIR), *files], capture_output=True, text=True, timeout=NODE_WAIT)
    if proc.returncode == 3:
        pytest.skip("the AsyncAPI test needs @asyncapi/parser (npm install --prefix .ci @asyncapi/parser)")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_asyncapi_document_passes_the_asyncapi_parser(tmp_path: Path) -> None:
    docs = {name: rally._asyncapi(make().contract) for name, make in APPS.items()}
    broken = json.loads(docs["rich"])
    broken["components"]["schemas"]["Point"]["properties"]["x"]["type"] = "integr"
    docs["broken"] = json.dumps(broken)
    found = asyncapi_diagnostics(tmp_path, docs)
    assert found["rich"] == [] and found["bare"] == []
    assert any("components.schemas.Point.properties.x.type" in d for d in found["broken"]), found["broken"]


def test_asyncapi_document_has_a_channel_and_two_operations_per_page() -> None:
    contract = rich_app().contract
    doc = json.loads(rally._asyncapi(contract))
    assert doc["asyncapi"] == "3.0.0" and doc["info"]["version"] == contract["hash"]
    room = doc["channels"]["rooms_name"]
    assert room["address"] == "/_rally/ws?page=/rooms/{name}" and set(room["parameters"]) == {"name"}
    assert {"send.Say", "send.Leave", "push.Said", "push.Left", "presence.Who"} <= set(room["messages"])
    assert doc["channels"]["items_id"]["parameters"]["id"]["description"] == "route parameter id, int"
    receive, send = doc["operations"]["rooms_name.receive"], doc["operations"]["rooms_name.send"]
    assert (receive["action"], send["action"]) == ("receive", "send")
    assert {"$ref": "#/channels/rooms_name/messages/send.Say"} in receive["messages"]
    assert {"$ref": "#/channels/rooms_name/messages/push.Said"} in send["messages"]
    assert len(doc["channels"]) == len(contract["pages"]) and len(doc["operations"]) == 2 * len(contract["pages"])


def test_doc_entries_of_the_contract_become_descriptions() -> None:
    contract = json.loads(json.dumps(rich_app().contract))
    contract["types"]["Draw"]["doc"] = "Draw one shape."
    contract["rpc"]["Draw"]["doc"] = "Draws."
    contract["pages"]["/rooms/{name}"]["doc"] = "A chat room."
    openapi, asyncapi = json.loads(rally._openapi(contract)), json.loads(rally._asyncapi(contract))
    assert openapi["components"]["schemas"]["Draw"]["description"] == "Draw one shape."
    assert openapi["components"]["schemas"]["rpc.Draw"]["description"].startswith("Draws.\n\n")
    assert asyncapi["channels"]["rooms_name"]["description"].startswith("A chat room.\n\n")
    assert "description" not in json.loads(rally._openapi(rich_app().contract))["components"]["schemas"]["Draw"]


# ==== Real requests and answers against the schemas ==========================


def pointer(*parts: str) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


class Checker:
    """Validates instances against schemas at JSON pointers of one document."""

    def __init__(self, doc: dict[str, Any], draft: str) -> None:
        js = jsonschema()
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT7, DRAFT202012

        spec = DRAFT202012 if draft == "2020-12" else DRAFT7
        self.cls = js.Draft202012Validator if draft == "2020-12" else js.Draft7Validator
        self.registry = Registry().with_resource("urn:doc", Resource.from_contents(doc, default_specification=spec))
        self.doc = doc

    def errors(self, ref: str, instance: Any) -> list[str]:
        validator = self.cls({"$ref": "urn:doc" + ref}, registry=self.registry, format_checker=self.cls.FORMAT_CHECKER)
        return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]

    def check(self, ref: str, instance: Any) -> None:
        assert self.errors(ref, instance) == [], (ref, instance)

    async def good_call(self, server: rally.Server, key: str, body: dict[str, Any]) -> str:
        """POST a call the server answers 200; check the call and its answer
        against the operation's schemas and the RPC's own. The answer's kind."""
        self.check(REQUEST, body)
        self.check(f"#/components/schemas/rpc.{key}", body)
        status, ctype, reply = await post(server, json.dumps(body).encode())
        assert (status, ctype) == (200, "application/json"), reply
        value = json.loads(reply)
        self.check(answer(200, ctype), value)
        self.check(f"#/components/schemas/rpc.{key}.Answer", value)
        return value["kind"]  # type: ignore[no-any-return]


OPERATION = ("paths", "/_rally/rpc", "post")
REQUEST = pointer(*OPERATION, "requestBody", "content", "application/json", "schema")


def answer(status: int, ctype: str) -> str:
    return pointer(*OPERATION, "responses", str(status), "content", ctype, "schema")


async def post(server: rally.Server, body: bytes, **headers: str) -> tuple[int, str, bytes]:
    """POST ``body`` to /_rally/rpc: the status, the media type and the body of the answer."""
    status, got, reply = await asyncio.to_thread(
        fetch, server, "/_rally/rpc", "POST", body, **{"content-type": "application/json", **headers}
    )
    return status, got["content-type"].split(";")[0], reply


def call(msg_type: str, fields: Any, msg_id: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"kind": "rpc", "id": msg_id, **extra, "msg": {"type": msg_type, "fields": fields}}


DRAW = {
    "shape": {"type": "Circle", "fields": {"center": {"x": 1, "y": 2.5}, "radius": 3}},
    "color": "red",
    "mode": "stroke",
    "tags": ["a", "b"],
    "weights": {"w": 1.5},
    "span": [1, "x"],
    "path": [{"x": 1}, {"x": 2, "y": 3.0}],
    "note": None,
    "level": 2,
    "when": "2024-05-01",
    "blob": "AAEC/w==",
    "odd": True,
}
#: calls the server answers 200, each with the key of its RPC
GOOD_CALLS = [
    ("Draw", call("Draw", DRAW)),
    ("Draw", call("Draw", {"shape": {"type": "Square", "fields": {"corner": {"x": 0}, "side": 1}}, "color": "green"})),
    ("Draw", call("Draw", {**DRAW, "tags": ["fail"]}, "s-1")),  # answered err
    ("Ping", call("Ping", {}, 2)),
    ("Node", call("Node", {"name": "r", "children": [{"name": "l", "children": []}]}, 3)),
    ("Caf-e9-", call("Café", {"crème": "brûlée"}, 5)),
    ("Caf-e9-", call("Café", {"crème": ""}, 6)),  # answered err
    ("ServerLoadTitle", call("ServerLoadTitle", {"slug": "hello"}, 7, key="k-1")),
    ("ServerLoadTitle", call("ServerLoadTitle", {"slug": "missing"}, 8)),  # answered err
]
#: calls the server refuses, with the status it answers (the schemas refuse them too)
BAD_CALLS = [
    (call("Draw", {**DRAW, "color": "blue"}), 400),
    (call("Draw", {**DRAW, "extra": 1}), 400),
    (call("Draw", {"color": "red"}), 400),
    (call("Draw", {**DRAW, "span": [1, "x", 2]}), 400),
    (call("Node", {"name": 1, "children": []}), 400),
    (call("Nothing", {}), 400),  # unknown_type
    ({"kind": "rpc", "msg": {"type": "Ping", "fields": {}}}, 400),  # no id
    (call("Ping", {}, "x" * 65), 400),
]


async def test_openapi_schemas_match_real_rpc_requests_and_answers() -> None:
    app = rich_app()
    checker = Checker(json.loads(rally._openapi(app.contract)), "2020-12")
    async with running(app) as server:
        kinds = set()
        for key, body in GOOD_CALLS:
            kinds.add(await checker.good_call(server, key, body))
        assert kinds == {"ok", "err"}

        for body, expected in BAD_CALLS:
            assert checker.errors(REQUEST, body), body  # the schemas refuse what the server refuses
            status, ctype, reply = await post(server, json.dumps(body).encode())
            assert status == expected, reply
            checker.check(answer(status, ctype), json.loads(reply))

        # The rest of the statuses the document lists, each from a real answer
        # (but 503 busy: as many keyed calls running in one session as it keeps answers).
        cookie = (await asyncio.to_thread(fetch, server, "/rooms/lobby"))[1]["set-cookie"].split(";")[0]
        ping = json.dumps(call("Ping", {}, 9, key="k-2")).encode()
        node = json.dumps(call("Node", {"name": "r", "children": []}, 9, key="k-2")).encode()
        refusals = [
            (await post(server, ping, **{"rally-contract": "0" * 16}), 409),
            (await post(server, ping + b" " * (1 << 20)), 413),
            (await post(server, ping, **{"content-type": "text/plain"}), 415),
            (await post(server, ping, origin="http://elsewhere.example"), 403),
            (await post(server, ping, cookie=cookie), 200),
            (await post(server, node, cookie=cookie), 422),
            (await post(server, json.dumps(call("Fail", {})).encode()), 500),
        ]
        for (status, ctype, reply), expected in refusals:
            assert status == expected, reply
            checker.check(answer(status, ctype), json.loads(reply) if ctype == "application/json" else reply.decode())


async def test_openapi_schemas_match_every_supported_annotation_on_the_wire() -> None:
    app = everything_app()
    checker = Checker(json.loads(rally._openapi(app.contract)), "2020-12")
    async with running(app) as server:
        value = await checker.good_call(server, "Everything", call("Everything", EVERYTHING_JSON, 4))
        assert value == "ok"
        for field, wrong in [("i", 2**53), ("lit", "c"), ("pair", [1, "one", 2]), ("color", "blue"), ("tree", {})]:
            body = call("Everything", {**EVERYTHING_JSON, field: wrong})
            assert checker.errors(REQUEST, body), field
            status, ctype, reply = await post(server, json.dumps(body).encode())
            assert status == 400, reply
            checker.check(answer(status, ctype), json.loads(reply))
        answered = {"kind": "ok", "id": 1, "value": {**EVERYTHING_JSON, "shape": {"type": "Square", "fields": {}}}}
        assert checker.errors("#/components/schemas/rpc.Everything.Answer", answered)


async def test_asyncapi_messages_match_real_websocket_frames() -> None:
    import websockets

    app = rich_app()
    doc = json.loads(rally._asyncapi(app.contract))
    checker = Checker(doc, "07")

    def check(channel: str, action: str, frame: Any) -> None:
        """The frame is one of the messages of the channel's operation."""
        refs = [m["$ref"] for m in doc["operations"][f"{channel}.{action}"]["messages"]]
        payloads = [doc["channels"][channel]["messages"][r.rsplit("/", 1)[1]]["$ref"] + "/payload" for r in refs]
        matching = [p for p in payloads if not checker.errors(p, frame)]
        assert matching, (channel, action, frame)

    async def recv(ws: Any) -> Any:
        return json.loads(await asyncio.wait_for(ws.recv(), WAIT))

    async with running(app) as server:
        base = f"ws://127.0.0.1:{server.port}/_rally/ws?page="
        async with websockets.connect(base + "/articles/hello&last=0") as ws:
            sent = [
                {"kind": "send", "seq": 1, "msg": {"type": "ToggleFavorite", "fields": {}}},
                {"kind": "send", "msg": {"type": "AddComment", "fields": {"body": "hi"}}},
                call("Draw", DRAW, 10),
                call("ServerLoadTitle", {"slug": "missing"}, 11),
                {"kind": "send", "seq": 2, "msg": {"type": "AddComment", "fields": {"body": 3}}},
                {"kind": "ack", "seq": 1},
            ]
            for frame in sent[:-1]:
                await ws.send(json.dumps(frame))
            got = [await recv(ws) for _ in range(7)]  # the refused send has no ack
            await ws.send(json.dumps(sent[-1]))
        for frame in sent[:-2] + sent[-1:]:
            check("articles_slug", "receive", frame)
        assert checker.errors(
            doc["channels"]["articles_slug"]["messages"]["send.AddComment"]["$ref"] + "/payload", sent[-2]
        )
        assert {f["kind"] for f in got} == {"hello", "push", "ack", "ok", "err", "error"}, got
        for frame in got:
            check("articles_slug", "send", frame)

        async with websockets.connect(base + "/rooms/lobby") as ws, websockets.connect(base + "/rooms/lobby") as other:
            frames = [await recv(ws), await recv(ws), await recv(other)]
            await ws.send(json.dumps({"kind": "send", "seq": 1, "msg": {"type": "Say", "fields": {"text": "hi"}}}))
            frames.append(await recv(ws))
        assert [f["kind"] for f in frames] == ["presence", "presence", "presence", "ack"], frames
        for frame in frames:
            check("rooms_name", "send", frame)


# ==== HTTP: the routes, the option, the command line ==========================


def test_api_documents_are_served_with_etag_and_304() -> None:
    app = rich_app()
    with app.run_in_thread(access_log=False) as server:
        for path, make in (("/_rally/openapi.json", rally._openapi), ("/_rally/asyncapi.json", rally._asyncapi)):
            status, headers, body = fetch(server, path)
            assert (status, headers["content-type"]) == (200, "application/json")
            assert body.decode() == make(app.contract) and headers["cache-control"] == "no-cache"
            assert fetch(server, path, **{"if-none-match": headers["etag"]})[:3:2] == (304, b"")
            assert fetch(server, path, "HEAD")[0] == 200
            assert fetch(server, path, "POST")[0] == 405


def test_api_documents_change_with_the_contract() -> None:
    app = rich_app()
    with app.run_in_thread(access_log=False) as server:
        before = {p: fetch(server, p)[1]["etag"] for p in ("/_rally/openapi.json", "/_rally/asyncapi.json")}

        @app.rpc
        def server_later(msg: Later) -> int:
            return 1

        for path, etag in before.items():
            status, headers, body = fetch(server, path)
            assert status == 200 and headers["etag"] != etag and app.contract["hash"] in body.decode()


def test_docs_false_turns_the_api_documents_off() -> None:
    with rich_app(docs=False).run_in_thread(access_log=False) as server:
        assert fetch(server, "/_rally/openapi.json")[0] == 404
        assert fetch(server, "/_rally/asyncapi.json")[0] == 404
        assert fetch(server, "/_rally/contract")[0] == 200


def test_command_line_writes_the_api_documents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    openapi, asyncapi = tmp_path / "openapi.json", tmp_path / "asyncapi.json"
    rally.main(["test_types:app", "--openapi", str(openapi), "--asyncapi", str(asyncapi)])
    import test_types

    assert openapi.read_text(encoding="utf-8") == rally._openapi(test_types.app.contract)
    assert asyncapi.read_text(encoding="utf-8") == rally._asyncapi(test_types.app.contract)
    rally.main(["test_types:app", "--openapi", "-"])
    assert capsys.readouterr().out == openapi.read_text(encoding="utf-8")
    rally.main(["test_types:app", "--asyncapi", "-"])
    assert capsys.readouterr().out == asyncapi.read_text(encoding="utf-8")
