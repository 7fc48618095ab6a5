"""Benchmark canvasdb's live documents: durable appends, the raw insert limit, board load, storage.

One run, one database: concurrent writers (1, 10 and 100 asyncio tasks sharing one DocumentStore,
each editing its own pycrdt client doc) append Yjs updates of about 100 bytes through
``append_checked``; the same rows are then inserted with plain psycopg (executemany and COPY, in
batches per transaction) into a scratch copy of ``doc_updates``; then a board of 10,000 nodes built
by 100,000 updates is opened by a fresh store by full replay, compacted, given 1,000 more updates
through ``append_checked`` and opened again from snapshot + tail; last, the bytes stored before and
after compaction. Everything goes through canvasdb's Python API except the board's bulk load (COPY
straight into ``doc_updates``, seq 1..N: the log is the sequence) and the raw baseline.

    .venv/bin/python bench/docs.py [--scale small|default] [--json] [--database-url URL]

Without --database-url it starts its own embedded PostgreSQL in a temporary folder and removes
that folder at the end (also on Ctrl-C). With --database-url the benchmark's org (slug
``bench-docs-<run>``) and its documents stay in that database; only the scratch tables
``bench_raw_updates`` and ``bench_raw_updates_pk`` are dropped.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import random
import sys
import time
from collections import deque
from contextlib import suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pycrdt
from harness import Tenant, machine_facts, make_tenant, phase, print_footer, run, run_writers, summary
from pycrdt import Doc, Map, Text, merge_updates
from rich.console import Console
from rich.table import Table

from canvasdb.db import Database
from canvasdb.documents import DocumentStore, UpdateLog, yjs
from canvasdb.documents.yjs import MERGE_CHUNK
from canvasdb.runtime import prepare_schema, settle_gc
from canvasdb.services import Services
from canvasdb.settings import Settings

CONCURRENCY = (1, 10, 100)
DOCS_PER_LEVEL = 10  # writers are spread over this many documents (writer w edits document w % 10)
WARMUP_OPS = 5  # untimed appends per writer before each timed run (loads the documents)
PILOT_SECONDS = 1.0  # untimed run that sizes the edits made ahead of the timed run
RAW_BATCHES = (100, 1000)  # rows per transaction in the raw baseline
DIRECT_MERGE_MAX = 10_000  # one merge_updates call over this many updates is also timed
UPDATE_COLS = ("org_id", "doc_id", "seq", "payload", "user_id", "client_id")
UPDATE_TYPES = ("uuid", "text", "int8", "bytea", "uuid", "int8")

# Targets, checked in `targets()`.
WRITERS_TARGET = 100
MIN_UPDATES_PER_S = 10_000
MAX_P99_MS = 20.0
OPEN_TARGET_MS = 100.0


@dataclass(frozen=True)
class Scale:
    name: str
    seconds: float  # how long each concurrency level of appends runs
    raw_rows: int  # rows per variant of the raw baseline
    board_nodes: int
    board_updates: int  # node inserts first, then position/text changes on random nodes
    tail_updates: int  # appended through append_checked after compaction
    open_runs: int  # fresh-store opens per measurement (p50 over these)


SCALES = {
    "small": Scale("small", 2.0, 10_000, 1_000, 10_000, 1_000, 5),
    "default": Scale("default", 10.0, 50_000, 10_000, 100_000, 1_000, 5),
}

# --- the client documents -------------------------------------------------------------------------

WORDS = ("the", "board", "card", "note", "idea", "plan", "team", "sprint", "review", "design", "draft",
         "layout", "sketch", "shape", "arrow", "customer", "feedback", "roadmap", "quarter", "goal", "metric",
         "launch", "budget", "risk", "owner", "status", "update", "meeting", "agenda", "action")
COLORS = ("yellow", "blue", "green", "pink", "violet", "grey")


class Client:
    """A pycrdt client document with a Y.Map ``nodes``: each node a Y.Map (type, x, y, w, h, color,
    updated_at) with a Y.Text ``text``. Every edit is one transaction; ``edit`` returns its update."""

    def __init__(self, seed: int, prefix: str) -> None:
        self.rng = random.Random(seed)
        self.prefix = prefix
        self.doc: Doc = Doc()
        self.nodes = self.doc.get("nodes", type=Map)
        self.keys: list[str] = []
        self._updates: list[bytes] = []
        self._sub = self.doc.observe(lambda event: self._updates.append(event.update))

    @property
    def client_id(self) -> int:
        return int(self.doc.client_id)

    def _stamp(self) -> float:
        return round(time.time() * 1000, 1)

    def insert(self) -> bytes:
        rng = self.rng
        key = f"{self.prefix}n{len(self.keys)}"
        self.keys.append(key)
        self.nodes[key] = Map({
            "type": "card", "x": round(rng.uniform(-5000, 5000), 1), "y": round(rng.uniform(-5000, 5000), 1),
            "w": float(rng.choice((120, 160, 240))), "h": float(rng.choice((80, 120, 160))),
            "color": rng.choice(COLORS), "text": Text(" ".join(rng.choices(WORDS, k=rng.randint(2, 6)))),
            "updated_at": self._stamp(),
        })  # fmt: skip
        return self._take()

    def change(self) -> bytes:
        """A move (x, y) of a random node (70 %) or a word typed into its text (30 %)."""
        rng = self.rng
        node = self.nodes[rng.choice(self.keys)]
        with self.doc.transaction():
            if rng.random() < 0.7:
                node["x"] = round(rng.uniform(-5000, 5000), 2)
                node["y"] = round(rng.uniform(-5000, 5000), 2)
            else:
                text = node["text"]
                text.insert(rng.randint(0, len(text)), rng.choice(WORDS) + " ")
            node["updated_at"] = self._stamp()
        return self._take()

    def edit(self) -> bytes:
        """A live writer's next edit: a new node 5 % of the time (always the first), else a change."""
        return self.insert() if not self.keys or self.rng.random() < 0.05 else self.change()

    def _take(self) -> bytes:
        assert len(self._updates) == 1, len(self._updates)
        return self._updates.pop()

    def nodes_py(self) -> dict[str, Any]:
        return self.nodes.to_py() or {}


