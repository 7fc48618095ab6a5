"""Boards projected into board.node / board.edge entities, and entity edits written back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid

import httpx
import pytest
from conftest import Tenant
from pycrdt import Doc, Map

from canvasdb import jobs
from canvasdb.db import Database
from canvasdb.documents import DocumentStore
from canvasdb.documents.projection import BoardProjection, _edge_id, entity_id
from canvasdb.entities import EntityType
from canvasdb.errors import InvalidInput, NotFound
from canvasdb.services import Services


class Board:
    def __init__(self) -> None:
        self.doc = Doc()
        self.updates: list[bytes] = []
        self.doc.observe(lambda e: self.updates.append(e.update))
        self.nodes = self.doc.get("nodes", type=Map)
        self.edges = self.doc.get("edges", type=Map)

    def take(self) -> list[bytes]:
        out, self.updates = self.updates, []
        return out


async def push(svc: Services, tenant: Tenant, doc_id: str, board: Board) -> None:
    for update in board.take():
        await svc.documents.append(tenant.owner, doc_id, update)


async def test_nodes_and_edges_become_entities(svc: Services, tenant: Tenant) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "plan", "board")
    board = Board()
    board.nodes["n1"] = Map({"type": "sticky", "x": 10, "y": 20, "text": "car"})
    board.nodes["n2"] = {"type": "shape", "x": 0, "y": -0.5, "w": 5, "h": 5, "pts": [[1, 2.25]]}
    board.edges["e1"] = Map({"from": "n1", "to": "n2", "label": "needs"})
    await push(svc, tenant, "plan", board)
    assert await svc.projection.project(tenant.org_id, "plan") == 3
    n1 = await svc.entities.get(tenant.owner, entity_id("plan", "nodes", "n1"))
    assert n1.type == "board.node" and n1.project_id == tenant.project_id
    assert n1.data == {"type": "sticky", "x": 10, "y": 20, "text": "car", "doc": "plan", "key": "n1"}
    # as a browser wrote them (pycrdt reads every Yjs number as a float): 10, not 10.0
    assert json.dumps(n1.data["x"]) == "10" and type(n1.data["y"]) is int
    n2 = (await svc.entities.get(tenant.owner, entity_id("plan", "nodes", "n2"))).data
    assert json.dumps([n2["x"], n2["y"], n2["pts"]]) == "[0, -0.5, [[1, 2.25]]]"
    edge = await svc.entities.get(tenant.owner, entity_id("plan", "edges", "e1"))
    assert (edge.type, edge.data["from"], edge.data["to"]) == ("board.edge", "n1", "n2")
    assert await svc.projection.project(tenant.org_id, "plan") == 0, "nothing new: nothing written"
    linked = await svc.graph.neighbors(tenant.owner, entity_id("plan", "nodes", "n1"), kinds=["board.edge"])
    assert [n["id"] for n in linked["nodes"]] == [str(entity_id("plan", "nodes", "n2"))]
    assert linked["relationships"][0]["kind"] == "board.edge"
    meta = await svc.documents.get(tenant.owner, "plan")
    assert meta.projected_seq == meta.last_seq and meta.to_json()["projection_lag"] == 0

    board.nodes["n1"]["x"] = 99
    del board.nodes["n2"]
    await push(svc, tenant, "plan", board)
    assert (await svc.documents.get(tenant.owner, "plan")).to_json()["projection_lag"] > 0
    assert await svc.projection.project(tenant.org_id, "plan") == 2
    n1 = await svc.entities.get(tenant.owner, n1.id)
    assert n1.data["x"] == 99.0 and n1.version == 2
    history = (await svc.entities.history(tenant.owner, entity_id("plan", "nodes", "n2"))).items
    assert [v.op for v in history] == ["delete", "create"], "a node deleted in the board is a tombstone"

    async def linked() -> list[str]:
        page = await svc.graph.neighbors(tenant.owner, n1.id, kinds=["board.edge"])
        return [n["id"] for n in page["nodes"]]

    assert await linked() == [], "an edge to a deleted node is hidden"
    board.nodes["n2"] = {"type": "shape", "x": 1}
    await push(svc, tenant, "plan", board)
    await svc.projection.project(tenant.org_id, "plan")
    back = await svc.entities.get(tenant.owner, entity_id("plan", "nodes", "n2"))
    assert back.data["x"] == 1.0 and not back.deleted
    assert await linked() == [str(back.id)]
    del board.edges["e1"]
    await push(svc, tenant, "plan", board)
    await svc.projection.project(tenant.org_id, "plan")
    assert await linked() == []


async def test_text_documents_are_not_projected(svc: Services, tenant: Tenant) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "notes", "text")
    board = Board()
    board.nodes["n"] = {"type": "x"}
    await push(svc, tenant, "notes", board)
    assert await svc.projection.project(tenant.org_id, "notes") == 0


async def test_entity_edit_over_http_reaches_the_live_board(
    client: httpx.AsyncClient, svc: Services, tenant: Tenant
) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "live", "board")
    board = Board()
    board.nodes["n1"] = Map({"type": "sticky", "text": "old"})
    await push(svc, tenant, "live", board)
    await svc.projection.project(tenant.org_id, "live")
    url = f"/v1/orgs/{tenant.slug}/entities/{entity_id('live', 'nodes', 'n1')}"
    r = await client.patch(url, headers=tenant.headers, json={"data": {"text": "new"}})
    assert r.status_code == 200 and r.json()["version"] == 2
    peer = Doc()
    peer.apply_update(await DocumentStore(svc.db).state(tenant.owner, "live"))
    assert peer.get("nodes", type=Map).to_py()["n1"] == {"type": "sticky", "text": "new"}
    assert await svc.projection.project(tenant.org_id, "live") == 0, "the board already says so"
    assert (await svc.entities.get(tenant.owner, entity_id("live", "nodes", "n1"))).version == 2
    gone = await client.delete(url, headers=tenant.headers)
    assert gone.status_code == 200
    peer = Doc()
    peer.apply_update(await DocumentStore(svc.db).state(tenant.owner, "live"))
    assert "n1" not in peer.get("nodes", type=Map).to_py()


async def test_projection_runs_shortly_after_commit_on_a_worker(pg_url: str, svc: Services,
                                                                 tenant: Tenant) -> None:
    requests = jobs.Requests(jobs.defer_projections, every=0.1)
    store = DocumentStore(svc.db, changed=requests.request)
    projection = BoardProjection(store, svc.entities)
    await store.create(tenant.owner, tenant.project_id, "auto", "board")
    board = Board()
    board.nodes["a"] = {"type": "sticky"}
    async with jobs.connected(pg_url), jobs.working(svc):
        for update in board.take():
            await store.append(tenant.owner, "auto", update)
        for _ in range(300):  # the session's other jobs may be ahead of it in the queue
            with contextlib.suppress(Exception):
                await svc.entities.get(tenant.owner, entity_id("auto", "nodes", "a"))
                break
            await asyncio.sleep(0.1)
        await requests.close()
    await store.close()
    assert (await svc.entities.get(tenant.owner, entity_id("auto", "nodes", "a"))).data["type"] == "sticky"
    assert await projection.project(tenant.org_id, "auto") == 0


async def test_metrics_expose_appends_commits_and_projection_lag(
    client: httpx.AsyncClient, svc: Services, tenant: Tenant
) -> None:
    await svc.documents.create(tenant.owner, tenant.project_id, "measured", "board")
    board = Board()
    board.nodes["m"] = {"type": "sticky"}
    await push(svc, tenant, "measured", board)
    await svc.projection.project(tenant.org_id, "measured")
    text = (await client.get("/metrics")).text

    def value(name: str) -> float:
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        return float(line.split()[1])

    assert value("canvasdb_doc_updates_appended_total") >= 1
    assert value("canvasdb_doc_commit_seconds_count") >= 1
    assert value("canvasdb_projection_lag_seconds_count") >= 1
    assert value("canvasdb_projection_entity_writes_total") >= 1
    assert "canvasdb_doc_cache_bytes" in text


async def test_an_edge_projected_to_a_node_deleted_meanwhile_is_not_live(svc: Services, tenant: Tenant) -> None:
    """The projection writes a board's node entities, then its edges: a node entity deleted in
    between (through the API) makes the new edge a hidden one, as any relationship made to a
    deleted entity is."""
    await svc.documents.create(tenant.owner, tenant.project_id, "race", "board")
    board = Board()
    board.nodes["a"] = {"type": "sticky", "text": "a"}
    board.nodes["b"] = {"type": "sticky", "text": "b"}
    await push(svc, tenant, "race", board)
    await svc.projection.project(tenant.org_id, "race")
    a, b = entity_id("race", "nodes", "a"), entity_id("race", "nodes", "b")
    await svc.entities.delete(tenant.owner, b)
    wanted = {("nodes", "a"): {}, ("nodes", "b"): {}, ("edges", "e"): {"from": "a", "to": "b"}}
    await svc.projection._edges(tenant.org_id, "race", tenant.project_id, wanted, [])  # the edge step alone
    assert (await svc.graph.neighbors(tenant.owner, a, kinds=["board.edge"]))["nodes"] == []
    await svc.entities.undelete(tenant.owner, b)  # and it comes back with its end
    assert [n["id"] for n in (await svc.graph.neighbors(tenant.owner, a, kinds=["board.edge"]))["nodes"]] == [str(b)]


async def test_malformed_boards_and_squatted_ids_stop_nothing_and_leak_nothing(
        svc: Services, tenant: Tenant) -> None:
    """A node the entity store refuses, an edge whose ends are not keys, a board.edge entity
    without a key: the rest of the board is projected and the hourly pass goes on. An entity
    of another project that names the board, or takes a node's id, is never written into."""
    await svc.documents.create(tenant.owner, tenant.project_id, "messy", "board")
    side = await svc.tenancy.create_project(tenant.owner, "side", "side")
    squat = entity_id("messy", "nodes", "secret")
    await svc.entities.create(tenant.owner, side["id"], "task", {"doc": "messy", "key": "x"}, id=squat)
    await svc.entities.create(tenant.owner, tenant.project_id, "board.edge", {"doc": "messy"})  # no key
    board = Board()
    board.nodes["fine"] = {"type": "sticky", "text": "ok"}
    board.nodes["nul"] = {"type": "sticky", "text": "a\x00b"}
    board.nodes["secret"] = {"type": "sticky", "text": "TOP SECRET"}
    board.edges["odd"] = Map({"from": ["fine"], "to": "fine"})
    board.edges["to-squat"] = Map({"from": "fine", "to": "secret"})  # its end is not the board's
    await push(svc, tenant, "messy", board)
    assert await svc.projection.project(tenant.org_id, "messy") >= 1
    assert (await svc.entities.get(tenant.owner, entity_id("messy", "nodes", "fine"))).data["text"] == "ok"
    meta = await svc.documents.get(tenant.owner, "messy")
    assert meta.projected_seq == meta.last_seq, "a refused node does not hold the board back"
    assert (await svc.entities.get(tenant.owner, squat)).data == {"doc": "messy", "key": "x"}
    fine = entity_id("messy", "nodes", "fine")
    assert (await svc.graph.neighbors(tenant.owner, fine, kinds=["board.edge"]))["nodes"] == []
    totals = await jobs.maintain(svc)
    assert totals["failed"] == 0


