"""Search across an org's projects: text with typo tolerance, meaning, and both fused.

Text ranking follows Meilisearch's rules as a bucket sort. Documents that match every
query word come first, then (when a page is not full) those matching all but the last
word, and so on. Within each such tier come exact matches, then those found through a
correction only (fewer typos first); each of the two splits in those with the words in
a title (an A-weight field, as Meilisearch's attribute rule), then the others; and
PostgreSQL's text rank orders each bucket, computed for the words as the user meant them:
the query as typed, or for a corrected match the corrections it matched (in a title
bucket, those in its title), so that no match borrows rank from another correction.
Among corrected matches of as many typos, the likelier slips come first (a letter left
out or two swapped, see ``query.slip``), then the corrections take turns, each one's
best first, so a rare word's few matches are not buried under those of a common word
one typo away. Each bucket ranks at most
``rank_cutoff`` matches, found through a GIN index: the titles' own for title buckets,
so a word found in half the org's bodies reads a short posting list for the first page,
and a rare word's typo is not lost among the matches of a common correction. The titles'
index is in 16 shards (0012_search_title_shards.sql), read one after the other until the
cutoff is reached: a broad word or a 3-letter prefix reads a fraction of its postings. A later
page resumes after the last hit's sort key, and whole buckets before it are skipped
(keyset pagination).

Typo corrections come from the org's term dictionary, which is the whole org's and keeps
the words of deleted entities and edited text: a correction is used (and shown) only if it
alone matches an entity the caller may read, within the filters.

Semantic search finds the nearest vectors of the active model (HNSW, or an exact scan
for an org with few vectors) of the query without its ``-exclusions``. Hybrid fuses both
lists by reciprocal rank (k = 60). If the embedder is down or slow, the text results
still come back, flagged ``degraded``. The excluded words leave entities out of every
list (text, meaning, recent) and of the counts.

Every query runs in the org's transaction (row-level security) and keeps to the
projects the caller can read, in hits, totals and facets alike.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import html
import json
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from psycopg import sql
from psycopg.types.json import Jsonb

from canvasdb import metrics
from canvasdb.db import Connection, Database
from canvasdb.entities import utc
from canvasdb.errors import InvalidInput, NotFound
from canvasdb.graph.relationships import readable_projects
from canvasdb.search import query as q
from canvasdb.search.embedders import EmbedderUnavailable
from canvasdb.search.models import Models
from canvasdb.tenancy import Principal

Mode = Literal["text", "semantic", "hybrid"]
MODES = ("text", "semantic", "hybrid")
FACETS = ("type", "module", "project", "tag")
RRF_K = 60
MAX_LIMIT = 100
MAX_QUERY_CHARS = 10_000
MAX_DEPTH = 1000  # semantic and hybrid results end this deep
HYBRID_WINDOW = 40  # hybrid fuses lists this deep at least (as deep as the page otherwise)
# Semantic totals and facets cover this many nearest entities, whatever the limit: a page's
# worth (with 100, a type filter that 1 entity in 20 passes made the HNSW scan go five times
# deeper: 18 -> 32 ms median at 100,000 entities)
SEMANTIC_COUNT = 20
CHECKED_CORRECTIONS = 16  # per word: the likeliest corrections checked against the readable index
VECTOR_COUNT_TTL = 60.0  # seconds an org's vector count (exact scan or HNSW) is trusted
SEMANTIC_QUERY_CHARS = 2000
MAX_CURSOR_CHARS = 2000  # as the HTTP API allows
DATA_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62}){0,7}$")
# The buckets of a tier, in their order: exact matches, then those through corrections
# only; each with the words in a title first.
TITLES, ELSEWHERE, CORRECTED_TITLES, CORRECTED = 0, 1, 2, 3
# The filters as arguments of search_match and search_facets (0011_search_lookups.sql).
MATCH_SCOPE = "%(projects)s, %(types)s, %(modules)s, %(updated_after)s, %(updated_before)s, %(data)s"
# Headline markers, turned into <mark> after HTML-escaping; the text's own are made spaces first.
_MARK, _END = "\x02", "\x03"


@dataclass(frozen=True)
class Filters:
    projects: tuple[UUID, ...] = ()
    types: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    updated_after: datetime | None = None
    updated_before: datetime | None = None
    data: tuple[tuple[str, str], ...] = ()  # ("status", "done") for data.status=done

    def check(self) -> Filters:
        """The filters checked, with times without a zone taken as UTC (as ``as_of`` is)."""
        for name, value in self.data:
            if not isinstance(name, str) or not DATA_FIELD.fullmatch(name):
                raise InvalidInput(f"bad filter field data.{name!r}: dotted names of letters, digits and _",
                                   pointer=f"/data.{name}")
            check_text(value, f"/data.{name}")
        for pointer, values in (("/type", self.types), ("/module", self.modules)):
            for value in values:
                check_text(value, pointer)
        after, before = utc(self.updated_after), utc(self.updated_before)
        if after and before and after >= before:
            raise InvalidInput("updated_after must be before updated_before", pointer="/updated_after")
        return dataclasses.replace(self, updated_after=after, updated_before=before)


@dataclass
class Hit:
    id: UUID
    project_id: UUID
    type: str
    module: str
    score: float
    data: dict[str, Any] | None = None
    version: int | None = None
    updated_at: datetime | None = None
    highlights: dict[str, str] = field(default_factory=dict)
    words: int | None = None  # text: query words matched
    typos: int | None = None  # text: typos corrected
    text_rank: float | None = None
    distance: float | None = None  # semantic: cosine distance
    _key: tuple[Any, ...] = ()
    _kind: str = ""  # of _key: "t" text buckets, "r" recent, "s" scored (semantic or fused)

    def to_json(self) -> dict[str, Any]:
        out = {"id": str(self.id), "project_id": str(self.project_id), "type": self.type,
               "module": self.module, "score": self.score, "version": self.version,
               "updated_at": self.updated_at.isoformat() if self.updated_at else None,
               "highlights": self.highlights, "data": self.data}
        out.update({k: v for k, v in (("words", self.words), ("typos", self.typos),
                                      ("text_rank", self.text_rank), ("distance", self.distance))
                    if v is not None})
        return out


@dataclass
class Results:
    mode: Mode
    hits: list[Hit]
    next_cursor: str | None = None
    total: int | None = None
    total_approximate: bool = False
    facets: dict[str, dict[str, int]] | None = None
    degraded: str | None = None
    corrections: dict[str, list[str]] = field(default_factory=dict)
    ignored_words: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "hits": [h.to_json() for h in self.hits],
                "next_cursor": self.next_cursor, "total": self.total,
                "total_approximate": self.total_approximate, "facets": self.facets,
                "degraded": self.degraded is not None, "degraded_reason": self.degraded,
                "corrections": self.corrections, "ignored_words": self.ignored_words}


@dataclass
class _Plan:
    """A parsed query with its corrections, per group."""

    parsed: q.ParsedQuery
    exact: list[str]  # per group, as to_tsquery text
    corrected: list[list[tuple[str, int, int]]]  # per group: its corrections, with their typos and slips
    excluded: str  # '!a & !"b <-> c"' or ''
    title_matches: int | None = None  # of the first word, when its title bucket ran (at most the cutoff)

    def tier(self, t: int, *, typos: bool) -> str:
        """Groups 1..t, each with its corrections when ``typos``, minus the excluded terms."""
        parts = []
        for i in range(t):
            alts = [self.exact[i], *(alt for alt, _, _ in self.corrected[i])] if typos else [self.exact[i]]
            parts.append("(" + " | ".join(alts) + ")")
        if self.excluded:
            parts.append(self.excluded)
        return " & ".join(parts)

    def has_typos(self, t: int) -> bool:
        return any(self.corrected[:t])


class Search:
    """The Python API of search. ``search`` answers one page; see the module docstring."""

    def __init__(self, db: Database, models: Models, *, rank_cutoff: int = 2000,
                 facet_cap: int = 1000, total_cap: int = 1000, exact_below: int = 10_000,
                 ef_search: int = 100, embed_timeout: float = 2.0) -> None:
        self.db = db
        self.models = models
        self.rank_cutoff = rank_cutoff
        self.facet_cap = facet_cap
        self.total_cap = total_cap
        self.exact_below = exact_below
        self.ef_search = ef_search
        self.embed_timeout = embed_timeout
        self._vector_counts: dict[tuple[UUID, str], tuple[float, int]] = {}

    async def search(
        self, who: Principal, text: str = "", *, mode: Mode = "hybrid", typo: bool = True,
        filters: Filters = Filters(), facets: Sequence[str] = (), limit: int = 20,
        cursor: str | None = None,
    ) -> Results:  # fmt: skip
        if mode not in MODES:
            raise InvalidInput("mode is one of text, semantic, hybrid", pointer="/mode")
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidInput(f"limit is 1 to {MAX_LIMIT}", pointer="/limit")
        for name in facets:
            if name not in FACETS:
                raise InvalidInput(f"facets are among {', '.join(FACETS)}", pointer="/facets")
        if len(text) > MAX_QUERY_CHARS:  # (over HTTP the query parameter's own bound comes first)
            raise InvalidInput(f"a query is at most {MAX_QUERY_CHARS:,} characters", pointer="/q")
        check_text(text, "/q", nul=False)
        filters = filters.check()
        parsed = q.parse(text)
        fingerprint = _fingerprint(mode, typo, text, filters)
        kind, after = _decode_cursor(cursor, fingerprint)
        usable = {"t": not parsed.empty, "r": parsed.empty, "s": mode != "text"}  # what could have made it
        if kind is not None and not usable[kind]:
            raise _foreign_cursor()
        results = Results(mode=mode, hits=[], ignored_words=parsed.ignored)
        vector: list[float] | None = None
        model = None
        embedding: asyncio.Future[tuple[Any, list[float] | None, str | None]] | None = None
        # A page sequence that began without meaning (text or recent, the embedder being down)
        # goes on so; the -exclusions are not embedded (their entities are left out anyway).
        meaning = mode != "text" and kind in (None, "s") and parsed.meaning.strip() != ""
        if meaning and mode == "hybrid" and not parsed.empty:
            # Embedded while the transaction starts and the text buckets run in PostgreSQL.
            embedding = asyncio.ensure_future(self._query_vector(parsed.meaning))
        elif meaning:
            model, vector, results.degraded = await self._query_vector(parsed.meaning)
        async with self.db.transaction(who.org_id) as conn, _cancelled_on_exit(embedding):
            # Every query here has an index made for it; with a LIMIT, the planner may hope
            # to find matches early in a sequential scan, and at a million rows it does not.
            await conn.execute("SELECT set_config('enable_seqscan', 'off', true),"
                               " set_config('pg_trgm.similarity_threshold', '0.25', true)")
            projects = await self._scope(conn, who, filters)
            where, params = _where(who.org_id, projects, filters, parsed.unless())
            plan = None
            if not parsed.empty:
                plan = await self._plan(conn, parsed, typo and mode != "semantic", params,
                                        results.corrections)
            nearest: list[UUID] | None = None  # the semantic list, for the counts
            text_list: list[Hit] = []
            if embedding is not None and plan is not None:
                text_list = await self._text(conn, plan, params, _hybrid_depth(limit + 1, after), None)
                model, vector, results.degraded = await embedding
            if vector is None and kind == "s":
                # Pages of meaning, and now the embedder is down: the text (or recent) list
                # goes on from as deep as they went.
                seen = int(after[2])
                if embedding is not None:
                    hits = text_list[seen:]
                elif plan is not None:
                    hits = (await self._text(conn, plan, params, seen + limit + 1, None))[seen:]
                else:
                    hits = (await self._recent(conn, where, params, seen + limit + 1, None))[seen:]
            elif vector is None and plan is None:
                hits = await self._recent(conn, where, params, limit + 1, after)
            elif embedding is not None and vector is None and after is None:
                hits = text_list[:limit + 1]  # degraded hybrid: the text list's head is the page
            elif vector is None:
                hits = await self._text(conn, plan, params, limit + 1, after) if plan else []
            elif mode == "semantic":
                hits, nearest = await self._semantic(conn, who.org_id, model, vector, where, params,
                                                     limit + 1, after)
            else:
                hits, nearest = await self._hybrid(conn, who.org_id, text_list, model, vector, where, params,
                                                   limit + 1, after)
            if len(hits) > limit:
                del hits[limit:]
                results.next_cursor = _encode_cursor(fingerprint, hits[-1]._kind, hits[-1]._key)
            if facets or after is None:
                if mode == "semantic" and nearest is not None:
                    await self._count(conn, None, nearest, params, facets, results, SEMANTIC_COUNT)
                elif plan is None and parsed.excluded:
                    # Only exclusions: the entities within the filters that have none of them.
                    cap = self.facet_cap if facets else self.total_cap
                    await self._count(conn, None, await self._listed(conn, where, params, cap + 1),
                                      params, facets, results)
                else:
                    await self._count(conn, plan, nearest, params, facets, results)
            await self._hydrate(conn, who.org_id, plan, hits)
        results.hits = hits
        metrics.SEARCH_QUERIES.labels(mode=mode).inc()
        if results.degraded:
            metrics.SEARCH_DEGRADED.inc()
        return results

    # --- scope and filters ----------------------------------------------------------------

    async def _scope(self, conn: Connection, who: Principal, filters: Filters) -> list[UUID] | None:
        """The projects to search: those asked for (each must be readable) or all readable."""
        readable = await readable_projects(conn, who)
        if not filters.projects:
            return readable
        wanted = list(dict.fromkeys(filters.projects))
        cur = await conn.execute("SELECT id FROM projects WHERE org_id = %s AND id = ANY(%s)",
                                 (who.org_id, wanted))
        found = {row["id"] for row in await cur.fetchall()}
        for project in wanted:
            if project not in found or (readable is not None and project not in readable):
                raise NotFound(f"project {project} not found")
        return wanted

    # --- text -----------------------------------------------------------------------------

    async def _plan(self, conn: Connection, parsed: q.ParsedQuery, typo: bool, params: dict[str, Any],
                    corrections: dict[str, list[str]]) -> _Plan:
        """Look up corrections for the query's words in the org's term dictionary, and keep
        those that find something the caller may read now, within the filters.

        The dictionary is the whole org's, and it keeps the words of deleted entities and of
        edited text: a word of a project the caller cannot read, or of no live entity, is
        never offered (it would tell that it exists somewhere)."""
        org_id = params["org"]
        found: dict[str, list[str]] = {}
        words = [w for w in dict.fromkeys(parsed.words()) if q.allowed_typos(w)] if typo else []
        if words:
            # Exact lookups of every string one typo away (the primary key serves them), and,
            # for the words allowed two typos, the most similar words by trigrams.
            variants = {v: w for w in words for v in q.one_typo_away(w)}
            similar = [w for w in words if q.allowed_typos(w) > 1]
            # The variants travel as one string (words have no spaces): hundreds of array
            # items would each be quoted on the way.
            cur = await conn.execute(
                "SELECT term AS w, term FROM search_terms"
                " WHERE org_id = %s AND term = ANY(string_to_array(%s, ' '))"
                + "".join(" UNION ALL SELECT %s, search_similar_terms(%s, %s, %s, 100)" for _ in similar),
                [org_id, " ".join(variants),
                 *(x for w in similar for x in (w, w, len(w) - 2, len(w) + 2))])
            for row in await cur.fetchall():
                word = variants.get(row["w"], row["w"])
                found.setdefault(word, []).append(row["term"])
        by_word = {w: q.corrections(w, terms, CHECKED_CORRECTIONS) for w, terms in found.items()}
        live = await self._live_terms(conn, [t for alts in by_word.values() for t, _, _ in alts],
                                      params, parsed.unless())
        by_word = {w: [a for a in alts if a[0] in live][:q.MAX_CORRECTIONS] for w, alts in by_word.items()}
        exact, corrected = [], []
        for group in parsed.groups:
            exact.append(" | ".join(t.tsquery() for t in group.terms))
            alts = []
            for term in group.terms:
                typed = term.word  # None: a phrase, or no letters (no typo to correct)
                found_alts = by_word.get(typed, []) if typed is not None else []
                if typed is not None and found_alts:
                    alts += [a for a in found_alts if a not in alts]
                    said = corrections.setdefault(typed, [])
                    said += [alt for alt, _, _ in found_alts if alt not in said]
            corrected.append(alts)
        excluded = " & ".join(f"!({t.tsquery()})" for t in parsed.excluded)
        return _Plan(parsed, exact, corrected, excluded)

    async def _live_terms(self, conn: Connection, terms: list[str], params: dict[str, Any],
                          unless: str | None) -> set[str]:
        """Those of ``terms`` that alone match an entity in the search's scope (the projects the
        caller may read, the filters, not an excluded word): one statement for all of them."""
        terms = list(dict.fromkeys(terms))
        if not terms:
            return set()
        # In a title first: a common word's first title shard answers at once, where a GIN
        # scan of every body would build the bitmap of all its matches first.
        cur = await conn.execute(
            "SELECT c.term FROM unnest(%(terms)s::text[]) AS c(term)"
            f" WHERE EXISTS (SELECT FROM search_match(c.term, %(unless)s, true, {MATCH_SCOPE}, 1))"
            f"    OR EXISTS (SELECT FROM search_match(c.term, %(unless)s, NULL, {MATCH_SCOPE}, 1))",
            {**params, "terms": terms, "unless": unless})
        return {row["term"] for row in await cur.fetchall()}

    async def _text(self, conn: Connection, plan: _Plan, params: dict[str, Any], need: int,
                    after: Sequence[Any] | None) -> list[Hit]:
        """Walk the buckets (tier by tier: exact, then corrected; each in a title, then
        elsewhere) until ``need`` hits."""
        hits: list[Hit] = []
        n = len(plan.exact)
        for tier in range(n, 0, -1):
            for phase in (TITLES, ELSEWHERE, CORRECTED_TITLES, CORRECTED):
                if phase >= CORRECTED_TITLES and not plan.has_typos(tier):
                    continue
                bucket = (-tier, phase)
                if after is not None and bucket < tuple(after[:2]):
                    continue  # the cursor is past this bucket
                within = after[2:] if after is not None and bucket == tuple(after[:2]) else None
                hits += await self._bucket(conn, plan, tier, phase, params, need - len(hits), within)
                if len(hits) >= need:
                    return hits
        return hits

    async def _bucket(self, conn: Connection, plan: _Plan, tier: int, phase: int, params: dict[str, Any],
                      need: int, after: Sequence[Any] | None) -> list[Hit]:
        exact, loose = plan.tier(tier, typos=False), plan.tier(tier, typos=True)
        # Exact matches, then matches through a correction only (titles first in each); not
        # those already in a higher tier.
        corrected = phase >= CORRECTED_TITLES
        unless = [exact] if corrected else []
        if tier < len(plan.exact):
            unless.append(plan.tier(tier + 1, typos=True))
        args = {**params, "match": loose if corrected else exact,
                "unless": " | ".join(f"({u})" for u in unless) or None,
                "titles": phase in (TITLES, CORRECTED_TITLES),
                "cutoff": self.rank_cutoff, "need": need}
        # A match is ranked by the words it matched, as the user meant them: an exact match by
        # the query as typed, a corrected one by the term each group matched (1: the word as
        # typed, 2...: its corrections; in a title bucket, the term in the title). That term
        # also gives its typos and its slips, and the corrections take turns (see the
        # module's docstring). Ranking by all the corrections at once would let a match of
        # one borrow rank from another's words elsewhere in its text.
        picks, rank_query, typos, slips, turn = "", "to_tsquery('english', %(match)s)", "0", "0", "1"
        if corrected:
            tsv = "ts_filter(c.tsv, '{a}')" if args["titles"] else "c.tsv"
            columns, queries = [], []
            for i in range(tier):
                alts = plan.corrected[i]
                terms = [f"e{i}", *(f"a{i}_{j}" for j in range(len(alts)))]  # p = 1, 2, ...
                whens = "".join(f" WHEN {tsv} @@ to_tsquery('english', %({t})s) THEN {p}"
                                for p, t in enumerate(terms, 1))
                columns.append(f"CASE{whens} ELSE {len(terms) + 1} END AS p{i}")
                ranks = "".join(f" WHEN {p} THEN to_tsquery('english', %({t})s)"
                                for p, t in enumerate(terms, 1))
                queries.append(f"(CASE p{i}{ranks} ELSE to_tsquery('english', %(g{i})s) END)")
                args.update(zip(terms, [plan.exact[i], *(alt for alt, _, _ in alts)], strict=True))
                args.update({f"g{i}": " | ".join(args[t] for t in terms),
                             f"c{i}": [0, *(c for _, c, _ in alts), 2],
                             f"s{i}": [0, *(sl for _, _, sl in alts), 1]})
            picks = ", " + ", ".join(columns)
            rank_query = " && ".join(queries)
            typos = " + ".join(f"(%(c{i})s::int[])[p{i}]" for i in range(tier))
            slips = " + ".join(f"(%(s{i})s::int[])[p{i}]" for i in range(tier))
            variant = ", ".join(f"p{i}" for i in range(tier))
            turn = f"row_number() OVER (PARTITION BY {variant} ORDER BY rank DESC, id)"
        keyset = ""
        if after is not None:
            keyset = ("WHERE (typos, slips, turn, -rank, id)"
                      " > (%(k_typos)s, %(k_slips)s, %(k_turn)s, %(k_rank)s, %(k_id)s)")
            args.update(k_typos=after[0], k_slips=after[1], k_turn=after[2], k_rank=after[3],
                        k_id=UUID(after[4]))
        query = sql.SQL(
            "SELECT *, count(*) OVER () AS matched"
            " FROM (SELECT id, project_id, type, module, rank, {typos} AS typos, {slips} AS slips,"
            "              {turn} AS turn"
            "       FROM (SELECT *, ts_rank(tsv, {rank_query})::float8 AS rank"
            "             FROM (SELECT c.entity_id AS id, c.project_id, c.type, c.module, c.tsv{picks}"
            "                   FROM search_match(%(match)s, %(unless)s, %(titles)s, {scope},"
            "                                     %(cutoff)s) c) c) m) r"
            " {keyset} ORDER BY typos, slips, turn, rank DESC, id LIMIT %(need)s").format(
                typos=sql.SQL(typos), slips=sql.SQL(slips), turn=sql.SQL(turn),
                rank_query=sql.SQL(rank_query), picks=sql.SQL(picks), keyset=sql.SQL(keyset),
                scope=sql.SQL(MATCH_SCOPE))
        cur = await conn.execute(query, args)
        rows = await cur.fetchall()
        if tier == 1 and phase == TITLES and after is None:
            plan.title_matches = rows[0]["matched"] if rows else 0
        out = []
        for row in rows:
            hit = Hit(row["id"], row["project_id"], row["type"], row["module"],
                      score=round(tier - row["typos"] / 10 + (phase in (TITLES, CORRECTED_TITLES)) / 50
                                  + min(row["rank"], 1.0) / 100, 6),
                      words=tier, typos=row["typos"], text_rank=row["rank"])
            hit._key = (-tier, phase, row["typos"], row["slips"], row["turn"], -row["rank"], str(row["id"]))
            hit._kind = "t"
            out.append(hit)
        return out

    async def _recent(self, conn: Connection, where: sql.Composable, params: dict[str, Any], need: int,
                      after: Sequence[Any] | None) -> list[Hit]:
        """No words to rank by (an empty query): the most recently updated first."""
        args = {**params, "need": need}
        keyset = ""
        if after is not None:
            keyset = " AND (s.updated_at, s.entity_id) < (%(k_at)s, %(k_id)s)"
            args.update(k_at=datetime.fromisoformat(after[0]), k_id=UUID(after[1]))
        cur = await conn.execute(sql.SQL(
            "SELECT s.entity_id AS id, s.project_id, s.type, s.module, s.updated_at FROM search_docs s"
            " WHERE {where}{keyset} ORDER BY s.updated_at DESC, s.entity_id DESC LIMIT %(need)s").format(
                where=where, keyset=sql.SQL(keyset)), args)
        out = []
        for row in await cur.fetchall():
            hit = Hit(row["id"], row["project_id"], row["type"], row["module"], score=0.0)
            hit._key = (row["updated_at"].isoformat(), str(row["id"]))
            hit._kind = "r"
            out.append(hit)
        return out

    async def _listed(self, conn: Connection, where: sql.Composable, params: dict[str, Any],
                      need: int) -> list[UUID]:
        """At most ``need`` entities within the filters (and without an excluded word), for
        the counts of a query of exclusions only."""
        cur = await conn.execute(sql.SQL("SELECT s.entity_id FROM search_docs s WHERE {where} LIMIT %(need)s")
                                 .format(where=where), {**params, "need": need})
        return [row["entity_id"] for row in await cur.fetchall()]

    # --- meaning --------------------------------------------------------------------------

    async def _query_vector(self, text: str) -> tuple[Any, list[float] | None, str | None]:
        """The active model and the query's vector, or why there is none (degraded)."""
        active = await self.models.active()
        if active is None:
            return None, None, None  # nothing embedded yet: text only, nothing is wrong
        try:
            embedder = self.models.embedder_for(active)
            rows = await asyncio.wait_for(embedder.embed([text[:SEMANTIC_QUERY_CHARS]]), self.embed_timeout)
        except (EmbedderUnavailable, TimeoutError) as exc:
            reason = str(exc) or f"the embedder did not answer within {self.embed_timeout:g} s"
            return active, None, f"semantic search unavailable: {reason}"
        return active, [float(x) for x in rows[0]], None

    async def _nearest(self, conn: Connection, org_id: UUID, model: Any, vector: list[float],
                       where: sql.Composable, params: dict[str, Any], depth: int) -> list[Hit]:
        """The ``depth`` nearest entities, nearest first, with their distances (unscored): HNSW
        for a large org, an exact scan for a small one."""
        dim = sql.Literal(model.dimension)
        distance = sql.SQL("v.embedding::halfvec({d}) <=> %(qv)s::halfvec({d})").format(d=dim)
        exact = await self._vector_count(conn, org_id, model.model) < self.exact_below
        order = sql.SQL("({}) + 0").format(distance) if exact else distance  # + 0: no index
        if not exact:
            await conn.execute(sql.SQL("SELECT set_config('hnsw.ef_search', {}, true),"
                                       " set_config('hnsw.iterative_scan', 'relaxed_order', true)").format(
                                           sql.Literal(str(max(self.ef_search, depth)))))
        # The vector rows carry their entity's project and type (neither changes), so a filter
        # on them drops most of a filtered scan's candidates before the join; search_docs
        # keeps the last word on every filter.
        early = "".join(f" AND v.{column} = ANY(%({name})s)" for column, name in
                        (("type", "types"), ("project_id", "projects")) if params[name] is not None)
        cur = await conn.execute(sql.SQL(
            "WITH n AS MATERIALIZED ("
            " SELECT v.entity_id, s.project_id, s.type, s.module, {distance} AS distance"
            " FROM search_vectors v JOIN search_docs s ON s.org_id = v.org_id AND s.entity_id = v.entity_id"
            " WHERE v.org_id = %(org)s AND v.model = {model}{early} AND {where}"
            " ORDER BY {order} LIMIT %(depth)s)"
            " SELECT * FROM n ORDER BY distance, entity_id").format(
                distance=distance, model=sql.Literal(model.model), early=sql.SQL(early), where=where,
                order=order),
            {**params, "qv": _vector_text(vector), "depth": depth})
        return [Hit(row["entity_id"], row["project_id"], row["type"], row["module"], score=0.0,
                    distance=row["distance"]) for row in await cur.fetchall()]

    async def _vector_count(self, conn: Connection, org_id: UUID, model: str) -> int:
        """How many vectors the org has, up to ``exact_below`` (remembered for a minute)."""
        at, n = self._vector_counts.get((org_id, model), (0.0, 0))
        if time.monotonic() - at < VECTOR_COUNT_TTL:
            return n
        cur = await conn.execute(
            "SELECT count(*) AS n FROM (SELECT FROM search_vectors WHERE org_id = %s AND model = %s"
            " LIMIT %s) x", (org_id, model, self.exact_below))
        row = await cur.fetchone()
        n = row["n"] if row else 0
        if len(self._vector_counts) > 10_000:
            self._vector_counts.clear()
        self._vector_counts[(org_id, model)] = (time.monotonic(), n)
        return n

    async def _semantic(self, conn: Connection, org_id: UUID, model: Any, vector: list[float],
                        where: sql.Composable, params: dict[str, Any], need: int,
                        after: Sequence[Any] | None) -> tuple[list[Hit], list[UUID]]:
        seen = int(after[2]) if after is not None else 0
        # At least one more than the counts cover, whatever the page (ef_search is 100 anyway).
        depth = min(MAX_DEPTH, max(seen + need, SEMANTIC_COUNT + 1))
        nearest = await self._nearest(conn, org_id, model, vector, where, params, depth)
        hits = _page([(1.0 - hit.distance, hit) for hit in nearest if hit.distance is not None],
                     after, need, seen)
        return hits, [hit.id for hit in nearest[:SEMANTIC_COUNT + 1]]

    async def _hybrid(self, conn: Connection, org_id: UUID, text: list[Hit], model: Any,
                      vector: list[float], where: sql.Composable, params: dict[str, Any], need: int,
                      after: Sequence[Any] | None) -> tuple[list[Hit], list[UUID]]:
        """Reciprocal rank fusion of the text list (``_hybrid_depth`` deep) and the nearest
        entities: each list adds 1 / (60 + rank) to an entity's score."""
        seen = int(after[2]) if after is not None else 0
        nearest = await self._nearest(conn, org_id, model, vector, where, params, _hybrid_depth(need, after))
        if not nearest and after is None:
            # No vector yet among the entities in scope (they were just written): the page is
            # the text list's head, with its own cursor, so that the next pages go on with the
            # text list. Fused scores would not do: once the vectors come, every remaining
            # match scores above this page's and falls before its cursor (an empty next page).
            return text[:need], []
        scores: dict[UUID, float] = {}
        found: dict[UUID, Hit] = {}
        for rank, hit in enumerate(text, 1):
            scores[hit.id] = 1.0 / (RRF_K + rank)
            found[hit.id] = hit
        for rank, hit in enumerate(nearest, 1):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (RRF_K + rank)
            if hit.id in found:
                found[hit.id].distance = hit.distance
            else:
                found[hit.id] = hit
        hits = _page([(score, found[eid]) for eid, score in scores.items()], after, need, seen)
        return hits, [hit.id for hit in nearest[:HYBRID_WINDOW]]  # counted as deep whatever the page

    # --- totals, facets, and what a hit shows ---------------------------------------------

    async def _count(self, conn: Connection, plan: _Plan | None, also: list[UUID] | None,
                     params: dict[str, Any], facets: Sequence[str], results: Results,
                     most: int | None = None) -> None:
        """The number of matches and the facet counts, over at most ``facet_cap`` matches (or
        ``total_cap`` when no facets are asked; at most ``most``): those of the text query's first
        word (the broadest tier; title matches first, the others only while within the cap), and
        ``also`` (the semantic list, or the entities listed). With neither, every entity within
        the filters."""
        cap = self.facet_cap if facets else self.total_cap
        cap = cap if most is None else min(cap, most)
        if plan is None and also is not None and not (also and facets):
            # The list alone, already within the filters.
            results.total, results.total_approximate = min(len(also), cap), len(also) > cap
            if facets:
                results.facets = {f: {} for f in facets}
            return
        if plan is not None and not facets and (plan.title_matches or 0) > cap:
            # The first word's title bucket already found more than the cap.
            results.total, results.total_approximate = cap, True
            return
        cur = await conn.execute(
            "SELECT facet, value, n"
            f" FROM search_facets(%(broad)s, %(also)s, {MATCH_SCOPE}, %(cap)s, %(facets)s)",
            {**params, "broad": plan.tier(1, typos=True) if plan else None, "also": also or None,
             "cap": cap, "facets": list(facets)})
        counts: dict[str, dict[str, int]] = {f: {} for f in facets}
        for row in await cur.fetchall():
            if row["facet"] == "total":
                results.total = min(row["n"], cap)
                results.total_approximate = row["n"] > cap
            else:
                counts[row["facet"]][row["value"]] = row["n"]
        if facets:
            results.facets = {f: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:100])
                              for f, c in counts.items()}

    async def _hydrate(self, conn: Connection, org_id: UUID, plan: _Plan | None, hits: list[Hit]) -> None:
        """Each hit's data and version, and its text fields' matching passages highlighted."""
        if not hits:
            return
        args: dict[str, Any] = {"org": org_id, "ids": [h.id for h in hits],
                                "q": plan.tier(len(plan.exact), typos=True) if plan else ""}
        cur = await conn.execute(
            "SELECT e.id, e.data, e.version, e.updated_at,"
            " (SELECT jsonb_object_agg(f.key, ts_headline('english', f.text, to_tsquery('english', %(q)s),"
            "   'StartSel=\x02, StopSel=\x03, MaxWords=30, MinWords=10'))"
            # the text's own markers, if any, become spaces: only the matches are marked
            "  FROM (SELECT key, translate(string_agg(s, ' '), chr(2) || chr(3), '  ') AS text"
            # the hit's type by its key (joined, the planner would rather scan the org's
            # types and look every hit up again for each of them)
            "        FROM jsonb_object_keys((SELECT t.text_fields FROM entity_types t"
            "                                WHERE t.org_id = e.org_id AND t.name = e.type)) AS key,"
            "        LATERAL search_strings(e.data, key) AS s GROUP BY key) f"
            "  WHERE %(q)s <> '' AND f.text <> '') AS highlights"
            " FROM entities e WHERE e.org_id = %(org)s AND e.id = ANY(%(ids)s)", args)
        rows = {row["id"]: row for row in await cur.fetchall()}
        for hit in hits:
            row = rows.get(hit.id)
            if row is None:
                continue
            hit.data, hit.version, hit.updated_at = row["data"], row["version"], row["updated_at"]
            hit.highlights = {name: _marked(text) for name, text in (row["highlights"] or {}).items()
                              if _MARK in text}


