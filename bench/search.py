"""Search benchmark: text (exact, typo-corrected, prefix), meaning (HNSW), hybrid and facets through
canvasdb's Python API as an org admin, with the load, index builds, sizes and recall behind them.

Data (the shape the targets were set on): N entities (1,000,000 with --scale full, 100,000 by
default, 5,000 with --scale small) in one org, spread over N/100 projects (at least 10; 10,000 at
full scale). Each has a title of 3-8 words and a body of 20-60 words drawn from a 20,000-word
vocabulary with Zipf frequencies (exponent 1.0 over word rank): pronounceable pseudo-words of 3-12
lower-case letters made by a seeded generator, kept only when their English stems are distinct
and not stop words, so every word is searchable on its own. 20 types t00..t19 (modules m0..m4,
text_fields title A / body B, tag_field "tags"); 0-3 tags per entity out of 50; a status
todo/doing/done. Vectors of model all-MiniLM-L6-v2 (active, 384 dimensions): the real local model
embeds a subset (5,000 at full scale, 2,000 default, 500 small; title + body, as the indexer
would); every other entity gets a structured synthetic vector: a mix of two random real ones
(weights w and 1 - w, w from 0.5 to 1) plus a little gaussian noise (sigma 0.005-0.02 per
component), renormalised, so that the synthetic vectors lie among the real ones as the vectors of
related documents do. (Noisy copies of single real vectors, sigma 0.02-0.10, were tried first:
about 200 near-equidistant copies of each real vector put HNSW recall@20 at 0.79 at full scale,
a test of ties rather than of search.)

Loading: entities by COPY with triggers off (superuser, replica role); search_docs by one
INSERT ... SELECT per half of the ids (two connections, two cores) with the trigger's own
functions, then its two GIN indexes built (dropped around the insert: same names and definitions);
search_terms from search_words, then its trigram index; vectors by COPY (halfvec text), then the
HNSW index after the load, as the application builds it (model_index.py: CREATE INDEX CONCURRENTLY
on a connection of its own); then VACUUM ANALYZE. Every phase is timed.

Queries (median and p95 ms, warm, through svc.search.search as an org admin; 200 of each, 50 at
small scale): two-word text (two mid-frequency words, ranks 100-2,000, of one random body), one
common word (one in 10,000 to 100,000 entities, "tens of thousands of matches" as the issue puts
it; the 20 most frequent words when the corpus is too small for that), a one-typo word (see the
typo rule in the report), a 3-letter prefix, semantic top 20 without and with a type filter
(queries: titles of real-embedded entities), hybrid (the two-word queries), facets on a common
word, and (no target) two-word text with a data filter (status = done). Then the typo recall
(over 1,000 cases, 200 at small scale, the timed ones first: 200 cases put one miss at half a
percent, too coarse for a 99 % target; the timed cases' own recall is reported too), HNSW
recall@20 against an exact scan, the embedder's speed, the plans of each query kind
(auto_explain, which needs a superuser login), a check of the same text match and trigram lookup
with and without row-level security, and the write cost of indexing: patches of an entity whose
type has text fields against one whose type has none.

Usage: .venv/bin/python bench/search.py [--scale default|full|small] [--json] [--database-url URL]

    .venv/bin/python bench/search.py --scale small    # 5,000 entities: about 75 s (smoke run)
    .venv/bin/python bench/search.py                  # 100,000 entities: about 5 min
    .venv/bin/python bench/search.py --scale full     # 1,000,000 entities: see the README

Times on the 2-core machine. Embedding these pseudo-word texts (~140 word pieces each) runs at
about 20 texts/s, so the real subset takes ~100 s by default and ~4 min at full scale; the HNSW
build takes 40 s for 100,000 vectors.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import statistics
import string
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import numpy as np
import psycopg
from harness import Tenant, machine_facts, make_tenant, phase, print_footer, print_targets, run, stats, timed
from psycopg.conninfo import make_conninfo
from rich.console import Console
from rich.table import Table

from canvasdb.db import Database
from canvasdb.entities import EntityType
from canvasdb.runtime import prepare_schema
from canvasdb.search.embedders import make_embedder
from canvasdb.search.engine import Filters, Mode, Results, Search
from canvasdb.search.model_index import ModelIndexes, index_name
from canvasdb.search.query import typo_cost
from canvasdb.services import Services
from canvasdb.settings import Settings
from canvasdb.tenancy import Principal

VOCAB = 20_000
ZIPF = 1.0
TYPES = 20
MODULES = 5
TAGS = 50
STATUSES = ("todo", "doing", "done")
MODEL = "all-MiniLM-L6-v2"
DIM = 384
MID_RANKS = (100, 2_000)  # two-word queries: words of these frequency ranks
COMMON_MATCHES = (10_000, 100_000)  # one-common-word queries: "tens of thousands of matches"
COMMON_FALLBACK = 20  # ... or, in a corpus too small for that, the most frequent words
TYPO_MIN_RANK = 2_000  # typo targets: words rarer than this rank ...
TYPO_MIN_LETTERS = 5  # ... and at least this long (deletions need 6: 4 letters get no typo)
MIX = (0.5, 1.0)  # synthetic vectors: weight of the first of their two real vectors
SIGMA = (0.005, 0.02)  # ... and the noise per component added to the mix
TARGET_P95_MS = 30.0
TARGET_TYPO_RECALL = 0.99
TARGET_HNSW_RECALL = 0.95
TARGET_HNSW_BUILD_S = 8 * 60
TARGET_TEXT_RATIO = 3.0
MID = UUID("80000000-0000-4000-8000-000000000000")  # splits random ids into two halves

# PostgreSQL 18 at 1M rows (median, p95 ms), as the issue gives them.
REFERENCE = {"two_word": "0.4 / 2.6", "common": "32 / 107 (first 2,000 ranked: 6 / 13)",
             "typo": "5.5 / 8.4 (99% recall)", "prefix": "", "semantic": "2.6 / 3.3 (HNSW top 20)",
             "semantic_type": "", "hybrid": "3.8 / 8.1", "facets": "27 / 73", "data_filter": ""}


@dataclass(frozen=True)
class Scale:
    name: str
    entities: int
    real_vectors: int  # embedded by the real model
    samples: int  # queries per kind
    recall_queries: int
    typo_cases: int  # typo recall is measured over this many (the timed queries among them)
    writes: int  # patches per kind of type
    maintenance_work_mem: str  # for the HNSW and GIN builds


SCALES = {
    "small": Scale("small", 5_000, 500, 50, 30, 200, 100, "256MB"),
    "default": Scale("default", 100_000, 2_000, 200, 100, 1_000, 500, "1GB"),
    "full": Scale("full", 1_000_000, 5_000, 200, 100, 1_000, 500, "4GB"),
}


# --- the words --------------------------------------------------------------------------------------

CONSONANTS = "bcdfghjklmnprstvz"
CLUSTERS = ("st", "nd", "rk", "mp", "nt", "br", "tr", "gr", "pl", "sk", "ld", "ch")
VOWELS = "aeiou"
LENGTHS = {3: 4, 4: 8, 5: 14, 6: 17, 7: 17, 8: 14, 9: 10, 10: 8, 11: 5, 12: 3}  # letters: weight


def pseudo_word(rng: random.Random) -> str:
    length = rng.choices(list(LENGTHS), list(LENGTHS.values()))[0]
    out, vowel = "", rng.random() < 0.25
    while len(out) < length:
        if vowel:
            out += rng.choice(VOWELS)
        else:
            out += rng.choice(CLUSTERS) if out and rng.random() < 0.15 else rng.choice(CONSONANTS)
        vowel = not vowel
    return out[:length]


def lexemes(conn: psycopg.Connection[Any], words: list[str]) -> list[list[str]]:
    """What to_tsvector('english') makes of each word (its stem; nothing for a stop word)."""
    rows = conn.execute("SELECT tsvector_to_array(to_tsvector('english', w)) FROM unnest(%s::text[])"
                        " WITH ORDINALITY AS x(w, i) ORDER BY i", (words,)).fetchall()
    return [r[0] for r in rows]


def vocabulary(url: str, n: int = VOCAB, seed: int = 3) -> tuple[list[str], set[str]]:
    """n distinct pseudo-words in rank order (rank 0 the most frequent), and their stems."""
    rng = random.Random(seed)
    words: list[str] = []
    stems: set[str] = set()
    seen: set[str] = set()
    with psycopg.connect(url) as conn:
        while len(words) < n:
            batch: list[str] = []
            while len(batch) < (n - len(words)) * 1.3 + 100:
                w = pseudo_word(rng)
                if w not in seen:
                    seen.add(w)
                    batch.append(w)
            for w, lex in zip(batch, lexemes(conn, batch), strict=True):
                if len(lex) == 1 and lex[0] not in stems and len(words) < n:
                    stems.add(lex[0])
                    words.append(w)
    return words, stems


def zipf_cdf(n: int, s: float = ZIPF) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return np.cumsum(w) / w.sum()


def common_ranks(corpus: Corpus) -> list[int]:
    """The words expected in COMMON_MATCHES documents (1 - (1 - p)^L of the entities, for a word
    of probability p and L words per entity); the most frequent ones if none is."""
    p = np.diff(zipf_cdf(VOCAB), prepend=0.0)
    per_entity = (len(corpus.title) + len(corpus.body)) / corpus.n
    docs = corpus.n * -np.expm1(per_entity * np.log1p(-p))
    ranks = np.flatnonzero((docs >= COMMON_MATCHES[0]) & (docs < COMMON_MATCHES[1])).tolist()
    return ranks or list(range(COMMON_FALLBACK))


def draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Ranks (0 the most likely) for uniform draws ``u``."""
    return np.minimum(np.searchsorted(cdf, u), len(cdf) - 1).astype(np.int16)


