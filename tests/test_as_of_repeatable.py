"""As-of reads of a past moment are repeatable: a version is stamped inside its transaction,
before the commit, so a read of a moment after the stamp, made while that transaction is
still open, must not answer until it has ended (``races`` holds it open)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import psycopg
import pytest
from conftest import Tenant
from prometheus_client import REGISTRY
from pycrdt import Doc, Map
from races import change, held

from canvasdb.db import Database
from canvasdb.db.horizon import Horizon
from canvasdb.errors import Unavailable
from canvasdb.services import Services

T = TypeVar("T")


def _waits() -> float:
    return REGISTRY.get_sample_value("canvasdb_as_of_waits_total") or 0.0


async def _across_commit(first: psycopg.AsyncConnection[Any], read: Callable[[], Awaitable[T]]) -> tuple[T, T]:
    """``read`` while ``first``'s transaction is open, then again after it committed: once the
    first read has answered or waits for ``first``, ``first`` commits."""
    waits = _waits()
    task = asyncio.ensure_future(read())
    while not task.done() and _waits() == waits:
        await asyncio.sleep(0.005)
    await first.commit()
    return await task, await read()


async def _stamp(conn: psycopg.AsyncConnection[Any], query: str, *params: Any) -> datetime:
    """The time the open transaction stamped its version with (it sees its own rows)."""
    row = await (await conn.execute(query, params)).fetchone()
    assert row is not None
    return row[0]


async def test_an_entity_as_of_a_past_moment_reads_the_same_before_and_after_a_commit(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    async with held(pg_url, tenant) as first:
        await change(first, tenant, e.id, "merge", '{"n": 2}')
        moment = await _stamp(first, "SELECT at FROM entity_versions WHERE entity_id = %s AND version = 2", e.id)
        before, after = await _across_commit(
            first, lambda: svc.entities.get(tenant.owner, e.id, as_of=moment))
    assert (before.version, before.data) == (after.version, after.data) == (2, {"n": 2})


async def test_a_project_listed_as_of_a_past_moment_reads_the_same_before_and_after_a_commit(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    async with held(pg_url, tenant) as first:
        await change(first, tenant, e.id, "delete")
        moment = await _stamp(first, "SELECT at FROM entity_versions WHERE entity_id = %s AND version = 2", e.id)

        async def listed() -> list[Any]:
            return [x.id for x in (await svc.entities.list(tenant.owner, tenant.project_id, as_of=moment)).items]
        before, after = await _across_commit(first, listed)
    assert before == after == []


async def _edge(svc: Services, tenant: Tenant) -> tuple[UUID, UUID]:
    """An entity's id and the id of a relationship from it."""
    a = await svc.entities.create(tenant.owner, tenant.project_id, "note", {})
    b = await svc.entities.create(tenant.owner, tenant.project_id, "note", {})
    return a.id, (await svc.relationships.create(tenant.owner, a.id, b.id, "board.edge", {"label": "x"})).id


async def _change_relationship(first: psycopg.AsyncConnection[Any], tenant: Tenant, rel_id: UUID,
                               assignment: str) -> datetime:
    """The relationship's second version, made in ``first`` by an UPDATE's ``assignment``; its time."""
    await first.execute(f"UPDATE relationships SET {assignment} WHERE org_id = %s AND id = %s",
                        (tenant.org_id, rel_id))
    return await _stamp(first, "SELECT at FROM relationship_versions WHERE relationship_id = %s AND version = 2",
                        rel_id)


async def test_a_relationship_as_of_a_past_moment_reads_the_same_before_and_after_a_commit(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    _, rel_id = await _edge(svc, tenant)
    async with held(pg_url, tenant) as first:
        moment = await _change_relationship(first, tenant, rel_id, "data = '{\"label\": \"y\"}'")
        before, after = await _across_commit(
            first, lambda: svc.relationships.get(tenant.owner, rel_id, as_of=moment))
    assert before.data == after.data == {"label": "y"}


async def test_the_graph_as_of_a_past_moment_reads_the_same_before_and_after_a_commit(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    start, rel_id = await _edge(svc, tenant)
    async with held(pg_url, tenant) as first:
        moment = await _change_relationship(first, tenant, rel_id, "deleted = true")

        async def reached() -> list[str]:
            found = await svc.graph.neighbors(tenant.owner, start, as_of=moment)
            return [n["id"] for n in found["nodes"]]
        before_ids, after_ids = await _across_commit(first, reached)
    assert before_ids == after_ids == []


async def test_a_document_as_of_a_past_moment_reads_the_same_before_and_after_a_commit(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "asof-doc", "board")
    doc = Doc()
    nodes = doc.get("nodes", type=Map)
    nodes["a"] = 1
    async with held(pg_url, tenant) as first:
        await first.execute("SELECT doc_append(%s, %s, %s, %s, %s, %s, 'test')",
                            ([tenant.org_id], ["asof-doc"], [1], [doc.get_update()], [tenant.owner_id], [1]))
        moment = await _stamp(first, "SELECT max(at) FROM doc_updates WHERE org_id = %s AND doc_id = 'asof-doc'",
                              tenant.org_id)

        async def state() -> dict[str, Any]:
            past = await svc.documents.state_as_of(tenant.owner, "asof-doc", moment)
            read = Doc()
            read.apply_update(past.update)
            return read.get("nodes", type=Map).to_py() or {}
        before, after = await _across_commit(first, state)
    assert before == after == {"a": 1}


async def test_a_moment_in_the_future_reads_as_now_without_waiting(svc: Services, pg_url: str,
                                                                  tenant: Tenant) -> None:
    """The promise is for past moments: a future one answers what is committed, at once
    (an open write does not hold it up)."""
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    async with held(pg_url, tenant) as first:
        await change(first, tenant, e.id, "merge", '{"n": 2}')
        waits = _waits()
        later = await svc.entities.get(tenant.owner, e.id, as_of=datetime.now().astimezone() + timedelta(hours=1))
    assert (later.version, later.data, _waits()) == (1, {"n": 1}, waits)


async def test_a_moment_before_an_open_write_began_does_not_wait_for_it(db: Database, pg_url: str, tenant: Tenant,
                                                                 svc: Services) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    async with held(pg_url, tenant) as first:
        await change(first, tenant, e.id, "merge", '{"n": 2}')
        started = await _stamp(first, "SELECT now()")
        await Horizon(db, timeout_s=5).settle(started - timedelta(microseconds=1))  # Unavailable if it waits


async def test_a_moment_a_write_holds_open_past_the_timeout_answers_unavailable(
        db: Database, pg_url: str, tenant: Tenant, svc: Services) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    async with held(pg_url, tenant) as first:
        await change(first, tenant, e.id, "merge", '{"n": 2}')
        moment = await _stamp(first, "SELECT at FROM entity_versions WHERE entity_id = %s AND version = 2", e.id)
        with pytest.raises(Unavailable) as info:
            await Horizon(db, timeout_s=0.05).settle(moment)
    assert info.value.fields["retry"] is True
