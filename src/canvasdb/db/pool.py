"""The connection pool, and the tenant-scoped transaction every query runs in.

Pooled connections run as ``canvasdb_app`` (SET ROLE on connect), a role without
BYPASSRLS, so row-level security holds even if the login user owns the tables or
is a superuser. Each transaction states its org with a transaction-local setting
that the RLS policies read; it cannot leak into the next user of the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from contextvars import ContextVar, Token
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from psycopg_pool.base import AttemptWithBackoff

from canvasdb import metrics
from canvasdb.db.horizon import Horizon
from canvasdb.errors import CanvasdbError, Conflict, InsufficientStorage, InvalidInput, NotFound, Unavailable

log = logging.getLogger("canvasdb.db")
APP_ROLE = "canvasdb_app"
CHECK_SECONDS = 2.0  # longest a failed request waits for the pool's idle connections to be checked
_TURNS_SPACE = 0x63646233  # "cdb3" (cdb1: blob collection, cdb2: the op log): ``taking_turns``'s locks
RECONNECT_EVERY = 2.0  # while the server is away, the pool tries to connect again this often at most
# What a request waiting for that next attempt allows the attempt itself (it starts up to
# RECONNECT_EVERY s later, and then connects): waiting RECONNECT_EVERY alone, one could give
# up just as the attempt that would have served it was connecting.
ATTEMPT_ALLOWANCE = 1.0
ORG_SHARE = 0.75  # of the pool's connections, the most one org's work holds at once
_LEAST_WAIT = 0.001  # psycopg_pool fails a wait of 0 s at once, even with a connection idle
_HOLDING: ContextVar[frozenset[UUID]] = ContextVar("canvasdb_org_shares", default=frozenset())
_SET_ORG = "SELECT set_config('canvasdb.org_id', %s, true)"
_SET_ORG_GENERIC = ("SELECT set_config('canvasdb.org_id', %s, true),"
                    " set_config('plan_cache_mode', 'force_generic_plan', true)")
Connection = psycopg.AsyncConnection[dict[str, Any]]
# The request pools of this process, read when /metrics is scraped: a pool whose connections
# are all in use, and requests waiting for one, come before the 503s they end in.
_POOLS: weakref.WeakSet[AsyncConnectionPool[Any]] = weakref.WeakSet()


def _pool_measure(name: str) -> int:
    return sum(pool.get_stats().get(name, 0) for pool in list(_POOLS) if not pool.closed)


metrics.DB_POOL_CONNECTIONS.labels("open").set_function(lambda: _pool_measure("pool_size"))
metrics.DB_POOL_CONNECTIONS.labels("idle").set_function(lambda: _pool_measure("pool_available"))
metrics.DB_POOL_WAITING.set_function(lambda: _pool_measure("requests_waiting"))


class Database:
    """An async pool of connections to one canvasdb database; use as ``async with``."""

    def __init__(
        self,
        conninfo: str,
        *,
        min_size: int = 2,
        max_size: int = 20,
        statement_timeout_ms: int = 10_000,
        timeout: float = 10.0,
    ) -> None:
        self.conninfo = conninfo
        self._statement_timeout_ms = statement_timeout_ms
        self.pool: AsyncConnectionPool[Connection] = ConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            configure=self._configure,
            kwargs={"autocommit": True, "row_factory": dict_row},
        )
        self.pool._pool = _MostRecentFirst(self.pool._pool)
        _POOLS.add(self.pool)
        self._checking: asyncio.Task[None] | None = None
        self._org_limit = max(1, int(max_size * ORG_SHARE))
        self._shares: dict[UUID, _Share] = {}
        self.horizon = Horizon(self, statement_timeout_ms / 1000)  # as-of reads wait on it (``settle``)

    async def _configure(self, conn: Connection) -> None:
        set_json_loads(read_json, conn)
        await conn.execute(f"SET ROLE {APP_ROLE}")
        await conn.execute(
            "SELECT set_config('statement_timeout', %s, false)", (str(self._statement_timeout_ms),)
        )

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Database and pool errors raised as canvasdb errors. A connection that broke (the
        server restarted, or ended it) says the pool's idle ones likely died too: they are
        checked at once, and the requests that come meanwhile wait for that (``_settled``),
        so one request answers 503, not one per dead connection (each would fail once,
        whenever it was next handed out)."""
        try:
            yield
        except PoolTimeout as exc:  # (an OperationalError too) no connection within the wait
            if self.pool.unreachable:
                raise Unavailable("the database is unreachable", retry=True,
                                  retry_after=round(RECONNECT_EVERY),
                                  hint=f"connecting again every {RECONNECT_EVERY:g} s") from None
            raise Unavailable("no database connection available", hint=str(exc), retry=True) from None
        except psycopg.Error as exc:
            if connection_lost(exc) and self._checking is None:
                self._checking = asyncio.get_running_loop().create_task(self.pool.check())
                self._checking.add_done_callback(self._checked)
            raise translate(exc) from exc

    def _checked(self, task: asyncio.Task[None]) -> None:
        self._checking = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("checking the pool's idle connections failed: %s", task.exception())

    async def _settled(self) -> None:
        """Wait (a little) for a check of the idle connections in progress."""
        if self._checking is not None:
            with suppress(Exception):  # the server is still away: the request will say so
                await asyncio.wait_for(asyncio.shield(self._checking), CHECK_SECONDS)

    async def ping(self, *, timeout: float = 2.0) -> None:
        """``SELECT 1`` within ``timeout`` seconds (connection wait included), for health
        probes: Unavailable rather than the pool's 10 s wait while the database is away."""
        for attempt in range(2):  # a connection that died idle is dropped; a fresh one answers
            try:
                await self._settled()
                with self._translated():
                    async with self.pool.connection(timeout=timeout) as conn:
                        await conn.execute("SELECT 1")
                return
            except Unavailable as exc:
                cause = exc.__cause__  # None for a pool timeout: no connection to retry on
                if attempt or not (isinstance(cause, psycopg.Error) and connection_lost(cause)):
                    raise

    async def open(self) -> Database:
        try:
            await self.pool.open(wait=True)
        except PoolTimeout as exc:
            raise Unavailable("cannot connect to PostgreSQL", hint=str(exc)) from None
        return self

    async def close(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
        await self.pool.close()

    async def __aenter__(self) -> Database:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def one(self, query: str, params: Any) -> dict[str, Any] | None:
        """Run one statement on its own (autocommit) and return its first row, if any."""
        rows = await self.all(query, params)
        return rows[0] if rows else None

    async def all(self, query: str, params: Any) -> list[dict[str, Any]]:
        """Run one statement on its own (autocommit) and return its rows."""
        await self._settled()
        with self._translated():
            async with self.pool.connection() as conn:
                cur = await conn.execute(query, params)
                return await cur.fetchall()

    async def read(self, org_id: UUID, query: str, params: Any, *, generic_plans: bool = False,
                   row_factory: Any = dict_row, binary: bool = False) -> list[Any]:
        """Run one read-only statement scoped to ``org_id`` and return its rows.

        The org setting and the statement travel together in a pipeline with no BEGIN or
        COMMIT: PostgreSQL runs the statements before a Sync as one implicit transaction,
        so the setting lasts exactly as long as the statement, as in ``transaction()``, at
        two statements' cost instead of four (a third less for a small graph query).
        ``generic_plans`` as in ``transaction()``; ``binary``: results in binary format.
        """
        await self._settled()
        async with self._org_share(org_id) as wait:
            with self._translated():
                async with self.pool.connection(wait) as conn, conn.cursor(row_factory=row_factory) as cur:
                    async with _pipelined(conn):
                        await cur.execute(_SET_ORG_GENERIC if generic_plans else _SET_ORG, (str(org_id),))
                        await cur.execute(query, params, binary=binary)
                    return await cur.fetchall()

    def _org_share(self, org_id: UUID | None) -> _OrgTurn:
        """One of the ``ORG_SHARE`` of the pool's connections that one org's work may hold at
        once, so that an org running heavy queries leaves connections to the others (25 graph
        walks of 3 s each in one org filled the pool, and every other org's reads waited 10 s,
        then failed). Past its share an org's work waits for a turn, then for a connection,
        the two within the pool's timeout (then 503): it is entered as the wait left for the
        connection, None if it waited for no turn. Work of a task that holds the org's share
        already (a read inside one of its transactions) does not wait for it again. The group
        commits of entity changes and of the op log take connections outside it: a batch holds
        several orgs' writes, and waiting for each one's turn would hold up every other org's
        writes behind the busiest; they hold two connections each at most."""
        return _OrgTurn(self, org_id)

    @asynccontextmanager
    async def taking_turns(self, name: str, *, wait: bool = True) -> AsyncIterator[bool]:
        """Whether this is the turn of ``name`` for the block: no other holder of ``name`` runs
        theirs meanwhile, in any process (a session advisory lock, for work of several
        transactions). ``wait``: for the turn, at most the statement timeout (then
        Unavailable); without, the block runs at once, told False if it is another's turn.

        The lock is held on a connection of its own, outside the pool, closed at the end
        (the server frees a closed session's locks, however the block ended, cancelled while
        waiting included): held on a pooled connection it could go back to the pool still
        held, and the block, needing connections of the pool, could starve it."""
        async with self.login_session() as conn:
            with self._translated():
                cur = await conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s)), true" if wait else
                                         "SELECT null, pg_try_advisory_lock(%s, hashtext(%s))",
                                         (_TURNS_SPACE, name))
                row = await cur.fetchone()
            yield bool(row and row[1])

    @asynccontextmanager
    async def login_session(self, *, statement_timeout_ms: int | None = None
                            ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of its own, outside the pool, in autocommit mode, as the login user (the
        one that ran the migrations, not ``canvasdb_app``), closed at the end: for a session's
        state (advisory locks) and for what runs outside any transaction as the tables' owner.
        ``statement_timeout_ms``: the pool's unless given (0: none)."""
        with self._translated():
            conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, connect_timeout=10)
        try:
            timeout = self._statement_timeout_ms if statement_timeout_ms is None else statement_timeout_ms
            with self._translated():
                await conn.execute("SELECT set_config('statement_timeout', %s, false)", (str(timeout),))
            yield conn
        finally:
            await conn.close()

    @asynccontextmanager
    async def transaction(self, org_id: UUID | None = None, *,
                          generic_plans: bool = False) -> AsyncIterator[Connection]:
        """A transaction scoped to ``org_id`` (None: global tables only; RLS hides tenant rows).

        ``generic_plans``: prepared statements run their generic plan, never re-planned for
        the parameters at hand (for statements whose best plan does not depend on them, and
        whose planning costs more than their execution: the graph's recursive queries).
        """
        # Pipeline mode: BEGIN and the org setting travel with the first query, and COMMIT
        # with the last one when its result is read after the block (one round trip saved
        # at each end). Code inside the block reads results as usual.
        await self._settled()
        async with self._org_share(org_id) as wait:
            with self._translated():
                async with self.pool.connection(wait) as conn, _pipelined(conn):
                    await conn.execute(b"BEGIN")
                    if org_id is not None:
                        await conn.execute(_SET_ORG_GENERIC if generic_plans else _SET_ORG, (str(org_id),))
                    yield conn
                    await conn.execute(b"COMMIT")


