"""Schema migrations: ordered SQL files, each in its own transaction, recorded in the database.

Two processes starting at once serialise on an advisory lock; the loser finds the
work done. A released migration is never edited: its checksum is recorded, and a
mismatch stops the start instead of silently running a different schema.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import psycopg

from canvasdb.errors import MigrationError, Unavailable, one_line

LOCK_KEY = 0x63616E7644420001  # "canvDB" + 1: one advisory lock for every schema change
OLDEST_SERVER = 150000  # PostgreSQL 15, as ``server_version_num`` gives it
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available() -> list[Migration]:
    """The migrations shipped with this package, in order."""
    found = []
    for entry in resources.files("canvasdb.db.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    return found


def migrate(conninfo: str, *, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply what is missing; return the migrations applied by this call."""
    todo = available() if migrations is None else migrations
    applied_now = []
    with _connect(conninfo) as conn:
        check_server_version(conn.info.server_version)
        conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
            done = {version: (name, checksum) for version, name, checksum in rows}
            for migration in todo:
                if migration.version in done:
                    _, checksum = done[migration.version]
                    if checksum != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version:04d}_{migration.name} differs from "
                            "the one applied to this database",
                            hint="released migrations are never edited; add a new one instead",
                        )
                    continue
                try:
                    with conn.transaction():
                        conn.execute(migration.sql)  # type: ignore[arg-type]
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                            (migration.version, migration.name, migration.checksum),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} failed and was rolled "
                        f"back: {exc.diag.message_primary or exc}", hint=_what_to_do(exc),
                    ) from exc
                applied_now.append(migration)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    return applied_now


def check_server_version(server_version_num: int) -> None:
    """Refuse a server older than ``OLDEST_SERVER`` before any migration runs: canvasdb is made
    for 15+, and on an older one a migration (or later a query) would fail with an error that
    does not name the cause, perhaps with part of the schema applied."""
    if server_version_num < OLDEST_SERVER:
        raise MigrationError(
            f"the database server runs PostgreSQL {_version_name(server_version_num)}; canvasdb needs "
            f"PostgreSQL {OLDEST_SERVER // 10000} or newer",
            hint="upgrade the server CANVASDB_DATABASE_URL names, or unset it for the embedded one",
        )


def _version_name(server_version_num: int) -> str:
    """``140009`` as ``14.9``, ``90624`` as ``9.6.24`` (three numbers before PostgreSQL 10)."""
    major, minor = divmod(server_version_num, 10000)
    if major >= 10:
        return f"{major}.{minor}"
    return f"{major}.{minor // 100}.{minor % 100}"


_NEEDS = ("the database user needs to own the schema and create roles, and the vector and pg_trgm "
          "extensions need creating once by a superuser (CREATE EXTENSION vector; CREATE EXTENSION "
          "pg_trgm) unless the user may")


def _what_to_do(exc: psycopg.Error) -> str:
    """The hint for a failed migration: an extension the server lacks is installed on it, not
    granted; PostgreSQL's own hint, when it gives one, follows."""
    if exc.sqlstate == "0A000":  # feature_not_supported: "extension ... is not available"
        return "install pgvector on the database server (canvasdb needs PostgreSQL 15+ with the vector " \
               "and pg_trgm extensions), or unset CANVASDB_DATABASE_URL for the embedded server"
    said = exc.diag.message_hint
    return f"{_NEEDS} (PostgreSQL says: {said})" if said else _NEEDS


def _connect(conninfo: str) -> psycopg.Connection:
    try:
        return psycopg.connect(conninfo, autocommit=True)
    except psycopg.OperationalError as exc:
        raise Unavailable(f"cannot connect to PostgreSQL: {one_line(exc)}",
                          hint="check CANVASDB_DATABASE_URL, or unset it for the embedded server") from None


def applied(conninfo: str) -> list[tuple[int, str]]:
    with _connect(conninfo) as conn:
        exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
        if exists is None or exists[0] is None:
            return []
        return [(v, n) for v, n in conn.execute(
            "SELECT version, name FROM schema_migrations ORDER BY version")]
