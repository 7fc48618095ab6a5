"""Attachments over HTTP, end to end: ``PUT/GET/DELETE /v1/orgs/{org}/blobs/{key}``.

Every test runs twice: on an app whose blob store is a local folder, and on one whose store
is S3 on a real S3-compatible server (moto's, over HTTP). Requests go through the module's
``api`` client: app exceptions become 500 responses instead of being raised, and a response
hook fails the test on any 5xx, so no 500 hides behind another assertion. The only tests
that expect a 500 (damaged content) or a 507 (a full disk) use a client without that hook.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Tenant, unique
from fastapi import FastAPI
from test_blobs import Backend, chunked, full_disk, new_s3_store, s3_client, s3_endpoint  # noqa: F401 (fixtures)

from canvasdb.api import create_app
from canvasdb.blobs import FilesystemBlobStore
from canvasdb.blobs.gc import lock_key
from canvasdb.db import Database
from canvasdb.errors import Conflict
from canvasdb.services import Services
from canvasdb.settings import Settings

MiB = 1024 * 1024
LIMIT = 3 * MiB  # this module's CANVASDB_MAX_ATTACHMENT_BYTES
PROBLEM = "application/problem+json"


async def _no_server_error(response: httpx.Response) -> None:
    if response.status_code >= 500:
        await response.aread()
        raise AssertionError(f"{response.request.method} {response.request.url} answered "
                             f"{response.status_code}: {response.text[:500]}")


@dataclass
class Api:
    app: FastAPI
    http: httpx.AsyncClient  # fails the test on any 5xx
    raw: httpx.AsyncClient  # no such hook: for the tests that expect a 500
    svc: Services
    backend: Backend


@pytest.fixture(scope="module", params=["filesystem", "s3"])
async def api(request: pytest.FixtureRequest, settings: Settings, db: Database,
              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    if request.param == "filesystem":
        backend = Backend("filesystem", FilesystemBlobStore(tmp_path_factory.mktemp("attachments")))
    else:
        backend = Backend("s3", new_s3_store(request.getfixturevalue("s3_endpoint")),
                          request.getfixturevalue("s3_client"))
    async with serving(settings, db, backend) as api:
        yield api


@asynccontextmanager
async def serving(settings: Settings, db: Database, backend: Backend) -> AsyncIterator[Api]:
    """The API over ``backend``, with this module's attachment limit."""
    small = settings.model_copy(update={"max_attachment_bytes": LIMIT})
    svc = Services.build(small, db, blobs=backend.store)
    app = create_app(small, services=svc)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://canvasdb.test",
                          event_hooks={"response": [_no_server_error]}) as http,
        httpx.AsyncClient(transport=transport, base_url="http://canvasdb.test") as raw,
    ):
        yield Api(app, http, raw, svc, backend)
    await svc.close()


def url(t: Tenant, key: str) -> str:
    return f"/v1/orgs/{t.slug}/blobs/{key}"


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def problem(r: httpx.Response, status: int, *, pointer: str | None = None) -> dict[str, Any]:
    where = f"{r.request.method} {r.request.url}"
    assert r.status_code == status, f"{where}: {r.status_code} {r.text[:500]}"
    assert r.headers["content-type"] == PROBLEM, f"{where}: {r.headers.get('content-type')}"
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    if pointer is not None:
        assert body.get("pointer") == pointer, f"{where}: {body}"
    return body


async def put(api: Api, t: Tenant, key: str, content: Any, *, status: int | None = 201,
              headers: dict[str, str] | None = None) -> httpx.Response:
    r = await api.http.put(url(t, key), content=content, headers={**t.headers, **(headers or {})})
    if status is not None:
        assert r.status_code == status, f"PUT {key}: {r.status_code} {r.text[:500]}"
    return r


async def rows(api: Api, t: Tenant) -> list[dict[str, Any]]:
    async with api.svc.db.transaction(t.org_id) as conn:
        cur = await conn.execute("SELECT key, sha256, size, content_type FROM attachments"
                                 " WHERE org_id = %s ORDER BY key", (t.org_id,))
        return await cur.fetchall()


async def member_headers(api: Api, t: Tenant) -> dict[str, str]:
    user = await api.svc.tenancy.ensure_user(f"{unique('member')}@example.com")
    await api.svc.tenancy.set_org_role(t.org_id, user, "member")
    _, token = await api.svc.tenancy.create_token(user)
    return {"Authorization": f"Bearer {token}"}