_DIGITS_ZERO = bytes(48 if b in b"0123456789" else 32 for b in range(256))  # digits to '0', the rest to ' '
_LONG_RUN = b"0" * 19


def read_json(data: bytes) -> Any:
    """A json or jsonb value as Python objects, read with orjson (1.2 against 2.6 µs for a
    typical entity, the check below included). The standard library reads what orjson would
    read differently or not at all: integers past 64 bits (orjson makes them floats, so any
    run of 19 digits sends the value there; found by mapping digits to '0' and the rest to
    spaces, five times faster than a regular expression), numbers past a double's range and
    nesting past 1,024 levels (orjson refuses those)."""
    if _LONG_RUN in data.translate(_DIGITS_ZERO):
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def database_away(exc: BaseException) -> bool:
    """The database cannot be reached: no connection free in time, or the one in use lost.
    A statement's own failure (over the timeout, a limit, the disk full) is not that."""
    if isinstance(exc, Unavailable):
        if exc.__cause__ is None:  # the pool's wait for a connection ran out
            return True
        exc = exc.__cause__
    return isinstance(exc, psycopg.Error) and connection_lost(exc)


def connection_lost(exc: psycopg.Error) -> bool:
    """The connection itself failed (class 08, the server shutting down or crashing: 57P0x,
    or no SQLSTATE at all), not the statement."""
    state = exc.sqlstate or ""
    return isinstance(exc, psycopg.OperationalError) and (not state or state[:2] == "08"
                                                          or state.startswith("57P0"))