def nodes_of(*updates: bytes) -> dict[str, Any]:
    doc: Doc = Doc()
    for update in updates:
        doc.apply_update(update)
    return doc.get("nodes", type=Map).to_py() or {}


# --- measuring ------------------------------------------------------------------------------------


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def new_store(svc: Services) -> DocumentStore:
    """A DocumentStore wired as Services.build wires it (same settings), with an empty cache."""
    s = svc.settings
    log = UpdateLog(svc.db, window=s.group_commit_window_ms / 1000, max_batch=s.group_commit_max_batch)
    return DocumentStore(svc.db, log, cache_bytes=s.doc_cache_bytes, max_update_bytes=s.max_update_bytes,
                         compact_after_updates=s.compact_after_updates,
                         compact_after_bytes=s.compact_after_bytes, blobs=svc.blobs,
                         snapshot_inline_bytes=s.snapshot_inline_bytes)


async def admin(url: str) -> psycopg.AsyncConnection[Any]:
    """A plain connection for the benchmark's own queries (it states the org for RLS itself)."""
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


# --- 1. appends -----------------------------------------------------------------------------------


async def group_commit_stats(url: str, org_id: UUID, after: dict[str, int]) -> dict[str, Any]:
    """Rows, transactions (distinct xmin) and (transaction, document) statements after ``after``."""
    async with await admin(url) as conn, conn.transaction():
        await conn.execute("SELECT set_config('canvasdb.org_id', %s, true)", (str(org_id),))
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT u.xmin::text), count(DISTINCT (u.xmin::text, u.doc_id)),"
            " coalesce(sum(octet_length(u.payload)), 0)"
            " FROM doc_updates u JOIN unnest(%s::text[], %s::bigint[]) AS w(doc_id, after)"
            " ON u.doc_id = w.doc_id AND u.seq > w.after WHERE u.org_id = %s",
            (list(after), list(after.values()), org_id))
        rows, commits, statements, size = await cur.fetchone()  # type: ignore[misc]
    return {"rows": rows, "commits": commits, "statements": statements, "payload_bytes": int(size),
            "rows_per_commit": rows / commits if commits else 0.0,
            "docs_per_commit": statements / commits if commits else 0.0}


async def last_seqs(url: str, org_id: UUID, doc_ids: list[str]) -> dict[str, int]:
    async with await admin(url) as conn, conn.transaction():
        await conn.execute("SELECT set_config('canvasdb.org_id', %s, true)", (str(org_id),))
        cur = await conn.execute("SELECT id, doc_last_seq(org_id, id) FROM documents"
                                 " WHERE org_id = %s AND id = ANY(%s)", (org_id, doc_ids))
        return {r[0]: r[1] for r in await cur.fetchall()}