# --- round trips ---------------------------------------------------------------------------------

async def test_put_then_get_round_trip(api: Api, tenant: Tenant) -> None:
    # Far over the JSON body limit (4 x 64 KiB here): attachment routes have their own.
    content = os.urandom(2 * MiB + 321)
    r = await put(api, tenant, "images/logo.png", content, headers={"Content-Type": "image/png"})
    assert r.json() == {"key": "images/logo.png", "sha256": sha(content), "size": len(content),
                        "content_type": "image/png"}
    assert r.headers["etag"] == f'"{sha(content)}"'
    got = await api.http.get(url(tenant, "images/logo.png"), headers=tenant.headers)
    assert got.status_code == 200 and got.content == content
    assert got.headers["content-type"] == "image/png"
    assert got.headers["content-length"] == str(len(content))
    assert got.headers["etag"] == f'"{sha(content)}"'
    assert got.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in got.headers["content-security-policy"]
    assert await api.backend.store.exists(sha(content))
    assert await rows(api, tenant) == [{"key": "images/logo.png", "sha256": sha(content),
                                        "size": len(content), "content_type": "image/png"}]


async def test_streamed_upload_without_content_length(api: Api, tenant: Tenant) -> None:
    content = os.urandom(LIMIT - 1)
    r = await put(api, tenant, "big.bin", chunked(content, size=48 * 1024))
    assert "content-length" not in r.request.headers
    assert r.json()["size"] == len(content)
    got = await api.http.get(url(tenant, "big.bin"), headers=tenant.headers)
    assert got.content == content


async def test_empty_content(api: Api, tenant: Tenant) -> None:
    r = await put(api, tenant, "empty", b"")
    assert r.json()["size"] == 0 and r.json()["sha256"] == sha(b"")
    got = await api.http.get(url(tenant, "empty"), headers=tenant.headers)
    assert got.status_code == 200 and got.content == b"" and got.headers["content-length"] == "0"


async def test_the_content_at_the_limit_is_accepted(api: Api, tenant: Tenant) -> None:
    content = os.urandom(LIMIT)
    await put(api, tenant, "exactly-at-the-limit", content)
    assert (await api.http.get(url(tenant, "exactly-at-the-limit"), headers=tenant.headers)).content == content


CONTENT_TYPES = ["text/plain; charset=utf-8", "image/svg+xml", "application/json",
                 "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                 "text/html", "multipart/mixed; boundary=\"x y\""]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
async def test_content_type_round_trips_exactly(api: Api, tenant: Tenant, content_type: str) -> None:
    r = await put(api, tenant, "typed", b"<b>x</b>", headers={"Content-Type": content_type})
    assert r.json()["content_type"] == content_type
    got = await api.http.get(url(tenant, "typed"), headers=tenant.headers)
    assert got.headers["content-type"] == content_type


ACTIVE_TYPES = ["text/html", "text/html; charset=utf-8", "image/svg+xml", "application/javascript",
                "text/javascript", "application/xhtml+xml", "text/xml", "application/xml"]


@pytest.mark.parametrize("content_type", ACTIVE_TYPES)
async def test_content_a_browser_would_run_is_served_as_a_download(api: Api, tenant: Tenant,
                                                                   content_type: str) -> None:
    # Uploaded content comes from the API's origin: opened in a browser, it must never be a
    # page (stored XSS), whatever type its uploader declared.
    script = b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(document.domain)'/>"
    await put(api, tenant, "pages/evil.html", script, headers={"Content-Type": content_type})
    for method in ("GET", "HEAD"):
        got = await api.http.request(method, url(tenant, "pages/evil.html"), headers=tenant.headers)
        assert got.headers["content-disposition"] == 'attachment; filename="evil.html"', method
        assert got.headers["x-content-type-options"] == "nosniff", method
        assert "sandbox" in got.headers["content-security-policy"], method


async def test_content_type_defaults_to_bytes(api: Api, tenant: Tenant) -> None:
    r = await put(api, tenant, "untyped", b"\x00\x01")
    assert "content-type" not in r.request.headers
    assert r.json()["content_type"] == "application/octet-stream"
    got = await api.http.get(url(tenant, "untyped"), headers=tenant.headers)
    assert got.headers["content-type"] == "application/octet-stream"


BAD_CONTENT_TYPES = ["nonsense", "text/", "/plain", "text/plain/extra", "text plain", "a/" + "b" * 300,
                     "text/plain;\x7f", "\u00e9/x"]


