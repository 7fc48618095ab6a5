"""Benchmark canvasdb's entity store against raw PostgreSQL and the old whole-project JSON files.

One run, one database: bulk load a tenant tree with COPY, then time single gets, updates with
history (1, 4 and 16 writers), the raw insert limit on the same rows (no history), as-of reads
of an entity with 1,000 versions, pages of the largest project, and the old way of reading one
entity out of a project's JSON file. Everything goes through canvasdb's Python API (with its
access checks) except the bulk load and the raw baseline.

    .venv/bin/python bench/entities.py [--scale small|default|full] [--json] [--database-url URL]

Without --database-url it starts its own embedded PostgreSQL in a temporary folder and removes
that folder at the end (also on Ctrl-C). With --database-url the benchmark's orgs (slugs
``bench-<run>-<n>``) stay in that database; only the scratch table ``bench_raw`` is dropped.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import cycle
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
from harness import machine_facts, phase, print_footer, run, run_writers, summary
from psycopg.rows import dict_row
from rich.console import Console
from rich.table import Table

from canvasdb.api import create_app
from canvasdb.db import Database, migrate
from canvasdb.entities import EntityStore
from canvasdb.entities.store import MAX_PAGE, encode_data
from canvasdb.runtime import settle_gc
from canvasdb.services import Services
from canvasdb.settings import Settings
from canvasdb.tenancy import Principal

CONCURRENCY = (1, 4, 16)
WARMUP_OPS = 5  # untimed operations per writer before each timed run

# Targets: (what, limit). Checked in `targets()`.
GET_P99_MS = 2.0
AS_OF_V1_P99_MS = 10.0
UPDATE_VS_RAW = 0.5


@dataclass(frozen=True)
class Scale:
    name: str
    orgs: int
    projects: int
    entities: int
    big_project: int  # entities in the project used for pages and the old-way file
    seconds: float  # how long each concurrency level of writes runs
    gets: int  # random entities read by the get measurement
    raw_copy_rows: int  # rows COPYed into the scratch table for the raw bulk rate


SCALES = {
    "small": Scale("small", 5, 20, 2_000, 500, 2.0, 2_000, 2_000),
    "default": Scale("default", 100, 1_000, 100_000, 10_000, 10.0, 5_000, 100_000),
    "full": Scale("full", 1_000, 10_000, 1_000_000, 10_000, 10.0, 5_000, 100_000),
}

# --- data -----------------------------------------------------------------------------------------

_TEXT = """
the board card note idea plan team sprint review design draft layout sketch shape arrow
customer feedback roadmap quarter goal metric launch budget risk owner status update meeting
agenda action item follow deadline scope feature release bug fix test build deploy server
client mobile web api data model schema query index cache latency storage backup restore
history version change merge branch commit approve reject discuss question answer summary
research interview survey persona journey workflow process handoff blocker dependency estimate
velocity capacity priority backlog epic story task subtask label colour sticky frame group
"""
WORDS = tuple(_TEXT.split())
STATUSES = ("todo", "doing", "review", "done", "blocked")
TAGS = ("design", "backend", "frontend", "research", "urgent", "later", "q1", "q2", "q3", "q4",
        "customer", "internal", "bug", "feature", "spike")
TYPES = ("board.card", "board.card", "board.card", "board.note", "board.shape", "kanban.card")
ENTITY_COLS = ("org_id", "id", "project_id", "type", "data", "version", "keyframe_version", "deleted",
               "created_at", "updated_at", "created_by", "updated_by")
VERSION_COLS = ("org_id", "entity_id", "version", "op", "at", "actor", "deleted", "patch", "keyframe")


def make_data(rng: random.Random) -> dict[str, Any]:
    """A whiteboard card: a few-word title, a 20-60 word body, status, tags, position and size."""
    return {
        "title": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))).capitalize(),
        "body": " ".join(rng.choices(WORDS, k=rng.randint(20, 60))).capitalize() + ".",
        "status": rng.choice(STATUSES),
        "tags": rng.sample(TAGS, rng.randint(0, 4)),
        "x": round(rng.uniform(-5000, 5000), 1),
        "y": round(rng.uniform(-5000, 5000), 1),
        "w": rng.choice((120, 160, 240, 320)),
        "h": rng.choice((80, 120, 160)),
        "color": f"#{rng.randrange(0x1000000):06x}",
    }


def small_change(rng: random.Random) -> dict[str, Any]:
    """A merge patch of one or two fields that always changes the entity (x is a fresh float)."""
    change: dict[str, Any] = {"x": round(rng.uniform(-5000, 5000), 3)}
    if rng.random() < 0.5:
        change["status"] = rng.choice(STATUSES)
    return change


# --- the tenant tree ------------------------------------------------------------------------------


@dataclass
class Org:
    id: UUID
    slug: str
    owner: UUID
    projects: list[tuple[UUID, int]]  # (project id, entities in it)

    @property
    def who(self) -> Principal:
        return Principal(org_id=self.id, user_id=self.owner, org_role="owner")


@dataclass
class Tree:
    orgs: list[Org]
    big_project: UUID  # in orgs[0]
    sample: list[tuple[int, UUID]] = field(default_factory=list)  # (org index, entity id)
    probe: tuple[int, UUID, str, dict[str, Any]] | None = None  # a bulk row: org, project, type, data
    data_bytes: int = 0


def plan_tree(scale: Scale, run: str) -> Tree:
    """Orgs with equal numbers of projects; project 0 of org 0 holds ``big_project`` entities."""
    per_org = scale.projects // scale.orgs
    rest = scale.entities - scale.big_project
    base, extra = divmod(rest, scale.projects - 1)
    sizes = [scale.big_project] + [base + (1 if i < extra else 0) for i in range(scale.projects - 1)]
    orgs = []
    for i in range(scale.orgs):
        chunk = sizes[i * per_org:(i + 1) * per_org]
        orgs.append(Org(uuid4(), f"bench-{run}-{i}", uuid4(), [(uuid4(), n) for n in chunk]))
    assert sum(n for o in orgs for _, n in o.projects) == scale.entities
    return Tree(orgs, orgs[0].projects[0][0])


def org_rows(org: Org, rng: random.Random, tree: Tree, keep: float, oi: int) -> tuple[list, list]:
    """The ``entities`` and ``entity_versions`` rows EntityStore.create would write for one org."""
    entities, versions = [], []
    for project_id, n in org.projects:
        for _ in range(n):
            eid, kind, data = uuid4(), rng.choice(TYPES), make_data(rng)
            text = encode_data(data, 1024 * 1024)  # the store's own encoding
            tree.data_bytes += len(text.encode())
            at = datetime.now(UTC)
            entities.append((org.id, eid, project_id, kind, text, 1, 1, False, at, at, org.owner, org.owner))
            versions.append((org.id, eid, 1, "create", at, org.owner, False, None, text))
            if rng.random() < keep:
                tree.sample.append((oi, eid))
        if project_id != tree.big_project:
            tree.probe = (oi, project_id, kind, data)
    return entities, versions


def bulk_load(url: str, tree: Tree, scale: Scale, rng: random.Random) -> dict[str, Any]:
    """Create users, orgs, memberships, projects and entities with COPY, one transaction per org.

    COPY FROM is refused on a table under row-level security (RLS is FORCEd on tenant tables),
    so when the login role is a superuser or BYPASSRLS (the embedded server's ``postgres`` is)
    rows are COPYed straight into ``entities`` and ``entity_versions``; otherwise they are COPYed
    into temporary staging tables and moved with INSERT ... SELECT under the org's
    ``canvasdb.org_id``, which RLS checks row by row.
    """
    keep = min(1.0, 100_000 / scale.entities)
    with psycopg.connect(url, autocommit=True) as conn:
        direct = bool(conn.execute(
            "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user").fetchone()[0])
        if not direct:
            for table in ("entities", "entity_versions"):
                conn.execute(f"CREATE TEMP TABLE stage_{table} (LIKE {table}) ON COMMIT DELETE ROWS")
        gen = copy = 0.0
        start = time.perf_counter()
        with phase("bulk load (COPY)", scale.entities) as advance:
            for oi, org in enumerate(tree.orgs):
                t0 = time.perf_counter()
                entities, versions = org_rows(org, rng, tree, keep, oi)
                t1 = time.perf_counter()
                with conn.transaction():
                    conn.execute("SELECT set_config('canvasdb.org_id', %s, true)", (str(org.id),))
                    conn.execute("INSERT INTO users (id, email, name) VALUES (%s, %s, %s)",
                                 (org.owner, f"owner@{org.slug}.bench.example", "Bench owner"))
                    conn.execute("INSERT INTO orgs (id, slug, name) VALUES (%s, %s, %s)",
                                 (org.id, org.slug, org.slug))
                    conn.execute("INSERT INTO org_members (org_id, user_id, role) VALUES (%s, %s, 'owner')",
                                 (org.id, org.owner))
                    conn.cursor().executemany(
                        "INSERT INTO projects (org_id, id, slug, name, created_by)"
                        " VALUES (%s, %s, %s, %s, %s)",
                        [(org.id, pid, f"p{j}", f"Project {j}", org.owner)
                         for j, (pid, _) in enumerate(org.projects)])
                    copy_rows(conn, "entities", ENTITY_COLS, entities, direct)
                    copy_rows(conn, "entity_versions", VERSION_COLS, versions, direct)
                copy += time.perf_counter() - t1
                gen += t1 - t0
                advance(len(entities))
        wall = time.perf_counter() - start
    return {
        "method": "COPY directly (login role bypasses RLS)" if direct
        else "COPY into temp staging + INSERT ... SELECT per org (RLS applies)",
        "entities": scale.entities, "seconds": wall, "per_s": scale.entities / wall,
        "db_seconds": copy, "db_per_s": scale.entities / copy, "generate_seconds": gen,
        "avg_data_bytes": tree.data_bytes / scale.entities,
    }  # fmt: skip


def copy_rows(conn: psycopg.Connection, table: str, cols: tuple[str, ...], rows: list, direct: bool) -> None:
    """COPY ``rows`` into ``table`` (or via its staging table when RLS applies to us)."""
    names = ", ".join(cols)
    with conn.cursor().copy(f"COPY {table if direct else 'stage_' + table} ({names}) FROM STDIN") as cp:
        for row in rows:
            cp.write_row(row)
    if not direct:
        conn.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM stage_{table}")


# --- measuring ------------------------------------------------------------------------------------


async def timed(title: str, calls: list[Callable[[], Awaitable[Any]]], warmup: bool = True) -> dict:
    """Run ``calls`` one after another (after an untimed pass over them when ``warmup``)."""
    with phase(title, len(calls) * (2 if warmup else 1)) as advance:
        if warmup:
            for call in calls:
                await call()
                advance()
        latencies = []
        cpu = time.process_time()
        for call in calls:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)
            advance()
        cpu = time.process_time() - cpu
    return summary(latencies, cpu=cpu)


async def concurrently(title: str, writers: int, op: Callable[[int], Awaitable[Any]],
                       seconds: float) -> dict[str, Any]:
    """``writers`` tasks call ``op(writer)`` in a loop for ``seconds``; latencies and throughput."""

    async def warm(w: int) -> None:
        for _ in range(WARMUP_OPS):
            await op(w)

    await asyncio.gather(*(warm(w) for w in range(writers)))
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def work(w: int) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await op(w)
            latencies.append(time.perf_counter() - t0)

    elapsed, cpu = await run_writers(title, seconds, writers, work)
    return summary(latencies, elapsed, cpu) | {"concurrency": writers}


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def services(url: str, db: Database) -> Services:
    """canvasdb's own wiring, with its default settings (keyframe every 20 versions)."""
    return Services.build(Settings(database_url=url), db)


# --- the phases -----------------------------------------------------------------------------------


async def check_bulk_rows(url: str, tree: Tree) -> dict[str, Any]:
    """Write the probe's data again through EntityStore.create and compare the rows column by column."""
    assert tree.probe is not None
    oi, project_id, kind, data = tree.probe
    org = tree.orgs[oi]
    async with Database(url, min_size=1, max_size=1) as db:
        made = await services(url, db).entities.create(org.who, project_id, kind, data)
    async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as conn:
        await conn.execute("SELECT set_config('canvasdb.org_id', %s, true)", (str(org.id),))
        rows = await (await conn.execute(
            "SELECT e.*, v.op, v.at, v.actor, v.deleted AS v_deleted, v.patch, v.keyframe,"
            " v.version AS v_version, (SELECT count(*) FROM entity_versions w WHERE w.org_id = e.org_id"
            " AND w.entity_id = e.id) AS versions FROM entities e JOIN entity_versions v"
            " ON v.org_id = e.org_id AND v.entity_id = e.id"
            " WHERE e.org_id = %s AND e.project_id = %s AND e.data = %s::jsonb ORDER BY e.id = %s",
            (org.id, project_id, json.dumps(data), made.id))).fetchall()
    bulk, store = rows[0], rows[-1]
    skip = {"id", "created_at", "updated_at", "at"}
    differ = sorted(k for k in bulk if k not in skip and bulk[k] != store[k])
    return {"same": len(rows) == 2 and not differ, "rows_found": len(rows), "differing_columns": differ,
            "bulk_at_equals_created_at": bulk["at"] == bulk["created_at"] == bulk["updated_at"],
            "store_at_equals_created_at": store["at"] == store["created_at"],
            "store_updated_minus_created_us": (store["updated_at"] - store["created_at"]) / timedelta(
                microseconds=1)}


async def measure_gets(url: str, tree: Tree, scale: Scale, rng: random.Random) -> tuple[dict, dict]:
    """EntityStore.get of random entities, one at a time, as the org's owner; warm. Then the
    same over the HTTP API, in process (httpx's ASGI transport: the whole stack from routing
    and the token check to the JSON answer, without a socket; the client's work included)."""
    picks = rng.sample(tree.sample, min(scale.gets, len(tree.sample)))
    async with Database(url, min_size=1, max_size=2) as db:
        svc = services(url, db)
        calls = [(lambda who=tree.orgs[oi].who, eid=eid: svc.entities.get(who, eid)) for oi, eid in picks]
        direct = await timed("get", calls)
        owners = {oi for oi, _ in picks}
        tokens = {oi: (await svc.tenancy.create_token(tree.orgs[oi].owner))[1] for oi in owners}
        app = create_app(Settings(database_url=url), services=svc)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as http:
            async def get(oi: int, eid: UUID) -> None:
                answer = await http.get(f"/v1/orgs/{tree.orgs[oi].slug}/entities/{eid}",
                                        headers={"Authorization": f"Bearer {tokens[oi]}"})
                answer.raise_for_status()

            over_http = await timed("GET over HTTP",
                                    [(lambda oi=oi, eid=eid: get(oi, eid)) for oi, eid in picks])
        return direct, over_http


async def measure_writes(url: str, tree: Tree, scale: Scale, rng: random.Random) -> list[dict[str, Any]]:
    """Per concurrency: raw single-row INSERT + commit into ``bench_raw``, then EntityStore.patch."""
    org = tree.orgs[-1]
    project_id = org.projects[-1][0]
    pool_rows = [(encode_data(make_data(rng), 1024 * 1024), rng.choice(TYPES)) for _ in range(2_000)]
    targets = rng.sample(tree.sample, len(tree.sample))
    upcoming = cycle(targets)  # shared: writers never hold the same entity at once
    results = []
    for writers in CONCURRENCY:
        conns = [await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(writers)]
        rows = cycle(pool_rows)

        async def insert(w: int, conns: list = conns, rows: Iterator = rows) -> None:
            text, kind = next(rows)
            await conns[w].execute(
                "INSERT INTO bench_raw (org_id, id, project_id, type, data, version, keyframe_version,"
                " deleted, created_at, updated_at, created_by, updated_by) VALUES (%s, %s, %s, %s,"
                " %s::jsonb, 1, 1, false, clock_timestamp(), clock_timestamp(), %s, %s)",
                (org.id, uuid4(), project_id, kind, text, org.owner, org.owner))

        try:
            raw = await concurrently(f"raw INSERT, {plural(writers, 'connection')}", writers, insert,
                                     scale.seconds)
        finally:
            for conn in conns:
                await conn.close()
        async with Database(url, min_size=writers, max_size=writers) as db:
            store = services(url, db).entities

            async def patch(w: int, store: EntityStore = store) -> None:
                oi, eid = next(upcoming)
                await store.patch(tree.orgs[oi].who, eid, small_change(rng))

            title = f"EntityStore.patch, {plural(writers, 'writer')}"
            update = await concurrently(title, writers, patch, scale.seconds)
        results.append({"concurrency": writers, "raw_insert": raw, "update": update,
                        "ratio": update["per_s"] / raw["per_s"]})
    return results


def measure_raw_copy(url: str, scale: Scale, tree: Tree, rng: random.Random) -> dict[str, Any]:
    """COPY the same kind of rows into ``bench_raw``: no history, no indexes (the bulk ceiling)."""
    org = tree.orgs[-1]
    project_id = org.projects[-1][0]
    rows = []
    for _ in range(scale.raw_copy_rows):
        text, at = encode_data(make_data(rng), 1024 * 1024), datetime.now(UTC)
        rows.append((org.id, uuid4(), project_id, rng.choice(TYPES), text, 1, 1, False, at, at,
                     org.owner, org.owner))
    with psycopg.connect(url, autocommit=True) as conn, phase("raw COPY", len(rows)) as advance:
        start = time.perf_counter()
        with conn.transaction(), conn.cursor().copy(
            f"COPY bench_raw ({', '.join(ENTITY_COLS)}) FROM STDIN"
        ) as cp:
            for i, row in enumerate(rows):
                cp.write_row(row)
                if i % 10_000 == 0:
                    advance(completed=i)
        elapsed = time.perf_counter() - start
    return {"rows": len(rows), "seconds": elapsed, "per_s": len(rows) / elapsed}


async def measure_as_of(url: str, tree: Tree, rng: random.Random) -> dict[str, Any]:
    """Give one entity 1,000 versions with EntityStore.patch, then read it as of v1, v500 and a moment."""
    org = tree.orgs[-1]
    who = org.who
    async with Database(url, min_size=1, max_size=2) as db:
        store = services(url, db).entities
        entity = await store.create(who, org.projects[-1][0], "board.card", make_data(rng))
        latencies, cpu = [], time.process_time()
        with phase("999 patches of one entity", 999) as advance:
            for _ in range(999):
                t0 = time.perf_counter()
                entity = await store.patch(who, entity.id, small_change(rng))
                latencies.append(time.perf_counter() - t0)
                advance()
        cpu = time.process_time() - cpu
        assert entity.version == 1000, entity.version
        middle = (await store.history(who, entity.id, before=501, limit=1)).items[0]
        out: dict[str, Any] = {"versions": entity.version, "keyframe_interval": store.keyframe_interval,
                               "building_patches": summary(latencies, cpu=cpu)}
        for key, as_of in (("v1", 1), ("v500", 500), ("moment", middle.at)):
            calls = [lambda as_of=as_of: store.get(who, entity.id, as_of=as_of)] * 200
            out[key] = await timed(f"get as_of={key}", calls)
        assert (await store.get(who, entity.id, as_of=middle.at)).version == 500
    return out


async def measure_pages(url: str, tree: Tree) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """EntityStore.list pages (limit 100) of the big project: the first one and one in the middle.

    Also returns the whole project (read page by page) for the old-way file.
    """
    who = tree.orgs[0].who
    async with Database(url, min_size=1, max_size=2) as db:
        store = services(url, db).entities
        everything, after = [], None
        while True:
            page = await store.list(who, tree.big_project, after=after, limit=MAX_PAGE)
            everything += [e.to_json() for e in page.items]
            if page.next is None:
                break
            after = page.next
        pages = math.ceil(len(everything) / 100)
        after = None
        for _ in range(pages // 2):  # walk to the middle with the `next` cursor
            after = (await store.list(who, tree.big_project, after=after, limit=100)).next
        out: dict[str, Any] = {"project_entities": len(everything), "pages": pages,
                               "middle_page": pages // 2 + 1}
        for key, cursor in (("first", None), ("middle", after)):
            calls = [lambda c=cursor: store.list(who, tree.big_project, after=c, limit=100)] * 200
            out[key] = await timed(f"list page ({key})", calls)
    return out, everything


def measure_old_way(workdir: Path, entities: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
    """The old system: one JSON file per project; read one entity = open + json.load + find by id."""
    path = workdir / "project.json"
    with path.open("w", encoding="utf-8") as fh:
        json.dump({"entities": entities}, fh, ensure_ascii=False)
    ids = [e["id"] for e in rng.sample(entities, min(50, len(entities)))]

    def read(target: str) -> dict[str, Any]:
        with path.open(encoding="utf-8") as fh:
            doc = json.load(fh)
        return next(e for e in doc["entities"] if e["id"] == target)

    latencies = []
    with phase("old way: read one entity from the project file", len(ids) + 3) as advance:
        for target in ids[:3]:  # warm the page cache
            read(target)
            advance()
        for target in ids:
            t0 = time.perf_counter()
            read(target)
            latencies.append(time.perf_counter() - t0)
            advance()
    return {"file_bytes": path.stat().st_size, "entities": len(entities), **summary(latencies)}


# --- facts, targets, report -----------------------------------------------------------------------


def prepare_after_load(url: str) -> dict[str, Any]:
    """VACUUM ANALYZE the loaded tables and CHECKPOINT, as one would after a bulk load."""
    with psycopg.connect(url, autocommit=True) as conn, phase("VACUUM ANALYZE + CHECKPOINT"):
        start = time.perf_counter()
        conn.execute("VACUUM ANALYZE entities, entity_versions, projects, org_members")
        with suppress(psycopg.errors.InsufficientPrivilege):  # needs superuser or pg_checkpoint
            conn.execute("CHECKPOINT")
        sizes = conn.execute(
            "SELECT pg_total_relation_size('entities'), pg_total_relation_size('entity_versions'),"
            " pg_database_size(current_database())").fetchone()
    return {"vacuum_checkpoint_seconds": time.perf_counter() - start, "entities_table_bytes": sizes[0],
            "entity_versions_table_bytes": sizes[1], "database_bytes": sizes[2]}


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    found = [{"name": "get p99", "value": report["get"]["p99_ms"], "unit": "ms",
              "target": f"< {GET_P99_MS} ms", "pass": report["get"]["p99_ms"] < GET_P99_MS}]
    for w in report["writes"]:
        found.append({"name": f"update throughput, {plural(w['concurrency'], 'writer')}", "value": w["ratio"],
                      "unit": "x raw insert", "target": f">= {UPDATE_VS_RAW} x raw insert rate",
                      "pass": w["ratio"] >= UPDATE_VS_RAW})
    v1 = report["as_of"]["v1"]["p99_ms"]
    found.append({"name": "as-of v1 p99 (1,000 versions)", "value": v1, "unit": "ms",
                  "target": f"< {AS_OF_V1_P99_MS} ms", "pass": v1 < AS_OF_V1_P99_MS})
    return found


def size_line(report: dict[str, Any]) -> str:
    s, load = report["scale"], report["load"]
    big = f"largest project {s['big_project']:,} entities"
    if s["big_project"] != 10_000:
        big += " (pages and old-way file use this largest project; 10,000 at default/full scale)"
    return (f"Data: scale {s['name']}: {s['orgs']:,} orgs, {s['projects']:,} projects, "
            f"{s['entities']:,} entities, {big}; avg entity data {load['avg_data_bytes']:.0f} bytes; "
            f"database {report['storage']['database_bytes'] / 2**20:,.0f} MiB after load")


def print_report(report: dict[str, Any], console: Console) -> None:
    m, load = report["machine"], report["load"]
    console.print(f"[bold]canvasdb entity benchmark[/] run {report['run']} at {report['started']}, "
                  f"canvasdb {m['canvasdb_revision']}", highlight=False)
    console.print(size_line(report), highlight=False)
    pg = ", ".join(f"{k}={v}" for k, v in m["pg_settings"].items())
    console.print(f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, "
                  f"load avg at start {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}; "
                  f"PostgreSQL {m['postgresql']} ({pg}); "
                  f"Python {m['python']}, psycopg {m['psycopg']}", highlight=False)
    console.print(f"Bulk load: {load['method']}. Bulk rows checked against EntityStore.create: "
                  f"{'identical' if report['bulk_rows_check']['same'] else 'DIFFERENT'} "
                  f"(ids and timestamps aside).", highlight=False)

    table = Table(show_lines=False, title_justify="left")
    for col, just in (("Measurement", "left"), ("Rate", "right"), ("p50", "right"), ("p99", "right"),
                      ("n", "right"), ("CPU/op", "right"), ("Target", "left"), ("", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]

    def ms(x: float) -> str:
        return f"{x:,.2f} ms" if x < 100 else f"{x:,.0f} ms"

    def row(name: str, d: dict | None = None, rate: str = "", target: str = "",
            ok: bool | None = None) -> None:
        mark = "" if ok is None else ("[green]PASS[/]" if ok else "[red]FAIL[/]")
        cpu = f"{d['client_cpu_ms_per_op']:.2f} ms" if d and "client_cpu_ms_per_op" in d else ""
        table.add_row(name, rate, ms(d["p50_ms"]) if d else "", ms(d["p99_ms"]) if d else "",
                      f"{d['n']:,}" if d else "", cpu, target, mark)

    row(f"Bulk load, whole tree ({load['entities']:,} entities + version rows)",
        rate=f"{load['per_s']:,.0f} ent/s")
    row("  same, COPY time only (Python data generation excluded)", rate=f"{load['db_per_s']:,.0f} ent/s")
    row(f"  raw COPY, no history ({report['raw_copy']['rows']:,} rows into bench_raw)",
        rate=f"{report['raw_copy']['per_s']:,.0f} rows/s")
    table.add_section()
    g = report["get"]
    row("EntityStore.get (owner, warm, random entities)", g, target=f"p99 < {GET_P99_MS} ms",
        ok=g["p99_ms"] < GET_P99_MS)
    row("  the same as GET /v1/orgs/{org}/entities/{id}, in process (ASGI, no socket)", report["get_http"])
    table.add_section()
    for w in report["writes"]:
        raw, upd = w["raw_insert"], w["update"]
        row(f"raw INSERT + commit, {plural(w['concurrency'], 'connection')}", raw,
            rate=f"{raw['per_s']:,.0f}/s")
        row(f"EntityStore.patch + history, {plural(w['concurrency'], 'writer')}", upd,
            rate=f"{upd['per_s']:,.0f}/s",
            target=f">= {UPDATE_VS_RAW} x raw (is {w['ratio']:.2f} x)", ok=w["ratio"] >= UPDATE_VS_RAW)
    table.add_section()
    a = report["as_of"]
    row(f"get as_of=1 ({a['versions']:,} versions)", a["v1"], target=f"p99 < {AS_OF_V1_P99_MS} ms",
        ok=a["v1"]["p99_ms"] < AS_OF_V1_P99_MS)
    row("get as_of=500", a["v500"])
    row("get as_of=<moment of v500>", a["moment"])
    row("  (the 999 patches that built it, sequential)", a["building_patches"],
        rate=f"{1000 / a['building_patches']['mean_ms']:,.0f}/s")
    table.add_section()
    p = report["page"]
    row(f"EntityStore.list, limit 100, first page ({p['project_entities']:,} in project)", p["first"])
    row(f"EntityStore.list, limit 100, page {p['middle_page']} of {p['pages']} (cursor)", p["middle"])
    table.add_section()
    f = report["old_way"]
    row(f"old way: open + json.load + find ({f['file_bytes'] / 2**20:.1f} MiB file, "
        f"{f['entities']:,} entities)", f)
    console.print(table)
    print_footer(console, report)


NOTES = [
    "bench_raw is CREATE TABLE (LIKE entities INCLUDING DEFAULTS): same columns, no primary key or "
    "indexes, no RLS, no history table; a raw INSERT is one autocommit statement appending to the "
    "table, while EntityStore.patch is one call of entity_change: lock a random row, merge, "
    "compute the RFC 6902 patch, update the row in place and append the version row (two tuples, "
    "a primary-key entry, and a full-page image on the first touch of a page after a checkpoint).",
    "All clients (asyncio, one process) share the machine's CPUs with PostgreSQL.",
    "Latencies are client-side wall times; p50/p99 by nearest rank. CPU/op is this Python "
    "process's CPU time (all threads) per operation: the client-side cost, PostgreSQL's not included.",
]


async def run_async(url: str, tree: Tree, scale: Scale, rng: random.Random, workdir: Path,
                    report: dict[str, Any]) -> None:
    report["bulk_rows_check"] = await check_bulk_rows(url, tree)
    report["get"], report["get_http"] = await measure_gets(url, tree, scale, rng)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_raw")
        conn.execute("CREATE TABLE bench_raw (LIKE entities INCLUDING DEFAULTS)")
    try:
        report["writes"] = await measure_writes(url, tree, scale, rng)
        report["raw_copy"] = measure_raw_copy(url, scale, tree, rng)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS bench_raw")
    report["as_of"] = await measure_as_of(url, tree, rng)
    report["page"], everything = await measure_pages(url, tree)
    report["old_way"] = measure_old_way(workdir, everything, rng)


def benchmark(url: str, scale: Scale, workdir: Path, started: float) -> dict[str, Any]:
    rng = random.Random(20240601)
    run = uuid4().hex[:6]
    report: dict[str, Any] = {"run": run, "started": datetime.now(UTC).isoformat(timespec="seconds"),
                              "scale": asdict(scale), "machine": machine_facts(url), "notes": NOTES}
    tree = plan_tree(scale, run)
    report["load"] = bulk_load(url, tree, scale, rng)
    report["storage"] = prepare_after_load(url)
    settle_gc()  # as the server does once started; and the benchmark's own bookkeeping is left out
    asyncio.run(run_async(url, tree, scale, rng, workdir, report))
    report["targets"] = targets(report)
    report["load_avg_at_end"] = os.getloadavg()
    report["total_seconds"] = time.perf_counter() - started
    return report


def main() -> int:
    return run(__doc__, SCALES, benchmark, print_report, prepare=migrate, prefix="canvasdb-bench-")


if __name__ == "__main__":
    sys.exit(main())