# --- the corpus and the load ------------------------------------------------------------------------


@dataclass
class Corpus:
    """What the queries are made from; the entities' text is in the database."""

    words: list[str]
    ids: np.ndarray  # (n, 16) uint8: uuid bytes
    types: np.ndarray  # type index per entity
    projects: np.ndarray  # project index per entity
    title: np.ndarray  # word ranks of all titles, one after the other
    title_off: np.ndarray  # (n + 1): entity i's title is title[title_off[i]:title_off[i + 1]]
    body: np.ndarray
    body_off: np.ndarray
    md5: np.ndarray  # (n, 16) uint8: md5 of the embedding text, as search_embed_text gives it
    raw_bytes: int  # title + body characters (ASCII)

    @property
    def n(self) -> int:
        return len(self.types)

    def id(self, i: int) -> UUID:
        return UUID(bytes=self.ids[i].tobytes())

    def title_ranks(self, i: int) -> list[int]:
        return self.title[self.title_off[i]:self.title_off[i + 1]].tolist()

    def body_ranks(self, i: int) -> list[int]:
        return self.body[self.body_off[i]:self.body_off[i + 1]].tolist()

    def title_text(self, i: int) -> str:
        return " ".join(self.words[r] for r in self.title_ranks(i))

    def embed_text(self, i: int) -> str:
        return self.title_text(i) + "\n" + " ".join(self.words[r] for r in self.body_ranks(i))


def copy_entities(url: str, t: Tenant, projects: list[UUID], n: int, words: list[str],
                  seed: int = 42) -> Corpus:
    """Generate the entities in chunks and COPY them (triggers off: superuser, replica role)."""
    rng = np.random.default_rng(seed)
    cdf = zipf_cdf(len(words))
    tag_cdf = zipf_cdf(TAGS, 0.8)  # tags: some much more used than others
    vocab = np.array(words, dtype=object)
    now = datetime.now(UTC)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("ids", "types", "projects", "title", "tl", "body",
                                                          "bl", "md5")}
    raw = 0
    chunk = 10_000
    with psycopg.connect(url, autocommit=True) as conn, phase("COPY entities", n) as advance:
        conn.execute("SET session_replication_role = replica")
        with conn.cursor().copy(
                "COPY entities (org_id, id, project_id, type, data, version, keyframe_version, deleted,"
                " created_at, updated_at, created_by, updated_by) FROM STDIN") as cp:
            for start in range(0, n, chunk):
                c = min(chunk, n - start)
                ids = np.frombuffer(rng.bytes(16 * c), np.uint8).reshape(c, 16).copy()
                ids[:, 6] = (ids[:, 6] & 0x0F) | 0x40  # version 4
                ids[:, 8] = (ids[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
                types = rng.integers(0, TYPES, c).astype(np.int8)
                projs = rng.integers(0, len(projects), c).astype(np.int32)
                tl = rng.integers(3, 9, c)
                bl = rng.integers(20, 61, c)
                tw = draw(cdf, rng.random(int(tl.sum())))
                bw = draw(cdf, rng.random(int(bl.sum())))
                ntags = rng.integers(0, 4, c)
                tags = draw(tag_cdf, rng.random((c, 3)))
                status = rng.integers(0, 3, c)
                toff = np.concatenate([[0], np.cumsum(tl)])
                boff = np.concatenate([[0], np.cumsum(bl)])
                md5 = np.empty((c, 16), np.uint8)
                for i in range(c):
                    title = " ".join(vocab[tw[toff[i]:toff[i + 1]]].tolist())
                    body = " ".join(vocab[bw[boff[i]:boff[i + 1]]].tolist())
                    raw += len(title) + len(body)
                    md5[i] = np.frombuffer(hashlib.md5(f"{title}\n{body}".encode()).digest(), np.uint8)
                    data = {"title": title, "body": body,
                            "tags": [f"tag{x:02d}" for x in dict.fromkeys(tags[i, :ntags[i]].tolist())],
                            "status": STATUSES[status[i]]}
                    row = (t.org_id, UUID(bytes=ids[i].tobytes()), projects[projs[i]], f"t{types[i]:02d}",
                           json.dumps(data), 1, 1, False, now, now, t.owner, t.owner)
                    cp.write_row(row)
                for k, v in (("ids", ids), ("types", types), ("projects", projs), ("title", tw), ("tl", tl),
                             ("body", bw), ("bl", bl), ("md5", md5)):
                    parts[k].append(v)
                advance(c)
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    return Corpus(words, joined["ids"], joined["types"], joined["projects"], joined["title"],
                  np.concatenate([[0], np.cumsum(joined["tl"])]), joined["body"],
                  np.concatenate([[0], np.cumsum(joined["bl"])]), joined["md5"], raw)


_HALVES = ("e.id < %(mid)s", "e.id >= %(mid)s")
_DOCS = """INSERT INTO search_docs
    (org_id, entity_id, project_id, type, module, tags, tsv, embed_md5, updated_at)
SELECT e.org_id, e.id, e.project_id, e.type, t.module,
       CASE WHEN t.tag_field IS NULL THEN '{}'::text[]
            ELSE ARRAY(SELECT s FROM search_strings(e.data, t.tag_field) s LIMIT 100) END,
       search_vector(e.data, t.text_fields),
       md5(search_embed_text(e.data, t.text_fields, t.embed_fields))::uuid, e.updated_at
FROM entities e JOIN entity_types t ON t.org_id = e.org_id AND t.name = e.type
WHERE e.org_id = %(org)s AND NOT e.deleted AND (t.text_fields <> '{}' OR t.embed_fields <> '[]') AND {half}"""
_WORDS = """SELECT array_agg(DISTINCT w) FROM entities e
JOIN entity_types t ON t.org_id = e.org_id AND t.name = e.type,
LATERAL unnest(search_words(e.data, t.text_fields)) AS w
WHERE e.org_id = %(org)s AND NOT e.deleted AND {half}"""
GIN_DDL = "CREATE INDEX search_docs_tsv ON search_docs USING gin (tsv)"  # as in 0010_search.sql
TITLES_DDL = ("CREATE INDEX search_docs_title_shards ON search_docs"  # as in 0012_search_title_shards.sql
              " USING gin (search_sharded(ts_filter(tsv, '{a}'), entity_id))")
TRGM_DDL = "CREATE INDEX search_terms_trgm ON search_terms USING gin (term gin_trgm_ops)"


def in_halves(url: str, sql: str, params: dict[str, Any]) -> list[Any]:
    """One statement per half of the entity ids, on two connections at once (two cores)."""
    def one(half: str) -> Any:
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(sql.replace("{half}", half), {**params, "mid": MID})
            return cur.fetchone() if cur.description else cur.rowcount

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, _HALVES))


