"""Content in the blob store is shared: by attachments with the same bytes, in any org, and by
document snapshots too large for their row. It is removed when the last row pointing at it
goes, without a table of reference counts, by two advisory locks per content hash:

- a writer first stores the content (no lock, it may take minutes), then, in the transaction
  that writes its row, takes the hash's lock *shared* (``hold``), checks that the content is
  still there and commits the row;
- collecting content (``collect``) takes the hash's lock *exclusive*, asks whether any row
  still points at it (``blob_in_use``: attachments and snapshots of every org, migration
  0019), and deletes it only if none does, before it lets go of the lock.

So content is never deleted under a row that is being committed. What is left is a leak,
never a loss: content whose writer died between the upload and the commit stays behind,
until the orphan sweep (``canvasdb.blobs.sweep``) collects it once it is old enough.
"""

from __future__ import annotations

import logging

from canvasdb.blobs.store import BlobStore
from canvasdb.db import Connection, Database
from canvasdb.errors import CanvasdbError

log = logging.getLogger("canvasdb.blobs")
_LOCK_SPACE = 0x63646231  # "cdb1": (this, first 32 bits of the hash) are the two-int advisory lock key


def lock_key(sha256: str) -> tuple[int, int]:
    return _LOCK_SPACE, int.from_bytes(bytes.fromhex(sha256[:8]), "big", signed=True)


async def hold(conn: Connection, sha256: str) -> None:
    """Keep ``sha256`` from being collected until this transaction ends (check that it still
    exists after this: it may have been collected before)."""
    # Fetching the result makes a pipeline wait until the lock is actually held.
    await (await conn.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", lock_key(sha256))).fetchone()


async def collect(db: Database, blobs: BlobStore, sha256: str) -> bool:
    """Delete the content if no row of any org points at it; True if it did. Never raises: a
    failure here leaves unreferenced content behind (logged), which costs space and nothing
    else (the orphan sweep, ``canvasdb.blobs.sweep``, tries again later)."""
    try:
        async with db.transaction() as conn:
            # Pipelined: the lock is taken before the question is asked, and both have been
            # answered (the lock held) once the fetch returns.
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", lock_key(sha256))
            row = await (await conn.execute("SELECT blob_in_use(%s) AS used", (sha256,))).fetchone()
            if row is None or row["used"]:
                return False
            await blobs.delete(sha256)
            return True
    except CanvasdbError as exc:
        log.warning("blob %s was left in the store: %s", sha256, exc.detail)
        return False
