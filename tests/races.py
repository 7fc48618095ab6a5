"""Two transactions at once, the first held open at the critical point.

A race test holds a transaction of its own open after its write (the first of the two),
starts the second through the application, waits until that one has finished or waits on
a lock of the first, then commits the first and looks at what both left. A race of three
(a deadlock) chains ``waiting``: the third starts once the second waits on the first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from conftest import Tenant

T = TypeVar("T")


@asynccontextmanager
async def held(pg_url: str, t: Tenant) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A transaction of the tenant's org, left open by the caller's statements (rolled back
    unless the caller commits)."""
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        await conn.execute("SELECT set_config('canvasdb.org_id', %s, false)", (str(t.org_id),))
        await conn.commit()
        yield conn
        await conn.rollback()


async def change(conn: psycopg.AsyncConnection[Any], t: Tenant, id: UUID, op: str,
                 value: str | None = None) -> None:
    """One ``entity_change`` of the org's owner, as the store makes it, in ``conn``'s transaction."""
    cur = await conn.execute(
        "SELECT outcome FROM entity_change(%s, %s, %s, true, %s, %s::jsonb, NULL, NULL, 20, 1000000)",
        (t.org_id, id, t.owner_id, op, value))
    row = await cur.fetchone()
    assert row is not None and row[0] == "done", row


async def waiting(pg_url: str, holders: list[int], work: Awaitable[T]) -> tuple[asyncio.Future[T], int | None]:
    """Start ``work`` and return it once it is done or its backend waits on a lock that one of
    the backends ``holders`` holds (and is not one of them), with the waiting backend's pid
    (None if it is done)."""
    task = asyncio.ensure_future(work)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as watcher:
        while not task.done():
            cur = await watcher.execute(
                "SELECT pid FROM pg_stat_activity WHERE pg_blocking_pids(pid) && %(h)s::integer[]"
                " AND NOT pid = ANY(%(h)s::integer[])", {"h": holders})
            row = await cur.fetchone()
            if row is not None:
                return task, row[0]
            await asyncio.sleep(0.005)
    return task, None


async def second(pg_url: str, first: psycopg.AsyncConnection[Any], work: Awaitable[T]) -> T:
    """Run ``work`` while ``first``'s transaction is open; once it is done or waits on a lock
    ``first`` holds, commit ``first``, and return what ``work`` returns (or raise what it raises)."""
    task, _ = await waiting(pg_url, [first.info.backend_pid], work)
    await first.commit()
    return await task
