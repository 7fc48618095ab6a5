"""Live documents: creation, durable appends with group commit, loading, state vectors, as-of."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import httpx
import psycopg
import pytest
from conftest import Tenant
from prometheus_client import REGISTRY
from pycrdt import Array, Doc, Map

from canvasdb.db import Database
from canvasdb.documents import DocumentStore, UpdateLog, yjs
from canvasdb.documents.log import NOTIFY_CHANNEL
from canvasdb.errors import Conflict, Forbidden, InvalidInput, NotFound
from canvasdb.gateway import protocol
from canvasdb.gateway.hub import LISTENER_NAME, Hub, Peer, Room
from canvasdb.services import Services
from canvasdb.settings import Settings
from canvasdb.tenancy import Principal


class Client:
    """A pycrdt document standing in for a Yjs client: records the updates it makes."""

    def __init__(self) -> None:
        self.doc = Doc()
        self.updates: list[bytes] = []
        self.doc.observe(lambda event: self.updates.append(event.update))
        self.nodes = self.doc.get("nodes", type=Map)

    def edit(self, key: str, value: object) -> bytes:
        self.nodes[key] = value
        return self.updates[-1]


def content(update: bytes) -> dict:
    doc = Doc()
    doc.apply_update(update)
    return doc.get("nodes", type=Map).to_py() or {}


async def test_create_and_metadata(svc: Services, tenant: Tenant, other_tenant: Tenant) -> None:
    doc = await svc.documents.create(tenant.owner, tenant.project_id, "board-1", "board")
    assert (doc.id, doc.kind, doc.last_seq) == ("board-1", "board", 0)
    assert (await svc.documents.get(tenant.owner, "board-1")).project_id == tenant.project_id
    with pytest.raises(Conflict):
        await svc.documents.create(tenant.owner, tenant.project_id, "board-1")
    for bad in ["", "../x", "a b", "x" * 201, "a\x00"]:
        with pytest.raises(InvalidInput):
            await svc.documents.create(tenant.owner, tenant.project_id, bad)
    with pytest.raises(InvalidInput):
        await svc.documents.create(tenant.owner, tenant.project_id, "ok", "Not A Kind")
    with pytest.raises(NotFound):
        await svc.documents.get(other_tenant.owner, "board-1")


async def row_version(svc: Services, tenant: Tenant, doc_id: str) -> str:
    async with svc.db.transaction(tenant.org_id) as conn:
        cur = await conn.execute("SELECT xmin::text AS v FROM documents WHERE org_id = %s AND id = %s",
                                 (tenant.org_id, doc_id))
        row = await cur.fetchone()
    assert row is not None
    return row["v"]


async def test_appends_are_stored_in_order_and_load_back(svc: Services, tenant: Tenant) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "b")
    before = await row_version(svc, tenant, "b")
    client = Client()
    seqs = [(await svc.documents.append(tenant.owner, "b", client.edit(f"n{i}", {"x": i}))).seq
            for i in range(20)]
    assert seqs == list(range(1, 21))
    fresh = DocumentStore(svc.db)  # another process: nothing cached, everything from the log
    state = await fresh.state(tenant.owner, "b")
    assert content(state) == {f"n{i}": {"x": float(i)} for i in range(20)}
    changes = await svc.documents.changes(tenant.owner, "b", after=15)
    assert [c.seq for c in changes] == [16, 17, 18, 19, 20]
    assert all(a.at <= b.at for a, b in zip(changes, changes[1:], strict=False))
    assert (await svc.documents.get(tenant.owner, "b")).last_seq == 20
    # Appends only insert: a row updated per commit piles up versions while any
    # transaction elsewhere stays open, and every commit then walks them.
    assert await row_version(svc, tenant, "b") == before, "an append updated the document's row"


async def test_invalid_update_is_never_stored(svc: Services, tenant: Tenant) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "b")
    for garbage in [b"\xff\xff\xff", b"garbage", b"\x01"]:
        with pytest.raises(InvalidInput):
            await svc.documents.append(tenant.owner, "b", garbage)
    assert await svc.documents.changes(tenant.owner, "b") == []
    ok = Client().edit("a", 1)
    assert (await svc.documents.append(tenant.owner, "b", ok)).seq == 1


async def test_concurrent_appends_are_group_committed(db: Database, tenant: Tenant, svc: Services) -> None:
    store = DocumentStore(db, UpdateLog(db, window=0.002, max_batch=64))
    docs = [f"d{i}" for i in range(5)]
    for d in docs:
        await store.create(tenant.owner, tenant.project_id, d)
    clients = {d: Client() for d in docs}
    payloads = [(d, clients[d].edit(f"k{i}", i)) for i in range(40) for d in docs]
    results = await asyncio.gather(*(store.append(tenant.owner, d, p) for d, p in payloads))
    await store.close()
    for d in docs:
        assert sorted(r.seq for (doc, _), r in zip(payloads, results, strict=True) if doc == d) == \
            list(range(1, 41))
        assert content(await svc.documents.state(tenant.owner, d)) == clients[d].nodes.to_py()
    async with db.transaction(tenant.org_id) as conn:
        cur = await conn.execute("SELECT count(*) AS rows, count(DISTINCT xmin::text) AS commits"
                                 " FROM doc_updates WHERE org_id = %s", (tenant.org_id,))
        stats = await cur.fetchone()
    assert stats is not None and stats["rows"] == 200
    assert stats["commits"] < 200 / 4, "appends share commits"


async def test_gateways_appending_to_one_document_share_one_dense_sequence(
        db: Database, tenant: Tenant, svc: Services) -> None:
    """Four op logs (as in four gateway processes, each with batches of its own in flight)
    append to two documents at once: the advisory lock of each document hands out its
    numbers one commit at a time, with no gap and no number twice."""
    stores = [DocumentStore(db, UpdateLog(db, max_batch=4)) for _ in range(4)]
    for d in ("shared", "also"):
        await svc.documents.create(tenant.owner, tenant.project_id, d)
    clients = {d: Client() for d in ("shared", "also")}
    jobs = [(stores[i % 4], d, clients[d].edit(f"k{i}", i)) for i in range(60) for d in clients]
    results = await asyncio.gather(*(s.append(tenant.owner, d, p) for s, d, p in jobs))
    for s in stores:
        await s.close()
    for d in clients:
        assert sorted(r.seq for (_, doc, _), r in zip(jobs, results, strict=True) if doc == d) == \
            list(range(1, 61))
        assert content(await DocumentStore(db).state(tenant.owner, d)) == clients[d].nodes.to_py()


async def test_two_batches_in_flight_never_share_a_document(db: Database, tenant: Tenant) -> None:
    """Updates submitted one after another, without waiting, over documents of which one
    takes most of them: batches commit two at a time, yet each document's updates get
    their sequence numbers in the order they were submitted, and the commit listener
    hears each document's updates in that order."""
    log = UpdateLog(db, max_batch=8)
    store = DocumentStore(db, log)
    docs = ["busy", "quiet-1", "quiet-2"]
    for d in docs:
        await store.create(tenant.owner, tenant.project_id, d)
    heard: dict[str, list[int]] = {d: [] for d in docs}
    log.committed = lambda org, doc, seq, payload, tag: heard[doc].append(tag)
    in_flight: list[set[tuple[object, str]]] = []
    peak = 0
    original = log._commit

    async def watched(groups):  # type: ignore[no-untyped-def]
        nonlocal peak
        in_flight.append(set(groups))
        peak = max(peak, len(in_flight))
        try:
            overlap = [k for batch in in_flight[:-1] for k in batch if k in groups]
            assert not overlap, f"a document in two batches at once: {overlap}"
            await asyncio.sleep(0.005)  # a slow commit, so that the next batch starts meanwhile
            return await original(groups)
        finally:
            in_flight.remove(set(groups))

    log._commit = watched  # type: ignore[method-assign]
    clients = {d: Client() for d in docs}
    futures = []
    for i in range(90):  # in rounds: a busy batch goes, then others come while it commits
        d = "busy" if i % 3 else docs[1 + (i // 3) % 2]
        futures.append((d, i, log.submit(tenant.org_id, d, clients[d].edit(f"k{i}", i), tag=i)))
        if i % 10 == 0:
            await asyncio.sleep(0.001)
    results = [(d, i, await f) for d, i, f in futures]
    await store.close()
    for d in docs:
        mine = [(i, r.seq) for doc, i, r in results if doc == d]
        assert [seq for _, seq in mine] == list(range(1, len(mine) + 1)), "in submission order, dense"
        assert heard[d] == [i for i, _ in mine]
    assert max(r.seq for d, _, r in results if d == "busy") == 60
    assert peak == 2, "a second batch went while the first was being committed"


async def test_a_backlog_is_committed_in_turns_by_org(db: Database, tenant: Tenant, other_tenant: Tenant) -> None:
    """One org's burst of updates, queued before another org's one update, does not put that
    one behind the whole burst: batches take a backlog in turns by org, each document's
    updates still in their order."""
    log = UpdateLog(db, max_batch=10)
    store = DocumentStore(db, log)
    bursts = [f"burst-{i % 30}" for i in range(90)]  # 30 documents, 3 updates each
    for doc in bursts[:30]:
        await store.create(tenant.owner, tenant.project_id, doc)
    await store.create(other_tenant.owner, other_tenant.project_id, "calm")
    heard: list[tuple[str, int]] = []
    log.committed = lambda org, doc, seq, payload, tag: heard.append((doc, seq))
    futures = [log.submit(tenant.org_id, doc, Client().edit(f"k{i}", i)) for i, doc in enumerate(bursts)]
    futures.append(log.submit(other_tenant.org_id, "calm", Client().edit("k", 1)))
    await asyncio.gather(*futures)
    await store.close()
    assert heard.index(("calm", 1)) < 2 * 10, \
        f"behind {heard.index(('calm', 1))} updates of the other org (two batches are in flight at once)"
    for doc in bursts[:30]:
        assert [seq for d, seq in heard if d == doc] == [1, 2, 3], "each document's in order"


async def test_one_commit_spans_orgs_and_skips_a_missing_document(
        db: Database, pg_url: str, tenant: Tenant, other_tenant: Tenant) -> None:
    """A batch is one doc_append call: the same document id in two orgs keeps two logs, each
    notified once; a document that is gone fails alone while the rest of the batch commits."""
    log = UpdateLog(db, window=0.05)
    store = DocumentStore(db, log)
    for t in (tenant, other_tenant):
        await store.create(t.owner, t.project_id, "same")
    a, b = Client(), Client()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as listener:
        await listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        results = await asyncio.gather(
            log.append(tenant.org_id, "same", a.edit("k", "a1")),
            log.append(other_tenant.org_id, "same", b.edit("k", "b1")),
            log.append(tenant.org_id, "never-created", a.edit("x", 1)),
            log.append(tenant.org_id, "same", a.edit("k", "a2")),
            return_exceptions=True)
        heard = []
        async for note in listener.notifies(timeout=1.0, stop_after=2):
            heard.append(note.payload)
    await store.close()
    assert [r.seq for r in results if not isinstance(r, BaseException)] == [1, 1, 2]
    assert isinstance(results[2], NotFound)
    assert sorted(heard) == sorted([f"u {tenant.org_id} 2 {log.origin} same",
                                    f"u {other_tenant.org_id} 1 {log.origin} same"])
    assert content(await store.state(tenant.owner, "same")) == {"k": "a2"}
    assert content(await store.state(other_tenant.owner, "same")) == {"k": "b1"}


async def test_commits_and_awareness_notify_only_when_another_process_listens(
        db: Database, pg_url: str, tenant: Tenant) -> None:
    """A gateway alone on the database is not sent its own notices; once another process's
    listener connects (named as a gateway names it), commits and awareness notify again."""
    async def other_listeners() -> int:
        async with db.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name LIKE 'canvasdb-listen %%'"
                " AND application_name <> %s", (LISTENER_NAME.format(origin=store.log.origin),))).fetchone()
            return row["n"]

    async def alone() -> None:  # a closed connection's backend lingers a moment in the activity
        deadline = asyncio.get_running_loop().time() + 10
        while not hub.listening or await other_listeners():
            assert asyncio.get_running_loop().time() < deadline, "another gateway is still listening"
            await asyncio.sleep(0.02)

    store = DocumentStore(db, UpdateLog(db))
    hub = Hub(store, pg_url, awareness_delay=0.01)
    await hub.start()
    try:
        await alone()  # no gateway of an earlier test left
        await store.create(tenant.owner, tenant.project_id, "lone")
        room = hub.rooms[(tenant.org_id, "lone")] = Room(tenant.org_id, "lone")
        awareness = protocol.awareness_update([(7, 1, '{"user": "ann"}')])
        writer = Client()
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as spy:
            await spy.execute(f"LISTEN {NOTIFY_CHANNEL}")
            await store.log.append(tenant.org_id, "lone", writer.edit("k", 1))
            hub.relay_awareness(room, awareness, None)
            assert [n.payload async for n in spy.notifies(timeout=0.5)] == []

            async with await psycopg.AsyncConnection.connect(
                    pg_url, autocommit=True, application_name=LISTENER_NAME.format(origin="elsewhere")):
                await store.log.append(tenant.org_id, "lone", writer.edit("k", 2))
                hub.relay_awareness(room, protocol.awareness_update([(7, 2, '{"user": "ann"}')]), None)
                heard = [n.payload async for n in spy.notifies(timeout=2.0, stop_after=2)]
            assert heard[0] == f"u {tenant.org_id} 2 {store.log.origin} lone"
            assert heard[1].startswith(f"a {tenant.org_id} ") and heard[1].endswith(f" {hub.origin} lone")

            await alone()
            await store.log.append(tenant.org_id, "lone", writer.edit("k", 3))
            assert [n.payload async for n in spy.notifies(timeout=0.5)] == []
    finally:
        await store.close()
        await hub.stop()
    assert content(await store.state(tenant.owner, "lone")) == {"k": 3}