@asynccontextmanager
async def _pipelined(conn: Connection) -> AsyncIterator[None]:
    """Pipeline mode; if anything fails, the connection goes back to the pool idle."""
    try:
        async with conn.pipeline():
            yield
    except BaseException:
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            await conn.rollback()
        raise


class _Share:
    """One org's use of the pool: how many of its requests hold a turn, and who waits for one."""

    __slots__ = ("holding", "waiting")

    def __init__(self) -> None:
        self.holding = 0
        self.waiting: deque[asyncio.Future[None]] = deque()


class _OrgTurn:
    """``Database._org_share``, a class of its own since it is on every query's path (1.3 µs a
    call when the org has turns to spare)."""

    __slots__ = ("db", "org_id", "share", "reset")

    def __init__(self, db: Database, org_id: UUID | None) -> None:
        self.db, self.org_id = db, org_id
        self.share: _Share | None = None
        self.reset: Token[frozenset[UUID]] | None = None

    async def __aenter__(self) -> float | None:
        org_id, db = self.org_id, self.db
        if org_id is None or org_id in _HOLDING.get():
            return None
        share = db._shares.get(org_id)
        if share is None:
            share = db._shares[org_id] = _Share()
        left = None
        if share.holding >= db._org_limit or share.waiting:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + db.pool.timeout
            turn = loop.create_future()
            share.waiting.append(turn)
            try:
                async with asyncio.timeout_at(deadline):
                    await turn
            except BaseException as exc:
                if turn.done() and not turn.cancelled():  # given just as the wait ended: pass it on
                    self._pass_on(share)
                else:
                    turn.cancel()
                    with suppress(ValueError):  # (a holder leaving may have dropped it already)
                        share.waiting.remove(turn)
                    self._forget(share)
                if isinstance(exc, TimeoutError):
                    raise Unavailable(f"this org has {db._org_limit} requests at the database at once;"
                                      " try again shortly", retry=True) from None
                raise
            left = max(deadline - loop.time(), _LEAST_WAIT)
        else:
            share.holding += 1
        self.share = share
        self.reset = _HOLDING.set(_HOLDING.get() | {org_id})
        return left

    async def __aexit__(self, *exc: object) -> None:
        if self.reset is not None:
            assert self.share is not None  # (set together)
            try:
                _HOLDING.reset(self.reset)
            finally:
                self._pass_on(self.share)

    def _pass_on(self, share: _Share) -> None:
        """Hand this turn to the first waiter still waiting, or give it back."""
        while share.waiting:
            turn = share.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        share.holding -= 1
        self._forget(share)

    def _forget(self, share: _Share) -> None:
        if not share.holding and not share.waiting:
            self.db._shares.pop(self.org_id, None)  # type: ignore[arg-type]


