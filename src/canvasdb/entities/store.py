"""Entities: schema-less JSON documents stored and read one by one, each change a new version.

A change is one call of the SQL function ``entity_change``: lock the row, check
access and the expected version, then update the row and append its version row.
Concurrent changes share a statement and a commit (group commit, ``changes``).
Reads are by id, by ids, or by page; nothing reads a whole project.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from canvasdb.db import Connection, Database
from canvasdb.entities import history
from canvasdb.entities.changes import ChangeQueue
from canvasdb.entities.types import TypeRegistry, check_type_name, nested_deeper_than, type_from_json
from canvasdb.errors import (
    CanvasdbError,
    Conflict,
    Forbidden,
    Gone,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
)
from canvasdb.tenancy import Principal, check_project_access, require_project_role, role_in_project

AsOf = int | datetime | None
MAX_PAGE = 1000
MAX_IDS = 100
MAX_DEPTH = 100  # nesting of objects and arrays in data; history, diffs and JSON output recurse


@dataclass(frozen=True)
class Entity:
    id: UUID
    org_id: UUID
    project_id: UUID
    type: str
    data: dict[str, Any]
    version: int
    deleted: bool
    created_at: datetime
    updated_at: datetime
    created_by: UUID | None
    updated_by: UUID | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id), "org_id": str(self.org_id), "project_id": str(self.project_id),
            "type": self.type, "data": self.data, "version": self.version, "deleted": self.deleted,
            "created_at": self.created_at.isoformat(), "updated_at": self.updated_at.isoformat(),
            "created_by": _str(self.created_by), "updated_by": _str(self.updated_by),
        }  # fmt: skip


@dataclass(frozen=True)
class Version:
    version: int
    op: str
    at: datetime
    actor: UUID | None
    deleted: bool
    patch: list[dict[str, Any]] | None

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "op": self.op, "at": self.at.isoformat(),
                "actor": _str(self.actor), "deleted": self.deleted, "patch": self.patch}


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next: str | None  # opaque cursor for the next page, None at the end


def _str(value: UUID | None) -> str | None:
    return None if value is None else str(value)


_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")  # an escaped NUL, not an escaped backslash before "u0000"


def encode_data(data: object, max_bytes: int) -> str:
    """``data`` as JSON text, refusing what PostgreSQL's jsonb or the size limit would not take."""
    if not isinstance(data, dict):
        raise InvalidInput("data must be a JSON object", pointer="/data")
    if nested_deeper_than(data, MAX_DEPTH):
        raise InvalidInput(f"data is nested more than {MAX_DEPTH} levels deep", pointer="/data")
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"data is not valid JSON: {exc}", pointer="/data") from None
    except RecursionError:
        raise InvalidInput("data is nested too deeply", pointer="/data") from None
    if "\\u0000" in text and _NUL.search(text):
        raise InvalidInput("data holds a NUL character (\\u0000), which PostgreSQL's jsonb cannot store",
                           pointer="/data")
    if size > max_bytes:
        raise PayloadTooLarge(f"data is {size} bytes; the limit is {max_bytes}", limit=max_bytes)
    return text


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: ``patch`` merged into ``target`` (as ``jsonb_merge_patch`` in migration 0002)."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _refusal(outcome: str, id: UUID, version: int | None, max_bytes: int) -> CanvasdbError:
    """The error for an ``entity_change`` outcome that wrote nothing."""
    if outcome == "not_found":
        return NotFound(f"entity {id} not found")
    if outcome == "forbidden":
        return Forbidden(f"a viewer may read entity {id} but not change it")
    if outcome == "conflict":
        return Conflict(f"entity {id} is at version {version}", current_version=version)
    if outcome == "gone":
        return Gone(f"entity {id} is deleted; undelete or restore it first")
    if outcome == "too_large":
        return PayloadTooLarge(f"the merged data would be over {max_bytes} bytes", limit=max_bytes)
    return CanvasdbError(f"unexpected outcome {outcome!r} writing entity {id}")


def _entity(row: dict[str, Any]) -> Entity:
    return Entity(
        id=row["id"], org_id=row["org_id"], project_id=row["project_id"], type=row["type"],
        data=row["data"], version=row["version"], deleted=row["deleted"],
        created_at=row["created_at"], updated_at=row["updated_at"],
        created_by=row["created_by"], updated_by=row["updated_by"],
    )  # fmt: skip


_ROLE_AND_TYPE = (f"SELECT {role_in_project('%s', '%s')} AS role,"
                  " (SELECT to_jsonb(t) FROM entity_types t WHERE t.org_id = %s AND t.name = %s)"
                  " AS entity_type")  # (org, project, user, org, type)

