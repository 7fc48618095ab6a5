"""A deployment of the last release, populated, upgrades to this code and reads and writes alike.

The other tests migrate an empty database. Here a database is migrated to the release's last
migration only, filled the way the release's code wrote (its SQL statements and the 0024
schema's functions, as the application's role under row-level security), then the newer
migrations are applied over the rows, and today's code reads what the release wrote and
writes every kind of change over it.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg.types.json import Jsonb
from pycrdt import Doc, Map, merge_updates

from canvasdb.db import Database, migrate
from canvasdb.db.migrate import available
from canvasdb.entities.types import EntityType
from canvasdb.errors import InvalidInput
from canvasdb.search.embedders import make_embedder
from canvasdb.services import Services
from canvasdb.settings import Settings
from canvasdb.tenancy import Principal

RELEASED = 24  # the release this upgrades from (0.1.0) shipped migrations 0001-0024
KEYFRAMES = 4  # the keyframe interval the release wrote with
CARD_TITLES = ["Ship the payment gateway", "Design the onboarding screens", "Plan the database upgrade"]

# The release's own statements (entities/store.py, graph/relationships.py, search/indexer.py, ...).
_CREATE_ENTITY = """
WITH e AS (
    INSERT INTO entities (org_id, id, project_id, type, data, version, keyframe_version, deleted,
                          created_at, updated_at, created_by, updated_by)
    SELECT %(org)s, %(id)s, %(project)s, %(type)s, %(data)s, 1, 1, false, now.t, now.t, %(actor)s, %(actor)s
    FROM (SELECT clock_timestamp() AS t) now
    RETURNING *
), v AS (
    INSERT INTO entity_versions (org_id, entity_id, version, op, at, actor, deleted, keyframe)
    SELECT org_id, id, 1, 'create', created_at, created_by, false, data FROM e
)
SELECT id FROM e
"""
_CHANGE_ENTITY = ("SELECT outcome FROM entity_change(%(org)s, %(id)s, %(actor)s, true, %(op)s, %(value)s,"
                  " NULL, NULL, %(keyframes)s, 1048576)")
_STORE_VECTOR = ("INSERT INTO search_vectors (org_id, model, entity_id, project_id, type, embed_md5, embedding)"
                 " SELECT org_id, %(model)s, entity_id, project_id, type, embed_md5, %(vector)s::halfvec"
                 " FROM search_docs WHERE org_id = %(org)s AND entity_id = %(id)s")


@dataclass
class Release:
    """What the release wrote, and moments between its writes (as-of reads)."""

    url: str
    org: UUID = field(default_factory=uuid.uuid4)
    owner: UUID = field(default_factory=uuid.uuid4)
    project: UUID = field(default_factory=uuid.uuid4)
    cards: list[UUID] = field(default_factory=list)
    gone: UUID = field(default_factory=uuid.uuid4)  # deleted, depends on cards[2]
    relates: UUID = field(default_factory=uuid.uuid4)  # cards[0] -> cards[2], made through the API
    moments: dict[str, datetime] = field(default_factory=dict)
    blob: bytes = b"an attachment the release stored"

    @property
    def who(self) -> Principal:
        return Principal(org_id=self.org, user_id=self.owner, org_role="owner")


@pytest.fixture
def release_db(fresh_db: str) -> str:
    """A database with the release's migrations only."""
    done = migrate(fresh_db, migrations=[m for m in available() if m.version <= RELEASED])
    assert done[-1].version == RELEASED
    return fresh_db


def doc_update(doc: Doc, **nodes: dict[str, Any]) -> bytes:
    """The update that sets these nodes of ``doc``."""
    before = doc.get_state()
    for key, node in nodes.items():
        doc.get("nodes", type=Map)[key] = Map(node)
    return doc.get_update(before)


