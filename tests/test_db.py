"""Migrations: ordered, transactional, recorded, guarded against edits and concurrent starts."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from procrastinate.exceptions import ConnectorException
from prometheus_client import REGISTRY
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from relays import PgProxy
from starlette.requests import Request

from canvasdb import runtime
from canvasdb.api import problems
from canvasdb.db import Database, EmbeddedPostgres, migrate
from canvasdb.db.embedded import _SOCKET_PATH_MAX, _memory_tuning
from canvasdb.db.migrate import Migration, applied, available, check_server_version
from canvasdb.db.pool import ConnectionPool, translate
from canvasdb.errors import CanvasdbError, MigrationError, Unavailable


def test_concurrent_starts_apply_each_migration_once(fresh_db: str) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: migrate(fresh_db), range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, len(available())]
    assert applied(fresh_db) == [(m.version, m.name) for m in available()]


def test_edited_migration_is_refused(fresh_db: str) -> None:
    migrate(fresh_db)
    first = available()[0]
    edited = Migration(first.version, first.name, first.sql + "\n-- edited\n")
    with pytest.raises(MigrationError, match="differs"):
        migrate(fresh_db, migrations=[edited])


def test_failed_migration_leaves_nothing(fresh_db: str) -> None:
    migrate(fresh_db)
    broken = Migration(9001, "broken", "CREATE TABLE half_done (x int); SELECT no_such_function();")
    with pytest.raises(MigrationError, match="0009001_broken|9001_broken"):
        migrate(fresh_db, migrations=[*available(), broken])
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT to_regclass('half_done')").fetchone() == (None,)
    assert 9001 not in [v for v, _ in applied(fresh_db)]
    migrate(fresh_db)  # the lock was released: a later start works


def test_unreachable_database_is_a_clear_error() -> None:
    from canvasdb.errors import Unavailable

    with pytest.raises(Unavailable, match="cannot connect") as refused:
        migrate("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert "\n" not in refused.value.detail, "one line (libpq's message is two)"


@pytest.mark.parametrize(("found", "named"), [(140009, "14.9"), (90624, "9.6.24")])
def test_a_server_older_than_15_is_refused_in_one_line(found: int, named: str) -> None:
    """README says PostgreSQL 15+, and nothing checked it: an older server failed somewhere in
    the migrations, with an error that did not say why."""
    with pytest.raises(MigrationError) as refused:
        check_server_version(found)
    assert refused.value.detail == f"the database server runs PostgreSQL {named}; canvasdb needs " \
                                   "PostgreSQL 15 or newer"
    check_server_version(150000)
    check_server_version(180001)


def test_the_server_version_is_checked_before_any_migration_runs(
        fresh_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs on the server migrated: this one, taken as too old by asking for one newer."""
    with psycopg.connect(fresh_db) as conn:
        running = conn.info.server_version
    module = importlib.import_module("canvasdb.db.migrate")  # (canvasdb.db.migrate is also the function)
    monkeypatch.setattr(module, "OLDEST_SERVER", running + 10000)
    probe = Migration(9003, "probe", "CREATE TABLE version_probe (x int);")
    with pytest.raises(MigrationError, match=f"canvasdb needs PostgreSQL {running // 10000 + 1} or newer"):
        migrate(fresh_db, migrations=[probe])
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT to_regclass('version_probe'), to_regclass('schema_migrations')"
                            ).fetchone() == (None, None)


def test_the_embedded_server_is_sized_to_the_machine(pg_url: str) -> None:
    """A quarter of the memory for shared buffers (within 128 MB and 8 GB), not a fixed guess."""
    if os.environ.get("CANVASDB_TEST_DATABASE_URL"):
        pytest.skip("an external server is tuned by its owner")
    with psycopg.connect(pg_url) as conn:
        mb = conn.execute("SELECT setting::bigint * 8 / 1024 FROM pg_settings"
                          " WHERE name = 'shared_buffers'").fetchone()[0]
    assert f"{mb}MB" == _memory_tuning()["shared_buffers"]
    assert 128 <= mb <= 8192


