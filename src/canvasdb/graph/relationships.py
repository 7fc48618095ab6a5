"""Relationships: typed, versioned edges between two entities of one org.

A relationship's ends, kind and the ends' projects are fixed at creation; its ``data``
(label, style) changes by versions, like an entity's. The database keeps the rest in
step (migrations 0008 and 0018): each change writes a version row, deleting an entity
hides the relationships it is an end of and undeleting it brings them back, and reference fields
declared by entity types are mirrored as relationships of origin ``field`` (changed by
editing the entity, not here), and the edges of live boards as relationships of origin
``board`` (changed by editing the board).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from psycopg.types.json import Jsonb

from canvasdb.db import Connection, Database
from canvasdb.entities.store import encode_data, utc
from canvasdb.entities.types import KIND
from canvasdb.errors import Conflict, Forbidden, Gone, InvalidInput, NotFound
from canvasdb.tenancy import Principal, project_role

MAX_DATA_BYTES = 64 * 1024
MAX_PAGE = 1000


@dataclass(frozen=True)
class Relationship:
    id: UUID
    src: UUID
    dst: UUID
    kind: str
    data: dict[str, Any]
    origin: str
    deleted: bool  # deleted itself
    end_deleted: bool  # hidden because an end is deleted
    version: int
    created_at: datetime
    updated_at: datetime
    created_by: UUID | None
    updated_by: UUID | None

    @property
    def live(self) -> bool:
        return not self.deleted and not self.end_deleted

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id), "src": str(self.src), "dst": str(self.dst), "kind": self.kind,
            "data": self.data, "origin": self.origin, "live": self.live, "deleted": self.deleted,
            "end_deleted": self.end_deleted, "version": self.version,
            "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat(),
            "created_by": _str(self.created_by), "updated_by": _str(self.updated_by),
        }  # fmt: skip


def _str(value: UUID | None) -> str | None:
    return None if value is None else str(value)


def check_kind(kind: object, pointer: str = "/kind") -> str:
    if not isinstance(kind, str) or not KIND.fullmatch(kind):
        raise InvalidInput("kind is lowercase dotted words such as 'depends_on' or 'board.edge'",
                           pointer=pointer)
    return kind


def _relationship(row: dict[str, Any]) -> Relationship:
    return Relationship(
        id=row["id"], src=row["src"], dst=row["dst"], kind=row["kind"], data=row["data"],
        origin=row.get("origin", "api"), deleted=row["deleted"], end_deleted=row["end_deleted"],
        version=row["version"], created_at=row["created_at"], updated_at=row["updated_at"],
        created_by=row.get("created_by"), updated_by=row.get("updated_by"),
    )  # fmt: skip


async def readable_projects(conn: Connection, who: Principal) -> list[UUID] | None:
    """The projects the caller may read, or None for all of the org's (owners and admins)."""
    if who.is_org_admin:
        return None
    cur = await conn.execute("SELECT project_id FROM project_members WHERE org_id = %s AND user_id = %s",
                             (who.org_id, who.user_id))
    return [row["project_id"] for row in await cur.fetchall()]


async def require_readable(conn: Connection, who: Principal, id: UUID, projects: list[UUID] | None) -> None:
    row = await (await conn.execute("SELECT project_id FROM entities WHERE org_id = %s AND id = %s",
                                    (who.org_id, id))).fetchone()
    if row is None or (projects is not None and row["project_id"] not in projects):
        raise NotFound(f"entity {id} not found")


