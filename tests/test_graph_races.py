"""Races of the graph: two transactions at once, the first held open at the critical point (``races``)."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import pytest
from conftest import Tenant
from races import change, held, second, waiting

from canvasdb.entities import EntityType
from canvasdb.errors import Conflict, Gone
from canvasdb.services import Services


async def node(svc: Services, t: Tenant, title: str, type: str = "task") -> UUID:
    return (await svc.entities.create(t.owner, t.project_id, type, {"title": title})).id


async def nodes_in_id_order(svc: Services, t: Tenant, n: int) -> list[UUID]:
    return sorted([await node(svc, t, f"n{i}") for i in range(n)])


async def both(*tasks: asyncio.Future[Any]) -> list[Any]:
    """What each returned; fails naming every one that raised (a deadlock answers 409)."""
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)], results
    return results


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


async def test_a_write_referencing_an_entity_being_undeleted_waits_for_it_without_a_deadlock(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    """References of an acyclic kind to a and b (in id order) written while b, which has an
    edge of that kind, is undeleted: the writer took the kind's turn after locking a, then
    waited for b, which the undeletion held while it waited for the turn (PostgreSQL
    cancelled one of them). The writer now locks both targets before taking the turn."""
    await svc.types.register(tenant.owner, EntityType(name="task", reference_fields=["$.depends_on[*]"],
                                                      acyclic_kinds=["depends_on"]))
    a, b = await nodes_in_id_order(svc, tenant, 2)
    edge = await svc.relationships.create(tenant.owner, b, await node(svc, tenant, "c"), "depends_on")
    await svc.entities.delete(tenant.owner, b)
    async with held(pg_url, tenant) as first:  # a change of b's edge in flight: the undeletion,
        # having locked b, waits for it before its cycle check
        await first.execute("UPDATE relationships SET data = '{\"label\": \"x\"}' WHERE org_id = %s"
                            " AND id = %s", (tenant.org_id, edge.id))
        undeleting, undeleter = await waiting(pg_url, [first.info.backend_pid],
                                              svc.entities.undelete(tenant.owner, b))
        assert undeleter is not None
        writing, _ = await waiting(pg_url, [undeleter], svc.entities.create(
            tenant.owner, tenant.project_id, "task", {"title": "w", "depends_on": [str(a), str(b)]}))
        await first.commit()
        undeleted, written = await both(undeleting, writing)
    assert not undeleted.deleted
    assert await live(pg_url, tenant, written.id, a) and await live(pg_url, tenant, written.id, b)


async def test_writes_referencing_two_acyclic_kinds_in_opposite_id_orders_both_succeed(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    """Each writer took a kind's turn at each target, in the targets' id order: one took
    depends_on then waited for a target, the other took blocks then waited for depends_on,
    and the first, given its target, waited for blocks. Turns are now taken in kind order,
    after every target is locked."""
    await svc.types.register(tenant.owner, EntityType(
        name="task", reference_fields=["$.blocks[*]", "$.depends_on[*]"], acyclic_kinds=["blocks", "depends_on"]))
    n1, n2, n3, n4 = await nodes_in_id_order(svc, tenant, 4)
    async with held(pg_url, tenant) as first:  # a deletion of n3 in flight
        await change(first, tenant, n3, "delete")
        one, waiter = await waiting(pg_url, [first.info.backend_pid], svc.entities.create(
            tenant.owner, tenant.project_id, "task", {"title": "one", "depends_on": [str(n1)], "blocks": [str(n3)]}))
        assert waiter is not None
        other, _ = await waiting(pg_url, [waiter], svc.entities.create(
            tenant.owner, tenant.project_id, "task", {"title": "other", "blocks": [str(n2)], "depends_on": [str(n4)]}))
        await first.commit()
        w1, w2 = await both(one, other)
    assert await live(pg_url, tenant, w1.id, n1) and not await live(pg_url, tenant, w1.id, n3)
    assert await live(pg_url, tenant, w2.id, n2) and await live(pg_url, tenant, w2.id, n4)


async def test_a_relationship_made_while_a_batch_deletes_both_ends_answers_gone(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    """A group commit deletes its entities in id order. A relationship from the later to the
    earlier locked its source, then waited for its target, which the batch held while it
    waited for the source (a deadlock). The ends are now locked in id order too."""
    low, high = await nodes_in_id_order(svc, tenant, 2)
    async with held(pg_url, tenant) as first:  # a batch of two deletions, the first written
        await change(first, tenant, low, "delete")
        creating, _ = await waiting(pg_url, [first.info.backend_pid],
                                    svc.relationships.create(tenant.owner, high, low, "mentions"))
        await change(first, tenant, high, "delete")
        await first.commit()
        with pytest.raises(Gone):
            await creating


async def test_a_restore_referencing_an_entity_being_deleted_waits_for_it_without_a_deadlock(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    """Restoring a deleted entity to a version that references t, while t, linked to it, is
    deleted: the restore locked its relationships (t -> w among them) and then waited for t,
    which the deletion held while it waited, relationship by relationship, for t -> w. A
    restore now locks the targets of its references before its relationships."""
    await svc.types.register(tenant.owner, EntityType(name="task", reference_fields=["$.parent"]))
    t, w = await node(svc, tenant, "t"), await node(svc, tenant, "w")
    await svc.entities.patch(tenant.owner, w, {"parent": str(t)})  # version 2
    await svc.entities.patch(tenant.owner, w, {"parent": None})
    first_of_t = await svc.relationships.create(tenant.owner, t, await node(svc, tenant, "z"), "mentions",
                                                id=UUID(int=1))  # the first the deletion locks
    await svc.relationships.create(tenant.owner, t, w, "mentions")
    await svc.entities.delete(tenant.owner, w)
    async with held(pg_url, tenant) as first, held(pg_url, tenant) as deleting:
        await first.execute("UPDATE relationships SET data = '{\"label\": \"x\"}' WHERE org_id = %s"
                            " AND id = %s", (tenant.org_id, first_of_t.id))
        deletion, deleter = await waiting(pg_url, [first.info.backend_pid], change(deleting, tenant, t, "delete"))
        assert deleter is not None
        restoring, _ = await waiting(pg_url, [deleter], svc.entities.restore(tenant.owner, w, 2))
        await first.commit()
        await deletion
        await deleting.commit()
        restored = await restoring
    assert not restored.deleted and restored.data["parent"] == str(t)
    assert not await live(pg_url, tenant, w, t)  # t is deleted


async def test_a_restore_and_a_write_taking_the_turns_of_two_acyclic_kinds_both_succeed(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    """A restore took the turn of its new reference's kind (depends_on), then those of its
    relationships' kinds (blocks) for the undeletion's cycle check, while a write took blocks
    then depends_on. The restore's turns are now all taken in kind order."""
    await svc.types.register(tenant.owner, EntityType(
        name="task", reference_fields=["$.blocks[*]", "$.depends_on[*]"], acyclic_kinds=["blocks", "depends_on"]))
    w, a = await node(svc, tenant, "w"), await node(svc, tenant, "a")
    await svc.entities.patch(tenant.owner, w, {"depends_on": [str(a)]})  # version 2
    await svc.entities.patch(tenant.owner, w, {"depends_on": None})
    await svc.relationships.create(tenant.owner, w, await node(svc, tenant, "z"), "blocks")
    await svc.entities.delete(tenant.owner, w)
    b, c = await nodes_in_id_order(svc, tenant, 2)  # (b first: blocks' turn first, as ever)
    async with held(pg_url, tenant) as first:  # a registration of the type in flight: a write of
        # a task waits for it after its relationships (the search index reads the type)
        await first.execute("SELECT pg_advisory_xact_lock(entity_type_lock_key(%s, 'task'))", (tenant.org_id,))
        restoring, restorer = await waiting(pg_url, [first.info.backend_pid], svc.entities.restore(tenant.owner, w, 2))
        assert restorer is not None
        # the write waits for the restore (a kind's turn) or, having taken its turns, for the
        # registration too
        writing, _ = await waiting(pg_url, [restorer, first.info.backend_pid], svc.entities.create(
            tenant.owner, tenant.project_id, "task", {"title": "x", "blocks": [str(b)], "depends_on": [str(c)]}))
        await first.commit()
        restored, written = await both(restoring, writing)
    assert not restored.deleted and await live(pg_url, tenant, w, a)
    assert await live(pg_url, tenant, written.id, b) and await live(pg_url, tenant, written.id, c)