async def test_a_relationship_holding_a_board_edges_id_is_never_written_into(
        svc: Services, tenant: Tenant) -> None:
    """A board edge's relationship id is derived from the board and its keys, so whoever
    guesses them can take it first, for a relationship of their own between entities they
    can write. The projection leaves such a relationship alone: it wrote the edge's data into
    it (the label of a board its maker may not read) and brought it back if deleted."""
    await svc.documents.create(tenant.owner, tenant.project_id, "guarded", "board")
    side = await svc.tenancy.create_project(tenant.owner, "side", "side")
    mine = await svc.entities.create(tenant.owner, side["id"], "note", {})
    taken = await svc.relationships.create(tenant.owner, mine.id, mine.id, "board.edge", {"mine": True},
                                           id=_edge_id("guarded", "e1", "a", "b"))
    await svc.relationships.delete(tenant.owner, taken.id)
    board = Board()
    board.nodes["a"] = {"type": "sticky", "text": "a"}
    board.nodes["b"] = {"type": "sticky", "text": "b"}
    board.edges["e1"] = Map({"from": "a", "to": "b", "label": "TOP SECRET"})
    await push(svc, tenant, "guarded", board)
    await svc.projection.project(tenant.org_id, "guarded")
    versions = await svc.relationships.history(tenant.owner, taken.id)
    assert [(v["data"], v["live"]) for v in versions] == [({"mine": True}, True), ({"mine": True}, False)]
    a = entity_id("guarded", "nodes", "a")
    assert (await svc.graph.neighbors(tenant.owner, a, kinds=["board.edge"]))["nodes"] == []