async def test_two_stores_on_one_document_converge(db: Database, tenant: Tenant) -> None:
    a, b = DocumentStore(db), DocumentStore(db)  # as two gateway processes would
    await a.create(tenant.owner, tenant.project_id, "shared")
    ca, cb = Client(), Client()
    ca.doc.get("list", type=Array).append("from a")
    await a.append(tenant.owner, "shared", ca.updates[-1])
    cb.edit("b", "from b")
    await b.append(tenant.owner, "shared", cb.updates[-1])
    sa, sb = await a.state(tenant.owner, "shared"), await b.state(tenant.owner, "shared")
    da, db_ = Doc(), Doc()
    da.apply_update(sa)
    db_.apply_update(sb)
    assert da.get("nodes", type=Map).to_py() == db_.get("nodes", type=Map).to_py() == {"b": "from b"}
    assert da.get("list", type=Array).to_py() == ["from a"]
    await a.close()
    await b.close()


async def test_the_cache_keeps_to_its_bytes_and_its_count_is_exact(db: Database, tenant: Tenant) -> None:
    """Committed updates count against the cache as loads do: past ``cache_bytes`` the least
    recently used documents go (the one in use stays); loading and unloading leave nothing
    counted; /metrics reads the stores' counts when scraped."""
    store = DocumentStore(db, cache_bytes=16 * 1024)
    try:
        for name in ("old", "busy"):
            await store.create(tenant.owner, tenant.project_id, name)
            await store.sync(tenant.org_id, name)
        assert store.held_documents == 2
        writer = Client()
        for i in range(150):  # about 150 bytes each, as a gateway commits them
            await store.submit_checked(tenant.org_id, "busy", writer.edit(f"k{i}", "x" * 100))
        assert store.held_documents == 1  # "old" went; "busy" stays, however large
        assert content(await store.state(tenant.owner, "busy")) == {
            f"k{i}": "x" * 100 for i in range(150)}
        await store.create(tenant.owner, tenant.project_id, "small")
        await store.sync(tenant.org_id, "small")
        assert store.held_documents == 1 and store.held_bytes <= 16 * 1024  # "busy" went in turn
        for name in ("old", "small"):
            other = Client()
            for i in range(60):
                await store.append(tenant.owner, name, other.edit(f"k{i}", "y" * 100))
        for _ in range(5):  # load and unload: the count returns to nothing each time
            for name in ("old", "busy", "small"):
                await store.sync(tenant.org_id, name)
                store.unload(tenant.org_id, name)
            assert (store.held_documents, store.held_bytes) == (0, 0)
        catch_up = store._catch_up

        async def slow_for_old(key, held):  # "old" still reads the log when "busy" evicts it
            if key[1] == "old":
                await asyncio.sleep(0.2)
            await catch_up(key, held)

        store._catch_up = slow_for_old  # type: ignore[method-assign]
        await asyncio.gather(store.sync(tenant.org_id, "old"), store.sync(tenant.org_id, "busy"))
        assert store.held_bytes == sum(held.size for held in store._cache.values())
        for name in ("old", "busy", "small"):
            store.unload(tenant.org_id, name)
        assert (store.held_documents, store.held_bytes) == (0, 0)
        await store.sync(tenant.org_id, "small")
        scraped = REGISTRY.get_sample_value("canvasdb_doc_cache_bytes")
        assert scraped is not None and scraped >= store.held_bytes > 0
    finally:
        await store.close()


