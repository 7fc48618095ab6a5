"""Boards projected into entities, and entity edits applied back to boards.

A board document holds a Y.Map ``nodes`` and a Y.Map ``edges``, each keyed by id.
Each node and edge becomes an entity (``board.node``, ``board.edge``) in the board's
project, with history like any other, whose id is derived from the document and the
key (UUIDv5), so projecting twice writes nothing new. An edge whose ``from`` and ``to``
name nodes of the board is also a graph relationship of kind ``board.edge`` between
the two node entities (origin ``board``; its id is derived from the edge and its ends).
The projection runs after the updates are committed (a job, deferred on change, and
the hourly pass), remembers
how far it got (``documents.projected_seq``) and so resumes after a crash. An edit
of such an entity through the API is written into the board as a Yjs change, which
the projection then finds already in place.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb
from pycrdt import Map

from canvasdb import metrics
from canvasdb.documents.store import DocumentStore
from canvasdb.entities import Entity, EntityStore
from canvasdb.errors import CanvasdbError, InvalidInput, NotFound
from canvasdb.tenancy import Principal

log = logging.getLogger("canvasdb.projection")
NAMESPACE = uuid.UUID("5f0e3c2a-8d0b-4c7e-9a43-6b2f1d9e7c10")
# What search reads of a board node, unless the org declared ``board.node`` itself.
BOARD_NODE_SEARCH = {"text_fields": {"title": "A", "text": "B", "label": "B"}, "tag_field": "tags"}
COLLECTIONS = {"nodes": "board.node", "edges": "board.edge"}
_OWN_FIELDS = ("doc", "key")  # added to the entity's data: which board, which key


def _edge_id(doc_id: str, key: str, src: object, dst: object) -> UUID:
    """The id of the relationship that mirrors edge ``key`` between two node keys."""
    return uuid.uuid5(NAMESPACE, f"{doc_id}\x00edge\x00{key}\x00{src}\x00{dst}")


def entity_id(doc_id: str, collection: str, key: str) -> UUID:
    """The id of the entity that mirrors ``collection[key]`` of a board (stable forever)."""
    return uuid.uuid5(NAMESPACE, f"{doc_id}\x00{collection}\x00{key}")


class BoardProjection:
    def __init__(self, documents: DocumentStore, entities: EntityStore) -> None:
        self.documents = documents
        self.entities = entities
        self._declared: set[UUID] = set()  # orgs known to have a board.node declaration

    async def _declare_node_type(self, org_id: UUID) -> None:
        """Declare ``board.node``'s text fields once per org, so board nodes are searchable."""
        if org_id in self._declared:
            return
        async with self.documents.db.transaction(org_id) as conn:
            await conn.execute(
                "INSERT INTO entity_types (org_id, name, module, text_fields, tag_field)"
                " VALUES (%s, 'board.node', 'board', %s, %s) ON CONFLICT (org_id, name) DO NOTHING",
                (org_id, Jsonb(BOARD_NODE_SEARCH["text_fields"]), BOARD_NODE_SEARCH["tag_field"]))
        self._declared.add(org_id)

    async def project(self, org_id: UUID, doc_id: str, *, wait: bool = True) -> int:
        """Bring the board's entities up to date with its log; returns how many were written.

        One projection of a board at a time, in any process (the hourly pass and a worker's
        job may meet): both would create its new nodes, and one of them fail on each. Without
        ``wait``, a board being projected now is left to that run (0)."""
        async with self.documents.db.taking_turns(f"project {org_id} {doc_id}", wait=wait) as mine:
            return await self._project(org_id, doc_id) if mine else 0

    async def _project(self, org_id: UUID, doc_id: str) -> int:
        system = Principal(org_id=org_id, user_id=None, org_role="owner")
        async with self.documents.db.transaction(org_id) as conn:
            cur = await conn.execute(
                "SELECT kind, project_id, doc_last_seq(org_id, id) AS last_seq, projected_seq FROM documents"
                " WHERE org_id = %s AND id = %s", (org_id, doc_id))
            meta = await cur.fetchone()
        if meta is None or meta["kind"] != "board" or meta["projected_seq"] >= meta["last_seq"]:
            return 0
        await self._declare_node_type(org_id)
        async with self.documents.db.transaction(org_id) as conn:
            cur = await conn.execute(
                "SELECT clock_timestamp() - at AS waited FROM doc_updates WHERE org_id = %s"
                " AND doc_id = %s AND seq > %s ORDER BY seq LIMIT 1",
                (org_id, doc_id, meta["projected_seq"]))
            oldest = await cur.fetchone()
        if oldest is not None:
            metrics.PROJECTION_LAG_SECONDS.observe(oldest["waited"].total_seconds())
        loaded = await self.documents.loaded(org_id, doc_id)
        async with loaded.lock:
            seq = loaded.doc_seq
            wanted = {(name, key): _plain(value)
                      for name in COLLECTIONS
                      for key, value in loaded.doc.get(name, type=Map).items()}
        current = await self._projected(org_id, doc_id, meta["project_id"])
        current_edges = [e.data for e in current.values() if e.type == "board.edge" and not e.deleted]
        written = 0
        for (name, key), value in wanted.items():
            data = {**value, "doc": doc_id, "key": key}
            eid = entity_id(doc_id, name, key)
            existing = current.pop(eid, None)
            try:
                if existing is None:
                    await self.entities.create(system, meta["project_id"], COLLECTIONS[name], data, id=eid)
                elif existing.deleted:
                    await self.entities.undelete(system, eid)
                    await self.entities.replace(system, eid, data)
                elif existing.data != data:
                    await self.entities.replace(system, eid, data)
                else:
                    continue
            except CanvasdbError as exc:  # one bad node (NUL, too large, an id taken) stops no other
                log.warning("board %s: %s %r not projected: %s", doc_id, name, key, exc.detail)
                metrics.PROJECTION_SKIPPED.inc()
                continue
            written += 1
        for eid, gone in current.items():
            if not gone.deleted:
                await self.entities.delete(system, eid)  # a tombstone version
                written += 1
        await self._edges(org_id, doc_id, meta["project_id"], wanted, current_edges)
        metrics.PROJECTED_ENTITIES.inc(written)
        async with self.documents.db.transaction(org_id) as conn:
            await conn.execute("UPDATE documents SET projected_seq = greatest(projected_seq, %s)"
                               " WHERE org_id = %s AND id = %s", (seq, org_id, doc_id))
        return written

    async def _edges(self, org_id: UUID, doc_id: str, project_id: UUID,
                     wanted: dict[tuple[str, str], dict[str, Any]], before: list[dict[str, Any]]) -> None:
        """Keep the board's ``board.edge`` relationships in step with its edges (after the node
        entities are written): create or bring back the wanted ones, delete the others."""
        nodes = {key for name, key in wanted if name == "nodes"}
        keep: dict[UUID, tuple[UUID, UUID, dict[str, Any]]] = {}
        for (name, key), value in wanted.items():
            src, dst = value.get("from"), value.get("to")
            if name == "edges" and isinstance(src, str) and isinstance(dst, str) and {src, dst} <= nodes:
                data = {k: v for k, v in value.items() if k not in ("from", "to")}
                keep[_edge_id(doc_id, key, src, dst)] = (entity_id(doc_id, "nodes", src),
                                                         entity_id(doc_id, "nodes", dst), data)
        stale = [_edge_id(doc_id, e["key"], e.get("from"), e.get("to")) for e in before if "key" in e]
        async with self.documents.db.transaction(org_id) as conn:
            # The ends locked FOR KEY SHARE to the commit, as every maker of relationships does
            # (migration 0018): a node entity deleted meanwhile (through the API) is seen
            # deleted here, or its deletion waits and then hides these edges.
            ends = sorted({end for src_id, dst_id, _ in keep.values() for end in (src_id, dst_id)})
            # Only the board's own node entities: an entity elsewhere that took a node's id
            # (ids are derived from the board and the key) is no end of the board's edges.
            alive = {r["id"]: not r["deleted"] for r in await (await conn.execute(
                "SELECT id, deleted FROM entities WHERE org_id = %s AND id = ANY(%s) AND project_id = %s"
                " AND type = 'board.node' AND board_doc = %s ORDER BY id FOR KEY SHARE",
                (org_id, ends, project_id, doc_id))).fetchall()}
            for rid, (src_id, dst_id, data) in keep.items():
                if src_id not in alive or dst_id not in alive:
                    continue
                # Only the board's own edge is updated: a relationship made through the API with
                # the edge's id (derived from the board and its keys, so it can be guessed) would
                # have received the board's data and come back if deleted, for its maker to read.
                await conn.execute(
                    "INSERT INTO relationships (org_id, id, src, dst, kind, data, src_project, dst_project,"
                    " origin, end_deleted) VALUES (%s, %s, %s, %s, 'board.edge', %s, %s, %s, 'board', %s)"
                    " ON CONFLICT (org_id, id) DO UPDATE SET data = EXCLUDED.data, deleted = false,"
                    " end_deleted = EXCLUDED.end_deleted WHERE relationships.origin = 'board'",
                    (org_id, rid, src_id, dst_id, Jsonb(data), project_id, project_id,
                     not (alive[src_id] and alive[dst_id])))
            await conn.execute(
                "UPDATE relationships SET deleted = true WHERE org_id = %s AND id = ANY(%s)"
                " AND origin = 'board' AND NOT deleted AND NOT id = ANY(%s)",
                (org_id, stale, list(keep)))

    async def _projected(self, org_id: UUID, doc_id: str, project_id: UUID) -> dict[UUID, Entity]:
        from canvasdb.entities.store import _entity

        async with self.documents.db.transaction(org_id) as conn:
            # Only the board's own: its project, its two types (an entity of another project
            # may name the board in its data, and take the id of one of its nodes).
            cur = await conn.execute(
                "SELECT * FROM entities WHERE org_id = %s AND board_doc = %s AND project_id = %s"
                " AND type = ANY(%s)", (org_id, doc_id, project_id, list(COLLECTIONS.values())))
            return {row["id"]: _entity(row) for row in await cur.fetchall()}

    async def entity_changed(self, who: Principal, entity: Entity) -> None:
        """Write an API edit of a projected node or edge into its board, as a Yjs change."""
        collection = {v: k for k, v in COLLECTIONS.items()}.get(entity.type)
        doc_id, key = entity.data.get("doc"), entity.data.get("key")
        if collection is None or not isinstance(doc_id, str) or not isinstance(key, str):
            return
        if entity_id(doc_id, collection, key) != entity.id:
            return  # not a projection, just an entity that looks like one
        try:
            board = await self.documents.get(who, doc_id)
        except (NotFound, InvalidInput):
            return
        if board.project_id != entity.project_id:
            return  # an entity of another project that took a node's id (its editor may not write here)
        await self.documents.check_access(who, doc_id, write=True)
        loaded = await self.documents.loaded(who.org_id, doc_id)
        updates: list[bytes] = []
        async with loaded.lock:
            target = loaded.doc.get(collection, type=Map)
            value = {k: v for k, v in entity.data.items() if k not in _OWN_FIELDS}
            if _plain(target.get(key)) == value and not entity.deleted:
                return
            subscription = loaded.doc.observe(lambda event: updates.append(event.update))
            try:
                if entity.deleted:
                    if key in target:
                        del target[key]
                else:
                    target[key] = Map(value)
            finally:
                loaded.doc.unobserve(subscription)
        for update in updates:
            await self.documents.append_checked(who.org_id, doc_id, update, user_id=who.user_id)


def _plain(value: Any) -> dict[str, Any]:
    """A node or edge as a JSON object (a Y.Map, or a JSON value kept in the map)."""
    if isinstance(value, Map):
        value = value.to_py()
    value = _js_numbers(value)
    if isinstance(value, dict):
        return value
    return {"value": value}


_SAFE_INTEGER = 2**53  # past it, JavaScript's numbers are not exact integers


def _js_numbers(value: Any) -> Any:
    """Numbers as JavaScript prints them: pycrdt reads every Yjs number as a float, so the
    ``x: 10`` a browser wrote would become ``10.0`` in the entity (and in typed clients)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < _SAFE_INTEGER:
        return int(value)
    if isinstance(value, dict):
        return {k: _js_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_js_numbers(v) for v in value]
    return value
