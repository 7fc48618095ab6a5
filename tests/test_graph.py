"""The graph: relationships (versions, reference fields, deletion of ends) and the queries on them."""

from __future__ import annotations

import asyncio
import random
from collections import deque
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import httpx
import pytest
from conftest import Tenant

from canvasdb.db import Database
from canvasdb.entities import EntityStore, EntityType
from canvasdb.errors import Conflict, Gone, InvalidInput, NotFound
from canvasdb.graph import Graph
from canvasdb.graph import traverse as graph_module
from canvasdb.graph.traverse import REACH_FAST_CAP
from canvasdb.services import Services
from canvasdb.tenancy import Principal


async def node(svc: Services, t: Tenant, title: str = "n", type: str = "task", project: UUID | None = None,
               **data: object) -> UUID:
    e = await svc.entities.create(t.owner, project or t.project_id, type, {"title": title, **data})
    return e.id


async def editor(svc: Services, t: Tenant) -> Principal:
    """A new member of the org, editor of the tenant's project and of no other."""
    user = await svc.tenancy.ensure_user(f"m-{uuid4().hex[:8]}@example.com")
    await svc.tenancy.set_org_role(t.org_id, user, "member")
    await svc.tenancy.set_project_role(t.owner, t.project_id, user, "editor")
    return Principal(org_id=t.org_id, user_id=user, org_role="member")


async def test_create_read_update_delete_with_history(svc: Services, tenant: Tenant) -> None:
    a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
    rel = await svc.relationships.create(tenant.owner, a, b, "board.edge", {"label": "x"})
    assert (rel.src, rel.dst, rel.kind, rel.version, rel.live) == (a, b, "board.edge", 1, True)
    created = datetime.now(UTC)
    await asyncio.sleep(0.01)
    rel2 = await svc.relationships.update(tenant.owner, rel.id, {"label": "y"}, if_version=1)
    assert rel2.version == 2 and rel2.data == {"label": "y"}
    with pytest.raises(Conflict):
        await svc.relationships.update(tenant.owner, rel.id, {"label": "z"}, if_version=1)
    await svc.relationships.delete(tenant.owner, rel.id)
    with pytest.raises(Gone):
        await svc.relationships.get(tenant.owner, rel.id)
    old = await svc.relationships.get(tenant.owner, rel.id, as_of=created)
    assert old.data == {"label": "x"} and old.live
    ops = [v["op"] for v in await svc.relationships.history(tenant.owner, rel.id)]
    assert ops == ["create", "update", "delete"]
    assert (await svc.relationships.undelete(tenant.owner, rel.id)).live


async def test_dangling_ends_and_other_orgs_are_refused(svc: Services, tenant: Tenant,
                                                        other_tenant: Tenant) -> None:
    a = await node(svc, tenant)
    theirs = await node(svc, other_tenant)
    for dst in (uuid4(), theirs):
        with pytest.raises(InvalidInput) as err:
            await svc.relationships.create(tenant.owner, a, dst, "depends_on")
        assert err.value.fields["pointer"] == "/dst"
    with pytest.raises(InvalidInput):
        await svc.relationships.create(tenant.owner, a, a, "Bad Kind")
    rel = await svc.relationships.create(tenant.owner, a, a, "depends_on")  # a self-loop is allowed
    with pytest.raises(NotFound):
        await svc.relationships.get(other_tenant.owner, rel.id)
    with pytest.raises(NotFound):
        await svc.graph.neighbors(other_tenant.owner, a)


async def test_deleting_an_entity_hides_its_relationships_and_undelete_restores_them(
        svc: Services, tenant: Tenant) -> None:
    a, b, c = [await node(svc, tenant, x) for x in "abc"]
    ab = await svc.relationships.create(tenant.owner, a, b, "depends_on")
    cb = await svc.relationships.create(tenant.owner, c, b, "depends_on")
    gone = await svc.relationships.create(tenant.owner, b, c, "mentions")
    await svc.relationships.delete(tenant.owner, gone.id)  # deleted on its own: stays deleted
    await svc.entities.delete(tenant.owner, b)
    for rel in (ab, cb):
        with pytest.raises(Gone):
            await svc.relationships.get(tenant.owner, rel.id)
    assert (await svc.graph.neighbors(tenant.owner, a))["nodes"] == []
    await svc.entities.undelete(tenant.owner, b)
    assert (await svc.relationships.get(tenant.owner, ab.id)).live
    assert (await svc.relationships.get(tenant.owner, cb.id)).live
    with pytest.raises(Gone):
        await svc.relationships.get(tenant.owner, gone.id)
    ops = [v["op"] for v in await svc.relationships.history(tenant.owner, ab.id)]
    assert ops == ["create", "delete", "undelete"]


async def test_reference_fields_become_relationships(svc: Services, tenant: Tenant) -> None:
    await svc.types.register(tenant.owner, EntityType(
        name="task", reference_fields=["$.depends_on[*]", "$.parent"], acyclic_kinds=["depends_on"]))
    b, c, p = [await node(svc, tenant, x) for x in "bcp"]
    a = await node(svc, tenant, "a", depends_on=[str(b), str(c)], parent=str(p))

    async def out(kind: str) -> set[str]:
        page = await svc.graph.neighbors(tenant.owner, a, kinds=[kind])
        return {n["id"] for n in page["nodes"]}

    assert await out("depends_on") == {str(b), str(c)}
    assert await out("parent") == {str(p)}
    await svc.entities.patch(tenant.owner, a, {"depends_on": [str(c)], "parent": None})
    assert await out("depends_on") == {str(c)}
    assert await out("parent") == set()
    await svc.entities.patch(tenant.owner, a, {"depends_on": [str(b), str(c)]})  # b comes back
    assert await out("depends_on") == {str(b), str(c)}
    with pytest.raises(InvalidInput, match="does not exist"):
        await svc.entities.patch(tenant.owner, a, {"depends_on": [str(uuid4())]})
    with pytest.raises(InvalidInput, match="not an entity id"):
        await svc.entities.patch(tenant.owner, a, {"parent": "not-a-uuid"})
    with pytest.raises(InvalidInput, match="cycle"):
        await svc.entities.patch(tenant.owner, c, {"depends_on": [str(a)]})
    assert await out("depends_on") == {str(b), str(c)}, "refused writes changed nothing"
    assert await svc.graph.creates_cycle(tenant.owner, b, a, "depends_on")
    assert not await svc.graph.creates_cycle(tenant.owner, a, b, "depends_on")
    with pytest.raises(InvalidInput, match="cycle"):
        await svc.relationships.create(tenant.owner, b, a, "depends_on")
    field_rel = (await svc.graph.neighbors(tenant.owner, a, kinds=["depends_on"]))["relationships"][0]
    with pytest.raises(Conflict, match="reference field"):
        await svc.relationships.delete(tenant.owner, UUID(field_rel["id"]))


