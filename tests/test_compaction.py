"""Compaction and retention: snapshot + tail always equals a full replay; nothing lost or doubled."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
from conftest import Tenant, make_tenant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from canvasdb.documents import DocumentStore
from canvasdb.services import Services

_tenant: Tenant | None = None


def view(doc: Doc) -> tuple:
    return (doc.get("m", type=Map).to_py(), doc.get("a", type=Array).to_py(), str(doc.get("t", type=Text)))


def replay(updates: list[bytes]) -> Doc:
    doc = Doc()
    for u in updates:
        doc.apply_update(u)
    return doc


class Editor:
    """Random edits on maps, arrays and text, recording each update."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.doc = Doc()
        self.updates: list[bytes] = []
        self.doc.observe(lambda e: self.updates.append(e.update))
        self.m, self.a, self.t = (self.doc.get("m", type=Map), self.doc.get("a", type=Array),
                                  self.doc.get("t", type=Text))

    def step(self) -> bytes:
        r = self.rng.random()
        if r < 0.4:
            self.m[f"k{self.rng.randrange(8)}"] = self.rng.randrange(100)
        elif r < 0.5 and len(self.m):
            del self.m[self.rng.choice(list(self.m.keys()))]
        elif r < 0.7:
            self.a.append(self.rng.randrange(100))
        elif r < 0.8 and len(self.a):
            del self.a[self.rng.randrange(len(self.a))]
        else:
            self.t.insert(self.rng.randrange(len(str(self.t)) + 1), self.rng.choice("abc xyz"))
        return self.updates[-1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), n=st.integers(1, 60),
       compact_at=st.sets(st.integers(0, 60), max_size=5), prune=st.booleans())
async def test_snapshot_plus_tail_equals_replay(svc: Services, seed: int, n: int, compact_at: set[int],
                                                prune: bool) -> None:
    global _tenant
    if _tenant is None:
        _tenant = await make_tenant(svc)
    org = _tenant.org_id
    doc_id = f"p{seed}-{n}-{len(compact_at)}-{int(prune)}"
    store = svc.documents
    if not await _exists(store, _tenant, doc_id):
        await store.create(_tenant.owner, _tenant.project_id, doc_id)
    else:
        return  # hypothesis replayed an example: the document already holds its updates
    editor = Editor(seed)
    for i in range(n):
        await store.append(_tenant.owner, doc_id, editor.step())
        if i in compact_at:
            await store.compact(org, doc_id)
    if prune:
        await store.prune(org, doc_id, now=datetime.now(UTC) + timedelta(days=2))
    fresh = DocumentStore(svc.db)  # loads from the latest snapshot and the updates after it
    loaded = replay([await fresh.state(_tenant.owner, doc_id)])
    assert view(loaded) == view(replay(editor.updates)) == view(editor.doc)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(minutes=st.lists(st.integers(0, 50 * 24 * 60), min_size=1, max_size=40, unique=True),
       shift=st.integers(0, 24 * 60))
