"""Search: full text, typo rules, meaning, hybrid fusion, filters, facets and access."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
import psycopg
import pytest
from conftest import Tenant, make_tenant, unique
from prometheus_client import REGISTRY
from pycrdt import Map
from races import change, held
from test_embedders import FakeService
from test_projection import Board, push

from canvasdb import jobs
from canvasdb.db import Database
from canvasdb.documents.projection import entity_id
from canvasdb.entities import EntityType
from canvasdb.errors import InvalidInput, NotFound, Unavailable
from canvasdb.runtime import prepare_schema
from canvasdb.search.embedders import EmbedderUnavailable, make_embedder
from canvasdb.search.engine import Filters, Search
from canvasdb.search.indexer import Indexer
from canvasdb.search.model_index import ModelIndexes
from canvasdb.search.models import ModelInfo, Models
from canvasdb.search.query import allowed_typos, corrections, parse, slip, typo_cost
from canvasdb.services import Services
from canvasdb.settings import Settings
from canvasdb.tenancy import Principal

NOTE = EntityType(name="note", module="notes", text_fields={"title": "A", "body": "B"}, tag_field="tags")
CARD = EntityType(name="kanban.card", module="kanban", text_fields={"title": "A"}, tag_field="labels")
T = TypeVar("T")


async def _setup(svc: Services, tenant: Tenant, docs: list[tuple[str, dict[str, Any]]]) -> list[UUID]:
    """Register the types, write the entities, and index their words and vectors."""
    await svc.types.register(tenant.owner, NOTE)
    await svc.types.register(tenant.owner, CARD)
    ids = []
    for type_name, data in docs:
        ids.append((await svc.entities.create(tenant.owner, tenant.project_id, type_name, data)).id)
    await svc.indexer.drain(tenant.org_id)
    return ids


async def _ids(svc: Services, who: Principal, text: str, **kw: Any) -> list[UUID]:
    return [h.id for h in (await svc.search.search(who, text, **kw)).hits]


# --- the query language and the typo rules (no database) ---------------------------------------

def test_query_syntax_reads_phrases_or_and_exclusions() -> None:
    parsed = parse('"red car" OR truck -draft bus')
    assert [[t.words for t in g.terms] for g in parsed.groups] == [[("red", "car"), ("truck",)], [("bus",)]]
    assert parsed.groups[0].terms[0].phrase
    assert [t.words for t in parsed.excluded] == [("draft",)]
    assert parsed.groups[1].terms[0].prefix, "the last word is still being typed"
    assert not parse("bus ").groups[0].terms[0].prefix
    assert parse("!!! && || :* \\ '").empty
    assert parse('"unbalanced quote').groups[0].terms[0].words == ("unbalanced", "quote")
    many = parse(" ".join(f"w{i}" for i in range(30)))
    assert len(many.groups) == 10 and many.ignored == 20


def test_typo_rules_follow_meilisearch() -> None:
    assert [allowed_typos(w) for w in ("car", "four", "house", "elephant", "dependency")] == [0, 0, 1, 1, 2]
    assert typo_cost("hosue", "house") == 1, "a swap of two adjacent letters is one typo"
    assert typo_cost("mouse", "house") == 2, "a typo on the first letter counts as two"
    assert typo_cost("housr", "house") == 1
    assert typo_cost("dependancy", "dependency") == 1
    # Among corrections of as many typos: a letter left out or a swap is likelier than a
    # wrong or an extra letter (which must also be that very letter).
    assert [slip("plant", w) for w in ("planet", "palnt", "plait", "pant")] == [0, 0, 1, 1]


# --- text --------------------------------------------------------------------------------------

async def test_text_search_ranks_title_hits_and_follows_typing(svc: Services, tenant: Tenant) -> None:
    title, body, other = await _setup(svc, tenant, [
        ("note", {"title": "Quarterly roadmap", "body": "plans for the next quarter"}),
        ("note", {"title": "Meeting notes", "body": "we discussed the roadmap at length"}),
        ("note", {"title": "Shopping", "body": "milk and bread"}),
    ])
    assert await _ids(svc, tenant.owner, "roadmap", mode="text") == [title, body]
    assert await _ids(svc, tenant.owner, "roadm", mode="text") == [title, body], "prefix of the last word"
    assert await _ids(svc, tenant.owner, "milk", mode="text") == [other]
    res = await svc.search.search(tenant.owner, "roadmap", mode="text")
    assert res.hits[0].highlights["title"] == "Quarterly <mark>roadmap</mark>"
    assert res.total == 2 and not res.total_approximate


async def test_websearch_syntax_phrase_or_and_exclusion(svc: Services, tenant: Tenant) -> None:
    red_car, car_red, truck = await _setup(svc, tenant, [
        ("note", {"title": "red car parked", "body": ""}),
        ("note", {"title": "car painted red", "body": "draft"}),
        ("note", {"title": "blue truck", "body": ""}),
    ])
    assert await _ids(svc, tenant.owner, '"red car"', mode="text") == [red_car]
    assert set(await _ids(svc, tenant.owner, "truck OR parked ", mode="text")) == {red_car, truck}
    assert await _ids(svc, tenant.owner, "red -draft", mode="text") == [red_car]


def test_terms_reach_postgresql_whole_and_quoted() -> None:
    """PostgreSQL splits each term into tokens (see query.py): one quoted operand, its quotes
    and backslashes escaped, the operators inside it inert."""
    terms = [g.terms[0] for g in parse(r"john@example.com it's a\b !c:* ./run.sh ").groups]
    assert [t.tsquery() for t in terms] == ["'john@example.com'", "'it''s'", r"'a\\b'", "'!c:*'",
                                            "('./run.sh' | ' ./run.sh')"]
    assert [t.word for t in terms] == [None, None, None, "c", None], "typos are corrected in single words"
    assert parse("e-mai").groups[0].terms[0].tsquery() == "'e-mai':*", "a prefix of every token"
    assert parse("""-"a 'b'" c""").unless() == "('a ''b''')"


async def test_exact_tokens_are_found_as_postgresql_indexed_them(svc: Services, tenant: Tenant) -> None:
    """An e-mail, a host, a version, a number, a path are one token each to PostgreSQL's parser,
    "İstanbul" keeps its capital (the C locale lower-cases ASCII only) and an Arabic word its
    vowel marks: typed exactly (or as a prefix), each finds its entity, in text and hybrid modes.
    The other note has the same letters as separate words, which a query split in Python found."""
    tokens = ["john@example.com", "example.com", "1.2.3", "3.14", "/usr/local/bin", "İstanbul", "مَرْحَبًا"]
    title = "Mail john@example.com about example.com 1.2.3 (3.14) in /usr/local/bin, İstanbul: مَرْحَبًا"
    note, other = await _setup(svc, tenant, [
        ("note", {"title": title, "body": "then run ./deploy.sh"}),
        ("note", {"title": "john example com 1 2 3 14 usr local bin istanbul", "body": ""}),
    ])
    for token in [*tokens, "./deploy.sh", '"example.com 1.2.3"']:
        for typed in (token, token + " "):
            assert await _ids(svc, tenant.owner, typed, mode="text", typo=False) == [note], typed
            # ("İstanbul" is one typo from "istanbul": the other note comes after, corrected)
            assert (await _ids(svc, tenant.owner, typed, mode="text"))[:1] == [note], typed
            res = await svc.search.search(tenant.owner, typed, mode="hybrid")
            # found by its words (the fusion with meaning may rank the corrected "istanbul" first)
            assert note in [h.id for h in res.hits if h.words], typed
    res = await svc.search.search(tenant.owner, "john@example.com ", mode="text")
    assert "<mark>john@example.com</mark>" in res.hits[0].highlights["title"] and res.total == 1
    assert await _ids(svc, tenant.owner, "john example com ", mode="text") == [other]
    for mode in ("text", "hybrid"):
        assert note not in await _ids(svc, tenant.owner, "-john@example.com", mode=mode), mode
    assert await _ids(svc, tenant.owner, "mail -İstanbul", mode="text") == []


async def test_more_query_words_matched_rank_first(svc: Services, tenant: Tenant) -> None:
    both, first = await _setup(svc, tenant, [
        ("note", {"title": "garden", "body": "tomato seedlings"}),
        ("note", {"title": "garden", "body": "roses"}),
    ])
    res = await svc.search.search(tenant.owner, "garden tomato ", mode="text")
    assert [h.id for h in res.hits] == [both, first]
    assert [h.words for h in res.hits] == [2, 1]


@pytest.mark.parametrize(("typed", "found"), [
    ("kitchn", True),       # 6 letters, one deletion
    ("kitchne", True),      # swap of two adjacent letters: one typo
    ("bitchen", False),     # first letter: counts as two, over the one allowed
    ("kitchem", True),      # substitution
    ("kichten", False),     # two typos in 7 letters
    ("accomodation", True),     # 12 letters, one typo
    ("acommodatoin", True),     # 12 letters, two typos
    ("akomodation", False),     # three typos
    ("cat", False),             # short words match exactly ("car" is stored)
])
async def test_typo_rules_in_search(svc: Services, tenant: Tenant, typed: str, found: bool) -> None:
    kitchen, hotel, car = await _setup(svc, tenant, [
        ("note", {"title": "kitchen renovation", "body": ""}),
        ("note", {"title": "hotel accommodation", "body": ""}),
        ("note", {"title": "car", "body": ""}),
    ])
    ids = await _ids(svc, tenant.owner, typed + " ", mode="text")
    assert bool(ids) == found, ids
    if found:
        assert ids[0] in (kitchen, hotel)
    assert await _ids(svc, tenant.owner, typed + " ", mode="text", typo=False) == []


async def test_exact_matches_rank_before_corrections(svc: Services, tenant: Tenant) -> None:
    corrected, exact = await _setup(svc, tenant, [
        ("note", {"title": "a horde of visitors", "body": ""}),
        ("note", {"title": "horse", "body": ""}),
    ])
    res = await svc.search.search(tenant.owner, "horse ", mode="text")
    assert [(h.id, h.typos) for h in res.hits] == [(exact, 0), (corrected, 1)]
    assert res.corrections == {"horse": ["horde"]}


async def test_corrections_take_turns_after_the_likelier_slips(svc: Services, tenant: Tenant) -> None:
    """A swap ("cable") comes before wrong letters ("camel", "caber"); those two take turns, so
    the one rare word is not buried under the common one's many matches; pages follow suit."""
    cable, caber, *camels = await _setup(svc, tenant, [
        ("note", {"title": "cable", "body": ""}),
        ("note", {"title": "caber toss at the highland games", "body": ""}),
        *(("note", {"title": "camel", "body": ""}) for _ in range(4)),
    ])
    res = await svc.search.search(tenant.owner, "cabel ", mode="text")
    assert res.corrections == {"cabel": ["cable", "caber", "camel"]}
    ids = [h.id for h in res.hits]
    assert ids[0] == cable and caber in ids[1:3] and set(ids) == {cable, caber, *camels}
    pages, cursor = [], None
    while True:
        page = await svc.search.search(tenant.owner, "cabel ", mode="text", limit=2, cursor=cursor)
        pages += [h.id for h in page.hits]
        if (cursor := page.next_cursor) is None:
            break
    assert pages == ids


