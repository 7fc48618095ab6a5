"""The services a process builds once over its database pool (API handlers, CLI commands)."""

from __future__ import annotations

from dataclasses import dataclass

from canvasdb.db import Database
from canvasdb.entities import EntityStore, TypeRegistry
from canvasdb.settings import Settings
from canvasdb.tenancy import Tenancy


@dataclass
class Services:
    settings: Settings
    db: Database
    tenancy: Tenancy
    types: TypeRegistry
    entities: EntityStore

    @classmethod
    def build(cls, settings: Settings, db: Database) -> Services:
        types = TypeRegistry(db)
        store = EntityStore(db, types, max_data_bytes=settings.max_data_bytes,
                            keyframe_interval=settings.keyframe_interval)
        return cls(settings, db, Tenancy(db), types, store)
