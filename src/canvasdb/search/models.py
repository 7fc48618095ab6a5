"""Which embedding model search uses, and the switch to a newly configured one.

Every vector is stored with the name of the model that made it, and a query must be
embedded by that same model. The active model is the one queries use. When the
settings name a model the registry has never seen, it is registered as ``building``;
workers then embed every entity with it in the background. Meanwhile, search keeps using
the old vectors, embedding queries with the old model (rebuilt from its stored kind and
url). Once every org is covered and its HNSW index is built (without holding up writes,
see ``model_index``), the new model becomes active, and every other model (the old one,
and any other being built) is retired; their vectors and indexes are dropped. Each store
of vectors and the switch take turns on the registry (``hold_switch``): a process still
configured with a retired model stores nothing, and leaves what is queued to the
processes of the active one.

A retired model stays retired when a process configured with it registers it (one started
again with old settings, or the loser of two builds): brought back to ``building`` by that
alone, its build would switch back, and the processes of the other model would then
switch forward again. Switching back is an operator's decision: ``use`` (the CLI's
``canvasdb embedder use MODEL``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime

from canvasdb.db import Connection, Database
from canvasdb.errors import NotFound, Unavailable
from canvasdb.search.embedders import Embedder, make_embedder
from canvasdb.search.model_index import ModelIndexes

log = logging.getLogger("canvasdb.search")
_ACTIVE_TTL = 5.0  # seconds a process trusts its idea of the active model
# The activation's first pass over every org's search rows runs outside the registry's lock: it may
# take minutes on a large deployment, far past a request's statement timeout; this bounds a runaway.
QUEUE_PASS_TIMEOUT_MS = 30 * 60 * 1000
# Changes of the registry, one at a time; a store of vectors (``hold_switch``, SHARE) waits for them
_CHANGES_ALONE = "LOCK TABLE search_models IN SHARE ROW EXCLUSIVE MODE"


class ModelRetired(Exception):
    """The model a process embeds with was retired by another's activation: no query would use
    its vectors, and only a vector of the active model may take an entity off the queue."""


@dataclass(frozen=True)
class ModelInfo:
    model: str
    kind: str
    url: str | None
    dimension: int
    state: str


class Models:
    """The configured embedder, the registry of models, and embedders for older ones."""

    def __init__(self, db: Database, configured: Embedder, *, api_key: str | None = None) -> None:
        self.db = db
        self.configured = configured
        self.api_key = api_key
        self._others: dict[str, Embedder] = {}
        self._active: tuple[float, ModelInfo | None] = (0.0, None)
        self._registered: ModelInfo | None = None
        self.indexes = ModelIndexes(db)

    async def active(self) -> ModelInfo | None:
        """The model queries use (None until a first model is registered)."""
        at, info = self._active
        if time.monotonic() - at < _ACTIVE_TTL:
            return info
        row = await self.db.one("SELECT model, kind, url, dimension, state FROM search_models"
                                " WHERE state = 'active'", ())
        info = ModelInfo(**row) if row else None
        self._active = (time.monotonic(), info)
        return info

    def forget(self) -> None:
        """Read the active model again at the next query."""
        self._active = (0.0, None)

    def embedder_for(self, info: ModelInfo) -> Embedder:
        if info.model == self.configured.model:
            return self.configured
        if info.model not in self._others:
            key = self.api_key if info.kind == self.configured.kind else None
            self._others[info.model] = make_embedder(info.kind, info.model, info.url, key)
        return self._others[info.model]

    async def register(self) -> ModelInfo:
        """Record the configured model: active if there is none yet, building if the registry has
        never seen it, else as it is (a retired one stays retired: see the module's docstring).

        A first model, active at once, gets its index here (an empty table's, or nearly:
        quick); a building one gets it from its build (``activate``). While another process
        builds the active model's index, this one stores vectors meanwhile and asks again
        next time. A retired model is looked up again at each call (a plain read), in case
        ``use`` made it building. A remote model's dimension is learnt from one call, so this
        may raise ``EmbedderUnavailable``; workers call it and retry later.
        """
        known = self._registered
        if known is not None and known.state != "retired":
            return known
        if known is not None:
            async with self.db.transaction() as conn:
                if await _state(conn, known.model) == "retired":
                    return known
        dimension = self.configured.dimension
        if dimension is None:
            await self.configured.embed(["dimension probe"])
            dimension = self.configured.dimension
        assert dimension is not None
        url = getattr(self.configured, "url", None)
        async with self.db.transaction() as conn:
            await conn.execute(_CHANGES_ALONE)
            cur = await conn.execute(
                "INSERT INTO search_models (model, kind, url, dimension, state, activated_at)"
                " SELECT %(model)s, %(kind)s, %(url)s, %(dim)s,"
                "        CASE WHEN a.n = 0 THEN 'active' ELSE 'building' END,"
                "        CASE WHEN a.n = 0 THEN now() END"
                " FROM (SELECT count(*) AS n FROM search_models WHERE state = 'active') a"
                " ON CONFLICT (model) DO UPDATE SET kind = EXCLUDED.kind, url = EXCLUDED.url,"
                "   dimension = EXCLUDED.dimension"
                " RETURNING model, kind, url, dimension, state",
                {"model": self.configured.model, "kind": self.configured.kind, "url": url, "dim": dimension})
            row = await cur.fetchone()
            assert row is not None
        info = ModelInfo(**row)
        self.forget()
        if info.state == "retired":
            log.warning("embedding model %s, which this process is configured with, is retired: this"
                        " process embeds nothing, and leaves the queue to the processes of the active model"
                        " (to switch back to it: canvasdb embedder use %s)", info.model, info.model)
        elif info.state == "active" and not await self.indexes.build(info.model, info.dimension):
            return info
        self._registered = info
        return info


    async def registered(self) -> list[ModelInfo]:
        """Every model of the registry: the active one first, then those building, then the retired."""
        rows = await self.db.all("SELECT model, kind, url, dimension, state FROM search_models"
                                  " ORDER BY array_position(ARRAY['active', 'building', 'retired'], state),"
                                  " activated_at DESC NULLS LAST, model", ())
        return [ModelInfo(**row) for row in rows]

    async def use(self, model: str) -> list[str]:
        """The operator's choice of model: a retired one is built again (by the processes configured
        with it, whose build then makes it active), the active one stays; either way, the builds of
        any other model stop (retired, so that none of them takes over instead). Returns the models
        whose build stopped; their vectors and indexes are dropped (``Indexer.drop_retired``)."""
        async with self.db.transaction() as conn:
            await conn.execute(_CHANGES_ALONE)
            cur = await conn.execute("UPDATE search_models SET state = 'building' WHERE model = %s"
                                     " AND state = 'retired' RETURNING model", (model,))
            if await cur.fetchone() is None and await _state(conn, model) is None:
                raise NotFound(f"no embedding model {model} is registered",
                               hint="a process configured with it (CANVASDB_EMBEDDER,"
                                    " CANVASDB_EMBEDDER_MODEL) registers it; canvasdb embedder list"
                                    " shows those registered")
            cur = await conn.execute("UPDATE search_models SET state = 'retired' WHERE state = 'building'"
                                     " AND model <> %s RETURNING model", (model,))
            stopped = [row["model"] for row in await cur.fetchall()]
        self._registered = None
        self.forget()
        return stopped

    async def hold_switch(self, conn: Connection, info: ModelInfo) -> None:
        """Hold off any switch of model until ``conn``'s transaction ends (an activation under way is
        waited for), and raise ``ModelRetired`` if ``info``'s model is retired by then. Vectors stored
        in that transaction are of a model that is active, or building (to become active): an
        activation that follows sees them, or queues their entities (``activate``). Once retired,
        the model is what ``register`` answers in this process, which embeds nothing more."""
        await conn.execute("LOCK TABLE search_models IN SHARE MODE")
        if await _state(conn, info.model) in (None, "retired"):
            self._registered = replace(info, state="retired")
            raise ModelRetired(f"embedding model {info.model} is retired")

    async def activate(self, info: ModelInfo) -> None:
        """Make a fully embedded model the active one, once its index is valid (built here if need
        be), and retire the others, those building too (``Indexer.drop_retired`` drops their vectors
        and indexes): of two builds, the one that finishes first wins, and the other does not take
        over after it. Raises ``ModelRetired`` if the model was retired meanwhile (another won, or
        ``use``).

        Entities left with no vector of it (embedded during its build by a process still
        configured with the old model) are queued, so the queue gives them one: first without
        the lock (a scan of every org, long on a large deployment, with a background job's
        statement timeout), then, under the lock (which every store of vectors waits for), those
        a store of another model took off the queue since that first pass began (migration
        0037). The lock waits for the vectors being stored (``hold_switch``), which see the
        switch once it is made."""
        model = info.model
        if not await self.indexes.build(model, info.dimension):
            raise Unavailable(f"the index of embedding model {model} is being built by another process",
                              retry=True)
        first_pass = await self._stores_under_way_ended()
        async with self.db.transaction() as conn:
            await conn.execute("SELECT set_config('statement_timeout', %s, true)",
                               (str(QUEUE_PASS_TIMEOUT_MS),))
            cur = await conn.execute("SELECT search_queue_unembedded(%s) AS n", (model,))
            queued = await cur.fetchone()
        async with self.db.transaction() as conn:
            await conn.execute(_CHANGES_ALONE)
            state = await _state(conn, model)
            if state in (None, "retired"):
                raise ModelRetired(f"embedding model {model} was retired before its build finished")
            if state == "building":  # (active: another process's build of it got there first)
                await conn.execute("UPDATE search_models SET state = 'retired'"
                                   " WHERE state IN ('active', 'building') AND model <> %s", (model,))
                await conn.execute("UPDATE search_models SET state = 'active', activated_at = now()"
                                   " WHERE model = %s", (model,))
            cur = await conn.execute("SELECT search_queue_unembedded(%s, %s) AS n", (model, first_pass))
            meanwhile = await cur.fetchone()
        self._registered = None
        self.forget()
        n = (queued["n"] if queued else 0) + (meanwhile["n"] if meanwhile else 0)
        if n:
            log.info("%d entities with no vector of embedding model %s are queued for one", n, model)

    async def _stores_under_way_ended(self) -> datetime:
        """The database's time once the stores of vectors under way have ended (the lock waits
        for them, then is let go): any store not seen by a statement that starts after this
        stamps its vectors later (``hold_switch`` is its first statement)."""
        async with self.db.transaction() as conn:
            await conn.execute(_CHANGES_ALONE)
            cur = await conn.execute("SELECT clock_timestamp() AS at")
            row = await cur.fetchone()
        assert row is not None
        return row["at"]

    async def close(self) -> None:
        for embedder in (self.configured, *self._others.values()):
            await embedder.aclose()


async def _state(conn: Connection, model: str) -> str | None:
    """The model's state in the registry (None: never registered)."""
    cur = await conn.execute("SELECT state FROM search_models WHERE model = %s", (model,))
    row = await cur.fetchone()
    return row["state"] if row else None