async def test_an_entity_of_another_project_with_a_nodes_id_stays_out_of_the_board(
        client: httpx.AsyncClient, svc: Services, tenant: Tenant) -> None:
    """A node's entity id is derived from the board and the key, so an entity of another
    project can take it and name the board. It is not the node: an edit of it through the API,
    even by an owner (who may write both), is not written into the board, and its editor, a
    viewer of the board's project, is answered for its own write (a 403 after it was stored)."""
    await svc.documents.create(tenant.owner, tenant.project_id, "walled", "board")
    side = (await svc.tenancy.create_project(tenant.owner, "side", "side"))["id"]
    member = await svc.tenancy.ensure_user(f"m-{uuid.uuid4().hex[:8]}@example.com")
    await svc.tenancy.set_org_role(tenant.org_id, member, "member")
    await svc.tenancy.set_project_role(tenant.owner, side, member, "editor")
    await svc.tenancy.set_project_role(tenant.owner, tenant.project_id, member, "viewer")
    headers = {"Authorization": f"Bearer {(await svc.tenancy.create_token(member))[1]}"}
    fake = entity_id("walled", "nodes", "n9")
    created = await client.post(f"/v1/orgs/{tenant.slug}/projects/side/entities", headers=headers, json={
        "id": str(fake), "type": "board.node", "data": {"doc": "walled", "key": "n9", "text": "planted"}})
    assert created.status_code == 201
    url = f"/v1/orgs/{tenant.slug}/entities/{fake}"
    assert (await client.patch(url, headers=tenant.headers, json={"data": {"x": 5}})).status_code == 200
    peer = Doc()
    peer.apply_update(await svc.documents.state(tenant.owner, "walled"))
    assert peer.get("nodes", type=Map).to_py() == {}
    mine = await client.patch(url, headers=headers, json={"data": {"x": 6}})
    assert (mine.status_code, mine.json().get("version")) == (200, 3)
    odd = entity_id("no board's id!", "nodes", "k")  # nor is one naming what cannot be a board
    await svc.entities.create(tenant.owner, side, "board.node", {"doc": "no board's id!", "key": "k"}, id=odd)
    patched = await client.patch(f"/v1/orgs/{tenant.slug}/entities/{odd}", headers=tenant.headers,
                                 json={"data": {"x": 1}})
    assert patched.status_code == 200


