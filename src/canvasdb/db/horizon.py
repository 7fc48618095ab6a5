"""As-of reads of a past moment are repeatable: once a moment is past, "as of" it never changes.

A version's time (entities, relationships, the op log) is taken inside its transaction,
before the commit, and a commit may come well after (a group commit, a slow transaction):
read as of a moment after such a stamp while its transaction was still open, the version
was missing, and read again after the commit, there. So an as-of read of a past moment
waits until every transaction that may still commit a version stamped at or before it has
ended: the SQL function ``as_of_horizon`` (migrations 0028, 0035) answers the moment before
which nothing can still appear, from the sessions holding a transaction id. A version's time
is taken only once its transaction has one (``version_time()``), so a session without one (a
long read, say) can only stamp a time later than the check, and is not waited for. Every
moment before a horizon once seen stays settled, so each process keeps the latest one, and a
read of an older moment (most are) costs nothing; one of a recent moment costs a statement,
and waits for the writers that were in progress at that moment. A moment not yet past (now,
or later) is read as now, as before: nothing is promised of it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from canvasdb import metrics
from canvasdb.errors import Unavailable

if TYPE_CHECKING:
    from canvasdb.db.pool import Database

_CHECK = "SELECT as_of_horizon() AS settled, statement_timestamp() AS now"
_FIRST_PAUSE_S = 0.001
_LONGEST_PAUSE_S = 0.01


class Horizon:
    """The moments of one database that as-of reads may read at once (``settle``)."""

    def __init__(self, db: Database, timeout_s: float) -> None:
        self.db = db
        self.timeout_s = timeout_s
        self.settled = datetime.min.replace(tzinfo=UTC)  # everything stamped before it is committed

    async def settle(self, moment: datetime | None) -> None:
        """Return once no transaction can still commit a version stamped at or before
        ``moment`` (at once for None, a settled moment, or one not yet past); Unavailable
        if one is still open after the statement timeout."""
        if moment is None or moment < self.settled:
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        pause = _FIRST_PAUSE_S
        waited = False
        while True:
            row = await self.db.one(_CHECK, ())
            assert row is not None
            if row["settled"] is not None:  # (None: a session it may not see is writing)
                self.settled = max(self.settled, row["settled"])
            if moment < self.settled or moment >= row["now"]:
                return
            if not waited:
                waited = True
                metrics.AS_OF_WAITS.inc()
            if asyncio.get_running_loop().time() + pause > deadline:
                raise Unavailable(f"a transaction that may still write as of {moment.isoformat()} is"
                                  " still open; try again", retry=True)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _LONGEST_PAUSE_S)


__all__ = ["Horizon"]