def build_text_index(url: str, t: Tenant, scale: Scale, timings: dict[str, float]) -> None:
    """search_docs (GIN indexes built after the insert) and search_terms (trigram index built after)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET maintenance_work_mem = '{scale.maintenance_work_mem}'")
        conn.execute("SET max_parallel_maintenance_workers = 1")
        conn.execute("DROP INDEX IF EXISTS search_docs_tsv")
        conn.execute("DROP INDEX IF EXISTS search_docs_title_shards")
        with phase("INSERT search_docs (two halves)"):
            t0 = time.perf_counter()
            in_halves(url, _DOCS, {"org": t.org_id})
            timings["search_docs_insert"] = time.perf_counter() - t0
        with phase("CREATE INDEX search_docs_tsv (GIN)"):
            t0 = time.perf_counter()
            conn.execute(GIN_DDL)
            timings["gin_build"] = time.perf_counter() - t0
        with phase("CREATE INDEX search_docs_title_shards (GIN)"):
            t0 = time.perf_counter()
            conn.execute(TITLES_DDL)
            timings["titles_gin_build"] = time.perf_counter() - t0
        conn.execute("DROP INDEX IF EXISTS search_terms_trgm")
        with phase("search_terms from search_words"):
            t0 = time.perf_counter()
            halves = in_halves(url, _WORDS, {"org": t.org_id})
            terms = sorted(set().union(*(h[0] or [] for h in halves)))
            conn.execute("INSERT INTO search_terms (org_id, term) SELECT %s, w FROM unnest(%s::text[]) AS w"
                         " ON CONFLICT DO NOTHING", (t.org_id, terms))
            timings["search_terms_fill"] = time.perf_counter() - t0
        with phase("CREATE INDEX search_terms_trgm"):
            t0 = time.perf_counter()
            conn.execute(TRGM_DDL)
            timings["trigram_build"] = time.perf_counter() - t0


async def embed_subset(svc: Services, corpus: Corpus, subset: np.ndarray) -> tuple[np.ndarray, float]:
    """The real model's vectors of the subset (title + body, as search_embed_text gives them)."""
    emb = svc.models.configured
    out = np.empty((len(subset), DIM), np.float32)
    await emb.embed(["warm up the model"])
    batch = 256
    with phase(f"embed {len(subset):,} texts ({MODEL})", len(subset)) as advance:
        t0 = time.perf_counter()
        for s in range(0, len(subset), batch):
            texts = [corpus.embed_text(int(i)) for i in subset[s:s + batch]]
            out[s:s + len(texts)] = await emb.embed(texts, timeout=600)
            advance(len(texts))
        seconds = time.perf_counter() - t0
    return out, seconds


def copy_vectors(url: str, t: Tenant, projects: list[UUID], corpus: Corpus, subset: np.ndarray,
                 real: np.ndarray, seed: int = 5) -> None:
    """Real vectors for the subset, a mix of two random real ones (plus a little noise) for every
    other entity."""
    rng = np.random.default_rng(seed)
    row_of = np.full(corpus.n, -1, np.int64)
    row_of[subset] = np.arange(len(subset))
    fmt = "[" + ",".join(["%.5g"] * DIM) + "]"
    chunk = 5_000
    with psycopg.connect(url, autocommit=True) as conn, phase("COPY vectors", corpus.n) as advance, \
            conn.cursor().copy("COPY search_vectors (org_id, model, entity_id, project_id, type, embed_md5,"
                               " embedding) FROM STDIN") as cp:
        for start in range(0, corpus.n, chunk):
            c = min(chunk, corpus.n - start)
            w = rng.uniform(*MIX, (c, 1)).astype(np.float32)
            centres = w * real[rng.integers(0, len(real), c)] + (1 - w) * real[rng.integers(0, len(real), c)]
            sigma = rng.uniform(*SIGMA, (c, 1)).astype(np.float32)
            v = centres + sigma * rng.standard_normal((c, DIM), dtype=np.float32)
            mine = row_of[start:start + c]
            v[mine >= 0] = real[mine[mine >= 0]]
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            for k, row in enumerate(v.tolist()):
                i = start + k
                md5 = UUID(bytes=corpus.md5[i].tobytes())
                cp.write_row((t.org_id, MODEL, corpus.id(i), projects[corpus.projects[i]],
                              f"t{corpus.types[i]:02d}", md5, fmt % tuple(row)))
            advance(c)


async def hnsw_build(url: str, scale: Scale) -> float:
    """The model's index built by the application's own path (``ModelIndexes.build``), its session
    given the bench's maintenance memory and one parallel worker by its connection options."""
    options = f"-c maintenance_work_mem={scale.maintenance_work_mem} -c max_parallel_maintenance_workers=1"
    async with Database(make_conninfo(url, options=options), min_size=1, max_size=1) as db:
        with phase("CREATE INDEX CONCURRENTLY (HNSW) via model_index"):
            t0 = time.perf_counter()
            if not await ModelIndexes(db).build(MODEL, DIM):
                raise RuntimeError(f"another process is building the index of {MODEL}")
            return time.perf_counter() - t0


def vacuum_analyze(url: str) -> float:
    with psycopg.connect(url, autocommit=True) as conn, phase("VACUUM ANALYZE"):
        t0 = time.perf_counter()
        for table in ("entities", "search_docs", "search_terms", "search_vectors"):
            conn.execute(f"VACUUM ANALYZE {table}")
        return time.perf_counter() - t0


def sizes(url: str, t: Tenant, corpus: Corpus) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        def one(sql: str, *params: Any) -> Any:
            return conn.execute(sql, params).fetchone()[0]  # type: ignore[index]

        hnsw = index_name(MODEL)
        out = {
            "raw_text": corpus.raw_bytes,
            "entities_total": one("SELECT pg_total_relation_size('entities')"),
            "search_docs_table": one("SELECT pg_table_size('search_docs')"),
            "search_docs_tsv_gin": one("SELECT pg_relation_size('search_docs_tsv')"),
            "search_docs_titles_gin": one("SELECT pg_relation_size('search_docs_title_shards')"),
            "search_docs_total": one("SELECT pg_total_relation_size('search_docs')"),
            "tsv_column": int(one("SELECT sum(pg_column_size(tsv)) FROM search_docs WHERE org_id = %s",
                                  t.org_id)),
            "search_terms_total": one("SELECT pg_total_relation_size('search_terms')"),
            "search_terms_trgm": one("SELECT pg_relation_size('search_terms_trgm')"),
            "terms": one("SELECT count(*) FROM search_terms WHERE org_id = %s", t.org_id),
            "search_docs_rows": one("SELECT count(*) FROM search_docs WHERE org_id = %s", t.org_id),
            "search_vectors_table": one("SELECT pg_table_size('search_vectors')"),
            "hnsw_index": one("SELECT pg_relation_size(%s::regclass)", hnsw),
            "vectors": one("SELECT count(*) FROM search_vectors WHERE org_id = %s", t.org_id),
            "md5_mismatches": one("SELECT count(*) FROM search_vectors v JOIN search_docs s"
                                  " ON s.org_id = v.org_id AND s.entity_id = v.entity_id WHERE v.org_id = %s"
                                  " AND v.embed_md5 IS DISTINCT FROM s.embed_md5", t.org_id),
        }
    out["text_index_ratio"] = (out["search_docs_table"] + out["search_docs_tsv_gin"]
                               + out["search_docs_titles_gin"]) / out["raw_text"]
    out["all_text_ratio"] = (out["search_docs_total"] + out["search_terms_total"]) / out["raw_text"]
    out["gin_ratio"] = out["search_docs_tsv_gin"] / out["raw_text"]
    out["tsv_and_gin_ratio"] = (out["tsv_column"] + out["search_docs_tsv_gin"]) / out["raw_text"]
    return out