async def test_old_snapshots_thin_to_the_last_of_each_day(svc: Services, minutes: list[int], shift: int) -> None:
    """Past the hourly window a snapshot goes when a later one is from the same day: the last
    of each day stays, and the newest of all; those within the window all stay. Two documents
    in one call (the hourly pass's batches), the second's times ``shift`` minutes later."""
    global _tenant
    if _tenant is None:
        _tenant = await make_tenant(svc)
    org, docs = _tenant.org_id, [f"thin-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    now = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
    times = {doc_id: [now - timedelta(days=50) + timedelta(minutes=m + i * shift) for m in sorted(minutes)]
             for i, doc_id in enumerate(docs)}
    for doc_id in docs:
        await svc.documents.create(_tenant.owner, _tenant.project_id, doc_id)
    async with svc.db.transaction(org) as conn:
        zone = ZoneInfo((await (await conn.execute("SELECT current_setting('TimeZone') AS tz")).fetchone())["tz"])
        async with conn.cursor() as cur:
            await cur.executemany("INSERT INTO doc_snapshots (org_id, doc_id, seq, state, size, at)"
                                  " VALUES (%s, %s, %s, '\\x00', 1, %s)",
                                  [(org, doc_id, seq, at) for doc_id in docs
                                   for seq, at in enumerate(times[doc_id], 1)])
    try:
        pruned = await svc.documents.prune_many(org, docs, now=now, keep_hourly=timedelta(days=30))
    finally:  # these states are not Yjs: gone before any other test's pass reads them
        async with svc.db.transaction(org) as conn:
            cur = await conn.execute("DELETE FROM doc_snapshots WHERE org_id = %s AND doc_id = ANY(%s)"
                                     " RETURNING doc_id, seq", (org, docs))
            kept = {doc_id: sorted(r["seq"] for r in rows if r["doc_id"] == doc_id)
                    for rows in [await cur.fetchall()] for doc_id in docs}

    def day(at: datetime) -> object:
        return at.astimezone(zone).date()

    cut = now - timedelta(days=30)
    for doc_id in docs:
        at = times[doc_id]
        expected = [seq for seq, t in enumerate(at, 1) if t >= cut or seq == len(at) or day(at[seq]) != day(t)]
        assert kept[doc_id] == expected
        assert pruned.get(doc_id, (0, 0)) == (0, len(at) - len(expected))


async def test_thinning_keeps_what_updates_kept_longer_need(svc: Services, tenant: Tenant) -> None:
    """Updates kept 48 days, hourly snapshots 30: thinning must not take the snapshot that the
    updates deleted before the update cut were folded into (a moment just after that cut would
    be rebuilt from an older snapshot, without them)."""
    org, doc = tenant.org_id, "kept-longer"
    now = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
    cut = now - timedelta(days=48)
    updates = {1: cut - timedelta(hours=3), 2: cut - timedelta(hours=2), 3: cut + timedelta(hours=1),
               4: cut + timedelta(hours=2), 5: now - timedelta(hours=1)}
    async with svc.db.transaction(org) as conn, conn.cursor() as cur:
        await cur.executemany("INSERT INTO doc_updates (org_id, doc_id, seq, payload, at)"
                              " VALUES (%s, %s, %s, '\\x00', %s)", [(org, doc, s, t) for s, t in updates.items()])
        await cur.executemany("INSERT INTO doc_snapshots (org_id, doc_id, seq, state, size, at)"
                              " VALUES (%s, %s, %s, '\\x00', 1, %s)",
                              [(org, doc, s, updates[s]) for s in (2, 4, 5)])
    try:
        pruned = await svc.documents.prune_many(org, [doc], now=now, keep_updates=timedelta(days=48),
                                                keep_hourly=timedelta(days=30))
        moment = cut + timedelta(minutes=90)  # within the updates kept: exact
        async with svc.db.transaction(org) as conn:
            base = (await (await conn.execute(
                "SELECT coalesce(max(seq), 0) AS seq FROM doc_snapshots WHERE org_id = %s AND doc_id = %s"
                " AND at <= %s", (org, doc, moment))).fetchone())["seq"]
            after = await (await conn.execute(
                "SELECT seq FROM doc_updates WHERE org_id = %s AND doc_id = %s AND seq > %s AND at <= %s"
                " ORDER BY seq", (org, doc, base, moment))).fetchall()
    finally:  # not Yjs: gone before any other test reads them
        async with svc.db.transaction(org) as conn:
            await conn.execute("DELETE FROM doc_updates WHERE org_id = %s AND doc_id = %s", (org, doc))
            await conn.execute("DELETE FROM doc_snapshots WHERE org_id = %s AND doc_id = %s", (org, doc))
    assert pruned == {doc: (2, 0)}
    assert [*range(1, base + 1), *(r["seq"] for r in after)] == [1, 2, 3]


async def _exists(store: DocumentStore, tenant: Tenant, doc_id: str) -> bool:
    from canvasdb.errors import NotFound

    try:
        await store.get(tenant.owner, doc_id)
        return True
    except NotFound:
        return False


async def test_compaction_beside_concurrent_appends(svc: Services, tenant: Tenant) -> None:
    store = svc.documents
    await store.create(tenant.owner, tenant.project_id, "busy")
    editors = [Editor(i) for i in range(4)]
    done = asyncio.Event()

    async def write(editor: Editor) -> None:
        for _ in range(60):
            await store.append(tenant.owner, "busy", editor.step())

    async def compact_loop() -> int:
        made = 0
        while not done.is_set():
            made += await store.compact(tenant.org_id, "busy") is not None
            await asyncio.sleep(0.005)
        return made

    compactor = asyncio.create_task(compact_loop())
    await asyncio.gather(*(write(e) for e in editors))
    done.set()
    assert await compactor > 1
    await store.compact(tenant.org_id, "busy")
    async with svc.db.transaction(tenant.org_id) as conn:
        cur = await conn.execute("SELECT count(*) AS n, count(DISTINCT seq) AS d, max(seq) AS top"
                                 " FROM doc_updates WHERE org_id = %s AND doc_id = 'busy'", (tenant.org_id,))
        log = await cur.fetchone()
    assert log == {"n": 240, "d": 240, "top": 240}
    expected = replay([u for e in editors for u in e.updates])
    loaded = replay([await DocumentStore(svc.db).state(tenant.owner, "busy")])
    assert view(loaded) == view(expected)


async def test_retention_keeps_what_time_travel_needs(svc: Services, tenant: Tenant,
                                                      client: httpx.AsyncClient) -> None:
    store = svc.documents
    await store.create(tenant.owner, tenant.project_id, "old")
    editor = Editor(7)
    for _ in range(10):
        await store.append(tenant.owner, "old", editor.step())
    middle = datetime.now(UTC)
    await asyncio.sleep(0.01)
    first_half = view(replay(editor.updates))
    for _ in range(10):
        await store.append(tenant.owner, "old", editor.step())
    assert await store.prune(tenant.org_id, "old", now=datetime.now(UTC) + timedelta(days=2)) == (0, 0), \
        "no snapshot yet: nothing may go"
    snapshot = await store.compact(tenant.org_id, "old")
    assert snapshot is not None
    past = await store.state_as_of(tenant.owner, "old", middle)
    assert view(replay([past.update])) == first_half and past.exact
    assert (await store.get(tenant.owner, "old")).exact_since is None, "nothing deleted: always exact"
    deleted, _ = await store.prune(tenant.org_id, "old", now=datetime.now(UTC) + timedelta(days=2))
    assert deleted == 20
    assert view(replay([await DocumentStore(svc.db).state(tenant.owner, "old")])) == view(editor.doc)
    beyond = await store.state_as_of(tenant.owner, "old", middle)
    assert view(replay([beyond.update])) == view(Doc()), \
        "before the only snapshot and past retention: nothing older is kept"
    assert not beyond.exact, "and the answer says it is not the document of then"
    assert (await store.get(tenant.owner, "old")).exact_since == snapshot.at
    assert (await store.state_as_of(tenant.owner, "old", snapshot.at)).exact
    base, h = f"/v1/orgs/{tenant.slug}/docs/old", tenant.headers
    assert (await client.get(base, headers=h)).json()["exact_since"] == snapshot.at.isoformat()
    for moment, exact in ((middle, "false"), (datetime.now(UTC), "true")):
        answer = await client.get(f"{base}/state", headers=h, params={"as_of": moment.isoformat()})
        assert answer.status_code == 200 and answer.headers["canvasdb-exact"] == exact
    appended = await store.append(tenant.owner, "old", editor.step())
    assert appended.seq == 21 and (await store.get(tenant.owner, "old")).last_seq == 21, \
        "numbering goes on from the snapshot when retention emptied the log"
    assert view(replay([await store.state(tenant.owner, "old")])) == view(editor.doc), \
        "a cached copy catches up across pruned updates"
    assert view(replay([await DocumentStore(svc.db).state(tenant.owner, "old")])) == view(editor.doc)


async def test_large_snapshots_go_to_the_blob_store(svc: Services, tenant: Tenant) -> None:
    blobs = svc.blobs
    store = DocumentStore(svc.db, blobs=blobs, snapshot_inline_bytes=64)
    await store.create(tenant.owner, tenant.project_id, "big")
    editor = Editor(11)
    for _ in range(40):
        await store.append(tenant.owner, "big", editor.step())
    snapshot = await store.compact(tenant.org_id, "big")
    assert snapshot is not None and snapshot.size > 64
    async with svc.db.transaction(tenant.org_id) as conn:
        cur = await conn.execute("SELECT state, blob_sha256 FROM doc_snapshots WHERE org_id = %s"
                                 " AND doc_id = 'big'", (tenant.org_id,))
        row = await cur.fetchone()
    assert row is not None and row["state"] is None and await blobs.exists(row["blob_sha256"])
    for _ in range(5):
        await store.append(tenant.owner, "big", editor.step())
    await store.compact(tenant.org_id, "big")  # builds on the blob snapshot
    fresh = DocumentStore(svc.db, blobs=blobs)
    assert view(replay([await fresh.state(tenant.owner, "big")])) == view(editor.doc)
    await store.close()


async def test_a_held_document_moves_to_a_newer_snapshot(svc: Services, tenant: Tenant) -> None:
    """A process holding a document whose tail keeps growing picks up the snapshot another
    process (a worker) made, so new peers get a snapshot and a short tail."""
    gateway = DocumentStore(svc.db, compact_after_updates=10)
    worker = DocumentStore(svc.db)
    await gateway.create(tenant.owner, tenant.project_id, "long", "board")
    editor = Editor(7)
    for _ in range(15):
        await gateway.append(tenant.owner, "long", editor.step())
    assert len((await gateway.sync(tenant.org_id, "long")).updates) == 15, "no snapshot yet: all updates"
    snapshot = await worker.compact(tenant.org_id, "long")
    assert snapshot is not None and snapshot.seq == 15
    for _ in range(10):  # the tail reaches 2 x compact_after_updates: the gateway looks again
        await gateway.append(tenant.owner, "long", editor.step())
    sync = await gateway.sync(tenant.org_id, "long")
    assert len(sync.updates) == 1 + 10 and sync.seq == 25, "the snapshot, then the ten after it"
    doc = Doc()
    for update in sync.updates:
        doc.apply_update(update)
    assert view(doc) == view(editor.doc)
    await gateway.close()
    await worker.close()


async def test_a_snapshot_blob_outlives_an_attachment_of_the_same_bytes(svc: Services, tenant: Tenant) -> None:
    """Snapshots and attachments share content in the blob store: deleting an attachment whose
    bytes are a snapshot's leaves the snapshot's blob; retention deleting the snapshot frees it."""
    store = DocumentStore(svc.db, blobs=svc.blobs, snapshot_inline_bytes=16)
    await store.create(tenant.owner, tenant.project_id, "shared")
    editor = Editor(5)
    for _ in range(30):
        await store.append(tenant.owner, "shared", editor.step())
    await store.compact(tenant.org_id, "shared")
    async with svc.db.transaction(tenant.org_id) as conn:
        sha = (await (await conn.execute("SELECT blob_sha256 FROM doc_snapshots WHERE org_id = %s"
                                         " AND doc_id = 'shared'", (tenant.org_id,))).fetchone())["blob_sha256"]
    state = await svc.blobs.get(sha)
    await svc.attachments.put(tenant.owner, "copy.bin", state)
    await svc.attachments.delete(tenant.owner, "copy.bin")
    assert await svc.blobs.exists(sha), "still the snapshot's"
    assert view(replay([await DocumentStore(svc.db, blobs=svc.blobs).state(tenant.owner, "shared")])) == \
        view(editor.doc)
    # A newer snapshot on another day; past retention the old one goes, and its blob with it.
    await store.append(tenant.owner, "shared", editor.step())
    await store.compact(tenant.org_id, "shared")
    # noon, 40 days ago: the two snapshots below are a second apart on one day (with now()
    # they could fall either side of a midnight)
    old_day = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0) - timedelta(days=40)
    async with svc.db.transaction(tenant.org_id) as conn:
        await conn.execute("UPDATE doc_snapshots SET at = %s WHERE org_id = %s"
                           " AND doc_id = 'shared' AND blob_sha256 = %s", (old_day, tenant.org_id, sha))
    assert (await store.prune(tenant.org_id, "shared"))[1] == 0, "the only one of its day stays"
    async with svc.db.transaction(tenant.org_id) as conn:
        await conn.execute("UPDATE doc_snapshots SET at = %s"
                           " WHERE org_id = %s AND doc_id = 'shared' AND blob_sha256 <> %s",
                           (old_day + timedelta(seconds=1), tenant.org_id, sha))
    assert (await store.prune(tenant.org_id, "shared"))[1] == 1
    assert not await svc.blobs.exists(sha)
    await store.close()


