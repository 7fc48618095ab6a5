"""The ``canvasdb`` command: a thin layer over the Python API, reading the server's settings."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import html
import io
import json
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar
from uuid import UUID

import psycopg
import typer
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from canvasdb import __version__, runtime
from canvasdb.blobs.sweep import SweepTotals, sweep
from canvasdb.entities import parse_as_of
from canvasdb.errors import CanvasdbError, InvalidInput, NotFound, Unavailable
from canvasdb.search.engine import Filters
from canvasdb.services import Services
from canvasdb.settings import CENTURY_S, SECRET, Settings, unknown_variables
from canvasdb.tenancy import ORG_ROLES

T = TypeVar("T")
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)  # its help: _options' docstring
db_app = typer.Typer(help="The embedded PostgreSQL server and migrations.", no_args_is_help=True)
org_app = typer.Typer(help="Orgs (tenants).", no_args_is_help=True)
user_app = typer.Typer(help="Users.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
project_app = typer.Typer(help="Projects.", no_args_is_help=True)
entity_app = typer.Typer(help="Entities and their history.", no_args_is_help=True)
type_app = typer.Typer(help="The entity type registry (what search reads, references, schemas).",
                       no_args_is_help=True)
blobs_app = typer.Typer(help="The blob store (attachments, large snapshots).", no_args_is_help=True)
embedder_app = typer.Typer(help="The embedding models of semantic search: which one is active, and a "
                                "deliberate switch back.", no_args_is_help=True)
for sub, name in [(db_app, "db"), (org_app, "org"), (user_app, "user"), (token_app, "token"),
                  (project_app, "project"), (entity_app, "entity"), (type_app, "type"), (blobs_app, "blobs"),
                  (embedder_app, "embedder")]:
    app.add_typer(sub, name=name)

out = Console(soft_wrap=True)  # a line stays one line when piped (80 columns otherwise)
err = Console(stderr=True, soft_wrap=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
OrgOpt = Annotated[str, typer.Option("--org", help="Org slug or id.")]
SlugArg = Annotated[str, typer.Argument(help="Lowercase letters, digits and '-'.")]
NameOpt = Annotated[str | None, typer.Option(help="Display name (default: the slug).")]
PortOpt = Annotated[int | None, typer.Option(min=1, max=65535, help="Port [CANVASDB_PORT].")]


def _settings() -> Settings:
    for warning in unknown_variables(os.environ):
        err.print(f"[yellow]Warning:[/yellow] {warning}", highlight=False)
    try:
        return Settings()
    except ValidationError as exc:  # a bad CANVASDB_* value: name it, in one line
        _fail(CanvasdbError("invalid setting " + "; ".join(_setting_problem(e) for e in exc.errors()),
                            hint="the README's Settings and Object storage sections list "
                                 "every CANVASDB_* variable"))
        raise


def _setting_problem(error: Any) -> str:
    """``CANVASDB_PORT='abc': input should be a valid integer`` (a check across settings,
    with no single field, is its own message)."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if message[1:2].islower():  # "Input should...", not a name such as CANVASDB_...
        message = message[:1].lower() + message[1:]
    if not error["loc"]:
        return message
    name = "CANVASDB_" + "_".join(str(part) for part in error["loc"]).upper()
    if error["loc"][0] in SECRET:  # (a connection string holds its password)
        return f"{name} (value not shown): {message}"
    return f"{name}={error['input']!r}: {message}"


def _fail(exc: CanvasdbError) -> None:
    err.print(f"[red]Error:[/red] {exc.detail}", highlight=False)
    hint = exc.fields.get("hint")
    if hint:
        err.print(f"Try: {hint}", highlight=False)
    raise typer.Exit(1)