async def _require_ends(conn: Connection, who: Principal, src: UUID,
                        dst: UUID) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two ends of a new relationship: the source one the caller may write, the target
    one it may read (422 when either does not exist or is hidden).

    The rows are locked FOR KEY SHARE until the transaction ends, so that whether each is
    deleted stays true until the relationship is committed: deleting an entity locks it FOR
    UPDATE first (migration 0018), which waits for this lock, and a delete that came first
    makes this read wait for it and see the entity deleted. Edits of the entity do not wait.
    They are locked in id order, before the kind's turn, as every maker and deleter of
    relationships locks entities (migration 0034), so that none of them deadlocks with this."""
    cur = await conn.execute(
        "SELECT id, project_id, type, deleted FROM entities WHERE org_id = %s AND id = ANY(%s)"
        " ORDER BY id FOR KEY SHARE", (who.org_id, [src, dst]))
    rows = {row["id"]: row for row in await cur.fetchall()}
    return (await _end(conn, who, rows.get(src), src, "/src", write=True),
            await _end(conn, who, rows.get(dst), dst, "/dst", write=False))


async def _end(conn: Connection, who: Principal, row: dict[str, Any] | None, id: UUID, pointer: str, *,
               write: bool) -> dict[str, Any]:
    """One end, as read: 422 when it does not exist or the caller cannot read its project."""
    role = None if row is None else await project_role(conn, who, row["project_id"])
    if row is None or role is None:
        raise InvalidInput(f"entity {id} does not exist", pointer=pointer)
    if write and role == "viewer":
        raise Forbidden(f"a viewer may read entity {id} but not link from it")
    return row


class RelationshipStore:
    """Create, read, change and delete relationships; every method checks access in its transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, who: Principal, src: UUID, dst: UUID, kind: str,
                     data: dict[str, Any] | None = None, *, id: UUID | None = None) -> Relationship:
        """A new relationship ``src -> dst``. The caller must be able to change ``src``'s project
        and read ``dst``'s; both must exist (422). A kind the source's type declares acyclic
        refuses an edge that would close a cycle (422): the check searches the whole graph of
        the kind, and creations of one acyclic kind in an org take turns (an advisory lock held
        to the commit), so two concurrent edges can never close a cycle together."""
        check_kind(kind)
        data = {} if data is None else data
        encode_data(data, MAX_DATA_BYTES)
        rel_id = id or uuid4()
        async with self.db.transaction(who.org_id) as conn:
            s, d = await _require_ends(conn, who, src, dst)
            if s["deleted"] or d["deleted"]:
                raise Gone("an end of the relationship is deleted; undelete it first")
            if await _closes_cycle(conn, who.org_id, src, dst, kind):
                raise InvalidInput(f"{src} -> {dst} would close a cycle of {kind!r}, which "
                                   f"{s['type']} forbids", pointer="/dst")
            cur = await conn.execute(
                "INSERT INTO relationships (org_id, id, src, dst, kind, data, src_project, dst_project,"
                " created_by, updated_by) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (org_id, id) DO NOTHING RETURNING *",
                (who.org_id, rel_id, src, dst, kind, Jsonb(data), s["project_id"], d["project_id"],
                 who.user_id, who.user_id))
            row = await cur.fetchone()
        if row is None:
            raise Conflict(f"relationship {rel_id} already exists", id=str(rel_id))
        return _relationship(row)

    async def get(self, who: Principal, id: UUID, *, as_of: datetime | None = None) -> Relationship:
        """The relationship now (deleted ones answer 410), or as it was at a moment."""
        as_of = utc(as_of)
        await self.db.horizon.settle(as_of)
        async with self.db.transaction(who.org_id) as conn:
            row = await self._row(conn, who, id)
            if as_of is not None:
                old = await (await conn.execute(
                    "SELECT relationship_id AS id, src, dst, kind, data, deleted, end_deleted, version,"
                    " at AS updated_at, actor AS updated_by FROM relationship_versions"
                    " WHERE org_id = %s AND relationship_id = %s AND at <= %s"
                    " ORDER BY version DESC LIMIT 1", (who.org_id, id, as_of))).fetchone()
                if old is None:
                    raise NotFound(f"relationship {id} did not exist at {as_of.isoformat()}")
                return _relationship({**row, **old})
        rel = _relationship(row)
        if not rel.live:
            raise Gone(f"relationship {id} is deleted", version=rel.version)
        return rel

    async def update(self, who: Principal, id: UUID, data: dict[str, Any], *,
                     if_version: int | None = None) -> Relationship:
        """Replace the relationship's ``data`` (a new version)."""
        encode_data(data, MAX_DATA_BYTES)
        return await self._change(who, id, if_version, "data = %s", (Jsonb(data),))

    async def delete(self, who: Principal, id: UUID, *, if_version: int | None = None) -> Relationship:
        """Soft delete: a tombstone version. Deleting a deleted relationship changes nothing."""
        return await self._change(who, id, if_version, "deleted = true", ())

    async def undelete(self, who: Principal, id: UUID, *, if_version: int | None = None) -> Relationship:
        """Bring a deleted relationship back: checked for a cycle as a new one would be (422)."""
        async def no_cycle(conn: Connection, row: dict[str, Any]) -> None:
            if row["deleted"] and await _closes_cycle(conn, who.org_id, row["src"], row["dst"], row["kind"]):
                raise InvalidInput(f"relationship {id} would close a cycle of {row['kind']!r} again",
                                   pointer="/id")

        return await self._change(who, id, if_version, "deleted = false", (), check=no_cycle)

    async def list(self, who: Principal, *, entity: UUID | None = None, direction: str = "both",
                   kinds: list[str] | None = None, after: UUID | None = None,
                   limit: int = 100) -> tuple[list[Relationship], UUID | None]:
        """One page (by id) of the live relationships the caller can see: those of ``entity``
        (leaving it, entering it or both), or all of them; with the cursor of the next page."""
        if direction not in ("out", "in", "both"):
            raise InvalidInput("direction is 'out', 'in' or 'both'", pointer="/direction")
        if isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit is a whole number from 1 to {MAX_PAGE}", pointer="/limit")
        for kind in kinds or []:
            check_kind(kind, "/kinds")
        ends = {"out": "r.src = %(entity)s", "in": "r.dst = %(entity)s",
                "both": "(r.src = %(entity)s OR r.dst = %(entity)s)"}[direction]
        async with self.db.transaction(who.org_id) as conn:
            projects = await readable_projects(conn, who)
            if entity is not None:
                await require_readable(conn, who, entity, projects)
            cur = await conn.execute(
                "SELECT r.* FROM relationships r WHERE r.org_id = %(org)s AND r.live AND r.id > %(after)s"
                + (f" AND {ends}" if entity is not None else "")
                + (" AND r.kind = ANY(%(kinds)s)" if kinds else "")
                + (" AND r.src_project = ANY(%(projects)s) AND r.dst_project = ANY(%(projects)s)"
                   if projects is not None else "")
                + " ORDER BY r.id LIMIT %(n)s",
                {"org": who.org_id, "entity": entity, "after": after or UUID(int=0), "kinds": kinds,
                 "projects": projects, "n": limit + 1})
            rows = await cur.fetchall()
        page = [_relationship(r) for r in rows[:limit]]
        return page, (page[-1].id if len(rows) > limit else None)

    async def history(self, who: Principal, id: UUID) -> list[dict[str, Any]]:
        async with self.db.transaction(who.org_id) as conn:
            await self._row(conn, who, id)
            cur = await conn.execute(
                "SELECT version, op, at, actor, data, deleted, end_deleted FROM relationship_versions"
                " WHERE org_id = %s AND relationship_id = %s ORDER BY version", (who.org_id, id))
            rows = await cur.fetchall()
        return [{"version": r["version"], "op": r["op"], "at": r["at"].isoformat(), "actor": _str(r["actor"]),
                 "data": r["data"], "live": not r["deleted"] and not r["end_deleted"]} for r in rows]

    async def _row(self, conn: Connection, who: Principal, id: UUID, *,
                   write: bool = False) -> dict[str, Any]:
        """The relationship, if the caller may read it (or change it); for a change, locked until
        the commit, so that its version (If-Match) and what is checked of it hold for the write."""
        lock = " FOR NO KEY UPDATE" if write else ""
        row = await (await conn.execute(f"SELECT * FROM relationships WHERE org_id = %s AND id = %s{lock}",
                                        (who.org_id, id))).fetchone()
        if row is None:
            raise NotFound(f"relationship {id} not found")
        if not who.is_org_admin:
            src_role = await project_role(conn, who, row["src_project"])
            dst_role = await project_role(conn, who, row["dst_project"])
            if src_role is None or dst_role is None:
                raise NotFound(f"relationship {id} not found")
            if write and src_role == "viewer":
                raise Forbidden(f"a viewer may read relationship {id} but not change it")
        return row

    async def _change(self, who: Principal, id: UUID, if_version: int | None, assignment: str,
                      params: tuple[Any, ...], *,
                      check: Callable[[Connection, dict[str, Any]], Awaitable[None]] | None = None
                      ) -> Relationship:
        async with self.db.transaction(who.org_id) as conn:
            row = await self._row(conn, who, id, write=True)
            if row["origin"] == "field":
                raise Conflict(f"relationship {id} mirrors a reference field: change the entity instead")
            if row["origin"] == "board":
                raise Conflict(f"relationship {id} mirrors a board edge: change the board instead")
            if if_version is not None and if_version != row["version"]:
                raise Conflict(f"relationship {id} is at version {row['version']}",
                               current_version=row["version"])
            if check is not None:
                await check(conn, row)
            cur = await conn.execute(
                f"UPDATE relationships SET {assignment}, updated_by = %s"
                " WHERE org_id = %s AND id = %s RETURNING *", (*params, who.user_id, who.org_id, id))
            changed = await cur.fetchone()
        return _relationship(changed or row)


