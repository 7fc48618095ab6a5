"""PostgreSQL access: the embedded server, migrations and the tenant-scoped pool."""

from canvasdb.db.embedded import EmbeddedPostgres
from canvasdb.db.migrate import migrate
from canvasdb.db.pool import Connection, ConnectionPool, Database, database_away, translate

__all__ = ["Connection", "ConnectionPool", "Database", "EmbeddedPostgres", "database_away", "migrate",
           "translate"]
