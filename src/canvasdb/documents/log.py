"""The op log's group commit: concurrent appends share one transaction and one WAL flush.

Every append is awaited until the transaction holding it has committed, so an
acknowledged update is durable; nothing is ever queued past a caller's return.
Up to two batches are in flight, never with the same document in both (its updates
keep their order); whatever queued up meanwhile forms the next batch (optionally
after waiting a short window for company, off by default: measured, it cost more
latency than it saved). With one batch at a time, an update that arrived during a
commit waited for that commit before its own began. A batch is one call of the SQL
function ``doc_append``: one round trip and one implicit transaction that, per
document, takes the sequence numbers under the document's advisory lock (migration
0014: the log only grows, no row is updated per commit), inserts the updates and
notifies ``canvasdb_docs`` (document and last sequence number), so other processes
hear of an update exactly when it becomes visible; unless no other process listens
(migration 0015: the gateway names its listening connection after ``origin``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import tuple_row

from canvasdb import metrics
from canvasdb.db import Database, translate
from canvasdb.db.turns import in_turns
from canvasdb.errors import NotFound

log = logging.getLogger("canvasdb.documents")

# One statement per group commit (migration 0007): sequence numbers, rows, notifications.
# Binary parameters (no bytea hex); the org as text: a UUID object per row cost more than the insert.
_APPEND = "SELECT org_id::text, doc_id, seq, at FROM doc_append(%b, %b, %b, %b, %b, %b, %b)"
NOTIFY_CHANNEL = "canvasdb_docs"  # sent by doc_append: "u <org> <last seq> <origin> <doc>"


@dataclass(frozen=True)
class Appended:
    """Where an update landed in its document's log."""

    seq: int
    at: datetime


@dataclass
class _Pending:
    org_id: UUID
    doc_id: str
    payload: bytes
    user_id: UUID | None
    client_id: int | None
    future: asyncio.Future[Appended] = field(repr=False)
    tag: object = None


