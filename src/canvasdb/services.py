"""The services a process builds once over its database pool (API handlers, CLI commands)."""

from __future__ import annotations

from dataclasses import dataclass

from canvasdb.blobs import Attachments, BlobStore, open_blob_store
from canvasdb.db import Database
from canvasdb.documents import DocumentStore, UpdateLog
from canvasdb.documents.projection import BoardProjection
from canvasdb.entities import EntityStore, TypeRegistry
from canvasdb.graph import Graph, RelationshipStore
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

    @classmethod
    def build(cls, settings: Settings, db: Database, *, blobs: BlobStore | None = None) -> Services:
        """Everything over ``db``; ``blobs`` defaults to the store CANVASDB_BLOB_BACKEND names."""
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
        return cls(settings, db, Tenancy(db), types, store, documents, blobs, attachments, projection,
                   RelationshipStore(db), Graph(db))

    async def close(self) -> None:
        """Finish pending work (appends waiting for their commit) before the pool closes."""
        try:
            await self.documents.close()
        finally:
            await self.blobs.close()