async def _closes_cycle(conn: Connection, org_id: UUID, src: UUID, dst: UUID, kind: str) -> bool:
    """Whether an edge ``src -> dst`` of ``kind`` would close a cycle that the source's type
    forbids; when the kind is acyclic, its creations in the org take turns from here to the
    commit (``reaches`` with ``lock``)."""
    return await declares_acyclic(conn, org_id, src, kind) and \
        await reaches(conn, org_id, dst, src, kind, lock=True)


async def declares_acyclic(conn: Connection, org_id: UUID, src: UUID, kind: str) -> bool:
    """Does the type of entity ``src`` forbid cycles of ``kind`` (``acyclic_kinds``)?"""
    acyclic = await (await conn.execute(
        "SELECT t.acyclic_kinds ? %s AS yes FROM entities e JOIN entity_types t"
        " ON t.org_id = e.org_id AND t.name = e.type WHERE e.org_id = %s AND e.id = %s",
        (kind, org_id, src))).fetchone()
    return bool(acyclic and acyclic["yes"])


# relationship_reaches through the projects a caller may read: each node once, as there
_READABLE_REACH = (
    "WITH RECURSIVE r(id) AS (SELECT %(src)s::uuid UNION SELECT e.dst FROM r JOIN relationships e"
    " ON e.org_id = %(org)s AND e.src = r.id AND e.kind = %(kind)s AND e.live"
    " AND e.dst_project = ANY(%(projects)s))"
    " SELECT EXISTS (SELECT FROM r WHERE r.id = %(dst)s) AS yes")


async def reaches(conn: Connection, org_id: UUID, src: UUID, dst: UUID, kind: str, *,
                  lock: bool = False, projects: list[UUID] | None = None) -> bool:
    """Does ``src`` reach ``dst`` through live relationships of ``kind`` (passing only through
    entities of ``projects``, if given)? The search is exhaustive (each node once, bounded by
    the statement timeout). With ``lock``, first wait for the org's other creations of this
    kind to commit and keep them waiting until this transaction ends: the answer then holds
    until this transaction's own edge is committed."""
    if lock:
        await conn.execute("SELECT relationship_kind_lock(%s, %s)", (org_id, kind))
    if projects is None:
        cur = await conn.execute("SELECT relationship_reaches(%s, %s, %s, %s) AS yes",
                                 (org_id, src, dst, kind))
    else:
        cur = await conn.execute(_READABLE_REACH, {"org": org_id, "src": src, "dst": dst, "kind": kind,
                                                   "projects": projects})
    row = await cur.fetchone()
    return bool(row and row["yes"])
