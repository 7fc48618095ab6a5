"""Races of entities and their types: two transactions at once, the first held open at the
critical point (``races``)."""

from __future__ import annotations

from conftest import Tenant
from races import change, held, second

from canvasdb.entities import EntityType
from canvasdb.services import Services


async def test_an_entity_written_while_its_type_gets_search_fields_is_indexed_by_both(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    """The registration indexes the type's entities again with the new fields; an entity
    written meanwhile was indexed by the old fields (by its writer) or from its data before
    the write (by the registration), whichever wrote last."""
    await svc.types.register(tenant.owner, EntityType(name="memo", text_fields={"title": "A"}))
    for i in range(3):
        e = await svc.entities.create(tenant.owner, tenant.project_id, "memo",
                                      {"title": "alpha", "body": "bravo"})
        new_fields = {"title": "A", "body": "B"} if i % 2 == 0 else {"title": "A", "body": "C"}
        async with held(pg_url, tenant) as first:
            await change(first, tenant, e.id, "replace", '{"title": "alpha", "body": "delta"}')
            await second(pg_url, first, svc.types.register(
                tenant.owner, EntityType(name="memo", text_fields=new_fields)))
        async with held(pg_url, tenant) as conn:
            cur = await conn.execute("SELECT tsv::text FROM search_docs WHERE org_id = %s AND entity_id = %s",
                                     (tenant.org_id, e.id))
            row = await cur.fetchone()
        assert row is not None
        assert "'delta'" in row[0] and "'bravo'" not in row[0], row[0]
