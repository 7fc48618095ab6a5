"""The job queue: early compaction deferred to a worker, the hourly maintenance pass, and the
worker's resilience (it starts again, stops in bounded time, its dead peers' jobs are recovered)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from conftest import Tenant
from prometheus_client import REGISTRY
from psycopg.errors import DiskFull, ProgramLimitExceeded, QueryCanceled
from pycrdt import Doc, Map
from relays import PgProxy

from canvasdb import job_metrics, jobs
from canvasdb.db import ConnectionPool, translate
from canvasdb.documents import DocumentStore
from canvasdb.errors import CanvasdbError, Unavailable
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
        for _ in range(300):  # the session's other jobs may be ahead of it in the queue
            if await snapshots(svc, tenant, "grows"):
                break
            await asyncio.sleep(0.1)
    await store.close()
    assert await snapshots(svc, tenant, "grows"), "a worker made a snapshot"
    loaded = Doc()
    loaded.apply_update(await DocumentStore(svc.db).state(tenant.owner, "grows"))
    assert loaded.get("nodes", type=Map).to_py() == source.get("nodes", type=Map).to_py()


async def test_hourly_maintenance_compacts_and_prunes(svc: Services, tenant: Tenant) -> None:
    for doc_id, n in (("hourly", 5), ("hourly-2", 3), ("hourly-3", 4)):
        await svc.documents.create(tenant.owner, tenant.project_id, doc_id)
        for update in edits(n)[1]:
            await svc.documents.append(tenant.owner, doc_id, update)
    await svc.documents.compact(tenant.org_id, "hourly-3")
    await svc.documents.append(tenant.owner, "hourly-3", edits(6)[1][-1])  # past its snapshot
    totals = await jobs.maintain(svc)
    assert totals["snapshots"] >= 3 and await snapshots(svc, tenant, "hourly") == [5]
    again = await jobs.maintain(svc)
    assert (again["snapshots"], again["updates_deleted"], again["projected"]) == (0, 0, 0), "idempotent"
    assert totals["failed"] == again["failed"] == 0
    # two days on, the updates each snapshot covers go (in one statement for several documents)
    later = datetime.now(UTC) + timedelta(days=2)
    pruned = await svc.documents.prune_many(tenant.org_id, ["hourly", "hourly-2", "hourly-3"], now=later)
    assert pruned == {"hourly": (5, 0), "hourly-2": (3, 0), "hourly-3": (5, 0)}


async def test_the_hourly_pass_stops_when_the_database_goes_away(
        svc: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each document would wait for a connection, then fail with a traceback, in turn."""
    for doc_id in ("away-1", "away-2"):
        await svc.documents.create(tenant.owner, tenant.project_id, doc_id)
        for update in edits(2)[1]:
            await svc.documents.append(tenant.owner, doc_id, update)
    tried: list[str] = []

    async def away(org_id: UUID, doc_id: str) -> None:
        tried.append(doc_id)
        raise Unavailable("database unavailable", retry=True)

    monkeypatch.setattr(svc.documents, "compact", away)
    with pytest.raises(Unavailable):
        await jobs.maintain(svc)
    assert len(tried) == 1

    # one document's own failure (over the statement timeout, a limit, the disk full): the
    # database is there, and the others go on
    for own in (QueryCanceled, ProgramLimitExceeded, DiskFull):
        tried.clear()

        async def fails(org_id: UUID, doc_id: str, own: type[psycopg.Error] = own) -> None:
            tried.append(doc_id)
            try:
                raise own("this statement failed")
            except psycopg.Error as exc:
                raise translate(exc) from exc

        monkeypatch.setattr(svc.documents, "compact", fails)
        totals = await jobs.maintain(svc)
        assert len(tried) >= 2 and totals["failed"] == len(tried), own


