"""Appends Yjs updates forever from 20 concurrent tasks, printing each once acknowledged."""

from __future__ import annotations

import asyncio
import base64
import sys
from uuid import UUID

from pycrdt import Doc, Map

from canvasdb.db import Database
from canvasdb.documents import DocumentStore


async def main(url: str, org: str, doc_id: str) -> None:
    async with Database(url, min_size=2, max_size=4) as db:
        store = DocumentStore(db)
        source = Doc()
        made: list[bytes] = []
        source.observe(lambda e: made.append(e.update))
        nodes = source.get("nodes", type=Map)

        async def writer(n: int) -> None:
            for i in range(10**9):
                nodes[f"w{n}"] = i
                payload = made[-1]
                done = await store.append_checked(UUID(org), doc_id, payload)
                print(done.seq, base64.b64encode(payload).decode(), flush=True)

        await asyncio.gather(*(writer(n) for n in range(20)))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
