"""Writes entities forever, printing each write once it is acknowledged (run by test_crash)."""

from __future__ import annotations

import asyncio
import random
import sys
from uuid import UUID

from canvasdb.db import Database
from canvasdb.entities import EntityStore
from canvasdb.tenancy import Principal


async def main(url: str, org: str, project: str) -> None:
    who = Principal(UUID(org), None, "owner")
    async with Database(url, min_size=4, max_size=4) as db:
        store = EntityStore(db, keyframe_interval=4)
        ids: list[UUID] = []

        async def writer(n: int) -> None:
            for i in range(10**9):
                if not ids or random.random() < 0.2:
                    e = await store.create(who, UUID(project), "crash", {"w": n, "i": i, "pad": "x" * 200})
                    ids.append(e.id)
                else:
                    e = await store.patch(who, random.choice(ids), {f"w{n}": i})
                print(f"{e.id} {e.version}", flush=True)

        await asyncio.gather(*(writer(n) for n in range(4)))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
