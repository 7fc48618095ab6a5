"""Graph questions, each answered by one SQL statement (one round trip).

Measured at a million nodes, the recursive CTE beat level-at-a-time loops in Python and in
PL/pgSQL, adjacency arrays and integer surrogate keys (see the README), provided its filters
sit inside the recursive step. So each query is a recursive CTE whose step reads one
covering index of ``relationships`` (out: ``(org_id, src, kind)``, in: ``(org_id, dst,
kind)``) and keeps only live edges of the wanted kinds whose far end is in a project the
caller may read: a traversal never passes through, or returns, what the caller cannot see.
The statement also checks the start, counts, caps (the recursion stops once ``max_nodes``
rows exist: ``truncated``) and joins summaries for one page only, so a traversal that finds
fifty thousand entities sends back one page and a count. As of a past time, the step reads
each edge's last version at or before that time from ``relationship_versions``.

The statements are prepared and always run their generic plan: planning one of these
recursive statements (0.15-0.25 ms) costs more than running it for a typical start, and
the plan that suits one start suits the next (measured the same on hubs' 60,000-node
answers); by default PostgreSQL kept re-planning some of them for every call. Each runs as
one statement with its org setting (``Database.read``: no BEGIN or COMMIT). Statements
whose rows become the answer send ids as text: building a UUID object per id and turning
it back into a string took a third of a subgraph call's time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Literal
from uuid import UUID

from psycopg.rows import tuple_row

from canvasdb.db import Database
from canvasdb.entities import utc
from canvasdb.errors import InvalidInput, NotFound, Unavailable
from canvasdb.graph.relationships import (
    check_kind,
    declares_acyclic,
    reaches,
    readable_projects,
    require_readable,
)
from canvasdb.tenancy import Principal

Direction = Literal["out", "in", "both"]
MAX_DEPTH = 10  # neighbours, paths and subgraphs
MAX_DEPTH_TO_END = 1000  # dependents "to the end" stop here (and at max_nodes)
MAX_NODES = 100_000  # rows a traversal may produce before it stops with truncated=True
MAX_ROOTS = 100
MAX_PAGE = 1000
MAX_PATHS = 100
PATH_FAST_MS = 100  # the path-enumerating query's time before the node-based one takes over
REACH_FAST_CAP = 2_000  # rows a reachability CTE may produce before it is redone level at a time
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_TITLE = "left(coalesce(x.data->>'title', x.data->>'name', x.data->>'text', x.data->>'label'), 200)"


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


# --- SQL building blocks ----------------------------------------------------------------------------
# Variants (direction, as of, kinds filter, access filter) are separate statements so that
# each gets its own prepared plan; they are built once per variant.


def _edges(node: str, direction: Literal["out", "in"], *, as_of: bool, kinds: bool, acl: bool) -> str:
    """A FROM item ``e(id, near, far, kind, fwd)``: the live edges with ``near = {node}``, going
    ``direction``, of the wanted kinds, whose far end the caller may read; ``fwd`` is true
    when ``near`` is the relationship's source (``direction`` out)."""
    near, far = ("src", "dst") if direction == "out" else ("dst", "src")
    fwd = "true" if direction == "out" else "false"
    filters = (" AND e.kind = ANY(%(kinds)s)" if kinds else "") + \
              (f" AND e.{far}_project = ANY(acl.p)" if acl else "")
    if not as_of:
        return (f"(SELECT e.id, e.{near} AS near, e.{far} AS far, e.kind, {fwd} AS fwd FROM relationships e"
                f" WHERE e.org_id = %(org)s AND e.{near} = {node} AND e.live{filters})")
    return (f"(SELECT e.id, e.{near} AS near, e.{far} AS far, e.kind, {fwd} AS fwd FROM ("
            f"SELECT DISTINCT ON (v.relationship_id) v.relationship_id AS id, v.src, v.dst, v.kind,"
            f" v.src_project, v.dst_project, v.deleted, v.end_deleted FROM relationship_versions v"
            f" WHERE v.org_id = %(org)s AND v.{near} = {node} AND v.at <= %(as_of)s"
            f" ORDER BY v.relationship_id, v.version DESC) e"
            f" WHERE NOT e.deleted AND NOT e.end_deleted{filters})")