# --- the queries ------------------------------------------------------------------------------------


def two_word_queries(corpus: Corpus, k: int, rng: random.Random) -> list[str]:
    out = []
    while len(out) < k:
        i = rng.randrange(corpus.n)
        mids = list(dict.fromkeys(r for r in corpus.body_ranks(i) if MID_RANKS[0] <= r < MID_RANKS[1]))
        if len(mids) >= 2:
            a, b = rng.sample(mids, 2)
            out.append(f"{corpus.words[a]} {corpus.words[b]} ")
    return out


def prefix_queries(corpus: Corpus, k: int, rng: random.Random) -> list[str]:
    out = []
    while len(out) < k:
        longer = [r for r in corpus.title_ranks(rng.randrange(corpus.n)) if len(corpus.words[r]) >= 4]
        if longer:
            out.append(corpus.words[rng.choice(longer)][:3])
    return out


def make_typo(word: str, rng: random.Random) -> tuple[str, str]:
    """One typo not on the first letter: substitution, deletion, insertion or adjacent swap."""
    while True:
        op = rng.choice(("substitution", "deletion", "insertion", "swap"))
        if op == "deletion" and len(word) < TYPO_MIN_LETTERS + 1:
            continue  # the typed word must keep 5 letters, or no typo is allowed at all
        if op == "substitution":
            i = rng.randrange(1, len(word))
            typed = word[:i] + rng.choice([c for c in string.ascii_lowercase if c != word[i]]) + word[i + 1:]
        elif op == "deletion":
            i = rng.randrange(1, len(word))
            typed = word[:i] + word[i + 1:]
        elif op == "insertion":
            i = rng.randrange(1, len(word))
            typed = word[:i] + rng.choice(string.ascii_lowercase) + word[i:]
        else:
            i = rng.randrange(1, len(word) - 1)
            typed = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        if typed != word and typo_cost(typed, word) == 1:
            return typed, op


@dataclass
class TypoCase:
    target: UUID
    word: str
    typed: str
    op: str
    rank: int


async def typo_cases(url: str, svc: Services, who: Principal, corpus: Corpus, stems: set[str], k: int,
                     rng: random.Random) -> tuple[list[TypoCase], dict[str, int]]:
    """Targets findable by their word spelled right; their word typed with one typo.

    A candidate: a random entity, a word of its title of frequency rank >= TYPO_MIN_RANK and at
    least 5 letters, one random typo not on the first letter whose English stem is no word of
    the vocabulary (else it is another word, found exactly). It is kept if the search for the
    word spelled right (with a trailing space) has the entity in its top 20."""
    counts = {"candidates": 0, "typed_is_a_word": 0, "not_findable_spelled_right": 0}
    out: list[TypoCase] = []
    with psycopg.connect(url) as conn, phase("pick typo targets", k) as advance:
        while len(out) < k:
            batch = []
            while len(batch) < 50:
                i = rng.randrange(corpus.n)
                rare = [r for r in corpus.title_ranks(i)
                        if r >= TYPO_MIN_RANK and len(corpus.words[r]) >= TYPO_MIN_LETTERS]
                if rare:
                    r = rng.choice(rare)
                    typed, op = make_typo(corpus.words[r], rng)
                    batch.append(TypoCase(corpus.id(i), corpus.words[r], typed, op, r))
            for case, lex in zip(batch, lexemes(conn, [c.typed for c in batch]), strict=True):
                if len(out) >= k:
                    break
                counts["candidates"] += 1
                if len(lex) != 1 or lex[0] in stems:
                    counts["typed_is_a_word"] += 1
                    continue
                res = await svc.search.search(who, case.word + " ", mode="text")
                if case.target not in [h.id for h in res.hits]:
                    counts["not_findable_spelled_right"] += 1
                    continue
                out.append(case)
                advance()
    return out, counts


def common_word_matches(url: str, org: UUID, ranks: list[int], common: list[str]) -> dict[str, Any]:
    """How many entities the common-word queries match (the API's totals stop at a cap)."""
    with psycopg.connect(url) as conn:
        counts = [conn.execute("SELECT count(*) FROM search_docs WHERE org_id = %s"
                               " AND tsv @@ to_tsquery('english', %s)", (org, w.strip())).fetchone()[0]
                  for w in sorted(set(common))]
    return {"ranks": [min(ranks), max(ranks)], "words": len(counts), "matches_min": min(counts),
            "matches_median": statistics.median(counts), "matches_max": max(counts)}


async def nearest_ids(conn: psycopg.AsyncConnection[Any], org: UUID, vector: str, type_: str | None = None,
                    *, index: bool = False) -> list[UUID]:
    """The 20 nearest of the model's vectors: by an exact scan, or through the HNSW index."""
    order = "embedding::halfvec(384) <=> %(q)s::halfvec(384)"
    cur = await conn.execute(
        "SELECT entity_id FROM search_vectors WHERE org_id = %(org)s AND model = %(model)s"
        + (" AND type = %(type)s" if type_ else "")
        + f" ORDER BY {order if index else '(' + order + ') + 0'} LIMIT 20",
        {"org": org, "model": MODEL, "q": vector, "type": type_})
    return [r[0] for r in await cur.fetchall()]


def recall(found: list[list[UUID]], truth: list[list[UUID]]) -> float:
    return sum(len(set(f) & set(t)) for f, t in zip(found, truth, strict=True)) / sum(len(t) for t in truth)


def vector_text(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in v.tolist()) + "]"


