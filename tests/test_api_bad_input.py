"""Hostile input against the HTTP API.

Malformed JSON, wrong types, unknown fields, oversized bodies, invalid UUIDs, SQL and
JSON-path metacharacters in every string field, bad tokens, other tenants' ids and
concurrent writers: each must get a clear 4xx problem document (RFC 9457), nothing
half-written may ever become visible, and no response may be a 500.

Every request in this file goes through the module's own ``client`` (it shadows the one
in conftest): app exceptions become 500 responses there instead of being raised, and a
response hook fails the test on any 5xx, so no 500 can hide behind another assertion.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from conftest import Tenant, unique

from canvasdb.api import create_app
from canvasdb.entities.types import TYPE_NAME
from canvasdb.services import Services
from canvasdb.settings import Settings

PROBLEM = "application/problem+json"
MAX_DATA = 64 * 1024  # conftest's max_data_bytes
BODY_LIMIT = 4 * MAX_DATA + 64 * 1024  # what create_app gives BodySizeLimit
NIL = "00000000-0000-0000-0000-000000000000"

# Valid but odd text: SQL and JSON-path metacharacters, escapes, unicode, RTL marks, long runs.
ODD_TEXT = [
    "'", '"', ";", "--", "/*", "*/", "\\", "$.a[*]", "$..*", "@@", ":*", "%", "_", "?", "$1",
    "' OR '1'='1", "'; DROP TABLE entities; --", "\"); DELETE FROM orgs; --", "a' || 'b",
    "to_tsquery('x:*')", "data->>'title'", "data @> '{}'", "a%_b", "\\u0000", "\\x00", "\\\\'",
    "{}", "[]", "null", "true", "0", "-0", "1e999", "NaN", "", " ", "\t\n\r", "\x01\x1f\x7f",
    "\u200f\u202eevil\u202c", "\u200b\u2060", "\ufeffbom", "\u2028\u2029", "🎨🧑‍🤝‍🧑", "e\u0301",
    "日本語テキスト", "עברית", "العربية", "a/b", "~0", "~1", "a~b/c", "x" * 5000,
]
# Text that PostgreSQL's jsonb or UTF-8 cannot hold.
UNSTORABLE = {
    "nul value": {"a": "x\u0000y"},
    "nul key": {"\u0000": 1},
    "nul nested": {"a": [{"b": "\u0000"}]},
    "lone high surrogate value": {"a": "\ud800"},
    "lone low surrogate key": {"\udfff": 1},
    "lone surrogate nested": {"a": {"b": ["ok", "\ud83d"]}},
}


# --- the client, and helpers ------------------------------------------------------------------


async def _no_server_error(response: httpx.Response) -> None:
    if response.status_code >= 500:
        await response.aread()
        raise AssertionError(
            f"{response.request.method} {response.request.url} answered {response.status_code}: "
            f"{response.text[:500]}"
        )


@pytest.fixture(scope="module")
async def client(settings: Settings, svc: Services) -> AsyncIterator[httpx.AsyncClient]:
    """Shadows conftest's client: an app exception is a 500 response, and any 5xx fails the test."""
    assert settings.max_data_bytes == MAX_DATA
    app = create_app(settings, services=svc)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://canvasdb.test",
                                 event_hooks={"response": [_no_server_error]}) as http:
        yield http


def org_url(t: Tenant) -> str:
    return f"/v1/orgs/{t.slug}"


def entities_url(t: Tenant) -> str:
    return f"/v1/orgs/{t.slug}/projects/{t.project_slug}/entities"


def entity_url(t: Tenant, id: str) -> str:
    return f"/v1/orgs/{t.slug}/entities/{id}"


def q(text: str) -> str:
    """``text`` for a URL path or query, lone surrogates included (the server sees U+FFFD)."""
    return quote(text, safe="", errors="surrogatepass")


def as_json(body: Any) -> bytes:
    """JSON with \\u escapes, so lone surrogates and NULs travel as the client wrote them."""
    return json.dumps(body).encode()


async def send(client: httpx.AsyncClient, method: str, url: str, content: Any = None, *,
               headers: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
    """A request whose body is sent verbatim (bytes) or as JSON (anything else)."""
    headers = dict(headers or {})
    if content is not None and not isinstance(content, bytes):
        content = as_json(content)
    if content is not None:
        headers.setdefault("Content-Type", "application/json")
    return await client.request(method, url, content=content, headers=headers, **kwargs)


def problem(r: httpx.Response, status: int, *, pointer: str | None = None) -> dict[str, Any]:
    """Assert an RFC 9457 problem document with this status; return its body."""
    where = f"{r.request.method} {r.request.url}"
    assert r.status_code == status, f"{where}: {r.status_code} {r.text[:500]}"
    assert r.headers["content-type"] == PROBLEM, f"{where}: {r.headers.get('content-type')}"
    body = r.json()
    assert body["status"] == status
    assert isinstance(body.get("title"), str) and body["title"]
    assert isinstance(body.get("detail"), str) and body["detail"]
    if pointer is not None:
        assert body.get("pointer") == pointer, f"{where}: {body}"
    if status == 401:  # RFC 6750: the scheme to use
        assert r.headers.get("www-authenticate", "").startswith("Bearer "), f"{where}: {r.headers}"
    return body


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:500]}"
    return r.json()


async def state(client: httpx.AsyncClient, svc: Services, t: Tenant) -> dict[str, Any]:
    """Everything a write could have touched, as the tenant's owner sees it."""
    h = t.headers
    listing = ok(await client.get(entities_url(t), params={"limit": 1000}, headers=h))
    history = {e["id"]: ok(await client.get(entity_url(t, e["id"]) + "/history", headers=h))
               for e in listing["items"]}
    return {
        "entities": listing,
        "history": history,
        "types": ok(await client.get(f"{org_url(t)}/entity-types", headers=h)),
        "projects": ok(await client.get(f"{org_url(t)}/projects", headers=h)),
        "orgs": sorted(o.slug for o in await svc.tenancy.list_orgs()),
    }


@pytest.fixture
async def entity(client: httpx.AsyncClient, tenant: Tenant) -> dict[str, Any]:
    """A note at version 2, so it has a history."""
    created = ok(await client.post(entities_url(tenant), json={"type": "note", "data": {
        "title": "original", "n": 1}}, headers=tenant.headers), 201)
    return ok(await client.patch(entity_url(tenant, created["id"]), json={"data": {"n": 2}},
                                 headers=tenant.headers))


async def new_user(svc: Services, t: Tenant, project_role: str | None) -> dict[str, str]:
    """An org member with this role on the tenant's project (None: no role); its auth headers."""
    user = await svc.tenancy.ensure_user(f"{unique('member')}@example.com")
    await svc.tenancy.set_org_role(t.org_id, user, "member")
    if project_role is not None:
        await svc.tenancy.set_project_role(t.owner, t.project_id, user, project_role)
    _, token = await svc.tenancy.create_token(user)
    return {"Authorization": f"Bearer {token}"}


WriteTarget = Callable[[Tenant, str], tuple[str, str]]
WRITES: dict[str, WriteTarget] = {
    "POST entities": lambda t, id: ("POST", entities_url(t)),
    "PUT entity": lambda t, id: ("PUT", entity_url(t, id)),
    "PATCH entity": lambda t, id: ("PATCH", entity_url(t, id)),
    "POST entity-types": lambda t, id: ("POST", f"{org_url(t)}/entity-types"),
    "POST orgs": lambda t, id: ("POST", "/v1/orgs"),
    "POST projects": lambda t, id: ("POST", f"{org_url(t)}/projects"),
}


# --- malformed JSON -------------------------------------------------------------------------

