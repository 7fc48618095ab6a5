"""The orphan sweep: content a writer stored but never committed a row for.

A writer that dies between its upload and its commit (``canvasdb.blobs.gc``) leaves content
no row points at and nothing else would ever delete. The sweep lists the store and collects
(``gc.collect``, under the hash's lock) every blob last written longer ago than a grace
period. The grace is what spares a writer between its upload and its commit the work of
uploading again (its check under the lock would see the content gone: a 409 with
``retry``, or a snapshot stored again); correctness never depends on it.

The listing is streamed, and each page of old blobs costs one query to skip those a row
points at (nearly all of them), so memory and database work stay bounded by a page.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from canvasdb.blobs import gc
from canvasdb.blobs.store import BlobStore, StoredBlob
from canvasdb.db import Database

PAGE = 1000  # blobs looked at per query


@dataclass
class SweepTotals:
    """What a sweep saw: blobs listed, those past the grace, and the orphans it removed."""

    listed: int = 0
    old: int = 0
    removed: int = 0
    removed_bytes: int = 0

    def summary(self) -> str:
        return (f"blobs listed: {self.listed}, past the grace period: {self.old}, "
                f"orphans removed: {self.removed} ({self.removed_bytes} bytes)")


async def sweep(db: Database, blobs: BlobStore, *, grace: timedelta, now: datetime | None = None,
                progress: Callable[[SweepTotals], object] | None = None) -> SweepTotals:
    """Collect every blob written at least ``grace`` before ``now`` that no row points at.

    ``progress`` is called with the totals so far after each page. A store that cannot be
    listed raises (Unavailable); content that cannot be deleted is logged and left for the
    next sweep.
    """
    cutoff = (now or datetime.now(UTC)) - grace
    totals = SweepTotals()
    async for page in _pages(blobs.scan()):
        totals.listed += len(page)
        old = [blob for blob in page if blob.modified <= cutoff]
        totals.old += len(old)
        for blob in await _unused(db, old):
            if await gc.collect(db, blobs, blob.key):
                totals.removed += 1
                totals.removed_bytes += blob.size
        if progress is not None:
            progress(totals)
    return totals


async def _unused(db: Database, blobs: list[StoredBlob]) -> list[StoredBlob]:
    """Those no row points at now (without the lock: ``gc.collect`` asks again under it)."""
    if not blobs:
        return []
    async with db.transaction() as conn:
        rows = await (await conn.execute(
            "SELECT key FROM unnest(%s::text[]) AS key WHERE NOT blob_in_use(key)",
            ([blob.key for blob in blobs],))).fetchall()
    unused = {row["key"] for row in rows}
    return [blob for blob in blobs if blob.key in unused]


async def _pages(items: AsyncIterable[StoredBlob]) -> AsyncIterator[list[StoredBlob]]:
    page: list[StoredBlob] = []
    async for item in items:
        page.append(item)
        if len(page) >= PAGE:
            yield page
            page = []
    if page:
        yield page

