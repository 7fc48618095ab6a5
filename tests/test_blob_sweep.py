"""The orphan sweep: content no row points at, past the grace period, is removed; nothing else is.

Every test runs on a fresh store (a folder, or a key prefix on moto's S3 server), over the
session's real PostgreSQL, so that a sweep sees the test's own blobs only. Ages come from the
store (a file's mtime, an object's LastModified): a sweep "a day later" passes ``now``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import test_blobs
from conftest import Tenant
from pycrdt import Doc, Text
from test_blobs import Backend, s3_client, s3_endpoint, sha  # noqa: F401 (fixtures)

from canvasdb import jobs
from canvasdb.blobs import Attachments, FilesystemBlobStore
from canvasdb.blobs.gc import lock_key
from canvasdb.blobs.sweep import sweep
from canvasdb.db import Database
from canvasdb.documents import DocumentStore
from canvasdb.services import Services
from canvasdb.settings import Settings

backend = test_blobs.backend  # a fixture: a fresh store of each kind
DAY = timedelta(hours=24)
WRITER = Path(__file__).with_name("crash_blob_writer.py")


def a_day_later() -> datetime:
    return datetime.now(UTC) + DAY + timedelta(minutes=1)


async def snapshot_blob(db: Database, backend: Backend, tenant: Tenant) -> str:
    """A document whose snapshot is in the blob store; its blob's key. A text document: the
    hourly pass of other tests projects every org's boards, reading them from its own store."""
    store = DocumentStore(db, blobs=backend.store, snapshot_inline_bytes=16)
    try:
        await store.create(tenant.owner, tenant.project_id, "swept", "text")
        doc, updates = Doc(), []
        doc.observe(lambda event: updates.append(event.update))
        text = doc.get("t", type=Text)
        for word in ("a snapshot ", "too large ", "for its row"):
            text += word
        for update in updates:
            await store.append(tenant.owner, "swept", update)
        snapshot = await store.compact(tenant.org_id, "swept")
        assert snapshot is not None
    finally:
        await store.close()
    async with db.transaction(tenant.org_id) as conn:
        row = await (await conn.execute("SELECT blob_sha256 FROM doc_snapshots WHERE org_id = %s"
                                        " AND doc_id = 'swept'", (tenant.org_id,))).fetchone()
    assert row is not None and row["blob_sha256"] is not None
    return str(row["blob_sha256"])


async def lock_held(db: Database, sha256: str, *, mode: str, granted: bool) -> bool:
    """Whether some session holds (or waits for) the content's advisory lock in ``mode``."""
    async with db.transaction() as conn:
        row = await (await conn.execute(
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2"
            " AND classid = (%s::int4)::oid AND objid = (%s::int4)::oid AND mode = %s AND granted = %s",
            (*lock_key(sha256), mode, granted))).fetchone()
    return row is not None and row["n"] > 0


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(1000):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


async def test_only_old_content_no_row_points_at_is_removed(db: Database, backend: Backend,
                                                            tenant: Tenant) -> None:
    store = backend.store
    orphan = await store.put(os.urandom(3000))
    attached = os.urandom(2000)
    await Attachments(db, store).put(tenant.owner, "kept.bin", attached)
    snapshot = await snapshot_blob(db, backend, tenant)
    keys = {orphan.key, sha(attached), snapshot}

    young = await sweep(db, store, grace=DAY)
    assert (young.listed, young.old, young.removed) == (3, 0, 0), "all younger than the grace"
    assert all([await store.exists(key) for key in keys])

    later = await sweep(db, store, grace=DAY, now=a_day_later())
    assert (later.listed, later.old, later.removed, later.removed_bytes) == (3, 3, 1, 3000)
    assert not await store.exists(orphan.key)
    assert await store.exists(sha(attached)) and await store.exists(snapshot), "rows point at them"
    again = await sweep(db, store, grace=DAY, now=a_day_later())
    assert (again.listed, again.removed) == (2, 0)


async def test_progress_is_reported_page_by_page(db: Database, backend: Backend) -> None:
    for i in range(3):
        await backend.store.put(os.urandom(10) + bytes([i]))
    seen: list[tuple[int, int]] = []
    await sweep(db, backend.store, grace=DAY, now=a_day_later(),
                progress=lambda totals: seen.append((totals.listed, totals.removed)))
    assert seen == [(3, 3)]


