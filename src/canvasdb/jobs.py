"""Background work on a PostgreSQL-backed job queue (procrastinate): compaction, retention,
projection, search indexing, the blob store's orphan sweep.

Jobs live in PostgreSQL beside the data, so one backup covers them and they outlive
any process. ``canvasdb up`` runs a worker; ``canvasdb worker`` runs one on its own,
for scaling out. Every job is idempotent: running one twice, or two at once on
different workers, changes nothing more than running it once.

A worker that stops on its own (procrastinate stops it when its listener or heartbeat
loses the database) is started again; the jobs of a worker that died (SIGKILL, OOM) are
given back to the queue once its heartbeat is old (``recover_stalled_jobs``, every minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg
from procrastinate import App, JobContext, PsycopgConnector, RetryStrategy
from procrastinate.exceptions import AlreadyEnqueued, ConnectorException, UniqueViolation
from procrastinate.jobs import Status
from procrastinate.worker import Worker
from prometheus_client import Gauge

from canvasdb.blobs.sweep import sweep
from canvasdb.db import ConnectionPool, database_away
from canvasdb.db.migrate import LOCK_KEY
from canvasdb.errors import CanvasdbError, NotFound, one_line

log = logging.getLogger("canvasdb.jobs")
queue = App(connector=PsycopgConnector())

RESTART_WAIT = (1.0, 30.0)  # s: the first wait before starting a stopped worker again, and the longest
STEADY_SECONDS = 60.0  # a worker that ran this long before stopping is started again after the first wait
PRUNE_BATCH = 500  # documents whose retention one statement applies
STOP_SECONDS = 5.0  # the longest a worker may take to stop (half of it for its running jobs)
STALLED_SECONDS = 60.0  # a worker silent this long is dead (it sends a heartbeat every 10 s)
KEEP_UNSUCCESSFUL_HOURS = 7 * 24  # failed, cancelled and aborted jobs stay this long (for a look)

WORKERS_RUNNING = Gauge("canvasdb_job_workers_running",
                        "Job workers running in this process (0 while a stopped one waits to start again)")


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


@queue.periodic(cron="* * * * *", periodic_id="stalled_jobs")
@queue.task(name="stalled_jobs_sweep", pass_context=True, queueing_lock="stalled_jobs_sweep")
async def stalled_jobs_sweep(context: JobContext, timestamp: int) -> int:
    """Every minute: give back to the queue the jobs of workers that died."""
    return await recover_stalled_jobs()


@queue.periodic(cron="37 * * * *", periodic_id="old_jobs")
@queue.task(name="old_jobs_sweep", pass_context=True, queueing_lock="old_jobs_sweep")
async def old_jobs_sweep(context: JobContext, timestamp: int) -> None:
    """Every hour: drop old jobs that did not succeed (see ``drop_old_jobs``)."""
    await drop_old_jobs(context.app)


@queue.periodic(cron="23 4 * * *", periodic_id="blob_orphans")
@queue.task(name="blob_orphan_sweep", pass_context=True, queueing_lock="blob_orphan_sweep",
            lock="blob_orphan_sweep")
async def blob_orphan_sweep(context: JobContext, timestamp: int) -> dict[str, int]:
    """Every day: remove blobs whose writer died before committing its row (``blobs/sweep.py``).
    One at a time in the cluster (its lock): a long one delays the next, which never overlaps it."""
    return await sweep_orphan_blobs(context.additional_context["services"])


async def sweep_orphan_blobs(services: Any) -> dict[str, int]:
    """The orphan sweep over the services' blob store, with the configured grace period."""
    grace = timedelta(seconds=services.settings.blob_orphan_grace_s)
    totals = await sweep(services.db, services.blobs, grace=grace)
    log.info("blob orphan sweep: %s", totals.summary())
    return asdict(totals)


async def drop_old_jobs(app: App) -> None:
    """Drop the jobs that failed, were cancelled or aborted ``KEEP_UNSUCCESSFUL_HOURS`` ago or
    more. Successful ones go as they finish: kept, they grew the queue by gigabytes a day."""
    await app.job_manager.delete_old_jobs(KEEP_UNSUCCESSFUL_HOURS, include_failed=True,
                                          include_cancelled=True, include_aborted=True)


class WorkerGone(Exception):
    """What a stalled job is retried for (its task's retry strategy decides whether it is)."""


