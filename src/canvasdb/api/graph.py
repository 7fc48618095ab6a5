"""HTTP routes for relationships and graph queries."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from canvasdb.api.deps import ClientId, IsoTime, Svc, Who, conditionally, parse_id, query_parameters
from canvasdb.entities import parse_as_of_time
from canvasdb.graph import Relationship
from canvasdb.graph.traverse import MAX_DEPTH, MAX_DEPTH_TO_END, MAX_PAGE, MAX_PATHS, MAX_ROOTS

router = APIRouter(prefix="/v1/orgs/{org}", tags=["graph"])
IfMatch = Annotated[str | None, Header(alias="If-Match")]
AsOf = Annotated[str | None, Query(max_length=64, pattern=r"^[ -~]*$", description="ISO 8601 time")]
Kinds = Annotated[str | None, Query(max_length=2000, description="comma-separated kinds")]
DirectionQ = Annotated[Literal["out", "in", "both"], Query()]


class RelationshipIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: ClientId = None
    src: UUID
    dst: UUID
    kind: str = Field(max_length=320, examples=["depends_on"])
    data: dict[str, Any] = Field(default_factory=dict, examples=[{"label": "blocks"}])


class RelationshipDataIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: dict[str, Any]


class SubgraphIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    roots: list[UUID] = Field(min_length=1, max_length=MAX_ROOTS)
    depth: int = Field(default=2, ge=1, le=MAX_DEPTH)
    kinds: list[str] | None = Field(default=None, max_length=50)
    direction: Literal["out", "in", "both"] = "both"
    limit: int = Field(default=1000, ge=1, le=10 * MAX_PAGE)
    as_of: IsoTime | None = None


def _one(rel: Relationship, status: int = 200) -> JSONResponse:
    return JSONResponse(rel.to_json(), status_code=status, headers={"ETag": f'"{rel.version}"'})


def _kinds(value: str | None) -> list[str] | None:
    if value is None or value.strip() == "":
        return None
    return [k.strip() for k in value.split(",") if k.strip()]


@router.post("/relationships", status_code=201)
async def create_relationship(org: str, body: RelationshipIn, svc: Svc, who: Who) -> JSONResponse:
    """A relationship ``src -> dst`` of a kind; both ends must exist (422)."""
    rel = await svc.relationships.create(who, body.src, body.dst, body.kind, body.data, id=body.id)
    return _one(rel, 201)


@router.get("/relationships")
async def list_relationships(org: str, svc: Svc, who: Who,
                             entity: Annotated[str | None, Query(max_length=64)] = None,
                             direction: DirectionQ = "both", kinds: Kinds = None,
                             after: Annotated[str | None, Query(max_length=64)] = None,
                             limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> dict[str, Any]:
    """One page (by id) of the live relationships of ``entity`` (or of all the caller can see)."""
    items, nxt = await svc.relationships.list(
        who, entity=parse_id(entity, pointer="query:entity") if entity else None, direction=direction,
        kinds=_kinds(kinds), after=parse_id(after, "cursor", pointer="query:after") if after else None,
        limit=limit)
    return {"items": [r.to_json() for r in items], "next": str(nxt) if nxt else None}


@router.get("/relationships/{id}")
async def get_relationship(org: str, id: str, svc: Svc, who: Who, as_of: AsOf = None) -> JSONResponse:
    """The relationship now, or as of a time (``as_of``), with its version as the ETag."""
    return _one(await svc.relationships.get(who, parse_id(id, "relationship"), as_of=parse_as_of_time(as_of)))


@router.patch("/relationships/{id}")
async def update_relationship(org: str, id: str, body: RelationshipDataIn, svc: Svc, who: Who,
                              if_match: IfMatch = None) -> JSONResponse:
    """Replace the relationship's data (label, style): a new version."""
    rel = await conditionally(
        lambda v: svc.relationships.update(who, parse_id(id, "relationship"), body.data, if_version=v),
        if_match)
    return _one(rel)


@router.delete("/relationships/{id}")
async def delete_relationship(org: str, id: str, svc: Svc, who: Who,
                              if_match: IfMatch = None) -> JSONResponse:
    """Soft delete: a new version, not live; ``undelete`` brings it back."""
    return _one(await conditionally(
        lambda v: svc.relationships.delete(who, parse_id(id, "relationship"), if_version=v), if_match))


@router.post("/relationships/{id}/undelete")
async def undelete_relationship(org: str, id: str, svc: Svc, who: Who,
                                if_match: IfMatch = None) -> JSONResponse:
    """Bring a deleted relationship back (422 if it would close a cycle of an acyclic kind)."""
    return _one(await conditionally(
        lambda v: svc.relationships.undelete(who, parse_id(id, "relationship"), if_version=v), if_match))