def test_an_edit_changes_no_indexed_column_of_entities(pg_url: str) -> None:
    """PostgreSQL updates a row in place (HOT, no new index entries) only when no indexed
    column changes, expressions and partial-index predicates included. Every edit sets
    these columns, so no index of entities may read them."""
    edited = {"data", "version", "keyframe_version", "deleted", "updated_at", "updated_by"}
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT i.indexrelid::regclass::text, a.attname FROM pg_index i"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum > 0"
            " WHERE i.indrelid = 'entities'::regclass AND (a.attnum = ANY(i.indkey)"
            "  OR pg_get_expr(i.indexprs, i.indrelid) ~ ('\\m' || a.attname || '\\M')"
            "  OR pg_get_expr(i.indpred, i.indrelid) ~ ('\\m' || a.attname || '\\M'))").fetchall()
    assert rows and not [(index, column) for index, column in rows if column in edited]


async def test_generic_plans_hold_for_one_transaction_only(pg_url: str) -> None:
    org = uuid.uuid4()
    show = "SELECT current_setting('plan_cache_mode') AS mode, current_setting('canvasdb.org_id', true) AS org"
    async with Database(pg_url, min_size=1, max_size=1) as db:  # one connection: the same one each time
        async with db.transaction(org, generic_plans=True) as conn:
            inside = await (await conn.execute(show)).fetchone()
        async with db.transaction(org) as conn:
            plain = await (await conn.execute(show)).fetchone()
        after = await db.one(show, None)
    assert inside == {"mode": "force_generic_plan", "org": str(org)}
    assert plain == {"mode": "auto", "org": str(org)}
    assert after == {"mode": "auto", "org": ""}, "the settings ended with their transaction"


async def test_a_scoped_read_is_one_transaction_and_leaves_nothing_behind(pg_url: str) -> None:
    """``Database.read`` sends the org setting and the statement with no BEGIN/COMMIT: they
    must still share one transaction (else the setting would not reach the statement, or
    would outlive it on the pooled connection), and a failing statement must leave the
    connection idle and unscoped."""
    from canvasdb.errors import InvalidInput

    org = uuid.uuid4()
    show = ("SELECT current_setting('plan_cache_mode') AS mode, current_setting('canvasdb.org_id', true) AS org,"
            " now() < statement_timestamp() AS same_transaction")
    async with Database(pg_url, min_size=1, max_size=1) as db:
        inside = await db.read(org, show, None, generic_plans=True)
        with pytest.raises(InvalidInput, match="division by zero"):
            await db.read(org, "SELECT 1 / (count(*) - count(*)) FROM pg_class", None)
        after = await db.one("SELECT current_setting('plan_cache_mode') AS mode,"
                             " current_setting('canvasdb.org_id', true) AS org", None)
    assert inside == [{"mode": "force_generic_plan", "org": str(org), "same_transaction": True}]
    assert after == {"mode": "auto", "org": ""}, "the settings ended with the statement"


async def test_the_pool_hands_out_the_connection_returned_last(pg_url: str) -> None:
    """Below the pool's size, queries keep meeting the same warm backend (round robin met
    the one idle longest), and connections in use are never handed out twice."""
    async with Database(pg_url, min_size=3, max_size=3) as db:
        pool = db.pool
        async with pool.connection() as a, pool.connection() as b, pool.connection() as c:
            held = [(await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone())["pid"]
                    for conn in (a, b, c)]
        # returned c, then b, then a (the context managers close innermost first)
        assert len(set(held)) == 3
        pids = [(await db.one("SELECT pg_backend_pid() AS pid", None))["pid"] for _ in range(5)]
        assert pids == [held[0]] * 5, "a query after another met a different connection"
        async with pool.connection() as first, pool.connection() as second:
            pair = {(await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone())["pid"]
                    for conn in (first, second)}
        assert pair == {held[0], held[1]}, "two at once: the two most recently returned"