async def test_an_update_waiting_for_its_predecessor_survives_compaction(svc: Services, tenant: Tenant) -> None:
    store = svc.documents
    await store.create(tenant.owner, tenant.project_id, "pending")
    writer, updates = Doc(), []
    writer.observe(lambda e: updates.append(e.update))
    text = writer.get("t", type=Text)
    text += "hello"
    text += " world"
    await store.append(tenant.owner, "pending", updates[1])  # its predecessor comes later
    await store.compact(tenant.org_id, "pending")
    await store.append(tenant.owner, "pending", updates[0])
    await store.compact(tenant.org_id, "pending")
    for reader in (store, DocumentStore(svc.db)):
        assert str(replay([await reader.state(tenant.owner, "pending")]).get("t", type=Text)) == "hello world"


async def test_time_travel_inside_the_window_survives_retention(svc: Services, tenant: Tenant) -> None:
    """Updates go only once a snapshot from before the cut covers them: a moment after the cut
    is read from the snapshot before it and every update after that one."""
    store = svc.documents
    await store.create(tenant.owner, tenant.project_id, "window")
    editor = Editor(9)
    await store.append(tenant.owner, "window", editor.step())
    await store.compact(tenant.org_id, "window")  # S1
    moments = []
    for _ in range(3):
        await store.append(tenant.owner, "window", editor.step())
        moments.append((datetime.now(UTC), view(replay(editor.updates))))
        await asyncio.sleep(0.01)
    await store.compact(tenant.org_id, "window")  # S2, after all of them
    async with svc.db.transaction(tenant.org_id) as conn:  # S1 30 h ago, the updates 25 h to 23 h ago
        await conn.execute("UPDATE doc_snapshots SET at = now() - interval '30 hours' WHERE org_id = %s"
                           " AND doc_id = 'window' AND seq = 1", (tenant.org_id,))
        await conn.execute("UPDATE doc_updates SET at = now() - interval '25 hours' WHERE org_id = %s"
                           " AND doc_id = 'window' AND seq = 2", (tenant.org_id,))
    await store.prune(tenant.org_id, "window")
    for moment, expected in moments[1:]:  # inside the window: exact
        assert view(replay([await store.state(tenant.owner, "window", as_of=moment)])) == expected