async def test_a_sweep_racing_a_writer_keeps_the_writers_content(db: Database, backend: Backend,
                                                                 tenant: Tenant) -> None:
    """The writer has stored its content and holds the content's lock (shared) in its
    transaction, not yet committed; a sweep that takes the content for an orphan waits for
    the lock, then sees the committed row, and keeps it."""
    attachments = Attachments(db, backend.store)
    first, second = os.urandom(1000), os.urandom(1001)
    await attachments.put(tenant.owner, "raced.bin", first)
    async with db.transaction(tenant.org_id) as conn:  # keeps the writer before its row
        await conn.execute("SELECT 1 FROM attachments WHERE org_id = %s AND key = 'raced.bin' FOR UPDATE",
                           (tenant.org_id,))
        writer = asyncio.create_task(attachments.put(tenant.owner, "raced.bin", second))
        await until(lambda: lock_held(db, sha(second), mode="ShareLock", granted=True),
                    "the writer stored its content and holds its lock")
        sweeper = asyncio.create_task(sweep(db, backend.store, grace=DAY, now=a_day_later()))
        await until(lambda: lock_held(db, sha(second), mode="ExclusiveLock", granted=False),
                    "the sweep waits for the content's lock")
        assert not writer.done() and not sweeper.done()
    attachment, created = await writer
    totals = await sweeper
    assert (attachment.sha256, created, totals.removed) == (sha(second), False, 0)
    assert await backend.store.get(sha(second)) == second
    assert not await backend.store.exists(sha(first)), "the replaced content went with its row"


async def test_a_writer_killed_between_upload_and_commit_leaves_an_orphan_the_sweep_removes(
    pg_url: str, db: Database, tenant: Tenant, tmp_path: Path
) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    content = os.urandom(5000)
    key = sha(content)
    (tmp_path / "content").write_bytes(content)
    async with db.transaction() as conn:  # as a collector would: the writer stops before its row
        await (await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", lock_key(key))).fetchone()
        proc = subprocess.Popen([sys.executable, str(WRITER), pg_url, str(tenant.org_id), str(store.root),
                                 str(tmp_path / "content")], stderr=subprocess.PIPE, text=True)
        try:
            await until(lambda: lock_held(db, key, mode="ShareLock", granted=False),
                        "the writer stored its content and waits to write its row")
        finally:
            proc.send_signal(signal.SIGKILL)
            _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, stderr
    assert await store.exists(key), "stored, and no row points at it: an orphan"
    async with db.transaction(tenant.org_id) as conn:
        rows = await (await conn.execute("SELECT key FROM attachments WHERE org_id = %s",
                                         (tenant.org_id,))).fetchall()
    assert rows == []

    assert (await sweep(db, store, grace=DAY)).removed == 0, "younger than the grace"
    os.utime(store.path(key), (1, 1))  # written long ago
    totals = await sweep(db, store, grace=DAY)
    assert (totals.removed, totals.removed_bytes) == (1, 5000)
    assert not await store.exists(key)


async def test_the_daily_job_sweeps_with_the_configured_grace(settings: Settings, db: Database,
                                                              tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    old, recent = await store.put(b"old orphan"), await store.put(b"recent orphan")
    os.utime(store.path(old.key), (1, 1))
    ten_minutes_ago = (datetime.now(UTC) - timedelta(minutes=10)).timestamp()
    os.utime(store.path(recent.key), (ten_minutes_ago, ten_minutes_ago))
    svc = Services.build(settings.model_copy(update={"blob_orphan_grace_s": 3600}), db, blobs=store)
    try:
        assert await jobs.sweep_orphan_blobs(svc) == {"listed": 2, "old": 1, "removed": 1,
                                                      "removed_bytes": len(b"old orphan")}
    finally:
        await svc.close()
    assert not await store.exists(old.key) and await store.exists(recent.key)
    periodic = [p for p in jobs.queue.periodic_registry.periodic_tasks.values()
                if p.task is jobs.blob_orphan_sweep]
    assert [p.cron for p in periodic] == ["23 4 * * *"], "once a day"
    assert jobs.blob_orphan_sweep.lock == "blob_orphan_sweep", "one sweep at a time in the cluster"