def _step(node: str, direction: Direction, **flags: bool) -> str:
    if direction != "both":
        return _edges(node, direction, **flags)
    return f"({_edges(node, 'out', **flags)} UNION ALL {_edges(node, 'in', **flags)})"


def _prelude(*, acl: bool, as_of: bool, starts: str) -> str:
    """``acl`` (the caller's readable projects) and ``start`` (the start entities it may read)."""
    acl_cte = ("acl AS (SELECT coalesce(array_agg(project_id), '{}') AS p FROM project_members"
               " WHERE org_id = %(org)s AND user_id = %(user)s), ") if acl else ""
    # as of a moment: the entity existed then and its version of that moment is not a tombstone
    alive = ("s.created_at <= %(as_of)s AND NOT (SELECT v.deleted FROM entity_versions v"
             " WHERE v.org_id = s.org_id AND v.entity_id = s.id AND v.at <= %(as_of)s"
             " ORDER BY v.version DESC LIMIT 1)") if as_of else "NOT s.deleted"
    readable = " AND EXISTS (SELECT FROM acl WHERE s.project_id = ANY(acl.p))" if acl else ""
    return (f"{acl_cte}start AS (SELECT s.id FROM entities s WHERE s.org_id = %(org)s"
            f" AND s.id = ANY({starts}) AND {alive}{readable})")


def _recursion(direction: Direction, *, as_of: bool, kinds: bool, acl: bool) -> str:
    """``r(id, d)``: breadth first from ``start``, one row per node and depth reached."""
    step = _step("r.id", direction, as_of=as_of, kinds=kinds, acl=acl)
    return (f"r(id, d) AS (SELECT id, 0 FROM start UNION"
            f" SELECT e.far, r.d + 1 FROM r{', acl' if acl else ''}, LATERAL {step} e WHERE r.d < %(depth)s)")


@cache
def _reach_sql(direction: Direction, as_of: bool, kinds: bool, acl: bool) -> str:
    """Every node within %(depth)s and its depth (the start at 0), capped at %(cap)s rows."""
    return (f"WITH RECURSIVE {_prelude(acl=acl, as_of=as_of, starts='%(starts)s')},"
            f" {_recursion(direction, as_of=as_of, kinds=kinds, acl=acl)},"
            " capped AS (SELECT id, d FROM r LIMIT %(cap)s)"
            " SELECT id, min(d) AS depth, (SELECT count(*) FROM capped) >= %(cap)s AS truncated"
            " FROM capped GROUP BY id")


_BACK: dict[Direction, Direction] = {"out": "in", "in": "out", "both": "both"}


def _levels(direction: Literal["out", "in"], *, acl: bool) -> str:
    """``found(id, depth)`` and ``capped(id)`` (what counts against the cap) from
    ``graph_reach`` (migration 0009): level at a time, each node expanded once."""
    projects = "(SELECT p FROM acl)" if acl else "NULL"
    return (" found AS MATERIALIZED (SELECT id, 0 AS depth FROM start UNION ALL SELECT g.id, g.depth"
            f" FROM graph_reach(%(org)s, ARRAY(SELECT id FROM start), {direction == 'in'},"
            f" %(kinds)s::text[], {projects}, %(depth)s, %(cap)s) g),"
            " capped AS (SELECT id FROM found WHERE depth > 0),")


