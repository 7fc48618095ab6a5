"""The job queue: early compaction deferred to a worker, the hourly maintenance pass."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from conftest import Tenant
from pycrdt import Doc, Map

from canvasdb import jobs
from canvasdb.documents import DocumentStore
from canvasdb.services import Services


def edits(n: int) -> tuple[Doc, list[bytes]]:
    doc, made = Doc(), []
    doc.observe(lambda e: made.append(e.update))
    nodes = doc.get("nodes", type=Map)
    for i in range(n):
        nodes[f"k{i % 7}"] = i
    return doc, made


async def snapshots(svc: Services, tenant: Tenant, doc_id: str) -> list[int]:
    async with svc.db.transaction(tenant.org_id) as conn:
        cur = await conn.execute("SELECT seq FROM doc_snapshots WHERE org_id = %s AND doc_id = %s"
                                 " ORDER BY seq", (tenant.org_id, doc_id))
        return [r["seq"] for r in await cur.fetchall()]


async def test_growing_document_is_compacted_by_a_worker(pg_url: str, svc: Services, tenant: Tenant) -> None:
    store = DocumentStore(svc.db, compact_after_updates=10, compaction_due=jobs.defer_compaction)
    await store.create(tenant.owner, tenant.project_id, "grows")
    source, made = edits(25)
    async with jobs.connected(pg_url), jobs.working(svc):
        for update in made:
            await store.append(tenant.owner, "grows", update)
        for _ in range(100):
            if await snapshots(svc, tenant, "grows"):
                break
            await asyncio.sleep(0.1)
    await store.close()
    assert await snapshots(svc, tenant, "grows"), "a worker made a snapshot"
    loaded = Doc()
    loaded.apply_update(await DocumentStore(svc.db).state(tenant.owner, "grows"))
    assert loaded.get("nodes", type=Map).to_py() == source.get("nodes", type=Map).to_py()


async def test_hourly_maintenance_compacts_and_prunes(svc: Services, tenant: Tenant) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "hourly")
    _, made = edits(5)
    for update in made:
        await svc.documents.append(tenant.owner, "hourly", update)
    totals = await jobs.maintain(svc)
    assert totals["snapshots"] >= 1 and await snapshots(svc, tenant, "hourly") == [5]
    again = await jobs.maintain(svc)
    assert (again["snapshots"], again["updates_deleted"], again["projected"]) == (0, 0, 0), "idempotent"
    assert totals["failed"] == again["failed"] == 0
    deleted, _ = await svc.documents.prune(tenant.org_id, "hourly", now=datetime.now(UTC) + timedelta(days=2))
    assert deleted == 5


def test_schema_install_is_idempotent(pg_url: str) -> None:
    assert jobs.ensure_schema(pg_url) is False