def _with_services(work: Callable[[Services], Awaitable[T]]) -> T:
    """Run ``work`` against the database the server would use (started if it is embedded)."""
    settings = _settings()

    async def main() -> T:
        url = runtime.database(settings)
        async with runtime.open_services(settings, url) as svc:
            return await work(svc)

    try:
        return asyncio.run(main())
    except CanvasdbError as exc:
        _fail(exc)
        raise
    except UnicodeEncodeError:  # a byte that is not UTF-8 (Python keeps it as a lone surrogate)
        _fail(InvalidInput("arguments and input must be UTF-8 text"))
        raise


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


# --- top level --------------------------------------------------------------------------------


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="Address to listen on [CANVASDB_HOST].")] = None,
    port: PortOpt = None,
) -> None:
    """Start the database and serve the API, the real-time gateway and a job worker.

    The database: CANVASDB_DATABASE_URL's, or the embedded PostgreSQL, started again whenever it exits.
    """
    from canvasdb.api import create_app

    settings = _settings()
    host = host or settings.host
    port = port if port is not None else settings.port
    try:
        runtime.check_components(settings)
        listener = _listen(host, port)  # before the database: a port in use costs nothing
    except CanvasdbError as exc:
        _fail(exc)
        return

    async def boot(url: str) -> str | None:
        async with runtime.open_services(settings, url) as svc:
            return await runtime.bootstrap(svc)

    try:
        with _database_of_this_run(settings) as url, contextlib.closing(listener):
            token = asyncio.run(boot(url))
            out.print(f"canvasdb {__version__} serving http://{host}:{port}  (OpenAPI: /docs)")
            if token:
                out.print(f"admin token (org '{runtime.DEMO_ORG}'): {token}")
                out.print(f"  saved in {settings.token_file}")
            _serve(create_app(settings, database_url=url, run_worker=True), settings, listener)
    except CanvasdbError as exc:
        _fail(exc)


@app.command()
def gateway(
    host: Annotated[str | None, typer.Option(help="Address to listen on [CANVASDB_HOST].")] = None,
    port: PortOpt = None,
) -> None:
    """Serve the API and the real-time gateway only: no job worker, no demo org.

    Run several of them behind a load balancer, over one database (CANVASDB_DATABASE_URL).
    """
    from canvasdb.api import create_app

    settings = _settings()
    host, port = host or settings.host, port if port is not None else settings.port
    try:
        runtime.check_components(settings)
        listener = _listen(host, port)
        with _database_of_this_run(settings) as url, contextlib.closing(listener):
            out.print(f"canvasdb gateway {__version__} serving http://{host}:{port}")
            _serve(create_app(settings, database_url=url), settings, listener)
    except CanvasdbError as exc:
        _fail(exc)


@contextlib.contextmanager
def _database_of_this_run(settings: Settings) -> Iterator[str]:
    """The URL of the database a server or a worker runs on (the embedded one started and
    migrated if need be), until the process ends. The embedded server it started is stopped then, however it
    ends: after serving, on a failed start, on SIGTERM or Ctrl-C during start-up (SIGTERM ended
    the process at once, and `gateway` and `worker` never stopped it: it ran on with no one to
    stop it). One it found running, or one CANVASDB_DATABASE_URL names, is left running."""
    signal.signal(signal.SIGTERM, _exit_cleanly)
    starts_it = not settings.database_url and not runtime.embedded(settings).status().running
    try:
        yield runtime.database(settings)
    finally:
        if starts_it:
            with contextlib.suppress(CanvasdbError):
                if runtime.embedded(settings).stop():
                    out.print("embedded PostgreSQL stopped")


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before anything is announced: a port in use or an
    address that is not this machine's is a one-line error, not a traceback after "serving"."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        gai = isinstance(exc, socket.gaierror)  # its errno is a resolver code, not an OS one
        reason = exc.strerror if gai or not exc.errno else os.strerror(exc.errno)
        hint = {errno.EADDRINUSE: "choose another port with --port or CANVASDB_PORT",
                errno.EACCES: "ports below 1024 need root (or CAP_NET_BIND_SERVICE): choose another "
                              "with --port or CANVASDB_PORT"}.get(-1 if gai else exc.errno or -1)
        hint = hint or "choose an address of this machine with --host or CANVASDB_HOST"
        raise Unavailable(f"cannot listen on {host}:{port}: {reason.lower()}", hint=hint) from None