@cache
def _walk_sql(direction: Direction, as_of: bool, kinds: bool, acl: bool, via: bool,
              levels: bool = False) -> str:
    """Breadth-first from the start(s): ``found(id, depth)`` capped at %(cap)s rows, then rows of
    three sorts (column ``row``): 's' a readable start; 'n' a node of the page (after
    %(after_depth)s, %(after_id)s) with its summary, the count and the cap flag; with ``via``,
    'v' at most one row per node of the page: a relationship that reached it from a found node
    one level closer, with the relationship's own source (``frm``) and target (``too``).

    The 'v' rows come from the walk's own step, redone from the levels just before the page,
    kept only where they reach a node of the page, and one per node:
    rows sent back are O(page) however many edges a hub on the level before has (the
    statement reads them, within its timeout; it sent every one of them back, a million
    rows and 800 MB for a page of ten).

    With ``levels`` (a walk out or in, now, deeper than MAX_DEPTH: "to the end"), ``found``
    comes level at a time instead: the recursive CTE keeps a node once per depth it reaches
    it at, so around a cycle it went on to the depth limit, a thousand rows per node, and
    said ``truncated`` of an answer it had whole."""
    via_rows = ""
    if via:
        flags = {"as_of": as_of, "kinds": kinds, "acl": acl}
        via_rows = (
            " UNION ALL SELECT * FROM (SELECT DISTINCT ON (e.far, f.depth) 'v', e.far::text, f.depth + 1,"
            " NULL::text, NULL::text, NULL::text, e.id::text,"
            " (CASE WHEN e.fwd THEN e.near ELSE e.far END)::text, e.kind, NULL::bigint, NULL::boolean,"
            " (CASE WHEN e.fwd THEN e.far ELSE e.near END)::text"
            f" FROM found f{', acl' if acl else ''}, LATERAL {_step('f.id', direction, **flags)} e"
            # scalar subqueries: computed once (as a joined subquery, a generic plan re-ran it
            # for every found row)
            " WHERE f.depth BETWEEN (SELECT min(depth) - 1 FROM page) AND (SELECT max(depth) - 1 FROM page)"
            # the page as a jsonb object, built once: a key lookup per edge (a semi-join with
            # the page was planned as nested loops, every edge against every page node)
            " AND (SELECT jsonb_object_agg(id::text || ' ' || depth, 1) FROM page)"
            " ? (e.far::text || ' ' || (f.depth + 1))"
            " ORDER BY e.far, f.depth, f.id, e.id) via")
    if levels:
        assert direction != "both" and not as_of
        walk = _levels(direction, acl=acl)
    else:
        walk = (f" {_recursion(direction, as_of=as_of, kinds=kinds, acl=acl)},"
                " capped AS (SELECT id, d FROM r LIMIT %(cap)s),"
                " found AS MATERIALIZED (SELECT id, min(d) AS depth FROM capped GROUP BY id),")
    return (
        f"WITH RECURSIVE {_prelude(acl=acl, as_of=as_of, starts='%(starts)s')},{walk}"
        " page AS MATERIALIZED (SELECT id, depth FROM found"
        " WHERE depth > 0 AND (depth, id) > (%(after_depth)s, %(after_id)s)"
        " ORDER BY depth, id LIMIT %(limit)s)"
        f" SELECT 'n' AS row, p.id::text, p.depth, x.type, x.project_id::text, {_TITLE} AS title,"
        " NULL AS rel, NULL AS frm, NULL AS kind, NULL::bigint AS total, NULL::boolean AS truncated,"
        " NULL AS too"
        " FROM page p JOIN entities x ON x.org_id = %(org)s AND x.id = p.id"
        # the count and the cap flag on the start rows: present also when the page is empty
        " UNION ALL SELECT 's', id::text, 0, NULL, NULL, NULL, NULL, NULL, NULL,"
        " (SELECT count(*) FROM found WHERE depth > 0), (SELECT count(*) FROM capped) >= %(cap)s,"
        " NULL FROM start"
        f"{via_rows}")


@cache
def _subgraph_sql(direction: Direction, as_of: bool, kinds: bool, acl: bool) -> str:
    """A subgraph in one statement: the walk's ``found`` as in ``_walk_sql``, then rows of three
    sorts (column ``row``): 'n' a node with its summary (the readable starts at depth 0, then
    the first %(limit)s others by depth and id); 'e' each live edge between two of those
    nodes; 't' the count of nodes found beyond the starts and the cap flag."""
    among = _edges("n.id", "out", as_of=as_of, kinds=kinds, acl=False)  # both ends already readable
    return (
        f"WITH RECURSIVE {_prelude(acl=acl, as_of=as_of, starts='%(starts)s')},"
        f" {_recursion(direction, as_of=as_of, kinds=kinds, acl=acl)},"
        " capped AS (SELECT id, d FROM r LIMIT %(cap)s),"
        " found AS MATERIALIZED (SELECT id, min(d) AS depth FROM capped GROUP BY id),"
        " page AS MATERIALIZED (SELECT id, depth FROM found WHERE depth > 0 ORDER BY depth, id"
        " LIMIT %(limit)s),"
        " nodes AS MATERIALIZED (SELECT id, 0 AS depth FROM start UNION ALL SELECT id, depth FROM page)"
        f" SELECT 'n' AS row, p.id::text, p.depth, x.type, x.project_id::text, {_TITLE} AS title,"
        " NULL AS rel, NULL AS frm, NULL AS kind, NULL::bigint AS total,"
        " NULL::boolean AS truncated"
        " FROM nodes p JOIN entities x ON x.org_id = %(org)s AND x.id = p.id"
        " UNION ALL SELECT 'e', e.far::text, NULL, NULL, NULL, NULL, e.id::text, e.near::text, e.kind,"
        " NULL, NULL"
        # the far end checked against an array computed once: as a semi-join, the planner
        # crossed the nodes with themselves before looking edges up
        f" FROM nodes n, LATERAL {among} e WHERE e.far = ANY(ARRAY(SELECT id FROM nodes))"
        " UNION ALL SELECT 't', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
        " (SELECT count(*) FROM found WHERE depth > 0), (SELECT count(*) FROM capped) >= %(cap)s")