DEEP = ('{"type": "note", "data": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}").encode()
MALFORMED = {
    "truncated": (b'{"type": "note", "data": {"a": [1, 2', 400),
    "trailing garbage": (b'{"type": "note", "data": {}} trailing', 400),
    "two documents": (b'{"type": "note", "data": {}}{"type": "note", "data": {}}', 400),
    "not json": (b"type=note&data=x", 400),
    "single quotes": (b"{'type': 'note', 'data': {}}", 400),
    "sql": (b"'; DROP TABLE entities; --", 400),
    "invalid utf-8": (b'{"type": "note", "data": {"a": "\xff\xfe"}}', 400),
    "nested 100000 levels": (DEEP, 400),
    "empty body": (b"", 422),
    "array": (b'[{"type": "note", "data": {}}]', 422),
    "string": (b'"{\\"type\\": \\"note\\"}"', 422),
    "number": (b"42", 422),
    "null": (b"null", 422),
}


@pytest.mark.parametrize("body", MALFORMED, ids=list(MALFORMED))
@pytest.mark.parametrize("target", WRITES, ids=list(WRITES))
async def test_malformed_json_is_refused(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                         entity: dict[str, Any], target: str, body: str) -> None:
    content, status = MALFORMED[body]
    method, url = WRITES[target](tenant, entity["id"])
    before = await state(client, svc, tenant)
    r = await send(client, method, url, content, headers=tenant.headers)
    problem(r, status)
    assert await state(client, svc, tenant) == before


async def test_json_that_does_not_parse_says_what_and_where(client: httpx.AsyncClient, tenant: Tenant) -> None:
    """The 400 says what the parser met and where; it gave the character's offset as a JSON
    pointer (`/36`, as if the body had a member "36") and no reason."""
    content = b'{"type": "note",\n "data": {"a": [1, 2 3]}}'
    body = problem(await send(client, "POST", entities_url(tenant), content, headers=tenant.headers), 400)
    assert body["detail"] == "the body is not valid JSON: expecting ',' delimiter at line 2, column 22"
    assert "pointer" not in body and "errors" not in body


@pytest.mark.parametrize(("body", "reason"), [("invalid utf-8", "it is not UTF-8 text"),
                                              ("nested 100000 levels", "it is nested too deeply")])
async def test_json_the_parser_gives_up_on_says_why(client: httpx.AsyncClient, tenant: Tenant,
                                                    body: str, reason: str) -> None:
    """Bytes that are not UTF-8 and nesting past the parser's depth answered FastAPI's
    "There was an error parsing the body", which named neither JSON nor the reason."""
    r = await send(client, "POST", entities_url(tenant), MALFORMED[body][0], headers=tenant.headers)
    assert problem(r, 400)["detail"] == f"the body is not valid JSON: {reason}"


@pytest.mark.parametrize("body", ["empty body", "array", "null"])
async def test_a_body_that_is_not_an_object_says_so(client: httpx.AsyncClient, tenant: Tenant,
                                                     body: str) -> None:
    r = await send(client, "POST", entities_url(tenant), MALFORMED[body][0], headers=tenant.headers)
    assert problem(r, 422, pointer="")["detail"] == "the body must be a JSON object"


@pytest.mark.parametrize("media", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
@pytest.mark.parametrize("target", WRITES, ids=list(WRITES))
async def test_a_body_that_says_it_is_not_json_is_415(client: httpx.AsyncClient, svc: Services,
                                                      tenant: Tenant, entity: dict[str, Any],
                                                      target: str, media: str) -> None:
    """Valid JSON sent as another media type is refused by its type (FastAPI does not read it)."""
    method, url = WRITES[target](tenant, entity["id"])
    before = await state(client, svc, tenant)
    r = await send(client, method, url, b'{"type": "note", "data": {}, "slug": "x", "name": "a.b"}',
                   headers={**tenant.headers, "Content-Type": media})
    assert media in problem(r, 415)["detail"]
    assert await state(client, svc, tenant) == before


# --- wrong types, unknown fields, missing fields ---------------------------------------------

WRONG_TYPES = [
    ("POST entities", {"type": 5, "data": {}}, "/type"),
    ("POST entities", {"type": None, "data": {}}, "/type"),
    ("POST entities", {"type": ["note"], "data": {}}, "/type"),
    ("POST entities", {"type": {"$ne": ""}, "data": {}}, "/type"),
    ("POST entities", {"type": "note", "data": []}, "/data"),
    ("POST entities", {"type": "note", "data": "{}"}, "/data"),
    ("POST entities", {"type": "note", "data": None}, "/data"),
    ("POST entities", {"type": "note", "data": 1}, "/data"),
    ("POST entities", {"type": "note", "data": {}, "id": "not-a-uuid"}, "/id"),
    ("POST entities", {"type": "note", "data": {}, "id": "' OR '1'='1"}, "/id"),
    ("POST entities", {"type": "note", "data": {}, "id": 12}, "/id"),
    ("POST entities", {"type": "note", "data": {}, "id": [NIL]}, "/id"),
    ("PUT entity", {"data": [1, 2]}, "/data"),
    ("PUT entity", {"data": "x"}, "/data"),
    ("PUT entity", {"data": None}, "/data"),
    ("PATCH entity", {"data": [1, 2]}, "/data"),
    ("PATCH entity", {"data": True}, "/data"),
    ("PATCH entity", {"data": None}, "/data"),
    ("POST orgs", {"slug": 5}, "/slug"),
    ("POST orgs", {"slug": "fine", "name": ["x"]}, "/name"),
    ("POST projects", {"slug": None}, "/slug"),
    ("POST projects", {"slug": "fine", "name": 3}, "/name"),
    ("POST entity-types", {"name": 5}, "/name"),
    ("POST entity-types", {"name": "a.b", "module": 1}, "/module"),
    ("POST entity-types", {"name": "a.b", "json_schema": "{}"}, "/json_schema"),
    ("POST entity-types", {"name": "a.b", "text_fields": ["title"]}, "/text_fields"),
    ("POST entity-types", {"name": "a.b", "reference_fields": "$.parent"}, "/reference_fields"),
]
UNKNOWN_FIELDS = [
    ("POST entities", {"type": "note", "data": {}, "version": 3}, "/version"),
    ("POST entities", {"type": "note", "data": {}, "deleted": True}, "/deleted"),
    ("POST entities", {"type": "note", "data": {}, "org_id": NIL}, "/org_id"),
    ("POST entities", {"type": "note", "data": {}, "'; DROP TABLE entities; --": 1},
     "/'; DROP TABLE entities; --"),
    ("POST entities", {"type": "note", "data": {}, "a/b~c": 1}, "/a~1b~0c"),
    ("PUT entity", {"data": {}, "version": 3}, "/version"),
    ("PATCH entity", {"data": {}, "type": "other"}, "/type"),
    ("POST orgs", {"slug": "fine", "owner": NIL}, "/owner"),
    ("POST projects", {"slug": "fine", "org": "x"}, "/org"),
    ("POST entity-types", {"name": "a.b", "sql": "DROP TABLE entity_types"}, "/sql"),
]
MISSING_FIELDS = [
    ("POST entities", {}, "/type"),
    ("POST entities", {"type": "note"}, "/data"),
    ("POST entities", {"data": {}}, "/type"),
    ("PUT entity", {}, "/data"),
    ("PATCH entity", {}, "/data"),
    ("POST orgs", {}, "/slug"),
    ("POST orgs", {"name": "x"}, "/slug"),
    ("POST projects", {}, "/slug"),
    ("POST entity-types", {}, "/name"),
]


async def _refused_envelope(client: httpx.AsyncClient, svc: Services, t: Tenant, entity: dict[str, Any],
                            target: str, body: dict[str, Any], pointer: str) -> None:
    method, url = WRITES[target](t, entity["id"])
    before = await state(client, svc, t)
    problem(await send(client, method, url, body, headers=t.headers), 422, pointer=pointer)
    assert await state(client, svc, t) == before


@pytest.mark.parametrize(("target", "body", "pointer"), WRONG_TYPES)
async def test_wrong_types_are_refused(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                       entity: dict[str, Any], target: str, body: dict[str, Any],
                                       pointer: str) -> None:
    await _refused_envelope(client, svc, tenant, entity, target, body, pointer)


@pytest.mark.parametrize(("target", "body", "pointer"), UNKNOWN_FIELDS)
async def test_unknown_envelope_fields_are_refused(client: httpx.AsyncClient, svc: Services,
                                                   tenant: Tenant, entity: dict[str, Any], target: str,
                                                   body: dict[str, Any], pointer: str) -> None:
    await _refused_envelope(client, svc, tenant, entity, target, body, pointer)


@pytest.mark.parametrize(("target", "body", "pointer"), MISSING_FIELDS)
async def test_missing_fields_are_refused(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                          entity: dict[str, Any], target: str, body: dict[str, Any],
                                          pointer: str) -> None:
    await _refused_envelope(client, svc, tenant, entity, target, body, pointer)


async def test_nil_uuid_as_client_id_is_refused(client: httpx.AsyncClient, svc: Services,
                                                tenant: Tenant) -> None:
    """The nil UUID sorts before every page cursor: stored, it would never be listed."""
    before = await state(client, svc, tenant)
    r = await client.post(entities_url(tenant), json={"id": NIL, "type": "note", "data": {}},
                          headers=tenant.headers)
    problem(r, 422, pointer="/id")
    assert await state(client, svc, tenant) == before
    ends = [ok(await client.post(entities_url(tenant), json={"type": "note", "data": {}}, headers=tenant.headers),
               201)["id"] for _ in range(2)]
    r = await client.post(f"{org_url(tenant)}/relationships", headers=tenant.headers,
                          json={"id": NIL, "src": ends[0], "dst": ends[1], "kind": "mentions"})
    problem(r, 422, pointer="/id")
    assert ok(await client.get(f"{org_url(tenant)}/relationships", params={"entity": ends[0]},
                               headers=tenant.headers))["items"] == []


async def test_a_method_not_allowed_says_which_are(client: httpx.AsyncClient, tenant: Tenant,
                                                   entity: dict[str, Any]) -> None:
    """RFC 9110: a 405 lists the methods the resource allows (the problem handler dropped them)."""
    async def allowed(method: str, url: str) -> set[str]:
        r = await client.request(method, url, headers=tenant.headers)
        problem(r, 405)
        return {m.strip() for m in r.headers["allow"].split(",")}

    assert await allowed("TRACE", entity_url(tenant, entity["id"])) == {"GET", "HEAD", "PUT", "PATCH", "DELETE"}
    assert await allowed("POST", entity_url(tenant, entity["id"]) + "/history") == {"GET", "HEAD"}
    assert await allowed("TRACE", f"{org_url(tenant)}/blobs/images/a.png") == {"GET", "HEAD", "PUT", "DELETE"}
    assert await allowed("POST", "/openapi.json") == {"GET", "HEAD"}  # a route outside the document too


async def test_relationship_listing_names_its_bad_parameter(client: httpx.AsyncClient, tenant: Tenant) -> None:
    for name in ("entity", "after"):
        problem(await client.get(f"{org_url(tenant)}/relationships", params={name: "garbage"},
                                 headers=tenant.headers), 422, pointer=f"query:{name}")


async def test_client_chosen_ids_in_other_spellings_work(client: httpx.AsyncClient,
                                                         tenant: Tenant) -> None:
    wanted = uuid.uuid4()
    created = ok(await client.post(entities_url(tenant), json={
        "id": str(wanted).upper(), "type": "note", "data": {}}, headers=tenant.headers), 201)
    assert created["id"] == str(wanted)
    for spelling in (wanted.hex, str(wanted).upper(), f"{{{wanted}}}", wanted.urn):
        got = ok(await client.get(entity_url(tenant, quote(spelling, safe="")), headers=tenant.headers))
        assert got["id"] == str(wanted)


# --- oversized bodies -----------------------------------------------------------------------

OVERSIZED = {
    "POST entities": {"type": "note", "data": {"s": "x" * BODY_LIMIT}},
    "PUT entity": {"data": {"s": "x" * BODY_LIMIT}},
    "PATCH entity": {"data": {"s": "x" * BODY_LIMIT}},
    "POST entity-types": {"name": "big.type", "json_schema": {"description": "x" * BODY_LIMIT}},
    "POST orgs": {"slug": "big-org", "name": "x" * BODY_LIMIT},
    "POST projects": {"slug": "big", "name": "x" * BODY_LIMIT},
}


@pytest.mark.parametrize("target", WRITES, ids=list(WRITES))
async def test_body_over_limit_with_content_length(client: httpx.AsyncClient, svc: Services,
                                                   tenant: Tenant, entity: dict[str, Any],
                                                   target: str) -> None:
    method, url = WRITES[target](tenant, entity["id"])
    before = await state(client, svc, tenant)
    r = await send(client, method, url, OVERSIZED[target], headers=tenant.headers)
    assert int(r.request.headers["content-length"]) > BODY_LIMIT
    problem(r, 413)
    assert await state(client, svc, tenant) == before


async def _chunks(*parts: bytes, size: int = 16 * 1024) -> AsyncIterator[bytes]:
    for part in parts:
        for i in range(0, len(part), size):
            yield part[i:i + size]
            await asyncio.sleep(0)


STREAMED = {
    # The body grows past the limit in the middle of a string.
    "cut mid-document": lambda: (b'{"type": "note", "data": {"s": "', b"x" * (BODY_LIMIT + 1), b'"}}'),
    # A complete, valid document first, then whitespace past the limit: still valid JSON as a
    # whole, so the prefix alone must not be taken for the body and stored.
    "valid prefix then padding": lambda: (b'{"type": "note", "data": {"streamed": true}}',
                                          b" " * (BODY_LIMIT + 1)),
    "garbage": lambda: (b"\x00\xff" * (BODY_LIMIT // 2 + 1),),
}


@pytest.mark.parametrize("shape", STREAMED, ids=list(STREAMED))
async def test_streamed_body_over_limit_without_content_length(client: httpx.AsyncClient, svc: Services,
                                                               tenant: Tenant, shape: str) -> None:
    before = await state(client, svc, tenant)
    r = await client.post(entities_url(tenant), content=_chunks(*STREAMED[shape]()),
                          headers={**tenant.headers, "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    problem(r, 413)
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token", "Basic abc"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_large_body_without_a_valid_token_is_refused_unread(
        client: httpx.AsyncClient, tenant: Tenant, authorization: str | None, declared: bool) -> None:
    """FastAPI reads and parses a body before it checks the token: 4 MiB of JSON cost 170 ms
    of CPU for each 401. A body over 64 KiB is now not read until the token is checked."""
    read = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal read
        for _ in range(4):  # 256 KiB: over 64 KiB, under this app's body limit
            read += 1
            yield b"[" * 65536

    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    if declared:
        headers["Content-Length"] = str(4 * 65536)
    problem(await client.post(entities_url(tenant), content=body(), headers=headers), 401)
    assert read <= 1, f"{read} chunks of the body were read"
    # with the token, a large body is read as before
    data = b" " * 40_000 + as_json({"type": "note", "data": {"s": "y" * 60_000}})  # data under its limit
    ok(await client.post(entities_url(tenant), content=_chunks(data),
                         headers={**tenant.headers, "Content-Type": "application/json"}), 201)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_large_bodys_token_is_looked_up_once(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                                     monkeypatch: pytest.MonkeyPatch, declared: bool) -> None:
    """The token of a body over 64 KiB is checked before the body is read, and the route's
    dependency takes that outcome: it looked the token up a second time. An org's 404 still
    comes after the body's own errors, as it did."""
    lookups: list[str] = []

    def counted(name: str) -> Callable[..., Any]:
        real = getattr(svc.tenancy, name)

        def spy(*args: Any) -> Any:
            lookups.append(name)
            return real(*args)
        return spy

    for name in ("authenticate", "authorize"):
        monkeypatch.setattr(svc.tenancy, name, counted(name))

    async def post(url: str, body: bytes) -> httpx.Response:
        lookups.clear()
        headers = {**tenant.headers, "Content-Type": "application/json"}
        if declared:
            headers["Content-Length"] = str(len(body))
        return await client.post(url, content=_chunks(body), headers=headers)

    padding = b" " * 70_000  # over 64 KiB, valid JSON
    ok(await post(entities_url(tenant), padding + as_json({"type": "note", "data": {}})), 201)
    assert lookups == ["authorize"]
    ok(await post("/v1/orgs", padding + as_json({"slug": unique("big")})), 201)  # a route with no org
    assert lookups == ["authenticate"]
    missing = f"/v1/orgs/{unique('nowhere')}/projects/main/entities"
    problem(await post(missing, padding + as_json({"type": "note", "data": {}})), 404)
    assert lookups == ["authorize"]
    problem(await post(missing, padding + b"{not json"), 400)
    lookups.clear()
    ok(await client.post(entities_url(tenant), json={"type": "note", "data": {}}, headers=tenant.headers), 201)
    assert lookups == ["authorize"], "a small body: the route's own lookup, as before"


async def test_streamed_body_under_limit_is_accepted(client: httpx.AsyncClient, tenant: Tenant) -> None:
    body = as_json({"type": "note", "data": {"s": "y" * 50_000}})
    r = await client.post(entities_url(tenant), content=_chunks(body, size=4096),
                          headers={**tenant.headers, "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    created = ok(r, 201)
    got = ok(await client.get(entity_url(tenant, created["id"]), headers=tenant.headers))
    assert got["data"] == {"s": "y" * 50_000}


def sized(size: int, char: str = "x") -> dict[str, str]:
    """``{"s": ...}`` whose compact UTF-8 JSON is exactly ``size`` bytes (give or take a char)."""
    room = size - len('{"s":""}')
    return {"s": char * (room // len(char.encode()))}


@pytest.mark.parametrize("char", ["x", "é", "🎨"])
async def test_data_at_the_size_limit_is_accepted_and_over_it_refused(
    client: httpx.AsyncClient, svc: Services, tenant: Tenant, char: str
) -> None:
    at_limit = sized(MAX_DATA, char)
    over = {"s": at_limit["s"] + char}
    size = len(json.dumps(at_limit, ensure_ascii=False, separators=(",", ":")).encode())
    assert MAX_DATA - len(char.encode()) < size <= MAX_DATA
    before = await state(client, svc, tenant)
    body = problem(await client.post(entities_url(tenant), json={"type": "note", "data": over},
                                     headers=tenant.headers), 413)
    assert body.get("limit") == MAX_DATA
    assert await state(client, svc, tenant) == before
    created = ok(await client.post(entities_url(tenant), json={"type": "note", "data": at_limit},
                                   headers=tenant.headers), 201)
    assert created["data"] == at_limit


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
async def test_update_over_the_size_limit_is_refused(client: httpx.AsyncClient, svc: Services,
                                                     tenant: Tenant, entity: dict[str, Any],
                                                     method: str) -> None:
    before = await state(client, svc, tenant)
    # PATCH adds to what is there: a merge just under the limit pushes the whole over it.
    data = {**entity["data"], **sized(MAX_DATA + 1)} if method == "PUT" else sized(MAX_DATA - 8)
    r = await send(client, method, entity_url(tenant, entity["id"]), {"data": data}, headers=tenant.headers)
    assert problem(r, 413)["limit"] == MAX_DATA
    assert await state(client, svc, tenant) == before


# --- deep nesting inside data ---------------------------------------------------------------


def nested(depth: int, kind: str) -> Any:
    """``depth`` levels of objects or arrays, innermost a string."""
    value: Any = "leaf"
    for _ in range(depth):
        value = {"a": value} if kind == "object" else [value]
    return value


def nested_json(depth: int, kind: str) -> str:
    """The JSON text of ``nested(depth, kind)``, made without recursing."""
    if kind == "object":
        return '{"a": ' * depth + '"leaf"' + "}" * depth
    return "[" * depth + '"leaf"' + "]" * depth


@pytest.mark.parametrize("depth", [100, 150, 500, 900, 960, 990])
@pytest.mark.parametrize("kind", ["object", "array"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_data_nested_too_deeply_is_refused(client: httpx.AsyncClient, svc: Services,
                                                 tenant: Tenant, entity: dict[str, Any], method: str,
                                                 kind: str, depth: int) -> None:
    """Deep documents that Python's JSON parser still takes must be refused, not stored to break
    every later read, history or listing with a recursion error."""
    url = entities_url(tenant) if method == "POST" else entity_url(tenant, entity["id"])
    envelope = '"type": "note", ' if method == "POST" else ""
    body = f'{{{envelope}"data": {{"deep": {nested_json(depth, kind)}}}}}'.encode()
    before = await state(client, svc, tenant)
    r = await send(client, method, url, body, headers=tenant.headers)
    if depth <= 900:
        problem(r, 422, pointer="/data")
    else:  # the JSON parser itself may give up first
        assert r.status_code in (400, 422), r.text[:300]
        problem(r, r.status_code)
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize("kind", ["object", "array"])
async def test_data_nesting_limit(client: httpx.AsyncClient, svc: Services, tenant: Tenant, kind: str) -> None:
    """``data`` itself is level 1; 100 levels in all are taken, 101 are not."""
    before = await state(client, svc, tenant)
    r = await client.post(entities_url(tenant), json={"type": "note", "data": {"deep": nested(100, kind)}},
                          headers=tenant.headers)
    problem(r, 422, pointer="/data")
    assert await state(client, svc, tenant) == before
    ok(await client.post(entities_url(tenant), json={"type": "note", "data": {"deep": nested(99, kind)}},
                         headers=tenant.headers), 201)


async def test_moderately_nested_data_works_everywhere(client: httpx.AsyncClient, tenant: Tenant) -> None:
    """What is accepted must also read back, list, diff and rebuild from history."""
    h = tenant.headers
    data = {"deep": nested(60, "object"), "list": nested(60, "array")}
    created = ok(await client.post(entities_url(tenant), json={"type": "note", "data": data}, headers=h), 201)
    url = entity_url(tenant, created["id"])
    ok(await client.patch(url, json={"data": {"deep": nested(59, "array")}}, headers=h))
    ok(await client.put(url, json={"data": {"list": nested(61, "object")}}, headers=h))
    assert ok(await client.get(url, params={"as_of": "1"}, headers=h))["data"] == data
    assert ok(await client.get(url, headers=h))["data"] == {"list": nested(61, "object")}
    assert len(ok(await client.get(url + "/history", headers=h))["items"]) == 3
    ok(await client.get(url + "/diff", params={"from": 1, "to": 3}, headers=h))
    listed = ok(await client.get(entities_url(tenant), headers=h))["items"]
    assert [e["id"] for e in listed] == [created["id"]]


# --- invalid ids, query parameters, If-Match ------------------------------------------------

BAD_IDS = [
    "not-a-uuid", "123", "' OR '1'='1", "1;DROP TABLE entities", "$.a[*]", "%", "_", "\u0000",
    "00000000-0000-0000-0000-00000000000g", "00000000-0000-0000-0000-0000000000000",
    "0000000-0000-0000-0000-000000000000", "\u202e00000000-0000-0000-0000-000000000000",
    "x" * 5000,
]
ID_ROUTES: dict[str, tuple[str, str, dict[str, Any] | None, dict[str, Any] | None]] = {
    "GET": ("GET", "", None, None),
    "PUT": ("PUT", "", {"data": {"x": 1}}, None),
    "PATCH": ("PATCH", "", {"data": {"x": 1}}, None),
    "DELETE": ("DELETE", "", None, None),
    "history": ("GET", "/history", None, None),
    "diff": ("GET", "/diff", None, {"from": 1, "to": 1}),
    "undelete": ("POST", "/undelete", None, None),
    "restore": ("POST", "/restore", None, {"version": 1}),
}


@pytest.mark.parametrize("route", ID_ROUTES, ids=list(ID_ROUTES))
@pytest.mark.parametrize("bad", BAD_IDS, ids=range(len(BAD_IDS)))
async def test_invalid_uuid_in_path(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                    entity: dict[str, Any], route: str, bad: str) -> None:
    method, suffix, body, params = ID_ROUTES[route]
    before = await state(client, svc, tenant)
    r = await send(client, method, entity_url(tenant, quote(bad, safe="")) + suffix, body,
                   params=params, headers=tenant.headers)
    problem(r, 422, pointer="path:id")
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize("ids", [
    "not-a-uuid", "{id},not-a-uuid", "{id};DROP TABLE entities", "{id}' OR '1'='1", "$.a[*]",
    "{id},%", "\u0000", "{id} {id}", "{id}," + "x" * 40,
])
async def test_invalid_uuid_in_ids(client: httpx.AsyncClient, tenant: Tenant, entity: dict[str, Any],
                                   ids: str) -> None:
    r = await client.get(f"{org_url(tenant)}/entities", params={"ids": ids.replace("{id}", entity["id"])},
                         headers=tenant.headers)
    problem(r, 422, pointer="query:ids")


async def test_too_many_ids(client: httpx.AsyncClient, tenant: Tenant, entity: dict[str, Any]) -> None:
    url = f"{org_url(tenant)}/entities"
    ids = [str(uuid.uuid4()) for _ in range(100)]
    assert ok(await client.get(url, params={"ids": ",".join([entity["id"], *ids[1:]])},
                               headers=tenant.headers))["items"] == [entity]
    one_over = problem(await client.get(url, params={"ids": ",".join([entity["id"], *ids])},
                                        headers=tenant.headers), 422, pointer="query:ids")
    assert "at most 100 ids" in one_over["detail"], "says what the limit is, in ids"
    problem(await client.get(url, params={"ids": ",".join([*ids, *ids])}, headers=tenant.headers),
            422, pointer="query:ids")


GARBAGE_AS_OF = [
    "yesterday", "now()", "2024-13-45", "2024-01-01T25:00:00", "2024-01-01T00:00:00+25:00",
    "'; DROP TABLE entities; --", "1e5", "-1", "0x10", "1.5", "²", "١", "$.a[*]", "%", "\u0000",
    "1" * 10, "2024-01-01" + "0" * 60,
]


@pytest.mark.parametrize("as_of", GARBAGE_AS_OF, ids=range(len(GARBAGE_AS_OF)))
async def test_garbage_as_of(client: httpx.AsyncClient, tenant: Tenant, entity: dict[str, Any],
                             as_of: str) -> None:
    for url in (entity_url(tenant, entity["id"]), entities_url(tenant)):
        r = await client.get(url, params={"as_of": as_of}, headers=tenant.headers)
        problem(r, 422, pointer="query:as_of")


async def test_as_of_out_of_range(client: httpx.AsyncClient, tenant: Tenant, entity: dict[str, Any]) -> None:
    url = entity_url(tenant, entity["id"])
    for as_of in ("0", "3", "999999999", "0001-01-01T00:00:00", "0001-01-01T00:00:00+14:00"):
        problem(await client.get(url, params={"as_of": as_of}, headers=tenant.headers), 404)
    # A listing takes a moment only, and far moments are simply empty or current.
    problem(await client.get(entities_url(tenant), params={"as_of": "2"}, headers=tenant.headers), 422,
            pointer="query:as_of")
    for as_of, count in (("0001-01-01T00:00:00", 0), ("9999-12-31T23:59:59.999999-14:00", 1)):
        page = ok(await client.get(entities_url(tenant), params={"as_of": as_of}, headers=tenant.headers))
        assert len(page["items"]) == count


async def test_an_as_of_that_takes_only_a_time_says_so(client: httpx.AsyncClient, tenant: Tenant,
                                                       entity: dict[str, Any]) -> None:
    """Where a version number means nothing (a listing, the graph, a document), a number and
    text that is no time get the same answer: a time is what to send. (Garbage was told "a
    version number or an ISO 8601 time", and the number it then sent was refused.)"""
    h, eid = tenant.headers, entity["id"]
    ok(await client.post(f"{org_url(tenant)}/projects/{tenant.project_slug}/docs", json={"id": "as-of-doc"},
                         headers=h), 201)
    urls = {entities_url(tenant): {}, f"{org_url(tenant)}/docs/as-of-doc/state": {},
            **{f"{entity_url(tenant, eid)}/{walk}": {} for walk in ("neighbors", "reachable", "dependents")},
            f"{entity_url(tenant, eid)}/lineage": {}, f"{org_url(tenant)}/graph/path": {"from": eid, "to": eid}}
    for url, params in urls.items():
        for as_of in ("3", "yesterday"):
            said = problem(await client.get(url, params={**params, "as_of": as_of}, headers=h), 422,
                           pointer="query:as_of")
            assert "ISO 8601 time" in said["detail"] and "version" not in said["detail"], (url, said)
    # a number where a body or a search takes a time is no Unix time (pydantic's reading of it)
    for number in (5, "5", "1.5e9", " 17 "):
        said = problem(await client.post(f"{org_url(tenant)}/graph/subgraph", headers=h,
                                         json={"roots": [eid], "as_of": number}), 422, pointer="/as_of")
        assert "ISO 8601 time" in said["detail"], said
        for bound in ("updated_after", "updated_before"):
            said = problem(await client.get(f"{org_url(tenant)}/search", params={bound: number}, headers=h),
                           422, pointer=f"query:{bound}")
            assert "ISO 8601 time" in said["detail"], said
    for moment in ("2999-11-27T10:00:00Z", "2999-11-27"):
        ok(await client.post(f"{org_url(tenant)}/graph/subgraph", headers=h, json={"roots": [eid], "as_of": moment}))
        ok(await client.get(f"{org_url(tenant)}/search", params={"updated_after": moment}, headers=h))


@pytest.mark.parametrize(("params", "pointer"), [
    ({"limit": "0"}, "query:limit"),
    ({"limit": "-1"}, "query:limit"),
    ({"limit": "100000"}, "query:limit"),
    ({"limit": "99999999999999999999999"}, "query:limit"),
    ({"limit": "1.5"}, "query:limit"),
    ({"limit": "ten"}, "query:limit"),
    ({"limit": "1; DROP TABLE entities"}, "query:limit"),
    ({"after": "garbage"}, "query:after"),
    ({"after": "' OR '1'='1"}, "query:after"),
    ({"after": "x" * 65}, "query:after"),
    ({"type": "x" * 201}, "query:type"),
])
async def test_bad_list_parameters(client: httpx.AsyncClient, tenant: Tenant, entity: dict[str, Any],
                                   params: dict[str, str], pointer: str) -> None:
    problem(await client.get(entities_url(tenant), params=params, headers=tenant.headers), 422,
            pointer=pointer)


@pytest.mark.parametrize("walk", ["neighbors", "dependents"])
@pytest.mark.parametrize("cursor", ["garbage", "2:' OR '1'='1", "9:00000000-0000-0000-0000-000000000000"])
async def test_a_bad_graph_cursor_names_the_query_parameter(client: httpx.AsyncClient, tenant: Tenant,
                                                            entity: dict[str, Any], walk: str,
                                                            cursor: str) -> None:
    r = await client.get(f"{entity_url(tenant, entity['id'])}/{walk}", params={"cursor": cursor},
                         headers=tenant.headers)
    problem(r, 422, pointer="query:cursor")


@pytest.mark.parametrize("params", [
    {"limit": "0"}, {"limit": "100000"}, {"before": "0"}, {"before": "abc"}, {"before": str(2**31)},
])
async def test_bad_history_parameters(client: httpx.AsyncClient, tenant: Tenant, entity: dict[str, Any],
                                      params: dict[str, str]) -> None:
    r = await client.get(entity_url(tenant, entity["id"]) + "/history", params=params, headers=tenant.headers)
    problem(r, 422)


GARBAGE_IF_MATCH: list[str | bytes] = [
    "abc", '"abc"', "'; DROP TABLE entities; --", '"1", "x"', '"-1"', '"1.0"', "W/", '""', '"1234567890"',
    '"2"; --', "$.a[*]", "x" * 10_000, b'"\xb2"', b'W/"\xb9"', b'"\xd9\xa2"',
]
WRITE_ROUTES = {
    "PUT": ("PUT", {"data": {"title": "changed"}}),
    "PATCH": ("PATCH", {"data": {"title": "changed"}}),
    "DELETE": ("DELETE", None),
}


@pytest.mark.parametrize("route", WRITE_ROUTES)
@pytest.mark.parametrize("if_match", GARBAGE_IF_MATCH, ids=range(len(GARBAGE_IF_MATCH)))
async def test_garbage_if_match_is_400(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                       entity: dict[str, Any], route: str, if_match: str | bytes) -> None:
    method, body = WRITE_ROUTES[route]
    before = await state(client, svc, tenant)
    r = await send(client, method, entity_url(tenant, entity["id"]), body,
                   headers={**tenant.headers, "If-Match": if_match})
    problem(r, 400)
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize("route", WRITE_ROUTES)
async def test_if_match_with_a_list_holds_if_any_version_is_current(
        client: httpx.AsyncClient, svc: Services, tenant: Tenant, entity: dict[str, Any], route: str) -> None:
    """RFC 9110: If-Match may name several tags. The entity is at version 2."""
    method, body = WRITE_ROUTES[route]
    before = await state(client, svc, tenant)
    r = await send(client, method, entity_url(tenant, entity["id"]), body,
                   headers={**tenant.headers, "If-Match": '"1", W/"3", "7"'})
    assert problem(r, 409)["current_version"] == 2
    assert await state(client, svc, tenant) == before
    r = await send(client, method, entity_url(tenant, entity["id"]), body,
                   headers={**tenant.headers, "If-Match": '"5", "2", "1"'})
    assert r.status_code == 200 and r.headers["etag"] == '"3"', r.text


@pytest.mark.parametrize("route", WRITE_ROUTES)
@pytest.mark.parametrize("if_match", ['"1"', 'W/"1"', "1", '"3"', '"999999999"'])
async def test_stale_if_match_is_409_and_changes_nothing(client: httpx.AsyncClient, svc: Services,
                                                         tenant: Tenant, entity: dict[str, Any],
                                                         route: str, if_match: str) -> None:
    method, body = WRITE_ROUTES[route]
    assert entity["version"] == 2
    before = await state(client, svc, tenant)
    r = await send(client, method, entity_url(tenant, entity["id"]), body,
                   headers={**tenant.headers, "If-Match": if_match})
    assert problem(r, 409)["current_version"] == 2
    assert await state(client, svc, tenant) == before
    # The ETag it handed out works.
    r = await send(client, method, entity_url(tenant, entity["id"]), body,
                   headers={**tenant.headers, "If-Match": '"2"'})
    assert ok(r)["version"] == 3


# --- metacharacters in every string field ---------------------------------------------------


async def test_odd_text_in_data_round_trips_exactly(client: httpx.AsyncClient, tenant: Tenant) -> None:
    h = tenant.headers
    data = {text: text for text in ODD_TEXT}
    data["nested"] = {"list": list(ODD_TEXT), "by key": {t: [t, {t: t}] for t in ODD_TEXT[:20]}}
    data["numbers"] = [0, -1, 1.5, 0.1, 2**63, -(2**70), 1e-7, 12345.678, True, False, None]
    created = ok(await client.post(entities_url(tenant), json={"type": "note", "data": data}, headers=h), 201)
    assert created["data"] == data
    url = entity_url(tenant, created["id"])
    assert ok(await client.get(url, headers=h))["data"] == data
    assert ok(await client.get(f"{org_url(tenant)}/entities", params={"ids": created["id"]},
                               headers=h))["items"][0]["data"] == data
    listed = ok(await client.get(entities_url(tenant), params={"type": "note"}, headers=h))["items"]
    assert [e["data"] for e in listed] == [data]

    # Every odd key changed, then removed, by merge patches; history rebuilds each version.
    changed = {text: text[::-1] + "!" for text in ODD_TEXT}
    after_patch = {**data, **changed}
    assert ok(await client.patch(url, json={"data": changed}, headers=h))["data"] == after_patch
    removed = {text: None for text in ODD_TEXT[::2]}
    after_removal = {k: v for k, v in after_patch.items() if k not in removed}
    assert ok(await client.patch(url, json={"data": removed}, headers=h))["data"] == after_removal
    replaced = {"only": ODD_TEXT}
    assert ok(await client.put(url, json={"data": replaced}, headers=h))["data"] == replaced
    for version, expected in enumerate([data, after_patch, after_removal, replaced], start=1):
        got = ok(await client.get(url, params={"as_of": str(version)}, headers=h))
        assert (got["version"], got["data"]) == (version, expected)
    diff = ok(await client.get(url + "/diff", params={"from": 1, "to": 3}, headers=h))
    assert diff["patch"]
    assert len(ok(await client.get(url + "/history", headers=h))["items"]) == 4


@pytest.mark.parametrize("bad", UNSTORABLE, ids=list(UNSTORABLE))
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
async def test_unstorable_text_in_data_is_refused(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                                  entity: dict[str, Any], method: str, bad: str) -> None:
    url = entities_url(tenant) if method == "POST" else entity_url(tenant, entity["id"])
    body: dict[str, Any] = {"data": UNSTORABLE[bad]}
    if method == "POST":
        body["type"] = "note"
    before = await state(client, svc, tenant)
    refused = problem(await send(client, method, url, body, headers=tenant.headers), 422, pointer="/data")
    assert await state(client, svc, tenant) == before
    if "nul" in bad:  # said before the database is asked (its refusal aborted the request's pipeline)
        assert "NUL" in refused["detail"], refused


BAD_SLUGS = [
    "", "-lead", "UPPER", "a_b", "a b", "a.b", "a'b", 'a"b', "a;b", "a/*b", "a\\b", "$.a[*]", "a@@b",
    "a:*", "a%", "%", "_", "café", "a\u200fb", "\u202eabc", "a\u0000b", "a\ud800b", "x" * 64, "x" * 10_000,
    "' OR '1'='1", "'; DROP TABLE orgs; --", "a\nb", "ab\n", "a-\u0301",
]
ODD_NAMES = [
    "'", "O'Brien & \"Sons\"; --", "/* c */ x", "\\", "$.a[*] @@ :* % _", "' OR '1'='1",
    "'; DROP TABLE projects; --", "Ünïcödé 日本語 🎨", "\u200fשלום\u200f", "\u202eevil", "x" * 200,
    "tab\there", "e\u0301",
]
BAD_NAMES = ["a\u0000b", "\u0000", "a\ud800", "\udfffz", "x" * 201, "x" * 10_000]


@pytest.mark.parametrize("slug", BAD_SLUGS, ids=range(len(BAD_SLUGS)))
async def test_bad_org_slug_is_422(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                   slug: str) -> None:
    before = await state(client, svc, tenant)
    problem(await send(client, "POST", "/v1/orgs", {"slug": slug}, headers=tenant.headers), 422,
            pointer="/slug")
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize("name", ODD_NAMES, ids=range(len(ODD_NAMES)))
async def test_odd_org_name_round_trips(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                        name: str) -> None:
    slug = unique("odd")
    created = ok(await send(client, "POST", "/v1/orgs", {"slug": slug, "name": name},
                            headers=tenant.headers), 201)
    assert (created["slug"], created["name"]) == (slug, name)
    assert (await svc.tenancy.resolve_org(slug)).name == name


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
async def test_bad_org_name_is_422(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                   name: str) -> None:
    before = await state(client, svc, tenant)
    problem(await send(client, "POST", "/v1/orgs", {"slug": unique("bad"), "name": name},
                       headers=tenant.headers), 422)
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize("slug", BAD_SLUGS, ids=range(len(BAD_SLUGS)))
async def test_bad_project_slug_is_422(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                       slug: str) -> None:
    before = await state(client, svc, tenant)
    problem(await send(client, "POST", f"{org_url(tenant)}/projects", {"slug": slug},
                       headers=tenant.headers), 422, pointer="/slug")
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize("name", ODD_NAMES, ids=range(len(ODD_NAMES)))
async def test_odd_project_name_round_trips(client: httpx.AsyncClient, tenant: Tenant, name: str) -> None:
    created = ok(await send(client, "POST", f"{org_url(tenant)}/projects", {"slug": "odd", "name": name},
                            headers=tenant.headers), 201)
    assert (created["slug"], created["name"]) == ("odd", name)
    listed = ok(await client.get(f"{org_url(tenant)}/projects", headers=tenant.headers))["items"]
    assert {p["slug"]: p["name"] for p in listed}["odd"] == name


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
async def test_bad_project_name_is_422(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                       name: str) -> None:
    before = await state(client, svc, tenant)
    problem(await send(client, "POST", f"{org_url(tenant)}/projects", {"slug": "bad", "name": name},
                       headers=tenant.headers), 422)
    assert await state(client, svc, tenant) == before


BAD_TYPE_NAMES = [
    "Note", "note'", "note;--", "no te", "$.a[*]", "note%", "%", "_", "1note", "note.", ".note", "a..b",
    "a.b.c.d.e.f", "note\u0000", "note\ud800", "café", "note\u200f", "'; DROP TABLE entity_types; --",
    "note/*", "note\\", "note@@", "note:*", "note\n", "x" * 201,
]


@pytest.mark.parametrize("name", BAD_TYPE_NAMES, ids=range(len(BAD_TYPE_NAMES)))
async def test_bad_entity_type_name_is_422(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                           name: str) -> None:
    h = tenant.headers
    before = await state(client, svc, tenant)
    problem(await send(client, "POST", f"{org_url(tenant)}/entity-types", {"name": name}, headers=h), 422)
    problem(await send(client, "POST", entities_url(tenant), {"type": name, "data": {}}, headers=h), 422,
            pointer="/type")
    r = await client.get(f"{entities_url(tenant)}?type={q(name)}", headers=h)
    problem(r, 422, pointer="query:type")
    assert await state(client, svc, tenant) == before
    r = await client.get(f"{org_url(tenant)}/entity-types/{q(name)}", headers=h)
    assert r.status_code in (404, 422), r.text
    problem(r, r.status_code)


async def test_type_filter_is_not_a_pattern(client: httpx.AsyncClient, tenant: Tenant) -> None:
    """``_`` is legal in a type name; it must match itself, not any character."""
    ok(await client.post(entities_url(tenant), json={"type": "note", "data": {}}, headers=tenant.headers), 201)
    for pattern in ("n_te", "no_e", "n__e"):
        page = ok(await client.get(entities_url(tenant), params={"type": pattern}, headers=tenant.headers))
        assert page["items"] == []


@pytest.mark.parametrize(("field", "value", "pointer"), [
    ("text_fields", {"title'; --": "A"}, None),
    ("text_fields", {"$.a[*]": "A"}, None),
    ("text_fields", {"title\n": "A"}, None),
    ("text_fields", {"title": "A'; --"}, "/text_fields/title"),
    ("text_fields", {"title": "\u0000"}, "/text_fields/title"),
    ("reference_fields", ["$.a[?(@.b)]"], "/reference_fields/0"),
    ("reference_fields", ["$..a"], "/reference_fields/0"),
    ("reference_fields", ["$.parent", "$.a'--"], "/reference_fields/1"),
    ("reference_fields", ["$.a\u0000"], "/reference_fields/0"),
    ("reference_fields", ["$.parent\n"], "/reference_fields/0"),
    ("embed_fields", ["body", "body; DROP"], "/embed_fields/1"),
    ("tag_field", "tags' OR '1'='1", "/tag_field"),
    ("tag_field", "%", "/tag_field"),
    ("tag_field", "tags\n", "/tag_field"),
    ("embed_fields", ["body\n"], "/embed_fields/0"),
    ("module", "x" * 101, "/module"),
    ("module", "mod\u0000ule", None),
    ("module", "mod\ud800", "/module"),
    ("json_schema", {"title": "\u0000"}, None),
    ("json_schema", {"\ud800": {}}, None),
])
async def test_bad_entity_type_declaration_is_422(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                                  field: str, value: Any, pointer: str | None) -> None:
    before = await state(client, svc, tenant)
    r = await send(client, "POST", f"{org_url(tenant)}/entity-types", {"name": "odd.type", field: value},
                   headers=tenant.headers)
    problem(r, 422, pointer=pointer)
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize("text", ODD_TEXT[:40], ids=range(40))
async def test_metacharacters_in_query_parameters(client: httpx.AsyncClient, tenant: Tenant,
                                                  entity: dict[str, Any], text: str) -> None:
    h = tenant.headers
    if TYPE_NAME.fullmatch(text):  # 'null' and 'true' are fine type names
        assert ok(await client.get(entities_url(tenant), params={"type": text}, headers=h))["items"] == []
    elif text:  # an empty type/after means no filter / the first page
        problem(await client.get(entities_url(tenant), params={"type": text}, headers=h), 422,
                pointer="query:type")
    if text:
        problem(await client.get(entities_url(tenant), params={"after": text}, headers=h), 422,
                pointer="query:after")
    if any(part.strip() for part in text.split(",")):
        problem(await client.get(f"{org_url(tenant)}/entities", params={"ids": text}, headers=h), 422)
    # Unknown query parameters are ignored, whatever they hold.
    got = ok(await client.get(entity_url(tenant, entity["id"]), params={text or "x": text}, headers=h))
    assert got == entity


@pytest.mark.parametrize("text", ODD_TEXT[:40], ids=range(40))
async def test_metacharacters_in_path_names(client: httpx.AsyncClient, tenant: Tenant, text: str) -> None:
    """Org, project and type names in paths are looked up, never interpreted: 404 (or 422)."""
    h = tenant.headers
    name = q(text) or "%20"
    for url in (f"/v1/orgs/{name}/projects", f"{org_url(tenant)}/projects/{name}/entities",
                f"{org_url(tenant)}/entity-types/{name}"):
        r = await client.get(url, headers=h, follow_redirects=True)  # a trailing '/' redirects
        assert r.status_code in (404, 422), f"{url}: {r.status_code} {r.text[:200]}"
        problem(r, r.status_code)


@pytest.mark.parametrize("text", ["a\u0000b", "\u0000", "main\u0000", "main'--", "\ud800"])
async def test_unstorable_text_in_path_names(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                             text: str) -> None:
    """Paths cannot hold what a text column cannot: 404 or 422, never a database error."""
    o, n = org_url(tenant), q(text)
    requests = [
        ("GET", f"/v1/orgs/{n}/projects", None),
        ("POST", f"/v1/orgs/{n}/projects", {"slug": "fine"}),
        ("POST", f"/v1/orgs/{n}/members", {"email": "someone@example.com"}),
        ("GET", f"{o}/projects/{n}/entities", None),
        ("POST", f"{o}/projects/{n}/entities", {"type": "note", "data": {}}),
        ("PUT", f"{o}/projects/{n}/members/someone@example.com", {"role": "viewer"}),
        ("PUT", f"{o}/projects/main/members/{n}", {"role": "viewer"}),
        ("GET", f"{o}/entity-types/{n}", None),
    ]
    before = await state(client, svc, tenant)
    for method, url, body in requests:
        r = await send(client, method, url, body, headers=tenant.headers)
        assert r.status_code in (404, 422), f"{method} {url}: {r.status_code} {r.text[:200]}"
        problem(r, r.status_code)
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize("email", ["o'brien@example.com", "a;b--@example.com", "$.a[*]@x", "%_@x", "日本@例え.jp"])
async def test_odd_member_email_round_trips(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                            email: str) -> None:
    added = ok(await client.post(f"{org_url(tenant)}/members", json={"email": email}, headers=tenant.headers), 201)
    assert added["email"] == email
    assert str(await svc.tenancy.user_by_email(email)) == added["user_id"]
    r = await client.put(f"{org_url(tenant)}/projects/main/members/{q(email)}", json={"role": "viewer"},
                         headers=tenant.headers)
    assert r.status_code == 204, r.text


@pytest.mark.parametrize(("body", "pointer"), [
    ({"email": "no-at-sign"}, "/email"),
    ({"email": "a@b@c"}, "/email"),
    ({"email": "a\u0000@example.com"}, "/email"),
    ({"email": "a b@example.com"}, "/email"),
    ({"email": "a\ud800@example.com"}, "/email"),
    ({"email": "x" * 321}, "/email"),
    ({"email": "ok@example.com", "role": "superuser"}, "/role"),
    ({"email": "ok@example.com", "role": "admin'; --"}, "/role"),
    ({"email": "ok@example.com", "role": None}, "/role"),
])
async def test_bad_member_is_422(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                 body: dict[str, Any], pointer: str) -> None:
    before = await state(client, svc, tenant)
    problem(await send(client, "POST", f"{org_url(tenant)}/members", body, headers=tenant.headers), 422,
            pointer=pointer)
    assert await state(client, svc, tenant) == before


async def test_owners_are_changed_only_by_owners_and_one_always_remains(
        client: httpx.AsyncClient, svc: Services, tenant: Tenant, other_tenant: Tenant) -> None:
    members = f"{org_url(tenant)}/members"
    owner_email = f"{tenant.slug}@example.com"  # as make_tenant registers it
    admin_email = f"{unique('admin')}@example.com"
    ok(await client.post(members, json={"email": admin_email, "role": "admin"}, headers=tenant.headers), 201)
    _, admin_token = await svc.tenancy.create_token(await svc.tenancy.user_by_email(admin_email))
    as_admin = {"Authorization": f"Bearer {admin_token}"}
    before = await state(client, svc, tenant)
    for body in ({"email": owner_email, "role": "member"}, {"email": owner_email, "role": "admin"},
                 {"email": admin_email, "role": "owner"}, {"email": "new@example.com", "role": "owner"}):
        problem(await client.post(members, json=body, headers=as_admin), 403)
    problem(await client.post(members, json={"email": owner_email, "role": "admin"}, headers=tenant.headers),
            409)  # the last owner
    assert await state(client, svc, tenant) == before
    # a member's role changed: 200, not 201 (nothing was created)
    ok(await client.post(members, json={"email": admin_email, "role": "owner"}, headers=tenant.headers), 200)
    ok(await client.post(members, json={"email": owner_email, "role": "member"}, headers=as_admin), 200)
    problem(await client.post(f"{org_url(tenant)}/projects", json={"slug": "p2", "name": "p2"},
                              headers=tenant.headers), 403)  # the old owner is a member now

    # Whether an email is registered (here, in another org) is not told by the project routes.
    project_member = f"{org_url(other_tenant)}/projects/main/members/"
    foreign = ok(await client.post(f"{org_url(tenant)}/members", json={"email": "elsewhere@example.com"},
                                   headers=as_admin), 201)["email"]
    answers = [problem(await client.put(project_member + q(email), json={"role": "viewer"},
                                        headers=other_tenant.headers), 404)["detail"]
               for email in (foreign, f"{unique('nobody')}@example.com")]
    assert answers[0] == answers[1]
    # A member who may not manage members learns nothing of emails either: 403 before any lookup.
    member_email = f"{unique('member')}@example.com"
    ok(await client.post(members, json={"email": member_email}, headers=as_admin), 201)  # an owner now
    member_id = await svc.tenancy.user_by_email(member_email)
    await svc.tenancy.set_project_role(tenant.owner, tenant.project_id, member_id, "editor")
    _, member_token = await svc.tenancy.create_token(member_id)
    for email in (foreign, f"{unique('nobody')}@example.com"):
        problem(await client.put(f"{org_url(tenant)}/projects/main/members/{q(email)}", json={"role": "viewer"},
                                 headers={"Authorization": f"Bearer {member_token}"}), 403)


@pytest.mark.parametrize("role", ["owner", "admin", "editor'--", "", None, 1])
async def test_bad_project_role_is_422(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                       role: Any) -> None:
    email = f"{unique('m')}@example.com"
    ok(await client.post(f"{org_url(tenant)}/members", json={"email": email}, headers=tenant.headers), 201)
    before = await state(client, svc, tenant)
    r = await client.put(f"{org_url(tenant)}/projects/main/members/{email}",
                         json={"role": role}, headers=tenant.headers)
    problem(r, 422, pointer="/role")
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize("text", [t for t in ODD_TEXT if t.isascii() and t.isprintable()][:30])
async def test_metacharacters_in_headers(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                         entity: dict[str, Any], text: str) -> None:
    url = entity_url(tenant, entity["id"])
    for auth in (f"Bearer {text}", f"Bearer cdb_{text}", f"{text} {tenant.token}", text):
        problem(await client.get(url, headers={"Authorization": auth}), 401)
    before = await state(client, svc, tenant)
    r = await client.patch(url, json={"data": {"x": 1}}, headers={**tenant.headers, "If-Match": text})
    problem(r, 409 if text.strip('" ').isdigit() else 400)
    # Odd content types: JSON is read only when declared as JSON.
    r = await client.post(entities_url(tenant), content=as_json({"type": "note", "data": {}}),
                          headers={**tenant.headers, "Content-Type": f"text/{text}"})
    assert len(problem(r, 415)["detail"]) < 200
    assert await state(client, svc, tenant) == before


# --- JSON Schema ----------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "status": {"enum": ["todo", "doing", "done"]},
        "points": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"type": "string"}},
        "a/b~c": {"type": "string"},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}}},
    },
    "required": ["status"],
}
SCHEMA_FAILURES = [
    ({"status": "bogus"}, "/data/status"),
    ({"status": "'; DROP TABLE entities; --"}, "/data/status"),
    ({"status": "todo", "points": -1}, "/data/points"),
    ({"status": "todo", "points": "3"}, "/data/points"),
    ({"status": "todo", "tags": ["ok", 7]}, "/data/tags/1"),
    ({"status": "todo", "a/b~c": 1}, "/data/a~1b~0c"),
    ({"status": "todo", "owner": {"name": "x" * 11}}, "/data/owner/name"),
    ({"points": 1}, "/data"),
]


@pytest.fixture
async def typed(client: httpx.AsyncClient, tenant: Tenant) -> dict[str, Any]:
    """A ``kanban.card`` type with SCHEMA, and one valid card."""
    ok(await client.post(f"{org_url(tenant)}/entity-types", json={"name": "kanban.card", "json_schema": SCHEMA},
                         headers=tenant.headers), 201)
    return ok(await client.post(entities_url(tenant), json={"type": "kanban.card", "data": {
        "status": "todo", "points": 3, "tags": ["a"], "a/b~c": "x", "owner": {"name": "ann"}}},
        headers=tenant.headers), 201)


@pytest.mark.parametrize(("data", "pointer"), SCHEMA_FAILURES)
async def test_schema_failure_names_the_field(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                              typed: dict[str, Any], data: dict[str, Any],
                                              pointer: str) -> None:
    h = tenant.headers
    before = await state(client, svc, tenant)
    problem(await client.post(entities_url(tenant), json={"type": "kanban.card", "data": data}, headers=h),
            422, pointer=pointer)
    problem(await client.put(entity_url(tenant, typed["id"]), json={"data": data}, headers=h), 422,
            pointer=pointer)
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize(("merge", "pointer"), [
    ({"status": "bogus"}, "/data/status"),
    ({"status": None}, "/data"),
    ({"tags": ["x", 1]}, "/data/tags/1"),
    ({"owner": {"name": "x" * 11}}, "/data/owner/name"),
])
async def test_schema_failure_on_patch(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                       typed: dict[str, Any], merge: dict[str, Any], pointer: str) -> None:
    before = await state(client, svc, tenant)
    problem(await client.patch(entity_url(tenant, typed["id"]), json={"data": merge}, headers=tenant.headers),
            422, pointer=pointer)
    assert await state(client, svc, tenant) == before


async def test_schema_valid_data_is_accepted(client: httpx.AsyncClient, tenant: Tenant,
                                             typed: dict[str, Any]) -> None:
    h = tenant.headers
    url = entity_url(tenant, typed["id"])
    assert ok(await client.patch(url, json={"data": {"status": "done", "points": None}}, headers=h))["version"] == 2
    ok(await client.put(url, json={"data": {"status": "doing", "tags": []}}, headers=h))
    ok(await client.post(entities_url(tenant), json={"type": "kanban.card", "data": {"status": "todo"}},
                         headers=h), 201)


@pytest.mark.parametrize(("schema", "pointer"), [
    ({"type": "nonsense"}, "/json_schema/type"),
    ({"type": 5}, "/json_schema/type"),
    ({"properties": []}, "/json_schema/properties"),
    ({"properties": {"a": {"pattern": "("}}}, "/json_schema/properties/a/pattern"),
    ({"required": "status"}, "/json_schema/required"),
    ({"minimum": "zero"}, "/json_schema/minimum"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, None),
    ({"$ref": "#/nowhere"}, None),
    # python-jsonschema itself fails on these (a TypeError, a RecursionError): refused before it
    ({"$schema": 5}, "/json_schema/$schema"),
    ({"$schema": True}, "/json_schema/$schema"),
    ({"$schema": []}, "/json_schema/$schema"),
    ({"$schema": {}}, "/json_schema/$schema"),
    (json.loads('{"items":' * 120 + "{}" + "}" * 120), "/json_schema"),
    (json.loads('{"properties": {"a":' * 150 + "{}" + "}}" * 150), "/json_schema"),
])
async def test_invalid_json_schema_is_refused_at_registration(
    client: httpx.AsyncClient, svc: Services, tenant: Tenant, schema: dict[str, Any], pointer: str | None
) -> None:
    before = await state(client, svc, tenant)
    r = await client.post(f"{org_url(tenant)}/entity-types", json={"name": "bad.schema", "json_schema": schema},
                          headers=tenant.headers)
    body = problem(r, 422, pointer=pointer)
    assert body.get("pointer", "").startswith("/json_schema"), body
    assert await state(client, svc, tenant) == before


@pytest.mark.parametrize(("schema", "data", "pointer"), [
    # backtracking without end in Python's re: 3 s at 28 characters, doubling with each one more
    ({"properties": {"t": {"type": "string", "pattern": "^(a+)+$"}}}, {"t": "a" * 64 + "!"}, "/data/t"),
    ({"patternProperties": {"^(a|aa)+$": {"type": "string"}}}, {"a" * 64: 1}, "/data/" + "a" * 64),
    # a backreference needs backtracking: bounded, and a refusal once past the bound
    ({"properties": {"t": {"pattern": "^(a*)*b\\1$"}}}, {"t": "a" * 5000}, "/data/t"),
    ({"$ref": "#"}, None, None),  # refers to itself without end: every value matches
    ({"$defs": {"x": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"}, None, None),
    ({"properties": {"child": {"$ref": "#"}, "n": {"type": "integer"}}},  # a tree, checked all the way down
     {"child": {"child": {"child": {"n": "x"}}}}, "/data/child/child/child/n"),
    (json.loads('{"items":' * 60 + '{"type": "integer"}' + "}" * 60), None, None),  # deep, within the cap
])
async def test_hostile_schemas_never_stall_or_fail_a_write(
    client: httpx.AsyncClient, tenant: Tenant, schema: dict[str, Any], data: dict[str, Any] | None,
    pointer: str | None
) -> None:
    """A tenant's schema runs on every write of its type, inside the server: whatever it says,
    a write is answered at once with 201 or a 422 naming the field (never a 500)."""
    r = await client.post(f"{org_url(tenant)}/entity-types", json={"name": "hostile.type", "json_schema": schema},
                          headers=tenant.headers)
    if r.status_code == 422:  # refused at registration, as a schema it cannot check
        problem(r, 422, pointer="/json_schema")
        return
    ok(r, 201)
    written = await client.post(entities_url(tenant), json={"type": "hostile.type", "data": data or {}},
                                headers=tenant.headers)
    if pointer is None:
        ok(written, 201)
    else:
        problem(written, 422, pointer=pointer)


async def test_json_schema_never_fetches_remote_references(client: httpx.AsyncClient, svc: Services,
                                                           tenant: Tenant) -> None:
    """A tenant's ``$ref`` to a URL must not make the server fetch it (SSRF)."""
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body = b'{"type": "string"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{server.server_address[1]}/internal/schema.json"
    before = await state(client, svc, tenant)
    try:
        registered = await client.post(f"{org_url(tenant)}/entity-types", json={
            "name": "remote.ref", "json_schema": {"properties": {"a": {"$ref": remote}}}},
            headers=tenant.headers)
        # Taken or not, the schema must not be fetched when data of the type is written.
        written = await client.post(entities_url(tenant), json={"type": "remote.ref", "data": {"a": 1}},
                                    headers=tenant.headers)
    finally:
        server.shutdown()
        server.server_close()
        assert hits == [], f"the server fetched a URL named in a tenant's schema: {hits}"
    problem(registered, 422)
    ok(written, 201)  # the type was not registered, so it has no schema
    assert ok(await client.get(f"{org_url(tenant)}/entity-types", headers=tenant.headers)) == before["types"]


# --- authentication and authorization -------------------------------------------------------

BAD_AUTH = {
    "no header": None,
    "empty": "",
    "basic scheme": "Basic dXNlcjpwYXNz",
    "token without scheme": "{token}",
    "scheme only": "Bearer",
    "blank token": "Bearer     ",
    "garbage token": "Bearer not-a-token",
    "prefix only": "Bearer cdb_",
    "unknown token": "Bearer cdb_" + "A" * 43,
    "sql": "Bearer cdb_' OR '1'='1",
    "two tokens": "Bearer {token} {token}",
    "token with junk": "Bearer {token}x",
    "very long": "Bearer cdb_" + "x" * 10_000,
    "non-ascii": "Bearer cdb_\u00e9\u00e8".encode(),
}


@pytest.mark.parametrize("auth", BAD_AUTH, ids=list(BAD_AUTH))
async def test_bad_credentials_are_401(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                                       entity: dict[str, Any], auth: str) -> None:
    value = BAD_AUTH[auth]
    if isinstance(value, str):
        value = value.replace("{token}", tenant.token)
    headers = {} if value is None else {"Authorization": value}
    before = await state(client, svc, tenant)
    url = entity_url(tenant, entity["id"])
    problem(await client.get(url, headers=headers), 401)
    problem(await client.get(entities_url(tenant), headers=headers), 401)
    problem(await client.patch(url, json={"data": {"x": 1}}, headers=headers), 401)
    problem(await client.post(entities_url(tenant), json={"type": "note", "data": {}}, headers=headers), 401)
    problem(await client.post("/v1/orgs", json={"slug": unique("anon")}, headers=headers), 401)
    assert await state(client, svc, tenant) == before


async def test_revoked_token_is_401_like_an_unknown_one(client: httpx.AsyncClient, svc: Services,
                                                        tenant: Tenant, entity: dict[str, Any]) -> None:
    _, token = await svc.tenancy.create_token(tenant.owner_id, name="soon revoked")
    url = entity_url(tenant, entity["id"])
    ok(await client.get(url, headers={"Authorization": f"Bearer {token}"}))
    await svc.tenancy.revoke_token(token)
    before = await state(client, svc, tenant)
    revoked = problem(await client.get(url, headers={"Authorization": f"Bearer {token}"}), 401)
    unknown = problem(await client.get(url, headers={"Authorization": f"Bearer cdb_{'B' * 43}"}), 401)
    assert revoked == unknown
    problem(await client.patch(url, json={"data": {"x": 1}}, headers={"Authorization": f"Bearer {token}"}), 401)
    assert await state(client, svc, tenant) == before


def _masked(r: httpx.Response, *secrets: str) -> str:
    text = r.text
    for secret in secrets:
        text = text.replace(secret, "<id>")
    return text


async def test_other_orgs_entity_is_404_without_leaking(client: httpx.AsyncClient, svc: Services,
                                                        tenant: Tenant, other_tenant: Tenant,
                                                        entity: dict[str, Any]) -> None:
    """``tenant`` owns the entity; ``other_tenant``'s owner probes for it both ways."""
    theirs, missing = entity["id"], str(uuid.uuid4())
    h = other_tenant.headers
    before = await state(client, svc, tenant)
    routes = [(m, s, b, p) for m, s, b, p in ID_ROUTES.values()]
    for method, suffix, body, params in routes:
        # Through the prober's own org: exactly as if the id did not exist.
        found = await send(client, method, entity_url(other_tenant, theirs) + suffix, body, params=params,
                           headers=h)
        absent = await send(client, method, entity_url(other_tenant, missing) + suffix, body, params=params,
                            headers=h)
        problem(found, 404)
        problem(absent, 404)
        assert _masked(found, theirs) == _masked(absent, missing)
        # Through the owner's org path (slug or id): the org itself is not found.
        for org in (tenant.slug, str(tenant.org_id)):
            url = f"/v1/orgs/{org}/entities/"
            found = await send(client, method, url + theirs + suffix, body, params=params, headers=h)
            absent = await send(client, method, url + missing + suffix, body, params=params, headers=h)
            nowhere = await send(client, method, f"/v1/orgs/{unique('nowhere')}/entities/{theirs}{suffix}",
                                 body, params=params, headers=h)
            problem(found, 404)
            assert found.text == absent.text
            assert _masked(found, org) == _masked(nowhere, nowhere.request.url.path.split("/")[3])
    ids = ",".join([theirs, missing])
    assert ok(await client.get(f"{org_url(other_tenant)}/entities", params={"ids": ids}, headers=h)) == {
        "items": []}
    problem(await client.get(f"{org_url(tenant)}/projects/main/entities", headers=h), 404)
    problem(await client.post(f"{org_url(tenant)}/projects/main/entities", json={"type": "note", "data": {}},
                              headers=h), 404)
    problem(await client.post(f"{org_url(tenant)}/projects", json={"slug": "intruder"}, headers=h), 404)
    problem(await client.post(f"{org_url(tenant)}/entity-types", json={"name": "intruder.type"}, headers=h), 404)
    # The same id is free in the prober's own org: a 409 here would reveal the entity.
    mine = ok(await client.post(entities_url(other_tenant), json={"id": theirs, "type": "note", "data": {}},
                                headers=h), 201)
    assert mine["org_id"] == str(other_tenant.org_id)
    assert await state(client, svc, tenant) == before


async def test_project_viewer_can_read_but_not_write(client: httpx.AsyncClient, svc: Services,
                                                     tenant: Tenant, entity: dict[str, Any]) -> None:
    viewer = await new_user(svc, tenant, "viewer")
    url = entity_url(tenant, entity["id"])
    assert ok(await client.get(url, headers=viewer)) == entity
    assert ok(await client.get(entities_url(tenant), headers=viewer))["items"] == [entity]
    assert len(ok(await client.get(url + "/history", headers=viewer))["items"]) == 2
    assert ok(await client.get(url, params={"as_of": "1"}, headers=viewer))["data"]["n"] == 1
    before = await state(client, svc, tenant)
    writes = [
        ("POST", entities_url(tenant), {"type": "note", "data": {}}, None),
        ("PUT", url, {"data": {"title": "viewer"}}, None),
        ("PATCH", url, {"data": {"title": "viewer"}}, None),
        ("DELETE", url, None, None),
        ("POST", url + "/undelete", None, None),
        ("POST", url + "/restore", None, {"version": 1}),
    ]
    for method, target, body, params in writes:
        for extra in ({}, {"If-Match": '"2"'}):
            r = await send(client, method, target, body, params=params, headers={**viewer, **extra})
            problem(r, 403)
    problem(await client.post(f"{org_url(tenant)}/projects", json={"slug": "viewer"}, headers=viewer), 403)
    problem(await client.post(f"{org_url(tenant)}/entity-types", json={"name": "viewer.type"}, headers=viewer),
            403)
    assert await state(client, svc, tenant) == before


async def test_member_without_project_role_gets_404(client: httpx.AsyncClient, svc: Services,
                                                    tenant: Tenant, entity: dict[str, Any]) -> None:
    stranger = await new_user(svc, tenant, None)
    missing = str(uuid.uuid4())
    before = await state(client, svc, tenant)
    for method, suffix, body, params in ID_ROUTES.values():
        found = await send(client, method, entity_url(tenant, entity["id"]) + suffix, body, params=params,
                           headers=stranger)
        absent = await send(client, method, entity_url(tenant, missing) + suffix, body, params=params,
                            headers=stranger)
        problem(found, 404)
        assert _masked(found, entity["id"]) == _masked(absent, missing)
    found = await client.get(entities_url(tenant), headers=stranger)
    absent = await client.get(f"{org_url(tenant)}/projects/nope/entities", headers=stranger)
    problem(found, 404)
    assert _masked(found, "main") == _masked(absent, "nope")
    problem(await client.post(entities_url(tenant), json={"type": "note", "data": {}}, headers=stranger), 404)
    assert ok(await client.get(f"{org_url(tenant)}/entities", params={"ids": entity["id"]},
                               headers=stranger)) == {"items": []}
    assert ok(await client.get(f"{org_url(tenant)}/projects", headers=stranger)) == {"items": []}
    assert await state(client, svc, tenant) == before


# --- concurrent writers ---------------------------------------------------------------------


async def test_concurrent_patches_with_the_same_if_match(client: httpx.AsyncClient, tenant: Tenant,
                                                         entity: dict[str, Any]) -> None:
    url = entity_url(tenant, entity["id"])
    etag = f'"{entity["version"]}"'
    responses = await asyncio.gather(*(
        client.patch(url, json={"data": {"writer": i}}, headers={**tenant.headers, "If-Match": etag})
        for i in range(20)
    ))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * 19, statuses
    winner = next(r for r in responses if r.status_code == 200).json()
    for r in responses:
        if r.status_code == 409:
            assert problem(r, 409)["current_version"] == entity["version"] + 1
    final = ok(await client.get(url, headers=tenant.headers))
    assert final == winner
    assert final["version"] == entity["version"] + 1
    history = ok(await client.get(url + "/history", headers=tenant.headers))["items"]
    assert [v["version"] for v in history] == [3, 2, 1]


async def test_concurrent_patches_without_if_match_all_land(client: httpx.AsyncClient,
                                                            tenant: Tenant) -> None:
    h = tenant.headers
    created = ok(await client.post(entities_url(tenant), json={"type": "note", "data": {"start": True}},
                                   headers=h), 201)
    url = entity_url(tenant, created["id"])
    responses = await asyncio.gather(*(
        client.patch(url, json={"data": {f"key{i}": i}}, headers=h) for i in range(20)
    ))
    assert [r.status_code for r in responses] == [200] * 20
    assert sorted(r.json()["version"] for r in responses) == list(range(2, 22))
    final = ok(await client.get(url, headers=h))
    assert final["version"] == created["version"] + 20
    assert final["data"] == {"start": True, **{f"key{i}": i for i in range(20)}}
    history = ok(await client.get(url + "/history", headers=h))["items"]
    assert [v["version"] for v in history] == list(range(21, 0, -1))
    # Every version rebuilds to a document with exactly one key more than the one before.
    sizes = [len(ok(await client.get(url, params={"as_of": str(v)}, headers=h))["data"]) for v in range(1, 22)]
    assert sizes == list(range(1, 22))


async def test_concurrent_creates_with_the_same_id(client: httpx.AsyncClient, tenant: Tenant) -> None:
    wanted = str(uuid.uuid4())
    responses = await asyncio.gather(*(
        client.post(entities_url(tenant), json={"id": wanted, "type": "note", "data": {"writer": i}},
                    headers=tenant.headers)
        for i in range(20)
    ))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 19, statuses
    for r in responses:
        if r.status_code == 409:
            problem(r, 409)
    winner = next(r for r in responses if r.status_code == 201).json()
    url = entity_url(tenant, wanted)
    assert ok(await client.get(url, headers=tenant.headers)) == winner
    assert len(ok(await client.get(url + "/history", headers=tenant.headers))["items"]) == 1