def _serve(api: object, settings: Settings, listener: socket.socket) -> None:
    import uvicorn

    from canvasdb.api.http_protocol import with_bounded_requests
    from canvasdb.api.ws_protocol import with_bounds
    from canvasdb.gateway.connection import frame_limit

    host, port = listener.getsockname()[:2]
    config = uvicorn.Config(api, host=host, port=port, log_level=settings.log_level, lifespan="on",  # type: ignore[arg-type]
                            http=with_bounded_requests(header_timeout=settings.http_header_timeout_seconds,
                                                      idle_timeout=settings.http_idle_timeout_seconds),
                            ws=with_bounds(settings.http_header_timeout_seconds),
                            ws_max_size=frame_limit(settings), ws_ping_interval=20,
                            # Yjs messages are small and binary: compressing each one costs both
                            # ends more CPU and latency than it saves (Node's ws servers default
                            # to off too).
                            ws_per_message_deflate=False)

    runtime.hide_tokens_in_logs()  # after uvicorn's Config has set its loggers up
    runtime.quiet_outage_logs()

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Before uvicorn closes WebSockets with 1012: stop accepting, let each gateway
            # connection commit what it received, then close it with 1001 ("going away").
            for server in self.servers:
                server.close()
            hub = getattr(getattr(api, "state", None), "hub", None)
            if hub is not None:
                await hub.drain()
            await super().shutdown(sockets)

    # uvicorn handles SIGINT/SIGTERM (stop accepting, drain requests), then re-raises the
    # signal to the handler it found: make that one a clean exit so the finally block runs.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    with runtime.embedded_kept_running(settings):
        Server(config).run(sockets=[listener])


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


@app.command()
def worker(concurrency: Annotated[int, typer.Option(min=1, max=64, help="Jobs at once.")] = 2) -> None:
    """Run background jobs on their own, next to any number of servers.

    The jobs: compaction and retention of documents, board projection, search indexing, blob sweeps.
    """
    from canvasdb import jobs

    settings = _settings()
    runtime.quiet_outage_logs()

    async def main(url: str) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with (runtime.open_services(settings, url) as svc, jobs.connected(url),
                    jobs.working(svc, concurrency=concurrency)):
            out.print("canvasdb worker running (Ctrl-C to stop)")
            await stop.wait()
        out.print("canvasdb worker stopped")

    try:
        with _database_of_this_run(settings) as url:
            asyncio.run(main(url))
    except CanvasdbError as exc:
        _fail(exc)


@app.command()
def version() -> None:
    """Print the version."""
    out.print(__version__)


def _print_version(asked: bool) -> None:
    if asked:
        version()
        raise typer.Exit()


@app.callback()
def _options(_: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                             help="Print the version and exit.")] = False) -> None:
    """canvasdb: database-first persistence for collaborative whiteboards."""


# --- db -----------------------------------------------------------------------------------------