class UpdateLog:
    """Appends Yjs updates to ``doc_updates`` with group commit; use ``append``."""

    def __init__(self, db: Database, *, window: float = 0.0, max_batch: int = 1000,
                 max_inflight: int = 2) -> None:
        self.db = db
        self.origin = uuid.uuid4().hex[:12]  # names this process in notifications
        # Called for each committed update, in sequence order, before any caller resumes:
        # (org, doc, seq, payload, tag). The gateway broadcasts from here.
        self.committed: Callable[[UUID, str, int, bytes, object], None] | None = None
        self.window = window
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._pending: list[_Pending] = []
        self._writing: set[tuple[UUID, str]] = set()  # documents in a batch being committed
        self._flushers: set[asyncio.Task[None]] = set()

    async def append(self, org_id: UUID, doc_id: str, payload: bytes, *, user_id: UUID | None = None,
                     client_id: int | None = None, tag: object = None) -> Appended:
        """Store one update; returns once it is committed. ``tag`` is handed to ``committed``."""
        return await self.submit(org_id, doc_id, payload, user_id=user_id, client_id=client_id, tag=tag)

    def submit(self, org_id: UUID, doc_id: str, payload: bytes, *, user_id: UUID | None = None,
               client_id: int | None = None, tag: object = None) -> asyncio.Future[Appended]:
        """``append`` without a coroutine: queue the update for the next group commit and
        return the future that settles once it is committed (for callers that would
        otherwise need a task per update to wait for it)."""
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(org_id, doc_id, payload, user_id, client_id, future, tag))
        if len(self._flushers) < self.max_inflight and (org_id, doc_id) not in self._writing:
            self._start_flusher()  # (the earlier pending updates were looked at when they came)
        return future

    async def close(self) -> None:
        """Commit what is pending, then stop the flusher."""
        while self._flushers or self._pending:
            if self._flushers:  # shielded: a cancelled close() must not cancel commits under way
                await asyncio.shield(asyncio.gather(*self._flushers, return_exceptions=True))
            else:
                await self._flush_next(wait=False)

    def _start_flusher(self) -> None:
        task = asyncio.create_task(self._flush_next(wait=True))
        self._flushers.add(task)
        task.add_done_callback(self._flusher_done)

    def _flusher_done(self, task: asyncio.Task[None]) -> None:
        self._flushers.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:  # _flush settles every failure itself: not expected
            log.error("a group commit failed", exc_info=task.exception())
        elif not task.result():
            return  # took nothing: the flush in flight looks again when it ends
        # Its documents are free again: updates of theirs that waited can go now.
        if len(self._flushers) < self.max_inflight and any(
                (p.org_id, p.doc_id) not in self._writing for p in self._pending):
            self._start_flusher()

    async def _flush_next(self, *, wait: bool) -> bool:
        """Commit the next batch; False if there was nothing to take."""
        if wait and self.window > 0 and len(self._pending) < self.max_batch:
            await asyncio.sleep(self.window)
        batch = self._take()
        if not batch:
            return False
        keys = {(item.org_id, item.doc_id) for item in batch}
        self._writing |= keys
        try:
            await self._flush(batch)
        finally:
            self._writing -= keys
        return True

    def _take(self) -> list[_Pending]:
        """Pending updates in arrival order, up to max_batch, of documents no batch in flight has;
        more than that pending, in turns by org (``turns``)."""
        batch: list[_Pending] = []
        left: list[_Pending] = []
        if len(self._pending) > self.max_batch:
            self._pending = in_turns(self._pending, _org)
        for item in self._pending:
            if len(batch) < self.max_batch and (item.org_id, item.doc_id) not in self._writing:
                batch.append(item)
            else:
                left.append(item)
        self._pending = left
        return batch

    async def _flush(self, batch: list[_Pending]) -> None:
        groups: dict[tuple[UUID, str], list[_Pending]] = defaultdict(list)
        for item in batch:
            groups[(item.org_id, item.doc_id)].append(item)
        started = time.perf_counter()
        try:
            results = await self._commit(groups)
        except psycopg.Error as exc:
            if len(groups) > 1 and _rolled_back(exc):  # isolate the failing document; the others commit
                for items in groups.values():
                    await self._flush(items)
                return
            # Also when the connection broke: the batch may have committed before the reply
            # was lost, and written again it would be stored twice. Its callers hear of the
            # failure; a client resyncs by its state vector, which never doubles an update.
            error = translate(exc)
            for item in batch:
                _settle(item.future, error)
            return
        except BaseException as exc:  # cancelled too: no caller is left waiting for good
            for item in batch:
                _settle(item.future, exc)
            if not isinstance(exc, Exception):
                raise
            return
        metrics.DOC_COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.DOC_BATCH_UPDATES.observe(len(batch))
        for key, items in groups.items():
            rows = sorted(results[key])  # (seq, at)
            if len(rows) != len(items):  # the document is gone
                for item in items:
                    _settle(item.future, NotFound(f"document {key[1]!r} not found"))
                continue
            for item, row in zip(items, rows, strict=True):
                if self.committed is not None:
                    try:
                        self.committed(key[0], key[1], row[0], item.payload, item.tag)
                    except Exception:  # a listener's failure must not undo an acknowledged commit
                        log.exception("commit listener failed")
                _settle(item.future, Appended(seq=row[0], at=row[1]))
            metrics.DOC_APPENDS.inc(len(items))

    async def _commit(self, groups: dict[tuple[UUID, str], list[_Pending]]) -> dict[Any, list[Any]]:
        items = [item for group in groups.values() for item in group]
        async with (self.db.pool.connection() as conn,  # autocommit: the call is its own transaction
                    conn.cursor(row_factory=tuple_row) as cur):
            await cur.execute(_APPEND, (
                [org for org, _ in groups], [doc for _, doc in groups], [len(g) for g in groups.values()],
                [i.payload for i in items], [i.user_id for i in items], [i.client_id for i in items],
                self.origin))
            rows = await cur.fetchall()
        results: dict[Any, list[Any]] = {key: [] for key in groups}
        by_text = {(str(org), doc): (org, doc) for org, doc in groups}
        for org, doc, seq, at in rows:
            results[by_text[(org, doc)]].append((seq, at))
        return results


def _org(item: _Pending) -> UUID:
    return item.org_id


def _rolled_back(exc: psycopg.Error) -> bool:
    """Whether the server answered with an error, so that nothing of the statement was
    committed; not so when the connection broke (class 08, or no SQLSTATE at all)."""
    return bool(exc.sqlstate) and not exc.sqlstate.startswith("08")


def _settle(future: asyncio.Future[Appended], outcome: Appended | BaseException) -> None:
    if future.done():  # the caller gave up waiting; the update is stored all the same
        return
    if isinstance(outcome, asyncio.CancelledError):  # stopped mid-commit: the outcome is unknown
        future.cancel()
        return
    if isinstance(outcome, BaseException):
        metrics.DOC_APPEND_FAILURES.inc()
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


__all__ = ["Appended", "UpdateLog"]