@pytest.mark.parametrize("content_type", BAD_CONTENT_TYPES, ids=range(len(BAD_CONTENT_TYPES)))
async def test_bad_content_type_is_422(api: Api, tenant: Tenant, content_type: str) -> None:
    before = api.backend.visible()
    r = await api.http.put(url(tenant, "x"), content=b"data",
                           headers={**tenant.headers, "Content-Type": content_type.encode("latin-1")})
    problem(r, 422, pointer="header:content-type")
    assert await rows(api, tenant) == [] and api.backend.visible() == before


async def test_replace_answers_200_and_drops_the_old_content(api: Api, tenant: Tenant) -> None:
    old, new = os.urandom(1000), os.urandom(2000)
    await put(api, tenant, "doc.pdf", old, headers={"Content-Type": "application/pdf"})
    r = await put(api, tenant, "doc.pdf", new, status=200, headers={"Content-Type": "application/x-pdf"})
    assert r.json() == {"key": "doc.pdf", "sha256": sha(new), "size": 2000, "content_type": "application/x-pdf"}
    got = await api.http.get(url(tenant, "doc.pdf"), headers=tenant.headers)
    assert got.content == new and got.headers["content-type"] == "application/x-pdf"
    assert not await api.backend.store.exists(sha(old))
    assert await api.backend.store.exists(sha(new))


async def test_replacing_with_the_same_content_keeps_it(api: Api, tenant: Tenant) -> None:
    content = os.urandom(1000)
    await put(api, tenant, "same", content)
    await put(api, tenant, "same", content, status=200)
    assert (await api.http.get(url(tenant, "same"), headers=tenant.headers)).content == content


async def test_delete(api: Api, tenant: Tenant) -> None:
    content = os.urandom(5000)
    await put(api, tenant, "a/b/c.txt", content)
    r = await api.http.delete(url(tenant, "a/b/c.txt"), headers=tenant.headers)
    assert r.status_code == 204 and r.content == b""
    problem(await api.http.get(url(tenant, "a/b/c.txt"), headers=tenant.headers), 404)
    problem(await api.http.delete(url(tenant, "a/b/c.txt"), headers=tenant.headers), 404)
    assert not await api.backend.store.exists(sha(content))
    assert await rows(api, tenant) == []


async def test_unknown_key_is_404(api: Api, tenant: Tenant) -> None:
    for method in ("GET", "DELETE"):
        problem(await api.http.request(method, url(tenant, "nothing/here"), headers=tenant.headers), 404)


async def test_head_answers_the_headers_of_get_without_the_content(api: Api, tenant: Tenant,
                                                                    other_tenant: Tenant) -> None:
    content = os.urandom(1234)
    await put(api, tenant, "docs/report.pdf", content, headers={"Content-Type": "application/pdf"})
    got = await api.http.get(url(tenant, "docs/report.pdf"), headers=tenant.headers)
    head = await api.http.head(url(tenant, "docs/report.pdf"), headers=tenant.headers)
    assert head.status_code == 200 and head.content == b""
    assert {k: v for k, v in head.headers.items() if k != "content-length"} == {
        k: v for k, v in got.headers.items() if k != "content-length"}
    assert head.headers["content-length"] == str(len(content))
    etag = head.headers["etag"]
    r = await api.http.head(url(tenant, "docs/report.pdf"), headers={**tenant.headers, "If-None-Match": etag})
    assert r.status_code == 304 and r.headers["etag"] == etag
    assert (await api.http.head(url(tenant, "nothing"), headers=tenant.headers)).status_code == 404
    member = await member_headers(api, tenant)
    assert (await api.http.head(url(tenant, "docs/report.pdf"), headers=member)).status_code == 200
    r = await api.http.head(url(tenant, "docs/report.pdf"), headers=other_tenant.headers)
    assert r.status_code == 404 and "etag" not in r.headers


@pytest.mark.parametrize("ranges", ["bytes=0-3", "bytes=5-", "bytes=-2", "bytes=9-3", "bytes=100-200", "lines=1-2"])
async def test_a_range_request_gets_the_whole_content(api: Api, tenant: Tenant, ranges: str) -> None:
    # Ranges are not served, and the answer says so: a Range header is ignored (RFC 9110 allows
    # it), never a 206 of the wrong part nor an error.
    content = b"0123456789"
    await put(api, tenant, "digits", content)
    r = await api.http.get(url(tenant, "digits"), headers={**tenant.headers, "Range": ranges})
    assert r.status_code == 200 and r.content == content
    assert r.headers["accept-ranges"] == "none" and "content-range" not in r.headers