@db_app.command("start")
def db_start() -> None:
    """Start the embedded PostgreSQL (initialised on first use) and apply migrations."""
    settings = _settings()
    if settings.database_url:
        _fail(CanvasdbError("CANVASDB_DATABASE_URL is set: there is no embedded server to start"))
    try:
        url = runtime.database(settings)
    except CanvasdbError as exc:
        _fail(exc)
        return
    out.print(f"running: {url}")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL (fast shutdown)."""
    try:
        stopped = runtime.embedded(_settings()).stop()
    except CanvasdbError as exc:
        _fail(exc)
        return
    out.print("stopped" if stopped else "not running")


@db_app.command("status")
def db_status(as_json: JsonOpt = False) -> None:
    """Say whether the database runs: exit code 0 if it does, 3 if not.

    The embedded server, or the one CANVASDB_DATABASE_URL names (this connects to it to find out).
    """
    settings = _settings()
    if settings.database_url:
        info: dict[str, Any] = {"embedded": False, "url": _password_hidden(settings.database_url)}
        try:
            psycopg.connect(settings.database_url, connect_timeout=5).close()
            running = info["running"] = True
        except psycopg.Error as exc:
            running = info["running"] = False
            info["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    else:
        status = runtime.embedded(settings).status()
        running = status.running
        info = {"embedded": True, "running": status.running, "pid": status.pid, "url": status.url,
                "pgdata": str(settings.pgdata)}
    if as_json:
        _print_json(info)
    else:
        for key, value in info.items():  # spelt as in --json (false, null), not as Python does
            out.print(f"{key}: {value if isinstance(value, str) else json.dumps(value)}", highlight=False)
    raise typer.Exit(0 if running else 3)


def _password_hidden(url: str) -> str:
    """``url`` with its password, if any, as ``***`` (status output ends up in logs)."""
    params = conninfo_to_dict(url)  # (one libpq cannot read is refused with the settings)
    if "password" not in params:
        return url
    return make_conninfo(**{**params, "password": "***"})


@db_app.command("url")
def db_url() -> None:
    """Print the connection URL of the database canvasdb uses."""
    settings = _settings()
    if settings.database_url:
        print(settings.database_url)
        return
    try:
        print(runtime.embedded(settings).url())
    except CanvasdbError as exc:
        _fail(exc)


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending schema migrations (safe to run from several processes at once)."""
    settings = _settings()
    try:
        applied = runtime.prepare_schema(runtime.database(settings, run_migrations=False))
    except CanvasdbError as exc:
        _fail(exc)
        return
    for name in applied:
        out.print(f"applied {name}")
    if not applied:
        out.print("up to date")


# --- blobs --------------------------------------------------------------------------------------