async def test_a_retention_batch_that_fails_is_applied_one_document_at_a_time(
        svc: Services, tenant: Tenant, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    for doc_id in ("batch-1", "batch-2"):
        await svc.documents.create(tenant.owner, tenant.project_id, doc_id)
        for update in edits(3)[1]:
            await svc.documents.append(tenant.owner, doc_id, update)
    await jobs.maintain(svc)  # snapshots
    whole = svc.documents.prune_many

    async def refusing_batches(org_id: UUID, doc_ids: list[str], **keep: Any) -> dict[str, tuple[int, int]]:
        if len(doc_ids) > 1:
            raise CanvasdbError("database error (XX000)")
        return await whole(org_id, doc_ids, **keep)

    monkeypatch.setattr(svc.documents, "prune_many", refusing_batches)
    ahead = svc.settings.model_copy(update={"update_retention_hours": -48})  # the cut two days on
    totals = await jobs.maintain(dataclasses.replace(svc, settings=ahead))
    assert totals["updates_deleted"] >= 6 and totals["failed"] == 0
    assert any("one by one" in r.getMessage() for r in caplog.records)


def test_schema_install_is_idempotent(pg_url: str) -> None:
    assert jobs.ensure_schema(pg_url) is False


async def until(done: Callable[[], Any], seconds: float = 20) -> None:
    """Wait for ``done()`` to be true (awaited if it is a coroutine), at most ``seconds``."""
    for _ in range(int(seconds * 20)):
        result = done()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not done within {seconds} s")


def logged(caplog: pytest.LogCaptureFixture, action: str) -> bool:
    """Whether procrastinate logged ``action`` (its records carry one)."""
    return any(getattr(r, "action", None) == action for r in caplog.records)


@pytest.fixture(autouse=True)
def collected() -> Iterator[None]:
    """Collect each test's garbage before the next: should a lost database leave a task whose
    exception nobody read, its "never retrieved" report, formatted while a later test parses
    Python, hits a bug of Python 3.11.7 (SystemError from ``ast``, gh-106905) that crashes pytest."""
    yield
    gc.collect()


def workers_running() -> float | None:
    return REGISTRY.get_sample_value("canvasdb_job_workers_running")


async def test_the_worker_starts_again_after_losing_the_database(
        pg_url: str, svc: Services, tenant: Tenant,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="procrastinate")
    await svc.documents.create(tenant.owner, tenant.project_id, "after-outage")
    for update in edits(5)[1]:
        await svc.documents.append(tenant.owner, "after-outage", update)
    async with (PgProxy(pg_url) as relay, jobs.connected(relay.url),
                jobs.working(svc)):
        await until(lambda: logged(caplog, "start_worker"))
        assert isinstance(jobs.queue.connector.pool, ConnectionPool)  # it connects again soon after

        def restarting() -> bool:
            return any("starting it again" in r.getMessage() for r in caplog.records
                       if r.name == "canvasdb.jobs")
        relay.cut()  # its connections drop and no new one is made: procrastinate's worker stops
        await until(restarting, seconds=30)  # by its listener or its fetch loop, whichever fails first
        relay.restore()
        await jobs.defer_compaction(tenant.org_id, "after-outage")
        await until(lambda: snapshots(svc, tenant, "after-outage"))
        assert workers_running() == 1
    assert workers_running() == 0


async def test_stopping_the_worker_with_the_database_down_is_quick_and_quiet(
        pg_url: str, svc: Services,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="procrastinate")
    async with (PgProxy(pg_url) as relay, jobs.connected(relay.url),
                jobs.working(svc, stop_within=0.5)):
        await until(lambda: logged(caplog, "start_worker"))
        relay.cut()  # its unregistering would wait 30 s for a connection, then fail
    # no exception from the block, and one line saying what happened
    warned = [r for r in caplog.records if r.name == "canvasdb.jobs" and r.levelno == logging.WARNING]
    assert warned and all(r.exc_info is None for r in warned)


async def test_a_job_whose_outcome_cannot_be_saved_is_one_line_in_the_log(
        pg_url: str, svc: Services, tenant: Tenant, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that ends as the database goes away (its server killed): procrastinate cannot save
    its outcome and left the error in the job's task, which nothing awaited; asyncio reported
    it later as "Task exception was never retrieved", with a traceback. Now one line says it."""
    running, finish = asyncio.Event(), asyncio.Event()

    async def compact(org_id: UUID, doc_id: str) -> None:
        running.set()
        await finish.wait()

    def reported() -> list[logging.LogRecord]:
        # this job's (the minute's sweeps, run as the connection is cut, may say so of theirs too)
        return [r for r in caplog.records if r.name == "canvasdb.jobs" and "could not be saved" in r.getMessage()
                and r.getMessage().startswith("job compact_document[")]

    monkeypatch.setattr(svc.documents, "compact", compact)
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    unhandled: list[str] = []
    loop.set_exception_handler(lambda _, context: unhandled.append(context["message"]))
    try:
        # stopping, the worker waits for its job long enough for the saving to fail first
        async with (PgProxy(pg_url) as relay, jobs.connected(relay.url),
                    jobs.working(svc, stop_within=20)):
            await jobs.defer_compaction(tenant.org_id, "outcome-lost")
            await until(running.is_set)
            relay.cut()
            finish.set()
            await until(reported)
        gc.collect()  # (a task whose exception nobody read reports it as it is collected)
    finally:
        loop.set_exception_handler(previous)
    [record] = reported()
    assert record.getMessage().startswith("job compact_document[") and record.exc_info is None
    assert unhandled == []


async def dead_worker(pg_url: str) -> int:
    """A worker row whose last heartbeat is an hour old: the process was killed."""
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute("INSERT INTO procrastinate_workers (last_heartbeat)"
                                 " VALUES (now() - interval '1 hour') RETURNING id")
        row = await cur.fetchone()
        assert row is not None
        return row[0]


async def job_rows(pg_url: str, where: str, *args: object) -> list[tuple[int, str, int]]:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(f"SELECT id, status::text, attempts FROM procrastinate_jobs WHERE {where}"
                                 " ORDER BY id", args)
        return await cur.fetchall()


async def test_jobs_of_a_killed_worker_are_run_again(pg_url: str, svc: Services, tenant: Tenant) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "orphan")
    for update in edits(3)[1]:
        await svc.documents.append(tenant.owner, "orphan", update)
    org, dead = str(tenant.org_id), await dead_worker(pg_url)
    async with jobs.connected(pg_url):
        await jobs.defer_indexing([tenant.org_id])
        await jobs.defer_projections([(tenant.org_id, "orphan")])
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            await conn.execute("UPDATE procrastinate_jobs SET status = 'doing', worker_id = %s"
                               " WHERE status = 'todo' AND args->>'org_id' = %s", (dead, org))
        await jobs.defer_indexing([tenant.org_id])  # its twin: waits behind the stalled one's lock
        # these three only: the minute's search sweep may queue another indexing of the org
        # (the projection's board nodes are new entities to index)
        ours = [job_id for job_id, _, _ in await job_rows(pg_url, "args->>'org_id' = %s", org)]
        assert len(ours) == 3
        indexing = "task_name = 'index_search' AND id = ANY(%s)"
        projection = "task_name = 'project_board' AND id = ANY(%s)"
        async with jobs.working(svc):
            assert await jobs.recover_stalled_jobs() >= 2
            # a job that succeeds is deleted as it finishes
            await until(lambda: job_rows(pg_url, f"{indexing} AND status = 'failed'", ours))
            await until(lambda: is_empty(job_rows(pg_url, f"({indexing} AND status <> 'failed') OR {projection}",
                                                  ours, ours)))
    assert [status for _, status, _ in await job_rows(pg_url, indexing, ours)] == ["failed"], (
        "the stalled one fails; its twin does its work (and is gone)")
    assert (await svc.documents.get(tenant.owner, "orphan")).projected_seq == 3, "retried, then run"


async def is_empty(rows: Awaitable[list[Any]]) -> bool:
    return not await rows


async def test_finished_jobs_do_not_pile_up(pg_url: str, svc: Services, tenant: Tenant) -> None:
    """Successful jobs go as they finish; the others once a week old (the hourly sweep)."""
    async with jobs.connected(pg_url):
        await jobs.defer_indexing([tenant.org_id])
        org = str(tenant.org_id)
        async with jobs.working(svc):
            await until(lambda: is_empty(job_rows(pg_url, "args->>'org_id' = %s", org)))
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            ids = []
            for status, age in [("failed", "8 days"), ("cancelled", "8 days"), ("failed", "6 days")]:
                cur = await conn.execute(
                    "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status)"
                    " VALUES ('default', 'old_jobs_test', %s, %s) RETURNING id",
                    (psycopg.types.json.Jsonb({"org_id": org}), status))
                (job_id,) = await cur.fetchone()  # type: ignore[misc]
                await conn.execute("INSERT INTO procrastinate_events (job_id, type, at)"
                                   " VALUES (%s, 'deferred', now() - %s::interval)", (job_id, age))
                ids.append(job_id)
        await jobs.drop_old_jobs(jobs.queue)
    assert [job_id for job_id, _, _ in await job_rows(pg_url, "args->>'org_id' = %s", org)] == ids[2:]


class Overlaps:
    """Notes the most runs at once of one board's projection work (inside its turn)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, projection: Any, doc_id: str) -> None:
        self.inner, self.doc_id, self.running, self.most, self.runs = projection._project, doc_id, 0, 0, 0
        monkeypatch.setattr(projection, "_project", self.project)

    async def project(self, org_id: UUID, doc_id: str) -> int:
        if doc_id != self.doc_id:  # other boards may be projected meanwhile
            return await self.inner(org_id, doc_id)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.3)  # time for a second run to start, were it allowed to
            return await self.inner(org_id, doc_id)
        finally:
            self.running -= 1
            self.runs += 1


async def test_one_projection_of_a_board_at_a_time(pg_url: str, svc: Services, tenant: Tenant,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two jobs of a board waiting, on a worker of two, and the hourly pass (which projects
    boards itself) at the same time: one run at a time."""
    await svc.documents.create(tenant.owner, tenant.project_id, "busy", "board")
    for update in edits(3)[1]:
        await svc.documents.append(tenant.owner, "busy", update)
    watched = Overlaps(monkeypatch, svc.projection, "busy")
    async with jobs.connected(pg_url):
        await jobs.defer_projections([(tenant.org_id, "busy")])
        await jobs.defer_projections([(tenant.org_id, "busy")])  # a backlog: two jobs of the board wait
        async with jobs.working(svc, concurrency=2):
            await asyncio.gather(jobs.maintain(svc), until(lambda: watched.runs >= 2))
    assert watched.most == 1


async def test_work_asked_for_while_a_flush_defers_is_deferred_too() -> None:
    """A board changed while the previous batch is being deferred is projected: it was left in
    the pending set, and the flush that was running ended without taking it (until the next
    change, maybe an hour later)."""
    deferred: list[list[Any]] = []
    deferring, release, second = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def defer(keys: list[Any]) -> None:
        deferred.append(keys)
        if len(deferred) == 1:
            deferring.set()
            await release.wait()  # the queue's round trip, slow this time
        else:
            second.set()

    requests = jobs.Requests(defer, every=0.01)
    await requests.request("first")
    await deferring.wait()
    await requests.request("second")  # arrives while the first batch is in the queue's hands
    release.set()
    await asyncio.wait_for(second.wait(), timeout=10)  # a hang guard: with the bug, never set
    assert deferred == [["first"], ["second"]]
    await requests.close()


def queue_gauge(task: str, status: str) -> float | None:
    return REGISTRY.get_sample_value("canvasdb_jobs", {"task": task, "status": status})


async def defer_and_scrape(pg_url: str, client: httpx.AsyncClient, tenant: Tenant, doc_id: str) -> int:
    """Defer a compaction, then scrape until /metrics shows the compactions waiting; how many."""
    await jobs.defer_compaction(tenant.org_id, doc_id)
    waiting = len(await job_rows(pg_url, "task_name = 'compact_document' AND status = 'todo'"))

    async def shown() -> bool:
        await client.get("/metrics")
        return queue_gauge("compact_document", "todo") == waiting

    await until(shown)
    return waiting


async def test_metrics_show_the_jobs_waiting_by_task(pg_url: str, client: httpx.AsyncClient, tenant: Tenant,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A queue piling up showed only to SQL. Every task has its series (at 0 when it has no such
    job), and a deferred job shows as ``todo`` once a scrape's read in the background is done."""
    monkeypatch.setattr(job_metrics.JOB_COUNTS, "every", 0.0)  # each scrape may read (15 s in production)
    async with jobs.connected(pg_url):
        waiting = await defer_and_scrape(pg_url, client, tenant, "queued")
    assert waiting >= 1
    for task in ("compact_document", "hourly_maintenance", "blob_orphan_sweep"):
        assert all(queue_gauge(task, status) is not None for status in ("todo", "doing", "failed")), task


async def test_metrics_serve_the_last_job_counts_while_the_database_is_away(
        pg_url: str, client: httpx.AsyncClient, tenant: Tenant, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A scrape never waits for the database: it starts a read in the background and serves
    what was read last; a failed read leaves the counts as they were, in one log line."""
    monkeypatch.setattr(job_metrics.JOB_COUNTS, "every", 0.0)
    async with PgProxy(pg_url) as relay, jobs.connected(relay.url):
        waiting = await defer_and_scrape(pg_url, client, tenant, "counted")
        relay.cut()

        def failures() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "canvasdb.jobs"]

        async def read_failed() -> bool:
            await client.get("/metrics")
            return bool(failures())

        with caplog.at_level(logging.WARNING, "canvasdb.jobs"):
            await until(read_failed)
            assert "could not read the job queue's counts for /metrics" in failures()[0]
            assert (await client.get("/metrics")).status_code == 200
            assert queue_gauge("compact_document", "todo") == waiting, "the last counts, served meanwhile"
        relay.restore()