def populate(rel: Release, blobs_dir: Path, vectors: dict[str, list[float]]) -> None:
    """Write as the release did: each call below is one of its transactions."""
    with psycopg.connect(rel.url, autocommit=True) as conn:
        def tx(sql: str, params: dict[str, Any] | None = None) -> Any:
            with conn.transaction():
                conn.execute("SET LOCAL ROLE canvasdb_app")
                conn.execute("SELECT set_config('canvasdb.org_id', %s, true)", (str(rel.org),))
                cur = conn.execute(sql, params)
                return cur.fetchall() if cur.description else None

        def now(name: str) -> None:
            rel.moments[name] = conn.execute("SELECT clock_timestamp()").fetchone()[0]

        def change(entity: UUID, op: str, value: dict[str, Any] | None = None) -> None:
            assert tx(_CHANGE_ENTITY, {"org": rel.org, "id": entity, "actor": rel.owner, "op": op,
                                       "value": None if value is None else Jsonb(value),
                                       "keyframes": KEYFRAMES}) == [("done",)]

        ids = {"org": rel.org, "owner": rel.owner, "project": rel.project}
        tx("INSERT INTO users (id, email, name) VALUES (%(owner)s, 'owner@release.test', 'Owner')", ids)
        tx("INSERT INTO orgs (id, slug, name) VALUES (%(org)s, 'release', 'Release')", ids)
        tx("INSERT INTO org_members (org_id, user_id, role) VALUES (%(org)s, %(owner)s, 'owner')", ids)
        tx("INSERT INTO projects (org_id, id, slug, name, created_by)"
           " VALUES (%(org)s, %(project)s, 'main', 'Main', %(owner)s)", ids)
        tx("INSERT INTO entity_types (org_id, name, module, text_fields, reference_fields, embed_fields,"
           " acyclic_kinds) VALUES (%(org)s, 'kanban.card', 'kanban', '{\"title\": \"A\"}',"
           " '[\"$.depends_on[*]\"]', '[\"title\"]', '[\"depends_on\"]')", ids)
        for title in CARD_TITLES:
            rel.cards.append(tx(_CREATE_ENTITY, {**ids, "id": uuid.uuid4(), "type": "kanban.card",
                                                 "data": Jsonb({"title": title}), "actor": rel.owner})[0][0])
        a, b, c = rel.cards
        tx(_CREATE_ENTITY, {**ids, "id": rel.gone, "type": "kanban.card", "actor": rel.owner,
                            "data": Jsonb({"title": "Old idea", "depends_on": [str(c)]})})
        change(a, "merge", {"depends_on": [str(b)]})
        change(b, "merge", {"depends_on": [str(c)]})
        now("chained")
        for n in range(6):  # past a keyframe
            change(c, "merge", {"estimate": n})
        now("estimated")
        change(rel.gone, "delete")
        change(b, "delete")
        change(b, "undelete")
        tx("INSERT INTO relationships (org_id, id, src, dst, kind, data, src_project, dst_project, created_by,"
           " updated_by) VALUES (%(org)s, %(rel)s, %(a)s, %(c)s, 'relates_to', '{\"label\": \"see\"}',"
           " %(project)s, %(project)s, %(owner)s, %(owner)s)", {**ids, "rel": rel.relates, "a": a, "c": c})
        tx("UPDATE relationships SET data = '{\"label\": \"see also\"}', updated_by = %(owner)s"
           " WHERE org_id = %(org)s AND id = %(rel)s", {**ids, "rel": rel.relates})
        now("related")

        doc = Doc()
        updates = [doc_update(doc, n1={"text": "car"}), doc_update(doc, n2={"text": "road"})]
        tx("INSERT INTO documents (org_id, id, project_id, kind, created_by)"
           " VALUES (%(org)s, 'doc-1', %(project)s, 'text', %(owner)s)", ids)
        append = ("SELECT seq, at FROM doc_append(ARRAY[%(org)s]::uuid[], ARRAY['doc-1'], ARRAY[1],"
                  " ARRAY[%(update)s]::bytea[], ARRAY[%(owner)s]::uuid[], ARRAY[NULL]::bigint[], 'release')")
        for update in updates:
            seq, at = tx(append, {**ids, "update": update})[0]
        merged = merge_updates(*updates)
        tx("INSERT INTO doc_snapshots (org_id, doc_id, seq, state, blob_sha256, size, at, state_vector)"
           " VALUES (%(org)s, 'doc-1', %(seq)s, %(state)s, NULL, %(size)s, %(at)s, %(sv)s)",
           {**ids, "seq": seq, "state": merged, "size": len(merged), "at": at, "sv": doc.get_state()})
        now("drawn")
        updates.append(doc_update(doc, n1={"text": "fast car"}))
        tx(append, {**ids, "update": updates[-1]})

        sha = hashlib.sha256(rel.blob).hexdigest()
        (blobs_dir / sha[:2]).mkdir(parents=True)
        (blobs_dir / sha[:2] / sha).write_bytes(rel.blob)
        tx("INSERT INTO attachments (sha256, size, content_type, created_by, org_id, key)"
           " VALUES (%(sha)s, %(size)s, 'text/plain', %(owner)s, %(org)s, 'notes/a.txt')",
           {**ids, "sha": sha, "size": len(rel.blob)})

        tx("INSERT INTO search_models (model, kind, url, dimension, state, activated_at)"
           " VALUES ('all-MiniLM-L6-v2', 'local', NULL, 384, 'active', now())")
        tx("SELECT search_model_index('all-MiniLM-L6-v2', 384)")
        for entity, title in zip(rel.cards, CARD_TITLES, strict=True):
            tx(_STORE_VECTOR, {"org": rel.org, "id": entity, "model": "all-MiniLM-L6-v2",
                               "vector": str(vectors[title])})
        tx("UPDATE search_queue SET embed_md5 = NULL WHERE org_id = %(org)s", ids)


