"""As-of reads of a past moment are repeatable: a version is stamped inside its transaction,
before the commit, so a read of a moment after the stamp, made while that transaction is
still open, must not answer until it has ended (``races`` holds it open)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID, uuid4

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


async def _across_commit(commit: Callable[[], Awaitable[Any]], read: Callable[[], Awaitable[T]]) -> tuple[T, T]:
    """``read`` while a write is open, then again after ``commit`` committed it: once the first
    read has answered or waits for the write, ``commit`` runs."""
    waits = _waits()
    task = asyncio.ensure_future(read())
    while not task.done() and _waits() == waits:
        await asyncio.sleep(0.005)
    await commit()
    return await task, await read()


async def _value(conn: psycopg.AsyncConnection[Any], query: str, *params: Any) -> Any:
    """The first value ``query`` answers in ``conn`` (an open transaction sees its own rows)."""
    row = await (await conn.execute(query, params)).fetchone()
    assert row is not None
    return row[0]


async def test_an_entity_as_of_a_past_moment_reads_the_same_before_and_after_a_commit(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    async with held(pg_url, tenant) as first:
        await change(first, tenant, e.id, "merge", '{"n": 2}')
        moment = await _value(first, "SELECT at FROM entity_versions WHERE entity_id = %s AND version = 2", e.id)
        before, after = await _across_commit(
            first.commit, lambda: svc.entities.get(tenant.owner, e.id, as_of=moment))
    assert (before.version, before.data) == (after.version, after.data) == (2, {"n": 2})


async def test_a_project_listed_as_of_a_past_moment_reads_the_same_before_and_after_a_commit(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    async with held(pg_url, tenant) as first:
        await change(first, tenant, e.id, "delete")
        moment = await _value(first, "SELECT at FROM entity_versions WHERE entity_id = %s AND version = 2", e.id)

        async def listed() -> list[Any]:
            return [x.id for x in (await svc.entities.list(tenant.owner, tenant.project_id, as_of=moment)).items]
        before, after = await _across_commit(first.commit, listed)
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
    return await _value(first, "SELECT at FROM relationship_versions WHERE relationship_id = %s AND version = 2",
                        rel_id)


async def test_a_relationship_as_of_a_past_moment_reads_the_same_before_and_after_a_commit(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    _, rel_id = await _edge(svc, tenant)
    async with held(pg_url, tenant) as first:
        moment = await _change_relationship(first, tenant, rel_id, "data = '{\"label\": \"y\"}'")
        before, after = await _across_commit(
            first.commit, lambda: svc.relationships.get(tenant.owner, rel_id, as_of=moment))
    assert before.data == after.data == {"label": "y"}


async def test_the_graph_as_of_a_past_moment_reads_the_same_before_and_after_a_commit(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    start, rel_id = await _edge(svc, tenant)
    async with held(pg_url, tenant) as first:
        moment = await _change_relationship(first, tenant, rel_id, "deleted = true")

        async def reached() -> list[str]:
            found = await svc.graph.neighbors(tenant.owner, start, as_of=moment)
            return [n["id"] for n in found["nodes"]]
        before_ids, after_ids = await _across_commit(first.commit, reached)
    assert before_ids == after_ids == []


async def _nodes_as_of(svc: Services, tenant: Tenant, doc_id: str, moment: datetime) -> dict[str, Any]:
    """The document's map ``nodes`` as of ``moment``."""
    read = Doc()
    read.apply_update((await svc.documents.state_as_of(tenant.owner, doc_id, moment)).update)
    return read.get("nodes", type=Map).to_py() or {}


async def test_a_document_as_of_a_past_moment_reads_the_same_before_and_after_a_commit(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "asof-doc", "board")
    doc = Doc()
    nodes = doc.get("nodes", type=Map)
    nodes["a"] = 1
    async with held(pg_url, tenant) as first:
        await first.execute("SELECT doc_append(%s, %s, %s, %s, %s, %s, 'test')",
                            ([tenant.org_id], ["asof-doc"], [1], [doc.get_update()], [tenant.owner_id], [1]))
        moment = await _value(first, "SELECT max(at) FROM doc_updates WHERE org_id = %s AND doc_id = 'asof-doc'",
                              tenant.org_id)

        before, after = await _across_commit(first.commit, lambda: _nodes_as_of(svc, tenant, "asof-doc", moment))
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
        started = await _value(first, "SELECT now()")
        await Horizon(db, timeout_s=5).settle(started - timedelta(microseconds=1))  # Unavailable if it waits


async def test_a_moment_a_write_holds_open_past_the_timeout_answers_unavailable(
        db: Database, pg_url: str, tenant: Tenant, svc: Services) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    async with held(pg_url, tenant) as first:
        await change(first, tenant, e.id, "merge", '{"n": 2}')
        moment = await _value(first, "SELECT at FROM entity_versions WHERE entity_id = %s AND version = 2", e.id)
        with pytest.raises(Unavailable) as info:
            await Horizon(db, timeout_s=0.05).settle(moment)
    assert info.value.fields["retry"] is True


async def _when_running(watcher: psycopg.AsyncConnection[Any], pid: int) -> datetime:
    """The time, once session ``pid`` runs a statement."""
    while True:
        row = await (await watcher.execute("SELECT clock_timestamp() FROM pg_stat_activity"
                                           " WHERE pid = %s AND state = 'active'", (pid,))).fetchone()
        if row is not None:
            return row[0]
        await asyncio.sleep(0.005)