def pause_log_reads(store: DocumentStore) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the store's reads of the log after its copy wait: the first event is set when one
    starts, the second lets it (and those after it) go on."""
    updates_after, reading, go_on = store._updates_after, asyncio.Event(), asyncio.Event()

    async def paused(key, seq):
        reading.set()
        await go_on.wait()
        return await updates_after(key, seq)

    store._updates_after = paused  # type: ignore[method-assign]
    return reading, go_on


async def test_a_catch_up_that_a_commit_or_a_drop_meets_midway_keeps_the_count_exact(
        db: Database, tenant: Tenant) -> None:
    """A held copy changes while a catch-up reads the log (a commit of this process lands in
    it), and is dropped meanwhile (unloaded, evicted): what is counted follows each entry, so
    neither is counted twice nor taken off uncounted (the count drifted, below zero after a
    while, which lifted the cache's bound as far)."""
    store, writer = DocumentStore(db, cache_bytes=1024 * 1024), Client()
    try:
        await store.create(tenant.owner, tenant.project_id, "midway")
        for i in range(40):
            await store.append(tenant.owner, "midway", writer.edit(f"k{i}", "x" * 100))
        assert await store.compact(tenant.org_id, "midway") is not None
        store.unload(tenant.org_id, "midway")
        await store.sync(tenant.org_id, "midway")
        reading, go_on = pause_log_reads(store)
        catching_up = asyncio.create_task(store.sync(tenant.org_id, "midway"))
        await reading.wait()
        await store.submit_checked(tenant.org_id, "midway", writer.edit("during", 1))
        go_on.set()
        await catching_up
        assert store.held_bytes == sum(held.size for held in store._cache.values())

        reading.clear()
        go_on.clear()
        catching_up = asyncio.create_task(store.sync(tenant.org_id, "midway"))
        await reading.wait()
        store.unload(tenant.org_id, "midway")  # as the idle sweep, or an eviction, would
        go_on.set()
        await catching_up
        assert (store.held_documents, store.held_bytes) == (0, 0)
    finally:
        await store.close()


async def test_a_commit_during_a_catch_up_does_not_make_the_copy_start_over(
        db: Database, tenant: Tenant) -> None:
    """A commit of this process lands in the held copy while a catch-up reads the log: the
    log's first new row is then one the copy holds already, not a gap. Taken for one, the
    copy was read again from the newest snapshot, and a room one update behind sent every
    peer the whole document instead of that update."""
    store, other, writer = DocumentStore(db), DocumentStore(db), Client()
    try:
        await store.create(tenant.owner, tenant.project_id, "overlap")
        updates = [writer.edit(f"k{i}", i) for i in range(5)]
        for update in updates[:3]:
            await store.append(tenant.owner, "overlap", update)
        await store.compact(tenant.org_id, "overlap")
        for update in updates[3:]:
            await store.append(tenant.owner, "overlap", update)
        await store.sync(tenant.org_id, "overlap")  # held: the snapshot at 3, then 4 and 5
        await other.compact(tenant.org_id, "overlap")  # a newer snapshot, at 5
        updates_after = store._updates_after
        reading, go_on = pause_log_reads(store)
        catching_up = asyncio.create_task(store.sync(tenant.org_id, "overlap"))
        await reading.wait()
        last = writer.edit("k5", 5)
        await store.submit_checked(tenant.org_id, "overlap", last)
        go_on.set()
        await catching_up
        store._updates_after = updates_after  # type: ignore[method-assign]
        assert await store.updates_since(tenant.org_id, "overlap", 4) == [(5, updates[4]), (6, last)]
    finally:
        await store.close()
        await other.close()


async def test_a_catch_up_never_echoes_an_update_to_its_sender(db: Database, tenant: Tenant) -> None:
    """An update is visible in the log a moment before its commit reaches the gateway's
    listener; a catch-up in that moment (a peer joining, another gateway's notice) sends it
    to the others, never back to the client that sent it."""
    store = DocumentStore(db)
    hub = Hub(store, "")
    commit = store.log._commit

    async def slow_to_return(groups):  # committed, then a pause before the listener hears of it
        results = await commit(groups)
        await asyncio.sleep(0.3)
        return results

    store.log._commit = slow_to_return  # type: ignore[method-assign]
    try:
        await store.create(tenant.owner, tenant.project_id, "echo")
        sender, joiner = Peer(send=None, close=None), Peer(send=None, close=None)  # type: ignore[arg-type]
        room = hub.join(tenant.org_id, "echo", sender, (await store.sync(tenant.org_id, "echo")).seq)
        update = Client().edit("k", 1)
        submitted = store.submit_checked(tenant.org_id, "echo", update, tag=sender)
        room.sending[update] = sender  # as the gateway's connection does
        await asyncio.sleep(0.15)  # committed, not yet heard
        hub.join(tenant.org_id, "echo", joiner, (await store.sync(tenant.org_id, "echo")).seq)
        await submitted
        await asyncio.sleep(0.05)

        def queued(peer: Peer) -> list[bytes]:
            return [peer.queue.get_nowait() for _ in range(peer.queue.qsize())]

        assert queued(sender) == []
        assert queued(joiner) == [protocol.sync_update(update)]
        assert room.sending == {}
    finally:
        await store.close()


async def test_state_vector_diff_and_as_of(svc: Services, tenant: Tenant) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "t", "text")
    client = Client()
    await svc.documents.append(tenant.owner, "t", client.edit("a", 1))
    between = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await svc.documents.append(tenant.owner, "t", client.edit("b", 2))
    peer = Doc()
    first = Client()
    first.doc.apply_update(client.updates[0])
    missing = await svc.documents.state(tenant.owner, "t", state_vector=first.doc.get_state())
    peer.apply_update(client.updates[0])
    peer.apply_update(missing)
    assert peer.get("nodes", type=Map).to_py() == {"a": 1.0, "b": 2.0}
    assert content(await svc.documents.state(tenant.owner, "t", as_of=between)) == {"a": 1.0}
    vector = await svc.documents.state_vector(tenant.owner, "t")
    assert vector == client.doc.get_state()


