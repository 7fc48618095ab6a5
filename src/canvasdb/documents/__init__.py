"""Live Yjs documents: the durable op log (group commit) and the document store."""

from canvasdb.documents.log import Appended, UpdateLog
from canvasdb.documents.store import Change, Document, DocumentStore, Snapshot

__all__ = ["Appended", "Change", "Document", "DocumentStore", "Snapshot", "UpdateLog"]
