"""Which embedding model search uses, and the switch to a newly configured one.

Every vector is stored with the name of the model that made it, and a query must be
embedded by that same model. The active model is the one queries use. When the
settings name another model, it is registered as ``building``; workers then embed
every entity with it in the background. Meanwhile, search keeps using the old
vectors, embedding queries with the old model (rebuilt from its stored kind and url).
Once every org is covered and its HNSW index is built (without holding up writes, see
``model_index``), the new model becomes active, and the old vectors and their index are
dropped. Each store of vectors and the switch take turns on the registry (``hold_switch``):
a process still configured with the old model stores nothing once it is retired, and
leaves what is queued to the processes of the active one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

from canvasdb.db import Connection, Database
from canvasdb.errors import Unavailable
from canvasdb.search.embedders import Embedder, make_embedder
from canvasdb.search.model_index import ModelIndexes

log = logging.getLogger("canvasdb.search")
_ACTIVE_TTL = 5.0  # seconds a process trusts its idea of the active model


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
        """Record the configured model: active if there is none yet, else building.

        A first model, active at once, gets its index here (an empty table's, or nearly:
        quick); a building one gets it from its build (``activate``). While another process
        builds the active model's index, this one stores vectors meanwhile and asks again
        next time. A remote model's dimension is learnt from one call, so this may raise
        ``EmbedderUnavailable``; workers call it and retry later.
        """
        if self._registered is not None:
            return self._registered
        dimension = self.configured.dimension
        if dimension is None:
            await self.configured.embed(["dimension probe"])
            dimension = self.configured.dimension
        assert dimension is not None
        url = getattr(self.configured, "url", None)
        async with self.db.transaction() as conn:
            await conn.execute("LOCK TABLE search_models IN SHARE ROW EXCLUSIVE MODE")
            cur = await conn.execute(
                "INSERT INTO search_models (model, kind, url, dimension, state, activated_at)"
                " SELECT %(model)s, %(kind)s, %(url)s, %(dim)s,"
                "        CASE WHEN a.n = 0 THEN 'active' ELSE 'building' END,"
                "        CASE WHEN a.n = 0 THEN now() END"
                " FROM (SELECT count(*) AS n FROM search_models WHERE state = 'active') a"
                " ON CONFLICT (model) DO UPDATE SET kind = EXCLUDED.kind, url = EXCLUDED.url,"
                "   dimension = EXCLUDED.dimension,"
                "   state = CASE WHEN search_models.state = 'retired' THEN 'building'"
                "                ELSE search_models.state END"
                " RETURNING model, kind, url, dimension, state",
                {"model": self.configured.model, "kind": self.configured.kind, "url": url, "dim": dimension})
            row = await cur.fetchone()
            assert row is not None
        info = ModelInfo(**row)
        self.forget()
        if info.state == "active" and not await self.indexes.build(info.model, info.dimension):
            return info
        self._registered = info
        return info

    async def hold_switch(self, conn: Connection, info: ModelInfo) -> None:
        """Hold off any switch of model until ``conn``'s transaction ends (an activation under way is
        waited for), and raise ``ModelRetired`` if ``info``'s model is retired by then. Vectors stored
        in that transaction are of a model that is active, or building (to become active): an
        activation that follows sees them, or queues their entities (``activate``). Once retired,
        the model is what ``register`` answers in this process, which embeds nothing more: registered
        again, it would be building again, and a build would bring it back."""
        await conn.execute("LOCK TABLE search_models IN SHARE MODE")
        cur = await conn.execute("SELECT state FROM search_models WHERE model = %s", (info.model,))
        row = await cur.fetchone()
        if row is None or row["state"] == "retired":
            self._registered = replace(info, state="retired")
            raise ModelRetired(f"embedding model {info.model} is retired")

    async def activate(self, info: ModelInfo) -> None:
        """Make a fully embedded model the active one, once its index is valid (built here
        if need be), and retire (and drop) the others. Entities left with no vector of it (embedded
        during its build by a process still configured with the old model) are queued in the same
        transaction, so the queue gives them one. Its lock waits for the vectors being stored
        (``hold_switch``), which see the switch once it is made."""
        model = info.model
        if not await self.indexes.build(model, info.dimension):
            raise Unavailable(f"the index of embedding model {model} is being built by another process",
                              retry=True)
        async with self.db.transaction() as conn:
            await conn.execute("LOCK TABLE search_models IN SHARE ROW EXCLUSIVE MODE")
            cur = await conn.execute("UPDATE search_models SET state = 'retired' WHERE state = 'active'"
                                     " AND model <> %s RETURNING model", (model,))
            retired = [row["model"] for row in await cur.fetchall()]
            await conn.execute("UPDATE search_models SET state = 'active', activated_at = now()"
                               " WHERE model = %s", (model,))
            cur = await conn.execute("SELECT search_queue_unembedded(%s) AS n", (model,))
            queued = await cur.fetchone()
        self._registered = None
        self.forget()
        if queued and queued["n"]:
            log.info("%d entities with no vector of embedding model %s are queued for one",
                     queued["n"], model)
        for old in retired:
            await self.indexes.drop(old)

    async def close(self) -> None:
        for embedder in (self.configured, *self._others.values()):
            await embedder.aclose()
