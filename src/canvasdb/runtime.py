"""Wiring shared by the CLI and the server: find or start the database, migrate, bootstrap."""

from __future__ import annotations

import gc
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from canvasdb.blobs import open_blob_store
from canvasdb.db import Database, EmbeddedPostgres, database_away, migrate
from canvasdb.errors import NotFound, one_line
from canvasdb.search.embedders import embedder_from_settings
from canvasdb.services import Services
from canvasdb.settings import Settings
from canvasdb.tenancy import Principal

DEMO_ORG = "demo"
DEMO_PROJECT = "demo"
DEMO_USER = "admin@demo.local"


CONNECT_TIMEOUT_S = 10  # for a CANVASDB_DATABASE_URL that sets no connect_timeout
OUTAGE_LOG_EVERY = 30.0  # s: while the database is away, each kind of complaint once this often
GC_THRESHOLDS = (20_000, 20, 20)  # Python's defaults: (700, 10, 10)


def settle_gc() -> None:
    """Tune the cyclic garbage collector for a server that has finished starting.

    What start-up built (modules, the app, its routes and models: most of the heap) lives
    as long as the process, yet every full collection walked it all again: under a flood of
    updates the gateway paused 60 ms every 2-3 s, a fifth of its CPU and most of its p99.
    Frozen, it is never walked again. Most objects are freed by reference counting the
    moment they are dropped, so collecting the young generation 30 times less often keeps
    little more memory and spends far less time looking for cycles."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


_TOKEN_IN_QUERY = re.compile(r"(?<=[?&])token=[^&\s\"']*")


class _HideTokens(logging.Filter):
    """The y-websocket client sends its API token as ``?token=``, and the web server logs
    each request and WebSocket with its query string: keep the token out of the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_IN_QUERY.sub("token=[hidden]", a) if isinstance(a, str) else a
                                for a in record.args)
        return True


def hide_tokens_in_logs() -> None:
    """Redact tokens from the web server's access and connection logs (uvicorn's loggers)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        _add_filter(logging.getLogger(name), _HideTokens())


class _OncePer(logging.Filter):
    """Lets the first record of a kind through, then one per ``every`` seconds, which says how
    many it stands for. ``kind`` names a record's kind, or None to let it through."""

    def __init__(self, kind: Callable[[logging.LogRecord], str | None], every: float) -> None:
        super().__init__()
        self.kind, self.every = kind, every
        self._seen: dict[str, tuple[float, int]] = {}  # kind -> (when one last passed, held since)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self.kind(record)
        if kind is None:
            return True
        now = time.monotonic()
        passed, held = self._seen.get(kind, (-self.every, 0))
        if now - passed < self.every:
            self._seen[kind] = (passed, held + 1)
            return False
        if held:
            message = " ".join(record.getMessage().split())
            record.msg = f"{message} ({held} more like it in {now - passed:.0f} s)"
            record.args = None
        self._seen[kind] = (now, 0)
        return True


class _OutageInOneLine(logging.Filter):
    """A record whose error is the database being away (``database_away``): its message on
    one line, the error's after it, no traceback (the job queue logs one per stopped worker
    and per failed job)."""

    def __init__(self, *wrappers: type[BaseException]) -> None:
        super().__init__()
        self.wrappers = wrappers  # errors that stand for the one they wrap

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc) in self.wrappers:  # (the job queue's, for any database error)
            exc = exc.__cause__
        if exc is not None and database_away(exc):
            record.msg, record.args = f"{' '.join(record.getMessage().split())} ({one_line(exc)})", None
            record.exc_info, record.exc_text = None, None
        return True


def _starts(*prefixes: str) -> Callable[[logging.LogRecord], str | None]:
    """A record's kind: the prefix its message starts with, if any."""
    def kind(record: logging.LogRecord) -> str | None:
        msg = record.msg if isinstance(record.msg, str) else ""
        return next((prefix for prefix in prefixes if msg.startswith(prefix)), None)
    return kind


_BUSY_OR_AWAY = ("the database is unreachable", "no database connection available", "this org has ")


def _busy_or_away(record: logging.LogRecord) -> str | None:
    """A failed request's kind when the database is away or has no connection to spare: its
    detail (one line per request otherwise, the path telling nothing more)."""
    detail = getattr(record, "detail", None)  # (what the API's problem handler logs with a 5xx)
    return detail if isinstance(detail, str) and detail.startswith(_BUSY_OR_AWAY) else None


def quiet_outage_logs(every: float = OUTAGE_LOG_EVERY) -> None:
    """While the database is away, the pools log each attempt to connect (every 2 s per
    connection), the gateway's listener each of its own, and the job queue tracebacks when
    its worker stops and for each job cut off: hundreds of lines for a 30 s outage, with the
    one that says what happened lost among them; the write path, a traceback for each
    batch of work it could not hand to the queue; the gateway, a line for each open
    connection whose access it could not check again (3,000 in a 36 s outage with 3,000
    clients), for each client it refused meanwhile (each reconnects with backoff), and for
    each connection it refuses over a cap (a flood of them, outage or not); the API, a line
    for each request that found the database away or without a connection to spare. Each
    kind is logged once per ``every`` s, and a lost database is one line, not a traceback."""
    from procrastinate.exceptions import ConnectorException
    from procrastinate.worker import WORKER_NAME

    repeated = {
        "psycopg.pool": ("error connecting in",),
        # (the access re-check and the refusal of a new connection: one per client)
        "canvasdb.gateway": ("lost the notification connection", "could not check access to",
                             "closed a connection to", "too many connections in this process",
                             "too many connections of user"),
        "canvasdb.jobs": ("could not defer the work",),  # (a batch a second on the write path)
        "canvasdb.documents": ("could not announce a change", "could not ask for compaction"),
    }
    for name, prefixes in repeated.items():
        _add_filter(logging.getLogger(name), _OncePer(_starts(*prefixes), every))
    _add_filter(logging.getLogger("canvasdb.api"), _OncePer(_busy_or_away, every))
    for name in ("procrastinate.worker", f"procrastinate.worker.{WORKER_NAME}", "procrastinate.utils",
                 "canvasdb.jobs", "canvasdb.documents"):
        _add_filter(logging.getLogger(name), _OutageInOneLine(ConnectorException))