@cache
def _simple_paths_sql(direction: Direction, as_of: bool, kinds: bool, acl: bool) -> str:
    """Simple paths from %(src)s, level by level: the first ones to reach %(dst)s are the
    shortest, and LIMIT stops the recursion there. Fast when a path exists; when none
    does, it enumerates every simple path up to the depth, so it runs under a short
    timeout and ``_node_paths_sql`` answers instead."""
    flags = {"as_of": as_of, "kinds": kinds, "acl": acl}
    acl_from = ", acl" if acl else ""
    return (
        f"WITH RECURSIVE {_prelude(acl=acl, as_of=as_of, starts='ARRAY[%(src)s, %(dst)s]::uuid[]')},"
        " r(id, d, nodes, rels, kinds) AS ("
        " SELECT %(src)s::uuid, 0, ARRAY[%(src)s::uuid], '{}'::uuid[], '{}'::text[]"
        " WHERE (SELECT count(*) FROM start) = CASE WHEN %(src)s::uuid = %(dst)s::uuid THEN 1 ELSE 2 END"
        " UNION ALL"
        f" SELECT e.far, r.d + 1, r.nodes || e.far, r.rels || e.id, r.kinds || e.kind FROM r{acl_from},"
        f" LATERAL {_step('r.id', direction, **flags)} e"
        " WHERE r.d < %(depth)s AND r.id <> %(dst)s AND e.far <> ALL(r.nodes))"
        " SELECT d, nodes, rels, kinds FROM (SELECT * FROM r WHERE id = %(dst)s LIMIT %(paths)s) hits"
        " UNION ALL SELECT -1, NULL, NULL, NULL FROM start WHERE id = %(src)s"
        " UNION ALL SELECT -2, NULL, NULL, NULL FROM start WHERE id = %(dst)s")


@cache
def _node_paths_sql(direction: Direction, as_of: bool, kinds: bool, acl: bool) -> str:
    """Shortest paths in two walks: breadth first from %(src)s over nodes (each node and
    depth once, as the CTE does, so a miss costs no more than the reachable set), then from
    %(dst)s back through nodes found one level closer, which yields only shortest paths
    (up to %(paths)s of them)."""
    flags = {"as_of": as_of, "kinds": kinds, "acl": acl}
    acl_from = ", acl" if acl else ""
    back = _BACK[direction]
    return (
        f"WITH RECURSIVE {_prelude(acl=acl, as_of=as_of, starts='ARRAY[%(src)s, %(dst)s]::uuid[]')},"
        " r(id, d) AS (SELECT %(src)s::uuid, 0"
        " WHERE (SELECT count(*) FROM start) = CASE WHEN %(src)s::uuid = %(dst)s::uuid THEN 1 ELSE 2 END"
        f" UNION SELECT e.far, r.d + 1 FROM r{acl_from}, LATERAL {_step('r.id', direction, **flags)} e"
        " WHERE r.d < %(depth)s AND r.id <> %(dst)s),"
        " found AS MATERIALIZED (SELECT id, min(d) AS d FROM r GROUP BY id),"
        " back(id, d, nodes, rels, kinds) AS ("
        " SELECT id, d, ARRAY[id], '{}'::uuid[], '{}'::text[] FROM found WHERE id = %(dst)s"
        f" UNION ALL SELECT e.far, b.d - 1, e.far || b.nodes, e.id || b.rels, e.kind || b.kinds"
        f" FROM back b{acl_from}, LATERAL {_step('b.id', back, **flags)} e, found f"
        " WHERE b.d > 0 AND f.id = e.far AND f.d = b.d - 1)"
        " SELECT d, nodes, rels, kinds FROM (SELECT * FROM back WHERE d = 0 LIMIT %(paths)s) hits"
        " UNION ALL SELECT -1, NULL, NULL, NULL FROM start WHERE id = %(src)s"
        " UNION ALL SELECT -2, NULL, NULL, NULL FROM start WHERE id = %(dst)s")


