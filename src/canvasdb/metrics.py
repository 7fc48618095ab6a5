"""Prometheus metrics of this process, served at ``/metrics``.

Process-wide, like the Prometheus client's default registry: each gateway or
server exports its own, and the monitoring system adds them up.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric


class LoopCounter:
    """A labelled counter kept in plain ints, for what is counted once per message.

    prometheus_client takes a lock for every increment, which the gateway paid on every
    frame. What counts here runs on the event loop's thread, and a scrape reads the ints
    as they are."""

    def __init__(self, name: str, documentation: str, label: str) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self.counts: dict[str, int] = {}
        REGISTRY.register(self)

    def inc(self, value: str) -> None:
        self.counts[value] = self.counts.get(value, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, count in sorted(self.counts.items()):
            family.add_metric([value], count)
        yield family


class LoopHistogram:
    """A histogram kept in plain ints, for what is observed once per message (as above)."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0
        REGISTRY.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative, running = [], 0
        for bound, count in zip([*map(float, self.bounds), float("inf")], self.counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=self.sum)


DOC_APPENDS = Counter("canvasdb_doc_updates_appended_total", "Yjs updates durably appended to op logs")
DOC_APPEND_FAILURES = Counter("canvasdb_doc_update_append_failures_total",
                              "Appends that failed (the caller got an error, nothing was stored)")
DOC_COMMIT_SECONDS = Histogram(
    "canvasdb_doc_commit_seconds", "Time to commit one group-commit batch of updates",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
DOC_BATCH_UPDATES = Histogram("canvasdb_doc_commit_batch_updates", "Updates committed together",
                              buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
ENTITY_BATCH_CHANGES = Histogram("canvasdb_entity_commit_batch_changes",
                                 "Entity changes committed together (group commit)",
                                 buckets=(1, 2, 5, 10, 20, 50, 100, 200))
ENTITY_BATCH_SPLITS = Counter("canvasdb_entity_commit_batch_splits_total",
                              "Batches that failed as a whole and were written again change by change")
AS_OF_WAITS = Counter("canvasdb_as_of_waits_total",
                      "As-of reads of a recent moment that waited for a transaction still writing at it")
DOCS_LOADED = Gauge("canvasdb_docs_loaded", "Documents held in memory by this process")
DOC_CACHE_BYTES = Gauge("canvasdb_doc_cache_bytes", "Approximate bytes of the loaded documents")
PROJECTION_LAG_SECONDS = Histogram(
    "canvasdb_projection_lag_seconds",
    "How long the oldest update a projection run handled had waited since it was committed",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 7200))
PROJECTION_SKIPPED = Counter("canvasdb_projection_skipped_total",
                             "Board nodes or edges not projected: their data was refused (logged)")
PROJECTED_ENTITIES = Counter("canvasdb_projection_entity_writes_total",
                             "Entity versions written by the projection of boards")

DB_POOL_CONNECTIONS = Gauge("canvasdb_db_pool_connections",
                            "Connections of the request pool, by state: open (idle or in use) and idle",
                            ["state"])
DB_POOL_WAITING = Gauge("canvasdb_db_pool_waiting", "Requests waiting for a connection of the request pool")

GATEWAY_CONNECTIONS = Gauge("canvasdb_gateway_connections", "Open WebSocket connections")
GATEWAY_DOCS = Gauge("canvasdb_gateway_open_documents", "Documents with at least one connection here")
GATEWAY_MESSAGES = LoopCounter("canvasdb_gateway_messages", "Messages received, by kind", "kind")
GATEWAY_REJECTED = Counter("canvasdb_gateway_rejected_total", "Messages or connections refused, by reason",
                           ["reason"])
GATEWAY_THROTTLED = Counter("canvasdb_gateway_throttled_total",
                            "Updates that waited for their connection's rate limit")
GATEWAY_FANOUT = LoopHistogram("canvasdb_gateway_broadcast_fanout", "Connections an update was sent to",
                               buckets=(0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))

SEARCH_QUERIES = Counter("canvasdb_search_queries_total", "Searches answered, by mode", ["mode"])
SEARCH_DEGRADED = Counter("canvasdb_search_degraded_total",
                          "Searches answered with text only because the embedder failed")
SEARCH_EMBEDDED = Counter("canvasdb_search_vectors_made_total", "Entity vectors computed and stored")
SEARCH_BACKLOG = Gauge("canvasdb_search_embedding_backlog",
                       "Entities waiting for their vector, per org (as of the last indexing run)", ["org"])
