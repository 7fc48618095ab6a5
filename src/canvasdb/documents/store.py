"""Live Yjs documents: created in a project, loaded lazily, every update durable on return.

A document is its latest snapshot plus the updates after it in the op log
(``doc_updates``). Loaded documents stay in a cache bounded in bytes and are
brought up to date from the log on each use, so several processes can append to
the same document. Updates are validated by applying them to the document (pycrdt,
the Yrs bindings) before they are stored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from pycrdt import Doc, get_state, get_update, merge_updates

from canvasdb import metrics
from canvasdb.blobs import BlobStore, gc
from canvasdb.db import Connection, Database
from canvasdb.documents import yjs
from canvasdb.documents.log import Appended, UpdateLog
from canvasdb.entities import utc
from canvasdb.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, Unavailable
from canvasdb.tenancy import (
    Principal,
    check_project_access,
    project_role,
    require_project_role,
    role_in_project,
)

log = logging.getLogger("canvasdb.documents")
DOC_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
KIND = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_CHANGES_PAGE = 1000
_MERGE_MAX = 256  # pieces state() merges into one update; beyond, it decodes the document
_UPDATES_AFTER_OR_GONE = (
    "(SELECT seq, payload FROM doc_updates WHERE org_id = %(org)s AND doc_id = %(doc)s AND seq > %(seq)s"
    " ORDER BY seq) UNION ALL (SELECT -1, NULL FROM doc_snapshots"
    " WHERE org_id = %(org)s AND doc_id = %(doc)s AND seq > %(seq)s LIMIT 1)")
# From when on reading the document as of a moment is exact (NULL: always): the time of the
# first snapshot that covers every update retention has deleted. Sequence numbers have no
# gaps and retention deletes the oldest, so the deleted ones are those below the first kept
# (or, with none kept, up to the last number, which the newest snapshot holds).
_EXACT_SINCE = (
    "SELECT (SELECT s.at FROM doc_snapshots s WHERE s.org_id = %(org)s AND s.doc_id = %(doc)s"
    "        AND s.seq >= p.seq ORDER BY s.seq LIMIT 1) AS at"
    " FROM (SELECT coalesce((SELECT min(u.seq) FROM doc_updates u"
    "                        WHERE u.org_id = %(org)s AND u.doc_id = %(doc)s),"
    "                       doc_last_seq(%(org)s, %(doc)s) + 1) - 1 AS seq) p WHERE p.seq > 0")
# The newest snapshot (payload NULL), at or before a moment (NULL: any), and the updates after
# it up to that moment, in one statement, so that both are read from one view of the database:
# read one after the other, a compaction and retention in between took updates the second
# read still needed (time travel said "exact" of a document without them; a load held one).
_SNAPSHOT_AND_AFTER = (
    "WITH s AS (SELECT seq, state, blob_sha256, state_vector FROM doc_snapshots"
    "           WHERE org_id = %(org)s AND doc_id = %(doc)s AND (%(at)s::timestamptz IS NULL OR at <= %(at)s)"
    "           ORDER BY seq DESC LIMIT 1)"
    " SELECT seq, state, blob_sha256, state_vector, NULL::bytea AS payload FROM s"
    " UNION ALL SELECT u.seq, NULL, NULL, NULL, u.payload FROM doc_updates u WHERE u.org_id = %(org)s"
    "           AND u.doc_id = %(doc)s AND u.seq > coalesce((SELECT seq FROM s), 0)"
    "           AND (%(at)s::timestamptz IS NULL OR u.at <= %(at)s)"
    " ORDER BY seq")  # the snapshot's first: the updates are past it
# Every live store of this process: /metrics reads their cache sizes when scraped, so the
# gauges are current without a call per update.
_STORES: weakref.WeakSet[DocumentStore] = weakref.WeakSet()
metrics.DOCS_LOADED.set_function(lambda: sum(s.held_documents for s in list(_STORES)))
metrics.DOC_CACHE_BYTES.set_function(lambda: sum(s.held_bytes for s in list(_STORES)))
# Whether the document exists, and the caller's role in its project (for org members).
_ACCESS = (f"SELECT {role_in_project('d.org_id', 'd.project_id')} AS role"
           " FROM documents d WHERE d.org_id = %s AND d.id = %s")


@dataclass(frozen=True)
class Document:
    id: str
    org_id: UUID
    project_id: UUID
    kind: str
    entity_id: UUID | None
    last_seq: int
    projected_seq: int
    created_at: datetime
    created_by: UUID | None
    exact_since: datetime | None = None  # as-of reads before this are the nearest earlier snapshot

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "org_id": str(self.org_id), "project_id": str(self.project_id),
            "kind": self.kind, "entity_id": None if self.entity_id is None else str(self.entity_id),
            "last_seq": self.last_seq, "projected_seq": self.projected_seq,
            "projection_lag": self.last_seq - self.projected_seq if self.kind == "board" else 0,
            "exact_since": None if self.exact_since is None else self.exact_since.isoformat(),
            "created_at": self.created_at.isoformat(),
            "created_by": None if self.created_by is None else str(self.created_by),
        }  # fmt: skip


@dataclass(frozen=True)
class PastState:
    update: bytes  # the document as it was, as one Yjs update
    exact: bool  # False: retention had deleted updates of that moment; this is the snapshot before


@dataclass(frozen=True)
class Change:
    seq: int
    at: datetime
    user_id: UUID | None
    client_id: int | None
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at.isoformat(),
                "user_id": None if self.user_id is None else str(self.user_id),
                "client_id": self.client_id, "size": self.size}


_OVERHEAD = 1024  # what an entry costs besides its bytes, roughly; it also bounds the entry count


class _Held:
    """A document as stored: its latest snapshot and the updates after it, as bytes.

    Serving a document needs nothing more: a peer gets these bytes (or the part of each
    it lacks), and the state vector is kept current by reading the updates' headers.
    The decoded Yrs document (``doc``) is built only for those who need it (the board
    projection, API edits), because decoding a large board takes about a second with
    the GIL held.
    """

    def __init__(self) -> None:
        self.snapshot: bytes | None = None
        self.snapshot_seq = 0
        self.tail: list[tuple[int, bytes]] = []  # (seq, update) after the snapshot, in order
        self.seq = 0  # the last update held
        self._clock: yjs.StateVector = {}  # the state vector, counting tail[:_clocked]
        self._clocked = 0
        self.size = _OVERHEAD  # bytes held (a decoded doc counts its bytes once more, as an estimate)
        self.counted = 0  # of those, what the store's count holds (a load changes size while it reads)
        self.doc: Doc | None = None
        self.doc_seq = 0
        self.lock = asyncio.Lock()
        # Toward an early compaction count every update past the loaded snapshot, whichever
        # process committed it: updates from its sequence number, bytes as they are held.
        self.count_from = 0  # the loaded snapshot's seq
        self.unsnapshotted_bytes = 0  # bytes of the updates held past it
        self.compaction_wanted = False  # a threshold was crossed by this process's update
        self.compaction_asked = -math.inf  # when compaction was last asked for (monotonic)
        self.announced = -1.0  # when `changed` was last called for this document (monotonic)
        self.rebase_at = 0  # tail length at which to look for a newer snapshot

    def add(self, seq: int, update: bytes) -> bool:
        """Hold the next update of the log; False (and nothing held) if it is not the next one."""
        if seq != self.seq + 1:
            return False
        self.tail.append((seq, update))
        self.seq = seq
        self.unsnapshotted_bytes += len(update)
        self.size += len(update) * (2 if self.doc is not None else 1)
        return True

    @property
    def clock(self) -> yjs.StateVector:
        """The state vector, read from the headers of the updates added since it was last
        asked for: the gateway adds thousands of updates a second, each header costs a few
        µs to read, and the vector is needed only when a peer syncs."""
        for _, update in self.tail[self._clocked:]:
            yjs.advance(self._clock, update)
        self._clocked = len(self.tail)
        return self._clock

    def reset(self, snapshot: bytes | None, seq: int, clock: yjs.StateVector) -> None:
        self.snapshot, self.snapshot_seq, self.seq, self._clock = snapshot, seq, seq, dict(clock)
        self.tail, self.doc, self.doc_seq, self._clocked = [], None, 0, 0
        self.count_from, self.unsnapshotted_bytes = seq, 0
        self.size = _OVERHEAD + len(snapshot or b"")

    def decoded(self) -> Doc:
        """The Yrs document, decoded now if need be, up to ``seq``."""
        if self.doc is None:
            self.doc = Doc(skip_gc=True)  # snapshots keep deleted content, for time travel
            if self.snapshot is not None:
                self.doc.apply_update(self.snapshot)
            self.doc_seq = self.snapshot_seq
            self.size *= 2
        for seq, update in self.tail:
            if seq > self.doc_seq:
                try:
                    yjs.apply(self.doc, update)
                except ValueError:
                    log.warning("update %s does not apply to its document; skipped", seq)
        self.doc_seq = self.seq
        return self.doc

    def missing(self, peer: yjs.StateVector | None) -> list[bytes]:
        """What a peer at state vector ``peer`` lacks, as updates (None: a new, empty peer).

        Each stored piece is diffed on its own (structs past the vector, and its whole
        delete set, as Yjs's own sync does), so nothing is ever merged or decoded whole.
        """
        pieces = ([] if self.snapshot is None else [self.snapshot]) + [u for _, u in self.tail]
        if not peer:
            return pieces
        vector = yjs.write_state_vector(peer)
        return [d for d in (get_update(p, vector) for p in pieces) if d != yjs.EMPTY_UPDATE]


def check_doc_id(doc_id: object) -> str:
    if not isinstance(doc_id, str) or not DOC_ID.fullmatch(doc_id):
        raise InvalidInput("a document id is 1-200 letters, digits and . _ : - (starting with a letter "
                           "or digit)", pointer="/id")
    return doc_id


class DocumentStore:
    """The Python API for live documents (the HTTP API and the gateway use it)."""

    def __init__(self, db: Database, log: UpdateLog | None = None, *, cache_bytes: int = 256 * 2**20,
                 max_update_bytes: int = 2**20, compact_after_updates: int = 1000,
                 compact_after_bytes: int = 2**20,
                 compaction_due: Callable[[UUID, str], Awaitable[None]] | None = None,
                 blobs: BlobStore | None = None, snapshot_inline_bytes: int = 2**20,
                 changed: Callable[[UUID, str], Awaitable[None]] | None = None,
                 changed_every: float = 1.0, compaction_every: float = 10.0) -> None:
        self.db = db
        self.log = log or UpdateLog(db)
        self.cache_bytes = cache_bytes
        self.max_update_bytes = max_update_bytes
        self.compact_after_updates = compact_after_updates
        self.compact_after_bytes = compact_after_bytes
        self.compaction_due = compaction_due  # called (e.g. to defer a job) when a document grew
        # ... at most this often per document: a request still queued makes the next one fail
        # (one job per document), an error in PostgreSQL's log and a wasted round trip each
        self.compaction_every = compaction_every
        self.blobs = blobs  # where snapshots over snapshot_inline_bytes go (None: all inline)
        self.snapshot_inline_bytes = snapshot_inline_bytes
        self.changed = changed  # told (at most every `changed_every` s per document) of new updates
        self.changed_every = changed_every
        self._cache: OrderedDict[tuple[UUID, str], _Held] = OrderedDict()
        self._held_bytes = 0
        _STORES.add(self)
        self._hook_tasks: set[asyncio.Task[None]] = set()  # change and compaction notices under way

    async def close(self) -> None:
        await self.log.close()
        await asyncio.gather(*self._hook_tasks, return_exceptions=True)

    # --- metadata -----------------------------------------------------------------------------

    async def create(self, who: Principal, project_id: UUID, doc_id: str, kind: str = "board", *,
                     entity_id: UUID | None = None) -> Document:
        check_doc_id(doc_id)
        if not isinstance(kind, str) or not KIND.fullmatch(kind):
            raise InvalidInput("kind is a lowercase word such as 'board' or 'text'", pointer="/kind")
        async with self.db.transaction(who.org_id) as conn:
            await check_project_access(conn, who, project_id, write=True)
            if entity_id is not None:  # one of this org's, that the caller can read
                owner = await (await conn.execute(
                    "SELECT project_id FROM entities WHERE org_id = %s AND id = %s",
                    (who.org_id, entity_id))).fetchone()
                if owner is None or await project_role(conn, who, owner["project_id"]) is None:
                    raise InvalidInput(f"entity {entity_id} not found", pointer="/entity_id")
            cur = await conn.execute(
                "INSERT INTO documents (org_id, id, project_id, kind, entity_id, created_by)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (org_id, id) DO NOTHING"
                " RETURNING *, 0::bigint AS last_seq",
                (who.org_id, doc_id, project_id, kind, entity_id, who.user_id),
            )
        row = await cur.fetchone()
        if row is None:
            raise Conflict(f"document {doc_id!r} already exists")
        return _document(row)

    async def get(self, who: Principal, doc_id: str, *, write: bool = False) -> Document:
        """The document's metadata, if the caller may read it (or write, with ``write``)."""
        check_doc_id(doc_id)
        async with self.db.transaction(who.org_id) as conn:
            return await self._meta(conn, who, doc_id, write=write)

    async def check_access(self, who: Principal, doc_id: str, *, write: bool = False) -> bool:
        """``get`` for a caller that needs only the check, in one statement: NotFound if the
        caller may not read the document, Forbidden if ``write`` and it may only read;
        otherwise whether it may write (a gateway asks once what a connection may do)."""
        check_doc_id(doc_id)
        access = await self.db.read(who.org_id, _ACCESS, (who.user_id, who.org_id, doc_id))
        return _judge_access(who, doc_id, access, write=write)

    async def _meta(self, conn: Connection, who: Principal, doc_id: str, *, write: bool) -> Document:
        cur = await conn.execute("SELECT *, doc_last_seq(org_id, id) AS last_seq FROM documents"
                                 " WHERE org_id = %s AND id = %s", (who.org_id, doc_id))
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"document {doc_id!r} not found")
        await check_project_access(conn, who, row["project_id"], write=write,
                                   what=f"document {doc_id!r}")
        return _document(row, await _exact_since(conn, who.org_id, doc_id))

    # --- updates ------------------------------------------------------------------------------

    async def append(self, who: Principal, doc_id: str, payload: bytes) -> Appended:
        """Validate a Yjs v1 update by applying it, then store it; returns once committed. The
        update's author (its Yjs client id) is read from it: see ``yjs.author``."""
        await self.check_access(who, doc_id, write=True)
        return await self.append_checked(who.org_id, doc_id, payload, user_id=who.user_id)

    async def append_checked(self, org_id: UUID, doc_id: str, payload: bytes, *,
                             user_id: UUID | None = None, tag: object = None) -> Appended:
        """``append`` for a caller whose access was checked already."""
        self._admit(payload)
        await yjs.check_update_off_loop(payload)
        done = await self.log.append(org_id, doc_id, payload, user_id=user_id, client_id=yjs.author(payload),
                                     tag=tag)
        await self._announce(org_id, doc_id, *self._hold(org_id, doc_id, payload, done))
        return done

    def submit_checked(self, org_id: UUID, doc_id: str, payload: bytes, *, user_id: UUID | None = None,
                       tag: object = None) -> asyncio.Future[Appended]:
        """``append_checked`` for the gateway, validated already and not awaited here: the
        future settles once the update is committed (``tag`` names the sender to the log's
        ``committed`` listener). A task per update to await each one cost a tenth of the
        gateway's CPU under load."""
        self._admit(payload)
        future = self.log.submit(org_id, doc_id, payload, user_id=user_id, client_id=yjs.author(payload),
                                 tag=tag)

        def held(f: asyncio.Future[Appended]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            changed, compaction = self._hold(org_id, doc_id, payload, f.result())
            if changed or compaction:
                task = asyncio.get_running_loop().create_task(
                    self._announce(org_id, doc_id, changed, compaction))
                self._hook_tasks.add(task)
                task.add_done_callback(self._hook_tasks.discard)

        future.add_done_callback(held)  # before any awaiting caller resumes
        return future

    def _admit(self, payload: bytes) -> None:
        if len(payload) > self.max_update_bytes:
            raise PayloadTooLarge(f"an update is at most {self.max_update_bytes} bytes",
                                  limit=self.max_update_bytes)

    def _hold(self, org_id: UUID, doc_id: str, payload: bytes, done: Appended) -> tuple[bool, bool]:
        """Account for a committed update in the document's cache entry; whether ``changed``
        and ``compaction_due`` are now due."""
        key = (org_id, doc_id)
        held = self._cache.get(key)
        if held is None:  # held from now on (and loaded in full on first use): its counters live here
            held = self._cache[key] = _Held()
        else:
            self._cache.move_to_end(key)
        bytes_before = held.unsnapshotted_bytes
        # if another process wrote in between, the next use catches up
        in_order = held.add(done.seq, payload)
        if self._crosses_threshold(held, done.seq, bytes_before if in_order else None):
            held.compaction_wanted = True
        self._count(key, held)
        if self._held_bytes > self.cache_bytes:
            self._evict()
        now = time.monotonic()
        changed = self.changed is not None and now - held.announced >= self.changed_every
        if changed:
            held.announced = now
        compaction = (self.compaction_due is not None and held.compaction_wanted
                      and now - held.compaction_asked >= self.compaction_every)
        if compaction:
            held.compaction_wanted = False
            held.compaction_asked = now
        return changed, compaction

    def _crosses_threshold(self, held: _Held, seq: int, bytes_before: int | None) -> bool:
        """Whether this process's update ``seq`` takes the count past the loaded snapshot to a
        multiple of ``compact_after_updates``, or (held in order, ``bytes_before`` the bytes
        held before it) across a multiple of ``compact_after_bytes``. Every process counts
        every update from the same snapshot, and each update has one committer: one process
        asks per threshold crossed, however many gateways serve the document. (Processes that
        loaded different snapshots may both ask: the job's queueing lock and an idempotent
        compaction make that harmless.)"""
        updates = seq - held.count_from
        if updates > 0 and updates % self.compact_after_updates == 0:
            return True
        every = self.compact_after_bytes
        return bytes_before is not None and bytes_before // every < held.unsnapshotted_bytes // every

    async def _announce(self, org_id: UUID, doc_id: str, changed: bool, compaction: bool) -> None:
        """Call the ``changed`` and ``compaction_due`` hooks that are due."""
        if changed and self.changed is not None:
            try:
                await self.changed(org_id, doc_id)
            except Exception:  # the hourly pass catches up anyway; the update is stored
                log.warning("could not announce a change of %s", doc_id, exc_info=True)
        if compaction and self.compaction_due is not None:
            try:
                await self.compaction_due(org_id, doc_id)
            except Exception:  # the hourly pass compacts it anyway; the update is stored
                log.warning("could not ask for compaction of %s", doc_id, exc_info=True)

    async def state(self, who: Principal, doc_id: str, *, state_vector: bytes | None = None,
                    as_of: datetime | None = None) -> bytes:
        """The document as one Yjs update: all of it, what a peer with ``state_vector`` lacks,
        or (``as_of``) as it was at that moment."""
        if as_of is not None:
            return (await self.state_as_of(who, doc_id, as_of)).update
        await self.check_access(who, doc_id)
        peer = yjs.read_state_vector(state_vector) if state_vector else None
        held = await self._held((who.org_id, doc_id))
        if len(held.tail) > _MERGE_MAX:  # merging that many is slower than decoding once
            held = await self.loaded(who.org_id, doc_id)
            async with held.lock:
                assert held.doc is not None
                # the vector as read and written again by canvasdb, not the caller's bytes
                return held.doc.get_update(yjs.write_state_vector(peer)) if peer else held.doc.get_update()
        pieces = held.missing(peer)
        if len(pieces) == 1:
            return pieces[0]
        return merge_updates(*pieces) if pieces else yjs.EMPTY_UPDATE

    async def state_vector(self, who: Principal, doc_id: str) -> bytes:
        await self.check_access(who, doc_id)
        return yjs.write_state_vector((await self._held((who.org_id, doc_id))).clock)

    async def sync(self, org_id: UUID, doc_id: str, state_vector: bytes | None = None) -> Sync:
        """What a peer needs to catch up (for a caller whose access was checked already): the
        stored updates it lacks, as they are stored (a new peer gets the snapshot's bytes and
        the updates after it, nothing decoded), and this document's state vector."""
        peer = yjs.read_state_vector(state_vector) if state_vector else None
        held = await self._held((org_id, doc_id))
        return Sync(updates=held.missing(peer), state_vector=yjs.write_state_vector(held.clock), seq=held.seq)

    async def changes(self, who: Principal, doc_id: str, *, after: int = 0,
                      limit: int = 100) -> list[Change]:
        """The log entries after ``after`` (oldest first): when, by whom, how large."""
        return (await self.changes_page(who, doc_id, after=after, limit=limit))[0]

    async def changes_page(self, who: Principal, doc_id: str, *, after: int = 0,
                           limit: int = 100) -> tuple[list[Change], bool]:
        """``changes``, and whether more follow (one row more is read to know)."""
        if not 1 <= limit <= MAX_CHANGES_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_CHANGES_PAGE}", pointer="query:limit")
        await self.check_access(who, doc_id)
        rows = await self.db.read(
            who.org_id, "SELECT seq, at, user_id, client_id, octet_length(payload) AS size FROM doc_updates"
            " WHERE org_id = %s AND doc_id = %s AND seq > %s ORDER BY seq LIMIT %s",
            (who.org_id, doc_id, after, limit + 1))
        return [Change(**r) for r in rows[:limit]], len(rows) > limit

    async def updates_since(self, org_id: UUID, doc_id: str, seq: int) -> list[tuple[int, bytes]] | None:
        """The held updates after ``seq`` (brought up to date with the log), or None when they
        are no longer all held (a newer snapshot covers some): then resync with ``sync``."""
        held = await self._held((org_id, doc_id))
        if seq < held.snapshot_seq:
            return None
        return [(s, u) for s, u in held.tail if s > seq]

    def unload(self, org_id: UUID, doc_id: str) -> None:
        """Forget a held document (its next use loads it again)."""
        held = self._cache.pop((org_id, doc_id), None)
        if held is not None:
            self._held_bytes -= held.counted

    # --- loading ------------------------------------------------------------------------------

    async def loaded(self, org_id: UUID, doc_id: str) -> _Held:
        """The document, up to date with the log and decoded (hold ``.lock`` while using ``.doc``)."""
        held = await self._held((org_id, doc_id))
        async with held.lock:
            held.decoded()
            self._count((org_id, doc_id), held)
        self._evict()
        return held

    async def _held(self, key: tuple[UUID, str]) -> _Held:
        """The cached document, brought up to date with the log (loaded on first use)."""
        held = self._cache.get(key)
        if held is None:
            held = self._cache[key] = _Held()
            self._count(key, held)
        self._cache.move_to_end(key)
        async with held.lock:
            await self._catch_up(key, held)
            self._count(key, held)
        self._evict()
        return held

    def _count(self, key: tuple[UUID, str], held: _Held) -> None:
        """Bring the count up to an entry's size, unless it left the cache meanwhile (evicted
        or unloaded while its caller awaited: its bytes are no longer counted at all). What
        is counted is kept per entry, and dropping an entry takes off just that: a load
        changes the size while it reads the log, and a commit may change it meanwhile (an
        entry dropped then took off bytes never counted, and the count went below zero,
        lifting the cache's bound by as much each time)."""
        if self._cache.get(key) is held:
            self._held_bytes += held.size - held.counted
            held.counted = held.size

    async def _catch_up(self, key: tuple[UUID, str], held: _Held) -> None:
        """Bring the held copy up to date: usually one statement for the updates past it (a
        new peer's sync and another gateway's every commit come here), the newest snapshot
        too on the first load, after a gap, or once the tail is long."""
        org_id, doc_id = key
        start = held.seq  # (this process's commits may add to the copy while the log is read)
        rows = [] if start == 0 else await self._updates_after(key, start)
        covered = bool(rows) and rows[-1]["seq"] == -1  # a snapshot is past this copy
        if covered:
            rows.pop()
        # First load, or retention removed updates this copy has not seen (a gap before the
        # first row, or no row at all while a snapshot is past this copy): start again from
        # the newest snapshot. A row the copy took meanwhile is no gap.
        reload = start == 0 or (rows[0]["seq"] != start + 1 if rows else covered)
        if not reload and len(held.tail) + len(rows) >= held.rebase_at:
            # A long tail: if a worker compacted meanwhile, start from its snapshot too, so
            # a new peer gets the snapshot and a short tail, and the tail stops growing.
            held.rebase_at = len(held.tail) + len(rows) + self.compact_after_updates
            newest = await self.db.read(org_id, "SELECT max(seq) AS seq FROM doc_snapshots"
                                        " WHERE org_id = %s AND doc_id = %s", key, generic_plans=True)
            reload = bool(newest) and (newest[0]["seq"] or 0) > held.snapshot_seq
        if reload:
            held.rebase_at = 2 * self.compact_after_updates
            rows = await self.db.read(org_id, _SNAPSHOT_AND_AFTER, {"org": org_id, "doc": doc_id, "at": None},
                                      generic_plans=True, binary=True)
            if not rows or rows[0]["payload"] is not None:
                held.reset(None, 0, {})
            else:
                snapshot = rows.pop(0)
                state = await self._snapshot_state(snapshot)
                vector = snapshot["state_vector"]
                held.reset(state, snapshot["seq"],
                           yjs.read_state_vector(bytes(vector) if vector is not None else get_state(state)))
        for row in rows:  # counted toward an early compaction from the snapshot, not from this load
            held.add(row["seq"], bytes(row["payload"]))

    async def _updates_after(self, key: tuple[UUID, str], seq: int) -> list[Any]:
        """The log after ``seq``, and a last row of seq -1 when a snapshot is past ``seq``: with
        no update after ``seq`` left, retention took what the copy never saw."""
        # Generic plans: an index range of one document; with ``seq > n`` a constant,
        # PostgreSQL kept planning this read anew.
        return await self.db.read(key[0], _UPDATES_AFTER_OR_GONE, {"org": key[0], "doc": key[1], "seq": seq},
                                  generic_plans=True, binary=True)

    def _evict(self) -> None:
        """Forget the least recently used documents while over ``cache_bytes`` (the one in
        use stays, however large: it is the most recent)."""
        while self._held_bytes > self.cache_bytes and len(self._cache) > 1:
            _, oldest = self._cache.popitem(last=False)
            self._held_bytes -= oldest.counted

    @property
    def held_bytes(self) -> int:
        """About how many bytes the held documents take (``cache_bytes`` bounds it)."""
        return self._held_bytes

    @property
    def held_documents(self) -> int:
        return len(self._cache)

    async def state_as_of(self, who: Principal, doc_id: str, as_of: datetime) -> PastState:
        """The document as it was at ``as_of``: exact while the updates up to then are kept;
        beyond that, the nearest earlier snapshot (retention deletes only updates that a
        snapshot covers), and said so."""
        check_doc_id(doc_id)
        org_id, moment = who.org_id, utc(as_of)
        await self.db.horizon.settle(moment)
        doc = Doc(skip_gc=True)
        async with self.db.transaction(org_id) as conn:
            # The access check and the read go in one round trip (pipelined); the rows read
            # are used only once the check passed.
            access = await conn.execute(_ACCESS, (who.user_id, org_id, doc_id))
            cur = await conn.execute(_SNAPSHOT_AND_AFTER, {"org": org_id, "doc": doc_id, "at": moment},
                                     binary=True)
            _judge_access(who, doc_id, await access.fetchall(), write=False)
            rows = await cur.fetchall()
            # After the read: retention meanwhile makes it later, never earlier (it only says
            # "not exact" of a moment that was, never the reverse).
            since = await _exact_since(conn, org_id, doc_id)
        if rows and rows[0]["payload"] is None:
            doc.apply_update(await self._snapshot_state(rows.pop(0)))
        _replay(doc, rows, doc_id)
        return PastState(doc.get_update(), exact=since is None or moment >= since)

    # --- compaction and retention ---------------------------------------------------------------

    async def compact(self, org_id: UUID, doc_id: str) -> Snapshot | None:
        """Fold the latest snapshot and the updates after it into a new snapshot.

        Safe beside concurrent appends: it covers exactly the updates committed when it
        read the last sequence number (numbers are taken and written in one transaction),
        and later ones stay in the log. None when there is nothing new to fold, or when
        another compaction's newer snapshot, and retention after it, overtook this one.
        """
        async with self.db.transaction(org_id) as conn:
            cur = await conn.execute("SELECT doc_last_seq(org_id, id) AS last_seq FROM documents"
                                     " WHERE org_id = %s AND id = %s", (org_id, doc_id))
            meta = await cur.fetchone()
            if meta is None:
                raise NotFound(f"document {doc_id!r} not found")
            upto = meta["last_seq"]
            cur = await conn.execute(
                "SELECT seq, state, blob_sha256 FROM doc_snapshots WHERE org_id = %s AND doc_id = %s"
                " ORDER BY seq DESC LIMIT 1", (org_id, doc_id), binary=True)
            base = await cur.fetchone()
            since = 0 if base is None else base["seq"]
            if upto <= since:
                return None
            doc = Doc(skip_gc=True)
            if base is not None:
                doc.apply_update(await self._snapshot_state(base))
            cur = await conn.execute(
                "SELECT seq, payload, at FROM doc_updates WHERE org_id = %s AND doc_id = %s"
                " AND seq > %s AND seq <= %s ORDER BY seq", (org_id, doc_id, since, upto), binary=True)
            rows = await cur.fetchall()
            if len(rows) != upto - since:
                # Since the snapshot was read, another compactor saved a newer one and retention
                # deleted updates it covers: folded with a hole, this snapshot (the newest) would
                # lose them for good. The other one holds them; the next compaction starts there.
                return None
            _replay(doc, rows, doc_id)
            at = rows[-1]["at"]
            # The pieces merged, not the document encoded: an update whose predecessors the
            # log lacks waits in the document as pending, and get_update() leaves it out (it
            # was lost once the log's copy went). With garbage collection off, as here, both
            # hold the same content otherwise; the merge is the smaller of the two.
            pieces = [] if base is None else [await self._snapshot_state(base)]
            state = yjs.merge(pieces + [bytes(r["payload"]) for r in rows])
            inline, blob = state, None
            if self.blobs is not None and len(state) > self.snapshot_inline_bytes:
                # Stored (durably) before the row that points at it can commit, and held from
                # collection (blobs/gc.py) until it has: the same bytes may be an attachment's
                # that is being deleted.
                blob = (await self.blobs.put(state)).key
                await gc.hold(conn, blob)
                if not await self.blobs.exists(blob):
                    await self.blobs.put(state)
                inline = None
            await conn.execute(
                "INSERT INTO doc_snapshots (org_id, doc_id, seq, state, blob_sha256, size, at, state_vector)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (org_id, doc_id, upto, inline, blob, len(state), at, doc.get_state()))
        return Snapshot(seq=upto, at=at, size=len(state))

    async def _snapshot_state(self, row: dict[str, Any]) -> bytes:
        """A snapshot's bytes: in its row, or in the blob store (verified while read)."""
        if row["state"] is not None:
            return bytes(row["state"])
        if self.blobs is None:
            raise Unavailable("this document's snapshot is in the blob store, which is not configured")
        return await self.blobs.get(row["blob_sha256"])

    async def changed_since_snapshot(self, org_id: UUID) -> list[str]:
        """The org's documents with updates that no snapshot covers yet."""
        async with self.db.transaction(org_id) as conn:
            cur = await conn.execute(
                "SELECT d.id FROM documents d WHERE d.org_id = %s AND doc_last_seq(d.org_id, d.id)"
                " > coalesce((SELECT max(s.seq) FROM doc_snapshots s"
                "             WHERE s.org_id = d.org_id AND s.doc_id = d.id), 0) ORDER BY d.id", (org_id,))
            return [r["id"] for r in await cur.fetchall()]

    async def projection_behind(self, org_id: UUID) -> list[str]:
        """The org's boards whose entities do not yet reflect every update."""
        async with self.db.transaction(org_id) as conn:
            cur = await conn.execute("SELECT id FROM documents WHERE org_id = %s AND kind = 'board'"
                                     " AND projected_seq < doc_last_seq(org_id, id) ORDER BY id", (org_id,))
            return [r["id"] for r in await cur.fetchall()]

    async def all_ids(self, org_id: UUID) -> list[str]:
        async with self.db.transaction(org_id) as conn:
            cur = await conn.execute("SELECT id FROM documents WHERE org_id = %s ORDER BY id", (org_id,))
            return [r["id"] for r in await cur.fetchall()]

    async def prune(self, org_id: UUID, doc_id: str, *, now: datetime | None = None,
                    keep_updates: timedelta = timedelta(hours=24),
                    keep_hourly: timedelta = timedelta(days=30)) -> tuple[int, int]:
        """Apply retention to one document: (updates deleted, snapshots deleted). See
        ``prune_many``."""
        done = await self.prune_many(org_id, [doc_id], now=now, keep_updates=keep_updates,
                                     keep_hourly=keep_hourly)
        return done.get(doc_id, (0, 0))

    async def prune_many(self, org_id: UUID, doc_ids: list[str], *, now: datetime | None = None,
                         keep_updates: timedelta = timedelta(hours=24),
                         keep_hourly: timedelta = timedelta(days=30)) -> dict[str, tuple[int, int]]:
        """Apply retention to some documents of an org, in one transaction of two statements
        (a transaction per document cost the hourly pass 0.3 ms a document with nothing to
        do): delete updates older than ``keep_updates`` that a snapshot from before then
        covers, and thin snapshots older than ``keep_hourly`` to the last one of each day (the
        newest snapshot always stays; a deleted one's blob is collected). Returns (updates
        deleted, snapshots deleted) by document, for those that lost any."""
        now = now or datetime.now(UTC)
        done: dict[str, list[int]] = {}
        async with self.db.transaction(org_id) as conn:
            # Only what a snapshot from before the cut covers: a moment after the cut is read
            # from the newest snapshot at or before it and the updates after that one, which
            # must all still be there (with the newest snapshot of all, a moment between an
            # older snapshot and the cut lost the updates in between).
            cur = await conn.execute(
                "WITH covered AS (SELECT d.id, (SELECT max(s.seq) FROM doc_snapshots s"
                "                              WHERE s.org_id = %(org)s AND s.doc_id = d.id"
                "                              AND s.at <= %(cut)s) AS seq"
                "                 FROM unnest(%(docs)s::text[]) AS d(id))"
                " DELETE FROM doc_updates u USING covered c WHERE u.org_id = %(org)s AND u.doc_id = c.id"
                " AND u.seq <= c.seq AND u.at < %(cut)s RETURNING u.doc_id",
                {"org": org_id, "docs": doc_ids, "cut": now - keep_updates})
            for row in await cur.fetchall():
                done.setdefault(row["doc_id"], [0, 0])[0] += 1
            # A snapshot goes when the next one is from the same day (so the newest never does):
            # one pass over each document's snapshots, where asking each old one whether any
            # later one shares its day read them all again (a year of daily snapshots, 18 ms
            # a document every hour). A next one more than a day later is another day's: the
            # snapshots from after that are not read.
            cur = await conn.execute(
                "DELETE FROM doc_snapshots s USING ("
                " SELECT doc_id, seq FROM (SELECT doc_id, seq, at,"
                "                                 lead(at) OVER (PARTITION BY doc_id ORDER BY seq) AS next_at"
                "                          FROM doc_snapshots WHERE org_id = %(org)s"
                "                          AND doc_id = ANY(%(docs)s) AND at < %(cut)s + interval '1 day') x"
                " WHERE x.at < %(cut)s AND date_trunc('day', x.next_at) = date_trunc('day', x.at)) g"
                " WHERE s.org_id = %(org)s AND s.doc_id = g.doc_id AND s.seq = g.seq"
                " RETURNING s.doc_id, s.blob_sha256",
                # never a snapshot that updates still kept may need, from a day before their cut
                # on (with update retention longer than the hourly snapshots', thinning took the
                # snapshot those deleted updates had been folded into)
                {"org": org_id, "docs": doc_ids,
                 "cut": min(now - keep_hourly, now - keep_updates - timedelta(days=1))})
            gone = await cur.fetchall()
            for row in gone:
                done.setdefault(row["doc_id"], [0, 0])[1] += 1
        if self.blobs is not None:
            for sha256 in {r["blob_sha256"] for r in gone if r["blob_sha256"] is not None}:
                await gc.collect(self.db, self.blobs, sha256)
        return {doc_id: (updates, snapshots) for doc_id, (updates, snapshots) in done.items()}


@dataclass(frozen=True)
class Sync:
    updates: list[bytes]  # what the peer lacks, as Yjs updates to apply in order
    state_vector: bytes  # this document's, for the peer to answer with what it has that is new
    seq: int  # the last update included


@dataclass(frozen=True)
class Snapshot:
    seq: int
    at: datetime
    size: int


def _replay(doc: Doc, rows: list[Any], doc_id: str) -> None:
    """Apply logged updates in order. One that Yrs refuses (it was valid alone, but not here)
    is skipped and logged rather than making the whole document unreadable."""
    for row in rows:
        try:
            yjs.apply(doc, bytes(row["payload"]))
        except ValueError as exc:
            log.warning("update %s of document %r does not apply; skipped: %s", row["seq"], doc_id, exc)


def _judge_access(who: Principal, doc_id: str, access: list[Any], *, write: bool) -> bool:
    """From the rows of ``_ACCESS``: NotFound if the caller may not read the document,
    Forbidden if ``write`` and it may only read; otherwise whether it may write."""
    if not access:
        raise NotFound(f"document {doc_id!r} not found")
    role = access[0]["role"]
    require_project_role(who, role, write=write, what=f"document {doc_id!r}")
    return who.is_org_admin or role != "viewer"


def _document(row: dict[str, Any], exact_since: datetime | None = None) -> Document:
    return Document(id=row["id"], org_id=row["org_id"], project_id=row["project_id"], kind=row["kind"],
                    entity_id=row["entity_id"], last_seq=row["last_seq"],
                    projected_seq=row["projected_seq"], created_at=row["created_at"],
                    created_by=row["created_by"], exact_since=exact_since)


async def _exact_since(conn: Connection, org_id: UUID, doc_id: str) -> datetime | None:
    cur = await conn.execute(_EXACT_SINCE, {"org": org_id, "doc": doc_id})
    row = await cur.fetchone()
    return None if row is None else row["at"]