async def test_a_corrected_match_is_ranked_by_the_word_it_matched(svc: Services, tenant: Tenant) -> None:
    """"markez" is one typo from "market" and "marker". A note titled "marker" whose body says
    "market" is a "marker" match (its title's word), and ranks among them by "marker" alone: the
    other correction's words in its body lend it nothing."""
    borrowed, marker, market = await _setup(svc, tenant, [
        ("note", {"title": "marker", "body": "market market market"}),
        ("note", {"title": "marker", "body": "a marker, another marker"}),
        ("note", {"title": "market", "body": ""}),
    ])
    res = await svc.search.search(tenant.owner, "markez ", mode="text")
    assert res.corrections == {"markez": ["marker", "market"]}
    # each correction's best first (ranked by its own word), then the second "marker"
    assert [h.id for h in res.hits] == [marker, market, borrowed]
    exact = await svc.search.search(tenant.owner, "marker ", mode="text")
    assert [h.id for h in exact.hits] == [marker, borrowed, market]  # "market" lends no rank either


async def test_deleted_entities_vanish_at_once_and_come_back(svc: Services, tenant: Tenant) -> None:
    (note,) = await _setup(svc, tenant, [("note", {"title": "ephemeral idea", "body": ""})])
    await svc.entities.delete(tenant.owner, note)
    assert await _ids(svc, tenant.owner, "ephemeral", mode="text") == []
    assert await _ids(svc, tenant.owner, "ephemeral", mode="hybrid") == []
    await svc.entities.undelete(tenant.owner, note)
    assert await _ids(svc, tenant.owner, "ephemeral", mode="text") == [note]


async def test_text_changes_are_searchable_at_once(svc: Services, tenant: Tenant) -> None:
    (note,) = await _setup(svc, tenant, [("note", {"title": "before", "body": ""})])
    await svc.entities.patch(tenant.owner, note, {"title": "afterwards"})
    assert await _ids(svc, tenant.owner, "afterwards", mode="text") == [note]
    assert await _ids(svc, tenant.owner, "before ", mode="text") == []


@pytest.mark.parametrize("hostile", [
    "", "   ", "x" * 10_000, "the and of", "!!! ??? ...", "'; DROP TABLE entities; --", "a & b | !c :* \\",
    '"unbalanced', "-", "OR", "-\"\"", "\x00zero", "🙂 emoji",
])
async def test_hostile_queries_answer_without_error(svc: Services, tenant: Tenant, hostile: str) -> None:
    await _setup(svc, tenant, [("note", {"title": "anything at all", "body": ""})])
    for mode in ("text", "hybrid", "semantic"):
        res = await svc.search.search(tenant.owner, hostile, mode=mode)
        assert res.degraded is None


# --- meaning and fusion --------------------------------------------------------------------------

async def test_semantic_search_finds_synonyms(svc: Services, tenant: Tenant) -> None:
    vehicle, fruit, sheet = await _setup(svc, tenant, [
        ("note", {"title": "Sticky note", "body": "buy a new vehicle"}),
        ("note", {"title": "Groceries", "body": "bananas, apples and pears"}),
        ("note", {"title": "Budget", "body": "quarterly spreadsheet with totals"}),
    ])
    assert await _ids(svc, tenant.owner, "car", mode="text") == [], "no word in common"
    semantic = await _ids(svc, tenant.owner, "car", mode="semantic")
    assert semantic[0] == vehicle
    hybrid = await svc.search.search(tenant.owner, "car", mode="hybrid")
    assert hybrid.hits[0].id == vehicle and hybrid.degraded is None
    assert (await _ids(svc, tenant.owner, "fruit", mode="semantic"))[0] == fruit
    assert (await _ids(svc, tenant.owner, "finance figures", mode="semantic"))[0] == sheet


async def test_hybrid_fuses_text_and_meaning_by_reciprocal_rank(svc: Services, tenant: Tenant) -> None:
    exact, meaning, _ = await _setup(svc, tenant, [
        ("note", {"title": "automobile insurance", "body": "policy renewal"}),
        ("note", {"title": "Sticky note", "body": "buy a new vehicle"}),
        ("note", {"title": "Recipes", "body": "soup"}),
    ])
    res = await svc.search.search(tenant.owner, "automobile", mode="hybrid")
    assert [h.id for h in res.hits][:2] == [exact, meaning]
    top = res.hits[0]
    assert top.words == 1 and top.distance is not None
    by_meaning = await _ids(svc, tenant.owner, "automobile", mode="semantic")
    assert top.score == pytest.approx(1 / 61 + 1 / (61 + by_meaning.index(exact)), rel=1e-4)


async def test_meaning_changes_are_searchable_after_indexing(svc: Services, tenant: Tenant) -> None:
    (note,) = await _setup(svc, tenant, [("note", {"title": "Weekly plan", "body": "piano lessons"})])
    await svc.entities.patch(tenant.owner, note, {"body": "football training"})
    assert (await svc.indexer.backlog(tenant.org_id))["embeddings"] == 1
    await svc.indexer.drain(tenant.org_id)
    assert (await svc.indexer.backlog(tenant.org_id)) == {"terms": 0, "embeddings": 0}
    assert (await _ids(svc, tenant.owner, "soccer", mode="semantic"))[0] == note


async def test_backlog_metric_lists_only_orgs_with_a_backlog(svc: Services, tenant: Tenant) -> None:
    """One series per org ever indexed, kept for good, grew /metrics with every tenant."""
    (note,) = await _setup(svc, tenant, [("note", {"title": "Weekly plan", "body": "piano lessons"})])
    series = {"org": str(tenant.org_id)}
    assert REGISTRY.get_sample_value("canvasdb_search_embedding_backlog", series) is None
    await svc.entities.patch(tenant.owner, note, {"body": "football training"})
    await svc.indexer.report_backlog(tenant.org_id)
    assert REGISTRY.get_sample_value("canvasdb_search_embedding_backlog", series) == 1
    await svc.indexer.drain(tenant.org_id)
    assert REGISTRY.get_sample_value("canvasdb_search_embedding_backlog", series) is None


async def test_slow_or_stopped_embedder_degrades_to_text(svc: Services, tenant: Tenant) -> None:

    (note,) = await _setup(svc, tenant, [("note", {"title": "degraded mode", "body": ""})])
    slow = Search(svc.db, svc.models, embed_timeout=1e-6)
    res = await slow.search(tenant.owner, "degraded", mode="hybrid")
    assert [h.id for h in res.hits] == [note] and res.degraded and "did not answer" in res.degraded
    with socket.socket() as s:  # a port where nothing listens: the embedding service is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    active = await svc.models.active()
    assert active is not None
    down = make_embedder("ollama", model=active.model, url=f"http://127.0.0.1:{port}", timeout=1)
    stopped = Search(svc.db, Models(svc.db, down))
    for mode in ("hybrid", "semantic"):
        res = await stopped.search(tenant.owner, "degraded", mode=mode)
        assert [h.id for h in res.hits] == [note], mode
        assert res.degraded and res.to_json()["degraded"] is True
    await down.aclose()


class _Refusing:
    """An embedder, except that it fails any batch with a text that says "refused"."""

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder

    def __getattr__(self, name: str) -> Any:  # model, kind, dimension (a remote one's, once learnt)...
        return getattr(self.embedder, name)

    async def embed(self, texts: list[str], **kw: Any) -> Any:
        if any("refused" in text for text in texts):
            raise EmbedderUnavailable("HTTP 400: this text is refused")
        return await self.embedder.embed(texts, **kw)


async def test_texts_the_embedder_refuses_hold_back_no_other(svc: Services, tenant: Tenant) -> None:
    """The queue is taken oldest first: a text the embedder fails every time (too long for a
    service, say) failed every batch it was in, and the org's later changes waited for ever."""
    await svc.types.register(tenant.owner, NOTE)
    await svc.models.register()
    _, _, vehicle, fruit = [
        (await svc.entities.create(tenant.owner, tenant.project_id, "note", {"title": title, "body": ""})).id
        for title in ("refused first", "refused second", "buy a new vehicle", "bananas and pears")]
    indexer = Indexer(svc.db, Models(svc.db, _Refusing(svc.models.configured)))  # type: ignore[arg-type]
    with pytest.raises(EmbedderUnavailable):  # the first two alone: it may as well be down
        await indexer.drain(tenant.org_id)
    await indexer.drain(tenant.org_id)
    assert (await indexer.backlog(tenant.org_id))["embeddings"] == 2
    assert await _ids(svc, tenant.owner, "car", mode="semantic") == [vehicle, fruit]


