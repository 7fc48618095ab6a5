"""Indexes an org's search queue, then stops for ever in the middle of its second batch's
embedding, having said so (run by test_search_crash, which kills it there)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from canvasdb.db import Database
from canvasdb.search.embedders import embedder_from_settings
from canvasdb.search.indexer import Indexer
from canvasdb.search.models import Models
from canvasdb.settings import Settings


class StallsOnSecondBatch:
    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.model, self.kind, self.dimension = embedder.model, embedder.kind, embedder.dimension
        self.batches = 0

    async def embed(self, texts: Sequence[str], **kw: Any) -> Any:
        self.batches += 1
        if self.batches == 2:
            print("stalled", flush=True)
            await asyncio.Event().wait()
        return await self.embedder.embed(texts, **kw)


async def main(url: str, org: str) -> None:
    async with Database(url, min_size=1, max_size=2) as db:
        embedder = StallsOnSecondBatch(embedder_from_settings(Settings(database_url=url)))
        await Indexer(db, Models(db, embedder)).drain(UUID(org))  # type: ignore[arg-type]


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:3]))
