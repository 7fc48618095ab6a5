"""Tenant isolation, enforced by PostgreSQL itself: the schema rules and row-level security."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import psycopg
import pytest
from conftest import Tenant

from canvasdb.db import Database
from canvasdb.errors import InvalidInput, NotFound, Unauthorized
from canvasdb.services import Services

GLOBAL_TABLES = {"orgs", "users", "api_tokens", "schema_migrations",
                 "search_models"}  # which embedding model is active: one choice for the deployment


def _tenant_tables(conn: psycopg.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1"
    ).fetchall()
    # The job queue's tables are global infrastructure (jobs name their org in their arguments).
    return [r[0] for r in rows if r[0] not in GLOBAL_TABLES and not r[0].startswith("procrastinate_")]


def test_every_tenant_table_is_keyed_and_guarded_by_org(pg_url: str) -> None:
    """Walks the catalog: a new table without org_id-first PK or forced RLS fails here."""
    with psycopg.connect(pg_url) as conn:
        tables = _tenant_tables(conn)
        assert {"entities", "entity_versions", "projects", "org_members"} <= set(tables)
        problems = []
        for table in tables:
            first_pk = conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a"
                " ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
                " WHERE i.indrelid = %s::regclass AND i.indisprimary", (table,),
            ).fetchone()
            if first_pk is None or first_pk[0] != "org_id":
                problems.append(f"{table}: primary key does not start with org_id")
            enabled, forced = conn.execute(
                "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = %s::regclass",
                (table,),
            ).fetchone()  # type: ignore[misc]
            if not (enabled and forced):
                problems.append(f"{table}: row-level security not enabled and forced")
            policies = conn.execute(
                "SELECT qual, with_check FROM pg_policies WHERE tablename = %s", (table,)
            ).fetchall()
            if not any("current_org_id()" in (q or "") and "current_org_id()" in (w or "")
                       for q, w in policies):
                problems.append(f"{table}: no policy on org_id = current_org_id()")
        assert problems == []


def test_app_role_cannot_bypass_rls(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = 'canvasdb_app'"
        ).fetchone()
    assert row == (False, False)


async def test_wrong_org_setting_sees_nothing(db: Database, svc: Services, tenant: Tenant,
                                              other_tenant: Tenant) -> None:
    """Even a query that forgets the org filter sees only the transaction's org."""
    mine = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"secret": "a"})
    theirs = await svc.entities.create(other_tenant.owner, other_tenant.project_id, "note", {"x": 1})
    async with db.transaction(other_tenant.org_id) as conn:
        # No org filter at all: the application check is bypassed on purpose.
        rows = await (await conn.execute("SELECT id FROM entities WHERE id = %s", (mine.id,))).fetchall()
        assert rows == []
        versions = await (await conn.execute(
            "SELECT count(*) AS n FROM entity_versions WHERE entity_id = %s", (mine.id,))).fetchone()
        assert versions == {"n": 0}
        own = await (await conn.execute("SELECT id FROM entities WHERE id = %s", (theirs.id,))).fetchall()
        assert [r["id"] for r in own] == [theirs.id]
    async with db.transaction() as conn:  # no org at all: nothing of any tenant
        total = await (await conn.execute("SELECT count(*) AS n FROM entities")).fetchone()
        assert total == {"n": 0}


async def test_cannot_write_into_another_org(db: Database, tenant: Tenant, other_tenant: Tenant) -> None:
    from canvasdb.errors import CanvasdbError

    with pytest.raises(CanvasdbError):
        async with db.transaction(other_tenant.org_id) as conn:
            await conn.execute(
                "INSERT INTO projects (org_id, slug, name) VALUES (%s, 'sneaky', 'x')", (tenant.org_id,)
            )
    async with db.transaction(tenant.org_id) as conn:
        cur = await conn.execute("SELECT slug FROM projects WHERE org_id = %s", (tenant.org_id,))
        assert [r["slug"] for r in await cur.fetchall()] == ["main"]


async def test_org_setting_does_not_leak_to_next_transaction(db: Database, tenant: Tenant) -> None:
    async with db.transaction(tenant.org_id) as conn:
        await conn.execute("SELECT 1")
    for _ in range(5):  # every pooled connection
        async with db.transaction() as conn:
            row = await (await conn.execute("SELECT current_org_id() AS org")).fetchone()
            assert row == {"org": None}


async def test_update_cannot_move_rows_to_another_org(db: Database, svc: Services, tenant: Tenant,
                                                     other_tenant: Tenant) -> None:
    from canvasdb.errors import CanvasdbError

    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"a": 1})
    with pytest.raises(CanvasdbError):
        async with db.transaction(tenant.org_id) as conn:
            await conn.execute("UPDATE entities SET org_id = %s WHERE id = %s", (other_tenant.org_id, e.id))
    assert (await svc.entities.get(tenant.owner, e.id)).org_id == tenant.org_id