@pytest.fixture
async def upgraded(release_db: str, tmp_path: Path) -> AsyncIterator[tuple[Release, Services]]:
    """The release's database, populated, then migrated to this code; its services."""
    embedder = make_embedder("local")
    vectors = dict(zip(CARD_TITLES, (await embedder.embed(CARD_TITLES)).tolist(), strict=True))
    rel = Release(release_db)
    await asyncio.to_thread(populate, rel, tmp_path / "blobs", vectors)
    assert [m.version for m in migrate(release_db)] == [m.version for m in available() if m.version > RELEASED]
    settings = Settings(home=tmp_path, database_url=release_db, blobs_dir=tmp_path / "blobs",
                        keyframe_interval=KEYFRAMES)
    async with Database(release_db, min_size=1, max_size=4) as db:
        svc = Services.build(settings, db, embedder=embedder)
        try:
            yield rel, svc
        finally:
            await svc.close()


def doc_nodes(update: bytes) -> dict[str, Any]:
    doc = Doc()
    doc.apply_update(update)
    return doc.get("nodes", type=Map).to_py()


async def out_of(svc: Services, who: Principal, entity: UUID) -> set[tuple[str, UUID]]:
    found, _ = await svc.relationships.list(who, entity=entity, direction="out")
    return {(r.kind, r.dst) for r in found}