# --- filters, facets, pages ------------------------------------------------------------------------

async def test_filters_and_facets(svc: Services, tenant: Tenant) -> None:
    other = await svc.tenancy.create_project(tenant.owner, "second")
    await svc.types.register(tenant.owner, NOTE)
    await svc.types.register(tenant.owner, CARD)
    done = await svc.entities.create(tenant.owner, tenant.project_id, "kanban.card",
                                     {"title": "launch rocket", "status": "done", "labels": ["space", "urgent"],
                                      "points": 3, "meta": {"team": "blue"}})
    todo = await svc.entities.create(tenant.owner, tenant.project_id, "kanban.card",
                                     {"title": "launch party", "status": "todo", "labels": ["fun"]})
    note = await svc.entities.create(tenant.owner, other["id"], "note",
                                     {"title": "launch notes", "body": "", "tags": ["space"]})
    search = svc.search.search
    assert {h.id for h in (await search(tenant.owner, "launch", mode="text")).hits} == {done.id, todo.id, note.id}
    f = Filters(data=(("status", "done"),))
    assert [h.id for h in (await search(tenant.owner, "launch", mode="text", filters=f)).hits] == [done.id]
    f = Filters(data=(("points", "3"), ("meta.team", "blue")))
    assert [h.id for h in (await search(tenant.owner, "launch", mode="text", filters=f)).hits] == [done.id]
    f = Filters(data=(("labels", "space"),))  # an array field: one of its items
    assert [h.id for h in (await search(tenant.owner, "launch", mode="text", filters=f)).hits] == [done.id]
    for value in ("NaN", "Infinity", '"quoted\\" == $x', "1e999"):  # no match, no error
        f = Filters(data=(("points", value),))
        assert (await search(tenant.owner, "launch", mode="text", filters=f)).hits == []
    f = Filters(types=("note",))
    assert [h.id for h in (await search(tenant.owner, "launch", mode="text", filters=f)).hits] == [note.id]
    f = Filters(modules=("kanban",), projects=(tenant.project_id,))
    assert len((await search(tenant.owner, "launch", mode="text", filters=f)).hits) == 2
    f = Filters(updated_after=note.updated_at)
    assert (await search(tenant.owner, "launch", mode="text", filters=f)).hits == []
    await svc.indexer.drain(tenant.org_id)
    for mode in ("semantic", "hybrid"):  # the vectors' own project and type, then search_docs'
        f = Filters(types=("note",))
        assert [h.id for h in (await search(tenant.owner, "launch", mode=mode, filters=f)).hits] == [note.id]
        f = Filters(types=("kanban.card",), projects=(tenant.project_id,))
        assert {h.id for h in (await search(tenant.owner, "launch", mode=mode, filters=f)).hits} == {done.id,
                                                                                                      todo.id}
    res = await search(tenant.owner, "launch", mode="text", facets=("type", "module", "project", "tag"))
    assert res.facets == {
        "type": {"kanban.card": 2, "note": 1}, "module": {"kanban": 2, "notes": 1},
        "project": {str(tenant.project_id): 2, str(other["id"]): 1},
        "tag": {"space": 2, "fun": 1, "urgent": 1}}
    assert res.total == 3
    with pytest.raises(InvalidInput):
        await search(tenant.owner, "launch", filters=Filters(data=(("bad name';", "x"),)))
    with pytest.raises(InvalidInput):
        await search(tenant.owner, "launch", facets=("colour",))


async def test_title_matches_rank_first_even_past_the_cutoff(db: Database, svc: Services,
                                                             tenant: Tenant) -> None:
    """Meilisearch's attribute rule: a word in a title beats the same word in bodies, and the
    title is found through its own index even when the bodies' matches exceed the cutoff."""
    ids = await _setup(svc, tenant, [("note", {"title": f"minutes {i}", "body": "the budget " * (i + 1)})
                                     for i in range(5)] + [("note", {"title": "budget", "body": ""})])
    res = await Search(db, svc.models, rank_cutoff=2).search(tenant.owner, "budget", mode="text", limit=3)
    assert res.hits[0].id == ids[-1] and res.hits[0].score > res.hits[1].score
    assert len({h.id for h in res.hits}) == 3  # then 2 of the bodies' matches (the cutoff)


async def test_title_matches_are_found_shard_by_shard_and_stop_early(db: Database, svc: Services,
                                                                     tenant: Tenant) -> None:
    """Titles are indexed in 16 shards of the entity ids: every match is found, a phrase
    still needs its words in order, and a lookup with a limit reads the first shards only."""
    ids = await _setup(svc, tenant, [("note", {"title": f"quarterly plan {i}", "body": ""}) for i in range(48)]
                       + [("note", {"title": "plan for the year", "body": "quarterly"})])
    match = ("SELECT entity_id, uuid_hash(entity_id) & 15 AS shard FROM search_match("
             "%s, NULL, true, NULL, NULL, NULL, NULL, NULL, NULL, %s)")
    async with db.transaction(tenant.org_id) as conn:
        every = await (await conn.execute(match, ("quarter:*", 100))).fetchall()
        assert {r["entity_id"] for r in every} == set(ids[:-1])
        assert len({r["shard"] for r in every}) > 8  # spread over the shards
        phrase = await (await conn.execute(match, ("plan <-> quarterly", 100))).fetchall()
        assert phrase == []  # the titles say "quarterly plan"
        first = await (await conn.execute(match, ("quarterly", 5))).fetchall()
        shards = sorted(r["shard"] for r in every)
        assert len(first) == 5 and max(r["shard"] for r in first) == shards[4]
        total = await (await conn.execute(
            "SELECT n FROM search_facets('quarterly', NULL, NULL, NULL, NULL, NULL, NULL, NULL, 30, '{}')"
            " WHERE facet = 'total'")).fetchone()
        assert total == {"n": 31}  # more than the cap: counted no further
    res = await svc.search.search(tenant.owner, "quarterly", mode="text", limit=100)
    assert {h.id for h in res.hits} == set(ids) and res.hits[-1].id == ids[-1]  # the body match last


async def test_shard_queries_keep_every_lexeme(db: Database) -> None:
    """The shard goes in front of each lexeme of a query and of a row's title words, quotes
    and backslashes included, and a row's positions and weights stay."""
    async with db.pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT search_shard_query($q$'it''s' & 'a\\\\b':* & !( 'x' <-> 'y' )$q$::tsquery, 10)::text AS q,"
            " search_sharded('''it''''s'':1A back:2', '00000000-0000-0000-0000-000000000001') AS v,"
            " to_hex(uuid_hash('00000000-0000-0000-0000-000000000001') & 15) AS shard")).fetchone()
    assert row["q"] == "'ait''s' & 'aa\\\\b':* & !( 'ax' <-> 'ay' )"
    assert set(row["v"].split()) == {f"'{row['shard']}back':2", f"'{row['shard']}it''s':1A"}  # positions kept


async def test_totals_beyond_their_cap_are_marked_approximate(db: Database, svc: Services,
                                                              tenant: Tenant) -> None:
    await _setup(svc, tenant, [("note", {"title": f"budget line {i}", "body": "", "tags": [f"t{i % 2}"]})
                               for i in range(6)])
    search = Search(db, svc.models, total_cap=3, facet_cap=5).search
    res = await search(tenant.owner, "budget", mode="text")
    assert (res.total, res.total_approximate, len(res.hits)) == (3, True, 6)
    res = await search(tenant.owner, "budget", mode="text", facets=("tag",))
    assert (res.total, res.total_approximate, sum(res.facets["tag"].values())) == (5, True, 5)
    res = await Search(db, svc.models, total_cap=6).search(tenant.owner, "budget", mode="text")
    assert (res.total, res.total_approximate) == (6, False)


async def test_pages_follow_each_other_without_gaps_or_repeats(svc: Services, tenant: Tenant) -> None:
    ids = await _setup(svc, tenant, [("note", {"title": f"report number {i}", "body": "report" * (i % 3 + 1)})
                                     for i in range(25)] + [("note", {"title": "reports", "body": ""})])
    for mode in ("text", "hybrid", "semantic"):
        seen: list[UUID] = []
        cursor = None
        while True:
            res = await svc.search.search(tenant.owner, "report", mode=mode, limit=7, cursor=cursor)
            seen += [h.id for h in res.hits]
            cursor = res.next_cursor
            if cursor is None:
                break
        assert len(seen) == len(set(seen)), mode
        assert set(ids) <= set(seen) or mode != "text", mode
    with pytest.raises(InvalidInput):
        await svc.search.search(tenant.owner, "other query", mode="text", cursor=res.next_cursor or "bm90IGEgY3Vyc29y")


async def test_empty_query_lists_recent_entities_with_facets(svc: Services, tenant: Tenant) -> None:
    first, second = await _setup(svc, tenant, [("note", {"title": "one", "body": ""}),
                                               ("kanban.card", {"title": "two"})])
    res = await svc.search.search(tenant.owner, "", mode="hybrid", facets=("type",))
    assert [h.id for h in res.hits] == [second, first]
    assert res.facets == {"type": {"kanban.card": 1, "note": 1}}


# --- access ------------------------------------------------------------------------------------------