_SUMMARIES = (f"SELECT x.id, x.type, x.project_id, {_TITLE} AS title FROM entities x"
              " WHERE x.org_id = %(org)s AND x.id = ANY(%(ids)s)")


def _walk_tag(starts: list[UUID], direction: str, kinds: list[str] | None, depth: int,
              as_of: datetime | None) -> str:
    """Names the walk a page cursor belongs to: another walk's cursor would start its pages at
    an arbitrary point, and silently (the page size may change between pages)."""
    moment = utc(as_of)
    # the instant, the same in any zone; as a difference, which exists where a UTC time does not
    # (9999-12-31T23:59:59-01:00)
    instant = (moment - _EPOCH) // _MICROSECOND if moment is not None else None
    key = repr((sorted(set(map(str, starts))), direction, sorted(set(kinds)) if kinds is not None else None,
                depth, instant))
    return hashlib.blake2b(key.encode(), digest_size=4).hexdigest()


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(row["id"]), "type": row["type"], "project_id": str(row["project_id"]),
            "title": row["title"]}


class Graph:
    """The graph queries of the Python API (and of the HTTP API, which calls them)."""

    def __init__(self, db: Database, *, max_nodes: int = MAX_NODES) -> None:
        self.db = db
        self.max_nodes = max_nodes

    async def _params(self, who: Principal, *, as_of: datetime | None = None, **more: Any) -> dict[str, Any]:
        """A query's parameters; as of a past moment, once that moment is settled (``Horizon``)."""
        moment = utc(as_of)
        await self.db.horizon.settle(moment)
        return {"org": who.org_id, "user": who.user_id, "as_of": moment, **more}

    async def _walk(self, who: Principal, starts: list[UUID], direction: Direction, kinds: list[str] | None,
                    depth: int, as_of: datetime | None, *, limit: int, cursor: str | None,
                    cap: int, via: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(rows of the page, {total, truncated}) of a walk; NotFound unless every start is readable."""
        after_depth, after_id = 0, UUID(int=0)
        tag = _walk_tag(starts, direction, kinds, depth, as_of)
        if cursor is not None:
            try:
                c_depth, c_id, c_tag = cursor.split(":")
                after_depth, after_id = int(c_depth), UUID(c_id)
            except ValueError:
                raise InvalidInput("cursor is not one this API returned", pointer="/cursor") from None
            if c_tag != tag:
                raise InvalidInput("the cursor belongs to another query (start, direction, kinds, depth or"
                                   " as_of differ): ask for the first page without it", pointer="/cursor")
        levels = depth > MAX_DEPTH and as_of is None and direction != "both"
        sql = _walk_sql(direction, as_of is not None, kinds is not None, not who.is_org_admin, via, levels)
        # one node more than the page: whether another page follows
        params = await self._params(who, starts=starts, kinds=kinds, as_of=as_of, depth=depth, cap=cap,
                              limit=limit + 1, after_depth=after_depth, after_id=after_id)
        # (row, id, depth, type, project_id, title, rel, frm, kind, total, truncated, too): tuples;
        # at most one 'v' row per page node, and only the page becomes dicts
        rows = await self.db.read(who.org_id, sql, params, generic_plans=True, row_factory=tuple_row)
        started = [r for r in rows if r[0] == "s"]
        readable = {r[1] for r in started}
        for s in starts:
            if str(s) not in readable:
                raise NotFound(f"entity {s} not found")
        via_edge = {(r[1], r[2]): r for r in rows if r[0] == "v"}
        page = []
        for r in sorted((r for r in rows if r[0] == "n"), key=lambda r: (r[2], r[1])):
            edge = via_edge.get((r[1], r[2]))
            page.append({"id": r[1], "depth": r[2], "type": r[3], "project_id": r[4], "title": r[5],
                         "rel": edge[6] if edge else None, "frm": edge[7] if edge else None,
                         "to": edge[11] if edge else None, "kind": edge[8] if edge else None})
        meta = {"total": started[0][9], "truncated": bool(started[0][10]), "more": len(page) > limit,
                "tag": tag}
        return page[:limit], meta

    def _listing(self, page: list[dict[str, Any]], meta: dict[str, Any], limit: int) -> dict[str, Any]:
        nodes = [{**_summary(r), "depth": r["depth"]} for r in page]
        # "from" and "to" are the relationship's own source and target, whichever way it was walked
        rels = [{"id": str(r["rel"]), "from": str(r["frm"]), "to": str(r["to"]), "kind": r["kind"]}
                for r in page if r["rel"] is not None]
        last = page[-1] if page and meta["more"] else None
        return {"nodes": nodes, "relationships": rels, "total": meta["total"], "truncated": meta["truncated"],
                "next": f"{last['depth']}:{last['id']}:{meta['tag']}" if last is not None else None}

    # --- queries ------------------------------------------------------------------------------

    async def neighbors(self, who: Principal, id: UUID, *, direction: Direction = "out",
                        kinds: Iterable[str] | None = None, depth: int = 1, as_of: datetime | None = None,
                        limit: int = 100, cursor: str | None = None) -> dict[str, Any]:
        """Entities within ``depth`` steps, each with the depth it was first found at and the
        relationship that reached it; one page at a time (``next`` is the cursor)."""
        direction, depth, kinds_ = check_direction(direction), check_depth(depth), _kinds(kinds)
        limit = check_depth(limit, cap=MAX_PAGE, name="limit")
        page, meta = await self._walk(who, [id], direction, kinds_, depth, as_of, limit=limit, cursor=cursor,
                                      cap=self.max_nodes)
        return self._listing(page, meta, limit)

    async def reachable(self, who: Principal, id: UUID, *, direction: Direction = "out",
                        kinds: Iterable[str] | None = None, depth: int = 1,
                        as_of: datetime | None = None) -> dict[str, Any]:
        """Every entity within ``depth`` steps and the depth it was first found at, as
        ``{"found": {id: depth}, "truncated": bool}``: no summaries, no pages, what impact
        analysis and "what depends on this?" (``direction="in"``) need. Capped at
        ``max_nodes``. A small answer comes from the recursive CTE; one that outgrows
        REACH_FAST_CAP rows is redone level at a time (``graph_reach``), which expands each
        node once instead of once per depth it is reached at."""
        direction = check_direction(direction)
        depth = check_depth(depth, cap=MAX_DEPTH_TO_END)
        kinds_ = _kinds(kinds)
        acl = not who.is_org_admin
        fallback = as_of is None and direction != "both" and self.max_nodes > REACH_FAST_CAP
        params = await self._params(who, starts=[id], kinds=kinds_, as_of=as_of, depth=depth,
                              cap=REACH_FAST_CAP if fallback else self.max_nodes)
        sql = _reach_sql(direction, as_of is not None, kinds_ is not None, acl)
        rows = await self.db.read(who.org_id, sql, params, generic_plans=True, row_factory=tuple_row)
        if not rows:
            raise NotFound(f"entity {id} not found")
        truncated = bool(rows[0][2])
        if truncated and fallback:
            async with self.db.transaction(who.org_id) as conn:
                projects = await readable_projects(conn, who) if acl else None
                async with conn.cursor(row_factory=tuple_row) as cur:
                    await cur.execute("SELECT id, depth FROM graph_reach(%s, %s, %s, %s, %s, %s, %s)",
                                      (who.org_id, [id], direction == "in", kinds_, projects, depth,
                                       self.max_nodes))
                    found = dict(await cur.fetchall())
            return {"found": found, "truncated": len(found) >= self.max_nodes}
        return {"found": {r[0]: r[1] for r in rows if r[1] > 0}, "truncated": truncated}

    async def dependents(self, who: Principal, id: UUID, *, kinds: Iterable[str] | None = None,
                         depth: int | None = None, as_of: datetime | None = None, limit: int = 100,
                         cursor: str | None = None) -> dict[str, Any]:
        """What depends on this: everything that reaches it through ``kinds`` (incoming edges),
        to ``depth`` or to the end (None), with the depth each was found at."""
        depth = MAX_DEPTH_TO_END if depth is None else check_depth(depth, cap=MAX_DEPTH_TO_END)
        limit = check_depth(limit, cap=MAX_PAGE, name="limit")
        page, meta = await self._walk(who, [id], "in", _kinds(kinds), depth, as_of, limit=limit,
                                      cursor=cursor,
                                      cap=self.max_nodes)
        return self._listing(page, meta, limit)

    async def subgraph(self, who: Principal, roots: list[UUID], *, depth: int = 2,
                       kinds: Iterable[str] | None = None, direction: Direction = "both",
                       limit: int = 1000, as_of: datetime | None = None) -> dict[str, Any]:
        """The entities within ``depth`` of the roots and every relationship among them, in one
        call, capped at ``limit`` nodes (``truncated`` when the cap cut it)."""
        if not roots or len(roots) > MAX_ROOTS:
            raise InvalidInput(f"roots is a list of 1 to {MAX_ROOTS} entity ids", pointer="/roots")
        direction, depth, kinds_ = check_direction(direction), check_depth(depth), _kinds(kinds)
        limit = check_depth(limit, cap=10 * MAX_PAGE, name="limit")
        roots = list(dict.fromkeys(roots))
        sql = _subgraph_sql(direction, as_of is not None, kinds_ is not None, not who.is_org_admin)
        # The recursion keeps a node once per depth it reaches it at: with room for every node
        # of the limit at every depth, hitting the cap means more nodes than the limit (with
        # four rows a node, a small clique walked ten deep said truncated of a whole answer).
        params = await self._params(who, starts=roots, kinds=kinds_, as_of=as_of, depth=depth,
                              cap=limit * (depth + 1) + 1, limit=max(limit - len(roots), 0))
        # (row, id, depth, type, project_id, title, rel, frm, kind, total, truncated)
        rows = await self.db.read(who.org_id, sql, params, generic_plans=True, row_factory=tuple_row)
        nodes = sorted((r for r in rows if r[0] == "n"), key=lambda r: (r[2], r[1]))
        readable = {r[1] for r in nodes if r[2] == 0}
        for root in roots:
            if str(root) not in readable:
                raise NotFound(f"entity {root} not found")
        total, capped = next(r[9:] for r in rows if r[0] == "t")
        return {"nodes": [{"id": r[1], "type": r[3], "project_id": r[4], "title": r[5],
                           "depth": r[2]} for r in nodes],
                "relationships": [{"id": r[6], "from": r[7], "to": r[1], "kind": r[8]}
                                  for r in rows if r[0] == "e"],
                "truncated": bool(capped) or total > limit - len(roots)}

    async def path(self, who: Principal, src: UUID, dst: UUID, *, kinds: Iterable[str] | None = None,
                   max_depth: int = 6, direction: Direction = "out", all_paths: bool = False,
                   max_paths: int = 10, as_of: datetime | None = None) -> dict[str, Any]:
        """The shortest path from ``src`` to ``dst`` (following edges out, in or both ways), or
        with ``all_paths`` every shortest path up to ``max_paths`` (``truncated`` when there
        are more); ``paths`` is empty (and ``length`` None) when none is within ``max_depth``."""
        direction = check_direction(direction)
        max_depth = check_depth(max_depth, name="max_depth")
        kinds_ = _kinds(kinds)
        paths_cap = check_depth(max_paths, cap=MAX_PATHS, name="max_paths") if all_paths else 1
        variant = (direction, as_of is not None, kinds_ is not None, not who.is_org_admin)
        params = await self._params(who, src=src, dst=dst, kinds=kinds_, as_of=as_of, depth=max_depth,
                              paths=paths_cap * 4 if all_paths else 1)
        async def summaries(conn: Any, hits: list[dict[str, Any]]) -> dict[UUID, dict[str, Any]]:
            ids = list({n for r in hits for n in r["nodes"]})
            cur = await conn.execute(_SUMMARIES, await self._params(who, ids=ids))
            return {r["id"]: _summary(r) for r in await cur.fetchall()}

        try:
            async with self.db.transaction(who.org_id, generic_plans=True) as conn:
                await conn.execute(f"SET LOCAL statement_timeout = {PATH_FAST_MS}")
                cur = await conn.execute(_simple_paths_sql(*variant), params)
                rows = await cur.fetchall()
                hits = [r for r in rows if r["d"] >= 0]
                shortest = min((r["d"] for r in hits), default=None)
                # the hits come level by level, so more than the cap at the shortest length
                # (the statement returns up to 4 times the cap) means some were left out
                hits = [r for r in hits if r["d"] == shortest]
                truncated, hits = len(hits) > paths_cap, hits[:paths_cap]
                found = await summaries(conn, hits)
        except Unavailable:  # many simple paths and no hit: walk nodes instead, each once
            params["paths"] = paths_cap + 1 if all_paths else 1  # one more: was any left out?
            async with self.db.transaction(who.org_id, generic_plans=True) as conn:
                rows = await (await conn.execute(_node_paths_sql(*variant), params)).fetchall()
                hits = [r for r in rows if r["d"] >= 0]  # every one a shortest path
                shortest = len(hits[0]["nodes"]) - 1 if hits else None
                truncated, hits = len(hits) > paths_cap, hits[:paths_cap]
                found = await summaries(conn, hits)
        seen = {r["d"] for r in rows if r["d"] < 0}
        if -1 not in seen:
            raise NotFound(f"entity {src} not found")
        if -2 not in seen:
            raise NotFound(f"entity {dst} not found")
        return {"length": shortest, "truncated": all_paths and truncated,
                "paths": [{"nodes": [found.get(n, {"id": str(n)}) for n in r["nodes"]],
                           "relationships": [{"id": str(rel), "kind": k}
                                             for rel, k in zip(r["rels"], r["kinds"], strict=True)]}
                          for r in hits]}

    async def creates_cycle(self, who: Principal, src: UUID, dst: UUID, kind: str) -> bool:
        """Would a new ``src -> dst`` of ``kind`` close a cycle (does ``dst`` reach ``src``)?
        For a kind that ``src``'s type declares acyclic, every edge counts, readable or not, as
        it does for the refusal of such an edge; for any other kind nothing would be refused,
        and the answer passes only through what the caller may read, as ``path`` does."""
        check_kind(kind)
        async with self.db.transaction(who.org_id) as conn:
            projects = await readable_projects(conn, who)
            for end in (src, dst):
                await require_readable(conn, who, end, projects)
            if projects is not None and await declares_acyclic(conn, who.org_id, src, kind):
                projects = None
            return await reaches(conn, who.org_id, dst, src, kind, projects=projects)

    async def lineage(self, who: Principal, id: UUID, *, kind: str = "derived_from", depth: int = MAX_DEPTH,
                      as_of: datetime | None = None) -> dict[str, Any]:
        """Where an entity came from (its ``derived_from`` chain back to the origin) and its
        copies (everything derived from it), each with its distance, within ``depth`` steps;
        up to MAX_PAGE of each, nearest first, ``truncated`` when either side had more (or
        the walk reached ``max_nodes``)."""
        check_kind(kind)
        depth = check_depth(depth, cap=MAX_DEPTH_TO_END)
        back, back_meta = await self._walk(who, [id], "out", [kind], depth, as_of, limit=MAX_PAGE,
                                           cursor=None,
                                           cap=self.max_nodes, via=False)
        forth, forth_meta = await self._walk(who, [id], "in", [kind], depth, as_of, limit=MAX_PAGE,
                                             cursor=None,
                                             cap=self.max_nodes, via=False)
        cut = any(meta["truncated"] or meta["total"] > len(page)
                  for page, meta in ((back, back_meta), (forth, forth_meta)))
        return {"ancestors": [{**_summary(r), "depth": r["depth"]} for r in back],
                "descendants": [{**_summary(r), "depth": r["depth"]} for r in forth],
                "truncated": cut}