class ExplainingDatabase(Database):
    """A pool whose connections log every statement's plan (auto_explain, ANALYZE) as a notice."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plans: list[str] = []

    async def _configure(self, conn: Any) -> None:
        for sql in ("LOAD 'auto_explain'", "SET auto_explain.log_min_duration = 0",
                    "SET auto_explain.log_analyze = on", "SET auto_explain.log_buffers = on",
                    "SET auto_explain.log_level = notice"):
            await conn.execute(sql)
        conn.add_notice_handler(lambda d: self.plans.append(d.message_primary or ""))
        await super()._configure(conn)


_INDEX = re.compile(r"(?:Index Scan|Index Only Scan|Bitmap Index Scan)(?: Backward)? (?:using|on) (\w+)")
_SEQ = re.compile(r"Seq Scan on (\w+)")


_DURATION = re.compile(r"duration: ([\d.]+) ms")
_STATEMENTS = (("FROM search_terms", "typo lookup"), ("AS matched", "text bucket"),
               ("search_facets(", "total/facets"), ("SELECT e.id, e.data", "hydrate+highlights"),
               ("FROM search_vectors WHERE org_id", "vector count"), ("WITH n AS", "nearest"),
               ("SELECT entity_id, project_id, type, module", "fused rows"),
               ("FROM search_models", "active model"))


def plan_summary(plans: list[str]) -> dict[str, Any]:
    """The indexes and seq scans in one query's plans, and each statement's time (set_config left out)."""
    found = sorted({m for p in plans for m in _INDEX.findall(p)})
    seq = sorted({m for p in plans for m in _SEQ.findall(p)})
    steps = []
    for p in plans:
        text = p.split("Query Text:", 1)[-1].split("\n", 1)[0]
        if "set_config" in text:
            continue
        label = next((name for key, name in _STATEMENTS if key in text), text[:40])
        ms = _DURATION.search(p)
        steps.append((label, float(ms.group(1)) if ms else 0.0))
    return {"indexes": found, "seq_scans": seq, "statements": steps}


async def run_async(url: str, scale: Scale, report: dict[str, Any], workdir: Path) -> None:
    settings = Settings(home=workdir, database_url=url)
    async with Database(url, min_size=1, max_size=4, statement_timeout_ms=600_000) as db:
        svc = Services.build(settings, db, embedder=make_embedder("local"))
        try:
            await build(url, svc, scale, report)
        finally:
            await svc.close()


async def build(url: str, svc: Services, scale: Scale, report: dict[str, Any]) -> None:
    t = await make_tenant(svc, f"bench-search-{report['run']}")
    for i in range(TYPES):
        await svc.types.register(t.who, EntityType(name=f"t{i:02d}", module=f"m{i % MODULES}",
                                                   text_fields={"title": "A", "body": "B"}, tag_field="tags"))
    admin_id = await svc.tenancy.ensure_user(f"admin@{t.slug}.bench.example", "Bench admin")
    await svc.tenancy.set_org_role(t.org_id, admin_id, "admin")
    who = Principal(org_id=t.org_id, user_id=admin_id, org_role="admin")
    n_projects = max(10, scale.entities // 100)
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("INSERT INTO projects (org_id, slug, name, created_by) SELECT %s, 'p' || i,"
                            " 'Project ' || i, %s FROM generate_series(1, %s) AS i RETURNING id",
                            (t.org_id, t.owner, n_projects - 1)).fetchall()
    projects = [t.project_id] + [r[0] for r in rows]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with phase(f"vocabulary of {VOCAB:,} words"):
        words, stems = await asyncio.to_thread(vocabulary, url)
    timings["vocabulary"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    corpus = await asyncio.to_thread(copy_entities, url, t, projects, scale.entities, words)
    timings["copy_entities"] = time.perf_counter() - t0
    await asyncio.to_thread(build_text_index, url, t, scale, timings)
    # The model row through the API (active: the first one). Registering builds an empty HNSW
    # index: dropped, to be built once after the load.
    model = await svc.models.register()
    await svc.models.indexes.drop(MODEL)
    rng = np.random.default_rng(9)
    subset = np.sort(rng.choice(corpus.n, min(scale.real_vectors, corpus.n), replace=False))
    real, seconds = await embed_subset(svc, corpus, subset)
    timings["embed_real"] = seconds
    t0 = time.perf_counter()
    await asyncio.to_thread(copy_vectors, url, t, projects, corpus, subset, real)
    timings["copy_vectors"] = time.perf_counter() - t0
    timings["hnsw_build"] = await hnsw_build(url, scale)
    timings["vacuum_analyze"] = await asyncio.to_thread(vacuum_analyze, url)
    report["data"] = {"entities": corpus.n, "projects": len(projects), "types": TYPES, "tags": TAGS,
                      "vocabulary": VOCAB, "zipf": ZIPF, "real_vectors": len(subset),
                      "synthetic_vectors": corpus.n - len(subset),
                      "model": asdict(model), "title_words": int(len(corpus.title)),
                      "body_words": int(len(corpus.body))}
    report["load"] = {"seconds": timings, "embed_texts_per_s": len(subset) / timings["embed_real"],
                      "maintenance_work_mem": scale.maintenance_work_mem}
    report["sizes"] = await asyncio.to_thread(sizes, url, t, corpus)
    await measure(url, svc, who, t, corpus, stems, subset, scale, report)
    await write_cost(svc, t, corpus, scale, report)


async def measure(url: str, svc: Services, who: Principal, t: Tenant, corpus: Corpus, stems: set[str],
                  subset: np.ndarray, scale: Scale, report: dict[str, Any]) -> None:
    rng = random.Random(11)
    k = scale.samples
    two = two_word_queries(corpus, k, rng)
    ranks = common_ranks(corpus)
    common = [corpus.words[rng.choice(ranks)] + " " for _ in range(k)]
    prefixes = prefix_queries(corpus, k, rng)
    semantic = [corpus.title_text(int(i)) for i in rng.sample(subset.tolist(), min(k, len(subset)))]
    all_typos, typo_counts = await typo_cases(url, svc, who, corpus, stems, max(k, scale.typo_cases), rng)
    typos = all_typos[:k]
    s = svc.search
    degraded: list[str] = []
    hits_of: dict[tuple[str, str], list[UUID]] = {}

    def total(res: Results) -> int:
        if res.degraded:
            degraded.append(res.degraded)
        return res.total if res.total is not None else len(res.hits)

    async def text(q: str, mode: Mode = "text", **kw: Any) -> int:
        return total(await s.search(who, q, mode=mode, **kw))

    async def semantic_q(q: str, key: str, **kw: Any) -> int:
        res = await s.search(who, q, mode="semantic", **kw)
        hits_of[(key, q)] = [h.id for h in res.hits]
        total(res)
        return len(res.hits)

    async def typo_q(case: TypoCase) -> int:
        return total(await s.search(who, case.typed + " ", mode="text"))

    t07 = Filters(types=("t07",))
    done = Filters(data=(("status", "done"),))
    queries = {
        "two_word": await timed(two, lambda q: text(q), "two-word text"),
        "common": await timed(common, lambda q: text(q), "one common word"),
        "typo": await timed(typos, typo_q, "one-typo word"),
        "prefix": await timed(prefixes, lambda q: text(q), "3-letter prefix"),
        "semantic": await timed(semantic, lambda q: semantic_q(q, "all"), "semantic top 20"),
        "semantic_type": await timed(semantic, lambda q: semantic_q(q, "t07", filters=t07),
                                     "semantic top 20, type t07"),
        "hybrid": await timed(two, lambda q: text(q, mode="hybrid"), "hybrid"),
        "facets": await timed(common, lambda q: text(q, facets=("type", "module", "project", "tag")),
                              "facets on a common word"),
        "data_filter": await timed(two, lambda q: text(q, filters=done), "two-word, data.status=done"),
    }
    report["queries"] = queries
    report["common_words"] = await asyncio.to_thread(common_word_matches, url, t.org_id, ranks, common)
    found = []
    with phase("typo recall", len(all_typos)) as advance:
        for case in all_typos:
            res = await s.search(who, case.typed + " ", mode="text")
            found.append(case.target in [h.id for h in res.hits])
            advance()
    cases = list(zip(all_typos, found, strict=True))
    report["typo"] = {"recall": sum(found) / len(found), "queries": len(found),
                      "recall_timed": sum(found[:k]) / k, "timed": k, **typo_counts,
                      "by_op": {op: {"n": sum(1 for c, _ in cases if c.op == op),
                                     "found": sum(f for c, f in cases if c.op == op)}
                                for op in ("substitution", "deletion", "insertion", "swap")},
                      "missed": [{"word": c.word, "typed": c.typed, "op": c.op, "rank": c.rank}
                                 for c, f in cases if not f][:20]}
    report["degraded"] = len(degraded)
    await recalls(url, svc, t, corpus, subset, semantic, hits_of, scale, report)
    await embedder_speed(svc, semantic, report)
    await explain(url, svc, who, {
        "two_word": (two[0], {"mode": "text"}), "common": (common[0], {"mode": "text"}),
        "typo": (typos[0].typed + " ", {"mode": "text"}), "prefix": (prefixes[0], {"mode": "text"}),
        "semantic": (semantic[0], {"mode": "semantic"}),
        "semantic_type": (semantic[0], {"mode": "semantic", "filters": t07}),
        "hybrid": (two[0], {"mode": "hybrid"}),
        "facets": (common[0], {"mode": "text", "facets": ("type", "module", "project", "tag")}),
        "data_filter": (two[0], {"mode": "text", "filters": done})}, report)
    report["search_exact_below"] = s.exact_below
    report["rls_check"] = await asyncio.to_thread(rls_check, url, t.org_id, two[0].split(), typos[0].typed)


async def recalls(url: str, svc: Services, t: Tenant, corpus: Corpus, subset: np.ndarray, semantic: list[str],
                  hits_of: dict[tuple[str, str], list[UUID]], scale: Scale, report: dict[str, Any]) -> None:
    """HNSW recall@20 against an exact scan, in plain SQL with the stored vectors of real-embedded
    entities as queries; then the API's semantic answers (without and with the type filter)
    against the exact answers for the same query vectors."""
    rng = random.Random(13)
    ef = svc.search.ef_search
    picks = [corpus.id(int(i)) for i in rng.sample(subset.tolist(), min(scale.recall_queries, len(subset)))]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"SET hnsw.ef_search = {int(ef)}")
        rows = await (await conn.execute(
            "SELECT embedding::text FROM search_vectors WHERE org_id = %s AND model = %s"
            " AND entity_id = ANY(%s)", (t.org_id, MODEL, picks))).fetchall()
        queries = [r[0] for r in rows]
        plans = {}
        for name, index in (("index", True), ("exact", False)):
            order = "embedding::halfvec(384) <=> %(q)s::halfvec(384)"
            cur = await conn.execute(
                "EXPLAIN (COSTS OFF) SELECT entity_id FROM search_vectors WHERE org_id = %(org)s"
                f" AND model = %(model)s ORDER BY {order if index else '(' + order + ') + 0'} LIMIT 20",
                {"org": t.org_id, "model": MODEL, "q": queries[0]})
            plans[name] = "\n".join(r[0] for r in await cur.fetchall())
        approx, exact = [], []
        with phase("HNSW recall@20 (index vs exact scan)", len(queries)) as advance:
            for q in queries:
                approx.append(await nearest_ids(conn, t.org_id, q, index=True))
                exact.append(await nearest_ids(conn, t.org_id, q))
                advance()
        api: dict[str, float] = {}
        texts = semantic[:scale.recall_queries]
        vectors = await svc.models.configured.embed(texts)  # as the engine embeds a query
        for key, type_ in (("all", None), ("t07", "t07")):
            truth = []
            with phase(f"API semantic recall@20 ({key})", len(texts)) as advance:
                for v in vectors:
                    truth.append(await nearest_ids(conn, t.org_id, vector_text(v), type_))
                    advance()
            api[key] = recall([hits_of[(key, q)] for q in texts], truth)
    report["recall"] = {"hnsw_at_20": recall(approx, exact), "queries": len(queries), "ef_search": ef,
                        "api_semantic_at_20": api["all"], "api_semantic_t07_at_20": api["t07"],
                        "api_queries": len(texts), "plans": plans}


async def embedder_speed(svc: Services, texts: list[str], report: dict[str, Any]) -> None:
    """The local model alone: one short query at a time, and short texts in one batch."""
    emb = svc.models.configured
    ms = []
    for q in texts[:50]:
        t0 = time.perf_counter()
        await emb.embed([q])
        ms.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    await emb.embed(texts, timeout=600)
    report["embedder"] = {"single_query_median_ms": statistics.median(ms), "single_query_max_ms": max(ms),
                          "short_texts_per_s": len(texts) / (time.perf_counter() - t0),
                          "documents_per_s": report["load"]["embed_texts_per_s"]}


async def explain(url: str, svc: Services, who: Principal, cases: dict[str, tuple[str, dict[str, Any]]],
                  report: dict[str, Any]) -> None:
    """One query of each kind through a Search whose connections log every plan (auto_explain)."""
    out: dict[str, Any] = {}
    try:
        async with ExplainingDatabase(url, min_size=1, max_size=1, statement_timeout_ms=600_000) as edb:
            s = svc.search
            search = Search(edb, svc.models, rank_cutoff=s.rank_cutoff, facet_cap=s.facet_cap,
                            exact_below=s.exact_below, ef_search=s.ef_search, embed_timeout=s.embed_timeout)
            for name, (text, kw) in cases.items():
                await search.search(who, text, **kw)  # warm
                edb.plans.clear()
                await search.search(who, text, **kw)
                out[name] = {"query": text, **plan_summary(edb.plans), "plans": list(edb.plans)}
    except Exception as exc:  # auto_explain needs a superuser login: not every --database-url has one
        report["explain_error"] = f"{type(exc).__name__}: {exc}"
    report["explain"] = out


_SCAN = re.compile(r"(Seq Scan on \w+|Bitmap Index Scan on \w+|Index (?:Only )?Scan using \w+)")


def rls_check(url: str, org: UUID, words: list[str], typed: str) -> dict[str, Any]:
    """The text match and the trigram lookup as the engine's role (row-level security on) and as
    the superuser (off): PostgreSQL uses an index for an operator under RLS only if it is leakproof."""
    match = ("SELECT s.entity_id FROM search_docs s WHERE s.org_id = %(org)s"
             " AND s.tsv @@ to_tsquery('english', %(q)s) LIMIT 2000")
    lookup = ("SELECT term FROM search_terms WHERE org_id = %(org)s AND term %% %(w)s"
              " ORDER BY similarity(term, %(w)s) DESC LIMIT 100")
    params = {"org": org, "q": " & ".join(f"({w})" for w in words), "w": typed}
    out: dict[str, Any] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        out["leakproof"] = dict(conn.execute("SELECT proname, proleakproof FROM pg_proc"
                                             " WHERE proname IN ('ts_match_vq', 'similarity_op')").fetchall())
        for role in ("app", "superuser"):
            for name, sql in (("match", match), ("trigram", lookup)):
                with conn.transaction():
                    if role == "app":
                        conn.execute("SET LOCAL ROLE canvasdb_app")
                    conn.execute("SELECT set_config('canvasdb.org_id', %s, true),"
                                 " set_config('pg_trgm.similarity_threshold', '0.25', true)", (str(org),))
                    rows = conn.execute("EXPLAIN (ANALYZE) " + sql, params).fetchall()
                    plan = "\n".join(r[0] for r in rows)
                    ms = []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        conn.execute(sql, params).fetchall()
                        ms.append((time.perf_counter() - t0) * 1000)
                out[f"{name}_{role}"] = {"ms": statistics.median(ms), "scans": _SCAN.findall(plan)}
    out["query"], out["typed"] = params["q"], typed
    return out


def index_checks(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Per query kind: (kind, index, used?) for the indexes its plans should use. Text buckets
    and counts run inside SECURITY DEFINER functions, whose own plans are not logged: the GIN
    indexes are checked by the row-level security check instead."""
    out = []
    hnsw_expected = report["data"]["entities"] >= report["search_exact_below"]
    for q, ex in report["explain"].items():
        labels = {label for label, _ in ex["statements"]}
        want = []
        if "typo lookup" in labels:
            want.append("search_terms")  # its key for one-typo variants, trigrams for longer words
        if "nearest" in labels and hnsw_expected:
            want.append("search_vectors_hnsw")
        out += [(q, w, any(i.startswith(w) for i in ex["indexes"])) for w in want]
    return out


