"""Test fixtures: one real PostgreSQL per session (embedded, unless CANVASDB_TEST_DATABASE_URL is set).

Tests isolate themselves by creating their own orgs with unique slugs, never by
truncating tables, so they can share the one database.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from uuid import UUID

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from canvasdb.api import create_app
from canvasdb.db import Database, EmbeddedPostgres
from canvasdb.runtime import prepare_schema
from canvasdb.services import Services
from canvasdb.settings import Settings
from canvasdb.tenancy import Principal

KEYFRAME_INTERVAL = 4  # small, so rebuilding from keyframes is exercised everywhere


@pytest.fixture(scope="session")
def pg_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("canvasdb-home")


@pytest.fixture(scope="session")
def pg_url(pg_home: Path) -> Iterator[str]:
    external = os.environ.get("CANVASDB_TEST_DATABASE_URL")
    if external:
        prepare_schema(external)
        yield external
        return
    server = EmbeddedPostgres(pg_home / "pgdata")
    url = server.start()
    prepare_schema(url)
    yield url
    server.stop()


@pytest.fixture
def fresh_db(pg_url: str) -> Iterator[str]:
    """An empty database in the test cluster."""
    name = f"mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(**{**conninfo_to_dict(pg_url), "dbname": name})
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def settings(pg_home: Path, pg_url: str) -> Settings:
    return Settings(home=pg_home, database_url=pg_url, keyframe_interval=KEYFRAME_INTERVAL,
                    max_data_bytes=64 * 1024)


@pytest.fixture(scope="session")
async def db(pg_url: str) -> AsyncIterator[Database]:
    async with Database(pg_url, min_size=2, max_size=20) as database:
        yield database


@pytest.fixture(scope="session")
async def svc(settings: Settings, db: Database) -> AsyncIterator[Services]:
    services = Services.build(settings, db)
    yield services
    await services.close()


@dataclass
class Tenant:
    """A fresh org with an owner (and its token) and one project."""

    org_id: UUID
    slug: str
    owner_id: UUID
    token: str
    project_id: UUID
    project_slug: str

    @property
    def owner(self) -> Principal:
        return Principal(org_id=self.org_id, user_id=self.owner_id, org_role="owner")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def make_tenant(svc: Services) -> Tenant:
    slug = unique("org")
    owner = await svc.tenancy.ensure_user(f"{slug}@example.com", "Owner")
    org = await svc.tenancy.create_org(slug, owner=owner)
    _, token = await svc.tenancy.create_token(owner)
    who = Principal(org_id=org.id, user_id=owner, org_role="owner")
    project = await svc.tenancy.create_project(who, "main")
    return Tenant(org.id, slug, owner, token, project["id"], "main")


@pytest.fixture
async def tenant(svc: Services) -> Tenant:
    return await make_tenant(svc)


@pytest.fixture
async def other_tenant(svc: Services) -> Tenant:
    return await make_tenant(svc)


@pytest.fixture(scope="session")
async def client(settings: Settings, svc: Services) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, services=svc)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://canvasdb.test") as http:
        yield http


T = TypeVar("T")


async def loop_turns_during(work: Awaitable[T], every: float = 0.0) -> tuple[T, int]:
    """``work``'s result, and how many times the event loop ran a ticker (one turn each
    ``every`` s) meanwhile: work done off the loop leaves it turning."""
    turns = 0

    async def tick() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(every)
            turns += 1

    ticker = asyncio.create_task(tick())
    try:
        return await work, turns
    finally:
        ticker.cancel()