async def test_a_copy_held_past_retention_is_read_again(svc: Services, tenant: Tenant) -> None:
    """A process that held a document while another appended, compacted and, past retention,
    pruned the updates it never saw reads the snapshot again: the log after its copy is empty,
    and was not always so."""
    a, b = DocumentStore(svc.db), DocumentStore(svc.db)  # as two processes would
    await a.create(tenant.owner, tenant.project_id, "held")
    editor = Editor(3)
    await a.append(tenant.owner, "held", editor.step())
    assert view(replay([await a.state(tenant.owner, "held")])) == view(replay(editor.updates))  # held at 1
    for _ in range(5):
        await b.append(tenant.owner, "held", editor.step())
    await b.compact(tenant.org_id, "held")
    deleted, _ = await b.prune(tenant.org_id, "held", now=datetime.now(UTC) + timedelta(days=2))
    assert deleted == 6
    assert view(replay([await a.state(tenant.owner, "held")])) == view(editor.doc)
    await a.close()
    await b.close()


def pause_snapshot_reads(store: DocumentStore) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the store wait each time it has read a snapshot's row, before it takes its bytes:
    the first event is set when it waits, the second lets it (and those after it) go on."""
    snapshot_state, read, go_on = store._snapshot_state, asyncio.Event(), asyncio.Event()

    async def paused(row):
        read.set()
        await go_on.wait()
        return await snapshot_state(row)

    store._snapshot_state = paused  # type: ignore[method-assign]
    return read, go_on


async def test_a_compaction_that_retention_overtakes_writes_no_snapshot(svc: Services, tenant: Tenant) -> None:
    """Two compactions of one document at once (a worker's job and the hourly pass): the
    second reads its base snapshot, the first commits a newer one, retention deletes the
    updates that one covers, and only then does the second read the updates after its base.
    Folding what is left would make a newest snapshot without the deleted updates, and the
    document would lose them for good."""
    store, first = DocumentStore(svc.db), DocumentStore(svc.db)
    await store.create(tenant.owner, tenant.project_id, "overtaken")
    editor = Editor(11)
    for _ in range(3):
        await store.append(tenant.owner, "overtaken", editor.step())
    await store.compact(tenant.org_id, "overtaken")  # the base both start from
    # each waits once it has read the last number and its base, before the updates after it
    snapshot_state = {"first": pause_snapshot_reads(first), "second": pause_snapshot_reads(store)}
    for _ in range(2):
        await store.append(tenant.owner, "overtaken", editor.step())
    first_made = asyncio.create_task(first.compact(tenant.org_id, "overtaken"))  # up to 5
    await snapshot_state["first"][0].wait()
    await store.append(tenant.owner, "overtaken", editor.step())
    second_made = asyncio.create_task(store.compact(tenant.org_id, "overtaken"))  # up to 6
    await snapshot_state["second"][0].wait()
    snapshot_state["first"][1].set()
    assert (await first_made).seq == 5
    await store.prune(tenant.org_id, "overtaken", now=datetime.now(UTC) + timedelta(days=2))
    snapshot_state["second"][1].set()
    await second_made
    fresh = DocumentStore(svc.db)
    try:
        assert view(replay([await fresh.state(tenant.owner, "overtaken")])) == view(editor.doc)
    finally:
        await fresh.close()
        await first.close()
        await store.close()


async def test_time_travel_that_retention_overtakes_is_still_exact(svc: Services, tenant: Tenant) -> None:
    """A read as of a moment takes the snapshot before it and then the updates after that
    one: a compaction and retention between the two reads took updates it had yet to read,
    and the answer, said to be exact, lacked them."""
    store = DocumentStore(svc.db)
    await store.create(tenant.owner, tenant.project_id, "travelled")
    editor = Editor(12)
    await store.append(tenant.owner, "travelled", editor.step())
    await store.compact(tenant.org_id, "travelled")  # the snapshot the read starts from
    for _ in range(3):
        await store.append(tenant.owner, "travelled", editor.step())
    moment, expected = datetime.now(UTC), view(editor.doc)
    read, go_on = pause_snapshot_reads(store)
    try:
        reading = asyncio.create_task(store.state_as_of(tenant.owner, "travelled", moment))
        await read.wait()
        await svc.documents.compact(tenant.org_id, "travelled")
        deleted, _ = await svc.documents.prune(tenant.org_id, "travelled",
                                               now=datetime.now(UTC) + timedelta(days=2))
        assert deleted == 4
        go_on.set()
        past = await reading
        assert past.exact and view(replay([past.update])) == expected
    finally:
        await store.close()


async def test_a_load_that_retention_overtakes_holds_every_update(svc: Services, tenant: Tenant) -> None:
    """A load reads the newest snapshot and the updates after it: read one after the other, a
    compaction and retention in between took updates the second read still needed, and the
    copy, held without them, served peers a document that lacked them."""
    store = DocumentStore(svc.db)
    await store.create(tenant.owner, tenant.project_id, "loaded")
    editor = Editor(13)
    await store.append(tenant.owner, "loaded", editor.step())
    await store.compact(tenant.org_id, "loaded")
    for _ in range(3):
        await store.append(tenant.owner, "loaded", editor.step())
    store.unload(tenant.org_id, "loaded")
    read, go_on = pause_snapshot_reads(store)
    try:
        loading = asyncio.create_task(store.state(tenant.owner, "loaded"))
        await read.wait()
        await svc.documents.compact(tenant.org_id, "loaded")
        await svc.documents.prune(tenant.org_id, "loaded", now=datetime.now(UTC) + timedelta(days=2))
        go_on.set()
        assert view(replay([await loading])) == view(editor.doc)
    finally:
        await store.close()
