"""HTTP routes for entities and their history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from canvasdb.api.deps import ClientId, Svc, Who, conditionally, parse_id, query_parameters
from canvasdb.entities import Entity, parse_as_of, parse_as_of_time
from canvasdb.entities.store import MAX_IDS
from canvasdb.errors import InvalidInput
from canvasdb.services import Services
from canvasdb.tenancy import Principal

router = APIRouter(prefix="/v1/orgs/{org}", tags=["entities"])
IfMatch = Annotated[str | None, Header(alias="If-Match")]
# Version numbers and ISO 8601 times are ASCII; refusing the rest here keeps Unicode digits
# such as '²' (which str.isdigit accepts and int() does not) away from parse_as_of.
ASCII = r"^[ -~]*$"


class EntityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: ClientId = None
    type: str = Field(max_length=200, examples=["kanban.card"])
    data: dict[str, Any] = Field(examples=[{"title": "Ship it", "status": "todo"}])


class DataIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: dict[str, Any]


def _one(entity: Entity, status: int = 200, *, location: bool = False) -> JSONResponse:
    headers = {"ETag": f'"{entity.version}"'}
    if location:
        headers["Location"] = f"/v1/orgs/{entity.org_id}/entities/{entity.id}"
    return JSONResponse(entity.to_json(), status_code=status, headers=headers)


async def _written(svc: Services, who: Principal, entity: Entity) -> JSONResponse:
    """After a write: a projected board node or edge carries the change into its live board."""
    await svc.projection.entity_changed(who, entity)
    return _one(entity)


@router.post("/projects/{project}/entities", status_code=201)
async def create_entity(org: str, project: str, body: EntityIn, svc: Svc, who: Who) -> JSONResponse:
    """Create an entity at version 1 (its ``id`` may be the client's); answers its ETag and Location."""
    project_id = await svc.tenancy.resolve_project(who, project, write=True)
    entity = await svc.entities.create(who, project_id, body.type, body.data, id=body.id)
    return _one(entity, 201, location=True)


@router.get("/projects/{project}/entities")
async def list_entities(
    org: str, project: str, svc: Svc, who: Who,
    type: Annotated[str | None, Query(max_length=200)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    as_of: Annotated[str | None, Query(max_length=64, pattern=ASCII, description="ISO 8601 time")] = None,
) -> dict[str, Any]:  # fmt: skip
    """One page of the project's entities (of a type), by id; ``as_of`` lists them as they were."""
    moment = parse_as_of_time(as_of)
    project_id = await svc.tenancy.resolve_project(who, project)
    with query_parameters():
        page = await svc.entities.list(who, project_id, type=type, after=after, limit=limit, as_of=moment)
    return {"items": [e.to_json() for e in page.items], "next": page.next}


@router.get("/entities")
async def get_entities(
    org: str, svc: Svc, who: Who,
    ids: Annotated[str, Query(description=f"comma-separated ids, at most {MAX_IDS}")],
) -> dict[str, Any]:  # fmt: skip
    """Many entities by id in one call; ids that are missing, deleted or unreadable are omitted."""
    given = [i.strip() for i in ids.split(",") if i.strip()]  # (the URL's length bounds the split)
    if len(given) > MAX_IDS:
        raise InvalidInput(f"at most {MAX_IDS} ids at once (got {len(given)})", pointer="query:ids")
    wanted = [parse_id(i, pointer="query:ids") for i in given]
    return {"items": [e.to_json() for e in await svc.entities.get_many(who, wanted)]}


@router.get("/entities/{id}")
async def get_entity(
    org: str, id: str, svc: Svc, who: Who,
    as_of: Annotated[str | None, Query(max_length=64, pattern=ASCII,
                                       description="version or ISO 8601 time")] = None,
) -> JSONResponse:  # fmt: skip
    """The entity now, or as of a version or a time (``as_of``), with its version as the ETag."""
    return _one(await svc.entities.get(who, parse_id(id), as_of=parse_as_of(as_of)))


@router.put("/entities/{id}")
async def replace_entity(org: str, id: str, body: DataIn, svc: Svc, who: Who,
                         if_match: IfMatch = None) -> JSONResponse:
    """Replace ``data``. Send the ETag back in If-Match to refuse a stale write (409)."""
    entity = await conditionally(
        lambda v: svc.entities.replace(who, parse_id(id), body.data, if_version=v), if_match)
    return await _written(svc, who, entity)


@router.patch("/entities/{id}")
async def patch_entity(org: str, id: str, body: DataIn, svc: Svc, who: Who,
                       if_match: IfMatch = None) -> JSONResponse:
    """JSON Merge Patch (RFC 7396) of ``data``: members set to null are removed."""
    entity = await conditionally(
        lambda v: svc.entities.patch(who, parse_id(id), body.data, if_version=v), if_match)
    return await _written(svc, who, entity)


@router.delete("/entities/{id}")
async def delete_entity(org: str, id: str, svc: Svc, who: Who, if_match: IfMatch = None) -> JSONResponse:
    """Soft delete: a tombstone version; ``undelete`` or ``restore`` brings it back."""
    entity = await conditionally(lambda v: svc.entities.delete(who, parse_id(id), if_version=v), if_match)
    return await _written(svc, who, entity)


@router.post("/entities/{id}/undelete")
async def undelete_entity(org: str, id: str, svc: Svc, who: Who, if_match: IfMatch = None) -> JSONResponse:
    """Bring a deleted entity back as it was, as a new version (its relationships come back too)."""
    entity = await conditionally(lambda v: svc.entities.undelete(who, parse_id(id), if_version=v), if_match)
    return await _written(svc, who, entity)


@router.post("/entities/{id}/restore")
async def restore_entity(
    org: str, id: str, svc: Svc, who: Who, version: Annotated[int, Query(ge=1, le=2**31 - 1)],
    if_match: IfMatch = None,
) -> JSONResponse:
    """Make an old version current again, as a new version (If-Match: only if still at that one)."""
    entity = await conditionally(lambda v: svc.entities.restore(who, parse_id(id), version, if_version=v),
                                  if_match)
    return await _written(svc, who, entity)


@router.get("/entities/{id}/history")
async def entity_history(
    org: str, id: str, svc: Svc, who: Who,
    before: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:  # fmt: skip
    """Versions newest first, each with its RFC 6902 patch from the previous one."""
    page = await svc.entities.history(who, parse_id(id), before=before, limit=limit)
    return {"items": [v.to_json() for v in page.items], "next": page.next}


@router.get("/entities/{id}/diff")
async def entity_diff(
    org: str, id: str, svc: Svc, who: Who,
    from_: Annotated[int, Query(alias="from", ge=1, le=2**31 - 1)],
    to: Annotated[int, Query(ge=1, le=2**31 - 1)],
) -> dict[str, Any]:  # fmt: skip
    """The RFC 6902 patch that turns version ``from`` into version ``to``."""
    patch = await svc.entities.diff(who, parse_id(id), from_, to)
    return {"from": from_, "to": to, "patch": patch}


__all__ = ["Response", "router"]