async def test_metrics_show_the_pool_in_use_and_the_requests_waiting(pg_url: str) -> None:
    """Without them, a pool worn out by slow queries showed first as the 503s it ends in."""
    def sample(name: str, **labels: str) -> float:
        value = REGISTRY.get_sample_value(name, labels)
        assert value is not None, f"{name} {labels} is not in /metrics"
        return value

    before = {state: sample("canvasdb_db_pool_connections", state=state) for state in ("open", "idle")}
    waiting = sample("canvasdb_db_pool_waiting")
    async with Database(pg_url, min_size=2, max_size=2) as db:
        assert sample("canvasdb_db_pool_connections", state="open") == before["open"] + 2
        async with db.pool.connection(), db.pool.connection():
            assert sample("canvasdb_db_pool_connections", state="idle") == before["idle"]
            third = asyncio.create_task(db.one("SELECT 1", None))
            while sample("canvasdb_db_pool_waiting") == waiting:
                await asyncio.sleep(0.01)
            assert sample("canvasdb_db_pool_waiting") == waiting + 1
        await third
        assert sample("canvasdb_db_pool_connections", state="idle") == before["idle"] + 2
    assert sample("canvasdb_db_pool_connections", state="open") == before["open"]


async def test_after_a_restart_one_request_fails_not_one_per_dead_connection(pg_url: str) -> None:
    """The server ending every pooled connection (a restart does) costs one 503: the first
    failure has the pool's idle connections checked; the others found dead are replaced.
    Health probes (``ping``) retry once on a fresh connection, and give up fast."""
    async with Database(pg_url, min_size=4, max_size=4) as db:
        pool = db.pool
        async with pool.connection() as a, pool.connection() as b, pool.connection() as c, \
                pool.connection() as d:
            pids = [(await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone())["pid"]
                    for conn in (a, b, c, d)]
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
        failures = 0
        for _ in range(8):
            try:
                assert (await db.one("SELECT 1 AS one", None)) == {"one": 1}
            except Unavailable:
                failures += 1
        assert failures == 1, f"{failures} requests failed on dead pooled connections"

        async with pool.connection() as a:
            pid = (await (await a.execute("SELECT pg_backend_pid() AS pid")).fetchone())["pid"]
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await db.ping()  # the dead one, then a live one
    async with Database("postgresql://127.0.0.1:9/nowhere?connect_timeout=1", min_size=0, max_size=1) as gone:
        with pytest.raises(Unavailable):
            await gone.ping(timeout=0.5)


async def test_the_pool_connects_again_soon_after_a_long_outage(pg_url: str) -> None:
    """psycopg_pool waits twice as long before each new attempt to replace a lost connection
    (1, 2, 4, 8 s ...): after 8 s away, the server would be back 6-8 s before it tried.
    Requests work again within ``RECONNECT_EVERY`` s of its return."""
    async with PgProxy(pg_url) as relay, Database(relay.url, min_size=2, max_size=2, timeout=0.5) as db:
        relay.cut()
        with pytest.raises(Unavailable):
            await db.one("SELECT 1", None)
        await asyncio.sleep(8)
        relay.restore()
        await answers_within(db, 4.5)


async def answers_within(db: Database, seconds: float) -> None:
    """Query until the server answers, no longer than ``seconds``."""
    loop = asyncio.get_running_loop()
    back = loop.time()
    while True:
        try:
            assert await db.one("SELECT 1 AS one", None) == {"one": 1}
            return
        except Unavailable:
            assert loop.time() - back < seconds, f"no connection {seconds} s after the server came back"
            await asyncio.sleep(0.1)