async def write_cost(svc: Services, t: Tenant, corpus: Corpus, scale: Scale, report: dict[str, Any]) -> None:
    """svc.entities.patch of a title: type with text fields (the search trigger's work) against a
    type without (same data shape), interleaved one for one."""
    await svc.types.register(t.who, EntityType(name="plain", module="m0"))
    rng = random.Random(17)
    cdf = zipf_cdf(VOCAB)

    def data() -> dict[str, Any]:
        ranks = draw(cdf, np.array([rng.random() for _ in range(45)])).tolist()
        return {"title": " ".join(corpus.words[r] for r in ranks[:5]),
                "body": " ".join(corpus.words[r] for r in ranks[5:]), "tags": ["tag01"], "status": "todo"}

    plain = []
    with phase(f"create {scale.writes} entities of type plain", scale.writes) as advance:
        for _ in range(scale.writes):
            plain.append((await svc.entities.create(t.who, t.project_id, "plain", data())).id)
            advance()
    texty = [corpus.id(i) for i in rng.sample(range(corpus.n), scale.writes)]
    ms: dict[str, list[float]] = {"text_fields": [], "no_text_fields": []}
    with phase("patch titles: text type vs plain, interleaved", 2 * scale.writes) as advance:
        for a, b in zip(texty, plain, strict=True):
            for key, id in (("text_fields", a), ("no_text_fields", b)):
                title = data()["title"]
                t0 = time.perf_counter()
                await svc.entities.patch(t.who, id, {"title": title})
                ms[key].append((time.perf_counter() - t0) * 1000)
                advance()
    report["writes"] = {k: stats(v, []) for k, v in ms.items()}