async def measure_appends(svc: Services, url: str, t: Tenant, writers: int, seconds: float,
                          label: str, log_only: bool = False,
                          keep: list[tuple[str, bytes, int]] | None = None) -> dict[str, Any]:
    """``writers`` tasks, each with its own client doc, append its edits for ``seconds``.

    Through ``append_checked`` of the shared store, or (``log_only``) straight to its UpdateLog:
    no validation, no catch-up query, no document lock. The writers' edits are made before the
    timed run (sized by an untimed pilot run), so the timed loop spends its CPU on appending, as
    a gateway would; a writer that runs out makes its next edit in the loop. ``keep`` collects
    the timed rows.
    """
    store = svc.documents
    docs = [f"{label}-d{i}" for i in range(min(DOCS_PER_LEVEL, writers))]
    for doc_id in docs:
        await store.create(t.who, t.project_id, doc_id, "board")
    clients = [Client(seed=writers * 1000 + w, prefix=f"w{w}-") for w in range(writers)]
    target = [docs[w % len(docs)] for w in range(writers)]
    sent: dict[str, list[bytes]] = {doc_id: [] for doc_id in docs}  # acknowledged, per document
    ready: list[deque[bytes]] = [deque() for _ in range(writers)]
    made_in_loop = 0

    async def append(w: int, payload: bytes) -> None:
        c = clients[w]
        if log_only:
            await store.log.append(t.org_id, target[w], payload, user_id=t.owner, client_id=c.client_id)
        else:
            await store.append_checked(t.org_id, target[w], payload, user_id=t.owner)
        sent[target[w]].append(payload)

    async def warm(w: int) -> None:
        for _ in range(WARMUP_OPS):
            await append(w, clients[w].edit())

    await asyncio.gather(*(warm(w) for w in range(writers)))
    pilot_s = min(PILOT_SECONDS, seconds / 4)
    pilot_deadline, pilot = time.perf_counter() + pilot_s, [0]

    async def try_out(w: int) -> None:
        while time.perf_counter() < pilot_deadline:
            await append(w, clients[w].edit())
            pilot[0] += 1

    await asyncio.gather(*(try_out(w) for w in range(writers)))
    per_writer = math.ceil(pilot[0] / pilot_s * seconds * 2 / writers) + 10
    for w, c in enumerate(clients):
        ready[w].extend(c.edit() for _ in range(per_writer))
    after = await last_seqs(url, t.org_id, docs)
    latencies: list[float] = []
    sizes: list[int] = []
    gc.collect()
    deadline = time.perf_counter() + seconds

    async def work(w: int) -> None:
        nonlocal made_in_loop
        c, queue = clients[w], ready[w]
        while time.perf_counter() < deadline:
            if queue:
                payload = queue.popleft()
            else:
                payload, made_in_loop = c.edit(), made_in_loop + 1
            t0 = time.perf_counter()
            await append(w, payload)
            latencies.append(time.perf_counter() - t0)
            sizes.append(len(payload))
            if keep is not None:
                keep.append((target[w], payload, c.client_id))

    how = "UpdateLog.append" if log_only else "append_checked"
    elapsed, cpu = await run_writers(f"{how}, {plural(writers, 'writer')}", seconds, writers, work)
    out = summary(latencies, elapsed, cpu) | {
        "concurrency": writers, "documents": len(docs), "path": how, "edits_made_in_loop": made_in_loop,
        "update_bytes": {"mean": sum(sizes) / len(sizes), "min": min(sizes), "max": max(sizes)},
        "group_commit": await group_commit_stats(url, t.org_id, after)}
    out["stored_equals_acknowledged"] = out["group_commit"]["rows"] == out["n"]
    # Each document, opened by a fresh store, equals its acknowledged updates applied in order.
    check, same = new_store(svc), True
    for doc_id in docs:
        expected: Doc = Doc()
        for payload in sent[doc_id]:
            expected.apply_update(payload)
        same &= nodes_of(await check.state(t.who, doc_id)) == (expected.get("nodes", type=Map).to_py() or {})
    await check.close()
    out["state_equals_acknowledged"] = same
    return out


# --- 2. the raw limit -----------------------------------------------------------------------------


def measure_raw(url: str, t: Tenant, kept: list[tuple[str, bytes, int]], rows_per_variant: int
                ) -> list[dict[str, Any]]:
    """The kept rows (cycled to ``rows_per_variant``) inserted from one connection in batches of
    100 and 1,000 per transaction, with executemany and with binary COPY, into
    ``bench_raw_updates`` (LIKE doc_updates INCLUDING DEFAULTS: no primary key, no RLS); then COPY
    into ``bench_raw_updates_pk``, which also has doc_updates' primary key."""
    rows = [(t.org_id, kept[i % len(kept)][0], i + 1, kept[i % len(kept)][1], t.owner, kept[i % len(kept)][2])
            for i in range(rows_per_variant)]
    payload_bytes = sum(len(r[3]) for r in rows)
    cols = ", ".join(UPDATE_COLS)
    variants = [("executemany", n, "bench_raw_updates") for n in RAW_BATCHES]
    variants += [("COPY", n, "bench_raw_updates") for n in RAW_BATCHES]
    variants.append(("COPY", RAW_BATCHES[-1], "bench_raw_updates_pk"))
    out = []
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute("SELECT rolsuper OR pg_has_role(current_user, 'pg_checkpoint', 'MEMBER')"
                             " FROM pg_roles WHERE rolname = current_user").fetchone()
        checkpoint = bool(found and found[0])
        conn.execute("DROP TABLE IF EXISTS bench_raw_updates, bench_raw_updates_pk")
        conn.execute("CREATE TABLE bench_raw_updates (LIKE doc_updates INCLUDING DEFAULTS)")
        conn.execute("CREATE TABLE bench_raw_updates_pk"
                     " (LIKE doc_updates INCLUDING DEFAULTS INCLUDING INDEXES)")
        try:
            for how, batch, table in variants:
                conn.execute(f"TRUNCATE {table}")
                if checkpoint:  # each variant starts from a clean WAL position
                    conn.execute("CHECKPOINT")
                title = f"raw {how}, {batch:,} rows per transaction into {table}"
                with phase(title, len(rows)) as advance:
                    start, cpu = time.perf_counter(), time.process_time()
                    for i in range(0, len(rows), batch):
                        chunk = rows[i:i + batch]
                        with conn.transaction():
                            if how == "executemany":
                                conn.cursor().executemany(
                                    f"INSERT INTO {table} ({cols}) VALUES (%s, %s, %s, %s, %s, %s)", chunk)
                            else:
                                with conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN (FORMAT BINARY)"
                                                        ) as cp:
                                    cp.set_types(list(UPDATE_TYPES))
                                    for row in chunk:
                                        cp.write_row(row)
                        advance(len(chunk))
                    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
                stored = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                assert stored is not None and stored[0] == len(rows), stored
                out.append({"method": how, "batch": batch, "table": table, "rows": len(rows),
                            "payload_bytes": payload_bytes, "seconds": elapsed, "per_s": len(rows) / elapsed,
                            "commits_per_s": math.ceil(len(rows) / batch) / elapsed,
                            "client_cpu_ms_per_row": cpu / len(rows) * 1000})
        finally:
            conn.execute("DROP TABLE IF EXISTS bench_raw_updates, bench_raw_updates_pk")
    return out


