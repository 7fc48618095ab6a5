"""The graph: typed, versioned relationships between entities, and the questions asked of them."""

from canvasdb.graph.relationships import Relationship, RelationshipStore
from canvasdb.graph.traverse import Graph

__all__ = ["Graph", "Relationship", "RelationshipStore"]