async def test_a_long_read_does_not_hold_up_an_as_of_read_of_a_moment_after_its_start(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    """A statement that has written nothing (a report, a large search, a dump) can stamp no
    version at or before the moment: the as-of read answers while it still runs."""
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as reader, \
            await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as watcher:
        sleeping = asyncio.ensure_future(reader.execute("SELECT pg_sleep(600)"))
        try:
            moment = await _when_running(watcher, reader.info.backend_pid)
            read = asyncio.ensure_future(svc.entities.get(tenant.owner, e.id, as_of=moment))
            await asyncio.wait({read, sleeping}, return_when=asyncio.FIRST_COMPLETED)
            assert not sleeping.done()
            assert (await read).version == 1
        finally:
            await watcher.execute("SELECT pg_cancel_backend(%s)", (reader.info.backend_pid,))
            with contextlib.suppress(psycopg.errors.QueryCanceled):
                await sleeping


_STALL_KEY = 0x7374616C6C  # "stall"


@asynccontextmanager
async def _stalled(pg_url: str, tenant: Tenant, table: str, event: str,
                   write: Awaitable[Any]) -> AsyncIterator[tuple[datetime, Callable[[], Awaitable[Any]]]]:
    """``write`` run until it waits in a BEFORE ``event`` trigger of ``table`` (for the org's rows),
    after its version's time was taken and before its row is stored; yields a moment after
    that time, and what lets the write go on and returns once it is done."""
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as gate:
        await gate.execute("SELECT pg_advisory_lock(%s)", (_STALL_KEY,))
        await gate.execute("CREATE OR REPLACE FUNCTION test_stall() RETURNS trigger LANGUAGE plpgsql AS"
                           " $$ BEGIN PERFORM pg_advisory_xact_lock(TG_ARGV[0]::bigint); RETURN NEW; END $$")
        await gate.execute(f"CREATE TRIGGER zz_test_stall BEFORE {event} ON {table} FOR EACH ROW"
                           f" WHEN (NEW.org_id = '{tenant.org_id}') EXECUTE FUNCTION test_stall('{_STALL_KEY}')")
        writing = asyncio.ensure_future(write)
        try:
            while not writing.done() and not await _value(
                    gate, "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE %s = ANY (pg_blocking_pids(pid)))",
                    gate.info.backend_pid):
                await asyncio.sleep(0.005)

            async def go_on() -> Any:
                await gate.execute("SELECT pg_advisory_unlock(%s)", (_STALL_KEY,))
                return await writing
            yield await _value(gate, "SELECT clock_timestamp()"), go_on
        finally:
            await gate.execute("SELECT pg_advisory_unlock_all()")
            await asyncio.gather(writing, return_exceptions=True)
            await gate.execute(f"DROP TRIGGER zz_test_stall ON {table}")
            await gate.execute("DROP FUNCTION test_stall()")


# A version's time is taken once its transaction holds an id, which the horizon waits for
# (migration 0035): a write stalled between its time and its row (where an INSERT computes
# its column defaults, before the row and the id exist) is waited for, as a sleeping read is
# not. An entity's or a relationship's change stamps a row it has locked (a lock takes the id).

async def test_an_entity_created_after_its_time_was_taken_is_waited_for(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    new_id = uuid4()
    async with _stalled(pg_url, tenant, "entities", "INSERT",
                        svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1}, id=new_id)) as (
            moment, go_on):

        async def listed() -> list[UUID]:
            return [x.id for x in (await svc.entities.list(tenant.owner, tenant.project_id, as_of=moment)).items]
        before, after = await _across_commit(go_on, listed)
    assert before == after == [new_id]


async def test_an_entity_changed_after_its_time_was_taken_is_waited_for(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    e = await svc.entities.create(tenant.owner, tenant.project_id, "note", {"n": 1})
    async with _stalled(pg_url, tenant, "entities", "UPDATE",
                        svc.entities.patch(tenant.owner, e.id, {"n": 2})) as (moment, go_on):
        before, after = await _across_commit(go_on, lambda: svc.entities.get(tenant.owner, e.id, as_of=moment))
    assert (before.version, before.data) == (after.version, after.data) == (2, {"n": 2})


async def test_a_relationship_changed_after_its_time_was_taken_is_waited_for(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    _, rel_id = await _edge(svc, tenant)
    async with _stalled(pg_url, tenant, "relationships", "UPDATE",
                        svc.relationships.update(tenant.owner, rel_id, {"label": "y"})) as (moment, go_on):
        before, after = await _across_commit(
            go_on, lambda: svc.relationships.get(tenant.owner, rel_id, as_of=moment))
    assert before.data == after.data == {"label": "y"}


async def test_a_document_update_appended_after_its_time_was_taken_is_waited_for(
        svc: Services, pg_url: str, tenant: Tenant) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "stalled-doc", "board")
    doc = Doc()
    doc.get("nodes", type=Map)["a"] = 1
    async with _stalled(pg_url, tenant, "doc_updates", "INSERT",
                        svc.documents.append(tenant.owner, "stalled-doc", doc.get_update())) as (moment, go_on):
        before, after = await _across_commit(go_on, lambda: _nodes_as_of(svc, tenant, "stalled-doc", moment))
    assert before == after == {"a": 1}