# --- 3. the board ---------------------------------------------------------------------------------


def build_board(scale: Scale) -> tuple[Client, list[bytes], dict[str, Any]]:
    """One client: ``board_nodes`` inserts, then changes (move or text) on random nodes."""
    client = Client(seed=20240601, prefix="")
    updates = []
    start = time.perf_counter()
    title = f"build the board in pycrdt ({scale.board_updates:,} updates)"
    with phase(title, scale.board_updates) as advance:
        for i in range(scale.board_updates):
            updates.append(client.insert() if i < scale.board_nodes else client.change())
            if i % 1000 == 999:
                advance(1000)
    return client, updates, {"seconds": time.perf_counter() - start}


async def bulk_load_board(url: str, t: Tenant, doc_id: str, client: Client, updates: list[bytes]
                          ) -> dict[str, Any]:
    """COPY the updates into doc_updates with seq 1..N and set documents.last_seq = N.

    COPY FROM is refused on a table under row-level security, so unless the login role is a
    superuser or BYPASSRLS the rows go through a temporary staging table and INSERT ... SELECT.
    """
    async with await admin(url) as conn:
        cur = await conn.execute(
            "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
        direct = bool((await cur.fetchone())[0])  # type: ignore[index]
        size = "SELECT pg_total_relation_size('doc_updates')"
        before = (await (await conn.execute(size)).fetchone())[0]  # type: ignore[index]
        if not direct:
            await conn.execute("CREATE TEMP TABLE stage_doc_updates (LIKE doc_updates INCLUDING DEFAULTS)")
        cols = ", ".join(UPDATE_COLS)
        with phase(f"COPY {len(updates):,} updates into doc_updates", len(updates)) as advance:
            start = time.perf_counter()
            async with conn.transaction():
                await conn.execute("SELECT set_config('canvasdb.org_id', %s, true)", (str(t.org_id),))
                table = "doc_updates" if direct else "stage_doc_updates"
                async with conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN (FORMAT BINARY)") as cp:
                    cp.set_types(list(UPDATE_TYPES))
                    for seq, payload in enumerate(updates, 1):
                        await cp.write_row((t.org_id, doc_id, seq, payload, t.owner, client.client_id))
                        if seq % 10_000 == 0:
                            advance(completed=seq)
                if not direct:
                    await conn.execute(f"INSERT INTO doc_updates ({cols})"
                                       f" SELECT {cols} FROM stage_doc_updates")
            elapsed = time.perf_counter() - start
        with phase("VACUUM ANALYZE + CHECKPOINT"):
            with suppress(psycopg.errors.InsufficientPrivilege):
                await conn.execute("VACUUM ANALYZE doc_updates, documents")
            with suppress(psycopg.errors.InsufficientPrivilege):
                await conn.execute("CHECKPOINT")
        after = (await (await conn.execute(size)).fetchone())[0]  # type: ignore[index]
    return {"method": "COPY directly into doc_updates" if direct
            else "COPY into a temp staging table + INSERT ... SELECT (RLS applies)",
            "rows": len(updates), "seconds": elapsed, "per_s": len(updates) / elapsed,
            "doc_updates_growth_bytes": after - before}


async def fresh_opens(svc: Services, t: Tenant, doc_id: str, runs: int, title: str,
                      how: str) -> tuple[dict, list[bytes]]:
    """Open the document in a new, empty DocumentStore each time (nothing cached in Python).

    ``how``: "sync" is what the gateway does for a new client (the stored bytes it needs and
    the state vector, nothing decoded); "state" is the HTTP state (one merged update);
    "decode" builds the pycrdt document (what the board projection and API edits need).
    Returns the timing and what a client would apply.
    """
    latencies, cpu, pieces = [], time.process_time(), []
    with phase(title, runs) as advance:
        for _ in range(runs):
            store = new_store(svc)
            t0 = time.perf_counter()
            if how == "sync":
                pieces = (await store.sync(t.org_id, doc_id)).updates
            elif how == "state":
                pieces = [await store.state(t.who, doc_id)]
            else:
                pieces = [(await store.loaded(t.org_id, doc_id)).doc.get_update()]
            latencies.append(time.perf_counter() - t0)
            await store.close()
            del store
            gc.collect()
            advance()
    return summary(latencies, cpu=time.process_time() - cpu), pieces


def chunked_merge(updates: list[bytes]) -> tuple[bytes, float]:
    """yjs.merge (as compaction merges): merge_updates over a hundred at a time, then those."""
    start = time.perf_counter()
    merged = yjs.merge(updates)
    return merged, time.perf_counter() - start


async def measure_board(svc: Services, url: str, t: Tenant, scale: Scale) -> dict[str, Any]:
    doc_id = f"board-{scale.board_nodes}"
    await svc.documents.create(t.who, t.project_id, doc_id, "board")
    client, updates, built = build_board(scale)
    out: dict[str, Any] = {"doc_id": doc_id, "nodes": scale.board_nodes, "updates": len(updates),
                           "build": built, "update_bytes": sum(map(len, updates))}
    out["bulk_load"] = await bulk_load_board(url, t, doc_id, client, updates)
    expected = client.nodes_py()
    assert len(expected) == scale.board_nodes

    # (a) no snapshot yet: a new client is sent the whole log; decoding replays it
    out["log_open"], pieces = await fresh_opens(svc, t, doc_id, scale.open_runs,
                                                f"fresh store sync(), {len(updates):,} updates", "sync")
    out["log_open_equals_client"] = nodes_of(*pieces) == expected
    out["full_replay"], pieces = await fresh_opens(svc, t, doc_id, min(2, scale.open_runs),
                                                   f"fresh store decode, full replay of {len(updates):,}",
                                                   "decode")
    out["full_replay_equals_client"] = nodes_of(*pieces) == expected
    out["full_replay_state_bytes"] = len(pieces[0])

    # compaction
    with phase("compact()"):
        store = new_store(svc)
        t0 = time.perf_counter()
        snap = await store.compact(t.org_id, doc_id)
        out["compact_seconds"] = time.perf_counter() - t0
        await store.close()
    assert snap is not None and snap.seq == len(updates), snap
    async with await admin(url) as conn, conn.transaction():
        await conn.execute("SELECT set_config('canvasdb.org_id', %s, true)", (str(t.org_id),))
        cur = await conn.execute(
            "SELECT size, pg_column_size(state), (SELECT sum(octet_length(payload)) FROM doc_updates"
            " WHERE org_id = %s AND doc_id = %s AND seq <= %s) FROM doc_snapshots"
            " WHERE org_id = %s AND doc_id = %s AND seq = %s",
            (t.org_id, doc_id, snap.seq, t.org_id, doc_id, snap.seq))
        size, stored, payloads = await cur.fetchone()  # type: ignore[misc]
    out["snapshot"] = {"seq": snap.seq, "bytes": size, "stored_bytes": stored,
                       "in_blob_store": stored is None}
    out["stored_update_bytes"] = int(payloads)

    before_tail = expected
    # tail: more updates from the same client through append_checked (one writer, in order)
    store = new_store(svc)
    await store.sync(t.org_id, doc_id)  # held from the snapshot, so the first append is not a cold load
    latencies, tail_bytes, cpu = [], 0, time.process_time()
    with phase(f"append_checked x {scale.tail_updates:,} to the board (1 writer)", scale.tail_updates) as adv:
        start = time.perf_counter()
        for _ in range(scale.tail_updates):
            payload = client.change()
            tail_bytes += len(payload)
            t0 = time.perf_counter()
            await store.append_checked(t.org_id, doc_id, payload, user_id=t.owner)
            latencies.append(time.perf_counter() - t0)
            adv()
        elapsed = time.perf_counter() - start
    out["tail_appends"] = summary(latencies, elapsed, time.process_time() - cpu) | {"bytes": tail_bytes}

    # warm: the store that holds it answers sync() from memory (after a catch-up query)
    warm = []
    for _ in range(scale.open_runs):
        t0 = time.perf_counter()
        await store.sync(t.org_id, doc_id)
        warm.append(time.perf_counter() - t0)
    out["warm_open"] = summary(warm)
    await store.close()

    # (b) from snapshot + tail
    expected = client.nodes_py()
    tail = f"snapshot + {scale.tail_updates:,} tail"
    out["snapshot_open"], pieces = await fresh_opens(svc, t, doc_id, scale.open_runs,
                                                     f"fresh store sync(), {tail}", "sync")
    out["snapshot_open_equals_client"] = nodes_of(*pieces) == expected
    out["snapshot_open_pieces"] = len(pieces)
    out["snapshot_state"], pieces = await fresh_opens(svc, t, doc_id, scale.open_runs,
                                                      f"fresh store state(), {tail}", "state")
    out["snapshot_state_equals_client"] = nodes_of(*pieces) == expected
    out["snapshot_decode"], pieces = await fresh_opens(svc, t, doc_id, min(3, scale.open_runs),
                                                       f"fresh store decode, {tail}", "decode")
    out["snapshot_decode_equals_client"] = nodes_of(*pieces) == expected

    # 4. bytes: merge_updates of the raw updates, and the client's own (garbage-collected) state
    with phase(f"pycrdt.merge_updates of {len(updates):,} updates (in chunks of {MERGE_CHUNK})"):
        merged, seconds = chunked_merge(updates)
    out["merge_updates"] = {"bytes": len(merged), "seconds": seconds, "chunk": MERGE_CHUNK,
                            "equals_client": nodes_of(merged) == before_tail}
    first = updates[:DIRECT_MERGE_MAX]
    with phase(f"pycrdt.merge_updates(*first {len(first):,} updates) in one call"):
        t0 = time.perf_counter()
        merged = merge_updates(*first)
        direct = time.perf_counter() - t0
    out["merge_updates"]["direct"] = {"updates": len(first), "seconds": direct,
                                      "same_bytes_as_chunked": merged == chunked_merge(first)[0]}
    out["client_state_bytes"] = len(client.doc.get_update())
    return out


# --- facts, targets, report -----------------------------------------------------------------------


def checked_level(report: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in report["appends"]
                if a["concurrency"] == WRITERS_TARGET and a["path"] == "append_checked")


def targets(report: dict[str, Any], scale: Scale) -> list[dict[str, Any]]:
    level = checked_level(report)
    opened = report["board"]["snapshot_open"]["p50_ms"]
    nodes = f"{scale.board_nodes:,}-node board"
    return [
        {"name": f"append_checked throughput, {WRITERS_TARGET} writers", "value": level["per_s"],
         "unit": "updates/s", "target": f">= {MIN_UPDATES_PER_S:,}/s",
         "pass": level["per_s"] >= MIN_UPDATES_PER_S},
        {"name": f"append_checked p99, {WRITERS_TARGET} writers", "value": level["p99_ms"], "unit": "ms",
         "target": f"< {MAX_P99_MS:.0f} ms", "pass": level["p99_ms"] < MAX_P99_MS},
        {"name": f"open the {nodes} from snapshot + tail (p50, fresh store)", "value": opened, "unit": "ms",
         "target": f"< {OPEN_TARGET_MS:.0f} ms" + ("" if scale.board_nodes == 10_000 else
                                                   " (set for 10,000 nodes)"),
         "pass": opened < OPEN_TARGET_MS},
    ]


def size_line(report: dict[str, Any]) -> str:
    s, b = report["scale"], report["board"]
    a = checked_level(report)["update_bytes"]["mean"]
    return (f"Data: scale {s['name']}: appends by 1, 10 and 100 writers over up to {DOCS_PER_LEVEL} "
            f"documents, {s['seconds']:g} s per level, updates {a:.0f} bytes on average; raw baseline "
            f"{s['raw_rows']:,} rows per variant; board {b['nodes']:,} nodes built by {b['updates']:,} "
            f"updates ({b['update_bytes'] / 2**20:.1f} MiB of payload), then {s['tail_updates']:,} more")


def print_report(report: dict[str, Any], console: Console) -> None:
    m, b = report["machine"], report["board"]
    console.print(f"[bold]canvasdb documents benchmark[/] run {report['run']} at {report['started']}, "
                  f"canvasdb {m['canvasdb_revision']}", highlight=False)
    console.print(size_line(report), highlight=False)
    pg = ", ".join(f"{k}={v}" for k, v in m["pg_settings"].items())
    w = report["wiring"]
    console.print(f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, "
                  f"load avg at start {', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}; "
                  f"PostgreSQL {m['postgresql']} ({pg}); Python {m['python']}, psycopg {m['psycopg']}, "
                  f"pycrdt {m['pycrdt']}. Store: pool {w['pool_min']}-{w['pool_max']} connections, "
                  f"group commit window {w['window_ms']:g} ms, max batch {w['max_batch']:,}.",
                  highlight=False)
    console.print(f"Board bulk load: {b['bulk_load']['method']}, seq 1..{b['updates']:,}, "
                  f"documents.last_seq set to {b['updates']:,} "
                  f"({b['bulk_load']['per_s']:,.0f} rows/s).", highlight=False)

    table = Table(show_lines=False, title_justify="left")
    for col, just in (("Measurement", "left"), ("Rate", "right"), ("p50", "right"), ("p99", "right"),
                      ("n", "right"), ("CPU/op", "right"), ("Rows (docs) / commit", "right"),
                      ("Target", "left"), ("", "left")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]

    def ms(x: float) -> str:
        return f"{x:,.2f} ms" if x < 100 else f"{x:,.0f} ms"

    def row(name: str, d: dict | None = None, rate: str = "", target: str = "", ok: bool | None = None,
            p99: str | None = None, batch: str = "", p50: str | None = None) -> None:
        mark = "" if ok is None else ("[green]PASS[/]" if ok else "[red]FAIL[/]")
        cpu = f"{d['client_cpu_ms_per_op']:.2f} ms" if d and "client_cpu_ms_per_op" in d else ""
        table.add_row(name, rate, p50 if p50 is not None else (ms(d["p50_ms"]) if d else ""),
                      p99 if p99 is not None else (ms(d["p99_ms"]) if d else ""),
                      f"{d['n']:,}" if d else "", cpu, batch, target, mark)

    for a in report["appends"]:
        g = a["group_commit"]
        name = f"{a['path']}, {plural(a['concurrency'], 'writer')}, {plural(a['documents'], 'doc')}"
        batch = f"{g['rows_per_commit']:,.1f} ({g['docs_per_commit']:.1f})"
        if a["path"] == "append_checked" and a["concurrency"] == WRITERS_TARGET:
            ok = a["per_s"] >= MIN_UPDATES_PER_S and a["p99_ms"] < MAX_P99_MS
            row(name, a, rate=f"{a['per_s']:,.0f}/s", ok=ok, batch=batch,
                target=f">= {MIN_UPDATES_PER_S:,}/s, p99 < {MAX_P99_MS:.0f} ms")
        else:
            row(name, a, rate=f"{a['per_s']:,.0f}/s", batch=batch)
    table.add_section()
    for r in report["raw"]:
        extra = " + primary key" if r["table"].endswith("_pk") else ""
        table.add_row(f"raw {r['method']}, 1 connection{extra}", f"{r['per_s']:,.0f}/s", "", "",
                      f"{r['rows']:,}", f"{r['client_cpu_ms_per_row']:.3f} ms", f"{r['batch']:,}", "", "")
    table.add_section()
    row(f"board, no snapshot: sync() for a new client ({b['updates']:,} updates)", b["log_open"],
        p99=f"max {ms(b['log_open']['max_ms'])}")
    row(f"board, no snapshot: decode (full replay of {b['updates']:,})", b["full_replay"],
        p99=f"max {ms(b['full_replay']['max_ms'])}")
    row(f"board: compact() of {b['updates']:,} updates", p50=ms(b["compact_seconds"] * 1000))
    t = b["tail_appends"]
    row(f"board: append_checked x {t['n']:,}, 1 writer", t, rate=f"{t['per_s']:,.0f}/s")
    so = b["snapshot_open"]
    row(f"board: sync() for a new client, snapshot + {t['n']:,} tail", so,
        p99=f"max {ms(so['max_ms'])}", target=f"p50 < {OPEN_TARGET_MS:.0f} ms",
        ok=so["p50_ms"] < OPEN_TARGET_MS)
    for key, what in (("snapshot_state", "state(): one merged update (HTTP)"),
                      ("snapshot_decode", "decode into a pycrdt Doc (projection)")):
        row(f"  same, {what}", b[key], p99=f"max {ms(b[key]['max_ms'])}")
    row("board: sync() from the store holding it", b["warm_open"], p99=f"max {ms(b['warm_open']['max_ms'])}")
    console.print(table)

    sizes = Table(title=f"Bytes of the {b['nodes']:,}-node board", title_justify="left")
    for col, just in (("What", "left"), ("Bytes", "right"), ("vs updates", "right"), ("Note", "left")):
        sizes.add_column(col, justify=just)  # type: ignore[arg-type]
    total = b["update_bytes"]

    def size_row(what: str, nbytes: int, note: str = "") -> None:
        sizes.add_row(what, f"{nbytes:,}", f"{nbytes / total:.2f} x", note)

    size_row(f"{b['updates']:,} updates, payload bytes", total,
             f"avg {total / b['updates']:.0f} bytes; stored sum(octet_length) {b['stored_update_bytes']:,}")
    size_row("  doc_updates growth on disk (heap + primary key + TOAST)",
             b["bulk_load"]["doc_updates_growth_bytes"], "after the COPY, VACUUM ANALYZE")
    size_row("snapshot after compaction (the pieces merged)", b["snapshot"]["bytes"],
             f"compact() took {b['compact_seconds']:.2f} s")
    if b["snapshot"]["in_blob_store"]:
        size_row("  snapshot as stored: in the blob store (over CANVASDB_SNAPSHOT_INLINE_BYTES)",
                 b["snapshot"]["bytes"])
    else:
        size_row("  snapshot as stored (pg_column_size, TOAST-compressed)", b["snapshot"]["stored_bytes"])
    mu = b["merge_updates"]
    d = mu["direct"]
    size_row(f"pycrdt.merge_updates of the {b['updates']:,} updates", mu["bytes"],
             f"{mu['seconds']:.2f} s in chunks of {mu['chunk']}; same nodes: {mu['equals_client']}; "
             f"one call over {d['updates']:,}: {d['seconds']:.2f} s")
    size_row("the client's own state (gc on), after the tail too", b["client_state_bytes"])
    console.print(sizes)

    acked = all(a["stored_equals_acknowledged"] for a in report["appends"])
    checks = [f"stored rows = acknowledged appends at every level: {acked}",
              f"each document's state (fresh store) = its acknowledged updates: "
              f"{all(a['state_equals_acknowledged'] for a in report['appends'])}",
              f"board log = client: {b['log_open_equals_client']}",
              f"board full replay = client: {b['full_replay_equals_client']}",
              f"board snapshot + tail = client: sync {b['snapshot_open_equals_client']}, state "
              f"{b['snapshot_state_equals_client']}, decode {b['snapshot_decode_equals_client']}"]
    console.print("Checks: " + "; ".join(checks) + ".", highlight=False)
    print_footer(console, report)


NOTES = [
    "Appends: writer w has its own pycrdt doc (a Y.Map nodes of Y.Maps with a Y.Text; 5 % node "
    "inserts, else a move or a typed word, each stamping updated_at), its edits made ahead of the "
    "timed run, and awaits each append (durable on return) before sending the next; latency is that "
    "await. append_checked validates by applying the update to an empty pycrdt document, then appends "
    "it; UpdateLog.append is the op log alone (no validation). Rows (docs) "
    "per commit: the level's timed rows / distinct xmin (distinct (xmin, doc_id)).",
    "Raw: the rows the 100 writers stored (same payloads and columns), cycled, inserted by one "
    "psycopg connection into bench_raw_updates (LIKE doc_updates INCLUDING DEFAULTS: no primary key, "
    "no RLS, no documents row to update), in transactions of the batch size shown; the last row adds "
    "doc_updates' primary key.",
    "Board opens: a new DocumentStore each time (nothing cached in Python; PostgreSQL's buffers warm), "
    "wired as Services.build wires it (snapshots over 1 MiB in the filesystem blob store, read back "
    "with their SHA-256 checked). sync() is what the gateway does for a new client: fetch the newest "
    "snapshot (its bytes and stored state vector) and the updates after it, and hand them over as "
    "stored (the client applies them in order), with the document's state vector read from the "
    "updates' headers: nothing is decoded. state() merges them into one update (the HTTP state); "
    "decode builds the pycrdt document (what the board projection and API edits use).",
    "All clients (asyncio, one process) share the machine's CPUs with PostgreSQL. Latencies are "
    "client-side wall times; p50/p99 by nearest rank. CPU/op is this Python process's CPU time per "
    "operation (PostgreSQL's not included).",
]


async def run_async(url: str, scale: Scale, workdir: Path, report: dict[str, Any]) -> None:
    settings = Settings(home=workdir, database_url=url)
    report["wiring"] = {"pool_min": settings.pool_min_size, "pool_max": settings.pool_max_size,
                        "window_ms": settings.group_commit_window_ms,
                        "max_batch": settings.group_commit_max_batch}
    async with Database(url, min_size=settings.pool_min_size, max_size=settings.pool_max_size,
                        statement_timeout_ms=settings.statement_timeout_ms) as db:
        svc = Services.build(settings, db)
        try:
            t = await make_tenant(svc, f"bench-docs-{report['run']}")
            report["appends"] = []
            kept: list[tuple[str, bytes, int]] = []
            for writers in CONCURRENCY:
                report["appends"].append(await measure_appends(
                    svc, url, t, writers, scale.seconds, f"w{writers}",
                    keep=kept if writers == WRITERS_TARGET else None))
            for writers in CONCURRENCY:
                report["appends"].append(await measure_appends(
                    svc, url, t, writers, scale.seconds, f"log{writers}", log_only=True))
            report["raw"] = await asyncio.to_thread(measure_raw, url, t, kept, scale.raw_rows)
            del kept
            report["board"] = await measure_board(svc, url, t, scale)
        finally:
            await svc.close()


def benchmark(url: str, scale: Scale, workdir: Path, started: float) -> dict[str, Any]:
    run = uuid4().hex[:6]
    machine = machine_facts(url, ("max_connections",), {"pycrdt": getattr(pycrdt, "__version__", "?")})
    report: dict[str, Any] = {"run": run, "started": datetime.now(UTC).isoformat(timespec="seconds"),
                              "scale": asdict(scale), "machine": machine, "notes": NOTES}
    settle_gc()  # as the server does once started
    asyncio.run(run_async(url, scale, workdir, report))
    report["targets"] = targets(report, scale)
    report["load_avg_at_end"] = os.getloadavg()
    report["total_seconds"] = time.perf_counter() - started
    return report


def main() -> int:
    return run(__doc__, SCALES, benchmark, print_report, prepare=prepare_schema,
               prefix="canvasdb-bench-docs-")


if __name__ == "__main__":
    sys.exit(main())
