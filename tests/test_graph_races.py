"""Races of the graph: two transactions at once, the first held open at the critical point (``races``)."""

from __future__ import annotations

from uuid import UUID

import pytest
from conftest import Tenant
from races import change, held, second

from canvasdb.entities import EntityType
from canvasdb.errors import Conflict
from canvasdb.services import Services


async def node(svc: Services, t: Tenant, title: str, type: str = "task") -> UUID:
    return (await svc.entities.create(t.owner, t.project_id, type, {"title": title})).id


async def live(pg_url: str, t: Tenant, src: UUID, dst: UUID) -> bool:
    async with held(pg_url, t) as conn:
        cur = await conn.execute("SELECT bool_or(live) FROM relationships WHERE org_id = %s AND src = %s"
                                 " AND dst = %s", (t.org_id, src, dst))
        row = await cur.fetchone()
    assert row is not None and row[0] is not None, "no relationship"
    return bool(row[0])


async def test_a_reference_written_while_its_target_is_undeleted_is_live(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    """The reference's relationship is made hidden (its target is deleted when it is written);
    the undeletion of the target, if it does not wait, never sees that relationship to bring
    it back."""
    await svc.types.register(tenant.owner, EntityType(name="task", reference_fields=["$.parent"]))
    for _ in range(3):
        a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
        await svc.entities.delete(tenant.owner, b)
        async with held(pg_url, tenant) as first:
            await change(first, tenant, a, "merge", f'{{"parent": "{b}"}}')
            await second(pg_url, first, svc.entities.undelete(tenant.owner, b))
        assert await live(pg_url, tenant, a, b), "both ends are live, the relationship is hidden"


@pytest.mark.parametrize("first_op", ["delete", "undelete"])
async def test_the_ends_of_a_relationship_deleted_and_undeleted_at_once(
        svc: Services, pg_url: str, tenant: Tenant, first_op: str) -> None:
    """Undeleting one end while the other end is deleted (or undeleted) at the same time: each
    decided whether the relationship is hidden from what it saw of the other end before that
    one committed."""
    for _ in range(3):
        a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
        await svc.relationships.create(tenant.owner, a, b, "mentions")
        await svc.entities.delete(tenant.owner, a)
        if first_op == "undelete":
            await svc.entities.delete(tenant.owner, b)
        async with held(pg_url, tenant) as first:
            await change(first, tenant, b, first_op)
            await second(pg_url, first, svc.entities.undelete(tenant.owner, a))
        # b deleted by the first: hidden; b undeleted by the first: both ends live, and so is it
        assert await live(pg_url, tenant, a, b) == (first_op == "undelete")


async def test_if_match_updates_of_a_relationship_never_both_win(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
    rel = await svc.relationships.create(tenant.owner, a, b, "mentions", {"label": "v1"})
    async with held(pg_url, tenant) as first:  # an update of version 1, not yet committed
        await first.execute("UPDATE relationships SET data = '{\"label\": \"first\"}' WHERE org_id = %s"
                            " AND id = %s AND version = 1", (tenant.org_id, rel.id))
        with pytest.raises(Conflict) as info:
            await second(pg_url, first, svc.relationships.update(tenant.owner, rel.id, {"label": "second"},
                                                                 if_version=1))
    assert info.value.fields["current_version"] == 2
    assert (await svc.relationships.get(tenant.owner, rel.id)).data == {"label": "first"}


async def test_two_writes_of_one_entity_leave_the_references_of_the_last(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    """What held: the second write waits for the first (the entity's row lock) and its
    trigger sees the first's relationships, so what is live matches the data written last."""
    await svc.types.register(tenant.owner, EntityType(name="task", reference_fields=["$.parent"]))
    a, b, c = await node(svc, tenant, "a"), await node(svc, tenant, "b"), await node(svc, tenant, "c")
    async with held(pg_url, tenant) as first:
        await change(first, tenant, a, "merge", f'{{"parent": "{b}"}}')
        written = await second(pg_url, first, svc.entities.patch(tenant.owner, a, {"parent": str(c)}))
    assert written.version == 3 and written.data["parent"] == str(c)
    assert not await live(pg_url, tenant, a, b) and await live(pg_url, tenant, a, c)
