"""Background work on a PostgreSQL-backed job queue (procrastinate): compaction, retention,
projection, search indexing.

Jobs live in PostgreSQL beside the data, so one backup covers them and they outlive
any process. ``canvasdb up`` runs a worker; ``canvasdb worker`` runs one on its own,
for scaling out. Every job is idempotent: running one twice, or two at once on
different workers, changes nothing more than running it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg
from procrastinate import App, JobContext, PsycopgConnector, RetryStrategy
from procrastinate.exceptions import AlreadyEnqueued

from canvasdb.db.migrate import LOCK_KEY
from canvasdb.errors import CanvasdbError, NotFound

log = logging.getLogger("canvasdb.jobs")
queue = App(connector=PsycopgConnector())


def ensure_schema(conninfo: str) -> bool:
    """Install the queue's tables if missing (under the migrations' lock); True if it did."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            found = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
            if found is not None and found[0] is not None:
                return False
            with conn.transaction():
                conn.execute(queue.schema_manager.get_schema())  # type: ignore[arg-type]
            return True
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


@queue.task(name="compact_document", pass_context=True, retry=3)
async def compact_document(context: JobContext, org_id: str, doc_id: str) -> None:
    """Fold a document's new updates into a snapshot (deferred when a document grows fast)."""
    documents = context.additional_context["services"].documents
    with contextlib.suppress(NotFound):  # the document is gone: nothing to do
        await documents.compact(UUID(org_id), doc_id)


@queue.task(name="project_board", pass_context=True, retry=3)
async def project_board(context: JobContext, org_id: str, doc_id: str) -> None:
    """Mirror a board's nodes and edges into entities (deferred a moment after it changes)."""
    projection = context.additional_context["services"].projection
    with contextlib.suppress(NotFound):
        await projection.project(UUID(org_id), doc_id)


@queue.task(name="index_search", pass_context=True,
            retry=RetryStrategy(max_attempts=8, exponential_wait=2))
async def index_search(context: JobContext, org_id: str) -> dict[str, int]:
    """Add an org's changed entities to its term dictionary and embed them (deferred on write).

    When the embedder fails, the job is retried with growing waits, and the per-minute
    sweep defers it again after the last attempt: nothing queued is lost."""
    return await context.additional_context["services"].indexer.drain(UUID(org_id))


@queue.task(name="search_backfill", pass_context=True, queueing_lock="search_backfill",
            retry=RetryStrategy(max_attempts=5, exponential_wait=5))
async def search_backfill(context: JobContext) -> int:
    """Embed every entity with a newly configured model, then make it the active one."""
    services = context.additional_context["services"]
    orgs = [org.id for org in await services.tenancy.list_orgs()]
    return await services.indexer.backfill(orgs)


@queue.periodic(cron="* * * * *", periodic_id="search_sweep")
@queue.task(name="search_sweep", pass_context=True, queueing_lock="search_sweep")
async def search_sweep(context: JobContext, timestamp: int) -> None:
    """Every minute: index what writes of other processes (or failed jobs) left queued,
    and start the background build of a newly configured embedding model."""
    services = context.additional_context["services"]
    orgs = [org.id for org in await services.tenancy.list_orgs()]
    await defer_indexing(await services.indexer.queued_orgs(orgs))
    try:
        model = await services.models.register()
    except CanvasdbError:
        log.warning("the embedder is unavailable; indexing will retry", exc_info=True)
        return
    if model.state == "building":
        with contextlib.suppress(AlreadyEnqueued):
            await search_backfill.defer_async()


@queue.periodic(cron="7 * * * *", periodic_id="hourly")
@queue.task(name="hourly_maintenance", pass_context=True, queueing_lock="hourly_maintenance")
async def hourly_maintenance(context: JobContext, timestamp: int) -> dict[str, int]:
    """Every hour: snapshot every document that changed, then apply retention to it."""
    services = context.additional_context["services"]
    return await maintain(services)