class ConnectionPool(AsyncConnectionPool):  # type: ignore[type-arg]
    """psycopg_pool's pool, trying to replace a lost connection every ``RECONNECT_EVERY`` s,
    and making a request wait no longer than that while the server is known to be away.

    Its own attempts wait 1, 2, 4, 8 ... s, with no ceiling short of giving up after five
    minutes: after a 35 s outage the next attempt could be 30 s after the server was back,
    every request failing meanwhile. psycopg_pool has no setting for this; its attempt
    object is passed in when it makes one, so ours is (``test_db`` checks it still works).

    While the server is away, every request waited the pool's whole timeout (10 s) for a
    connection that could not come. Now an attempt that fails to reach the server
    (``unreachable``) fails the requests waiting, and while no connection is idle, a new
    request waits only for the next attempt (``RECONNECT_EVERY`` s, and ``ATTEMPT_ALLOWANCE``
    for the attempt itself): either way a request waits for the next attempt at most, and
    gets its connection if the server is back, else its 503. A pool whose connections are
    all busy (slow queries, a server that answers) keeps its full wait. The job queue's
    pool is one too.
    """

    unreachable = False  # the last attempt to connect failed to reach the server
    _connected_at = -math.inf  # (monotonic) when an attempt last succeeded

    async def getconn(self, timeout: float | None = None) -> Any:
        if self.unreachable and not self._pool:
            timeout = min(self.timeout if timeout is None else timeout, RECONNECT_EVERY + ATTEMPT_ALLOWANCE)
        return await super().getconn(timeout)

    async def _connect(self, timeout: float | None = None) -> Any:
        try:
            conn = await super()._connect(timeout)
        except psycopg.Error as exc:  # not "too many clients": a server that answers is not away
            # (nor one another attempt reached a moment ago: attempts run side by side)
            reached_lately = time.monotonic() - self._connected_at < RECONNECT_EVERY
            self.unreachable = connection_lost(exc) and not reached_lately
            if self.unreachable:
                async with self._lock:
                    waiting = list(self._waiting)
                    self._waiting.clear()
                for client in waiting:
                    await client.fail(PoolTimeout("the server is unreachable"))
            raise
        self.unreachable, self._connected_at = False, time.monotonic()
        return conn

    async def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        await super()._add_connection(attempt or _Reconnecting(timeout=self.reconnect_timeout), growing)


