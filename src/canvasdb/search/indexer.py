"""The slow half of indexing, done by workers: the term dictionary and the embeddings.

A write computes the entity's full-text vector in its own transaction and, when its
words or its meaning may have changed, leaves a row in ``search_queue``. ``drain``
empties an org's queue: first the words, which go into the org's term dictionary
(typo corrections), then the vectors, made in batches by the configured embedder. A
vector is stored only if the entity's text is still the one that was embedded;
otherwise the newer change stays queued. If the embedder fails, the rows stay queued
and the job is retried later; if it fails a batch but not each of its entities alone, those
it fails wait at the back of the queue, so that one text it refuses holds back no other.
``backfill`` walks every entity when a new model is building, then builds the model's index
(concurrently: writes go on meanwhile) and makes it the active one (unless another model
was made active first: then its build stops);
the texts it fails alone are left to the queue in the same way, so that they hold back no build.
A vector is stored (and its entity taken off the queue) only while its model is active or
building, checked in the store's transaction under the lock the switch takes: a drain of a
process still configured with a model that was retired meanwhile stops, and leaves the queue
to the processes of the active model.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any
from uuid import UUID

from canvasdb import metrics
from canvasdb.db import Database
from canvasdb.search.embedders import EmbedderUnavailable
from canvasdb.search.models import ModelInfo, ModelRetired, Models

log = logging.getLogger("canvasdb.search")
TERMS_BATCH = 500
EMBED_BATCH = 64
DRAIN_SECONDS = 60.0  # the longest one drain() works; what is left stays queued for the next


class Indexer:
    def __init__(self, db: Database, models: Models) -> None:
        self.db = db
        self.models = models

    async def drain(self, org_id: UUID) -> dict[str, int]:
        """Empty the org's queue (or work for ``DRAIN_SECONDS``); returns what was done.

        Raises ``EmbedderUnavailable`` when the embedder fails: what is left stays queued. Embeds
        nothing once the configured model is retired (another one is active): what is queued is
        left to the processes configured with the active model.
        """
        done = {"terms": 0, "embedded": 0}
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline:
            n = await self._terms(org_id)
            done["terms"] += n
            if n < TERMS_BATCH:
                break
        model = await self.models.register()
        try:
            while model.state != "retired" and time.monotonic() < deadline:
                n = await self._embed_queued(org_id, model)
                done["embedded"] += n
                if n < EMBED_BATCH:
                    break
        except ModelRetired:
            log.warning("embedding model %s, which this process is configured with, was retired: it"
                        " embeds nothing more, and leaves the queue to the processes of the active model",
                        model.model)
        finally:
            await self.report_backlog(org_id)
        return done

    async def _terms(self, org_id: UUID) -> int:
        async with self.db.transaction(org_id) as conn:
            cur = await conn.execute(
                "WITH b AS (SELECT entity_id FROM search_queue WHERE org_id = %(org)s AND needs_terms"
                "           LIMIT %(n)s FOR UPDATE SKIP LOCKED),"
                " w AS (INSERT INTO search_terms (org_id, term)"
                "       SELECT DISTINCT %(org)s::uuid, w FROM b"
                "       JOIN entities e ON e.org_id = %(org)s AND e.id = b.entity_id"
                "       JOIN entity_types t ON t.org_id = e.org_id AND t.name = e.type,"
                "       LATERAL unnest(search_words(e.data, t.text_fields)) AS w"
                "       ORDER BY 2 ON CONFLICT DO NOTHING),"
                " u AS (UPDATE search_queue q SET needs_terms = false FROM b"
                "       WHERE q.org_id = %(org)s AND q.entity_id = b.entity_id)"
                " SELECT count(*) AS n FROM b", {"org": org_id, "n": TERMS_BATCH})
            row = await cur.fetchone()
            await conn.execute("DELETE FROM search_queue WHERE org_id = %s AND NOT needs_terms"
                               " AND embed_md5 IS NULL", (org_id,))
        return row["n"] if row else 0

    async def _embed_queued(self, org_id: UUID, model: ModelInfo) -> int:
        """Embed one batch of queued entities with the configured model."""
        async with self.db.transaction(org_id) as conn:
            cur = await conn.execute(
                "SELECT q.entity_id, q.embed_md5, s.project_id, s.type,"
                "       search_embed_text(e.data, t.text_fields, t.embed_fields) AS text"
                " FROM search_queue q"
                " JOIN search_docs s ON s.org_id = q.org_id AND s.entity_id = q.entity_id"
                " JOIN entities e ON e.org_id = q.org_id AND e.id = q.entity_id"
                " JOIN entity_types t ON t.org_id = e.org_id AND t.name = e.type"
                " WHERE q.org_id = %s AND q.embed_md5 IS NOT NULL ORDER BY q.queued_at LIMIT %s",
                (org_id, EMBED_BATCH))
            rows = await cur.fetchall()
        if not rows:
            return 0
        await self._store_each_if_need_be(org_id, model, rows, clear_queue=True)
        return len(rows)

    async def _store_each_if_need_be(self, org_id: UUID, model: ModelInfo, rows: list[dict[str, Any]], *,
                                     clear_queue: bool) -> int:
        """Embed and store ``rows`` in one batch, or one at a time if the embedder fails the batch;
        returns how many were stored."""
        try:
            await self._store(org_id, model, rows, clear_queue=clear_queue)
        except EmbedderUnavailable:
            if len(rows) == 1:
                await self._to_back_of_queue(org_id, [rows[0]["entity_id"]])
                raise
            return await self._one_by_one(org_id, model, rows, clear_queue=clear_queue)
        return len(rows)

    async def _one_by_one(self, org_id: UUID, model: ModelInfo, rows: list[dict[str, Any]], *,
                          clear_queue: bool) -> int:
        """A batch the embedder failed, embedded one entity at a time: a text it refuses (too long
        for a service's limit, say) must not hold back the org's queue, or a new model's build,
        for ever. Those it fails go to the back of the queue. Two failures before any success
        say it is down: then the error is raised (they went to the back too, in case it was
        them). Returns how many were stored.

        ``ModelRetired`` (the model was retired by another's activation, one row's store apart)
        is raised as it comes, those that failed left where they were: the queue is now the
        active model's, whose embedder did not fail them (for a build's walk, they were not
        queued at all: the retired model's build has stopped, and the active model holds their
        vectors, or the activation queued them)."""
        failed: list[UUID] = []
        stored = 0
        error: EmbedderUnavailable | None = None
        for row in rows:
            try:
                await self._store(org_id, model, [row], clear_queue=clear_queue)
                stored += 1
            except EmbedderUnavailable as exc:
                failed.append(row["entity_id"])
                error = exc
                if not stored and len(failed) == 2:
                    break
        await self._to_back_of_queue(org_id, failed)
        if not stored and error is not None:
            raise error
        if failed:
            log.warning("the embedder failed %d of %d entities of org %s alone (%s); they wait at the back"
                        " of the queue: %s", len(failed), len(rows), org_id, error,
                        ", ".join(str(entity) for entity in failed))
        return stored

    async def _to_back_of_queue(self, org_id: UUID, entity_ids: list[UUID]) -> None:
        """Queue these entities' texts for embedding (a new model's build leaves them to the queue)
        behind everything queued so far. A text queued already stays queued as it is: it may be one
        a write just made, newer than the text that failed. (``search_queue_texts``, migration 0036:
        the activation of a new model queues with it too, leaving queued texts in their place.)"""
        if not entity_ids:
            return
        async with self.db.transaction(org_id) as conn:
            await conn.execute("SELECT search_queue_texts(%s, %s, true)", (org_id, entity_ids))

    async def _store(self, org_id: UUID, model: ModelInfo, rows: list[dict[str, Any]], *,
                     clear_queue: bool) -> None:
        vectors = await self.models.configured.embed([row["text"] for row in rows])
        started = time.monotonic()
        async with self.db.transaction(org_id) as conn:
            # Only while the model is active or building, until the commit: a retired model's vector
            # would take off the queue an entity left there for the active model's. (First: holding
            # a search row while waiting for a switch that waits for a write waiting for that row
            # would deadlock.)
            await self.models.hold_switch(conn, model)
            # Only where the entity's text is still the one embedded (the md5 matches), its search
            # row locked (in id order, as writes lock them): a write under way is waited for and
            # then seen, and one that follows waits for this transaction, then deletes what is stale.
            await conn.execute("SELECT FROM search_docs WHERE org_id = %s AND entity_id = ANY(%s)"
                               " ORDER BY entity_id FOR SHARE", (org_id, [r["entity_id"] for r in rows]))
            await conn.execute(
                "INSERT INTO search_vectors"
                " (org_id, model, entity_id, project_id, type, embed_md5, embedding)"
                " SELECT %(org)s, %(model)s, x.id, x.project, x.type, x.md5, x.v::halfvec"
                " FROM unnest(%(ids)s::uuid[], %(projects)s::uuid[], %(types)s::text[], %(md5s)s::uuid[],"
                "             %(vectors)s::text[]) AS x(id, project, type, md5, v)"
                " JOIN search_docs s ON s.org_id = %(org)s AND s.entity_id = x.id AND s.embed_md5 = x.md5"
                " ON CONFLICT (org_id, model, entity_id) DO UPDATE SET embed_md5 = EXCLUDED.embed_md5,"
                "   embedding = EXCLUDED.embedding, embedded_at = EXCLUDED.embedded_at",
                {"org": org_id, "model": model.model, "ids": [r["entity_id"] for r in rows],
                 "projects": [r["project_id"] for r in rows], "types": [r["type"] for r in rows],
                 "md5s": [r["embed_md5"] for r in rows],
                 "vectors": ["[" + ",".join(f"{x:.7g}" for x in v) + "]" for v in vectors]})
            if clear_queue:
                await conn.execute(
                    "UPDATE search_queue q SET embed_md5 = NULL"
                    " FROM unnest(%s::uuid[], %s::uuid[]) AS x(id, md5)"
                    " WHERE q.org_id = %s AND q.entity_id = x.id AND q.embed_md5 = x.md5",
                    ([r["entity_id"] for r in rows], [r["embed_md5"] for r in rows], org_id))
                await conn.execute("DELETE FROM search_queue WHERE org_id = %s AND entity_id = ANY(%s)"
                                   " AND NOT needs_terms AND embed_md5 IS NULL",
                                   (org_id, [r["entity_id"] for r in rows]))
        metrics.SEARCH_EMBEDDED.inc(len(rows))
        log.debug("stored %d vectors in %.1f ms", len(rows), (time.monotonic() - started) * 1000)

    async def backlog(self, org_id: UUID) -> dict[str, int]:
        """Queued work of an org: entities waiting for their words and for their vector."""
        async with self.db.transaction(org_id) as conn:
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE needs_terms) AS terms,"
                " count(*) FILTER (WHERE embed_md5 IS NOT NULL) AS embeddings"
                " FROM search_queue WHERE org_id = %s", (org_id,))
            row = await cur.fetchone()
        return {"terms": row["terms"], "embeddings": row["embeddings"]} if row else {}

    async def report_backlog(self, org_id: UUID) -> None:
        """Set the org's backlog gauge, or remove its series once the backlog is empty: a series
        kept for every org ever indexed grew /metrics (and this process) with every tenant."""
        waiting = (await self.backlog(org_id)).get("embeddings", 0)
        if waiting:
            metrics.SEARCH_BACKLOG.labels(org=str(org_id)).set(waiting)
        else:
            with contextlib.suppress(KeyError):  # no series: the org had no backlog
                metrics.SEARCH_BACKLOG.remove(str(org_id))

    async def queued_orgs(self, org_ids: list[UUID]) -> list[UUID]:
        """The orgs among ``org_ids`` with anything queued."""
        out = []
        for org_id in org_ids:
            async with self.db.transaction(org_id) as conn:
                cur = await conn.execute("SELECT EXISTS (SELECT FROM search_queue WHERE org_id = %s) AS any",
                                         (org_id,))
                row = await cur.fetchone()
            if row and row["any"]:
                out.append(org_id)
        return out

    async def backfill(self, org_ids: list[UUID]) -> int:
        """Give every entity a vector of the configured model if it is building, then activate it.

        Walks each org's search rows in id order and embeds those without a current vector
        of that model, but for those waiting in the queue: the queue embeds them with this
        same model. Those the embedder fails alone are left to the queue (``_one_by_one``), so a
        text it always refuses holds back no build; if it seems down, the error is raised and
        the build is retried later. Returns how many were embedded.
        """
        model = await self.models.register()
        if model.state != "building":
            return 0
        total = 0
        try:
            for org_id in org_ids:
                total += await self._embed_all(org_id, model)
            await self.models.activate(model)
        except ModelRetired:
            log.warning("embedding model %s was retired before its build finished (another model was made"
                        " active, or another chosen): its build stops", model.model)
            return total
        await self.drop_retired(org_ids)
        log.info("embedding model %s is active (%d vectors made)", model.model, total)
        return total

    async def _embed_all(self, org_id: UUID, model: ModelInfo) -> int:
        """The backfill's walk of one org's search rows; returns how many were embedded."""
        total = 0
        after = UUID(int=0)
        while True:
            async with self.db.transaction(org_id) as conn:
                cur = await conn.execute(
                    "SELECT s.entity_id, s.embed_md5, s.project_id, s.type,"
                    "       search_embed_text(e.data, t.text_fields, t.embed_fields) AS text,"
                    "       v.embed_md5 AS embedded_md5, q.embed_md5 AS queued_md5"
                    " FROM (SELECT * FROM search_docs WHERE org_id = %(org)s AND entity_id > %(after)s"
                    "       AND embed_md5 IS NOT NULL ORDER BY entity_id LIMIT %(n)s) s"
                    " JOIN entities e ON e.org_id = s.org_id AND e.id = s.entity_id"
                    " JOIN entity_types t ON t.org_id = e.org_id AND t.name = e.type"
                    " LEFT JOIN search_vectors v ON v.org_id = s.org_id AND v.model = %(model)s"
                    "      AND v.entity_id = s.entity_id"
                    " LEFT JOIN search_queue q ON q.org_id = s.org_id AND q.entity_id = s.entity_id"
                    " ORDER BY s.entity_id", {"org": org_id, "after": after, "n": EMBED_BATCH * 4,
                                              "model": model.model})
                rows = await cur.fetchall()
            if not rows:
                return total
            after = rows[-1]["entity_id"]
            todo = [r for r in rows if r["embed_md5"] not in (r["embedded_md5"], r["queued_md5"])]
            if todo:
                total += await self._store_each_if_need_be(org_id, model, todo, clear_queue=False)

    async def drop_retired(self, org_ids: list[UUID]) -> None:
        """Delete the vectors of the retired models (no query uses them), then drop their indexes."""
        retired = [info.model for info in await self.models.registered() if info.state == "retired"]
        if not retired:
            return
        for org_id in org_ids:
            async with self.db.transaction(org_id) as conn:
                await conn.execute("DELETE FROM search_vectors WHERE org_id = %s AND model = ANY(%s)",
                                   (org_id, retired))
        for model in retired:
            await self.models.indexes.drop(model)