async def test_viewers_read_but_do_not_write(svc: Services, tenant: Tenant) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "v")
    uid = await svc.tenancy.ensure_user(f"viewer-doc-{tenant.slug}@example.com")
    await svc.tenancy.set_org_role(tenant.org_id, uid, "member")
    viewer = Principal(tenant.org_id, uid, "member")
    with pytest.raises(NotFound):
        await svc.documents.get(viewer, "v")
    with pytest.raises(NotFound):
        await svc.documents.check_access(viewer, "v")
    with pytest.raises(NotFound):  # its access check shares the read's round trip
        await svc.documents.state_as_of(viewer, "v", datetime.now(UTC))
    with pytest.raises(NotFound):
        await svc.documents.state_as_of(tenant.owner, "no-such-doc", datetime.now(UTC))
    await svc.tenancy.set_project_role(tenant.owner, tenant.project_id, uid, "viewer")
    assert (await svc.documents.get(viewer, "v")).id == "v"
    assert (await svc.documents.state_as_of(viewer, "v", datetime.now(UTC))).exact
    await svc.documents.check_access(viewer, "v")
    with pytest.raises(Forbidden):
        await svc.documents.check_access(viewer, "v", write=True)
    with pytest.raises(Forbidden):
        await svc.documents.append(viewer, "v", Client().edit("x", 1))
    assert await svc.documents.changes(tenant.owner, "v") == []


