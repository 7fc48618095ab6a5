"""PostgreSQL access: the embedded server, migrations and the tenant-scoped pool."""

from canvasdb.db.embedded import EmbeddedPostgres
from canvasdb.db.migrate import migrate
from canvasdb.db.pool import Connection, ConnectionPool, Database, connection_lost, translate

__all__ = ["Connection", "ConnectionPool", "Database", "EmbeddedPostgres", "connection_lost", "migrate",
           "translate"]