async def maintain(services: Any) -> dict[str, int]:
    """Projection, compaction and retention over every org's documents; the hourly job's body.

    A document that fails is logged and counted, and the pass goes on with the others.
    """
    settings = services.settings
    docs = services.documents
    totals = {"documents": 0, "projected": 0, "snapshots": 0, "updates_deleted": 0,
              "snapshots_deleted": 0, "failed": 0}
    for org in await services.tenancy.list_orgs():
        behind = set(await docs.projection_behind(org.id))
        changed = set(await docs.changed_since_snapshot(org.id))
        for doc_id in await docs.all_ids(org.id):
            totals["documents"] += 1
            try:
                if doc_id in behind:
                    totals["projected"] += await services.projection.project(org.id, doc_id)
                if doc_id in changed:
                    totals["snapshots"] += await docs.compact(org.id, doc_id) is not None
                updates, snapshots = await docs.prune(
                    org.id, doc_id, keep_updates=timedelta(hours=settings.update_retention_hours),
                    keep_hourly=timedelta(days=settings.snapshot_retention_days))
            except Exception:  # one document's failure, whatever it is, stops no other
                log.exception("hourly maintenance of document %s failed", doc_id)
                totals["failed"] += 1
                continue
            totals["updates_deleted"] += updates
            totals["snapshots_deleted"] += snapshots
    return totals


async def defer_compaction(org_id: UUID, doc_id: str) -> None:
    """Ask a worker to compact a document soon (at most one such job waits per document)."""
    with contextlib.suppress(AlreadyEnqueued):
        await compact_document.configure(queueing_lock=f"compact:{org_id}:{doc_id}").defer_async(
            org_id=str(org_id), doc_id=doc_id)


class Requests:
    """Work asked for on the write path, collected and deferred together every ``every`` s.

    A job per change cost a round trip and about a millisecond of this process's CPU
    each: with a hundred busy boards, a tenth of a core. ``defer`` receives the distinct
    keys asked for since the last flush; a failure is logged (the periodic passes catch
    up)."""

    def __init__(self, defer: Callable[[list[Any]], Awaitable[None]], every: float = 1.0) -> None:
        self.defer = defer
        self.every = every
        self._pending: set[Any] = set()
        self._flusher: asyncio.Task[None] | None = None

    async def request(self, *key: Any) -> None:
        self._pending.add(key if len(key) > 1 else key[0])
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self, *, wait: bool = True) -> None:
        if wait:
            await asyncio.sleep(self.every)
        batch, self._pending = self._pending, set()
        if not batch:
            return
        try:
            await self.defer(sorted(batch, key=str))
        except Exception:
            log.warning("could not defer the work for %d keys", len(batch), exc_info=True)

    async def close(self) -> None:
        """Defer what is pending now (the queue must still be connected)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush(wait=False)


async def defer_projections(boards: list[tuple[UUID, str]]) -> None:
    """Boards to project. No queueing lock (a batch would fail whole on one conflict); a
    duplicate is harmless, as projection resumes from the board's ``projected_seq``."""
    await project_board.batch_defer_async(
        *({"org_id": str(org), "doc_id": doc} for org, doc in boards))


async def defer_indexing(orgs: list[UUID]) -> None:
    """Orgs whose search queue has new work (at most one such job waits per org)."""
    for org in orgs:
        with contextlib.suppress(AlreadyEnqueued):
            await index_search.configure(queueing_lock=f"search:{org}", lock=f"search:{org}").defer_async(
                org_id=str(org))


@contextlib.asynccontextmanager
async def connected(conninfo: str) -> AsyncIterator[App]:
    """The queue, connected to the database for this process (to defer jobs or run a worker)."""
    with queue.replace_connector(PsycopgConnector(conninfo=conninfo, min_size=1, max_size=4)):
        async with queue.open_async():
            yield queue


async def run_worker(services: Any, *, concurrency: int = 2) -> None:
    """Work through jobs until cancelled."""
    await queue.run_worker_async(concurrency=concurrency, install_signal_handlers=False,
                                 additional_context={"services": services})


@contextlib.asynccontextmanager
async def working(services: Any, *, concurrency: int = 2) -> AsyncIterator[None]:
    """A worker running in this process for the length of the block (the queue is connected)."""
    worker = asyncio.create_task(run_worker(services, concurrency=concurrency))
    try:
        yield
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
