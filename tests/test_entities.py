"""The entity store through its Python API: writes, history, as-of reads, access."""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import jsonpatch
import psycopg
import pytest
from conftest import KEYFRAME_INTERVAL, Tenant
from prometheus_client import REGISTRY

from canvasdb.db import Database
from canvasdb.entities import EntityStore, EntityType, parse_as_of
from canvasdb.entities.changes import ChangeQueue
from canvasdb.errors import Conflict, Forbidden, Gone, InvalidInput, NotFound, PayloadTooLarge, Unavailable
from canvasdb.services import Services
from canvasdb.settings import Settings
from canvasdb.tenancy import Principal


async def test_create_get_with_client_id(svc: Services, tenant: Tenant) -> None:
    eid = uuid4()
    e = await svc.entities.create(tenant.owner, tenant.project_id, "kanban.card", {"title": "x"}, id=eid)
    assert (e.id, e.version, e.deleted, e.created_by) == (eid, 1, False, tenant.owner_id)
    got = await svc.entities.get(tenant.owner, eid)
    assert got == e
    with pytest.raises(Conflict):
        await svc.entities.create(tenant.owner, tenant.project_id, "kanban.card", {}, id=eid)


async def test_same_id_in_two_orgs_are_two_entities(svc: Services, tenant: Tenant,
                                                    other_tenant: Tenant) -> None:
    eid = uuid4()
    await svc.entities.create(tenant.owner, tenant.project_id, "note", {"who": "a"}, id=eid)
    await svc.entities.create(other_tenant.owner, other_tenant.project_id, "note", {"who": "b"}, id=eid)
    assert (await svc.entities.get(tenant.owner, eid)).data == {"who": "a"}
    assert (await svc.entities.get(other_tenant.owner, eid)).data == {"who": "b"}


async def test_replace_patch_and_history(svc: Services, tenant: Tenant) -> None:
    who = tenant.owner
    e = await svc.entities.create(who, tenant.project_id, "note", {"a": 1, "b": {"c": 2, "d": 3}})
    e2 = await svc.entities.patch(who, e.id, {"b": {"c": None, "e": 5}, "f": [1]})
    assert e2.data == {"a": 1, "b": {"d": 3, "e": 5}, "f": [1]} and e2.version == 2
    e3 = await svc.entities.replace(who, e.id, {"z": True})
    assert e3.data == {"z": True} and e3.version == 3
    same = await svc.entities.replace(who, e.id, {"z": True})
    assert same.version == 3, "a write that changes nothing adds no version"
    page = await svc.entities.history(who, e.id)
    assert [(v.version, v.op) for v in page.items] == [(3, "update"), (2, "update"), (1, "create")]
    assert page.items[1].patch and page.next is None
    assert [op["op"] for op in page.items[0].patch or []]  # a real RFC 6902 patch
    patch = await svc.entities.diff(who, e.id, 1, 3)
    assert jsonpatch.apply_patch(e.data, patch) == {"z": True}
    assert jsonpatch.apply_patch({"z": True}, await svc.entities.diff(who, e.id, 3, 1)) == e.data


async def test_history_pages(svc: Services, tenant: Tenant) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 0})
    for n in range(1, 12):
        await svc.entities.patch(tenant.owner, e.id, {"n": n})
    first = await svc.entities.history(tenant.owner, e.id, limit=5)
    assert [v.version for v in first.items] == [12, 11, 10, 9, 8] and first.next == "8"
    second = await svc.entities.history(tenant.owner, e.id, before=int(first.next), limit=5)
    assert [v.version for v in second.items] == [7, 6, 5, 4, 3]