async def test_results_counts_and_facets_keep_to_readable_projects(svc: Services, tenant: Tenant,
                                                                   other_tenant: Tenant) -> None:
    secret = await svc.tenancy.create_project(tenant.owner, "secret")
    await _setup(svc, tenant, [("note", {"title": "budget visible", "body": ""})])
    await svc.entities.create(tenant.owner, secret["id"], "note", {"title": "budget hidden", "body": ""})
    await svc.indexer.drain(tenant.org_id)
    member_id = await svc.tenancy.ensure_user(f"member-{tenant.slug}@example.com")
    await svc.tenancy.set_org_role(tenant.org_id, member_id, "member")
    await svc.tenancy.set_project_role(tenant.owner, tenant.project_id, member_id, "viewer")
    member = Principal(org_id=tenant.org_id, user_id=member_id, org_role="member")
    for mode in ("text", "semantic", "hybrid"):
        res = await svc.search.search(member, "budget", mode=mode, facets=("project", "type"))
        assert [h.data["title"] for h in res.hits] == ["budget visible"], mode
        assert res.total == 1 and res.facets is not None
        assert res.facets["project"] == {str(tenant.project_id): 1}, mode
    with pytest.raises(NotFound):
        await svc.search.search(member, "budget", filters=Filters(projects=(secret["id"],)))
    # Another org sees nothing of this one, whatever it asks for.
    await svc.types.register(other_tenant.owner, NOTE)
    for mode in ("text", "semantic", "hybrid"):
        assert (await svc.search.search(other_tenant.owner, "budget", mode=mode)).hits == []
    with pytest.raises(NotFound):
        await svc.search.search(other_tenant.owner, "budget", filters=Filters(projects=(tenant.project_id,)))


# --- HTTP ------------------------------------------------------------------------------------------

async def test_http_search(client: httpx.AsyncClient, svc: Services, tenant: Tenant) -> None:
    (card,) = await _setup(svc, tenant, [("kanban.card", {"title": "ship the release", "status": "done"})])
    url = f"/v1/orgs/{tenant.slug}/search"
    r = await client.get(url, params={"q": "releas", "mode": "text", "data.status": "done",
                                      "facets": "type,module", "project": tenant.project_slug},
                         headers=tenant.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [h["id"] for h in body["hits"]] == [str(card)]
    assert body["hits"][0]["highlights"]["title"] == "ship the <mark>release</mark>"
    assert body["facets"]["module"] == {"kanban": 1} and body["degraded"] is False
    for params, status in [({"q": "x", "colour": "red"}, 422), ({"q": "x", "data.bad;": "1"}, 422),
                           ({"q": "x", "mode": "fuzzy"}, 422), ({"q": "x", "limit": 0}, 422),
                           ({"q": "x", "cursor": "garbage"}, 422), ({"q": "x", "project": "nope"}, 404),
                           ({"q": "x" * 10_001}, 422), ({"q": "x", "updated_after": "yesterday"}, 422),
                           ({"q": "x", "project": ",".join(f"p{i}" for i in range(101))}, 422),
                           ({"q": "x", "type": ",".join(f"t{i}" for i in range(101))}, 422)]:
        r = await client.get(url, params=params, headers=tenant.headers)
        assert r.status_code == status, (params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    # the same project named a thousand times is one project (looked up once, not a thousand times)
    many = await client.get(url, params={"q": "releas", "mode": "text", "project": ",".join(
        [tenant.project_slug] * 1000)}, headers=tenant.headers)
    assert many.status_code == 200 and [h["id"] for h in many.json()["hits"]] == [str(card)], many.text
    assert (await client.get(url, params={"q": "x"})).status_code == 401
    status = await client.get(f"{url}/status", headers=tenant.headers)
    assert status.status_code == 200 and status.json()["backlog"] == {"terms": 0, "embeddings": 0}


# --- background indexing and a change of embedding model -----------------------------------------

async def test_a_worker_indexes_writes_within_seconds(pg_url: str, svc: Services, tenant: Tenant) -> None:

    await svc.types.register(tenant.owner, NOTE)
    requests = jobs.Requests(jobs.defer_indexing, every=0.05)
    svc.entities.changed = requests.request
    try:
        async with jobs.connected(pg_url), jobs.working(svc):
            note = await svc.entities.create(tenant.owner, tenant.project_id, "note",
                                             {"title": "Sticky note", "body": "buy a new vehicle"})
            for _ in range(600):  # the session's other jobs may be ahead of it in the queue
                if (await svc.indexer.backlog(tenant.org_id))["embeddings"] == 0:
                    break
                await asyncio.sleep(0.05)
            await requests.close()
    finally:
        svc.entities.changed = None
    assert (await _ids(svc, tenant.owner, "car", mode="semantic")) == [note.id]


async def test_a_type_redeclared_over_http_asks_for_indexing(client: httpx.AsyncClient, svc: Services,
                                                             tenant: Tenant) -> None:
    """Its entities' words and vectors are queued again: a worker is asked at once, not at the
    next sweep (up to a minute)."""
    await _setup(svc, tenant, [("note", {"title": "Sticky note", "body": "buy a new vehicle"})])
    asked: list[UUID] = []

    async def request(org_id: UUID) -> None:
        asked.append(org_id)

    svc.entities.changed = request
    try:
        res = await client.post(f"/v1/orgs/{tenant.slug}/entity-types", headers=tenant.headers,
                                json={"name": "note", "module": "notes", "text_fields": {"title": "A"}})
    finally:
        svc.entities.changed = None
    assert res.status_code == 201
    assert (await svc.indexer.backlog(tenant.org_id))["embeddings"] == 1 and asked == [tenant.org_id]


@asynccontextmanager
async def _database_of_its_own(pg_url: str) -> AsyncIterator[Database]:
    """For a change of model: the active model is one choice for the whole deployment."""
    name = unique("models").replace("-", "_")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = psycopg.conninfo.make_conninfo(pg_url, dbname=name)
    try:
        prepare_schema(url)
        async with Database(url, min_size=1, max_size=4) as db:
            yield db
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


async def test_a_new_model_builds_in_the_background_then_takes_over(pg_url: str, settings: Settings) -> None:
    fake = FakeService()

    def asked() -> list[str]:
        return [text for _, _, body in fake.requests for text in body["input"]]
    try:
        async with _database_of_its_own(pg_url) as db:
            old = Services.build(settings, db)
            tenant = await make_tenant(old)
            (vehicle, _) = await _setup(old, tenant, [("note", {"title": "Sticky note", "body": "buy a new vehicle"}),
                                                      ("note", {"title": "Groceries", "body": "bananas"})])
            assert (await old.models.active()).model == "all-MiniLM-L6-v2"
            new = Services.build(settings, db, embedder=make_embedder("openai", model="fake-8",
                                                                         url=fake.url + "/v1"))
            assert (await new.models.register()).state == "building"
            # While it builds, queries still embed with the old model and find the old vectors.
            assert (await _ids(new, tenant.owner, "car", mode="semantic"))[0] == vehicle
            assert "car" not in asked()
            assert await new.indexer.backfill([tenant.org_id]) == 2
            assert (await new.models.active()).model == "fake-8"
            async with db.transaction(tenant.org_id) as conn:
                cur = await conn.execute("SELECT DISTINCT model FROM search_vectors")
                assert [r["model"] for r in await cur.fetchall()] == ["fake-8"]
                cur = await conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'search_vectors'"
                                         " AND indexdef LIKE '%%hnsw%%'")
                assert [r["indexdef"] for r in await cur.fetchall()] == [
                    "CREATE INDEX search_vectors_hnsw_" + hashlib.md5(b"fake-8").hexdigest()[:16]
                    + " ON public.search_vectors USING hnsw (((embedding)::halfvec(8)) halfvec_cosine_ops)"
                    " WITH (m='16', ef_construction='64') WHERE (model = 'fake-8'::text)"]
            res = await new.search.search(tenant.owner, "car", mode="semantic")
            assert len(res.hits) == 2 and "car" in asked() and res.degraded is None
            await new.models.close()
            await old.models.close()
    finally:
        fake.close()


async def test_a_new_model_is_built_past_the_texts_its_embedder_refuses(pg_url: str, settings: Settings) -> None:
    """A text the new model's embedder fails every time (too long for a service, say) failed every
    build, and the new model never became active. Those it fails alone are left to the queue; when
    the first two fail alone, it may be down: the build fails, and goes on past them when retried."""
    fake = FakeService()
    try:
        async with _database_of_its_own(pg_url) as db:
            old = Services.build(settings, db)
            tenant = await make_tenant(old)
            await old.types.register(tenant.owner, NOTE)
            titles = ["refused first", "refused second", "buy a new vehicle", "refused later", "bananas"]
            ids = [(await old.entities.create(tenant.owner, tenant.project_id, "note", {"title": title, "body": ""},
                                              id=UUID(int=n + 1))).id for n, title in enumerate(titles)]
            await old.indexer.drain(tenant.org_id)
            new = Services.build(settings, db, embedder=_Refusing(make_embedder(  # type: ignore[arg-type]
                "openai", model="fake-8", url=fake.url + "/v1")))
            assert (await new.models.register()).state == "building"
            with pytest.raises(EmbedderUnavailable):
                await new.indexer.backfill([tenant.org_id])
            assert (await new.models.active()).model == "all-MiniLM-L6-v2"
            assert await new.indexer.backfill([tenant.org_id]) == 2
            assert (await new.models.active()).model == "fake-8"
            async with db.transaction(tenant.org_id) as conn:
                cur = await conn.execute("SELECT entity_id FROM search_vectors ORDER BY entity_id")
                assert [r["entity_id"] for r in await cur.fetchall()] == [ids[2], ids[4]]
                cur = await conn.execute("SELECT entity_id FROM search_queue WHERE embed_md5 IS NOT NULL"
                                         " ORDER BY queued_at")
                assert [r["entity_id"] for r in await cur.fetchall()] == [ids[0], ids[1], ids[3]]
            await new.models.close()
            await old.models.close()
    finally:
        fake.close()


async def _blocked_or_done(db: Database, work: Awaitable[T], *, waiting: int = 1) -> asyncio.Task[T]:
    """``work`` started, once it has finished or ``waiting`` sessions (its own included) wait for a lock."""
    task = asyncio.ensure_future(work)
    while not task.done():
        row = await db.one("SELECT count(DISTINCT pid) AS n FROM pg_locks WHERE NOT granted", ())
        if row and row["n"] >= waiting:
            break
        await asyncio.sleep(0.01)
    return task


@asynccontextmanager
async def _vector_write_left_open(db: Database, tenant: Tenant, entity: UUID) -> AsyncIterator[Any]:
    """A transaction that has written the entity's vector row, committed when the block ends."""
    async with db.transaction(tenant.org_id) as held:
        await held.execute("UPDATE search_vectors SET embedded_at = clock_timestamp()"
                           " WHERE org_id = %s AND entity_id = %s", (tenant.org_id, entity))
        yield held


async def _cancelled_behind_an_open_write(db: Database, tenant: Tenant, entity: UUID, work: Awaitable[Any],
                                          error: type[BaseException]) -> None:
    """Start ``work`` while a write of the entity's vector is open; once it waits for that write,
    cancel it (as a build fails, or its process dies): it raises ``error``."""
    async with _vector_write_left_open(db, tenant, entity) as held:
        task = await _blocked_or_done(db, work)
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            await conn.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                               " WHERE %s = ANY(pg_blocking_pids(pid))", (held.info.backend_pid,))
        with pytest.raises(error):
            await task