async def test_a_board_references_only_entities_of_its_own_project(svc: Services, tenant: Tenant) -> None:
    """Reference fields an org declares for board.node are written by the projection, which has
    no user: a reference drawn on the board to an entity of another project skips the node, as
    one to a missing entity does, whoever drew it (an editor of the board linked so to entities
    it cannot read, which the API refuses it, and learnt which ids exist). References within
    the board's project are kept, and so is one an owner made through the API."""
    await svc.types.register(tenant.owner, EntityType(name="board.node", module="board",
                                                      text_fields={"text": "B"}, reference_fields=["$.parent"]))
    secret = (await svc.tenancy.create_project(tenant.owner, "secret"))["id"]
    hidden = (await svc.entities.create(tenant.owner, secret, "note", {})).id
    near = (await svc.entities.create(tenant.owner, tenant.project_id, "note", {})).id
    await svc.documents.create(tenant.owner, tenant.project_id, "linked", "board")
    board = Board()
    board.nodes["near"] = {"type": "sticky", "parent": str(near)}
    board.nodes["hidden"] = {"type": "sticky", "parent": str(hidden)}
    board.nodes["missing"] = {"type": "sticky", "parent": str(uuid.uuid4())}
    await push(svc, tenant, "linked", board)
    await svc.projection.project(tenant.org_id, "linked")
    for key in ("hidden", "missing"):
        with pytest.raises(NotFound):
            await svc.entities.get(tenant.owner, entity_id("linked", "nodes", key))
    assert (await svc.graph.dependents(tenant.owner, hidden))["nodes"] == []
    linked = entity_id("linked", "nodes", "near")
    assert [n["id"] for n in (await svc.graph.neighbors(tenant.owner, linked))["nodes"]] == [str(near)]
    await svc.entities.patch(tenant.owner, linked, {"parent": str(hidden)})  # an owner may, through the API
    await svc.projection.entity_changed(tenant.owner, await svc.entities.get(tenant.owner, linked))
    board = Board()
    board.doc.apply_update(await svc.documents.state(tenant.owner, "linked"))
    board.nodes["near"]["text"] = "renamed"  # an edit on the board keeps the owner's reference
    await push(svc, tenant, "linked", board)
    await svc.projection.project(tenant.org_id, "linked")
    assert (await svc.entities.get(tenant.owner, linked)).data["text"] == "renamed"
    assert [n["id"] for n in (await svc.graph.neighbors(tenant.owner, linked))["nodes"]] == [str(hidden)]