async def test_while_the_database_is_away_requests_fail_fast_but_a_busy_pool_still_waits(pg_url: str) -> None:
    """Once the pool's attempt to connect has failed for want of the server, a request waits
    about ``RECONNECT_EVERY`` s, not the pool's 10 s, for its 503 (each one waited 10 s); the
    server back, requests work again within about as long. Connections all busy with slow
    queries on a reachable server are not an outage: a request still waits for one."""
    loop = asyncio.get_running_loop()
    async with PgProxy(pg_url) as relay, Database(relay.url, min_size=2, max_size=2) as db:
        async def slow() -> None:
            await db.one("SELECT pg_sleep(4)", None)

        busy = [asyncio.create_task(slow()) for _ in range(2)]
        await asyncio.sleep(0.5)
        assert await db.one("SELECT 1 AS one", None) == {"one": 1}, "a busy pool is not an outage"
        await asyncio.gather(*busy)

        relay.cut()
        with pytest.raises(Unavailable):  # a dead connection: at once, and the pool connects again
            await db.one("SELECT 1", None)
        for _ in range(3):
            start = loop.time()
            with pytest.raises(Unavailable) as raised:
                await db.one("SELECT 1", None)
            assert loop.time() - start < 7, "a request waited the pool's 10 s"
        assert (raised.value.fields["retry"], raised.value.fields["retry_after"]) == (True, 2)
        relay.restore()
        await answers_within(db, 7)


async def test_one_org_holds_at_most_its_share_of_the_pool(pg_url: str) -> None:
    """An org running heavy queries filled the pool, and every other org's reads waited 10 s,
    then failed. One org's work now holds three quarters of the pool at most; past it, it
    waits its turn (503 after the pool's timeout), and the other orgs' work goes on."""
    busy, other = uuid.uuid4(), uuid.uuid4()
    async with Database(pg_url, min_size=4, max_size=4, timeout=1) as db:
        release = asyncio.Event()
        held = 0

        async def heavy() -> None:
            nonlocal held
            async with db.transaction(busy) as conn:
                held += 1
                await release.wait()
                # the same task reads again, inside its share: it does not wait for another
                assert await db.read(busy, "SELECT 1 AS one", ()) == [{"one": 1}]
                await conn.execute("SELECT 1")

        holders = [asyncio.create_task(heavy()) for _ in range(3)]
        while held < 3:
            await asyncio.sleep(0.01)
        with pytest.raises(Unavailable, match="this org has 3 requests at the database at once"):
            await db.read(busy, "SELECT 1", ())
        assert await db.read(other, "SELECT 2 AS two", ()) == [{"two": 2}], "another org is served"
        waiting = asyncio.create_task(db.read(busy, "SELECT 3 AS three", ()))
        await asyncio.sleep(0.1)
        release.set()
        await asyncio.gather(*holders)
        assert await waiting == [{"three": 3}], "its turn came"
        assert db._shares == {}, "nothing kept for orgs with nothing at the database"


