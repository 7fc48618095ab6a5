"""Group commit for entity changes: concurrent changes share one statement and one commit.

A change is one call of ``entity_change`` (migration 0002). Alone, its cost is mostly
the transaction around it: the round trip, the statement, the commit's WAL flush.
Changes that arrive while a batch is being written wait and form the next batch,
one call of ``entity_change_many`` (migration 0016), which calls ``entity_change``
once per change, in (org, id) order so that two batches lock rows in the same order.
Nothing waits for a timer: a change that finds nothing in flight is written at once,
alone, by its caller; up to two batches are in flight, the second only once two
changes wait for it. A batch takes its share of the changes waiting and in flight
(half, with two), so that the two stay even: one large batch and one small one, each
waking its own writers, would keep that shape for good, with one backend busy and
the other mostly idle.

Every caller is answered after the commit that holds its change, with its own
outcome. If a batch fails as a whole (a reference field that names a missing
entity, a deadlock), nothing of it was written, and each change is tried again
on its own, so that one bad change fails alone. Two changes of the same entity
never share a batch: the second waits for the next one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from psycopg import errors as pg_errors

from canvasdb import metrics
from canvasdb.db import Database
from canvasdb.db.turns import in_turns
from canvasdb.errors import CanvasdbError, Unavailable

_CHANGE = """SELECT * FROM entity_change(%(org)s, %(id)s, %(actor)s, %(admin)s, %(op)s,
    %(value)s::jsonb, %(if_version)s, %(validated_at)s, %(keyframe_interval)s, %(max_bytes)s)"""
_CHANGE_MANY = """SELECT * FROM entity_change_many(%(org)b::uuid[], %(id)b::uuid[], %(actor)b::uuid[],
    %(admin)b::boolean[], %(op)b::text[], %(values)s::jsonb, %(if_version)s::integer[],
    %(validated_at)s::integer[], %(keyframe_interval)s, %(max_bytes)s)"""
_COLUMNS = ("org", "id", "actor", "admin", "op", "if_version", "validated_at")


@dataclass
class _Pending:
    params: dict[str, Any]
    future: asyncio.Future[dict[str, Any]] = field(repr=False)
    key: UUID = field(init=False)  # the entity (ids of two orgs may clash: they just wait their turn)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.key = self.params["id"]
        self.size = len(self.params["value"] or "")


class ChangeQueue:
    """Writes ``entity_change`` calls with group commit; use ``change``."""

    def __init__(self, db: Database, *, max_batch: int = 200, max_batch_bytes: int = 4 << 20,
                 max_inflight: int = 2) -> None:
        self.db = db
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes  # a batch of large documents stays a modest statement
        self.max_inflight = max_inflight
        self.min_company = 2  # changes waiting before a second batch starts
        self._pending: list[_Pending] = []
        self._writing: set[UUID] = set()  # entities in a batch being written
        self._inflight = 0  # batches being written (a lone change written by its caller counts)
        self._flushers: set[asyncio.Task[None]] = set()  # held, so that they are not collected

    async def change(self, params: dict[str, Any]) -> dict[str, Any]:
        """The row ``entity_change`` returns for ``params``, once it is committed."""
        if not self._inflight:  # alone: written by the caller, without a task or a future
            self._inflight += 1
            self._writing.add(params["id"])
            try:
                return await self._write(params)
            finally:
                self._inflight -= 1
                self._writing.discard(params["id"])
                self._start_flushers()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(params, future))
        self._start_flushers()
        return await future

    def _start_flushers(self) -> None:
        while self._pending and self._inflight < self.max_inflight:
            if self._inflight and len(self._pending) < self.min_company:
                return
            batch = self._take()
            if not batch:  # every pending change waits for an entity now being written
                return
            self._inflight += 1
            task = asyncio.create_task(self._flush(batch))
            self._flushers.add(task)
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._inflight -= 1
        self._flushers.discard(task)
        self._start_flushers()

    def _take(self) -> list[_Pending]:
        """The next batch: pending changes in arrival order, one per entity, within the caps;
        of a backlog larger than a batch, in turns by org."""
        batch: list[_Pending] = []
        left: list[_Pending] = []
        keys: set[UUID] = set()
        size = 0
        share = -(-(len(self._writing) + len(self._pending)) // self.max_inflight)  # rounded up
        limit = min(self.max_batch, max(share, self.min_company))
        if len(self._pending) > limit:  # a backlog: in turns by org (see ``turns``)
            self._pending = in_turns(self._pending, _org)
        for item in self._pending:
            if (len(batch) >= limit or item.key in keys or item.key in self._writing
                    or (batch and size + item.size > self.max_batch_bytes)):
                left.append(item)
                continue
            batch.append(item)
            keys.add(item.key)
            size += item.size
        self._pending = left
        self._writing |= keys
        return batch

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            if len(batch) == 1:
                await self._write_one(batch[0])
                return
            batch.sort(key=lambda item: (item.params["org"], item.key))  # all lock rows in one order
            try:
                rows = await self._write_many(batch)
            except Unavailable as exc:
                if not isinstance(exc.__cause__, pg_errors.QueryCanceled):
                    raise  # no connection: one by one would not fare better (a lost reply may hide a commit)
                # Past the statement timeout, and rolled back: the batch as a whole waited on one
                # row another transaction holds, or was too much for one statement. Each on its
                # own, so the others are not failed with it.
                metrics.ENTITY_BATCH_SPLITS.inc()
                for item in batch:
                    await self._write_one(item)
                return
            except CanvasdbError:
                metrics.ENTITY_BATCH_SPLITS.inc()
                for item in batch:  # nothing was written: each on its own, so one bad change fails alone
                    await self._write_one(item)
                return
            for item, row in zip(batch, rows, strict=True):
                _settle(item.future, row)
            metrics.ENTITY_BATCH_CHANGES.observe(len(batch))
        except BaseException as exc:
            for item in batch:
                _settle(item.future, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._writing.difference_update(item.key for item in batch)

    async def _write_one(self, item: _Pending) -> None:
        try:
            _settle(item.future, await self._write(item.params))
        except CanvasdbError as exc:
            _settle(item.future, exc)

    async def _write(self, params: dict[str, Any]) -> dict[str, Any]:
        """One change, on its own."""
        row = await self.db.one(_CHANGE, params)
        assert row is not None
        metrics.ENTITY_BATCH_CHANGES.observe(1)
        return row

    async def _write_many(self, batch: list[_Pending]) -> list[dict[str, Any]]:
        first = batch[0].params
        params: dict[str, Any] = {c: [item.params[c] for item in batch] for c in _COLUMNS}
        params["values"] = f"[{','.join(item.params['value'] or 'null' for item in batch)}]"
        params["keyframe_interval"] = first["keyframe_interval"]
        params["max_bytes"] = first["max_bytes"]
        rows = await self.db.all(_CHANGE_MANY, params)  # autocommit: one statement, one transaction
        if len(rows) != len(batch):
            raise RuntimeError(f"entity_change answered {len(rows)} rows for {len(batch)} changes")
        return rows


def _org(item: _Pending) -> Any:
    return item.params["org"]


def _settle(future: asyncio.Future[dict[str, Any]], outcome: dict[str, Any] | BaseException) -> None:
    if future.done():  # the caller gave up waiting; its change is written all the same
        return
    if isinstance(outcome, asyncio.CancelledError):  # shutting down mid-batch: unknown outcome
        future.cancel()
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


__all__ = ["ChangeQueue"]
