"""The services a process builds once over its database pool (API handlers, CLI commands)."""

from __future__ import annotations

from dataclasses import dataclass

from canvasdb.blobs import Attachments, BlobStore, open_blob_store
from canvasdb.db import Database
from canvasdb.documents import DocumentStore, UpdateLog
from canvasdb.documents.projection import BoardProjection
from canvasdb.entities import EntityStore, TypeRegistry
from canvasdb.graph import Graph, RelationshipStore
from canvasdb.search.embedders import Embedder, embedder_from_settings
from canvasdb.search.engine import Search
from canvasdb.search.indexer import Indexer
from canvasdb.search.models import Models
from canvasdb.settings import Settings
from canvasdb.tenancy import Tenancy


@dataclass
class Services:
    settings: Settings
    db: Database
    tenancy: Tenancy
    types: TypeRegistry
    entities: EntityStore
    documents: DocumentStore
    blobs: BlobStore
    attachments: Attachments
    projection: BoardProjection
    relationships: RelationshipStore
    graph: Graph
    models: Models
    indexer: Indexer
    search: Search

    @classmethod
    def build(cls, settings: Settings, db: Database, *, blobs: BlobStore | None = None,
              embedder: Embedder | None = None) -> Services:
        """Everything over ``db``; ``blobs`` defaults to the store CANVASDB_BLOB_BACKEND names,
        ``embedder`` to the one CANVASDB_EMBEDDER names (the local model unless set)."""
        types = TypeRegistry(db)
        store = EntityStore(db, types, max_data_bytes=settings.max_data_bytes,
                            keyframe_interval=settings.keyframe_interval)
        log = UpdateLog(db, window=settings.group_commit_window_ms / 1000,
                        max_batch=settings.group_commit_max_batch)
        blobs = blobs if blobs is not None else open_blob_store(settings)
        documents = DocumentStore(db, log, cache_bytes=settings.doc_cache_bytes,
                                  max_update_bytes=settings.max_update_bytes,
                                  compact_after_updates=settings.compact_after_updates,
                                  compact_after_bytes=settings.compact_after_bytes,
                                  blobs=blobs, snapshot_inline_bytes=settings.snapshot_inline_bytes)
        attachments = Attachments(db, blobs, max_bytes=settings.max_attachment_bytes)
        projection = BoardProjection(documents, store)
        key = settings.embedder_api_key.get_secret_value() if settings.embedder_api_key else None
        models = Models(db, embedder or embedder_from_settings(settings), api_key=key)
        search = Search(db, models, rank_cutoff=settings.search_rank_cutoff,
                        facet_cap=settings.search_facet_cap,
                        total_cap=settings.search_total_cap, exact_below=settings.search_exact_below,
                        ef_search=settings.search_ef_search,
                        embed_timeout=settings.search_embed_timeout_ms / 1000)
        return cls(settings, db, Tenancy(db), types, store, documents, blobs, attachments, projection,
                   RelationshipStore(db), Graph(db), models, Indexer(db, models), search)

    async def close(self) -> None:
        """Finish pending work (appends waiting for their commit) before the pool closes."""
        try:
            await self.documents.close()
        finally:
            await self.blobs.close()
            await self.models.close()