async def test_the_waits_for_an_orgs_turn_and_for_a_connection_end_at_one_timeout(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request waited up to the pool's timeout for its org's turn, then up to as long again
    for a connection (20 s before its 503). The two waits now share one deadline: here the
    turn comes after half the timeout at least, so the connection is waited for no longer
    than the other half, and it never comes."""
    busy, other = uuid.uuid4(), uuid.uuid4()
    timeout = 2.0
    async with Database(pg_url, min_size=4, max_size=4, timeout=timeout) as db:
        waits: list[float | None] = []  # what each wait for a connection is given
        getconn = db.pool.getconn

        async def recorded(timeout: float | None = None) -> Any:
            waits.append(timeout)
            return await getconn(timeout)

        monkeypatch.setattr(db.pool, "getconn", recorded)
        first_leaves, all_leave = asyncio.Event(), asyncio.Event()
        held = 0

        async def hold(org: uuid.UUID, until: asyncio.Event) -> None:
            nonlocal held
            async with db.transaction(org):
                held += 1
                await until.wait()

        holders = [asyncio.create_task(hold(busy, first_leaves))]
        holders += [asyncio.create_task(hold(org, all_leave)) for org in (busy, busy, other)]
        while held < 4:  # the pool is full, and the busy org at its share
            await asyncio.sleep(0.01)
        holders.append(asyncio.create_task(hold(other, all_leave)))  # will take the next free connection
        while not db.pool._waiting:
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(db.read(busy, "SELECT 1", ()))
        await asyncio.sleep(0.5 * timeout)
        first_leaves.set()  # its turn goes to `waiting`, its connection to the other org
        with pytest.raises(Unavailable, match="no database connection available"):
            await waiting
        assert waits[-1] is not None and waits[-1] <= 0.5 * timeout, "the connection had a wait of its own"
        all_leave.set()
        await asyncio.gather(*holders)


async def test_a_waiter_for_its_orgs_share_that_leaves_as_a_turn_frees_loses_nothing() -> None:
    """A waiter cancelled in the same turn of the loop as a holder leaves: it is cancelled (a
    ValueError from the queue took the cancellation's place), and every turn is given back."""
    db = Database("postgresql://127.0.0.1:9/never-opened", max_size=4, timeout=5)  # three turns an org
    org, release = uuid.uuid4(), asyncio.Event()
    entered = 0

    async def hold() -> None:
        nonlocal entered
        async with db._org_share(org):
            entered += 1
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(3)]
    while entered < 3:
        await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter.cancel()
    release.set()
    results = await asyncio.gather(waiter, *holders, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError) and results[1:] == [None] * 3, results
    assert db._shares == {}


def test_a_full_disk_under_the_database_is_507_as_under_the_blobs() -> None:
    error = translate(psycopg.errors.DiskFull("could not extend file: No space left on device"))
    assert (error.status, error.detail) == (507, "the database's disk is full")
    assert "No space left" in error.fields["hint"]  # for the log, not the client


async def test_a_failed_attempt_right_after_one_that_connected_is_no_outage() -> None:
    """The pool's attempts to connect run side by side: one that fails just after another
    reached the server (a flap, a full backlog) must not fail every waiting request."""
    async with ConnectionPool("postgresql://127.0.0.1:9/nowhere?connect_timeout=1", min_size=0, max_size=1,
                              open=False) as pool:
        pool._connected_at = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            await pool._connect()
        assert not pool.unreachable
        pool._connected_at -= 60
        with pytest.raises(psycopg.OperationalError):
            await pool._connect()
        assert pool.unreachable


async def test_taking_turns_frees_its_lock_however_the_block_ends(pg_url: str) -> None:
    """Cancelled twice (the second time while unlocking) or with its connection ended: the
    lock is never left held by a pooled connection, which would stall every later turn."""
    async with Database(pg_url, min_size=1, max_size=3) as db:
        inside = asyncio.Event()

        async def hold() -> None:
            async with db.taking_turns("a turn"):
                inside.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(hold())
        await inside.wait()
        task.cancel()
        await asyncio.sleep(0)  # it runs its way out: the unlock is in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(3), db.taking_turns("a turn"):
            pid = (await db.one("SELECT pg_backend_pid() AS pid", None))["pid"]
            with psycopg.connect(pg_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_locks"
                              " WHERE locktype = 'advisory' AND pid <> %s", (pid,))
        async with asyncio.timeout(3), db.taking_turns("a turn"):
            pass


async def test_a_waiter_cancelled_as_its_turn_comes_leaves_no_lock(pg_url: str) -> None:
    """The server may grant the lock just as the waiting task is cancelled: the lock must not
    outlive the task (it lasted as long as a pooled connection did)."""
    async with Database(pg_url, min_size=1, max_size=2) as db:
        for i in range(10):
            name, holding, release = f"granted-{i}", asyncio.Event(), asyncio.Event()

            async def holder(name: str = name, holding: asyncio.Event = holding,
                             release: asyncio.Event = release) -> None:
                async with db.taking_turns(name):
                    holding.set()
                    await release.wait()

            async def waiter(name: str = name) -> None:
                async with db.taking_turns(name):
                    await asyncio.sleep(60)

            held = asyncio.create_task(holder())
            await holding.wait()
            waiting = asyncio.create_task(waiter())
            await asyncio.sleep(0.1)  # waiting on the lock
            release.set()
            await held
            await asyncio.sleep(0.001 * (i % 5))
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            async with asyncio.timeout(5), db.taking_turns(name) as mine:  # (a closed session's
                assert mine  # locks go as its backend exits: a moment after the close)


async def test_an_outage_is_a_few_lines_in_the_log(
        pg_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the database is away, the pool tries to connect every 2 s per connection, and
    psycopg_pool logs each failure: a server logs each kind once per ``every`` s, saying how
    many it stands for; the job queue's traceback when its worker stops is one line."""
    loggers = ("psycopg.pool", "canvasdb.gateway", "procrastinate.worker", "procrastinate.worker.worker",
               "procrastinate.utils", "canvasdb.jobs", "canvasdb.documents", "canvasdb.api")
    for name in loggers:  # this process's loggers, as they were, after the test
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    runtime.quiet_outage_logs(every=3)
    caplog.set_level(logging.WARNING)
    async with PgProxy(pg_url) as relay, Database(relay.url, min_size=2, max_size=2, timeout=0.5) as db:
        relay.cut()
        with pytest.raises(Unavailable):
            await db.one("SELECT 1", None)
        await asyncio.sleep(7)  # two connections, an attempt each every 2 s at most: 6 to 8 failures
    failed = [r.getMessage() for r in caplog.records
              if r.name == "psycopg.pool" and r.getMessage().startswith("error connecting")]
    assert 2 <= len(failed) <= 3, failed
    assert re.search(r"\(\d more like it in [345] s\)$", failed[1]), failed[1]

    try:
        try:
            raise psycopg.OperationalError("connection refused\n\tIs the server running?")
        except psycopg.OperationalError as exc:
            raise ConnectorException() from exc
    except ConnectorException as stopped:
        logging.getLogger("procrastinate.worker.worker").error(
            "Side task listener failed, stopping worker", exc_info=stopped, extra={"action": "side_task_failed"})
    try:  # the job queue wraps any database error the same way: a statement's keeps its traceback
        try:
            raise psycopg.errors.UniqueViolation("duplicate key")
        except psycopg.Error as exc:
            raise ConnectorException() from exc
    except ConnectorException as failed_job:
        logging.getLogger("procrastinate.worker").error("Job failed", exc_info=failed_job)
    [kept] = [r for r in caplog.records if r.name == "procrastinate.worker"]
    assert kept.exc_info is not None and kept.getMessage() == "Job failed"
    [record] = [r for r in caplog.records if r.name == "procrastinate.worker.worker"]
    assert record.exc_info is None
    assert record.getMessage() == ("Side task listener failed, stopping worker"
                                   " (connection refused Is the server running?)")
    for _ in range(3):  # the write path, a batch a second
        try:
            raise Unavailable("database unavailable")
        except Unavailable:
            logging.getLogger("canvasdb.jobs").warning("could not defer the work for %d keys", 2, exc_info=True)
    [record] = [r for r in caplog.records if r.name == "canvasdb.jobs"]
    assert (record.getMessage(), record.exc_info) == ("could not defer the work for 2 keys (database unavailable)",
                                                      None)
    def answered(path: str, error: CanvasdbError) -> None:  # by the API's problem handler, which logs it
        scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
        pending.append(problems._canvasdb_error(Request(scope), error))

    pending: list = []
    for path in ("/a", "/b", "/c"):  # each request that found the database away: once
        answered(path, Unavailable("the database is unreachable", retry=True))
    for key in ("k1", "k2"):  # other server errors, each
        answered(f"/blobs/{key}", CanvasdbError("the content is corrupt"))
    await asyncio.gather(*pending)
    assert [r.getMessage() for r in caplog.records if r.name == "canvasdb.api"] == [
        "GET /a failed: the database is unreachable", "GET /blobs/k1 failed: the content is corrupt",
        "GET /blobs/k2 failed: the content is corrupt"]


def test_only_the_owner_can_reach_the_embedded_server(pg_url: str) -> None:
    """The cluster trusts whoever connects (no passwords): so no TCP listener (any local user
    could reach 127.0.0.1), a socket and a socket folder for the owner alone, and a server
    process without the root group (it read every file readable by group root)."""
    if os.environ.get("CANVASDB_TEST_DATABASE_URL"):
        pytest.skip("an external server is set up by its owner")
    with psycopg.connect(pg_url) as conn:
        settings = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name IN"
                                     " ('listen_addresses', 'unix_socket_permissions')").fetchall())
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        status = Path(f"/proc/{pid}/status").read_text()  # while the backend lives
    assert settings == {"listen_addresses": "", "unix_socket_permissions": "0700"}
    folder = Path(conninfo_to_dict(pg_url)["host"])
    assert folder.stat().st_mode & 0o077 == 0, oct(folder.stat().st_mode)
    gids = status.split("Gid:")[1].split("\n")[0].split()
    if os.geteuid() == 0:  # the server runs as canvasdb's system user, in its group only
        assert "0" not in gids, gids