async def recover_stalled_jobs() -> int:
    """Jobs left in ``doing`` by a worker silent for ``STALLED_SECONDS``, back in the queue; how many.

    Such a job would stay there for ever, and one with a lock (an org's indexing, a board's
    projection) would hold back every later job of its lock. Each is retried as its task's
    retry strategy allows (one that kills its worker every time is not retried for ever); one
    whose twin already waits (the same queueing lock) is marked failed: the twin does its work.
    """
    manager = queue.job_manager
    stalled = await manager.get_stalled_jobs(seconds_since_heartbeat=STALLED_SECONDS)
    for job in stalled:
        task = queue.tasks.get(job.task_name)
        again = task.get_retry_exception(exception=WorkerGone(), job=job) if task else None
        outcome = "failed"
        if again is not None:
            with contextlib.suppress(UniqueViolation):
                await manager.retry_job(job, retry_at=again.retry_decision.retry_at)
                outcome = "retried"
        if outcome == "failed":
            await manager.finish_job(job, status=Status.FAILED, delete_job=False)
        log.warning("job %s (%s) was left running by a worker that is gone: %s",
                    job.id, job.task_name, outcome)
    return len(stalled)


async def maintain(services: Any) -> dict[str, int]:
    """Projection, compaction and retention over every org's documents; the hourly job's body.

    Projection and compaction go document by document, over those with something to do;
    retention over ``PRUNE_BATCH`` documents at a time. A failure is logged and counted (a
    batch's, then its documents' one by one), and the pass goes on with the others; but not
    when the database is away (every other document would wait for a connection, then fail
    in turn): the pass stops, and the next one starts over.
    """
    settings = services.settings
    docs = services.documents
    keep = {"keep_updates": timedelta(hours=settings.update_retention_hours),
            "keep_hourly": timedelta(days=settings.snapshot_retention_days)}
    totals = {"documents": 0, "projected": 0, "snapshots": 0, "updates_deleted": 0,
              "snapshots_deleted": 0, "failed": 0}

    async def step(what: str, work: Awaitable[Any]) -> Any:
        try:
            return await work
        except Exception as exc:  # one failure, whatever else it is, stops no other
            if database_away(exc):
                raise
            log.exception("hourly maintenance of %s failed", what)
            totals["failed"] += 1
            return None

    for org in await services.tenancy.list_orgs():
        behind = set(await docs.projection_behind(org.id))
        changed = set(await docs.changed_since_snapshot(org.id))
        for doc_id in sorted(behind | changed):
            if doc_id in behind:  # (a board a job projects now is left to it)
                totals["projected"] += await step(
                    f"document {doc_id}", services.projection.project(org.id, doc_id, wait=False)) or 0
            if doc_id in changed:
                made = await step(f"document {doc_id}", docs.compact(org.id, doc_id))
                totals["snapshots"] += made is not None
        ids = await docs.all_ids(org.id)
        totals["documents"] += len(ids)
        for start in range(0, len(ids), PRUNE_BATCH):
            batch = ids[start:start + PRUNE_BATCH]
            try:
                pruned = await docs.prune_many(org.id, batch, **keep)
            except Exception as exc:
                if database_away(exc):
                    raise
                log.warning("retention of %d documents of org %s at once failed (%s); one by one",
                            len(batch), org.slug, one_line(exc))
                pruned = {}
                for doc_id in batch:
                    one = await step(f"document {doc_id}", docs.prune(org.id, doc_id, **keep))
                    if one:
                        pruned[doc_id] = one
            totals["updates_deleted"] += sum(updates for updates, _ in pruned.values())
            totals["snapshots_deleted"] += sum(snapshots for _, snapshots in pruned.values())
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
        if self._pending and wait:  # asked for while this batch was deferred: this task was
            self._flusher = asyncio.create_task(self._flush())  # not done, so none was started

    async def close(self) -> None:
        """Defer what is pending now (the queue must still be connected)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush(wait=False)


async def defer_projections(boards: list[tuple[UUID, str]]) -> None:
    """Boards to project, one job of a board at a time (its lock), so that a backlog of them
    does not hold the worker's slots waiting for the board's turn (``project`` takes turns
    itself, with the hourly pass too). No queueing lock (a batch would fail whole on one
    conflict); a duplicate is harmless, as projection resumes from the board's ``projected_seq``."""
    await queue.job_manager.batch_defer_jobs_async([
        project_board.configure(lock=f"project:{org}:{doc}").make_new_job(org_id=str(org), doc_id=doc)
        for org, doc in boards])


