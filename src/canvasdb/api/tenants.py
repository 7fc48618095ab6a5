"""HTTP routes for orgs, members, projects and entity types."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from canvasdb.api.deps import Svc, User, Who
from canvasdb.entities import EntityType
from canvasdb.errors import NotFound
from canvasdb.tenancy import NOT_A_MEMBER

router = APIRouter(prefix="/v1")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OrgIn(_Strict):
    slug: str = Field(max_length=63, examples=["acme"])
    name: str | None = Field(default=None, max_length=200)


class ProjectIn(_Strict):
    slug: str = Field(max_length=63, examples=["roadmap"])
    name: str | None = Field(default=None, max_length=200)


class MemberIn(_Strict):
    email: str = Field(max_length=320)
    role: Literal["owner", "admin", "member"] = "member"


class ProjectMemberIn(_Strict):
    role: Literal["editor", "viewer"]


class EntityTypeIn(_Strict):
    name: str = Field(max_length=200, examples=["kanban.card"])
    module: str = Field(default="", max_length=100)
    json_schema: dict[str, Any] | None = None
    text_fields: dict[str, str] = Field(default_factory=dict, examples=[{"title": "A", "body": "B"}])
    reference_fields: list[str] = Field(default_factory=list, examples=[["$.depends_on[*]"]])
    embed_fields: list[str] = Field(default_factory=list)
    tag_field: str | None = None
    acyclic_kinds: list[str] = Field(default_factory=list, examples=[["depends_on"]])


@router.post("/orgs", status_code=201, tags=["tenancy"])
async def create_org(body: OrgIn, svc: Svc, user: User) -> dict[str, Any]:
    """Create an org; the caller becomes its owner."""
    org = await svc.tenancy.create_org(body.slug, body.name, owner=user)
    return {"id": str(org.id), "slug": org.slug, "name": org.name}


@router.post("/orgs/{org}/members", status_code=201, tags=["tenancy"],
             responses={200: {"description": "an existing member's role changed"}})
async def add_member(org: str, body: MemberIn, svc: Svc, who: Who) -> JSONResponse:
    """Add a user (created if unknown) to the org (201), or change a member's role (200). Owner
    or admin only; only an owner makes an owner or changes an owner's role (403), and the last
    owner stays one (409)."""
    who.require_org_admin()
    user_id = await svc.tenancy.ensure_user(body.email)
    added = await svc.tenancy.change_org_role(who, user_id, body.role)
    return JSONResponse({"user_id": str(user_id), "email": body.email, "role": body.role},
                        status_code=201 if added else 200)


@router.post("/orgs/{org}/projects", status_code=201, tags=["tenancy"])
async def create_project(org: str, body: ProjectIn, svc: Svc, who: Who) -> dict[str, Any]:
    """Create a project in the org (owners and admins); its slug is unique in the org (409)."""
    row = await svc.tenancy.create_project(who, body.slug, body.name)
    return {**row, "id": str(row["id"]), "created_at": row["created_at"].isoformat()}


@router.get("/orgs/{org}/projects", tags=["tenancy"])
async def list_projects(org: str, svc: Svc, who: Who) -> dict[str, Any]:
    """The org's projects the caller may read, whole (no pages)."""
    rows = await svc.tenancy.list_projects(who)
    return {"items": [{**r, "id": str(r["id"]), "created_at": r["created_at"].isoformat()}
                      for r in rows]}


@router.put("/orgs/{org}/projects/{project}/members/{email}", status_code=204, tags=["tenancy"])
async def set_project_member(
    org: str, project: str, email: str, body: ProjectMemberIn, svc: Svc, who: Who
) -> Response:
    """Give an org member the ``editor`` or ``viewer`` role on a project (owners and admins)."""
    who.require_org_admin()  # first: whether the email is anyone's is not for the others to learn
    project_id = await svc.tenancy.resolve_project(who, project)
    try:
        user_id = await svc.tenancy.user_by_email(email)
    except NotFound:  # as for a user of another org: whether an email is registered is not said
        raise NotFound(NOT_A_MEMBER) from None
    await svc.tenancy.set_project_role(who, project_id, user_id, body.role)
    return Response(status_code=204)


@router.get("/orgs/{org}/entity-types", tags=["entity types"])
async def list_entity_types(org: str, svc: Svc, who: Who) -> dict[str, Any]:
    """Every entity type registered in the org, whole (no pages)."""
    return {"items": [t.to_json() for t in await svc.types.list(who)]}


@router.post("/orgs/{org}/entity-types", status_code=201, tags=["entity types"])
async def register_entity_type(org: str, body: EntityTypeIn, svc: Svc, who: Who) -> dict[str, Any]:
    """Register (or replace) an entity type: schema, text, reference and embedding fields."""
    spec = await svc.types.register(who, EntityType(**body.model_dump()))
    if svc.entities.changed is not None:  # its entities' words and vectors, if it re-indexed them
        await svc.entities.changed(who.org_id)
    return spec.to_json()


@router.get("/orgs/{org}/entity-types/{name}", tags=["entity types"])
async def get_entity_type(org: str, name: str, svc: Svc, who: Who) -> dict[str, Any]:
    """One registered entity type by name (404 if it is not registered)."""
    return (await svc.types.get(who, name)).to_json()