def test_a_socket_folder_made_by_someone_else_is_refused(tmp_path: Path) -> None:
    """With a long home, the socket folder is /tmp/canvasdb-<hash of the home>: a name any
    local user can compute and make first (then swap the socket for theirs)."""
    home = tmp_path / ("long-" + "x" * 120)
    server = EmbeddedPostgres(home / "pgdata")
    folder = Path(server._socket_dir(5432))
    assert folder.parent == Path(tempfile.gettempdir())
    elsewhere = tmp_path / "theirs"
    elsewhere.mkdir()
    folder.symlink_to(elsewhere)  # not a folder of ours
    try:
        with pytest.raises(Unavailable, match="belongs to someone else"):
            server._prepare_runtime_dirs()
    finally:
        folder.unlink()


def test_a_stop_removes_the_socket_folder_it_leaves_empty(tmp_path: Path) -> None:
    """With a long home, the socket folder is /tmp/canvasdb-<hash of the home>: every home that
    ever ran left one behind. One with something else in it is left as it is."""
    server = EmbeddedPostgres(tmp_path / ("long-" + "x" * 120) / "pgdata")
    server.start()
    folder = Path(server._socket_dir())
    try:
        assert folder.parent == Path(tempfile.gettempdir()) and folder.is_dir()
        assert server.stop() is True
        assert not folder.exists()
        server.start()
        (folder / "kept").touch()
        server.stop()
        assert (folder / "kept").exists()
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("folder", ["a b'&#%20", "a,b", "two-byte letters"])
def test_any_home_holds_the_embedded_server(tmp_path: Path, folder: str) -> None:
    """A space or a '&' in the home's path broke its connection URL (a traceback), a quote its
    configuration, a comma its host list; letters of two bytes made its socket path longer
    than counted (the server did not start)."""
    if folder == "two-byte letters":  # as many as fit the socket path if each were one byte
        folder = "ü" * (_SOCKET_PATH_MAX - len(str(tmp_path / "run")) - len("/.s.PGSQL.65535") - 2)
    server = EmbeddedPostgres(tmp_path / folder / "pgdata")
    try:
        with psycopg.connect(server.start()) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("canvasdb",)
    finally:
        server.stop()