# --- the report -------------------------------------------------------------------------------------


def targets(report: dict[str, Any], scale: Scale) -> list[dict[str, Any]]:
    note = "" if scale.name == "full" else " (set for N = 1,000,000)"
    out = []
    for q, name in NAMES.items():
        if q in TARGETED:
            p95 = report["queries"][q]["p95_ms"]
            out.append({"name": f"{name} p95", "value": p95, "unit": "ms",
                        "target": f"< {TARGET_P95_MS:g} ms{note}", "pass": p95 < TARGET_P95_MS})
    typo = report["typo"]["recall"]
    out.append({"name": "typo recall (target in top 20)", "value": typo * 100, "unit": "%",
                "target": f">= {TARGET_TYPO_RECALL:.0%}", "pass": typo >= TARGET_TYPO_RECALL})
    hnsw = report["recall"]["hnsw_at_20"]
    out.append({"name": "HNSW recall@20 vs exact", "value": hnsw, "unit": "",
                "target": f">= {TARGET_HNSW_RECALL:g}", "pass": hnsw >= TARGET_HNSW_RECALL})
    if scale.name == "full":
        build = report["load"]["seconds"]["hnsw_build"]
        out.append({"name": f"HNSW build, {report['data']['entities']:,} vectors", "value": build / 60,
                    "unit": "min", "target": f"< {TARGET_HNSW_BUILD_S / 60:g} min",
                    "pass": build < TARGET_HNSW_BUILD_S})
    ratio = report["sizes"]["text_index_ratio"]
    out.append({"name": "text index (search_docs table + its GIN indexes) / raw text", "value": ratio,
                "unit": "x", "target": f"< {TARGET_TEXT_RATIO:g}x", "pass": ratio < TARGET_TEXT_RATIO})
    return out


def notes(report: dict[str, Any], scale: Scale) -> list[str]:
    out = [f"Typo rule: the target is a random entity; the word is one of its title's words of frequency "
           f"rank >= {TYPO_MIN_RANK:,} and >= {TYPO_MIN_LETTERS} letters; one typo not on the first letter "
           "(substitution, deletion (words of 6+ letters, so 5 are left), insertion, adjacent swap; a typo "
           "whose English stem is a vocabulary word is redrawn); kept only if the word spelled right (with a "
           "trailing space) has the target in its top 20. Of "
           f"{report['typo']['candidates']:,} candidates, {report['typo']['typed_is_a_word']:,} were real "
           f"words and {report['typo']['not_findable_spelled_right']:,} were not findable spelled right.",
           "Text queries end with a space (whole words, no prefix), except the 3-letter prefixes; typo "
           "tolerance is on (the API's default) for all of them. Semantic and hybrid times include "
           "embedding the query with the local model.",
           "Bulk-loaded entities have no entity_versions rows (search does not read them); projects are "
           "inserted by SQL."]
    cw = report["common_words"]
    out.append(f"Common words: {cw['words']} words of frequency ranks {cw['ranks'][0]}-{cw['ranks'][1]}, "
               f"matching {cw['matches_min']:,} to {cw['matches_max']:,} entities "
               f"(median {cw['matches_median']:,.0f}).")
    if scale.name != "full":
        out.append(f"The HNSW build target (< 8 min for 1,000,000 vectors) is judged at full scale only; "
                   f"here {report['data']['entities']:,} vectors took "
                   f"{report['load']['seconds']['hnsw_build']:.1f} s.")
    if report["data"]["entities"] < 10_000:
        out.append("Fewer than 10,000 vectors: the engine searches them exactly (search_exact_below), so the "
                   "semantic queries do not use HNSW at this scale.")
    if report["sizes"]["md5_mismatches"]:
        out.append(f"{report['sizes']['md5_mismatches']} vectors' embed_md5 differ from search_docs'.")
    if report["degraded"]:
        out.append(f"{report['degraded']} answers were degraded (no query vector in time).")
    return out


def benchmark(url: str, scale: Scale, workdir: Path, started: float) -> dict[str, Any]:
    report: dict[str, Any] = {"run": uuid4().hex[:6],
                              "started": datetime.now(UTC).isoformat(timespec="seconds"),
                              "scale": asdict(scale),
                              "machine": machine_facts(url, ("work_mem", "maintenance_work_mem",
                                                             "max_parallel_maintenance_workers"),
                                                       {"numpy": np.__version__})}
    asyncio.run(run_async(url, scale, report, workdir))
    report["targets"] = targets(report, scale)
    report["notes"] = notes(report, scale)
    report["load_avg_at_end"] = os.getloadavg()
    report["total_seconds"] = time.perf_counter() - started
    return report


NAMES = {"two_word": "two-word text", "common": "one common word (10k-100k matches)", "typo": "one-typo word",
         "prefix": "3-letter prefix", "semantic": "semantic top 20",
         "semantic_type": "semantic top 20, type t07", "hybrid": "hybrid, two words",
         "facets": "facets on a common word", "data_filter": "two-word text, data.status=done (no target)"}