async def test_http_round_trip(client: httpx.AsyncClient, tenant: Tenant) -> None:
    h = tenant.headers
    base = f"/v1/orgs/{tenant.slug}"
    r = await client.post(f"{base}/projects/main/docs", headers=h, json={"id": "board-42", "kind": "board"})
    assert r.status_code == 201 and r.json()["last_seq"] == 0
    yc = Client()
    for i in range(3):
        r = await client.post(f"{base}/docs/board-42/updates", headers=h, content=yc.edit(f"n{i}", i),
                              )
        assert r.status_code == 201 and r.json()["seq"] == i + 1
    bad = await client.post(f"{base}/docs/board-42/updates", headers=h, content=b"\xff\xfe")
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    state = await client.get(f"{base}/docs/board-42/state", headers=h)
    assert state.headers["content-type"] == "application/octet-stream"
    assert content(state.content) == {"n0": 0.0, "n1": 1.0, "n2": 2.0}
    sv = base64.b64encode(yc.doc.get_state()).decode()
    assert len((await client.get(f"{base}/docs/board-42/state", headers=h,
                                 params={"state_vector": sv})).content) <= 2
    assert (await client.get(f"{base}/docs/board-42/state", headers=h,
                             params={"state_vector": "!!"})).status_code == 422
    # base64 as URLs carry it: URL-safe, unpadded, or a "+" sent raw (read as a space)
    vector = next(v for extra in range(1, 10_000)
                  if {"+", "/", "="} <= set(v := base64.b64encode(yjs.write_state_vector(
                      {**yjs.read_state_vector(yc.doc.get_state()), extra: 2**40 - extra})).decode()))
    for form in (vector, vector.replace("+", "-").replace("/", "_").rstrip("="), vector.replace("/", "%2F")):
        answer = await client.get(f"{base}/docs/board-42/state?state_vector={form}", headers=h)
        assert answer.status_code == 200 and len(answer.content) <= 2, (form, answer.text)
    changes = (await client.get(f"{base}/docs/board-42/changes", headers=h, params={"limit": 2})).json()
    assert [c["seq"] for c in changes["items"]] == [1, 2] and changes["next"] == "2"
    rest = (await client.get(f"{base}/docs/board-42/changes", headers=h, params={"after": 2, "limit": 1})).json()
    assert [c["seq"] for c in rest["items"]] == [3] and rest["next"] is None, "the last page says so"
    assert {c["client_id"] for c in changes["items"]} == {yc.doc.client_id}, "the Yjs client that wrote"
    meta = (await client.get(f"{base}/docs/board-42", headers=h)).json()
    assert meta["last_seq"] == 3
    assert (await client.get(f"{base}/docs/nope", headers=h)).status_code == 404
    assert (await client.post(f"{base}/docs/board-42/updates", headers=h, content=b"")).status_code == 422