def test_a_home_the_shell_would_read_is_refused_in_one_line(tmp_path: Path) -> None:
    """pg_ctl starts the server through the shell, in double quotes: a path with one of
    '"$`\\' is refused before anything is made."""
    home = tmp_path / 'say "hi"'
    with pytest.raises(Unavailable, match='cannot start from a path with " in it') as refused:
        EmbeddedPostgres(home / "pgdata").start()
    assert "\n" not in refused.value.detail and not home.exists()


def test_a_lock_file_naming_another_process_is_stale(tmp_path: Path) -> None:
    """The server died with its machine, and its pid is another process's now: it was taken
    for the server (every start failed to connect, and a stop signalled that process)."""
    server = EmbeddedPostgres(tmp_path / "pgdata")
    server.start()
    lock = tmp_path / "pgdata" / "postmaster.pid"
    killed = server.status().pid
    os.kill(killed, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        while True:  # until it has gone (reaped, not a zombie)
            os.kill(killed, 0)
            time.sleep(0.05)
    other = subprocess.Popen(["sleep", "60"])
    try:
        lines = lock.read_text().split("\n")
        lock.write_text("\n".join([str(other.pid), *lines[1:]]))
        assert server.status().running is False
        assert server.stop() is False and other.poll() is None, "no signal for a process not ours"
        with psycopg.connect(server.start()) as conn:
            conn.execute("SELECT 1")
    finally:
        other.kill()
        other.wait()
        server.stop()


def test_a_data_folder_of_another_major_version_is_one_line(tmp_path: Path) -> None:
    """pg_ctl said only "could not start server. Examine the log output.", then the log's
    last lines: the reason PostgreSQL logged is the error."""
    server = EmbeddedPostgres(tmp_path / "pgdata")
    server.start()
    server.stop()
    (tmp_path / "pgdata" / "PG_VERSION").write_text("14\n")
    with pytest.raises(Unavailable) as refused:
        server.start()
    assert refused.value.detail == (
        "the embedded PostgreSQL did not start: database files are incompatible with server: The data "
        f"directory was initialized by PostgreSQL version 14, which is not compatible with this version "
        f"{refused.value.detail.rsplit('this version ', 1)[1]}")
    assert refused.value.fields["hint"] == f"see its log, {tmp_path / 'postgres.log'}"
    assert not server.status().running


def test_a_database_url_without_connect_timeout_gets_one(tmp_path: Path) -> None:
    """libpq waits for ever by default: a host that drops packets hung `up` and every command,
    with nothing said. One of the URL's own is kept."""
    from canvasdb.settings import Settings

    for url, expected in (("postgresql://me@db.example:5432/canvasdb", str(runtime.CONNECT_TIMEOUT_S)),
                          ("postgresql://me@db.example/canvasdb?connect_timeout=3&sslmode=require", "3")):
        params = conninfo_to_dict(runtime.database(Settings(home=tmp_path, database_url=url),
                                                   run_migrations=False))
        assert (params["host"], params["connect_timeout"]) == ("db.example", expected)


def test_a_user_that_may_not_create_the_extensions_is_told_what_to_do(fresh_db: str) -> None:
    """A database user without the right to create pgvector's extension was told only to "own
    the schema and create roles"."""
    role = f"weak_{uuid.uuid4().hex[:8]}"
    dbname = conninfo_to_dict(fresh_db)["dbname"]
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        migrate(fresh_db)  # the cluster's roles exist; the new user may grant them
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"GRANT canvasdb_app, canvasdb_blob_gc TO {role} WITH ADMIN OPTION")
        conn.execute(f'CREATE DATABASE "{dbname}_w" OWNER {role}')
    try:
        with pytest.raises(MigrationError) as refused:
            migrate(make_conninfo(fresh_db, user=role, dbname=f"{dbname}_w"))
        assert 'permission denied to create extension "vector"' in refused.value.detail
        assert "CREATE EXTENSION vector" in refused.value.fields["hint"]
        assert "Must be superuser" in refused.value.fields["hint"]
    finally:
        with psycopg.connect(fresh_db, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{dbname}_w" WITH (FORCE)')
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_an_extension_the_server_lacks_is_to_be_installed_not_granted(fresh_db: str) -> None:
    missing = Migration(9002, "needs_missing", "CREATE EXTENSION no_such_extension;")
    with pytest.raises(MigrationError) as refused:
        migrate(fresh_db, migrations=[missing])
    assert 'extension "no_such_extension" is not available' in refused.value.detail
    assert refused.value.fields["hint"].startswith("install pgvector on the database server")