async def test_search_lookups_keep_to_the_transactions_org(db: Database, svc: Services, tenant: Tenant,
                                                           other_tenant: Tenant) -> None:
    """The text and trigram lookups run as the schema owner (for their indexes): they must
    apply the org of the transaction themselves, whatever the caller asks."""
    from canvasdb.entities import EntityType

    await svc.types.register(tenant.owner, EntityType(name="note", text_fields={"title": "A"}))
    await svc.entities.create(tenant.owner, tenant.project_id, "note", {"title": "confidential merger"})
    await svc.indexer.drain(tenant.org_id)
    match = ("SELECT count(*) AS n FROM search_match('merger', NULL, %s, NULL, NULL, NULL, NULL, NULL, NULL, 100)")
    similar = "SELECT count(*) AS n FROM search_similar_terms('mergers', 1, 40, 100)"
    total = ("SELECT n FROM search_facets(%s, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 100, '{type}')"
             " WHERE facet = 'total'")
    async with db.transaction(tenant.org_id) as conn:
        for titles in (True, None):  # the titles' index, and the whole text's
            assert await (await conn.execute(match, (titles,))).fetchone() == {"n": 1}
        assert await (await conn.execute(similar)).fetchone() == {"n": 1}
        for query in ("merger", None):  # a text query, and every row in scope
            assert await (await conn.execute(total, (query,))).fetchone() == {"n": 1}
    for org in (other_tenant.org_id, None):
        async with db.transaction(org) as conn:
            for titles in (True, None):
                assert await (await conn.execute(match, (titles,))).fetchone() == {"n": 0}
            assert await (await conn.execute(similar)).fetchone() == {"n": 0}
            for query in ("merger", None):
                assert await (await conn.execute(total, (query,))).fetchone() == {"n": 0}


async def test_a_batch_of_changes_keeps_each_to_its_org(svc: Services, tenant: Tenant,
                                                        other_tenant: Tenant) -> None:
    ours = [await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": i}) for i in range(8)]
    theirs = [await svc.entities.create(other_tenant.owner, other_tenant.project_id, "note", {"n": i})
              for i in range(8)]
    outcomes = await asyncio.gather(  # concurrent: committed together, orgs mixed in one batch
        *(svc.entities.patch(tenant.owner, e.id, {"by": "us"}) for e in ours),
        *(svc.entities.patch(other_tenant.owner, e.id, {"by": "them"}) for e in theirs),
        *(svc.entities.patch(tenant.owner, e.id, {"by": "intruder"}) for e in theirs),
        return_exceptions=True)
    assert [o.data["by"] for o in outcomes[:16]] == ["us"] * 8 + ["them"] * 8
    assert all(isinstance(o, NotFound) for o in outcomes[16:]), "another org's entity looked missing"
    for e in theirs:
        stored = await svc.entities.get(other_tenant.owner, e.id)
        assert stored.data == {"n": e.data["n"], "by": "them"} and stored.version == 2


async def test_a_token_reaches_only_its_users_orgs(svc: Services, pg_url: str, tenant: Tenant,
                                                   other_tenant: Tenant) -> None:
    """One round trip (auth_principal) answers who is calling: 401 for a token that is not
    live, before anything about the org; 404 alike for an org that does not exist and one
    the user is not a member of; an org by slug or id."""
    who = await svc.tenancy.authorize(tenant.token, tenant.slug)
    assert (who.org_id, who.user_id, who.org_role) == (tenant.org_id, tenant.owner_id, "owner")
    assert (await svc.tenancy.authorize(tenant.token, str(tenant.org_id))).org_id == tenant.org_id
    for org in (other_tenant.slug, str(other_tenant.org_id), "no-such-org", str(uuid4())):
        with pytest.raises(NotFound):
            await svc.tenancy.authorize(tenant.token, org)
    for token in (None, "", "cdb_" + "x" * 43, "not-a-token", other_tenant.token[:-1] + "?"):
        with pytest.raises(Unauthorized):
            await svc.tenancy.authorize(token, tenant.slug)
    with pytest.raises(Unauthorized):
        await svc.tenancy.authorize("cdb_unknown", "no-such-org")

    # A reference that reads as a UUID is an id, never a slug: no slug may read as one (an
    # org whose slug was another org's id could stand in for it), and one that did, from
    # before, is not what that id names.
    for slug in (str(tenant.org_id), str(uuid4()), uuid4().hex):
        with pytest.raises(InvalidInput):
            await svc.tenancy.create_org(slug, owner=other_tenant.owner_id)
        with pytest.raises(InvalidInput):
            await svc.tenancy.create_project(other_tenant.owner, slug)
    with psycopg.connect(pg_url, autocommit=True) as conn:  # an impostor, as old data could hold
        conn.execute("INSERT INTO orgs (id, slug, name) VALUES (%s, %s, 'impostor')",
                     (uuid4(), str(tenant.org_id)))
        impostor = conn.execute("SELECT id FROM orgs WHERE slug = %s", (str(tenant.org_id),)).fetchone()[0]
        conn.execute("INSERT INTO org_members (org_id, user_id, role) VALUES (%s, %s, 'owner')",
                     (impostor, other_tenant.owner_id))
    for token in (tenant.token, other_tenant.token):
        try:
            assert (await svc.tenancy.authorize(token, str(tenant.org_id))).org_id == tenant.org_id
        except NotFound:
            assert token == other_tenant.token  # not a member of the real one: never the impostor
    assert (await svc.tenancy.resolve_org(str(tenant.org_id))).id == tenant.org_id

    _, spare = await svc.tenancy.create_token(tenant.owner_id)
    assert (await svc.tenancy.authorize(spare, tenant.slug)).user_id == tenant.owner_id
    assert await svc.tenancy.revoke_token(spare)
    with pytest.raises(Unauthorized):
        await svc.tenancy.authorize(spare, tenant.slug)
