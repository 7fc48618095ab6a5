"""Each embedding model's HNSW index on ``search_vectors``, built without holding up writes.

A plain CREATE INDEX holds the table's SHARE lock for the whole build (minutes for
millions of vectors): every vector the indexer stores, and every write that deletes
one (an entity left without text, a deletion), waits for it. CREATE INDEX CONCURRENTLY
takes a lock that no write conflicts with, but it cannot run in a transaction or in a
function, and only the table's owner may run it: it runs on a connection of its own as
the login that ran the migrations (``Database.login_session``), not as ``canvasdb_app``.
One process builds a model's index at a time (an advisory lock, never waited for: a
waiting statement holds a snapshot that the build would wait for in turn). A concurrent
build that failed leaves its index INVALID, which the planner never uses; the next
build drops it and starts again. A new model becomes active only once its index is valid.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import sql

from canvasdb.db import Database, translate
from canvasdb.errors import Unavailable

_VALID = "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)"  # no row: no index


def index_name(model: str) -> str:
    """The name of the model's index (as migration 0010 named it)."""
    return "search_vectors_hnsw_" + hashlib.md5(model.encode()).hexdigest()[:16]


class ModelIndexes:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def is_valid(self, model: str) -> bool:
        """Whether the model's index exists and queries may use it (a catalog read, no lock)."""
        row = await self.db.one(_VALID, (f"public.{index_name(model)}",))
        return bool(row and row["indisvalid"])

    async def build(self, model: str, dimension: int) -> bool:
        """Make the model's index valid; False if another process is building it meanwhile."""
        if await self.is_valid(model):
            return True
        name = sql.Identifier(index_name(model))
        async with self.db.taking_turns(f"search index {model}", wait=False) as mine:
            if not mine:
                return False
            async with self._as_owner() as conn:
                cur = await conn.execute(_VALID, (f"public.{index_name(model)}",))
                row = await cur.fetchone()
                if row is not None and row[0]:
                    return True
                if row is not None:  # what a failed concurrent build left
                    await conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS public.{}").format(name))
                await conn.execute(sql.SQL(
                    "CREATE INDEX CONCURRENTLY {} ON public.search_vectors USING hnsw"
                    " ((embedding::halfvec({d})) halfvec_cosine_ops) WITH (m = 16, ef_construction = 64)"
                    " WHERE model = {model}").format(name, d=sql.Literal(dimension),
                                                     model=sql.Literal(model)))
        return True

    async def drop(self, model: str) -> None:
        """Drop a retired model's index, without the table's exclusive lock (its vectors are
        deleted by the application); not while a process builds it (registering it again)."""
        row = await self.db.one("SELECT to_regclass(%s) IS NULL AS gone", (f"public.{index_name(model)}",))
        if row is None or row["gone"]:
            return
        async with self.db.taking_turns(f"search index {model}", wait=False) as mine:
            if not mine:
                return
            async with self._as_owner() as conn:
                await conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS public.{}").format(
                    sql.Identifier(index_name(model))))

    @asynccontextmanager
    async def _as_owner(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The login's own session, with no statement timeout (a build takes minutes)."""
        async with self.db.login_session(statement_timeout_ms=0) as conn:
            try:
                yield conn
            except psycopg.errors.InsufficientPrivilege as exc:
                raise Unavailable("the database login may not build search indexes: only the owner of"
                                  " search_vectors may (CREATE INDEX CONCURRENTLY)",
                                  hint="apply the migrations as the login the application connects as",
                                  ) from exc
            except psycopg.Error as exc:
                raise translate(exc) from exc
