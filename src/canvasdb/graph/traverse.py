"""Graph questions answered frontier at a time: one indexed query per depth level.

Each level asks ``relationships`` (through its covering index for the direction) for the
live edges leaving the whole frontier, filtered by kind and by the projects the caller
may read, so a traversal never passes through an entity the caller cannot see. Visited
nodes are kept here, which makes every traversal cycle-safe, and every answer is capped
(``truncated`` says when a cap cut it short). As of a past time, the same levels read
``relationship_versions``: per edge, its last version at or before that time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from psycopg.rows import tuple_row

from canvasdb.db import Connection, Database
from canvasdb.errors import InvalidInput, NotFound
from canvasdb.graph.relationships import check_kind, readable_projects
from canvasdb.tenancy import Principal

Direction = Literal["out", "in", "both"]
MAX_DEPTH = 10  # neighbours, paths and subgraphs
MAX_DEPTH_TO_END = 100  # dependents "to the end" stop here (and at MAX_NODES)
MAX_NODES = 100_000  # nodes a traversal may visit before it stops with truncated=True
MAX_ROOTS = 100
MAX_PAGE = 1000
MAX_PATHS = 100

_COLUMNS = {"out": ("src", "dst", "dst_project"), "in": ("dst", "src", "src_project")}


@dataclass
class Walk:
    """What a breadth-first walk found: depth of each node, the edge that first reached it."""

    depth: dict[UUID, int] = field(default_factory=dict)
    # node -> (relationship, from, to, kind) of the edge that first reached it
    via: dict[UUID, tuple[UUID, UUID, UUID, str]] = field(default_factory=dict)
    truncated: bool = False


def check_depth(depth: object, *, cap: int = MAX_DEPTH, name: str = "depth") -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= cap:
        raise InvalidInput(f"{name} is a whole number from 1 to {cap}", pointer=f"/{name}")
    return depth


def check_direction(direction: object) -> Direction:
    if direction not in ("out", "in", "both"):
        raise InvalidInput("direction is 'out', 'in' or 'both'", pointer="/direction")
    return direction  # type: ignore[return-value]


def _kinds(kinds: Iterable[str] | None) -> list[str] | None:
    if kinds is None:
        return None
    out = [check_kind(k, "/kinds") for k in kinds]
    return out or None


def _step_sql(direction: Literal["out", "in"], *, kinds: bool, access: bool, as_of: bool) -> str:
    here, there, there_project = _COLUMNS[direction]
    filters = (" AND kind = ANY(%(kinds)s)" if kinds else "") + \
              (f" AND {there_project} = ANY(%(projects)s)" if access else "")
    if not as_of:
        return (f"SELECT id, {here}, {there}, kind FROM relationships"
                f" WHERE org_id = %(org)s AND {here} = ANY(%(frontier)s) AND live{filters}"
                " LIMIT %(limit)s")
    return (f"SELECT id, {here}, {there}, kind FROM ("
            f" SELECT DISTINCT ON (relationship_id) relationship_id AS id, {here}, {there}, kind,"
            f" {there_project}, deleted, end_deleted FROM relationship_versions"
            f" WHERE org_id = %(org)s AND {here} = ANY(%(frontier)s) AND at <= %(as_of)s"
            " ORDER BY relationship_id, version DESC) v"
            f" WHERE NOT deleted AND NOT end_deleted{filters} LIMIT %(limit)s")


class Graph:
    """The graph queries of the Python API (and of the HTTP API, which calls them)."""

    def __init__(self, db: Database, *, max_nodes: int = MAX_NODES) -> None:
        self.db = db
        self.max_nodes = max_nodes

    # --- the engine ---------------------------------------------------------------------------

    async def _start(self, conn: Connection, who: Principal, ids: Iterable[UUID],
                     as_of: datetime | None) -> list[UUID] | None:
        """Check the start entities are readable (404 otherwise); the caller's readable projects."""
        projects = await readable_projects(conn, who)
        ids = list(ids)
        cur = await conn.execute(
            "SELECT id, project_id, deleted, created_at FROM entities WHERE org_id = %s AND id = ANY(%s)",
            (who.org_id, ids))
        found = {r["id"]: r for r in await cur.fetchall()}
        for id in ids:
            row = found.get(id)
            if (row is None or (projects is not None and row["project_id"] not in projects)
                    or (as_of is None and row["deleted"])
                    or (as_of is not None and row["created_at"] > as_of)):
                raise NotFound(f"entity {id} not found")
        return projects

    async def _step(self, conn: Connection, who: Principal, frontier: list[UUID], direction: Direction,
                    kinds: list[str] | None, projects: list[UUID] | None, as_of: datetime | None,
                    limit: int) -> list[tuple[UUID, UUID, UUID, str]]:
        """The live edges leaving ``frontier``: (relationship, from, to, kind), at most ``limit``."""
        params = {"org": who.org_id, "frontier": frontier, "kinds": kinds, "projects": projects,
                  "as_of": as_of, "limit": limit}
        rows: list[tuple[UUID, UUID, UUID, str]] = []
        for d in ("out", "in") if direction == "both" else (direction,):
            sql = _step_sql(d, kinds=kinds is not None, access=projects is not None, as_of=as_of is not None)
            async with conn.cursor(row_factory=tuple_row) as cur:
                await cur.execute(sql, params)
                rows.extend(await cur.fetchall())
        return rows

    async def _walk(self, conn: Connection, who: Principal, starts: list[UUID], direction: Direction,
                    kinds: list[str] | None, depth: int, projects: list[UUID] | None,
                    as_of: datetime | None, max_nodes: int) -> Walk:
        walk = Walk(depth={s: 0 for s in starts})
        frontier = list(dict.fromkeys(starts))
        for level in range(1, depth + 1):
            if not frontier:
                break
            room = max_nodes - len(walk.depth) + 1
            edges = await self._step(conn, who, frontier, direction, kinds, projects, as_of,
                                     limit=room * 2 + 1000)
            nxt: list[UUID] = []
            for rel, frm, to, kind in edges:
                if to in walk.depth:
                    continue
                if len(walk.depth) >= max_nodes:
                    walk.truncated = True
                    break
                walk.depth[to] = level
                walk.via[to] = (rel, frm, to, kind)
                nxt.append(to)
            if len(edges) >= room * 2 + 1000:
                walk.truncated = True
            if walk.truncated:
                break
            frontier = nxt
        return walk

    async def _summaries(self, conn: Connection, who: Principal,
                         ids: list[UUID]) -> dict[UUID, dict[str, Any]]:
        """id, type, project and a title (the first of data.title/name/text/label) per entity."""
        if not ids:
            return {}
        cur = await conn.execute(
            "SELECT id, type, project_id, left(coalesce(data->>'title', data->>'name', data->>'text',"
            " data->>'label'), 200) AS title, deleted FROM entities WHERE org_id = %s AND id = ANY(%s)",
            (who.org_id, ids))
        return {r["id"]: {"id": str(r["id"]), "type": r["type"], "project_id": str(r["project_id"]),
                          "title": r["title"]} for r in await cur.fetchall()}

    async def _page(self, conn: Connection, who: Principal, walk: Walk, limit: int,
                    cursor: str | None) -> dict[str, Any]:
        """The walk's nodes (start excluded), ordered by (depth, id), one keyset page."""
        found = sorted(((d, str(n), n) for n, d in walk.depth.items() if d > 0))
        if cursor is not None:
            try:
                c_depth, c_id = cursor.split(":", 1)
                after = (int(c_depth), str(UUID(c_id)))
            except ValueError:
                raise InvalidInput("cursor is not one this API returned", pointer="/cursor") from None
            found = [f for f in found if (f[0], f[1]) > after]
        page = found[:limit]
        summaries = await self._summaries(conn, who, [n for _, _, n in page])
        nodes, rels = [], []
        for d, _, n in page:
            nodes.append({**summaries.get(n, {"id": str(n)}), "depth": d})
            rel, frm, to, kind = walk.via[n]
            rels.append({"id": str(rel), "from": str(frm), "to": str(to), "kind": kind})
        nxt = f"{page[-1][0]}:{page[-1][1]}" if len(found) > limit else None
        return {"nodes": nodes, "relationships": rels, "next": nxt, "truncated": walk.truncated,
                "total": len(walk.depth) - 1}

    # --- queries ------------------------------------------------------------------------------

    async def neighbors(self, who: Principal, id: UUID, *, direction: Direction = "out",
                        kinds: Iterable[str] | None = None, depth: int = 1, as_of: datetime | None = None,
                        limit: int = 100, cursor: str | None = None) -> dict[str, Any]:
        """Entities within ``depth`` steps, each with the depth it was found at and the
        relationship that reached it; one page at a time."""
        direction, depth, kinds_ = check_direction(direction), check_depth(depth), _kinds(kinds)
        limit = check_depth(limit, cap=MAX_PAGE, name="limit")
        async with self.db.transaction(who.org_id) as conn:
            projects = await self._start(conn, who, [id], as_of)
            walk = await self._walk(conn, who, [id], direction, kinds_, depth, projects, as_of,
                                    self.max_nodes)
            return await self._page(conn, who, walk, limit, cursor)

    async def dependents(self, who: Principal, id: UUID, *, kinds: Iterable[str] | None = None,
                         depth: int | None = None, as_of: datetime | None = None, limit: int = 100,
                         cursor: str | None = None) -> dict[str, Any]:
        """What depends on this: everything that reaches it through ``kinds`` (incoming edges),
        to ``depth`` or to the end (None), with the depth each was found at."""
        depth = MAX_DEPTH_TO_END if depth is None else check_depth(depth, cap=MAX_DEPTH_TO_END)
        kinds_ = _kinds(kinds)
        limit = check_depth(limit, cap=MAX_PAGE, name="limit")
        async with self.db.transaction(who.org_id) as conn:
            projects = await self._start(conn, who, [id], as_of)
            walk = await self._walk(conn, who, [id], "in", kinds_, depth, projects, as_of, self.max_nodes)
            return await self._page(conn, who, walk, limit, cursor)

    async def subgraph(self, who: Principal, roots: list[UUID], *, depth: int = 2,
                       kinds: Iterable[str] | None = None, direction: Direction = "both",
                       limit: int = 1000, as_of: datetime | None = None) -> dict[str, Any]:
        """The entities within ``depth`` of the roots and every relationship among them, in one
        call, capped at ``limit`` nodes (``truncated`` when the cap cut it)."""
        if not roots or len(roots) > MAX_ROOTS:
            raise InvalidInput(f"roots is a list of 1 to {MAX_ROOTS} entity ids", pointer="/roots")
        direction, depth, kinds_ = check_direction(direction), check_depth(depth), _kinds(kinds)
        limit = check_depth(limit, cap=10 * MAX_PAGE, name="limit")
        async with self.db.transaction(who.org_id) as conn:
            projects = await self._start(conn, who, roots, as_of)
            walk = await self._walk(conn, who, roots, direction, kinds_, depth, projects, as_of, limit)
            nodes = list(walk.depth)
            edges = await self._step(conn, who, nodes, "out", kinds_, projects, as_of,
                                     limit=len(nodes) * 64 + 1000)
            inside = set(nodes)
            summaries = await self._summaries(conn, who, nodes)
        rels = [{"id": str(rel), "from": str(frm), "to": str(to), "kind": kind}
                for rel, frm, to, kind in edges if to in inside]
        return {"nodes": [{**summaries.get(n, {"id": str(n)}), "depth": walk.depth[n]} for n in nodes],
                "relationships": rels, "truncated": walk.truncated}

    async def path(self, who: Principal, src: UUID, dst: UUID, *, kinds: Iterable[str] | None = None,
                   max_depth: int = 6, direction: Direction = "out", all_paths: bool = False,
                   max_paths: int = 10, as_of: datetime | None = None) -> dict[str, Any]:
        """The shortest path(s) from ``src`` to ``dst`` (following edges out, in or both ways),
        by a breadth-first search from both ends; with ``all_paths``, every shortest path up to
        ``max_paths``. ``paths`` is empty when none is within ``max_depth``."""
        direction, max_depth, kinds_ = check_direction(direction), check_depth(max_depth, name="max_depth"), \
            _kinds(kinds)
        max_paths = check_depth(max_paths, cap=MAX_PATHS, name="max_paths") if all_paths else 1
        back: Direction = {"out": "in", "in": "out", "both": "both"}[direction]  # type: ignore[assignment]
        async with self.db.transaction(who.org_id) as conn:
            projects = await self._start(conn, who, [src, dst], as_of)
            if src == dst:
                return {"length": 0, "paths": [{"nodes": [{"id": str(src)}], "relationships": []}],
                        "truncated": False}
            # parents[side][node] = [(relationship, neighbour one step closer to that side's start)]
            parents: list[dict[UUID, list[tuple[UUID, UUID, str]]]] = [{src: []}, {dst: []}]
            frontiers = [[src], [dst]]
            dirs = [direction, back]
            length, meet, truncated = 0, [], False
            while length < max_depth and frontiers[0] and frontiers[1]:
                side = 0 if len(frontiers[0]) <= len(frontiers[1]) else 1
                seen = parents[side]
                level: dict[UUID, list[tuple[UUID, UUID, str]]] = {}
                room = self.max_nodes - len(parents[0]) - len(parents[1])
                edges = await self._step(conn, who, frontiers[side], dirs[side], kinds_, projects, as_of,
                                         limit=max(room, 0) * 2 + 1000)
                for rel, frm, to, kind in edges:
                    if to not in seen:
                        level.setdefault(to, []).append((rel, frm, kind))
                seen.update(level)
                frontiers[side] = list(level)
                length += 1
                if len(parents[0]) + len(parents[1]) > self.max_nodes:
                    truncated = True
                    break
                meet = [n for n in level if n in parents[1 - side]]
                if meet:
                    break
            paths = _join(parents, meet, max_paths) if meet else []
            summaries = await self._summaries(conn, who, list({n for p in paths for n in p[0]}))
        return {"length": length if paths else None, "truncated": truncated,
                "paths": [{"nodes": [summaries.get(n, {"id": str(n)}) for n in nodes],
                           "relationships": [{"id": str(r), "kind": k} for r, k in rels]}
                          for nodes, rels in paths]}

    async def creates_cycle(self, who: Principal, src: UUID, dst: UUID, kind: str) -> bool:
        """Would a new ``src -> dst`` of ``kind`` close a cycle (does ``dst`` reach ``src``)?"""
        check_kind(kind)
        async with self.db.transaction(who.org_id) as conn:
            await self._start(conn, who, [src, dst], None)
            row = await (await conn.execute("SELECT relationship_reaches(%s, %s, %s, %s) AS yes",
                                            (who.org_id, dst, src, kind))).fetchone()
        return bool(row and row["yes"])

    async def lineage(self, who: Principal, id: UUID, *, kind: str = "derived_from", depth: int = MAX_DEPTH,
                      as_of: datetime | None = None) -> dict[str, Any]:
        """Where an entity came from (its ``derived_from`` chain back to the origin) and its
        copies (everything derived from it), each with its distance."""
        check_kind(kind)
        depth = check_depth(depth, cap=MAX_DEPTH_TO_END)
        async with self.db.transaction(who.org_id) as conn:
            projects = await self._start(conn, who, [id], as_of)
            back = await self._walk(conn, who, [id], "out", [kind], depth, projects, as_of, self.max_nodes)
            forth = await self._walk(conn, who, [id], "in", [kind], depth, projects, as_of, self.max_nodes)
            summaries = await self._summaries(conn, who, [*back.depth, *forth.depth])

        def listed(walk: Walk) -> list[dict[str, Any]]:
            return [{**summaries.get(n, {"id": str(n)}), "depth": d}
                    for n, d in sorted(walk.depth.items(), key=lambda x: (x[1], str(x[0]))) if d > 0]

        return {"ancestors": listed(back), "descendants": listed(forth),
                "truncated": back.truncated or forth.truncated}


def _join(parents: list[dict[UUID, list[tuple[UUID, UUID, str]]]], meet: list[UUID],
          cap: int) -> list[tuple[list[UUID], list[tuple[UUID, str]]]]:
    """Every shortest path through the meeting nodes (up to ``cap``), src side first."""

    def chains(side: int, node: UUID) -> Iterable[tuple[list[UUID], list[tuple[UUID, str]]]]:
        if not parents[side][node]:
            yield [node], []
            return
        for rel, prev, kind in parents[side][node]:
            for nodes, rels in chains(side, prev):
                yield [*nodes, node], [*rels, (rel, kind)]

    out: list[tuple[list[UUID], list[tuple[UUID, str]]]] = []
    for m in sorted(meet, key=str):
        for head_nodes, head_rels in chains(0, m):
            for tail_nodes, tail_rels in chains(1, m):
                out.append((head_nodes + tail_nodes[::-1][1:], head_rels + tail_rels[::-1]))
                if len(out) >= cap:
                    return out
    return out
