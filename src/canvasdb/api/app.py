"""The ASGI application: REST under /v1, problem+json errors, OpenAPI at /openapi.json."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from canvasdb import __version__, job_metrics, jobs, runtime
from canvasdb.api import attachments, documents, entities, graph, openapi, problems, search, tenants
from canvasdb.api.deps import Svc
from canvasdb.api.head import HeadAsGet
from canvasdb.api.limits import BodySizeLimit, CredentialsFirst
from canvasdb.db import Database
from canvasdb.gateway import Hub, connection
from canvasdb.services import Services
from canvasdb.settings import Settings


def create_app(settings: Settings, *, database_url: str | None = None,
               services: Services | None = None, run_worker: bool = False) -> FastAPI:
    """The app. Pass ``services`` to share an open pool (tests); else it opens its own, and
    with ``run_worker`` also works through the job queue (compaction, retention, indexing)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if services is not None:
            app.state.services = services
            async with _gateway(app, services):
                yield
            return
        url = database_url or settings.database_url
        assert url, "create_app needs a database URL"
        db = Database(url, min_size=settings.pool_min_size, max_size=settings.pool_max_size,
                      statement_timeout_ms=settings.statement_timeout_ms)
        async with db, contextlib.AsyncExitStack() as stack:
            svc = app.state.services = Services.build(settings, db)
            stack.push_async_callback(svc.close)
            await stack.enter_async_context(jobs.connected(url))
            svc.documents.compaction_due = jobs.defer_compaction
            projections = jobs.Requests(jobs.defer_projections)
            stack.push_async_callback(projections.close)
            svc.documents.changed = projections.request
            indexing = jobs.Requests(jobs.defer_indexing, every=0.2)
            stack.push_async_callback(indexing.close)
            svc.entities.changed = indexing.request
            if run_worker:
                await stack.enter_async_context(jobs.working(svc))
            await stack.enter_async_context(_gateway(app, svc))
            runtime.settle_gc()  # a server process of its own: see there
            yield

    app = FastAPI(title="canvasdb", version=__version__, lifespan=lifespan, description=(
        "Persistence for a collaborative whiteboard platform: entities with full history, live "
        "Yjs documents (and their WebSocket gateway at `/v1/orgs/{org}/docs/{doc}`), attachments, "
        "the graph of relationships, and search. Every `/v1` call takes an API token as "
        "`Authorization: Bearer <token>`; errors are RFC 9457 problem documents."))
    if services is not None:
        app.state.services = services
    problems.install(app)
    openapi.install(app)
    app.include_router(tenants.router)
    app.include_router(entities.router)
    app.include_router(documents.router)
    app.include_router(attachments.router)
    app.include_router(graph.router)
    app.include_router(search.router)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus exposition of this process's metrics."""
        job_metrics.JOB_COUNTS.read_soon()  # in the background: this scrape serves the last counts
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/v1/orgs/{org}/docs/{doc}")
    async def gateway(websocket: WebSocket, org: str, doc: str) -> None:
        """A live document over the y-websocket protocol (see canvasdb.gateway.connection)."""
        hub: Hub | None = getattr(websocket.app.state, "hub", None)
        if hub is None or hub.stopping:
            await websocket.close(1001, "server shutting down")
            return
        await connection.serve(websocket, org, doc, websocket.app.state.services, hub, settings)

    @app.get("/readyz", tags=["operations"], summary="Readiness")
    async def readyz(svc: Svc, request: Request) -> JSONResponse:
        """Ready for traffic: the database answers and the gateway hears other processes."""
        hub: Hub | None = getattr(request.app.state, "hub", None)
        await svc.db.ping()  # within 2 s: a probe's own timeout is often not much longer
        if hub is not None and hub.listening and not hub.stopping:
            return JSONResponse({"status": "ready"})
        stopping = hub is not None and hub.stopping
        detail = ("shutting down" if stopping
                  else "not ready: the gateway does not hear other processes yet (or for now)")
        return problems.problem(503, "Unavailable", detail, state="stopping" if stopping else "starting",
                                retry=not stopping)

    @app.get("/healthz", tags=["operations"], summary="Liveness")
    async def healthz(svc: Svc) -> dict[str, Any]:
        """The process answers and reaches its database (503 when it does not); and its version."""
        await svc.db.ping()
        return {"status": "ok", "version": __version__}

    # JSON may legitimately be larger than the compact form counted against max_data_bytes.
    # Attachment uploads stream into the blob store and have their own, larger limit; Yjs
    # updates theirs (the store answers 413 over it, naming the setting).
    app.add_middleware(HeadAsGet)
    app.add_middleware(connection.KeepRawSend)
    app.add_middleware(CredentialsFirst)
    app.add_middleware(BodySizeLimit, max_bytes=4 * settings.max_data_bytes + 64 * 1024,
                       path_limits=[(attachments.UPLOAD_PATHS, settings.max_attachment_bytes),
                                    (documents.UPDATE_PATHS, settings.max_update_bytes)])
    return app


@asynccontextmanager
async def _gateway(app: FastAPI, svc: Services) -> AsyncIterator[None]:
    """The gateway's hub for the app's lifetime; on the way out, clients are told "going away"
    after the commits in flight finished."""
    hub = app.state.hub = Hub(svc.documents, svc.db.conninfo, idle_seconds=svc.settings.gateway_idle_seconds,
                              awareness_delay=svc.settings.gateway_awareness_delay_ms / 1000)
    await hub.start()
    try:
        yield
    finally:
        hub.stopping = True
        await svc.documents.log.close()
        await hub.stop()
