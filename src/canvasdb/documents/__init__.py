"""Live Yjs documents: the durable op log (group commit) and the document store."""

from canvasdb.documents.log import Appended, UpdateLog
from canvasdb.documents.store import Change, Document, DocumentStore, PastState, Snapshot

__all__ = ["Appended", "Change", "Document", "DocumentStore", "PastState", "Snapshot", "UpdateLog"]