async def test_what_the_release_wrote_reads_alike_after_the_upgrade(upgraded: tuple[Release, Services]) -> None:
    """Entities and their history, as-of reads of moments the release stamped, references and
    relationships, the graph, a document (snapshot and log), an attachment, search by words and
    by the vectors the release stored."""
    rel, svc = upgraded
    who, (a, b, c) = rel.who, rel.cards
    assert (await svc.entities.get(who, c)).data == {"title": CARD_TITLES[2], "estimate": 5}
    assert (await svc.entities.get(who, c, as_of=rel.moments["chained"])).data == {"title": CARD_TITLES[2]}
    assert [(await svc.entities.get(who, c, as_of=v)).data.get("estimate") for v in range(1, 8)] \
        == [None, 0, 1, 2, 3, 4, 5]
    history = await svc.entities.history(who, b)
    assert [v.op for v in history.items] == ["undelete", "delete", "update", "create"]
    assert await svc.entities.diff(who, a, 1, 2) == [
        {"op": "add", "path": "/depends_on", "value": [str(b)]}]

    assert await out_of(svc, who, a) == {("depends_on", b), ("relates_to", c)}
    assert await out_of(svc, who, rel.gone) == set()  # hidden with its deleted source
    dependents = await svc.graph.dependents(who, c, kinds=["depends_on"])
    assert {n["id"] for n in dependents["nodes"]} == {str(a), str(b)}
    past = await svc.graph.neighbors(who, a, depth=2, as_of=rel.moments["chained"])
    assert {n["id"] for n in past["nodes"]} == {str(b), str(c)}
    assert (await svc.relationships.get(who, rel.relates)).data == {"label": "see also"}
    assert [v["version"] for v in await svc.relationships.history(who, rel.relates)] == [1, 2]

    assert doc_nodes(await svc.documents.state(who, "doc-1")) == {"n1": {"text": "fast car"},
                                                                      "n2": {"text": "road"}}
    then = await svc.documents.state_as_of(who, "doc-1", rel.moments["drawn"])
    assert then.exact and doc_nodes(then.update) == {"n1": {"text": "car"}, "n2": {"text": "road"}}
    assert [ch.seq for ch in await svc.documents.changes(who, "doc-1")] == [1, 2, 3]

    _, reader = await svc.attachments.open(who, await svc.attachments.get(who, "notes/a.txt"))
    async with reader:
        assert b"".join([chunk async for chunk in reader]) == rel.blob

    await svc.indexer.drain(rel.org)  # the words the release left queued; no vector is missing
    meaning = await svc.search.search(who, "payments checkout", mode="semantic")
    assert meaning.hits[0].id == a and not meaning.degraded
    assert [h.id for h in (await svc.search.search(who, "onboarding", mode="text")).hits] == [b]


async def test_every_kind_of_write_works_after_the_upgrade(upgraded: tuple[Release, Services]) -> None:
    """References of an acyclic kind (a cycle through the release's edges refused), an undeletion of
    what the release deleted, restores, relationship versions, a document edit and its compaction,
    a type re-declared and its entities indexed again."""
    rel, svc = upgraded
    who, (a, b, c) = rel.who, rel.cards
    new = (await svc.entities.create(who, rel.project, "kanban.card",
                                     {"title": "Check the upgrade", "depends_on": [str(a)]})).id
    assert await out_of(svc, who, new) == {("depends_on", a)}
    with pytest.raises(InvalidInput, match="cycle"):  # through edges the release made
        await svc.entities.patch(who, c, {"depends_on": [str(new)]})

    await svc.entities.undelete(who, rel.gone)  # deleted by the release: its reference comes back
    assert await out_of(svc, who, rel.gone) == {("depends_on", c)}
    restored = await svc.entities.restore(who, a, 1)
    assert restored.data == {"title": CARD_TITLES[0]} and await out_of(svc, who, a) == {("relates_to", c)}
    await svc.entities.restore(who, a, 2)
    assert ("depends_on", b) in await out_of(svc, who, a)

    changed = await svc.relationships.update(who, rel.relates, {"label": "after"}, if_version=2)
    assert changed.version == 3
    await svc.relationships.delete(who, rel.relates)
    await svc.relationships.undelete(who, rel.relates)

    doc = Doc()
    doc.apply_update(await svc.documents.state(who, "doc-1"))
    await svc.documents.append(who, "doc-1", doc_update(doc, n3={"t": 1}))
    assert set(doc_nodes(await svc.documents.state(who, "doc-1"))) == {"n1", "n2", "n3"}
    assert await svc.documents.compact(rel.org, "doc-1") is not None

    await svc.types.register(who, EntityType(name="kanban.card", module="kanban",
                                             text_fields={"title": "A", "note": "B"},
                                             reference_fields=["$.depends_on[*]"], embed_fields=["title"],
                                             acyclic_kinds=["depends_on"]))
    await svc.entities.patch(who, b, {"note": "quarterly review"})
    await svc.indexer.drain(rel.org)
    assert [h.id for h in (await svc.search.search(who, "quarterly", mode="text")).hits] == [b]
    meaning = await svc.search.search(who, "verify the upgrade", mode="semantic")
    assert meaning.hits[0].id == new