def bfs(edges: list[tuple[UUID, UUID]], start: UUID, depth: int, reverse: bool = False) -> dict[UUID, int]:
    adj: dict[UUID, list[UUID]] = {}
    for s, d in edges:
        if reverse:
            s, d = d, s
        adj.setdefault(s, []).append(d)
    seen, todo = {start: 0}, deque([start])
    while todo:
        n = todo.popleft()
        if seen[n] == depth:
            continue
        for m in adj.get(n, []):
            if m not in seen:
                seen[m] = seen[n] + 1
                todo.append(m)
    return seen


async def test_traversals_match_a_reference_bfs_on_a_random_graph(svc: Services, tenant: Tenant) -> None:
    rng = random.Random(7)
    nodes = [await node(svc, tenant, f"n{i}") for i in range(60)]
    edges: list[tuple[UUID, UUID]] = []
    for _ in range(150):
        s, d = rng.choice(nodes), rng.choice(nodes)
        await svc.relationships.create(tenant.owner, s, d, "depends_on")
        edges.append((s, d))
    for start in rng.sample(nodes, 8):
        for depth in (1, 2, 4):
            want = {k: v for k, v in bfs(edges, start, depth).items() if v > 0}
            page = await svc.graph.neighbors(tenant.owner, start, depth=depth, limit=1000)
            assert {UUID(n["id"]): n["depth"] for n in page["nodes"]} == want
            got = await svc.graph.dependents(tenant.owner, start, depth=depth, limit=1000)
            assert {UUID(n["id"]): n["depth"] for n in got["nodes"]} == \
                {k: v for k, v in bfs(edges, start, depth, reverse=True).items() if v > 0}
        for direction, reverse in (("out", False), ("in", True)):
            want = {k: v for k, v in bfs(edges, start, 4, reverse=reverse).items() if v > 0}
            got = await svc.graph.reachable(tenant.owner, start, direction=direction, depth=4)
            assert got["found"] == want and not got["truncated"]
            # past the CTE's first cap, the level-at-a-time function answers the same
            graph_module.REACH_FAST_CAP = 3
            try:
                assert (await svc.graph.reachable(tenant.owner, start, direction=direction,
                                                  depth=4))["found"] == want
            finally:
                graph_module.REACH_FAST_CAP = REACH_FAST_CAP
        target = rng.choice(nodes)
        dist = bfs(edges, start, 6).get(target)
        found = await svc.graph.path(tenant.owner, start, target, max_depth=6, all_paths=True, max_paths=100)
        assert found["length"] == dist
        simple = graph_module._simple_paths_sql
        graph_module._simple_paths_sql = lambda *variant: "SELECT pg_sleep(1)"  # over its time: nodes
        try:
            by_nodes = await svc.graph.path(tenant.owner, start, target, max_depth=6, all_paths=True,
                                            max_paths=100)
        finally:
            graph_module._simple_paths_sql = simple
        assert by_nodes["length"] == dist
        assert sorted(str(p) for p in by_nodes["paths"]) == sorted(str(p) for p in found["paths"])
        for p in found["paths"]:
            ids = [UUID(n["id"]) for n in p["nodes"]]
            assert ids[0] == start and ids[-1] == target and len(ids) == (dist or 0) + 1
            assert all((x, y) in edges for x, y in zip(ids, ids[1:], strict=False))


