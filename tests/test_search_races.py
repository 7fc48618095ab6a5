"""Search indexing racing entity writes: each write is held open in its own transaction while
the indexer or a type's re-declaration runs, then committed; the index must end up as the
entity's committed text says."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from uuid import UUID, uuid4

from conftest import Tenant
from psycopg.types.json import Jsonb

from canvasdb.db import Connection
from canvasdb.entities import EntityType
from canvasdb.entities.changes import _CHANGE
from canvasdb.entities.store import _INSERT
from canvasdb.search.indexer import Indexer
from canvasdb.search.models import Models
from canvasdb.services import Services

T = TypeVar("T")
MEMO = EntityType(name="memo", module="memos", text_fields={"title": "A"})


@asynccontextmanager
async def held_write(svc: Services, tenant: Tenant, entity: UUID, op: str,
                     data: dict[str, Any] | None = None) -> AsyncIterator[Connection]:
    """An entity change made through ``entity_change`` and left uncommitted until the block ends."""
    async with svc.db.transaction(tenant.org_id) as conn:
        cur = await conn.execute(_CHANGE, {
            "org": tenant.org_id, "id": entity, "actor": tenant.owner_id, "admin": True, "op": op,
            "value": None if data is None else Jsonb(data), "if_version": None, "validated_at": None,
            "keyframe_interval": 4, "max_bytes": 64 * 1024})
        assert (await cur.fetchone() or {})["outcome"] == "done"
        yield conn


async def until_blocked_or_done(svc: Services, work: Awaitable[T], *, waiting: int = 1) -> asyncio.Task[T]:
    """``work`` started, once it has finished or waits for a lock held by another transaction
    (``waiting``: the transactions then waiting, this one's included)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        async with svc.db.transaction() as conn:
            cur = await conn.execute("SELECT count(DISTINCT pid) AS n FROM pg_locks WHERE NOT granted")
            row = await cur.fetchone()
        if row and row["n"] >= waiting:
            break
        await asyncio.sleep(0.01)
    return task


async def _vector_md5(svc: Services, tenant: Tenant, entity: UUID) -> list[Any]:
    async with svc.db.transaction(tenant.org_id) as conn:
        cur = await conn.execute("SELECT embed_md5 FROM search_vectors WHERE org_id = %s AND entity_id = %s",
                                 (tenant.org_id, entity))
        return [row["embed_md5"] for row in await cur.fetchall()]


async def test_a_vector_embedded_before_the_text_went_is_not_stored(svc: Services, tenant: Tenant) -> None:
    """The text is emptied while its vector is being made: no vector may stay (semantic search
    would find the entity by the meaning of text it no longer has)."""
    await svc.types.register(tenant.owner, MEMO)
    await svc.models.register()  # (its index is made once, not while the write holds its table)
    memo = (await svc.entities.create(tenant.owner, tenant.project_id, "memo",
                                      {"title": "rocket launch to the moon"})).id
    async with held_write(svc, tenant, memo, "replace", {"title": ""}):
        drain = await until_blocked_or_done(svc, svc.indexer.drain(tenant.org_id))
    await drain
    hits = await svc.search.search(tenant.owner, "spaceflight", mode="semantic")
    assert memo not in [h.id for h in hits.hits]
    assert await _vector_md5(svc, tenant, memo) == []


async def test_a_vector_stored_while_the_text_goes_is_deleted_with_it(svc: Services, tenant: Tenant) -> None:
    """The other order: the indexer stores the vector first, and the write that empties the text
    comes before its commit."""
    await svc.types.register(tenant.owner, MEMO)
    await svc.models.register()
    memo = (await svc.entities.create(tenant.owner, tenant.project_id, "memo",
                                      {"title": "rocket launch to the moon"})).id
    async with svc.db.transaction(tenant.org_id) as conn:  # the indexer stops after storing the vector
        await (await conn.execute("SELECT FROM search_queue WHERE org_id = %s AND entity_id = %s FOR UPDATE",
                                  (tenant.org_id, memo))).fetchall()
        drain = await until_blocked_or_done(svc, svc.indexer.drain(tenant.org_id))
        emptied = await until_blocked_or_done(svc, svc.entities.replace(tenant.owner, memo, {"title": ""}),
                                              waiting=2)
    await drain
    await emptied
    hits = await svc.search.search(tenant.owner, "spaceflight", mode="semantic")
    assert memo not in [h.id for h in hits.hits]
    assert await _vector_md5(svc, tenant, memo) == []


async def test_a_vector_of_an_entity_deleted_meanwhile_is_not_stored(svc: Services, tenant: Tenant) -> None:
    await svc.types.register(tenant.owner, MEMO)
    await svc.models.register()
    memo = (await svc.entities.create(tenant.owner, tenant.project_id, "memo", {"title": "tidal energy"})).id
    async with held_write(svc, tenant, memo, "delete"):
        drain = await until_blocked_or_done(svc, svc.indexer.drain(tenant.org_id))
    await drain
    assert await _vector_md5(svc, tenant, memo) == []


async def test_a_type_redeclared_during_a_write_indexes_the_written_text(svc: Services,
                                                                         tenant: Tenant) -> None:
    """A type gains a text field while an entity of it is being changed: the entity's search row
    is made from its committed data and the new declaration, not from either one's old state."""
    await svc.types.register(tenant.owner, MEMO)
    memo = (await svc.entities.create(tenant.owner, tenant.project_id, "memo",
                                      {"title": "alpha", "body": "zebra"})).id
    with_body = EntityType(name="memo", module="memos", text_fields={"title": "A", "body": "B"})
    async with held_write(svc, tenant, memo, "replace", {"title": "alpha", "body": "giraffe"}):
        register = await until_blocked_or_done(svc, svc.types.register(tenant.owner, with_body))
    await register
    found = [h.id for h in (await svc.search.search(tenant.owner, "giraffe ", mode="text")).hits]
    assert found == [memo]
    assert (await svc.search.search(tenant.owner, "zebra ", mode="text")).hits == []


async def test_an_entity_created_while_its_type_is_redeclared_is_indexed_by_the_new_declaration(
        svc: Services, tenant: Tenant) -> None:
    await svc.types.register(tenant.owner, MEMO)
    memo = uuid4()
    with_body = EntityType(name="memo", module="memos", text_fields={"title": "A", "body": "B"})
    async with svc.db.transaction(tenant.org_id) as conn:
        await (await conn.execute(_INSERT, {"org": tenant.org_id, "id": memo, "project": tenant.project_id,
                                            "type": "memo", "data": '{"title": "beta", "body": "okapi"}',
                                            "actor": tenant.owner_id})).fetchone()
        register = await until_blocked_or_done(svc, svc.types.register(tenant.owner, with_body))
    await register
    assert [h.id for h in (await svc.search.search(tenant.owner, "okapi ", mode="text")).hits] == [memo]


async def test_a_new_process_indexes_without_waiting_for_writes_on_the_vectors(svc: Services,
                                                                              tenant: Tenant) -> None:
    """A process's first drain registers its model and asks for the model's index, which is there:
    it reads the catalog (model_index.py), where CREATE INDEX IF NOT EXISTS took search_vectors'
    SHARE lock before finding it, so each process start waited for the writes under way (and
    held up those that came after)."""
    await svc.models.register()
    new_process = Indexer(svc.db, Models(svc.db, svc.models.configured))
    async with svc.db.transaction(tenant.org_id) as conn:
        await conn.execute("LOCK TABLE search_vectors IN ROW EXCLUSIVE MODE")  # as a write under way
        drain = await until_blocked_or_done(svc, new_process.drain(tenant.org_id))
        waited = not drain.done()
    await drain
    assert not waited