async def test_http_updates_are_limited_by_the_update_limit(client: httpx.AsyncClient, settings: Settings,
                                                            tenant: Tenant) -> None:
    """CANVASDB_MAX_UPDATE_BYTES, not the JSON bodies' limit (4 x max_data_bytes + 64 KiB),
    bounds an update sent over HTTP, as it does over the gateway."""
    h, base = tenant.headers, f"/v1/orgs/{tenant.slug}"
    json_limit = 4 * settings.max_data_bytes + 64 * 1024
    assert json_limit < settings.max_update_bytes
    await client.post(f"{base}/projects/main/docs", headers=h, json={"id": "big-updates"})
    fits = Client().edit("text", "x" * (json_limit + 1000))
    assert json_limit < len(fits) <= settings.max_update_bytes
    r = await client.post(f"{base}/docs/big-updates/updates", headers=h, content=fits)
    assert r.status_code == 201, r.text
    over = Client().edit("text", "y" * settings.max_update_bytes)
    r = await client.post(f"{base}/docs/big-updates/updates", headers=h, content=over)
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["limit"] == settings.max_update_bytes, "the limit is the setting's, to the byte"
    one_over = (await client.post(f"{base}/docs/big-updates/updates", headers=h,
                                  content=b"\0" * (settings.max_update_bytes + 1))).json()
    assert one_over["status"] == 413 and one_over["limit"] == settings.max_update_bytes
    assert [c["seq"] for c in (await client.get(f"{base}/docs/big-updates/changes", headers=h)).json()["items"]] == [1]


