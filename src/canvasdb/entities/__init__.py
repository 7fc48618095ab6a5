"""Entities: schema-less JSON documents with full version history, and their type registry."""

from canvasdb.entities.store import Entity, EntityStore, Page, Version, parse_as_of, parse_as_of_time, utc
from canvasdb.entities.types import EntityType, TypeRegistry

__all__ = ["Entity", "EntityStore", "EntityType", "Page", "TypeRegistry", "Version", "parse_as_of",
           "parse_as_of_time", "utc"]