async def test_if_none_match(api: Api, tenant: Tenant) -> None:
    content = b"cache me"
    etag = (await put(api, tenant, "cached", content)).headers["etag"]
    r = await api.http.get(url(tenant, "cached"), headers={**tenant.headers, "If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    for matching in (f'"x", W/{etag}', "*"):
        r = await api.http.get(url(tenant, "cached"), headers={**tenant.headers, "If-None-Match": matching})
        assert r.status_code == 304
    r = await api.http.get(url(tenant, "cached"), headers={**tenant.headers, "If-None-Match": '"other"'})
    assert r.status_code == 200 and r.content == content


async def test_writes_hold_their_preconditions(api: Api, tenant: Tenant) -> None:
    """If-Match: replace or delete only the content read; If-None-Match: * creates only. A
    precondition that fails changes nothing (and leaves no stray content) and answers 409."""
    first, second, third = b"first", b"second", b"third"
    etag = (await put(api, tenant, "cond", first, headers={"If-None-Match": "*"})).headers["etag"]
    r = await put(api, tenant, "cond", second, status=None, headers={"If-None-Match": "*"})
    assert problem(r, 409)["current_etag"] == sha(first)
    r = await put(api, tenant, "cond", second, status=None, headers={"If-Match": '"' + sha(third) + '"'})
    assert problem(r, 409)["current_etag"] == sha(first)
    r = await put(api, tenant, "fresh", second, status=None, headers={"If-Match": "*"})  # no such key
    problem(r, 409)
    assert not await api.backend.store.exists(sha(second)), "the refused content was kept"
    await put(api, tenant, "cond", second, status=200, headers={"If-Match": f'"other", {etag}'})
    r = await api.http.delete(url(tenant, "cond"), headers={**tenant.headers, "If-Match": etag})
    assert problem(r, 409)["current_etag"] == sha(second)
    assert (await api.http.get(url(tenant, "cond"), headers=tenant.headers)).content == second
    r = await api.http.delete(url(tenant, "cond"), headers={**tenant.headers, "If-Match": f'"{sha(second)}"'})
    assert r.status_code == 204 and await rows(api, tenant) == []


# --- size limit ----------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["declared", "streamed"])
async def test_over_the_limit_is_413_and_nothing_is_stored(api: Api, tenant: Tenant, how: str) -> None:
    kept = os.urandom(100)
    await put(api, tenant, "kept", kept)
    before, stored = await rows(api, tenant), api.backend.visible()
    content = os.urandom(LIMIT + 1)
    for key in ("new-key", "kept"):
        r = await put(api, tenant, key, content if how == "declared" else chunked(content), status=None)
        assert ("content-length" in r.request.headers) == (how == "declared")
        assert problem(r, 413)["limit"] == LIMIT
    assert await rows(api, tenant) == before and api.backend.visible() == stored
    problem(await api.http.get(url(tenant, "new-key"), headers=tenant.headers), 404)
    assert (await api.http.get(url(tenant, "kept"), headers=tenant.headers)).content == kept


@pytest.mark.parametrize("declared", [5, 3 * MiB])  # under what it carries, over it
async def test_a_body_that_is_not_its_content_length_is_refused(api: Api, tenant: Tenant,
                                                                 declared: int) -> None:
    # A server frames bodies by their Content-Length; were one to hand over another count, the
    # content is not what the client sent: stored, it would pass for the whole file.
    before = api.backend.visible()
    body = os.urandom(MiB)
    status, answer = await _raw_asgi(api.app, "PUT", url(tenant, "framed"),
                                     {**tenant.headers, "content-length": str(declared)}, body)
    assert status == 400, answer
    assert f"{declared}" in json.loads(answer)["detail"]
    assert await rows(api, tenant) == [] and api.backend.visible() == before


async def test_a_client_that_stops_mid_body_stores_nothing(api: Api, tenant: Tenant) -> None:
    # It said 3 MiB, sent 2 and went away: no row, no blob, no temporary file nor multipart upload.
    before = api.backend.visible()
    status, answer = await _raw_asgi(api.app, "PUT", url(tenant, "abandoned"),
                                     {**tenant.headers, "content-length": str(LIMIT)},
                                     os.urandom(2 * MiB), more_body=True)
    assert status == 400 and "stopped" in json.loads(answer)["detail"]
    assert await rows(api, tenant) == [] and api.backend.visible() == before


async def test_other_routes_keep_the_small_body_limit(api: Api, tenant: Tenant) -> None:
    r = await api.http.post(f"/v1/orgs/{tenant.slug}/projects/{tenant.project_slug}/entities",
                            content=b" " * MiB, headers={**tenant.headers, "Content-Type": "application/json"})
    assert problem(r, 413)["limit"] < MiB


# --- keys: confined to the org, no path tricks --------------------------------------------------

PATH_TRICKS = {
    "dot-dot encoded": "%2e%2e/x",
    "dot-dot upper": "%2E%2E/x",
    "dot-dot inside": "a/%2e%2e/b",
    "dot-dot at end": "a/%2e%2e",
    "dot-dot deep": "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "dot segment": "%2e/a",
    "just dots": "%2e%2e",
    "double slash": "a//b",
    "absolute": "/etc/passwd",
    "encoded slash first": "%2Fetc/passwd",
    "trailing slash": "a/",
    "backslash": "a%5Cb",
    "backslash dot-dot": "..%5C..%5Cx",
    "nul": "a%00b",
    "space": "a%20b",
    "question mark": "a%3Fb",
    "colon": "C:%5Cx",
    "tilde": "~root",
    "unicode": "%C3%A9t%C3%A9",
    "fullwidth dots": "%EF%BC%8E%EF%BC%8E/x",
    "very long": "x" * 513,
    "very long with slashes": "a/" * 300,
    "empty": "",
}


@pytest.mark.parametrize("trick", PATH_TRICKS)
async def test_path_tricks_are_422(api: Api, tenant: Tenant, trick: str) -> None:
    before = api.backend.visible()
    key = PATH_TRICKS[trick]
    for method in ("PUT", "GET", "DELETE"):
        r = await api.http.request(method, url(tenant, key), content=b"evil" if method == "PUT" else None,
                                   headers=tenant.headers)
        problem(r, 422, pointer="path:key")
    assert await rows(api, tenant) == [] and api.backend.visible() == before


@pytest.mark.parametrize("key", ["a%0A", "%0A", "a%0D%0A", "a%0Ab", "a%0D%0Ab"])
async def test_line_breaks_in_a_key_are_refused(api: Api, tenant: Tenant, key: str) -> None:
    """A final line break is not dropped (``a\\n`` is not ``a``); one inside matches no route."""
    await put(api, tenant, "a", b"the real a")
    for method in ("PUT", "GET", "DELETE"):
        r = await api.http.request(method, url(tenant, key), headers=tenant.headers,
                                   content=b"evil" if method == "PUT" else None)
        if key.endswith("%0A"):
            problem(r, 422, pointer="path:key")
        else:  # Starlette's path parameters never span a line break: no route at all
            problem(r, 404)
    assert [r["key"] for r in await rows(api, tenant)] == ["a"]
    assert (await api.http.get(url(tenant, "a"), headers=tenant.headers)).content == b"the real a"


async def _raw_asgi(app: FastAPI, method: str, path: str, headers: dict[str, str],
                    body: bytes = b"", *, more_body: bool = False) -> tuple[int, bytes]:
    """One request straight to the app, with a path no HTTP client would send unnormalised;
    ``more_body``: the client then goes away instead of finishing the body."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("canvasdb.test", 80),
        "headers": [(k.lower().encode(), v.encode()) for k, v in
                    {"host": "canvasdb.test", "content-length": str(len(body)), **headers}.items()],
    }  # fmt: skip
    messages = [{"type": "http.request", "body": body, "more_body": more_body}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("key", ["../x", "a/../../../../etc/passwd", "./x", "a/./b", "..", "a/.."])
async def test_unnormalised_dot_segments_are_422(api: Api, tenant: Tenant, key: str) -> None:
    for method in ("PUT", "GET", "DELETE"):
        status, body = await _raw_asgi(api.app, method, f"/v1/orgs/{tenant.slug}/blobs/{key}",
                                       tenant.headers, b"evil" if method == "PUT" else b"")
        assert status == 422, (method, key, status, body)
        assert json.loads(body)["pointer"] == "path:key"
    assert await rows(api, tenant) == []


async def test_keys_of_every_allowed_shape(api: Api, tenant: Tenant) -> None:
    keys = ["a", "A-Z_a-z.0-9", "deep/" * 50 + "leaf", "x" * 512, "...", "a..b/c..d", ".hidden/.x",
            "-dash", "_", "v1.2.3/archive.tar.gz"]
    for key in keys:
        r = await put(api, tenant, key, key.encode())
        assert r.json()["key"] == key
    for key in keys:
        got = await api.http.get(url(tenant, key), headers=tenant.headers)
        assert got.content == key.encode(), key
    assert [r["key"] for r in await rows(api, tenant)] == sorted(keys)


async def test_keys_differing_only_in_case_are_distinct(api: Api, tenant: Tenant) -> None:
    # Keys live in PostgreSQL rows; the store names content by its lowercase hash, so a
    # case-insensitive file system cannot make two keys one.
    keys = ["Logo.PNG", "logo.png", "LOGO.png"]
    for key in keys:
        await put(api, tenant, key, key.encode())
    await api.http.delete(url(tenant, "logo.png"), headers=tenant.headers)
    problem(await api.http.get(url(tenant, "logo.png"), headers=tenant.headers), 404)
    for key in ("Logo.PNG", "LOGO.png"):
        assert (await api.http.get(url(tenant, key), headers=tenant.headers)).content == key.encode()
    assert [r["key"] for r in await rows(api, tenant)] == ["LOGO.png", "Logo.PNG"]


# --- access --------------------------------------------------------------------------------------

async def test_another_org_cannot_see_or_delete_your_key(api: Api, tenant: Tenant,
                                                         other_tenant: Tenant) -> None:
    content = os.urandom(777)
    await put(api, tenant, "secret.txt", content)
    theirs = other_tenant.headers
    for method in ("GET", "DELETE"):
        # Through the owner's org (not theirs) and through their own org (no such key).
        problem(await api.http.request(method, url(tenant, "secret.txt"), headers=theirs), 404)
        problem(await api.http.request(method, url(other_tenant, "secret.txt"), headers=theirs), 404)
    problem(await api.http.put(url(tenant, "secret.txt"), content=b"overwrite", headers=theirs), 404)
    assert (await api.http.get(url(tenant, "secret.txt"), headers=tenant.headers)).content == content
    assert await rows(api, other_tenant) == []


async def test_a_member_reads_but_cannot_write(api: Api, tenant: Tenant) -> None:
    content = os.urandom(100)
    await put(api, tenant, "shared.png", content)
    member = await member_headers(api, tenant)
    assert (await api.http.get(url(tenant, "shared.png"), headers=member)).content == content
    stored = api.backend.visible()
    problem(await api.http.put(url(tenant, "shared.png"), content=b"changed", headers=member), 403)
    problem(await api.http.put(url(tenant, "new.png"), content=os.urandom(MiB), headers=member), 403)
    problem(await api.http.delete(url(tenant, "shared.png"), headers=member), 403)
    assert api.backend.visible() == stored
    assert [r["key"] for r in await rows(api, tenant)] == ["shared.png"]
    assert (await api.http.get(url(tenant, "shared.png"), headers=tenant.headers)).content == content


async def test_an_admin_writes(api: Api, tenant: Tenant) -> None:
    user = await api.svc.tenancy.ensure_user(f"{unique('admin')}@example.com")
    await api.svc.tenancy.set_org_role(tenant.org_id, user, "admin")
    _, token = await api.svc.tenancy.create_token(user)
    admin = {"Authorization": f"Bearer {token}"}
    r = await api.http.put(url(tenant, "by-admin"), content=b"hi", headers=admin)
    assert r.status_code == 201
    assert (await api.http.delete(url(tenant, "by-admin"), headers=admin)).status_code == 204


@pytest.mark.parametrize("auth", [None, "Bearer nope", "Bearer cdb_unknown", "Basic abc"])
async def test_no_valid_token_is_401(api: Api, tenant: Tenant, auth: str | None) -> None:
    await put(api, tenant, "guarded", b"x")
    headers = {} if auth is None else {"Authorization": auth}
    for method in ("PUT", "GET", "DELETE"):
        r = await api.http.request(method, url(tenant, "guarded"), headers=headers,
                                   content=b"y" if method == "PUT" else None)
        problem(r, 401)
    assert (await api.http.get(url(tenant, "guarded"), headers=tenant.headers)).content == b"x"


# --- shared content ------------------------------------------------------------------------------

async def test_shared_content_lives_until_the_last_key_is_deleted(api: Api, tenant: Tenant,
                                                                  other_tenant: Tenant) -> None:
    content = os.urandom(4321)
    key = sha(content)
    await put(api, tenant, "one", content)
    await put(api, tenant, "two", content)
    await put(api, other_tenant, "theirs", content)
    assert len([name for name in api.backend.visible() if key in name]) == 1  # stored once
    for t, name in [(tenant, "one"), (other_tenant, "theirs")]:
        assert (await api.http.delete(url(t, name), headers=t.headers)).status_code == 204
        assert await api.backend.store.exists(key)
    assert (await api.http.get(url(tenant, "two"), headers=tenant.headers)).content == content
    assert (await api.http.delete(url(tenant, "two"), headers=tenant.headers)).status_code == 204
    assert not await api.backend.store.exists(key)


async def test_concurrent_writes_to_one_key(api: Api, tenant: Tenant) -> None:
    contents = [os.urandom(10_000 + i) for i in range(6)]
    responses = await asyncio.gather(*(put(api, tenant, "contended", c, status=None) for c in contents))
    assert sorted(r.status_code for r in responses) == [200] * 5 + [201]
    final = (await api.http.get(url(tenant, "contended"), headers=tenant.headers)).content
    assert final in contents
    for content in contents:  # every replaced version was collected, the current one kept
        assert await api.backend.store.exists(sha(content)) == (content == final)


async def test_deleting_the_last_key_while_the_same_content_is_stored_never_dangles(
    api: Api, tenant: Tenant, other_tenant: Tenant
) -> None:
    """The race the advisory locks close: content collected under a write that points at it."""
    for round_ in range(8):
        content = os.urandom(50_000) + bytes([round_])
        await put(api, tenant, "racing", content)

        async def write(key: str, content: bytes) -> int:
            r = await put(api, other_tenant, key, content, status=None)
            if r.status_code == 409:  # the content went while it was uploaded: send it again
                assert r.json()["retry"] is True
                r = await put(api, other_tenant, key, content, status=None)
            return r.status_code

        deleted, written = await asyncio.gather(
            api.http.delete(url(tenant, "racing"), headers=tenant.headers), write(f"racing-{round_}", content))
        assert deleted.status_code == 204 and written == 201
        got = await api.http.get(url(other_tenant, f"racing-{round_}"), headers=other_tenant.headers)
        assert got.content == content
        assert await api.backend.store.exists(sha(content))


async def test_an_upload_racing_a_delete_of_the_same_key_never_dangles(api: Api, tenant: Tenant) -> None:
    # Whichever goes first, a key that is left always serves its content, and content that
    # no key holds any more is collected.
    for round_ in range(8):
        old, new = os.urandom(30_000), os.urandom(30_000) if round_ % 2 else None
        await put(api, tenant, "contested", old)
        uploaded = new or old  # odd rounds replace the content, even ones store the same again
        r, deleted = await asyncio.gather(put(api, tenant, "contested", uploaded, status=None),
                                          api.http.delete(url(tenant, "contested"), headers=tenant.headers))
        assert r.status_code in (200, 201, 409) and deleted.status_code in (204, 404)
        got = await api.http.get(url(tenant, "contested"), headers=tenant.headers)
        if got.status_code == 200:
            assert got.content == uploaded and r.status_code in (200, 201)
        else:
            assert got.status_code == 404
        kept = {sha(got.content)} if got.status_code == 200 else set()
        assert {sha(c) for c in (old, uploaded) if await api.backend.store.exists(sha(c))} == kept
        await api.http.delete(url(tenant, "contested"), headers=tenant.headers)


async def test_a_write_whose_content_is_collected_meanwhile_is_refused(api: Api, tenant: Tenant) -> None:
    """Deterministically: a collector holds the content's lock and deletes it after the upload."""
    content = os.urandom(1000)
    key = sha(content)
    async with api.svc.db.transaction() as conn:
        await (await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", lock_key(key))).fetchone()
        task = asyncio.create_task(api.svc.attachments.put(tenant.owner, "late", content))
        for _ in range(500):  # until the upload is done and the write waits for the lock
            if await api.backend.store.exists(key):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert not task.done()
        await api.backend.store.delete(key)
    with pytest.raises(Conflict) as raised:
        await task
    assert raised.value.fields["retry"] is True
    assert await rows(api, tenant) == []
    await put(api, tenant, "late", content)  # sent again, it goes through
    assert (await api.http.get(url(tenant, "late"), headers=tenant.headers)).content == content


async def test_a_read_racing_a_delete_is_200_or_404(api: Api, tenant: Tenant) -> None:
    for round_ in range(5):
        content = os.urandom(20_000) + bytes([round_])
        await put(api, tenant, "vanishing", content)
        got, deleted = await asyncio.gather(
            api.http.get(url(tenant, "vanishing"), headers=tenant.headers),
            api.http.delete(url(tenant, "vanishing"), headers=tenant.headers))
        assert deleted.status_code == 204
        assert (got.status_code, got.content) == (200, content) or got.status_code == 404


# --- damage: a clear error, never wrong bytes ----------------------------------------------------

async def test_damaged_small_content_is_a_500_problem(api: Api, tenant: Tenant) -> None:
    content = os.urandom(1000)
    await put(api, tenant, "damaged-small", content)
    api.backend.flip_byte(sha(content), 500)
    r = await api.raw.get(url(tenant, "damaged-small"), headers=tenant.headers)
    body = problem(r, 500)
    assert body["title"] == "Corrupt blob" and body["sha256"] == sha(content)
    assert "/" not in body["detail"].replace("damaged-small", "")  # where the store keeps it stays in the log
    await put(api, tenant, "damaged-small", content, status=200)  # storing it again repairs it
    assert (await api.http.get(url(tenant, "damaged-small"), headers=tenant.headers)).content == content


async def test_damaged_large_content_is_cut_short(api: Api, tenant: Tenant) -> None:
    content = os.urandom(2 * MiB + 10)
    await put(api, tenant, "damaged-large", content)
    api.backend.flip_byte(sha(content), len(content) - 1)
    r = await api.raw.get(url(tenant, "damaged-large"), headers=tenant.headers)
    # The status went out with the first chunk; the last chunk never does, so the body falls
    # short of its Content-Length and a client sees a broken transfer, not wrong content.
    assert len(r.content) < len(content) and r.content == content[:len(r.content)]


async def test_missing_content_is_a_500_problem(api: Api, tenant: Tenant) -> None:
    content = os.urandom(1000)
    await put(api, tenant, "lost", content)
    await api.backend.store.delete(sha(content))  # behind the API's back
    r = await api.raw.get(url(tenant, "lost"), headers=tenant.headers)
    assert "missing" in problem(r, 500)["detail"]


async def test_content_with_a_wrong_size_is_a_500_problem(api: Api, tenant: Tenant) -> None:
    content = os.urandom(1000)
    await put(api, tenant, "resized", content)
    api.backend.overwrite(sha(content), content + b"!")
    r = await api.raw.get(url(tenant, "resized"), headers=tenant.headers)
    assert problem(r, 500)["title"] == "Corrupt blob"


@pytest.mark.usefixtures("full_disk")
async def test_a_full_disk_is_507_and_stores_nothing(settings: Settings, db: Database, tenant: Tenant,
                                                     tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = Backend("filesystem", FilesystemBlobStore(tmp_path / "blobs"))  # (a disk is the folder's)
    async with serving(settings, db, backend) as api:
        stored = api.backend.visible()
        with caplog.at_level(logging.INFO):
            r = await api.raw.put(url(tenant, "full.bin"), content=chunked(os.urandom(2 * MiB)),
                                  headers=tenant.headers)
        body = problem(r, 507)
        assert body["title"] == "Insufficient storage" and "hint" not in body and "retry-after" not in r.headers
        assert await rows(api, tenant) == [] and api.backend.visible() == stored  # no temporary file
    [line] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.exc_info is None and "No space left on device" in line.getMessage()


# --- the default app and the API description ----------------------------------------------------

async def test_the_default_app_keeps_blobs_under_home(client: httpx.AsyncClient, settings: Settings,
                                                      tenant: Tenant) -> None:
    content = uuid.uuid4().bytes * 100
    r = await client.put(url(tenant, "default/app.bin"), content=content, headers=tenant.headers)
    assert r.status_code == 201
    assert (settings.blobs_path / sha(content)[:2] / sha(content)).read_bytes() == content
    assert settings.blobs_path == settings.home_dir / "blobs"
    got = await client.get(url(tenant, "default/app.bin"), headers=tenant.headers)
    assert got.content == content
    assert (await client.delete(url(tenant, "default/app.bin"), headers=tenant.headers)).status_code == 204
    assert not (settings.blobs_path / sha(content)[:2] / sha(content)).exists()


async def test_openapi_describes_the_routes(api: Api) -> None:
    spec = (await api.http.get("/openapi.json")).json()
    assert set(spec["paths"]["/v1/orgs/{org}/blobs/{key}"]) == {"put", "get", "head", "delete"}