async def test_a_document_names_only_an_entity_its_creator_can_read(
        svc: Services, tenant: Tenant, other_tenant: Tenant) -> None:
    mine = await svc.entities.create(tenant.owner, tenant.project_id, "note", {})
    theirs = await svc.entities.create(other_tenant.owner, other_tenant.project_id, "note", {})
    await svc.documents.create(tenant.owner, tenant.project_id, "of-mine", "board", entity_id=mine.id)
    for missing in (theirs.id, uuid.uuid4()):
        with pytest.raises(InvalidInput):
            await svc.documents.create(tenant.owner, tenant.project_id, "bad", "board", entity_id=missing)


async def test_two_projections_of_a_board_at_once_take_turns(
        svc: Services, tenant: Tenant, caplog: pytest.LogCaptureFixture) -> None:
    """The hourly pass projects boards itself while a worker may be projecting the same one
    (in this process or another): both would create its new nodes, and one fail on each."""
    await svc.documents.create(tenant.owner, tenant.project_id, "twice", "board")
    board = Board()
    for i in range(40):
        board.nodes[f"n{i}"] = {"type": "sticky", "text": f"note {i}"}
    await push(svc, tenant, "twice", board)
    with caplog.at_level(logging.WARNING, logger="canvasdb.projection"):
        written = await asyncio.gather(svc.projection.project(tenant.org_id, "twice"),
                                       svc.projection.project(tenant.org_id, "twice"))
    assert sorted(written) == [0, 40], "the second found the board projected"
    assert not [r for r in caplog.records if "not projected" in r.getMessage()]

    board.nodes["late"] = {"type": "sticky", "text": "one more"}
    await push(svc, tenant, "twice", board)
    async with svc.db.taking_turns(f"project {tenant.org_id} twice"):  # another process's run
        # the hourly pass leaves the board to that run, and does not wait for it
        assert await asyncio.wait_for(svc.projection.project(tenant.org_id, "twice", wait=False), 2) == 0
        waiting = asyncio.create_task(svc.projection.project(tenant.org_id, "twice"))
        await asyncio.sleep(0.3)
        assert not waiting.done(), "a job waits for its turn"
    assert await waiting == 1


async def test_projections_on_a_small_pool_do_not_starve_it(pg_url: str, svc: Services, tenant: Tenant) -> None:
    """As many projections at once as the pool has connections (a worker's --concurrency at its
    pool's size): the turn of each is held outside the pool, which its work needs."""
    boards = [f"starve-{i}" for i in range(4)]
    for doc_id in boards:
        await svc.documents.create(tenant.owner, tenant.project_id, doc_id, "board")
    async with Database(pg_url, min_size=1, max_size=4, timeout=3) as small:
        projection = BoardProjection(DocumentStore(small), svc.projection.entities)
        done = await asyncio.gather(*(projection.project(tenant.org_id, b) for b in boards), return_exceptions=True)
    assert done == [0, 0, 0, 0]
