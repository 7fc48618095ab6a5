"""Races of entities and their types: two transactions at once, the first held open at the
critical point (``races``)."""

from __future__ import annotations

import pytest
from conftest import Tenant
from races import change, held, second

from canvasdb.entities import EntityType
from canvasdb.errors import Conflict
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


async def test_changes_of_one_entity_take_turns(svc: Services, pg_url: str, tenant: Tenant) -> None:
    """What held: a change waits for the one in progress, then acts on what it committed (409
    for the same If-Match, the next version otherwise), and every version reads back from
    keyframes and patches as it was written."""
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 0})
    async with held(pg_url, tenant) as first:
        await change(first, tenant, e.id, "merge", '{"n": 1}')
        with pytest.raises(Conflict) as info:
            await second(pg_url, first, svc.entities.patch(tenant.owner, e.id, {"n": 2}, if_version=1))
    assert info.value.fields["current_version"] == 2
    rounds = [("delete", None, lambda: svc.entities.undelete(tenant.owner, e.id)),
              ("merge", '{"n": 3}', lambda: svc.entities.restore(tenant.owner, e.id, 1)),
              ("merge", '{"m": 1}', lambda: svc.entities.patch(tenant.owner, e.id, {"n": 4}))]
    for first_op, value, then in rounds:
        async with held(pg_url, tenant) as first:
            await change(first, tenant, e.id, first_op, value)
            await second(pg_url, first, then())
    written = [{"n": 0}, {"n": 1}, {"n": 1}, {"n": 1}, {"n": 3}, {"n": 0}, {"n": 0, "m": 1}, {"n": 4, "m": 1}]
    assert [(await svc.entities.get(tenant.owner, e.id, as_of=v)).data
            for v in range(1, len(written) + 1)] == written
    history = (await svc.entities.history(tenant.owner, e.id)).items
    assert [(v.version, v.op) for v in reversed(history)] == [
        (1, "create"), (2, "update"), (3, "delete"), (4, "undelete"), (5, "update"), (6, "restore"),
        (7, "update"), (8, "update")]