async def test_as_of_version_and_time_across_keyframes(svc: Services, tenant: Tenant) -> None:
    who = tenant.owner
    e = await svc.entities.create(who, tenant.project_id, "note", {"n": 0})
    moments = [(1, e.updated_at)]
    for n in range(1, 3 * KEYFRAME_INTERVAL + 2):
        cur = await svc.entities.patch(who, e.id, {"n": n, f"k{n}": n})
        moments.append((cur.version, cur.updated_at))
    for version, at in moments:
        by_version = await svc.entities.get(who, e.id, as_of=version)
        by_time = await svc.entities.get(who, e.id, as_of=at)
        assert by_version.data["n"] == version - 1 and by_version.version == version
        assert by_time == by_version
    with pytest.raises(NotFound):
        await svc.entities.get(who, e.id, as_of=e.created_at - timedelta(seconds=1))
    with pytest.raises(NotFound):
        await svc.entities.get(who, e.id, as_of=999)
    naive = moments[2][1].astimezone(UTC).replace(tzinfo=None)
    assert (await svc.entities.get(who, e.id, as_of=naive)).version == 3, "naive times are UTC"


async def test_delete_undelete_restore(svc: Services, tenant: Tenant) -> None:
    who = tenant.owner
    e = await svc.entities.create(who, tenant.project_id, "note", {"v": 1})
    await svc.entities.patch(who, e.id, {"v": 2})
    d = await svc.entities.delete(who, e.id)
    assert d.deleted and d.version == 3 and d.data == {"v": 2}
    assert (await svc.entities.delete(who, e.id)).version == 3, "deleting twice changes nothing"
    with pytest.raises(Gone):
        await svc.entities.get(who, e.id)
    with pytest.raises(Gone):
        await svc.entities.patch(who, e.id, {"v": 9})
    page = await svc.entities.list(who, tenant.project_id)
    assert e.id not in [x.id for x in page.items]
    u = await svc.entities.undelete(who, e.id)
    assert (u.deleted, u.version, u.data) == (False, 4, {"v": 2})
    await svc.entities.delete(who, e.id)
    r = await svc.entities.restore(who, e.id, 1)
    assert (r.deleted, r.version, r.data) == (False, 6, {"v": 1})
    ops = [v.op for v in (await svc.entities.history(who, e.id)).items]
    assert ops == ["restore", "delete", "undelete", "delete", "update", "create"]
    assert (await svc.entities.get(who, e.id, as_of=3)).deleted is True
    with pytest.raises(NotFound):
        await svc.entities.restore(who, e.id, 99)


async def test_if_version_conflict_changes_nothing(svc: Services, tenant: Tenant) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"v": 1})
    await svc.entities.patch(tenant.owner, e.id, {"v": 2}, if_version=1)
    with pytest.raises(Conflict) as info:
        await svc.entities.patch(tenant.owner, e.id, {"v": 3}, if_version=1)
    assert info.value.fields["current_version"] == 2
    assert (await svc.entities.get(tenant.owner, e.id)).data == {"v": 2}


async def test_concurrent_writers_lose_nothing(svc: Services, tenant: Tenant) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {})
    await asyncio.gather(*(svc.entities.patch(tenant.owner, e.id, {f"k{i}": i}) for i in range(16)))
    final = await svc.entities.get(tenant.owner, e.id)
    assert final.version == 17 and final.data == {f"k{i}": i for i in range(16)}
    versions = (await svc.entities.history(tenant.owner, e.id)).items
    assert sorted(v.version for v in versions) == list(range(1, 18))
    assert all(a.at > b.at for a, b in zip(versions, versions[1:], strict=False)), "times strictly increase"