@blobs_app.command("sweep")
def blobs_sweep(
    grace: Annotated[float | None, typer.Option(
        min=0, max=CENTURY_S,
        help="Seconds: content written more recently is left alone [CANVASDB_BLOB_ORPHAN_GRACE_S].",
    )] = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove blob content that no attachment or snapshot points at (the worker does it daily).

    Such content is what a writer that died between storing it and committing its row left behind.
    """
    settings = _settings()
    seconds = settings.blob_orphan_grace_s if grace is None else grace
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed} blobs listed"), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        listing = bar.add_task("sweeping", total=None)

        def show(totals: SweepTotals) -> None:
            bar.update(listing, completed=totals.listed, description=f"{totals.removed} removed")

        totals = _with_services(lambda svc: sweep(svc.db, svc.blobs, grace=timedelta(seconds=seconds),
                                                  progress=show))
    if as_json:
        _print_json(asdict(totals))
    else:
        out.print(totals.summary(), highlight=False)


# --- orgs, users, tokens, projects --------------------------------------------------------------


@org_app.command("create")
def org_create(slug: SlugArg, name: NameOpt = None, as_json: JsonOpt = False) -> None:
    """Create an org.

    Example: canvasdb org create acme --name "Acme Inc."
    """
    org = _with_services(lambda svc: svc.tenancy.create_org(slug, name))
    if as_json:
        _print_json({"id": str(org.id), "slug": org.slug, "name": org.name})
    else:
        out.print(f"created org {org.slug} ({org.id})", highlight=False)


@org_app.command("list")
def org_list(as_json: JsonOpt = False) -> None:
    """List orgs."""
    orgs = _with_services(lambda svc: svc.tenancy.list_orgs())
    if as_json:
        _print_json([{"id": str(o.id), "slug": o.slug, "name": o.name} for o in orgs])
        return
    table = Table("slug", "name", "id")
    for o in orgs:
        table.add_row(o.slug, o.name, str(o.id))
    out.print(table)


@user_app.command("create")
def user_create(email: str, name: Annotated[str, typer.Option(help="Display name.")] = "",
                org: Annotated[str | None, typer.Option(help="Also add to this org.")] = None,
                role: Annotated[str, typer.Option(help="Org role with --org.")] = "member") -> None:
    """Create a user (or find it by email), optionally adding it to an org; prints its id.

    Example: canvasdb user create bob@acme.io --name Bob --org acme --role member
    """

    async def work(svc: Services) -> UUID:
        target = await svc.tenancy.resolve_org(org) if org else None  # refused before anything is written
        _check_org_role(role)
        user_id = await svc.tenancy.ensure_user(email, name)
        if target is not None:
            await svc.tenancy.set_org_role(target.id, user_id, role)
        return user_id

    out.print(str(_with_services(work)))


@token_app.command("create")
def token_create(
    org: OrgOpt, user: Annotated[str, typer.Option("--user", help="The user's email.")],
    role: Annotated[str | None, typer.Option(help=f"Org role: {', '.join(ORG_ROLES)} (default: the "
                                                  "user's current one, member for a new member).")] = None,
    name: Annotated[str, typer.Option(help="A label for the token.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the token with its id (to revoke it "
                                                         "by), user, org and role, as JSON.")] = False,
) -> None:  # fmt: skip
    """Create an API token; prints only the token. Creates the user and membership if missing.

    Example: TOKEN=$(canvasdb token create --org acme --user ci@acme.io --role admin)
    """

    async def work(svc: Services) -> dict[str, str]:
        target = await svc.tenancy.resolve_org(org)
        if role is not None:
            _check_org_role(role)  # before the user is created
        user_id = await svc.tenancy.ensure_user(user)
        current = await _org_role(svc, target.id, user_id)
        if role is not None or current is None:
            await svc.tenancy.set_org_role(target.id, user_id, role or "member")
        token_id, token = await svc.tenancy.create_token(user_id, name=name)
        return {"id": str(token_id), "token": token, "user_id": str(user_id), "user": user,
                "org": target.slug, "role": role or current or "member"}

    made = _with_services(work)
    if as_json:
        _print_json(made)
    else:
        print(made["token"])


def _check_org_role(role: str) -> None:
    if role not in ORG_ROLES:
        raise InvalidInput(f"org role must be one of {', '.join(ORG_ROLES)}", pointer="/role")


async def _org_role(svc: Services, org_id: UUID, user_id: UUID) -> str | None:
    try:
        return (await svc.tenancy.principal(user_id, str(org_id))).org_role
    except NotFound:
        return None


@token_app.command("revoke")
def token_revoke(token: Annotated[str, typer.Argument(
        help="The token's id (from token create --json), the token itself, or - to read the token "
             "from stdin (better than the command line, where other users see it in the process "
             "list).")]) -> None:
    """Revoke a token: requests with it answer 401 from now on."""
    if token == "-":
        token = sys.stdin.readline().strip()
    if not _with_services(lambda svc: svc.tenancy.revoke_token(token)):
        _fail(NotFound("no live token matches", hint="check the token or its id"))
    out.print("revoked")


@project_app.command("create")
def project_create(org: OrgOpt, slug: SlugArg, name: NameOpt = None) -> None:
    """Create a project in an org; prints its id.

    Example: canvasdb project create --org acme roadmap --name Roadmap
    """

    async def work(svc: Services) -> Any:
        target = await svc.tenancy.resolve_org(org)
        return await svc.tenancy.create_project(runtime.operator(target.id), slug, name)

    print(_with_services(work)["id"])


@project_app.command("list")
def project_list(org: OrgOpt, as_json: JsonOpt = False) -> None:
    """List an org's projects."""

    async def work(svc: Services) -> list[dict[str, Any]]:
        target = await svc.tenancy.resolve_org(org)
        return await svc.tenancy.list_projects(runtime.operator(target.id))

    rows = _with_services(work)
    if as_json:
        _print_json([{"id": str(r["id"]), "slug": r["slug"], "name": r["name"]} for r in rows])
        return
    table = Table("slug", "name", "id")
    for r in rows:
        table.add_row(r["slug"], r["name"], str(r["id"]))
    out.print(table)


# --- entity types ---------------------------------------------------------------------------------


@type_app.command("register")
def type_register(
    org: OrgOpt,
    spec: Annotated[str, typer.Argument(help="The declaration as JSON, as POST /v1/orgs/{org}/entity-types"
                                              " takes it, or - to read stdin.")],
) -> None:  # fmt: skip
    """Register (or replace) an entity type; prints it as JSON.

    Example: canvasdb type register --org acme '{"name": "kanban.card", "text_fields": {"title": "A"}}'
    """
    from pydantic import ValidationError

    from canvasdb.api.tenants import EntityTypeIn  # the HTTP API's checks, to the letter
    from canvasdb.entities import EntityType

    try:
        body = EntityTypeIn.model_validate_json(sys.stdin.read() if spec == "-" else spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "/".join(str(p) for p in first.get("loc", ()))
        _fail(InvalidInput(f"the declaration is not valid: {where + ': ' if where else ''}{first['msg']}"))
        return

    async def work(svc: Services) -> Any:
        target = await svc.tenancy.resolve_org(org)
        return await svc.types.register(runtime.operator(target.id), EntityType(**body.model_dump()))

    _print_json(_with_services(work).to_json())


@type_app.command("list")
def type_list(org: OrgOpt, as_json: JsonOpt = False) -> None:
    """List an org's entity types."""

    async def work(svc: Services) -> Any:
        target = await svc.tenancy.resolve_org(org)
        return await svc.types.list(runtime.operator(target.id))

    types = _with_services(work)
    if as_json:
        _print_json([t.to_json() for t in types])
        return
    table = Table("name", "module", "schema", "text fields", "references")
    for t in types:
        table.add_row(t.name, t.module, "yes" if t.json_schema else "", ", ".join(t.text_fields),
                      ", ".join(t.reference_fields))
    out.print(table)


# --- entities -------------------------------------------------------------------------------------


def _uuid(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        _fail(InvalidInput(f"{value!r} is not a UUID"))
        raise


@entity_app.command("get")
def entity_get(org: OrgOpt, id: Annotated[str, typer.Argument(help="The entity's id.")],
               as_of: Annotated[str | None, typer.Option(help="Version or ISO time.")] = None) -> None:
    """Print an entity as JSON (now, or as of a version or time).

    Example: canvasdb entity get --org acme 0b5e... --as-of 2026-11-27T10:00:00Z
    """
    entity_id = _uuid(id)

    async def work(svc: Services) -> Any:
        target = await svc.tenancy.resolve_org(org)
        return await svc.entities.get(runtime.operator(target.id), entity_id, as_of=parse_as_of(as_of))

    _print_json(_with_services(work).to_json())


@entity_app.command("put")
def entity_put(
    org: OrgOpt,
    data: Annotated[str, typer.Argument(help="The data as a JSON object, or - to read stdin.")],
    project: Annotated[str | None, typer.Option(help="Project slug or id (to create).")] = None,
    type: Annotated[str | None, typer.Option("--type", help="Entity type (to create).")] = None,
    id: Annotated[str | None, typer.Option(help="Entity id: replaced if it exists.")] = None,
    if_version: Annotated[int | None, typer.Option(
        help="Refuse unless the entity exists and is at this version.")] = None,
) -> None:  # fmt: skip
    """Create an entity, or replace the data of an existing one; prints it as JSON.

    Example: canvasdb entity put --org acme --project roadmap --type kanban.card '{"title": "Ship"}'
    """
    try:
        parsed = json.loads(sys.stdin.read() if data == "-" else data)
    except (ValueError, RecursionError) as exc:
        _fail(InvalidInput(f"data is not valid JSON: {exc}"))
        return
    entity_id = _uuid(id) if id else None
    if if_version is not None and entity_id is None:
        _fail(InvalidInput("--if-version replaces an entity: name it with --id"))

    async def work(svc: Services) -> Any:
        target = await svc.tenancy.resolve_org(org)
        who = runtime.operator(target.id)
        project_id = await svc.tenancy.resolve_project(who, project, write=True) if project else None
        if entity_id is not None:
            try:
                if project_id is not None or type is not None:  # a replacement changes data only
                    _same_place(await svc.entities.get(who, entity_id), project_id, type)
                return await svc.entities.replace(who, entity_id, parsed, if_version=if_version)
            except NotFound:
                if if_version is not None:  # a version to match is a replace: never a create
                    raise
        if project_id is None or not type:
            raise InvalidInput("creating an entity needs --project and --type")
        return await svc.entities.create(who, project_id, type, parsed, id=entity_id)

    _print_json(_with_services(work).to_json())


def _same_place(entity: Any, project_id: UUID | None, type: str | None) -> None:
    """Refuse a replacement whose --project or --type differs from the entity's: it would
    write the data and leave both as they are."""
    if type is not None and type != entity.type:
        raise InvalidInput(f"entity {entity.id} is a {entity.type}: --type cannot change it",
                           hint="create a new entity of that type instead")
    if project_id is not None and project_id != entity.project_id:
        raise InvalidInput(f"entity {entity.id} belongs to another project: --project cannot move it",
                           hint="leave out --project to replace its data")


@entity_app.command("history")
def entity_history(org: OrgOpt, id: Annotated[str, typer.Argument(help="The entity's id.")],
                   limit: Annotated[int, typer.Option(min=1, max=1000, help="Versions per page.")] = 100,
                   before: Annotated[int | None, typer.Option(
                       min=1, help="Only versions before this one (the next page).")] = None,
                   as_json: JsonOpt = False) -> None:
    """List an entity's versions, newest first, a page at a time."""
    entity_id = _uuid(id)

    async def work(svc: Services) -> Any:
        target = await svc.tenancy.resolve_org(org)
        return await svc.entities.history(runtime.operator(target.id), entity_id, before=before, limit=limit)

    page = _with_services(work)
    if as_json:
        _print_json([v.to_json() for v in page.items])
    else:
        table = Table("version", "op", "at", "actor", "changes")
        for v in page.items:
            at = v.at.isoformat(timespec="milliseconds") if isinstance(v.at, datetime) else str(v.at)
            table.add_row(str(v.version), v.op, at, str(v.actor or "operator"), str(len(v.patch or [])))
        out.print(table)
    if page.next is not None:  # on stderr: with --json too, stdout stays the page's JSON
        err.print(f"older versions: --before {page.next}", highlight=False)


@app.command()
def search(
    org: OrgOpt,
    query: Annotated[str, typer.Argument(help='Words in websearch syntax: "a phrase", OR, -word.')] = "",
    mode: Annotated[str, typer.Option(help="hybrid, text or semantic.")] = "hybrid",
    project: Annotated[list[str] | None, typer.Option(help="Project slug or id (repeat).")] = None,
    type: Annotated[list[str] | None, typer.Option("--type", help="Entity type (repeat).")] = None,
    module: Annotated[list[str] | None, typer.Option(help="Module (repeat).")] = None,
    where: Annotated[list[str] | None, typer.Option(
        "--where", help="data.FIELD=VALUE: equality on a data field (repeat).")] = None,
    facets: Annotated[str | None, typer.Option(help="Comma-separated: type,module,project,tag.")] = None,
    typo: Annotated[bool, typer.Option(help="Correct typos in words of 5+ letters.")] = True,
    limit: Annotated[int, typer.Option(min=1, max=100, help="Hits to show.")] = 20,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Search an org's entities by words, mistyped words and meaning (as its operator).

    Example: canvasdb search --org acme "ship -draft" --type kanban.card --where data.status=done
    """
    data = []
    for item in where or []:
        field, sep, value = item.partition("=")
        if not sep or not field.startswith("data."):
            _fail(InvalidInput(f"--where takes data.FIELD=VALUE, not {item!r}"))
        data.append((field[5:], value))

    async def work(svc: Services) -> Any:
        target = await svc.tenancy.resolve_org(org)
        who = runtime.operator(target.id)
        projects = tuple([await svc.tenancy.resolve_project(who, p) for p in project or []])
        filters = Filters(projects=projects, types=tuple(type or ()), modules=tuple(module or ()),
                          data=tuple(data))
        return await svc.search.search(who, query, mode=mode, typo=typo, filters=filters, limit=limit,
                                       facets=[f.strip() for f in (facets or "").split(",") if f.strip()])

    results = _with_services(work)
    if as_json:
        _print_json(results.to_json())
        return
    if results.degraded:
        err.print(f"[yellow]degraded:[/] {results.degraded}")
    table = Table("score", "type", "match", "id")
    for hit in results.hits:
        shown = next(iter(hit.highlights.values()), None) or json.dumps(hit.data, ensure_ascii=False)[:80]
        shown = escape(html.unescape(shown)).replace("<mark>", "[bold]").replace("</mark>", "[/]")
        table.add_row(f"{hit.score:.4f}", hit.type, shown, str(hit.id))
    out.print(table)
    total = f"{results.total}{'+' if results.total_approximate else ''}" if results.total is not None else "?"
    out.print(f"{len(results.hits)} shown of {total} matches")
    for name, counts in (results.facets or {}).items():
        out.print(f"{name}: " + (", ".join(f"{k} ({n})" for k, n in counts.items()) or "none"))


# --- embedding models ------------------------------------------------------------------------------


@embedder_app.command("list")
def embedder_list(as_json: JsonOpt = False) -> None:
    """List the embedding models search has known, and their states.

    active: queries use it; building: being embedded, to take over; retired: no longer used."""
    models = _with_services(lambda svc: svc.models.registered())
    if as_json:
        _print_json([asdict(m) for m in models])
        return
    table = Table("model", "state", "kind", "dimension", "url")
    for m in models:
        table.add_row(m.model, m.state, m.kind, str(m.dimension), m.url or "")
    out.print(table)


@embedder_app.command("use")
def embedder_use(model: Annotated[str, typer.Argument(help="The model's name, as `embedder list` shows it.")],
                 ) -> None:
    """Switch to MODEL on purpose (a retired one, or the active one to stop a build).

    A retired model is built again by the processes configured with it, then becomes active.

    Either way, the build of any other model stops.

    A process started with a retired model's settings (CANVASDB_EMBEDDER*) does not bring it back.
    """

    async def work(svc: Services) -> tuple[list[str], str | None]:
        stopped = await svc.models.use(model)
        await svc.indexer.drop_retired([org.id for org in await svc.tenancy.list_orgs()])
        state = next((m.state for m in await svc.models.registered() if m.model == model), None)
        return stopped, state

    stopped, state = _with_services(work)
    if state == "building":
        out.print(f"embedding model {model} is building: the processes configured with it embed every entity,"
                  " then it becomes active", highlight=False)
    else:
        out.print(f"embedding model {model} is {state}", highlight=False)
    for other in stopped:
        out.print(f"the build of embedding model {other} stopped (retired)", highlight=False)


def main() -> None:
    # A byte on stdin that is not UTF-8 becomes a lone surrogate, as in an argument (and as
    # under the C locale), for the commands' own check to refuse in one line: under another
    # UTF-8 locale reading it raised, and printed a traceback.
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")
    app()