def _add_filter(logger: logging.Logger, new: logging.Filter) -> None:
    """Add ``new`` unless a filter of its class is there already (a second server in one process)."""
    if not any(type(f) is type(new) for f in logger.filters):
        logger.addFilter(new)


def check_components(settings: Settings) -> None:
    """Build the blob store and the embedder the settings name, and drop them: a setting that
    only makes sense with others (s3 without a bucket, openai without a URL) fails here, before
    a server starts anything, rather than in its start-up once "serving" was announced."""
    open_blob_store(settings)
    embedder_from_settings(settings)


def embedded(settings: Settings) -> EmbeddedPostgres:
    return EmbeddedPostgres(settings.pgdata)


def database(settings: Settings, *, start: bool = True, run_migrations: bool = True) -> str:
    """The database URL: ``CANVASDB_DATABASE_URL``, or the embedded server (started if needed)."""
    if settings.database_url:
        url = with_connect_timeout(settings.database_url)
    else:
        url = embedded(settings).start() if start else embedded(settings).url()
    if run_migrations:
        prepare_schema(url)
    return url


def with_connect_timeout(url: str) -> str:
    """``url`` with ``connect_timeout`` if it has none: libpq waits for ever by default, and a
    host that drops packets (a firewall, a wrong address) hung every command, and `up`, with
    nothing said."""
    if "connect_timeout" in conninfo_to_dict(url):
        return url
    return make_conninfo(url, connect_timeout=str(CONNECT_TIMEOUT_S))


@contextmanager
def embedded_kept_running(settings: Settings) -> Iterator[None]:
    """For the block, a thread that starts the embedded PostgreSQL again whenever it has exited
    (``EmbeddedPostgres.watch``): the server stays up only while its database does. Nothing for
    a database of one's own (``CANVASDB_DATABASE_URL``), which its owner keeps running. Waits
    for a start in progress on the way out, so that a stop after the block finds the server."""
    if settings.database_url:
        yield
        return
    stop = threading.Event()
    watcher = threading.Thread(target=embedded(settings).watch, args=(stop,), name="canvasdb-pg-watch",
                               daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def prepare_schema(url: str) -> list[str]:
    """canvasdb's migrations, then the job queue's tables; the names of what was applied."""
    from canvasdb import jobs

    done = [f"{m.version:04d}_{m.name}" for m in migrate(url)]
    if jobs.ensure_schema(url):
        done.append("job queue schema")
    return done


@asynccontextmanager
async def open_services(settings: Settings, url: str) -> AsyncIterator[Services]:
    async with Database(url, min_size=1, max_size=4,
                        statement_timeout_ms=settings.statement_timeout_ms) as db:
        svc = Services.build(settings, db)
        try:
            yield svc
        finally:
            await svc.close()


def operator(org_id: object) -> Principal:
    """The local operator, acting as an owner of the org (CLI commands)."""
    from uuid import UUID

    return Principal(org_id=UUID(str(org_id)), user_id=None, org_role="owner")


async def bootstrap(svc: Services) -> str | None:
    """On first run: org ``demo``, its project, an owner and an admin token (saved, 0600).

    Returns the admin token: the new one, or the one saved by an earlier run. A first run cut
    short (killed between its steps) is finished by the next: the demo org without a saved
    token, when its owner is the demo user, gets what it lacks.
    """
    path = svc.settings.token_file
    orgs = {o.slug: o for o in await svc.tenancy.list_orgs()}
    org = orgs.get(DEMO_ORG)
    if org is not None and path.exists():
        return path.read_text().strip() or None
    if org is None:
        user = await svc.tenancy.ensure_user(DEMO_USER, "Demo admin")
        org = await svc.tenancy.create_org(DEMO_ORG, "Demo", owner=user)
    else:
        try:
            user = await svc.tenancy.user_by_email(DEMO_USER)
            owner = (await svc.tenancy.principal(user, str(org.id))).org_role == "owner"
        except NotFound:
            owner = False
        if not owner:  # an org of someone's own that is called demo: not ours to finish
            return None
    if DEMO_PROJECT not in {p["slug"] for p in await svc.tenancy.list_projects(operator(org.id))}:
        await svc.tenancy.create_project(operator(org.id), DEMO_PROJECT, "Demo project")
    _, token = await svc.tenancy.create_token(user, name="admin (created by canvasdb up)")
    _write_whole(path, token + "\n")
    return token


def _write_whole(path: Path, text: str) -> None:
    """Write a file for its owner alone (0600) so that a crash leaves it whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