async def test_concurrent_changes_share_commits_and_answer_each_caller(svc: Services, tenant: Tenant) -> None:
    def batched() -> float:  # changes committed in batches of more than one so far
        def changes(le: str) -> float:
            return REGISTRY.get_sample_value("canvasdb_entity_commit_batch_changes_bucket", {"le": le}) or 0
        return changes("+Inf") - changes("1.0")

    made = [await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": i}) for i in range(40)]
    before = batched()
    changed = await asyncio.gather(*(svc.entities.patch(tenant.owner, e.id, {"m": e.data["n"] * 10})
                                     for e in made))
    assert batched() > before, "concurrent changes were not committed together"
    for e, after in zip(made, changed, strict=True):
        assert (after.id, after.version, after.data) == (e.id, 2, {"n": e.data["n"], "m": e.data["n"] * 10})
        stored = await svc.entities.get(tenant.owner, e.id)
        assert stored == after
        history = (await svc.entities.history(tenant.owner, e.id)).items
        assert [(v.version, v.op, v.patch) for v in history][0] == (
            2, "update", [{"op": "add", "path": "/m", "value": e.data["n"] * 10}])


async def test_waiting_changes_are_shared_evenly_by_the_batches_in_flight(
        svc: Services, tenant: Tenant) -> None:
    def batches(le: str) -> float:
        return REGISTRY.get_sample_value("canvasdb_entity_commit_batch_changes_bucket", {"le": le}) or 0

    made = [await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": i}) for i in range(40)]
    before = batches("+Inf"), batches("20.0")
    # The first change is written alone at once; the 39 that queue behind it go as two
    # batches of 20 and 19, not as one of 39 (which would leave the second backend idle).
    await asyncio.gather(*(svc.entities.patch(tenant.owner, e.id, {"m": 1}) for e in made))
    written, small = batches("+Inf") - before[0], batches("20.0") - before[1]
    assert written >= 3 and small == written, "a batch took more than its half of the waiting changes"


async def test_a_backlog_of_changes_is_written_in_turns_by_org(
        svc: Services, tenant: Tenant, other_tenant: Tenant) -> None:
    """100 changes of one org queued before one of another, batches of 10: that one goes in the
    first batch taken from the backlog, not after the 100 (each entity's changes keep their
    order: one per entity per batch)."""
    many = [await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": i}) for i in range(100)]
    one = await svc.entities.create(other_tenant.owner, other_tenant.project_id, "note", {"n": 0})
    queue = ChangeQueue(svc.db, max_batch=10)
    finished: list[UUID] = []

    async def merge(who: Principal, id: UUID) -> None:  # what EntityStore.patch queues
        row = await queue.change({
            "org": who.org_id, "id": id, "actor": who.user_id, "admin": who.is_org_admin, "op": "merge",
            "value": '{"m": 1}', "if_version": None, "validated_at": None,
            "keyframe_interval": svc.entities.keyframe_interval, "max_bytes": svc.entities.max_data_bytes})
        assert row["outcome"] == "done"
        finished.append(id)

    # all queued at once, in this order (the first is written alone while the others queue)
    await asyncio.gather(*(merge(tenant.owner, e.id) for e in many), merge(other_tenant.owner, one.id))
    assert finished.index(one.id) < 40, f"written after {finished.index(one.id)} changes of the other org"


def splits_so_far() -> float:
    return REGISTRY.get_sample_value("canvasdb_entity_commit_batch_splits_total") or 0


async def test_a_batch_past_the_statement_timeout_fails_only_the_change_that_waited(
        pg_url: str, svc: Services, tenant: Tenant) -> None:
    """One entity locked by another transaction held the whole batch past the statement
    timeout, and every change in it answered 503: the batch is rolled back, so each is
    written on its own, and only the locked one times out."""
    made = [await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": i}) for i in range(8)]
    async with Database(pg_url, min_size=1, max_size=4, statement_timeout_ms=500) as impatient:
        store = EntityStore(impatient, svc.entities.types, keyframe_interval=svc.entities.keyframe_interval)
        with psycopg.connect(pg_url) as holder:  # a transaction that keeps the first row locked
            holder.execute("SELECT 1 FROM entities WHERE org_id = %s AND id = %s FOR UPDATE",
                           (tenant.org_id, made[0].id))
            splits = splits_so_far()
            outcomes = await asyncio.gather(
                *(store.patch(tenant.owner, e.id, {"m": 1}) for e in made[1:4]),  # the first goes alone
                store.patch(tenant.owner, made[0].id, {"m": 1}),
                *(store.patch(tenant.owner, e.id, {"m": 1}) for e in made[4:]), return_exceptions=True)
            holder.rollback()
    stuck = outcomes[3]
    others = outcomes[:3] + outcomes[4:]
    assert isinstance(stuck, Unavailable) and stuck.fields.get("retry") is True
    assert splits_so_far() > splits, "the locked change shared a batch"
    assert [o.data.get("m") if not isinstance(o, BaseException) else o for o in others] == [1] * 7
    assert (await svc.entities.get(tenant.owner, made[0].id)).version == 1


async def test_a_failing_change_in_a_batch_fails_alone(svc: Services, tenant: Tenant) -> None:
    await svc.types.register(tenant.owner, EntityType("batch.task", reference_fields=["$.parent"]))
    await svc.types.register(tenant.owner, EntityType(
        "batch.card", json_schema={"type": "object", "properties": {"n": {"type": "integer"}}}))
    tasks = [await svc.entities.create(tenant.owner, tenant.project_id, "batch.task", {"n": i}) for i in range(6)]
    cards = [await svc.entities.create(tenant.owner, tenant.project_id, "batch.card", {"n": i}) for i in range(3)]
    deleted = await svc.entities.create(tenant.owner, tenant.project_id, "note", {})
    await svc.entities.delete(tenant.owner, deleted.id)
    splits = splits_so_far()
    outcomes = await asyncio.gather(
        *(svc.entities.patch(tenant.owner, t.id, {"done": True}) for t in tasks[1:]),
        svc.entities.patch(tenant.owner, tasks[0].id, {"parent": str(uuid4())}),  # names no entity
        svc.entities.patch(tenant.owner, tasks[1].id, {"late": True}, if_version=1),  # may be second
        svc.entities.patch(tenant.owner, cards[0].id, {"n": 5}),  # validated by the schema, then written
        svc.entities.patch(tenant.owner, cards[1].id, {"n": "five"}),  # refused by the schema
        svc.entities.patch(tenant.owner, cards[2].id, {"x": 1}, if_version=7),  # stale
        svc.entities.patch(tenant.owner, deleted.id, {"x": 1}),  # deleted
        return_exceptions=True)
    *done, bad_ref, late, valid, invalid, stale, gone = outcomes
    assert all(not isinstance(o, BaseException) and o.data["done"] for o in done)
    assert isinstance(bad_ref, InvalidInput) and "does not exist" in str(bad_ref)
    assert splits_so_far() > splits, "the bad change did not share a batch"
    assert (await svc.entities.get(tenant.owner, tasks[0].id)).version == 1, "nothing of it was written"
    assert isinstance(late, Conflict) or late.version == 2  # before or after the other change of task 1
    assert not isinstance(valid, BaseException) and valid.data == {"n": 5}
    assert isinstance(invalid, InvalidInput) and invalid.fields["pointer"] == "/data/n"
    assert isinstance(stale, Conflict) and stale.fields["current_version"] == 1
    assert isinstance(gone, Gone)
    assert (await svc.entities.get(tenant.owner, tasks[1].id)).data["done"] is True


async def test_list_pages_by_type_and_as_of(svc: Services, tenant: Tenant) -> None:
    who = tenant.owner
    made = [await svc.entities.create(who, tenant.project_id, "a" if i % 2 else "b", {"i": i})
            for i in range(25)]
    before_change = datetime.now(UTC)
    await svc.entities.delete(who, made[0].id)
    await svc.entities.patch(who, made[1].id, {"i": 100})
    seen, after = [], None
    while True:
        page = await svc.entities.list(who, tenant.project_id, limit=7, after=after)
        seen += page.items
        if page.next is None:
            break
        after = page.next
    assert len(seen) == 24 and [x.id for x in seen] == sorted(x.id for x in seen)
    only_a = await svc.entities.list(who, tenant.project_id, type="a", limit=100)
    assert len(only_a.items) == 12 and {x.type for x in only_a.items} == {"a"}
    then = await svc.entities.list(who, tenant.project_id, limit=100, as_of=before_change)
    by_id = {x.id: x for x in then.items}
    assert len(then.items) == 25 and by_id[made[1].id].data == {"i": 1} and made[0].id in by_id
    paged, after = [], None
    while True:
        page = await svc.entities.list(who, tenant.project_id, type="a", limit=5, after=after, as_of=before_change)
        paged += page.items
        if (after := page.next) is None:
            break
    assert [x.id for x in paged] == sorted(x.id for x in made if x.type == "a")
    assert all(x.version == 1 for x in paged)
    now = await svc.entities.list(who, tenant.project_id, limit=100, as_of=datetime.now(UTC))
    assert made[0].id not in {x.id for x in now.items} and len(now.items) == 24
    for limit in (6, 8, 12, 24):  # 24 live now, the deleted one among them: pages that end exactly
        pages, after = 0, None
        while True:
            page = await svc.entities.list(who, tenant.project_id, limit=limit, after=after,
                                           as_of=datetime.now(UTC))
            pages += 1
            assert page.items, "an empty page after a cursor"
            if (after := page.next) is None:
                break
        assert pages == 24 // limit
    before_all = await svc.entities.list(who, tenant.project_id, as_of=made[0].created_at - timedelta(seconds=1))
    assert before_all.items == [] and before_all.next is None
    with pytest.raises(InvalidInput):
        await svc.entities.list(who, tenant.project_id, limit=0)


async def test_get_many_skips_missing_and_deleted(svc: Services, tenant: Tenant) -> None:
    a = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    b = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 2})
    await svc.entities.delete(tenant.owner, b.id)
    got = await svc.entities.get_many(tenant.owner, [uuid4(), a.id, b.id])
    assert [x.id for x in got] == [a.id]
    with pytest.raises(InvalidInput):
        await svc.entities.get_many(tenant.owner, [uuid4() for _ in range(101)])


async def test_schema_validation_names_the_field(svc: Services, tenant: Tenant) -> None:
    schema = {"type": "object", "required": ["title"], "properties": {
        "title": {"type": "string"}, "status": {"enum": ["todo", "done"]},
        "tags": {"type": "array", "items": {"type": "string"}}}}
    await svc.types.register(tenant.owner, EntityType("kanban.card", module="kanban", json_schema=schema,
                                                      text_fields={"title": "A"}))
    ok = await svc.entities.create(tenant.owner, tenant.project_id, "kanban.card", {"title": "t"})
    with pytest.raises(InvalidInput) as info:
        await svc.entities.patch(tenant.owner, ok.id, {"tags": ["x", 3]})
    assert info.value.fields["pointer"] == "/data/tags/1"
    with pytest.raises(InvalidInput) as info:
        await svc.entities.create(tenant.owner, tenant.project_id, "kanban.card", {"title": "t", "status": "?"})
    assert info.value.fields["pointer"] == "/data/status"
    assert (await svc.entities.get(tenant.owner, ok.id)).version == 1
    with pytest.raises(InvalidInput):
        await svc.types.register(tenant.owner, EntityType("bad.schema", json_schema={"type": 5}))
    with pytest.raises(InvalidInput):
        await svc.types.register(tenant.owner, EntityType("x.y", reference_fields=["depends_on"]))


async def test_size_limit(svc: Services, tenant: Tenant) -> None:
    limit = svc.entities.max_data_bytes
    with pytest.raises(PayloadTooLarge):
        await svc.entities.create(tenant.owner, tenant.project_id, "note", {"s": "x" * limit})
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"s": "x" * (limit - 100)})
    with pytest.raises(PayloadTooLarge):
        await svc.entities.patch(tenant.owner, e.id, {"more": "y" * 200})
    assert (await svc.entities.get(tenant.owner, e.id)).version == 1

    # A patch is measured as creates and replacements are, in compact JSON, although
    # PostgreSQL prints the merged data with a space after each ':' and ','.
    keys = {f"k{i:05}": 1 for i in range(limit // 12)}  # compact: 11 bytes a key; printed: 13
    many = await svc.entities.create(tenant.owner, tenant.project_id, "note", keys)
    assert (await svc.entities.patch(tenant.owner, many.id, {"k00000": 2})).data == {**keys, "k00000": 2}
    assert "k00001" not in (await svc.entities.patch(tenant.owner, many.id, {"k00001": None})).data
    with pytest.raises(Conflict):  # If-Match holds on that path too
        await svc.entities.patch(tenant.owner, many.id, {"k00002": 2}, if_version=1)
    with pytest.raises(PayloadTooLarge):
        await svc.entities.patch(tenant.owner, many.id, {"big": "z" * (limit // 10)})
    assert (await svc.entities.get(tenant.owner, many.id)).version == 3


async def test_roles_inside_the_store(svc: Services, tenant: Tenant) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    viewer_id = await svc.tenancy.ensure_user(f"viewer-{tenant.slug}@example.com")
    stranger_id = await svc.tenancy.ensure_user(f"member-{tenant.slug}@example.com")
    for uid in (viewer_id, stranger_id):
        await svc.tenancy.set_org_role(tenant.org_id, uid, "member")
    await svc.tenancy.set_project_role(tenant.owner, tenant.project_id, viewer_id, "viewer")
    viewer = Principal(tenant.org_id, viewer_id, "member")
    stranger = Principal(tenant.org_id, stranger_id, "member")
    assert (await svc.entities.get(viewer, e.id)).data == {"n": 1}
    with pytest.raises(Forbidden):
        await svc.entities.patch(viewer, e.id, {"n": 2})
    with pytest.raises(Forbidden):
        await svc.entities.create(viewer, tenant.project_id, "note", {})
    with pytest.raises(NotFound):
        await svc.entities.get(stranger, e.id)
    assert await svc.entities.get_many(stranger, [e.id]) == []
    with pytest.raises(NotFound):
        await svc.entities.list(stranger, tenant.project_id)
    with pytest.raises(NotFound):  # an empty page too: the question is whether it may read
        await svc.entities.list(stranger, tenant.project_id, type="nothing")
    assert [x.id for x in (await svc.entities.list(viewer, tenant.project_id)).items] == [e.id]
    assert (await svc.entities.list(viewer, tenant.project_id, type="nothing")).items == []
    await svc.tenancy.set_project_role(tenant.owner, tenant.project_id, viewer_id, "editor")
    assert (await svc.entities.patch(viewer, e.id, {"n": 2})).updated_by == viewer_id


async def test_numbers_and_nesting_come_back_exactly(svc: Services, tenant: Tenant) -> None:
    """jsonb is read with orjson, except what it would read differently: integers past 64 bits
    (it makes them floats) and very deep nesting; every read path gives back what was written."""
    data = {"big": 18446744073709551616, "neg": -9223372036854775809, "max": 9223372036854775807,
            "min": -9223372036854775808, "huge": 10**40, "digits": "12345678901234567890",
            "float": 0.1, "tiny": 5e-324, "zero": -0.0,
            "deep": functools.reduce(lambda inner, _: [inner], range(90), {"leaf": 1})}
    e = await svc.entities.create(tenant.owner, tenant.project_id, "numbers", data)
    await svc.entities.patch(tenant.owner, e.id, {"big": 2**70 + 1})
    now = {**data, "big": 2**70 + 1}
    assert (await svc.entities.get(tenant.owner, e.id)).data == now
    assert (await svc.entities.get(tenant.owner, e.id, as_of=1)).data == data
    assert [x.data for x in await svc.entities.get_many(tenant.owner, [e.id])] == [now]
    page = await svc.entities.list(tenant.owner, tenant.project_id, type="numbers")
    assert [x.data for x in page.items] == [now]
    assert type(page.items[0].data["big"]) is int and type(page.items[0].data["float"]) is float


async def test_as_of_without_a_zone_is_utc(svc: Services, tenant: Tenant, pg_url: str) -> None:
    """A time without a zone means UTC, whatever the zone of the database's sessions."""
    assert parse_as_of("2024-01-01T10:00:00") == datetime(2024, 1, 1, 10, tzinfo=UTC)
    assert parse_as_of("2024-01-01T10:00:00+02:00") == datetime(2024, 1, 1, 8, tzinfo=UTC)
    assert parse_as_of("20240101") == 20240101  # digits alone: a version
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    await asyncio.sleep(0.01)
    await svc.entities.patch(tenant.owner, e.id, {"n": 2})
    changed = (await svc.entities.get(tenant.owner, e.id)).updated_at
    naive = (e.created_at + (changed - e.created_at) / 2).astimezone(UTC).replace(tzinfo=None).isoformat()
    tokyo = f"{pg_url}{'&' if '?' in pg_url else '?'}options=-ctimezone%3DAsia%2FTokyo"
    async with Database(tokyo, min_size=1, max_size=1) as far_east:  # sessions nine hours east
        store = Services.build(Settings(database_url=tokyo), far_east).entities
        assert (await store.get(tenant.owner, e.id, as_of=parse_as_of(naive))).data == {"n": 1}
