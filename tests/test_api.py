"""The HTTP API end to end: the happy paths, headers and status codes."""

from __future__ import annotations

import inspect
import time
import uuid

import httpx
from conftest import Tenant
from fastapi.routing import APIRoute, APIWebSocketRoute

from canvasdb.api import attachments, create_app, documents, entities, graph, search, tenants
from canvasdb.db import Database
from canvasdb.services import Services
from canvasdb.settings import Settings


async def _entity(client: httpx.AsyncClient, t: Tenant, data: dict, type: str = "note") -> dict:
    r = await client.post(f"/v1/orgs/{t.slug}/projects/main/entities", headers=t.headers,
                          json={"type": type, "data": data})
    assert r.status_code == 201, r.text
    return r.json()


async def test_health_and_openapi(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json()["status"] == "ok"
    spec = (await client.get("/openapi.json")).json()
    for path in ["/v1/orgs", "/v1/orgs/{org}/projects", "/v1/orgs/{org}/entity-types",
                 "/v1/orgs/{org}/projects/{project}/entities", "/v1/orgs/{org}/entities/{id}",
                 "/v1/orgs/{org}/entities/{id}/history", "/v1/orgs/{org}/entities/{id}/diff",
                 "/v1/orgs/{org}/entities/{id}/restore"]:
        assert path in spec["paths"], path


async def test_openapi_tells_clients_how_to_authenticate_and_what_errors_look_like(
        client: httpx.AsyncClient, tenant: Tenant) -> None:
    """A client generated from /openapi.json sends the bearer token and reads problem documents
    (FastAPI's own document had no security scheme and a 422 shape the API never sends)."""
    spec = (await client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"]["securitySchemes"]["bearer"]["description"]}
    assert spec["security"] == [{"bearer": []}]
    assert "HTTPValidationError" not in str(spec) and "Problem" in spec["components"]["schemas"]
    assert not [(path, p["name"]) for path, item in spec["paths"].items() for op in item.values()
                for p in op.get("parameters", []) if p["name"].lower() == "authorization"], "the scheme says it"
    ops = {(path, method): op for path, item in spec["paths"].items() for method, op in item.items()}
    for (path, method), op in ops.items():
        if path in ("/healthz", "/readyz", "/metrics"):
            assert op["security"] == [] and "401" not in op["responses"], path
            assert ("503" in op["responses"]) == (path != "/metrics"), path  # the probes' "not now"
            continue
        assert "security" not in op, (path, method)  # the document's default: a token
        for status in ("401", "404", "422", "503"):
            ref = op["responses"][status]["$ref"]
            assert spec["components"]["responses"][ref.rsplit("/", 1)[1]]["content"][
                "application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
        assert ("415" in op["responses"]) == ("requestBody" in op), (path, method)
        writes = method != "get" and not path.endswith("/graph/subgraph")  # (a read with a body)
        assert ("507" in op["responses"]) == writes, (path, method)  # a full disk, as the README says
        assert ("409" in op["responses"]) == writes, (path, method)
    assert "410" in ops[("/v1/orgs/{org}/entities/{id}", "get")]["responses"]
    assert "410" in ops[("/v1/orgs/{org}/relationships/{id}", "get")]["responses"]
    # what the document promises is what the API sends
    r = await client.post(f"/v1/orgs/{tenant.slug}/projects/{tenant.project_slug}/entities",
                          headers=tenant.headers, json={"type": "note", "data": [1]})
    body = r.json()
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert set(spec["components"]["schemas"]["Problem"]["required"]) <= set(body)
    anonymous = await client.get(f"/v1/orgs/{tenant.slug}/projects")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")


async def test_every_operation_says_what_it_does(client: httpx.AsyncClient) -> None:
    """/docs and generated clients show each operation's summary and description: a dozen
    had no description, and three were summed up by their function's name alone ("Healthz",
    "Readyz", and "Status" for the search index's)."""
    spec = (await client.get("/openapi.json")).json()
    ops = {f"{method.upper()} {path}": op for path, item in spec["paths"].items() for method, op in item.items()}
    assert [name for name, op in ops.items() if not op.get("description", "").strip()] == []
    summaries = [op["summary"] for op in ops.values()]
    assert len(set(summaries)) == len(summaries), "each names its own operation"
    assert (ops["GET /healthz"]["summary"], ops["GET /readyz"]["summary"],
            ops["GET /v1/orgs/{org}/search/status"]["summary"]) == ("Liveness", "Readiness", "Search Status")


async def test_a_database_that_is_away_is_a_503_with_retry_after(settings: Settings) -> None:
    """Probes, and requests once the pool knows the server is away, answer within about 2 s
    (not the pool's 10 s) with a problem document that says when to try again: when the pool
    next tries to connect."""
    async with Database("postgresql://127.0.0.1:9/nowhere?connect_timeout=1", min_size=0, max_size=2) as db:
        svc = Services.build(settings, db)
        transport = httpx.ASGITransport(app=create_app(settings, services=svc))
        async with httpx.AsyncClient(transport=transport, base_url="http://canvasdb.test") as http:
            for path in ("/healthz", "/readyz", "/v1/orgs/demo/projects"):
                started = time.monotonic()
                r = await http.get(path, headers={"Authorization": "Bearer cdb_x"})
                assert time.monotonic() - started < 7, f"{path} waited the pool's 10 s"
                assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
                assert r.headers["retry-after"] == "2" and r.json()["retry"] is True
                assert r.json()["detail"] == "the database is unreachable"
                assert "hint" not in r.json() and "127.0.0.1" not in r.text, "the operator's detail"


async def test_readyz_is_a_problem_document_until_the_gateway_listens(client: httpx.AsyncClient) -> None:
    """The suite's app runs no lifespan, so its gateway never listens: not ready, said as every
    other error is (and the database's health apart: /healthz is fine)."""
    assert (await client.get("/healthz")).status_code == 200
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"] == "1"
    assert r.json()["status"] == 503 and r.json()["state"] == "starting" and r.json()["retry"] is True


async def test_org_and_project_lifecycle(client: httpx.AsyncClient, tenant: Tenant) -> None:
    slug = f"new-{tenant.slug}"
    r = await client.post("/v1/orgs", headers=tenant.headers, json={"slug": slug, "name": "New"})
    assert r.status_code == 201 and r.json()["slug"] == slug
    assert (await client.post("/v1/orgs", headers=tenant.headers, json={"slug": slug})).status_code == 409
    r = await client.post(f"/v1/orgs/{slug}/projects", headers=tenant.headers, json={"slug": "board"})
    assert r.status_code == 201
    by_id = await client.post(f"/v1/orgs/{r.json()['id']}/projects", headers=tenant.headers,
                              json={"slug": "second"})
    assert by_id.status_code == 404, "the org id is not a project id"
    listed = await client.get(f"/v1/orgs/{slug}/projects", headers=tenant.headers)
    assert [p["slug"] for p in listed.json()["items"]] == ["board"]


async def test_entity_crud_with_etags(client: httpx.AsyncClient, tenant: Tenant) -> None:
    h = tenant.headers
    r = await client.post(f"/v1/orgs/{tenant.slug}/projects/main/entities", headers=h,
                          json={"type": "kanban.card", "data": {"title": "a", "status": "todo"}})
    assert r.status_code == 201 and r.headers["etag"] == '"1"'
    eid = r.json()["id"]
    assert r.headers["location"].endswith(f"/entities/{eid}")
    url = f"/v1/orgs/{tenant.slug}/entities/{eid}"
    got = await client.get(url, headers=h)
    assert got.status_code == 200 and got.json()["data"] == {"title": "a", "status": "todo"}
    put = await client.put(url, headers={**h, "If-Match": '"1"'}, json={"data": {"title": "b"}})
    assert put.status_code == 200 and put.headers["etag"] == '"2"'
    stale = await client.put(url, headers={**h, "If-Match": '"1"'}, json={"data": {"title": "c"}})
    assert stale.status_code == 409
    assert stale.headers["content-type"] == "application/problem+json"
    assert stale.json()["current_version"] == 2
    patch = await client.patch(url, headers={**h, "If-Match": 'W/"2"'},
                               json={"data": {"status": "done", "title": None}})
    assert patch.status_code == 200 and patch.json()["data"] == {"status": "done"}
    deleted = await client.delete(url, headers=h)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    gone = await client.get(url, headers=h)
    assert gone.status_code == 410 and gone.json()["status"] == 410
    assert (await client.post(url + "/undelete", headers={**h, "If-Match": '"3"'})).status_code == 409
    back = await client.post(url + "/undelete", headers={**h, "If-Match": '"4"'})
    assert back.status_code == 200 and back.json()["version"] == 5
    old = await client.get(url, headers=h, params={"as_of": "1"})
    assert old.json()["data"] == {"title": "a", "status": "todo"} and old.headers["etag"] == '"1"'
    at = (await client.get(url + "/history", headers=h)).json()["items"]
    assert [v["op"] for v in at] == ["undelete", "delete", "update", "update", "create"]
    then = await client.get(url, headers=h, params={"as_of": at[2]["at"]})
    assert then.json()["version"] == 3
    diff = await client.get(url + "/diff", headers=h, params={"from": 1, "to": 3})
    assert diff.status_code == 200 and diff.json()["patch"]
    stale = await client.post(url + "/restore", headers={**h, "If-Match": '"4"'}, params={"version": 1})
    assert stale.status_code == 409 and stale.json()["current_version"] == 5
    restored = await client.post(url + "/restore", headers={**h, "If-Match": '"5"'}, params={"version": 1})
    assert restored.json()["data"] == {"title": "a", "status": "todo"} and restored.json()["version"] == 6


async def test_head_answers_wherever_get_does(client: httpx.AsyncClient, tenant: Tenant) -> None:
    """RFC 9110: a server supports HEAD wherever it supports GET, and a 405's ``Allow`` listed
    HEAD beside GET, but FastAPI routed a GET handler for GET alone (HEAD /healthz was 405)."""
    entity = await _entity(client, tenant, {"title": "a"})
    for url, headers in [("/healthz", {}), (f"/v1/orgs/{tenant.slug}/entities/{entity['id']}", tenant.headers),
                         (f"/v1/orgs/{tenant.slug}/projects", tenant.headers)]:
        got, head = await client.get(url, headers=headers), await client.head(url, headers=headers)
        assert head.status_code == got.status_code == 200, (url, head.text)
        for name in ("content-type", "content-length", "etag"):
            assert head.headers.get(name) == got.headers.get(name), (url, name)
    missing = await client.head(f"/v1/orgs/{tenant.slug}/entities/{uuid.uuid4()}", headers=tenant.headers)
    assert missing.status_code == 404
    assert (await client.head(f"/v1/orgs/{tenant.slug}/projects")).status_code == 401, "a token, as for GET"


async def test_listing_pages_and_as_of(client: httpx.AsyncClient, tenant: Tenant) -> None:
    h = tenant.headers
    ids = [(await _entity(client, tenant, {"i": i}, type="a" if i % 3 else "b"))["id"] for i in range(9)]
    url = f"/v1/orgs/{tenant.slug}/projects/main/entities"
    seen, after = [], None
    while True:
        params = {"limit": 4, "type": "a"} | ({"after": after} if after else {})
        page = (await client.get(url, headers=h, params=params)).json()
        seen += [e["id"] for e in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert sorted(seen) == sorted(i for n, i in enumerate(ids) if n % 3)
    many = await client.get(f"/v1/orgs/{tenant.slug}/entities", headers=h,
                            params={"ids": ",".join(ids[:3])})
    assert [e["id"] for e in many.json()["items"]] == ids[:3]


async def test_entity_types_registry(client: httpx.AsyncClient, tenant: Tenant) -> None:
    h = tenant.headers
    body = {"name": "kanban.card", "module": "kanban",
            "json_schema": {"type": "object", "properties": {"status": {"enum": ["todo", "done"]}}},
            "text_fields": {"title": "A", "body": "C"}, "reference_fields": ["$.depends_on[*]"],
            "tag_field": "tags"}
    r = await client.post(f"/v1/orgs/{tenant.slug}/entity-types", headers=h, json=body)
    assert r.status_code == 201 and r.json()["text_fields"] == {"title": "A", "body": "C"}
    listed = await client.get(f"/v1/orgs/{tenant.slug}/entity-types", headers=h)
    assert [t["name"] for t in listed.json()["items"]] == ["kanban.card"]
    bad = await client.post(f"/v1/orgs/{tenant.slug}/projects/main/entities", headers=h,
                            json={"type": "kanban.card", "data": {"status": "nope"}})
    assert bad.status_code == 422 and bad.json()["pointer"] == "/data/status"


async def test_members_and_project_roles(client: httpx.AsyncClient, svc: Services, tenant: Tenant) -> None:
    h = tenant.headers
    email = f"v-{tenant.slug}@example.com"
    r = await client.post(f"/v1/orgs/{tenant.slug}/members", headers=h, json={"email": email})
    assert r.status_code == 201 and r.json()["role"] == "member"
    _, token = await svc.tenancy.create_token(await svc.tenancy.user_by_email(email))
    vh = {"Authorization": f"Bearer {token}"}
    e = await _entity(client, tenant, {"n": 1})
    url = f"/v1/orgs/{tenant.slug}/entities/{e['id']}"
    assert (await client.get(url, headers=vh)).status_code == 404
    grant = await client.put(f"/v1/orgs/{tenant.slug}/projects/main/members/{email}", headers=h,
                             json={"role": "viewer"})
    assert grant.status_code == 204
    assert (await client.get(url, headers=vh)).status_code == 200
    assert (await client.patch(url, headers=vh, json={"data": {"n": 2}})).status_code == 403
    assert (await client.post(f"/v1/orgs/{tenant.slug}/projects", headers=vh,
                              json={"slug": "mine"})).status_code == 403
    listed = await client.get(f"/v1/orgs/{tenant.slug}/projects", headers=vh)
    assert [p["slug"] for p in listed.json()["items"]] == ["main"]


async def test_other_org_is_invisible(client: httpx.AsyncClient, tenant: Tenant, other_tenant: Tenant) -> None:
    e = await _entity(client, other_tenant, {"secret": 1})
    mine = await client.get(f"/v1/orgs/{tenant.slug}/entities/{e['id']}", headers=tenant.headers)
    theirs = await client.get(f"/v1/orgs/{other_tenant.slug}/entities/{e['id']}", headers=tenant.headers)
    missing = await client.get(f"/v1/orgs/no-such-org-{tenant.slug}/entities/{e['id']}", headers=tenant.headers)
    assert mine.status_code == theirs.status_code == missing.status_code == 404
    assert theirs.json()["detail"].replace(other_tenant.slug, "X") == \
        missing.json()["detail"].replace(f"no-such-org-{tenant.slug}", "X")


def test_no_endpoint_or_dependency_runs_in_the_thread_pool(settings: Settings) -> None:
    """FastAPI runs a plain function (endpoint or dependency) in its thread pool: the two
    hops a request made that way cost a GET 0.2 ms of its 0.9."""
    def plain(dependant) -> list[str]:
        found = [] if dependant.call is None or inspect.iscoroutinefunction(dependant.call) else [
            getattr(dependant.call, "__qualname__", repr(dependant.call))]
        return found + [name for sub in dependant.dependencies for name in plain(sub)]

    app = create_app(settings, services=object())  # type: ignore[arg-type]
    routers = (app, attachments.router, documents.router, entities.router, graph.router, search.router,
               tenants.router)
    routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute | APIWebSocketRoute)]
    assert len(routes) > 20
    assert [(r.path, name) for r in routes for name in plain(r.dependant)] == []
