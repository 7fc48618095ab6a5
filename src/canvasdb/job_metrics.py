"""The job queue's state in ``/metrics``: ``canvasdb_jobs{task, status}``, the jobs waiting
(``todo``), running (``doing``) and failed, by task, so that a queue piling up shows
without SQL.

Read from the database when scraped, at most every ``JobCounts.every`` s and never while
the scrape waits: ``/metrics`` takes no token and is scraped often, so a scrape only
starts a read in the background (``read_soon``) when the last one is old, and serves the
counts last read (a database slow or away leaves them as they were; the failure is one
log line).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric

from canvasdb import jobs
from canvasdb.errors import one_line

log = logging.getLogger("canvasdb.jobs")
STATUSES = ("todo", "doing", "failed")
_COUNT = ("SELECT task_name, status::text AS status, count(*) AS jobs FROM procrastinate_jobs"
          " WHERE status IN ('todo', 'doing', 'failed') GROUP BY task_name, status")


class JobCounts:
    """The collector of ``canvasdb_jobs``. Every task of the queue has its three series,
    at 0 when it has no such job: a series that came and went would leave an alert on
    ``failed > 0`` or a graph of ``todo`` without a value to read (absent is not zero). The
    tasks are a fixed set; a task name only the database knows (a task of an older
    version) has series while it has jobs."""

    def __init__(self, every: float = 15.0, read_within: float = 10.0) -> None:
        self.every = every  # s between reads of the database
        self.read_within = read_within  # s a read may take before it is given up
        self.counts: dict[tuple[str, str], int] = {}
        self._read_at = -float("inf")  # monotonic, when the last read started
        self._reading: asyncio.Task[None] | None = None
        REGISTRY.register(self)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("canvasdb_jobs", "Jobs in the queue by task and status (todo, doing,"
                                   " failed), as last read from the database", labels=["task", "status"])
        counts = {(task, status): 0 for task in jobs.queue.tasks for status in STATUSES} | self.counts
        for (task, status), count in sorted(counts.items()):
            family.add_metric([task, status], count)
        yield family

    def read_soon(self) -> None:
        """Start a read in the background if the last one started ``every`` s ago (a failed
        one too: a database away is not asked on every scrape) and none is under way."""
        if self._reading is not None and not self._reading.done():
            return
        if time.monotonic() - self._read_at < self.every:
            return
        self._read_at = time.monotonic()
        self._reading = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            rows = await asyncio.wait_for(jobs.queue.connector.execute_query_all_async(_COUNT),
                                          self.read_within)
        except Exception as exc:  # the database slow or away, the queue not connected: the last counts stay
            log.warning("could not read the job queue's counts for /metrics: %s", one_line(exc))
            return
        self.counts = {(r["task_name"], r["status"]): r["jobs"] for r in rows}


JOB_COUNTS = JobCounts()