async def _index_state(db: Database, model: str) -> tuple[bool | None, bool]:
    """Whether the model's HNSW index is valid (None: there is none), and whether a nearest-vector
    query of the model uses it (with sequential scans made dear)."""
    row = await db.one("SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                       " WHERE c.relname = %s", ("search_vectors_hnsw_" + hashlib.md5(model.encode()).hexdigest()[:16],))
    async with db.transaction() as conn:
        await conn.execute("SET LOCAL enable_seqscan = off")
        cur = await conn.execute(psycopg.sql.SQL(
            "EXPLAIN SELECT entity_id FROM search_vectors WHERE model = {m}"
            " ORDER BY embedding::halfvec(8) <=> '[1,0,0,0,0,0,0,0]'::halfvec(8) LIMIT 5").format(
                m=psycopg.sql.Literal(model)))
        plan = " ".join(r["QUERY PLAN"] for r in await cur.fetchall())
    return (row["indisvalid"] if row else None), "search_vectors_hnsw_" in plan


@asynccontextmanager
async def _a_change_of_model(pg_url: str, settings: Settings, *texts: str
                             ) -> AsyncIterator[tuple[Database, Tenant, list[UUID], Services, Services]]:
    """A database of its own whose notes (``texts``) have vectors of the default model, with
    services of that model (old) and of another one, not yet registered (new)."""
    fake = FakeService()
    try:
        async with _database_of_its_own(pg_url) as db:
            old = Services.build(settings, db)
            tenant = await make_tenant(old)
            ids = await _setup(old, tenant, [("note", {"title": "Note", "body": text}) for text in texts])
            new = Services.build(settings, db, embedder=make_embedder("openai", model="fake-8",
                                                                         url=fake.url + "/v1"))
            try:
                yield db, tenant, ids, old, new
            finally:
                await new.models.close()
                await old.models.close()
    finally:
        fake.close()


async def test_entities_embedded_by_the_old_model_during_a_build_are_queued_at_activation(
        pg_url: str, settings: Settings) -> None:
    """An entity written once the build's walk had passed it, or one the new model's embedder failed
    alone (left to the queue), and embedded meanwhile by a process still configured with the old
    model, had only an old vector: deleted at activation, it left the entity out of semantic search
    until its next edit. Activation queues them for the new model."""
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle", "refused for now") as (
            db, tenant, (vehicle, refused), old, new):
        activate = new.models.activate
        written: list[UUID] = []

        async def written_behind_the_walk(info: ModelInfo) -> None:
            written.append((await old.entities.create(tenant.owner, tenant.project_id, "note",
                                                      {"title": "Memo", "body": "bananas"})).id)
            assert (await old.indexer.drain(tenant.org_id))["embedded"] == 2  # the memo and the refused
            await activate(info)

        new.models.activate = written_behind_the_walk  # type: ignore[method-assign]
        embedder = new.models.configured
        new.models.configured = _Refusing(embedder)  # type: ignore[assignment]
        assert await new.indexer.backfill([tenant.org_id]) == 1
        assert (await new.models.active()).model == "fake-8"
        assert (await new.indexer.backlog(tenant.org_id))["embeddings"] == 2
        new.models.configured = embedder  # (the service takes that text now)
        assert (await new.indexer.drain(tenant.org_id))["embedded"] == 2
        assert set(await _ids(new, tenant.owner, "bananas", mode="semantic")) == {vehicle, refused, *written}


async def test_the_switch_of_model_queues_behind_what_is_queued_leaving_it_in_place(
        pg_url: str, settings: Settings) -> None:
    """The entities with no vector of the new model are queued at activation behind those queued
    already, which keep their place (a text the embedder failed alone goes to the back instead)."""
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle") as (db, tenant, (vehicle,), old, new):
        memo = (await old.entities.create(tenant.owner, tenant.project_id, "note",
                                          {"title": "Memo", "body": "bananas"})).id

        async def queue() -> list[tuple[UUID, datetime]]:
            async with db.transaction(tenant.org_id) as conn:
                cur = await conn.execute("SELECT entity_id, queued_at FROM search_queue"
                                         " WHERE embed_md5 IS NOT NULL ORDER BY queued_at")
                return [(r["entity_id"], r["queued_at"]) for r in await cur.fetchall()]

        before = await queue()
        assert [entity for entity, _ in before] == [memo]
        await new.models.activate(await new.models.register())
        after = await queue()
        assert after[0] == before[0] and [entity for entity, _ in after[1:]] == [vehicle]


async def test_the_switch_of_model_queues_entities_in_the_order_writes_lock_them(
        pg_url: str, settings: Settings) -> None:
    """A write changes two entities (in id order, as writes do) while the switch queues the entities
    with no vector of the new model. The switch took them in the table's order, here the second one
    first: it waited for the first one's queue row, held by the write, and the write for the second
    one's, held by the switch: a deadlock, and one of the two failed."""
    async with _a_change_of_model(pg_url, settings) as (db, tenant, _, old, new):
        second, first = [(await old.entities.create(tenant.owner, tenant.project_id, "note",
                                                    {"title": "Note", "body": body}, id=UUID(int=n))).id
                         for n, body in ((2**128 - 1, "tidal energy"), (1, "bananas"))]
        await old.indexer.drain(tenant.org_id)
        info = await new.models.register()
        assert await new.models.indexes.build(info.model, info.dimension)
        async with held(db.conninfo, tenant) as write:
            await change(write, tenant, first, "replace", '{"title": "Note", "body": "pears"}')
            activation = await _blocked_or_done(db, new.models.activate(info))
            await change(write, tenant, second, "replace", '{"title": "Note", "body": "tides"}')
            await write.commit()
        await activation
        assert (await new.indexer.drain(tenant.org_id))["embedded"] == 2


class _SwitchingMeanwhile:
    """An embedder, except that the first batch it embeds waits for ``switch`` (the activation of
    another model by another process) before it answers."""

    def __init__(self, embedder: Any, switch: Callable[[], Awaitable[Any]]) -> None:
        self.embedder = embedder
        self.switch: Callable[[], Awaitable[Any]] | None = switch
        self.batches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.embedder, name)

    async def embed(self, texts: list[str], **kw: Any) -> Any:
        self.batches += 1
        vectors = await self.embedder.embed(texts, **kw)
        if self.switch is not None:
            switch, self.switch = self.switch, None
            await switch()
        return vectors


async def test_a_drain_of_the_old_model_leaves_to_the_new_one_what_it_embedded_as_the_new_one_took_over(
        pg_url: str, settings: Settings) -> None:
    """A process still configured with the old model embeds a queued entity; the new model becomes
    active before it stores the vector. The retired model's vector was stored and the queue row
    cleared (the one the activation had left for the new model), so the entity had no vector of
    the active model and nothing queued: out of semantic search until its next edit. The drain
    now stops there, and the process's later drains embed nothing."""
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle") as (db, tenant, (vehicle,), old, new):
        memo = (await old.entities.create(tenant.owner, tenant.project_id, "note",
                                          {"title": "Memo", "body": "bananas"})).id

        async def new_model_built() -> None:
            assert await new.indexer.backfill([tenant.org_id]) == 1  # the vehicle (the memo is queued)

        embedder = _SwitchingMeanwhile(old.models.configured, new_model_built)
        old.models.configured = embedder  # type: ignore[assignment]
        assert (await old.indexer.drain(tenant.org_id))["embedded"] == 0
        assert (await new.models.active()).model == "fake-8"
        assert (await new.indexer.backlog(tenant.org_id))["embeddings"] == 1
        later = (await old.entities.create(tenant.owner, tenant.project_id, "note",
                                           {"title": "Fruit", "body": "bananas and pears"})).id
        assert (await old.indexer.drain(tenant.org_id))["embedded"] == 0
        assert embedder.batches == 1
        assert (await new.indexer.drain(tenant.org_id))["embedded"] == 2
        assert set(await _ids(new, tenant.owner, "bananas", mode="semantic")) == {vehicle, memo, later}
        async with db.transaction(tenant.org_id) as conn:
            cur = await conn.execute("SELECT DISTINCT model FROM search_vectors")
            assert [r["model"] for r in await cur.fetchall()] == ["fake-8"]


@asynccontextmanager
async def _switch_held_up(db: Database, tenant: Tenant) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A transaction of the org holding the new model's registry row: an activation that follows
    makes its first pass, then waits there with the registry's lock (as on a large deployment)."""
    async with held(db.conninfo, tenant) as conn:
        await conn.execute("SELECT FROM search_models WHERE model = 'fake-8' FOR UPDATE")
        yield conn