_INSERT = """
WITH e AS (
    INSERT INTO entities (org_id, id, project_id, type, data, version, keyframe_version, deleted,
                          created_at, updated_at, created_by, updated_by)
    SELECT %(org)s, %(id)s, %(project)s, %(type)s, %(data)s::jsonb, 1, 1, false,
           now.t, now.t, %(actor)s, %(actor)s
    FROM (SELECT version_time() AS t) now  -- (migration 0035: the time once the transaction has its id)
    ON CONFLICT (org_id, id) DO NOTHING
    RETURNING *
), v AS (
    INSERT INTO entity_versions (org_id, entity_id, version, op, at, actor, deleted, keyframe)
    SELECT org_id, id, 1, 'create', created_at, created_by, false, data FROM e
)
SELECT * FROM e
"""

# The version rows needed to rebuild one version: from the nearest keyframe up to it.
_REBUILD = """
SELECT version, op, at, actor, deleted, patch, keyframe FROM entity_versions
WHERE org_id = %(org)s AND entity_id = %(id)s AND version <= %(v)s AND version >= (
    SELECT max(version) FROM entity_versions
    WHERE org_id = %(org)s AND entity_id = %(id)s AND version <= %(v)s AND keyframe IS NOT NULL)
ORDER BY version
"""

# One page of a project as it was at time t: per entity, the rows from the keyframe
# at or before its version at t up to that version (entities made after t are skipped).
_PAGE_AS_OF = """
SELECT c.id, c.org_id, c.project_id, c.type, c.created_at, c.created_by,
       v.version, v.at, v.actor, v.deleted, v.patch, v.keyframe
FROM (SELECT id, org_id, project_id, type, created_at, created_by FROM entities
      WHERE org_id = %(org)s AND project_id = %(project)s AND id > %(after)s
        AND created_at <= %(t)s {type_filter}
      ORDER BY id LIMIT %(n)s) c
CROSS JOIN LATERAL (SELECT version AS target FROM entity_versions
                    WHERE org_id = c.org_id AND entity_id = c.id AND at <= %(t)s
                    ORDER BY version DESC LIMIT 1) tv
CROSS JOIN LATERAL (SELECT max(version) AS kf FROM entity_versions
                    WHERE org_id = c.org_id AND entity_id = c.id AND version <= tv.target
                      AND keyframe IS NOT NULL) kv
JOIN entity_versions v ON v.org_id = c.org_id AND v.entity_id = c.id
                      AND v.version BETWEEN kv.kf AND tv.target
ORDER BY c.id, v.version
"""

# Version times increase with versions: walk the primary key back to the first one at or before t.
_VERSION_AT = """
SELECT version AS v FROM entity_versions WHERE org_id = %s AND entity_id = %s AND at <= %s
ORDER BY version DESC LIMIT 1
"""

_READ = "SELECT * FROM entity_read(%s, %s, %s)"
_VALIDATE_ATTEMPTS = 50
_MERGE_ATTEMPTS = 5  # re-merges of a patch measured in Python, while others change the entity


