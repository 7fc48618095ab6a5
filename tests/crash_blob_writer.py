"""Stores a file as the attachment ``crashed.bin`` (run by test_blob_sweep, which kills it)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from uuid import UUID

from canvasdb.blobs import Attachments, FilesystemBlobStore
from canvasdb.db import Database
from canvasdb.tenancy import Principal


async def main(url: str, org: str, blobs: str, content: str) -> None:
    async with Database(url, min_size=1, max_size=1) as db:
        attachments = Attachments(db, FilesystemBlobStore(blobs))
        await attachments.put(Principal(UUID(org), None, "owner"), "crashed.bin", Path(content).read_bytes())


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