async def test_vectors_stored_during_the_switch_of_model_wait_for_it(pg_url: str, settings: Settings) -> None:
    """The old model's vector is stored while the activation's transaction is under way. The store
    cleared the queue row the activation left, once the activation committed; it now waits for the
    activation, sees its model retired, and stores nothing."""
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle") as (db, tenant, (vehicle,), old, new):
        memo = (await old.entities.create(tenant.owner, tenant.project_id, "note",
                                          {"title": "Memo", "body": "bananas"})).id
        info = await new.models.register()
        assert await new.models.indexes.build(info.model, info.dimension)
        async with _switch_held_up(db, tenant):
            activation = await _blocked_or_done(db, new.models.activate(info))
            drain = await _blocked_or_done(db, old.indexer.drain(tenant.org_id), waiting=2)
            assert not activation.done() and not drain.done()
        await activation
        assert (await drain)["embedded"] == 0
        assert (await new.indexer.backlog(tenant.org_id))["embeddings"] == 2  # the vehicle and the memo
        assert (await new.indexer.drain(tenant.org_id))["embedded"] == 2
        assert set(await _ids(new, tenant.owner, "bananas", mode="semantic")) == {vehicle, memo}


async def test_a_vector_store_waits_for_the_switch_of_model_before_it_locks_search_rows(
        pg_url: str, settings: Settings) -> None:
    """A write changes an entity while the switch of model is under way; a store of a second entity's
    vector waits for the switch; the write then changes that second entity too. Had the store locked
    that entity's search row before waiting, the write would wait for the store: a deadlock, and one
    of the three would fail."""
    async with _a_change_of_model(pg_url, settings, "bananas") as (db, tenant, (fruit,), old, new):
        memo = (await old.entities.create(tenant.owner, tenant.project_id, "note", {"title": "Memo", "body": "tide"},
                                          id=UUID(int=2**128 - 1))).id  # after the fruit in id order
        info = await new.models.register()
        assert await new.models.indexes.build(info.model, info.dimension)
        async with _switch_held_up(db, tenant) as write:
            activation = await _blocked_or_done(db, new.models.activate(info))
            await change(write, tenant, fruit, "replace", '{"title": "Fruit", "body": "pears"}')
            drain = await _blocked_or_done(db, old.indexer.drain(tenant.org_id), waiting=2)
            await change(write, tenant, memo, "replace", '{"title": "Memo", "body": "tidal energy"}')
            await write.commit()
        await activation
        assert (await drain)["embedded"] == 0
        assert (await new.indexer.drain(tenant.org_id))["embedded"] == 2
        assert set(await _ids(new, tenant.owner, "tidal energy", mode="semantic")) == {fruit, memo}


async def test_the_switch_of_model_holds_up_no_store_while_it_queues_what_it_lacks(
        pg_url: str, settings: Settings) -> None:
    """The activation queued the entities with no vector of the new model (a scan of every org's search
    rows) while it held the lock every store of vectors waits for. It now does most of that first,
    without the lock: a store goes on meanwhile, and what it took off the queue (a vector of the old
    model, for an entity written after that first pass began) is queued under the lock."""
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle") as (db, tenant, (vehicle,), old, new):
        info = await new.models.register()
        assert await new.models.indexes.build(info.model, info.dimension)
        async with db.transaction(tenant.org_id) as held_row:  # the first pass waits for the vehicle's
            await held_row.execute("SELECT search_queue_texts(%s, %s, false)", (tenant.org_id, [vehicle]))
            activation = await _blocked_or_done(db, new.models.activate(info))
            memo = (await old.entities.create(tenant.owner, tenant.project_id, "note",
                                              {"title": "Memo", "body": "bananas"})).id
            drain = await _blocked_or_done(db, old.indexer.drain(tenant.org_id), waiting=2)
            assert drain.done() and not activation.done()
            assert (await drain)["embedded"] == 1  # the memo, by the old model
        await activation
        assert (await new.models.active()).model == "fake-8"
        assert (await new.indexer.drain(tenant.org_id))["embedded"] == 2
        assert set(await _ids(new, tenant.owner, "bananas", mode="semantic")) == {vehicle, memo}


async def _queueing_waited_past(db: Database, interval: str) -> bool:
    """Whether a statement queueing the entities with no vector of a model has waited for a lock
    longer than ``interval`` (read as the login: the application's role sees no other's statements)."""
    async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
        cur = await conn.execute("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                 " AND query LIKE '%%search_queue_unembedded%%'"
                                 " AND clock_timestamp() - query_start > %s::interval)", (interval,))
        row = await cur.fetchone()
    return bool(row and row[0])


async def test_the_switch_of_model_outlasts_a_requests_statement_timeout(pg_url: str, settings: Settings) -> None:
    """The queueing of the entities with no vector of the new model ran with a request's statement
    timeout: on a large deployment, cut short at every attempt, and the model never became active. It
    runs with a background job's."""
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle") as (db, tenant, (vehicle,), _, new):
        async with Database(db.conninfo, min_size=1, max_size=2, statement_timeout_ms=300) as hasty:
            models = Models(hasty, new.models.configured)
            info = await models.register()
            assert await models.indexes.build(info.model, info.dimension)
            async with db.transaction(tenant.org_id) as held_row:
                await held_row.execute("SELECT search_queue_texts(%s, %s, false)", (tenant.org_id, [vehicle]))
                activation = asyncio.ensure_future(models.activate(info))
                while not activation.done() and not await _queueing_waited_past(db, "1 second"):
                    await asyncio.sleep(0.05)
            await activation
        assert (await new.models.active()).model == "fake-8"
        assert (await new.indexer.drain(tenant.org_id))["embedded"] == 1


async def test_a_retired_model_registered_again_stays_retired_until_it_is_chosen(
        pg_url: str, settings: Settings) -> None:
    """A process started again with the old model's settings, once the new model had taken over,
    registered the old one as building again: its build switched back, and the processes of the new
    model would then switch forward again. It stays retired (such a process embeds nothing) until
    the operator chooses it (``canvasdb embedder use``): then its build switches back."""
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle") as (db, tenant, (vehicle,), old, new):
        assert await new.indexer.backfill([tenant.org_id]) == 1
        again = Services.build(settings, db)  # the old model's settings, in a process started again
        try:
            assert (await again.models.register()).state == "retired"
            assert await again.indexer.backfill([tenant.org_id]) == 0
            later = (await again.entities.create(tenant.owner, tenant.project_id, "note",
                                                 {"title": "Memo", "body": "bananas"})).id
            assert (await again.indexer.drain(tenant.org_id))["embedded"] == 0
            assert (await again.models.active()).model == "fake-8"
            assert (await new.indexer.drain(tenant.org_id))["embedded"] == 1
            assert await new.models.use("all-MiniLM-L6-v2") == []
            assert (await again.models.register()).state == "building"
            assert await again.indexer.backfill([tenant.org_id]) == 2
            assert [(m.model, m.state) for m in await again.models.registered()] == [
                ("all-MiniLM-L6-v2", "active"), ("fake-8", "retired")]
            assert set(await _ids(again, tenant.owner, "car", mode="semantic")) == {vehicle, later}
        finally:
            await again.models.close()


async def test_of_two_models_built_at_once_the_first_to_finish_takes_over_for_good(
        pg_url: str, settings: Settings) -> None:
    """Two new models building at once: each activation retired only the active model, so the second
    build to finish switched to its model after the first one had. The first to finish retires the
    other, whose build stops."""
    fake = FakeService()
    try:
        async with _a_change_of_model(pg_url, settings, "buy a new vehicle") as (db, tenant, _, old, new):
            other = Services.build(settings, db, embedder=make_embedder("openai", model="fake-other",
                                                                           url=fake.url + "/v1"))
            try:
                assert (await new.models.register()).state == "building"
                assert (await other.models.register()).state == "building"
                assert await new.indexer.backfill([tenant.org_id]) == 1
                assert await other.indexer.backfill([tenant.org_id]) == 0
                assert [(m.model, m.state) for m in await new.models.registered()] == [
                    ("fake-8", "active"), ("all-MiniLM-L6-v2", "retired"), ("fake-other", "retired")]
            finally:
                await other.models.close()
    finally:
        fake.close()


async def test_choosing_the_active_model_stops_a_build(pg_url: str, settings: Settings) -> None:
    """A process started with a model by mistake starts its build; the operator's choice of the active
    model stops it, and its vectors go."""
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle") as (db, tenant, (vehicle,), old, new):
        assert (await new.models.register()).state == "building"
        made = asyncio.Event()

        async def build_stopped_midway(info: ModelInfo) -> None:
            made.set()
            assert await old.models.use("all-MiniLM-L6-v2") == ["fake-8"]
            await activate(info)

        activate = new.models.activate
        new.models.activate = build_stopped_midway  # type: ignore[method-assign]
        assert await new.indexer.backfill([tenant.org_id]) == 1
        assert made.is_set() and (await new.models.active()).model == "all-MiniLM-L6-v2"
        await old.indexer.drop_retired([tenant.org_id])
        async with db.transaction(tenant.org_id) as conn:
            cur = await conn.execute("SELECT DISTINCT model FROM search_vectors")
            assert [r["model"] for r in await cur.fetchall()] == ["all-MiniLM-L6-v2"]
        with pytest.raises(NotFound):
            await old.models.use("no-such-model")
        assert (await _ids(old, tenant.owner, "car", mode="semantic")) == [vehicle]


async def test_a_new_models_index_is_built_without_holding_up_writes(pg_url: str, settings: Settings) -> None:
    """A plain CREATE INDEX held search_vectors' SHARE lock for the whole build: behind a build
    waiting for one open write, every vector the indexer stored and every write that deletes a
    vector waited, for as long as the build then took (minutes, for millions of vectors)."""
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle", "bananas") as (
            db, tenant, (vehicle, groceries), old, new):
        async with _vector_write_left_open(db, tenant, vehicle):
            build = await _blocked_or_done(db, new.indexer.backfill([tenant.org_id]))
            assert not build.done()  # the build waits for the open write...
            emptied = await _blocked_or_done(
                db, old.entities.replace(tenant.owner, groceries, {"title": "", "body": ""}), waiting=2)
            assert emptied.done()  # ...but a write deleting a vector goes on meanwhile
            await emptied
            await old.entities.create(tenant.owner, tenant.project_id, "note",
                                      {"title": "Memo", "body": "tidal energy"})
            drain = await _blocked_or_done(db, old.indexer.drain(tenant.org_id), waiting=2)
            assert drain.done()  # and so does storing a vector
            assert (await drain)["embedded"] == 1
            assert (await old.models.active()).model == "all-MiniLM-L6-v2"  # not before its index
        await build
        assert (await new.models.active()).model == "fake-8"
        assert await _index_state(db, "fake-8") == (True, True)
        res = await new.search.search(tenant.owner, "car", mode="semantic")
        assert res.hits[0].id == vehicle and res.degraded is None