async def defer_indexing(orgs: list[UUID]) -> None:
    """Orgs whose search queue has new work (at most one such job waits per org)."""
    for org in orgs:
        with contextlib.suppress(AlreadyEnqueued):
            await index_search.configure(queueing_lock=f"search:{org}", lock=f"search:{org}").defer_async(
                org_id=str(org))


@contextlib.asynccontextmanager
async def connected(conninfo: str) -> AsyncIterator[App]:
    """The queue, connected to the database for this process (to defer jobs or run a worker)."""
    # a connection within 5 s or an error: deferring work (also on the way out, when the
    # database may be down) must not wait the pool's default 30 s; and connect again soon after
    # an outage (ConnectionPool)
    with queue.replace_connector(PsycopgConnector(conninfo=conninfo, min_size=1, max_size=4, timeout=5,
                                                  pool_factory=ConnectionPool)):
        async with queue.open_async():
            yield queue


class _Worker(Worker):
    """procrastinate's worker, with one log line for a job whose outcome could not be saved (the
    database went away as it ended). procrastinate leaves that error in the job's task, which
    nothing awaits: asyncio reported it, whenever the task was collected, as "Task exception
    was never retrieved" with a traceback. ``_process_job`` is not procrastinate's public API:
    ``test_jobs`` checks that this still works."""

    async def _process_job(self, context: JobContext) -> None:
        try:
            await super()._process_job(context)
        except ConnectorException as exc:
            log.warning("job %s ended, but its outcome could not be saved (%s); the stalled-jobs sweep"
                        " takes it up once this worker is found gone", context.job.call_string, one_line(exc))


async def run_worker(services: Any, *, concurrency: int = 2, stop_within: float = STOP_SECONDS) -> None:
    """Work through jobs until cancelled (or until procrastinate stops the worker). Jobs still
    running when it stops get half of ``stop_within`` to finish, then are aborted (and retried as
    their task allows)."""
    await _Worker(app=queue, concurrency=concurrency, install_signal_handlers=False,
                  shutdown_graceful_timeout=stop_within / 2, delete_jobs="successful",
                  additional_context={"services": services}).run()


@contextlib.asynccontextmanager
async def working(services: Any, *, concurrency: int = 2,
                  stop_within: float = STOP_SECONDS) -> AsyncIterator[None]:
    """A worker running in this process for the length of the block (the queue is connected),
    started again whenever it stops on its own."""
    stopping = asyncio.Event()
    worker = asyncio.create_task(_supervise(services, concurrency, stop_within, stopping))
    try:
        yield
    finally:
        stopping.set()
        await _stop(worker, stop_within)


async def _supervise(services: Any, concurrency: int, stop_within: float, stopping: asyncio.Event) -> None:
    """Run a worker until ``stopping``, starting it again after a growing wait each time it ends:
    procrastinate stops its worker when the listener or the heartbeat fails (a PostgreSQL restart),
    and nothing else would start it again."""
    loop = asyncio.get_running_loop()
    first, longest = RESTART_WAIT
    wait = first
    while True:
        started = loop.time()
        WORKERS_RUNNING.inc()
        failure = None
        try:
            await run_worker(services, concurrency=concurrency, stop_within=stop_within)
        except Exception as exc:  # whatever it was, the worker must run again
            failure = one_line(exc)
        finally:
            WORKERS_RUNNING.dec()
        if stopping.is_set():
            if failure:
                log.warning("the job worker failed while stopping: %s", failure)
            return
        if loop.time() - started >= STEADY_SECONDS:
            wait = first
        log.warning("the job worker stopped (%s); starting it again in %g s",
                    failure or "a side task failed, logged above", wait)
        await asyncio.sleep(wait)
        wait = min(2 * wait, longest)


async def _stop(worker: asyncio.Task[None], within: float) -> None:
    """Stop the worker, waiting ``within`` s at most: with the database down, unregistering it
    would wait 30 s for a connection. The jobs it leaves in ``doing`` are recovered later."""
    worker.cancel()
    done, _ = await asyncio.wait({worker}, timeout=within)
    if not done:
        log.warning("the job worker did not stop within %g s (is the database down?); the jobs it leaves"
                    " running will be retried", within)
        worker.cancel()  # interrupts its unregistering; it may still wait on a job saving its status
        await asyncio.wait({worker}, timeout=1.0)