def _hybrid_depth(need: int, after: Sequence[Any] | None) -> int:
    """How deep hybrid search takes each list: the window, or to the end of the page asked for."""
    seen = int(after[2]) if after is not None else 0
    return min(MAX_DEPTH, max(HYBRID_WINDOW, seen + need))


@contextlib.asynccontextmanager
async def _cancelled_on_exit(task: asyncio.Future[Any] | None) -> AsyncIterator[None]:
    """Cancel ``task`` if the block ends (an error, most likely) before awaiting it."""
    try:
        yield
    finally:
        if task is not None and not task.done():
            task.cancel()
        elif task is not None and not task.cancelled():
            task.exception()  # retrieved: an error already raised in the block is the one to report


def _page(scored: list[tuple[float, Hit]], after: Sequence[Any] | None, need: int, seen: int) -> list[Hit]:
    """One page of a scored list (semantic or fused): by score, then id, after the cursor's."""
    scored.sort(key=lambda s: (-s[0], str(s[1].id)))
    if after is not None:
        scored = [s for s in scored if (-s[0], str(s[1].id)) > (-float(after[0]), after[1])]
    hits = []
    for i, (score, hit) in enumerate(scored[:need], 1):
        hit.score = round(score, 6)
        hit.distance = None if hit.distance is None else round(hit.distance, 6)
        hit._key = (score, str(hit.id), seen + i)
        hit._kind = "s"
        hits.append(hit)
    return hits