async def test_pages_subgraph_and_caps(svc: Services, db, tenant: Tenant) -> None:
    hub = await node(svc, tenant, "hub")
    spokes = [await node(svc, tenant, f"s{i}") for i in range(30)]
    for s in spokes:
        await svc.relationships.create(tenant.owner, hub, s, "board.edge")
        await svc.relationships.create(tenant.owner, s, hub, "board.edge")  # cycles of length 2
    for limit in (7, 10, 30):  # 30 spokes: the last page is short, or exactly full
        seen, cursor, pages = [], None, 0
        while True:
            page = await svc.graph.neighbors(tenant.owner, hub, limit=limit, cursor=cursor)
            pages += 1
            assert page["nodes"] and page["total"] == 30, "no empty page, and the total on each"
            seen += [n["id"] for n in page["nodes"]]
            if (cursor := page["next"]) is None:
                break
        assert sorted(seen) == sorted(str(s) for s in spokes) and pages == -(-30 // limit)
    last = await svc.graph.dependents(tenant.owner, hub, limit=30)
    assert len(last["nodes"]) == 30 and last["next"] is None
    first = await svc.graph.neighbors(tenant.owner, hub, limit=5)
    _, _, tag = first["next"].split(":")
    after_the_end = await svc.graph.neighbors(tenant.owner, hub, limit=5, cursor=f"1:{max(seen)}:{tag}")
    assert after_the_end["nodes"] == [] and after_the_end["total"] == 30 and after_the_end["next"] is None
    sub = await svc.graph.subgraph(tenant.owner, [hub], depth=2, limit=10)
    assert len(sub["nodes"]) == 10 and sub["truncated"]
    full = await svc.graph.subgraph(tenant.owner, [hub], depth=2)
    assert len(full["nodes"]) == 31 and len(full["relationships"]) == 60 and not full["truncated"]
    capped = await Graph(db, max_nodes=10).dependents(tenant.owner, hub, limit=1000)
    assert capped["truncated"] and len(capped["nodes"]) <= 10
    for bad in ({"depth": 0}, {"depth": 11}, {"direction": "sideways"}, {"limit": 0}):
        with pytest.raises(InvalidInput):
            await svc.graph.neighbors(tenant.owner, hub, **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        await svc.graph.neighbors(tenant.owner, hub, cursor="nonsense")
    # another walk's cursor (other direction, kinds, depth or start) would start at an arbitrary point
    for other in ({"direction": "in"}, {"kinds": ["depends_on"]}, {"depth": 2}, {"id": spokes[0]}):
        with pytest.raises(InvalidInput, match="belongs to another query"):
            await svc.graph.neighbors(tenant.owner, **{"id": hub, **other}, cursor=first["next"])
    assert (await svc.graph.neighbors(tenant.owner, hub, limit=9, cursor=first["next"]))["nodes"], \
        "the same walk, another page size"
    moment = datetime.now(UTC)
    then = await svc.graph.neighbors(tenant.owner, hub, limit=5, as_of=moment)
    elsewhere = moment.astimezone(timezone(timedelta(hours=2)))  # the same instant, written elsewhere
    assert (await svc.graph.neighbors(tenant.owner, hub, limit=5, as_of=elsewhere, cursor=then["next"]))["nodes"]
    # an instant past what Python names in UTC, written in two zones: still the same walk
    late = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(-timedelta(hours=14)))
    then = await svc.graph.neighbors(tenant.owner, hub, limit=5, as_of=late)
    later = datetime(9999, 12, 31, 22, 59, 59, tzinfo=timezone(-timedelta(hours=15)))
    assert (await svc.graph.neighbors(tenant.owner, hub, limit=5, as_of=later, cursor=then["next"]))["nodes"]


async def test_a_subgraph_of_several_roots(svc: Services, tenant: Tenant, other_tenant: Tenant) -> None:
    a, b, c, d = [await node(svc, tenant, title) for title in "abcd"]
    ab = await svc.relationships.create(tenant.owner, a, b, "link")
    await svc.relationships.create(tenant.owner, b, c, "link")
    await svc.relationships.create(tenant.owner, c, d, "link")
    sub = await svc.graph.subgraph(tenant.owner, [a, b], depth=1)
    assert [(n["title"], n["depth"]) for n in sub["nodes"]][2:] == [("c", 1)]
    assert {n["title"] for n in sub["nodes"][:2]} == {"a", "b"} and not sub["truncated"]
    assert {(r["from"], r["to"]) for r in sub["relationships"]} == {(str(a), str(b)), (str(b), str(c))}
    assert str(ab.id) in {r["id"] for r in sub["relationships"]}
    tight = await svc.graph.subgraph(tenant.owner, [a, b], depth=2, limit=2)  # room for the roots only
    assert [n["depth"] for n in tight["nodes"]] == [0, 0] and tight["truncated"]
    assert [(r["from"], r["to"]) for r in tight["relationships"]] == [(str(a), str(b))]
    stranger = await node(svc, other_tenant, "theirs")
    for roots in ([a, stranger], [a, uuid4()]):
        with pytest.raises(NotFound):
            await svc.graph.subgraph(tenant.owner, roots)


async def test_traversals_never_pass_through_unreadable_projects(svc: Services, tenant: Tenant) -> None:
    secret = (await svc.tenancy.create_project(tenant.owner, "secret"))["id"]
    member = await editor(svc, tenant)
    a, c = await node(svc, tenant, "a"), await node(svc, tenant, "c")
    hidden = await node(svc, tenant, "hidden", project=secret)
    await svc.relationships.create(tenant.owner, a, hidden, "depends_on")
    await svc.relationships.create(tenant.owner, hidden, c, "depends_on")
    assert {n["title"] for n in (await svc.graph.neighbors(tenant.owner, a, depth=2))["nodes"]} == \
        {"hidden", "c"}
    assert (await svc.graph.neighbors(member, a, depth=2))["nodes"] == []
    assert (await svc.graph.path(member, a, c))["paths"] == []
    assert (await svc.graph.path(tenant.owner, a, c))["length"] == 2
    assert (await svc.graph.dependents(member, c, depth=5))["nodes"] == []
    assert (await svc.graph.reachable(member, a, depth=3))["found"] == {}
    graph_module.REACH_FAST_CAP = 1  # the level-at-a-time function filters by project too
    try:
        assert (await svc.graph.reachable(member, a, depth=3))["found"] == {}
        assert set((await svc.graph.reachable(tenant.owner, a, depth=3))["found"]) == {hidden, c}
    finally:
        graph_module.REACH_FAST_CAP = REACH_FAST_CAP
    assert set((await svc.graph.reachable(tenant.owner, a, depth=3))["found"]) == {hidden, c}
    with pytest.raises(NotFound):
        await svc.graph.neighbors(member, hidden)
    with pytest.raises(InvalidInput):
        await svc.relationships.create(member, a, hidden, "mentions")


async def test_the_cycle_question_counts_unreadable_edges_only_for_an_acyclic_kind(
        svc: Services, tenant: Tenant) -> None:
    """For a kind the source's type declares acyclic, the answer counts every edge of the org,
    as creating the edge would be refused for a path through any project; for any other kind
    nothing would be refused, and the answer is what the caller may read, as a path's is (it
    told a member whether entities it reads are linked through projects it cannot read)."""
    await svc.types.register(tenant.owner, EntityType(name="task", acyclic_kinds=["depends_on"]))
    secret = (await svc.tenancy.create_project(tenant.owner, "secret"))["id"]
    member = await editor(svc, tenant)
    a, c = await node(svc, tenant, "a"), await node(svc, tenant, "c")
    hidden = await node(svc, tenant, "hidden", project=secret)
    for kind in ("depends_on", "mentions"):
        await svc.relationships.create(tenant.owner, a, hidden, kind)
        await svc.relationships.create(tenant.owner, hidden, c, kind)
    assert await svc.graph.creates_cycle(member, c, a, "depends_on")
    with pytest.raises(InvalidInput, match="cycle"):
        await svc.relationships.create(member, c, a, "depends_on")
    assert not await svc.graph.creates_cycle(member, c, a, "mentions")
    assert (await svc.graph.path(member, a, c, kinds=["mentions"]))["paths"] == []
    assert await svc.graph.creates_cycle(tenant.owner, c, a, "mentions")
    await svc.relationships.create(tenant.owner, a, c, "mentions")  # a path the member reads
    assert await svc.graph.creates_cycle(member, c, a, "mentions")
    assert await svc.graph.creates_cycle(member, a, a, "mentions")  # a self-loop is a cycle


async def test_queries_as_of_a_past_time(svc: Services, tenant: Tenant) -> None:
    a, b, c = [await node(svc, tenant, x) for x in "abc"]
    ab = await svc.relationships.create(tenant.owner, a, b, "derived_from")
    await svc.relationships.create(tenant.owner, b, c, "derived_from")
    before = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await svc.relationships.delete(tenant.owner, ab.id)
    assert (await svc.graph.neighbors(tenant.owner, a, depth=2))["nodes"] == []
    then = await svc.graph.neighbors(tenant.owner, a, depth=2, as_of=before)
    assert [n["title"] for n in then["nodes"]] == ["b", "c"]
    lineage = await svc.graph.lineage(tenant.owner, b, as_of=before)
    assert [n["title"] for n in lineage["ancestors"]] == ["c"]
    assert [n["title"] for n in lineage["descendants"]] == ["a"]
    assert (await svc.graph.lineage(tenant.owner, b))["descendants"] == []
    # every query reads the relationships as they were then
    assert (await svc.graph.path(tenant.owner, a, c, as_of=before))["length"] == 2
    assert (await svc.graph.path(tenant.owner, a, c))["length"] is None
    assert len((await svc.graph.subgraph(tenant.owner, [a], depth=2, as_of=before))["nodes"]) == 3
    assert len((await svc.graph.subgraph(tenant.owner, [a], depth=2))["nodes"]) == 1
    then = await svc.graph.dependents(tenant.owner, c, as_of=before)
    assert [n["title"] for n in then["nodes"]] == ["b", "a"]
    assert [n["title"] for n in (await svc.graph.dependents(tenant.owner, c))["nodes"]] == ["b"]
    assert set((await svc.graph.reachable(tenant.owner, a, depth=2, as_of=before))["found"]) == {b, c}

    # a start deleted at that moment is not found then, as it is not now
    await svc.entities.delete(tenant.owner, b)
    deleted = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await svc.entities.undelete(tenant.owner, b)
    with pytest.raises(NotFound):
        await svc.graph.neighbors(tenant.owner, b, as_of=deleted)
    with pytest.raises(NotFound):
        await svc.graph.reachable(tenant.owner, b, as_of=deleted)
    assert [n["title"] for n in (await svc.graph.neighbors(tenant.owner, b, as_of=before))["nodes"]] == ["c"]


async def test_http_routes(client: httpx.AsyncClient, svc: Services, tenant: Tenant,
                           other_tenant: Tenant) -> None:
    a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
    base = f"/v1/orgs/{tenant.slug}"
    r = await client.post(f"{base}/relationships", headers=tenant.headers,
                          json={"src": str(a), "dst": str(b), "kind": "depends_on", "data": {"label": "x"}})
    assert r.status_code == 201, r.text
    rel = r.json()
    assert (await client.get(f"{base}/relationships/{rel['id']}", headers=tenant.headers)).status_code == 200
    assert (await client.get(f"/v1/orgs/{other_tenant.slug}/relationships/{rel['id']}",
                             headers=other_tenant.headers)).status_code == 404
    r = await client.post(f"{base}/relationships", headers=tenant.headers,
                          json={"src": str(a), "dst": str(uuid4()), "kind": "depends_on"})
    assert r.status_code == 422
    r = await client.get(f"{base}/entities/{a}/neighbors?direction=out&kinds=depends_on&depth=2",
                         headers=tenant.headers)
    assert [n["id"] for n in r.json()["nodes"]] == [str(b)]
    r = await client.get(f"{base}/entities/{b}/reachable?direction=in&depth=3", headers=tenant.headers)
    assert r.json() == {"nodes": [{"id": str(a), "depth": 1}], "truncated": False}
    r = await client.get(f"{base}/entities/{b}/dependents?kinds=depends_on", headers=tenant.headers)
    assert [n["id"] for n in r.json()["nodes"]] == [str(a)]
    r = await client.get(f"{base}/graph/path?from={a}&to={b}&max_depth=3", headers=tenant.headers)
    assert r.json()["length"] == 1
    r = await client.post(f"{base}/graph/subgraph", headers=tenant.headers,
                          json={"roots": [str(a)], "depth": 1, "limit": 10})
    assert len(r.json()["nodes"]) == 2 and len(r.json()["relationships"]) == 1
    for bad in ("depth=0", "depth=11", "direction=up"):
        r = await client.get(f"{base}/entities/{a}/neighbors?{bad}", headers=tenant.headers)
        assert r.status_code == 422, bad
    r = await client.get(f"{base}/entities/{uuid4()}/neighbors", headers=tenant.headers)
    assert r.status_code == 404
    r = await client.get(f"{base}/relationships?entity={a}&direction=out&limit=1", headers=tenant.headers)
    assert [x["id"] for x in r.json()["items"]] == [rel["id"]] and r.json()["next"] is None
    r = await client.get(f"{base}/relationships?entity={b}&direction=out", headers=tenant.headers)
    assert r.json()["items"] == []
    r = await client.get(f"/v1/orgs/{other_tenant.slug}/relationships?entity={a}", headers=other_tenant.headers)
    assert r.status_code == 404
    r = await client.delete(f"{base}/relationships/{rel['id']}", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["live"] is False
    r = await client.get(f"{base}/relationships?entity={a}", headers=tenant.headers)
    assert r.json()["items"] == []
    undelete = f"{base}/relationships/{rel['id']}/undelete"  # If-Match holds here as on the other writes
    r = await client.post(undelete, headers={**tenant.headers, "If-Match": '"1"'})
    assert r.status_code == 409 and r.json()["current_version"] == 2
    r = await client.post(undelete, headers={**tenant.headers, "If-Match": '"2"'})
    assert r.status_code == 200 and r.json()["live"] is True and r.headers["etag"] == '"3"'


async def test_huge_fan_out_and_long_cycles_stay_bounded(svc: Services, db, pg_url: str, tenant: Tenant) -> None:
    """A node with 20,000 edges and a 500-long cycle: answers are capped (truncated) or complete,
    never a runaway query."""
    import psycopg

    hub = await node(svc, tenant, "hub")
    with psycopg.connect(pg_url, autocommit=True) as conn:  # bulk rows, as an import would
        conn.execute("SELECT set_config('canvasdb.org_id', %s, false)", (str(tenant.org_id),))
        conn.execute(
            "INSERT INTO entities (org_id, id, project_id, type, data, version, keyframe_version,"
            " created_at, updated_at) SELECT %(org)s, gen_random_uuid(), %(p)s, 'task',"
            " jsonb_build_object('title', 'leaf ' || i), 1, 1, now(), now() FROM generate_series(1, 20000) i",
            {"org": tenant.org_id, "p": tenant.project_id})
        conn.execute(
            "INSERT INTO relationships (org_id, id, src, dst, kind, src_project, dst_project)"
            " SELECT %(org)s, gen_random_uuid(), %(hub)s, id, 'mentions', %(p)s, %(p)s FROM entities"
            " WHERE org_id = %(org)s AND data->>'title' LIKE 'leaf %%'",
            {"org": tenant.org_id, "hub": hub, "p": tenant.project_id})
    capped = Graph(db, max_nodes=1000)
    page = await capped.neighbors(tenant.owner, hub, limit=10)
    assert page["truncated"] and len(page["nodes"]) == 10 and page["next"] is not None
    full = await svc.graph.neighbors(tenant.owner, hub, limit=10)
    assert full["total"] == 20000 and not full["truncated"]
    ring = [await node(svc, tenant, f"r{i}") for i in range(500)]
    for a, b in zip(ring, ring[1:] + ring[:1], strict=True):
        await svc.relationships.create(tenant.owner, a, b, "depends_on")
    deps = await svc.graph.dependents(tenant.owner, ring[0], kinds=["depends_on"], limit=1000)
    assert deps["total"] == 499 and max(n["depth"] for n in deps["nodes"]) == 499
    around = await svc.graph.path(tenant.owner, ring[0], ring[5], max_depth=10)
    assert around["length"] == 5


# --- fixes of the graph audit ------------------------------------------------------------------------


class CountingDb:
    """A Database whose one-statement reads record how many rows each sent back."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.rows: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    async def read(self, *args: Any, **kwargs: Any) -> list[Any]:
        rows = await self._db.read(*args, **kwargs)
        self.rows.append(len(rows))
        return rows


def bulk(pg_url: str, t: Tenant, sql: str, **params: object) -> list[tuple[Any, ...]]:
    """Rows written straight to the tables, as an import would (quick for thousands)."""
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SELECT set_config('canvasdb.org_id', %s, false)", (str(t.org_id),))
        cur = conn.execute(sql, {"org": t.org_id, "p": t.project_id, **params})
        return cur.fetchall() if cur.description else []


_LEAVES = ("INSERT INTO entities (org_id, id, project_id, type, data, version, keyframe_version, created_at,"
           " updated_at) SELECT %(org)s, gen_random_uuid(), %(p)s, 'task', jsonb_build_object('title',"
           " %(prefix)s || i), 1, 1, now(), now() FROM generate_series(1, %(n)s) i RETURNING id")


async def test_a_page_holds_the_rows_of_the_page_not_of_the_fan_out(svc: Services, db: Database, pg_url: str,
                                                                   tenant: Tenant) -> None:
    """A page of a hub's neighbours (or of a node many edges enter) sends back rows of the page:
    never one row per edge of the level before it."""
    n = 3000
    hub, x, sink, y = [await node(svc, tenant, title) for title in ("hub", "x", "sink", "y")]
    bulk(pg_url, tenant, f"WITH leaf AS ({_LEAVES}) INSERT INTO relationships (org_id, id, src, dst, kind,"
         " src_project, dst_project) SELECT %(org)s, gen_random_uuid(), %(hub)s, id, 'mentions', %(p)s, %(p)s"
         " FROM leaf", prefix="out ", n=n, hub=hub)
    bulk(pg_url, tenant, f"WITH leaf AS ({_LEAVES}) INSERT INTO relationships (org_id, id, src, dst, kind,"
         " src_project, dst_project) SELECT %(org)s, gen_random_uuid(), id, %(sink)s, 'mentions', %(p)s, %(p)s"
         " FROM leaf", prefix="in ", n=n, sink=sink)
    # made last, so that it is not among the first edges into the sink: found from x's side
    x_sink = await svc.relationships.create(tenant.owner, x, sink, "mentions")
    sink_y = await svc.relationships.create(tenant.owner, sink, y, "mentions")
    counted = CountingDb(db)
    graph = Graph(counted)  # type: ignore[arg-type]

    page = await graph.neighbors(tenant.owner, hub, limit=10)
    assert len(page["nodes"]) == 10 and page["total"] == n and page["next"] is not None
    # the start, and a node and its edge for each of the page and the one after it (is there more?)
    assert counted.rows[-1] <= 1 + 2 * 11, "the statement sent back one row per edge of the hub"
    assert {(r["from"], r["to"]) for r in page["relationships"]} == {(str(hub), v["id"]) for v in page["nodes"]}

    page = await graph.neighbors(tenant.owner, x)
    assert [v["id"] for v in page["nodes"]] == [str(sink)] and counted.rows[-1] <= 3
    assert page["relationships"] == [{"id": str(x_sink.id), "from": str(x), "to": str(sink), "kind": "mentions"}]

    deps = await graph.dependents(tenant.owner, y, depth=2, limit=10)
    assert deps["total"] == n + 2 and counted.rows[-1] <= 1 + 2 * 11
    assert deps["nodes"][0]["id"] == str(sink) and deps["relationships"][0] == {
        "id": str(sink_y.id), "from": str(sink), "to": str(y), "kind": "mentions"}
    assert {(r["to"], r["kind"]) for r in deps["relationships"][1:]} == {(str(sink), "mentions")}
    assert len(deps["relationships"]) == 10


async def test_concurrent_edges_never_close_a_cycle_of_an_acyclic_kind(svc: Services, db: Database,
                                                                       tenant: Tenant) -> None:
    await svc.types.register(tenant.owner, EntityType(name="task", reference_fields=["$.depends_on[*]"],
                                                      acyclic_kinds=["depends_on"]))
    # a second writer with a group commit of its own, as another server process would have
    other = EntityStore(db, svc.entities.types, keyframe_interval=svc.entities.keyframe_interval)

    async def cycle_edges(a: UUID, b: UUID) -> int:
        rows = await db.read(tenant.org_id, "SELECT count(*) AS n FROM relationships WHERE org_id = %s"
                             " AND live AND kind = 'depends_on' AND ((src = %s AND dst = %s) OR (src = %s AND dst = %s))",
                             (tenant.org_id, a, b, b, a))
        return int(rows[0]["n"])

    for _ in range(6):
        a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
        got = await asyncio.gather(svc.relationships.create(tenant.owner, a, b, "depends_on"),
                                   svc.relationships.create(tenant.owner, b, a, "depends_on"),
                                   return_exceptions=True)
        assert sum(isinstance(r, InvalidInput) for r in got) == 1, got
        assert await cycle_edges(a, b) == 1
    for _ in range(4):
        a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
        got = await asyncio.gather(svc.entities.patch(tenant.owner, a, {"depends_on": [str(b)]}),
                                   other.patch(tenant.owner, b, {"depends_on": [str(a)]}),
                                   return_exceptions=True)
        assert all(not isinstance(r, BaseException) or isinstance(r, InvalidInput | Conflict) for r in got), got
        assert sum(isinstance(r, BaseException) for r in got) == 1, got
        assert await cycle_edges(a, b) == 1


async def test_a_relationship_made_while_its_end_is_deleted_is_never_live(svc: Services, db: Database,
                                                                          tenant: Tenant) -> None:
    await svc.types.register(tenant.owner, EntityType(name="task", reference_fields=["$.parent"]))
    other = EntityStore(db, svc.entities.types, keyframe_interval=svc.entities.keyframe_interval)

    async def live_to(dst: UUID) -> int:
        rows = await db.read(tenant.org_id, "SELECT count(*) AS n FROM relationships WHERE org_id = %s"
                             " AND dst = %s AND live", (tenant.org_id, dst))
        return int(rows[0]["n"])

    for i in range(12):
        a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
        make = (svc.relationships.create(tenant.owner, a, b, "mentions") if i % 2 == 0
                else other.patch(tenant.owner, a, {"parent": str(b)}))
        got = await asyncio.gather(make, svc.entities.delete(tenant.owner, b), return_exceptions=True)
        assert not isinstance(got[1], BaseException), got
        assert not isinstance(got[0], BaseException) or isinstance(got[0], Gone | InvalidInput), got
        assert await live_to(b) == 0, f"a live relationship to a deleted entity ({got[0]!r})"
        await svc.entities.undelete(tenant.owner, b)  # what was hidden comes back, and only that
        assert await live_to(b) == (0 if isinstance(got[0], BaseException) else 1)


async def test_the_cycle_check_follows_a_chain_of_any_length(svc: Services, pg_url: str, tenant: Tenant) -> None:
    """A depends_on chain 1,001 steps long (the old check stopped after 1,000) cannot be closed."""
    await svc.types.register(tenant.owner, EntityType(name="task", reference_fields=["$.depends_on[*]"],
                                                      acyclic_kinds=["depends_on"]))
    chain = [row[0] for row in bulk(pg_url, tenant, _LEAVES, prefix="c", n=1002)]
    bulk(pg_url, tenant, "INSERT INTO relationships (org_id, id, src, dst, kind, src_project, dst_project)"
         " SELECT %(org)s, gen_random_uuid(), s, d, 'depends_on', %(p)s, %(p)s FROM unnest(%(s)s::uuid[],"
         " %(d)s::uuid[]) x(s, d)", s=chain[:-1], d=chain[1:])
    first, last = chain[0], chain[-1]
    assert await svc.graph.creates_cycle(tenant.owner, last, first, "depends_on")
    assert not await svc.graph.creates_cycle(tenant.owner, first, last, "depends_on")  # a shortcut
    with pytest.raises(InvalidInput, match="cycle"):
        await svc.relationships.create(tenant.owner, last, first, "depends_on")
    with pytest.raises(InvalidInput, match="cycle"):
        await svc.entities.patch(tenant.owner, last, {"depends_on": [str(first)]})
    await svc.entities.patch(tenant.owner, first, {"depends_on": [str(last)]})  # no cycle: accepted


async def test_a_reference_to_an_unreadable_entity_answers_like_a_missing_one(
        svc: Services, client: httpx.AsyncClient, tenant: Tenant) -> None:
    await svc.types.register(tenant.owner, EntityType(name="task", reference_fields=["$.parent"]))
    secret = (await svc.tenancy.create_project(tenant.owner, "secret"))["id"]
    shared = (await svc.tenancy.create_project(tenant.owner, "shared"))["id"]
    member_id = await svc.tenancy.ensure_user(f"m-{uuid4().hex[:8]}@example.com")
    await svc.tenancy.set_org_role(tenant.org_id, member_id, "member")
    await svc.tenancy.set_project_role(tenant.owner, tenant.project_id, member_id, "editor")
    await svc.tenancy.set_project_role(tenant.owner, shared, member_id, "viewer")
    member = Principal(org_id=tenant.org_id, user_id=member_id, org_role="member")
    headers = {"Authorization": f"Bearer {(await svc.tenancy.create_token(member_id))[1]}"}
    hidden = await node(svc, tenant, "hidden", project=secret)
    readable = await node(svc, tenant, "shared", project=shared)
    mine = (await svc.entities.create(member, tenant.project_id, "task", {"title": "mine"})).id

    async def refused(target: UUID) -> tuple[str, dict[str, Any], int, dict[str, Any]]:
        with pytest.raises(InvalidInput) as create:
            await svc.entities.create(member, tenant.project_id, "task", {"parent": str(target)})
        with pytest.raises(InvalidInput) as patch:
            await svc.entities.patch(member, mine, {"parent": str(target)})
        assert str(patch.value) == str(create.value) and patch.value.fields == create.value.fields
        r = await client.post(f"/v1/orgs/{tenant.slug}/projects/{tenant.project_slug}/entities",
                              headers=headers, json={"type": "task", "data": {"parent": str(target)}})
        body = {k: v for k, v in r.json().items() if k != "instance"}
        return str(create.value).replace(str(target), "ID"), create.value.fields, r.status_code, \
            {k: v.replace(str(target), "ID") if isinstance(v, str) else v for k, v in body.items()}

    assert await refused(hidden) == await refused(uuid4())
    assert (await refused(hidden))[2] == 422
    await svc.entities.patch(member, mine, {"parent": str(readable)})  # a viewer may link to it
    await svc.entities.patch(tenant.owner, mine, {"parent": str(hidden)})  # an owner reads every project
    page = await svc.graph.neighbors(tenant.owner, mine, kinds=["parent"])
    assert [n["id"] for n in page["nodes"]] == [str(hidden)]
    await svc.entities.patch(member, mine, {"title": "renamed"})  # a reference kept is not checked again


async def test_all_shortest_paths_say_when_some_were_left_out(svc: Services, tenant: Tenant) -> None:
    s, t, x, y = [await node(svc, tenant, title) for title in ("s", "t", "x", "y")]
    for i in range(5):  # five shortest paths s -> m -> t, and a longer one s -> x -> y -> t
        m = await node(svc, tenant, f"m{i}")
        await svc.relationships.create(tenant.owner, s, m, "link")
        await svc.relationships.create(tenant.owner, m, t, "link")
    for a, b in ((s, x), (x, y), (y, t)):
        await svc.relationships.create(tenant.owner, a, b, "link")
    simple = graph_module._simple_paths_sql
    for by_nodes in (False, True):
        if by_nodes:  # over its time: the node-based statement answers
            graph_module._simple_paths_sql = lambda *variant: "SELECT pg_sleep(1)"
        try:
            for cap, count, cut in ((3, 3, True), (5, 5, False), (10, 5, False), (1, 1, True)):
                got = await svc.graph.path(tenant.owner, s, t, all_paths=True, max_paths=cap)
                assert (got["length"], len(got["paths"]), got["truncated"]) == (2, count, cut), (by_nodes, cap)
            one = await svc.graph.path(tenant.owner, s, t)
            assert (one["length"], len(one["paths"]), one["truncated"]) == (2, 1, False)
        finally:
            graph_module._simple_paths_sql = simple


async def test_relationships_are_listed_from_their_source_to_their_target(svc: Services,
                                                                          tenant: Tenant) -> None:
    """Whichever way a walk follows a relationship, "from" is its source and "to" its target."""
    a, b, c, d = [await node(svc, tenant, title) for title in "abcd"]
    edges = {}
    for src, dst in ((a, b), (c, b), (b, d)):
        rel = await svc.relationships.create(tenant.owner, src, dst, "depends_on")
        edges[str(rel.id)] = (str(src), str(dst))

    def pairs(answer: dict[str, Any]) -> set[tuple[str, str]]:
        for r in answer["relationships"]:
            assert (r["from"], r["to"]) == edges[r["id"]]
        return {(r["from"], r["to"]) for r in answer["relationships"]}

    assert pairs(await svc.graph.neighbors(tenant.owner, b, direction="in")) == {(str(a), str(b)), (str(c), str(b))}
    assert pairs(await svc.graph.dependents(tenant.owner, b)) == {(str(a), str(b)), (str(c), str(b))}
    assert pairs(await svc.graph.neighbors(tenant.owner, b, direction="both")) == \
        {(str(a), str(b)), (str(c), str(b)), (str(b), str(d))}
    assert pairs(await svc.graph.neighbors(tenant.owner, a, direction="both", depth=2)) == \
        {(str(a), str(b)), (str(c), str(b)), (str(b), str(d))}
    assert pairs(await svc.graph.dependents(tenant.owner, d, depth=2)) == \
        {(str(b), str(d)), (str(a), str(b)), (str(c), str(b))}
    sub = await svc.graph.subgraph(tenant.owner, [b], depth=1)
    assert pairs(sub) == {(str(a), str(b)), (str(c), str(b)), (str(b), str(d))}


async def test_lineage_takes_a_depth_and_says_when_it_was_cut(svc: Services, client: httpx.AsyncClient,
                                                              pg_url: str, tenant: Tenant) -> None:
    a, b, c = [await node(svc, tenant, title) for title in "abc"]
    await svc.relationships.create(tenant.owner, b, a, "derived_from")  # b is a copy of a, c of b
    await svc.relationships.create(tenant.owner, c, b, "derived_from")
    full = await svc.graph.lineage(tenant.owner, c)
    assert [n["title"] for n in full["ancestors"]] == ["b", "a"] and not full["truncated"]
    near = await svc.graph.lineage(tenant.owner, c, depth=1)
    assert [n["title"] for n in near["ancestors"]] == ["b"] and not near["truncated"]
    url = f"/v1/orgs/{tenant.slug}/entities/{c}/lineage"
    r = await client.get(f"{url}?depth=1", headers=tenant.headers)
    assert r.status_code == 200 and [n["title"] for n in r.json()["ancestors"]] == ["b"]
    assert [n["title"] for n in (await client.get(url, headers=tenant.headers)).json()["ancestors"]] == ["b", "a"]
    assert (await client.get(f"{url}?depth=0", headers=tenant.headers)).status_code == 422
    bulk(pg_url, tenant, f"WITH leaf AS ({_LEAVES}) INSERT INTO relationships (org_id, id, src, dst, kind,"
         " src_project, dst_project) SELECT %(org)s, gen_random_uuid(), id, %(a)s, 'derived_from', %(p)s, %(p)s"
         " FROM leaf", prefix="copy ", n=1001, a=a)
    many = await svc.graph.lineage(tenant.owner, a, depth=1)
    assert len(many["descendants"]) == 1000 and many["truncated"]


async def test_cycles_never_make_a_whole_answer_look_cut(svc: Services, tenant: Tenant) -> None:
    """Around cycles a walk reaches a node again at every depth: "to the end" goes level at a
    time (each node once), and a subgraph has room for every node at every depth, so
    ``truncated`` means that something was left out."""
    hub = await node(svc, tenant, "hub")
    spokes = [await node(svc, tenant, f"s{i}") for i in range(40)]
    for s in spokes:  # both ways: a cycle through the hub for every spoke
        await svc.relationships.create(tenant.owner, s, hub, "depends_on")
        await svc.relationships.create(tenant.owner, hub, s, "depends_on")
    member_id = await svc.tenancy.ensure_user(f"reader-{tenant.slug}@example.com")
    await svc.tenancy.set_org_role(tenant.org_id, member_id, "member")
    await svc.tenancy.set_project_role(tenant.owner, tenant.project_id, member_id, "viewer")
    member = Principal(tenant.org_id, member_id, "member")  # through the access filter too
    roomy = Graph(svc.db, max_nodes=100)  # room for every node, not for each at every depth
    for who in (member, tenant.owner):
        found = await roomy.dependents(who, hub, limit=1000)
        assert (found["total"], found["truncated"]) == (40, False)
        assert {n["id"] for n in found["nodes"]} == {str(s) for s in spokes}
        assert {r["to"] for r in found["relationships"]} == {str(hub)}  # each spoke's edge into the hub
    small = Graph(svc.db, max_nodes=10)  # a real cut is still said
    cut = await small.dependents(tenant.owner, hub, limit=1000)
    assert cut["truncated"] and cut["total"] == 10

    clique = [await node(svc, tenant, f"c{i}") for i in range(5)]
    for a in clique:
        for b in clique:
            if a != b:
                await svc.relationships.create(tenant.owner, a, b, "board.edge")
    whole = await svc.graph.subgraph(tenant.owner, [clique[0]], depth=10, limit=5)
    assert (len(whole["nodes"]), len(whole["relationships"]), whole["truncated"]) == (5, 20, False)
    part = await svc.graph.subgraph(tenant.owner, [clique[0]], depth=10, limit=4)
    assert (len(part["nodes"]), part["truncated"]) == (4, True)


async def test_undeleting_an_edge_is_checked_for_a_cycle(svc: Services, tenant: Tenant) -> None:
    await svc.types.register(tenant.owner, EntityType(name="task", acyclic_kinds=["depends_on"]))
    a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
    ab = await svc.relationships.create(tenant.owner, a, b, "depends_on")
    await svc.relationships.delete(tenant.owner, ab.id)
    ba = await svc.relationships.create(tenant.owner, b, a, "depends_on")  # fine while a -> b is gone
    with pytest.raises(InvalidInput):
        await svc.relationships.undelete(tenant.owner, ab.id)
    assert (await svc.graph.reachable(tenant.owner, a, depth=5))["found"] == {}
    await svc.relationships.delete(tenant.owner, ba.id)
    assert not (await svc.relationships.undelete(tenant.owner, ab.id)).deleted


async def test_undeleting_an_entity_never_closes_a_cycle(svc: Services, tenant: Tenant) -> None:
    """Its relationships come back with it, checked as new ones would be: a path the other way
    made while it was deleted refuses the undeletion (422), and nothing changes."""
    await svc.types.register(tenant.owner, EntityType(name="task", acyclic_kinds=["depends_on"]))
    a, b, c = [await node(svc, tenant, x) for x in "abc"]
    await svc.relationships.create(tenant.owner, a, b, "depends_on")
    await svc.relationships.create(tenant.owner, b, c, "depends_on")
    await svc.entities.delete(tenant.owner, b)
    back = await svc.relationships.create(tenant.owner, c, a, "depends_on")  # a -> b -> c is hidden now
    with pytest.raises(InvalidInput):
        await svc.entities.undelete(tenant.owner, b)
    with pytest.raises(Gone):
        await svc.entities.get(tenant.owner, b)
    await svc.relationships.delete(tenant.owner, back.id)
    assert not (await svc.entities.undelete(tenant.owner, b)).deleted
    assert [n["id"] for n in (await svc.graph.neighbors(tenant.owner, a, depth=2))["nodes"]] == [str(b), str(c)]


async def test_restoring_an_entity_to_a_reference_that_closes_a_cycle_is_refused(
        svc: Services, tenant: Tenant) -> None:
    """A restore of a deleted entity is an undeletion and a write at once: its references and
    the relationships that come back with it are checked together, by the undeletion (422)."""
    await svc.types.register(tenant.owner, EntityType(name="task", reference_fields=["$.depends_on[*]"],
                                                      acyclic_kinds=["depends_on"]))
    a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
    await svc.entities.patch(tenant.owner, a, {"depends_on": [str(b)]})  # version 2
    await svc.entities.patch(tenant.owner, a, {"depends_on": None})
    await svc.entities.delete(tenant.owner, a)
    await svc.entities.patch(tenant.owner, b, {"depends_on": [str(a)]})  # hidden while a is deleted
    with pytest.raises(InvalidInput, match=f"undeleting entity {a} would close a depends_on cycle"):
        await svc.entities.restore(tenant.owner, a, 2)
    with pytest.raises(Gone):
        await svc.entities.get(tenant.owner, a)
    await svc.entities.patch(tenant.owner, b, {"depends_on": None})
    restored = await svc.entities.restore(tenant.owner, a, 2)
    assert not restored.deleted and restored.data["depends_on"] == [str(b)]
    assert [n["id"] for n in (await svc.graph.neighbors(tenant.owner, a))["nodes"]] == [str(b)]


async def test_an_undeletion_refused_for_a_cycle_names_no_entity_the_caller_cannot_read(
        svc: Services, tenant: Tenant) -> None:
    """The refusal says that a cycle would close (the rule counts every edge of the org), not
    through which entity: the one at the other end may be in a project the caller cannot read."""
    await svc.types.register(tenant.owner, EntityType(name="task", reference_fields=["$.depends_on[*]"],
                                                      acyclic_kinds=["depends_on"]))
    secret = (await svc.tenancy.create_project(tenant.owner, "secret"))["id"]
    member = await editor(svc, tenant)
    mine, hidden = await node(svc, tenant, "mine"), await node(svc, tenant, "hidden", project=secret)
    await svc.relationships.create(tenant.owner, mine, hidden, "depends_on")
    await svc.entities.delete(member, mine)
    await svc.entities.patch(tenant.owner, hidden, {"depends_on": [str(mine)]})  # hidden while mine is
    with pytest.raises(InvalidInput, match="cycle") as refused:
        await svc.entities.undelete(member, mine)
    assert str(hidden) not in str(refused.value.detail)


async def test_walks_as_of_the_edges_of_time(client: httpx.AsyncClient, svc: Services, tenant: Tenant) -> None:
    """Moments at the ends of what Python can name, with an offset that takes them past it in
    UTC (a page cursor is named after the moment in UTC): before time, nothing; after, now."""
    a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
    await svc.relationships.create(tenant.owner, a, b, "derived_from")
    base, h = f"/v1/orgs/{tenant.slug}", tenant.headers
    for path, ahead in ((f"entities/{a}/neighbors", [str(b)]), (f"entities/{b}/dependents", [str(a)]),
                        (f"entities/{a}/lineage", None)):
        for as_of in ("0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-14:00"):
            r = await client.get(f"{base}/{path}", params={"as_of": as_of}, headers=h)
            if as_of.startswith("0001"):  # the start did not exist yet
                assert r.status_code == 404 and r.json()["status"] == 404, r.text
            elif ahead is not None:
                assert r.status_code == 200 and [n["id"] for n in r.json()["nodes"]] == ahead, r.text
            else:
                assert r.status_code == 200 and [n["id"] for n in r.json()["ancestors"]] == [str(b)], r.text


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "entities/{a}/dependents?depth=0", None),
    ("GET", "entities/{a}/dependents?depth=1001", None),
    ("GET", "entities/{a}/dependents?kinds=Bad%20Kind", None),
    ("GET", "entities/{a}/dependents?limit=0", None),
    ("GET", "entities/{a}/dependents?cursor=garbage", None),
    ("GET", "entities/{a}/dependents?as_of=yesterday", None),
    ("GET", "entities/not-a-uuid/dependents", None),
    ("GET", "entities/{a}/reachable?depth=-1", None),
    ("GET", "entities/{a}/lineage?depth=1001", None),
    ("GET", "graph/path?from={a}&to=not-a-uuid", None),
    ("GET", "graph/path?from={a}&to={b}&max_depth=0", None),
    ("GET", "graph/path?from={a}&to={b}&max_depth=11", None),
    ("GET", "graph/path?from={a}&to={b}&direction=sideways", None),
    ("GET", "graph/path?from={a}&to={b}&all=true&max_paths=0", None),
    ("GET", "graph/path?from={a}&to={missing}", None),
    ("GET", "graph/cycle?src={a}&dst={b}&kind=%27%3B--", None),
    ("POST", "graph/subgraph", {"roots": []}),
    ("POST", "graph/subgraph", {"roots": "{a}"}),
    ("POST", "graph/subgraph", {"roots": ["not-a-uuid"]}),
    ("POST", "graph/subgraph", {"roots": ["{a}"] * 101}),
    ("POST", "graph/subgraph", {"roots": ["{a}"], "depth": 0}),
    ("POST", "graph/subgraph", {"roots": ["{a}"], "limit": 0}),
    ("POST", "graph/subgraph", {"roots": ["{a}"], "kinds": ["$.x[*]"]}),
    ("POST", "graph/subgraph", {"roots": ["{missing}"]}),
    ("POST", "graph/subgraph", {"roots": ["{a}"], "extra": 1}),
])
async def test_graph_routes_answer_bad_input_with_a_problem(
        client: httpx.AsyncClient, svc: Services, tenant: Tenant, method: str, path: str, body: Any) -> None:
    a, b = await node(svc, tenant, "a"), await node(svc, tenant, "b")
    ids = {"{a}": str(a), "{b}": str(b), "{missing}": str(uuid4())}

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            for k, v in ids.items():
                value = value.replace(k, v)
            return value
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    r = await client.request(method, f"/v1/orgs/{tenant.slug}/{fill(path)}", json=fill(body),
                             headers=tenant.headers)
    assert r.status_code in (404, 422), (r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json" and r.json()["status"] == r.status_code