TARGETED = ("two_word", "common", "typo", "prefix", "semantic", "semantic_type", "hybrid", "facets")
PHASES = {"vocabulary": "vocabulary (stems checked in PostgreSQL)",
          "copy_entities": "generate + COPY entities",
          "search_docs_insert": "INSERT search_docs (2 connections)",
          "gin_build": "GIN index search_docs_tsv",
          "titles_gin_build": "GIN index search_docs_title_shards",
          "search_terms_fill": "search_terms from search_words",
          "trigram_build": "trigram index search_terms_trgm",
          "embed_real": "embed the real subset (local model)",
          "copy_vectors": "synthetic vectors + COPY",
          "hnsw_build": "HNSW index (model_index, concurrently)",
          "vacuum_analyze": "VACUUM ANALYZE"}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_report(report: dict[str, Any], console: Console) -> None:
    m, d, ld, sz = report["machine"], report["data"], report["load"], report["sizes"]
    console.print(f"[bold]canvasdb search benchmark[/] run {report['run']} at {report['started']}, "
                  f"canvasdb {m['canvasdb_revision']}", highlight=False)
    console.print(f"Data: scale {report['scale']['name']}: {d['entities']:,} entities in {d['projects']:,} "
                  f"projects, {d['types']} types, {d['tags']} tags; "
                  f"{d['title_words'] + d['body_words']:,} words from a {d['vocabulary']:,}-word Zipf "
                  f"vocabulary; raw text {mib(sz['raw_text'])}; vectors "
                  f"{d['real_vectors']:,} real ({MODEL}) + {d['synthetic_vectors']:,} synthetic. Machine: "
                  f"{m['cpu_count']} CPUs, {m['ram_gib']} GiB, load average at start "
                  f"{', '.join(f'{x:.2f}' for x in m['load_avg_at_start'])}; PostgreSQL {m['postgresql']}.",
                  highlight=False)
    load = Table(title="Load", title_justify="left")
    load.add_column("phase")
    load.add_column("seconds", justify="right")
    for key, name in PHASES.items():
        extra = ""
        if key == "embed_real":
            extra = f" ({ld['embed_texts_per_s']:,.0f} texts/s)"
        if key in ("copy_entities", "copy_vectors", "search_docs_insert"):
            extra = f" ({d['entities'] / ld['seconds'][key]:,.0f} rows/s)"
        load.add_row(name, f"{ld['seconds'][key]:,.1f}{extra}")
    load.add_row("total", f"{sum(ld['seconds'].values()):,.1f}")
    console.print(load)
    size = Table(title="Sizes", title_justify="left")
    size.add_column("what")
    size.add_column("size", justify="right")
    for name, value in (
            ("raw text (title + body)", mib(sz["raw_text"])),
            ("entities (table + indexes)", mib(sz["entities_total"])),
            ("search_docs table (heap + TOAST)", mib(sz["search_docs_table"])),
            ("  of which tsvectors (sum of pg_column_size)", mib(sz["tsv_column"])),
            ("search_docs_tsv GIN index", f"{mib(sz['search_docs_tsv_gin'])} ({sz['gin_ratio']:.2f}x raw)"),
            ("search_docs_title_shards GIN index", mib(sz["search_docs_titles_gin"])),
            ("search_docs, all (table + GIN + pkey + recent)", mib(sz["search_docs_total"])),
            ("search_terms, all", f"{mib(sz['search_terms_total'])} ({sz['terms']:,} terms; trigram index "
                                  f"{mib(sz['search_terms_trgm'])})"),
            ("text index / raw text: search_docs table + GIN indexes (target)",
             f"{sz['text_index_ratio']:.2f}x"),
            ("  tsvectors + GIN only", f"{sz['tsv_and_gin_ratio']:.2f}x"),
            ("  search_docs + search_terms, every index", f"{sz['all_text_ratio']:.2f}x"),
            ("search_vectors table", mib(sz["search_vectors_table"])),
            ("HNSW index", mib(sz["hnsw_index"]) + " (reference: 1.95 GB at 1M, built in ~16 min)")):
        size.add_row(name, value)
    console.print(size)
    table = Table(title="Queries (warm, through svc.search.search as an org admin)", title_justify="left")
    plans = "indexes in the plans"
    for col in ("query", "median / p95 ms", "reference PG18 1M", "matches (median, max)", plans):
        table.add_column(col, justify="left" if col in ("query", plans) else "right")
    for q, name in NAMES.items():
        r, ex = report["queries"][q], report["explain"].get(q, {})
        used = ", ".join(ex.get("indexes", []))
        if ex.get("seq_scans"):
            used += "; seq scan: " + ", ".join(ex["seq_scans"])
        table.add_row(name, f"{r['median_ms']:,.2f} / {r['p95_ms']:,.2f}", REFERENCE[q],
                      f"{r['answers_median']:,.0f}, {r['answers_max']:,}", used)
    console.print(table)
    rc, ty, em, wr = report["recall"], report["typo"], report["embedder"], report["writes"]
    ops = ", ".join(f"{op} {v['found']}/{v['n']}" for op, v in ty["by_op"].items())
    missed = ", ".join(f"{m['word']}->{m['typed']} ({m['op']})" for m in ty["missed"][:8])
    console.print(f"Typo recall: {ty['recall']:.1%} of {ty['queries']} ({ops}; the {ty['timed']} timed "
                  f"queries: {ty['recall_timed']:.1%})"
                  + (f"; missed: {missed}." if missed else "."), highlight=False)
    console.print(f"HNSW recall@20 vs exact scan: {rc['hnsw_at_20']:.4f} over {rc['queries']} real vectors "
                  f"(ef_search {rc['ef_search']}); the API's semantic top 20 vs exact: "
                  f"{rc['api_semantic_at_20']:.4f}, with type t07: {rc['api_semantic_t07_at_20']:.4f} "
                  f"({rc['api_queries']} queries).", highlight=False)
    console.print(f"Embedder ({MODEL}, local, numpy): {em['documents_per_s']:,.1f} documents/s (title + "
                  f"body, batches of 256), {em['short_texts_per_s']:,.0f} titles/s in one batch, one query "
                  f"{em['single_query_median_ms']:.1f} ms median ({em['single_query_max_ms']:.1f} max).",
                  highlight=False)
    a, b = wr["text_fields"], wr["no_text_fields"]
    console.print(f"Write path, svc.entities.patch of a title ({a['n']} each, interleaved): type with text "
                  f"fields {a['median_ms']:.2f} / {a['p95_ms']:.2f} ms median / p95, type without "
                  f"{b['median_ms']:.2f} / {b['p95_ms']:.2f} ms: indexing adds "
                  f"{a['median_ms'] - b['median_ms']:.2f} ms at the median.", highlight=False)
    if report["explain"]:
        console.print("Where one query's time goes in PostgreSQL (auto_explain with ANALYZE, ms per "
                      "statement):", highlight=False)
        for q, ex in report["explain"].items():
            steps = ", ".join(f"{label} {ms:.1f}" for label, ms in ex["statements"])
            console.print(f"  {NAMES[q].split(' (')[0]}: {steps}", highlight=False)
        checks = index_checks(report)
        parts = []
        for index in dict.fromkeys(i for _, i, _ in checks):
            kinds = [(q, used) for q, i, used in checks if i == index]
            unused = [q for q, used in kinds if not used]
            parts.append(f"{index} used by {len(kinds) - len(unused)} of the {len(kinds)} query kinds that "
                         "should" + (f" (NOT by: {', '.join(unused)})" if unused else ""))
        console.print(f"EXPLAIN check: {'; '.join(parts)}.", highlight=False)
    else:
        console.print(f"No plans: {report.get('explain_error')}", highlight=False)
    rls = report["rls_check"]
    for name, what in (("match", f"tsv @@ '{rls['query']}'"), ("trigram", f"term % '{rls['typed']}'")):
        app, su = rls[f"{name}_app"], rls[f"{name}_superuser"]
        console.print(f"Row-level security and indexes, {what}: as canvasdb_app (RLS) {app['ms']:.2f} ms "
                      f"({', '.join(app['scans'])}); as the superuser (no RLS) {su['ms']:.2f} ms "
                      f"({', '.join(su['scans'])}). Leakproof: "
                      f"{', '.join(f'{k} {v}' for k, v in rls['leakproof'].items())}.", highlight=False)
    print_targets(console, report)
    print_footer(console, report)


def main() -> int:
    return run(__doc__, SCALES, benchmark, print_report, prepare=prepare_schema,
               prefix="canvasdb-bench-search-")


if __name__ == "__main__":
    sys.exit(main())