def _where(org_id: UUID, projects: list[UUID] | None, filters: Filters,
           excluded: str | None = None) -> tuple[sql.Composable, dict[str, Any]]:
    """The filter over ``search_docs s``, and its named parameters (also those of MATCH_SCOPE).
    ``excluded`` (a to_tsquery text) leaves out the entities that match it: the -words of the
    query, for the lists that are not text matches (recent, and meaning)."""
    params: dict[str, Any] = {
        "org": org_id, "projects": projects, "types": list(filters.types) or None,
        "modules": list(filters.modules) or None, "updated_after": filters.updated_after,
        "updated_before": filters.updated_before, "data": None, "excluded": excluded}
    parts = ["s.org_id = %(org)s"]
    if projects is not None:
        parts.append("s.project_id = ANY(%(projects)s)")
    if filters.types:
        parts.append("s.type = ANY(%(types)s)")
    if filters.modules:
        parts.append("s.module = ANY(%(modules)s)")
    if filters.updated_after:
        parts.append("s.updated_at > %(updated_after)s")
    if filters.updated_before:
        parts.append("s.updated_at < %(updated_before)s")
    if filters.data:
        params["data"] = _data_filter(filters.data)
        parts.append("EXISTS (SELECT FROM entities e WHERE e.org_id = s.org_id AND e.id = s.entity_id"
                     " AND search_data_filter(e.data, %(data)s))")
    if excluded:
        parts.append("NOT s.tsv @@ to_tsquery('english', %(excluded)s)")
    return sql.SQL(" AND ".join(parts)), params