@router.get("/relationships/{id}/history")
async def relationship_history(org: str, id: str, svc: Svc, who: Who) -> dict[str, Any]:
    """Every version of the relationship, oldest first, each with its data and whether it was live."""
    return {"versions": await svc.relationships.history(who, parse_id(id, "relationship"))}


@router.get("/entities/{id}/neighbors")
async def neighbors(org: str, id: str, svc: Svc, who: Who, direction: DirectionQ = "out", kinds: Kinds = None,
                    depth: Annotated[int, Query(ge=1, le=MAX_DEPTH)] = 1,
                    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
                    cursor: Annotated[str | None, Query(max_length=100)] = None,
                    as_of: AsOf = None) -> dict[str, Any]:
    """Entities within ``depth`` steps, with their depth and the relationship that reached them."""
    with query_parameters():
        return await svc.graph.neighbors(who, parse_id(id), direction=direction, kinds=_kinds(kinds),
                                         depth=depth, limit=limit, cursor=cursor,
                                         as_of=parse_as_of_time(as_of))


@router.get("/entities/{id}/reachable")
async def reachable(org: str, id: str, svc: Svc, who: Who, direction: DirectionQ = "out", kinds: Kinds = None,
                    depth: Annotated[int, Query(ge=1, le=MAX_DEPTH_TO_END)] = 1,
                    as_of: AsOf = None) -> dict[str, Any]:
    """Every entity within ``depth`` steps with its depth: ids only, all of them (capped)."""
    got = await svc.graph.reachable(who, parse_id(id), direction=direction, kinds=_kinds(kinds), depth=depth,
                                    as_of=parse_as_of_time(as_of))
    ordered = sorted(got["found"].items(), key=lambda x: x[1])
    return {"nodes": [{"id": str(n), "depth": d} for n, d in ordered],
            "truncated": got["truncated"]}


@router.get("/entities/{id}/dependents")
async def dependents(org: str, id: str, svc: Svc, who: Who, kinds: Kinds = None,
                     depth: Annotated[int | None, Query(ge=1, le=MAX_DEPTH_TO_END)] = None,
                     limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
                     cursor: Annotated[str | None, Query(max_length=100)] = None,
                     as_of: AsOf = None) -> dict[str, Any]:
    """What depends on this entity: everything reaching it, to ``depth`` or to the end."""
    with query_parameters():
        return await svc.graph.dependents(who, parse_id(id), kinds=_kinds(kinds), depth=depth, limit=limit,
                                          cursor=cursor, as_of=parse_as_of_time(as_of))


@router.get("/entities/{id}/lineage")
async def lineage(org: str, id: str, svc: Svc, who: Who, as_of: AsOf = None,
                  depth: Annotated[int, Query(ge=1, le=MAX_DEPTH_TO_END)] = MAX_DEPTH) -> dict[str, Any]:
    """The ``derived_from`` chain back to the origin, and the copies made from this entity, within
    ``depth`` steps; up to 1,000 of each (``truncated`` when there were more)."""
    return await svc.graph.lineage(who, parse_id(id), depth=depth, as_of=parse_as_of_time(as_of))


@router.get("/graph/path")
async def path(org: str, svc: Svc, who: Who,
               from_: Annotated[str, Query(alias="from", max_length=64)],
               to: Annotated[str, Query(max_length=64)], kinds: Kinds = None,
               max_depth: Annotated[int, Query(ge=1, le=MAX_DEPTH)] = 6, direction: DirectionQ = "out",
               all: bool = False, max_paths: Annotated[int, Query(ge=1, le=MAX_PATHS)] = 10,
               as_of: AsOf = None) -> dict[str, Any]:
    """The shortest path (or, with ``all=true``, every shortest path up to ``max_paths``)."""
    return await svc.graph.path(who, parse_id(from_), parse_id(to), kinds=_kinds(kinds), max_depth=max_depth,
                                direction=direction, all_paths=all, max_paths=max_paths,
                                as_of=parse_as_of_time(as_of))


@router.post("/graph/subgraph")
async def subgraph(org: str, body: SubgraphIn, svc: Svc, who: Who) -> dict[str, Any]:
    """The entities within ``depth`` of the roots and the relationships among them, in one call."""
    return await svc.graph.subgraph(who, body.roots, depth=body.depth, kinds=body.kinds,
                                    direction=body.direction, limit=body.limit, as_of=body.as_of)


@router.get("/graph/cycle")
async def cycle(org: str, svc: Svc, who: Who, src: Annotated[str, Query(max_length=64)],
                dst: Annotated[str, Query(max_length=64)], kind: Annotated[str, Query(max_length=320)]
                ) -> dict[str, Any]:
    """Would adding ``src -> dst`` of ``kind`` create a cycle?"""
    return {"creates_cycle": await svc.graph.creates_cycle(who, parse_id(src), parse_id(dst), kind)}