class _Reconnecting(AttemptWithBackoff):
    INITIAL_DELAY = 0.5

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_EVERY)


class _MostRecentFirst(deque):  # type: ignore[type-arg]
    """The pool's idle connections, handed out last in, first out.

    psycopg_pool takes idle connections from the left of its deque and returns them to
    the right: round robin, so at any load below the pool's size every query met the
    backend that had been idle longest, its process asleep and its caches cold (measured:
    a commit through a pool of four took 0.46 ms against 0.36 through one connection).
    Taking from the right instead reuses the connection just returned, and the others
    stay idle (the pool, shrinking after ten idle minutes, now closes the most recently
    used first: its deque has a single end to take from). psycopg_pool has no option for
    this, so its deque is replaced; ``test_db`` checks the order, should that change.
    """

    def popleft(self):  # type: ignore[no-untyped-def]
        return self.pop()


def translate(exc: psycopg.Error) -> CanvasdbError:
    """Map a database error to the canvasdb family, by SQLSTATE."""
    constraint = exc.diag.constraint_name or ""
    if constraint.startswith("relationships_") and isinstance(
            exc, pg_errors.ForeignKeyViolation | pg_errors.CheckViolation):
        # A reference field that names a missing entity, or would close a forbidden cycle.
        return InvalidInput(exc.diag.message_primary or "a relationship is not allowed",
                            pointer="/data", constraint=constraint)
    if isinstance(exc, pg_errors.UniqueViolation):
        return Conflict("already exists", constraint=exc.diag.constraint_name)
    if isinstance(exc, pg_errors.ForeignKeyViolation):
        return NotFound("a referenced object does not exist", constraint=exc.diag.constraint_name)
    if isinstance(exc, pg_errors.CheckViolation | pg_errors.NotNullViolation):
        return InvalidInput("a value is not allowed", constraint=exc.diag.constraint_name)
    if isinstance(exc, pg_errors.SerializationFailure | pg_errors.DeadlockDetected):
        return Conflict("concurrent change, try again", retry=True)
    if isinstance(exc, pg_errors.DiskFull):  # (as for the blob store's disk)
        return InsufficientStorage("the database's disk is full", hint=str(exc).strip())
    if isinstance(exc, pg_errors.QueryCanceled):
        return Unavailable("the query took too long and was cancelled", retry=True)
    if isinstance(exc, pg_errors.DataError):
        # Class 22 (bad text, bad encoding, bad values), and psycopg's own refusal of NUL
        # characters in text parameters, which never reaches the server (no SQLSTATE).
        return InvalidInput(f"invalid value: {exc.diag.message_primary or exc}")
    if isinstance(exc, psycopg.OperationalError):
        return Unavailable("database unavailable", hint=str(exc).strip(), retry=True)
    return CanvasdbError(f"database error ({exc.sqlstate})")