async def test_a_failed_index_build_is_never_used_and_is_built_again(pg_url: str, settings: Settings) -> None:
    """A concurrent build that fails (cancelled, or its process gone) leaves its index INVALID;
    the model stays building, and the next build drops that index and makes it again."""
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle") as (db, tenant, (vehicle,), _, new):
        await _cancelled_behind_an_open_write(db, tenant, vehicle, new.indexer.backfill([tenant.org_id]),
                                              Unavailable)
        assert (await new.models.active()).model == "all-MiniLM-L6-v2"
        assert await _index_state(db, "fake-8") == (False, False)
        assert await new.indexer.backfill([tenant.org_id]) == 0  # (its vectors were made)
        assert (await new.models.active()).model == "fake-8"
        assert await _index_state(db, "fake-8") == (True, True)


async def test_an_invalid_index_left_by_an_earlier_build_is_built_again(pg_url: str, settings: Settings) -> None:
    """The index a concurrent build left INVALID (its process died) was taken as there: the model
    became active with an index no query may use."""
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle") as (db, tenant, (vehicle,), _, new):
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as builder:
            await _cancelled_behind_an_open_write(db, tenant, vehicle, builder.execute(
                "CREATE INDEX CONCURRENTLY search_vectors_hnsw_" + hashlib.md5(b"fake-8").hexdigest()[:16]
                + " ON search_vectors USING hnsw ((embedding::halfvec(8)) halfvec_cosine_ops)"
                " WHERE model = 'fake-8'"), psycopg.errors.QueryCanceled)
        assert await _index_state(db, "fake-8") == (False, False)
        assert await new.indexer.backfill([tenant.org_id]) == 1
        assert (await new.models.active()).model == "fake-8"
        assert await _index_state(db, "fake-8") == (True, True)


async def test_a_login_that_does_not_own_the_vectors_is_told_why_no_index_is_built(pg_url: str,
                                                                                   settings: Settings) -> None:
    async with _a_change_of_model(pg_url, settings, "buy a new vehicle") as (db, *_):
        role = unique("not_owner").replace("-", "_")
        async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
            await conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE canvasdb_app")
        try:
            async with Database(psycopg.conninfo.make_conninfo(db.conninfo, user=role), min_size=1) as other:
                with pytest.raises(Unavailable) as refused:
                    await ModelIndexes(other).build("fake-8", 8)
            assert "only the owner of search_vectors may" in refused.value.detail
            assert refused.value.fields["hint"] == "apply the migrations as the login the application connects as"
            assert await _index_state(db, "fake-8") == (None, False)
        finally:
            async with await psycopg.AsyncConnection.connect(db.conninfo, autocommit=True) as conn:
                await conn.execute(f"DROP ROLE {role}")


async def test_board_nodes_are_searchable(svc: Services, tenant: Tenant) -> None:


    await svc.documents.create(tenant.owner, tenant.project_id, "whiteboard", "board")
    board = Board()
    board.nodes["n1"] = Map({"type": "sticky", "x": 1, "y": 2, "text": "replace the delivery vehicle"})
    board.nodes["n2"] = Map({"type": "shape", "x": 0, "y": 0})
    await push(svc, tenant, "whiteboard", board)
    await svc.projection.project(tenant.org_id, "whiteboard")
    await svc.indexer.drain(tenant.org_id)
    node = entity_id("whiteboard", "nodes", "n1")
    assert await _ids(svc, tenant.owner, "delivery", mode="text") == [node]
    assert (await _ids(svc, tenant.owner, "car", mode="semantic"))[:1] == [node]
    res = await svc.search.search(tenant.owner, "delivery", mode="text", facets=("module",))
    assert res.facets == {"module": {"board": 1}}


# --- corrections, times, cursors, markers, bad text, exclusions, counts -------------------------

async def _viewer(svc: Services, tenant: Tenant) -> Principal:
    """A member of the org who may read the project ``main`` only."""
    member_id = await svc.tenancy.ensure_user(f"viewer-{tenant.slug}@example.com")
    await svc.tenancy.set_org_role(tenant.org_id, member_id, "member")
    await svc.tenancy.set_project_role(tenant.owner, tenant.project_id, member_id, "viewer")
    return Principal(org_id=tenant.org_id, user_id=member_id, org_role="member")


async def test_corrections_come_only_from_words_the_caller_can_read_now(svc: Services, tenant: Tenant) -> None:
    """The term dictionary is the whole org's, and keeps the words of deleted entities and of
    edited text: a correction is offered only when it finds something the caller may read."""
    secret = await svc.tenancy.create_project(tenant.owner, "secret")
    gone, edited, _ = await _setup(svc, tenant, [("note", {"title": "gondola", "body": ""}),
                                                 ("note", {"title": "lantern", "body": ""}),
                                                 ("note", {"title": "weekly kitchen", "body": ""})])
    await svc.entities.create(tenant.owner, secret["id"], "note", {"title": "zeppelin", "body": ""})
    await svc.entities.delete(tenant.owner, gone)
    await svc.entities.patch(tenant.owner, edited, {"title": "lamp"})
    await svc.indexer.drain(tenant.org_id)
    viewer = await _viewer(svc, tenant)
    for mode in ("text", "hybrid"):
        res = await svc.search.search(viewer, "zepelin gondla lantrn kitchn ", mode=mode)
        assert res.corrections == {"kitchn": ["kitchen"]}, mode
        res = await svc.search.search(tenant.owner, "zepelin gondla lantrn ", mode=mode)
        assert res.corrections == {"zepelin": ["zeppelin"]}, mode
    # Within the filters and the exclusions too.
    cards = await svc.search.search(tenant.owner, "zepelin", mode="text", filters=Filters(types=("kanban.card",)))
    assert cards.corrections == {} and cards.hits == []
    assert (await svc.search.search(tenant.owner, "kitchn -weekly", mode="text")).corrections == {}


async def test_corrections_are_listed_once(svc: Services, tenant: Tenant) -> None:
    (note,) = await _setup(svc, tenant, [("note", {"title": "restructuring plan", "body": ""})])
    # A 9+ letter word's correction is found by both lookups (one typo away, and trigrams).
    res = await svc.search.search(tenant.owner, "restructurng restructurng ", mode="text")
    assert res.corrections == {"restructurng": ["restructuring"]}
    assert [h.id for h in res.hits] == [note]
    assert corrections("restructurng", ["restructuring", "restructuring", "re-structuring"]) == [
        ("restructuring", 1, 0)]


async def test_update_times_without_a_zone_are_utc(client: httpx.AsyncClient, svc: Services,
                                                   tenant: Tenant) -> None:
    (note,) = await _setup(svc, tenant, [("note", {"title": "timely", "body": ""})])
    res = await svc.search.search(tenant.owner, "timely", mode="text", filters=Filters(
        updated_after=datetime(2020, 1, 1), updated_before=datetime(2100, 1, 1, tzinfo=UTC)))
    assert [h.id for h in res.hits] == [note]
    at = (await svc.entities.get(tenant.owner, note)).updated_at.astimezone(UTC).replace(tzinfo=None)
    for after, found in ((at - timedelta(seconds=1), True), (at + timedelta(seconds=1), False)):
        hits = (await svc.search.search(tenant.owner, "timely", mode="text",
                                        filters=Filters(updated_after=after))).hits
        assert bool(hits) == found
    with pytest.raises(InvalidInput):
        await svc.search.search(tenant.owner, "timely", filters=Filters(
            updated_after=datetime(2021, 1, 1), updated_before=datetime(2021, 1, 1, tzinfo=UTC)))
    r = await client.get(f"/v1/orgs/{tenant.slug}/search", headers=tenant.headers, params={
        "q": "timely", "updated_after": "2020-01-01T00:00:00", "updated_before": "2100-01-01T00:00:00Z"})
    assert r.status_code == 200, r.text
    assert [h["id"] for h in r.json()["hits"]] == [str(note)]


def _cursor(parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


def _opened(cursor: str | None) -> list[Any]:
    assert cursor is not None
    return json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))