class EntityStore:
    """The Python API for entities. Every method checks the caller's access in its transaction."""

    def __init__(
        self,
        db: Database,
        types: TypeRegistry | None = None,
        *,
        max_data_bytes: int = 1024 * 1024,
        keyframe_interval: int = 20,
    ) -> None:
        self.db = db
        self.types = types or TypeRegistry(db)
        self.max_data_bytes = max_data_bytes
        self.keyframe_interval = keyframe_interval
        self.changes = ChangeQueue(db)
        self.changed: Callable[[UUID], Awaitable[None]] | None = None  # told of each org's writes (search)

    # --- writes -------------------------------------------------------------------------------

    async def create(
        self, who: Principal, project_id: UUID, type: str, data: dict[str, Any], *,
        id: UUID | None = None,
    ) -> Entity:  # fmt: skip
        check_type_name(type)
        text = encode_data(data, self.max_data_bytes)
        entity_id = id or uuid4()
        async with self.db.transaction(who.org_id) as conn:
            # the caller's role in the project and the type, in one statement
            found = await (await conn.execute(_ROLE_AND_TYPE, (who.org_id, project_id, who.user_id,
                                                               who.org_id, type))).fetchone()
            assert found is not None
            require_project_role(who, found["role"], write=True, what="project")
            spec = found["entity_type"]
            self.types.check(who, None if spec is None else type_from_json(spec), data)
            cur = await conn.execute(_INSERT, {
                "org": who.org_id, "id": entity_id, "project": project_id, "type": type,
                "data": text, "actor": who.user_id,
            })  # fmt: skip
        row = await cur.fetchone()  # read after COMMIT: both went in one round trip
        if row is None:
            raise Conflict(f"entity {entity_id} already exists", id=str(entity_id))
        if self.changed is not None:
            await self.changed(who.org_id)
        return _entity(row)

    async def replace(
        self, who: Principal, id: UUID, data: dict[str, Any], *, if_version: int | None = None
    ) -> Entity:
        return await self._change(who, id, "replace", encode_data(data, self.max_data_bytes),
                                  if_version=if_version)

    async def patch(
        self, who: Principal, id: UUID, merge: dict[str, Any], *, if_version: int | None = None
    ) -> Entity:
        """Apply an RFC 7396 JSON Merge Patch to ``data``."""
        value = encode_data(merge, self.max_data_bytes)
        try:
            return await self._change(who, id, "merge", value, if_version=if_version)
        except PayloadTooLarge:
            pass
        # PostgreSQL measured the merged data as it prints it (a space after each ':' and ','),
        # more than the compact JSON that creates and replacements are measured as: measure it
        # that way here, and write it as a replacement of the version it was merged into.
        for _ in range(_MERGE_ATTEMPTS):
            row = await self._read(who, id, write=True)
            if if_version is not None and if_version != row["version"]:
                raise _refusal("conflict", id, row["version"], self.max_data_bytes)
            merged = encode_data(merge_patch(row["data"], merge), self.max_data_bytes)  # 413 if so
            try:
                return await self._change(who, id, "replace", merged, if_version=row["version"])
            except Conflict:
                if if_version is not None:
                    raise
        raise Conflict(f"entity {id} is changing too fast to merge and write; try again", retry=True)

    async def delete(self, who: Principal, id: UUID, *, if_version: int | None = None) -> Entity:
        """Soft delete: a tombstone version. Deleting a deleted entity changes nothing."""
        return await self._change(who, id, "delete", None, if_version=if_version)

    async def undelete(self, who: Principal, id: UUID, *, if_version: int | None = None) -> Entity:
        """Bring a deleted entity back as it was. Undeleting a live entity changes nothing."""
        return await self._change(who, id, "undelete", None, if_version=if_version)

    async def restore(self, who: Principal, id: UUID, version: int, *,
                      if_version: int | None = None) -> Entity:
        """Make an old version current again, as a new version (also undeletes)."""
        latest = (await self._read(who, id, write=True))["version"]
        if if_version is not None and if_version != latest:
            raise _refusal("conflict", id, latest, self.max_data_bytes)
        if not 1 <= version <= latest:
            raise NotFound(f"entity {id} has no version {version}")
        async with self.db.transaction(who.org_id) as conn:
            old = history.rebuild(await self._rebuild_rows(conn, who, id, version))
        return await self._change(who, id, "restore", json.dumps(old, ensure_ascii=False),
                                  if_version=if_version)

    async def _change(
        self, who: Principal, id: UUID, op: str, value: str | None, *, if_version: int | None = None
    ) -> Entity:
        """One call of ``entity_change``; two when the type's schema must check the new data."""
        params = {
            "org": who.org_id, "id": id, "actor": who.user_id, "admin": who.is_org_admin, "op": op,
            "value": value, "if_version": if_version, "validated_at": None,
            "keyframe_interval": self.keyframe_interval, "max_bytes": self.max_data_bytes,
        }  # fmt: skip
        for _ in range(_VALIDATE_ATTEMPTS):
            row = await self.changes.change(params)
            outcome = row["outcome"]
            if outcome in ("done", "unchanged"):
                if outcome == "done" and self.changed is not None:
                    await self.changed(who.org_id)
                return _entity({**{k[2:]: v for k, v in row.items() if k.startswith("r_")},
                                "org_id": who.org_id, "id": id})
            if outcome != "validate":
                raise _refusal(outcome, id, row["r_version"], self.max_data_bytes)
            # The schema says yes or raises; then write, if the entity is still at that version.
            self.types.check(who, type_from_json(row["r_type_json"]), row["r_data"])
            params["validated_at"] = row["r_version"]
        raise Conflict(f"entity {id} is changing too fast to validate and write; try again", retry=True)

    async def _read(self, who: Principal, id: UUID, *, write: bool) -> dict[str, Any]:
        """The entity's row in one round trip, after checking the caller's project role."""
        row = await self.db.one(_READ, (who.org_id, id, who.user_id))
        if row is None:
            raise NotFound(f"entity {id} not found")
        require_project_role(who, row["member_role"], write=write, what=f"entity {id}")
        return row

    # --- reads --------------------------------------------------------------------------------

    async def get(self, who: Principal, id: UUID, *, as_of: AsOf = None) -> Entity:
        """The entity now, or as of a version number or a moment."""
        row = await self._read(who, id, write=False)
        if as_of is None:
            if row["deleted"]:
                raise Gone(f"entity {id} is deleted", version=row["version"])
            return _entity(row)
        if isinstance(as_of, datetime):
            await self.db.horizon.settle(utc(as_of))
        async with self.db.transaction(who.org_id) as conn:
            version = await self._version_at(conn, who, id, as_of, latest=row["version"])
            if version is None:
                raise NotFound(f"entity {id} did not exist at {as_of}")
            rows = await self._rebuild_rows(conn, who, id, version)
        last = rows[-1]
        return _entity({**row, "data": history.rebuild(rows), "version": last["version"],
                        "deleted": last["deleted"], "updated_at": last["at"],
                        "updated_by": last["actor"]})

    async def get_many(self, who: Principal, ids: list[UUID]) -> list[Entity]:
        """The live entities among ``ids`` that the caller can read, in the order asked."""
        if len(ids) > MAX_IDS:
            raise InvalidInput(f"at most {MAX_IDS} ids at once", pointer="/ids")
        if who.is_org_admin:
            rows = await self.db.read(
                who.org_id, "SELECT * FROM entities WHERE org_id = %s AND id = ANY(%s) AND NOT deleted",
                (who.org_id, ids))
        else:
            rows = await self.db.read(
                who.org_id, "SELECT e.* FROM entities e JOIN project_members m ON m.org_id = e.org_id"
                " AND m.project_id = e.project_id AND m.user_id = %s"
                " WHERE e.org_id = %s AND e.id = ANY(%s) AND NOT e.deleted", (who.user_id, who.org_id, ids))
        found = {r["id"]: _entity(r) for r in rows}
        return [found[i] for i in ids if i in found]

    async def list(
        self, who: Principal, project_id: UUID, *, type: str | None = None,
        after: str | None = None, limit: int = 100, as_of: datetime | None = None,
    ) -> Page:  # fmt: skip
        """One page of a project's live entities (optionally of one type), ordered by id.

        With ``as_of``, the entities as they were at that moment. Keyset pagination:
        pass the returned ``next`` as ``after``.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", pointer="/limit")
        if type is not None:
            check_type_name(type)
        cursor = _cursor(after)
        if as_of is None:
            return await self._page_now(who, project_id, type, cursor, limit)
        await self.db.horizon.settle(utc(as_of))
        async with self.db.transaction(who.org_id) as conn:
            await check_project_access(conn, who, project_id, write=False)
            return await self._page_as_of(conn, who, project_id, type, cursor, limit, as_of)

    async def _page_now(self, who: Principal, project_id: UUID, type: str | None, cursor: UUID,
                        limit: int) -> Page:
        """One statement, which for an org member holds rows only if it has a role in the
        project; an empty page then asks whether the caller may read the project at all."""
        where = "org_id = %s AND project_id = %s AND id > %s AND NOT deleted"
        params: list[Any] = [who.org_id, project_id, cursor]
        if type is not None:
            where += " AND type = %s"
            params.append(type)
        if not who.is_org_admin:
            where += f" AND {role_in_project('%s', '%s')} IS NOT NULL"
            params += [who.org_id, project_id, who.user_id]
        rows = await self.db.read(
            who.org_id, f"SELECT * FROM entities WHERE {where} ORDER BY id LIMIT %s", [*params, limit + 1])
        if not rows:
            async with self.db.transaction(who.org_id) as conn:
                await check_project_access(conn, who, project_id, write=False)
        items = [_entity(r) for r in rows[:limit]]
        return Page(items, str(items[-1].id) if len(rows) > limit else None)

    async def _page_as_of(self, conn: Connection, who: Principal, project_id: UUID,
                          type: str | None, cursor: UUID, limit: int, as_of: datetime) -> Page:
        # One live entity more than the page, to know whether another page follows (an exactly
        # full last page gave a cursor to an empty one).
        items: list[Entity] = []
        params = {"org": who.org_id, "project": project_id, "type": type, "t": utc(as_of),
                  "n": limit + 1}
        query = _PAGE_AS_OF.format(type_filter="AND type = %(type)s" if type is not None else "")
        while len(items) <= limit:
            cur = await conn.execute(query, {**params, "after": cursor})
            rows = await cur.fetchall()
            by_entity: dict[UUID, list[dict[str, Any]]] = {}
            for row in rows:
                by_entity.setdefault(row["id"], []).append(row)
            for entity_id, versions in by_entity.items():
                cursor = entity_id
                last = versions[-1]
                if last["deleted"]:
                    continue
                items.append(_entity({**last, "data": history.rebuild(versions), "updated_at": last["at"],
                                      "updated_by": last["actor"]}))
                if len(items) > limit:
                    break
            if len(by_entity) <= limit:  # the project has no more entities
                break
        if len(items) > limit:
            return Page(items[:limit], str(items[limit - 1].id))
        return Page(items, None)

    async def history(
        self, who: Principal, id: UUID, *, before: int | None = None, limit: int = 100
    ) -> Page:
        """The entity's versions, newest first, without their keyframes."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}", pointer="/limit")
        await self._read(who, id, write=False)
        rows = await self.db.read(
            who.org_id, "SELECT version, op, at, actor, deleted, patch FROM entity_versions"
            " WHERE org_id = %s AND entity_id = %s AND version < %s ORDER BY version DESC LIMIT %s",
            (who.org_id, id, before if before is not None else 2**31 - 1, limit + 1))
        items = [Version(**r) for r in rows[:limit]]
        return Page(items, str(items[-1].version) if len(rows) > limit else None)

    async def diff(self, who: Principal, id: UUID, from_version: int, to_version: int) -> list[Any]:
        """The RFC 6902 patch from one version's data to another's."""
        row = await self._read(who, id, write=False)
        async with self.db.transaction(who.org_id) as conn:
            docs = []
            for v in (from_version, to_version):
                if not 1 <= v <= row["version"]:
                    raise NotFound(f"entity {id} has no version {v}")
                docs.append(json.dumps(history.rebuild(await self._rebuild_rows(conn, who, id, v))))
            cur = await conn.execute("SELECT jsonb_diff(%s::jsonb, %s::jsonb) AS patch", docs)
            found = await cur.fetchone()
        assert found is not None
        return list(found["patch"])

    # --- helpers ------------------------------------------------------------------------------

    async def _version_at(self, conn: Connection, who: Principal, id: UUID, as_of: AsOf,
                          *, latest: int) -> int | None:
        if isinstance(as_of, int):
            if not 1 <= as_of <= latest:
                raise NotFound(f"entity {id} has no version {as_of}")
            return as_of
        assert isinstance(as_of, datetime)
        row = await (await conn.execute(_VERSION_AT, (who.org_id, id, utc(as_of)))).fetchone()
        return None if row is None or row["v"] is None else int(row["v"])

    async def _rebuild_rows(self, conn: Connection, who: Principal, id: UUID,
                            version: int) -> list[dict[str, Any]]:
        cur = await conn.execute(_REBUILD, {"org": who.org_id, "id": id, "v": version})
        return await cur.fetchall()