async def test_a_streamed_update_over_the_limit_or_cut_short_is_a_client_error(
        client: httpx.AsyncClient, settings: Settings, tenant: Tenant, caplog: pytest.LogCaptureFixture) -> None:
    """Chunked (no Content-Length), an update over the limit was cut off as a disconnect by the
    body guard, and its reading then failed with a 500 and two tracebacks; so did a client
    that left in the middle of its body."""
    h, base = tenant.headers, f"/v1/orgs/{tenant.slug}"
    await client.post(f"{base}/projects/main/docs", headers=h, json={"id": "streamed"})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(settings.max_update_bytes // 65536 + 2):
            yield b"\0" * 65536

    r = await client.post(f"{base}/docs/streamed/updates", headers=h, content=chunks())
    assert "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["limit"] == settings.max_update_bytes, r.text

    sent: list[dict] = []
    parts = iter([{"type": "http.request", "body": b"\0" * 100, "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(parts)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": f"{base}/docs/streamed/updates", "raw_path": b"", "query_string": b"",
             "root_path": "", "server": ("canvasdb.test", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"authorization", f"Bearer {tenant.token}".encode()), (b"content-length", b"1000")]}
    with caplog.at_level("WARNING"):
        await client._transport.app(scope, receive, send)  # type: ignore[attr-defined]
    assert sent[0]["status"] == 400
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], "no traceback"
    assert (await client.get(f"{base}/docs/streamed/changes", headers=h)).json()["items"] == []


async def test_compaction_is_asked_for_at_most_every_interval(svc: Services, tenant: Tenant) -> None:
    asked: list[str] = []

    async def due(org_id: object, doc_id: str) -> None:
        asked.append(doc_id)

    client = Client()
    for every, doc_id in ((60.0, "asks-once"), (0.0, "asks-each-time")):
        store = DocumentStore(svc.db, compact_after_updates=2, compaction_due=due, compaction_every=every)
        await store.create(tenant.owner, tenant.project_id, doc_id)
        for i in range(10):
            await store.append(tenant.owner, doc_id, client.edit(f"{doc_id}-{i}", i))
        await store.close()
    assert asked.count("asks-once") == 1, "a request still waiting was asked for again"
    assert asked.count("asks-each-time") == 5


async def test_compaction_counts_updates_from_the_snapshot_across_unloads(svc: Services, tenant: Tenant) -> None:
    """A board whose clients come and go is unloaded after each idle spell (the gateway's sweep);
    the count toward an early compaction began again at each load, so a board reopened every
    few minutes went on growing its tail (and every new client's sync) until the hourly pass."""
    asked: list[str] = []

    async def due(org_id: object, doc_id: str) -> None:
        asked.append(doc_id)

    store = DocumentStore(svc.db, compact_after_updates=4, compaction_due=due)
    await store.create(tenant.owner, tenant.project_id, "reopened")
    client = Client()
    for i in range(6):  # three updates per visit, two visits: no visit alone reaches four
        await store.append(tenant.owner, "reopened", client.edit(f"k{i}", i))
        if i % 3 == 2:
            store.unload(tenant.org_id, "reopened")
            await store.sync(tenant.org_id, "reopened")  # the next client's connection loads it
    await store.close()
    assert asked == ["reopened"]


@pytest.mark.parametrize("threshold", ["updates", "bytes"])
async def test_compaction_counts_every_process_updates(svc: Services, tenant: Tenant, threshold: str) -> None:
    """Two gateways serving one board, each appending half of the threshold: each counted only
    its own updates, so neither asked (N gateways: N times the threshold). Every update past
    the snapshot counts, and only the process whose update crosses the threshold asks."""
    client = Client()
    made = [client.edit(f"k{i}", i) for i in range(8)]
    asked: list[str] = []

    def asker(name: str) -> Callable[[object, str], Awaitable[None]]:
        async def due(org_id: object, doc_id: str) -> None:
            asked.append(name)
        return due

    limits = ({"compact_after_updates": 4} if threshold == "updates"
              else {"compact_after_updates": 1000, "compact_after_bytes": sum(map(len, made[:4]))})
    a, b = (DocumentStore(svc.db, compaction_due=asker(name), compaction_every=0.0, **limits)
            for name in ("a", "b"))
    await a.create(tenant.owner, tenant.project_id, "shared")
    for store in (a, b):  # each gateway's first client loads the board
        await store.sync(tenant.org_id, "shared")
    for round_ in range(2):
        for store, pair in ((a, made[4 * round_:4 * round_ + 2]), (b, made[4 * round_ + 2:4 * round_ + 4])):
            await store.sync(tenant.org_id, "shared")  # the other's updates, as the hub's catch-up reads them
            for update in pair:
                await store.append(tenant.owner, "shared", update)
        assert asked == ["b"] * (round_ + 1), "asked once per threshold, by the process that crossed it"
    await a.close()
    await b.close()


async def test_a_batch_whose_reply_is_lost_is_never_written_twice(db: Database, tenant: Tenant) -> None:
    """The connection breaks after the commit, before its reply: the batch may be stored, so it
    is not written again document by document (that stored each update twice); its callers
    hear of the failure."""
    store = DocumentStore(db)
    log = store.log
    for doc in ("lost-1", "lost-2"):
        await store.create(tenant.owner, tenant.project_id, doc)
    commit = log._commit
    calls = 0

    async def reply_lost(groups):
        nonlocal calls
        results = await commit(groups)
        calls += 1
        if calls == 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return results

    log._commit = reply_lost  # type: ignore[method-assign]
    a, b = Client().edit("k", 1), Client().edit("k", 2)
    outcomes = await asyncio.gather(log.submit(tenant.org_id, "lost-1", a), log.submit(tenant.org_id, "lost-2", b),
                                    return_exceptions=True)
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
    for doc in ("lost-1", "lost-2"):
        assert [c.seq for c in await store.changes(tenant.owner, doc)] == [1], "stored once"
    await store.close()


async def test_a_cancelled_close_strands_no_caller(db: Database, tenant: Tenant) -> None:
    store = DocumentStore(db)
    log = store.log
    await store.create(tenant.owner, tenant.project_id, "closing")
    commit = log._commit

    async def slow(groups):
        await asyncio.sleep(0.2)
        return await commit(groups)

    log._commit = slow  # type: ignore[method-assign]
    writer = Client()
    waiting = [log.submit(tenant.org_id, "closing", writer.edit(f"k{i}", i)) for i in range(50)]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(log.close(), 0.05)
    done, pending = await asyncio.wait(waiting, timeout=5)
    assert not pending, "every caller hears how its update ended"
    stored = {c.seq for c in await store.changes(tenant.owner, "closing", limit=100)}
    acknowledged = {f.result().seq for f in done if not f.cancelled() and f.exception() is None}
    assert acknowledged <= stored
    await log.close()