async def test_forged_cursors_answer_invalid_input(client: httpx.AsyncClient, svc: Services,
                                                   tenant: Tenant) -> None:
    await _setup(svc, tenant, [("note", {"title": f"report {i}", "body": ""}) for i in range(4)])
    search = svc.search.search
    for mode, text in (("text", "report"), ("hybrid", "report"), ("semantic", "report"), ("text", "")):
        real = _opened((await search(tenant.owner, text, mode=mode, limit=1)).next_cursor)
        fp = real[0]
        for parts in ([fp, ["a", "b"]], [fp, [1, 2, 3]], [fp, ["a", "b", "c", "d", "e", "f", "g"]],
                      [fp, [0.5, str(UUID(int=1)), -5]], [fp, [-1, 0, 0, 0, 1, 0.0, "x"]]):
            with pytest.raises(InvalidInput):
                await search(tenant.owner, text, mode=mode, limit=1, cursor=_cursor(parts))
        _, kind, key = real
        forged: list[Any] = [[fp, key], [fp, kind, []], [fp, kind, key + [1]],
                             [fp, "x", key], [fp, 1, key], [fp, kind, "key"], [fp, kind, {"a": 1}],
                             [fp, kind, [[] for _ in key]], [fp, kind, [True for _ in key]],
                             [fp, kind, [None for _ in key]], [fp, kind, [-(10**30) for _ in key]]]
        forged += [[fp, k, key] for k in ("t", "r", "s") if k != kind]
        forged += [[fp, kind, [*key[:i], "a", *key[i + 1:]]] for i in range(len(key))]
        forged += [[fp, kind, [*key[:i], 10**30, *key[i + 1:]]] for i in range(len(key))]
        if kind == "s":
            forged += [[fp, kind, [key[0], key[1], n]] for n in (-1, 0, 10**6)]
            forged += [[fp, kind, [1e999, key[1], 1]]]
        for parts in forged:
            with pytest.raises(InvalidInput) as caught:
                await search(tenant.owner, text, mode=mode, limit=1, cursor=_cursor(parts))
            assert "cursor" in caught.value.detail, (mode, parts)
    for garbage in ("garbage", "\ud800", _cursor([1, 2, 3]), _cursor("x"), "=" * 10, "W" * 1900 + "10",
                    base64.urlsafe_b64encode(b"[" * 1400).decode(), "x" * 5000):
        with pytest.raises(InvalidInput):
            await search(tenant.owner, "report", mode="text", cursor=garbage)
    fp, _, _ = _opened((await search(tenant.owner, "report", mode="text", limit=1)).next_cursor)
    r = await client.get(f"/v1/orgs/{tenant.slug}/search", headers=tenant.headers,
                         params={"q": "report", "mode": "text", "cursor": _cursor([fp, ["a", "b"]])})
    assert r.status_code == 422 and "not one this API returned" in r.json()["detail"], r.text


async def test_pages_go_on_when_the_embedder_stops_or_comes_back(svc: Services, tenant: Tenant) -> None:
    """A hybrid page's cursor with the embedder down goes on with the text list from as deep;
    a text-only (degraded) page's cursor goes on as text when it is back."""
    ids = await _setup(svc, tenant, [("note", {"title": f"report {i}", "body": ""}) for i in range(6)])
    down = Search(svc.db, svc.models, embed_timeout=1e-6)
    first = await svc.search.search(tenant.owner, "report", limit=2)
    second = await down.search(tenant.owner, "report", limit=2, cursor=first.next_cursor)
    assert second.degraded and len(second.hits) == 2
    third = await svc.search.search(tenant.owner, "report", limit=10, cursor=second.next_cursor)
    assert third.degraded is None and set(h.id for h in second.hits + third.hits) <= set(ids)
    assert not {h.id for h in third.hits} & {h.id for h in second.hits}
    for mode in ("semantic", "hybrid"):
        for text in ("report", "!!!"):
            page = await svc.search.search(tenant.owner, text, mode=mode, limit=1)
            after = await down.search(tenant.owner, text, mode=mode, limit=1, cursor=page.next_cursor)
            assert after.degraded and len(after.hits) == 1, (mode, text)


async def test_hybrid_pages_go_on_when_the_vectors_come_between_them(svc: Services, tenant: Tenant) -> None:
    """A new project's entities, just written, have words but no vectors yet: the first hybrid
    page is the text list's; once the vectors are made, the next pages still go on from there
    (they came back empty: every remaining match now scored above the first page's cursor)."""
    await _setup(svc, tenant, [("note", {"title": "an older note", "body": ""})])  # the org has vectors
    fresh = (await svc.tenancy.create_project(tenant.owner, "fresh"))["id"]
    ids = [(await svc.entities.create(tenant.owner, fresh, "note", {"title": f"walrus item {i}", "body": ""})).id
           for i in range(6)]
    scope = Filters(projects=(fresh,))
    first = await svc.search.search(tenant.owner, "walrus", mode="hybrid", limit=3, typo=False, filters=scope)
    assert len(first.hits) == 3 and first.next_cursor is not None and not first.degraded
    await svc.indexer.drain(tenant.org_id)  # the vectors come
    seen, cursor = [h.id for h in first.hits], first.next_cursor
    while cursor is not None:
        page = await svc.search.search(tenant.owner, "walrus", mode="hybrid", limit=3, typo=False,
                                       filters=scope, cursor=cursor)
        assert page.hits, "an empty page after a cursor"
        seen += [h.id for h in page.hits]
        cursor = page.next_cursor
    assert sorted(seen) == sorted(ids)


async def test_control_characters_in_text_are_not_highlights(svc: Services, tenant: Tenant) -> None:
    (note,) = await _setup(svc, tenant, [("note", {"title": "fake \x02highlight\x03 kitchen", "body": ""})])
    res = await svc.search.search(tenant.owner, "kitchen", mode="text")
    assert [h.id for h in res.hits] == [note]
    assert res.hits[0].highlights["title"] == "fake  highlight  <mark>kitchen</mark>"
    res = await svc.search.search(tenant.owner, "highlight", mode="text")
    assert res.hits[0].highlights["title"] == "fake  <mark>highlight</mark>  kitchen"


async def test_text_that_is_not_unicode_answers_invalid_input(client: httpx.AsyncClient, svc: Services,
                                                              tenant: Tenant, tmp_path: Path, pg_url: str) -> None:
    await _setup(svc, tenant, [("note", {"title": "kitchen", "body": ""})])
    search = svc.search.search
    for text, filters in (("kitchen \ud800", Filters()), ("kitchen", Filters(types=("\ud800",))),
                          ("kitchen", Filters(modules=("notes\udcff",))),
                          ("kitchen", Filters(data=(("status", "\ud800"),))),
                          ("kitchen", Filters(types=("a\x00",))), ("kitchen", Filters(data=(("s", "\x00"),)))):
        for mode in ("text", "hybrid", "semantic"):
            with pytest.raises(InvalidInput):
                await search(tenant.owner, text, mode=mode, filters=filters)
    for params in ({"q": "kitchen", "type": "a\x00"}, {"q": "kitchen", "data.status": "\x00"}):
        r = await client.get(f"/v1/orgs/{tenant.slug}/search", headers=tenant.headers, params=params)
        assert r.status_code == 422, r.text
    done = subprocess.run([sys.executable, "-m", "canvasdb", "search", "--org", tenant.slug, b"kitchen\xff"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CANVASDB_HOME": str(tmp_path), "CANVASDB_DATABASE_URL": pg_url})
    assert done.returncode == 1 and done.stderr.startswith("Error:"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize(("params", "parameter"), [
    ({"project": "\x00"}, "project"), ({"type": "note,a\x00"}, "type"), ({"module": "\x00"}, "module"),
    ({"data.status": "\x00"}, "data.status"), ({"data.st\x00tus": "done"}, "data.st\x00tus"),
    ({"updated_after": "\x00"}, "updated_after"), ({"cursor": "\x00"}, "cursor"), ({"facets": "\x00"}, "facets"),
    ({"updated_after": "2030-01-01T00:00:00Z", "updated_before": "2020-01-01T00:00:00Z"}, "updated_after"),
    ({"q": "x" * 10_001}, "q"), ({"colour": "\x00"}, "colour"),
])
async def test_a_bad_search_parameter_is_named(client: httpx.AsyncClient, tenant: Tenant, params: dict[str, str],
                                               parameter: str) -> None:
    """A NUL in a project was refused by psycopg on its way to PostgreSQL: 422, with no word of which
    parameter; each search parameter's 422 names it as other query parameters' do."""
    r = await client.get(f"/v1/orgs/{tenant.slug}/search", headers=tenant.headers, params={"q": "x", **params})
    assert r.status_code == 422 and r.json().get("pointer") == f"query:{parameter}", r.text


async def test_exclusions_apply_in_every_mode(svc: Services, tenant: Tenant) -> None:
    draft, final, budget = await _setup(svc, tenant, [("note", {"title": "draft report", "body": ""}),
                                                      ("note", {"title": "final report", "body": ""}),
                                                      ("kanban.card", {"title": "budget figures"})])
    for mode in ("text", "hybrid", "semantic"):
        res = await svc.search.search(tenant.owner, "-draft", mode=mode, facets=("type",))
        assert [h.id for h in res.hits] == [budget, final], mode
        assert res.total == 2 and res.facets == {"type": {"kanban.card": 1, "note": 1}}, mode
        res = await svc.search.search(tenant.owner, "report -draft", mode=mode, facets=("type",))
        assert draft not in [h.id for h in res.hits] and final in [h.id for h in res.hits], mode
        assert res.total == len(res.hits) and res.facets is not None, mode
        assert sum(res.facets["type"].values()) == res.total, mode
        res = await svc.search.search(tenant.owner, "-draft -report -budget", mode=mode, facets=("type",))
        assert (res.hits, res.total, res.facets) == ([], 0, {"type": {}}), mode


async def test_semantic_counts_do_not_depend_on_the_limit(svc: Services, tenant: Tenant) -> None:
    await _setup(svc, tenant, [("note", {"title": f"report {i}", "body": ""}) for i in range(5)]
                 + [("kanban.card", {"title": f"invoice {i}"}) for i in range(3)])
    for mode in ("semantic", "hybrid"):
        counts = set()
        for limit in (1, 3, 8, 100):
            res = await svc.search.search(tenant.owner, "report", mode=mode, limit=limit, facets=("type",))
            counts.add((res.total, res.total_approximate, json.dumps(res.facets, sort_keys=True)))
        assert counts == {(8, False, json.dumps({"type": {"kanban.card": 3, "note": 5}}, sort_keys=True))}, mode
    capped = Search(svc.db, svc.models, total_cap=3)
    res = await capped.search(tenant.owner, "report", mode="semantic", limit=1)
    assert (res.total, res.total_approximate) == (3, True)


async def test_indexing_status_is_for_org_admins(client: httpx.AsyncClient, svc: Services, tenant: Tenant) -> None:
    viewer = await _viewer(svc, tenant)
    assert viewer.user_id is not None
    _, token = await svc.tenancy.create_token(viewer.user_id)
    url = f"/v1/orgs/{tenant.slug}/search/status"
    r = await client.get(url, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403, r.text
    assert (await client.get(url, headers=tenant.headers)).status_code == 200