def utc(moment: datetime | None) -> datetime | None:
    """A time without a zone is taken as UTC, everywhere in the API (PostgreSQL would read it
    in the session's zone)."""
    return moment if moment is None or moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def parse_as_of(value: str | None) -> AsOf:
    """``as_of`` as text: a version number or an ISO 8601 moment."""
    if value is None or value == "":
        return None
    if value.isascii() and value.isdigit() and len(value) <= 9:
        return int(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput("as_of must be a version number or an ISO 8601 time",
                           pointer="query:as_of") from None
    return utc(moment)


def parse_as_of_time(value: str | None) -> datetime | None:
    """``as_of`` where only a moment makes sense (a listing, a relationship, the graph, a
    document): one message for a version number and for text that is no time at all (the
    latter was told "a version number or an ISO 8601 time", then refused the number)."""
    refusal = InvalidInput("as_of is an ISO 8601 time here, such as 2026-11-27T10:00:00Z",
                           pointer="query:as_of")
    try:
        moment = parse_as_of(value)
    except InvalidInput:
        raise refusal from None
    if isinstance(moment, int):
        raise refusal
    return moment


def _cursor(after: str | None) -> UUID:
    if after is None or after == "":
        return UUID(int=0)
    try:
        return UUID(after)
    except ValueError:
        raise InvalidInput("after must be the `next` value of a previous page",
                           pointer="/after") from None


__all__ = ["Entity", "EntityStore", "Page", "Version", "encode_data", "parse_as_of", "parse_as_of_time"]