def _data_filter(fields: Sequence[tuple[str, str]]) -> Jsonb:
    """The ``data.`` filters as one SQL/JSON path predicate (C code, not a query per row), with
    the values as its variables: data.n=3 matches 3 and "3"; data.done=true, true and "true";
    an array field matches when one of its items does (the path's lax mode)."""
    conditions, values = [], {}
    for i, (name, raw) in enumerate(fields):
        target = "$" + "".join(f'."{part}"' for part in name.split("."))
        options: list[Any] = [raw]
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: [[[[... nested too deep
            parsed = raw
        if parsed != raw and not isinstance(parsed, dict | list) and _finite(parsed):
            options.append(parsed)
        alternatives = []
        for j, value in enumerate(options):
            values[f"v{i}_{j}"] = value
            alternatives.append(f"{target} == $v{i}_{j}")
        conditions.append("(" + " || ".join(alternatives) + ")")
    return Jsonb({"path": " && ".join(conditions), "vars": values})


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _marked(text: str) -> str:
    """A headline made safe for HTML, with the matches in <mark>."""
    return html.escape(text).replace(_MARK, "<mark>").replace(_END, "</mark>")


def _vector_text(vector: list[float]) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in vector) + "]"


def _fingerprint(mode: str, typo: bool, text: str, filters: Filters) -> str:
    """What a cursor belongs to: a cursor of another query is refused."""
    raw = json.dumps([mode, typo, text, repr(filters)], ensure_ascii=False)
    return hashlib.blake2b(raw.encode(), digest_size=6).hexdigest()


def _encode_cursor(fingerprint: str, kind: str, key: tuple[Any, ...]) -> str:
    raw = json.dumps([fingerprint, kind, list(key)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _foreign_cursor() -> InvalidInput:
    return InvalidInput("the cursor is not one this API returned", pointer="/cursor")


def _decode_cursor(cursor: str | None, fingerprint: str) -> tuple[str | None, tuple[Any, ...] | None]:
    """The kind of a cursor's key and the key, each part checked: a cursor is the client's to
    change, so anything but a key this API made answers 422."""
    if not cursor:
        return None, None
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        owner, kind, key = json.loads(raw)
    except (ValueError, TypeError, RecursionError):  # RecursionError: [[[[... nested too deep
        raise _foreign_cursor() from None
    if owner != fingerprint:
        raise InvalidInput("this cursor does not belong to this search (same query, mode and "
                           "filters)", pointer="/cursor")
    check = _CURSOR_KEYS.get(kind) if isinstance(kind, str) else None
    if check is None or not isinstance(key, list) or len(key) != len(check):
        raise _foreign_cursor()
    if not all(ok(part) for ok, part in zip(check, key, strict=True)):
        raise _foreign_cursor()
    return kind, tuple(key)


def _int_in(low: int, high: int) -> Any:
    return lambda v: type(v) is int and low <= v <= high


def _number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _uuid(v: Any) -> bool:
    try:
        return isinstance(v, str) and len(v) == 36 and UUID(v) is not None
    except ValueError:
        return False


def _moment(v: Any) -> bool:
    try:
        return isinstance(v, str) and len(v) <= 40 and datetime.fromisoformat(v).tzinfo is not None
    except ValueError:
        return False


# The parts of each kind of key (Hit._key): a text bucket's (-words, bucket, typos, slips,
# turn, -rank, id), a recent entity's (updated_at, id), a scored one's (score, id, position).
_CURSOR_KEYS: dict[str, tuple[Any, ...]] = {
    "t": (_int_in(-q.MAX_GROUPS, -1), _int_in(TITLES, CORRECTED), _int_in(0, 2 * q.MAX_GROUPS),
          _int_in(0, q.MAX_GROUPS), _int_in(1, 2**31 - 1), lambda v: _number(v) and v <= 0, _uuid),
    "r": (_moment, _uuid),
    "s": (lambda v: _number(v) and -2 <= v <= 2, _uuid, _int_in(1, MAX_DEPTH)),  # 1 - distance, or RRF
}


def check_text(value: Any, pointer: str, *, nul: bool = True) -> None:
    """A string that can be sent to PostgreSQL: UTF-8 (no lone surrogate) and, unless ``nul``
    is false (the query: its words are read out of it), without NUL."""
    if not isinstance(value, str):
        raise InvalidInput("expected text", pointer=pointer)
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidInput("text must be valid Unicode (no lone surrogate)", pointer=pointer) from None
    if nul and "\x00" in value:
        raise InvalidInput("text must not contain NUL", pointer=pointer)
